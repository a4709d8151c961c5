"""train.py and --mode train/extract: tiny data sets written here, tiny random-init models, CPU."""
from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoint as ck
import data_utils
from devices import Dist
import features
import main as cli
import extract
import model as model_lib
import run_files
import run_logging
import train
from helpers_infer import one_torch_thread  # noqa: F401  (autouse: one thread, tiny models)

ROOT = Path(__file__).resolve().parents[1]
COLOURS = {"red": (220, 30, 30), "green": (30, 190, 40), "blue": (30, 40, 220)}
# A frozen encoder whose checkpoints are ~1 MB (resnet18's are 45 MB, written and fsynced per save).
SMALL = {"encoder": "small_cnn"}
TINY_MODEL = ["--encoder", "resnet18", "--no-pretrained", "--image_size", "32", "--encoded_size", "2",
              "--embed_dim", "16", "--attention_dim", "16", "--decoder_dim", "16"]


def make_dataset(root: Path, n: int = 24) -> Path:
    """Kaggle layout: n noisy one-colour photos, two captions each naming the colour."""
    rng = np.random.default_rng(0)
    (root / "Images").mkdir(parents=True)
    rows = ["image,caption"]
    for i in range(n):
        colour = list(COLOURS)[i % 3]
        arr = np.clip(np.array(COLOURS[colour]) + rng.normal(0, 15, (40, 40, 3)), 0, 255)
        Image.fromarray(arr.astype(np.uint8)).save(root / "Images" / f"im{i:03d}.jpg")
        rows += [f"im{i:03d}.jpg,a {colour} square", f"im{i:03d}.jpg,a {colour} square on a wall"]
    (root / "captions.txt").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data") / "set")


@pytest.fixture(scope="module")
def features_root(tmp_path_factory) -> Path:
    """One feature cache for the module: runs with the same seed reuse it."""
    return tmp_path_factory.mktemp("features")


def configs(dataset: Path, out: Path, features_root: Path | None = None, *, model=None,
            split_sizes=(16, 4), num_workers=0, **train_kw):
    data_cfg = data_utils.DataConfig(dataset_path=str(dataset), split_sizes=split_sizes, min_word_freq=1,
                                     num_workers=num_workers)
    model_cfg = model_lib.ModelConfig(**{
        "vocab_size": 5, "encoder": "resnet18", "pretrained": False, "image_size": 32, "encoded_size": 2,
        "embed_dim": 16, "attention_dim": 16, "decoder_dim": 16, **(model or {})})
    kw = dict(batch_size=8, epochs=1, weights_dir=str(out / "weights"), graphs_dir=str(out / "graphs"),
              features_root=str(features_root or out / "features"), wandb="disabled")
    kw.update(train_kw)
    return data_cfg, model_cfg, train.TrainConfig(**kw)


def weights_of(path: Path) -> dict:
    return ck.load_checkpoint(path)["model"]


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------- one run, its files

