"""Count cognitive behaviors in reasoning text with an LLM judge (or transparent rules).

The paper measures four behaviors (verification, backtracking, subgoal setting, backward chaining)
in the completions of every PPO checkpoint: gpt-4o-mini reads each completion four times, once per
behavior, and answers with a count between <count> </count> tags. This file holds, in reading order:

1. the judge request over raw HTTP (`requests`, no SDKs) for any OpenAI-compatible
   /v1/chat/completions server (OpenAI, vLLM, llama.cpp, Ollama) and Anthropic's /v1/messages:
   the URL, headers and JSON body of one request, and how its answer is read (a refusal or an
   answer cut at max_tokens is a failure with its reason, never an answer);
2. the four behavior prompts for Countdown (paper section 4.2) and for math web text (4.3), in our
   own wording, overridable from files (--prompts-dir) so the originals can be dropped in;
3. count parsing;
4. `--judge rules`: an offline rule-based counter whose rules are listed below (exact on
   countdown.py's synthetic traces, approximate on natural wording: biased across models);
5. per-step labels and summaries (average counts, missing answers, accuracy) to CSV and JSON,
   `--score-against` (precision / recall / mean absolute error of any judge against ground truth),
   and what the study report measures in each validation completion of a PPO run.

Below the plumbing line, the command line: `classify.py` labels completions, `classify.py report`
gathers PPO run folders into results.json, a table and figures, and `classify.py view` writes one
self-contained HTML page of sampled completions, each sentence tinted by its behavior (report writes
one too). The machinery is in plumbing/: judge_http.py (retries, rate limit, cache and threads of the
judge client; the judge flags), report.py (seeds pooled, gates, tables, figures) and view.py (the
page); each takes what it needs from this file as arguments.

Simplifications and fixes relative to the original code (paper_spec D-E1..D-E7):
* synchronous requests with our own retries instead of the OpenAI Batch API (works with any server);
* temperature 0 by default (D-E2), sampling of N completions per step is seeded (D-E2, D-P8);
* `<count>\\s*(\\d+)\\s*</count>` tolerates whitespace, and an unparsable answer is *missing*, not 0,
  and is reported per step (D-E3); the four behaviors have one name each everywhere (D-E4);
* the judge sees the completion as the model wrote it, without an "Assistant:" prefix (D-E7);
* accuracy is reported both over every completion of a step and over the judged sample (D-E2).
"""

import json
import os
import random
import re
import sys
import time
from pathlib import Path

import countdown
import traces
from plumbing import files, judge_http
from plumbing import report as study_report
from plumbing import view as study_page
from plumbing.files import write_text_atomic
from plumbing.judge_http import (JudgeConfig, guard_run_config, judge_config_from_args, normalize_base_url,
                                 render_prompt, run_judged_command)
from plumbing.judge_http import build_label_parser as build_parser
from plumbing.report import load_completions
from plumbing.view import write_view

BEHAVIORS = traces.BEHAVIORS  # ("verification", "backtracking", "subgoal", "backward")

# -----------------------------------------------------------------------------------------------
# 1. The judge: one request over raw HTTP
#
# A request is a JSON body POSTed to the API's endpoint with the key in a header; the answer is the
# text of the first choice (OpenAI) or the text blocks (Anthropic). JudgeClient says exactly that and
# nothing more; plumbing/judge_http.ResilientClient, its base class, sends many such requests with
# retries, a rate limit, a deadline, a cache and threads: `client.complete([(system, user), ...])`
# returns one Reply(text, error, cached, tokens) per prompt, in order. JudgeConfig (plumbing too) holds
# the settings: API, model, temperature, max_tokens, and the client's concurrency, retries and cache.

# The paper's models: gpt-4o-mini judged Countdown completions, Claude 3.5 Sonnet wrote priming data.
API_DEFAULTS = {
    "openai": dict(base_url="https://api.openai.com", model="gpt-4o-mini",
                   api_key_env="OPENAI_API_KEY"),
    "anthropic": dict(base_url="https://api.anthropic.com", model="claude-3-5-sonnet-20241022",
                      api_key_env="ANTHROPIC_API_KEY"),
}
ANTHROPIC_VERSION = "2023-06-01"


