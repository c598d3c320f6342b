"""The study report: PPO run folders in, results.json, results.md and figures out (`classify.py report`).

Plumbing for classify.py. The paper's Figures 1 and 4 plot, per condition, validation accuracy against
the PPO step, and Figure 5 the behavior counts of the validation completions. `classify.py report`
rebuilds them from run folders (runs/<mode>/ppo/<condition>_s<seed>/, or any ppo.py --out): what one
run measured per validation step comes from classify.summarize_run, handed in (nothing here imports a
core file); here the seeds are pooled, the gates checked, and the tables and figures written. Accuracy
intervals are Wilson 95% intervals over the problems (and seeds, pooled), the binomial noise of a test set.
"""

import argparse
import csv
import io
import json
import os
import re
import sys
from pathlib import Path

from plumbing.files import read_jsonl, write_text_atomic
from plumbing.judge_http import HelpFormatter

# -----------------------------------------------------------------------------------------------
# Run folders in (completions, a judge's labels); classify.py's CSV and printed tables out


def load_completions(path, torn_fix=""):
    """Rows from a JSONL file or a folder of them (e.g. runs/x/completions/step_10.jsonl); invalid UTF-8
    reads as U+FFFD, and a cut last line is skipped with a warning or, given torn_fix, an error saying it.

    Each row needs the problem (nums or numbers, target) and the completion (completion,
    response or generated). "step" comes from the row, else from a step_<N> file name, else 0.
    """
    p = Path(path)
    if p.is_dir():
        files = sorted(p.glob("*.jsonl"))
    elif p.exists():
        files = [p]
    else:
        raise FileNotFoundError(f"--input {p} does not exist")
    if not files:
        raise FileNotFoundError(f"no *.jsonl files in {p}")
    rows = []
    for f in files:
        m = re.search(r"step_?(\d+)", f.stem)
        for i, r in enumerate(read_jsonl(f, errors="replace", torn_fix=torn_fix)):
            r = dict(r)
            if "nums" not in r and "numbers" in r:
                r["nums"] = r.pop("numbers")
            for alt in ("response", "generated"):
                if "completion" not in r and alt in r:
                    r["completion"] = r.pop(alt)
            missing = [k for k in ("nums", "target", "completion") if k not in r]
            if missing:
                raise ValueError(f"{f} line {i + 1} lacks {', '.join(missing)}; each row needs "
                                 "nums, target and completion (the text after the prompt)")
            r.setdefault("step", int(m.group(1)) if m else 0)
            rows.append(r)
    return rows


def labels_of(folder) -> dict:
    """{(step, nums as JSON, target, completion): label row} from a judge's labels/labels.jsonl, if any."""
    path = Path(folder) / "labels" / "labels.jsonl"
    rows = read_jsonl(path, errors="replace") if path.exists() else []
    return {(r["step"], json.dumps(r["nums"]), r["target"], r["completion"]): r for r in rows}


def write_csv(path, rows):
    buf = io.StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    write_text_atomic(path, buf.getvalue())


def _fmt(x, nd=3):
    return "-" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))


def print_label_summary(summary, labelled, behaviors) -> None:
    """classify.py's table on stdout: per step n judged, accuracy and average counts, missing/failed;
    then, on stderr, how many items have failed requests or answers without a count."""
    print(f"{'step':>6} {'n':>5} {'acc':>6} " + " ".join(f"{b[:6]:>7}" for b in behaviors)
          + "  missing/failed")
    for s in summary:
        print(f"{s['step']:>6} {s['n_judged']:>5} {_fmt(s['accuracy']):>6} "
              + " ".join(f"{_fmt(s[f'{b}_avg'], 2):>7}" for b in behaviors) + "  "
              + " ".join(f"{s[f'{b}_missing']}/{s[f'{b}_failed']}" for b in behaviors))
    n_failed = sum(1 for r in labelled if r.get("failed"))
    n_missing = sum(1 for r in labelled if r.get("missing"))
    if n_failed or n_missing:
        print(f"{n_failed} item(s) with failed requests, {n_missing} with an answer lacking "
              f"<count>; their counts are null (not 0). Rerun the same command to retry failures.",
              file=sys.stderr)
        for r in [r for r in labelled if r.get("failed")][:5]:
            print(f"  step {r['step']} nums {r['nums']} target {r['target']}: {r['failed']}",
                  file=sys.stderr)