def test_two_epochs_write_checkpoints_graphs_history_and_tensorboard(dataset, features_root, tmp_path):
    out = tmp_path / "run"
    status = train.run_training(*configs(dataset, out, features_root, model=SMALL, epochs=2,
                                         save_every=1, keep_last=1, tensorboard=True))
    assert status == 0
    w = out / "weights"
    names = sorted(p.name for p in w.iterdir())
    # keep_last=1: only the newest periodic checkpoint stays.
    assert names == ["best.pt", "epoch_002.pt", "history.json", "last.pt", "runs", "vocab.json"]
    assert (out / "graphs" / "loss.png").stat().st_size > 1000
    assert (out / "graphs" / "bleu.png").stat().st_size > 1000
    history = json.loads((w / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    assert {"loss", "val_loss", "bleu1", "bleu4", "lr", "captions_per_s", "acc", "val_acc"} <= set(history[0])
    last = ck.load_checkpoint(w / "last.pt")
    assert last["epoch"] == 2 and last["step_in_epoch"] == 0
    assert last["vocab"] == data_utils.Vocabulary.load(w / "vocab.json").to_list()
    assert last["features"]["dir"].startswith(str(features_root))
    # Frozen encoder: the checkpoint still holds it, so it captions photos.
    model, vocab, cfg = ck.model_from_checkpoint(last)
    assert model.encoder is not None and cfg.vocab_size == len(vocab)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(next((w / "runs").iterdir())))
    acc.Reload()
    assert {"train/loss", "val/loss", "val/bleu4", "lr"} <= set(acc.Tags()["scalars"])
    assert any("val/samples" in t for t in acc.Tags()["tensors"])


def test_demo_ends_by_captioning_a_held_out_image(dataset, features_root, tmp_path, capsys):
    out = tmp_path / "run"
    assert train.run_training(*configs(dataset, out, features_root)) == 0
    image = dataset / "Images" / "im023.jpg"
    train._caption_demo_image(image, out / "weights" / "best.pt", torch.device("cpu"))
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{image}: ") and len(line) > len(f"{image}: ")


def test_wandb_failure_is_one_warning_and_training_goes_on(monkeypatch, caplog):
    import wandb

    def broken(*args, **kwargs):
        raise RuntimeError("network unreachable\nmore detail")

    monkeypatch.setattr(wandb, "init", broken)
    assert run_logging.start_wandb("offline", {}) is None
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "network unreachable" in warnings[0].getMessage()
    assert run_logging.start_wandb("disabled", {}) is None


def test_fine_tune_end_to_end_with_batch_4_uses_encoder_lr(dataset, tmp_path):
    # 4 training images x 2 captions: 2 steps through the CNN.
    data_cfg, model_cfg, cfg = configs(dataset, tmp_path, model={"fine_tune_encoder": True},
                                       split_sizes=(4, 2), batch_size=4, lr=1e-3, encoder_lr=3e-4, grad_clip=1.0)
    torch.manual_seed(cfg.seed)  # the encoder is built first, so its init matches the run's
    before = model_lib.build_model(dataclasses.replace(model_cfg, vocab_size=9))
    assert train.run_training(data_cfg, model_cfg, cfg) == 0
    ckpt = ck.load_checkpoint(tmp_path / "weights" / "last.pt")
    groups = {g["name"]: g["lr"] for g in ckpt["optimizer"]["param_groups"]}
    assert groups == {"decoder": 1e-3, "encoder": 3e-4}
    # No cache when fine-tuning, and the encoder's trainable stages moved.
    assert ckpt["features"] is None and not (tmp_path / "features").exists()
    key = "encoder.body.7.0.conv1.weight"
    assert not torch.equal(ckpt["model"][key], before.state_dict()[key])


# ---------------------------------------------------------------- resume, signals, faults

def test_resume_after_epoch_and_after_sigint_mid_epoch_match_uninterrupted_run(
        dataset, feature_dir, tmp_path, monkeypatch):
    fine = {"dropout": 0.5}  # dropout draws from the RNG every step: it must resume exactly too
    full = tmp_path / "full"
    kw = dict(model=fine, batch_size=4, features_dir=str(feature_dir))
    assert train.run_training(*configs(dataset, full, epochs=2, **kw)) == 0
    reference = ck.load_checkpoint(full / "weights" / "last.pt")

    # 1) stopped after epoch 1, resumed with --resume auto.
    part = tmp_path / "part"
    assert train.run_training(*configs(dataset, part, epochs=1, **kw)) == 0
    assert train.run_training(*configs(dataset, part, epochs=2, resume="auto", **kw)) == 0
    resumed = ck.load_checkpoint(part / "weights" / "last.pt")
    assert_same_state(reference["model"], resumed["model"])
    assert [h["epoch"] for h in resumed["history"]] == [1, 2]
    assert resumed["history"][1]["bleu4"] == reference["history"][1]["bleu4"]

    # 2) SIGINT during the 3rd step of epoch 2: that step finishes, last.pt is saved, exit 130.
    sig = tmp_path / "sig"
    calls = {"n": 0}
    real = train.compute_loss

    def interrupting(net, *args, **kwargs):
        if net.training:
            calls["n"] += 1
            if calls["n"] == 8 + 3:  # 8 steps per epoch (32 captions / 4)
                signal.raise_signal(signal.SIGINT)
        return real(net, *args, **kwargs)

    monkeypatch.setattr(train, "compute_loss", interrupting)
    # Whatever handler the process started with (a shell's background job starts with SIGINT
    # ignored) is the one training must put back.
    before = signal.getsignal(signal.SIGINT)
    assert train.run_training(*configs(dataset, sig, epochs=2, **kw)) == 130
    monkeypatch.setattr(train, "compute_loss", real)
    saved = ck.load_checkpoint(sig / "weights" / "last.pt")
    assert (saved["epoch"], saved["step_in_epoch"]) == (1, 3)
    assert signal.getsignal(signal.SIGINT) is before  # handler restored
    assert train.run_training(*configs(dataset, sig, epochs=2,
                                       resume=str(sig / "weights" / "last.pt"), **kw)) == 0
    assert_same_state(reference["model"], weights_of(sig / "weights" / "last.pt"))


def test_resume_with_another_model_names_the_fields(dataset, features_root, tmp_path, capsys):
    out = tmp_path / "run"
    assert train.run_training(*configs(dataset, out, features_root)) == 0
    argv = ["--mode", "train", "--dataset_path", str(dataset), "--split_sizes", "16", "4",
            "--min_word_freq", "1", "--num_workers", "0", *TINY_MODEL, "--decoder_dim", "32",
            "--encoded_size", "3", "--weights_dir", str(out / "weights"), "--resume", "auto",
            "--features_root", str(features_root), "--wandb", "disabled"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "decoder_dim: checkpoint 16 vs requested 32" in err
    assert "encoded_size: checkpoint 2 vs requested 3" in err
    assert cli.main(argv[:-6] + ["--resume", str(tmp_path / "missing.pt")]) == 2
    assert "missing.pt" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--device", "cuda"], "no CUDA GPU"),
    (["--amp", "fp16"], "--amp fp16 needs a CUDA device"),
    (["--batch_size", "0"], "--batch_size must be at least 1, got 0"),
    (["--encoder", "small_cnn", "--pretrained"], "--encoder small_cnn has no pretrained weights; pass --no-pretrained"),
])
def test_bad_training_flags_are_one_line_errors(dataset, tmp_path, capsys, argv, message):
    base = ["--mode", "train", "--dataset_path", str(dataset), "--weights_dir", str(tmp_path),
            "--wandb", "disabled", *TINY_MODEL]
    assert cli.main(base + argv) == 2
    assert message in capsys.readouterr().err


