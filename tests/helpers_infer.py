"""Fixtures shared by tests/test_captioning.py, tests/test_evaluation.py and others.

A tiny checkpoint (resnet18 without ImageNet weights, 64x64 inputs, 2x2 attention grid,
16-32 wide decoder) trained on coloured synthetic photos until its caption depends on the
photo's colour, and a tiny data set in the Kaggle layout made of the same kind of photos.
Checkpoints are built once per test session (cached here: every test file shares them), by the
code that writes real ones: `checkpoint.training_checkpoint` for the image model, a tiny
`train.run_training` on a features folder for the features model.
"""
from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoint
import data_utils
import features
import model
import train
from config import DataConfig, ModelConfig, TrainConfig
from text import Vocabulary

SPECIALS = ["<pad>", "<sos>", "<eos>", "<unk>"]
# Two kinds of photo and the caption the tiny model is trained to give each.
KINDS = {
    "red": ((220, 30, 30), "a red square on a white wall"),
    "blue": ((30, 40, 210), "a blue ball in the dark sky"),
}
WORDS = sorted({w for _, cap in KINDS.values() for w in cap.split()})
VOCAB = SPECIALS + WORDS

_CACHE: dict[str, Path] = {}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Run these tiny models on one thread: with 2 cores shared by parallel jobs, torch's
    spinning worker threads made them 5-10x slower (measured: 3 images 0.5 s vs 2.5-6.8 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def photo(kind: str, seed: int, size: int = 80) -> Image.Image:
    """A noisy photo mostly of the kind's colour."""
    rng = np.random.default_rng(seed)
    colour = np.array(KINDS[kind][0], dtype=np.float32)
    arr = colour + rng.normal(0, 20, size=(size, size, 3))
    arr[: size // 4] = 235  # a pale band so the photo is not flat
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def make_photo(path: Path, kind: str, seed: int, size: int = 80) -> Path:
    """Save `photo(kind, seed)` at `path` (format from the suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    photo(kind, seed, size).save(path)
    return path


def make_kaggle_set(root: Path, n: int = 10) -> Path:
    """A Kaggle-layout data set of coloured photos, two references each (one with punctuation)."""
    images = root / "Images"
    rows = []
    for i in range(n):
        kind = "red" if i % 2 == 0 else "blue"
        name = f"img{i:02d}.jpg"
        make_photo(images / name, kind, 100 + i)
        cap = KINDS[kind][1]
        rows += [(name, cap.capitalize() + " ."), (name, cap.replace(" a ", " one ", 1))]
    with open(root / "captions.txt", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption"])
        w.writerows(rows)
    return root


def tiny_model_config(encoder: str = "resnet18", feature_dim: int = 512) -> ModelConfig:
    return ModelConfig(vocab_size=len(VOCAB), encoder=encoder, pretrained=False,
                             encoded_size=2, image_size=64, feature_dim=feature_dim, encoder_proj_dim=16,
                             embed_dim=16, attention_dim=16, decoder_dim=32, num_layers=2, dropout=0.0,
                             embed_dropout=0.0, feature_dropout=0.0, alpha_c=1.0)


def _encode(caption: str) -> list[int]:
    return [1] + [VOCAB.index(w) for w in caption.split()] + [2]


def train_tiny(cfg, steps: int = 80, seed: int = 0, per_kind: int = 2):
    """Build the tiny model and train it on `per_kind` photos of each kind (CPU, about 2 s).

    Trained until its words depend on the photo (red photos get the red caption, blue ones the
    blue caption), so batched against one-by-one decoding compares captions that differ.
    """
    torch.manual_seed(seed)
    m = model.build_model(cfg)
    tf = model.image_transform(cfg, train=False) if cfg.encoder != "features" else None
    images, caps = [], []
    for i, kind in enumerate(KINDS):
        for j in range(per_kind):
            images.append(tf(photo(kind, seed + 100 * i + j)) if tf else torch.zeros(3, 64, 64))
            caps.append(_encode(KINDS[kind][1]))
    x = torch.stack(images)  # (B, 3, 64, 64)
    if cfg.encoder == "features":
        x = torch.randn(len(images), 4, cfg.feature_dim)  # (B, P, C)
    T = max(len(c) for c in caps)
    captions = torch.tensor([c + [0] * (T - len(c)) for c in caps])  # (B, T)
    lengths = torch.tensor([len(c) for c in caps])  # (B,)
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    m.train()
    for _ in range(steps):
        logits, alphas = m(x, captions, lengths)
        loss, _ = model.caption_loss(logits, captions, lengths, alphas, cfg.alpha_c)
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    return m


def checkpoint_state(m, cfg) -> dict:
    """A checkpoint of the tiny model, made by the builder training saves with
    (checkpoint.training_checkpoint), so this fixture cannot drift from what training writes; the
    model config resolved (encoders.resolve), as training stores it."""
    train_cfg = TrainConfig(wandb="disabled")
    optimizer = train.make_optimizer(m, cfg, train_cfg)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max")
    return checkpoint.training_checkpoint(
        # trained on photos (not the demo set): recorded as a photo data set's folder
        m, Vocabulary(VOCAB), m.cfg, train_cfg=train_cfg, data_cfg=DataConfig(dataset_path="coloured-photos"),
        epoch=3, best_score=0.0,
        history=[], optimizer=optimizer, scheduler=scheduler, scaler=train.make_scaler(torch.device("cpu"), None),
        early_stopping={"best": 0.0, "bad_epochs": 0}, features=None)


def tiny_checkpoint(base: Path) -> Path:
    """Path of the shared tiny image checkpoint (built on first use under `base`)."""
    if "image" not in _CACHE:
        cfg = tiny_model_config()
        path = base / "tiny" / "best.pt"
        checkpoint.save_checkpoint(path, checkpoint_state(train_tiny(cfg), cfg))
        _CACHE["image"] = path
    return _CACHE["image"]


def weak_checkpoint(base: Path) -> Path:
    """A second tiny image checkpoint, trained for 3 steps only (its captions are worse): for --compare."""
    if "weak" not in _CACHE:
        cfg = tiny_model_config()
        path = base / "tiny_weak" / "best.pt"
        checkpoint.save_checkpoint(path, checkpoint_state(train_tiny(cfg, steps=3, seed=1), cfg))
        _CACHE["weak"] = path
    return _CACHE["weak"]


def write_features_for(root: Path, data_cfg: DataConfig, out: Path, channels: int = 8) -> Path:
    """A features folder (4 positions x `channels`, seeded noise) for every image of a data set."""
    splits = data_utils.load_dataset(data_cfg)
    names = [r.name for r in splits.train + splits.val + splits.test]
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((len(names), 4, channels)).astype(np.float32)  # (N, P, C)
    features.write_features(out, names, [feats], positions=4, channels=channels, meta={"encoder": "test"})
    return out


def features_run(base: Path) -> tuple[Path, Path, Path]:
    """(checkpoint, data set, features folder) of a tiny training run on a features folder.

    The checkpoint is written by train.run_training itself (one epoch, CPU, a few seconds), so what
    it records about its features is what real training records.
    """
    if "features" not in _CACHE:
        root = make_kaggle_set(base / "features_set")
        data_cfg = DataConfig(dataset_path=str(root), split_sizes=(4, 2), min_word_freq=1, num_workers=0)
        feats = write_features_for(root, data_cfg, base / "features_set_features")
        model_cfg = ModelConfig(vocab_size=5, embed_dim=16, attention_dim=16, decoder_dim=16, encoded_size=2,
                                dropout=0.0)
        train_cfg = TrainConfig(features_dir=str(feats), epochs=1, batch_size=4, wandb="disabled",
                                weights_dir=str(base / "tiny_features"), graphs_dir=str(base / "tiny_features_graphs"))
        assert train.run_training(data_cfg, model_cfg, train_cfg) == 0
        _CACHE["features"] = (base / "tiny_features" / "best.pt", root, feats)
    return _CACHE["features"]


def features_checkpoint(base: Path) -> Path:
    """A tiny checkpoint trained on external features (no image encoder), by train.run_training."""
    return features_run(base)[0]
