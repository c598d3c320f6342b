"""Benchmark countdown.py: reward throughput, worst-case reward latency, trace generation speed,
and what the synthetic traces look like per condition (beside the paper's figures).

    python bench/bench_countdown.py            # ~1 minute on 2 CPU cores
    python bench/bench_countdown.py --n 200    # quicker

Targets (issue 3): >= 50k reward calls/s on typical responses, < 50 ms for the worst single call on
inputs up to 1 MB, < 30 s to write 1,000 traces of one condition. The baseline for throughput is a
restatement of the original reward (regex + eval), timed in the same run on the same responses.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(1, str(Path(__file__).resolve().parents[1] / "tests"))   # test_countdown imports its conftest
import countdown as C  # noqa: E402
import traces  # noqa: E402
# the baseline: the original reward, restated once, in the tests (it calls eval, so it stays out of countdown.py)
from test_countdown import reference_score  # noqa: E402
from plumbing import files  # noqa: E402


def typical_responses(n):
    """Trace completions of every condition (right, wrong, empty-CoT, dots) plus a few with no answer."""
    out = []
    for cond in traces.CONDITIONS:
        for r in traces.generate_traces(cond, n, seed=123):
            out.append((r["completion"], r["nums"], r["target"]))
    out += [(c[: len(c) // 2], nums, t) for c, nums, t in out[:n]]  # truncated: no answer
    return out


def throughput(fn, items, min_seconds=1.0):
    calls, t0 = 0, time.perf_counter()
    while True:
        for resp, nums, target in items:
            fn(resp, nums, target)
        calls += len(items)
        elapsed = time.perf_counter() - t0
        if elapsed >= min_seconds:
            return calls / elapsed


MB = 1 << 20


def adversarial_inputs():
    """(name, response, nums, target); every response is at most ~1 MB."""
    a = lambda e: f"<think> x </think>\n<answer> {e} </answer>"  # noqa: E731
    return [
        ("power tower", a("9**9**9**9**9"), [9] * 5, 9),
        ("long power tower", a("**".join(["9"] * 300)), [9] * 300, 9),
        ("10k-deep parentheses", a("(" * 10_000 + "1" + ")" * 10_000), [1], 1),
        ("200-deep parentheses (legal)", a("(" * 200 + "1 + 2" + ")" * 200), [1, 2], 3),
        ("unary minus chain 1 MB", a("-" * (MB - 64) + "1"), [1], 1),
        ("1e6-digit literal", a("1" * 10**6), [1], 1),
        ("90-digit products", a(" * ".join(["9" * 90] * 10)), [int("9" * 90)] * 10, 1),
        ("1 MB of words, answer last", "word " * (MB // 5 - 10) + a("1 + 2"), [1, 2], 3),
        ("1 MB one line, answer last", "x" * (MB - 64) + "<answer> 1 + 2 </answer>", [1, 2], 3),
        ("1 MB of newlines", "\n" * MB, [1], 1),
        ("1 MB answer (spaces inside)", a("1 +" + " " * (MB - 64) + "2"), [1, 2], 3),
        ("131k unclosed <answer>", "<answer>" * (MB // 8 - 8) + "1 + 2 </answer>", [1, 2], 3),
        ("43k answers on one line", "<answer> 1 + 2 </answer>" * (MB // 24), [1, 2], 3),
        ("closes without opens", "</answer>" * (MB // 9), [1], 1),
        ("1 MB inside one answer", "<answer>" + "x" * (MB - 32) + "</answer>", [1], 1),
        ("non-ASCII digits", a("٣ + ٤") * 1000, [3, 4], 7),
        ("code", a("__import__('os').system('true')"), [1], 1),
        ("1 MB of 1 + 1 + ...", a(" + ".join(["1"] * (MB // 4 - 16))), [1] * (MB // 4 - 16), MB // 4 - 16),
    ]


def worst_case(inputs, repeats=3):
    rows = []
    for name, resp, nums, target in inputs:
        worst, best_score = 0.0, 0.0
        for lenient in (False, True):
            for _ in range(repeats):
                t0 = time.perf_counter()
                s = C.score(resp, nums, target, lenient=lenient)
                worst = max(worst, time.perf_counter() - t0)
                best_score = max(best_score, s)
        rows.append((name, len(resp), worst, best_score))
    return rows


# The paper has no behavior counts for its Claude traces. The closest figures are the step-0 rows
# of paper_spec 5.3: the primed Llama-3.2-3B (after SFT on those traces, before RL), classified by
# gpt-4o-mini on 200 samples; "len" is the CSV's response_length, probably Llama tokens.
PAPER_STEP0 = {  # condition: (V, B, S, BW, len)
    "all_strategies": (1.67, 2.60, 3.42, 1.61, 363),
    "only_backtracking": (0.59, 2.96, 0.10, 0.07, 208),
    "backtracking_verification": (2.56, 2.94, 0.61, 0.07, 353),
    "backtracking_subgoal": (0.12, 2.93, 3.63, 0.03, 210),
    "backtracking_backward": (0.13, 2.50, 0.95, 2.12, 174),
    "empty_cot": (0, 0, 0, 0, 22),
    "dots": (0, 0, 0, 0, 303),
    "no_positive": (1.89, 3.17, 3.73, 1.59, 383),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1000, help="traces per condition")
    args = parser.parse_args()

    print("== reward throughput (typical responses: trace completions of all 9 conditions + truncated)")
    items = typical_responses(max(args.n // 5, 50))
    prompt = "Assistant: Let me solve this step by step.\n<think>"
    ref_items = [(prompt + r, nums, t) for r, nums, t in items]
    for (r, nums, t), (rr, _, _) in zip(items, ref_items):
        assert C.score(r, nums, t) == reference_score(rr, nums, t)  # same verdicts on these
    ours = throughput(C.score, items)
    base = throughput(reference_score, ref_items)
    print(f"responses: {len(items)}  mean length: {statistics.mean(len(r) for r, _, _ in items):.0f} chars")
    print(f"countdown.score:            {ours:10,.0f} calls/s   (target >= 50,000)")
    print(f"original regex+eval reward: {base:10,.0f} calls/s   (baseline)")
    print(f"ratio ours / original:      {ours / base:10.2f}x")

    print("\n== worst single call on adversarial inputs (max over 3 calls x strict/lenient)")
    rows = worst_case(adversarial_inputs())
    for name, size, worst, best in rows:
        print(f"{name:32s} {size:>9,d} chars  {worst * 1e3:8.3f} ms   score {best:.1f}")
    name, size, worst, _ = max(rows, key=lambda r: r[2])
    print(f"worst: {worst * 1e3:.3f} ms ({name})   (target < 50 ms)")

    print(f"\n== writing {args.n} traces per condition (generate + atomic JSONL write)")
    stats = {}
    with tempfile.TemporaryDirectory() as tmp:
        for cond in traces.CONDITIONS:
            t0 = time.perf_counter()
            rows = traces.generate_traces(cond, args.n, seed=0)
            files.write_jsonl(os.path.join(tmp, f"{cond}.jsonl"), rows)
            dt = time.perf_counter() - t0
            stats[cond] = rows
            print(f"{cond:28s} {dt:6.2f} s   (target < 30 s)")

    print("\n== per condition: ours (mean words of the completion, mean behavior counts) | paper")
    print("   paper = step-0 counts of primed Llama-3.2-3B runs (paper_spec 5.3), len in tokens; "
          "the paper reports no counts for the Claude traces themselves")
    cols = " ".join(f"{c:>5s}" for c in ("V", "B", "S", "BW"))
    head = f"{'condition':27s} {'words':>6s} {cols} | {cols} {'len':>5s}"
    print(head)
    print("-" * len(head))
    for cond, rows in stats.items():
        words = statistics.mean(len(r["completion"].split()) for r in rows)
        means = [statistics.mean(r["behaviors"][b] for r in rows) for b in traces.BEHAVIORS]
        paper = PAPER_STEP0.get(cond)
        if paper:
            right = " ".join(f"{x:5.2f}" for x in paper[:4]) + f" {paper[4]:5d}"
        else:
            right = "   (no results in the paper)"
        print(f"{cond:27s} {words:6.1f} " + " ".join(f"{m:5.2f}" for m in means) + " | " + right)


if __name__ == "__main__":
    main()
