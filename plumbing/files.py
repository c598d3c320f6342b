"""Files that survive crashes: JSONL rows, atomic JSON/text writes, and one-writer-per-folder locks.

Plumbing: every core file writes through these, so a crash never leaves half a file and two processes
never share a run folder. Pure standard library; nothing here imports a core file.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

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
# curate.py) holds this lock on it, and model.py's downloads hold it per cached file. Only the
# process that writes takes it (under torchrun that will be rank 0). The lock file is never
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
# Whole files: written to a temp file in the same folder, then renamed over the target


def write_text_atomic(path, text: str) -> None:
    """Write a text file via a temp file and os.replace: readers see the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        f.write(text)
    os.replace(tmp, path)


def write_json(path, obj, indent: int = 2) -> None:
    """Write obj as JSON (UTF-8, a newline at the end) atomically."""
    write_text_atomic(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def replace_dir(tmp, out) -> None:
    """Rename the finished folder tmp to out, replacing an old out: out is never half-written."""
    tmp, out = Path(tmp), Path(out)
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out)
