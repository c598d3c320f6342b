"""Greedy accuracy: what sft.py reports at each epoch's end, and `python sft.py eval` around it.

greedy_accuracy scores greedy completions of Countdown problems (sft.py's training loop calls it at
each epoch's end); arithmetic_accuracy scores the restart drill's facts; eval_main is the eval
subcommand: choosing the problems, loading the checkpoint, the summary line. Nothing here imports a
core file: model.load, model.generate, traces.restart_drill and countdown's functions come in as
arguments.
"""

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch

from plumbing.device import autocast_bf16
from plumbing.dist import gather_full
from plumbing.files import read_jsonl, write_jsonl
from plumbing.runs import resolve_device
from plumbing.sft_run import problem_key


def build_eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sft.py eval", description="Greedy (temperature 0) Countdown accuracy of a "
                                "checkpoint on the RL prompt, scored with countdown.is_correct.")
    p.add_argument("--model", required=True, help="checkpoint folder (e.g. runs/sft_tiny/final), alias or Hub id")
    p.add_argument("--problems", help="JSONL of problems {nums, target}; default: generate --n with countdown.py")
    p.add_argument("--distribution", default="priming",
                   help="countdown.py distribution when generating problems (default: priming)")
    p.add_argument("--seed", type=int, default=12345, help="seed of the generated problems (default: 12345)")
    p.add_argument("--exclude-data", help="JSONL files (comma-separated) whose rows' (sorted nums, target) are removed "
                   "from the problems, e.g. the training data (rows need 'nums' and 'target'); this shifts the mix "
                   "towards problems the training data rarely covers (4 numbers): see --per-count")
    p.add_argument("--n", type=int, default=200, help="number of problems (default: 200)")
    p.add_argument("--per-count", action="store_true",
                   help="generated problems: half with 3 numbers, half with 4, as the test splits")
    p.add_argument("--arithmetic", type=int, default=0, metavar="N",
                   help="instead: greedy arithmetic on N held-out facts of the restart drill (traces.restart_drill, "
                        "seeded by --seed): the prompt 'Arithmetic: a op b = ', right when the next number is a op b")
    p.add_argument("--max-new-tokens", type=int, default=1024, help="generation budget per problem (default: 1024)")
    p.add_argument("--batch-size", type=int, default=64, help="prompts per generation batch (default: 64)")
    p.add_argument("--out", help="write the completions here as JSONL (refuses to overwrite)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default: auto)")
    p.add_argument("--autocast", default="auto", choices=("auto", "bfloat16", "none"),
                   help="bf16 autocast: auto = on CUDA only (default: auto)")
    p.add_argument("--num-threads", type=int, default=0, help="CPU threads for torch (0 = torch's default)")
    return p