def format_score_table(scores):
    lines = [f"{'behavior':<13} {'n':>5} {'precision':>9} {'recall':>7} {'MAE':>6}"]
    for b, s in scores.items():
        lines.append(f"{b:<13} {s['n']:>5} {_fmt(s['precision']):>9} {_fmt(s['recall']):>7} "
                     f"{_fmt(s['mae']):>6}")
    return "\n".join(lines)


def print_scores(scores, n) -> None:
    """--score-against: precision / recall / MAE per behavior, overall and per condition."""
    print(f"\nagainst ground truth ({n} items; positive = count > 0):")
    print(format_score_table(scores["overall"]))
    for c, sc in scores.get("by_condition", {}).items():
        print(f"\n[{c}]\n" + format_score_table(sc))


# -----------------------------------------------------------------------------------------------
# Pooled over seeds: results.json, the tables and the figures


def wilson_interval(k, n, z=1.96):
    """95% Wilson score interval of a proportion k/n (None when n == 0)."""
    if n == 0:
        return None
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * ((p * (1 - p) + z * z / (4 * n)) / n) ** 0.5 / (1 + z * z / n)
    return [max(0.0, centre - half), min(1.0, centre + half)]


def run_name(folder: Path):
    """(condition, seed) from a folder named <condition>_s<seed>; else (folder name, 0)."""
    m = re.fullmatch(r"(.+)_s(\d+)", folder.name)
    return (m.group(1), int(m.group(2))) if m else (folder.name, 0)


def _mean(xs):
    return sum(xs) / len(xs) if xs else None


def _behaviors(results) -> list:
    """The behavior names, in the order the runs' counts were written."""
    for c in results["conditions"].values():
        for r in c["seeds"].values():
            return list(r["behaviors"])
    return []


def summarize_run(folder, measure, behaviors) -> dict:
    """Per validation step of one PPO run: n, correct, accuracy, mean behavior counts, mean
    response length in tokens, and the fraction of stated arithmetic steps that are right, ...
    measure(row, label) -> classify.measure_completion's dict for one completion."""
    folder = Path(folder)
    rows = load_completions(folder / "completions") if (folder / "completions").is_dir() else []
    if not rows:
        raise ValueError(f"{folder}: no completions/step_<N>.jsonl; is it a ppo.py run folder with "
                         "at least one validation?")
    labels = {k: r["behaviors"] for k, r in labels_of(folder).items()}  # a judge's counts win over the rules
    steps = {}
    for r in rows:
        steps.setdefault(r["step"], []).append(r)
    truncated = {}
    if (folder / "metrics.jsonl").exists():  # the share of validation responses cut at --max-response
        for m in read_jsonl(folder / "metrics.jsonl"):
            if m.get("val_truncated_frac") is not None:
                truncated[m["step"]] = m["val_truncated_frac"]
    out = dict(steps=[], n_eval=[], correct=[], accuracy=[], response_length=[], arithmetic_accuracy=[],
               truncated=[], answer_rate=[], numbers_exact=[], checks_consistent=[],
               behaviors={b: [] for b in behaviors},
               judge="rules" if not labels else "labels/labels.jsonl")
    for step in sorted(steps):
        rs = steps[step]
        ms = [measure(r, labels.get((step, json.dumps(r["nums"]), r["target"], r["completion"]))) for r in rs]
        correct = sum(m["correct"] for m in ms)
        right, stated = sum(m["right"] for m in ms), sum(m["stated"] for m in ms)
        out["steps"].append(step)
        out["n_eval"].append(len(rs))
        out["correct"].append(correct)
        out["accuracy"].append(correct / len(rs))
        out["response_length"].append(_mean([r.get("length", len(r["completion"].split())) for r in rs]))
        out["arithmetic_accuracy"].append(right / stated if stated else None)
        out["truncated"].append(truncated.get(step))
        answered = [m for m in ms if m["answered"]]
        out["answer_rate"].append(len(answered) / len(rs))
        out["numbers_exact"].append(_mean([m["exact"] for m in answered]) if answered else None)
        good, checks = sum(m["good"] for m in ms), sum(m["checks"] for m in ms)
        out["checks_consistent"].append(good / checks if checks else None)
        for b in behaviors:
            out["behaviors"][b].append(_mean([m["counts"][b] for m in ms if m["counts"].get(b) is not None]))
    return out