class JudgeClient(judge_http.ResilientClient):
    """The judge's wire format: where a request goes, its headers and JSON body, the raw HTTP call,
    and how the answer is read. complete(prompts) -> [Reply] comes from ResilientClient."""

    def __init__(self, cfg: JudgeConfig):
        if cfg.api not in API_DEFAULTS:
            raise ValueError(f"unknown judge API {cfg.api!r}; choose one of {sorted(API_DEFAULTS)}")
        d = API_DEFAULTS[cfg.api]
        self.base_url = normalize_base_url(cfg.base_url or d["base_url"])
        self.model = cfg.model or d["model"]
        self.key_env = cfg.api_key_env or d["api_key_env"]
        path = "/v1/chat/completions" if cfg.api == "openai" else "/v1/messages"
        self.endpoint = self.base_url + path
        super().__init__(cfg, key=os.environ.get(self.key_env) or None)

    def _headers(self):
        h = {"content-type": "application/json"}
        if self.cfg.api == "anthropic":
            h["anthropic-version"] = ANTHROPIC_VERSION
            if self._key:
                h["x-api-key"] = self._key
        elif self._key:
            h["authorization"] = f"Bearer {self._key}"
        return h

    def _body(self, system, user):
        if self.cfg.api == "anthropic":
            body = dict(model=self.model, max_tokens=self.cfg.max_tokens,
                        temperature=self.cfg.temperature,
                        messages=[{"role": "user", "content": user}])
            if system:
                body["system"] = system
            return body
        msgs = ([{"role": "system", "content": system}] if system else [])
        msgs.append({"role": "user", "content": user})
        return dict(model=self.model, messages=msgs, temperature=self.cfg.temperature,
                    max_tokens=self.cfg.max_tokens)

    def _send(self, session, body):
        """The raw HTTP call: POST the body, then read the whole answer within cfg.timeout seconds
        (requests' own timeout bounds each socket wait, not a server that trickles bytes)."""
        t0 = time.monotonic()
        r = session.post(self.endpoint, headers=self._headers(), json=body, timeout=self.cfg.timeout,
                         stream=True)
        try:
            judge_http.read_body_within(r, t0 + self.cfg.timeout)
        finally:
            r.close()
        return r

    def _parse(self, data):
        """(text, tokens, problem) from a 200 response; problem is None, or ("refused", why) or
        ("truncated", why) when the answer is a refusal or was cut at max_tokens: neither is an
        answer to keep. KeyError/TypeError/IndexError/AttributeError if the body is malformed."""
        limit = (f"hit max_tokens={self.cfg.max_tokens} (raise --max-tokens; a cut answer "
                 "is not kept)")
        if self.cfg.api == "anthropic":
            text = "".join(b["text"] for b in data["content"] if b.get("type") == "text")
            u = data.get("usage") or {}
            tokens = int(u.get("input_tokens", 0)) + int(u.get("output_tokens", 0))
            stop = data.get("stop_reason")
            if stop == "refusal":
                return None, tokens, ("refused", f"stop_reason refusal: {text[:200]!r}")
            if stop == "max_tokens":
                return None, tokens, ("truncated", f"stop_reason max_tokens: {limit}")
            return text, tokens, None
        choice = data["choices"][0]
        msg, finish = choice["message"], choice.get("finish_reason")
        u = data.get("usage") or {}
        tokens = int(u.get("total_tokens") or (u.get("prompt_tokens", 0)
                                               + u.get("completion_tokens", 0)))
        # a refusal comes as content null plus a "refusal" text, or as finish_reason
        # content_filter; both are the server's decision about this prompt, not an answer
        if msg.get("refusal") or finish == "content_filter":
            why = msg.get("refusal") or "finish_reason content_filter"
            return None, tokens, ("refused", self.scrub(str(why))[:200])
        text = msg["content"]
        if not isinstance(text, str):
            raise TypeError("message content is not a string")
        if finish == "length":
            return None, tokens, ("truncated", f"finish_reason length: {limit}")
        return text, tokens, None


# -----------------------------------------------------------------------------------------------
# 2. Behavior prompts
#
# Countdown (paper section 4.2): the same frame for all four behaviors, then one instruction with
# the paper's criterion and the same kinds of examples, reworded. Placeholders: {numbers} (Python
# list repr), {target}, {completion}, {target//2}. Math web text (section 4.3): a markdown task
# with {response}. Rendering replaces only these names (and unescapes {{ }}), so the original
# prompt files - f-strings pasted into a file, or the str.format templates - load unchanged.

CLASSIFY_SYSTEM = "You are a careful assistant that analyzes mathematical reasoning."

_COUNTDOWN_FRAME = (
    "Below is a chain of reasoning that a language model wrote while playing the game Countdown "
    "with the numbers {numbers}. The goal is to reach the target number {target}.\n"
    "The model's chain of reasoning:\n<reasoning>\n{completion}\n</reasoning>\n\n")
_COUNT_ASK = ("Give the count between the tags <count> </count>. If there are none, answer "
              "<count>0</count>.")

COUNTDOWN_PROMPTS = {
    "verification": _COUNTDOWN_FRAME + (
        "Does the reasoning contain answer-verification steps? We mean places where the model "
        "explicitly checks a result it computed against the target number. Explicit checks look "
        "like 'That gives 1, which is not equal to 22' or 'Since 25 is not 22, ...'; implicit "
        "ones look like 'Too high!' or 'This works!'. Count every such check. " + _COUNT_ASK),
    "backtracking": _COUNTDOWN_FRAME + (
        "Does the reasoning contain backtracking, where the model realizes a path will not work "
        "and explicitly goes back to try a different approach? In this game, every new attempt "
        "with a combination of numbers that does not build on the result of the previous "
        "computation counts as backtracking. For example, with the numbers [6, 4, 9, 2] and the "
        "target 15, the reasoning \"6 + 4 = 10, 10 + 9 = 19. 9 - 6 = 3, 3 * 4 = 12, 12 + 2 = 14. "
        "9 * 2 = 18, 18 - 4 = 14. (9 + 6) * (4 / 2) = 30\" contains 3 instances of backtracking: "
        "each of the last three attempts starts again from the initial numbers instead of "
        "continuing from the previous result. Count the distinct backtracking instances. "
        + _COUNT_ASK),
    "subgoal": _COUNTDOWN_FRAME + (
        "Does the reasoning contain explicit subgoal setting, where the model breaks the problem "
        "into smaller intermediate goals? An example is \"First I'll try to get close to "
        "{target//2}, then ...\", or \"Let's reach 12 first, since it is a factor of 24\". "
        "Count the distinct subgoals that are set. " + _COUNT_ASK),
    "backward": _COUNTDOWN_FRAME + (
        "Does the reasoning contain backward chaining, where the model starts from the target "
        "number and works backwards towards the initial numbers? With the target 24 and the "
        "numbers 12 and 2, an example is \"Working back from the target: 24 / 2 = 12, so "
        "12 * 2 = 24.\"; with the target 22 and the numbers 25 and 3 it is \"The target is 22, "
        "and 22 + 3 = 25, so ...\". Count the distinct backward-chaining instances. "
        + _COUNT_ASK),
}


