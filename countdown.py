"""The Countdown game: problems, the paper's prompt, a safe exact reward, a solver, and
synthetic reasoning traces whose cognitive behaviors we control and count.

Countdown: given a few integers and a target, write one arithmetic expression that uses every
number exactly once with + - * / and equals the target. The paper (arXiv 2503.01307) trains on it
with PPO and primes models with Claude-written reasoning traces; this file is everything about the
game itself, in pure Python (stdlib only; a `tokenizers`-style object is optional for `dots`).

Simplifications and deliberate differences from the reference code, up front:
- The RL problems come from a seeded generator that approximates the public
  Countdown-Tasks-3to4 set (we cannot download it here); the priming distribution follows the
  reference generator (targets 10..25 drawn first, 3 or 4 numbers in 1..24), minus its list of
  200 excluded "24 game" sets.
- The reward keeps the reference semantics (last line only, last <answer> on it, every number
  exactly once, 0 / 0.1 / 1.0) but never calls eval: a small parser admits integer literals,
  + - * /, unary minus and parentheses, evaluated exactly with fractions, under hard size caps.
  `**`, `//`, floats and anything else earn the format credit only (the original gave `2**3`
  full credit). Every difference is commented next to the code that makes it.
- Traces are generated, not written by an LLM: a real search over the game's states is narrated
  in varied English, and each behavior the condition allows is counted as it is written.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import operator
import os
import random
import re
import sys
import tempfile
from fractions import Fraction
from functools import lru_cache
from itertools import combinations

# -----------------------------------------------------------------------------
# JSONL files: the one reader/writer every file of the project uses


def read_jsonl(path, errors: str = "strict", torn_fix: str = "") -> list[dict]:
    """All rows of a JSONL file. A torn last line (a crash mid-append) is skipped with a warning, or is
    an error that says `torn_fix` when one is given. errors="replace" reads invalid UTF-8 as U+FFFD."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file; check the path or create it first")
    with open(path, encoding="utf-8", errors=errors) as f:
        lines = f.read().split("\n")
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1 and torn_fix:
                raise ValueError(f"{path}: its last line is cut off ({e}); {torn_fix}") from None
            if i == len(lines) - 1:  # no newline after it: an interrupted append_jsonl
                print(f"warning: {path}: skipping a truncated last line ({e})", file=sys.stderr)
                continue
            raise ValueError(f"{path}:{i + 1}: not valid JSON ({e}); fix or remove that line") from None
    return rows


def write_jsonl(path, rows) -> None:
    """Write rows as JSONL atomically: a temp file in the same folder, then os.replace."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def append_jsonl(path, row) -> None:
    """Append one row and flush (logs, caches). A crash can only tear the last line."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()


# -----------------------------------------------------------------------------
# One writer per folder. Two processes writing one run folder interleave metrics rows and replace
# each other's checkpoints, so every CLI that writes a folder (sft.py, ppo.py, classify.py,
# curate.py) holds this lock on it, and model.py's downloads hold it per cached file. It lives here,
# beside the JSONL helpers, because this pure-stdlib bottom file is the one that all others import.
# Only the process that writes takes it (under torchrun that will be rank 0). The lock file is never
# deleted: a process that had opened the deleted file and one that created a new file could then
# both hold "the" lock.

LOCK_FILE = ".lock"


class FolderLocked(RuntimeError):
    """Another live process holds the lock on a folder."""


@contextlib.contextmanager
def lock_dir(folder, what: str = "folder", *, wait: bool = False, name: str = LOCK_FILE):
    """Hold an exclusive lock on `folder` (an fcntl.flock on the file folder/name) for a with-block.

    The lock belongs to the open file, so the kernel drops it when its process ends in any way,
    SIGKILL included: no stale lock survives a crash, and the lock file that stays behind means
    nothing by itself. The holder writes its pid into the file for the next process's message.
    wait=False raises FolderLocked at once if a live process holds the lock; wait=True says whom it
    waits for on stderr and blocks until that process lets go.
    """
    import fcntl  # Unix only, so imported here: the rest of this file stays importable anywhere
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o664)  # group-writable, for a cache shared by a group
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            if not wait:
                raise FolderLocked(f"{folder} is in use by another process (pid {holder}): one live process owns "
                                   f"a {what}. Wait for it to finish or stop it, or choose another --out") from None
            print(f"waiting for the process (pid {holder}) that holds {path} ({what})", file=sys.stderr)
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield path
        finally:
            os.ftruncate(fd, 0)  # a clean exit leaves no pid behind (a killed holder's stale pid is harmless)
    finally:
        os.close(fd)  # closing the file releases the lock


# -----------------------------------------------------------------------------
# The prompt. `base` is the reference RL prompt character for character (TinyZero's
# examples/data_preprocess/countdown.py, used unchanged by the paper). It ends with "<think>"
# and no newline, and the paper tokenized it WITHOUT a BOS token (add_special_tokens=False):
# callers that tokenize it should do the same. `qwen-instruct` is the ChatML variant from the same
# file (note the space after "user\n"); the paper's numbers all use `base`.

PROMPT_TEMPLATES: dict[str, str] = {
    "base": (
        "A conversation between User and Assistant. The user asks a question, and the Assistant "
        "solves it. The assistant first thinks about the reasoning process in the mind and then "
        "provides the user with the answer.\n"
        "User: Using the numbers {nums}, create an equation that equals {target}. You can use basic "
        "arithmetic operations (+, -, *, /) and each number can only be used once. Show your work "
        "in <think> </think> tags. And return the final answer in <answer> </answer> tags, for "
        "example <answer> (1 + 2) / 3 </answer>.\n"
        "Assistant: Let me solve this step by step.\n"
        "<think>"
    ),
    "qwen-instruct": (
        "<|im_start|>system\nYou are a helpful assistant. You first thinks about the reasoning "
        "process in the mind and then provides the user with the answer.<|im_end|>\n"
        "<|im_start|>user\n Using the numbers {nums}, create an equation that equals {target}. You "
        "can use basic arithmetic operations (+, -, *, /) and each number can only be used once. "
        "Show your work in <think> </think> tags. And return the final answer in <answer> </answer> "
        "tags, for example <answer> (1 + 2) / 3 </answer>.<|im_end|>\n"
        "<|im_start|>assistant\nLet me solve this step by step.\n<think>"
    ),
}
_THINK_SUFFIX = "\n<think>"


def _check_problem(nums, target) -> tuple[list[int], int]:
    """Plain ints (numpy integers accepted via __index__), or a ValueError that says what is wrong."""
    if isinstance(nums, (str, bytes)) or not hasattr(nums, "__iter__"):
        raise ValueError(f"nums must be a list of integers, got {nums!r}")
    nums = list(nums)
    try:
        if any(isinstance(x, bool) for x in nums + [target]):
            raise TypeError
        out = [operator.index(x) for x in nums], operator.index(target)
    except TypeError:
        raise ValueError(f"nums and target must be integers, got nums={nums!r} target={target!r}") from None
    if not nums:
        raise ValueError("nums is empty; a Countdown problem needs at least one number")
    return out


def make_prompt(nums, target, template: str = "base") -> str:
    """The RL prompt for one problem; `{nums}` is the Python list repr, e.g. [3, 17, 8]."""
    if template not in PROMPT_TEMPLATES:
        raise ValueError(f"unknown template {template!r}; choose one of {sorted(PROMPT_TEMPLATES)}")
    nums, target = _check_problem(nums, target)
    return PROMPT_TEMPLATES[template].format(nums=repr(nums), target=target)


def make_query(nums, target) -> str:
    """The raw query the paper sent to Claude: the base prompt without the trailing "\\n<think>"."""
    return make_prompt(nums, target, "base")[: -len(_THINK_SUFFIX)]


def sft_example(nums, target, text: str) -> dict:
    """An LLM answer that starts with "<think>" -> {"query": RL prompt, "completion": the rest}.

    The reference SFT data ended the query at "...step by step." and started the completion at
    "<think>", while RL prompts end at "<think>" (defect D-SFT-6). Here the query is exactly the RL
    prompt and the completion is whatever followed that "<think>", so SFT and RL share a boundary.
    """
    stripped = text.lstrip()
    if not stripped.startswith("<think>"):
        raise ValueError(
            f"the answer text must start with '<think>' (after optional whitespace), got "
            f"{text[:40]!r}...; prepend '<think>' or fix the generator that produced it"
        )
    return {"query": make_prompt(nums, target), "completion": stripped[len("<think>"):]}


