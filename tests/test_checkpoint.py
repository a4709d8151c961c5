"""checkpoint.py: atomic save, safe load, config comparison, rebuild from a checkpoint."""
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import checkpoint as ck

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
    import sys, torch
    sys.path.insert(0, {root!r})
    import checkpoint as ck
    path = sys.argv[1]
    i = 0
    while True:
        i += 1
        state = {{"format": ck.FORMAT, "model_config": {{}}, "vocab": [], "epoch": i,
                 "model": {{"w": torch.full((256, 1024), float(i))}}}}
        ck.save_checkpoint(path, state)
        if i == 1:
            print("ready", flush=True)
""")


def test_sigkill_during_saves_leaves_a_loadable_checkpoint(tmp_path):
    """1 MB checkpoints rewritten in a loop, killed -9 at several moments: always loadable."""
    script = tmp_path / "saver.py"
    script.write_text(_SAVER.format(root=str(ROOT)))
    delays = (0.05, 0.13, 0.31)
    # Started together so the interpreter start-ups overlap (the test stays quick).
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path / f"{i}.pt")],
                              stdout=subprocess.PIPE, text=True) for i in range(len(delays))]
    try:
        for proc, delay in zip(procs, delays):
            assert proc.stdout.readline().strip() == "ready"
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(timeout=30)
    for i in range(len(delays)):
        got = ck.load_checkpoint(tmp_path / f"{i}.pt")
        # Never a mix of two saves: every value is the step that wrote the file.
        assert got["epoch"] >= 1 and torch.all(got["model"]["w"] == float(got["epoch"]))
