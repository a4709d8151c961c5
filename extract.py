"""Encoder features computed once per image: `--mode extract` and training's feature cache.

With a frozen encoder the CNN's output for an image never changes, so training runs it once per
image and reads the features back, memory-mapped float16 (the public format of
`data_utils.FeatureStore`), instead of running the CNN at every step. A cache folder's name is a
key of the encoder, its weights, its preprocessing, the pooling and the image list, so a
random-init or fine-tuned encoder, or another resize/crop/normalisation, never reuses another's
features. The weights enter as a hash of the tensors themselves, not of the file they came from:
the features depend on nothing else, and a downloaded, converted or seeded encoder is keyed alike.

Shape letters: b images of a batch, P encoder positions, C encoder channels.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from checkpoint import to_plain
from config import ModelConfig, TrainConfig
import data_utils
import features
from devices import Dist, autocast, resolve_amp, resolve_device, set_threads, to_device, unwrap
import fileio
import model as model_lib
from run_logging import progress

logger = logging.getLogger(__name__)


def _encoder_digest(encoder: nn.Module) -> str:
    """Hash of the encoder's weights: random-init and fine-tuned encoders never share a cache."""
    h = hashlib.sha256()
    for name, t in sorted(encoder.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def features_key(model_cfg: ModelConfig, encoder: nn.Module, names: list[str]) -> tuple[str, dict]:
    """Cache key: encoder, its weights, its preprocessing, pooling and the image list."""
    meta = {"encoder": model_cfg.encoder, "weights": _encoder_digest(encoder),
            "preprocess": to_plain(model_lib.resolve(model_cfg).preprocess),
            "encoded_size": model_cfg.encoded_size,
            "images": hashlib.sha256("\n".join(names).encode()).hexdigest()[:16],
            "num_images": len(names)}
    key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]
    return f"{model_cfg.encoder.replace('/', '-')}-{key}", meta


@torch.no_grad()
def extract_features(model: nn.Module, records: list, model_cfg: ModelConfig, out_dir: Path,
                     device: torch.device, *, batch_size: int, num_workers: int,
                     amp_dtype: torch.dtype | None = None, meta: dict | None = None,
                     show_progress: bool = True) -> list[str]:
    """Run the encoder once per image and write features.npy (N, P, C) float16 + names.json.

    Batches stream into a memory-mapped file, so memory does not grow with the data set.
    Returns the names of images that could not be read: their rows are zeros, and meta.json
    lists them under "unreadable" so that training leaves them out.
    """
    model = unwrap(model)
    model.eval()
    model_cfg = model_lib.resolve(model_cfg)  # channels and preprocessing from the encoder spec
    transform = model_lib.image_transform(model_cfg, train=False)
    # Seeded: extracting (a cache miss) must leave the global RNG as a cache hit does.
    loader = data_utils.make_loader(data_utils.ImageDataset(records, transform=transform), batch_size,
                                    shuffle=False, num_workers=num_workers,
                                    collate=data_utils.collate_images, seed=0)
    positions, channels = model_cfg.num_positions, model_cfg.feature_dim
    unreadable: list[str] = []

    def encoded():
        done = 0
        for batch in progress(loader, desc="extract features", show=show_progress):
            n = len(batch) + batch.n_skipped
            rows = np.zeros((n, positions, channels), dtype=np.float16)  # (b, P, C)
            if len(batch):
                with autocast(device, amp_dtype):
                    feats = model.encode(to_device(batch.images, device))  # (b', P, C)
                rows[batch.image_idx.numpy() - done] = feats.float().cpu().numpy()
            kept = set(batch.image_idx.tolist())
            unreadable.extend(records[i].name for i in range(done, done + n) if i not in kept)
            done += n
            yield rows

    meta = dict(meta or {})
    features.write_features(out_dir, [r.name for r in records], encoded(), positions, channels,
                              meta)
    if unreadable:
        logger.warning("%d image(s) could not be read; they are left out of training: %s",
                       len(unreadable), ", ".join(unreadable[:5]))
        meta["unreadable"] = unreadable
        fileio.write_json(out_dir / "meta.json", meta)
    return unreadable


def cached_features(model: nn.Module, records: list, model_cfg: ModelConfig, cfg: TrainConfig,
                    device: torch.device, amp_dtype, d: Dist, num_workers: int = 0):
    """(FeatureStore, info) of the frozen encoder's cache, extracted first when missing (rank 0)."""
    names = [r.name for r in records]
    key, meta = features_key(model_cfg, unwrap(model).encoder, names)
    out_dir = Path(cfg.features_root) / key
    if d.is_main and not (out_dir / "features.npy").exists():
        logger.info("frozen encoder: caching its features once per image in %s", out_dir)
        extract_features(model, records, model_cfg, out_dir, device, batch_size=cfg.batch_size,
                         num_workers=num_workers, amp_dtype=amp_dtype, meta=meta,
                         show_progress=d.is_main)
    elif d.is_main:
        logger.info("frozen encoder: reusing cached features in %s", out_dir)
    d.barrier()
    return data_utils.FeatureStore.open(out_dir), {"dir": str(out_dir), "key": key, **meta}


def run_extract(data_cfg, model_cfg: ModelConfig, train_cfg: TrainConfig, out_dir: str | None = None) -> int:
    """`--mode extract`: write the frozen encoder's features of every image of the data set to
    `out_dir` (default: --features_dir, else the cache folder) and print a JSON summary."""
    set_threads(train_cfg.threads)
    device = resolve_device(train_cfg.device)
    amp_dtype = resolve_amp(train_cfg.amp, device)
    if model_cfg.encoder == "features":
        raise ValueError("--mode extract needs a CNN encoder, not --encoder features")
    splits = data_utils.load_dataset(data_cfg)
    records = splits.train + splits.val + splits.test
    if not records:
        raise ValueError("the data set has no images to extract features from")
    torch.manual_seed(train_cfg.seed)  # the encoder's init, as training builds it
    model = model_lib.build_model(dataclasses.replace(model_cfg, fine_tune_encoder=False)).to(device)
    key, meta = features_key(model_cfg, model.encoder, [r.name for r in records])
    explicit = out_dir or train_cfg.features_dir
    # Default: the cache folder training looks in (same key), so training reuses this extraction.
    target = Path(explicit or Path(train_cfg.features_root) / key)
    if (target / "features.npy").exists():
        if explicit:
            raise ValueError(f"{target} already holds features.npy; choose another --features_dir "
                             f"or delete it")
        logger.info("features already extracted in %s", target)
    else:
        extract_features(model, records, model_cfg, target, device,
                         batch_size=train_cfg.batch_size, num_workers=data_cfg.num_workers,
                         amp_dtype=amp_dtype, meta=dict(meta, model_config=to_plain(model.cfg)))
    store = data_utils.FeatureStore.open(target)
    print(json.dumps({"features_dir": str(target), "images": len(store.names),
                      "positions": store.num_positions, "channels": store.channels,
                      "key": key}, indent=2))
    return 0