@torch.no_grad()
def greedy_accuracy(model, tokenizer, problems, *, generate, prompt, is_correct, max_new_tokens: int = 1024,
                    batch_size: int = 64, autocast: str = "none", progress: bool = False) -> tuple:
    """(accuracy, rows): greedy (temperature 0) completions (generate = model.generate) of the RL prompt
    (prompt = countdown.make_prompt), scored by is_correct = countdown.is_correct.
    rows: {"nums", "target", "completion", "correct", "length"}."""
    device = next(model.parameters()).device
    if autocast_bf16(device, autocast) and next(model.parameters()).dtype != torch.bfloat16:
        # generate in the compute dtype: a bf16 copy of the weights, so the KV cache is bf16 too (autocast
        # over fp32 weights would keep an fp32 cache and recast every weight at every step)
        model = gather_full(model, device=device, dtype=torch.bfloat16)
    rows = []
    batches = range(0, len(problems), batch_size)
    if progress:
        from tqdm import tqdm
        batches = tqdm(batches, desc="eval", file=sys.stderr, leave=False)
    for i in batches:
        chunk = problems[i:i + batch_size]
        prompts = [tokenizer.encode(prompt(p["nums"], p["target"])) for p in chunk]
        gen = generate(model, prompts, max_new_tokens=max_new_tokens, temperature=0.0,
                       eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
        for p, toks, n in zip(chunk, gen.tokens, gen.lengths.tolist()):
            text = tokenizer.decode(toks[:n], skip_special_tokens=True)
            rows.append({"nums": p["nums"], "target": p["target"], "completion": text,
                         "correct": is_correct(text, p["nums"], p["target"]), "length": n})
    accuracy = sum(r["correct"] for r in rows) / max(1, len(rows))
    return accuracy, rows


@torch.no_grad()
def arithmetic_accuracy(model, tokenizer, n: int, seed: int, batch_size: int = 64, *, generate, drill) -> tuple:
    """({"n", "arithmetic_accuracy"}, rows): greedy results of n facts "a op b = c" of the restart
    drill (drill = traces.restart_drill with `seed`, the first fact of each row), each prompted as the
    drill writes it, "Arithmetic:" then " a op b = ", and right when the next number generated
    (generate = model.generate) is c."""
    facts = [r["completion"].split(".")[0].strip() for r in drill(n, seed=seed, per_row=1)]
    rows = []
    for i in range(0, n, batch_size):
        chunk = facts[i:i + batch_size]
        # the prompt ends where the result begins, " = " included: a tokenizer may merge " = " whole
        prompts = [tokenizer.encode("Arithmetic:") + tokenizer.encode(" " + f.split(" = ")[0] + " = ") for f in chunk]
        gen = generate(model, prompts, max_new_tokens=6, temperature=0.0, eos_id=tokenizer.eos_id,
                       pad_id=tokenizer.pad_id)
        for f, toks, k in zip(chunk, gen.tokens, gen.lengths.tolist()):
            got = re.match(r"\s*(\d+)", tokenizer.decode(toks[:k], skip_special_tokens=True))
            want = f.split("= ")[1]
            rows.append({"fact": f, "answer": got.group(1) if got else None,
                         "correct": bool(got) and got.group(1) == want})
    right = sum(r["correct"] for r in rows)
    return {"n": len(rows), "correct": right, "arithmetic_accuracy": right / max(1, len(rows))}, rows


def choose_problems(args, generate_problems) -> list:
    """--problems (or generate_problems = countdown.generate_problems), minus --exclude-data, --n of them."""
    exclude = {problem_key(r) for f in (args.exclude_data or "").split(",") if f
               for r in read_jsonl(f) if "nums" in r}
    if args.problems:
        return [p for p in read_jsonl(args.problems) if problem_key(p) not in exclude][:args.n]
    # distinct problems from a seeded stream, minus the excluded ones
    # --per-count: as many 3-number as 4-number problems (the test splits' mix), however few of
    # one kind are left outside --exclude-data (a large training file takes most 3-number ones)
    quota = {3: args.n // 2, 4: args.n - args.n // 2} if args.per_count else None
    problems, seen, k = [], set(exclude), 0
    while len(problems) < args.n:
        for p in generate_problems(4 * args.n, args.distribution, seed=args.seed * 1000 + k):
            kind = len(p["nums"])
            if quota is not None and quota.get(kind, 0) == 0:
                continue
            if problem_key(p) not in seen and len(problems) < args.n:
                seen.add(problem_key(p))
                problems.append(p)
                if quota is not None:
                    quota[kind] -= 1
        k += 1
        if k > 200:
            raise ValueError(f"could not find {args.n} distinct problems outside --exclude-data; lower --n")
    return problems


def eval_main(argv, *, load, greedy_accuracy, generate, drill, generate_problems) -> int:
    """The eval subcommand; the core functions as arguments (see the module docstring)."""
    args = build_eval_parser().parse_args(argv)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    try:
        if args.out and Path(args.out).exists():
            raise FileExistsError(f"{args.out} exists; choose another --out")
        # the problems first: a mistake in them shows before a large checkpoint loads
        problems = None if args.arithmetic else choose_problems(args, generate_problems)
        model, tok = load(args.model, device=resolve_device(args.device), dtype="float32")
        if args.arithmetic:
            summary, rows = arithmetic_accuracy(model, tok, args.arithmetic, args.seed, args.batch_size,
                                                generate=generate, drill=drill)
            if args.out:
                write_jsonl(args.out, rows)
            print(json.dumps(dict(summary, model=str(args.model))))
            return 0
    except (ValueError, FileNotFoundError, FileExistsError, PermissionError, ConnectionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    acc, rows = greedy_accuracy(model, tok, problems, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                                autocast=args.autocast, progress=True)
    by_k = {}
    for r in rows:
        by_k.setdefault(len(r["nums"]), []).append(r["correct"])
    summary = {"model": str(args.model), "n": len(rows), "accuracy": acc,
               "accuracy_by_count": {str(k): round(sum(v) / len(v), 4) for k, v in sorted(by_k.items())},
               "n_by_count": {str(k): len(v) for k, v in sorted(by_k.items())},
               "mean_length": sum(r["length"] for r in rows) / max(1, len(rows)),
               "seconds": round(time.perf_counter() - t0, 1)}
    if args.out:
        write_jsonl(args.out, rows)
    print(json.dumps(summary))
    return 0
