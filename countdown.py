"""The Countdown game: problems, the paper's prompt, a safe exact reward and a solver.

Countdown: given a few integers and a target, write one arithmetic expression that uses every
number exactly once with + - * / and equals the target. The paper (arXiv 2503.01307) trains on it
with PPO and primes models with Claude-written reasoning traces; this file is everything about the
game itself, in pure Python (stdlib only). The synthetic reasoning traces live in traces.py.

Deliberate differences from the reference code, each commented beside the code that makes it:
- The RL problems come from a seeded generator approximating Countdown-Tasks-3to4 (not downloadable
  here); the priming problems follow the reference generator, minus its 200 excluded "24 game" sets.
- The reward keeps the reference semantics (last line, last <answer> on it, every number exactly once,
  0 / 0.1 / 1.0) but never calls eval: a bounded parser evaluates integers, + - * /, unary minus and
  parentheses exactly with fractions. `**`, `//`, floats and anything else earn the format credit
  only (the original gave `2**3` full credit).
"""

from __future__ import annotations

import argparse
import operator
import os
import random
import re
import sys
from fractions import Fraction
from functools import lru_cache
from itertools import combinations

from plumbing.commands import command_parser, progress_bar, refuse_overwrite, run_command
from plumbing.files import write_jsonl


# -----------------------------------------------------------------------------
# The prompt. `base` is the reference RL prompt character for character (TinyZero's
# examples/data_preprocess/countdown.py, used unchanged by the paper). It ends with "<think>"
# and no newline, and the paper tokenized it WITHOUT a BOS token (add_special_tokens=False):
# callers that tokenize it should do the same. `qwen-instruct` is the ChatML variant from the same
# file (note the space after "user\n"); the paper's numbers all use `base`.

PROMPT_TEMPLATES: dict[str, str] = {
    "base": (
        "A conversation between User and Assistant. The user asks a question, and the Assistant "
        "solves it. The assistant first thinks about the reasoning process in the mind and then "
        "provides the user with the answer.\n"
        "User: Using the numbers {nums}, create an equation that equals {target}. You can use basic "
        "arithmetic operations (+, -, *, /) and each number can only be used once. Show your work "
        "in <think> </think> tags. And return the final answer in <answer> </answer> tags, for "
        "example <answer> (1 + 2) / 3 </answer>.\n"
        "Assistant: Let me solve this step by step.\n"
        "<think>"
    ),
    "qwen-instruct": (
        "<|im_start|>system\nYou are a helpful assistant. You first thinks about the reasoning "
        "process in the mind and then provides the user with the answer.<|im_end|>\n"
        "<|im_start|>user\n Using the numbers {nums}, create an equation that equals {target}. You "
        "can use basic arithmetic operations (+, -, *, /) and each number can only be used once. "
        "Show your work in <think> </think> tags. And return the final answer in <answer> </answer> "
        "tags, for example <answer> (1 + 2) / 3 </answer>.<|im_end|>\n"
        "<|im_start|>assistant\nLet me solve this step by step.\n<think>"
    ),
}
_THINK_SUFFIX = "\n<think>"


def _check_problem(nums, target) -> tuple[list[int], int]:
    """Plain ints (numpy integers accepted via __index__), or a ValueError that says what is wrong."""
    if isinstance(nums, (str, bytes)) or not hasattr(nums, "__iter__"):
        raise ValueError(f"nums must be a list of integers, got {nums!r}")
    nums = list(nums)
    try:
        if any(isinstance(x, bool) for x in nums + [target]):
            raise TypeError
        out = [operator.index(x) for x in nums], operator.index(target)
    except TypeError:
        raise ValueError(f"nums and target must be integers, got nums={nums!r} target={target!r}") from None
    if not nums:
        raise ValueError("nums is empty; a Countdown problem needs at least one number")
    return out


def make_prompt(nums, target, template: str = "base") -> str:
    """The RL prompt for one problem; `{nums}` is the Python list repr, e.g. [3, 17, 8]."""
    if template not in PROMPT_TEMPLATES:
        raise ValueError(f"unknown template {template!r}; choose one of {sorted(PROMPT_TEMPLATES)}")
    nums, target = _check_problem(nums, target)
    return PROMPT_TEMPLATES[template].format(nums=repr(nums), target=target)


