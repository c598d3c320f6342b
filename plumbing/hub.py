"""Hugging Face checkpoints: the Hub client (find a checkpoint by alias or repo id, download it into
the Hub cache) and the files of a checkpoint folder (weights: safetensors read and write; tokenizer).

Plumbing for model.load and model.save: a local folder needs no download. Plain HTTPS with `requests`;
nothing here imports a core file.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Optional
from urllib.parse import quote

import torch

from plumbing.files import lock_dir, read_json, write_json, write_text_atomic

# -----------------------------------------------------------------------------
# Finding a checkpoint: local folder, alias, or Hugging Face Hub repo
#
# The Hub is plain HTTPS, so `requests` is all a download needs:
#   GET {endpoint}/api/models/{repo}/revision/{rev}              -> {"sha": commit id, ...}
#   GET {endpoint}/api/models/{repo}/tree/{commit}               -> [{"type", "path", "size", "oid",
#                                                     "lfs": {"oid": sha256} for large files}, ...]
#   GET {endpoint}/{repo}/resolve/{commit}/{path}                -> the file (large ones redirect
#                                                                   to a CDN; Range requests work)
# Files land in the Hugging Face cache layout, so huggingface_hub and this file share downloads:
#   {cache}/models--{org}--{name}/blobs/{sha256, or git oid for small files}
#                                /snapshots/{commit}/{path} -> ../../blobs/{...}   (relative symlink)
#                                /refs/{revision}                                  (text: the commit)

ALIASES = {
    "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B", "qwen2.5-1.5b": "Qwen/Qwen2.5-1.5B",
    "qwen2.5-3b": "Qwen/Qwen2.5-3B", "qwen2.5-7b": "Qwen/Qwen2.5-7B",
    "qwen2.5-0.5b-instruct": "Qwen/Qwen2.5-0.5B-Instruct", "qwen2.5-1.5b-instruct": "Qwen/Qwen2.5-1.5B-Instruct",
    "qwen2.5-3b-instruct": "Qwen/Qwen2.5-3B-Instruct", "qwen2.5-7b-instruct": "Qwen/Qwen2.5-7B-Instruct",
    "llama-3.2-1b": "meta-llama/Llama-3.2-1B", "llama-3.2-3b": "meta-llama/Llama-3.2-3B",
    "llama-3.1-8b": "meta-llama/Llama-3.1-8B",
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M", "smollm2-360m": "HuggingFaceTB/SmolLM2-360M",
    "smollm2-1.7b": "HuggingFaceTB/SmolLM2-1.7B",
}
_CHECKPOINT_FILES = {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                     "special_tokens_map.json", "model.safetensors", "model.safetensors.index.json"}
_SHARD_NAME = re.compile(r"model-\d+-of-\d+\.safetensors")
_DOWNLOAD_CHUNK = 1 << 20  # bytes per write; a broken connection loses at most the chunk in flight
LOCAL_LAYOUT_HELP = ("Without the Hub you can pass --model (or load()) a local folder holding config.json, "
                     "model.safetensors (or model-0000X-of-0000N.safetensors shards + model.safetensors.index.json), "
                     "tokenizer.json and tokenizer_config.json, e.g. copied from a machine that has the model.")


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def _hf_home() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME", "~/.cache")
    return Path(os.environ.get("HF_HOME") or os.path.join(xdg, "huggingface")).expanduser()


def hub_cache_dir() -> Path:
    """$HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub (huggingface_hub's rule)."""
    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    return Path(cache).expanduser() if cache else _hf_home() / "hub"


def _hub_token() -> Optional[str]:
    """HF_TOKEN, HUGGING_FACE_HUB_TOKEN, or the file `huggingface-cli login` writes. Never logged."""
    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    if not token:
        path = Path(os.environ.get("HF_TOKEN_PATH") or _hf_home() / "token").expanduser()
        token = path.read_text().strip() if path.is_file() else None
    return token or None


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve_checkpoint(name_or_path, revision: str = "main") -> Path:
    """A local folder is used as it is; an alias or repo id is looked up in the cache or downloaded."""
    p = Path(name_or_path)
    if p.is_dir():
        return p
    name = str(name_or_path)
    repo = ALIASES.get(name.lower(), name)
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo) or p.exists():
        raise FileNotFoundError(f"{name!r} is not a checkpoint folder, a known alias ({', '.join(ALIASES)}) "
                                "or a Hub repo id like Qwen/Qwen2.5-3B")
    try:
        return download(repo, revision=revision)
    except (FileNotFoundError, PermissionError) as e:
        if repo != name:  # an alias: the message is about the Hub
            raise
        raise type(e)(f"{e} (there is no local folder {name!r} either)") from None


