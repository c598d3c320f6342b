"""Tests for traces.py's restart search: every trace replayed by an independent reader.

The reader below knows only the written format (README, "The miniature study"): attempts one per
line, "a op b = c." steps, "Left: ..." after each early step, a check, a restart phrase, and an
optional commit line. It re-derives every step, every state and every choice from the text before
it and the problem, never from traces.py's own search.
"""
import ast
import json
import random
import re
import sys
from fractions import Fraction
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import classify  # noqa: E402
import countdown as C  # noqa: E402
import traces as T  # noqa: E402
from plumbing import files, report as study_report  # noqa: E402

RESTART = [c for c in T.CONDITIONS if c.startswith("restart")]
N = 400


def _eval(expr: str):
    """Exact value of an answer with Python's own parser (an independent evaluator)."""
    def ev(n):
        if isinstance(n, ast.Expression):
            return ev(n.body)
        if isinstance(n, ast.Constant):
            return Fraction(n.value)
        if isinstance(n, ast.BinOp):
            a, b = ev(n.left), ev(n.right)
            return {ast.Add: a + b, ast.Sub: a - b, ast.Mult: a * b}.get(type(n.op)) if not isinstance(n.op, ast.Div) \
                else a / b
        raise AssertionError(ast.dump(n))
    return ev(ast.parse(expr, mode="eval"))


def _value(a, op, b):
    return {"+": a + b, "-": a - b, "*": a * b, "/": Fraction(a, b) if b else None}[op]


_STEP = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)\.")


