"""Peak memory of `curate.py pretrain` on many synthetic documents, against the fake judge server.

    python bench/bench_curate_memory.py --docs 100000          # label stage only (500k requests)
    python bench/bench_curate_memory.py --docs 20000 --full    # label, select, rewrite, label rewrites

Writes N synthetic math-like documents (~1.5 KB each, a JSONL of N * 1.5 KB) to a temporary
folder, starts tests/fake_judge.py's server in this process, runs curate.py as a child process
and reports its peak resident memory (VmHWM from /proc, the same number getrusage(RUSAGE_CHILDREN)
gives as ru_maxrss), the wall time and the request count. What stays in memory by design: one
label row per document and the judge's cache index; documents, prompts and answers are streamed a
chunk at a time (--chunk-docs).
"""
import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from fake_judge import FakeJudge  # noqa: E402


def responder(prompt, system):
    h = hash(prompt[-300:])
    if "## Contains Problem?" in prompt:
        return f"## Rationale\nx\n\n## Contains Problem?\n{'yes' if h % 4 else 'no'}\n\n## Contains Solution?\nyes\n"
    if prompt.startswith("Your task is to split"):
        return "<question>What is x?</question>\n<thoughts>I try x = 2 and check it.</thoughts>\n<answer>2</answer>"
    return f"## Thoughts\nshort\n## Number\n<count>{h % 3 if h % 2 else 0}</count>"


def write_docs(path, n, seed=0):
    rng = random.Random(seed)
    words = ["integral", "solve", "equation", "proof", "therefore", "we", "check", "x", "=", "2",
             "derivative", "substitute", "the", "answer", "is", "let", "assume", "then"]
    with open(path, "w") as f:
        for i in range(n):
            lines = [" ".join(rng.choice(words) for _ in range(20)) for _ in range(12)]
            f.write(json.dumps(dict(id=f"doc{i}", text=f"Problem {i}.\n" + "\n".join(lines))) + "\n")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--docs", type=int, default=100_000)
    p.add_argument("--full", action="store_true", help="run every stage, not only labelling")
    p.add_argument("--chunk-docs", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=16)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.time()
        write_docs(tmp / "docs.jsonl", args.docs)
        size_mb = (tmp / "docs.jsonl").stat().st_size / 2**20
        print(f"{args.docs} documents, {size_mb:.0f} MB of JSONL, written in {time.time() - t0:.0f}s")
        with FakeJudge(responder) as fj:
            cmd = [sys.executable, str(ROOT / "curate.py"), "pretrain", "--input", str(tmp / "docs.jsonl"),
                   "--out", str(tmp / "out"), "--tokenizer", "words", "--base-url", fj.url,
                   "--concurrency", str(args.concurrency), "--chunk-docs", str(args.chunk_docs),
                   "--no-progress", "--budget-tokens", "300000"]
            if not args.full:
                cmd += ["--stop-after", "label"]
            t0 = time.time()
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            hwm = 0
            while proc.poll() is None:  # VmHWM is gone once the child exits; poll while it runs
                try:
                    status = Path(f"/proc/{proc.pid}/status").read_text()
                    hwm = max(hwm, int(next(l for l in status.splitlines() if l.startswith("VmHWM")).split()[1]))
                except (OSError, StopIteration):
                    pass
                time.sleep(0.5)
            out, err = proc.communicate()
            wall = time.time() - t0
            n_req = len(fj.log)
        rusage_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        if proc.returncode != 0:
            print(err[-3000:])
            raise SystemExit(f"curate.py failed with exit code {proc.returncode}")
        print(out[-1500:])
        print(f"peak memory of curate.py: VmHWM {hwm / 1024:.0f} MiB, getrusage(RUSAGE_CHILDREN).ru_maxrss "
              f"{rusage_kb / 1024:.0f} MiB; {n_req} requests in {wall:.0f}s ({n_req / wall:.0f}/s)")


if __name__ == "__main__":
    main()