def study_results(run_folders, summarize_run) -> dict:
    """{"conditions": {name: {"final_accuracy", "n_eval", "initial_accuracy", intervals,
    "seeds": {seed: summarize_run(folder)}}}} over PPO run folders named <condition>_s<seed>."""
    conds: dict = {}
    for folder in sorted(Path(f) for f in run_folders):
        name, seed = run_name(folder)
        conds.setdefault(name, {"seeds": {}})["seeds"][str(seed)] = summarize_run(folder)
    for c in conds.values():
        runs = list(c["seeds"].values())
        last = min(len(r["steps"]) for r in runs) - 1  # the last step every seed reached
        for key, i in (("initial", 0), ("final", last)):
            k, n = sum(r["correct"][i] for r in runs), sum(r["n_eval"][i] for r in runs)
            c[f"{key}_accuracy"], c[f"{key}_ci95"] = k / n, wilson_interval(k, n)
            c[f"{key}_step"] = runs[0]["steps"][i]
            c[f"{key}_behaviors"] = {b: _mean([r["behaviors"][b][i] for r in runs]) for b in runs[0]["behaviors"]}
            c[f"{key}_arithmetic_accuracy"] = _mean([r["arithmetic_accuracy"][i] for r in runs
                                                     if r["arithmetic_accuracy"][i] is not None])
        c["n_eval"], c["n_seeds"] = runs[0]["n_eval"][last], len(runs)
        c["best_accuracy"] = max(_mean([r["accuracy"][i] for r in runs]) for i in range(last + 1))
    return {"conditions": conds}


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def draw_figures(results, out_dir) -> list:
    """accuracy.png, behaviors.png and response_length.png like the paper's Figures 4, 5 and the
    length panel; returns the paths written ([] with a message when matplotlib is missing)."""
    plt = _pyplot()
    if plt is None:
        print("figures skipped: matplotlib is not installed (pip install matplotlib); "
              "results.json is written all the same", file=sys.stderr)
        return []
    out_dir, paths = Path(out_dir), []
    conds = results["conditions"]
    colors = {c: plt.get_cmap("tab10")(i % 10) for i, c in enumerate(conds)}

    def lines(ax, get):
        for c, v in conds.items():
            for k, (seed, r) in enumerate(sorted(v["seeds"].items())):
                ys = get(r)
                ax.plot(r["steps"], [y if y is not None else float("nan") for y in ys], color=colors[c],
                        alpha=0.9 if k == 0 else 0.5, ls="-" if k == 0 else "--",
                        label=c if k == 0 else None)

    panels = [("accuracy.png", "validation accuracy (T = 1)", [lambda r: r["accuracy"]], [""]),
              ("response_length.png", "response length (tokens)", [lambda r: r["response_length"]], [""]),
              ("truncated.png", "validation responses cut at the cap",
               [lambda r: r.get("truncated") or [None] * len(r["steps"])], [""]),
              ("behaviors.png", "behavior count per completion",
               [lambda r, b=b: r["behaviors"][b] for b in _behaviors(results)], _behaviors(results))]
    for name, ylabel, getters, titles in panels:
        fig, axes = plt.subplots(1, len(getters), figsize=(4.2 * len(getters), 3.4), squeeze=False)
        for ax, get, title in zip(axes[0], getters, titles):
            lines(ax, get)
            ax.set_xlabel("PPO step")
            ax.set_title(title)
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel(ylabel)
        axes[0][-1].legend(fontsize=7)
        fig.suptitle("solid: first seed, dashed: other seeds", fontsize=8)
        fig.tight_layout()
        tmp = out_dir / f".{name}.{os.getpid()}.tmp.png"
        fig.savefig(tmp, dpi=110)
        plt.close(fig)
        os.replace(tmp, out_dir / name)
        paths.append(str(out_dir / name))
    return paths


