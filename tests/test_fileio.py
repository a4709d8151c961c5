"""fileio.py: atomic writes, the temporaries a killed writer leaves (removed by the next write of the
same target), and the checks that nothing earlier is replaced without being asked."""
from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import fileio

ROOT = Path(__file__).resolve().parents[1]

# Killed -9 inside the rename of a write, once the temporary file holds all the new bytes.
_KILLED_WRITER = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {root!r})
    import fileio

    def killed_before_rename(src, dst):
        assert os.path.getsize(src) > 100_000
        os.kill(os.getpid(), signal.SIGKILL)

    fileio.replace = killed_before_rename
    fileio.atomic_write(sys.argv[1], lambda f: f.write(b"x" * 200_000))
""")


def test_a_write_removes_the_temporary_file_a_killed_writer_left(tmp_path):
    target = tmp_path / "last.pt"
    fileio.write_json(target, {"epoch": 1})
    script = tmp_path / "writer.py"
    script.write_text(_KILLED_WRITER.format(root=str(ROOT)))
    proc = subprocess.Popen([sys.executable, str(script), str(target)], stderr=subprocess.PIPE, text=True)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, err[-2000:]
    left = [p for p in tmp_path.iterdir() if p.name.startswith(".last.pt.")]
    assert len(left) == 1 and left[0].stat().st_size == 200_000 and f"pid{proc.pid}." in left[0].name
    assert json.loads(target.read_text()) == {"epoch": 1}  # the old file is intact
    fileio.write_json(target, {"epoch": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "writer.py"]
    assert json.loads(target.read_text()) == {"epoch": 2}


def test_only_dead_writers_temporaries_of_the_same_target_are_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid is free again
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        names = {
            f".best.pt.pid{alive.pid}.abc123.tmp": True,          # another process writing it now
            f".best.pt.json.pid{dead.pid}.abc.tmp": True,        # best.pt.json's, not best.pt's
            ".best.pt.old.bak": True,                             # not a temporary at all
            f".last.pt.pid{os.getpid() + 10**7}.abc.tmp": True,   # another target's
            f".best.pt.pid{os.getpid()}.abc.tmp": False,          # this process: one target at a time
            f".best.pt.pid{dead.pid}.abc.tmp": False,             # its writer is gone
            ".best.pt.k3j_9x0a.tmp": False,                       # from before names carried the pid
        }
        for name in names:
            (tmp_path / name).write_bytes(b"partial")
        removed = fileio.remove_stale_temporaries(tmp_path / "best.pt")
        assert sorted(p.name for p in removed) == sorted(n for n, keep in names.items() if not keep)
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(n for n, keep in names.items() if keep)
    finally:
        alive.kill()
        alive.wait()


def test_refuse_to_replace_names_the_file_and_the_ways_out(tmp_path):
    old, new = tmp_path / "eval_test.json", tmp_path / "captions_test.json"
    old.write_text("{}")
    with pytest.raises(ValueError) as info:
        fileio.refuse_to_replace([new, old], overwrite=False, what="holds an earlier evaluation",
                                 ways_out="--overwrite to replace it")
    assert str(info.value) == f"{old} holds an earlier evaluation; pass --overwrite to replace it"
    assert fileio.refuse_to_replace([new, old], overwrite=True, what="", ways_out="") == [old]
    assert fileio.refuse_to_replace([new], overwrite=False, what="", ways_out="") == []


def test_check_folder_refuses_a_file_in_the_way(tmp_path):
    (tmp_path / "notes").write_text("a file")
    assert fileio.check_folder(tmp_path / "new" / "deeper", "--results_dir new") == tmp_path / "new" / "deeper"
    for folder in (tmp_path / "notes", tmp_path / "notes" / "sub"):
        with pytest.raises(ValueError) as info:
            fileio.check_folder(folder, f"--results_dir {folder}")
        assert str(info.value) == f"--results_dir {folder}: {tmp_path / 'notes'} is a file, expected a folder"


def test_written_files_get_the_umask_permissions_not_the_temp_files_private_ones(tmp_path):
    old = os.umask(0o022)
    try:
        path = fileio.write_json(tmp_path / "shared.json", {"a": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
