"""ppo.py's configuration: every flag with its help text and the paper's default (PPOConfig), which
settings a resume may change, the checks and automatic choices (resolve_config), the memory plan for
a model (resolve_memory, memory_budget, disk_preflight) and the command line (build_parser).

Plumbing for ppo.py (`python ppo.py --help` prints the same flags). Nothing here imports a core file.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import torch

from plumbing import dist, memory, runs
from plumbing.device import param_count

_flag = runs.flag


@dataclass
class PPOConfig:
    """Every flag of a run, with the paper's defaults (paper_spec 2.1); written to config.json."""
    # model and data
    model: str = _flag("qwen2.5-3b", "initial checkpoint (policy, reference and critic backbone): a local folder, "
                       "an alias or a Hub repo id")
    out: str = _flag("runs/ppo", "run folder; rerunning with the same --out resumes from its newest checkpoint")
    train_data: Optional[str] = _flag(None, "JSONL of training problems {\"nums\": [...], \"target\": int}, e.g. "
                                      "the real Countdown-Tasks-3to4 rows; default: generated with "
                                      "countdown.make_splits")
    test_data: Optional[str] = _flag(None, "JSONL of test problems (give both files or neither)")
    distribution: str = _flag("rl", "problem distribution for generated data", choices=("rl", "priming"))
    n_train: int = _flag(0, "generated training problems (0 = steps x batch-prompts: one pass, as the paper's run, "
                         "which stopped long before its first epoch ended)")
    n_test: int = _flag(1024, "generated test problems (paper: 1,024)")
    n_val: int = _flag(0, "validate on the first N test problems (0 = all)")
    template: str = _flag("base", "prompt template from countdown.PROMPT_TEMPLATES", choices=("base", "qwen-instruct"))
    seed: int = _flag(0, "seed for the data, its order, the sampling and the critic head")
    # rollout
    steps: int = _flag(250, "PPO iterations (the paper analyses steps 0-250)")
    batch_prompts: int = _flag(256, "prompts per iteration (paper: 256)")
    samples: int = _flag(4, "responses sampled per prompt (paper: 4, so 1,024 sequences per iteration)")
    temperature: float = _flag(1.0, "sampling temperature of the rollouts; log-probs use the same one")
    top_p: float = _flag(1.0, "nucleus sampling of the rollouts: only 1 (off, the paper's) is accepted, since the "
                         "log-probs PPO uses are those of the untruncated policy")
    max_prompt: int = _flag(256, "longest prompt in tokens; a longer one is an error")
    max_response: int = _flag(1024, "most new tokens per response; a response without EOS is truncated and scored "
                              "as is")
    cap_traces: str = _flag("", "comma-separated JSONL files of the traces the policy was primed on: PPO refuses to "
                            "start when --max-response is below the p99 of their completions in the policy's tokens "
                            "(a cap that cuts the longer traces makes RL punish them)")
    # reward
    format_score: float = _flag(0.1, "reward for a parsable but wrong <answer> on the last line")
    correct_score: float = _flag(1.0, "reward for a correct answer")
    lenient: bool = _flag(False, "take the last <answer> anywhere in the response, not only on the last line")
    rule_reward: str = _flag("paper", "outcome reward: paper (correct-score / format-score / 0) or satori (0 right, "
                             "-1 wrong)", choices=("paper", "satori"))
    # Satori (optional; README "Satori"): Restart-and-Explore over COAT trajectories, reflection bonus
    rae: bool = _flag(False, "Restart-and-Explore: part of each batch restarts from the policy's own past "
                      "trajectories, cut back at a COAT step boundary and followed by <|reflect|> (needs a "
                      "format-tuned model: sft.py --add-tokens coat)")
    rae_ratio: float = _flag(0.5, "fraction of each batch's prompts that are restarts (once the buffers hold some)")
    rae_max_back: int = _flag(4, "T, the COAT steps cut back, is drawn uniformly from 0..min(this, steps - 1)")
    rae_buffer: int = _flag(1024, "trajectories kept in each restart buffer, D+ (correct) and D- (wrong); the "
                            "oldest go first")
    reflection_bonus: float = _flag(0.0, "beta: +beta when a restart from a wrong trajectory ends right, -beta when "
                                    "one from a right trajectory ends wrong (Satori: 0.5)")
    preference_bonus: bool = _flag(False, "add sigmoid(r_psi(x, y)) to the reward, r_psi an outcome reward model "
                                   "(the critic's architecture) trained Bradley-Terry on right-vs-wrong pairs of the "
                                   "policy's own samples, one step per iteration (one more model in memory; not in "
                                   "the budget)")
    orm_lr: float = _flag(0.0, "learning rate of the outcome reward model (0 = --critic-lr)")
    save_correct: bool = _flag(False, "append the rollouts that answered their own problem right to "
                               "<out>/correct.jsonl as SFT rows (query, completion): the data of Satori's "
                               "distillation round")
    # algorithm
    adv: str = _flag("gae", "advantage estimator: gae (PPO with a critic, the paper) or grpo (group-normalized "
                     "sequence rewards, no critic: saves a model's worth of memory)", choices=("gae", "grpo"))
    gamma: float = _flag(1.0, "GAE discount")
    lam: float = _flag(1.0, "GAE lambda")
    kl_coef: float = _flag(0.001, "beta: weight of the per-token KL penalty in the reward (0 = no reference model)")
    kl_estimator: str = _flag("k1", "per-token KL estimator: k1 = logp - ref (the paper); k3 = low_var_kl; abs; mse",
                              choices=("k1", "kl", "k3", "low_var_kl", "abs", "mse"))
    clip_ratio: float = _flag(0.2, "PPO clip epsilon for the probability ratio")
    value_clip: float = _flag(0.5, "clip range of the value update around the old values")
    entropy_coef: float = _flag(0.001, "entropy bonus weight in the actor loss")
    ppo_epochs: int = _flag(1, "passes over each iteration's data")
    mini_batch_prompts: int = _flag(128, "prompts per actor optimizer step (x samples sequences; paper: 128)")
    micro_batch: int = _flag(0, "sequences per forward/backward (gradient accumulation); memory only, unless "
                             "--loss-agg micro-token-mean (0 = 4, or the original's 4 with --fidelity)")
    critic_micro_batch: int = _flag(0, "sequences per critic forward/backward (0 = --micro-batch; --fidelity: 1)")
    infer_batch: int = _flag(16, "sequences per no-grad forward (old log-probs, reference, values)")
    # fidelity switches (the original's quirks, off by default)
    fidelity: bool = _flag(False, "reproduce the original's quirks: --critic-mini-batch = mini-batch-prompts, "
                           "--loss-agg micro-token-mean with micro-batches 4 (actor) / 1 (critic), "
                           "--lr-zero-first-step, --value-post-eos")
    critic_mini_batch: int = _flag(0, "sequences per critic optimizer step (0 = mini-batch-prompts x samples, the "
                                   "actor's; the original: mini-batch-prompts, i.e. 4x more critic steps, D-P1)")
    loss_agg: str = _flag("token-mean", "loss aggregation: token-mean over the mini-batch, or the original's mean over "
                          "micro-batches of micro-batch token means (D-P2)", choices=("token-mean", "micro-token-mean"))
    lr_zero_first_step: bool = _flag(False, "lr 0 for the whole first iteration, as the original's schedule (D-P3)")
    value_post_eos: bool = _flag(False, "also train V on the state after the EOS toward 0, as the original (D-P6)")
    # optimizer
    actor_lr: float = _flag(1e-6, "actor learning rate (constant; paper: 1e-6)")
    critic_lr: float = _flag(1e-5, "critic learning rate (constant; paper: 1e-5)")
    adam_beta1: float = _flag(0.9, "AdamW beta1")
    adam_beta2: float = _flag(0.999, "AdamW beta2")
    adam_eps: float = _flag(1e-8, "AdamW epsilon")
    weight_decay: float = _flag(0.01, "AdamW weight decay (every parameter, as the original)")
    grad_clip: float = _flag(1.0, "clip each model's global gradient norm to this")
    # schedule, checkpoints, logging
    val_every: int = _flag(10, "validate every N steps (0 = never); also at step 0 with --val-before-train")
    val_before_train: bool = _flag(True, "validate the initial model (step 0)")
    val_temperature: float = _flag(0.0, "validation decoding: 0 = greedy (veRL's validation during training); "
                                   "1.0 = one seeded sample per problem, the accuracy the paper's result tables "
                                   "and behavior counts use")
    save_every: int = _flag(10, "checkpoint every N steps; the last step is always checkpointed")
    state_checkpoints: str = _flag("auto", "which checkpoints keep the training state needed to resume: last (older "
                                   "state.pt files are deleted), all, final (only the run's last save, or a stop), "
                                   "none (weights-only saves), auto (last if the disk has room, else none, said at "
                                   "start; a 3B state is ~75 GiB)", choices=("auto", "last", "all", "final", "none"))
    keep_policies: int = _flag(3, "step folders kept: the newest N (their policy and any state); 0 = all (a 3B "
                               "policy folder is 5.75 GiB, 25 of them over the paper's run)")
    state_dir: str = _flag("", "write the training states here (e.g. another disk) and link them from the step "
                           "folders")
    max_bad_updates: int = _flag(3, "stop after this many optimizer updates in a row were skipped for a non-finite "
                                 "loss or gradient")
    resume: bool = _flag(False, "require an existing run in --out to continue (a rerun resumes automatically anyway)")
    progress: bool = _flag(True, "show a tqdm progress bar")
    # device and memory
    device: str = _flag("auto", "cuda, cpu or auto (cuda when available)")
    dtype: str = _flag("auto", "weights and compute dtype: auto (bfloat16 on cuda, float32 on cpu), bfloat16, float32",
                       choices=("auto", "bfloat16", "float32"))
    optim_device: str = _flag("auto", "where fp32 master weights and Adam moments live: auto (the GPU if the "
                              "budget fits, else cpu), cpu, device", choices=("auto", "cpu", "device"))
    ref_offload: bool = _flag(True, "keep the reference model in host memory between uses (cuda only)")
    grad_checkpointing: bool = _flag(True, "recompute each layer in backward (much less activation memory)")
    rollout_batch: int = _flag(0, "prompts per generation call; bounds the KV cache (0 = auto from the budget)")
    compile_rollout: bool = _flag(False, "generate with model.py's fast path: static shapes + torch.compile of the "
                                  "decode step (CUDA graphs; for cuda, unverified here)")
    val_batch: int = _flag(0, "prompts per validation generation call (0 = auto)")
    logprob_chunk: int = _flag(1024, "tokens per chunk of the LM head in log-prob/entropy computation")
    gpu_memory_gb: float = _flag(0.0, "GPU memory for the automatic choices (0 = the device's; 80 without one)")
    threads: int = _flag(0, "CPU threads for torch (0 = torch's default)")
    print_budget: bool = _flag(False, "print the memory budget for these settings and exit (reads only config.json)")
    dist_timeout: int = _flag(dist.DIST_TIMEOUT_S, "under torchrun: seconds a collective waits for the other ranks "
                              "before this one stops with an error (a rank died or hangs)")


