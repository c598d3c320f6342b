"""
satori.py: Satori's additions to PPO (Shen et al., 2025, "Satori: Reinforcement Learning with
Chain-of-Action-Thought Enhances LLM Reasoning via Autoregressive Search"), on Countdown.

  1. COAT format: the reasoning is a chain of steps, each opened by a meta-action token
     <|continue|>, <|reflect|> or <|explore|> (traces.COAT_TOKENS; sft.py --add-tokens coat tunes a
     model to the format first).
  2. Restart-and-Explore (--rae): part of every batch restarts from the policy's own past
     trajectories, cut back by T steps and followed by <|reflect|>: RestartBuffers, sample_restarts,
     cut_back, coat_steps, fill_restart_buffers.
  3. The reflection bonus (--reflection-bonus beta): +beta when a restart from a wrong trajectory ends
     right, -beta when one from a right trajectory ends wrong.
  4. The preference bonus (--preference-bonus): sigmoid of an outcome reward model, trained
     Bradley-Terry on right-vs-wrong pairs of the policy's own samples, joins the rule reward.
  5. --save-correct: the right answers as SFT rows, the data of Satori's distillation round.

Everything else is ppo.py's PPO, unchanged: the class Satori at the end is the extension ppo.py's
training loop calls at its seam (ppo._extension), when one of these flags is on. The run is
`python satori.py` with ppo.py's flags (`python ppo.py --rae ...` does the same).
"""

import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

import countdown
import model as M
import ppo
import traces
from plumbing import dist, files
from plumbing.memory import MasterAdamW

# -----------------------------------------------------------------------------
# Restart-and-Explore and the reflection bonus
#
# A COAT trajectory is a chain of steps, each opened by a meta-action token (traces.COAT_TOKENS).
# After each rollout, the trajectories of the batch's own prompts go to two buffers, D+ (right
# answers) and D- (wrong ones). A restart takes one of them, keeps its first n - T steps (T >= 0
# drawn per restart; n = its steps), appends <|reflect|>, and hands that to the policy as a prompt:
# the policy learns to check work in progress, and to repair it (from D-) or keep it (from D+).
# The reflection bonus makes those two lessons explicit: +beta when a restart from D- ends right,
# -beta when one from D+ ends wrong; nothing otherwise.


def reflection_bonus(origin: Optional[str], correct: bool, beta: float) -> float:
    """Satori's bonus for one response: origin None (a plain prompt), "+" or "-" (the restart's buffer)."""
    if origin == "-" and correct:
        return beta
    if origin == "+" and not correct:
        return -beta
    return 0.0


_COAT_STEP = re.compile("|".join(re.escape(t) for t in traces.COAT_TOKENS.values()))


def cut_back(text: str, back: int) -> Optional[str]:
    """The reasoning of a COAT response with its last `back` steps removed and <|reflect|> appended,
    or None when it has no complete reasoning (no </think>) or fewer than back + 1 steps."""
    end = text.find("</think>")
    if end < 0:
        return None
    starts = [m.start() for m in _COAT_STEP.finditer(text, 0, end)]
    if back < 0 or len(starts) < back + 1:
        return None
    cuts = starts + [end]                      # step i is text[cuts[i]:cuts[i + 1]]
    return text[:cuts[len(starts) - back]].rstrip() + " " + traces.COAT_TOKENS["reflect"]


def coat_steps(text: str) -> int:
    """Steps (meta-action tokens) in the reasoning of a response."""
    end = text.find("</think>")
    return len(_COAT_STEP.findall(text, 0, end if end >= 0 else len(text)))


@dataclass
class Restart:
    problem: dict
    prompt_ids: list      # the problem's prompt, the kept steps and <|reflect|>
    origin: str           # "+" (cut from a right trajectory) or "-" (a wrong one)
    back: int             # T, the steps cut back


