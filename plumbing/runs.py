"""Run folders shared by sft.py and ppo.py: flags from a config dataclass, config.json and its resume
check, numbered checkpoint folders, and publishing a folder atomically.

Plumbing: a run folder must survive crashes and refuse to mix two runs' settings; none of this is the
training itself. Nothing here imports a core file.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from dataclasses import field, fields
from pathlib import Path
from typing import Optional

from plumbing.files import LOCK_FILE, read_json, replace_dir, write_json

# -----------------------------------------------------------------------------
# Flags: every field of a config dataclass is one command-line flag


def flag(default, help, **kw):
    """A dataclass field with its --help text (and e.g. choices=...) in its metadata."""
    return field(default=default, metadata=dict(help=help, **kw))


def add_flags(parser: argparse.ArgumentParser, cls, required=()):
    """--some-name for every field some_name of cls. Booleans take --x and --no-x (a default of True
    can be turned off); Optional[float] fields parse as floats, other optional ones as strings."""
    for f in fields(cls):
        name = "--" + f.name.replace("_", "-")
        help_ = f.metadata.get("help", "") + (f" (default: {f.default})" if f.default not in (None, "") else "")
        kw = {"help": help_.replace("%", "%%"), "default": f.default}
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        if f.name in required:
            kw["required"] = True
        ftype = {"bool": bool, "int": int, "float": float}.get(f.type, f.type)   # postponed annotations are strings
        if isinstance(f.default, bool) or ftype is bool:
            parser.add_argument(name, action=argparse.BooleanOptionalAction, **kw)
        else:
            typ = ftype if ftype in (int, float) else (float if "float" in str(ftype) else str)
            parser.add_argument(name, type=typ, **kw)


# -----------------------------------------------------------------------------
# config.json: written when a run starts; a rerun must match it except for the resumable settings


def foreign_folder(run: Path) -> bool:
    """A folder that exists, holds something besides the lock file, and has no config.json."""
    run = Path(run)
    return (not (run / "config.json").is_file() and run.exists()
            and any(p.name != LOCK_FILE for p in run.iterdir()))


def read_config(run: Path) -> Optional[dict]:
    path = Path(run) / "config.json"
    return read_json(path) if path.is_file() else None


def write_config(run: Path, config: dict):
    """config.json (indent 2, UTF-8), written atomically."""
    Path(run).mkdir(parents=True, exist_ok=True)
    write_json(Path(run) / "config.json", config)


def require_at_least(cfg, names, minimum):
    """A ValueError naming the first of these flags whose value is below `minimum`."""
    for name in names:
        if getattr(cfg, name) < minimum:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {minimum}, got {getattr(cfg, name)}")


def changed_settings(saved: dict, new: dict, default: dict, resumable, *, every_key: bool = False) -> list:
    """[(name, saved value, new value)] of the settings that differ and may not change on resume. A
    setting added after the run started is absent from its config.json: it ran with the default.
    every_key: also a saved setting that no longer exists, and the names sorted."""
    saved = {**{k: v for k, v in default.items() if k not in saved}, **saved}
    keys = sorted(set(saved) | set(new)) if every_key else list(new)
    return [(k, saved.get(k), new.get(k)) for k in keys if k not in resumable and saved.get(k) != new.get(k)]


def different_settings(run: Path, diff: list, choose: str = "choose another --out") -> ValueError:
    detail = ", ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in diff)
    return ValueError(f"{run} holds a run with different settings ({detail}); rerun with the same flags to "
                      f"resume it, or {choose}")


# -----------------------------------------------------------------------------
# Numbered checkpoints (step_<N>) and atomic publishing


def numbered(folder: Path, prefix: str = "step_", suffix: str = "") -> dict:
    """{N: path} of the entries folder/<prefix><N><suffix>."""
    out = {}
    for p in Path(folder).glob(f"{prefix}*{suffix}"):
        n = p.name[len(prefix):len(p.name) - len(suffix)]
        if n.isdigit():
            out[int(n)] = p
    return out


def step_dirs(run: Path) -> dict:
    """{N: run/checkpoints/step_<N>} of the step folders."""
    return {s: d for s, d in numbered(Path(run) / "checkpoints").items() if d.is_dir()}


def publish_links(src: Path, dst: Path):
    """dst = the files of src as hard links (no extra disk), made in a temp folder and renamed."""
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in src.iterdir():
        try:
            os.link(f, tmp / f.name)
        except OSError:
            shutil.copy2(f, tmp / f.name)
    replace_dir(tmp, dst)


def save_atomic(save, obj, path: Path, tmp: Optional[Path] = None):
    """save(obj, tmp) (e.g. torch.save), then os.replace onto path; an interrupted write leaves no half file."""
    tmp = tmp or path.with_name(path.name + f".tmp-{os.getpid()}")
    try:
        save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def resolve_device(name: str):
    """--device: auto (cuda when available), cpu, cuda[:N]; a ValueError when CUDA is asked for and absent."""
    import torch
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but CUDA is not available; use --device cpu")
    return torch.device(name)


# -----------------------------------------------------------------------------
# How a training command ends: the exit codes sft.py and ppo.py share


def run_training(train, out, interrupted: str, user_errors=(), stopped=()) -> int:
    """train() under the training CLIs' exit codes: 0 done; 2 a user's mistake (one `error:` line);
    1 the run stopped itself (`stopped`, e.g. too many bad updates) or a rank was lost under torchrun
    (with what to do); 130 Ctrl-C (`interrupted` says how to resume). Anything else is a bug and keeps
    its traceback. The process group is closed on every path."""
    from plumbing import dist
    from plumbing.files import FolderLocked
    try:
        train()
    except (ValueError, FileNotFoundError, FileExistsError, FolderLocked, *user_errors) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except tuple(stopped) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\n{interrupted}", file=sys.stderr)
        return 130
    except RuntimeError as e:
        if not dist.is_collective_failure(e):
            raise
        print(dist.collective_failure_message(e, out), file=sys.stderr)
        return 1
    finally:
        dist.close_distributed()
    return 0
