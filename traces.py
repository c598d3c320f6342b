"""Synthetic reasoning traces and the miniature's pretraining corpus.

The paper primes models on Claude-written Countdown traces that show (or lack) four cognitive
behaviors: verification, backtracking, subgoal setting and backward chaining. This file writes such
traces itself, as the logs of searches that really run on each problem, so every behavior can be
counted exactly and every stated step checked:

- restart search (`restart`, the miniature's design): every attempt is a whole path written out with
  the numbers left after each step, a visible check against the target, and a visible restart; every
  choice can be read off the text before it (below, "Restart search").
- the narrated depth-first search (`all_strategies` and the paper's other conditions), which also
  sets subgoals and works backwards, for the `paper` priming runs and Satori's COAT traces;
- the behavior-free pretraining corpus of the miniature's base model.

The game itself (problems, prompt, reward, solver) lives in countdown.py.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import sys
from fractions import Fraction
from itertools import combinations

import countdown
from countdown import (_NATURAL, _Search, _combine, _format, _inverse, _problem_stream,
                       _value_of, generate_problems, make_prompt, score)
from plumbing.commands import command_parser, progress_bar, refuse_overwrite, run_command
from plumbing.files import read_jsonl, write_jsonl


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
    "restart", "restart_only_backtracking", "restart_no_positive", "restart_empty_cot", "restart_dots",  # below
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
    "restart": frozenset({"verification", "backtracking"}),
    "restart_only_backtracking": frozenset({"backtracking"}),  # restart's searches without their checks
    "restart_no_positive": frozenset({"verification", "backtracking"}),  # every answer wrong
    "restart_empty_cot": frozenset(),
    "restart_dots": frozenset(),
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
        for _, k, n, s, op, kind in plans[:2]:
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
            self.abandon(_SUBGOAL_FAIL, s=s)
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
        opts = sorted(opts)[:_WIDTH]
        for tries, (_, k, n, leaf, x, op, x_left) in enumerate(opts, 1):
            rest = [it for m, it in enumerate(items) if m != k]
            rest_text = _join(v for v, _ in rest)
            fwd = f"{x} {op} {n} = {goal}" if x_left else f"{n} {op} {x} = {goal}"
            inv = {("+", True): f"{goal} - {n} = {x}", ("-", True): f"{goal} + {n} = {x}",
                   ("-", False): f"{n} - {goal} = {x}", ("*", True): f"{goal} / {n} = {x}",
                   ("/", True): f"{goal} * {n} = {x}", ("/", False): f"{n} / {goal} = {x}"}[op, x_left]
            templates = _BACKWARD if goal == self.t else _BACKWARD[:2] + _BACKWARD[3:]
            if depth == 0:
                self.new_paragraph()
            self.behavior("backward", templates, g=goal, inv=inv, fwd=fwd, x=x)
            self.say(_NEED, meta=None, x=x, rest=rest_text)
            self.first = True
            sub = self.backward(x, rest, depth + 1)
            if sub is not None:
                self.equations.append(fwd)
                self.say(_SO, fwd=fwd)
                return (op, sub, leaf) if x_left else (op, leaf, sub)
            # leave this attempt for the next one; after the last one only the top level says so
            # (a deeper level returns None and its caller leaves its own attempt)
            if tries < len(opts) or depth == 0:
                self.abandon(_BACKWARD_FAIL, x=x, rest=rest_text)
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


def load_tokenizer(path):
    """A `tokenizers.Tokenizer` from a tokenizer.json or the folder holding one; None without a path (count_tokens
    then counts words). The one loader of traces.py and curate.py (--tokenizer)."""
    if not path:
        return None
    try:
        from tokenizers import Tokenizer  # optional: only token counts need it
    except ImportError:
        raise ValueError("--tokenizer needs the `tokenizers` package (pip install tokenizers)") from None
    file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else os.fspath(path)
    if not os.path.exists(file):
        raise FileNotFoundError(f"{file}: no tokenizer.json there; pass a tokenizer.json file or its folder")
    return Tokenizer.from_file(file)


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
    if condition.startswith("restart"):
        return _restart_trace(row, condition, seed, tokenizer)
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
                    tokenizer=None, progress: bool = False, problems=None) -> list[dict]:
    """n synthetic traces of one priming condition, on `problems` (rows {"nums", "target", "id"})
    or else the seeded problem stream of generate_problems(..., distribution, seed). Problems that
    give no trace of the condition are skipped: the narrated conditions skip a correct-answer search
    that exceeds TRACE_BUDGET and a no_positive search that solves it; the restart conditions skip
    none (restart_no_positive only a problem whose every attempt reaches the target). Records:
    {"query", "completion", "nums", "target", "condition", "behaviors", "id", ...}; `id` is the
    problem's id. `tokenizer` (optional) measures the think text for the dots conditions."""
    if condition not in CONDITIONS:
        raise ValueError(f"unknown condition {condition!r}; choose one of {list(CONDITIONS)}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rows, bar = [], progress_bar(n, condition) if progress else None
    for row in _problem_stream(distribution, seed) if problems is None else problems:
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


# Arithmetic statements, read back from text: "a op b = c" and the worded forms ("adding 6 and 4 gives 10").
# One reader, arithmetic_steps, for two grammars: _ARITH below, the forms the traces write (and models
# imitating them), which check_arithmetic scores for the step accuracy of sampled text; and classify.py's
# looser one (free spacing, "x" and "÷", negative results), on which its rules find bare restarts. The two
# stay apart because they read some texts differently ("12 + 3 * 2 = 18" is one wrong step here, no step
# there) and the measured numbers must not move. Each pattern has four groups: a, op, b, c or op, a, b, c.
_OPS = {"+": "+", "-": "-", "*": "*", "/": "/", "x": "*", "×": "*", "÷": "/", "plus": "+", "minus": "-",
        "times": "*", "divided by": "/", "adding": "+", "multiplying": "*", "dividing": "/", "subtracting": "-"}
_ARITH = [re.compile(p) for p in (
    r"(\d+) ([-+*/]) (\d+)(?: =|\? That gives| makes) (\d+)",
    r"([Aa]dding) (\d+) and (\d+) gives (\d+)",
    r"(\d+) (plus) (\d+) is (\d+)",
    r"([Ss]ubtracting) (\d+) from (\d+) leaves (\d+)",
    r"(\d+) (minus) (\d+) is (\d+)",
    r"([Mm]ultiplying) (\d+) by (\d+) gives (\d+)",
    r"(\d+) (times) (\d+) is (\d+)",
    r"([Dd]ividing) (\d+) by (\d+) gives (\d+)",
    r"(\d+) (divided by) (\d+) is (\d+)",
)]


def arithmetic_steps(text: str, grammar=_ARITH) -> list[tuple[int, str, int, int, int]]:
    """[(a, op, b, c, start)]: each statement "a op b = c" of text, ordered by position, op one of + - * /
    ("subtracting 4 from 6 leaves 2" is 6 - 4 = 2). grammar: regexes of four groups, a op b c or op a b c."""
    out = []
    for rx in grammar:
        for m in rx.finditer(text):
            g = m.groups()
            if g[0][0].isdigit():
                a, op, b = g[0], g[1], g[2]
            else:
                op, a, b = g[0], g[1], g[2]
            op = _OPS[" ".join(op.lower().split())]
            if g[0].lower() == "subtracting":  # "subtracting a from b": b - a
                a, b = b, a
            out.append((int(a), op, int(b), int(g[3]), m.start()))
    return sorted(out, key=lambda s: s[4])


def check_arithmetic(text: str) -> tuple[int, int]:
    """(right, stated): how many arithmetic statements in text are exactly right, of how many."""
    steps = arithmetic_steps(text)
    right = sum(_value_of(op, Fraction(a), Fraction(b)) == c if (op != "/" or b) else 0 for a, op, b, c, _ in steps)
    return right, len(steps)


# -----------------------------------------------------------------------------
# Restart search: the miniature's traces, every choice on the page.
#
# A small model copies what it reads. The narrated search above orders its moves by a look-ahead it
# never writes down, so its choices cannot be learned from the text. Here every attempt is a whole
# path, written so that each choice can be read off the text before it:
#   - an early move combines two of the numbers left (restated after every step) under the natural
#     rules (a + b, a * b, larger - smaller, larger / smaller when it divides), result <= VALUE_CAP;
#     which of them is arbitrary, but never the start of an earlier attempt (those are on the page);
#   - the last step, two numbers left, takes the operation that hits the target when one exists,
#     else the one that comes closest (ties: + - * / in that order);
#   - a visible check of the value just computed against the target ("17 is not 24" or
#     "24 equals the target"), then a visible restart ("Let me try a different combination.");
#   - a search that runs out of attempts commits to its closest attempt: a wrong answer, as ~60% of
#     the paper's Claude traces were wrong. No problem is dropped, so every condition can be written
#     from one problem list.
# Behaviors: one verification per attempt (its check), one backtrack per restart. Subgoals and
# backward chaining are not in this design (see the README for why the miniature leaves them out).
# The base's corpus holds single successful attempts in the same step format, with no check and no
# restart: priming then adds the behaviors, not a notation.

RESTART_CONDITIONS = ("restart", "restart_only_backtracking", "restart_no_positive", "restart_empty_cot",
                      "restart_dots")
RESTART_ATTEMPTS = {3: 8, 4: 5}  # attempts before committing, by how many numbers (fits ~256 tokens)
_CHECK_MISS = "{v} is not {t}."
_CHECK_HIT = "{v} equals the target."
_RETRY = "Let me try a different combination."
_COMMIT = "None of these reach {t}. The closest is {v}."


def _early_moves(state):
    """Legal early moves on a list of (value, tree) items: (i, j, op, value), larger operand first."""
    out = []
    for i in range(len(state)):
        for j in range(i + 1, len(state)):
            a, b = state[i][0], state[j][0]
            if a < b:
                i_, j_, a, b = j, i, b, a
            else:
                i_, j_ = i, j
            quotient = a // b if b > 1 and a % b == 0 else 0
            for op, v in (("+", a + b), ("-", a - b), ("*", a * b), ("/", quotient)):
                if 0 < v <= VALUE_CAP:
                    out.append((i_, j_, op, v))
    return out


def _last_step(x, y, target):
    """(op, value) of the final step on two values: the hit if any, else the closest (+ - * / order)."""
    a, b = max(x, y), min(x, y)
    cands = [("+", a + b), ("-", a - b), ("*", a * b)]
    if b > 0 and a % b == 0:
        cands.append(("/", a // b))
    return min(cands, key=lambda c: abs(c[1] - target))  # min keeps the first of equals: + - * /


def _attempt(nums, target, rng, tried, hits=None):
    """One attempt as (words, value, tree, key), or None when no start is left to try.

    `tried` holds the early-move keys of earlier attempts; the new one is drawn among the others.
    hits=True/False: only starts whose last step does / does not reach the target."""
    state = [(n, i) for i, n in enumerate(nums)]
    starts = []

    # enumerate the early-move sequences (~10 for 3 numbers, ~200 for 4) and draw one uniformly
    # among the untried ones
    def walk(st, prefix):
        if len(st) == 2:
            hit = _last_step(st[0][0], st[1][0], target)[1] == target
            if prefix not in tried and (hits is None or hits == hit):
                starts.append(prefix)
            return
        for i, j, op, v in _early_moves(st):
            # the numbers left keep their order; of equal numbers the first is used (one text per move)
            a, b = st[i][0], st[j][0]
            i = next(k for k, s in enumerate(st) if s[0] == a)
            j = next(k for k, s in enumerate(st) if s[0] == b and k != i)
            rest = [s for k, s in enumerate(st) if k not in (i, j)] + [(v, (op, st[i][1], st[j][1]))]
            walk(rest, prefix + ((st[i][0], op, st[j][0], v, tuple(s[0] for s in rest)),))
    walk(state, ())
    if not starts:
        return None
    seq = rng.choice(sorted(set(starts)))
    words = []
    for a, op, b, v, left in seq:
        words.append(f"{a} {op} {b} = {v}. Left: {', '.join(map(str, left))}.")
        # rebuild the items so the last step has trees
        ia = next(k for k, s in enumerate(state) if s[0] == a)
        ta = state.pop(ia)
        ib = next(k for k, s in enumerate(state) if s[0] == b)
        tb = state.pop(ib)
        state.append((v, (op, ta[1], tb[1])))
    (x, tx), (y, ty) = state
    op, v = _last_step(x, y, target)
    (a, ta), (b, tb) = ((x, tx), (y, ty)) if x >= y else ((y, ty), (x, tx))
    words.append(f"{a} {op} {b} = {v}.")
    return words, v, (op, ta, tb), seq


def restart_search(nums, target, rng, max_attempts=None, wrong_only=False, checks=True):
    """(think lines, answer tree, value reached, attempts) of one restart search.

    wrong_only: draw only starts that miss (restart_no_positive); None if the problem has none.
    checks=False: the same search without its spoken checks (restart_only_backtracking)."""
    nums = [int(x) for x in nums]
    max_attempts = max_attempts or RESTART_ATTEMPTS.get(len(nums), 5)
    lines, done, tried = [], [], set()
    for _ in range(max_attempts):
        got = _attempt(nums, target, rng, tried, hits=False if wrong_only else None)
        if got is None:
            break
        words, v, tree, key = got
        tried.add(key)
        if lines:
            lines[-1] += " " + _RETRY
        done.append((v, tree))
        check = (_CHECK_HIT if v == target else _CHECK_MISS).format(v=v, t=target) if checks else ""
        lines.append(" ".join(words + [check]).rstrip())
        if v == target:
            return lines, tree, v, len(done)
    if not done:
        return None
    v, tree = min(done, key=lambda d: abs(d[0] - target))  # min keeps the earliest of equals
    lines.append(_COMMIT.format(t=target, v=v))
    return lines, tree, v, len(done)


_STEP_THEN_CHECK = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)\. (\d+) (?:is not (\d+)|(equals the target))\.")


def read_checks(text: str, target) -> tuple[int, int]:
    """(consistent, checks) over the restart checks in text ("x op y = v. v is not T." or
    "... v equals the target."): a check is consistent when it names the value just computed and its
    verdict is right about the target (T is the target and v differs from it; or v is the target)."""
    good = n = 0
    for m in _STEP_THEN_CHECK.finditer(text):
        v, named, other, hit = int(m.group(4)), int(m.group(5)), m.group(6), m.group(7)
        n += 1
        good += named == v and (v == target if hit else (int(other) == target and v != target))
    return good, n


def _restart_trace(row, condition, seed, tokenizer=None):
    """One restart-family record for a problem row, or None (restart_no_positive, no missing start)."""
    nums, target = [int(x) for x in row["nums"]], int(row["target"])
    wrong = condition == "restart_no_positive"
    rng = random.Random(f"countdown-restart:{'wrong' if wrong else 'search'}:{seed}:{row['id']}")
    checks = condition != "restart_only_backtracking"
    got = restart_search(nums, target, rng, wrong_only=wrong, checks=checks)
    if got is None:
        return None
    lines, tree, value, attempts = got
    think = "\n" + "\n".join(lines) + "\n"
    counts = dict.fromkeys(BEHAVIORS, 0)
    counts["verification"], counts["backtracking"] = attempts if checks else 0, attempts - 1
    if condition == "restart_empty_cot":
        think, counts = " ", dict.fromkeys(BEHAVIORS, 0)
    elif condition == "restart_dots":
        think, counts = " ." * count_tokens(think, tokenizer), dict.fromkeys(BEHAVIORS, 0)
    answer = _format(tree, lambda i: str(nums[i]), pretty=True)
    completion = f"{think}</think>\n<answer> {answer} </answer>"
    if score(completion, nums, target) != (1.0 if value == target else 0.1) or (
            count_behavior_phrases(completion) != counts):
        raise RuntimeError(f"internal error: bad {condition} trace for {nums} -> {target}; please report it")
    return {"query": make_prompt(nums, target), "completion": completion, "nums": nums, "target": target,
            "condition": condition, "behaviors": counts, "attempts": attempts,
            "dead_ends": attempts - (value == target), "correct": value == target, "id": row["id"]}


def single_path(nums, target, rng) -> str:
    """A behavior-free completion: one successful attempt in the restart traces' step format, no
    check and no restart, then the answer (the base corpus). Uniform among the hitting starts."""
    nums = [int(x) for x in nums]
    got = _attempt(nums, target, rng, set(), hits=True)
    if got is None:
        raise ValueError(f"{nums} -> {target}: no attempt of the restart search reaches the target")
    words, _, tree, _ = got
    answer = _format(tree, lambda i: str(nums[i]), pretty=True)
    return "\n" + " ".join(words) + f"\n</think>\n<answer> {answer} </answer>"


def restart_drill(n: int, seed: int = 0, distribution: str = "priming", per_row: int = 8) -> list[dict]:
    """n rows of arithmetic facts as restart attempts state them ({"query": "Arithmetic:", ...})."""
    rng = random.Random(f"countdown-restart-drill:{distribution}:{seed}")
    stream = _problem_stream(distribution, f"restart-drill-{seed}")
    rows = []
    while len(rows) < n:
        facts = []
        while len(facts) < per_row:
            p = next(stream)
            words = _attempt(p["nums"], p["target"], rng, set())[0]
            facts += [w.split(". Left")[0].rstrip(".") for w in words]
        rows.append({"query": "Arithmetic:", "completion": " " + " ".join(f"{e}." for e in facts[:per_row])})
    return rows


def restart_corpus(problems, n_drill: int, seed: int = 0) -> list[dict]:
    """The restart design's behavior-free pretraining text, shuffled: one single_path per problem
    (the prompt, the step format, the answer; a problem no attempt solves, ~4%, is skipped) and
    n_drill rows of restart_drill."""
    rows = []
    for p in problems:
        try:
            text = single_path(p["nums"], p["target"], random.Random(f"countdown-single:{seed}:{p['id']}"))
        except ValueError:  # no attempt of the restart search reaches the target
            continue
        rows.append({"query": make_prompt(p["nums"], p["target"]), "completion": text,
                     "nums": list(p["nums"]), "target": p["target"]})
    rows += restart_drill(n_drill, seed=seed)
    random.Random(f"countdown-restart-corpus:{seed}").shuffle(rows)
    return rows


def _problem_rows(path, offset, n):
    """Rows offset..offset+n of a problems JSONL file, or a clear error."""
    rows = read_jsonl(path)[offset:]
    if n is not None and len(rows) < n:
        raise ValueError(f"{path} has {len(rows)} problems after --offset {offset}, fewer than the {n} asked for")
    return rows[:n] if n is not None else rows


def _run(args):
    """One command: write the traces of a condition, or the pretraining corpus."""
    refuse_overwrite(args.out, args.force)
    if args.offset < 0:
        raise ValueError(f"--offset must be >= 0, got {args.offset}")
    if args.command == "traces":
        if args.n < 0:
            raise ValueError(f"--n must be >= 0, got {args.n}")
        tok = load_tokenizer(args.tokenizer)
        problems = None if args.problems is None else _problem_rows(args.problems, args.offset, args.n)
        rows = generate_traces(args.condition, args.n, args.seed, args.distribution, tok, progress=True,
                               problems=problems)
        write_jsonl(args.out, rows)
        msg = f"wrote {len(rows)} {args.condition} traces to {args.out}"
        if rows and "correct" in rows[0]:
            right = sum(r["correct"] for r in rows)
            msg += f"; {right} ({right / len(rows):.1%}) end with a right answer"
        if problems is not None and len(rows) < len(problems):
            msg += f"; {len(problems) - len(rows)} of the {len(problems)} problems give no trace of it"
        print(msg)
    else:
        if min(args.n_solutions, args.n_drill) < 0:
            raise ValueError("--n-solutions and --n-drill must be >= 0")
        if args.design == "narrated":
            if args.problems is not None:
                raise ValueError("--problems goes with --design restart")
            rows = pretraining_corpus(args.n_solutions, args.n_drill, args.seed, args.distribution)
        else:
            problems = (generate_problems(args.n_solutions, args.distribution, seed=f"corpus-{args.seed}")
                        if args.problems is None else _problem_rows(args.problems, args.offset, args.n_solutions))
            rows = restart_corpus(problems, args.n_drill, args.seed)
        write_jsonl(args.out, rows)
        print(f"wrote {len(rows)} pretraining rows to {args.out}")


def main(argv=None):
    parser, sub = command_parser(
        "Synthetic reasoning traces of the priming conditions, and the miniature's pretraining corpus.",
        ["python traces.py traces --condition restart --problems data/train.jsonl --n 4000 --out r.jsonl",
         "python traces.py traces --condition all_strategies --n 1000 --out data/all_strategies.jsonl",
         "python traces.py corpus --design restart --problems data/train.jsonl --offset 4000 --out c.jsonl"])

    t = sub.add_parser("traces", help="write synthetic reasoning traces of one priming condition",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    t.add_argument("--condition", choices=CONDITIONS, required=True, help="priming condition")
    t.add_argument("--n", type=int, default=1_000, help="number of traces (paper: 1,000 train + 200 test)")
    t.add_argument("--seed", type=int, default=0, help="random seed; same seed, same file")
    t.add_argument("--distribution", choices=sorted(countdown.DISTRIBUTIONS), default="priming",
                   help="problem distribution of the traces (without --problems)")
    t.add_argument("--problems", default=None,
                   help="problems JSONL to write the traces from (rows --offset on), so that every "
                        "condition sees the same problems; default: the seeded stream of --distribution")
    t.add_argument("--offset", type=int, default=0, help="first row of --problems to use")
    t.add_argument("--tokenizer", default=None,
                   help="tokenizer.json (or its folder) to length-match `dots` in tokens; words otherwise")
    t.add_argument("--out", required=True, help="output .jsonl file")
    t.add_argument("--force", action="store_true", help="overwrite an existing file")

    c = sub.add_parser("corpus", help="write the behavior-free pretraining corpus of the miniature study",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    c.add_argument("--design", choices=("restart", "narrated"), default="restart",
                   help="restart: single successful attempts in the restart traces' step format + their "
                        "arithmetic; narrated: direct solutions in the narrated traces' wording (first design)")
    c.add_argument("--n-solutions", type=int, default=20_000, help="solutions (one per problem)")
    c.add_argument("--n-drill", type=int, default=20_000, help="rows of arithmetic facts, 8 per row")
    c.add_argument("--problems", default=None,
                   help="problems JSONL for the solutions (rows --offset on); default: a seeded stream")
    c.add_argument("--offset", type=int, default=0, help="first row of --problems to use")
    c.add_argument("--seed", type=int, default=0, help="random seed; same seed, same file")
    c.add_argument("--distribution", choices=sorted(countdown.DISTRIBUTIONS), default="priming",
                   help="problem distribution")
    c.add_argument("--out", required=True, help="output .jsonl file")
    c.add_argument("--force", action="store_true", help="overwrite an existing file")

    return run_command(_run, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