def format_results_table(results) -> str:
    """A markdown table: per condition and seed, step-0 and final accuracy with 95% intervals."""
    def acc(k, n):
        lo, hi = wilson_interval(k, n)
        return f"{k / n:.3f} [{lo:.3f}, {hi:.3f}]"

    lines = ["| condition | seed | n | step 0 accuracy [95% CI] | final step | final accuracy [95% CI] | "
             "verif | backtr | subgoal | backward | arith. steps right |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c, v in results["conditions"].items():
        for seed, r in sorted(v["seeds"].items()):
            i = len(r["steps"]) - 1
            b = " | ".join(f"{r['behaviors'][x][i]:.2f}" for x in _behaviors(results))
            ar = r["arithmetic_accuracy"][i]
            lines.append(f"| {c} | {seed} | {r['n_eval'][i]} | {acc(r['correct'][0], r['n_eval'][0])} | "
                         f"{r['steps'][i]} | {acc(r['correct'][i], r['n_eval'][i])} | {b} | "
                         f"{'-' if ar is None else f'{ar:.3f}'} |")
        if len(v["seeds"]) > 1:
            lo, hi = v["final_ci95"]
            lines.append(f"| {c} | pooled | {v['n_eval']}x{v['n_seeds']} | {v['initial_accuracy']:.3f} | "
                         f"{v['final_step']} | {v['final_accuracy']:.3f} [{lo:.3f}, {hi:.3f}] | | | | | |")
    return "\n".join(lines)


# Gates before RL (README, "The miniature study"): what must hold at step 0 for RL to have something
# to amplify. A failed gate is reported as failed; nothing is hidden or stopped.
GATES = (("base arithmetic on held-out drill facts", 0.98), ("step-0 accuracy >= best control's", None),
         ("completions that end with an answer", 0.95), ("checks consistent with the value computed", 0.95),
         ("answers that use exactly the given numbers", 0.90))


def is_control(condition: str) -> bool:
    """The behavior-free controls: empty reasoning or dots (either design's names)."""
    return condition.endswith("empty_cot") or condition.endswith("dots")


def study_gates(results, gates_dir=None) -> list:
    """[{"gate", "condition", "measured", "threshold", "passed"}] from step 0 of the runs (pooled
    over seeds) and gates_dir/base_arithmetic.json (sft.py eval --arithmetic), when given."""
    conds, rows = results["conditions"], []
    base = Path(gates_dir) / "base_arithmetic.json" if gates_dir else None
    if base is not None and base.exists():
        a = json.loads(base.read_text())["arithmetic_accuracy"]
        rows.append(dict(gate=GATES[0][0], condition="base", measured=a, threshold=GATES[0][1],
                         passed=a >= GATES[0][1]))
    controls = [c for c in conds if is_control(c)]
    best = max((conds[c]["initial_accuracy"] for c in controls), default=None)
    for c, v in conds.items():
        if is_control(c):
            continue
        if best is not None:
            rows.append(dict(gate=GATES[1][0], condition=c, measured=v["initial_accuracy"], threshold=best,
                             passed=v["initial_accuracy"] >= best))
        for (gate, threshold), key in zip(GATES[2:], ("answer_rate", "checks_consistent", "numbers_exact")):
            got = [r[key][0] for r in v["seeds"].values() if r.get(key) and r[key][0] is not None]
            if got:
                m = _mean(got)
                rows.append(dict(gate=gate, condition=c, measured=m, threshold=threshold, passed=m >= threshold))
    return rows


def greedy_results(greedy_dir) -> dict:
    """{condition: {"seeds": {seed: summary}, "accuracy", "n", "ci95"}} from greedy_dir/<condition>_s<seed>.json
    (sft.py eval summaries of each run's final policy), pooled over seeds."""
    out: dict = {}
    for f in sorted(Path(greedy_dir).glob("*.json")):
        try:
            summary = json.loads(f.read_text())
        except json.JSONDecodeError:
            raise ValueError(f"{f}: not a JSON summary of sft.py eval; delete it and rerun the study") from None
        name, seed = run_name(Path(f.stem))
        summary["correct"] = round(summary["accuracy"] * summary["n"])
        out.setdefault(name, {"seeds": {}})["seeds"][str(seed)] = summary
    for v in out.values():
        k, n = sum(s["correct"] for s in v["seeds"].values()), sum(s["n"] for s in v["seeds"].values())
        v.update(accuracy=k / n if n else None, n=n, correct=k, ci95=wilson_interval(k, n))
    return out


def format_gates_table(gates) -> str:
    lines = ["| gate | condition | measured | threshold | passed |", "|---|---|---|---|---|"]
    for g in gates:
        lines.append(f"| {g['gate']} | {g['condition']} | {g['measured']:.3f} | {g['threshold']:.3f} | "
                     f"{'yes' if g['passed'] else '**FAILED**'} |")
    return "\n".join(lines)


def format_greedy_table(greedy) -> str:
    lines = ["| condition | seeds | n | greedy accuracy [95% CI] |", "|---|---|---|---|"]
    for c, v in greedy.items():
        lo, hi = v["ci95"]
        lines.append(f"| {c} | {', '.join(sorted(v['seeds']))} | {v['n']} | {v['accuracy']:.3f} [{lo:.3f}, {hi:.3f}] |")
    return "\n".join(lines)


def report(args, study_results, write_page) -> int:
    """`classify.py report`: study_results(folders) is classify's (its summarize_run per run);
    write_page(path, folders, results) writes view.html (plumbing/view.py), unless --no-view."""
    folders = [Path(p) for p in args.runs]
    missing = [str(p) for p in folders if not p.is_dir()]
    if missing:
        raise FileNotFoundError(f"not a run folder: {', '.join(missing)}; pass ppo.py --out folders")
    results = study_results(folders)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results["figures"] = draw_figures(results, out)
    results["gates"] = study_gates(results, args.gates)
    results["greedy"] = greedy_results(args.greedy) if args.greedy and Path(args.greedy).is_dir() else {}
    write_text_atomic(out / "results.json", json.dumps(results, indent=1) + "\n")
    table = format_results_table(results)
    if results["gates"]:
        table = "## Gates before RL\n\n" + format_gates_table(results["gates"]) + "\n\n## PPO, T = 1\n\n" + table
    if results["greedy"]:
        table += "\n\n## Final policies, greedy, fresh problems\n\n" + format_greedy_table(results["greedy"])
    write_text_atomic(out / "results.md", table + "\n")
    print(table)
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}" + "".join(f", {p}" for p in results["figures"]))
    if not args.no_view:
        try:   # the page is an extra: a run it cannot show (no metrics.jsonl...) leaves the results as they are
            write_page(out / "view.html", folders, results)
            print(f"wrote {out / 'view.html'}")
        except (ValueError, FileNotFoundError, FileExistsError) as e:
            print(f"view.html not written: {e}", file=sys.stderr)
    return 0