def _text_prompt(name, definition, examples, thoughts_hint, question, count_title):
    lines = "\n".join(f"- \"{e}\"" for e in examples)
    return (
        "# Task\nYou will read a piece of text taken from the internet. " + definition + "\n\n"
        f"In mathematical writing, {name} can look like:\n{lines}\n\n"
        f"Count the distinct instances of {name} and give the number between the tags "
        "<count> </count>. If there are none, answer <count>0</count>.\n\n"
        "# Answer format\nAnswer in markdown:\n\n"
        f"## Thoughts\n[{thoughts_hint}]\n\n## {question}\n[yes/no]\n\n"
        f"## {count_title}\n<count> N </count>\n\n"
        "# Text to evaluate\n{response}\n\n# Answer\n")


TEXT_PROMPTS = {
    "verification": _text_prompt(
        "verification",
        "Decide whether it contains verification steps: places where the writer explicitly "
        "checks their own work, for example by comparing a result with a known value or by "
        "re-checking a calculation.",
        ["Plugging x = 2 back into the original equation gives 4 + 4 = 8, as required.",
         "Differentiating our answer gives back the integrand, so the integral is right.",
         "Check a small case: for n = 2 the formula gives 3, and counting by hand also gives 3.",
         "Both roots satisfy the condition x > 0, so neither has to be discarded."],
        "where, briefly, the writer checks their work", "Does the text contain verification?",
        "Number of verification steps"),
    "backtracking": _text_prompt(
        "backtracking",
        "Decide whether it contains backtracking: places where the writer realizes a path will "
        "not work and explicitly goes back to try a different approach, such as \"let me try "
        "again\", \"wait\", \"I made a mistake\" or \"we need a different approach\". Mark the "
        "places where the writer abandons a line of thought and returns to an earlier point.",
        ["Substitution leads nowhere here; let's go back and integrate by parts instead.",
         "This gives 0 = 1, a contradiction, so the assumption was wrong. Back to the original "
         "equation.",
         "Oops, I dropped a sign in the second line. Redoing the computation from there:",
         "Expanding makes it worse; instead, let's factor the numerator."],
        "where, briefly, the writer backtracks", "Does the text contain backtracking?",
        "Number of backtracking steps"),
    "subgoal": _text_prompt(
        "subgoal setting",
        "Decide whether it contains explicit subgoal setting: places where the writer breaks "
        "the problem into smaller, intermediate goals.",
        ["First we find the derivative, and then we look for the points where it vanishes.",
         "To solve the system, we first express y in terms of x from the first equation, then "
         "substitute it into the second.",
         "The proof has three steps: the base case, the induction hypothesis, the inductive step.",
         "We simplify the integrand with a substitution first, and then apply the power rule."],
        "where, briefly, the writer sets subgoals", "Does the text contain subgoal setting?",
        "Number of subgoals"),
    "backward": _text_prompt(
        "backward chaining",
        "Decide whether it contains backward chaining: places where the writer works towards a "
        "goal by starting from the goal and reasoning backwards to what is given.",
        ["We want to show x = 4. Working backwards, x = 4 requires x^2 - 5x + 4 = 0, so let's "
         "check that this equation holds.",
         "We need a function whose derivative is 2x + 3; starting from that, x^2 + 3x + C works.",
         "For the triangle to be right-angled we need c^2 = a^2 + b^2, so let's see whether the "
         "side lengths satisfy it.",
         "The maximum is where f'(x) = 0, so we start from that condition and solve for x.",
         "The ball must reach 20 m; working back from that height with h = vt - gt^2/2 gives "
         "the initial speed v."],
        "where, briefly, the writer reasons backwards from a goal",
        "Does the text contain backward chaining?", "Number of backward-chaining instances"),
}

# Drop-in names: ours (countdown_<b>.txt, text_<b>.txt), and for math text the original repo's
# pretraining_analysis/prompts/*_v0.txt file names.
_PROMPT_FILES = {
    "countdown": {b: [f"countdown_{b}.txt"] for b in BEHAVIORS},
    "text": {"verification": ["text_verification.txt", "verification_v0.txt"],
             "backtracking": ["text_backtracking.txt", "backtracking_v0.txt"],
             "subgoal": ["text_subgoal.txt", "subgoal_setting_v0.txt"],
             "backward": ["text_backward.txt", "backward_chaining_v0.txt"]},
}
_REQUIRED_FIELD = {"countdown": "{completion}", "text": "{response}"}


def load_prompts(kind="countdown", prompts_dir=None):
    """-> ({behavior: template}, prompt_version). Files in prompts_dir override the built-ins."""
    if kind not in _PROMPT_FILES:
        raise ValueError(f"unknown prompt kind {kind!r}; choose countdown or text")
    builtin = COUNTDOWN_PROMPTS if kind == "countdown" else TEXT_PROMPTS
    return judge_http.load_prompt_files(kind, builtin, _PROMPT_FILES[kind], _REQUIRED_FIELD[kind], prompts_dir)


def dump_prompts(out_dir):
    """Write the built-in prompts as editable files (refuses to overwrite)."""
    prompt_files = {f"countdown_{b}.txt": t for b, t in COUNTDOWN_PROMPTS.items()}
    prompt_files.update({f"text_{b}.txt": t for b, t in TEXT_PROMPTS.items()})
    return judge_http.dump_prompt_files(out_dir, prompt_files)


# -----------------------------------------------------------------------------------------------
# 3. Counting with a judge

_COUNT_RE = re.compile(r"<count>\s*(\d+)\s*</count>")


def parse_count(text):
    """First <count> N </count> in the answer -> N; None (missing, not 0) when there is none."""
    if not text:
        return None
    m = _COUNT_RE.search(text)
    return int(m.group(1)) if m else None