def make_query(nums, target) -> str:
    """The raw query the paper sent to Claude: the base prompt without the trailing "\\n<think>"."""
    return make_prompt(nums, target, "base")[: -len(_THINK_SUFFIX)]


def sft_example(nums, target, text: str) -> dict:
    """An LLM answer that starts with "<think>" -> {"query": RL prompt, "completion": the rest}.

    The reference SFT data ended the query at "...step by step." and started the completion at
    "<think>", while RL prompts end at "<think>" (defect D-SFT-6). Here the query is exactly the RL
    prompt and the completion is whatever followed that "<think>", so SFT and RL share a boundary.
    """
    stripped = text.lstrip()
    if not stripped.startswith("<think>"):
        raise ValueError(
            f"the answer text must start with '<think>' (after optional whitespace), got "
            f"{text[:40]!r}...; prepend '<think>' or fix the generator that produced it"
        )
    return {"query": make_prompt(nums, target), "completion": stripped[len("<think>"):]}


# -----------------------------------------------------------------------------
# The reward.
#
# Reference (verl/utils/reward_score/countdown.py), on prompt+response text:
#   1. split on the first "Assistant:", keep only the LAST line (split('\n')[-1]);
#   2. take the LAST non-DOTALL match of <answer>(.*?)</answer> on it, .strip(); none -> 0;
#   3. the multiset of re.findall(r'\d+') must equal the given numbers, else 0.1;
#   4. eval() it (after a character-class check); error -> 0.1; abs(result - target) < 1e-5 -> 1.0,
#      else 0.1.
# We score the response alone. That gives the same result for the last-line rule: both prompt
# templates end with "\n<think>" and "<think>" cannot take part in an <answer>...</answer> match, so
# the last line of prompt+response and the last line of the response hold the same answer matches.
# (The reference kept special tokens when decoding; an EOS after "</answer>" sat on the same line
# and did not change the match, and an EOS after a trailing newline made the last line empty -> 0,
# exactly what scoring the stripped response gives.)
#
# Deliberate differences, all towards "the format credit, never the full reward":
#   - `**` and `//` are not arithmetic here: 0.1 (the original accepted them; `2**3*1` scored 1.0).
#   - floats ("2.5") are not literals: 0.1 (the original read "2.5" as the numbers 2 and 5 and
#     could score 1.0 with a float result).
#   - unary plus ("+3") is not admitted: 0.1 (the original's eval accepted it).
#   - exact Fraction equality replaces abs(result - target) < 1e-5 (same verdict for every honest
#     expression; the float version could accept a rounding near-miss).
#   - an answer longer than MAX_ANSWER_CHARS scores 0.1 without being parsed (the original would
#     evaluate e.g. a correct expression padded with a megabyte of spaces).
#   - literals with more than MAX_LITERAL_DIGITS digits fail the number check (the original's
#     int() raised for > 4300 digits, also 0.1).
#   - the numbers check uses ASCII digits only. The original's \d also matched digits like '٣',
#     which then failed in eval; both end at 0.1. Likewise only ASCII whitespace separates tokens
#     (eval rejected a no-break space too).
#   - "no answer" returns 0.0, a float (the original returned the int 0).
# Kept on purpose (fidelity): leading-zero literals such as "05" are invalid (CPython's eval
# rejects them; "00" is fine), at most 200 nested parentheses (CPython's parser limit), and
# division by zero scores 0.1. Unary minus chains are evaluated up to the answer cap (CPython
# managed ~900 and failed by ~3,000, so the two can differ on a chain of 1,000 characters).

MAX_ANSWER_CHARS = 1_000  # an honest answer for six numbers is < 60 characters
MAX_LITERAL_DIGITS = 100
MAX_PAREN_DEPTH = 200  # CPython refuses deeper nesting: "too many nested parentheses"
MAX_INTERMEDIATE_BITS = 16_384  # defense in depth; the answer cap already bounds sizes far below

_OPEN, _CLOSE = "<answer>", "</answer>"
_DIGITS = re.compile(r"[0-9]+")
_ALLOWED = re.compile(r"[0-9+\-*/() \t\n\r\f\v]*")  # ASCII digits and whitespace only
_TOKEN = re.compile(r"[0-9]+|[-+*/()]")


