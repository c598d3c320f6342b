"""The study page: what the models wrote, behaviors highlighted (`classify.py view`, and report's view.html).

Plumbing for classify.py. `classify.py view RUN... --out view.html` (and `report`, beside results.md)
writes one HTML file that opens offline: the results table, the figures as data: URIs, and per run and
validation step a seeded sample of completions, each sentence tinted by the rules' labels
(classify.behavior_sentences). An LLM judge counts whole completions, not sentences: where
labels/labels.jsonl exists its counts are shown beside the tints and drive the behavior filter, as they
drive the report. Model text is untrusted: every string is escaped, control characters are shown as
symbols, and a Content-Security-Policy lets only our own script (by its hash) run and nothing load. The
size is bounded: at most VIEW_MAX_CARDS completions, each card at most VIEW_CARD_BYTES (long texts are
cut, with a marker), figures at most VIEW_FIGURE_BYTES. What the page needs from classify.py and
countdown.py comes in a `Reader` (nothing here imports a core file).
"""

import argparse
import base64
import hashlib
import html
import json
import random
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from plumbing.files import read_jsonl, write_text_atomic
from plumbing.judge_http import HelpFormatter
from plumbing.report import draw_figures, format_results_table, labels_of, load_completions, run_name


@dataclass(frozen=True)
class Reader:
    """What the page takes from the core files, handed in by classify.py."""
    behaviors: tuple          # the four names, in order
    rules_version: str        # classify.RULES_VERSION
    sentences: Callable       # (text, nums, target) -> [(sentence, {behavior: shown?})]: the rules per sentence
    count: Callable           # (text, nums, target) -> {behavior: count}: the rules per completion
    correct: Callable         # row -> bool: ppo.py's judgment where it wrote one, else the reward's
    score: Callable           # (text, nums, target) -> reward (countdown.score)
    answer: Callable          # text -> its last <answer> or None
    study_results: Callable   # run folders -> results (classify.study_results)


VIEW_MAX_CARDS = 600            # 10 runs x 3 steps x 20 completions
VIEW_CARD_BYTES = 6000          # 600 cards + 3 figures stay under 5 MB
VIEW_MAX_CHARS = 2500           # characters of one completion shown before the byte check
VIEW_LABEL_CHARS = 20_000       # characters of one completion the rules tint
VIEW_FIGURE_BYTES = 600_000     # all PNGs together, before base64 (x 4/3)
_VIEW_MARK = "<!-- written by classify.py view -->"
_TINT = {"verification": "#9fd3ff", "backtracking": "#ffb0b0", "subgoal": "#b5e3a0", "backward": "#dcb8ff"}
_ABBR = {"verification": "verif", "backtracking": "backtr", "subgoal": "subgoal", "backward": "backward"}
_UNSHOWN = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")  # all but \t \n; lone surrogates
_COMPLETIONS_FIX = ("it was not written to the end; resume the run with the same ppo.py command, or delete "
                    "the file to leave that step out")
_VIEW_SCRIPT = """const f=document.getElementById('filters');f.hidden=false;
f.onchange=()=>{const v=k=>f.elements[k].value;let n=0;
for(const c of document.querySelectorAll('#grid .card')){const d=c.dataset,b=v('behavior'),
ok=(!v('cond')||d.cond==v('cond'))&&(!v('step')||d.step==v('step'))&&(!v('correct')||d.correct==v('correct'))
&&(!b||(b=='none'?d.behaviors=='':d.behaviors.split(' ').includes(b)));c.hidden=!ok;n+=ok}
for(const g of document.querySelectorAll('#grid section'))g.hidden=!g.querySelector('.card:not([hidden])');
document.getElementById('shown').textContent=n+' shown';};
for(const[k,v]of new URLSearchParams(location.hash.slice(1)))if(f.elements[k])f.elements[k].value=v;f.onchange();"""
_VIEW_CSS = """body{font:14px/1.4 system-ui,sans-serif;margin:1em auto;max-width:1250px;padding:0 1em}
table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ccc;padding:2px 5px}
figure{display:inline-block;margin:4px}img{max-width:100%;max-height:230px}.note{background:#fff6d5;padding:4px 8px}
.card{border:1px solid #bbb;border-radius:4px;margin:6px 0;padding:4px 8px}.card.ok{border-left:5px solid #2a2}
.card.bad{border-left:5px solid #c33}.meta{margin:2px 0;font-size:12px;color:#333}
.text{white-space:pre-wrap;overflow-wrap:anywhere;font:12px/1.5 ui-monospace,monospace}
.s{border-radius:3px}sup{font-size:9px;color:#444}.cut{background:#eee;font-weight:bold}
.pair{display:grid;grid-template-columns:1fr 1fr;gap:8px}.chip{padding:1px 6px;border-radius:3px}
[hidden]{display:none!important}"""