def replay(row, checks=True):
    """Replay one restart trace; returns (attempts, values reached). Asserts every rule."""
    nums, target = row["nums"], row["target"]
    think, answer_part = row["completion"].split("</think>\n")
    lines = think.strip("\n").split("\n") if think.strip() else []
    commit = None
    if lines and lines[-1].startswith("None of these reach"):
        commit = lines.pop()
    starts, reached, exprs = [], [], []
    for k, line in enumerate(lines):
        state = list(nums)
        expr_of = {}  # value -> list of expressions (numbers may repeat)
        for n in nums:
            expr_of.setdefault(n, []).append(str(n))
        early = []
        pos = 0
        for _ in range(len(nums) - 1):
            m = _STEP.match(line, pos)
            assert m, (line, pos)
            a, op, b, c = int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))
            assert _value(a, op, b) == c  # every stated step is right
            assert a >= b and c > 0 and (op != "/" or b > 1)  # the natural rules, larger first
            for x in (a, b):  # each move uses numbers of the current state
                assert x in state, (line, x, state)
                state.remove(x)
            state.append(c)
            ea, eb = expr_of[a].pop(), expr_of[b].pop()
            expr_of.setdefault(c, []).append(f"({ea} {op} {eb})")
            pos = m.end()
            if len(state) > 1:
                left = re.match(r" Left: ([\d, ]+)\.", line[pos:])
                assert left, line[pos:]
                assert [int(x) for x in left.group(1).split(", ")] == state  # the numbers left, restated
                pos += left.end()
                early.append((a, op, b))
                assert c <= T.VALUE_CAP
            else:
                # the last step: the hitting operation when one exists, else the closest (+ - * / order)
                x, y = max(a, b), min(a, b)
                cands = [("+", x + y), ("-", x - y), ("*", x * y)] + ([("/", x // y)] if y and x % y == 0 else [])
                hits = [o for o, v in cands if v == target]
                best = min(cands, key=lambda ov: abs(ov[1] - target))
                assert op == (hits[0] if hits else best[0]), (line, target)
            pos += line[pos:].startswith(" ")
        v = state[0]
        reached.append(v)
        exprs.append(expr_of[v][0])
        rest = line[pos:]
        if checks:  # the check names the value just computed, and says the truth about the target
            want = f"{v} equals the target." if v == target else f"{v} is not {target}."
            assert rest.startswith(want), (rest, want)
            rest = rest[len(want):].lstrip()
        last = k == len(lines) - 1
        assert rest == ("" if last else "Let me try a different combination."), rest
        assert (v == target) == (last and commit is None)  # a search stops at its first hit
        assert tuple(early) not in starts  # never the start of an earlier attempt
        starts.append(tuple(early))
    answer = re.fullmatch(r"<answer> (.*) </answer>", answer_part).group(1)
    if lines:
        if commit is None:
            chosen = len(lines) - 1
        else:  # the closest attempt, the earliest of equals, named in the commit line
            chosen = min(range(len(reached)), key=lambda i: (abs(reached[i] - target), i))
            assert commit == f"None of these reach {target}. The closest is {reached[chosen]}."
        assert _eval(answer) == _eval(exprs[chosen])
        assert sorted(int(d) for d in re.findall(r"\d+", answer)) == sorted(nums)
    return len(lines), reached


@pytest.fixture(scope="module")
def problems():
    return C.generate_problems(N, "priming", seed=5)


@pytest.fixture(scope="module")
def restart_traces(problems):
    return {c: T.generate_traces(c, N, seed=3, problems=problems) for c in RESTART}


def test_every_restart_trace_replays(restart_traces):
    for cond in ("restart", "restart_only_backtracking", "restart_no_positive"):
        for r in restart_traces[cond]:
            attempts, reached = replay(r, checks=cond != "restart_only_backtracking")
            assert attempts == r["attempts"] <= T.RESTART_ATTEMPTS[len(r["nums"])]
            assert r["behaviors"] == {"verification": attempts if cond != "restart_only_backtracking" else 0,
                                      "backtracking": attempts - 1, "subgoal": 0, "backward": 0}
            assert r["correct"] == (r["target"] in reached) == C.is_correct(r["completion"], r["nums"], r["target"])
            if cond == "restart_no_positive":
                assert r["target"] not in reached and not r["correct"]


def test_same_searches_across_conditions(restart_traces):
    """only_backtracking is restart without its checks; empty_cot and dots keep restart's answers."""
    by = {c: {r["id"]: r for r in rows} for c, rows in restart_traces.items()}
    for i, r in by["restart"].items():
        ob = by["restart_only_backtracking"][i]["completion"]
        stripped = re.sub(r" (\d+ is not \d+|\d+ equals the target)\.", "", r["completion"])
        assert ob == stripped
        answer = r["completion"].split("</think>")[1]
        assert by["restart_empty_cot"][i]["completion"] == " </think>" + answer
        assert by["restart_dots"][i]["completion"].endswith("</think>" + answer)
        assert set(by["restart_dots"][i]["completion"].split("</think>")[0]) <= {" ", "."}


def test_all_conditions_share_one_problem_list(problems, restart_traces):
    ids = [p["id"] for p in problems]
    for cond, rows in restart_traces.items():
        got = [r["id"] for r in rows]
        if cond != "restart_no_positive":
            assert got == ids, cond
            continue
        # no_positive skips exactly the problems where every attempt reaches the target (brute force)
        skipped = [p for p in problems if p["id"] not in set(got)]
        assert len(skipped) <= 0.01 * N
        for p in skipped:
            assert all(T._last_step(*_two_left(p["nums"], seq), p["target"])[1] == p["target"]
                       for seq in _all_starts(p["nums"]))


def _all_starts(nums):
    """Every early-move sequence of the natural rules (results 1..VALUE_CAP), by brute force."""
    out = []

    def walk(state, seq):
        if len(state) == 2:
            out.append(seq)
            return
        for i in range(len(state)):
            for j in range(len(state)):
                a, b = state[i], state[j]
                if i == j or a < b or (a == b and i > j):
                    continue
                for op in "+-*/":
                    v = _value(a, op, b)
                    if v is None or v != int(v) or not 0 < v <= T.VALUE_CAP or (op == "/" and b < 2):
                        continue
                    rest = [s for k, s in enumerate(state) if k not in (i, j)] + [int(v)]
                    walk(rest, seq + [(a, op, b, int(v))])
    walk(list(nums), [])
    return out


def _two_left(nums, seq):
    state = list(nums)
    for a, op, b, v in seq:
        state.remove(a)
        state.remove(b)
        state.append(v)
    return state


def test_search_pays_and_the_teacher_is_exact(problems, restart_traces):
    """(a) the search solves several times what one attempt does, on 3 and on 4 numbers."""
    rows = restart_traces["restart"]
    for k, factor in ((3, 2.5), (4, 3.0)):
        sub = [r for r in rows if len(r["nums"]) == k]
        search = sum(r["correct"] for r in sub) / len(sub)
        one = sum(T.restart_search(r["nums"], r["target"], random.Random(i), max_attempts=1)[2] == r["target"]
                  for i, r in enumerate(sub)) / len(sub)
        assert search >= factor * one, (k, search, one)
        # one attempt, drawn uniformly among the starts, reaches the target with the brute-force rate
        exact = sum(sum(T._last_step(*_two_left(r["nums"], s), r["target"])[1] == r["target"]
                        for s in _all_starts(r["nums"])) / len(_all_starts(r["nums"])) for r in sub) / len(sub)
        assert abs(one - exact) < 0.06, (k, one, exact)


def test_read_checks_by_hand():
    assert T.read_checks("9 + 5 = 14. 14 is not 24.", 24) == (1, 1)
    assert T.read_checks("9 + 5 = 14. 14 is not 14.", 14) == (0, 1)  # a check that contradicts itself
    assert T.read_checks("9 + 5 = 14. 15 is not 24.", 24) == (0, 1)  # names another value
    assert T.read_checks("9 + 5 = 14. 14 is not 20.", 24) == (0, 1)  # names another target
    assert T.read_checks("9 + 5 = 14. 14 equals the target.", 14) == (1, 1)
    assert T.read_checks("9 + 5 = 14. 14 equals the target.", 15) == (0, 1)
    assert T.read_checks("no checks", 3) == (0, 0)


def test_uses_given_numbers_by_hand():
    assert C.uses_given_numbers("x\n<answer> (3 + 5) * 2 </answer>", [2, 3, 5])
    assert C.uses_given_numbers("x\n<answer> 3 + 5 + 2 </answer>", [5, 3, 2])
    assert not C.uses_given_numbers("x\n<answer> 3 + 5 </answer>", [2, 3, 5])
    assert not C.uses_given_numbers("x\n<answer> 3 + 5 + 2 + 2 </answer>", [2, 3, 5])
    assert not C.uses_given_numbers("<answer> 3 + 5 + 2 </answer>\nmore", [2, 3, 5])  # not on the last line
    assert not C.uses_given_numbers("no answer", [2, 3, 5])


def test_single_path_corpus_is_behavior_free_and_right():
    rows = T.restart_corpus(C.generate_problems(200, "priming", seed=9), n_drill=50, seed=4)
    paths = [r for r in rows if r["query"] != "Arithmetic:"]
    assert len(paths) >= 195 and len(rows) == len(paths) + 50
    for r in paths:
        assert T.count_behavior_phrases(r["completion"]) == dict.fromkeys(T.BEHAVIORS, 0)
        assert C.is_correct(r["completion"], r["nums"], r["target"])
        think = r["completion"].split("</think>")[0]
        assert think.count("\n") == 2 and "Left:" in think or len(r["nums"]) == 2
        right, stated = T.check_arithmetic(think)
        assert right == stated == len(r["nums"]) - 1
    for r in rows:
        if r["query"] == "Arithmetic:":
            right, stated = T.check_arithmetic(r["completion"])
            assert right == stated == 8


def test_traces_cli_from_a_problem_file(tmp_path, capsys):
    data = tmp_path / "data"
    assert C.main(["problems", "--distribution", "priming", "--n-train", "60", "--n-test", "5",
                   "--out", str(data)]) == 0
    for cond in ("restart", "restart_empty_cot"):
        out = tmp_path / f"{cond}.jsonl"
        assert T.main(["traces", "--condition", cond, "--n", "20", "--problems", str(data / "train.jsonl"),
                       "--offset", "10", "--out", str(out)]) == 0
        rows = files.read_jsonl(out)
        assert [(r["nums"], r["target"]) for r in rows] == [(p["nums"], p["target"])
                                                            for p in files.read_jsonl(data / "train.jsonl")[10:30]]
    assert "end with a right answer" in capsys.readouterr().out
    assert T.main(["traces", "--condition", "restart", "--n", "100", "--problems", str(data / "train.jsonl"),
                   "--out", str(tmp_path / "x.jsonl")]) == 2
    assert "fewer than the 100" in capsys.readouterr().err
    assert T.main(["corpus", "--problems", str(data / "train.jsonl"), "--n-solutions", "30", "--n-drill", "5",
                   "--out", str(tmp_path / "c.jsonl")]) == 0
    assert len(files.read_jsonl(tmp_path / "c.jsonl")) >= 5 + 25  # a problem no attempt solves is skipped


# -----------------------------------------------------------------------------
# The gates on a fake study


def _fake_run(folder: Path, rows, truncated=0.0):
    (folder / "completions").mkdir(parents=True)
    files.write_jsonl(folder / "completions" / "step_0.jsonl", rows)
    files.write_jsonl(folder / "metrics.jsonl", [{"step": 0, "val_truncated_frac": truncated}])


def _row(nums, target, completion):
    return {"step": 0, "nums": nums, "target": target, "completion": completion,
            "score": C.score(completion, nums, target), "length": len(completion.split())}


def test_gates_on_a_fake_study(tmp_path):
    good = "\n3 + 5 = 8. Left: 2, 8. 8 * 2 = 16. 16 equals the target.\n</think>\n<answer> (3 + 5) * 2 </answer>"
    miss = "\n3 + 5 = 8. Left: 2, 8. 8 + 2 = 10. 10 is not 16.\n</think>\n<answer> 3 + 5 + 2 </answer>"
    lie = "\n3 + 5 = 8. Left: 2, 8. 8 + 2 = 10. 10 equals the target.\n</think>\n<answer> 3 + 5 + 2 </answer>"
    extra = "\n</think>\n<answer> 3 + 5 + 2 + 6 </answer>"
    none = "\n3 + 5 = 8."
    p = ([3, 5, 2], 16)
    # restart: 4 of 10 right; answers 9/10; checks 8 of 9 consistent; numbers exact 8/9
    restart = [_row(*p, good)] * 4 + [_row(*p, miss)] * 4 + [_row(*p, lie), _row(*p, none)]
    restart[8] = _row(*p, lie)
    restart[7] = _row(*p, extra)
    _fake_run(tmp_path / "restart_s1", restart, truncated=0.1)
    _fake_run(tmp_path / "restart_empty_cot_s1", [_row(*p, good)] * 5 + [_row(*p, miss)] * 5)
    (tmp_path / "gates").mkdir()
    (tmp_path / "gates" / "base_arithmetic.json").write_text(json.dumps({"n": 100, "arithmetic_accuracy": 0.99}))
    results = classify.study_results([tmp_path / "restart_s1", tmp_path / "restart_empty_cot_s1"])
    assert results["conditions"]["restart"]["seeds"]["1"]["truncated"] == [0.1]
    gates = {(g["gate"], g["condition"]): g for g in study_report.study_gates(results, tmp_path / "gates")}
    base = gates[(study_report.GATES[0][0], "base")]
    assert base["measured"] == 0.99 and base["passed"]
    pays = gates[(study_report.GATES[1][0], "restart")]
    assert (pays["measured"], pays["threshold"], pays["passed"]) == (0.4, 0.5, False)
    answered = gates[(study_report.GATES[2][0], "restart")]
    assert answered["measured"] == pytest.approx(0.9) and not answered["passed"]
    checks = gates[(study_report.GATES[3][0], "restart")]
    assert checks["measured"] == pytest.approx(7 / 8) and not checks["passed"]   # 4 good + 3 misses + 1 lie
    exact = gates[(study_report.GATES[4][0], "restart")]
    assert exact["measured"] == pytest.approx(8 / 9) and not exact["passed"]
    assert not any(g["condition"] == "restart_empty_cot" for g in gates.values())  # controls are the bar
    table = study_report.format_gates_table(list(gates.values()))
    assert "**FAILED**" in table and "0.400 | 0.500" in table


def test_run_all_writes_every_condition_from_one_problem_list(tmp_path):
    """run_all.sh mini with PYTHON=echo: every CLI call is printed, not run. Every condition's traces
    come from the same problem file and rows; every PPO run checks its cap against every condition."""
    import shutil
    import subprocess
    shutil.copy(ROOT / "run_all.sh", tmp_path / "run_all.sh")
    p = subprocess.run(["bash", "run_all.sh", "mini"], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                       env={"PATH": "/usr/bin:/bin", "PYTHON": "echo"})
    assert p.returncode == 0, p.stderr
    calls = p.stdout.splitlines() + [line for f in sorted((tmp_path / "runs/mini/logs").glob("*.log"))
                                     for line in f.read_text().splitlines()]
    conditions = "restart restart_only_backtracking restart_no_positive restart_empty_cot restart_dots".split()
    traces = [c.split() for c in calls if c.startswith("traces.py traces")]
    written = {t[t.index("--condition") + 1] for t in traces}
    assert set(conditions) <= written
    for t in traces:
        assert t[t.index("--problems") + 1] == "runs/mini/data/train.jsonl" and "--offset" not in t
        assert (t[t.index("--n") + 1], t[t.index("--seed") + 1]) == ("4000", "2")
    corpus = next(c.split() for c in calls if c.startswith("traces.py corpus"))
    assert corpus[corpus.index("--offset") + 1] == "4000"  # the base's problems follow the traces' rows
    ppo = [c.split() for c in calls if c.startswith("ppo.py")]
    assert len(ppo) == 10
    for c in ppo:
        caps = c[c.index("--cap-traces") + 1].split(",")
        assert caps == [f"runs/mini/data/{x}.jsonl" for x in conditions]
        assert c[c.index("--test-data") + 1] == "runs/mini/data/test.jsonl"
    assert "--arithmetic" in (tmp_path / "runs/mini/gates/base_arithmetic.json").read_text()  # the base's gate
    greedy = sorted((tmp_path / "runs/mini/greedy").glob("*.json"))
    assert len(greedy) == 10 and all("--seed 4343" in f.read_text() for f in greedy)
    assert any(c.startswith("classify.py report") and "--gates" in c and "--greedy" in c for c in calls)