def test_nan_losses_are_skipped_then_stop_training_keeping_the_last_good_checkpoint(
        dataset, feature_dir, tmp_path, monkeypatch, caplog):
    real = model_lib.caption_loss
    plan = {"bad": {2, 3}, "n": 0}

    def flaky(logits, *args, **kwargs):
        loss, ce = real(logits, *args, **kwargs)
        if torch.is_grad_enabled():
            plan["n"] += 1
            if plan["n"] in plan["bad"]:
                loss = loss * float("nan")
        return loss, ce

    monkeypatch.setattr(model_lib, "caption_loss", flaky)
    data_cfg, model_cfg, cfg = configs(dataset, tmp_path, features_dir=str(feature_dir), epochs=2,
                                       max_bad_steps=3)
    assert train.run_training(data_cfg, model_cfg, cfg) == 0
    history = json.loads((tmp_path / "weights" / "history.json").read_text())
    assert history[0]["skipped_nonfinite"] == 2 and np.isfinite(history[0]["loss"])
    assert "non-finite loss" in caplog.text
    good = weights_of(tmp_path / "weights" / "last.pt")
    assert all(torch.isfinite(t).all() for t in good.values() if t.is_floating_point())

    # From the 1st step of epoch 3 on, every loss is NaN: 3 in a row stop the run, exit 1.
    plan["bad"] = set(range(plan["n"] + 1, plan["n"] + 100))
    cfg = dataclasses.replace(cfg, epochs=3, resume="auto")
    assert train.run_training(data_cfg, model_cfg, cfg) == 1
    assert re.search(r"[3-9] non-finite losses in a row", caplog.text)
    assert_same_state(good, weights_of(tmp_path / "weights" / "last.pt"))


@pytest.fixture(scope="module")
def feature_dir(dataset, tmp_path_factory) -> Path:
    """Random features (P=4, C=8) for the data set's images: subprocess tests start light (no CNN)."""
    out = tmp_path_factory.mktemp("ext") / "feats"
    names = sorted(p.name for p in (dataset / "Images").iterdir())
    rng = np.random.default_rng(0)
    features.write_features(out, names, [rng.random((len(names), 4, 8), dtype=np.float32)], 4, 8)
    return out


def test_sigterm_and_sigint_set_the_stop_flag_and_handlers_come_back():
    for signum, status in ((signal.SIGTERM, 143), (signal.SIGINT, 130)):
        before = signal.getsignal(signum)
        flag = train.StopFlag()
        with train.stop_signals(flag):
            signal.raise_signal(signum)  # would end the test process without the handler
            assert flag and flag.signum == signum
        assert signal.getsignal(signum) is before
        assert train.EXIT_SIGNAL[signum] == status


