"""classify.py view: the self-contained HTML page of completions with behaviors tinted."""
import json
import random
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

import classify
import countdown
import traces as T
from plumbing import files, view as study_page

# -----------------------------------------------------------------------------------------------
# A small, realistic fake study: ppo.py-like run folders whose completions are countdown.py's
# synthetic traces (so the rules' labels are exact), drifting from long searches at step 0 to short
# guesses later, as the miniature's models did, with some answers made wrong.


def _wrong(tr):
    """The trace with its answer's first number replaced: same text, a wrong (format-only) answer."""
    head, _, ans = tr["completion"].rpartition("<answer>")
    a = str(tr["nums"][0])
    return head + "<answer>" + ans.replace(a, str(int(a) + 1), 1)


def write_fake_run(folder, condition, seed, steps=(0, 10, 20), n=12, text=None):
    """A ppo.py-like run folder: config.json, metrics.jsonl and completions/step_<N>.jsonl.
    text(step, i) -> a completion (or None) overrides row i's trace; row i is the same problem at every step."""
    folder = Path(folder)
    start = T.generate_traces(condition, n, seed=0)
    late = {} if text else {r["id"]: r for r in T.generate_traces(
        "only_backtracking" if condition not in ("empty_cot", "dots") else condition, 4 * n, seed=0)}
    rng = random.Random(f"{condition}:{seed}")
    for k, step in enumerate(steps):
        rows = []
        for i, tr in enumerate(start):
            if k and tr["id"] in late and rng.random() < k / len(steps):
                tr = late[tr["id"]]  # later steps: the shorter search, as RL shortened the miniature's
            comp = tr["completion"] if rng.random() < 0.5 + 0.1 * k else _wrong(tr)
            if text is not None:
                comp = text(step, i) or comp
            s = countdown.score(comp, tr["nums"], tr["target"])
            rows.append(dict(step=step, nums=tr["nums"], target=tr["target"], prompt=tr["query"], completion=comp,
                             score=s, correct=s == 1.0, format_ok=s > 0, length=len(comp.split())))
        files.write_jsonl(folder / "completions" / f"step_{step}.jsonl", rows)
    (folder / "config.json").write_text(json.dumps(dict(steps=max(steps), seed=seed)))
    files.write_jsonl(folder / "metrics.jsonl", [dict(step=s + 1) for s in range(max(steps))])
    return folder


def write_fake_study(root, n=12):
    """runs/<root>/ppo/{all_strategies,no_positive,empty_cot}_s1: three synthetic runs, steps 0, 10, 20."""
    return [write_fake_run(Path(root) / "ppo" / f"{c}_s1", c, 1, n=n)
            for c in ("all_strategies", "no_positive", "empty_cot")]


class Page(HTMLParser):
    """Cards of a page: their data-* attributes, text (tags ours: spans, sups), tinted sentences."""
    VOID = {"meta", "img", "br", "hr", "input", "link"}

    def __init__(self, page):
        super().__init__(convert_charrefs=True)
        self.stack, self.cards, self.tags, self.scripts, self.text_tags = [], [], [], [], []
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if tag == "script":
            self.scripts.append(a)
        if tag == "article":
            self.cards.append(dict(attrs=a, text="", sentences=[], grid=self.inside("div", None, "grid")))
        if tag not in self.VOID:
            self.stack.append((tag, a))
        if self.inside("div", "text") and not (tag == "div" and a.get("class") == "text"):
            self.text_tags.append(tag)
            if tag == "span" and a.get("class") == "s":
                self.cards[-1]["sentences"].append([a["title"].split(", "), ""])

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1][0] == tag, (tag, self.stack[-3:])
        self.stack.pop()

    def inside(self, tag, cls, id=None):
        return any(t == tag and a.get("class") == cls and a.get("id") == id for t, a in self.stack)

    def handle_data(self, data):
        if self.inside("div", "text") and not self.inside("sup", None) and not self.inside("span", "cut"):
            self.cards[-1]["text"] += data
            if self.inside("span", "s"):
                self.cards[-1]["sentences"][-1][1] += data