def _shown(x) -> str:
    """x as escaped HTML text: control characters become visible symbols (U+2400...), never markup."""
    def sym(m):
        c = ord(m.group())
        return chr(0x2400 + c) if c < 0x20 else "\u2421" if c == 0x7F else "\ufffd"
    return html.escape(_UNSHOWN.sub(sym, str(x)), quote=True)


def _tinted(pieces, limit):
    """(HTML of [(gap, sentence, labels)], characters cut): a span per labelled sentence, cut at limit."""
    out, used, total = [], 0, sum(len(g) + len(s) for g, s, _ in pieces)
    for gap, sentence, labels in pieces:
        if used + len(gap) + len(sentence) > limit:
            keep = max(0, limit - used - len(gap))
            gap, sentence = gap[:limit - used], sentence[:keep]
        out.append(_shown(gap))
        used += len(gap) + len(sentence)
        if sentence and labels:
            stops = ",".join(f"{_TINT[b]} {100 * i // len(labels)}% {100 * (i + 1) // len(labels)}%"
                             for i, b in enumerate(labels))
            out.append(f'<span class="s" style="background:linear-gradient({stops})" title="{", ".join(labels)}">'
                       f'{_shown(sentence)}<sup>{"+".join(_ABBR[b] for b in labels)}</sup></span>')
        else:
            out.append(_shown(sentence))
        if used >= limit:
            break
    return "".join(out), total - used


def _view_card(row, run, reader):
    """One completion as an <article>, at most VIEW_CARD_BYTES: the problem, the tinted text, the answer,
    score, correct or not, length; data-* attributes for the filters. Returns (html, characters cut)."""
    text, nums, target = str(row["completion"]), row["nums"], row["target"]
    # The rules read sentence by sentence, so a prefix labels its whole sentences as the full text does
    # (its last one may be cut: that one is left untinted); a 100 KB completion then costs ~0.2 s, not 1 s.
    long = len(text) > VIEW_LABEL_CHARS
    sentences = reader.sentences(text[:VIEW_LABEL_CHARS], nums, target)[:-1 if long else None]
    pieces, pos = [], 0
    for sentence, hit in sentences:
        start = text.find(sentence, pos)  # the split drops only the separators between sentences
        pieces.append((text[pos:start], sentence, [b for b in reader.behaviors if hit[b]]))
        pos = start + len(sentence)
    pieces.append((text[pos:], "", []))
    label = run["labels"].get((row["step"], json.dumps(row["nums"]), row["target"], row["completion"]))
    counts = (label["behaviors"] if label else reader.count(text, nums, target) if long
              else {b: sum(b in ls for _, _, ls in pieces) for b in reader.behaviors})
    judge = (label.get("judge") or {}).get("model", "judge") if label else "rules"
    correct = reader.correct(row)
    score = row["score"] if "score" in row else reader.score(text, nums, target)
    answer = reader.answer(text)
    length = f"{row['length']} tokens, " if "length" in row else ""
    attrs = dict(run=run["name"], cond=run["cond"], step=row["step"], correct=int(correct),
                 behaviors=" ".join(b for b in reader.behaviors if (counts.get(b) or 0) > 0))
    head = (f'<article class="card {"ok" if correct else "bad"}" '
            + " ".join(f'data-{k}="{_shown(v)}"' for k, v in attrs.items()) + ">\n"
            f'<p class="meta"><b>{_shown(nums)} &rarr; {_shown(target)}</b> · {_shown(run["name"])} · step '
            f'{_shown(row["step"])} · <b>{"correct" if correct else "wrong"}</b> · score {_shown(score)} · '
            f'{_shown(length)}{len(text):,} chars</p>\n<p class="meta">answer: <code>'
            + ("(none)" if answer is None else _shown(answer.strip()[:120]) + ("…" if len(answer) > 122 else ""))
            + f"</code> · counts ({_shown(judge)}): "
            + ", ".join(f"{_ABBR[b]} {_shown(counts.get(b))}" for b in reader.behaviors) + "</p>\n")
    limit = VIEW_MAX_CHARS
    while True:
        body, cut = _tinted(pieces, limit)
        card = (head + f'<div class="text">{body}'
                + (f'<span class="cut"> ✂ {cut:,} more characters not shown</span>' if cut else "")
                + "</div></article>\n")
        size = len(card.encode("utf-8"))
        if size <= VIEW_CARD_BYTES or limit == 0:
            return card, cut
        limit = int(limit * VIEW_CARD_BYTES / size * 0.9)


