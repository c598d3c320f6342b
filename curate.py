"""Curate SFT data with an LLM: Countdown priming traces, their controls, and behavior-selected
pretraining text rewritten as question / thoughts / answer.

Three subcommands, each resumable through the judge client's request cache (classify.py):

  priming   For a condition (paper section 3.1-3.2), send countdown.py's priming problems to an LLM
            with a system prompt that asks for some behaviors and forbids the others (our wording
            of the paper's rules). Each answer becomes an SFT example via countdown.sft_example,
            so the query is exactly the RL prompt (ending "<think>") and the completion what follows.
  controls  Transform a generated set (section 3.3): empty_cot (the thoughts emptied), dots (the
            thoughts replaced by as many " ." as they had tokens), no_positive (every example the
            reward does not score 1.0).
  pretrain  Section 4.3-4.4 on documents (OpenWebMath-like JSONL or parquet, streamed): truncate,
            count the four behaviors with math-text prompts and ask whether a problem and its
            solution are present (the paper's filter), select a behavior-rich and a
            behavior-minimized set with explicit thresholds, cap both at the same token budget
            (tokens of the target model's tokenizer), rewrite each selected document into
            <question>/<thoughts>/<answer>, and write SFT JSONL. Requests go out in bounded
            chunks with resumable progress. Prints behavior frequencies like the paper's
            Figure 7 for the input, the selected and the rewritten sets.

Fixes relative to the original scripts (paper_spec section 6): JSONL in and out everywhere
(D-SFT-3); no_positive keeps every answer scoring below 1, not only unparsable ones (D-SFT-4);
failed requests are reported and retried on a rerun instead of `breakpoint()`, and every example
keeps its nums/target (D-SFT-5); one prompt/completion boundary for SFT and RL (D-SFT-6); dots
writes exactly N fillers for N think tokens counted without special tokens (D-SFT-8); the rewrite
prompt is one plain user message, no closed assistant turn (D-O4); the missing selection step is
explicit, and both sets share one seeded, documented token budget (D-O3, D-O5); truncated documents
are decoded without special tokens (D-O6).
"""

import argparse
import hashlib
import json
import math
import random
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import classify
import countdown
import traces
from classify import BEHAVIORS, JudgeClient
from plumbing import documents, files, judge_http
from plumbing import report as study_report
from plumbing.judge_http import add_judge_args, judge_config_from_args, run_judged_command
from plumbing.documents import iter_documents
from traces import load_tokenizer


@dataclass
class PretrainConfig:
    text_field: str = "text"          # the document text in each input row
    id_field: str = "id"              # a document id; the row's position when absent
    max_doc_tokens: int = 3072        # truncation with a tokenizer (paper: 4096 - 1024 Qwen tokens)
    max_doc_chars: int = 12000        # truncation without one (about 3072 tokens of English)
    rich_min_total: int = 2           # rich: the four counts sum to at least this ...
    rich_require: tuple = ()          # ... and each behavior named here has a count > 0
    minimal_max_total: int = 0        # minimized: the four counts sum to at most this
    budget_tokens: int = 8_300_000    # both sets are capped at the same number of tokens
    equal_budgets: bool = True        # cap both at the smaller of the two totals as well
    seed: int = 0                     # order in which eligible documents fill the budget
    rewrite_max_tokens: int = 5120    # the paper's rewrite setting
    prompts_dir: str = ""             # text_<behavior>.txt / original *_v0.txt overrides
    problem_filter: bool = True       # keep only documents with a problem and a solution (paper)
    chunk_docs: int = 1000            # documents per chunk of requests (5 requests each)
    label_rewrites: bool = True       # count behaviors in the rewritten sets too (Figure 7)


# -----------------------------------------------------------------------------------------------
# (a) Priming data: one system prompt per condition (paper section 3.2, our wording)

_PREAMBLE = (
    "I am building reasoning trajectories for the game of Countdown, where the goal is to reach a "
    "target number by combining the given integers with basic arithmetic.\n"
    "Write your thinking inside <think> </think> tags.\n"
    "The answer is a sequence of arithmetic operations (+, -, *, /) whose result is the target "
    "number.\n"
    "Put the final answer inside <answer> </answer> tags, as a single expression such as "
    "<answer> (number1 + number2) * number3 </answer>.\n"
    "The answer must be a valid arithmetic expression that contains only the starting integers, "
    "never the target number; otherwise the grader cannot read it.\n")

