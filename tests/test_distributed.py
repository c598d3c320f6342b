"""torchrun + FSDP2 on CPU (gloo, 2 processes): SFT under 2 processes gives the single-process
weights and resumes only on its own world size; PPO under 2 processes runs, reduces its metrics
and leaves one loadable checkpoint, with whitening over the global batch; a rank that hangs or dies
makes the other one stop with a clear error instead of hanging."""
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

import model as M
import ppo
from plumbing import files, ppo_run
import sft
from conftest import ROOT, load_weights, make_checkpoint, max_abs_diff
from test_sft import _rows

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")


def _env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.update(extra)
    return env


def torchrun(script, args, nproc=2, timeout=180):
    """`python -m torch.distributed.run --nproc-per-node N script args` -> CompletedProcess."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
           str(_free_port()), str(script if os.path.isabs(script) else ROOT / script), *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def sft_setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist_sft")
    ckpt = make_checkpoint(d / "ckpt", seed=0)
    files.write_jsonl(d / "train.jsonl", _rows(16, seed=3))
    return d, ckpt


def _sft_args(d, ckpt, out, **kw):
    args = dict(model=ckpt, data=d / "train.jsonl", out=out, val_fraction=0.25, epochs=2, batch_size=4,
                micro_batch_size=1, device="cpu", lr=1e-3, num_threads=1)
    args.update(kw)
    return [x for k, v in args.items() for x in (f"--{k.replace('_', '-')}", str(v))]


# ---------------------------------------------------------------------------------------------
# SFT


def test_sft_two_processes_give_the_single_process_weights_and_resume_only_on_their_world_size(sft_setup):
    d, ckpt = sft_setup
    assert sft.main(_sft_args(d, ckpt, d / "one")) == 0
    # 2 processes, stopped after 2 of 6 steps, then resumed: the straight single-process weights
    r = torchrun("sft.py", _sft_args(d, ckpt, d / "two", stop_after=2))
    assert r.returncode == 0, r.stderr[-3000:]
    # the same folder under a plain python (1 process): refused, naming the world size to use
    r1 = subprocess.run([sys.executable, "sft.py", *map(str, _sft_args(d, ckpt, d / "two"))], cwd=ROOT, env=_env(),
                        capture_output=True, text=True, timeout=120)
    assert r1.returncode == 2 and "checkpointed by 2 process(es) and this is 1" in r1.stderr, r1.stderr[-2000:]
    r = torchrun("sft.py", _sft_args(d, ckpt, d / "two"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming" in r.stderr
    one, two = load_weights(d / "one" / "final"), load_weights(d / "two" / "final")
    assert one.keys() == two.keys()
    dw = max_abs_diff(one, two)
    print(f"SFT, 6 AdamW steps, 1 vs 2 processes (stopped and resumed): max |dw| = {dw:.3g}")
    assert dw <= 1e-5
    assert any((one[k] - load_weights(ckpt)[k]).abs().max() > 1e-3 for k in one)   # it trained at all
    # rank 0 alone wrote the log: one line per step and per epoch, as the single-process run
    m1, m2 = files.read_jsonl(d / "one" / "metrics.jsonl"), files.read_jsonl(d / "two" / "metrics.jsonl")
    assert [m["step"] for m in m2] == [m["step"] for m in m1]
    for a, b in zip(m1, m2):   # global loss, token count and gradient norm, not one rank's
        assert b["tokens"] == a["tokens"]
        for k in ("loss", "grad_norm", "val_loss"):
            assert (a[k] is None) == (b[k] is None) and (a[k] is None or abs(a[k] - b[k]) < 1e-5), (k, a, b)


# ---------------------------------------------------------------------------------------------
# A rank that hangs or dies


_FAULTY_SFT = """
import os, sys, time
import model as M, sft
from plumbing import dist
calls = [0]
real = sft.batch_loss
def batch_loss(*a, **kw):
    calls[0] += 1
    if os.environ["RANK"] == "1" and kw.get("backward") and calls[0] == 2:
        if sys.argv[1] == "hang":
            time.sleep(3600)
        os._exit(3)
    return real(*a, **kw)