def _view_folders(paths) -> list:
    """Run folders from RUN arguments: a ppo.py run folder, or a study folder holding them (one or two
    levels down, as run_all.sh's runs/<mode>/ppo/<name>/)."""
    out = []
    for p in map(Path, paths):
        if not p.is_dir():
            raise FileNotFoundError(f"{p}: no such folder; pass ppo.py --out run folders or a study folder "
                                    "holding them")
        if (p / "completions").is_dir() or (p / "metrics.jsonl").exists():
            out.append(p)
        else:
            found = {c.parent for pat in ("*/completions", "*/*/completions") for c in p.glob(pat)}
            out.extend(sorted(found) or [p])
    return sorted(set(out))


def _view_run(folder) -> dict:
    """One ppo.py run folder, checked: its completions per validation step, judge labels and progress."""
    folder = Path(folder)
    if not (folder / "metrics.jsonl").is_file():
        raise ValueError(f"{folder}: no metrics.jsonl, so it is not a ppo.py run folder or its run stopped "
                         "before the first step; pass ppo.py --out folders (or a study folder holding them), "
                         "or resume that run with the same ppo.py command")
    files = {int(f.stem[5:]): f for f in (folder / "completions").glob("step_*.jsonl") if f.stem[5:].isdigit()}
    if not files:
        raise ValueError(f"{folder}: no completions/step_<N>.jsonl; ppo.py writes one per validation, so "
                         "wait for the first validation or pass another run")
    metrics = read_jsonl(folder / "metrics.jsonl", errors="replace", torn_fix=(
        "the run was interrupted mid-write; resume it with the same ppo.py command, or delete that line"))
    try:
        cfg = json.loads((folder / "config.json").read_text(errors="replace"))
    except (OSError, ValueError):
        cfg = {}
    name, seed = run_name(folder)
    steps = {s: load_completions(files[s], torn_fix=_COMPLETIONS_FIX) for s in sorted(files)}
    return dict(folder=folder, name=folder.name, cond=name, seed=seed, steps=steps, labels=labels_of(folder),
                trained=max((r.get("step") or 0 for r in metrics), default=0), planned=cfg.get("steps"))


