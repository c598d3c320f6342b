"""curate.py: priming data through the fake judge, the controls, and pretraining curation
(truncation, labelling, selection under a token budget, rewriting, SFT format)."""
import ast
import json
import random
import re
import sys
from pathlib import Path

import pytest

import classify   # the project root is on sys.path (conftest), and tests/ too (pytest)
import countdown
import traces
import curate
from conftest import lock_held_elsewhere
from fake_judge import FakeJudge, client_flags
from plumbing import documents, files

KEY = "sk-FAKE-curate-0123456789"
FAST = client_flags(timeout=2, max_retries=2)


def all_output_text(folder):
    return "".join(p.read_text(errors="replace") for p in Path(folder).rglob("*") if p.is_file())


def problem_text(p):
    return f"Using the numbers {p['nums']}, create an equation that equals {p['target']}."


# --- (a) priming ---------------------------------------------------------------------------------

def priming_responder(prompt, system):
    m = re.search(r"Using the numbers (\[[^\]]*\]), create an equation that equals (\d+)\.", prompt)
    nums, target = ast.literal_eval(m.group(1)), int(m.group(2))
    expr = countdown.solve(nums, target)
    if target % 7 == 0:  # some answers are wrong, as Claude's were
        expr = " + ".join(map(str, nums))
    return (f"<think>\nLet me try {expr}. 12 is not {target}, let's try something else.\n</think>\n"
            f"<answer> {expr} </answer>")