# -----------------------------------------------------------------------------
# The reward.
#
# Reference (verl/utils/reward_score/countdown.py), on prompt+response text:
#   1. split on the first "Assistant:", keep only the LAST line (split('\n')[-1]);
#   2. take the LAST non-DOTALL match of <answer>(.*?)</answer> on it, .strip(); none -> 0;
#   3. the multiset of re.findall(r'\d+') must equal the given numbers, else 0.1;
#   4. eval() it (after a character-class check); error -> 0.1; abs(result - target) < 1e-5 -> 1.0,
#      else 0.1.
# We score the response alone. That gives the same result for the last-line rule: both prompt
# templates end with "\n<think>" and "<think>" cannot take part in an <answer>...</answer> match, so
# the last line of prompt+response and the last line of the response hold the same answer matches.
# (The reference kept special tokens when decoding; an EOS after "</answer>" sat on the same line
# and did not change the match, and an EOS after a trailing newline made the last line empty -> 0,
# exactly what scoring the stripped response gives.)
#
# Deliberate differences, all towards "the format credit, never the full reward":
#   - `**` and `//` are not arithmetic here: 0.1 (the original accepted them; `2**3*1` scored 1.0).
#   - floats ("2.5") are not literals: 0.1 (the original read "2.5" as the numbers 2 and 5 and
#     could score 1.0 with a float result).
#   - unary plus ("+3") is not admitted: 0.1 (the original's eval accepted it).
#   - exact Fraction equality replaces abs(result - target) < 1e-5 (same verdict for every honest
#     expression; the float version could accept a rounding near-miss).
#   - an answer longer than MAX_ANSWER_CHARS scores 0.1 without being parsed (the original would
#     evaluate e.g. a correct expression padded with a megabyte of spaces).
#   - literals with more than MAX_LITERAL_DIGITS digits fail the number check (the original's
#     int() raised for > 4300 digits, also 0.1).
#   - the numbers check uses ASCII digits only. The original's \d also matched digits like '٣',
#     which then failed in eval; both end at 0.1. Likewise only ASCII whitespace separates tokens
#     (eval rejected a no-break space too).
#   - "no answer" returns 0.0, a float (the original returned the int 0).
# Kept on purpose (fidelity): leading-zero literals such as "05" are invalid (CPython's eval
# rejects them; "00" is fine), at most 200 nested parentheses (CPython's parser limit), and
# division by zero scores 0.1. Unary minus chains are evaluated up to the answer cap (CPython
# managed ~900 and failed by ~3,000, so the two can differ on a chain of 1,000 characters).

MAX_ANSWER_CHARS = 1_000  # an honest answer for six numbers is < 60 characters
MAX_LITERAL_DIGITS = 100
MAX_PAREN_DEPTH = 200  # CPython refuses deeper nesting: "too many nested parentheses"
MAX_INTERMEDIATE_BITS = 16_384  # defense in depth; the answer cap already bounds sizes far below

_OPEN, _CLOSE = "<answer>", "</answer>"
_DIGITS = re.compile(r"[0-9]+")
_ALLOWED = re.compile(r"[0-9+\-*/() \t\n\r\f\v]*")  # ASCII digits and whitespace only
_TOKEN = re.compile(r"[0-9]+|[-+*/()]")


def _last_answer(text: str) -> str | None:
    """The content of the last match of <answer>(.*?)</answer> in `text`, in linear time.

    re.finditer gives the same matches but is quadratic on a line with many unclosed "<answer>"
    (each one scans to the end). Matches are found left to right, each ending at the first close
    after its open, so: the last match ends at the first close after the last open that still has a
    close after it, and it starts at the first open after the close that precedes that open (an open
    right after a close can never be inside an earlier match).
    """
    k = text.rfind(_CLOSE)
    if k < 0:
        return None
    o_last = text.rfind(_OPEN, 0, k)
    if o_last < 0:
        return None
    close = text.find(_CLOSE, o_last + len(_OPEN))
    prev_close = text.rfind(_CLOSE, 0, o_last)
    start = 0 if prev_close < 0 else prev_close + len(_CLOSE)
    o_first = text.find(_OPEN, start)
    return text[o_first + len(_OPEN): close]


def _div(a, b):
    """Exact a / b: an int when it divides, else a Fraction; None for division by zero."""
    if b == 0:
        return None
    if type(a) is int and type(b) is int:
        q, r = divmod(a, b)
        return q if r == 0 else Fraction(a, b)
    f = Fraction(a) / b
    return int(f) if f.denominator == 1 else f


def _too_big(v) -> bool:
    if type(v) is int:
        return v.bit_length() > MAX_INTERMEDIATE_BITS
    return max(v.numerator.bit_length(), v.denominator.bit_length()) > MAX_INTERMEDIATE_BITS


_PREC = {"+": 1, "-": 1, "*": 2, "/": 2, "neg": 3}


def _apply(op, stack):
    if op == "neg":
        stack.append(-stack.pop())
        return True
    b, a = stack.pop(), stack.pop()
    if op == "+":
        v = a + b
    elif op == "-":
        v = a - b
    elif op == "*":
        v = a * b
    else:
        v = _div(a, b)
        if v is None:
            return False
    if type(v) is not int and v.denominator == 1:
        v = int(v)
    if _too_big(v):
        return False
    stack.append(v)
    return True


def evaluate(expr: str):
    """Exact value (int or Fraction) of an arithmetic expression, or None if it is not one.

    Grammar: integer literals, binary + - * /, unary minus, parentheses, spaces. An iterative
    operator-precedence parser (no recursion, so no depth can overflow the stack); `**`, `//`,
    floats, names and calls simply fail to parse.
    """
    if len(expr) > MAX_ANSWER_CHARS or not _ALLOWED.fullmatch(expr):
        return None  # '.', letters, '_', ',', non-ASCII digits or spaces, ...
    vals: list = []
    ops: list[str] = []
    expect_operand = True
    depth = 0
    for tok in _TOKEN.findall(expr):
        if tok[0] in "0123456789":
            if not expect_operand or len(tok) > MAX_LITERAL_DIGITS:
                return None  # "1 2", or a literal too long to be one of the numbers
            if len(tok) > 1 and tok[0] == "0" and tok.strip("0"):
                return None  # "05" is a SyntaxError in Python 3
            vals.append(int(tok))
            expect_operand = False
        elif tok == "(":
            if not expect_operand:
                return None  # "2(3)": a call in Python, a TypeError in the original
            depth += 1
            if depth > MAX_PAREN_DEPTH:
                return None
            ops.append("(")
        elif tok == ")":
            if expect_operand:
                return None
            while ops and ops[-1] != "(":
                if not _apply(ops.pop(), vals):
                    return None
            if not ops:
                return None
            ops.pop()
            depth -= 1
        elif expect_operand:
            if tok != "-":
                return None  # no unary plus, and "**" / "//" land here
            ops.append("neg")
        else:
            p = _PREC[tok]
            while ops and ops[-1] != "(" and _PREC[ops[-1]] >= p:
                if not _apply(ops.pop(), vals):
                    return None
            ops.append(tok)
            expect_operand = True
    if expect_operand:
        return None
    while ops:
        op = ops.pop()
        if op == "(" or not _apply(op, vals):
            return None
    return vals[0] if len(vals) == 1 else None


def score(response: str, nums, target, format_score: float = 0.1, correct_score: float = 1.0,
          lenient: bool = False) -> float:
    """Reward for a response (the text after the prompt, special tokens stripped).

    0.0 without an <answer>...</answer> on the last line; `format_score` if there is one but it is
    not a correct expression using every number exactly once; `correct_score` if it is.
    lenient=True takes the last <answer> anywhere in the response (DOTALL) instead of on the last
    line only; it is off by default for fidelity with the paper's reward.
    """
    if lenient:
        content = _last_answer(response)
    else:
        content = _last_answer(response[response.rfind("\n") + 1:])
    if content is None:
        return 0.0
    content = content.strip()
    if len(content) > MAX_ANSWER_CHARS:
        return format_score
    # The reference's number check: the multiset of digit runs equals the given numbers.
    found = _DIGITS.findall(content)
    if len(found) != len(nums) or any(len(d) > MAX_LITERAL_DIGITS for d in found):
        return format_score
    if sorted(map(int, found)) != sorted(nums):
        return format_score
    value = evaluate(content)
    if value is None or value != target:
        return format_score
    return correct_score


def is_correct(response: str, nums, target, lenient: bool = False) -> bool:
    """Pure accuracy: True iff the response earns the full reward."""
    return score(response, nums, target, 0.0, 1.0, lenient) == 1.0