sft.batch_loss = batch_loss
dist.exit_process(sft.main(sys.argv[2:]))   # as sft.py's own main guard
"""


@pytest.mark.parametrize("fault", ["hang", "die"])
def test_a_rank_that_hangs_or_dies_stops_the_other_with_a_clear_error(sft_setup, fault, tmp_path):
    """Both ranks started as torchrun would (its env variables), without torchrun's agent, which would
    kill the survivors itself: the survivor must find out alone, by its collective's timeout."""
    d, ckpt = sft_setup
    port = _free_port()
    args = _sft_args(d, ckpt, tmp_path / "run", dist_timeout=5)
    procs = [subprocess.Popen([sys.executable, "-c", _FAULTY_SFT, fault, *map(str, args)], cwd=ROOT,
                              env=_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                       MASTER_PORT=str(port)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    t0 = time.monotonic()
    try:
        _, err = procs[0].communicate(timeout=90)
        waited = time.monotonic() - t0
    finally:
        for p in procs:
            p.kill()
            p.communicate()
    assert procs[0].returncode == 1, err[-3000:]
    assert "error: rank 0 of 2: a collective with the other processes failed" in err, err[-3000:]
    assert "Another rank probably died or hangs" in err
    print(f"{fault}: rank 0 stopped {waited:.1f} s after start:", [x for x in err.splitlines() if "error:" in x][-1])


# ---------------------------------------------------------------------------------------------
# PPO

# ppo.py under torchrun, recording what each rank saw: its problems and its experience per step
_RECORDING_PPO = """
import os, sys, torch
import model as M, ppo
from plumbing import dist
rank, record = os.environ["RANK"], sys.argv[1]
real_iteration, real_reward = ppo.ppo_iteration, ppo.countdown_reward
seen = {}
def countdown_reward(tokenizer, problems, cfg, *args):
    seen["problems"] = [dict(p) for p in problems]
    return real_reward(tokenizer, problems, cfg, *args)
def ppo_iteration(models, prompts, reward_fn, cfg, step, **kw):
    metrics, exp, outcomes = real_iteration(models, prompts, reward_fn, cfg, step, **kw)
    keep = ("scores", "response_mask", "kl", "rewards", "values", "returns", "raw_advantages", "advantages")
    torch.save({"problems": seen["problems"], **{k: getattr(exp, k) for k in keep}},
               os.path.join(record, f"rank{rank}_step{step}.pt"))
    return metrics, exp, outcomes
ppo.countdown_reward, ppo.ppo_iteration = countdown_reward, ppo_iteration
dist.exit_process(ppo.main(sys.argv[2:]))   # as ppo.py's own main guard
"""


def _ppo_args(ckpt, out, **kw):
    args = dict(model=ckpt, out=out, device="cpu", batch_prompts=4, samples=2, mini_batch_prompts=2, micro_batch=2,
                max_response=6, max_prompt=1024, steps=2, val_every=2, n_val=3, n_train=8, n_test=3, save_every=2,
                actor_lr=1e-3, critic_lr=1e-3, seed=3, threads=1)
    args.update(kw)
    return [x for k, v in args.items() for x in (f"--{k.replace('_', '-')}", str(v))] + ["--no-progress"]


def test_ppo_two_processes_reduce_metrics_whiten_globally_and_leave_one_loadable_checkpoint(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt", seed=1)
    record = tmp_path / "record"
    record.mkdir()
    out = tmp_path / "run"
    script = tmp_path / "recording_ppo.py"
    script.write_text(_RECORDING_PPO)
    r = torchrun(script, [record, *_ppo_args(ckpt, out)])
    assert r.returncode == 0, r.stderr[-4000:]

    train = files.read_jsonl(out / "data" / "train.jsonl")
    rows = files.read_jsonl(out / "metrics.jsonl")
    assert [m["step"] for m in rows] == [0, 1, 2]                 # rank 0 alone logged
    assert all(set(m) == set(ppo_run.METRIC_KEYS) for m in rows)
    for step in (1, 2):
        parts = [torch.load(record / f"rank{k}_step{step}.pt", weights_only=True) for k in (0, 1)]
        # the two ranks rolled out disjoint halves of the step's problems: rank r the r-th half of each mini-batch
        batch = [train[i] for i in ppo.batch_indices(len(train), 4, step, 3)]
        assert parts[0]["problems"] == [batch[0], batch[2]] and parts[1]["problems"] == [batch[1], batch[3]]

        def cat(key):   # the rollouts of both ranks as one batch, right-padded to the wider one
            R = max(p[key].shape[1] for p in parts)
            return torch.cat([torch.nn.functional.pad(p[key], (0, R - p[key].shape[1])) for p in parts])
        mask, raw = cat("response_mask"), cat("raw_advantages")
        # GAE per row, then whitening over the global batch: what one process computes on these rollouts
        adv, ret = ppo.compute_gae(cat("rewards"), cat("values"), mask)
        assert torch.allclose(adv, raw, atol=1e-6) and torch.allclose(ret, cat("returns"), atol=1e-6)
        whitened = ppo.masked_whiten(raw, mask)
        dist_whitened = cat("advantages")
        print(f"step {step}: max |whitened(2 processes) - whitened(one batch)| = "
              f"{(whitened - dist_whitened).abs().max().item():.2g}")
        assert torch.allclose(dist_whitened, whitened, atol=1e-6)
        valid = dist_whitened[mask.bool()]
        assert abs(valid.mean().item()) < 1e-5 and abs(valid.var().item() - 1) < 1e-4   # mean 0, unbiased var 1
        # the logged metrics are over both ranks' rows, not rank 0's
        m = rows[step]
        scores = torch.cat([p["scores"] for p in parts])
        assert m["reward_mean"] == pytest.approx(scores.mean().item(), abs=1e-6)
        assert m["response_length"] == pytest.approx(mask.sum(1).mean().item(), abs=1e-6)
        assert m["kl"] == pytest.approx(ppo.masked_mean(cat("kl"), mask).item(), abs=1e-6)
        assert m["value_mean"] == pytest.approx(ppo.masked_mean(cat("values"), mask).item(), abs=1e-6)
        assert m["advantage_raw_mean"] == pytest.approx(ppo.masked_mean(raw, mask).item(), abs=1e-6)
        local0 = ppo.masked_mean(parts[0]["values"], parts[0]["response_mask"]).item()
        assert abs(local0 - m["value_mean"]) > 1e-6    # so the check above could tell rank 0's mean from the global one

    # one checkpoint: a model.load folder (the gathered policy) and a state that says its world size
    ck = out / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["step_2"]
    policy, _ = M.load(ck / "step_2" / "policy")
    state = torch.load(ck / "step_2" / "state.pt", weights_only=True)
    assert state["world_size"] == 2 and state["step"] == 2
    full = {k: v for k, v in state["policy"].items() if k != "lm_head.weight"}
    assert all(torch.equal(policy.state_dict()[k], v) for k, v in full.items())   # fp32 masters = the saved folder
    initial = M.load(ckpt)[0].state_dict()
    assert not torch.equal(policy.state_dict()["embed_tokens.weight"], initial["embed_tokens.weight"])
    assert set(state["critic"]) == set(ppo.Critic(M.load(ckpt)[0]).state_dict())
    # validation: every test problem once, in the test set's order, written by rank 0 alone
    comp = files.read_jsonl(out / "completions" / "step_2.jsonl")
    test = files.read_jsonl(out / "data" / "test.jsonl")
    assert [(c["nums"], c["target"]) for c in comp] == [(p["nums"], p["target"]) for p in test[:3]]
    assert rows[2]["val_response_length"] == pytest.approx(sum(c["length"] for c in comp) / 3)
    # the same folder in one process: refused, naming the world size to use
    assert ppo.main(_ppo_args(ckpt, out, steps=4)) == 2


# one PPO update (critic, then actor) on fixed rollouts: under torchrun each rank takes its share of the
# prompts; without torchrun one process takes them all. Writes the updated fp32 weights (rank 0).
_ONE_UPDATE = """
import sys, torch
import model as M, ppo
from plumbing import dist
ckpt, out, loss_agg = sys.argv[1:4]
cfg = ppo.resolve_config(ppo.PPOConfig(model=ckpt, device="cpu", batch_prompts=4, samples=2, mini_batch_prompts=2,
                                       critic_mini_batch=4, micro_batch=1, max_response=6, actor_lr=1e-3,
                                       critic_lr=1e-3, loss_agg=loss_agg, grad_checkpointing=False, seed=5))
cfg = ppo.resolve_memory(cfg, M.checkpoint_config(ckpt))
models, tok = ppo.build_models(cfg, ckpt, ckpt)
g = torch.Generator().manual_seed(0)
N, R = 8, 6
prompts = [torch.randint(1, 300, (5,), generator=g).tolist() for _ in range(4)]
tokens = torch.randint(1, 300, (N, R), generator=g)
lengths = torch.randint(1, R + 1, (N,), generator=g)
tokens[torch.arange(R)[None, :] >= lengths[:, None]] = tok.pad_id
scores = torch.rand(N, generator=g)
mine = ppo.rank_share(list(range(4)), cfg.mini_batch_prompts)      # all four prompts in one process
rows = [i * 2 + j for i in mine for j in range(2)]
gen = M.Generation(tokens[rows], torch.zeros(len(rows), R), lengths[rows])
exp = ppo.make_experience([prompts[i] for i in mine], gen, 2, scores[rows].tolist(), tok.pad_id, tok.eos_id)
ppo.prepare_experience(exp, models, cfg)
stats = ppo.update_critic(models.critic, models.critic_opt, exp, cfg, cfg.critic_lr)
stats.update(ppo.update_actor(models.policy, models.actor_opt, exp, cfg, cfg.actor_lr))
state = {**{"policy." + k: v for k, v in dist.full_state_dict(models.policy).items()},
         **{"critic." + k: v for k, v in dist.full_state_dict(models.critic).items()}}
if dist.is_main():
    torch.save({"weights": state, "stats": stats}, out)
dist.close_distributed()
dist.exit_process(0)
"""


@pytest.mark.parametrize("loss_agg", ["token-mean", "micro-token-mean"])
def test_one_ppo_update_under_two_processes_equals_the_single_process_update(tmp_path, loss_agg):
    """Global token counts in the normalizers and summed gradients: the update does not depend on the
    world size (for the original's micro-token-mean too, as a mean over all ranks' micro-batches)."""
    ckpt = make_checkpoint(tmp_path / "ckpt", seed=2)
    script = tmp_path / "one_update.py"
    script.write_text(_ONE_UPDATE)
    one = subprocess.run([sys.executable, str(script), str(ckpt), str(tmp_path / "one.pt"), loss_agg], cwd=ROOT,
                         env=_env(), capture_output=True, text=True, timeout=120)
    assert one.returncode == 0, one.stderr[-3000:]
    r = torchrun(script, [ckpt, tmp_path / "two.pt", loss_agg])
    assert r.returncode == 0, r.stderr[-3000:]
    (a, sa), (b, sb) = (torch.load(tmp_path / f"{n}.pt").values() for n in ("one", "two"))
    init = {"policy." + k: v for k, v in M.load(ckpt)[0].state_dict().items()}
    assert max((a[k] - init[k]).abs().max().item() for k in init) > 1e-4      # the update moved the weights
    dw = max_abs_diff(a, b)
    print(f"one PPO update ({loss_agg}), 1 vs 2 processes: max |dw| = {dw:.3g}; "
          + ", ".join(f"{k} {sa[k]:.6g} / {sb[k]:.6g}" for k in ("actor_grad_norm", "critic_grad_norm", "actor_loss")))
    assert dw <= 1e-5
    # Adam's step barely sees a gradient's scale: the losses and gradient norms must match too
    assert sa["actor_outcomes"] == sb["actor_outcomes"] == [True, True]
    for k in ("actor_loss", "value_loss", "actor_grad_norm", "critic_grad_norm", "pg_loss", "entropy", "vf_clipfrac"):
        assert sb[k] == pytest.approx(sa[k], rel=1e-5, abs=1e-7), k


def test_satoris_options_are_refused_under_torchrun(tmp_path):
    """--rae, --preference-bonus and --save-correct keep per-process state; two processes would
    silently diverge, so they are refused with a message that says so."""
    ckpt = make_checkpoint(tmp_path / "ck")
    r = torchrun("ppo.py", _ppo_args(ckpt, tmp_path / "run") + ["--save-correct"])
    assert r.returncode != 0 and "run in one process only" in r.stderr and "drop torchrun" in r.stderr