def judge_behaviors(field_dicts, client, prompts, system=None, desc="judge"):
    """Ask the judge about every behavior of every item.

    field_dicts: one dict of placeholder values per item. Returns one dict per item:
    {"behaviors": {b: int | None}, "failed": {b: reason}, "missing": [b ...], "raw": {b: text}}.
    """
    reqs = [(system, render_prompt(prompts[b], **fields))
            for fields in field_dicts for b in BEHAVIORS]
    replies = client.complete(reqs, desc=desc)
    out = []
    for i in range(len(field_dicts)):
        rec = dict(behaviors={}, failed={}, missing=[], raw={})
        for j, b in enumerate(BEHAVIORS):
            r = replies[i * len(BEHAVIORS) + j]
            if r.text is None:
                rec["behaviors"][b] = None
                rec["failed"][b] = r.error
                continue
            rec["raw"][b] = r.text
            rec["behaviors"][b] = parse_count(r.text)
            if rec["behaviors"][b] is None:
                rec["missing"].append(b)
        out.append(rec)
    return out


# -----------------------------------------------------------------------------------------------
# 4. The rule-based judge: transparent regexes, no server.
#
# Scope, honestly: these rules are a cheap, offline, deterministic counter. They are exact on
# countdown.py's synthetic traces (every behavior there carries one of the marker phrases of
# traces.BEHAVIOR_PHRASES, which the patterns below include), and on hand-written natural
# Countdown reasoning they find most but not all instances (precision and recall per behavior on
# tests/behavior_snippets.jsonl are in the README). They read Countdown arithmetic, not general
# math text. Different models word the same behavior differently, so counts from the rules are
# biased when two models are compared: use an LLM judge for that (run_all.sh paper does).
#
# How a completion is counted. The text is cut into sentences (at . ! ? followed by a space, and
# at line breaks); a sentence counts at most once per behavior:
#   verification  a sentence with an explicit or implicit check of a result against the target
#                 ("is not 22", "too high", "one short", "that's it", "matches", "let me verify");
#   backtracking  a sentence that abandons a path ("scratch that", "let me reconsider", "back to
#                 the start"; "what about / how about / alternatively" only once an attempt has
#                 been made), OR, per the paper's judge prompt, a bare new attempt: an equation
#                 "a op b = c" whose two operands are both given numbers and reuses one that the
#                 current attempt already consumed (so it cannot continue that attempt), when no
#                 backtracking sentence announced it since the previous equation. Steps whose
#                 operands are neither given nor computed ("because 5 * 2 = 10") are not attempts;
#   subgoal       a sentence that sets an intermediate number to reach ("get 12 first", "aim for",
#                 "a stepping stone", "if I can make 12"); a number equal to the target is not a
#                 subgoal, and a plain plan ("First, multiply 6 by 2 to get 12") is not one;
#   backward      a sentence that reasons from the target ("work backwards", "the last step must
#                 be ... so I need", "to end at 35"), or an equation that starts from the target
#                 ("22 + 3 = 25", "35 = 5 * 7"), unless an earlier step already produced the target
#                 (then "25 * 4 = 100" continues forward from it).
# The equation-based and target-based parts need the problem's nums and target; without them
# only the phrase patterns run.