# Settings that may change when a run is resumed (speed and memory knobs, the run length, logging);
# everything else must match config.json. rollout/infer batch sizes change which sampled bits
# come out of the generator, so a resume with a different one is valid but not bit-identical.
RESUMABLE_CHANGES = {"steps", "resume", "progress", "device", "threads", "max_bad_updates", "print_budget",
                      "val_every", "save_every", "state_checkpoints", "rollout_batch", "val_batch", "infer_batch",
                      "logprob_chunk", "gpu_memory_gb", "optim_device", "ref_offload", "compile_rollout",
                      "dist_timeout", "keep_policies", "state_dir"}


def resolve_config(cfg: PPOConfig) -> PPOConfig:
    """Fill the automatic and --fidelity settings and check the combination; raise ValueError on nonsense."""
    c = replace(cfg)
    if c.device == "auto":
        c.device = "cuda" if torch.cuda.is_available() else "cpu"
    if c.device not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu, cuda or auto, not {c.device!r}")
    if c.device == "cuda" and not torch.cuda.is_available() and not c.print_budget:
        raise ValueError("--device cuda but no CUDA device is available; use --device cpu")
    if c.dtype == "auto":
        c.dtype = "bfloat16" if c.device == "cuda" else "float32"
    if c.fidelity:  # the original's quirks (paper_spec 2.1, D-P1/2/3/6)
        c.critic_mini_batch = c.critic_mini_batch or c.mini_batch_prompts
        c.loss_agg = "micro-token-mean"
        c.micro_batch = c.micro_batch or 4
        c.critic_micro_batch = c.critic_micro_batch or 1
        c.lr_zero_first_step = c.value_post_eos = True
    c.micro_batch = c.micro_batch or 4
    c.critic_micro_batch = c.critic_micro_batch or c.micro_batch
    c.critic_mini_batch = c.critic_mini_batch or c.mini_batch_prompts * c.samples
    runs.require_at_least(c, ("steps", "batch_prompts", "samples", "max_prompt", "max_response", "mini_batch_prompts",
                              "micro_batch", "critic_micro_batch", "critic_mini_batch", "infer_batch", "ppo_epochs",
                              "logprob_chunk", "save_every", "max_bad_updates"), 1)
    runs.require_at_least(c, ("n_train", "n_test", "n_val", "val_every", "rollout_batch", "val_batch", "threads",
                              "kl_coef", "entropy_coef", "weight_decay", "gpu_memory_gb", "val_temperature",
                              "orm_lr"), 0)
    if c.batch_prompts % c.mini_batch_prompts:
        raise ValueError(f"--batch-prompts {c.batch_prompts} is not a multiple of --mini-batch-prompts "
                         f"{c.mini_batch_prompts}")
    if c.temperature <= 0:
        raise ValueError("--temperature must be > 0 for rollouts (greedy validation: --val-temperature 0)")
    if c.top_p != 1:
        # the sampler reports log pi(y) of the whole distribution, but top-p samples from the truncated,
        # renormalized one: the ratio pi / pi_old and the KL would be computed against the wrong pi_old
        raise ValueError(f"--top-p {c.top_p}: PPO needs the log-probs of the distribution it sampled from, and "
                         "nucleus sampling changes that distribution; use --top-p 1 (the paper's)")
    if c.adv == "grpo" and c.samples < 2:
        raise ValueError("--adv grpo normalizes within each prompt's samples: use --samples >= 2")
    if not (0 <= c.gamma <= 1 and 0 <= c.lam <= 1):
        raise ValueError("--gamma and --lam must be in [0, 1]")
    if c.clip_ratio <= 0 or c.value_clip <= 0 or c.grad_clip <= 0:
        raise ValueError("--clip-ratio, --value-clip and --grad-clip must be > 0")
    if not 0 <= c.rae_ratio < 1:
        raise ValueError(f"--rae-ratio must be in [0, 1), got {c.rae_ratio}: some prompts must be new problems, "
                         "or the buffers would never be refilled")
    if c.rae_max_back < 0 or c.rae_buffer < 1:
        raise ValueError("--rae-max-back must be >= 0 and --rae-buffer >= 1")
    if c.reflection_bonus and not c.rae:
        raise ValueError("--reflection-bonus rewards restarts, which only --rae makes; add --rae")
    return c