PRIMING_SYSTEM_PROMPTS = {
    "negative_control": (
        "I am building reasoning trajectories for the game of Countdown, where the goal is to "
        "reach a target number by combining the given integers with basic arithmetic.\n"
        "The answer is a sequence of arithmetic operations (+, -, *, /) whose result is the target "
        "number.\n"
        "Write your thinking inside <think> </think> tags, only in the form "
        "<think> Step X: number1 (+,-,*,/) number2 = result. </think>\n"
        "Put the final answer inside <answer> </answer> tags, as a single expression such as "
        "<answer> (number1 + number2) * number3 </answer>.\n"
        "The answer must be a valid arithmetic expression that contains only the starting "
        "integers, never the target number; otherwise the grader cannot read it.\n"
        "Rules:\n"
        "- Do not backtrack; go straight to the correct answer.\n"
        "- Do not work backwards from the target.\n"
        "- Do not explicitly verify your answer.\n"
        "- Give the solution directly.\n"
        "- Do not write anything else."),
    "only_backtracking": _PREAMBLE + (
        "If you have not reached the target, go back to the start or to an intermediate step and "
        "try something else.\n"
        "- Do not set subgoals.\n"
        "- Do not work backwards from the target.\n"
        "- Do not explicitly verify your answer.\n"
        "Examples of what you may write:\n"
        "1. Target 24 with [12, 2]: \"12 + 2 = 14. Trying something else. 12 * 2 = 24.\" Do not "
        "write evaluations such as \"14 is not 24\", \"14 is close to 24\" or \"14 is too high\"; "
        "leave every evaluation out of the text.\n"
        "2. Target 10 with [12, 2]: \"12 + 2 = 14. Let's try a different sequence of "
        "operations.\""),
    "backtracking_verification": _PREAMBLE + (
        "Check whether you have reached the target, and when you have not, go back to the start "
        "or to an intermediate step. Do not set subgoals and do not work backwards from the "
        "target.\n"
        "Examples of what you may write:\n"
        "1. Target 24 with [12, 2]: \"12 + 2 = 14. 14 is not 24, so let's try something else. "
        "12 * 2 = 24, and 24 is the target, so the goal is reached.\"\n"
        "2. Target 10 with [12, 2]: \"12 + 2 = 14. 14 is not 10, so let's try a different "
        "sequence of operations.\""),
    "backtracking_backward": _PREAMBLE + (
        "If you have not reached the target, go back to the start or to an intermediate step. "
        "Work backwards from the target when that makes things easier.\n"
        "- Do not set subgoals.\n"
        "- Do not explicitly verify your answer.\n"
        "Examples and rules:\n"
        "1. Backward chaining, target 24 with [12, 2]: \"Let's work backwards from the target. "
        "24 / 2 = 12. So 12 * 2 = 24.\"\n"
        "2. Do not write evaluations such as \"14 is not 24\", \"14 is close to 24\" or \"14 is "
        "too high\"; leave them out.\n"
        "3. Backtracking, target 10 with [12, 2]: \"12 + 2 = 14. Let's try a different sequence "
        "of operations.\"\n"
        "4. Working backwards can lead you to numbers you already have.\n"
        "5. Do not judge results in words, e.g. \"it is too small\", \"it is too high\" or \"this "
        "is not the target\".\n"
        "6. Make sure you try working backwards from the target. If that does not work, work "
        "forwards, and interleave the two."),
    "backtracking_subgoal": _PREAMBLE + (
        "Break the problem into subgoals and reach them on the way to the target; if you cannot "
        "reach the target or a subgoal, go back to an earlier state.\n"
        "- Do not work backwards from the target.\n"
        "- Do not explicitly verify your answer.\n"
        "HINT: useful subgoals are factors or multiples of the target, or numbers close to it.\n"
        "Examples and rules:\n"
        "1. Target 24 with [10, 2, 2]: \"Let's first try to reach 12, since it is a factor of 24. "
        "10 * 2 = 20, let's try a different sequence. 10 + 2 = 12. Now 12 * 2 = 24.\" Do not "
        "write evaluations such as \"14 is not 24\", \"14 is close to 24\" or \"14 is too high\"; "
        "leave them out.\n"
        "2. Target 10 with [9, 3, 2]: \"Let's try to reach 20, since it is a multiple of 10...\" "
        "If you cannot reach it, try something else.\n"
        "3. State each subgoal explicitly.\n"
        "4. A subgoal must not be the target number itself.\n"
        "5. Do not judge results in words, e.g. \"it is too small\", \"it is too high\" or \"this "
        "is not the target\".\n"
        "6. Good subgoals are factors of the target or numbers close to it."),
    "all_strategies": _PREAMBLE + (
        "- Check whether you have reached the target, and go back to the start or to an "
        "intermediate step when you have not.\n"
        "- Work backwards from the target when that makes things easier.\n"
        "- Break the problem into subgoals and reach them on the way to the target; if you cannot "
        "reach the target or a subgoal, go back to an earlier state.\n"
        "HINT: useful subgoals are factors or multiples of the target, or numbers close to it.\n"
        "Examples of what you may write:\n"
        "1. Target 24 with [12, 2]: \"12 + 2 = 14. 14 is not 24, so let's try something else. "
        "12 * 2 = 24, and 24 is the target, so the goal is reached.\"\n"
        "2. Target 10 with [12, 2]: \"12 + 2 = 14. 14 is not 10, so let's try a different "
        "sequence of operations.\"\n"
        "3. Target 10 with [9, 3, 2]: \"Let's try to reach 20, since it is a multiple of 10...\" "
        "If you cannot reach it, try something else.\n"
        "4. Target 24 with [10, 2, 2]: \"Let's first try to reach 12, since it is a factor of 24. "
        "10 * 2 = 20, let's try a different sequence. 10 + 2 = 12. Now 12 * 2 = 24.\"\n"
        "5. Backward chaining, target 24 with [12, 2]: \"Let's work backwards from the target. "
        "24 / 2 = 12. So 12 * 2 = 24.\" This helps when setting subgoals."),
}
PRIMING_CONDITIONS = tuple(PRIMING_SYSTEM_PROMPTS)


