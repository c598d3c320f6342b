"""sft.py: example layout and loss mask, the loss against a hand computation, gradients at prompt
positions, micro-batch invariance, resume equivalence, Ctrl-C safety, overfitting + greedy accuracy,
and the from-scratch checkpoint loading in model.py and in transformers with the same logits."""
import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

import countdown as C
import model as M
import sft
import traces
from plumbing import files, sft_config, sft_eval, sft_run
from conftest import load_weights, lock_held_elsewhere, make_checkpoint, max_abs_diff

# ---------------------------------------------------------------------------------------------
# helpers


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain little from a second thread, and OpenMP threads that compete with other
    processes for 2 cores can run 10x slower: one thread keeps this file's time predictable."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _rows(n, seed=0, distribution="priming"):
    """n Countdown SFT rows with correct, short completions of varied length."""
    rows = []
    for i, p in enumerate(C.generate_problems(n, distribution, seed=seed)):
        expr = C.solve(p["nums"], p["target"])
        filler = " Let me see." * (i % 3)
        rows.append({"query": C.make_prompt(p["nums"], p["target"]),
                     "completion": f"{filler} {expr} = {p['target']}. </think>\n<answer> {expr} </answer>",
                     "nums": p["nums"], "target": p["target"]})
    return rows


def _cfg(tmp_path, name, data, **kw):
    base = dict(data=str(data), out=str(tmp_path / name), val_fraction=0.0, epochs=1, batch_size=4,
                micro_batch_size=2, device="cpu", lr=1e-3)
    base.update(kw)
    return sft.SFTConfig(**base)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A random tiny Llama checkpoint (conftest tokenizer, 400 tokens)."""
    return make_checkpoint(tmp_path_factory.mktemp("sft_ckpt") / "tiny", seed=0)


@pytest.fixture(scope="module")
def data12(tmp_path_factory):
    path = tmp_path_factory.mktemp("sft_data") / "train.jsonl"
    files.write_jsonl(path, _rows(12, seed=3))
    return path


# ---------------------------------------------------------------------------------------------
# example layout, loss, gradients


def test_example_is_query_then_completion_then_eos_without_bos(tiny_tokenizer):
    tok = tiny_tokenizer
    q, c = C.make_prompt([3, 17, 8], 12), " 17 - 8 = 9. </think>\n<answer> 17 - 8 + 3 </answer>"
    ids, n_prompt = sft.tokenize_example(tok, q, c)
    assert ids == tok.encode(q) + tok.encode(c) + [tok.eos_id]     # separately tokenized, like RL
    assert n_prompt == len(tok.encode(q)) and tok.decode(ids[:n_prompt]) == q
    assert tok.decode(ids[n_prompt:-1]) == c
    # the loss mask selects exactly the completion tokens and the EOS as targets, nothing else
    ex = [(torch.tensor(ids), n_prompt), (torch.tensor(ids[:n_prompt + 3] + [tok.eos_id]), n_prompt)]
    inputs, targets, mask = sft.collate(ex, tok.pad_id, "cpu")
    assert inputs.shape == (2, len(ids) - 1)
    assert targets[0][mask[0]].tolist() == ids[n_prompt:]
    assert targets[1][mask[1]].tolist() == ids[n_prompt:n_prompt + 3] + [tok.eos_id]
    assert mask.sum().item() == sft.n_loss_tokens(ex) == (len(ids) - n_prompt) + 4


def test_loss_equals_hand_computation(ckpt):
    model, tok = M.load(ckpt, dtype="float32")
    rows = [("Using [1, 2] make 3.<think>", " 1 + 2 = 3 </think>"),
            ("Numbers 7 and 8, target 15: <think>", " 7 + 8 </think><answer>7+8</answer>")]
    ex = [(torch.tensor(i), n) for i, n in (sft.tokenize_example(tok, q, c) for q, c in rows)]
    # by hand: each example alone (no padding), log_softmax of the full logits, the completion tokens
    # and EOS as targets, one sum over both examples divided by their total completion tokens
    nll, count, per_example = 0.0, 0, []
    with torch.no_grad():
        for ids, n_prompt in ex:
            logp = F.log_softmax(model(ids[None])[0].double(), dim=-1)   # [L, V]
            terms = [-logp[j - 1, ids[j]].item() for j in range(n_prompt, len(ids))]
            nll, count = nll + sum(terms), count + len(terms)
            per_example.append(sum(terms) / len(terms))
    expected = nll / count
    for mb in (1, 2):
        loss, _ = sft.batch_loss(model, ex, micro_batch_size=mb, pad_id=tok.pad_id)
        assert loss == pytest.approx(expected, rel=1e-6)
    # a token mean over the batch, not the mean of per-example means (the lengths differ here)
    assert abs(expected - sum(per_example) / 2) > 1e-3


def test_prompt_positions_get_no_gradient(ckpt):
    model, tok = M.load(ckpt, dtype="float32")
    model.train()
    rows = _rows(2, seed=5)
    ex, _ = sft.tokenize_examples(tok, rows, 2048)
    grads = {}
    # the gradient w.r.t. the final hidden states: position t feeds only the logits at t, so it is
    # non-zero exactly where the logits are in the loss
    def keep_grad(module, inputs, out):
        out.register_hook(lambda g: grads.update(h=g))
    hook = model.norm.register_forward_hook(keep_grad)
    sft.batch_loss(model, ex, micro_batch_size=2, pad_id=tok.pad_id, backward=True)
    hook.remove()
    _, _, mask = sft.collate(sorted(ex, key=lambda e: len(e[0])), tok.pad_id, "cpu")
    g = grads["h"]                                           # [B, T, D]
    assert g.shape[:2] == mask.shape
    assert torch.all(g[~mask] == 0)                          # prompt (and padding) positions: exactly zero
    assert torch.all(g[mask].abs().sum(-1) > 0)              # every completion position: non-zero
    n_prompt = [n for _, n in sorted(ex, key=lambda e: len(e[0]))]
    assert mask[0, :n_prompt[0] - 1].sum() == 0 and mask[0, n_prompt[0] - 1]

    # and changing what a prompt position "should" predict changes no parameter gradient
    def param_grads(targets):
        model.zero_grad()
        sft.completion_ce_sum(model, inputs, targets, mask).backward()
        return [p.grad.clone() for p in model.parameters()]
    inputs, targets, mask = sft.collate(ex, tok.pad_id, "cpu")
    corrupted = targets.clone()
    corrupted[~mask] = (corrupted[~mask] + 7) % tok.vocab_size
    for a, b in zip(param_grads(targets), param_grads(corrupted)):
        assert torch.equal(a, b)


def test_gradient_checkpointing_and_chunked_loss_give_the_same_gradients(ckpt):
    model, tok = M.load(ckpt, dtype="float32")
    model.train()
    ex, _ = sft.tokenize_examples(tok, _rows(3, seed=6), 2048)
    inputs, targets, mask = sft.collate(ex, tok.pad_id, "cpu")

    def grads(gc, chunk):
        model.gradient_checkpointing = gc
        model.zero_grad()
        loss = sft.completion_ce_sum(model, inputs, targets, mask, chunk=chunk)
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters()]
    l0, g0 = grads(False, 2048)
    l1, g1 = grads(True, 16)          # 16-token loss chunks: several checkpointed pieces
    assert l1 == pytest.approx(l0, rel=1e-6)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # summation order only


def test_micro_batch_size_does_not_change_the_update(ckpt, tmp_path):
    model, tok = M.load(ckpt, dtype="float32")
    model.train()
    ex, _ = sft.tokenize_examples(tok, _rows(8, seed=7), 2048)
    ref = None
    for mb in (1, 3, 8):
        model.zero_grad()
        loss, _ = sft.batch_loss(model, ex, micro_batch_size=mb, pad_id=tok.pad_id, backward=True)
        g = [p.grad.clone() for p in model.parameters()]
        if ref is None:
            ref = (loss, g)
            continue
        assert loss == pytest.approx(ref[0], rel=1e-6)
        for a, b in zip(ref[1], g):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6 * a.abs().max().item())  # float sum order
    # end to end: one optimizer step at the peak lr (no warmup), micro-batch 1 vs 8
    data = tmp_path / "d.jsonl"
    files.write_jsonl(data, _rows(8, seed=7))
    outs = [sft.train(_cfg(tmp_path, f"mb{mb}", data, model=str(ckpt), batch_size=8, micro_batch_size=mb,
                           warmup_ratio=0.0)) for mb in (1, 8)]
    w1, w8, w0 = load_weights(outs[0]), load_weights(outs[1]), load_weights(ckpt)
    assert max_abs_diff(w1, w0) > 5e-4               # the step did move the weights (lr 1e-3)
    # Adam's first step is ~ lr * g / (|g| + eps): for entries with |g| near eps, float summation
    # order moves the update by a small fraction of lr, hence 1% of lr rather than 1e-7
    assert max_abs_diff(w1, w8) < 1e-5
    logged = [files.read_jsonl(o.parent / "metrics.jsonl")[0] for o in outs]
    assert logged[0]["loss"] == pytest.approx(logged[1]["loss"], rel=1e-6)
    assert logged[0]["grad_norm"] == pytest.approx(logged[1]["grad_norm"], rel=1e-5)


# ---------------------------------------------------------------------------------------------
# schedule


def test_eval_generation_runs_in_the_compute_dtype_not_autocast_over_fp32(ckpt, tiny_tokenizer, monkeypatch):
    """With bf16 autocast, greedy_accuracy generates with a bf16 copy of the fp32 weights (a bf16 KV
    cache), outside autocast; the trained fp32 model is left as it was."""
    model, tok = M.load(ckpt)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen, generate = [], M.generate

    def spy(net, *a, **k):
        seen.append((net.embed_tokens.weight.dtype, torch.is_autocast_enabled("cpu")))
        return generate(net, *a, **k)
    monkeypatch.setattr(M, "generate", spy)
    problems = [{"nums": [1, 2, 3], "target": 6}, {"nums": [4, 5], "target": 9}]
    sft.greedy_accuracy(model, tok, problems, max_new_tokens=3, autocast="bfloat16")
    sft.greedy_accuracy(model, tok, problems, max_new_tokens=3, autocast="none")
    assert seen == [(torch.bfloat16, False), (torch.float32, False)]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert model.embed_tokens.weight.dtype == torch.float32


def test_device_auto_refuses_the_cpu_for_a_model_above_1b(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    big = tmp_path / "big"                                   # only a config: refused before any weight is read
    big.mkdir()
    (big / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 28,
        "num_attention_heads": 24, "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": True}))
    (tmp_path / "d.jsonl").write_text('{"query": "a", "completion": "b"}\n')
    argv = ["--model", str(big), "--data", str(tmp_path / "d.jsonl"), "--out", str(tmp_path / "o"), "--device"]
    assert sft.main(argv + ["auto"]) == 2
    err = capsys.readouterr().err
    assert "3.21B-parameter" in err and "driver >= 580" in err and "whl/cu126" in err
    assert sft.main(argv + ["cpu"]) != 0 and "driver" not in capsys.readouterr().err   # explicit: no refusal


def test_warmup_cosine_schedule_equals_transformers():
    """The independent reference: transformers' get_cosine_schedule_with_warmup (veRL's schedule),
    stepped through a real optimizer, with int(ratio * total) warmup steps."""
    transformers = pytest.importorskip("transformers")
    for total, peak, ratio in [(20, 2.0, 0.1), (75, 1e-5, 0.1), (10, 1e-3, 0.0), (7, 0.5, 0.3)]:
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
        sched = transformers.get_cosine_schedule_with_warmup(opt, int(ratio * total), total)
        want = []
        for _ in range(total + 1):
            want.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        got = [sft.lr_at(s, total, peak, warmup_ratio=ratio) for s in range(total + 1)]
        assert got == pytest.approx(want, rel=1e-9, abs=1e-15), (total, ratio)


def test_warmup_cosine_schedule_by_hand():
    p = 2.0
    # 20 steps, warmup int(0.1 * 20) = 2: lr(0) = 0 (as the original), lr(1) = p/2, then cosine
    assert sft.lr_at(0, 20, p) == 0.0
    assert sft.lr_at(1, 20, p) == pytest.approx(1.0)
    assert sft.lr_at(2, 20, p) == pytest.approx(2.0)
    assert sft.lr_at(11, 20, p) == pytest.approx(1.0)                               # halfway: cos(pi/2)
    assert sft.lr_at(19, 20, p) == pytest.approx(1.0 + math.cos(math.pi * 17 / 18))  # p/2 (1 + cos(17pi/18))
    assert sft.lr_at(20, 20, p) == pytest.approx(0.0, abs=1e-12)
    # the paper: 1,000 examples / 64 = 15 steps x 5 epochs = 75, warmup int(7.5) = 7
    assert sft.lr_at(6, 75, 1e-5) == pytest.approx(6 / 7 * 1e-5)
    assert sft.lr_at(7, 75, 1e-5) == pytest.approx(1e-5)
    assert sft.lr_at(0, 10, 1e-3, warmup_ratio=0.0) == pytest.approx(1e-3)


# ---------------------------------------------------------------------------------------------
# resume and interruption


RUN = dict(epochs=3, warmup_ratio=0.2, val_fraction=0.25)   # 12 rows: 9 train, 3 val; 2 steps x 3 epochs


@pytest.fixture(scope="module")
def straight(ckpt, data12, tmp_path_factory):
    """An uninterrupted run: 9 training examples, batch 4, 3 epochs = 6 steps, warmup 1 step."""
    tmp = tmp_path_factory.mktemp("sft_straight")
    out = sft.train(_cfg(tmp, "run", data12, model=str(ckpt), **RUN))
    return out, files.read_jsonl(tmp / "run" / "metrics.jsonl")


def _train_losses(metrics):
    return [(m["step"], m["loss"], m["lr"]) for m in metrics if m["kind"] == "train"]


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(ckpt, data12, straight, tmp_path):
    final, metrics = straight
    cfg = _cfg(tmp_path, "run", data12, model=str(ckpt), stop_after=3, **RUN)
    assert sft.train(cfg) is None                           # stopped after 3 of 6 steps, mid-epoch 2
    assert sft_run.latest_state(tmp_path / "run").name == "step_3.pt"
    cfg.stop_after = 0
    resumed = sft.train(cfg)                                # the same command again: resumes at step 3
    assert max_abs_diff(load_weights(final), load_weights(resumed)) == 0.0
    got = files.read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert _train_losses(got) == _train_losses(metrics)     # every step once, the same losses and lrs
    assert [m["lr"] for m in got if m["kind"] == "train"] == [sft.lr_at(s, 6, 1e-3, 0.2) for s in range(6)]
    assert all(set(m) == set(sft_run.METRIC_KEYS) for m in got)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["epoch_1", "epoch_2", "epoch_3"]
    # the held-out loss of each epoch is the token-mean loss of that epoch's weights on the split
    evals = [m for m in got if m["kind"] == "eval"]
    assert [m["step"] for m in evals] == [2, 4, 6] and all(m["accuracy"] is None for m in evals)
    _, val_rows = sft.split_validation(files.read_jsonl(data12), 0.25, 0)
    model, tok = M.load(resumed, dtype="float32")
    val_ex, _ = sft.tokenize_examples(tok, val_rows, 2048)
    assert evals[-1]["val_loss"] == pytest.approx(sft.batch_loss(model, val_ex, micro_batch_size=3,
                                                                 pad_id=tok.pad_id)[0], rel=1e-6)


def test_ctrl_c_while_saving_leaves_no_half_checkpoint(ckpt, data12, straight, tmp_path, monkeypatch):
    import safetensors.torch
    final, _ = straight
    run = tmp_path / "run"
    argv = ["--model", str(ckpt), "--data", str(data12), "--out", str(run), "--val-fraction", "0.25",
            "--epochs", "3", "--batch-size", "4", "--micro-batch-size", "2", "--lr", "1e-3", "--warmup-ratio", "0.2",
            "--device", "cpu", "--save-every", "1"]

    def interrupt_on_call(module, name, k):
        """Make the k-th call of module.name write half a file and raise KeyboardInterrupt (Ctrl-C)."""
        real, calls = getattr(module, name), []

        def torn(obj, path, *a, **kw):
            calls.append(path)
            if len(calls) == k:
                with open(path, "wb") as f:
                    f.write(b"half a file")
                raise KeyboardInterrupt
            return real(obj, path, *a, **kw)
        monkeypatch.setattr(module, name, torn)
        return real

    # 1. Ctrl-C while the weights of step 3 are written (inside model.save)
    real_st = interrupt_on_call(safetensors.torch, "save_file", 3)
    assert sft.main(argv) == 130
    assert [p.name for p in (run / "state").iterdir()] == ["step_2.pt"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if not p.name.startswith(".")) == ["epoch_1"]
    monkeypatch.setattr(safetensors.torch, "save_file", real_st)
    # 2. the rerun resumes at step 2 (end of epoch 1); Ctrl-C while the training state of step 4 is written
    real_save = interrupt_on_call(torch, "save", 2)
    assert sft.main(argv) == 130
    assert [p.name for p in (run / "state").iterdir()] == ["step_3.pt"]   # the torn file left nothing behind
    assert not (run / "final").exists()
    monkeypatch.setattr(torch, "save", real_save)
    # 3. the last rerun finishes with exactly the weights of the uninterrupted run; no temp files remain
    assert sft.main(argv) == 0
    assert max_abs_diff(load_weights(final), load_weights(run / "final")) == 0.0
    assert not [p for p in run.rglob("*") if ".tmp" in p.name]


def test_rerun_guards(ckpt, data12, straight, tmp_path, capsys):
    final, metrics = straight
    out = final.parent
    # a finished run is not trained again and nothing is overwritten
    before = (out / "metrics.jsonl").read_text()
    assert sft.train(_cfg(out.parent, out.name, data12, model=str(ckpt), **RUN)) == final
    assert (out / "metrics.jsonl").read_text() == before
    # different settings on an existing run: a clear error naming the setting
    (tmp_path / "r").mkdir()
    argv = ["--model", str(ckpt), "--data", str(data12), "--val-fraction", "0", "--batch-size", "4",
            "--epochs", "2", "--device", "cpu", "--stop-after", "1"]
    assert sft.main(argv + ["--out", str(tmp_path / "r")]) == 0
    assert sft.main(argv + ["--out", str(tmp_path / "r"), "--lr", "0.5"]) == 2
    assert "lr" in capsys.readouterr().err
    # --resume with nothing to resume, and a folder that is not a run
    assert sft.main(argv + ["--out", str(tmp_path / "empty"), "--resume"]) == 2
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert sft.main(argv + ["--out", str(tmp_path / "other")]) == 2
    assert "not a run folder" in capsys.readouterr().err


def test_run_folder_held_by_another_process_is_refused_and_free_after_its_sigkill(ckpt, data12, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--model", str(ckpt), "--data", str(data12), "--out", str(out), "--val-fraction", "0",
            "--batch-size", "4", "--epochs", "1", "--device", "cpu"]
    with lock_held_elsewhere(out) as holder:
        assert sft.main(argv) == 2
        assert capsys.readouterr().err == (f"error: {out} is in use by another process (pid {holder.pid}): one live "
                                           "process owns a sft.py run folder. Wait for it to finish or stop it, or "
                                           "choose another --out\n")
        assert [p.name for p in out.iterdir()] == [".lock"]  # refused before touching anything
        holder.kill()  # SIGKILL: nothing runs on the way out, the kernel drops the lock
        holder.wait()
        assert sft.main(argv) == 0  # the rerun proceeds at once (the folder holding only .lock is accepted)
    assert (out / "final" / "config.json").is_file()


# ---------------------------------------------------------------------------------------------
# data checks


def test_too_long_examples_error_or_are_dropped(tiny_tokenizer, tmp_path, ckpt, capsys):
    rows = [{"query": "short <think>", "completion": " ok"}, {"query": "long " * 50 + "<think>", "completion": " x"}]
    with pytest.raises(ValueError, match=r"example 1 has \d+ tokens.*--max-length 40.*--drop-long"):
        sft.tokenize_examples(tiny_tokenizer, rows, 40)
    kept, dropped = sft.tokenize_examples(tiny_tokenizer, rows, 40, drop_long=True)
    assert (len(kept), dropped) == (1, 1)
    data = tmp_path / "d.jsonl"
    files.write_jsonl(data, rows)
    argv = ["--model", str(ckpt), "--data", str(data), "--out", str(tmp_path / "r"), "--val-fraction", "0",
            "--batch-size", "1", "--max-length", "40", "--device", "cpu"]
    assert sft.main(argv) == 2
    assert "example 1" in capsys.readouterr().err
    files.write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x", "completion": "y"}])
    with pytest.raises(ValueError, match="row 0 needs string fields 'query' and 'completion'"):
        sft.load_examples(tmp_path / "bad.jsonl")


def test_help_documents_every_flag():
    for parser in (sft.build_parser(), sft_eval.build_eval_parser()):
        for action in parser._actions:
            assert action.help, f"{action.option_strings} has no help text"
        assert set(f.name for f in dataclasses.fields(sft.SFTConfig)) <= {a.dest for a in sft.build_parser()._actions}


# ---------------------------------------------------------------------------------------------
# from scratch: overfit, greedy accuracy, loading in model.py and transformers


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """--init tiny on 4 problems with correct answers: batch 4 = the whole set, 80 steps (~10 s)."""
    tmp = tmp_path_factory.mktemp("sft_scratch")
    rows = _rows(4, seed=11)
    files.write_jsonl(tmp / "train.jsonl", rows)
    files.write_jsonl(tmp / "problems.jsonl", [{"nums": r["nums"], "target": r["target"]} for r in rows])
    argv = ["--init", "tiny", "--data", str(tmp / "train.jsonl"), "--out", str(tmp / "run"), "--val-fraction", "0",
            "--epochs", "80", "--batch-size", "4", "--micro-batch-size", "4", "--lr", "5e-3", "--vocab-size", "400",
            "--device", "cpu", "--seed", "1"]
    assert sft.main(argv) == 0
    return tmp


def test_tiny_model_overfits_a_handful_of_examples(scratch, capsys):
    metrics = [m for m in files.read_jsonl(scratch / "run" / "metrics.jsonl") if m["kind"] == "train"]
    assert len(metrics) == 80
    assert metrics[0]["loss"] > 5.0 and metrics[-1]["loss"] < 0.05     # ln(400) = 6.0 at init
    # greedy generation now reproduces the (correct) answers: accuracy 1.0 by countdown's reward
    assert sft.main(["eval", "--model", str(scratch / "run" / "final"), "--problems", str(scratch / "problems.jsonl"),
                     "--n", "4", "--max-new-tokens", "48", "--device", "cpu"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["n"] == 4 and summary["accuracy"] == 1.0


def test_from_scratch_checkpoint_loads_in_model_py_and_transformers(scratch):
    transformers = pytest.importorskip("transformers")
    final = scratch / "run" / "final"
    model, tok = M.load(final, dtype="float32")
    assert model.config.model_type == "llama" and tok.eos_token == "<|endoftext|>" and tok.pad_id == tok.eos_id
    hf = transformers.AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(final)
    text = C.make_prompt([4, 9, 13], 22) + " 9 + 13 = 22"
    ids = tok.encode(text)
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == ids
    assert hf_tok.eos_token == "<|endoftext|>" and hf_tok.pad_token == "<|endoftext|>"
    x = torch.tensor([ids])
    with torch.no_grad():
        ours, theirs = model(x), hf(x).logits
    assert (ours - theirs).abs().max().item() < 1e-4
    # the tokenizer is trained deterministically, so a run resumed before its first checkpoint matches
    texts = [r["query"] + r["completion"] for r in _rows(4, seed=11)]
    a, b = sft.train_tokenizer(texts, 400), sft.train_tokenizer(texts, 400)
    assert a.tk.to_str() == b.tk.to_str()


def test_arithmetic_gate_prompts_and_scores_like_the_drill(tiny_tokenizer):
    """sft_eval.arithmetic_accuracy (sft.py eval --arithmetic) with a stand-in generator that does the
    arithmetic from the prompt it is given: right results score 1.0, results off by one 0.0; the prompt
    ends with " = "."""
    from fractions import Fraction
    import re as _re
    tok = tiny_tokenizer
    seen = []

    def fake_generate(offset):
        def generate(model, prompts, **kw):
            tokens, lengths = [], []
            for p in prompts:
                text = tok.decode(p)
                seen.append(text)
                a, op, b = _re.fullmatch(r"Arithmetic: (\d+) ([-+*/]) (\d+) = ", text).groups()
                c = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b),
                     "/": Fraction(int(a), int(b))}[op]
                ids = tok.encode(f"{int(c) + offset}. 3 + 4 = 7.")
                tokens.append(ids)
                lengths.append(len(ids))
            width = max(lengths)
            return type("G", (), {"tokens": torch.tensor([t + [0] * (width - len(t)) for t in tokens]),
                                  "lengths": torch.tensor(lengths)})()
        return generate

    summary, rows = sft_eval.arithmetic_accuracy(None, tok, 50, seed=4242, batch_size=16, generate=fake_generate(0),
                                                 drill=traces.restart_drill)
    assert summary == {"n": 50, "correct": 50, "arithmetic_accuracy": 1.0} and len(seen) == 50
    assert rows[0]["fact"] == seen[0][len("Arithmetic: "):] + rows[0]["answer"]
    assert sft_eval.arithmetic_accuracy(None, tok, 50, seed=4242, batch_size=16, generate=fake_generate(1),
                                        drill=traces.restart_drill)[0]["arithmetic_accuracy"] == 0.0


def test_eval_per_count_balances_three_and_four_numbers(tmp_path, capsys):
    """--per-count: half 3-number, half 4-number problems, none in any --exclude-data file."""
    ck = make_checkpoint(tmp_path / "ck")
    train, test = C.make_splits(3000, 50, "priming", seed=1)
    files.write_jsonl(tmp_path / "train.jsonl", train)
    files.write_jsonl(tmp_path / "test.jsonl", test)
    out = tmp_path / "rows.jsonl"
    assert sft.main(["eval", "--model", str(ck), "--n", "40", "--per-count", "--max-new-tokens", "2", "--device", "cpu",
                     "--exclude-data", f"{tmp_path / 'test.jsonl'},{tmp_path / 'train.jsonl'}", "--out", str(out)]) == 0
    rows = files.read_jsonl(out)
    assert [len(r["nums"]) for r in rows].count(3) == 20 and len(rows) == 40
    seen = {(tuple(sorted(p["nums"])), p["target"]) for p in train + test}
    assert not any((tuple(sorted(r["nums"])), r["target"]) in seen for r in rows)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["n_by_count"] == {"3": 20, "4": 20}


def test_sft_refuses_counts_out_of_range_naming_the_flag():
    base = dict(data="d.jsonl", out="o", init="tiny")
    sft_config.check_config(sft.SFTConfig(**base, epochs=1, save_every=0), traces.COAT_TOKENS)   # the boundaries pass
    for field, value, message in (("epochs", 0, "--epochs must be >= 1, got 0"),
                                  ("micro_batch_size", 0, "--micro-batch-size must be >= 1, got 0"),
                                  ("eval_n", -1, "--eval-n must be >= 0, got -1")):
        with pytest.raises(ValueError, match=message):
            sft_config.check_config(sft.SFTConfig(**base, **{field: value}), traces.COAT_TOKENS)
