"""Files written whole or not at all, content hashes, and locks that name their holder.

Every write goes through a temp file, fsync and a rename, so a reader (or a process killed mid-write) never sees
a half-written file. Hashes are sha256 of contents (a folder: its relative names and file contents).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_file(path: Path, mode: str = "wb") -> Iterator[Any]:
    """A file that appears at `path` only when fully written (temp name, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    text = {} if "b" in mode else {"encoding": "utf-8", "newline": "\n"}
    try:
        with os.fdopen(fd, mode, **text) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_file(path) as f:
        f.write(data)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def atomic_write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """Stream rows as JSON lines (bounded memory), atomically."""
    with atomic_file(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=True, ensure_ascii=False) + "\n")


def file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tree_hash(path: Path) -> str:
    """Hash of a file, or of a directory's relative names and file contents."""
    if path.is_file():
        return file_hash(path)
    h = hashlib.sha256()
    for p in sorted(q for q in path.rglob("*") if q.is_file()):
        h.update(p.relative_to(path).as_posix().encode() + b"\0" + file_hash(p).encode())
    return h.hexdigest()


class LockHeld(Exception):
    """Another process holds the lock; `holder` is the line it wrote (command, pid, host, since when)."""

    def __init__(self, holder: str):
        super().__init__(holder)
        self.holder = holder


@contextmanager
def holder_lock(path: Path, holder: str) -> Iterator[None]:
    """An OS file lock (flock) on `path` for the `with` block, with `holder` written inside it: a second process
    that asks gets `LockHeld` naming the holder at once (it never waits), and a killed holder leaves no stale
    lock (the OS drops a dead process's locks)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - held until the block ends
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        held_by = handle.read().strip() or "another process"
        handle.close()
        raise LockHeld(held_by) from None
    handle.seek(0)
    handle.truncate()
    handle.write(holder + "\n")
    handle.flush()
    try:
        yield
    finally:
        handle.truncate(0)
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()