# -----------------------------------------------------------------------------
# Memory, the disk and the optimizer (plumbing/memory.py), for one model config (model.checkpoint_config)


def memory_budget(cfg: PPOConfig, mc) -> dict:
    """Bytes of each resident item, where it lives, and the device peak of each phase (plumbing/memory.py)."""
    return memory.memory_budget(cfg, mc, param_count(mc))


def resolve_memory(cfg: PPOConfig, mc) -> PPOConfig:
    """Pick the optimizer's device and the generation batch sizes from the budget (cuda), or trivially (cpu)."""
    return memory.plan_memory(cfg, mc, param_count(mc), dist.world_size(), dist.distributed())


def disk_preflight(cfg: PPOConfig, mc, run: Path, start: int = 0) -> PPOConfig:
    """Resolve --state-checkpoints auto and check the checkpoints fit the disk (plumbing/memory.py)."""
    return memory.disk_preflight(cfg, mc, run, start, n_params=param_count(mc), verbose=dist.is_main())


def adam_settings(cfg: PPOConfig, device) -> dict:
    """MasterAdamW's settings for every trained model (policy, critic, Satori's ORM)."""
    return dict(betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps, weight_decay=cfg.weight_decay,
                master_device="cpu" if cfg.optim_device == "cpu" else device)


