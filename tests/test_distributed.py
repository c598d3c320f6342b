"""torchrun + FSDP2 on CPU (gloo, 2 processes): SFT under 2 processes gives the single-process
weights and resumes only on its own world size; PPO under 2 processes runs, reduces its metrics
and leaves one loadable checkpoint, with whitening over the global batch; a rank that hangs or dies
makes the other one stop with a clear error instead of hanging."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

import countdown as C
import model as M
import ppo
import sft
from conftest import ROOT, make_checkpoint
from test_sft import _rows

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")


def _env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.update(extra)
    return env


def torchrun(script, args, nproc=2, timeout=180):
    """`python -m torch.distributed.run --nproc-per-node N script args` -> CompletedProcess."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
           str(_free_port()), str(ROOT / script), *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _weights(path):
    m, _ = M.load(path, dtype="float32")
    return {k: v.clone() for k, v in m.state_dict().items()}


def _max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def sft_setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist_sft")
    ckpt = make_checkpoint(d / "ckpt", seed=0)
    C.write_jsonl(d / "train.jsonl", _rows(16, seed=3))
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
    one, two = _weights(d / "one" / "final"), _weights(d / "two" / "final")
    assert one.keys() == two.keys()
    dw = _max_diff(one, two)
    print(f"SFT, 6 AdamW steps, 1 vs 2 processes (stopped and resumed): max |dw| = {dw:.3g}")
    assert dw <= 1e-5
    assert any((one[k] - _weights(ckpt)[k]).abs().max() > 1e-3 for k in one)   # it trained at all
    # rank 0 alone wrote the log: one line per step and per epoch, as the single-process run
    m1, m2 = C.read_jsonl(d / "one" / "metrics.jsonl"), C.read_jsonl(d / "two" / "metrics.jsonl")
    assert [m["step"] for m in m2] == [m["step"] for m in m1]
    for a, b in zip(m1, m2):   # global loss, token count and gradient norm, not one rank's
        assert b["tokens"] == a["tokens"]
        for k in ("loss", "grad_norm", "val_loss"):
            assert (a[k] is None) == (b[k] is None) and (a[k] is None or abs(a[k] - b[k]) < 1e-5), (k, a, b)


# ---------------------------------------------------------------------------------------------
# A rank that hangs or dies


_FAULTY_SFT = """
import os, sys, time
import sft
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
sys.exit(sft.main(sys.argv[2:]))
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
    print(f"{fault}: rank 0 stopped {waited:.1f} s after start")