_DDP_SCRIPT = textwrap.dedent("""
    import logging, os, sys
    logging.basicConfig(level=logging.INFO)
    sys.path.insert(0, {root!r})
    sys.path.insert(0, {tests!r})
    import torch
    torch.set_num_threads(1)
    import train, test_train
    from pathlib import Path
    out = Path({out!r})
    cfgs = test_train.configs(Path({dataset!r}), out, epochs=2, batch_size=4,
                              features_dir={features!r})
    built = []
    real = train.TrainStep.__init__
    def spy(self, model, *args):
        built.append(model)
        real(self, model, *args)
    train.TrainStep.__init__ = spy
    status = train.run_training(*cfgs)
    torch.save(built[0].state_dict(), out / f"rank{{os.environ['RANK']}}.pt")
    sys.exit(status)
""")


def test_ddp_two_processes_on_cpu_agree_and_write_one_set_of_files(dataset, feature_dir, tmp_path):
    """What torchrun does, without its launcher process: two ranks, env:// rendezvous, gloo."""
    import socket

    out = tmp_path / "ddp"
    out.mkdir()
    script = tmp_path / "ddp.py"
    script.write_text(_DDP_SCRIPT.format(root=str(ROOT), tests=str(ROOT / "tests"), out=str(out),
                                         dataset=str(dataset), features=str(feature_dir)))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, TQDM_DISABLE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
               WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
    procs = [subprocess.Popen([sys.executable, str(script)], cwd=tmp_path, text=True,
                              env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for r in range(2)]
    try:
        results = [p.communicate(timeout=180) for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err[-3000:]
    rank0, rank1 = torch.load(out / "rank0.pt"), torch.load(out / "rank1.pt")
    assert_same_state(rank0, rank1)
    assert_same_state(rank0, weights_of(out / "weights" / "last.pt"))
    assert sorted(p.name for p in (out / "weights").iterdir()) == [
        "best.pt", "history.json", "last.pt", "vocab.json"]
    history = json.loads((out / "weights" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    # Rank 1 only reports problems: its log has no epoch lines.
    assert "epoch 1/2" in results[0][1] and "epoch 1/2" not in results[1][1]


# ---------------------------------------------------------------- features

def test_extract_then_train_on_features_dir_never_builds_the_cnn(dataset, tmp_path, monkeypatch, capsys):
    feats = tmp_path / "feats"
    argv = ["--mode", "extract", "--dataset_path", str(dataset), "--split_sizes", "16", "4",
            "--num_workers", "0", *TINY_MODEL, "--features_dir", str(feats), "--batch_size", "8"]
    assert cli.main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["images"], summary["positions"], summary["channels"]) == (24, 4, 512)
    store = data_utils.FeatureStore.open(feats)
    assert store.get("im000.jpg").shape == (4, 512)
    assert np.load(feats / "features.npy", mmap_mode="r").dtype == np.float16

    # Without --features_dir, extract writes the very cache a frozen-encoder training then reuses.
    cache = tmp_path / "cache"
    assert cli.main(argv[:-4] + ["--features_root", str(cache), "--batch_size", "8"]) == 0
    extracted = Path(json.loads(capsys.readouterr().out)["features_dir"])
    assert extracted.parent == cache
    data_cfg, model_cfg, cfg = configs(dataset, tmp_path / "frozen", cache)
    calls = []
    monkeypatch.setattr(extract, "extract_features", lambda *a, **k: calls.append(1))
    assert train.run_training(data_cfg, model_cfg, cfg) == 0
    assert calls == []

    def no_cnn(*args, **kwargs):
        raise AssertionError("the CNN was built")

    monkeypatch.setattr(model_lib, "Encoder", no_cnn)
    monkeypatch.setattr(extract, "extract_features", no_cnn)
    data_cfg, model_cfg, cfg = configs(dataset, tmp_path, features_dir=str(feats))
    assert train.run_training(data_cfg, model_cfg, cfg) == 0
    ckpt = ck.load_checkpoint(tmp_path / "weights" / "best.pt")
    assert ckpt["model_config"]["encoder"] == "features"
    assert ckpt["model_config"]["feature_dim"] == 512
    model, _, _ = ck.model_from_checkpoint(ckpt)
    assert model.encoder is None


def test_features_key_changes_with_weights_size_and_images(dataset):
    cfg = model_lib.ModelConfig(vocab_size=9, encoder="resnet18", pretrained=False, image_size=32,
                                encoded_size=2)
    torch.manual_seed(0)
    enc = model_lib.build_model(cfg).encoder
    key, meta = extract.features_key(cfg, enc, ["a.jpg", "b.jpg"])
    assert key == extract.features_key(cfg, enc, ["a.jpg", "b.jpg"])[0]
    assert key != extract.features_key(cfg, enc, ["a.jpg"])[0]
    assert key != extract.features_key(dataclasses.replace(cfg, encoded_size=3), enc, ["a.jpg", "b.jpg"])[0]
    torch.manual_seed(1)
    other = model_lib.build_model(cfg).encoder
    assert key != extract.features_key(cfg, other, ["a.jpg", "b.jpg"])[0]


# ---------------------------------------------------------------- demo preset, pieces

def test_demo_preset_fills_only_flags_the_user_left_alone(monkeypatch):
    seen = {}

    def fake_run(data_cfg, model_cfg, train_cfg):
        seen.update(data=data_cfg, model=model_cfg, train=train_cfg)
        return 0

    monkeypatch.setattr(train, "run_training", fake_run)
    assert cli.main(["--mode", "train", "--epochs", "3", "--decoder_dim", "64"]) == 0
    assert seen["train"].epochs == 3 and seen["model"].decoder_dim == 64  # the user's
    assert seen["train"].batch_size == train.DEMO_PRESET["batch_size"]  # the preset's
    assert (seen["model"].encoder, seen["model"].pretrained) == (train.DEMO_PRESET["encoder"], False)
    assert seen["model"].fine_tune_encoder == train.DEMO_PRESET["fine_tune_encoder"]
    assert seen["model"].encoder_proj_dim == train.DEMO_PRESET["encoder_proj_dim"]
    assert seen["data"].min_word_freq == 1
    # `make demo` run again continues (or, finished, only reports) its run instead of refusing.
    assert seen["train"].resume == "auto" and not seen["train"].overwrite
    # With a data set, no preset: the config defaults.
    assert cli.main(["--mode", "train", "--dataset_path", "x"]) == 0
    assert seen["train"].batch_size == 128 and seen["model"].encoder == "resnet50"


def test_help_defaults_match_train_config():
    """The [default] in each training flag's help is TrainConfig's default."""
    parser = cli.build_parser()
    defaults = {f.name: f.default for f in dataclasses.fields(train.TrainConfig)}
    checked = 0
    for action in parser._actions:
        name = action.dest
        if name in defaults and action.help and action.help.endswith("]") and "[" in action.help:
            shown = action.help.rsplit("[", 1)[1][:-1]
            value = defaults[name]
            if isinstance(value, bool):
                assert shown == ("on" if value else "off"), name
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                assert float(shown) == value, name
            elif value is not None:
                assert shown == str(value), name
            checked += 1
    assert checked >= 20


def test_sampler_skips_trained_batches_shards_ranks_and_keeps_groups_together():
    full = list(train.ResumableSampler(10, shuffle=True, seed=3))
    assert sorted(full) == list(range(10)) and full != list(range(10))
    s = train.ResumableSampler(10, shuffle=True, seed=3)
    s.skip = 4
    assert list(s) == full[4:] and len(s) == 6
    s.set_epoch(1)
    assert list(s) != full[4:]
    shards = [list(train.ResumableSampler(9, num_replicas=2, rank=r, seed=3)) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 5 and set(shards[0] + shards[1]) == set(range(9))
    groups = [[0, 1, 2], [3, 4], [5, 6, 7], [8, 9]]
    order = list(train.ResumableSampler(10, seed=3, groups=groups))
    starts = [order.index(g[0]) for g in groups]
    for g, at in zip(groups, starts):
        assert order[at:at + len(g)] == g


def test_train_step_runs_the_encoder_once_per_distinct_image():
    cfg = model_lib.ModelConfig(vocab_size=9, encoder="resnet18", pretrained=False, image_size=32,
                                encoded_size=2, embed_dim=8, attention_dim=8, decoder_dim=8, dropout=0.0, embed_dropout=0.0, feature_dropout=0.0)
    torch.manual_seed(0)
    model = model_lib.build_model(cfg).eval()
    images = torch.randn(3, 3, 32, 32)
    idx = torch.tensor([5, 7, 5, 9, 7])
    batch = images[[0, 1, 0, 2, 1]]  # (5, 3, 32, 32): captions of images 5, 7, 5, 9, 7
    captions = torch.randint(4, 9, (5, 6))
    lengths = torch.tensor([6, 5, 4, 6, 3])
    seen = []
    hook = model.encoder.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    logits, alphas = train.TrainStep(model)(batch, captions, lengths, idx)
    hook.remove()
    assert seen == [3]
    expected, _ = model(batch, captions, lengths)
    torch.testing.assert_close(logits, expected)


def test_validation_loss_runs_the_encoder_once_per_image_of_a_batch(dataset, tmp_path):
    # End to end (fine-tuning), the validation captions of one image share an encoder pass too.
    data_cfg, model_cfg, _ = configs(dataset, tmp_path)
    splits = data_utils.load_dataset(data_cfg)
    vocab = data_utils.build_vocabulary(splits, 1)
    model = model_lib.build_model(dataclasses.replace(model_cfg, vocab_size=len(vocab))).eval()
    val = data_utils.CaptionDataset(splits.val, vocab, transform=model_lib.image_transform(model.cfg, False))
    seen = []
    hook = model.encoder.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    with torch.no_grad():
        loss, acc = train._teacher_forced(data_utils.make_loader(val, 8), model, torch.device("cpu"), 1.0, None, False)
    hook.remove()
    assert seen == [4] and len(val) == 8 and np.isfinite(loss)  # 4 images x 2 captions, one batch


def test_rng_state_round_trips_through_a_checkpoint(tmp_path):
    train.seed_everything(5)
    state = ck.rng_state()
    ck.save_checkpoint(tmp_path / "r.pt", {"format": ck.FORMAT, "model_config": {}, "vocab": [],
                                            "model": {}, "rng": state})
    expected = (np.random.rand(), torch.rand(2), __import__("random").random())
    train.seed_everything(99)
    ck.set_rng_state(ck.load_checkpoint(tmp_path / "r.pt")["rng"])
    got = (np.random.rand(), torch.rand(2), __import__("random").random())
    assert got[0] == expected[0] and torch.equal(got[1], expected[1]) and got[2] == expected[2]


# ---------------------------------------------------------------- promises (issue 14)

def _scripted_validation(scores):
    """validate() returning these BLEU-4 and CIDEr-D scores epoch after epoch (the schedule's input)."""
    it = iter(scores)

    def fake(*args, **kwargs):
        b = next(it)
        return train.Validation(loss=1.0, acc=0.5, bleu=[b] * 4, samples=[], cider=b)
    return fake


def test_early_stopping_and_plateau_resume_exactly_and_the_bar_ends_where_the_run_did(
        dataset, feature_dir, tmp_path, monkeypatch):
    scores = [0.1, 0.2, 0.15, 0.18, 0.19, 0.3]  # best at 2, then 3 epochs without a better one
    kw = dict(features_dir=str(feature_dir), batch_size=8, patience=3, lr_patience=1, lr=1e-3, epochs=10)
    bars = []
    real_progress = train.progress

    def spy(*args, **kwargs):
        if kwargs.get("desc") != "epochs":
            return real_progress(*args, **kwargs)
        bars.append(real_progress(*args, **kwargs, disable=False, file=io.StringIO()))
        return bars[-1]

    monkeypatch.setattr(train, "progress", spy)
    monkeypatch.setattr(train, "validate", _scripted_validation(scores))
    assert train.run_training(*configs(dataset, tmp_path / "full", save_every=1, keep_last=0, **kw)) == 0
    full = json.loads((tmp_path / "full" / "weights" / "history.json").read_text())
    assert [h["epoch"] for h in full] == [1, 2, 3, 4, 5]  # stopped after 3 epochs without a better score
    # ReduceLROnPlateau(patience=1): the rate halves after the 2nd epoch without improvement.
    assert [h["lr"] for h in full] == [1e-3, 1e-3, 1e-3, 1e-3, 5e-4]
    assert (bars[0].n, bars[0].total) == (5, 5)
    best = ck.load_checkpoint(tmp_path / "full" / "weights" / "best.pt")
    assert best["epoch"] == 2 and best["best_score"] == max(h["bleu4"] for h in full)
    # ... and epoch 2's weights, not a later epoch's.
    assert_same_state(best["model"], weights_of(tmp_path / "full" / "weights" / "epoch_002.pt"))

    # Interrupted after epoch 3 (plateau and early-stopping counters at 1), then resumed.
    part = tmp_path / "part"
    monkeypatch.setattr(train, "validate", _scripted_validation(scores[:3]))
    assert train.run_training(*configs(dataset, part, **dict(kw, epochs=3))) == 0
    assert ck.load_checkpoint(part / "weights" / "last.pt")["early_stopping"]["bad_epochs"] == 1
    monkeypatch.setattr(train, "validate", _scripted_validation(scores[3:]))
    assert train.run_training(*configs(dataset, part, resume="auto", **kw)) == 0
    resumed = json.loads((part / "weights" / "history.json").read_text())
    assert [(h["epoch"], h["lr"]) for h in resumed] == [(h["epoch"], h["lr"]) for h in full]
    assert_same_state(weights_of(tmp_path / "full" / "weights" / "last.pt"), weights_of(part / "weights" / "last.pt"))


def test_a_new_run_refuses_to_replace_an_earlier_one_unless_overwrite(dataset, feature_dir, tmp_path,
                                                                      capsys):
    cfgs = configs(dataset, tmp_path, features_dir=str(feature_dir))
    assert train.run_training(*cfgs) == 0
    before = (tmp_path / "weights" / "last.pt").read_bytes()
    argv = ["--mode", "train", "--dataset_path", str(dataset), "--split_sizes", "16", "4",
            "--min_word_freq", "1", "--num_workers", "0", "--features_dir", str(feature_dir),
            "--embed_dim", "16", "--attention_dim", "16", "--decoder_dim", "16",
            "--weights_dir", str(tmp_path / "weights"), "--graphs_dir", str(tmp_path / "graphs"),
            "--wandb", "disabled", "--epochs", "1"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "holds an earlier training run" in err and "\n" not in err
    assert all(way in err for way in ("--resume auto", "--weights_dir NEW", "--overwrite"))
    assert (tmp_path / "weights" / "last.pt").read_bytes() == before
    assert cli.main(argv + ["--overwrite", "--seed", "1"]) == 0
    assert (tmp_path / "weights" / "last.pt").read_bytes() != before


def test_readme_scst_run_after_a_default_run_keeps_each_runs_graphs_with_it(dataset, feature_dir, tmp_path,
                                                                          monkeypatch, capsys):
    # The README's commands in order, default folders: the SCST run and both evaluations write their
    # graphs beside their own checkpoints instead of refusing each other's (graphs/loss.png).
    monkeypatch.chdir(tmp_path)
    common = ["--dataset_path", str(dataset), "--features_dir", str(feature_dir), "--split_sizes", "16", "4",
              "--min_word_freq", "1", "--num_workers", "0", "--embed_dim", "16", "--attention_dim", "16",
              "--decoder_dim", "16", "--wandb", "disabled", "--epochs", "1"]
    assert cli.main(["--mode", "train", *common]) == 0
    assert cli.main(["--mode", "train", *common, "--objective", "scst", "--init_from", "weights/best.pt",
                     "--weights_dir", "weights_scst"]) == 0, capsys.readouterr().err
    for run in ("weights", "weights_scst"):
        assert cli.main(["--mode", "eval", *common[:7], "--split", "val", "--no-java", "--checkpoint",
                         f"{run}/best.pt"]) == 0, capsys.readouterr().err
        assert {"loss.png", "eval_val_scores.png"} <= {p.name for p in (tmp_path / run / "graphs").iterdir()}
    assert not (tmp_path / "graphs").exists()


def test_a_nan_step_leaves_weights_and_optimizer_unchanged_and_clipping_caps_the_norm():
    torch.manual_seed(0)
    cfg_m = model_lib.ModelConfig(vocab_size=9, encoder="features", pretrained=False, feature_dim=8,
                                  encoded_size=2, embed_dim=8, attention_dim=8, decoder_dim=8, dropout=0.0, embed_dropout=0.0, feature_dropout=0.0)
    model = model_lib.build_model(cfg_m)
    cfg = train.TrainConfig(lr=1e-2, grad_clip=0.01, wandb="disabled")
    optimizer = train.make_optimizer(model, cfg_m, cfg)
    scaler = train.make_scaler(torch.device("cpu"), None)
    net = train.TrainStep(model)
    feats = torch.randn(2, 4, 8)
    captions = torch.tensor([[1, 4, 5, 2], [1, 6, 2, 0]])
    lengths = torch.tensor([4, 3])

    class Batch:
        inputs, image_idx = feats, torch.tensor([0, 1])

    Batch.captions, Batch.lengths = captions, lengths
    sums = train.DeviceSums(torch.device("cpu"))
    norms = []
    real_clip = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm):
        total = real_clip(params, max_norm)
        norms.append((total, torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(p.grad) for p in params if p.grad is not None]))))
        return total

    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.nn.utils, "clip_grad_norm_", spy)
        train.train_step(net, Batch, optimizer, scaler, torch.device("cpu"), cfg, alpha_c=1.0,
                         amp_dtype=None, sums=sums)
    assert norms[0][0] > 0.01 and norms[0][1] == pytest.approx(0.01, rel=1e-4)  # capped
    good = {k: v.clone() for k, v in model.state_dict().items()}
    assert any(not torch.equal(state[k], good[k]) for k in state)
    steps = [s["step"].item() for s in optimizer.state.values()]
    Batch.inputs = feats * float("nan")
    train.train_step(net, Batch, optimizer, scaler, torch.device("cpu"), cfg, alpha_c=1.0,
                     amp_dtype=None, sums=sums)
    assert_same_state(good, model.state_dict())
    assert [s["step"].item() for s in optimizer.state.values()] == steps
    totals = train.EpochTotals()
    assert sums.read(totals) == 1 and totals.skipped_nonfinite == 1 and totals.captions == 2