def download(repo_id: str, revision: str = "main", cache_dir=None) -> Path:
    """The local snapshot folder of a Hub model repo, downloading only the files a checkpoint needs.

    Files already in the cache (ours or huggingface_hub's) are not fetched again; a partial file
    from an interrupted run is resumed. HF_HUB_OFFLINE=1 uses the cache only; so does a failed
    connection when the cache already holds a complete snapshot.
    """
    import requests
    repo_dir = Path(cache_dir or hub_cache_dir()) / ("models--" + repo_id.replace("/", "--"))
    cached = _cached_snapshot(repo_dir, revision)
    if _offline():
        if cached is None:
            raise FileNotFoundError(f"HF_HUB_OFFLINE is set and {repo_id} ({revision}) is not in the cache "
                                    f"{repo_dir.parent}. {LOCAL_LAYOUT_HELP}")
        return cached
    endpoint, token = hub_endpoint(), _hub_token()
    api = f"{endpoint}/api/models/{repo_id}"
    try:
        commit = _hub_get(f"{api}/revision/{quote(revision, safe='')}", repo_id, token).json()["sha"]
        listing, url = [], f"{api}/tree/{commit}"  # the top folder is all we need; long lists come in pages
        while url:
            r = _hub_get(url, repo_id, token)
            listing += r.json()
            url = r.links.get("next", {}).get("url")
    except (requests.ConnectionError, requests.Timeout) as e:
        if cached is not None:
            print(f"cannot reach {endpoint} ({type(e).__name__}); using the cached {cached}", file=sys.stderr)
            return cached
        raise ConnectionError(f"cannot reach {endpoint} to download {repo_id} ({type(e).__name__}). "
                              f"{LOCAL_LAYOUT_HELP} (HF_ENDPOINT selects a mirror.)") from None
    files = _checkpoint_files(listing, repo_id)
    snapshot = repo_dir / "snapshots" / commit
    for f in files:
        dest = snapshot / f["path"]
        if dest.is_file() and dest.stat().st_size == f["size"]:
            continue  # already here, downloaded by us or by huggingface_hub
        blob = repo_dir / "blobs" / ((f.get("lfs") or {}).get("oid") or f["oid"])
        # one downloader per file: a second process waits, then finds the blob complete. The lock file
        # is the one huggingface_hub takes (.locks/models--org--name/<blob>.lock), so it waits for us too.
        with lock_dir(repo_dir.parent / ".locks" / repo_dir.name, f"download of {repo_id} {f['path']}",
                      wait=True, name=blob.name + ".lock"):
            if not (blob.is_file() and blob.stat().st_size == f["size"]):
                url = f"{endpoint}/{repo_id}/resolve/{commit}/{quote(f['path'])}"
                _download_file(url, blob, f["size"], (f.get("lfs") or {}).get("oid"), token, repo_id)
            _link(blob, dest)
    if revision != commit:  # remember which commit the branch/tag named, for offline use
        ref = repo_dir / "refs" / revision
        ref.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(ref, commit)
    return snapshot


def _hub_get(url, repo_id, token, **kw):
    """GET with our auth header; turn the Hub's error statuses into errors that say what to do."""
    import requests
    r = requests.get(url, headers=_auth_header(token), timeout=(10, 60), **kw)
    _check_status(r, repo_id, token)
    return r


def _auth_header(token) -> dict:
    # requests drops this header when a redirect leaves the host, so CDNs never see the token
    return {"Authorization": f"Bearer {token}"} if token else {}


def _check_status(r, repo_id, token):
    if r.status_code < 400:
        return
    endpoint, code = hub_endpoint(), r.headers.get("X-Error-Code", "")
    if r.status_code == 404 or code in ("RevisionNotFound", "EntryNotFound"):
        raise FileNotFoundError(f"{repo_id}: not found on {endpoint} (HTTP {r.status_code} {code}) at {r.url}; "
                                "check the repo name (e.g. Qwen/Qwen2.5-3B), the revision, and HF_ENDPOINT")
    if r.status_code in (401, 403):
        # the Hub answers 401 for a missing repo too, so as not to reveal private names
        sent = ("a token was sent (HF_TOKEN, or the huggingface-cli login file) but it has no access or is invalid"
                if token else "no token was sent (HF_TOKEN is unset)")
        raise PermissionError(
            f"{repo_id}: access denied by {endpoint} (HTTP {r.status_code} {code}); {sent}. If the name is "
            f"right, the repo is gated or private: open {endpoint}/{repo_id} while logged in and accept its "
            f"license, create a read token at {endpoint}/settings/tokens, then `export HF_TOKEN=...` and retry.")
    raise ConnectionError(f"{repo_id}: {endpoint} answered HTTP {r.status_code} for {r.url}; try again later")


