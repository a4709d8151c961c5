"""Self-critical training (scst.py, --objective scst): the gradient's sign, a tiny run that raises
validation CIDEr-D over its cross-entropy start, exact resume, and the CLI's one-line errors.
Everything runs on features written here (P=4, C=8: no CNN), on the CPU."""
from __future__ import annotations

import copy
import dataclasses
import re
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoint as ck
import data_utils
import features
import main as cli
import model as model_lib
import scst
import run_logging
import train
from config import TrainConfig
from text import Vocabulary
from helpers_infer import one_torch_thread  # noqa: F401  (autouse: one thread, tiny models)

COLOURS = ("red", "green", "blue")
# Five captions per colour: the colour and the thing vary, so CIDEr-D rewards naming both.
CAPTIONS = ("a {c} square", "a {c} square on a wall", "the {c} box", "a small {c} square",
            "a {c} square on the wall")
TIMINGS = ("seconds", "captions_per_s")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    """(data set in the Kaggle layout, features folder): 36 photos, features that tell the colour."""
    root = tmp_path_factory.mktemp("scst")
    (root / "set" / "Images").mkdir(parents=True)
    rows, feats = ["image,caption"], []
    rng = np.random.default_rng(0)
    for i in range(36):
        name = f"im{i:03d}.jpg"
        Image.new("RGB", (8, 8)).save(root / "set" / "Images" / name)
        rows += [f"{name},{c.format(c=COLOURS[i % 3])}" for c in CAPTIONS]
        f = rng.normal(0, 0.3, (4, 8)).astype(np.float32)
        f[:, i % 3] += 2.0
        feats.append(f)
    (root / "set" / "captions.txt").write_text("\n".join(rows) + "\n")
    names = [f"im{i:03d}.jpg" for i in range(36)]
    features.write_features(root / "feats", names, [np.stack(feats)], 4, 8)
    return root / "set", root / "feats"


def configs(data, out: Path, **train_kw):
    dataset, feats = data
    data_cfg = data_utils.DataConfig(dataset_path=str(dataset), split_sizes=(24, 6), min_word_freq=1,
                                     num_workers=0)
    model_cfg = model_lib.ModelConfig(vocab_size=5, encoder="resnet18", pretrained=False, embed_dim=16,
                                      attention_dim=16, decoder_dim=16, dropout=0.0, embed_dropout=0.0, feature_dropout=0.0)
    kw = dict(batch_size=10, epochs=1, weights_dir=str(out / "weights"), graphs_dir=str(out / "graphs"),
              features_dir=str(feats), wandb="disabled", lr=3e-3, patience=0)
    kw.update(train_kw)
    return data_cfg, model_cfg, TrainConfig(**kw)


@pytest.fixture(scope="module")
def xe_checkpoint(data, tmp_path_factory) -> Path:
    """A cross-entropy run stopped early (2 epochs): its captions still have room for CIDEr-D."""
    out = tmp_path_factory.mktemp("xe")
    assert train.run_training(*configs(data, out, epochs=2)) == 0
    return out / "weights" / "best.pt"