@pytest.mark.parametrize("api", ["anthropic", "openai"])
def test_priming_writes_sft_examples_and_tops_up_failures(api, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FAKE_KEY", KEY)
    n, seed = 12, 5
    stream = countdown.generate_problems(30, distribution="priming", seed=seed)
    with FakeJudge(priming_responder, api_key=KEY) as fj:
        fj.add_fault("status", match=problem_text(stream[2]), status=500, times=100)  # never answers
        bad = problem_text(stream[4])
        fj.add_fault("malformed", match=bad)                                            # recovers
        orig = fj.responder
        fj.responder = lambda p, s: ("Sure! Here is my answer: 42" if problem_text(stream[7]) in p
                                     else orig(p, s))                                   # no <think>
        args = ["priming", "--condition", "backtracking_verification", "--n", str(n), "--seed", str(seed),
                "--out", str(tmp_path / "p"), "--judge", api, "--base-url", fj.url, "--api-key-env",
                "FAKE_KEY"] + FAST
        assert curate.main(args) == 0
        log = list(fj.log)
        fj.log.clear()
        assert curate.main(args) == 0  # rerun: only the never-answering problem is asked again
        rerun = list(fj.log)
    rows = files.read_jsonl(tmp_path / "p" / "backtracking_verification.jsonl")
    # problems 2 and 7 fail; the stream continues with problems 12 and 13
    want = [p for i, p in enumerate(stream[:14]) if i not in (2, 7)]
    assert [(r["nums"], r["target"], r["id"]) for r in rows] == [(p["nums"], p["target"], p["id"]) for p in want]
    for r in rows:
        assert r["query"] == countdown.make_prompt(r["nums"], r["target"])  # exactly the RL prompt
        text = priming_responder(countdown.make_query(r["nums"], r["target"]), None)
        assert "<think>" + r["completion"] == text and r["condition"] == "backtracking_verification"
        assert r["score"] == countdown.score(r["completion"], r["nums"], r["target"])
    assert {r["score"] for r in rows} == {1.0, 0.1}
    rejects = files.read_jsonl(tmp_path / "p" / "backtracking_verification.rejects.jsonl")
    assert {r["id"]: r["reason"] for r in rejects}.keys() == {2, 7}
    assert "HTTP 500" in [r for r in rejects if r["id"] == 2][0]["reason"]
    assert "does not start with <think>" in [r for r in rejects if r["id"] == 7][0]["reason"]
    # what the server saw: the condition's system prompt, the raw query, the paper's settings
    first = next(e for e in log if e["prompt"] == countdown.make_query(stream[0]["nums"], stream[0]["target"]))
    assert first["system"] == curate.PRIMING_SYSTEM_PROMPTS["backtracking_verification"]
    assert first["body"]["temperature"] == 0.5 and first["body"]["max_tokens"] == 1024
    assert sum(1 for e in log if e["prompt"] == countdown.make_query(stream[2]["nums"], stream[2]["target"])) == 3
    assert sum(1 for e in log if bad in e["prompt"]) == 2
    assert len(log) == 14 + 2 + 1  # 14 problems, 2 retries of #2, 1 retry of #4
    assert len(rerun) == 3 and all(problem_text(stream[2]) in e["prompt"] for e in rerun)
    out = capsys.readouterr()
    assert "12/12 examples" in out.out and "accuracy" in out.out
    assert KEY not in out.out + out.err + all_output_text(tmp_path)


def test_priming_prompts_cover_the_llm_conditions():
    llm = set(traces.CONDITIONS) - set(curate.DERIVED) - set(traces.RESTART_CONDITIONS)  # restart: synthetic only
    assert set(curate.PRIMING_CONDITIONS) == llm
    for c, p in curate.PRIMING_SYSTEM_PROMPTS.items():
        assert "<think>" in p and "<answer>" in p and "target" in p
    forbid = {"only_backtracking": ["subgoals", "backwards", "verify"],
              "backtracking_verification": ["subgoals", "backwards"],
              "backtracking_backward": ["subgoals", "verify"],
              "backtracking_subgoal": ["backwards", "verify"],
              "negative_control": ["backtrack", "backwards", "verify"]}
    for c, words in forbid.items():
        rules = [line for line in curate.PRIMING_SYSTEM_PROMPTS[c].splitlines() if "Do not" in line or "not " in line]
        for w in words:
            assert any(w in line for line in rules), (c, w)


def test_priming_unknown_condition_is_a_clear_error(tmp_path, capsys):
    assert curate.main(["priming", "--condition", "dots", "--out", str(tmp_path)]) == 2
    assert "unknown condition" in capsys.readouterr().err


# --- controls ------------------------------------------------------------------------------------

def word_tokenizer_json(path, texts):
    """A tiny word-level tokenizer.json with no special tokens added on encode."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    tk = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()  # words and punctuation runs
    tk.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
    tk.save(str(path))
    return path


def test_controls_match_countdown_reference_and_hand_counts(tmp_path):
    src = traces.generate_traces("all_strategies", 40, seed=2)
    assert [r["completion"] for r in curate.empty_cot(src)] == \
        [r["completion"] for r in traces.generate_traces("empty_cot", 40, seed=2)]
    d, dropped = curate.dots(src)
    assert dropped == 0 and [r["completion"] for r in d] == \
        [r["completion"] for r in traces.generate_traces("dots", 40, seed=2)]
    tok = curate.load_tokenizer(word_tokenizer_json(tmp_path / "tokenizer.json", [r["completion"] for r in src]))
    d_tok, _ = curate.dots(src, tok)
    assert [r["completion"] for r in d_tok] == \
        [r["completion"] for r in traces.generate_traces("dots", 40, seed=2, tokenizer=tok)]
    assert [r["query"] for r in d] == [r["query"] for r in src]  # queries unchanged
    # by hand: 7 words (12 + 2 = 14. Then 12*2=24.) -> exactly 7 " ." (the original wrote N - 1);
    # only the first think/answer pair is kept
    row = dict(query=countdown.make_prompt([12, 2], 24), completion="\n12 + 2 = 14. Then 12*2=24.\n</think>\n"
               "<answer> 12 * 2 </answer> extra <think>x</think><answer>9</answer>", nums=[12, 2], target=24)
    assert curate.dots([row])[0][0]["completion"] == " . . . . . . .</think>\n<answer> 12 * 2 </answer>"
    # the Whitespace pre-tokenizer splits \w+ and punctuation runs: 12 + 2 = 14 . Then 12 * 2 = 24 .
    assert traces.count_tokens("\n12 + 2 = 14. Then 12*2=24.\n", tok) == 13
    assert (curate.empty_cot([row])[0]["completion"]
            == " </think>\n<answer> 12 * 2 </answer> extra <think> </think><answer>9</answer>")
    # an answer-less item is dropped from dots; a query in the paper's old format also works
    assert curate.dots([dict(row, completion="no tags")]) == ([], 1)
    old = dict(query=countdown.make_query([12, 2], 24), completion="<think>a b</think>\n<answer>12*2</answer>")
    assert curate.dots([old])[0][0]["completion"] == "<think> . .</think>\n<answer>12*2</answer>"


def test_no_positive_keeps_every_answer_below_full_score(tmp_path, capsys):
    q = countdown.make_prompt([3, 5, 2], 16)
    rows = [dict(query=q, nums=[3, 5, 2], target=16, completion=c, condition="all_strategies") for c in [
        " ok </think>\n<answer> (3 + 5) * 2 </answer>",   # 1.0: dropped
        " hm </think>\n<answer> 3 + 5 + 2 </answer>",     # 0.1, parsable but wrong: kept (D-SFT-4)
        " hm </think>\n<answer> 3 * 5 </answer>",         # 0.1, misses a number: kept
        " hm </think>\nno answer at all",                  # 0.0: kept
    ]]
    kept = curate.no_positive(rows)
    assert [r["completion"] for r in kept] == [r["completion"] for r in rows[1:]]
    assert curate.no_positive(traces.generate_traces("all_strategies", 30, seed=1)) == []
    assert len(curate.no_positive(traces.generate_traces("no_positive", 30, seed=1))) == 30
    files.write_jsonl(tmp_path / "in.jsonl", rows)
    args = ["controls", "--input", str(tmp_path / "in.jsonl"), "--kind", "no_positive",
            "--out", str(tmp_path / "np.jsonl")]
    assert curate.main(args) == 0
    out = files.read_jsonl(tmp_path / "np.jsonl")
    assert len(out) == 3 and {r["condition"] for r in out} == {"no_positive"}
    assert curate.main(args) == 2 and "exists" in capsys.readouterr().err  # never silently overwritten
    assert curate.main(args + ["--overwrite"]) == 0
    with pytest.raises(ValueError, match="nums and target"):
        curate.no_positive([dict(query=q, completion="x")])


# --- (b) pretraining -----------------------------------------------------------------------------

def test_truncate_by_chars_and_tokens(tmp_path):
    doc = "line one\nline two is longer\nline three\n" * 5
    cut, was = curate.truncate_document(doc, max_chars=30)
    assert was and cut == "line one\nline two is longer" and doc.startswith(cut)
    assert curate.truncate_document(doc, max_chars=10_000) == (doc, False)
    assert curate.truncate_document("x" * 50, max_chars=20) == ("x" * 20, True)  # no newline: plain cut
    # a byte-level BPE round-trips text, so the cut can be checked against the document itself
    from conftest import make_tokenizer
    tok = make_tokenizer().tk
    ends = [i for i, c in enumerate(doc) if c == "\n"]
    for max_tokens in (7, 25, 30):
        cut, was = curate.truncate_document(doc, tok, max_tokens=max_tokens)
        k = ends.index(len(cut))  # the cut ends where a line ends in the document ...
        assert was and doc.startswith(cut) and traces.count_tokens(cut, tok) <= max_tokens
        # ... and is the longest such prefix: one more line would not fit
        assert traces.count_tokens(doc[:ends[k + 1]], tok) > max_tokens, max_tokens
    assert curate.truncate_document(doc, tok, max_tokens=10_000) == (doc, False)


def test_select_within_budget_honours_the_budget_exactly():
    rng = random.Random(0)
    for _ in range(300):
        sizes = [rng.randint(1, 60) for _ in range(rng.randint(0, 25))]
        budget = rng.randint(0, 400)
        taken = curate.select_within_budget(list(range(len(sizes))), sizes, budget)
        used = 0
        for i, s in enumerate(sizes):
            if i in taken:
                used += s
            else:
                assert s > budget - used  # skipped only because it did not fit at that point
        assert used == sum(sizes[i] for i in taken) <= budget
        if sum(sizes) <= budget:
            assert taken == list(range(len(sizes)))
    # the cap is reached exactly when sizes allow; an oversized item does not stop the fill
    assert curate.select_within_budget(None, [5, 3, 100, 2], 10) == [0, 1, 3]
    assert curate.select_within_budget(None, [4, 4, 4], 8) == [0, 1]


DOCS = {  # id: (verification, backtracking, subgoal, backward)
    "d0": (0, 0, 0, 0), "d1": (1, 1, 0, 0), "d2": (2, 0, 1, 0), "d3": (0, 0, 0, 0), "d4": (0, 3, 0, 1),
    "d5": (0, 0, 0, 0), "d6": (1, 0, 0, 0), "d7": (0, 0, 0, 0), "d8": (2, 2, 2, 2), "d9": (0, 0, 0, 0),
    "d10": (1, 2, 0, 0), "d11": (0, 0, 0, 0),
}
# the problem/solution answers: d3 has no solution, d10 no problem, d11's answer is unreadable
PROBLEM_SOLUTION = {"d3": ("yes", "no"), "d10": ("no", "yes"), "d11": ("maybe", "maybe")}
REWRITTEN = {"rich": (0, 1, 0, 0), "minimal": (0, 0, 0, 0)}  # counts the judge gives the rewrites
WORDS = ["--tokenizer", "words"]


def doc_text(i, counts):
    body = " ".join(f"word{j}" for j in range(20 + 7 * int(i[1:])))
    return f"Problem {i}: solve it.\n<<{i}>> {body}\nmarks {counts}\n" + "padding line\n" * 3


def pretrain_responder(prompt, system):
    doc = re.search(r"<<(d\d+)>>", prompt).group(1)
    if any(prompt.startswith(curate.REWRITE_PROMPTS[k][:200]) for k in ("rich", "minimal")):
        kind = "rich" if "backtracking, verifying" in prompt else "minimal"
        if doc == "d2":
            return "I could not find a question."
        if doc == "d4":  # an empty answer: unusable
            return f"<question>What is <<{doc}>>?</question>\n<thoughts>I think.</thoughts>\n<answer> </answer>"
        return (f"<question>What is <<{doc}>>?</question>\n<thoughts>I think about {doc} ({kind}).</thoughts>\n"
                f"<answer>{doc} solved</answer> <answer>second answer ignored</answer>")
    if prompt.startswith(curate.PROBLEM_SOLUTION_PROMPT[:200]):
        p, s = PROBLEM_SOLUTION.get(doc, ("yes", "yes"))
        return (f"## Rationale\nx\n\n## Contains Problem?\n{p}\n\n## Contains Solution?\n**{s}**\n\n"
                "## Text domain (broad)\nmath")
    for k, b in enumerate(classify.BEHAVIORS):
        if prompt.startswith(classify.TEXT_PROMPTS[b][:250]):
            if "<think>" in prompt:  # a rewritten example: "What is <<dX>>?\n\n<think>I think about dX (kind)..."
                kind = "rich" if "(rich)" in prompt else "minimal"
                return f"<count>{REWRITTEN[kind][k]}</count>"
            if doc == "d5" and b == "subgoal":
                return "## Thoughts\nunsure\n## Number\n<count> [1/2/...] </count>"
            return f"## Thoughts\n...\n## Does it?\nyes\n## Number of steps\n<count> {DOCS[doc][k]} </count>"
    raise AssertionError("unexpected prompt")


def test_parse_problem_solution_and_rewrite():
    ps = curate.parse_problem_solution
    assert ps("## Contains Problem?\nyes\n\n## Contains Solution?\nNo") == (True, False)
    assert ps("## Contains Problem?\n[yes]\n## Contains Solution?\n**yes**") == (True, True)
    assert ps("## Contains Problem?\nmaybe\n") == (None, None) and ps(None) == (None, None)
    ok, reason = curate.parse_rewrite("<question>Q?</question><thoughts>t</thoughts><answer>42</answer>")
    assert reason is None and ok["completion"] == "t</think>\n<answer>42</answer>"
    # a rewrite cut short (no answer, or an empty one) is refused, whatever else it has
    for text in ("<question>Q?</question><thoughts>long thoughts that never end",
                 "<question>Q?</question><thoughts>t</thoughts><answer>  \n</answer>"):
        assert curate.parse_rewrite(text) == (None, "no non-empty <answer> in the rewrite")
    assert curate.parse_rewrite("<thoughts>t</thoughts><answer>1</answer>") == (None, "no <question> in the rewrite")


def test_pretrain_pipeline_end_to_end(tmp_path, capsys):
    docs = [dict(id=i, text=doc_text(i, c), url="x") for i, c in DOCS.items()]
    files.write_jsonl(tmp_path / "docs.jsonl", docs)
    sizes = {d["id"]: traces.count_tokens(d["text"]) for d in docs}  # whitespace words
    # with the problem/solution filter: rich (sum >= 2) d1 d2 d4 d8 (not d10: no problem);
    # minimal (sum == 0) d0 d7 d9 (not d3: no solution; d11: unreadable; d5: a count is missing)
    rich, minimal = ["d1", "d2", "d4", "d8"], ["d0", "d7", "d9"]
    min_total = sum(sizes[i] for i in minimal)
    budget = min_total + 1000
    args = ["pretrain", "--input", str(tmp_path / "docs.jsonl"), "--out", str(tmp_path / "o"),
            "--budget-tokens", str(budget), "--max-doc-chars", "100000", "--unequal-budgets",
            "--chunk-docs", "5"] + WORDS + FAST
    with FakeJudge(pretrain_responder) as fj:
        fj.add_fault("length", match="Now do this for the following text:\n<text>\nProblem d9:")  # d9's rewrite is cut
        args += ["--base-url", fj.url]
        assert curate.main(args) == 0
        n_first = len(fj.log)
        first_rejects = (tmp_path / "o" / "rewrite_rejects.jsonl").read_text()
        summary = json.loads((tmp_path / "o" / "summary.json").read_text())
        out = capsys.readouterr().out
        assert curate.main(args) == 0
        rerun = [e["prompt"] for e in fj.log[n_first:]]
    # a rerun asks only for what was not kept: d9's cut rewrite, then the 4 labels of its rewrite
    assert len(rerun) == 5 and "Problem d9:" in rerun[0] and all("What is <<d9>>?" in p for p in rerun[1:])
    assert "d9" in {r["id"] for r in files.read_jsonl(tmp_path / "o" / "sft_minimal.jsonl")}
    labels = {r["id"]: r for r in files.read_jsonl(tmp_path / "o" / "doc_labels.jsonl")}
    assert list(labels) == list(DOCS)  # one row per document, input order
    for i, c in DOCS.items():
        want = dict(zip(classify.BEHAVIORS, c))
        if i == "d5":
            want["subgoal"] = None
            assert labels[i]["missing"] == ["subgoal"]
        assert labels[i]["behaviors"] == want and labels[i]["tokens"] == sizes[i]
    assert (labels["d3"]["problem"], labels["d3"]["solution"]) == (True, False)
    assert labels["d11"]["problem"] is None and labels["d11"]["missing"] == ["problem_solution"]
    assert summary["problem_solution"] == dict(both=9, no_problem=1, no_solution=1, unknown=1)
    sel = files.read_jsonl(tmp_path / "o" / "selection.jsonl")
    assert sorted(s["id"] for s in sel if s["set"] == "rich") == rich
    assert sorted(s["id"] for s in sel if s["set"] == "minimal") == minimal
    # Figure 7 rows by hand. input: verification > 0 in d1 d2 d6 d8 d10 = 5 of 12
    freq = summary["frequencies"]
    assert freq["input"]["verification"]["pct_present"] == pytest.approx(500 / 12)
    assert freq["input"]["verification"]["mean_count"] == pytest.approx(7 / 12)
    assert freq["input"]["subgoal"]["n"] == 11 and freq["input"]["subgoal"]["missing"] == 1
    # selected rich d1 d2 d4 d8: backtracking > 0 in d1 d4 d8, mean (1 + 0 + 3 + 2) / 4
    assert freq["selected rich"]["backtracking"]["pct_present"] == 75.0
    assert freq["selected rich"]["backtracking"]["mean_count"] == 1.5
    assert all(freq["selected minimal"][b]["pct_present"] == 0.0 for b in classify.BEHAVIORS)
    # rewrites: d2 (no question), d4 (empty answer) and d9 (cut at max_tokens) are refused and counted
    rej = {r["id"]: r["reason"] for r in map(json.loads, first_rejects.splitlines())}
    assert rej["d2"] == "no <question> in the rewrite" and rej["d4"] == "no non-empty <answer> in the rewrite"
    assert rej["d9"].startswith("truncated: ") and len(rej) == 3
    assert summary["rewrite_reject_reasons"] == {"no <question> in the rewrite": 1,
                                                 "no non-empty <answer> in the rewrite": 1, "truncated": 1}
    for name, ids in (("rich", ["d1", "d8"]), ("minimal", ["d0", "d7", "d9"])):
        sft = files.read_jsonl(tmp_path / "o" / f"sft_{name}.jsonl")  # after the rerun
        assert sorted(r["id"] for r in sft) == ids
        for r in sft:
            assert r["query"] == curate.QA_QUERY_TEMPLATE.format(question=f"What is <<{r['id']}>>?")
            assert r["query"].endswith("Let me solve this step by step.\n<think>")
            assert r["completion"] == f"I think about {r['id']} ({name}).</think>\n<answer>{r['id']} solved</answer>"
            assert r["behaviors"] == dict(zip(classify.BEHAVIORS, REWRITTEN[name]))
        # the rewritten rows are the judge's counts of the rewrites, not of the documents
        assert freq[f"rewritten {name}"]["backtracking"]["pct_present"] == (100.0 if name == "rich" else 0.0)
    for row in ("input", "selected rich", "selected minimal", "rewritten rich", "rewritten minimal"):
        assert row in out
    assert "41.7% (0.58)" in out  # input verification, as printed
    # the rewrite request: our prompt, then the document between <text> tags, as one user turn
    rew = [e for e in fj.log if e["prompt"].startswith(curate.REWRITE_PROMPTS["minimal"])]
    assert rew and rew[0]["prompt"].endswith("\n</text>") and "\n<text>\nProblem d" in rew[0]["prompt"]
    assert rew[0]["body"]["max_tokens"] == 5120 and rew[0]["system"] is None


def test_pretrain_equal_budgets_share_one_cap(tmp_path):
    docs = [dict(id=i, text=doc_text(i, c)) for i, c in DOCS.items()]
    files.write_jsonl(tmp_path / "docs.jsonl", docs)
    sizes = {d["id"]: traces.count_tokens(d["text"]) for d in docs}
    with FakeJudge(pretrain_responder) as fj:
        assert curate.main(["pretrain", "--input", str(tmp_path / "docs.jsonl"), "--out", str(tmp_path / "o"),
                            "--budget-tokens", "100000", "--no-label-rewrites", "--base-url", fj.url]
                           + WORDS + FAST) == 0
        assert not any("<think>" in e["prompt"] for e in fj.log)  # rewrites not labelled
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    cap = min(sum(sizes[i] for i in ("d1", "d2", "d4", "d8")), sum(sizes[i] for i in ("d0", "d7", "d9")))
    assert summary["selection"]["rich"]["cap"] == summary["selection"]["minimal"]["cap"] == cap
    for name in ("rich", "minimal"):
        assert summary["selection"][name]["tokens"] <= cap
        assert summary["sft"][name]["tokens"] <= summary["sft"][name]["cap"] <= cap
    assert summary["sft"]["rich"]["cap"] == summary["sft"]["minimal"]["cap"]
    assert "rewritten rich" not in summary["frequencies"]


def test_pretrain_chunks_bound_requests_and_a_rerun_resumes(tmp_path, monkeypatch):
    """Requests go out chunk by chunk; labels are saved per chunk; a rerun skips finished documents
    (no prompt rendered or sent) and retries only the failed one."""
    docs = [dict(id=i, text=doc_text(i, c)) for i, c in DOCS.items()]
    files.write_jsonl(tmp_path / "docs.jsonl", docs)
    batches = []
    orig = classify.JudgeClient.complete

    def spy(self, prompts, desc="judge"):
        batches.append(len(prompts))
        return orig(self, prompts, desc)
    monkeypatch.setattr(classify.JudgeClient, "complete", spy)
    args = ["pretrain", "--input", str(tmp_path / "docs.jsonl"), "--out", str(tmp_path / "o"), "--stop-after", "label",
            "--chunk-docs", "5"] + WORDS + FAST
    with FakeJudge(pretrain_responder) as fj:
        fj.add_fault("status", match="<<d6>>", status=500, times=1000)  # every d6 request fails
        assert curate.main(args + ["--base-url", fj.url]) == 0
        first = len(fj.log)
        fj.faults.clear()
        fj.log.clear()
        assert curate.main(args + ["--base-url", fj.url]) == 0
        rerun = [e["prompt"] for e in fj.log]
        n_batches = list(batches)
        labels = files.read_jsonl(tmp_path / "o" / "doc_labels.jsonl")
        # a kill mid-append tears the last label line: that document is labelled again (from the
        # judge cache: no request), and the next append does not glue onto the torn line
        path = tmp_path / "o" / "doc_labels.jsonl"
        lines = path.read_text().splitlines(keepends=True)
        path.write_text("".join(lines[:-1]) + lines[-1][:25])
        fj.log.clear()
        assert curate.main(args + ["--base-url", fj.url]) == 0
        assert len(fj.log) == 0
    assert [r["id"] for r in files.read_jsonl(path)] == list(DOCS)
    # the torn line is cut off, so a row appended after it (then a second kill) is still readable
    path.write_text('{"id": "a"}\n{"id": "b", "tok')
    assert list(documents.load_labels(path)) == ["a"]
    with open(path, "a") as f:
        f.write('{"id": "c"}\n')
    assert [r["id"] for r in files.read_jsonl(path)] == ["a", "c"]
    # 12 documents in chunks of 5: at most 5 x 4 behavior prompts, or 5 problem/solution prompts, at once
    assert max(n_batches) <= 20 and len(n_batches) == 2 * 3 + 2
    assert first == 11 * 5 + 5 * 3  # d6: 5 requests x (1 + 2 retries)
    assert len(rerun) == 5 and all("<<d6>>" in p for p in rerun)
    assert [r["id"] for r in labels] == list(DOCS) and not any(r.get("failed") for r in labels)
    assert labels[6]["behaviors"] == dict(zip(classify.BEHAVIORS, DOCS["d6"]))


def test_pretrain_stop_after_label_and_thresholds(tmp_path, capsys):
    docs = [dict(id=i, text=doc_text(i, c)) for i, c in DOCS.items()]
    files.write_jsonl(tmp_path / "docs.jsonl", docs)
    with FakeJudge(pretrain_responder) as fj:
        assert curate.main(["pretrain", "--input", str(tmp_path / "docs.jsonl"), "--out", str(tmp_path / "o"),
                            "--stop-after", "label", "--base-url", fj.url] + WORDS + FAST) == 0
        assert len(fj.log) == 12 * 5 and not (tmp_path / "o" / "selection.jsonl").exists()
    labels = files.read_jsonl(tmp_path / "o" / "doc_labels.jsonl")
    cfg = curate.PretrainConfig(rich_min_total=1, rich_require=("backtracking",))
    rich, minimal = curate.eligible(labels, cfg)
    assert sorted(r["id"] for r in rich) == ["d1", "d4", "d8"]           # d10: no problem
    assert sorted(r["id"] for r in minimal) == ["d0", "d7", "d9"]        # d3: no solution; d11: unknown
    rich, minimal = curate.eligible(labels, curate.PretrainConfig(rich_min_total=1, rich_require=("backtracking",),
                                                                  problem_filter=False))
    assert sorted(r["id"] for r in rich) == ["d1", "d10", "d4", "d8"]
    assert sorted(r["id"] for r in minimal) == ["d0", "d11", "d3", "d7", "d9"]
    with pytest.raises(ValueError, match="disjoint"):
        curate.eligible(labels, curate.PretrainConfig(rich_min_total=1, minimal_max_total=1))
    # other settings into the same folder are refused
    assert curate.main(["pretrain", "--input", str(tmp_path / "docs.jsonl"), "--out", str(tmp_path / "o"),
                        "--stop-after", "label", "--rich-min-total", "3", "--base-url", "http://127.0.0.1:9"]
                       + WORDS + FAST) == 2
    assert "other settings" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["priming", "pretrain"])
def test_output_folder_held_by_another_process_is_refused(command, tmp_path, capsys):
    files.write_jsonl(tmp_path / "docs.jsonl", [dict(id="d0", text="x")])
    out = tmp_path / "o"
    args = {"priming": ["priming", "--condition", "all_strategies", "--n", "2"],
            "pretrain": ["pretrain", "--input", str(tmp_path / "docs.jsonl")]}[command]
    with lock_held_elsewhere(out) as holder:
        assert curate.main(args + ["--out", str(out), "--base-url", "http://127.0.0.1:9"] + FAST) == 2
    assert capsys.readouterr().err == (f"error: {out} is in use by another process (pid {holder.pid}): one live "
                                       "process owns a curate.py output folder. Wait for it to finish or stop it, "
                                       "or choose another --out\n")
    assert [p.name for p in out.iterdir()] == [".lock"]  # refused before touching anything


def test_pretrain_counts_tokens_with_a_real_tokenizer_by_default(tmp_path, monkeypatch, capsys):
    from conftest import make_tokenizer
    assert curate.build_parser().parse_args(["pretrain", "--input", "x", "--out", "y"]).tokenizer == "llama-3.2-3b"
    # the default names a model; without it (offline, empty cache) the error says what to do
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    docs = [dict(id=i, text=doc_text(i, c)) for i, c in DOCS.items()]
    files.write_jsonl(tmp_path / "docs.jsonl", docs)
    assert curate.main(["pretrain", "--input", str(tmp_path / "docs.jsonl"), "--out", str(tmp_path / "o"),
                        "--base-url", "http://127.0.0.1:9"] + FAST) == 2
    err = capsys.readouterr().err
    assert "--tokenizer llama-3.2-3b" in err and "--tokenizer words" in err
    # a tokenizer folder: budgets and truncation in its tokens
    tk = make_tokenizer()
    tk.tk.save(str(tmp_path / "tokenizer.json"))
    with FakeJudge(pretrain_responder) as fj:
        assert curate.main(["pretrain", "--input", str(tmp_path / "docs.jsonl"), "--out", str(tmp_path / "t"),
                            "--stop-after", "label", "--tokenizer", str(tmp_path), "--base-url", fj.url] + FAST) == 0
    labels = {r["id"]: r for r in files.read_jsonl(tmp_path / "t" / "doc_labels.jsonl")}
    for d in docs:
        assert labels[d["id"]]["tokens"] == len(tk.tk.encode(d["text"], add_special_tokens=False).ids)
        assert labels[d["id"]]["tokens"] > len(d["text"].split())  # tokens, not words


def test_read_documents_streams_jsonl(tmp_path):
    files.write_jsonl(tmp_path / "a.jsonl", [{"content": "x"}, {"content": "y"}])
    docs = documents.read_documents(tmp_path / "a.jsonl", text_field="content")
    assert docs == [dict(id="a:0", text="x"), dict(id="a:1", text="y")]
    with pytest.raises(ValueError, match="--text-field"):
        documents.read_documents(tmp_path / "a.jsonl")
    # a stream: the first document comes before a bad line further down is even read
    (tmp_path / "b.jsonl").write_text('{"text": "first", "id": 1}\n{"text": broken\n')
    it = curate.iter_documents(tmp_path / "b.jsonl")
    assert next(it) == dict(id=1, text="first")
    with pytest.raises(ValueError, match=r"b.jsonl:2: not valid JSON"):
        next(it)
    (tmp_path / "c.jsonl").write_text('{"text": "a", "id": 7}\n{"text": "b", "id": 7}\n')
    with pytest.raises(ValueError, match="appears twice"):
        documents.read_documents(tmp_path / "c.jsonl")


def test_parquet_without_pyarrow_is_a_clear_error(tmp_path, monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_pyarrow(name, *a, **kw):
        if name.startswith("pyarrow"):
            raise ImportError("No module named 'pyarrow'")
        return real_import(name, *a, **kw)
    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    (tmp_path / "b.parquet").write_bytes(b"PAR1")
    with pytest.raises(ValueError, match="optional package pyarrow: pip install pyarrow"):
        documents.read_documents(tmp_path / "b.parquet")


def test_parquet_is_read_in_batches_of_the_needed_columns(tmp_path, monkeypatch):
    """Our side of the parquet path against a stand-in pyarrow.parquet: a file is read batch by
    batch, only the text and id columns, and the documents come out in order."""
    import types
    calls = []

    class Batch:
        def __init__(self, rows):
            self.rows = rows

        def to_pylist(self):
            return self.rows

    class ParquetFile:
        def __init__(self, path):
            self.rows = [dict(text=f"doc {i}", id=f"r{i}", extra="big" * 10) for i in range(7)]
            self.schema_arrow = types.SimpleNamespace(names=["text", "id", "extra"])

        def iter_batches(self, batch_size, columns):
            calls.append((batch_size, columns))
            for k in range(0, len(self.rows), batch_size):
                yield Batch([{c: r[c] for c in columns} for r in self.rows[k:k + batch_size]])
    pq = types.ModuleType("pyarrow.parquet")
    pq.ParquetFile = ParquetFile
    pa = types.ModuleType("pyarrow")
    pa.parquet = pq
    monkeypatch.setitem(sys.modules, "pyarrow", pa)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", pq)
    (tmp_path / "s.parquet").write_bytes(b"PAR1")
    it = curate.iter_documents(tmp_path / "s.parquet", batch_rows=3)
    assert next(it) == dict(id="r0", text="doc 0") and calls == [(3, ["text", "id"])]
    assert [d["id"] for d in it] == [f"r{i}" for i in range(1, 7)]
    with pytest.raises(ValueError, match="no column 'content'"):
        documents.read_documents(tmp_path / "s.parquet", text_field="content")


def test_parquet_with_pyarrow(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    table = pa.table({"text": [f"doc {i}" for i in range(10)], "id": list(range(10))})
    pq.write_table(table, tmp_path / "x.parquet", row_group_size=4)
    assert documents.read_documents(tmp_path / "x.parquet") == [dict(id=i, text=f"doc {i}") for i in range(10)]


def test_every_flag_has_help():
    parser = curate.build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name, p in sub.choices.items():
        for action in p._actions:
            assert action.help, (name, action.option_strings)