def _view(args):
    return classify.main(["view", *map(str, args)])


# -----------------------------------------------------------------------------------------------


def test_hostile_completions_render_as_text(tmp_path):
    run = tmp_path / "ppo" / "x_s0"
    hostile = ["<script>alert(1)</script> Let me verify: 3 + 4 = 7.", "</div></article></body><b>bold</b>",
               "a & b &amp; \"double\" 'single' <!-- c --> <![CDATA[x]]>", "bell\x07 nul\x00 esc\x1b[31m del\x7f end",
               "Let me verify this. " * 5000 + "<i>tail</i>"]
    write_fake_run(run, "all_strategies", 0, steps=(0,), n=7,
                   text=lambda step, i: hostile[i] if i < len(hostile) else "\ufffd placeholder")
    # invalid UTF-8 (read with errors="replace") and a lone surrogate (valid JSON, not encodable) in two rows
    path = run / "completions" / "step_0.jsonl"
    lines = path.read_bytes().split(b"\n")
    lines[5] = lines[5].replace("\ufffd placeholder".encode(), b"bad \xff\xfe bytes <u>")
    lines[6] = lines[6].replace("\ufffd placeholder".encode(), b"lone \\ud800 surrogate")
    path.write_bytes(b"\n".join(lines))
    out = tmp_path / "view.html"
    assert _view([run, "--out", out, "--per-step", "10"]) == 0
    page = out.read_text(encoding="utf-8")
    p = Page(page)
    assert p.tags.count("script") == 1 and not p.scripts[0]  # ours, at the end; none from model text
    assert set(p.text_tags) <= {"span", "sup"}                # no tag from model text survives
    for bad in ("b", "i", "u", "div"):
        assert all(t != bad for t in p.text_tags)
    texts = {c["text"] for c in p.cards}
    shown = {"\x07": "\u2407", "\x00": "\u2400", "\x1b": "\u241b", "\x7f": "\u2421"}
    for h in hostile[:4]:
        assert "".join(shown.get(ch, ch) for ch in h) in texts, h
    assert "bad \ufffd\ufffd bytes <u>" in texts and "lone \ufffd surrogate" in texts
    big = [c for c in p.cards if c["text"].startswith("Let me verify this.")]
    assert big and all(len(c["text"]) <= study_page.VIEW_MAX_CHARS for c in big)
    assert "more characters not shown" in page and "completion(s) cut" in page
    assert "http://" not in page.replace("http://www.w3.org", "") and "https://" not in page
    assert "src=\"data:image/png;base64," in page or "No figures" in page


def test_tints_equal_rules_labels_on_synthetic_traces(tmp_path):
    traces = [t for c in ("all_strategies", "no_positive", "backtracking_backward", "backtracking_subgoal")
              for t in T.generate_traces(c, 6, seed=3)]
    # one sentence with two labels (the traces never have one): it must show both
    traces.append(dict(nums=[6, 8, 11], target=25,
                       behaviors=dict(verification=1, backtracking=1, subgoal=0, backward=0),
                       completion="6 * 8 = 48. That gives 48, which is not 25, so let me go back to the start."
                                  "\n</think>\n<answer> 6 + 8 + 11 </answer>"))
    run = tmp_path / "traces_s0"
    write_fake_run(run, "all_strategies", 0, steps=(0,), n=len(traces), text=lambda step, i: traces[i]["completion"])
    rows = files.read_jsonl(run / "completions" / "step_0.jsonl")
    for r, t in zip(rows, traces):  # the fake run has its own problems: put the traces' back
        r.update(nums=t["nums"], target=t["target"])
    files.write_jsonl(run / "completions" / "step_0.jsonl", rows)
    out = tmp_path / "v.html"
    assert _view([run, "--out", out, "--per-step", str(len(traces))]) == 0
    cards = {c["text"]: c for c in Page(out.read_text()).cards}
    assert len(cards) == len(traces)
    for t in traces:
        card = cards[t["completion"]]
        want = [(sorted(b for b in classify.BEHAVIORS if hit[b]), s)
                for s, hit in classify.behavior_sentences(t["completion"], t["nums"], t["target"]) if any(hit.values())]
        assert [(sorted(ls), s) for ls, s in card["sentences"]] == want
        # and against the generator's own counts (the rules are exact on its traces)
        for b in classify.BEHAVIORS:
            assert sum(b in ls for ls, _ in card["sentences"]) == t["behaviors"][b], (b, t["completion"])
    assert any(len(ls) > 1 for c in cards.values() for ls, _ in c["sentences"])  # two labels show both


