"""Writing files so that a crash, a full disk or `kill -9` never leaves a half-written one.

Every file the toolkit writes for a user (checkpoints, vocab.json, history.json, eval results,
exported models) goes through `atomic_write`: the bytes go to a temporary file in the same folder
(same file system, so the rename is atomic), are flushed and fsynced, and only then replace the
target. At any moment the target is either the old file or the new one. If writing fails, the
temporary file is removed and the old file is untouched.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> Path:
    """Call `write(f)` on a temporary binary file, then move it over `path` (fsynced)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        replace(tmp_name, path)
    except BaseException:
        # Also on KeyboardInterrupt: never leave temporary files behind.
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)
    return path


def replace(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """os.replace, as its own function so tests can stop a process between write and rename."""
    os.replace(src, dst)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Atomically write `obj` as indented UTF-8 JSON with a final newline."""
    data = (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    return atomic_write(path, lambda f: f.write(data))


def fsync_dir(folder: str | os.PathLike) -> None:
    """Persist a rename (the directory entry); a no-op where directories cannot be opened."""
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)
