"""Checkpoints: atomic save, safe load, and rebuilding the model and vocabulary from one.

A checkpoint is a dict of state dicts and plain data (see ARCHITECTURE.md), loaded with
`torch.load(..., weights_only=True)` so that opening a file from elsewhere cannot run code.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

FORMAT = "captioner-v1"
# Keys every checkpoint has; the training-only ones (optimizer, rng, ...) may be absent from a
# checkpoint trimmed for release, which can still caption and be evaluated.
REQUIRED_KEYS = ("format", "model_config", "vocab", "model")

# Model config fields that only decide how weights are initialised; the saved state dict overrides
# them, so a checkpoint trained from ImageNet weights resumes fine without those weights on disk.
INIT_ONLY_FIELDS = ("pretrained", "encoder_weights")


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Write `state` to `path` atomically.

    The bytes go to a temporary file in the same folder (same file system, so the rename is
    atomic), are flushed and fsynced, and only then replace `path`. A crash or `kill -9` at any
    moment leaves either the old file or the new one, never a half-written `path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        # Also on KeyboardInterrupt: never leave temp files behind.
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    """Persist the rename itself (the directory entry); a no-op where directories cannot be opened."""
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


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """Load a checkpoint safely (`weights_only=True`).

    Raises FileNotFoundError when `path` does not exist, ValueError with a one-line reason naming
    the path when it is a folder, truncated, corrupt, not a checkpoint, or of another format.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.is_dir():
        raise ValueError(f"checkpoint {path} is a folder, expected a .pt file")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, UnpicklingError, EOFError, ... by case
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"checkpoint {path} cannot be read (truncated, corrupt or not a "
                         f"checkpoint): {reason[:200]}") from None
    if not isinstance(ckpt, dict):
        raise ValueError(f"checkpoint {path} holds a {type(ckpt).__name__}, expected a dict "
                         f"with format {FORMAT!r}")
    if ckpt.get("format") != FORMAT:
        raise ValueError(f"checkpoint {path} has format {ckpt.get('format')!r}, expected {FORMAT!r}")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise ValueError(f"checkpoint {path} lacks {', '.join(missing)}")
    return ckpt


def model_config_from_dict(values: dict):
    """Rebuild a ModelConfig from its saved dict; fields this version does not know are an error."""
    from model import ModelConfig

    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"checkpoint model config has fields this version does not know: "
                         f"{', '.join(unknown)}")
    # JSON-like round trips turn tuples into lists; the config's own fields are scalars today,
    # but keep tuples tuples so frozen dataclasses stay hashable.
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return ModelConfig(**values)


def model_from_checkpoint(ckpt: dict):
    """Rebuild (CaptionModel, Vocabulary, ModelConfig) from a loaded checkpoint, in eval mode.

    The encoder is built without downloading ImageNet weights: the saved state dict replaces them.
    """
    from data_utils import Vocabulary
    from model import build_model

    cfg = model_config_from_dict(ckpt["model_config"])
    vocab = Vocabulary.from_list(list(ckpt["vocab"]))
    if len(vocab) != cfg.vocab_size:
        raise ValueError(f"checkpoint vocabulary has {len(vocab)} words but its model config "
                         f"says vocab_size={cfg.vocab_size}")
    build_cfg = dataclasses.replace(cfg, pretrained=False, encoder_weights=None)
    model = build_model(build_cfg)
    state = strip_module_prefix(ckpt["model"])
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise ValueError(f"checkpoint weights do not fit its model config: "
                         f"{' '.join(s.strip() for s in first[:3])[:300]}") from None
    model.eval()
    return model, vocab, cfg


def strip_module_prefix(state: dict) -> dict:
    """Drop a DataParallel/DDP `module.` prefix (and torch.compile's `_orig_mod.`) from the keys."""
    out = {}
    for key, value in state.items():
        stripped = True
        while stripped:
            stripped = False
            for prefix in ("module.", "_orig_mod."):
                if key.startswith(prefix):
                    key, stripped = key[len(prefix):], True
        out[key] = value
    return out


def config_differences(saved: dict, requested: Any, ignore: tuple[str, ...] = ()) -> dict[str, tuple]:
    """Fields whose values differ between a saved config dict and a requested config.

    `requested` is a dataclass instance or a dict. Returns {field: (saved, requested)}; a field
    present on one side only counts as differing (value None on the missing side).
    """
    if dataclasses.is_dataclass(requested):
        requested = dataclasses.asdict(requested)
    out = {}
    for name in sorted(set(saved) | set(requested)):
        if name in ignore:
            continue
        old, new = saved.get(name), requested.get(name)
        if isinstance(old, list):
            old = tuple(old)
        if isinstance(new, list):
            new = tuple(new)
        if old != new:
            out[name] = (old, new)
    return out


def check_model_config(ckpt: dict, requested: Any, path: str | os.PathLike = "checkpoint",
                       ignore: tuple[str, ...] = INIT_ONLY_FIELDS) -> None:
    """Raise ValueError naming every model-config field where `ckpt` and `requested` differ."""
    diffs = config_differences(ckpt["model_config"], requested, ignore=ignore)
    if diffs:
        listed = "; ".join(f"{k}: checkpoint {old!r} vs requested {new!r}"
                           for k, (old, new) in diffs.items())
        raise ValueError(f"{path} does not match the requested model ({listed}); pass the same "
                         f"model flags, or start a new run without --resume")