def test_filter_data_attributes_and_judge_labels(tmp_path):
    runs = write_fake_study(tmp_path, n=8)
    # a judge labelled one run: its counts drive that run's behavior filter
    rows = classify.load_completions(runs[1] / "completions")
    labels = [dict(r, behaviors=dict.fromkeys(classify.BEHAVIORS, 0) | {"subgoal": 2}, judge={"model": "fake-judge"})
              for r in rows]
    files.write_jsonl(runs[1] / "labels" / "labels.jsonl", labels)
    out = tmp_path / "v.html"
    assert _view([tmp_path, "--out", out, "--per-step", "8", "--steps", "10"]) == 0
    page = out.read_text()
    p = Page(page)
    grid = p.cards[-3 * 3 * 8:]  # the compare pairs come first
    assert len(grid) == 72 and {c["attrs"]["data-step"] for c in grid} == {"0", "10", "20"}
    by_text = {}
    for r in runs:
        for row in classify.load_completions(r / "completions"):
            by_text[(r.name, row["step"], row["completion"])] = row
    for c in grid:
        a = c["attrs"]
        row = by_text[(a["data-run"], int(a["data-step"]), c["text"])]
        assert a["data-cond"] == a["data-run"][:-3]
        assert a["data-correct"] == str(int(countdown.is_correct(row["completion"], row["nums"], row["target"])))
        if a["data-run"] == "no_positive_s1":
            assert a["data-behaviors"] == "subgoal"
        else:
            counts = classify.count_behaviors_rules(row["completion"], row["nums"], row["target"])
            assert a["data-behaviors"] == " ".join(b for b in classify.BEHAVIORS if counts[b] > 0)
    assert {c["attrs"]["data-correct"] for c in grid} == {"0", "1"}
    for v in ("all_strategies", "empty_cot", "no_positive", "10", "none", "backtracking"):
        assert f'<option value="{v}">' in page
    assert "fake-judge" in page
    # with scripts off the page is the file as written: every card shows, the filters (script-driven) hide
    assert '<form id="filters" hidden>' in page and not any("hidden" in c["attrs"] for c in p.cards)


def test_size_bound_and_sampling(tmp_path, monkeypatch):
    # 10 runs x 3 steps x 20 completions of heavy markup: tagged sentences of & < " (6 bytes of HTML per
    # character: uncut, the page would be ~6 MB). Few sentences, as the rules take ~1 ms per sentence.
    text = ("Verify " + '"<&>' * 15 + ". ") * 20 + "</think>\n<answer> 1 + 2 </answer>"
    runs = [write_fake_run(tmp_path / f"c{k}_s0", "empty_cot", 0, n=20, text=lambda s, i: text) for k in range(10)]
    out = tmp_path / "v.html"
    assert _view([*runs, "--out", out, "--per-step", "20", "--steps", "10"]) == 0
    size = out.stat().st_size
    print(f"10 runs x 3 steps x 20 completions of {len(text)} chars: {size / 1e6:.2f} MB")
    assert size < 5e6
    p = Page(out.read_text())
    assert len(p.cards) == 600 + 2 * 3
    # a larger request is sampled and the page says so
    monkeypatch.setattr(study_page, "VIEW_MAX_CARDS", 30)
    assert _view([*runs[:3], "--out", out, "--per-step", "20", "--steps", "10"]) == 0
    page = out.read_text()
    assert "Sampled: 180 completions asked for, 27 shown" in page
    assert len(Page(page).cards) == 27 + 2 * 3