RULES_VERSION = "rules-v2"
_N = r"-?\d+(?:\.\d+)?"
RULES = {
    "verification": [
        rf"\b(?:is|was|are)\s*(?:not|n't)\s+(?:equal\s+to\s+|quite\s+)?(?:the\s+)?(?:target|goal|{_N})",
        rf"'s\s+not\s+(?:the\s+target|{_N})", rf"^\W*not\s+(?:the\s+target|{_N})\b",
        r"\bnot\s+equal\s+to\b", r"\bdoes\s*(?:not|n't)\s+(?:equal|match|reach)\b", r"≠|!=",
        r"\btoo\s+(?:high|low|big|small|large|much|little|many|few)\b",
        r"\b(?:over|under|short|off|out)\s+by\s+(?:\d+|one|two|three|a\s+(?:little|bit))\b",
        r"\b(?:one|two|three|\d+)\s+(?:short|too\s+many|too\s+few)\b",
        r"\b(?:more|less|fewer)\s+than\s+(?:we|I)\s+need", r"\bexceeds?\b",
        r"\b(?:more|less|bigger|smaller|larger|higher|lower|greater)\s+than\s+(?:the\s+target|"
        r"our\s+target|the\s+goal|needed|\d+)",
        r"\b(?:overshoot|overshot|undershoot|undershot)\b",
        r"\b(?:this|that|it)\s+works\b", r"\bmatch(?:es|ed)?\b",
        r"\b(?:equals?|reach(?:es|ed)?|hits?|match(?:es)?|gives(?:\s+us)?)\s+(?:the|our)\s+(?:target|goal)\b",
        r"\b(?:which|that|it)\s+is\s+(?:exactly\s+)?(?:the\s+|our\s+)?(?:target|goal)\b",
        r"\b(?:hits?|reach(?:es)?|gives?|makes?)\s+\d+\s+exactly\b",
        r"\b(?:exactly\s+)?what\s+(?:we|I)\s+(?:want|need)(?:ed)?\b",
        r"\b(?:that'?s|this\s+is|it'?s)\s+(?:it|the\s+target|our\s+(?:target|number|goal))\b",
        r"\bour\s+number\b", r"\bas\s+(?:required|needed|desired)\b",
        r"\bgoal\s+(?:has\s+been|is)\s+reached\b", r"\bverif(?:y|ies|ied|ying|ication)\b",
        r"\b(?:let'?s|let\s+me|I'?ll|we)\s+check\s+(?:if|whether|that|it|this|the\s+(?:result|"
        r"answer|math|arithmetic|sum|product))\b", r"\bcheck(?:ing)?\s*:",
        r"\bdouble[- ]check", r"\bmake\s+sure\b", r"\bis\s+indeed\b", r"✓|✔",
        r"\bgo(?:ing)?\s+back\s+(?:over|through)\b", r"\ball\s+(?:the\s+)?steps\s+are\s+(?:right|correct)",
        r"\b\d+\s+is\s+(?:very\s+|quite\s+)?close\s+to\s+(?:the\s+)?(?:target|goal|\d+)",
        r"\bmiss(?:es|ed)?\s+the\s+(?:target|goal)\b", r"\bbingo\b", r"\bperfect\b", r"\bgot\s+it\b",
        r"^\W*(?:correct|right|yes|yep|nope|no|no\s+good|close|still\s+no)\b",
    ],
    "backtracking": [
        r"\b(?:let'?s|let\s+me|I'?ll|we'?ll|I\s+will|we\s+should|I\s+should)\s+try\s+"
        r"(?:a\s+|an\s+)?(?:different|another|other|something|again|new)\b",
        r"\btry(?:ing)?\s+(?:something\s+else|another|a\s+different|a\s+new|again)\b",
        r"\b(?:start|starting)\s+(?:over|again|fresh)\b", r"\bgo(?:ing)?\s+back\b(?!\s+(?:over|through))",
        r"\bback\s+to\s+(?:the\s+)?(?:start|beginning|drawing\s+board|original|initial)",
        r"\bback\s*track", r"\b(?:does|did|will|would)\s*(?:not|n't)\s+work\b", r"\bwon'?t\s+work\b",
        r"\bdead\s+end\b", r"\bno\s+luck\b", r"\b(?:that|this)\s+fails\b",
        r"\b(?:scrap|scratch)\s+(?:that|this)\b", r"\bsomething\s+else\b",
        r"\b(?:try|use|do)\b[^.!?]{0,40}\binstead\b(?!\s+of)", r"\breconsider\b",
        r"\bthink\s+again\b", r"\bwrong\s+(?:way|path|direction|track|approach)\b", r"\bdifferently\b",
        r"\bredo\b", r"\bchange\s+of\s+plan\b", r"\bundo\s+the\s+last\b",
        r"\banother\s+(?:approach|way(?!\s+to\s+(?:write|say|express|put))|combination|option|"
        r"sequence|pair|idea|attempt|possibility)\b",
        r"\bdifferent\s+(?:approach|combination|sequence|way|order)\b",
    ],
    "subgoal": [
        r"\bsub-?goals?\b", r"\bintermediate\s+(?:goal|target|value|result|step)\b",
        r"\baim(?:ing)?\s+(?:for|at)\s+\d+", r"\bget(?:ting)?\s+close\s+to\s+\d+",
        r"\b(?:try|trying|aim|want|need|going)\s+(?:to\s+)?(?:reach|get\s+to|get|make|obtain)\s+"
        r"\d+\s*(?:first|since|because|as|,\s*(?:since|because|as|which))",
        r"\bto\s+reach\s+\d+\s+(?:since|because|as)\b",
        r"\b(?:reach|get\s+to|get|make|hit|obtain|build)\s+(?:a\s+number\s+)?(?:near|close\s+to|"
        r"around)\s+\d+", r"\bstepping[- ]stone", r"\bbreak\s+(?:this|it|the\s+problem)\s+(?:down|into)\b",
        r"\b(?:target|goal)\s+for\s+the\s+(?:first|second|other|left|right)\b",
        r"\b(?:a\s+)?(?:factor|multiple|divisor)\s+of\s+the\s+target\b",
    ],
    "backward": [
        r"\bwork(?:ing|s|ed)?\s+back(?:wards?)?\b", r"\bbackwards?\s+from\b",
        r"\bfrom\s+the\s+(?:target|goal|end)\b", r"\bin\s+reverse\b",
        rf"\bsince\s+the\s+target\s+is\s+{_N}",
        r"\bto\s+(?:get|reach|make)\s+(?:the\s+target\s+)?\d+\s*,?\s*(?:I|we)\s+"
        r"(?:would\s+)?(?:need|could|can)\b",
        r"\b(?:the\s+)?target\s+\d+\s+(?:is|=|equals)\s+\d+\s*[-+*/x×]\s*\d+",
        r"\blast\s+(?:step|operation)\s+(?:must|has\s+to|should|would|will|is|could)\b",
        r"\bto\s+(?:finish|end)\s+(?:up\s+)?(?:at|with|on)\s+\d+", r"\bundo(?:ing)?\s+(?:the\s+)?operations\b",
    ],
}
# Patterns that name a number: the number must not be the target (reaching the target is the task,
# not a subgoal). Used only when the target is known.
_SUBGOAL_NUMBER = [re.compile(p, re.IGNORECASE) for p in (
    r"\b(?:reach|get\s+to|get|make|hit|obtain|build)\s+(?:a\s+)?(\d+)\s+first\b",
    r"\bfirst\s+(?:try\s+to\s+)?(?:reach|get\s+to|hit|make|obtain)\s+(?:a\s+)?(\d+)",
    r"\b(?:want|like|try(?:ing)?|aim(?:ing)?|plan)\s+to\s+(?:reach|get\s+to|get|make|hit|obtain|"
    r"build)\s+(?:a\s+)?(\d+)\b",
    r"\bif\s+(?:I|we)\s+can\s+(?:make|get|reach|build|obtain)\s+(?:a\s+)?(\d+)",
)]
# "12, a factor of 24": a number chosen for its relation to the target (the paper's example)
_FACTOR_OF = re.compile(r"\b(?:factor|multiple|divisor)\s+of\s+(\d+)", re.IGNORECASE)
# a re-computation inside a check ("Let me verify: 6 * 7 = 42") is not a new attempt
_RECHECK = re.compile(r"\bverif|\bdouble[- ]check|\bcheck(?:ing)?\s*:|\bmake\s+sure\b|\bindeed\b|"
                      r"\bgo(?:ing)?\s+back\s+(?:over|through)\b|✓|✔", re.IGNORECASE)