def build_report_parser():
    p = argparse.ArgumentParser(
        prog="classify.py report",
        description="Gather PPO run folders into results.json, a markdown table and figures "
                    "(accuracy, behaviors and response length against the PPO step).",
        epilog="example: python classify.py report runs/mini/ppo/*_s* --out runs/mini",
        formatter_class=HelpFormatter)
    p.add_argument("runs", nargs="+", help="ppo.py run folders; a name <condition>_s<seed> groups seeds")
    p.add_argument("--out", required=True, help="folder for results.json, results.md and the PNG figures")
    p.add_argument("--gates", default=None, metavar="DIR",
                   help="folder with base_arithmetic.json (sft.py eval --arithmetic) for the gates table")
    p.add_argument("--greedy", default=None, metavar="DIR",
                   help="folder of <condition>_s<seed>.json (sft.py eval of each final policy): a greedy table")
    p.add_argument("--no-view", action="store_true", help="skip view.html (see classify.py view -h)")
    return p


# -----------------------------------------------------------------------------------------------
# curate.py pretrain: behavior frequencies per set, the paper's Figure 7


def format_frequencies(by_set, behaviors=None):
    """{set name: curate.behavior_frequencies(...)} -> a table, one row per set (the paper's Figure 7
    rows: the input, the selected sets, the rewritten sets): % of items > 0 (mean count)."""
    behaviors = behaviors or next((list(f) for f in by_set.values()), [])
    lines = [f"{'set':<18} {'n':>7} " + " ".join(f"{b:>16}" for b in behaviors)]
    for name, freq in by_set.items():
        n = max(f["n"] + f["missing"] for f in freq.values())
        cells = []
        for b in behaviors:
            f = freq[b]
            cells.append("-" if f["pct_present"] is None else
                         f"{f['pct_present']:.1f}% ({f['mean_count']:.2f})")
        lines.append(f"{name:<18} {n:>7} " + " ".join(f"{c:>16}" for c in cells))
    return "\n".join(lines)


def print_frequencies(freqs, summary, behaviors):
    print("\nbehavior frequencies, % of items with a count > 0 (mean count), cf. the paper's "
          "Figure 7:")
    print(format_frequencies(freqs, behaviors))
    ps = summary.get("problem_solution")
    if ps:
        print(f"problem/solution filter: {ps['both']} of {summary['n_docs']} documents hold both "
              f"({ps['no_problem']} no problem, {ps['no_solution']} no solution, "
              f"{ps['unknown']} unknown)")