def test_skipped_images_are_in_the_epoch_line():
    row = {"epoch": 3, "loss": 1.0, "val_loss": 1.0, "acc": 0.5, "val_acc": 0.5, "lr": 1e-3,
           "seconds": 2.0, "captions_per_s": 10.0, "skipped_images": 2, "skipped_nonfinite": 0,
           **{f"bleu{n}": 0.1 for n in range(1, 5)}}
    assert run_logging.epoch_line(row, 9).endswith("skipped 2 corrupt image(s)")
    assert "skipped" not in run_logging.epoch_line(dict(row, skipped_images=0), 9)


def test_wandb_that_hangs_at_start_up_is_dropped_after_its_timeout(monkeypatch, caplog):
    import threading

    import wandb

    release = threading.Event()
    monkeypatch.setattr(wandb, "init", lambda **kwargs: release.wait(60))
    monkeypatch.setattr(run_logging, "wandb_mode", lambda mode: "online")  # auto would pick online
    start = time.monotonic()
    try:
        assert run_logging.start_wandb("auto", {}, timeout=0.3) is None
    finally:
        release.set()
    assert time.monotonic() - start < 5
    assert "did not start within 0.3 s" in caplog.text


def test_threads_flag_sets_the_thread_count(dataset, feature_dir, tmp_path):
    before = torch.get_num_threads()
    try:
        assert train.run_training(*configs(dataset, tmp_path, features_dir=str(feature_dir),
                                           threads=2)) == 0
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------- run_files