def _last_answer(text: str) -> str | None:
    """The content of the last match of <answer>(.*?)</answer> in `text`, in linear time.

    re.finditer gives the same matches but is quadratic on a line with many unclosed "<answer>"
    (each one scans to the end). Matches are found left to right, each ending at the first close
    after its open, so: the last match ends at the first close after the last open that still has a
    close after it, and it starts at the first open after the close that precedes that open (an open
    right after a close can never be inside an earlier match).
    """
    k = text.rfind(_CLOSE)
    if k < 0:
        return None
    o_last = text.rfind(_OPEN, 0, k)
    if o_last < 0:
        return None
    close = text.find(_CLOSE, o_last + len(_OPEN))
    prev_close = text.rfind(_CLOSE, 0, o_last)
    start = 0 if prev_close < 0 else prev_close + len(_CLOSE)
    o_first = text.find(_OPEN, start)
    return text[o_first + len(_OPEN): close]


def _div(a, b):
    """Exact a / b: an int when it divides, else a Fraction; None for division by zero."""
    if b == 0:
        return None
    if type(a) is int and type(b) is int:
        q, r = divmod(a, b)
        return q if r == 0 else Fraction(a, b)
    f = Fraction(a) / b
    return int(f) if f.denominator == 1 else f


def _too_big(v) -> bool:
    if type(v) is int:
        return v.bit_length() > MAX_INTERMEDIATE_BITS
    return max(v.numerator.bit_length(), v.denominator.bit_length()) > MAX_INTERMEDIATE_BITS


_PREC = {"+": 1, "-": 1, "*": 2, "/": 2, "neg": 3}
_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": _div}  # exact; _div: None for x / 0


def _apply(op, stack):
    if op == "neg":
        stack.append(-stack.pop())
        return True
    b, a = stack.pop(), stack.pop()
    v = _OPS[op](a, b)
    if v is None:
        return False  # division by zero
    if type(v) is not int and v.denominator == 1:
        v = int(v)
    if _too_big(v):
        return False
    stack.append(v)
    return True


def evaluate(expr: str):
    """Exact value (int or Fraction) of an arithmetic expression, or None if it is not one.

    Grammar: integer literals, binary + - * /, unary minus, parentheses, spaces. An iterative
    operator-precedence parser (no recursion, so no depth can overflow the stack); `**`, `//`,
    floats, names and calls simply fail to parse.
    """
    if len(expr) > MAX_ANSWER_CHARS or not _ALLOWED.fullmatch(expr):
        return None  # '.', letters, '_', ',', non-ASCII digits or spaces, ...
    vals: list = []
    ops: list[str] = []
    expect_operand = True
    depth = 0
    for tok in _TOKEN.findall(expr):
        if tok[0] in "0123456789":
            if not expect_operand or len(tok) > MAX_LITERAL_DIGITS:
                return None  # "1 2", or a literal too long to be one of the numbers
            if len(tok) > 1 and tok[0] == "0" and tok.strip("0"):
                return None  # "05" is a SyntaxError in Python 3
            vals.append(int(tok))
            expect_operand = False
        elif tok == "(":
            if not expect_operand:
                return None  # "2(3)": a call in Python, a TypeError in the original
            depth += 1
            if depth > MAX_PAREN_DEPTH:
                return None
            ops.append("(")
        elif tok == ")":
            if expect_operand:
                return None
            while ops and ops[-1] != "(":
                if not _apply(ops.pop(), vals):
                    return None
            if not ops:
                return None
            ops.pop()
            depth -= 1
        elif expect_operand:
            if tok != "-":
                return None  # no unary plus, and "**" / "//" land here
            ops.append("neg")
        else:
            p = _PREC[tok]
            while ops and ops[-1] != "(" and _PREC[ops[-1]] >= p:
                if not _apply(ops.pop(), vals):
                    return None
            ops.append(tok)
            expect_operand = True
    if expect_operand:
        return None
    while ops:
        op = ops.pop()
        if op == "(" or not _apply(op, vals):
            return None
    return vals[0] if len(vals) == 1 else None