class RestartBuffers:
    """D+ and D-: (problem, response text) of past trajectories with complete reasoning, newest last."""

    def __init__(self, size: int):
        self.size = size
        self.pos: list = []
        self.neg: list = []

    def add(self, problem: dict, text: str, correct: bool):
        if coat_steps(text) == 0 or "</think>" not in text:
            return                              # nothing to restart from
        buf = self.pos if correct else self.neg
        buf.append((problem, text))
        del buf[:-self.size]

    def state_dict(self) -> dict:
        return {"pos": [[p, t] for p, t in self.pos], "neg": [[p, t] for p, t in self.neg]}

    def load_state_dict(self, d: dict):
        self.pos = [(p, t) for p, t in d["pos"]][-self.size:]
        self.neg = [(p, t) for p, t in d["neg"]][-self.size:]


def sample_restarts(buffers: RestartBuffers, k: int, rng: random.Random, tokenizer: M.Tokenizer,
                    cfg: ppo.PPOConfig) -> list:
    """Up to k restarts: a buffer at random (each half the time while both hold trajectories), a
    trajectory of it uniformly, T uniformly in 0..min(--rae-max-back, steps - 1). Restarts longer
    than --max-prompt tokens are skipped."""
    out = []
    for _ in range(4 * k):                     # a few spare draws for the skipped ones
        if len(out) == k or not (buffers.pos or buffers.neg):
            break
        origin = rng.choice([b for b, buf in (("+", buffers.pos), ("-", buffers.neg)) if buf])
        problem, text = rng.choice(buffers.pos if origin == "+" else buffers.neg)
        back = rng.randint(0, min(cfg.rae_max_back, coat_steps(text) - 1))
        prefix = cut_back(text, back)
        ids = ppo.encode_prompts(tokenizer, [problem], cfg)[0] + tokenizer.encode(prefix)
        if len(ids) <= cfg.max_prompt:
            out.append(Restart(problem, ids, origin, back))
    return out