# -----------------------------------------------------------------------------
# The solver.
#
# Two rule sets. "natural" is the reference generator's search (tasks/countdown.py): combine two
# numbers into a+b, a*b, larger-smaller, or larger/smaller when it divides exactly, so every
# intermediate is a non-negative integer. "exact" is the reward's semantics: any rational, negatives
# allowed (a-b and b-a, a/b and b/a). The reference checked solvability under "natural" only while
# its reward accepts "exact" (defect D-T2). We generate problems solvable under "natural", hence
# also under the reward; solve() prefers a natural solution (what a person would write) and falls
# back to an exact one, so it finds an answer whenever the reward can give 1.0.
#
# Search: an expression tree over a set of numbers splits them into two non-empty parts. For a
# part of at most three numbers we list every value it can make (a few hundred at most). For a
# bigger set S and a wanted value t we enumerate the values b of the smaller part B, invert the
# operation to get the value a the other part A must make (t = a + b -> a = t - b, ...), and recurse
# on (A, a) with memoization. Six numbers then cost ~10^4-10^5 steps instead of the ~10^7 trees.
# Trees are ints (an index into the numbers) or (op, left, right).

_NATURAL, _EXACT = "natural", "exact"


def _combine(a, b, rules):
    """(value, op, a_is_left) for every way to combine values a and b under `rules`."""
    if rules == _NATURAL:
        out = [(a + b, "+", True), (a * b, "*", True)]
        out.append((a - b, "-", True) if a >= b else (b - a, "-", False))
        if a >= b and b > 0 and a % b == 0:
            out.append((a // b, "/", True))
        elif b > a > 0 and b % a == 0:
            out.append((b // a, "/", False))
        return out
    out = [(a + b, "+", True), (a * b, "*", True), (a - b, "-", True), (b - a, "-", False)]
    q = _div(a, b)
    if q is not None:
        out.append((q, "/", True))
    q = _div(b, a)
    if q is not None:
        out.append((q, "/", False))
    return out


def _inverse(t, b, rules):
    """(a, op, a_is_left) such that combining a with b can give t; a=None means "any a"."""
    if rules == _NATURAL:
        cands = [(t - b, "+", True), (b + t, "-", True)]
        if t > 0 and b - t >= 0:
            cands.append((b - t, "-", False))
        if b == 0:
            if t == 0:
                cands.append((None, "*", True))
        elif t % b == 0:
            cands.append((t // b, "*", True))
        if b > 0 and t >= 1:
            cands.append((t * b, "/", True))
        if t > 1 and b % t == 0 and b // t > 0:
            cands.append((b // t, "/", False))
        return [c for c in cands if c[0] is None or c[0] >= 0]
    cands = [(t - b, "+", True), (t + b, "-", True), (b - t, "-", False)]
    if b != 0:
        cands.append((_div(t, b), "*", True))
        cands.append((t * b, "/", True))
        if t != 0:
            cands.append((_div(b, t), "/", False))
    elif t == 0:
        cands.append((None, "*", True))
        cands.append((None, "/", False))  # 0 / a == 0 for any a != 0
    return cands


def _value_of(op, x, y):
    if op == "+":
        return x + y
    if op == "-":
        return x - y
    if op == "*":
        return x * y
    return _div(x, y)


class _Search:
    """Expression trees over `values` (leaves are indices) under one rule set."""

    def __init__(self, values, rules, find_all=False):
        self.values = list(values)
        self.rules = rules
        self.find_all = find_all
        self._vals: dict[int, dict] = {}
        self._memo: dict[tuple, list] = {}

    def splits(self, mask):
        """Unordered splits {A, B} of mask, B the side we enumerate (never the larger one)."""
        bits = [1 << i for i in range(len(self.values)) if mask >> i & 1]
        low, rest = bits[0], bits[1:]
        for r in range(len(rest)):  # A holds the lowest bit plus r of the others
            for comb in combinations(rest, r):
                a = low | sum(comb)
                b = mask ^ a
                if bin(a).count("1") >= bin(b).count("1"):
                    yield a, b
                else:
                    yield b, a

    def table(self, mask) -> dict:
        """Every value the numbers in mask can make -> its trees (one tree unless find_all)."""
        got = self._vals.get(mask)
        if got is not None:
            return got
        if mask & (mask - 1) == 0:
            i = mask.bit_length() - 1
            got = {self.values[i]: [i]}
        else:
            got = {}
            for a_mask, b_mask in self.splits(mask):
                for va, tas in self.table(a_mask).items():
                    for vb, tbs in self.table(b_mask).items():
                        for v, op, a_left in _combine(va, vb, self.rules):
                            if v is None or type(v) is not int and _too_big(v):
                                continue
                            trees = got.setdefault(v, [])
                            if trees and not self.find_all:
                                continue
                            for ta in tas:
                                for tb in tbs:
                                    trees.append((op, ta, tb) if a_left else (op, tb, ta))
        self._vals[mask] = got
        return got

    def find(self, mask, t) -> list:
        """Trees over exactly the numbers in mask with value t (at most one unless find_all)."""
        if bin(mask).count("1") <= 3:
            return self.table(mask).get(t, [])
        key = (mask, t)
        if key in self._memo:
            return self._memo[key]
        out = []
        for a_mask, b_mask in self.splits(mask):
            for vb, tbs in self.table(b_mask).items():
                for va, op, a_left in _inverse(t, vb, self.rules):
                    if va is None:  # t == 0 and vb == 0: any value of A works (nonzero for '/')
                        tas = [tr for v, trs in self.table(a_mask).items()
                               if op == "*" or v != 0 for tr in trs[:1 if not self.find_all else None]]
                    else:
                        x, y = (va, vb) if a_left else (vb, va)
                        if _value_of(op, x, y) != t or (self.rules == _NATURAL and (
                                type(va) is not int or (op == "/" and (x < y or y == 0)))):
                            continue
                        tas = self.find(a_mask, va)
                    for ta in tas:
                        for tb in tbs:
                            out.append((op, ta, tb) if a_left else (op, tb, ta))
                            if not self.find_all:
                                self._memo[key] = out
                                return out
        self._memo[key] = out
        return out


def _format(tree, leaf, canonical=False, pretty=False) -> str:
    """Infix text with the fewest parentheses that keep the tree's shape (a + (b + c) keeps its).

    pretty=True also drops the parentheses that associativity makes redundant (a + (b - c) ->
    a + b - c, a * (b / c) -> a * b / c): same exact value, a different tree; for display.
    """
    if not isinstance(tree, tuple):
        return leaf(tree)
    op, left, right = tree
    ls, rs = _format(left, leaf, canonical, pretty), _format(right, leaf, canonical, pretty)
    lp, rp = _prec_of(left), _prec_of(right)
    if canonical and op in "+*" and (rs, rp) < (ls, lp):  # commutative: one order per pair
        ls, rs, lp, rp = rs, ls, rp, lp
    p = _PREC[op]
    if lp < p:
        ls = f"({ls})"
    if rp < p or rp == p and not (pretty and op in "+*"):
        rs = f"({rs})"
    return f"{ls} {op} {rs}"


def _prec_of(tree) -> int:
    return _PREC[tree[0]] if isinstance(tree, tuple) else 9


_MAX_SOLVE_NUMS = 6


def _check_solvable_size(nums):
    if len(nums) > _MAX_SOLVE_NUMS:
        raise ValueError(f"the solver handles at most {_MAX_SOLVE_NUMS} numbers, got {len(nums)}; "
                         "the search grows factorially beyond that")


def _solve_tree(nums, target, rules=None):
    """(tree, rules) of one solution (natural rules first unless rules is given), or None."""
    for r in ([rules] if rules else [_NATURAL, _EXACT]):
        if r == _NATURAL and (target < 0 or any(x < 0 for x in nums)):
            continue
        trees = _Search(nums, r).find((1 << len(nums)) - 1, target)
        if trees:
            return trees[0], r
    return None


def solve(nums, target) -> str | None:
    """One expression using every number exactly once that equals target, or None."""
    nums, target = _check_problem(nums, target)
    _check_solvable_size(nums)
    found = _solve_tree(nums, target)
    return None if found is None else _format(found[0], lambda i: str(nums[i]), pretty=True)


def solve_all(nums, target, limit: int | None = None) -> list[str]:
    """Every solution under the reward's semantics (exact rationals), one per equivalence class of
    swapping the operands of + and *, sorted. Other rearrangements ((a+b)+c vs a+(b+c)) are distinct.
    Six numbers can have tens of thousands (~1 s); `limit` keeps the first `limit` of the sorted list."""
    nums, target = _check_problem(nums, target)
    _check_solvable_size(nums)
    trees = _Search(nums, _EXACT, find_all=True).find((1 << len(nums)) - 1, target)
    out = sorted({_format(t, lambda i: str(nums[i]), canonical=True) for t in trees})
    return out if limit is None else out[:limit]


@lru_cache(maxsize=1 << 17)
def _natural_reach(nums: tuple) -> frozenset:
    """Values reachable using ALL of `nums` (a sorted tuple) under the natural rules."""
    if len(nums) == 1:
        return frozenset(nums)
    out = set()
    for i, j in combinations(range(len(nums)), 2):
        rest = [nums[k] for k in range(len(nums)) if k != i and k != j]
        for v, _, _ in _combine(nums[i], nums[j], _NATURAL):
            out |= _natural_reach(tuple(sorted(rest + [v])))
    return frozenset(out)


def _solvable_natural(nums, target) -> bool:
    return _solvable_sorted(tuple(sorted(nums)), target)


@lru_cache(maxsize=1 << 17)
def _solvable_sorted(nums: tuple, target) -> bool:
    # target-directed search: ~5x faster than listing every reachable value for 4 numbers
    return bool(_Search(nums, _NATURAL).find((1 << len(nums)) - 1, target))


# -----------------------------------------------------------------------------
# Problems.
#
# `priming` follows the reference generator as the paper used it for the priming data
# (api_gen.py: CountDown(start_probs=[0, .5, .5], min_target=10, max_target=25)): the target is
# drawn first, uniform in 10..25 inclusive; then 3 or 4 numbers (50/50), each uniform in 1..24
# (max_target - 1), resampled until solvable under the natural rules. We do not copy its list of
# 200 excluded "24 game" sets (it only removes some 4-number sets).
# `rl` approximates Countdown-Tasks-3to4, which the paper trained on and whose generator and ranges
# are documented nowhere: 3 or 4 numbers (50/50) uniform in 1..99, target uniform in 10..100 drawn
# first, resampled until solvable the same way. Measure the real set if you can download it.

DISTRIBUTIONS = {
    # name: (min_target, max_target, min_num, max_num, (counts), (weights))
    "rl": (10, 100, 1, 99, (3, 4), (0.5, 0.5)),
    "priming": (10, 25, 1, 24, (3, 4), (0.5, 0.5)),
}


def _sample_problem(rng: random.Random, distribution: str) -> tuple[list[int], int]:
    lo_t, hi_t, lo_n, hi_n, counts, weights = DISTRIBUTIONS[distribution]
    target = rng.randint(lo_t, hi_t)
    k = rng.choices(counts, weights=weights)[0]
    while True:
        nums = [rng.randint(lo_n, hi_n) for _ in range(k)]
        if _solvable_natural(nums, target):
            return nums, target


def _check_distribution(distribution):
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"unknown distribution {distribution!r}; choose one of {sorted(DISTRIBUTIONS)}")


def _problem_stream(distribution: str, seed):
    """An endless seeded stream of solvable problems {"nums", "target", "id"} (ids 0, 1, ...)."""
    rng = random.Random(f"countdown-problems:{distribution}:{seed}")
    i = 0
    while True:
        nums, target = _sample_problem(rng, distribution)
        yield {"nums": nums, "target": target, "id": i}
        i += 1


def generate_problems(n: int, distribution: str = "rl", seed: int = 0) -> list[dict]:
    """n solvable problems {"nums", "target", "id"} drawn i.i.d. (repeats possible) with a seeded RNG."""
    _check_distribution(distribution)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    stream = _problem_stream(distribution, seed)
    return [next(stream) for _ in range(n)]


def make_splits(n_train: int, n_test: int, distribution: str = "rl", seed: int = 0,
                progress: bool = False):
    """(train, test): every (sorted nums, target) appears at most once across both splits.

    The test set takes the first n_test distinct problems of the seeded stream and train the next
    n_train, so for one seed the test set does not depend on n_train. progress=True shows a tqdm
    bar when tqdm is installed (the paper's 327,680 + 1,024 take a few minutes).
    """
    _check_distribution(distribution)
    if n_train < 0 or n_test < 0:
        raise ValueError(f"split sizes must be >= 0, got n_train={n_train} n_test={n_test}")
    rng = random.Random(f"countdown-splits:{distribution}:{seed}")
    seen: set = set()
    splits: list[list[dict]] = [[], []]
    misses = 0
    bar = _progress_bar(n_train + n_test, f"{distribution} problems") if progress else None
    for split, size in ((1, n_test), (0, n_train)):
        while len(splits[split]) < size:
            nums, target = _sample_problem(rng, distribution)
            key = (tuple(sorted(nums)), target)
            if key in seen:
                misses += 1
                if misses > 100 * (n_train + n_test) + 10_000:
                    raise ValueError(f"could not find {n_train + n_test} distinct {distribution!r} "
                                     "problems; ask for fewer")
                continue
            seen.add(key)
            splits[split].append({"nums": nums, "target": target, "id": len(splits[split])})
            if bar is not None:
                bar.update()
    if bar is not None:
        bar.close()
    return splits[0], splits[1]


def _progress_bar(total, desc):
    """A tqdm bar if tqdm is installed (optional: this file needs only the standard library)."""
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, disable=total < 2000)


# -----------------------------------------------------------------------------
# Synthetic reasoning traces.
#
# The paper primed models with Claude-written traces under nine conditions (paper_spec 3.1-3.3).
# We write them ourselves, and each one is the log of a search that really runs on its problem:
#   forward search    depth-first over the game's states (combine two numbers, repeat), moves
#                     ordered by a one-step look-ahead heuristic; a dead end is found by computing
#                     it (two numbers left whose best combination misses the goal);
#   backtracking      the search backs up to the nearest earlier state with an untried move (an
#                     intermediate state: "go back to 12, 5 and 3"; or the start);
#   subgoals          an intermediate value s one operation from the target with a given number
#                     n (s * n = t, s + n = t, ...), made from the other numbers by search;
#   backward steps    t = x op n, so the others must make x; repeated until two numbers are left;
#   verification      the value a path reached, compared aloud with the value it aimed at.
# The number of dead ends is whatever the search needed (easy problems need fewer), up to a budget;
# a correct-answer condition skips a problem its search cannot solve within TRACE_BUDGET, and
# no_positive is the log of searches that ran out of a smaller budget and then committed, plainly,
# to their nearest wrong answer (the paper kept the Claude traces whose answers were wrong). The
# condition decides which strategies the search may use and which behaviors it says; a plain
# search still backs up, and says so only where backtracking is spoken. Each behavior is counted
# once per instance as it is written (the paper's classifier definitions, paper_spec 4.2). Every
# phrasing of a behavior contains exactly one of its markers in BEHAVIOR_PHRASES and no other text
# contains any marker, so counting markers (lowercased substrings) recovers the counts; each trace
# is checked against that before it is returned. (The markers are exact for these traces only;
# free text from a model needs a broader classifier, see classify.py.) empty_cot and dots rewrite
# our all_strategies trace of the same problem, as the paper rewrote its all_strategies file.
# Every stated arithmetic step is exact (tests/test_countdown.py re-reads and checks them all).

CONDITIONS = (
    "all_strategies", "only_backtracking", "backtracking_verification", "backtracking_subgoal",
    "backtracking_backward", "negative_control", "empty_cot", "dots", "no_positive", "coat",
)
BEHAVIORS = ("verification", "backtracking", "subgoal", "backward")
_ALL = frozenset(BEHAVIORS)
ALLOWED_BEHAVIORS: dict[str, frozenset] = {
    "all_strategies": _ALL,
    "only_backtracking": frozenset({"backtracking"}),
    "backtracking_verification": frozenset({"backtracking", "verification"}),
    "backtracking_subgoal": frozenset({"backtracking", "subgoal"}),
    "backtracking_backward": frozenset({"backtracking", "backward"}),
    "negative_control": frozenset(),
    "empty_cot": frozenset(),
    "dots": frozenset(),
    "no_positive": _ALL,  # all_strategies whose every final answer is wrong
    "coat": _ALL,  # all_strategies written in Satori's Chain-of-Action-Thought form (below)
}

BEHAVIOR_PHRASES: dict[str, tuple[str, ...]] = {
    "verification": (" is not ", "isn't ", "doesn't match", "goal has been reached",
                     "matches the target", "equals the target", "double-check", "let me verify"),
    "backtracking": ("something else", "a different", "go back", "start over", "another pair",
                     "another approach"),
    "subgoal": ("try to reach", "intermediate goal", "subgoal"),
    "backward": ("work backwards", "working backwards", "since the target is", "in reverse"),
}


def count_behavior_phrases(text: str) -> dict[str, int]:
    """Occurrences of each behavior's marker phrases in text (case-insensitive)."""
    low = text.lower()
    return {b: sum(low.count(p) for p in ps) for b, ps in BEHAVIOR_PHRASES.items()}


# Phrasings. Every template of a behavior holds exactly one of its markers in BEHAVIOR_PHRASES and
# no other text holds any marker (tests/test_countdown.py checks both), so counting markers in a
# trace recovers its behavior counts. {a} {b} {c}: a step's operands and result; {t}: the target;
# {g}: the value being aimed at (the target, a subgoal or a backward goal); {v}: a result;
# {s}: a subgoal; {x}: a value a backward step asks for; {n}: a given number; {state}/{rest}/{nums}:
# lists of numbers.
_OPENINGS = (
    "Let me find a way to combine {nums} to get {t}.",
    "I need to reach {t} using each of {nums} exactly once.",
    "We have {nums} and need to make {t}.",
    "Numbers: {nums}. Goal: {t}.",
    "Let me think about how {nums} can combine into {t}.",
    "The numbers are {nums} and the target is {t}.",
    "Okay, {nums}, and I want {t}.",
)
_STEPS = {
    "+": ("{a} + {b} = {c}.", "{a} + {b} = {c}.", "{a} + {b} = {c}.", "Adding {a} and {b} gives {c}.",
          "{a} plus {b} is {c}.", "{a} + {b} makes {c}."),
    "-": ("{a} - {b} = {c}.", "{a} - {b} = {c}.", "{a} - {b} = {c}.", "Subtracting {b} from {a} leaves {c}.",
          "{a} minus {b} is {c}.", "{a} - {b} makes {c}."),
    "*": ("{a} * {b} = {c}.", "{a} * {b} = {c}.", "{a} * {b} = {c}.", "Multiplying {a} by {b} gives {c}.",
          "{a} times {b} is {c}.", "{a} * {b} makes {c}."),
    "/": ("{a} / {b} = {c}.", "{a} / {b} = {c}.", "{a} / {b} = {c}.", "Dividing {a} by {b} gives {c}.",
          "{a} divided by {b} is {c}.", "{a} / {b} makes {c}."),
}
_FIRST_STEP = ("What about {a} {op} {b}? That gives {c}.", "Start with {a} {op} {b} = {c}.",
               "Let's try {a} {op} {b} = {c}.", "First, {a} {op} {b} = {c}.", "Try {a} {op} {b} = {c}.")
_THEN = ("Then ", "Next, ", "", "", "", "Now ", "And ")
_LEFT = ("That leaves {state}.", "Now we have {state}.", "Left: {state}.", "So now {state}.")
_VERIFY_FAIL = ("{v} is not {g}.", "{v} is not {g}, so that path fails.", "That gives {v}, which doesn't match {g}.",
                "{v} isn't {g}.", "But {v} is not {g}.", "Hmm, {v} isn't {g}.", "{v}, which doesn't match {g}.")
_VERIFY_OK = ("{t} was the goal, so the goal has been reached.", "That is {t}, which matches the target.",
              "And {t} equals the target.", "We got {t}; it matches the target.", "{t} equals the target.",
              "Yes, {t} matches the target.")
_VERIFY_SUB = ("Good, that is {s}, and {s} equals the target I set.", "That gives {s}; it matches the target I set.")
_DOUBLE_CHECK = ("Let me double-check: {steps}.", "Let's double-check: {steps}.", "Let me verify: {steps}.",
                 "To double-check: {steps}.", "Let me verify each step: {steps}.")
_RESTART = ("Trying something else.", "Let's try something else.", "Let's try a different sequence of operations.",
            "Let me try a different combination.", "Let me start over with {nums}.",
            "Scrap that and try another pair.", "Let's take another approach.", "Start over from {nums}.",
            "I'll try something else.", "Back to {nums} and a different combination.")
_GO_BACK = ("Let me go back to {state} and try another operation.", "Let me go back to {state} and try again.",
            "Go back to {state}.", "So I go back to {state}.", "Let me go back to {state} instead.")
_SUBGOAL_FAIL = ("I can't get {s} from these numbers, so let's try a different approach.",
                 "{s} seems out of reach, so let me try something else.",
                 "Making {s} seems hard, so let me take another approach.")
_BACKWARD_FAIL = ("I don't see how to make {x} from {rest}, so let's try something else.",
                  "{rest} can't give {x}, so let me take another approach.",
                  "That way needs {x} from {rest}, which I can't find; let me try a different way.")
_SUBGOAL = {  # the plan: reach s, then s {op} n = t
    "factor": ("Let's first try to reach {s}, since {s} * {n} = {t}.",
               "{s} times {n} is {t}, so let me try to reach {s} first.",
               "A useful intermediate goal is {s}, because {s} * {n} = {t}.",
               "Let me set {s} as a subgoal, because {s} * {n} = {t}.",
               "If I can make {s}, then {s} * {n} gives {t}; {s} is my subgoal."),
    "multiple": ("Let's first try to reach {s}, since {s} / {n} = {t}.",
                 "A useful intermediate goal is {s}, which divided by {n} is {t}.",
                 "Let me set {s} as a subgoal; {s} / {n} = {t}."),
    "below": ("Let's first try to reach {s}, since {s} + {n} = {t}.",
              "Adding {n} to {s} would give {t}, so let me try to reach {s} first.",
              "Let me take {s} as a subgoal; then adding {n} gives {t}."),
    "above": ("Let's first try to reach {s}, since {s} - {n} = {t}.",
              "Taking {n} away from {s} would give {t}, so a good intermediate goal is {s}.",
              "Let me take {s} as a subgoal; then subtracting {n} gives {t}."),
}
_SUBGOAL_REACHED = ("Now {s} and {n}: {fwd}.", "Then {fwd}.", "With {s} made, {fwd}.")
_BACKWARD = ("Let's work backwards from {g}: {inv}.", "Working backwards from {g}: {inv}.",
             "Since the target is {g}, and {fwd}, I would need {x}.", "Thinking about it in reverse, {inv}.",
             "Work backwards: {fwd}, so {inv}.", "In reverse: {inv}.")
_NEED = ("So I need {x} from {rest}.", "Then {rest} would have to make {x}.", "Can {rest} make {x}?",
         "Now make {x} from {rest}.")
_SO = ("So, {fwd}.", "Then {fwd}.", "Finally, {fwd}.", "And {fwd}.")
_CONCLUDE = ("So the answer is {expr}.", "The expression is {expr}.", "Putting it together: {expr}.",
          "So {expr} uses every number once.", "So the final expression is {expr}.", "The answer: {expr}.")


# Satori's Chain-of-Action-Thought (COAT, Shen et al. 2025). Every step of a trace opens with a
# meta-action token that says what kind of step it is: <|continue|> goes on, <|reflect|> checks the
# steps before, <|explore|> abandons the current path for another. Plain CoT is COAT with only
# <|continue|>. The `coat` condition writes the all_strategies search of a problem, the same text
# word for word, with these tokens at its step boundaries: a verification opens with reflect, a
# backtrack with explore, everything else with continue (a restated state or a "so I need x" goes
# on the step before it, unopened). The tokens carry no behavior marker, so the counts stand.
# sft.py --add-tokens coat puts them in a tokenizer as single tokens; ppo.py --rae restarts
# trajectories at their boundaries.
COAT_TOKENS = {"continue": "<|continue|>", "reflect": "<|reflect|>", "explore": "<|explore|>"}
_BEHAVIOR_META = {"verification": "reflect", "backtracking": "explore"}


def _join(vals) -> str:
    vals = [str(v) for v in vals]
    return vals[0] if len(vals) == 1 else ", ".join(vals[:-1]) + " and " + vals[-1]


# How the search is bounded. A correct-answer trace comes from a search that found the answer
# within TRACE_BUDGET dead ends; a problem it cannot solve in that budget is not used for them.
# A no_positive trace is a search that ran out of a smaller budget. VALUE_CAP: moves whose result
# exceeds it are passed over silently, as a person would not multiply 23 by 19 to reach 17.
TRACE_BUDGET = 8
NO_POSITIVE_BUDGETS = (2, 3, 4)
VALUE_CAP = 100
_WIDTH = 2  # moves tried from an intermediate state before the search backs up further


class _Budget(Exception):
    """The search hit its budget of dead ends."""


class _Narrator:
    """A budgeted depth-first search over the game's states, written down as it runs.

    States are lists of (value, tree) items; a move combines two items under the natural rules.
    The search orders moves by a one-step look-ahead heuristic and discovers dead ends by computing
    them: a state of two numbers whose best combination misses the goal. It backs up to the nearest
    state with an untried move (saying so when backtracking is spoken), and strategies the condition
    allows (subgoals, backward steps) are tried before plain forward search. Behaviors the condition
    does not allow are still done silently where they are search moves (a plain search also backs
    up), but only allowed ones are written.
    """

    def __init__(self, nums, target, condition, rng, budget):
        self.nums, self.t, self.rng, self.budget = list(nums), target, rng, budget
        self.allowed = ALLOWED_BEHAVIORS[condition]
        self.lines: list[str] = []
        self.metas: list = []  # per line: the COAT meta-action that opens it, or None
        self.breaks: set[int] = set()  # line indices that start a paragraph
        self.counts = dict.fromkeys(BEHAVIORS, 0)
        self.dead_ends = 0
        self.leaves: list[tuple] = []  # (value, tree) of every complete wrong path
        self.first = True  # the next step is the first of an attempt
        self.equations: list[str] = []  # every arithmetic fact stated, for arithmetic_drill

    def text(self, coat: bool = False) -> str:
        """The trace; coat=True opens every step with its meta-action token."""
        def line(i):
            meta = self.metas[i] if coat else None
            return (COAT_TOKENS[meta] + " " if meta else "") + self.lines[i]
        return "".join(("\n" if i in self.breaks else " ") + line(i) for i in range(len(self.lines)))[1:]

    # -- writing -------------------------------------------------------------------------------
    def say(self, templates, meta="continue", **kw):
        """One line; `meta` is the COAT action that opens it (None: it goes on the step before)."""
        self.lines.append(self.rng.choice(templates).format(**kw))
        self.metas.append(meta)

    def behavior(self, name, templates, **kw):
        """Write one instance of a behavior, if the condition speaks it; returns whether it did."""
        if name not in self.allowed:
            return False
        self.counts[name] += 1
        self.say(templates, meta=_BEHAVIOR_META.get(name, "continue"), **kw)
        return True

    def step(self, a, op, b, c):
        self.equations.append(f"{a} {op} {b} = {c}")
        if self.first and self.rng.random() < 0.5:
            self.say(_FIRST_STEP, a=a, op=op, b=b, c=c)
        else:
            text = self.rng.choice(_STEPS[op]).format(a=a, b=b, c=c)
            prefix = "" if self.first else self.rng.choice(_THEN)
            if prefix and text[0].isalpha():
                text = text[0].lower() + text[1:]
            self.lines.append(prefix + text)
            self.metas.append("continue")
        self.first = False

    def new_paragraph(self):
        self.breaks.add(len(self.lines))
        self.first = True

    # -- moves ---------------------------------------------------------------------------------
    def moves(self, items, goal):
        """Every natural move from items, most promising first: a result near the goal, or one
        that the goal is a step away from with one of the remaining numbers (a one-step look-ahead),
        with a little noise so that equal-looking moves are taken in varied orders."""
        out = []
        for i, j in combinations(range(len(items)), 2):
            (a, ta), (b, tb) = items[i], items[j]
            # for + and * say the running result first ("48 + 11", not "11 + 48"), else the larger
            first_i = (isinstance(ta, tuple), a) >= (isinstance(tb, tuple), b)
            rest = [v for k, (v, _) in enumerate(items) if k != i and k != j]
            for v, op, left in _combine(a, b, _NATURAL):
                if v <= 0 or v > VALUE_CAP:
                    continue
                gap = abs(v - goal)
                for r in rest:
                    gap = min(gap, *(abs(w - goal) + 1 for w, _, _ in _combine(v, r, _NATURAL)))
                out.append((gap + 3 * self.rng.random(), (i, j, v, op, first_i if op in "+*" else left)))
        out.sort(key=lambda m: m[0])
        return [m for _, m in out]

    @staticmethod
    def apply(items, move):
        i, j, v, op, left = move
        ti, tj = items[i][1], items[j][1]
        rest = [it for k, it in enumerate(items) if k != i and k != j]
        return rest + [(v, (op, ti, tj) if left else (op, tj, ti))]

    def narrate(self, items, move):
        i, j, v, op, left = move
        a, b = (items[i][0], items[j][0]) if left else (items[j][0], items[i][0])
        self.step(a, op, b, v)
        return self.apply(items, move)

    # -- the search ----------------------------------------------------------------------------
    def dead_end(self, value, tree, goal, full):
        """A complete path that missed `goal`: check it aloud if verification is spoken."""
        self.dead_ends += 1
        if full:
            self.leaves.append((value, tree))
        self.behavior("verification", _VERIFY_FAIL, v=value, g=goal)

    def back_to(self, items, root):
        """Backtracking: return to an earlier state (the start, or an intermediate one)."""
        if self.dead_ends >= self.budget:
            raise _Budget
        state = _join(v for v, _ in items)
        if root:
            self.new_paragraph()
            self.behavior("backtracking", _RESTART, nums=state)
        else:
            self.behavior("backtracking", _GO_BACK, state=state)
            self.first = False

    def dfs(self, items, goal, full, root=True):
        """Depth-first search for `goal` using every item; the tree on success, else None.
        `full`: items are all the given numbers (a miss is a complete wrong answer)."""
        if len(items) == 1:
            return items[0][1] if items[0][0] == goal else None
        moves = self.moves(items, goal)
        if len(items) == 2:  # the last step: take it if it hits, else the nearest miss is a dead end
            hit = [m for m in moves if m[2] == goal]
            if not moves:
                return None
            (value, tree), = self.narrate(items, (hit or moves)[0])
            if value == goal:
                return tree
            self.dead_end(value, tree, goal, full)
            return None
        width = len(moves) if root else _WIDTH
        for k, move in enumerate(moves[:width]):
            if k > 0:
                self.back_to(items, root)
            nxt = self.narrate(items, move)
            # the state is restated after every step: a small model keeps track of the numbers by
            # copying the last statement, not by replaying the whole attempt
            self.say(_LEFT, meta=None, state=_join(v for v, _ in nxt))
            tree = self.dfs(nxt, goal, full, root=False)
            if tree is not None:
                return tree
        return None

    def abandon(self, templates, **kw):
        """Leave a strategy that failed for another one."""
        if self.dead_ends >= self.budget:
            raise _Budget
        self.new_paragraph()
        self.behavior("backtracking", templates, **kw)

    # -- strategies: each returns the answer's tree, or None after failing ----------------------
    def forward(self):
        return self.dfs([(v, i) for i, v in enumerate(self.nums)], self.t, full=True)

    def subgoal(self):
        """Pick an intermediate value s one step from the target with a given number n, make s
        from the other numbers by search, then finish with s and n."""
        plans = []
        for k, n in enumerate(self.nums):
            for x, op, x_left in _inverse(self.t, n, _NATURAL):
                if x_left and x is not None and 1 < x <= VALUE_CAP and x != self.t:
                    kind = {"*": "factor", "/": "multiple", "+": "below", "-": "above"}[op]
                    # prefer factors and small gaps, as a person would
                    pref = {"factor": 0, "below": 1, "above": 2, "multiple": 3}[kind]
                    plans.append((pref + 2 * self.rng.random(), k, n, x, op, kind))
        plans.sort()
        for tries, (_, k, n, s, op, kind) in enumerate(plans[:2]):
            if tries:
                self.abandon(_SUBGOAL_FAIL, s=prev)
            prev = s
            self.new_paragraph()
            self.behavior("subgoal", _SUBGOAL[kind], s=s, n=n, t=self.t)
            rest = [(v, i) for i, v in enumerate(self.nums) if i != k]
            tree = self.dfs(rest, s, full=False)
            if tree is not None:
                self.behavior("verification", _VERIFY_SUB, s=s)
                fwd = f"{s} {op} {n} = {self.t}"
                self.equations.append(fwd)
                self.say(_SUBGOAL_REACHED, s=s, n=n, fwd=fwd)
                return (op, tree, k)
        if plans:
            self.abandon(_SUBGOAL_FAIL, s=prev)
        return None

    def backward(self, goal=None, items=None, depth=0):
        """Work back from the goal one operation at a time: goal = x op n for a given number n, so
        the other numbers must make x; recurse until two numbers are left, then compute forward."""
        goal = self.t if goal is None else goal
        items = [(v, i) for i, v in enumerate(self.nums)] if items is None else items
        if len(items) <= 2:
            return self.dfs(items, goal, full=False)
        opts = []
        for k, (n, leaf) in enumerate(items):
            for x, op, x_left in _inverse(goal, n, _NATURAL):
                if x is not None and 0 < x <= VALUE_CAP and x != goal:
                    opts.append((abs(x - goal) / 10 + 2 * self.rng.random(), k, n, leaf, x, op, x_left))
        opts.sort()
        for tries, (_, k, n, leaf, x, op, x_left) in enumerate(opts[:_WIDTH]):
            rest = [it for m, it in enumerate(items) if m != k]
            if tries:
                self.abandon(_BACKWARD_FAIL, x=prev_x, rest=prev_rest)
            prev_x, prev_rest = x, _join(v for v, _ in rest)
            fwd = f"{x} {op} {n} = {goal}" if x_left else f"{n} {op} {x} = {goal}"
            inv = {("+", True): f"{goal} - {n} = {x}", ("-", True): f"{goal} + {n} = {x}",
                   ("-", False): f"{n} - {goal} = {x}", ("*", True): f"{goal} / {n} = {x}",
                   ("/", True): f"{goal} * {n} = {x}", ("/", False): f"{n} / {goal} = {x}"}[op, x_left]
            templates = _BACKWARD if goal == self.t else _BACKWARD[:2] + _BACKWARD[3:]
            if depth == 0:
                self.new_paragraph()
            self.behavior("backward", templates, g=goal, inv=inv, fwd=fwd, x=x)
            self.say(_NEED, meta=None, x=x, rest=prev_rest)
            self.first = True
            sub = self.backward(x, rest, depth + 1)
            if sub is not None:
                self.equations.append(fwd)
                self.say(_SO, fwd=fwd)
                return (op, sub, leaf) if x_left else (op, leaf, sub)
        if depth == 0 and opts:
            self.abandon(_BACKWARD_FAIL, x=prev_x, rest=prev_rest)
        return None

    # -- a whole trace -------------------------------------------------------------------------
    def run(self, strategies):
        """Opening, then the strategies in order until one finds the target. Returns the answer's
        tree, or None when the budget ran out."""
        self.say(_OPENINGS, nums=_join(self.nums), t=self.t)
        try:
            for name in strategies:
                tree = getattr(self, name)()
                if tree is not None:
                    self.behavior("verification", _VERIFY_OK, t=self.t)
                    return tree
        except _Budget:
            pass
        return None


def _remap(tree, index):
    """Replace each leaf i by index[i] (an index into the full problem, or a whole subtree)."""
    if not isinstance(tree, tuple):
        return index[tree]
    return (tree[0], _remap(tree[1], index), _remap(tree[2], index))


def _spell_steps(tree, nums) -> str:
    parts = []

    def walk(node):
        if not isinstance(node, tuple):
            return nums[node]
        a, b = walk(node[1]), walk(node[2])
        c = _value_of(node[0], a, b)
        parts.append(f"{a} {node[0]} {b} = {c}")
        return c

    walk(tree)
    return ", ".join(parts)


# The strategies each condition's search may use, in the order it tries them (the first two of
# all_strategies are shuffled per trace, and all three of no_positive). Forward search comes last.
_STRATEGIES = {
    "all_strategies": ("subgoal", "backward", "forward"),
    "only_backtracking": ("forward",),
    "backtracking_verification": ("forward",),
    "backtracking_subgoal": ("subgoal", "forward"),
    "backtracking_backward": ("backward", "forward"),
    "no_positive": ("subgoal", "backward", "forward"),
}


def count_tokens(text: str, tokenizer=None) -> int:
    """Tokens of text with `tokenizer` (ours: encode(text, bos=False); or a tokenizers.Tokenizer),
    else whitespace-separated words."""
    if tokenizer is None:
        return len(text.split())
    try:
        ids = tokenizer.encode(text, bos=False)  # model.Tokenizer
    except TypeError:
        ids = tokenizer.encode(text, add_special_tokens=False)  # tokenizers.Tokenizer: no BOS
    return len(getattr(ids, "ids", ids))


def _reasoning(nums, target, condition, rng, coat: bool = False):
    """(think text, answer tree, behavior counts, dead ends) for a condition that writes
    reasoning, or None when this problem gives no trace of the condition (see TRACE_BUDGET).
    coat: write it in COAT form (meta-action tokens at the step boundaries)."""
    if condition == "negative_control":
        trees = _Search(nums, _NATURAL, find_all=True).find((1 << len(nums)) - 1, target)
        tree = rng.choice(trees)
        steps = _spell_steps(tree, nums).split(", ")
        body = "\n".join(f"Step {i + 1}: {st}." for i, st in enumerate(steps))
        return "\n" + body + "\n", tree, dict.fromkeys(BEHAVIORS, 0), 0
    wrong = condition == "no_positive"
    strategies = list(_STRATEGIES[condition])
    if wrong:  # any order: a search that runs out of budget must have met a complete wrong path
        strategies = rng.sample(strategies, 3)
    elif len(strategies) == 3:
        strategies[:2] = rng.sample(strategies[:2], 2)
    w = _Narrator(nums, target, condition, rng, rng.choice(NO_POSITIVE_BUDGETS) if wrong else TRACE_BUDGET)
    tree = w.run(strategies)
    if wrong:
        if tree is not None or not w.leaves:
            return None  # solved within the small budget, or never reached a complete answer
        # out of budget: commit to the nearest complete path, stated as plainly as a right answer
        value, tree = min(w.leaves, key=lambda p: (abs(p[0] - target), rng.random()))
    elif tree is None:
        return None
    w.new_paragraph()
    if rng.random() < 0.4:
        w.behavior("verification", _DOUBLE_CHECK, steps=_spell_steps(tree, nums))
    w.say(_CONCLUDE, expr=_format(tree, lambda i: str(nums[i]), pretty=True))
    return "\n" + w.text(coat) + "\n", tree, w.counts, w.dead_ends


def _trace(row, condition, seed, tokenizer=None):
    """One trace record for a problem row, or None when the problem gives no trace."""
    nums, target = row["nums"], row["target"]
    # empty_cot and dots post-process the all_strategies trace of the same problem, as the paper did;
    # coat writes that same trace with its meta-action tokens
    source = "all_strategies" if condition in ("empty_cot", "dots", "coat") else condition
    rng = random.Random(f"countdown-trace:{source}:{seed}:{row['id']}")
    got = _reasoning(nums, target, source, rng, coat=condition == "coat")
    if got is None:
        return None
    think, tree, counts, dead_ends = got
    answer = f"<answer> {_format(tree, lambda i: str(nums[i]), pretty=True)} </answer>"
    if condition == "empty_cot":
        think, counts = " ", dict.fromkeys(BEHAVIORS, 0)
    elif condition == "dots":
        # The reference wrote N-1 " ." for N tokens of the think text (N counted with Llama's BOS,
        # D-SFT-8); we write exactly N, N = tokens of the think text (words without a tokenizer).
        think, counts = " ." * count_tokens(think, tokenizer), dict.fromkeys(BEHAVIORS, 0)
    completion = f"{think}</think>\n{answer}"
    got = score(completion, nums, target)
    if got != (0.1 if condition == "no_positive" else 1.0) or count_behavior_phrases(completion) != counts:
        raise RuntimeError(f"internal error: bad {condition} trace for {nums} -> {target} "
                           f"(score {got}, counts {counts}); please report it")
    return {"query": make_prompt(nums, target), "completion": completion, "nums": list(nums),
            "target": target, "condition": condition, "behaviors": dict(counts), "dead_ends": dead_ends,
            "id": row["id"]}


def generate_traces(condition: str, n: int, seed: int = 0, distribution: str = "priming",
                    tokenizer=None, progress: bool = False) -> list[dict]:
    """n synthetic traces of one priming condition, on the seeded problem stream of
    generate_problems(..., distribution, seed), skipping the problems that give no trace of the
    condition (a correct-answer search that exceeds TRACE_BUDGET; a no_positive search that solves
    the problem). Records: {"query", "completion", "nums", "target", "condition", "behaviors",
    "dead_ends", "id"}; `id` is the problem's place in the stream. `tokenizer` (optional) measures
    the think text for `dots`; words are used without one."""
    if condition not in CONDITIONS:
        raise ValueError(f"unknown condition {condition!r}; choose one of {list(CONDITIONS)}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rows, bar = [], _progress_bar(n, condition) if progress else None
    for row in _problem_stream(distribution, seed):
        if len(rows) == n:
            break
        tr = _trace(row, condition, seed, tokenizer)
        if tr is not None:
            rows.append(tr)
            if bar is not None:
                bar.update()
    if bar is not None:
        bar.close()
    return rows


def arithmetic_drill(n: int, seed: int = 0, distribution: str = "priming", per_row: int = 8) -> list[dict]:
    """n rows of bare arithmetic facts, {"query": "Arithmetic:", "completion": " a op b = c. ..."}:
    the steps that all_strategies searches state on problems of the distribution (seeded, apart
    from the trace problems), in the trace's own symbolic form. Behavior-free text that teaches a
    small model from scratch the arithmetic its searches will need (the miniature's pretraining)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(f"countdown-drill:{distribution}:{seed}")
    pool: list[str] = []
    rows = []
    stream = _problem_stream(distribution, f"drill-{seed}")
    while len(rows) < n:
        while len(pool) < per_row:
            p = next(stream)
            w = _Narrator(p["nums"], p["target"], "all_strategies", rng, TRACE_BUDGET)
            w.run(rng.sample(_STRATEGIES["all_strategies"][:2], 2) + ["forward"])
            pool.extend(w.equations)
        rng.shuffle(pool)
        facts, pool = pool[:per_row], pool[per_row:]
        rows.append({"query": "Arithmetic:", "completion": " " + " ".join(f"{e}." for e in facts)})
    return rows


def narrated_solution(nums, target, rng) -> str:
    """A behavior-free think text: the opening, then the steps of one solution in the traces'
    varied wording, then the conclusion. The miniature's base learns the traces' language from it
    without ever seeing a check, a return, a subgoal or a backward step."""
    trees = _Search(nums, _NATURAL, find_all=True).find((1 << len(nums)) - 1, target)
    if not trees:
        raise ValueError(f"{nums} -> {target} has no solution under the natural rules")
    tree = rng.choice(trees)
    w = _Narrator(nums, target, "negative_control", rng, 0)
    w.say(_OPENINGS, nums=_join(nums), t=target)
    w.new_paragraph()

    state = list(nums)

    def walk(node):
        if not isinstance(node, tuple):
            return nums[node]
        a, b = walk(node[1]), walk(node[2])
        c = _value_of(node[0], a, b)
        w.step(a, node[0], b, c)
        state.remove(a)
        state.remove(b)
        state.append(c)
        if len(state) > 1:  # the state after each step, as the search traces restate it
            w.say(_LEFT, state=_join(state))
        return c

    walk(tree)
    w.new_paragraph()
    w.say(_CONCLUDE, expr=_format(tree, lambda i: str(nums[i]), pretty=True))
    return "\n" + w.text() + "\n", tree


def pretraining_corpus(n_solutions: int, n_drill: int, seed: int = 0, distribution: str = "priming") -> list[dict]:
    """The miniature's behavior-free pretraining text, shuffled: n_solutions narrated direct
    solutions (narrated_solution: the prompt, the traces' wording, the answer format) and n_drill
    rows of arithmetic_drill (the arithmetic that searches state). Nothing in it checks, backtracks,
    sets a subgoal or works backwards: the "Llama" of the miniature must get those from priming."""
    rows = []
    for p in generate_problems(n_solutions, distribution, seed=f"corpus-{seed}"):
        think, tree = narrated_solution(p["nums"], p["target"], random.Random(f"countdown-corpus:{seed}:{p['id']}"))
        answer = _format(tree, lambda i: str(p["nums"][i]), pretty=True)
        rows.append({"query": make_prompt(p["nums"], p["target"]),
                     "completion": f"{think}</think>\n<answer> {answer} </answer>",
                     "nums": p["nums"], "target": p["target"]})
    rows += arithmetic_drill(n_drill, seed=seed, distribution=distribution)
    random.Random(f"countdown-corpus:{seed}").shuffle(rows)
    return rows


# Arithmetic statements as the traces (and models imitating them) write them: "a op b = c" and
# the worded forms. check_arithmetic reads them back, for the step accuracy of sampled text.
_ARITH = [
    (re.compile(r"(\d+) ([-+*/]) (\d+)(?: =|\? That gives| makes) (\d+)"), None),
    (re.compile(r"[Aa]dding (\d+) and (\d+) gives (\d+)"), "+"),
    (re.compile(r"(\d+) plus (\d+) is (\d+)"), "+"),
    (re.compile(r"[Ss]ubtracting (\d+) from (\d+) leaves (\d+)"), "-r"),
    (re.compile(r"(\d+) minus (\d+) is (\d+)"), "-"),
    (re.compile(r"[Mm]ultiplying (\d+) by (\d+) gives (\d+)"), "*"),
    (re.compile(r"(\d+) times (\d+) is (\d+)"), "*"),
    (re.compile(r"[Dd]ividing (\d+) by (\d+) gives (\d+)"), "/"),
    (re.compile(r"(\d+) divided by (\d+) is (\d+)"), "/"),
]


def check_arithmetic(text: str) -> tuple[int, int]:
    """(right, stated): how many arithmetic statements in text are exactly right, of how many."""
    right = stated = 0
    for pattern, op in _ARITH:
        for m in pattern.finditer(text):
            g = m.groups()
            if op is None:
                a, op_, b, c = int(g[0]), g[1], int(g[2]), int(g[3])
            elif op == "-r":
                b, a, c, op_ = int(g[0]), int(g[1]), int(g[2]), "-"
            else:
                a, b, c, op_ = int(g[0]), int(g[1]), int(g[2]), op
            stated += 1
            right += _value_of(op_, Fraction(a), Fraction(b)) == c if (op_ != "/" or b) else 0
    return right, stated


# -----------------------------------------------------------------------------
# Command line


def _refuse_overwrite(path, force):
    if os.path.exists(path) and not force:
        raise FileExistsError(f"{path} already exists; pass --force to overwrite it or choose another --out")


def _load_tokenizer(path):
    if path is None:
        return None
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise ValueError("--tokenizer needs the `tokenizers` package (pip install tokenizers)") from None
    file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if not os.path.exists(file):
        raise FileNotFoundError(f"{file}: no tokenizer.json there; pass a tokenizer.json file or its folder")
    return Tokenizer.from_file(file)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Countdown problems, synthetic reasoning traces, and a solver.",
        epilog="examples:\n"
               "  python countdown.py problems --distribution rl --n-train 1000 --n-test 100 --out data/countdown\n"
               "  python countdown.py traces --condition all_strategies --n 1000 --out data/all_strategies.jsonl\n"
               "  python countdown.py solve 25 30 3 4 --target 32",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("problems", help="write train.jsonl and test.jsonl of solvable problems",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--distribution", choices=sorted(DISTRIBUTIONS), default="rl",
                   help="rl: ~Countdown-Tasks-3to4 (3-4 numbers in 1..99, targets 10..100); "
                        "priming: the paper's priming problems (3-4 numbers in 1..24, targets 10..25)")
    p.add_argument("--n-train", type=int, default=327_680, help="training problems (paper: 327,680)")
    p.add_argument("--n-test", type=int, default=1_024, help="test problems (paper: 1,024)")
    p.add_argument("--seed", type=int, default=0, help="random seed; same seed, same files")
    p.add_argument("--out", required=True, help="output folder for train.jsonl and test.jsonl")
    p.add_argument("--force", action="store_true", help="overwrite existing files")

    t = sub.add_parser("traces", help="write synthetic reasoning traces of one priming condition",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    t.add_argument("--condition", choices=CONDITIONS, required=True, help="priming condition")
    t.add_argument("--n", type=int, default=1_000, help="number of traces (paper: 1,000 train + 200 test)")
    t.add_argument("--seed", type=int, default=0, help="random seed; same seed, same file")
    t.add_argument("--distribution", choices=sorted(DISTRIBUTIONS), default="priming",
                   help="problem distribution of the traces")
    t.add_argument("--tokenizer", default=None,
                   help="tokenizer.json (or its folder) to length-match `dots` in tokens; words otherwise")
    t.add_argument("--out", required=True, help="output .jsonl file")
    t.add_argument("--force", action="store_true", help="overwrite an existing file")

    c = sub.add_parser("corpus", help="write the behavior-free pretraining corpus of the miniature study",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    c.add_argument("--n-solutions", type=int, default=20_000, help="direct solutions (negative_control traces)")
    c.add_argument("--n-drill", type=int, default=20_000, help="rows of arithmetic facts, 8 per row")
    c.add_argument("--seed", type=int, default=0, help="random seed; same seed, same file")
    c.add_argument("--distribution", choices=sorted(DISTRIBUTIONS), default="priming", help="problem distribution")
    c.add_argument("--out", required=True, help="output .jsonl file")
    c.add_argument("--force", action="store_true", help="overwrite an existing file")

    s = sub.add_parser("solve", help="print one solution (or all with --all)")
    s.add_argument("nums", type=int, nargs="+", help="the numbers (1 to 6 of them)")
    s.add_argument("--target", type=int, required=True, help="the target")
    s.add_argument("--all", action="store_true", help="print every solution (up to swapping + and * operands)")

    args = parser.parse_args(argv)
    try:
        if args.command == "problems":
            paths = [os.path.join(args.out, f"{name}.jsonl") for name in ("train", "test")]
            for path in paths:
                _refuse_overwrite(path, args.force)
            train, test = make_splits(args.n_train, args.n_test, args.distribution, args.seed, progress=True)
            for path, rows in zip(paths, (train, test)):
                write_jsonl(path, rows)
                print(f"wrote {len(rows)} problems to {path}")
        elif args.command == "traces":
            _refuse_overwrite(args.out, args.force)
            if args.n < 0:
                raise ValueError(f"--n must be >= 0, got {args.n}")
            tok = _load_tokenizer(args.tokenizer)
            rows = generate_traces(args.condition, args.n, args.seed, args.distribution, tok, progress=True)
            write_jsonl(args.out, rows)
            print(f"wrote {len(rows)} {args.condition} traces to {args.out}")
        elif args.command == "corpus":
            _refuse_overwrite(args.out, args.force)
            if min(args.n_solutions, args.n_drill) < 0:
                raise ValueError("--n-solutions and --n-drill must be >= 0")
            rows = pretraining_corpus(args.n_solutions, args.n_drill, args.seed, args.distribution)
            write_jsonl(args.out, rows)
            print(f"wrote {len(rows)} pretraining rows to {args.out}")
        else:
            if args.all:
                for expr in solve_all(args.nums, args.target):
                    print(expr)
            else:
                expr = solve(args.nums, args.target)
                print(expr if expr is not None else "no solution")
                return 0 if expr is not None else 1
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