# "What about / how about / alternatively": a new attempt only once there was an attempt, and only
# if no backtracking sentence already announced it.
_SOFT_RESTART = re.compile(r"^\W*(?:what|how)\s+about\b|\bwhat\s+if\b|\balternatively\b",
                           re.IGNORECASE)
_RULES_RE = {b: [re.compile(p, re.IGNORECASE) for p in pats] for b, pats in RULES.items()}
_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+|\n+")
# one arithmetic step, symbolic ("12 * 4 = 48", not inside a longer expression) or in words: the
# grammar (four groups: a op b c, or op a b c) that traces.arithmetic_steps reads for the rules
_OP = r"[-+*/×x÷]"
_STEP_RE = [re.compile(p, re.IGNORECASE) for p in (
    rf"(?<![\d.)(*/+×÷-])(?<![\d.)(*/+×÷-]\s)(\d+)\s*({_OP})\s*(\d+)\s*(?:=|gives|is|makes)\s*(-?\d+)",
    rf"(?<![\d.)(*/+×÷-])(?<![\d.)(*/+×÷-]\s)(\d+)\s*({_OP})\s*(\d+)\s*\?\s*that\s+gives\s+(-?\d+)",
    r"(\d+)\s+(plus|minus|times|divided\s+by)\s+(\d+)\s+(?:is|gives|equals|makes)\s+(-?\d+)",
    r"(adding|multiplying|dividing)\s+(\d+)\s+(?:and|by)\s+(\d+)\s+gives\s+(-?\d+)",
    r"(subtracting)\s+(\d+)\s+from\s+(\d+)\s+leaves\s+(-?\d+)",
)]
# an equation that starts from the target: "T op n = m" or "T = a op b"; and the target as the
# result of a step ("= T", "gives T", "That is T"), after which "T op n" continues forward
_FROM_TARGET = r"(?<![\d.)(*/+×÷-])(?<![\d.)(*/+×÷-]\s){t}\s*(?:{op}\s*\d+\s*=|=\s*\d+\s*{op}\s*\d+)"
_AS_RESULT = r"(?:=|\bgives(?:\s+us)?|\bleaves|\bis|\bmakes|\bequals)\s*{t}\b(?!\s*(?:{op}|\.\d))"


def _steps(sentence):
    """[(operands, result, start)] of the arithmetic steps in a sentence, in order, read with the
    grammar above by traces.arithmetic_steps (the one reader of "a op b = c")."""
    return [((a, b), c, start) for a, _, b, c, start in traces.arithmetic_steps(sentence, _STEP_RE)]


def count_behaviors_rules(text, nums=None, target=None):
    """{behavior: number of sentences that show it}, by the rules above. nums and target (the
    problem) enable bare-restart backtracking and the target-aware subgoal/backward rules."""
    counts = dict.fromkeys(BEHAVIORS, 0)
    for _, hit in behavior_sentences(text, nums, target):
        for b in BEHAVIORS:
            counts[b] += hit[b]
    return counts


def behavior_sentences(text, nums=None, target=None) -> list:
    """[(sentence, {behavior: shown?})] in order: the rules' view of each sentence of text."""
    out = []
    given = {}
    for n in nums or ():
        given[int(n)] = given.get(int(n), 0) + 1
    t = None if target is None else int(target)
    from_target = as_result = None
    if t is not None and t not in given:
        from_target = re.compile(_FROM_TARGET.format(t=t, op=_OP))
        as_result = re.compile(_AS_RESULT.format(t=t, op=_OP), re.IGNORECASE)
    used, avail = {}, {}        # the current attempt: given numbers consumed, results available
    seen_step = announced = reached = False  # reached: a step has produced the target
    for sentence in _SENTENCE_SPLIT.split(text or ""):
        hit = {b: any(r.search(sentence) for r in _RULES_RE[b]) for b in BEHAVIORS}
        if not hit["backtracking"] and seen_step and not announced and _SOFT_RESTART.search(sentence):
            hit["backtracking"] = True
        if t is not None and not hit["subgoal"]:
            hit["subgoal"] = (any(int(m.group(1)) != t for r in _SUBGOAL_NUMBER
                                  for m in r.finditer(sentence))
                              or any(int(m.group(1)) == t for m in _FACTOR_OF.finditer(sentence)))
        if from_target is not None and not hit["backward"] and not reached:
            hit["backward"] = bool(from_target.search(sentence))
        if as_result is not None and any(
                not re.search(r"(?:target|goal)\W*\w*\W*$", sentence[:m.start()], re.IGNORECASE)
                for m in as_result.finditer(sentence)):
            reached = True  # "That gives 25." ("the target is 25" restates the task)
        if hit["backtracking"]:
            announced, used, avail = True, {}, {}   # the text says a new attempt starts
        steps = _steps(sentence)
        # Bare restarts: only with the given numbers known, never inside a re-check ("let me
        # verify: 6 * 7 = 42" recomputes), a step from the target, or a plan's reason ("reach 5
        # first, since 5 * 5 = 25" states a subgoal, not a step of an attempt).
        if given and not _RECHECK.search(sentence) and not hit["backward"] and not hit["subgoal"]:
            for (a, b), c, _ in steps:
                if not all(avail.get(x, 0) > 0 or x in given for x in (a, b)):
                    continue  # a justification ("because 5 * 2 = 10"), not a step of an attempt
                reached = reached or c == t
                fresh = all(avail.get(x, 0) == 0 and x in given for x in (a, b))
                reused = any(used.get(x, 0) >= given[x] for x in (a, b) if x in given)
                if fresh and reused:
                    if seen_step and not announced:
                        hit["backtracking"] = True
                    used, avail = {}, {}
                for x in (a, b):
                    if avail.get(x, 0) > 0:
                        avail[x] -= 1
                    elif x in given:
                        used[x] = used.get(x, 0) + 1
                avail[c] = avail.get(c, 0) + 1
                seen_step, announced = True, False
        out.append((sentence, hit))
    return out


