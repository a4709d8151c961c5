"""A training run survives kill -9 inside a save and SIGTERM, and resumes to exactly the same
weights and history as an uninterrupted run: on features, with loader workers, and end to end on
photos with augmentation (issue 14). Subprocesses run `main.main` as a user's command would."""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import checkpoint as ck
import data_utils
import main as cli
import train
from test_train import assert_same_state, configs, make_dataset, weights_of
from test_train import feature_dir  # noqa: F401  (fixture: random features of the data set's images)
from helpers_infer import one_torch_thread  # noqa: F401  (autouse: one thread, tiny models)

ROOT = Path(__file__).resolve().parents[1]
# Timings differ between any two runs; every other field of a history row must be equal.
TIMINGS = ("seconds", "captions_per_s")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data") / "set")


def train_argv(dataset: Path, feature_dir: Path, out: Path, *extra: str) -> list[str]:
    """3 epochs of 4 steps (16 images x 2 captions, batch 8), dropout on (it draws every step)."""
    return ["--mode", "train", "--dataset_path", str(dataset), "--split_sizes", "16", "4",
            "--min_word_freq", "1", "--num_workers", "0", "--features_dir", str(feature_dir),
            "--embed_dim", "16", "--attention_dim", "16", "--decoder_dim", "16", "--dropout", "0.5",
            "--batch_size", "8", "--epochs", "3", "--threads", "1", "--weights_dir", str(out / "weights"),
            "--graphs_dir", str(out / "graphs"), "--wandb", "disabled", "--log_level", "warning", *extra]


def rows(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in h.items() if k not in TIMINGS} for h in history]


def assert_same_run(reference: Path, resumed: Path) -> None:
    """Same final weights, optimizer step counts and history rows (timings aside)."""
    a = ck.load_checkpoint(reference / "weights" / "last.pt")
    b = ck.load_checkpoint(resumed / "weights" / "last.pt")
    assert_same_state(a["model"], b["model"])
    assert [s["step"] for s in a["optimizer"]["state"].values()] == \
        [s["step"] for s in b["optimizer"]["state"].values()]
    assert rows(a["history"]) == rows(b["history"])
    history = json.loads((resumed / "weights" / "history.json").read_text())
    assert rows(history) == rows(a["history"])


@pytest.fixture(scope="module")
def reference(dataset, feature_dir, tmp_path_factory) -> Path:
    """The uninterrupted run the interrupted ones must reproduce."""
    out = tmp_path_factory.mktemp("reference")
    assert cli.main(train_argv(dataset, feature_dir, out)) == 0
    return out


def run_script(script: str, tmp_path: Path, argv: list[str], *, new_session: bool = False,
               **env: str) -> subprocess.Popen:
    path = tmp_path / "run.py"
    path.write_text(textwrap.dedent(script).format(root=str(ROOT)))
    return subprocess.Popen([sys.executable, str(path), *argv], cwd=tmp_path, text=True,
                            env=dict(os.environ, TQDM_DISABLE="1", **env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=new_session)


# fileio.replace is the rename of every atomic write: killing the process inside it, once the
# temporary file holds all the new bytes, is the worst moment a crash can hit a save.
_KILL_IN_SAVE = """
    import os, signal, sys
    sys.path.insert(0, {root!r})
    import fileio, main
    real, seen = fileio.replace, []

    def replace(src, dst):
        if os.path.basename(dst) == "last.pt":
            seen.append(dst)
            if len(seen) == int(os.environ["KILL_AT_SAVE"]):
                assert os.path.getsize(src) > 10_000, "the new checkpoint is written"
                os.kill(os.getpid(), signal.SIGKILL)
        real(src, dst)

    fileio.replace = replace
    sys.exit(main.main(sys.argv[1:]))
"""


def test_sigkill_inside_a_save_of_last_pt_keeps_the_previous_one_and_resume_matches(
        dataset, feature_dir, reference, tmp_path):
    out = tmp_path / "killed"
    argv = train_argv(dataset, feature_dir, out)
    proc = run_script(_KILL_IN_SAVE, tmp_path, argv, KILL_AT_SAVE="2")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, err[-3000:]
    weights = out / "weights"
    saved = ck.load_checkpoint(weights / "last.pt")
    assert (saved["epoch"], saved["step_in_epoch"]) == (1, 0)  # the save of epoch 2 never landed
    assert [h["epoch"] for h in json.loads((weights / "history.json").read_text())] == [1]
    assert cli.main(argv + ["--resume", "auto"]) == 0
    assert_same_run(reference, out)


# The hook stops at a known step and waits there until the test's SIGTERM has reached the
# handler (the StopFlag that training installs is what signal.getsignal returns).
_WAIT_FOR_SIGTERM = """
    import os, signal, sys, time
    sys.path.insert(0, {root!r})
    import main, train
    real, calls = train.compute_loss, []

    def compute_loss(net, *args, **kwargs):
        if net.training:
            calls.append(1)
            if len(calls) == 4 + 2:  # the 2nd step of epoch 2
                open("at_step", "w").close()
                flag, deadline = signal.getsignal(signal.SIGTERM), time.monotonic() + 120
                while not flag and time.monotonic() < deadline:
                    time.sleep(0.01)
        return real(net, *args, **kwargs)

    train.compute_loss = compute_loss
    sys.exit(main.main(sys.argv[1:]))
"""


# "group": SIGTERM to the whole process group, loader workers included, as Slurm's scancel and a
# terminal's Ctrl-C send it; the workers leave it to the main process, which saves.
@pytest.mark.parametrize("group", [False, True], ids=["main_process", "process_group_with_workers"])
def test_sigterm_saves_last_pt_mid_epoch_exits_143_and_resume_matches(dataset, feature_dir,
                                                                       reference, tmp_path, group):
    out = tmp_path / "termed"
    argv = train_argv(dataset, feature_dir, out)
    if group:
        argv[argv.index("--num_workers") + 1] = "2"
    proc = run_script(_WAIT_FOR_SIGTERM, tmp_path, argv, new_session=group)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "at_step").exists():
            assert proc.poll() is None, f"training exited early: {proc.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, "training never reached epoch 2"
            time.sleep(0.02)
        if group:
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 143, err[-3000:]
    assert "SIGTERM received" in err
    saved = ck.load_checkpoint(out / "weights" / "last.pt")
    assert (saved["epoch"], saved["step_in_epoch"]) == (1, 2)  # that step finished, then the save
    assert cli.main(argv + ["--resume", "auto"]) == 0
    assert_same_run(reference, out)