# -----------------------------------------------------------------------------
# The command line


def build_parser() -> argparse.ArgumentParser:
    """ppo.py's command line: one flag per PPOConfig field, its help text and default (runs.add_flags)."""
    p = argparse.ArgumentParser(
        description="PPO on Countdown as in 'Cognitive Behaviors that Enable Self-Improving Reasoners': the paper's "
                    "hyperparameters by default, with a cleaned-up update (token-mean loss, as many critic as actor "
                    "steps, the first iteration learns, V on response tokens only); --fidelity gives the original's "
                    "exact update, the paper's run (python ppo.py --model qwen2.5-3b --fidelity). Problems are "
                    "generated (countdown.make_splits, distribution 'rl') unless --train-data/--test-data give "
                    "JSONL files of {\"nums\", \"target\"} rows, e.g. exported from the HF dataset "
                    "Jiayi-Pan/Countdown-Tasks-3to4. A small CPU run (~8 minutes for a 1M-parameter model): "
                    "--model runs/sft_tiny/final --device cpu --distribution priming --n-test 500 --batch-prompts 64 "
                    "--samples 4 --mini-batch-prompts 32 --micro-batch 64 --max-response 96 --steps 150 --actor-lr "
                    "2e-4 --critic-lr 1e-3 --no-grad-checkpointing (a tiny model needs far larger learning rates than "
                    "the paper's).")
    runs.add_flags(p, PPOConfig)
    return p