def _md_table(md) -> str:
    """The report's markdown table as an HTML table."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in md.splitlines()
            if line.strip() and not set(line) <= set("|-: ")]
    return "<table>" + "".join("<tr>" + "".join(f"<{t}>{_shown(c)}</{t}>" for c in r) + "</tr>"
                               for t, r in zip(["th"] + ["td"] * len(rows), rows)) + "</table>"


def build_view(folders, reader, per_step=5, seed=0, steps=(), compare="", results=None, figures=None) -> str:
    """The HTML page for ppo.py run folders (see the module's docstring), with what the core files say
    about each completion from reader; results and figures (PNG paths) as report made them, else
    computed and drawn here."""
    if per_step < 1:
        raise ValueError(f"--per-step must be >= 1, got {per_step}")
    runs = [_view_run(f) for f in folders]
    missing = sorted(set(steps) - {s for r in runs for s in r["steps"]})
    if missing:
        have = sorted({s for r in runs for s in r["steps"]})
        raise ValueError(f"--steps {' '.join(map(str, missing))}: no run validated there; their steps: "
                         f"{', '.join(map(str, have))}")
    if compare and compare not in [r["name"] for r in runs]:
        raise ValueError(f"--compare {compare}: no such run; choose one of {', '.join(r['name'] for r in runs)}")
    if results is None:
        results = reader.study_results(folders)
    notes = []
    if figures is None:
        with tempfile.TemporaryDirectory() as tmp:
            figures = [(Path(p).name, Path(p).read_bytes()) for p in draw_figures(results, tmp)]
    else:
        figures = [(Path(p).name, Path(p).read_bytes() if Path(p).is_file() else b"") for p in figures]
    groups = [(r, s) for r in runs for s in sorted({min(r["steps"]), max(r["steps"])} | set(steps) & set(r["steps"]))]
    asked = sum(min(per_step, len(r["steps"][s])) for r, s in groups)
    n_each = min(per_step, max(1, VIEW_MAX_CARDS // len(groups)))
    if len(groups) > VIEW_MAX_CARDS:
        groups = [groups[i] for i in sorted(random.Random(seed).sample(range(len(groups)), VIEW_MAX_CARDS))]
    cards, n_cut, shown = [], 0, 0
    picked = {}
    for r, s in groups:
        rows = r["steps"][s]
        # one seed per run, not per step: the same problems (same places in the test set) at every step
        idx = sorted(random.Random(f"{seed}:{r['name']}").sample(range(len(rows)), min(n_each, len(rows))))
        picked[(r["name"], s)] = [rows[i] for i in idx]
        n_ok = sum(map(reader.correct, rows))
        cards.append(f'<section><h3>{_shown(r["name"])} · step {s} <small>({n_ok} of {len(rows)} correct; '
                     f"{len(idx)} shown)</small></h3>\n")
        for i in idx:
            card, cut = _view_card(rows[i], r, reader)
            cards.append(card)
            n_cut, shown = n_cut + bool(cut), shown + 1
        cards.append("</section>\n")
    if shown < asked:
        notes.append(f"Sampled: {asked:,} completions asked for, {shown:,} shown (at most {VIEW_MAX_CARDS} "
                     "per page, to keep it under 5 MB).")
    # side by side: the same problems at the first and the last validation step of one run
    run = next(r for r in runs if r["name"] == (compare or runs[0]["name"]))
    first, last = min(run["steps"]), max(run["steps"])
    pairs = []
    for a in picked.get((run["name"], first), [])[:3] if last != first else []:
        b = next((x for x in run["steps"][last] if (x["nums"], x["target"]) == (a["nums"], a["target"])), None)
        if b is not None:
            (ca, xa), (cb, xb) = _view_card(a, run, reader), _view_card(b, run, reader)
            pairs.append(f'<div class="pair">{ca}{cb}</div>\n')
            n_cut += bool(xa) + bool(xb)
    if n_cut:
        notes.append(f"{n_cut} completion(s) cut (marked ✂) to keep each under {VIEW_CARD_BYTES:,} bytes of HTML.")
    figs, budget = [], VIEW_FIGURE_BYTES
    for name, data in figures:
        if 0 < len(data) <= budget:
            budget -= len(data)
            figs.append(f'<figure><img alt="{_shown(name)}" src="data:image/png;base64,'
                        f'{base64.b64encode(data).decode()}"><figcaption>{_shown(name)}</figcaption></figure>')
        else:
            notes.append(f"Figure {name} left out (missing, or past {VIEW_FIGURE_BYTES:,} bytes of figures).")
    if not figures:
        notes.append("No figures: matplotlib is not installed (pip install matplotlib).")
    legend = " ".join(f'<span class="chip" style="background:{_TINT[b]}">{b} <sup>{_ABBR[b]}</sup></span>'
                      for b in reader.behaviors)

    def option(v, t):
        return f'<option value="{_shown(v)}">{_shown(t)}</option>'
    conds = sorted({r["cond"] for r in runs})
    all_steps = sorted({s for _, s in groups})
    form = (f'<form id="filters" hidden>Show: <select name="cond">{option("", "every condition")}'
            + "".join(option(c, c) for c in conds) + f'</select> <select name="step">{option("", "every step")}'
            + "".join(option(s, f"step {s}") for s in all_steps)
            + f'</select> <select name="correct">{option("", "correct and wrong")}{option(1, "correct")}'
            f'{option(0, "wrong")}</select> <select name="behavior">{option("", "any behaviors")}'
            + "".join(option(b, f"with {b}") for b in reader.behaviors) + option("none", "with none")
            + '</select> <span id="shown"></span></form>')
    runs_list = "".join(
        f"<li>{_shown(r['name'])}: trained to step {_shown(r['trained'])}"
        + (f" of {_shown(r['planned'])}" if r["planned"] else "")
        + f"; validated at steps {_shown(', '.join(map(str, sorted(r['steps']))))}; behavior counts from "
        + ("labels/labels.jsonl (a judge)" if r["labels"] else "the rules") + "</li>" for r in runs)
    script_hash = base64.b64encode(hashlib.sha256(_VIEW_SCRIPT.encode()).digest()).decode()
    csp = f"default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'sha256-{script_hash}'"
    return "".join([
        f'<!DOCTYPE html>\n{_VIEW_MARK}\n<html lang="en"><head><meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{csp}">\n'
        f"<title>What the models wrote</title><style>{_VIEW_CSS}</style></head><body>\n"
        f"<h1>What the models wrote</h1>\n<p>{len(runs)} run(s); {n_each} completion(s) per run and step, "
        f"seed {seed}. Written by <code>classify.py view</code>; it loads nothing from the network.</p>\n",
        "".join(f'<p class="note">{_shown(n)}</p>\n' for n in notes),
        f"<h2>Results</h2>\n{_md_table(format_results_table(results))}\n{''.join(figs)}\n<ul>{runs_list}</ul>\n",
        f"<h2>Legend</h2>\n<p>{legend}</p>\n<p>Tints: the rules' label of each sentence (<code>behavior_sentences"
        f"</code>, {reader.rules_version}); a sentence with two labels shows both colours and both tags. Counts and "
        "the behavior filter: a judge's labels/labels.jsonl where the run has one, else the rules.</p>\n",
        f"<h2>Step {first} and step {last}, same problems: {_shown(run['name'])}</h2>\n"
        + ("".join(pairs) or "<p>(one validation step only, or no problem in both)</p>\n"),
        f"<h2>Completions</h2>\n{form}\n<div id=\"grid\">\n{''.join(cards)}</div>\n",
        f"<script>{_VIEW_SCRIPT}</script>\n</body></html>\n"])


def write_view(out, page, force=False):
    """Write the page atomically; an existing file that this command did not write is kept unless force."""
    out = Path(out)
    if out.exists() and not force:
        with open(out, encoding="utf-8", errors="replace") as f:
            if _VIEW_MARK not in f.read(200):
                raise FileExistsError(f"{out} exists and was not written by classify.py view; choose another "
                                      "--out or pass --force to replace it")
    write_text_atomic(out, page)


def view(args, reader) -> int:
    folders = _view_folders(args.runs)
    page = build_view(folders, reader, args.per_step, args.seed, args.steps, args.compare)
    write_view(args.out, page, args.force)
    print(f"wrote {args.out} ({len(page.encode()) / 1e6:.2f} MB, {len(folders)} run(s))")
    return 0


def build_view_parser():
    p = argparse.ArgumentParser(
        prog="classify.py view",
        description="One self-contained HTML page of what the models wrote: results, figures, and a seeded "
                    "sample of completions per run and validation step with each sentence tinted by its "
                    "behavior, filters that work offline.",
        epilog="example: python classify.py view runs/mini --out runs/mini/view.html --steps 50",
        formatter_class=HelpFormatter)
    p.add_argument("runs", nargs="+", help="ppo.py run folders, or a study folder holding them")
    p.add_argument("--out", default="view.html", help="the HTML file to write")
    p.add_argument("--per-step", type=int, default=5, help="completions shown per run and validation step")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample (the same problems at every step)")
    p.add_argument("--steps", type=int, nargs="*", default=[],
                   help="validation steps to show besides each run's first and last")
    p.add_argument("--compare", default="", help="run (folder name) whose first and last step are shown "
                                                 "side by side (default: the first run)")
    p.add_argument("--force", action="store_true", help="replace an --out file this command did not write")
    p.epilog += "; open view.html#correct=0&behavior=backtracking to start with those filters set"
    return p