def fill_restart_buffers(buffers: RestartBuffers, rows, problems, origins, samples: int):
    """Put this batch's trajectories of its own prompts (not the restarts' continuations) in D+ / D-."""
    for i, (_, text, correct) in enumerate(rows):
        if origins[i // samples] is None:
            buffers.add(problems[i // samples], text, correct)


def save_correct_rows(path: Path, rows, problems, origins, step: int, cfg: ppo.PPOConfig):
    """Append the right answers to the batch's own prompts as SFT rows (a restart's continuation is
    not a whole trajectory)."""
    for i, (_, text, correct) in enumerate(rows):
        p = problems[i // cfg.samples]
        if correct and origins[i // cfg.samples] is None:
            files.append_jsonl(path, {"query": countdown.make_prompt(p["nums"], p["target"], cfg.template),
                                          "completion": text, "nums": p["nums"], "target": p["target"], "step": step})


# The preference bonus. An outcome reward model r_psi (the critic's architecture; its score is the
# head's output at the last token) learns from the policy's own samples: for a prompt with a right
# response y+ and a wrong one y-, Bradley-Terry models P(y+ preferred) = sigmoid(r(y+) - r(y-)), and
# the loss is -log of it, averaged over every such pair in the batch. sigmoid(r_psi(x, y)) in (0, 1)
# joins the rule reward; each batch is scored before the ORM trains on it.


def bradley_terry_loss(r_pos, r_neg):
    """-log sigmoid(r+ - r-), the mean over pairs."""
    return -F.logsigmoid(r_pos - r_neg).mean()


def orm_scores(orm: ppo.Critic, sequences, pad_id: int) -> torch.Tensor:
    """r_psi of each token list (prompt + response): the head at its last token. Right-padded and
    unmasked: in a causal model no real token attends to the padding after it."""
    device = orm.score.weight.device
    lengths = torch.tensor([len(q) for q in sequences], device=device)
    ids = torch.full((len(sequences), int(lengths.max())), pad_id, dtype=torch.long)
    for i, q in enumerate(sequences):
        ids[i, :len(q)] = torch.as_tensor(q, dtype=torch.long)
    return orm(ids.to(device))[torch.arange(len(sequences), device=device), lengths - 1]


@torch.no_grad()
def preference_bonus(orm: ppo.Critic, sequences, pad_id: int, batch: int) -> list:
    orm.eval()
    return [b for i in range(0, len(sequences), batch)
            for b in torch.sigmoid(orm_scores(orm, sequences[i:i + batch], pad_id)).tolist()]


def preference_pairs(correct, group: int) -> list:
    """(right row, wrong row) for every such pair within each prompt's group of samples."""
    return [(i, j) for g in range(0, len(correct), group) for i in range(g, g + group)
            for j in range(g, g + group) if correct[i] and not correct[j]]


def update_orm(orm: ppo.Critic, opt: MasterAdamW, sequences, correct, cfg: ppo.PPOConfig, pad_id: int) -> dict:
    """One optimizer step on the Bradley-Terry loss of the batch's pairs, a prompt group at a time."""
    pairs = preference_pairs(correct, cfg.samples)
    if not pairs:
        return {}
    orm.train()
    opt.zero_grad()
    loss_sum, ranked = 0.0, 0
    for g in range(0, len(sequences), cfg.samples):
        group = [(i - g, j - g) for i, j in pairs if g <= i < g + cfg.samples]
        if group:
            r = orm_scores(orm, sequences[g:g + cfg.samples], pad_id)
            pos, neg = r[[i for i, _ in group]], r[[j for _, j in group]]
            loss = bradley_terry_loss(pos, neg) * (len(group) / len(pairs))   # the mean over all pairs
            loss.backward()
            loss_sum += loss.item()
            ranked += int((pos > neg).sum())
    norm, ok = opt.step(cfg.orm_lr or cfg.critic_lr, cfg.grad_clip)
    if not ok:
        opt.zero_grad()
    orm.eval()
    return {"orm_loss": loss_sum, "orm_pair_accuracy": ranked / len(pairs)}


# -----------------------------------------------------------------------------
# The rewards: ppo.py judges every response; Satori adds its bonuses and measures restarts apart


def satori_reward(hooks, responses, texts, judged, scores, extra):
    """Add the reflection bonus (restarts) and the preference bonus (hooks.orm) to the rule scores,
    record (prompt + response ids, text, correct?) per row in hooks.rows, and the restarts' accuracy
    per buffer in extra. Returns (scores, the judgments of the batch's own prompts)."""
    cfg, origins = hooks.cfg, hooks.origins
    origin = [origins[i // cfg.samples] for i in range(len(judged))]
    scores = [s + reflection_bonus(o, ok, cfg.reflection_bonus) for s, (_, ok, _), o in zip(scores, judged, origin)]
    prompts = hooks.prompts
    seqs = None if prompts is None else [list(prompts[i // cfg.samples]) + list(r) for i, r in enumerate(responses)]
    if hooks.rows is not None:
        hooks.rows[:] = [(q, t, j[1]) for q, t, j in zip(seqs, texts, judged)]
    if hooks.orm is not None:
        bonus = preference_bonus(hooks.orm, seqs, hooks.tokenizer.pad_id, cfg.infer_batch)
        scores = [s + b for s, b in zip(scores, bonus)]
        extra["preference_bonus_mean"] = sum(bonus) / len(bonus)
    own = [j for j, o in zip(judged, origin) if o is None]
    if len(own) < len(judged):  # Satori's restarts: how often they end right, per buffer
        for sign, name in (("+", "restart_pos_accuracy"), ("-", "restart_neg_accuracy")):
            got = [j[1] for j, o in zip(judged, origin) if o == sign]
            extra[name] = sum(got) / len(got) if got else None
        extra["restart_frac"] = 1 - len(own) / len(judged)
    return scores, own


def countdown_reward(tokenizer: M.Tokenizer, problems, cfg: ppo.PPOConfig, origins=None, orm=None, prompts=None,
                     outcomes: Optional[list] = None):
    """ppo.countdown_reward with Satori's parts: origins[i] is None for a problem's own prompt, "+" /
    "-" for a restart cut from a right / wrong trajectory; orm (with the prompts' token ids): sigmoid(r_psi)
    joins every score; outcomes (with prompts): a list each call refills with (prompt + response ids,
    response text, correct?) per row."""
    hooks = Satori(cfg, tokenizer)
    hooks.origins, hooks.orm, hooks.prompts, hooks.rows = origins or [None] * len(problems), orm, prompts, outcomes
    return ppo.countdown_reward(tokenizer, problems, cfg, hooks)


# -----------------------------------------------------------------------------
# The extension ppo.py's training loop calls (see ppo._extension for the hooks and where they run)


class Satori:
    """Restart buffers, the outcome reward model and correct.jsonl of one run, and the hooks that use them."""

    def __init__(self, cfg: ppo.PPOConfig, tokenizer: M.Tokenizer, run: Optional[Path] = None):
        self.cfg, self.tokenizer, self.run = cfg, tokenizer, run
        self.buffers, self.orm, self.orm_opt = None, None, None
        self.problems, self.prompts, self.origins, self.rows = [], None, [], None

    def start(self, models: ppo.Models, init_path, adam: dict):
        """Check the tokenizer and build the buffers (--rae) and the ORM (--preference-bonus)."""
        cfg = self.cfg
        if cfg.preference_bonus:  # the outcome reward model: a critic-shaped scorer with a head of its own
            backbone, _ = M.load(init_path, device=models.device, dtype=cfg.dtype)
            self.orm = ppo.Critic(backbone, seed=cfg.seed + 1).eval()
            self.orm_opt = MasterAdamW(self.orm.parameters(), lr=cfg.orm_lr or cfg.critic_lr, **adam)
        if cfg.rae:
            missing = [t for t in traces.COAT_TOKENS.values() if self.tokenizer.tk.token_to_id(t) is None]
            if missing:
                raise ValueError(f"--rae restarts at COAT meta-action tokens, and {cfg.model}'s tokenizer lacks "
                                 f"{', '.join(missing)}: format-tune it first (sft.py --add-tokens coat --data "
                                 "<traces.py traces --condition coat>)")
            self.buffers = RestartBuffers(cfg.rae_buffer)
        return self

    def batch(self, problems, prompts, step: int):
        """(problems, prompts) of this step: with --rae the batch's last prompts restart from past trajectories."""
        cfg, origins = self.cfg, [None] * len(problems)
        if self.buffers is not None:
            restarts = sample_restarts(self.buffers, round(cfg.rae_ratio * len(problems)),
                                       random.Random(f"rae:{cfg.seed}:{step}"), self.tokenizer, cfg)
            keep = len(problems) - len(restarts)
            problems = problems[:keep] + [r.problem for r in restarts]
            prompts = prompts[:keep] + [r.prompt_ids for r in restarts]
            origins = origins[:keep] + [r.origin for r in restarts]
        self.problems, self.prompts, self.origins, self.rows = problems, prompts, origins, []
        return problems, prompts

    def reward(self, responses, texts, judged, scores, extra):
        return satori_reward(self, responses, texts, judged, scores, extra)

    def after_step(self, step: int) -> dict:
        """Learn from this batch's outcomes: the buffers, correct.jsonl, one ORM step (its metrics)."""
        cfg, rows = self.cfg, self.rows
        if self.buffers is not None:
            fill_restart_buffers(self.buffers, rows, self.problems, self.origins, cfg.samples)
        if cfg.save_correct:
            save_correct_rows(self.run / "correct.jsonl", rows, self.problems, self.origins, step, cfg)
        if self.orm is not None:
            return update_orm(self.orm, self.orm_opt, [r[0] for r in rows], [r[2] for r in rows], cfg,
                              self.tokenizer.pad_id)
        return {}

    def state_dict(self) -> dict:
        """Satori's part of state.pt (the keys older checkpoints have too)."""
        return {"rae": self.buffers.state_dict() if self.buffers is not None else None,
                "orm": self.orm.state_dict() if self.orm is not None else None,
                "orm_opt": self.orm_opt.state_dict() if self.orm is not None else None}

    def load_state_dict(self, state: dict):
        if self.buffers is not None and state.get("rae") is not None:
            self.buffers.load_state_dict(state["rae"])
        if self.orm is not None and state.get("orm") is not None:
            self.orm.load_state_dict(state.pop("orm"))
            self.orm_opt.load_state_dict(state.pop("orm_opt"))


def main(argv=None) -> int:
    """ppo.py's command line: the Satori flags (--rae, --reflection-bonus, --preference-bonus,
    --orm-lr, --save-correct, --rule-reward satori) are among its flags."""
    return ppo.main(argv)


if __name__ == "__main__":
    dist.exit_process(main())