def _checkpoint_files(listing, repo_id) -> list:
    """The tree entries a checkpoint needs: configs, tokenizer files, safetensors weights."""
    top = {f["path"]: f for f in listing if f.get("type", "file") == "file" and "/" not in f["path"]}
    want = [f for p, f in top.items() if p in _CHECKPOINT_FILES or _SHARD_NAME.fullmatch(p)]
    if "model.safetensors.index.json" in top:  # sharded: skip a stray single-file copy
        want = [f for f in want if f["path"] != "model.safetensors"]
    names = {f["path"] for f in want}
    missing = [n for n in ("config.json", "tokenizer.json") if n not in names]
    if not names & {"model.safetensors", "model.safetensors.index.json"}:
        missing.append("model.safetensors (or shards + model.safetensors.index.json)")
    if missing:
        raise FileNotFoundError(f"{repo_id} has no {', '.join(missing)}; only safetensors checkpoints with a "
                                "fast tokenizer are supported (.bin/.pth weights and tokenizer.model are not)")
    return sorted(want, key=lambda f: f["size"])  # small files first: fail fast on bad configs


def _download_file(url, blob: Path, size: int, sha256: Optional[str], token, repo_id, retries: int = 5):
    """Stream url into blob. A broken transfer is resumed with an HTTP Range request, from where
    the .incomplete file stops (also across runs); size and sha256 are checked before os.replace."""
    import hashlib
    import requests
    from tqdm import tqdm
    part = blob.with_name(blob.name + ".incomplete")
    part.parent.mkdir(parents=True, exist_ok=True)
    name = url.rsplit("/", 1)[-1]
    for attempt in range(retries):
        have = part.stat().st_size if part.exists() else 0
        if have == size:
            break  # complete but not yet verified (a previous run stopped right here)
        headers = _auth_header(token)
        if 0 < have < size:
            headers["Range"] = f"bytes={have}-"
        try:
            with requests.get(url, headers=headers, stream=True, timeout=(10, 60)) as r:
                _check_status(r, repo_id, token)
                if r.status_code != 206:  # 200: the server sent the whole file, start over
                    have = 0
                with open(part, "ab" if have else "wb") as f, \
                        tqdm(total=size, initial=have, unit="B", unit_scale=True, desc=name, file=sys.stderr) as bar:
                    for chunk in r.iter_content(chunk_size=_DOWNLOAD_CHUNK):
                        f.write(chunk)
                        bar.update(len(chunk))
            break
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as e:
            if attempt == retries - 1:
                raise ConnectionError(f"downloading {url} failed {retries} times ({type(e).__name__}); "
                                      f"run again to resume from {part}. {LOCAL_LAYOUT_HELP}") from None
            print(f"{name}: connection broke ({type(e).__name__}); resuming", file=sys.stderr)
            time.sleep(min(0.5 * 2 ** attempt, 8))
    got = part.stat().st_size
    if got != size:
        part.unlink()
        raise ValueError(f"{name} from {repo_id}: received {got} bytes but the Hub lists {size}; the partial "
                         "file was deleted, run again (a proxy or mirror may be truncating downloads)")
    if sha256:
        h = hashlib.sha256()
        with open(part, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
        if h.hexdigest() != sha256:
            part.unlink()
            raise ValueError(f"{name} from {repo_id}: sha256 {h.hexdigest()} does not match the Hub's {sha256}; "
                             "the corrupt file was deleted, run again")
    os.replace(part, blob)


def _link(blob: Path, dest: Path):
    """Point snapshots/{commit}/{path} at its blob with a relative symlink (a copy where symlinks fail)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        os.symlink(os.path.relpath(blob, dest.parent), tmp)
    except OSError:
        shutil.copyfile(blob, tmp)
    os.replace(tmp, dest)


def _cached_snapshot(repo_dir: Path, revision: str) -> Optional[Path]:
    """The cached snapshot for revision if it holds a complete checkpoint, else None."""
    ref = repo_dir / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else revision
    snap = repo_dir / "snapshots" / commit
    if not ((snap / "config.json").is_file() and (snap / "tokenizer.json").is_file()):
        return None
    try:
        return snap if all(f.is_file() for f in weight_files(snap)) else None
    except (FileNotFoundError, ValueError, KeyError):
        return None


# -----------------------------------------------------------------------------
# The files of a checkpoint folder: config.json, tokenizer files, and the weights as one
# model.safetensors or as shards listed in model.safetensors.index.json

def weight_files(path: Path) -> list:
    """The safetensors files of a checkpoint folder: the shards its index lists, or the one file."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(read_json(index)["weight_map"].values()))
        return [path / s for s in shards]
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    raise FileNotFoundError(f"no weights in {path}: expected model.safetensors, or shards listed in "
                            "model.safetensors.index.json (.bin/.pth checkpoints are not supported)")


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
              "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors(path, dtype=None):
    """Yield (name, tensor) from a .safetensors file, one tensor at a time.

    The format is an 8-byte header length, a JSON header {name: {dtype, shape, data_offsets}}, then
    raw little-endian bytes. Reading each tensor with readinto() (instead of memory-mapping the
    file) means the host holds at most one source tensor beside the weights already loaded.
    """
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"{path} is not a safetensors file (too short)")
        n = int.from_bytes(raw, "little")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError(f"{path} is not a valid safetensors file (bad header); re-download it") from None
        base = 8 + n
        for name, info in header.items():
            if name == "__metadata__":
                continue
            start, end = info["data_offsets"]
            t = torch.empty(info["shape"], dtype=_ST_DTYPES[info["dtype"]])
            if end > start:
                f.seek(base + start)
                got = f.readinto(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
                if got != end - start:
                    raise ValueError(f"{path} is truncated (tensor {name} is incomplete); re-download it")
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            yield name, t


def write_weights(folder: Path, tensors, max_shard_size: int, dtype=None):
    """Write (name, tensor) pairs as folder/model.safetensors, or as shards of at most max_shard_size
    bytes plus model.safetensors.index.json when they do not fit one; in `dtype` when given."""
    from safetensors.torch import save_file
    el = lambda p: p.numel() * (dtype.itemsize if dtype else p.element_size())  # noqa: E731
    shards, size = [[]], 0
    for n, p in tensors:  # greedy shards of at most max_shard_size bytes (one tensor may exceed it)
        if shards[-1] and size + el(p) > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append((n, p))
        size += el(p)
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        sd = {n: p.detach().to("cpu", dtype or p.dtype).contiguous() for n, p in shard}
        save_file(sd, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in sd})
        del sd
    if len(shards) > 1:
        total = sum(el(p) for _, p in tensors)
        write_json(folder / "model.safetensors.index.json",
                   {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})