def test_resume_with_loader_workers_matches_uninterrupted(dataset, feature_dir, reference, tmp_path,
                                                           monkeypatch):
    """--num_workers 2, interrupted mid-epoch 2: the workers of the resumed run start over."""
    out = tmp_path / "workers"
    argv = train_argv(dataset, feature_dir, out)
    argv[argv.index("--num_workers") + 1] = "2"
    _interrupt_at(monkeypatch, 4 + 3)
    assert cli.main(argv) == 130
    monkeypatch.undo()
    assert ck.load_checkpoint(out / "weights" / "last.pt")["step_in_epoch"] == 3
    assert cli.main(argv + ["--resume", "auto"]) == 0
    assert_same_run(reference, out)


def _interrupt_at(monkeypatch, step: int) -> None:
    """SIGINT while computing the loss of training step `step` (counted over the run)."""
    real, calls = train.compute_loss, []

    def interrupting(net, *args, **kwargs):
        if net.training:
            calls.append(1)
            if len(calls) == step:
                signal.raise_signal(signal.SIGINT)
        return real(net, *args, **kwargs)

    monkeypatch.setattr(train, "compute_loss", interrupting)


@pytest.fixture(scope="module")
def photos_with_a_corrupt_one(tmp_path_factory) -> tuple[Path, str]:
    """The colour-square set with one training photo replaced by bytes that are no JPEG."""
    root = make_dataset(tmp_path_factory.mktemp("photos") / "set")
    data_cfg, _, _ = configs(root, root)
    broken = data_utils.load_dataset(data_cfg).train[0].name
    (root / "Images" / broken).write_bytes(b"not a jpeg")
    return root, broken


@pytest.mark.parametrize("workers", [0, 2])
def test_end_to_end_with_augmentation_resumes_exactly_and_counts_the_corrupt_photo(
        photos_with_a_corrupt_one, tmp_path, monkeypatch, caplog, workers):
    """The small CNN trained on photos (random crops and jitter), interrupted mid-epoch 2."""
    dataset, broken = photos_with_a_corrupt_one
    model = {"encoder": "small_cnn", "fine_tune_encoder": True, "encoded_size": 2, "dropout": 0.5}

    def run(out: Path, **kw) -> int:
        return train.run_training(*configs(dataset, out, model=model, batch_size=4, epochs=2,
                                           num_workers=workers, lr=3e-3, encoder_lr=3e-3, **kw))

    caplog.set_level(logging.INFO, logger="train")
    assert run(tmp_path / "full") == 0
    # The corrupt photo's two captions are skipped each epoch: in the epoch line and history.json.
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]
    assert len(lines) == 2 and all(line.endswith("skipped 2 corrupt image(s)") for line in lines)
    history = json.loads((tmp_path / "full" / "weights" / "history.json").read_text())
    assert [h["skipped_images"] for h in history] == [2, 2]

    _interrupt_at(monkeypatch, 8 + 3)  # 16 photos x 2 captions, batch 4: 8 steps an epoch
    assert run(tmp_path / "part") == 130
    monkeypatch.undo()
    saved = ck.load_checkpoint(tmp_path / "part" / "weights" / "last.pt")
    assert (saved["epoch"], saved["step_in_epoch"]) == (1, 3)
    assert run(tmp_path / "part", resume="auto") == 0
    assert_same_run(tmp_path / "full", tmp_path / "part")
    # The encoder was trained (end to end), not only the decoder.
    assert any(k.startswith("encoder.") for k in weights_of(tmp_path / "part" / "weights" / "last.pt"))