def generate_priming(condition, n, client, seed=0, max_requests=None):
    """Ask the LLM for n usable traces of one condition -> (rows, rejects).

    Problems come from countdown.generate_problems(..., "priming", seed), whose stream is prefix-
    stable, so when some answers fail or lack a leading <think>, further problems of the same
    stream are requested (up to max_requests, default 1.1 n + 10; the paper sent 1.05 n).
    Rows: {query, completion, nums, target, condition, id, score}; rejects: {..., reason}.
    """
    if condition not in PRIMING_SYSTEM_PROMPTS:
        raise ValueError(f"unknown priming condition {condition!r}; choose one of "
                         f"{', '.join(PRIMING_CONDITIONS)} (controls come from `curate.py controls`)")
    max_requests = max_requests or int(math.ceil(1.1 * n)) + 10
    system = PRIMING_SYSTEM_PROMPTS[condition]
    rows, rejects, asked = [], [], 0
    while len(rows) < n and asked < max_requests:
        want = min(max_requests, asked + (n - len(rows)))
        problems = countdown.generate_problems(want, distribution="priming", seed=seed)[asked:]
        replies = client.complete([(system, countdown.make_query(p["nums"], p["target"]))
                                   for p in problems], desc=condition)
        asked = want
        for p, r in zip(problems, replies):
            meta = dict(nums=p["nums"], target=p["target"], condition=condition, id=p["id"])
            if r.text is None:
                rejects.append(dict(meta, reason=r.error))
                continue
            try:
                ex = countdown.sft_example(p["nums"], p["target"], r.text)
            except ValueError:
                rejects.append(dict(meta, reason="answer does not start with <think>",
                                    text=r.text))
                continue
            if len(rows) < n:
                rows.append(dict(ex, **meta, score=countdown.score(ex["completion"], p["nums"],
                                                                   p["target"])))
    return rows, rejects


# -----------------------------------------------------------------------------------------------
# (b) Controls: transformations of a generated set (paper section 3.3)

_THINK_RE = re.compile(r"<think>.*?</think>", re.DOTALL)
_FIRST_THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL)
_FIRST_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def _full_text(row):
    """The answer as the LLM wrote it: our queries end with "<think>", which belongs to it."""
    moved = row["query"].endswith("<think>")
    return ("<think>" + row["completion"]) if moved else row["completion"], moved


def _with_text(row, text, moved):
    if moved:
        assert text.startswith("<think>")
        text = text[len("<think>"):]
    return dict(row, completion=text)


def empty_cot(rows):
    """Every <think>...</think> becomes "<think> </think>"; the answer and the query are kept."""
    out = []
    for r in rows:
        text, moved = _full_text(r)
        out.append(_with_text(r, _THINK_RE.sub("<think> </think>", text), moved))
    return out


def dots(rows, tokenizer=None):
    """Replace the first <think> content by N copies of " ." where N is its token count (with a
    tokenizer.json) or word count; keep only the first <answer>. Items lacking either are
    dropped. -> (rows, n_dropped). The original wrote N-1 dots and counted Llama's BOS (D-SFT-8)."""
    out, dropped = [], 0
    for r in rows:
        text, moved = _full_text(r)
        think, answer = _FIRST_THINK.search(text), _FIRST_ANSWER.search(text)
        if think is None or answer is None:
            dropped += 1
            continue
        filler = " ." * traces.count_tokens(think.group(1), tokenizer)
        out.append(_with_text(r, f"<think>{filler}</think>\n<answer>{answer.group(1)}</answer>",
                              moved))
    return out, dropped


def no_positive(rows):
    """Keep every example the reward scores below 1 (wrong or unparsable). The original kept only
    score 0, i.e. dropped parsable-but-wrong answers (D-SFT-4)."""
    missing = [i for i, r in enumerate(rows) if "nums" not in r or "target" not in r]
    if missing:
        raise ValueError(f"no_positive needs nums and target in every row (row {missing[0]} "
                         "lacks them); use the JSONL written by `curate.py priming`")
    return [r for r in rows if countdown.score(r["completion"], r["nums"], r["target"]) < 1.0]


def coat(rows):
    """Satori's Chain-of-Action-Thought form of LLM-written traces: the first <think> is split into
    sentences, which the rules judge labels (classify.behavior_sentences); a backtracking sentence
    opens an <|explore|> step, a verification one a <|reflect|> step, and each run of other
    sentences one <|continue|> step. Rows without a <think> are dropped. -> (rows, n_dropped).
    On free text the labels are only as good as the rules (README, classify.py)."""
    out, dropped = [], 0
    for r in rows:
        text, moved = _full_text(r)
        think = _FIRST_THINK.search(text)
        if think is None:
            dropped += 1
            continue
        body, pos, parts, last = think.group(1), 0, [], None
        for sentence, hit in classify.behavior_sentences(body, r.get("nums"), r.get("target")):
            start = body.find(sentence, pos) if sentence else -1
            if start < 0:
                continue
            kind = "explore" if hit["backtracking"] else "reflect" if hit["verification"] else "continue"
            parts.append(body[pos:start])
            if kind != "continue" or last != "continue":
                parts.append(traces.COAT_TOKENS[kind] + " ")
            parts.append(sentence)
            pos, last = start + len(sentence), kind
        new_body = "".join(parts) + body[pos:]
        out.append(_with_text(r, text[:think.start(1)] + new_body + text[think.end(1):], moved))
    return out, dropped


CONTROLS = ("empty_cot", "dots", "no_positive")
DERIVED = CONTROLS + ("coat",)  # what `curate.py controls` derives from a generated set


# -----------------------------------------------------------------------------------------------
# (c) Pretraining curation (paper sections 4.3-4.4)
#
# Memory is bounded by the chunk size, not by the corpus: documents are streamed (plumbing/
# documents.py: JSONL line by line, parquet batch by batch), judged `chunk_docs` at a time (five
# requests each: four behaviors and the problem/solution question), and only the small label rows
# stay in memory. The rewrite stage streams the input a second time for the texts of the selected
# documents. Progress is the label file itself: a rerun skips every document already labelled
# without a failed request, and every answered request is in the judge cache, so an interrupted
# run loses at most one chunk's unanswered requests.


