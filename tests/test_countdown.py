"""Tests for countdown.py: the prompt, the reward, the solver, problems and synthetic traces.

References used here are independent of the code under test: hand-checked cases from the paper
spec, a test-local restatement of the original reward (regex + eval, only on benign inputs), a
brute force over every expression tree, and Python's own `ast` for parsing answers.
"""
import ast
import itertools
import json
import operator
import os
import random
import re
import sys
import time
from fractions import Fraction
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import countdown as C  # noqa: E402
import traces as T  # noqa: E402
from conftest import lock_held_elsewhere  # noqa: E402
from plumbing import files  # noqa: E402

# -----------------------------------------------------------------------------
# Independent references

# The paper's base prompt (paper_spec 1.2), typed out here for nums [3, 17, 8] and target 20.
BASE_PROMPT_3_17_8_20 = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with "
    "the answer.\n"
    "User: Using the numbers [3, 17, 8], create an equation that equals 20. You can use basic arithmetic "
    "operations (+, -, *, /) and each number can only be used once. Show your work in <think> </think> "
    "tags. And return the final answer in <answer> </answer> tags, for example <answer> (1 + 2) / 3 "
    "</answer>.\n"
    "Assistant: Let me solve this step by step.\n"
    "<think>"
)
QWEN_PROMPT_1_2_3 = (
    "<|im_start|>system\nYou are a helpful assistant. You first thinks about the reasoning process in "
    "the mind and then provides the user with the answer.<|im_end|>\n<|im_start|>user\n Using the "
    "numbers [1, 2, 3], create an equation that equals 6. You can use basic arithmetic operations "
    "(+, -, *, /) and each number can only be used once. Show your work in <think> </think> tags. And "
    "return the final answer in <answer> </answer> tags, for example <answer> (1 + 2) / 3 </answer>."
    "<|im_end|>\n<|im_start|>assistant\nLet me solve this step by step.\n<think>"
)


def reference_score(solution_str, nums, target, format_score=0.1, score=1.0):
    """The original reward as paper_spec 1.3 describes it (for benign inputs only: it calls eval)."""
    if "Assistant:" in solution_str:
        solution_str = solution_str.split("Assistant:", 1)[1]
    elif "<|im_start|>assistant" in solution_str:
        solution_str = solution_str.split("<|im_start|>assistant", 1)[1]
    else:
        return 0
    line = solution_str.split("\n")[-1]
    matches = list(re.finditer(r"<answer>(.*?)</answer>", line))
    if not matches:
        return 0
    eq = matches[-1].group(1).strip()
    try:
        if sorted(int(n) for n in re.findall(r"\d+", eq)) != sorted(nums):
            return format_score
    except ValueError:
        return format_score
    try:
        if not re.match(r"^[\d+\-*/().\s]+$", eq):
            return format_score
        result = eval(eq, {"__builtins__": None}, {})
    except Exception:
        return format_score
    return score if abs(result - target) < 1e-5 else format_score


def ast_value(expr):
    """Exact value of an answer via Python's parser (only + - * / and int literals allowed)."""
    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return Fraction(node.value)
        if isinstance(node, ast.BinOp):
            a, b = ev(node.left), ev(node.right)
            return {ast.Add: a + b, ast.Sub: a - b, ast.Mult: a * b}.get(type(node.op)) \
                if not isinstance(node.op, ast.Div) else a / b
        raise AssertionError(f"unexpected node {ast.dump(node)}")
    return ev(ast.parse(expr, mode="eval"))


def ast_literals(expr):
    return sorted(n.value for n in ast.walk(ast.parse(expr, mode="eval")) if isinstance(n, ast.Constant))


def canon(expr):
    """Expression tree with the operands of + and * sorted: equal iff equal up to those swaps."""
    def c(node):
        if isinstance(node, ast.Expression):
            return c(node.body)
        if isinstance(node, ast.Constant):
            return ("n", node.value)
        l, r = c(node.left), c(node.right)
        op = type(node.op).__name__
        if op in ("Add", "Mult"):
            l, r = sorted([l, r], key=repr)
        return (op, l, r)
    return c(ast.parse(expr, mode="eval"))


def brute_reach(nums):
    """Every value reachable using all of nums with + - * / over rationals (pairwise reduction)."""
    memo = {}

    def go(vals):
        key = tuple(sorted(vals))
        if key in memo:
            return memo[key]
        if len(vals) == 1:
            return {vals[0]}
        out = set()
        for i, j in itertools.permutations(range(len(vals)), 2):
            if i > j:
                continue
            a, b = vals[i], vals[j]
            rest = [v for k, v in enumerate(vals) if k not in (i, j)]
            results = {a + b, a - b, b - a, a * b}
            if b:
                results.add(a / b)
            if a:
                results.add(b / a)
            for v in results:
                out |= go(rest + [v])
        memo[key] = out
        return out
    return go([Fraction(x) for x in nums])