# -----------------------------------------------------------------------------
# The tokenizer files of a checkpoint folder: tokenizer.json (the `tokenizers` library's format) and
# tokenizer_config.json (its special tokens)

def _token_str(x):
    """tokenizer_config.json stores special tokens as strings or as {"content": ...} dicts."""
    return x.get("content") if isinstance(x, dict) else x


class Tokenizer:
    """A thin wrapper over `tokenizers.Tokenizer` that knows the special tokens.

    encode() adds no BOS unless asked: the paper tokenizes the Countdown prompt with
    add_special_tokens=False. pad falls back to eos when the checkpoint has none, as the reference.
    """

    def __init__(self, tk, eos_token: str, pad_token: Optional[str] = None, bos_token: Optional[str] = None,
                 config: Optional[dict] = None):
        self.tk = tk
        self.eos_token, self.bos_token = eos_token, bos_token
        self.pad_token = pad_token or eos_token
        self.eos_id = self._id(eos_token)
        self.pad_id = self._id(self.pad_token)
        self.bos_id = self._id(bos_token) if bos_token else None
        self.config = dict(config or {})  # the rest of tokenizer_config.json, written back by save()

    def _id(self, token):
        i = self.tk.token_to_id(token)
        if i is None:
            raise ValueError(f"special token {token!r} is not in the tokenizer's vocabulary")
        return i

    @classmethod
    def from_dir(cls, path) -> "Tokenizer":
        from tokenizers import Tokenizer as HFTokenizer
        path = Path(path)
        tj = path / "tokenizer.json"
        if not tj.is_file():
            raise FileNotFoundError(f"{tj} not found: the checkpoint folder needs the fast-tokenizer file "
                                    "tokenizer.json (slow-only tokenizers such as tokenizer.model are not supported)")
        tk = HFTokenizer.from_file(str(tj))
        cfg = read_json(path / "tokenizer_config.json") if (path / "tokenizer_config.json").is_file() else {}
        eos, bos, pad = (_token_str(cfg.get(k)) for k in ("eos_token", "bos_token", "pad_token"))
        if eos is None:  # fall back to the model's eos id
            for name in ("generation_config.json", "config.json"):
                eid = read_json(path / name).get("eos_token_id") if (path / name).is_file() else None
                if eid is not None:
                    eos = tk.id_to_token(eid[0] if isinstance(eid, list) else eid)
                    break
        if eos is None:
            raise ValueError(f"cannot tell the EOS token of {path}: set eos_token in tokenizer_config.json")
        return cls(tk, eos, pad, bos, config=cfg)

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, bos: bool = False) -> list:
        ids = self.tk.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if bos and self.bos_id is not None else []) + ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def save(self, out_dir):
        out_dir = Path(out_dir)
        self.tk.save(str(out_dir / "tokenizer.json"))
        cfg = dict(self.config)
        cfg.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        cfg.update(eos_token=self.eos_token, pad_token=self.pad_token, bos_token=self.bos_token)
        write_json(out_dir / "tokenizer_config.json", cfg)