# -----------------------------------------------------------------------------------------------
# 5. Completions in, per-step labels and summaries out


def sample_per_step(rows, n_samples, seed=0):
    """{step: (all rows, judged rows)}: n_samples per step without replacement, seeded per step."""
    by_step = {}
    for r in rows:
        by_step.setdefault(int(r["step"]), []).append(r)
    out = {}
    for step in sorted(by_step):
        group = by_step[step]
        if n_samples and len(group) > n_samples:
            idx = sorted(random.Random(f"{seed}:{step}").sample(range(len(group)), n_samples))
            out[step] = (group, [group[i] for i in idx])
        else:
            out[step] = (group, list(group))
    return out


def label_completions(rows, judge="rules", prompts=None, prompt_version=RULES_VERSION):
    """Label rows with behavior counts. judge: "rules" or a JudgeClient.

    Returns the rows with "behaviors" (int, or None when missing/failed), "judge", and when
    relevant "failed" {behavior: reason}, "missing" [behaviors] and the judge's raw answers. A
    row's own ground-truth "behaviors" (synthetic traces) is kept as "true_behaviors".
    """
    if judge == "rules":
        results = [dict(behaviors=count_behaviors_rules(r["completion"], r.get("nums"),
                                                         r.get("target")), failed={}, missing=[],
                        raw={}) for r in rows]
        meta = dict(model="rules", prompt_version=RULES_VERSION)
    else:
        fields = [dict(numbers=list(r["nums"]), target=r["target"],
                       completion=str(r["completion"]).strip()) for r in rows]
        results = judge_behaviors(fields, judge, prompts, system=CLASSIFY_SYSTEM,
                                  desc="classify")
        meta = dict(model=judge.model, prompt_version=prompt_version, api=judge.cfg.api,
                    temperature=judge.cfg.temperature)
    out = []
    for r, res in zip(rows, results):
        row = {k: v for k, v in r.items() if k != "behaviors"}
        if isinstance(r.get("behaviors"), dict):
            row["true_behaviors"] = r["behaviors"]
        row["behaviors"] = res["behaviors"]
        row["judge"] = meta
        if res["failed"]:
            row["failed"] = res["failed"]
        if res["missing"]:
            row["missing"] = res["missing"]
        if res["raw"]:
            row["judge_text"] = res["raw"]
        out.append(row)
    return out


def _mean(xs):
    return sum(xs) / len(xs) if xs else None


def summarize_step(step, all_rows, labelled):
    """One summary row: accuracy and length over every completion, accuracy over the judged
    sample, and per behavior the average count over parsed answers, the fraction > 0, and how
    many are missing (answer without a count) or failed (no answer)."""
    acc = [countdown.is_correct(r["completion"], r["nums"], r["target"]) for r in all_rows]
    acc_j = [countdown.is_correct(r["completion"], r["nums"], r["target"]) for r in labelled]
    s = dict(step=step, n_completions=len(all_rows), n_judged=len(labelled),
             accuracy=_mean(acc), accuracy_judged=_mean(acc_j),
             mean_chars=_mean([len(str(r["completion"])) for r in all_rows]),
             # tokens, when the sampler recorded them (ppo.py's "length"); the paper's CSVs
             # report a length that looks token-based (D-E5)
             mean_tokens=_mean([r["length"] for r in all_rows]) if all(
                 "length" in r for r in all_rows) else None)
    for b in BEHAVIORS:
        counts = [r["behaviors"][b] for r in labelled if r["behaviors"][b] is not None]
        s[f"{b}_avg"] = _mean(counts)
        s[f"{b}_frac"] = _mean([c > 0 for c in counts])
        s[f"{b}_missing"] = sum(b in r.get("missing", []) for r in labelled)
        s[f"{b}_failed"] = sum(b in r.get("failed", {}) for r in labelled)
    return s


def score_against(rows, truth_key="true_behaviors"):
    """Per behavior, on items where both the truth and the judge's count exist:
    precision / recall of "count > 0", and the mean absolute error of the counts."""
    out = {}
    for b in BEHAVIORS:
        pairs = [(r[truth_key][b], r["behaviors"][b]) for r in rows
                 if r.get(truth_key) and r[truth_key].get(b) is not None
                 and r["behaviors"].get(b) is not None]
        tp = sum(t > 0 and p > 0 for t, p in pairs)
        fp = sum(t == 0 and p > 0 for t, p in pairs)
        fn = sum(t > 0 and p == 0 for t, p in pairs)
        out[b] = dict(n=len(pairs), tp=tp, fp=fp, fn=fn, tn=len(pairs) - tp - fp - fn,
                      precision=tp / (tp + fp) if tp + fp else None,
                      recall=tp / (tp + fn) if tp + fn else None,
                      mae=_mean([abs(t - p) for t, p in pairs]))
    return out


# The study report's numbers: what one PPO run's validation completions show, step by step.


def measure_completion(r, label=None) -> dict:
    """What the study report reads in one validation completion r: right or not, the arithmetic steps it
    states and how many are right, whether it ends with a readable answer (score > 0) and that answer uses
    exactly the given numbers, how many of its checks ("v is not t") are consistent with the value just
    computed, and its behavior counts (label: a judge's, where it labelled the run; else the rules')."""
    text, nums, target = r["completion"], r["nums"], r["target"]
    right, stated = traces.check_arithmetic(text)
    answered = countdown.score(text, nums, target) > 0
    good, checks = traces.read_checks(text, target)
    return dict(correct=countdown.is_correct(text, nums, target), right=right, stated=stated, answered=answered,
                exact=countdown.uses_given_numbers(text, nums) if answered else None, good=good, checks=checks,
                counts=label or count_behaviors_rules(text, nums, target))


