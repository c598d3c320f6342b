"""Shared tiny fixtures: a byte-level BPE tokenizer and random checkpoints built in seconds on CPU."""
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import model as M  # noqa: E402

EOS = "<|endoftext|>"
_CORPUS = [
    "Using the numbers [3, 17, 8], create an equation that equals 12. <think> 17 - 8 = 9. 9 + 3 = 12. </think>",
    "<answer> (17 - 8) + 3 </answer> A conversation between User and Assistant. Let me solve this step by step.",
    "def f(x):\n    return x ** 2  # code, whitespace   runs\tand tabs",
    "Ünïcödé text, emoji 🙂🚀, and CJK 数字 mixed with 123 + 456 = 579.",
]


def make_tokenizer(vocab_size: int = 400) -> M.Tokenizer:
    """A byte-level BPE trained on a few lines (any text encodes: unknown bytes fall back to bytes)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(_CORPUS * 4, trainer)
    return M.Tokenizer(tk, EOS)


def make_config(model_type: str = "llama", **overrides) -> M.ModelConfig:
    cfg = dict(model_type=model_type, vocab_size=400, hidden_size=64, intermediate_size=128,
               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=512, tie_word_embeddings=True, eos_token_id=0)
    cfg.update(overrides)
    return M.ModelConfig(**cfg)


def make_checkpoint(path, model_type: str = "llama", seed: int = 0, **overrides) -> Path:
    """Save a random-weight model + tokenizer as an HF-layout folder and return its path."""
    torch.manual_seed(seed)
    tok = make_tokenizer()
    model = M.Transformer(make_config(model_type, vocab_size=tok.vocab_size, eos_token_id=tok.eos_id, **overrides))
    return M.save(model, tok, path)


def load_weights(path) -> dict:
    """A checkpoint folder's weights in float32, by name."""
    m, _ = M.load(path, dtype="float32")
    return {k: v.clone() for k, v in m.state_dict().items()}


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture
def tiny_tokenizer():
    return make_tokenizer()


@pytest.fixture
def tiny_checkpoint(tmp_path):
    return make_checkpoint(tmp_path / "tiny")


@contextmanager
def lock_held_elsewhere(folder):
    """Another process holding plumbing.files.lock_dir(folder) until the with-block ends (or it is
    killed); yields its Popen."""
    code = ("import sys\nfrom plumbing import files\n"
            "with files.lock_dir(sys.argv[1]):\n    print('locked', flush=True)\n    sys.stdin.read()")
    p = subprocess.Popen([sys.executable, "-c", code, str(folder)], cwd=ROOT, stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline() == "locked\n"
        yield p
    finally:
        p.stdin.close()
        p.wait(timeout=30)
        p.stdout.close()