def load_budget_tokenizer(name):
    """The tokenizer that counts document tokens for truncation and the budget. "words" -> None
    (whitespace-separated words, only on request); a tokenizer.json or a folder holding one; else a
    model alias or Hub repo id (hub.ALIASES, e.g. llama-3.2-3b), whose checkpoint folder is taken
    from the Hugging Face cache or downloaded (sft.py needs that checkpoint anyway)."""
    if name == "words":
        return None
    if Path(name).exists():
        return load_tokenizer(name)
    from plumbing import hub  # torch comes with it; only needed to find a checkpoint by name
    try:
        folder = hub.resolve_checkpoint(name)
    except (OSError, ValueError) as e:  # FileNotFoundError, PermissionError, ConnectionError
        raise ValueError(f"--tokenizer {name}: {e} -- pass a tokenizer.json (or its folder), or "
                         "--tokenizer words to count whitespace words instead of tokens") from None
    return load_tokenizer(folder)


def truncate_document(text, tokenizer=None, max_tokens=3072, max_chars=12000):
    """Keep the first max_tokens tokens (or max_chars characters), then cut at the last newline
    so no line is split. Decoding skips special tokens (the original injected them, D-O6)."""
    if tokenizer is not None:
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        if len(ids) <= max_tokens:
            return text, False
        cut = tokenizer.decode(ids[:max_tokens], skip_special_tokens=True)
    else:
        if len(text) <= max_chars:
            return text, False
        cut = text[:max_chars]
    nl = cut.rfind("\n")
    return (cut[:nl] if nl > 0 else cut), True


# The paper's problem/solution question (its is_solution prompt; the released data's
# contain_problem / contain_solution columns), in our wording, with the same markdown headers.
PROBLEM_SOLUTION_PROMPT = (
    "# Task\nYou will read a piece of text taken from the internet. Decide whether it contains a "
    "problem (a question or an exercise that asks for something to be found or shown) and whether "
    "it contains a solution to that problem (worked steps or a final answer), and name the "
    "subject of the text.\n\n"
    "# Answer format\nAnswer in markdown:\n\n"
    "## Rationale\n[one or two sentences]\n\n## Contains Problem?\n[yes/no]\n\n"
    "## Contains Solution?\n[yes/no]\n\n## Text domain (broad)\n[e.g. math, physics]\n\n"
    "## Text domain (specific)\n[e.g. algebra, probability]\n\n"
    "# Text to evaluate\n{response}\n\n# Answer\n")
_PS_ANSWER = {k: re.compile(rf"##\s*Contains\s+{k}\s*\??\s*\n+\W*(yes|no)\b", re.IGNORECASE)
              for k in ("problem", "solution")}
PROBLEM_SOLUTION_FILE = "text_problem_solution.txt"  # its drop-in name in --prompts-dir


def parse_problem_solution(text):
    """(contains_problem, contains_solution): True / False, or None where the answer lacks it."""
    out = []
    for k in ("problem", "solution"):
        m = _PS_ANSWER[k].search(text or "")
        out.append(None if m is None else m.group(1).lower() == "yes")
    return tuple(out)


def problem_solution_prompt(prompts_dir=""):
    p = Path(prompts_dir) / PROBLEM_SOLUTION_FILE if prompts_dir else None
    if p is not None and p.exists():
        text = p.read_text(encoding="utf-8")
        if "{response}" not in text:
            raise ValueError(f"prompt file {p} lacks the placeholder {{response}}")
        return text
    return PROBLEM_SOLUTION_PROMPT


def label_documents(docs, client, text_prompts, cfg, tokenizer=None, judge_meta=None, desc="label"):
    """Label rows for one chunk of documents: the four behavior counts, and unless
    cfg.problem_filter is off, whether the document holds a problem and a solution. A failed
    request leaves its field None with the reason under "failed" (a rerun retries the document);
    an answer without a count or a yes/no is listed under "missing" (final, as in classify.py)."""
    truncated = [truncate_document(d["text"], tokenizer, cfg.max_doc_tokens, cfg.max_doc_chars)
                 for d in docs]
    results = classify.judge_behaviors([dict(response=t) for t, _ in truncated], client,
                                       text_prompts, system=None, desc=desc)
    ps = None
    if cfg.problem_filter:
        template = problem_solution_prompt(cfg.prompts_dir)
        ps = client.complete([(None, classify.render_prompt(template, response=t))
                              for t, _ in truncated], desc=desc + " (problem/solution)")
    rows = []
    for i, (d, (t, cut), res) in enumerate(zip(docs, truncated, results)):
        row = dict(id=d["id"], tokens=traces.count_tokens(t, tokenizer), chars=len(t),
                   truncated=cut, behaviors=res["behaviors"], judge=judge_meta)
        failed, missing = dict(res["failed"]), list(res["missing"])
        if ps is not None:
            reply = ps[i]
            problem = solution = None
            if reply.text is None:
                failed["problem_solution"] = reply.error
            else:
                problem, solution = parse_problem_solution(reply.text)
                if problem is None or solution is None:
                    missing.append("problem_solution")
            row.update(problem=problem, solution=solution)
        if failed:
            row["failed"] = failed
        if missing:
            row["missing"] = missing
        rows.append(row)
    return rows


def behavior_frequencies(labels):
    """Figure 7: per behavior, % of documents with a count > 0 and the mean count (over documents
    whose count parsed), and how many have no count."""
    out = {}
    for b in BEHAVIORS:
        counts = [l["behaviors"][b] for l in labels if l["behaviors"][b] is not None]
        out[b] = dict(n=len(counts), missing=len(labels) - len(counts),
                      pct_present=100.0 * sum(c > 0 for c in counts) / len(counts) if counts else None,
                      mean_count=sum(counts) / len(counts) if counts else None)
    return out