def summarize_run(folder) -> dict:
    """Per validation step of one PPO run: n, correct, accuracy, mean behavior counts, mean response
    length in tokens, arithmetic steps right, ... (measure_completion per completion, pooled by
    plumbing/report.py)."""
    return study_report.summarize_run(folder, measure_completion, BEHAVIORS)


def _correct(row) -> bool:
    """ppo.py's own judgment of a validation row where it wrote one, else the reward's."""
    return bool(row["correct"]) if "correct" in row else countdown.is_correct(str(row["completion"]), row["nums"],
                                                                                row["target"])


# ----- plumbing below: the command line (label, report, view), main -----


def run(args):
    if args.dump_prompts:
        names = dump_prompts(args.dump_prompts)
        print(f"wrote {len(names)} prompt files to {args.dump_prompts}")
        return 0
    if not args.input:
        raise ValueError("--input is required (a completions JSONL file or a folder of them)")
    inp = Path(args.input)
    if args.out:
        out = Path(args.out)
    elif inp.is_dir():
        out = inp.parent / "labels"
    else:
        out = inp.with_name(inp.stem + "_labels")
    with files.lock_dir(out, "classify.py output folder"):  # one live writer per folder and judge cache
        return _label_into(args, inp, out)


def _label_into(args, inp, out):
    rows = load_completions(inp)
    if args.judge == "rules":
        prompts, version = None, RULES_VERSION
    else:
        prompts, version = load_prompts("countdown", args.prompts_dir)
    cfg = dict(input=str(inp.resolve()), judge=args.judge, base_url=None, model=None,
               temperature=None, max_tokens=None, n_samples=args.n_samples, seed=args.seed,
               prompt_version=version)
    if args.judge != "rules":
        d = API_DEFAULTS[args.judge]
        cfg.update(base_url=normalize_base_url(args.base_url or d["base_url"]),
                   model=args.model or d["model"], temperature=args.temperature,
                   max_tokens=args.max_tokens)
    out.mkdir(parents=True, exist_ok=True)
    guard_run_config(out / "config.json", cfg, args.overwrite)

    groups = sample_per_step(rows, args.n_samples, args.seed)
    judged = [r for step in groups for r in groups[step][1]]
    print(f"{len(rows)} completions in {len(groups)} step(s); judging {len(judged)} "
          f"with {args.judge} -> {out}", file=sys.stderr)
    if args.judge == "rules":
        judge = "rules"
    else:
        judge = JudgeClient(judge_config_from_args(args, out / "judge_cache.jsonl"))
    labelled = label_completions(judged, judge, prompts, version)

    summary, i = [], 0
    for step, (all_rows, sample) in groups.items():
        summary.append(summarize_step(step, all_rows, labelled[i:i + len(sample)]))
        i += len(sample)
    files.write_jsonl(out / "labels.jsonl", labelled)
    write_text_atomic(out / "summary.json", json.dumps(
        dict(judge=labelled[0]["judge"] if labelled else None, steps=summary), indent=2) + "\n")
    study_report.write_csv(out / "summary.csv", summary)

    study_report.print_label_summary(summary, labelled, BEHAVIORS)
    print(f"wrote {out / 'labels.jsonl'}, {out / 'summary.csv'}, {out / 'summary.json'}")

    if args.score_against:
        truth = [r for r in labelled if r.get("true_behaviors")]
        if not truth:
            raise ValueError("--score-against needs ground-truth counts: input rows with a "
                             "\"behaviors\" dict, as traces.generate_traces writes")
        scores = dict(overall=score_against(truth))
        conds = sorted({r["condition"] for r in truth if "condition" in r})
        if len(conds) > 1:
            scores["by_condition"] = {c: score_against([r for r in truth if r.get("condition") == c])
                                      for c in conds}
        study_report.print_scores(scores, len(truth))
        write_text_atomic(out / "score.json", json.dumps(scores, indent=2) + "\n")
    return 0


def study_results(run_folders) -> dict:
    """{"conditions": {name: {"final_accuracy", "n_eval", "initial_accuracy", intervals,
    "seeds": {seed: summarize_run(...)}}}} over PPO run folders named <condition>_s<seed>."""
    return study_report.study_results(run_folders, summarize_run)


# what the page takes from this file and countdown.py (plumbing never imports a core file)
PAGE_READER = study_page.Reader(behaviors=BEHAVIORS, rules_version=RULES_VERSION, sentences=behavior_sentences,
                                count=count_behaviors_rules, correct=_correct, score=countdown.score,
                                answer=countdown._last_answer, study_results=study_results)


def build_view(folders, per_step=5, seed=0, steps=(), compare="", results=None, figures=None) -> str:
    """The HTML page of `classify.py view` for ppo.py run folders (plumbing/view.py); results and
    figures (PNG paths) as report made them, else computed and drawn."""
    return study_page.build_view(folders, PAGE_READER, per_step, seed, steps, compare, results, figures)


def report(args) -> int:
    def write_page(path, folders, results):
        write_view(path, build_view(folders, results=results, figures=results["figures"]))
    return study_report.report(args, study_results, write_page)


def view(args) -> int:
    return study_page.view(args, PAGE_READER)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["report"]:
        return run_judged_command(report, study_report.build_report_parser().parse_args(argv[1:]))
    if argv[:1] == ["view"]:
        return run_judged_command(view, study_page.build_view_parser().parse_args(argv[1:]))
    return run_judged_command(run, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