def brute_reach_natural(nums):
    """The reference generator's search (paper_spec 1.1): a+b, a*b, larger-smaller, and
    larger/smaller when it divides exactly; every intermediate a non-negative integer."""
    if len(nums) == 1:
        return {nums[0]}
    out = set()
    for i, j in itertools.combinations(range(len(nums)), 2):
        a, b = max(nums[i], nums[j]), min(nums[i], nums[j])
        rest = [v for k, v in enumerate(nums) if k not in (i, j)]
        results = {a + b, a * b, a - b} | ({a // b} if b and a % b == 0 else set())
        for v in results:
            out |= brute_reach_natural(rest + [v])
    return out


def brute_all(nums, target):
    """Every fully parenthesized expression tree over nums equal to target (as strings)."""
    out = set()

    def go(items):
        if len(items) == 1:
            if items[0][0] == target:
                out.add(items[0][1])
            return
        for i, j in itertools.permutations(range(len(items)), 2):
            (a, ea), (b, eb) = items[i], items[j]
            rest = [it for k, it in enumerate(items) if k not in (i, j)]
            for op in "+-*/":
                if op == "/" and b == 0:
                    continue
                v = {"+": a + b, "-": a - b, "*": a * b}.get(op) if op != "/" else a / b
                go(rest + [(v, f"({ea} {op} {eb})")])
    go([(Fraction(x), str(x)) for x in nums])
    return out


def answer(expr):
    return f"<think> some reasoning </think>\n<answer> {expr} </answer>"


# -----------------------------------------------------------------------------
# Prompt


def test_base_prompt_matches_the_paper_character_for_character():
    assert C.make_prompt([3, 17, 8], 20) == BASE_PROMPT_3_17_8_20
    assert C.make_prompt((3, 17, 8), 20, "base") == BASE_PROMPT_3_17_8_20
    assert C.make_query([3, 17, 8], 20) == BASE_PROMPT_3_17_8_20[: -len("\n<think>")]
    assert C.make_prompt([1, 2, 3], 6, "qwen-instruct") == QWEN_PROMPT_1_2_3
    assert set(C.PROMPT_TEMPLATES) == {"base", "qwen-instruct"}


def test_prompt_rejects_bad_input():
    with pytest.raises(ValueError, match="template"):
        C.make_prompt([1, 2], 3, "chatml")
    with pytest.raises(ValueError, match="integers"):
        C.make_prompt([1, 2.5], 3)
    with pytest.raises(ValueError, match="integers"):
        C.make_prompt("12", 3)
    with pytest.raises(ValueError, match="empty"):
        C.make_prompt([], 3)


def test_sft_example_uses_the_rl_prompt_boundary():
    text = "<think>\n3 + 17 = 20.\n</think>\n<answer> 3 + 17 </answer>"
    ex = C.sft_example([3, 17], 20, "  " + text)
    assert ex["query"] == C.make_prompt([3, 17], 20)
    assert ex["query"].endswith("<think>")
    assert ex["completion"] == text[len("<think>"):]
    # the paper's (query, completion) pair and ours spell the same transcript
    assert C.make_query([3, 17], 20) + "\n" + text == ex["query"] + ex["completion"]
    assert C.score(ex["completion"], [3, 17], 20) == 1.0
    with pytest.raises(ValueError, match="<think>"):
        C.sft_example([3, 17], 20, "3 + 17 = 20 <answer> 3 + 17 </answer>")


# -----------------------------------------------------------------------------
# Reward: hand-checked cases (paper_spec 1.3), the original's quirks, and our deliberate fixes

@pytest.mark.parametrize("response,nums,target,expected", [
    (answer("(1 + 2) * 3"), [1, 2, 3], 9, 1.0),
    (answer("(2 + 1) * 3"), [3, 2, 1], 9, 1.0),
    ("So the answer: <answer>(1+2)*3</answer>", [1, 2, 3], 9, 1.0),  # text before it on the line
    (answer("(5 - 1 / 5) * 5"), [1, 5, 5, 5], 24, 1.0),  # needs exact fractions
    (answer("8 / (3 - 8 / 3)"), [3, 3, 8, 8], 24, 1.0),
    (answer("-3 + 5"), [3, 5], 2, 1.0),  # unary minus is allowed, as in the original
    (answer("((((1 + 2)))) * 3"), [1, 2, 3], 9, 1.0),
    (answer("(1 + 2) * 3"), [1, 2, 3], 10, 0.1),  # wrong value
    ("<think> x </think>\n<answer>\n(1 + 2) * 3\n</answer>", [1, 2, 3], 9, 0.0),  # multi-line: 0
    (answer("(1 + 2) * 3") + "\nDone.", [1, 2, 3], 9, 0.0),  # any text on a later line: 0
    (answer("(1 + 2) * 3") + "\n", [1, 2, 3], 9, 0.0),  # even a trailing newline
    (answer("(1 + 2) * 3 = 9"), [1, 2, 3], 9, 0.1),  # "= 9": the extra 9 fails the number check
    ("<answer></answer>", [1, 2, 3], 9, 0.1),  # an empty answer earns the format credit
    ("<answer> 1 + 2 + 3 </answer> <answer> (1 + 2) * 3 </answer>", [1, 2, 3], 9, 1.0),  # last wins
    ("<answer> (1 + 2) * 3 </answer> <answer> 1 + 2 + 3 </answer>", [1, 2, 3], 9, 0.1),
    (answer("3 * 3"), [3, 1, 2], 9, 0.1),  # a number reused, others missing
    (answer("3 * 3"), [3, 3, 1], 9, 0.1),  # a number missing
    (answer("3 * 3 * 1 * 1"), [3, 3, 1], 9, 0.1),  # an extra literal
    (answer("4 / (2 - 2)"), [4, 2, 2], 1, 0.1),  # division by zero
    (answer("05 + 3"), [5, 3], 8, 0.1),  # leading zero: a SyntaxError for the original too
    (answer("1\u00a0+ 2"), [1, 2], 3, 0.1),  # non-ASCII space: also a SyntaxError in eval
    (answer("1\t+ 2"), [1, 2], 3, 1.0),
    ("no answer at all", [1, 2, 3], 9, 0.0),
    ("<answer> (1 + 2) * 3", [1, 2, 3], 9, 0.0),  # unclosed
    ("(1 + 2) * 3 </answer>", [1, 2, 3], 9, 0.0),
    # deliberate differences from the original, which scored the first three 1.0
    (answer("2**3*1"), [2, 3, 1], 8, 0.1),
    (answer("2.5 * 4"), [2, 5, 4], 10, 0.1),
    (answer("+3 + 5"), [3, 5], 8, 0.1),
    (answer("7 // 2 * 1"), [7, 2, 1], 3, 0.1),
    (answer("(1, 2, 3)"), [1, 2, 3], 9, 0.1),
    (answer("abs(-9) + 1 - 2 + 3"), [9, 1, 2, 3], 11, 0.1),
])
def test_score_hand_checked(response, nums, target, expected):
    assert C.score(response, nums, target) == expected
    assert C.is_correct(response, nums, target) == (expected == 1.0)


def test_score_the_original_gave_full_credit_for_powers_and_floats():
    # Our restatement of the original agrees with paper_spec 1.3's checked table ...
    assert reference_score("Assistant:" + answer("2**3*1"), [2, 3, 1], 8) == 1.0
    assert reference_score("Assistant:" + answer("2.5 * 4"), [2, 5, 4], 10) == 1.0
    # ... and ours deliberately gives only the format credit
    assert C.score(answer("2**3*1"), [2, 3, 1], 8) == 0.1


def test_score_options():
    good, wrong = answer("(1 + 2) * 3"), answer("1 + 2 + 3")
    assert C.score(good, [1, 2, 3], 9, format_score=0.0, correct_score=2.0) == 2.0
    assert C.score(wrong, [1, 2, 3], 9, format_score=0.0) == 0.0
    assert C.score("nothing", [1, 2, 3], 9, format_score=0.5) == 0.0
    assert isinstance(C.score("nothing", [1, 2, 3], 9), float)
    multi = "<think> x </think>\n<answer>\n(1 + 2) * 3\n</answer>"
    assert C.score(multi, [1, 2, 3], 9, lenient=True) == 1.0
    assert C.score(good + "\nDone.", [1, 2, 3], 9, lenient=True) == 1.0
    assert C.score(good + "\n<answer> 1 + 2 + 3 </answer>\nok", [1, 2, 3], 9, lenient=True) == 0.1
    assert C.is_correct(multi, [1, 2, 3], 9, lenient=True)
    assert not C.is_correct(multi, [1, 2, 3], 9)


def test_paren_depth_limit_follows_cpython():
    ok = "(" * 200 + "1 + 2" + ")" * 200 + " * 3"
    deep = "(" * 201 + "1 + 2" + ")" * 201 + " * 3"
    assert C.score(answer(ok), [1, 2, 3], 9) == 1.0 == reference_score("Assistant:" + answer(ok), [1, 2, 3], 9)
    assert C.score(answer(deep), [1, 2, 3], 9) == 0.1 == reference_score("Assistant:" + answer(deep), [1, 2, 3], 9)


def _random_response(rng, nums, target):
    """A benign response (no **, //, floats, unary plus) that exercises the extraction rules."""
    def expr(vals):
        if len(vals) == 1:
            return str(vals[0])
        k = rng.randrange(1, len(vals))
        s = f"{expr(vals[:k])} {rng.choice('+-*/')} {expr(vals[k:])}"
        return f"({s})" if rng.random() < 0.6 else s
    vals = list(nums)
    rng.shuffle(vals)
    r = rng.random()
    if r < 0.1:
        vals = vals[:-1]
    elif r < 0.2:
        vals = vals + [rng.randint(1, 30)]
    e = C.solve(nums, target) if rng.random() < 0.4 else expr(vals)
    e = e or expr(vals)
    if rng.random() < 0.1:
        e += f" = {target}"
    parts = [" I think.", "\n", f"<answer>{rng.choice(['', ' '])}{e} </answer>", "\n", " trailing",
             "<answer> 1 + 1 </answer>", "<answer>", "</answer>", " x"]
    out = "".join(rng.choice(parts) for _ in range(rng.randint(0, 4)))
    out += f"<answer> {e} </answer>" + "".join(rng.choice(parts) for _ in range(rng.choice([0, 0, 1, 2])))
    return out


def test_score_agrees_with_the_original_on_benign_responses():
    rng = random.Random(0)
    seen = {0.0: 0, 0.1: 0, 1.0: 0}
    for p in C.generate_problems(60, "priming", seed=5):
        for _ in range(25):
            resp = _random_response(rng, p["nums"], p["target"])
            for template in ("base", "qwen-instruct"):
                prompt = C.make_prompt(p["nums"], p["target"], template)
                ref = reference_score(prompt + resp, p["nums"], p["target"])
                assert C.score(resp, p["nums"], p["target"]) == ref, (resp, p)
            seen[ref] += 1
    assert min(seen.values()) > 50, seen  # all three outcomes were exercised


def test_last_answer_matches_the_regex_semantics():
    rng = random.Random(1)
    pieces = ["<answer>", "</answer>", "a", "1", " ", "<", ">", "/"]
    for _ in range(5000):
        s = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
        m = list(re.finditer(r"<answer>(.*?)</answer>", s))
        assert C._last_answer(s) == (m[-1].group(1) if m else None), s


# -----------------------------------------------------------------------------
# Reward: adversarial inputs return quickly with at most the format credit

MB = 1 << 20
ADVERSARIAL = [
    ("power tower", answer("9**9**9**9**9"), [9, 9, 9, 9, 9], 9),
    ("long power tower", answer("**".join(["9"] * 300)), [9] * 300, 9),
    ("10k-deep parens", answer("(" * 10_000 + "1" + ")" * 10_000), [1], 1),
    ("deep parens in cap", answer("(" * 400 + "1" + ")" * 400), [1], 1),
    ("odd unary minus chain", answer("-" * 901 + "1"), [1], 1),
    ("long unary minus chain", answer("-" * 100_000 + "1"), [1], 1),
    ("1e6-digit literal", answer("1" * 10**6), [1], 1),
    ("101-digit literal", answer("9" * 101), [int("9" * 101)], int("9" * 101)),
    ("many big products", answer(" * ".join(["9" * 90] * 10)), [int("9" * 90)] * 10, 1),
    ("megabytes of text", "word " * (2 * MB // 5) + answer("1 + 2"), [1, 2], 4),
    ("megabyte answer", answer("1 +" + " " * MB + "2"), [1, 2], 3),  # over MAX_ANSWER_CHARS
    ("unclosed opens", "<answer>" * (MB // 8) + "1 + 2 </answer>", [1, 2], 4),
    ("many answers", "<answer> 1 + 2 </answer>" * (MB // 24), [1, 2], 4),
    ("opens then close far", "<answer>" + "x" * MB + "</answer>", [1], 1),
    ("arabic digits", answer("٣ + 4"), [3, 4], 7),
    ("fullwidth digits", answer("３ + 4"), [3, 4], 7),
    ("code", answer("__import__('os').system('echo 1')"), [1], 1),
    ("lambda", answer("(lambda: 1)()"), [1], 1),
    ("float overflow", answer("1e308 * 10"), [1, 308, 10], 1),
    ("nul bytes", answer("1\x00+ 2"), [1, 2], 3),
    ("huge exponent scientific", answer("1e999999999"), [1, 999999999], 1),
]


@pytest.mark.parametrize("name,response,nums,target", ADVERSARIAL, ids=[a[0] for a in ADVERSARIAL])
def test_adversarial_inputs_are_bounded(name, response, nums, target):
    t0 = time.perf_counter()
    s = C.score(response, nums, target)
    s_lenient = C.score(response, nums, target, lenient=True)
    elapsed = time.perf_counter() - t0
    assert s <= 0.1 and s_lenient <= 0.1
    assert elapsed < 1.0, f"{name} took {elapsed:.2f}s"  # catches a hang; timing lives in bench/


def test_evaluate_grammar():
    assert C.evaluate("1 + 2 * 3") == 7
    assert C.evaluate("(1 + 2) * 3") == 9
    assert C.evaluate("7 / 2") == Fraction(7, 2)
    assert C.evaluate("8 - 3 - 2") == 3  # left associative
    assert C.evaluate("12 / 3 / 2") == 2
    assert C.evaluate("-2 * -3") == 6
    assert C.evaluate("2 * -(3 + 1)") == -8
    for bad in ("", "1 +", "()", "(1", "1)", "2 ** 3", "7 // 2", "1.5", "2(3)", "+1", "x", "1 2"):
        assert C.evaluate(bad) is None, bad


# -----------------------------------------------------------------------------
# Solver


def test_solver_against_brute_force_on_random_problems():
    rng = random.Random(2)
    n_solvable = 0
    for _ in range(120):
        nums = [rng.randint(1, 13) for _ in range(rng.choice((2, 3, 3, 4)))]
        target = rng.randint(1, 40)
        expr = C.solve(nums, target)
        solvable = Fraction(target) in brute_reach(nums)
        assert (expr is not None) == solvable, (nums, target, expr)
        if expr is not None:
            n_solvable += 1
            assert ast_value(expr) == target and ast_literals(expr) == sorted(nums)
            assert C.score(answer(expr), nums, target) == 1.0
    assert 20 < n_solvable < 110


def test_natural_solvability_matches_the_reference_search():
    # the generator's criterion (non-negative integer intermediates, as the original's search)
    rng = random.Random(3)
    agree = 0
    for _ in range(300):
        nums = [rng.randint(1, 24) for _ in range(rng.choice((3, 4)))]
        target = rng.randint(1, 60)
        expected = target in brute_reach_natural(nums)
        assert C._solvable_natural(nums, target) == expected, (nums, target)
        agree += expected
    assert 50 < agree < 280
    # a problem that needs a fraction is solvable for the reward but not "natural"
    assert not C._solvable_natural([1, 5, 5, 5], 24) and C.solve([1, 5, 5, 5], 24) is not None


def test_solver_six_numbers():
    expr = C.solve([25, 50, 75, 100, 3, 6], 952)
    assert ast_value(expr) == 952 and ast_literals(expr) == [3, 6, 25, 50, 75, 100]
    assert C.solve([1, 1, 1, 1, 1, 1], 999) is None
    with pytest.raises(ValueError, match="at most 6"):
        C.solve([1] * 7, 7)


@pytest.mark.parametrize("nums,target", [
    ([1, 2, 3], 6), ([2, 2, 3], 12), ([3, 5, 7], 8), ([4, 6, 9], 6), ([1, 5, 5, 5], 24),
    ([3, 3, 8, 8], 24), ([2, 3, 4, 6], 24), ([1, 1, 2, 2], 0), ([1, 2, 7], 100),
])
def test_solve_all_against_brute_force(nums, target):
    ours = C.solve_all(nums, target)
    expected = {canon(e) for e in brute_all(nums, target)}
    assert len({canon(e) for e in ours}) == len(ours)  # one per class, no duplicates
    assert {canon(e) for e in ours} == expected
    for e in ours:
        assert C.score(answer(e), nums, target) == 1.0
    assert C.solve_all(nums, target, limit=1) == ours[:1]


# -----------------------------------------------------------------------------
# Problems


@pytest.mark.parametrize("distribution", ["rl", "priming"])
def test_generated_problems_are_solvable(distribution):
    problems = C.generate_problems(300, distribution, seed=0)
    lo_t, hi_t, lo_n, hi_n = {"rl": (10, 100, 1, 99), "priming": (10, 25, 1, 24)}[distribution]
    sizes = [len(p["nums"]) for p in problems]
    assert set(sizes) == {3, 4} and 100 < sizes.count(3) < 200
    assert [p["id"] for p in problems] == list(range(300))
    for p in problems[:150]:
        nums, target = p["nums"], p["target"]
        assert lo_t <= target <= hi_t and all(lo_n <= x <= hi_n for x in nums)
        expr = C.solve(nums, target)
        assert C.score(answer(expr), nums, target) == 1.0
        assert ast_value(expr) == target and ast_literals(expr) == sorted(nums)  # independent check
    for p in problems[150:]:
        assert Fraction(p["target"]) in brute_reach(p["nums"])  # independent solvability check


def test_problems_are_seeded():
    assert C.generate_problems(50, "rl", seed=1) == C.generate_problems(50, "rl", seed=1)
    assert C.generate_problems(50, "rl", seed=1) != C.generate_problems(50, "rl", seed=2)
    state = random.getstate()
    C.generate_problems(10, "priming", seed=3)
    assert random.getstate() == state  # the global RNG is left alone
    with pytest.raises(ValueError, match="distribution"):
        C.generate_problems(3, "hard")


def test_splits_are_disjoint_and_stable():
    train, test = C.make_splits(400, 100, "priming", seed=0)
    assert len(train) == 400 and len(test) == 100
    key = lambda p: (tuple(sorted(p["nums"])), p["target"])  # noqa: E731
    keys_train, keys_test = {key(p) for p in train}, {key(p) for p in test}
    assert not keys_train & keys_test
    assert len(keys_test) == 100 and len(keys_train) == 400
    train2, test2 = C.make_splits(50, 100, "priming", seed=0)
    assert test2 == test and train2 == train[:50]  # the test set does not depend on n_train
    assert C.make_splits(50, 100, "priming", seed=1)[1] != test


# -----------------------------------------------------------------------------
# JSONL


def test_jsonl_round_trip_and_atomicity(tmp_path):
    rows = [{"a": 1, "text": "ünï 🙂\nline"}, {"b": [1, 2]}]
    path = tmp_path / "sub" / "x.jsonl"
    files.write_jsonl(path, rows)
    assert files.read_jsonl(path) == rows
    assert os.listdir(path.parent) == ["x.jsonl"]  # no temp file left behind
    files.append_jsonl(path, {"c": 3})
    assert files.read_jsonl(str(path)) == rows + [{"c": 3}]

    class Boom:
        pass
    with pytest.raises(TypeError):
        files.write_jsonl(path, [{"ok": 1}, {"bad": Boom()}])
    assert files.read_jsonl(path) == rows + [{"c": 3}]  # the old file survived the failed write
    assert os.listdir(path.parent) == ["x.jsonl"]


def test_lock_dir_refuses_a_second_process_and_names_its_pid(tmp_path):
    folder = tmp_path / "run"
    with lock_held_elsewhere(folder) as holder:
        with pytest.raises(files.FolderLocked, match=rf"^{re.escape(str(folder))} is in use by another process "
                                                 rf"\(pid {holder.pid}\): .*choose another --out$"):
            with files.lock_dir(folder, "run folder"):
                raise AssertionError("two holders")
    with files.lock_dir(folder):  # the holder exited: free again
        assert (folder / ".lock").read_text() == f"{os.getpid()}\n"
    assert (folder / ".lock").read_text() == ""  # a clean release leaves no pid behind


def test_lock_dir_of_a_sigkilled_holder_is_free_at_once(tmp_path):
    folder = tmp_path / "run"
    with lock_held_elsewhere(folder) as holder:
        holder.kill()
        holder.wait()
        assert (folder / ".lock").read_text() == f"{holder.pid}\n"  # the file and a dead pid stay: harmless
        t = time.perf_counter()
        with files.lock_dir(folder):  # no waiting, no stale-lock cleanup: the kernel dropped the flock
            assert time.perf_counter() - t < 1


def test_lock_dir_wait_says_whom_it_waits_for_and_blocks_until_it_lets_go(tmp_path, capfd):
    import threading
    folder, got = tmp_path / "cache", threading.Event()

    def take():
        with files.lock_dir(folder, "download of x", wait=True):
            got.set()
    with lock_held_elsewhere(folder) as holder:
        t = threading.Thread(target=take)
        t.start()
        assert not got.wait(0.5)  # blocked while the holder lives
    t.join(timeout=10)
    assert got.is_set()
    assert f"waiting for the process (pid {holder.pid}) that holds {folder / '.lock'} (download of x)" in \
        capfd.readouterr().err


def test_jsonl_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        files.read_jsonl(tmp_path / "missing.jsonl")
    torn = tmp_path / "torn.jsonl"
    torn.write_text('{"a": 1}\n{"b": ')
    assert files.read_jsonl(torn) == [{"a": 1}]  # a crash mid-append tears only the last line
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"a": 1}\nnot json\n{"b": 2}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        files.read_jsonl(bad)


# -----------------------------------------------------------------------------
# Traces

CORRECT = [c for c in T.CONDITIONS if c != "no_positive" and not c.startswith("restart")]  # restart: below
N_TRACES = 120

# Independent, paper-derived phrasings of each behavior (paper_spec 3.2, 4.2): none may appear in
# a trace of a condition that forbids the behavior.
FORBIDDEN_PATTERNS = {
    "verification": [r"\d+ is not \d+", r"\bisn't\b", r"too (high|low|big|small)", r"close to",
                     r"(matches|equals|reached?) the (target|goal)", r"goal has been reached",
                     r"\bverif", r"check", r"doesn't match", r"this works"],
    "backtracking": [r"something else", r"\ba different\b", r"go back", r"start over", r"try again",
                     r"another (approach|pair|operation)", r"backtrack"],
    "subgoal": [r"sub-?goal", r"intermediate goal", r"try to reach", r"factor of", r"multiple of"],
    "backward": [r"backward", r"in reverse", r"since the target is", r"from the target"],
}


@pytest.fixture(scope="module")
def traces():
    return {c: T.generate_traces(c, N_TRACES, seed=0) for c in T.CONDITIONS}


def test_trace_records(traces):
    for cond, rows in traces.items():
        assert len(rows) == N_TRACES
        problems = C.generate_problems(rows[-1]["id"] + 1, "priming", seed=0)
        assert [r["id"] for r in rows] == sorted({r["id"] for r in rows})  # stream order, no repeats
        for row in rows:
            p = problems[row["id"]]
            assert set(row) >= {"query", "completion", "nums", "target", "condition", "behaviors", "dead_ends"}
            assert row["condition"] == cond and row["nums"] == p["nums"] and row["target"] == p["target"]
            assert row["query"] == C.make_prompt(p["nums"], p["target"])
            assert set(row["behaviors"]) == set(T.BEHAVIORS)
            json.dumps(row)


def test_correct_conditions_score_one_and_no_positive_is_wrong(traces):
    for cond in CORRECT:
        for r in traces[cond]:
            assert C.score(r["completion"], r["nums"], r["target"]) == 1.0, (cond, r["completion"])
            full = r["query"] + r["completion"]  # the whole transcript, scored the original's way
            assert reference_score(full, r["nums"], r["target"]) == 1.0
            answer_line = r["completion"].split("\n")[-1]
            expr = re.fullmatch(r"<answer> (.*) </answer>", answer_line).group(1)
            assert ast_value(expr) == r["target"] and ast_literals(expr) == sorted(r["nums"])
    for r in traces["no_positive"]:
        s = C.score(r["completion"], r["nums"], r["target"])
        assert 0 < s < 1.0 and s == 0.1
        assert not C.is_correct(r["completion"], r["nums"], r["target"], lenient=True)
        assert r["dead_ends"] in T.NO_POSITIVE_BUDGETS  # it stopped because its budget ran out
        assert "not finding" not in r["completion"] and "settle" not in r["completion"]  # stated plainly


def test_no_trace_uses_a_forbidden_behavior(traces):
    for cond, rows in traces.items():
        forbidden = set(T.BEHAVIORS) - T.ALLOWED_BEHAVIORS[cond]
        for r in rows:
            text = r["completion"]
            for b in forbidden:
                assert r["behaviors"][b] == 0
                assert T.count_behavior_phrases(text)[b] == 0, (cond, b, text)
                for pat in FORBIDDEN_PATTERNS[b]:
                    assert not re.search(pat, text, re.IGNORECASE), (cond, b, pat, text)


def test_behavior_counts_match_phrase_occurrences(traces):
    for cond, rows in traces.items():
        for r in rows:
            low = r["completion"].lower()
            counted = {b: sum(low.count(p) for p in T.BEHAVIOR_PHRASES[b]) for b in T.BEHAVIORS}
            assert counted == r["behaviors"], (cond, r["completion"])


def test_each_condition_shows_the_behaviors_it_allows(traces):
    mean = lambda rows, b: sum(r["behaviors"][b] for r in rows) / len(rows)  # noqa: E731
    for cond in T.CONDITIONS:
        for b in T.ALLOWED_BEHAVIORS[cond]:
            assert mean(traces[cond], b) > 0.3 or cond == "no_positive" and b in ("subgoal", "backward") \
                and mean(traces[cond], b) > 0.02, (cond, b)
    # several phrasings per move: the traces are not one template
    openings = {r["completion"].split("\n")[1].split(".")[0] for r in traces["all_strategies"]}
    assert len(openings) > 20


# Every arithmetic statement a trace can make, in each of its wordings: (regex, op). An
# independent reading of the text: the trace writer's own tables are not used.
_STATED = [
    (r"(\d+) ([-+*/]) (\d+) = (\d+)", None),
    (r"(\d+) ([-+*/]) (\d+)\? That gives (\d+)", None),
    (r"(\d+) ([-+*/]) (\d+) makes (\d+)", None),
    (r"[Aa]dding (\d+) and (\d+) gives (\d+)", "+"), (r"(\d+) plus (\d+) is (\d+)", "+"),
    (r"[Ss]ubtracting (\d+) from (\d+) leaves (\d+)", "-r"), (r"(\d+) minus (\d+) is (\d+)", "-"),
    (r"[Mm]ultiplying (\d+) by (\d+) gives (\d+)", "*"), (r"(\d+) times (\d+) is (\d+)", "*"),
    (r"[Dd]ividing (\d+) by (\d+) gives (\d+)", "/"), (r"(\d+) divided by (\d+) is (\d+)", "/"),
]
_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": lambda a, b: Fraction(a, b)}


def stated_steps(text):
    """[(a, op, b, c)] for every arithmetic statement in text, in order of appearance."""
    found = []
    for pat, op in _STATED:
        for m in re.finditer(pat, text):
            g = [int(x) if x.isdigit() else x for x in m.groups()]
            if op is None:
                a, o, b, c = g
            elif op == "-r":
                b, a, c, o = g[0], g[1], g[2], "-"
            else:
                (a, b, c), o = g, op
            found.append((m.start(), (a, o, b, c)))
    return [s for _, s in sorted(found)]


def test_every_stated_arithmetic_step_is_right(traces):
    n = 0
    for cond, rows in traces.items():
        for r in rows:
            think = r["completion"].split("</think>")[0]
            for a, op, b, c in stated_steps(think):
                assert _OPS[op](a, b) == c, (cond, a, op, b, c, think)
                n += 1
            # no arithmetic slips past the reader: every "=" in the text is a statement it checked
            assert think.count(" = ") <= len(stated_steps(think)) + think.count("Let me double-check"), think
    assert n > 2000


def test_forward_search_walks_real_states_and_backtracks_to_them(traces):
    """Replay only_backtracking / backtracking_verification traces as a search: every step combines
    two numbers of the current state, every "go back to S" names a state seen earlier in the same
    attempt, and every check compares the value just computed."""
    for cond in ("only_backtracking", "backtracking_verification"):
        for r in traces[cond]:
            think = r["completion"].split("</think>")[0].strip()
            for para in think.split("\n")[1:-1]:
                state, seen = sorted(r["nums"]), [sorted(r["nums"])]
                last = None
                # walk the paragraph statement by statement
                for sent in re.split(r"(?<=\.)\s+", para):
                    back = re.search(r"[Gg]o back to (.+?)(?: and try| instead|\.)", sent) or \
                        re.search(r"^Back to (.+?) and a different", sent)
                    if back:
                        s = sorted(int(x) for x in re.findall(r"\d+", back.group(1)))
                        assert s in seen, (s, seen, para)
                        state = s
                        continue
                    chk = re.search(r"(\d+),? (?:is not|isn't|which doesn't match) (\d+)", sent)
                    if chk:
                        assert int(chk.group(1)) == last and int(chk.group(2)) == r["target"], (sent, para)
                    for a, op, b, c in stated_steps(sent):
                        assert a in state and b in state, (a, b, state, para)
                        state = list(state)
                        state.remove(a)
                        state.remove(b)
                        state = sorted(state + [c])
                        seen.append(state)
                        last = c


def test_failed_attempts_depend_on_the_problem():
    """The search needs fewer dead ends on easy problems (many solutions) than on hard ones (few),
    compared among problems with the same count of numbers."""
    rows = T.generate_traces("only_backtracking", 600, seed=3)
    mean = lambda rs: sum(r["dead_ends"] for r in rs) / len(rs)  # noqa: E731
    for k in (3, 4):
        by_solutions = sorted((r for r in rows if len(r["nums"]) == k),
                              key=lambda r: len(C.solve_all(r["nums"], r["target"])))
        third = len(by_solutions) // 3
        hard, easy = by_solutions[:third], by_solutions[-third:]
        assert third > 50 and mean(easy) < 0.75 * mean(hard), (k, mean(easy), mean(hard))
    # a problem solved at the first try has no backtracking at all; none exceeds the budget
    assert any(r["dead_ends"] == 0 and r["behaviors"]["backtracking"] == 0 for r in rows)
    assert max(r["dead_ends"] for r in rows) <= T.TRACE_BUDGET


def test_phrase_templates_carry_exactly_one_marker():
    kw = dict(a=12, b=2, c=14, op="+", t=24, g=24, v=14, s=12, x=12, n=2, k=2, d=2, inv="24 / 2 = 12",
              fwd="12 * 2 = 24", state="12 and 2", rest="10 and 2", nums="10, 2 and 2",
              steps="10 + 2 = 12", expr="(10 + 2) * 2")
    owned = {
        "verification": [T._VERIFY_FAIL, T._VERIFY_OK, T._VERIFY_SUB, T._DOUBLE_CHECK],
        "backtracking": [T._RESTART, T._GO_BACK, T._SUBGOAL_FAIL, T._BACKWARD_FAIL],
        "subgoal": [*T._SUBGOAL.values()],
        "backward": [T._BACKWARD],
    }
    neutral = [T._OPENINGS, *T._STEPS.values(), T._FIRST_STEP, T._THEN, T._LEFT, T._NEED, T._SO,
               T._CONCLUDE, T._SUBGOAL_REACHED]
    for b, groups in owned.items():
        for t in (t for g in groups for t in g):
            counts = T.count_behavior_phrases(t.format(**kw))
            assert counts == {x: int(x == b) for x in T.BEHAVIORS}, t
    for t in (t for g in neutral for t in g):
        assert T.count_behavior_phrases(t.format(**kw)) == dict.fromkeys(T.BEHAVIORS, 0), t


def test_controls_derive_from_all_strategies(traces):
    for src, empty, dots in zip(traces["all_strategies"], traces["empty_cot"], traces["dots"]):
        think, rest = src["completion"].split("</think>")
        assert empty["completion"] == " </think>" + rest
        assert dots["completion"] == " ." * len(think.split()) + "</think>" + rest
        assert all(v == 0 for v in empty["behaviors"].values())
    for r in traces["negative_control"]:
        think = r["completion"].split("</think>")[0]
        steps = think.strip().split("\n")
        assert all(re.fullmatch(r"Step \d+: \d+ [-+*/] \d+ = \d+\.", s) for s in steps), think
        assert len(steps) == len(r["nums"]) - 1


def test_dots_count_tokens_of_a_given_tokenizer():
    class CharTokenizer:  # the project's Tokenizer interface: encode(text, bos=False) -> ids
        def encode(self, text, bos=False):
            return list(text)

    src = T.generate_traces("all_strategies", 3, seed=4)
    dots = T.generate_traces("dots", 3, seed=4, tokenizer=CharTokenizer())
    for s, d in zip(src, dots):
        think = s["completion"].split("</think>")[0]
        assert d["completion"].split("</think>")[0] == " ." * len(think)

    # a raw `tokenizers.Tokenizer` whose post-processor adds a BOS: the BOS is not counted
    tokenizers = pytest.importorskip("tokenizers")
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel({"<s>": 0, "[UNK]": 1}, unk_token="[UNK]"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tk.post_processor = tokenizers.processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    dots = T.generate_traces("dots", 2, seed=4, tokenizer=tk)
    for s, d in zip(src, dots):
        think = s["completion"].split("</think>")[0]
        n = len(tk.encode(think).ids) - 1  # minus the BOS
        assert n > len(think.split())  # punctuation splits off: tokens, not words
        assert d["completion"].split("</think>")[0] == " ." * n


def test_traces_are_seeded():
    a = T.generate_traces("all_strategies", 20, seed=7)
    assert a == T.generate_traces("all_strategies", 20, seed=7)
    assert a != T.generate_traces("all_strategies", 20, seed=8)
    with pytest.raises(ValueError, match="condition"):
        T.generate_traces("everything", 2)


# -----------------------------------------------------------------------------
# CLI


def test_cli(tmp_path, capsys):
    out = tmp_path / "data"
    assert C.main(["problems", "--distribution", "priming", "--n-train", "30", "--n-test", "10",
                   "--seed", "0", "--out", str(out)]) == 0
    train, test = files.read_jsonl(out / "train.jsonl"), files.read_jsonl(out / "test.jsonl")
    assert (train, test) == C.make_splits(30, 10, "priming", seed=0)
    before = (out / "train.jsonl").read_text()
    assert C.main(["problems", "--distribution", "priming", "--n-train", "5", "--n-test", "2",
                   "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert (out / "train.jsonl").read_text() == before  # nothing overwritten
    assert C.main(["problems", "--distribution", "priming", "--n-train", "5", "--n-test", "2",
                   "--out", str(out), "--force"]) == 0
    assert len(files.read_jsonl(out / "train.jsonl")) == 5

    path = tmp_path / "t.jsonl"
    assert T.main(["traces", "--condition", "backtracking_backward", "--n", "5", "--out", str(path)]) == 0
    assert files.read_jsonl(path) == T.generate_traces("backtracking_backward", 5, seed=0)
    assert T.main(["traces", "--condition", "dots", "--n", "5", "--out", str(path)]) == 2
    capsys.readouterr()
    assert C.main(["traces", "--condition", "dots", "--n", "5", "--out", str(path)]) == 2  # moved: says where
    assert "python traces.py traces --condition dots" in capsys.readouterr().err

    capsys.readouterr()
    assert C.main(["solve", "25", "30", "3", "4", "--target", "32"]) == 0
    assert ast_value(capsys.readouterr().out.strip()) == 32
    assert C.main(["solve", "1", "1", "--target", "5"]) == 1
    with pytest.raises(SystemExit) as e:
        T.main(["traces", "--help"])
    assert e.value.code == 0
    assert "--condition" in capsys.readouterr().out


def test_check_arithmetic_reads_every_wording():
    text = ("12 + 5 = 17. 3 * 4 = 13. Adding 2 and 2 gives 4. Subtracting 3 from 10 leaves 7. "
            "9 minus 2 is 6. What about 6 / 3? That gives 2. 7 times 3 is 21. 20 / 3 = 6. 8 * 2 makes 16.")
    assert T.check_arithmetic(text) == (6, 9)  # 3 * 4 = 13, 9 minus 2 is 6 and 20 / 3 = 6 are wrong
    assert T.check_arithmetic("no arithmetic here") == (0, 0)
    assert T.check_arithmetic("5 / 0 = 0.") == (0, 1)


def test_pretraining_corpus_is_behavior_free_and_right():
    rows = T.pretraining_corpus(60, 40, seed=5)
    assert rows == T.pretraining_corpus(60, 40, seed=5) and rows != T.pretraining_corpus(60, 40, seed=6)
    drill = [r for r in rows if r["query"] == "Arithmetic:"]
    assert len(drill) == 40 and len(rows) == 100
    for r in rows:
        assert T.count_behavior_phrases(r["completion"]) == dict.fromkeys(T.BEHAVIORS, 0)
        for pat in (p for ps in FORBIDDEN_PATTERNS.values() for p in ps):
            assert not re.search(pat, r["completion"], re.IGNORECASE), (pat, r["completion"])
    for r in drill:
        facts = stated_steps(r["completion"])
        assert len(facts) == 8 and all(_OPS[op](a, b) == c for a, op, b, c in facts)