def eligible(labels, cfg):
    """Split labelled documents into the behavior-rich and the behavior-minimized pool.

    Only documents with all four counts parsed take part, and (cfg.problem_filter, the paper's
    contain_problem / contain_solution filter on both sources) only documents the judge says hold
    both a problem and a solution; the paper let an unreadable answer through ("!= 'no'"), we do
    not. rich: sum of counts >= rich_min_total and every behavior in rich_require > 0.
    minimized: sum of counts <= minimal_max_total. The original code has no selection step
    (D-O3); these thresholds are ours and are flags.
    """
    if cfg.minimal_max_total >= cfg.rich_min_total:
        raise ValueError("--minimal-max-total must be below --rich-min-total so the sets are "
                         "disjoint")
    bad = [b for b in cfg.rich_require if b not in BEHAVIORS]
    if bad:
        raise ValueError(f"--rich-require: unknown behavior(s) {bad}; choose from {BEHAVIORS}")
    rich, minimal = [], []
    for l in labels:
        c = l["behaviors"]
        if any(c[b] is None for b in BEHAVIORS):
            continue
        if cfg.problem_filter and not (l.get("problem") is True and l.get("solution") is True):
            continue
        total = sum(c.values())
        if total >= cfg.rich_min_total and all(c[b] > 0 for b in cfg.rich_require):
            rich.append(l)
        elif total <= cfg.minimal_max_total:
            minimal.append(l)
    return rich, minimal


def select_within_budget(items, sizes, budget):
    """First fit in the given order: take an item when it still fits, skip it otherwise.

    The result never exceeds the budget, and every skipped item is larger than what was left when
    it came up. (The original took items until the first one that overflowed and stopped, D-O5.)
    Returns the indices taken.
    """
    taken, used = [], 0
    for i, s in enumerate(sizes):
        if used + s <= budget:
            taken.append(i)
            used += s
    return taken


REWRITE_PROMPTS = {
    "rich": (
        "Your task is to split the text below into a question, the thoughts that lead to the "
        "answer, and the answer.\n\n"
        "Make sure the question comes from the text.\n"
        "Make sure the answer, and the writer's process of reaching it, come from the text too.\n"
        "Paraphrase the answer into a clean form, and make sure it includes the process of "
        "finding the solution, such as backtracking, verifying the answer, or setting subgoals.\n"
        "What these words mean here:\n"
        "Backtracking: going back and forth between the answer and the question, dropping an "
        "approach that does not work.\n"
        "Verification: checking the answer to see whether it is correct.\n"
        "Subgoal setting: setting smaller goals on the way to the final answer.\n\n"
        "Write the question in <question>...</question>.\n"
        "Split the answer into the process of reaching it and the final answer: write the process "
        "in <thoughts>the author's thinking, with backtracking and the like</thoughts> and the "
        "final answer in <answer>...</answer>.\n"
        "Write the thoughts in the first person (\"I\", \"me\") and in the present tense, as if "
        "the author were thinking out loud, e.g. \"I think I should try this next.\"\n"
        "Keep the author's mistakes in the thoughts, together with the moment the author "
        "realizes a step was wrong.\n\n"
        "Now do this for the following text:"),
    "minimal": (
        "Your task is to split the text below into a question, the thoughts that lead to the "
        "answer, and the answer.\n"
        "Make sure the question, the thoughts and the answer all come from the text.\n"
        "Paraphrase the answer into a clean form, and make sure it has the steps to find the "
        "solution.\n"
        "Write the question in <question>...</question>.\n"
        "Write the process in <thoughts>the steps to find the solution</thoughts> and the final "
        "answer in <answer>...</answer>.\n\n"
        "Now do this for the following text:"),
}

# The paper's QA framing of rewritten documents (generate_qa_parquets.py), character for
# character, with one change of boundary: the paper's query ended at "step by step." and its
# completion was "\n<think>...". Here "\n<think>" closes the query, as in countdown.sft_example,
# so query + completion is the same text and SFT and RL share one boundary (D-SFT-6).
QA_QUERY_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant "
    "solves it. The assistant first thinks about the reasoning process in the mind and then "
    "provides the user with the answer.\nUser: {question} Show your work in <think> </think> tags. "
    "And return the final answer in <answer> </answer> tags.\nAssistant: Let me solve this step "
    "by step.\n<think>")

_TAG = {t: re.compile(rf"<{t}>(.*?)</{t}>", re.DOTALL) for t in ("question", "thoughts", "answer")}


def rewrite_request(doc_text, kind):
    return REWRITE_PROMPTS[kind] + f"\n<text>\n{doc_text}\n</text>"


def parse_rewrite(text):
    """First <question>, <thoughts>, <answer> -> an SFT example, or (None, reason). A rewrite needs
    a question and a non-empty answer: one cut short by max_tokens often stops inside <thoughts>
    or leaves <answer></answer> empty, and training on it would teach answering nothing."""
    parts = {t: (m.group(1) if (m := r.search(text or "")) else "") for t, r in _TAG.items()}
    if not parts["question"].strip():
        return None, "no <question> in the rewrite"
    if not parts["answer"].strip():
        return None, "no non-empty <answer> in the rewrite"
    return dict(query=QA_QUERY_TEMPLATE.format(question=parts["question"].strip()),
                completion=f"{parts['thoughts']}</think>\n<answer>{parts['answer']}</answer>"), None