def test_missing_or_half_written_run_gives_a_clear_error(tmp_path, capsys):
    run = write_fake_run(tmp_path / "a_s0", "all_strategies", 0, n=4)
    out = tmp_path / "v.html"
    (run / "metrics.jsonl").rename(run / "metrics.bak")
    assert _view([run, "--out", out]) == 2
    err = capsys.readouterr().err
    assert f"{run}: no metrics.jsonl" in err and "resume" in err and "Traceback" not in err
    (run / "metrics.bak").rename(run / "metrics.jsonl")
    f = run / "completions" / "step_20.jsonl"
    f.write_bytes(f.read_bytes()[:-40])   # a cut last line
    assert _view([run, "--out", out]) == 2
    err = capsys.readouterr().err
    assert f"{f}: its last line is cut off" in err and "delete the file" in err
    f.unlink()
    with open(run / "metrics.jsonl", "a") as m:
        m.write('{"step": 2')
    assert _view([run, "--out", out]) == 2
    assert "metrics.jsonl: its last line is cut off" in capsys.readouterr().err
    assert _view([tmp_path / "nope", "--out", out]) == 2
    assert "nope: no such folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert _view([tmp_path / "empty", "--out", out]) == 2
    assert "empty: no metrics.jsonl" in capsys.readouterr().err
    assert not out.exists()
    # a file this command did not write is kept
    out.write_text("my notes")
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    assert _view([run, "--out", out]) == 2
    assert "was not written by classify.py view" in capsys.readouterr().err and out.read_text() == "my notes"
    assert _view([run, "--out", out, "--force"]) == 0 and _view([run, "--out", out]) == 0


def test_report_writes_view_beside_results(tmp_path):
    runs = write_fake_study(tmp_path, n=4)
    assert classify.main(["report", *map(str, runs), "--out", str(tmp_path / "r")]) == 0
    page = (tmp_path / "r" / "view.html").read_text()
    assert "<table>" in page and "all_strategies" in page and len(Page(page).cards) == 3 * 2 * 4 + 2 * 3
    assert classify.main(["report", *map(str, runs), "--out", str(tmp_path / "r2"), "--no-view"]) == 0
    assert (tmp_path / "r2" / "results.md").exists() and not (tmp_path / "r2" / "view.html").exists()


def _browser():
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_page_in_headless_chromium(tmp_path):
    browser = _browser()
    if browser is None:
        pytest.skip("no chromium on PATH (Debian: apt-get install chromium); the browser check is skipped")
    run = write_fake_run(tmp_path / "all_strategies_s1", "all_strategies", 1, n=4,
                         text=lambda s, i: "<script>document.title='owned'</script> Let me verify: 1 + 1 = 2."
                         if i == 0 else None)
    rows = files.read_jsonl(run / "completions" / "step_0.jsonl")
    out = tmp_path / "v.html"
    assert _view([run, "--out", out]) == 0
    # the filters, set from the address (view.html#correct=1&behavior=verification), hide the other cards
    p = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom",
                        out.as_uri() + "#correct=1&behavior=verification"], capture_output=True, text=True, timeout=120)
    dom = p.stdout
    assert "</html>" in dom, p.stderr[-2000:]
    page = Page(dom)
    assert "<title>What the models wrote</title>" in dom                     # no model script ran
    assert '<form id="filters">' in dom                                       # ours ran: its hash is allowed
    assert any(c["text"].startswith("<script>document.title='owned'</script> Let me verify") for c in page.cards)
    assert any(rows[1]["completion"] == c["text"] for c in page.cards)
    assert "all_strategies_s1 · step 20" in dom
    grid = [c for c in page.cards if c["grid"]]
    want = [c["attrs"]["data-correct"] == "1" and "verification" in c["attrs"]["data-behaviors"].split() for c in grid]
    assert len(grid) == 8 and 0 < sum(want) < 8
    assert ["hidden" not in c["attrs"] for c in grid] == want
    assert f"{sum(want)} shown" in dom
