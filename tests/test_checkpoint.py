"""checkpoint.py: atomic save, safe load, config comparison, rebuild from a checkpoint."""
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import checkpoint as ck
import fileio

ROOT = Path(__file__).resolve().parents[1]


def _state(value: float = 1.0, **extra) -> dict:
    state = {"format": ck.FORMAT, "model_config": {"vocab_size": 7, "encoder": "resnet18"},
             "vocab": ["<pad>", "<sos>", "<eos>", "<unk>", "a", "b", "c"],
             "model": {"w": torch.full((3, 4), value)}, "epoch": 2}
    state.update(extra)
    return state


def test_round_trip_keeps_tensors_and_plain_data(tmp_path):
    path = tmp_path / "sub" / "last.pt"
    ck.save_checkpoint(path, _state(3.0, rng={"torch": torch.get_rng_state(), "python": [1, 2]}))
    got = ck.load_checkpoint(path)
    assert torch.equal(got["model"]["w"], torch.full((3, 4), 3.0))
    assert got["epoch"] == 2 and got["vocab"][4] == "a"
    assert torch.equal(got["rng"]["torch"], torch.get_rng_state())
    # No temporary files stay behind.
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]


def test_save_replaces_old_file(tmp_path):
    path = tmp_path / "last.pt"
    ck.save_checkpoint(path, _state(1.0))
    ck.save_checkpoint(path, _state(2.0))
    assert ck.load_checkpoint(path)["model"]["w"][0, 0].item() == 2.0


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        ck.load_checkpoint(tmp_path / "nope.pt")


@pytest.mark.parametrize("case", ["truncated", "garbage", "empty", "not_dict", "wrong_format",
                                  "missing_keys", "folder", "pickled_object"])
def test_bad_files_are_value_errors_naming_the_path(tmp_path, case):
    path = tmp_path / f"{case}.pt"
    if case == "truncated":
        ck.save_checkpoint(path, _state())
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif case == "garbage":
        path.write_bytes(os.urandom(300))
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "not_dict":
        torch.save([1, 2, 3], path)
    elif case == "wrong_format":
        torch.save({"format": "other-v9", "model": {}}, path)
    elif case == "missing_keys":
        torch.save({"format": ck.FORMAT, "model": {}}, path)
    elif case == "folder":
        path.mkdir()
    elif case == "pickled_object":
        # A whole module pickled (what we must never load): weights_only refuses it.
        torch.save({"format": ck.FORMAT, "model": torch.nn.Linear(2, 2)}, path)
    with pytest.raises(ValueError) as info:
        ck.load_checkpoint(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message


def test_a_pickled_object_is_refused_as_code_without_weights_only_advice(tmp_path):
    path = tmp_path / "foreign.pt"
    torch.save({"format": ck.FORMAT, "model": torch.nn.Linear(2, 2)}, path)
    with pytest.raises(ValueError) as info:
        ck.load_checkpoint(path)
    message = str(info.value)
    assert "not a checkpoint this toolkit wrote" in message and "never loaded" in message
    assert "weights_only" not in message


@pytest.mark.parametrize("failure", ["rename", "write"])
def test_a_failed_save_keeps_the_previous_checkpoint_and_says_so_in_one_line(tmp_path, monkeypatch,
                                                                            failure):
    path = tmp_path / "last.pt"
    ck.save_checkpoint(path, _state(1.0))
    if failure == "rename":  # e.g. a permission error on the folder
        def refuse(src, dst):
            raise PermissionError(13, "Permission denied")
        monkeypatch.setattr(fileio, "replace", refuse)
    else:  # the disk fills up while the bytes are written
        def full(obj, f, *args, **kwargs):
            f.write(b"partial")
            raise OSError(28, "No space left on device")
        monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OSError) as info:
        ck.save_checkpoint(path, _state(2.0))
    message = str(info.value)
    assert str(path) in message and "previous file is unchanged" in message and "\n" not in message
    monkeypatch.undo()
    assert ck.load_checkpoint(path)["model"]["w"][0, 0].item() == 1.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temporary file left


def test_config_differences_names_fields():
    saved = {"encoder": "resnet18", "decoder_dim": 256, "dropout": 0.5, "pretrained": True}
    requested = {"encoder": "resnet50", "decoder_dim": 256, "dropout": 0.5, "pretrained": False}
    assert ck.config_differences(saved, requested) == {
        "encoder": ("resnet18", "resnet50"), "pretrained": (True, False)}
    with pytest.raises(ValueError, match=r"encoder: checkpoint 'resnet18' vs requested 'resnet50'"):
        ck.check_model_config({"model_config": saved}, requested, "w/last.pt")
    # Init-only fields are not a mismatch.
    ck.check_model_config({"model_config": saved}, dict(requested, encoder="resnet18"))


def test_strip_module_prefix():
    state = {"module.decoder.w": 1, "_orig_mod.module.encoder.b": 2, "plain": 3}
    assert ck.strip_module_prefix(state) == {"decoder.w": 1, "encoder.b": 2, "plain": 3}


_SAVER = textwrap.dedent("""
    import os, signal, sys, torch
    sys.path.insert(0, {root!r})
    import checkpoint as ck
    import fileio

    def state(i):
        return {{"format": ck.FORMAT, "model_config": {{}}, "vocab": [], "epoch": i,
                 "model": {{"w": torch.full((256, 1024), float(i))}}}}

    def killed_before_rename(src, dst):
        assert os.path.getsize(src) > 1_000_000  # the new bytes are all in the temporary file
        os.kill(os.getpid(), signal.SIGKILL)

    ck.save_checkpoint(sys.argv[1], state(1))
    fileio.replace = killed_before_rename
    ck.save_checkpoint(sys.argv[1], state(2))
""")


def test_sigkill_between_temporary_write_and_rename_leaves_the_previous_checkpoint(tmp_path):
    """Killed -9 from inside the second save, after its bytes are written, before the rename."""
    script = tmp_path / "saver.py"
    script.write_text(_SAVER.format(root=str(ROOT)))
    path = tmp_path / "last.pt"
    proc = subprocess.run([sys.executable, str(script), str(path)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    got = ck.load_checkpoint(path)
    assert got["epoch"] == 1 and torch.all(got["model"]["w"] == 1.0)