def curate_pretraining(docs, make_client, cfg, out, tokenizer=None, stop_after=""):
    """Label -> select -> rewrite -> SFT JSONL, writing every stage into `out`.

    docs: a list of {"id", "text"}, or a function returning a fresh iterator over them (the
    input is read twice: to label, then for the texts of the selected documents).
    make_client(max_tokens) returns a JudgeClient (one for labelling, one for rewriting; both
    share the request cache, so every stage resumes). Returns a summary dict.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stream = docs if callable(docs) else (lambda: iter(docs))
    text_prompts, version = classify.load_prompts("text", cfg.prompts_dir or None)
    client = make_client(None)
    meta = dict(model=client.model, prompt_version=version)

    # 1. Labels, a chunk at a time, appended as they come (the file is the progress record).
    labels_path = out / "doc_labels.jsonl"

    def label(chunk, n_done):
        return label_documents(chunk, client, text_prompts, cfg, tokenizer, meta,
                               desc=f"label documents {n_done + 1}-{n_done + len(chunk)}")
    labels, n_new = documents.label_resumably(stream(), labels_path, cfg.chunk_docs, label)
    freqs = {"input": behavior_frequencies(labels)}
    n_failed = sum(1 for l in labels if l.get("failed"))
    summary = dict(n_docs=len(labels), labelled_this_run=n_new, frequencies=freqs,
                   failed_docs=n_failed)
    if cfg.problem_filter:
        summary["problem_solution"] = dict(
            both=sum(1 for l in labels if l.get("problem") is True and l.get("solution") is True),
            no_problem=sum(1 for l in labels if l.get("problem") is False),
            no_solution=sum(1 for l in labels if l.get("solution") is False),
            unknown=sum(1 for l in labels if l.get("problem") is None or l.get("solution") is None))
    if n_failed:
        print(f"{n_failed} document(s) had failed requests (fields null); rerun to retry them",
              file=sys.stderr)
    if stop_after == "label":
        study_report.print_frequencies(freqs, summary, BEHAVIORS)
        return summary

    # 2. Selection: each pool in a seeded random order, then first fit under one shared cap.
    # Token unit: the truncated document text (what the judge saw and what gets rewritten), in
    # tokens of --tokenizer without special tokens (whitespace words only with --tokenizer words).
    pools = dict(zip(("rich", "minimal"), eligible(labels, cfg)))
    for name, pool in pools.items():
        random.Random(f"{cfg.seed}:{name}").shuffle(pool)
    cap = cfg.budget_tokens
    if cfg.equal_budgets:
        cap = min([cap] + [sum(l["tokens"] for l in pool) for pool in pools.values()])
        empty = [name for name, pool in pools.items() if not pool]
        if empty:
            print(f"warning: no {' or '.join(empty)} documents under the thresholds, so the shared "
                  "budget is 0; loosen --rich-min-total / --minimal-max-total or pass "
                  "--unequal-budgets", file=sys.stderr)
    selected = {}
    for name, pool in pools.items():
        idx = select_within_budget(pool, [l["tokens"] for l in pool], cap)
        selected[name] = [pool[i] for i in idx]
        freqs[f"selected {name}"] = behavior_frequencies(selected[name])
    files.write_jsonl(out / "selection.jsonl",
                          [dict(id=l["id"], set=name, tokens=l["tokens"])
                           for name, sel in selected.items() for l in sel])
    summary["selection"] = {name: dict(eligible=len(pools[name]), selected=len(sel),
                                       tokens=sum(l["tokens"] for l in sel), cap=cap)
                            for name, sel in selected.items()}
    for name, s in summary["selection"].items():
        print(f"{name:>8}: {s['eligible']} eligible, {s['selected']} selected, "
              f"{s['tokens']} / {cap} document tokens")
    if stop_after == "select":
        study_report.print_frequencies(freqs, summary, BEHAVIORS)
        return summary

    # 3. Rewrites, a chunk at a time, from a second pass over the input.
    set_of = {str(l["id"]): name for name, sel in selected.items() for l in sel}
    rewriter = make_client(cfg.rewrite_max_tokens)
    parsed = {}

    def wanted():
        for d in stream():
            if str(d["id"]) in set_of:
                yield d
    for chunk in documents.chunks(wanted(), cfg.chunk_docs):
        texts = [truncate_document(d["text"], tokenizer, cfg.max_doc_tokens, cfg.max_doc_chars)[0]
                 for d in chunk]
        replies = rewriter.complete([(None, rewrite_request(t, set_of[str(d["id"])]))
                                     for d, t in zip(chunk, texts)], desc="rewrite")
        for d, r in zip(chunk, replies):
            parsed[str(d["id"])] = (None, r.error) if r.text is None else parse_rewrite(r.text)
    sft, rejects = {}, []
    for name, sel in selected.items():
        rows = []
        for l in sel:
            ex, reason = parsed.get(str(l["id"]), (None, "document not found on the second pass"))
            if ex is None:
                rejects.append(dict(id=l["id"], set=name, reason=reason))
                continue
            rows.append(dict(ex, id=l["id"], set=name,
                             tokens=traces.count_tokens(ex["query"] + ex["completion"], tokenizer)))
        sft[name] = rows
    # The same cap once more on the examples we train on (query + completion tokens): rewriting
    # changes lengths, and both sets must stay within one budget.
    final_cap = cap
    if cfg.equal_budgets:
        final_cap = min([cap] + [sum(r["tokens"] for r in rows) for rows in sft.values()])
    for name, rows in sft.items():
        rows = [rows[i] for i in select_within_budget(rows, [r["tokens"] for r in rows], final_cap)]
        if cfg.label_rewrites:  # what the model will actually see: Figure 7's rewritten rows
            for chunk in documents.chunks(rows, cfg.chunk_docs):
                res = classify.judge_behaviors([dict(response=_rewrite_text(r)) for r in chunk],
                                               client, text_prompts, desc=f"label rewrites {name}")
                for r, x in zip(chunk, res):
                    r["behaviors"] = x["behaviors"]
            freqs[f"rewritten {name}"] = behavior_frequencies(rows)
        files.write_jsonl(out / f"sft_{name}.jsonl", rows)
        summary.setdefault("sft", {})[name] = dict(examples=len(rows), cap=final_cap,
                                                   tokens=sum(r["tokens"] for r in rows))
        print(f"{name:>8}: {len(rows)} SFT examples, {summary['sft'][name]['tokens']} / "
              f"{final_cap} tokens -> {out / f'sft_{name}.jsonl'}")
    if rejects:
        files.write_jsonl(out / "rewrite_rejects.jsonl", rejects)
        print(f"{len(rejects)} rewrite(s) failed or unusable -> {out / 'rewrite_rejects.jsonl'}",
              file=sys.stderr)
    reasons = {}
    for r in rejects:
        key = r["reason"].split(":")[0] if r["reason"] else "unknown"
        reasons[key] = reasons.get(key, 0) + 1
    summary["rewrite_rejects"] = len(rejects)
    summary["rewrite_reject_reasons"] = reasons
    study_report.print_frequencies(freqs, summary, BEHAVIORS)
    return summary


def _rewrite_text(row):
    """The rewritten example as the judge reads it: the question, then the completion."""
    head, tail = QA_QUERY_TEMPLATE.split("{question}")
    return f"{row['query'][len(head):-len(tail)]}\n\n<think>{row['completion']}"


# ----- plumbing below: the command line (priming, controls, pretrain), main -----


def _cmd_priming(args):
    conds = PRIMING_CONDITIONS if args.condition == "all" else (args.condition,)
    for c in conds:
        if c not in PRIMING_SYSTEM_PROMPTS:
            raise ValueError(f"unknown condition {c!r}; choose one of "
                             f"{', '.join(PRIMING_CONDITIONS)} or all")
    out = Path(args.out)
    with files.lock_dir(out, "curate.py output folder"):  # one live writer per folder and judge cache
        return _priming_into(args, conds, out)


def _priming_into(args, conds, out):
    client = JudgeClient(judge_config_from_args(args, out / "judge_cache.jsonl"))
    for c in conds:
        cfg = dict(condition=c, n=args.n, seed=args.seed, judge=args.judge,
                   base_url=client.base_url, model=client.model, temperature=args.temperature,
                   max_tokens=args.max_tokens,
                   system_prompt_sha=hashlib.sha256(
                       PRIMING_SYSTEM_PROMPTS[c].encode()).hexdigest()[:12])
        judge_http.guard_run_config(out / f"{c}.config.json", cfg, args.overwrite)
        rows, rejects = generate_priming(c, args.n, client, seed=args.seed)
        files.write_jsonl(out / f"{c}.jsonl", rows)
        if rejects:
            files.write_jsonl(out / f"{c}.rejects.jsonl", rejects)
        acc = sum(countdown.is_correct(r["completion"], r["nums"], r["target"]) for r in rows)
        mean_score = sum(r["score"] for r in rows) / len(rows) if rows else float("nan")
        print(f"{c}: {len(rows)}/{args.n} examples -> {out / f'{c}.jsonl'}; accuracy "
              f"{acc / max(1, len(rows)):.3f}, mean reward {mean_score:.3f} (with 0.1 format "
              f"credit); {len(rejects)} rejected")
        if len(rows) < args.n:
            print(f"  only {len(rows)} of {args.n}: rerun the same command to retry failed "
                  f"requests (see {out / f'{c}.rejects.jsonl'})", file=sys.stderr)
    return 0


def _cmd_controls(args):
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out} exists; choose another --out or pass --overwrite")
    rows = files.read_jsonl(args.input)
    bad = [i for i, r in enumerate(rows) if "query" not in r or "completion" not in r]
    if bad:
        raise ValueError(f"{args.input} row {bad[0] + 1} lacks query/completion; expected the "
                         "SFT JSONL written by `curate.py priming`")
    if args.kind == "empty_cot":
        new, dropped = empty_cot(rows), 0
    elif args.kind == "dots":
        new, dropped = dots(rows, load_tokenizer(args.tokenizer))
    elif args.kind == "coat":
        new, dropped = coat(rows)
    else:
        new = no_positive(rows)
        dropped = len(rows) - len(new)
    new = [dict(r, condition=args.kind) for r in new]  # the names of traces.CONDITIONS
    files.write_jsonl(out, new)
    print(f"{args.kind}: {len(new)} of {len(rows)} examples -> {out} ({dropped} dropped)")
    return 0


def _cmd_pretrain(args):
    with files.lock_dir(args.out, "curate.py output folder"):  # one live writer per folder and judge cache
        return _pretrain_into(args)


def _pretrain_into(args):
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.chunk_docs < 1:
        raise ValueError("--chunk-docs must be at least 1")
    cfg = PretrainConfig(text_field=args.text_field, id_field=args.id_field,
                         max_doc_tokens=args.max_doc_tokens, max_doc_chars=args.max_doc_chars,
                         rich_min_total=args.rich_min_total,
                         rich_require=tuple(b for b in args.rich_require.split(",") if b),
                         minimal_max_total=args.minimal_max_total,
                         budget_tokens=args.budget_tokens, equal_budgets=not args.unequal_budgets,
                         seed=args.seed, rewrite_max_tokens=args.rewrite_max_tokens,
                         prompts_dir=args.prompts_dir, problem_filter=not args.no_problem_filter,
                         chunk_docs=args.chunk_docs, label_rewrites=not args.no_label_rewrites)
    run_cfg = dict(asdict(cfg), input=str(Path(args.input).resolve()), judge=args.judge,
                   base_url=args.base_url, model=args.model, temperature=args.temperature,
                   max_tokens=args.max_tokens, tokenizer=args.tokenizer)
    run_cfg["rich_require"] = list(cfg.rich_require)
    del run_cfg["chunk_docs"]  # how requests are batched never changes a result
    judge_http.guard_run_config(out / "config.json", run_cfg, args.overwrite)
    tokenizer = load_budget_tokenizer(args.tokenizer)
    if tokenizer is None:
        print("[curate] --tokenizer words: truncation is by characters and the budget counts "
              "whitespace words, not tokens", file=sys.stderr)
    base = judge_config_from_args(args, out / "judge_cache.jsonl")

    def make_client(max_tokens):
        c = base if max_tokens is None else judge_http.JudgeConfig(**dict(asdict(base),
                                                                        max_tokens=max_tokens))
        return JudgeClient(c)

    def docs():
        return iter_documents(args.input, cfg.text_field, cfg.id_field)
    next(docs(), None)  # bad input fails here, before any request
    summary = curate_pretraining(docs, make_client, cfg, out, tokenizer, args.stop_after)
    files.write_text_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return 0


def build_parser():
    fmt = judge_http.HelpFormatter
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=fmt)
    sub = p.add_subparsers(dest="command", required=True)

    q = sub.add_parser("priming", formatter_class=fmt,
                       help="generate priming traces for a condition with an LLM")
    q.add_argument("--condition", required=True,
                   help=f"one of {', '.join(PRIMING_CONDITIONS)}, or all")
    q.add_argument("--n", type=int, default=1200,
                   help="usable examples per condition (the paper trained on 1,000 and validated "
                        "on 200; failed or malformed answers are replaced by further problems)")
    q.add_argument("--seed", type=int, default=0, help="seed of countdown.generate_problems")
    q.add_argument("--out", default="data/priming",
                   help="folder for <condition>.jsonl, rejects and the request cache")
    q.add_argument("--overwrite", action="store_true",
                   help="allow replacing results made with other settings")
    add_judge_args(q, default_api="anthropic", temperature=0.5, max_tokens=1024)

    c = sub.add_parser("controls", formatter_class=fmt,
                       help="empty_cot / dots / no_positive controls, or coat, from a generated set")
    c.add_argument("--input", required=True, help="SFT JSONL from `curate.py priming`")
    c.add_argument("--kind", required=True, choices=DERIVED,
                   help="empty_cot: thoughts emptied; dots: thoughts -> N ' .' (N = think tokens); "
                        "no_positive: keep every example scoring < 1; coat: Satori's meta-action "
                        "tokens at the step boundaries (from all_strategies)")
    c.add_argument("--out", required=True, help="output JSONL")
    c.add_argument("--tokenizer", default="",
                   help="tokenizer.json (or its folder) to count think tokens for dots; default: "
                        "whitespace-separated words")
    c.add_argument("--overwrite", action="store_true", help="replace an existing --out")

    t = sub.add_parser("pretrain", formatter_class=fmt,
                       help="label, select, budget-cap and rewrite pretraining documents")
    t.add_argument("--input", required=True,
                   help="documents: JSONL, or parquet (needs the optional pyarrow), or a folder; "
                        "read as a stream")
    t.add_argument("--out", required=True, help="output folder (resumable)")
    t.add_argument("--text-field", default="text", help="field holding the document text")
    t.add_argument("--id-field", default="id", help="field holding a unique document id")
    t.add_argument("--tokenizer", default="llama-3.2-3b",
                   help="tokenizer for truncation and the token budget: a tokenizer.json, its "
                        "folder, or a model alias / Hub id (default: the model the data is for, "
                        "taken from the HF cache or downloaded). 'words' counts whitespace words "
                        "and truncates by characters instead")
    t.add_argument("--max-doc-tokens", type=int, default=3072,
                   help="truncate documents to this many tokens")
    t.add_argument("--max-doc-chars", type=int, default=12000,
                   help="truncate documents to this many characters (with --tokenizer words)")
    t.add_argument("--no-problem-filter", action="store_true",
                   help="skip the paper's problem/solution question (one request per document) "
                        "and let documents without a worked problem into both sets")
    t.add_argument("--chunk-docs", type=int, default=1000,
                   help="documents per chunk: requests are rendered and sent a chunk at a time, "
                        "and labels are saved after each chunk (a rerun skips finished ones)")
    t.add_argument("--no-label-rewrites", action="store_true",
                   help="do not count behaviors in the rewritten sets (saves 4 requests per "
                        "SFT example; their Figure 7 rows are then missing)")
    t.add_argument("--prompts-dir", default="",
                   help="folder with text_<behavior>.txt or the original *_v0.txt prompt files, "
                        "and text_problem_solution.txt ({response} placeholder)")
    t.add_argument("--rich-min-total", type=int, default=2,
                   help="behavior-rich set: the four counts sum to at least this")
    t.add_argument("--rich-require", default="",
                   help="comma-separated behaviors that must each be > 0 in rich documents, e.g. "
                        "backtracking (the paper's curated source was called 'backtrack')")
    t.add_argument("--minimal-max-total", type=int, default=0,
                   help="behavior-minimized set: the four counts sum to at most this")
    t.add_argument("--budget-tokens", type=int, default=8_300_000,
                   help="both sets are capped at this many tokens: first on the truncated "
                        "documents, then on the SFT examples (query + completion)")
    t.add_argument("--unequal-budgets", action="store_true",
                   help="do not shrink the larger set to the smaller set's token total")
    t.add_argument("--seed", type=int, default=0, help="order in which documents fill the budget")
    t.add_argument("--rewrite-max-tokens", type=int, default=5120,
                   help="max tokens of each rewrite answer (labelling uses --max-tokens)")
    t.add_argument("--stop-after", choices=("", "label", "select"), default="",
                   help="stop after labelling (frequencies only) or after selection")
    t.add_argument("--overwrite", action="store_true",
                   help="allow replacing results made with other settings")
    add_judge_args(t, default_api="openai", temperature=0.0, max_tokens=1024)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    commands = {"priming": _cmd_priming, "controls": _cmd_controls, "pretrain": _cmd_pretrain}
    return run_judged_command(commands[args.command], args)


if __name__ == "__main__":
    sys.exit(main())