def _sequence_log_prob(model, feats: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor,
                       vocab: Vocabulary) -> torch.Tensor:
    """Summed log-probability of sampled tokens (N, L) under teacher forcing, <sos>/<unk> banned
    as sample_decode bans them."""
    sos = tokens.new_full((tokens.size(0), 1), vocab.sos_id)
    captions = torch.cat([sos, tokens], dim=1)  # (N, L+1)
    logits, _ = model.decoder(feats, captions, lengths + 1)  # (N, L, V)
    logits[..., vocab.sos_id] = -float("inf")
    logits[..., vocab.unk_id] = -float("inf")
    lp = torch.log_softmax(logits, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # (N, L)
    mask = torch.arange(tokens.size(1))[None, :] < lengths[:, None]  # (N, L)
    return (lp * mask).sum(dim=1)


class _FixedRewards:
    """A scorer that gives every sample `sample` and every greedy caption `greedy`."""

    def __init__(self, sample: float, greedy: float):
        self.sample, self.greedy = sample, greedy

    def score(self, candidates, references, ref_index=None):
        return np.full(len(candidates), self.sample if ref_index is not None else self.greedy)


@pytest.mark.parametrize("sample_reward, direction", [(1.0, 1), (0.0, -1)])
def test_a_sample_above_its_baseline_gets_its_log_probability_raised(sample_reward, direction):
    torch.manual_seed(0)
    vocab = Vocabulary.from_list(["<pad>", "<sos>", "<eos>", "<unk>", "a", "red", "square", "wall"])
    cfg_m = model_lib.ModelConfig(vocab_size=len(vocab), encoder="features", feature_dim=8, pretrained=False,
                                  embed_dim=16, attention_dim=16, decoder_dim=16, dropout=0.0, embed_dropout=0.0, feature_dropout=0.0)
    model = model_lib.build_model(cfg_m)
    cfg = TrainConfig(objective="scst", scst_samples=1, scst_baseline="greedy", grad_clip=0.0)
    objective = scst.ScstObjective([[["a", "red", "square"]]] * 3, vocab, cfg, max_len=6)
    objective.scorer = _FixedRewards(sample_reward, greedy=0.5)  # advantage +0.5 or -0.5
    net = scst.SampleStep(model)
    drawn = {}

    def spy(*args, **kwargs):
        drawn["out"] = scst.SampleStep.forward(net, *args, **kwargs)
        return drawn["out"]
    net.forward = spy
    feats = torch.randn(3, 4, 8)
    batch = data_utils.ImageBatch(images=None, features=feats, image_idx=torch.arange(3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    start = copy.deepcopy(model)
    train.train_step(net, batch, optimizer, train.make_scaler(torch.device("cpu"), None),
                     torch.device("cpu"), cfg, amp_dtype=None, sums=train.DeviceSums(torch.device("cpu")),
                     objective=objective)
    tokens, log_probs, lengths = (t.detach() for t in drawn["out"])
    model.train()
    with torch.no_grad():
        after = _sequence_log_prob(model, feats, tokens, lengths, vocab)
        before = _sequence_log_prob(start, feats, tokens, lengths, vocab)
    # sampling and teacher forcing run the one decoder step: the same log-probabilities
    torch.testing.assert_close(before, log_probs.sum(dim=1), atol=1e-4, rtol=1e-4)
    assert torch.all(torch.sign(after - before) == direction), (before, after)


def test_leave_one_out_mean_is_the_other_samples_mean():
    rewards = np.array([1.0, 2.0, 3.0, 10.0, 20.0, 30.0])
    np.testing.assert_allclose(scst.leave_one_out_mean(rewards, 3), [2.5, 2.0, 1.5, 25.0, 20.0, 15.0])


def _val_cider(history: list[dict]) -> list[float]:
    return [round(h["cider"], 4) for h in history]


def test_scst_raises_the_validation_cider_of_a_cross_entropy_checkpoint(data, xe_checkpoint, tmp_path):
    start = ck.load_checkpoint(xe_checkpoint)
    start_cider = max(h["cider"] for h in start["history"])
    data_cfg, model_cfg, cfg = configs(data, tmp_path, objective="scst", init_from=str(xe_checkpoint),
                                       epochs=4, lr=1e-3)
    assert train.run_training(data_cfg, model_cfg, cfg) == 0
    history = ck.load_checkpoint(tmp_path / "weights" / "last.pt")["history"]
    assert {"reward", "baseline", "sample_len", "cider"} <= set(history[0])
    assert max(h["cider"] for h in history) > start_cider + 0.05, (start_cider, _val_cider(history))
    best = ck.load_checkpoint(tmp_path / "weights" / "best.pt")
    assert best["best_score"] == pytest.approx(max(h["cider"] for h in history))
    assert (tmp_path / "graphs" / "cider.png").exists() and (tmp_path / "graphs" / "sample_length.png").exists()


def _rows(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in h.items() if k not in TIMINGS} for h in history]


def test_scst_resumes_after_sigint_mid_epoch_exactly(data, xe_checkpoint, tmp_path, monkeypatch):
    """Interrupted after 3 SCST steps of epoch 2, then `--resume auto`: the weights and history
    equal those of the uninterrupted run (the samples are drawn from the restored RNG)."""
    kw = dict(objective="scst", init_from=str(xe_checkpoint), epochs=2, scst_baseline="greedy",
              scst_samples=2, batch_size=4)
    assert train.run_training(*configs(data, tmp_path / "whole", **kw)) == 0
    calls = {"n": 0}
    real = scst.ScstObjective.__call__

    def interrupting(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 12 + 3:  # 24 images, 2 a step: epoch 2's third step
            signal.raise_signal(signal.SIGINT)
        return real(self, *args, **kwargs)
    monkeypatch.setattr(scst.ScstObjective, "__call__", interrupting)
    parts = configs(data, tmp_path / "cut", **kw)
    assert train.run_training(*parts) == 130
    monkeypatch.setattr(scst.ScstObjective, "__call__", real)
    last = tmp_path / "cut" / "weights" / "last.pt"
    assert ck.load_checkpoint(last)["step_in_epoch"] == 3
    data_cfg, model_cfg, cfg = parts
    assert train.run_training(data_cfg, model_cfg, dataclasses.replace(cfg, resume="auto")) == 0
    whole = ck.load_checkpoint(tmp_path / "whole" / "weights" / "last.pt")
    cut = ck.load_checkpoint(last)
    for key, value in whole["model"].items():
        torch.testing.assert_close(cut["model"][key], value, rtol=0, atol=0, msg=key)
    # the same rows; a sum split at the interruption may differ in its last bit
    for got, expected in zip(_rows(cut["history"]), _rows(whole["history"]), strict=True):
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            assert got[key] == (pytest.approx(value, rel=1e-12) if isinstance(value, float) else value), key


def test_init_from_refuses_a_file_the_run_writes_and_an_scst_resume_of_an_xe_run(data, xe_checkpoint, tmp_path):
    weights = xe_checkpoint.parent
    with pytest.raises(ValueError, match="is a file this run would write"):
        train.run_training(*configs(data, weights.parent, objective="scst", init_from=str(xe_checkpoint),
                                    overwrite=True))
    assert xe_checkpoint.exists()
    with pytest.raises(ValueError, match="trains with --objective xe, not scst"):
        train.run_training(*configs(data, weights.parent, objective="scst", init_from=str(tmp_path / "x.pt"),
                                    resume=str(xe_checkpoint)))
    with pytest.raises(ValueError, match="--objective scst fine-tunes a trained captioner"):
        train.run_training(*configs(data, tmp_path, objective="scst"))


def _main_args(data, out: Path, *extra: str) -> list[str]:
    dataset, feats = data
    return ["--mode", "train", "--dataset_path", str(dataset), "--split_sizes", "24", "6",
            "--min_word_freq", "1", "--num_workers", "0", "--features_dir", str(feats),
            "--embed_dim", "16", "--attention_dim", "16", "--decoder_dim", "16", "--dropout", "0",
            "--epochs", "1", "--weights_dir", str(out / "weights"), "--graphs_dir", str(out / "graphs"),
            "--wandb", "disabled", *extra]


@pytest.mark.parametrize("extra, message", [
    (("--objective", "rl"), r"--objective: invalid choice: 'rl'"),
    (("--objective", "scst", "--scst_baseline", "mean", "--scst_samples", "1"), r"--scst_samples must be"),
    (("--objective", "scst", "--init_from", "{xe}", "--decoder_dim", "32"),
     r"--init_from \S+ does not fit the requested model \(decoder_dim: checkpoint 16 vs requested 32"),
    (("--objective", "scst", "--init_from", "{missing}"), r"missing\.pt"),
])
def test_bad_scst_flags_are_one_line_errors(data, xe_checkpoint, tmp_path, capsys, extra, message):
    extra = [e.format(xe=xe_checkpoint, missing=tmp_path / "missing.pt") for e in extra]
    assert cli.main(_main_args(data, tmp_path, *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(message, err[0]), err


def test_the_scst_epoch_line_shows_reward_and_baseline_and_no_teacher_forced_accuracy():
    row = {"epoch": 2, "loss": -0.5, "val_loss": 4.1, "acc": 0.0, "val_acc": 0.34, "lr": 5e-5, "seconds": 10.0,
           "captions_per_s": 70.0, "cider": 0.378, "reward": 0.205, "baseline": 0.2, "sample_len": 9.7,
           **{f"bleu{n}": 0.1 * n for n in range(1, 5)}}
    line = run_logging.epoch_line(row, 3)
    assert " acc " not in line and "val_acc 0.340" in line
    assert "CIDEr-D 0.378 reward 0.205 baseline 0.200 sample_len 9.7" in line
    assert " acc 0.000 " in run_logging.epoch_line({k: v for k, v in row.items()
                                                     if k not in ("reward", "baseline", "sample_len")}, 3)