def score(response: str, nums, target, format_score: float = 0.1, correct_score: float = 1.0,
          lenient: bool = False) -> float:
    """Reward for a response (the text after the prompt, special tokens stripped).

    0.0 without an <answer>...</answer> on the last line; `format_score` if there is one but it is
    not a correct expression using every number exactly once; `correct_score` if it is.
    lenient=True takes the last <answer> anywhere in the response (DOTALL) instead of on the last
    line only; it is off by default for fidelity with the paper's reward.
    """
    if lenient:
        content = _last_answer(response)
    else:
        content = _last_answer(response[response.rfind("\n") + 1:])
    if content is None:
        return 0.0
    content = content.strip()
    if len(content) > MAX_ANSWER_CHARS:
        return format_score
    # The reference's number check: the multiset of digit runs equals the given numbers.
    found = _DIGITS.findall(content)
    if len(found) != len(nums) or any(len(d) > MAX_LITERAL_DIGITS for d in found):
        return format_score
    if sorted(map(int, found)) != sorted(nums):
        return format_score
    value = evaluate(content)
    if value is None or value != target:
        return format_score
    return correct_score


def uses_given_numbers(response: str, nums) -> bool:
    """The answer on the last line uses exactly the given numbers (the reward's number check)."""
    content = _last_answer(response[response.rfind("\n") + 1:])
    found = [] if content is None else _DIGITS.findall(content)
    if not found or len(found) != len(nums) or any(len(d) > MAX_LITERAL_DIGITS for d in found):
        return False
    return sorted(map(int, found)) == sorted(nums)


def is_correct(response: str, nums, target, lenient: bool = False) -> bool:
    """Pure accuracy: True iff the response earns the full reward."""
    return score(response, nums, target, 0.0, 1.0, lenient) == 1.0


# -----------------------------------------------------------------------------
# The solver.
#
# Two rule sets. "natural" is the reference generator's search (tasks/countdown.py): combine two
# numbers into a+b, a*b, larger-smaller, or larger/smaller when it divides exactly, so every
# intermediate is a non-negative integer. "exact" is the reward's semantics: any rational, negatives
# allowed (a-b and b-a, a/b and b/a). The reference checked solvability under "natural" only while
# its reward accepts "exact" (defect D-T2). We generate problems solvable under "natural", hence
# also under the reward; solve() prefers a natural solution (what a person would write) and falls
# back to an exact one, so it finds an answer whenever the reward can give 1.0.
#
# Search: an expression tree over a set of numbers splits them into two non-empty parts. For a
# part of at most three numbers we list every value it can make (a few hundred at most). For a
# bigger set S and a wanted value t we enumerate the values b of the smaller part B, invert the
# operation to get the value a the other part A must make (t = a + b -> a = t - b, ...), and recurse
# on (A, a) with memoization. Six numbers then cost ~10^4-10^5 steps instead of the ~10^7 trees.
# Trees are ints (an index into the numbers) or (op, left, right).

_NATURAL, _EXACT = "natural", "exact"