def test_every_file_of_an_earlier_run_is_protected_and_the_message_names_the_way_out(tmp_path):
    """history.json alone, a periodic checkpoint alone, graphs alone: each is an earlier run."""
    cfg = train.TrainConfig(weights_dir=str(tmp_path / "w"), graphs_dir=str(tmp_path / "g"), wandb="disabled")
    run_files.protect_earlier_run(cfg, Dist())  # nothing there yet: a new run may start
    for made in ("w/history.json", "w/epoch_004.pt", "g/loss.png"):
        (tmp_path / made).parent.mkdir(exist_ok=True)
        (tmp_path / made).write_bytes(b"earlier")
        with pytest.raises(ValueError, match="holds an earlier training run") as info:
            run_files.protect_earlier_run(cfg, Dist())
        assert str(tmp_path / made) in str(info.value)
        assert ("--graphs_dir NEW" in str(info.value)) == made.startswith("g/")
        (tmp_path / made).unlink()
    # --overwrite removes the run's files, and only those.
    for made in ("w/last.pt", "w/best.pt", "w/notes.txt", "g/bleu.png"):
        (tmp_path / made).write_bytes(b"earlier")
    run_files.protect_earlier_run(dataclasses.replace(cfg, overwrite=True), Dist())
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["notes.txt"]


def test_resume_auto_without_last_pt_starts_new_and_periodic_pruning_keeps_the_newest(tmp_path):
    assert run_files.resolve_resume(None, tmp_path) is None
    assert run_files.resolve_resume("auto", tmp_path) is None
    (tmp_path / "last.pt").write_bytes(b"x")
    assert run_files.resolve_resume("auto", tmp_path) == tmp_path / "last.pt"
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        run_files.resolve_resume(str(tmp_path / "nope.pt"), tmp_path)
    for epoch in (2, 4, 6, 8):
        (tmp_path / f"epoch_{epoch:03d}.pt").write_bytes(b"x")
    run_files.prune_periodic(tmp_path, 0)
    assert len(list(tmp_path.glob("epoch_*.pt"))) == 4  # 0 keeps all
    run_files.prune_periodic(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.glob("epoch_*.pt")) == ["epoch_006.pt", "epoch_008.pt"]
