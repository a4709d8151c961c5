"""Writing files so that a crash, a full disk or `kill -9` never leaves a half-written one.

Every file the toolkit writes for a user (checkpoints, vocab.json, history.json, eval results,
exported models) goes through `atomic_write`: the bytes go to a temporary file in the same folder
(same file system, so the rename is atomic), are flushed and fsynced, and only then replace the
target. At any moment the target is either the old file or the new one. If writing fails, the
temporary file is removed and the old file is untouched. A process killed mid-write (SIGKILL, power
loss) cannot remove its temporary file: the next write of the same target does (see
`remove_stale_temporaries`), so a checkpoint-sized leftover does not stay forever.

`refuse_to_replace` and `check_folder` are the checks made before a command writes anything:
nothing a user made earlier disappears without being asked (`--overwrite`).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> Path:
    """Call `write(f)` on a temporary binary file, then move it over `path` (fsynced)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    # The writer's pid in the name tells a later write whether this file is still being written.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.pid{os.getpid()}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes the file private (0600); what the user asked for is an ordinary file.
        os.fchmod(fd, 0o666 & ~_umask())
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


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove the temporary files of `path` that no live process is writing; -> the removed ones.

    A temporary file of `path` is `.NAME.pidPID.XXXX.tmp` (`.NAME.XXXX.tmp` before names carried
    the pid). It is kept only while another live process PID may still rename it; one of this
    process is stale too, since a process writes one target at a time (a container restarted
    under the same pid must not keep its predecessor's leftovers forever).
    """
    path = Path(path)
    pattern = re.compile(re.escape(f".{path.name}.") + r"(?:pid(\d+)\.)?[^.]+\.tmp")
    removed = []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return removed
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match is None or (match.group(1) and _another_live_process(int(match.group(1)))):
            continue
        try:
            os.unlink(entry.path)
            removed.append(Path(entry.path))
        except FileNotFoundError:  # its writer renamed it in the meantime
            pass
    return removed


def _another_live_process(pid: int) -> bool:
    if pid == os.getpid():
        return False
    if os.name != "posix":
        return True  # no safe liveness probe (os.kill would terminate it on Windows): keep the file
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def refuse_to_replace(paths: list[Path], *, overwrite: bool, what: str, ways_out: str) -> list[Path]:
    """Nothing a user made earlier disappears without being asked: unless `overwrite`, a ValueError
    `"<first existing path> <what>; pass <ways_out>"` when any of `paths` exists; -> the existing ones."""
    found = [Path(p) for p in paths if Path(p).exists()]
    if found and not overwrite:
        raise ValueError(f"{found[0]} {what}; pass {ways_out}")
    return found


def check_folder(folder: str | os.PathLike, given: str) -> Path:
    """`folder` as a place to write files into: ValueError `"<given>: <path> is a file, expected a
    folder"` when it, or a folder above it, is a file (`given` names the flag and its value)."""
    folder = Path(folder)
    for p in (folder, *folder.parents):
        if p.exists():
            if not p.is_dir():
                raise ValueError(f"{given}: {p} is a file, expected a folder")
            break
    return folder


def publish_folder(tmp: str | os.PathLike, root: str | os.PathLike, marker: str) -> Path:
    """Rename a folder written aside (`tmp`) into place as `root`, the folder counterpart of
    atomic_write. When another process (a DDP rank) finished the same folder first, its copy,
    recognised by its `marker` file, is kept and ours is dropped."""
    tmp, root = Path(tmp), Path(root)
    try:
        replace(tmp, root)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (root / marker).is_file():
            raise
    fsync_dir(root.parent)
    return root


def _umask() -> int:
    """The process's umask (os.umask can only be read by setting it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


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