def _combine(a, b, rules):
    """(value, op, a_is_left) for every way to combine values a and b under `rules`."""
    if rules == _NATURAL:
        out = [(a + b, "+", True), (a * b, "*", True)]
        out.append((a - b, "-", True) if a >= b else (b - a, "-", False))
        if a >= b and b > 0 and a % b == 0:
            out.append((a // b, "/", True))
        elif b > a > 0 and b % a == 0:
            out.append((b // a, "/", False))
        return out
    out = [(a + b, "+", True), (a * b, "*", True), (a - b, "-", True), (b - a, "-", False)]
    q = _div(a, b)
    if q is not None:
        out.append((q, "/", True))
    q = _div(b, a)
    if q is not None:
        out.append((q, "/", False))
    return out


def _inverse(t, b, rules):
    """(a, op, a_is_left) such that combining a with b can give t; a=None means "any a"."""
    if rules == _NATURAL:
        cands = [(t - b, "+", True), (b + t, "-", True)]
        if t > 0 and b - t >= 0:
            cands.append((b - t, "-", False))
        if b == 0:
            if t == 0:
                cands.append((None, "*", True))
        elif t % b == 0:
            cands.append((t // b, "*", True))
        if b > 0 and t >= 1:
            cands.append((t * b, "/", True))
        if t > 1 and b % t == 0 and b // t > 0:
            cands.append((b // t, "/", False))
        return [c for c in cands if c[0] is None or c[0] >= 0]
    cands = [(t - b, "+", True), (t + b, "-", True), (b - t, "-", False)]
    if b != 0:
        cands.append((_div(t, b), "*", True))
        cands.append((t * b, "/", True))
        if t != 0:
            cands.append((_div(b, t), "/", False))
    elif t == 0:
        cands.append((None, "*", True))
        cands.append((None, "/", False))  # 0 / a == 0 for any a != 0
    return cands


def _value_of(op, x, y):
    return _OPS[op](x, y)


class _Search:
    """Expression trees over `values` (leaves are indices) under one rule set."""

    def __init__(self, values, rules, find_all=False):
        self.values = list(values)
        self.rules = rules
        self.find_all = find_all
        self._vals: dict[int, dict] = {}
        self._memo: dict[tuple, list] = {}

    def splits(self, mask):
        """Unordered splits {A, B} of mask, B the side we enumerate (never the larger one)."""
        bits = [1 << i for i in range(len(self.values)) if mask >> i & 1]
        low, rest = bits[0], bits[1:]
        for r in range(len(rest)):  # A holds the lowest bit plus r of the others
            for comb in combinations(rest, r):
                a = low | sum(comb)
                b = mask ^ a
                if bin(a).count("1") >= bin(b).count("1"):
                    yield a, b
                else:
                    yield b, a

    def table(self, mask) -> dict:
        """Every value the numbers in mask can make -> its trees (one tree unless find_all)."""
        got = self._vals.get(mask)
        if got is not None:
            return got
        if mask & (mask - 1) == 0:
            i = mask.bit_length() - 1
            got = {self.values[i]: [i]}
        else:
            got = {}
            for a_mask, b_mask in self.splits(mask):
                for va, tas in self.table(a_mask).items():
                    for vb, tbs in self.table(b_mask).items():
                        for v, op, a_left in _combine(va, vb, self.rules):
                            if v is None or type(v) is not int and _too_big(v):
                                continue
                            trees = got.setdefault(v, [])
                            if trees and not self.find_all:
                                continue
                            for ta in tas:
                                for tb in tbs:
                                    trees.append((op, ta, tb) if a_left else (op, tb, ta))
        self._vals[mask] = got
        return got

    def find(self, mask, t) -> list:
        """Trees over exactly the numbers in mask with value t (at most one unless find_all)."""
        if bin(mask).count("1") <= 3:
            return self.table(mask).get(t, [])
        key = (mask, t)
        if key in self._memo:
            return self._memo[key]
        out = []
        for a_mask, b_mask in self.splits(mask):
            for vb, tbs in self.table(b_mask).items():
                for va, op, a_left in _inverse(t, vb, self.rules):
                    if va is None:  # t == 0 and vb == 0: any value of A works (nonzero for '/')
                        tas = [tr for v, trs in self.table(a_mask).items()
                               if op == "*" or v != 0 for tr in trs[:1 if not self.find_all else None]]
                    else:
                        x, y = (va, vb) if a_left else (vb, va)
                        if _value_of(op, x, y) != t or (self.rules == _NATURAL and (
                                type(va) is not int or (op == "/" and (x < y or y == 0)))):
                            continue
                        tas = self.find(a_mask, va)
                    for ta in tas:
                        for tb in tbs:
                            out.append((op, ta, tb) if a_left else (op, tb, ta))
                            if not self.find_all:
                                self._memo[key] = out
                                return out
        self._memo[key] = out
        return out


def _format(tree, leaf, canonical=False, pretty=False) -> str:
    """Infix text with the fewest parentheses that keep the tree's shape (a + (b + c) keeps its).

    pretty=True also drops the parentheses that associativity makes redundant (a + (b - c) ->
    a + b - c, a * (b / c) -> a * b / c): same exact value, a different tree; for display.
    """
    if not isinstance(tree, tuple):
        return leaf(tree)
    op, left, right = tree
    ls, rs = _format(left, leaf, canonical, pretty), _format(right, leaf, canonical, pretty)
    lp, rp = _prec_of(left), _prec_of(right)
    if canonical and op in "+*" and (rs, rp) < (ls, lp):  # commutative: one order per pair
        ls, rs, lp, rp = rs, ls, rp, lp
    p = _PREC[op]
    if lp < p:
        ls = f"({ls})"
    if rp < p or rp == p and not (pretty and op in "+*"):
        rs = f"({rs})"
    return f"{ls} {op} {rs}"


def _prec_of(tree) -> int:
    return _PREC[tree[0]] if isinstance(tree, tuple) else 9


_MAX_SOLVE_NUMS = 6


def _check_solvable_size(nums):
    if len(nums) > _MAX_SOLVE_NUMS:
        raise ValueError(f"the solver handles at most {_MAX_SOLVE_NUMS} numbers, got {len(nums)}; "
                         "the search grows factorially beyond that")


def _solve_tree(nums, target, rules=None):
    """(tree, rules) of one solution (natural rules first unless rules is given), or None."""
    for r in ([rules] if rules else [_NATURAL, _EXACT]):
        if r == _NATURAL and (target < 0 or any(x < 0 for x in nums)):
            continue
        trees = _Search(nums, r).find((1 << len(nums)) - 1, target)
        if trees:
            return trees[0], r
    return None


def solve(nums, target) -> str | None:
    """One expression using every number exactly once that equals target, or None."""
    nums, target = _check_problem(nums, target)
    _check_solvable_size(nums)
    found = _solve_tree(nums, target)
    return None if found is None else _format(found[0], lambda i: str(nums[i]), pretty=True)


def solve_all(nums, target, limit: int | None = None) -> list[str]:
    """Every solution under the reward's semantics (exact rationals), one per equivalence class of
    swapping the operands of + and *, sorted. Other rearrangements ((a+b)+c vs a+(b+c)) are distinct.
    Six numbers can have tens of thousands (~1 s); `limit` keeps the first `limit` of the sorted list."""
    nums, target = _check_problem(nums, target)
    _check_solvable_size(nums)
    trees = _Search(nums, _EXACT, find_all=True).find((1 << len(nums)) - 1, target)
    out = sorted({_format(t, lambda i: str(nums[i]), canonical=True) for t in trees})
    return out if limit is None else out[:limit]


def _solvable_natural(nums, target) -> bool:
    return _solvable_sorted(tuple(sorted(nums)), target)


@lru_cache(maxsize=1 << 17)
def _solvable_sorted(nums: tuple, target) -> bool:
    # target-directed search: ~5x faster than listing every reachable value for 4 numbers
    return bool(_Search(nums, _NATURAL).find((1 << len(nums)) - 1, target))


# -----------------------------------------------------------------------------
# Problems.
#
# `priming` follows the reference generator as the paper used it for the priming data
# (api_gen.py: CountDown(start_probs=[0, .5, .5], min_target=10, max_target=25)): the target is
# drawn first, uniform in 10..25 inclusive; then 3 or 4 numbers (50/50), each uniform in 1..24
# (max_target - 1), resampled until solvable under the natural rules. We do not copy its list of
# 200 excluded "24 game" sets (it only removes some 4-number sets).
# `rl` approximates Countdown-Tasks-3to4, which the paper trained on and whose generator and ranges
# are documented nowhere: 3 or 4 numbers (50/50) uniform in 1..99, target uniform in 10..100 drawn
# first, resampled until solvable the same way. Measure the real set if you can download it.

DISTRIBUTIONS = {
    # name: (min_target, max_target, min_num, max_num, (counts), (weights))
    "rl": (10, 100, 1, 99, (3, 4), (0.5, 0.5)),
    "priming": (10, 25, 1, 24, (3, 4), (0.5, 0.5)),
}


def _sample_problem(rng: random.Random, distribution: str) -> tuple[list[int], int]:
    lo_t, hi_t, lo_n, hi_n, counts, weights = DISTRIBUTIONS[distribution]
    target = rng.randint(lo_t, hi_t)
    k = rng.choices(counts, weights=weights)[0]
    while True:
        nums = [rng.randint(lo_n, hi_n) for _ in range(k)]
        if _solvable_natural(nums, target):
            return nums, target


def _check_distribution(distribution):
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"unknown distribution {distribution!r}; choose one of {sorted(DISTRIBUTIONS)}")


def _problem_stream(distribution: str, seed):
    """An endless seeded stream of solvable problems {"nums", "target", "id"} (ids 0, 1, ...)."""
    rng = random.Random(f"countdown-problems:{distribution}:{seed}")
    i = 0
    while True:
        nums, target = _sample_problem(rng, distribution)
        yield {"nums": nums, "target": target, "id": i}
        i += 1


def generate_problems(n: int, distribution: str = "rl", seed: int = 0) -> list[dict]:
    """n solvable problems {"nums", "target", "id"} drawn i.i.d. (repeats possible) with a seeded RNG."""
    _check_distribution(distribution)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    stream = _problem_stream(distribution, seed)
    return [next(stream) for _ in range(n)]


def make_splits(n_train: int, n_test: int, distribution: str = "rl", seed: int = 0,
                progress: bool = False):
    """(train, test): every (sorted nums, target) appears at most once across both splits.

    The test set takes the first n_test distinct problems of the seeded stream and train the next
    n_train, so for one seed the test set does not depend on n_train. progress=True shows a tqdm
    bar when tqdm is installed (the paper's 327,680 + 1,024 take a few minutes).
    """
    _check_distribution(distribution)
    if n_train < 0 or n_test < 0:
        raise ValueError(f"split sizes must be >= 0, got n_train={n_train} n_test={n_test}")
    rng = random.Random(f"countdown-splits:{distribution}:{seed}")
    seen: set = set()
    splits: list[list[dict]] = [[], []]
    misses = 0
    bar = progress_bar(n_train + n_test, f"{distribution} problems") if progress else None
    for split, size in ((1, n_test), (0, n_train)):
        while len(splits[split]) < size:
            nums, target = _sample_problem(rng, distribution)
            key = (tuple(sorted(nums)), target)
            if key in seen:
                misses += 1
                if misses > 100 * (n_train + n_test) + 10_000:
                    raise ValueError(f"could not find {n_train + n_test} distinct {distribution!r} "
                                     "problems; ask for fewer")
                continue
            seen.add(key)
            splits[split].append({"nums": nums, "target": target, "id": len(splits[split])})
            if bar is not None:
                bar.update()
    if bar is not None:
        bar.close()
    return splits[0], splits[1]


# -----------------------------------------------------------------------------
# Command line


def _run(args) -> int:
    """One command: write the problem files, or print a solution (exit code 1 when there is none)."""
    if args.command == "problems":
        paths = [os.path.join(args.out, f"{name}.jsonl") for name in ("train", "test")]
        for path in paths:
            refuse_overwrite(path, args.force)
        train, test = make_splits(args.n_train, args.n_test, args.distribution, args.seed, progress=True)
        for path, rows in zip(paths, (train, test)):
            write_jsonl(path, rows)
            print(f"wrote {len(rows)} problems to {path}")
        return 0
    if args.all:
        for expr in solve_all(args.nums, args.target):
            print(expr)
        return 0
    expr = solve(args.nums, args.target)
    print(expr if expr is not None else "no solution")
    return 0 if expr is not None else 1


def main(argv=None):
    parser, sub = command_parser(
        "Countdown problems and a solver (synthetic traces and the corpus: traces.py).",
        ["python countdown.py problems --distribution rl --n-train 1000 --n-test 100 --out data/countdown",
         "python countdown.py solve 25 30 3 4 --target 32"])

    p = sub.add_parser("problems", help="write train.jsonl and test.jsonl of solvable problems",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--distribution", choices=sorted(DISTRIBUTIONS), default="rl",
                   help="rl: ~Countdown-Tasks-3to4 (3-4 numbers in 1..99, targets 10..100); "
                        "priming: the paper's priming problems (3-4 numbers in 1..24, targets 10..25)")
    p.add_argument("--n-train", type=int, default=327_680, help="training problems (paper: 327,680)")
    p.add_argument("--n-test", type=int, default=1_024, help="test problems (paper: 1,024)")
    p.add_argument("--seed", type=int, default=0, help="random seed; same seed, same files")
    p.add_argument("--out", required=True, help="output folder for train.jsonl and test.jsonl")
    p.add_argument("--force", action="store_true", help="overwrite existing files")

    s = sub.add_parser("solve", help="print one solution (or all with --all)")
    s.add_argument("nums", type=int, nargs="+", help="the numbers (1 to 6 of them)")
    s.add_argument("--target", type=int, required=True, help="the target")
    s.add_argument("--all", action="store_true", help="print every solution (up to swapping + and * operands)")

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] in (["traces"], ["corpus"]):  # these commands moved with the traces
        print(f"error: `countdown.py {argv[0]}` moved to traces.py: python traces.py {' '.join(argv)}",
              file=sys.stderr)
        return 2
    return run_command(_run, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
