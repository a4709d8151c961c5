"""Checkpoints: what one holds, atomic save, safe load, and rebuilding the model from one.

A checkpoint is a dict of state dicts and plain data (see ARCHITECTURE.md), loaded with
`torch.load(..., weights_only=True)` so that opening a file from elsewhere cannot run code.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

import encoders
import fileio
import hub
import model as model_lib
from config import INIT_FIELDS, DecodeConfig, ModelConfig
from text import Vocabulary

logger = logging.getLogger(__name__)

FORMAT = "captioner-v1"
# Keys every checkpoint has; the training-only ones (optimizer, rng, ...) may be absent from a
# checkpoint trimmed for release, which can still caption and be evaluated.
REQUIRED_KEYS = ("format", "model_config", "vocab", "model")


# An exported model folder (export.py writes it; config.json last, so a folder without it is an
# interrupted export).
FOLDER_FORMAT = "captioner-folder"
FORMAT_VERSION = 1
WEIGHTS_FILE, VOCAB_FILE, CONFIG_FILE, CARD_FILE = "model.safetensors", "vocab.json", "config.json", "README.md"
FILES = (WEIGHTS_FILE, VOCAB_FILE, CONFIG_FILE, CARD_FILE)


def is_model_folder(path: str | os.PathLike) -> bool:
    """True for a folder meant to be an exported model (it has a config.json or model.safetensors)."""
    p = Path(path)
    return p.is_dir() and ((p / CONFIG_FILE).exists() or (p / WEIGHTS_FILE).exists())



# ---------------------------------------------------------------- files

def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Write `state` to `path` atomically (fileio.atomic_write).

    A crash, `kill -9`, a full disk or a permission error at any moment leaves either the old
    file or the new one, never a half-written `path`. A failed write raises OSError with a
    one-line message naming the file.
    """
    path = Path(path)
    try:
        fileio.atomic_write(path, lambda f: torch.save(state, f))
    except OSError as exc:
        kept = "the previous file is unchanged" if path.exists() else "nothing was written"
        raise OSError(exc.errno, f"cannot write checkpoint {path}: {exc.strerror or exc}; {kept}") from None


def _load_error(path: Path, exc: Exception) -> ValueError:
    """The one-line reason torch.load failed, in the user's terms."""
    text = str(exc).strip()
    if isinstance(exc, pickle.UnpicklingError) and "weights only" in text.lower():
        # torch's message goes on to advise weights_only=False: never do that with a foreign file.
        return ValueError(f"checkpoint {path} is not a checkpoint this toolkit wrote: it holds "
                          f"pickled Python objects (code), which are never loaded")
    reason = text.splitlines()[0] if text else type(exc).__name__
    return ValueError(f"checkpoint {path} cannot be read (truncated, corrupt or not a "
                      f"checkpoint): {reason[:200]}")


def load_checkpoint(source: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """The one loader: a `.pt` checkpoint, an exported model folder, or `hf://REPO_ID[@REVISION]`.

    All three give the same dict (format, model_config, vocab, model, ...). A Hub model is downloaded
    once into the Hugging Face cache and read from there (HF_HUB_OFFLINE=1 is honoured).
    Raises FileNotFoundError when the source does not exist, ValueError with a one-line reason.
    """
    if hub.is_hub_ref(source):
        return {**read_model_folder(hub.resolve(str(source))), "source": str(source)}
    if Path(source).is_dir():
        return read_model_folder(source)
    return _load_pt(Path(source), map_location)


def _load_pt(path: Path, map_location: Any) -> dict:
    """A `.pt` checkpoint through torch.load(weights_only=True): a file that holds code is refused."""
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, UnpicklingError, EOFError, ... by case
        raise _load_error(path, exc) from None
    if not isinstance(ckpt, dict):
        raise ValueError(f"checkpoint {path} holds a {type(ckpt).__name__}, expected a dict "
                         f"with format {FORMAT!r}")
    if ckpt.get("format") != FORMAT:
        raise ValueError(f"checkpoint {path} has format {ckpt.get('format')!r}, expected {FORMAT!r}")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise ValueError(f"checkpoint {path} lacks {', '.join(missing)}")
    return ckpt


# ---------------------------------------------------------------- exported model folders

def _read_json(folder: Path, name: str):
    path = folder / name
    if not path.is_file():
        raise ValueError(f"model folder {folder} lacks {name} (an export has {', '.join(FILES[:3])})")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None


def read_model_folder(folder: str | os.PathLike) -> dict:
    """Load an exported folder as a checkpoint dict (format, model_config, vocab, model, features, ...).

    Raises FileNotFoundError when the folder does not exist, ValueError with a one-line reason for
    a missing file, bad JSON, another format or an unknown format version, or unreadable tensors.
    Tensors that do not fit the config are refused when the model is rebuilt
    (`model_from_checkpoint`).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder {folder} does not exist")
    config = _read_json(folder, CONFIG_FILE)
    if not isinstance(config, dict) or config.get("format") != FOLDER_FORMAT:
        found = config.get("format") if isinstance(config, dict) else type(config).__name__
        raise ValueError(f"{folder / CONFIG_FILE} has format {found!r}, expected {FOLDER_FORMAT!r}")
    if config.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{folder / CONFIG_FILE} has format_version {config.get('format_version')!r}; "
                         f"this version reads {FORMAT_VERSION} (update the toolkit or re-export)")
    if not isinstance(config.get("model_config"), dict):
        raise ValueError(f"{folder / CONFIG_FILE} lacks a model_config object")
    vocab = _read_json(folder, VOCAB_FILE)
    if not isinstance(vocab, list) or not all(isinstance(w, str) for w in vocab):
        raise ValueError(f"{folder / VOCAB_FILE} must be a JSON list of words")
    state = _read_weights(folder / WEIGHTS_FILE)
    model_config = dict(config["model_config"])
    if isinstance(config.get("preprocessing"), dict):  # kept once, beside the model config
        model_config["preprocess"] = config["preprocessing"]
    return {"format": FORMAT, "model_config": model_config, "vocab": vocab,
            "model": state, "features": config.get("features"), "decoding": config.get("decoding"),
            "epoch": config.get("epoch"), "data_config": config.get("data_config"), "source": str(folder)}


def _read_weights(path: Path) -> dict:
    if not path.is_file():
        raise ValueError(f"model folder {path.parent} lacks {path.name} (an export has {', '.join(FILES[:3])})")
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises SafetensorError, OSError, ... by case
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{path} cannot be read (truncated or not safetensors): {reason[:200]}") from None


# ---------------------------------------------------------------- contents

def to_plain(obj):
    """Config values as plain data for checkpoints (weights_only) and JSON."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    if isinstance(obj, dict):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return str(obj)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)


def rng_state() -> dict:
    """Python, numpy and torch RNG states as plain data (loadable with weights_only=True)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    state = {"python": random.getstate(),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)},
             "torch": torch.get_rng_state(), "cuda": []}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` saved (CUDA states for the GPUs that are visible)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"])[: torch.cuda.device_count()])


def training_checkpoint(model: torch.nn.Module, vocab: Vocabulary, model_cfg: ModelConfig, *,
                        train_cfg, data_cfg, epoch: int, step_in_epoch: int = 0,
                        partial: dict | None = None, best_score: float, history: list[dict],
                        optimizer, scheduler, scaler, early_stopping: dict,
                        features: dict | None, precision: str = "off") -> dict:
    """Everything a run needs to resume exactly: weights, configs, counters and RNG states.

    `epoch` counts finished epochs; `step_in_epoch` > 0 (with `partial`, the epoch's running
    sums) marks a save in the middle of epoch `epoch + 1`. `model` is unwrapped (no DP/DDP).
    `precision`: the resolved --amp (bf16, fp16 or off), so that a resume in another one gets a
    fresh gradient scaler.
    """
    return {"format": FORMAT, "model_config": to_plain(model_cfg), "vocab": vocab.to_list(),
            "model": model.state_dict(), "train_config": to_plain(train_cfg),
            "data_config": to_plain(data_cfg), "epoch": epoch, "step_in_epoch": step_in_epoch,
            "partial": partial if step_in_epoch else None, "best_score": float(best_score),
            "history": list(history), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else None,
            "early_stopping": dict(early_stopping), "rng": rng_state(), "features": features,
            "precision": precision}


# ---------------------------------------------------------------- rebuilding

def model_config_from_dict(values: dict) -> ModelConfig:
    """Rebuild a ModelConfig from its saved dict, resolved (encoders.resolve: a checkpoint from before
    the spec was stored gets its encoder's preprocessing); fields this version does not know are an
    error."""
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"checkpoint model config has fields this version does not know: "
                         f"{', '.join(unknown)}")
    # JSON-like round trips turn tuples into lists; keep tuples tuples so frozen dataclasses
    # stay hashable.
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return encoders.resolve(ModelConfig(**values))


def _load_weights(model: torch.nn.Module, state: dict) -> None:
    try:
        model.load_state_dict(strip_module_prefix(state))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise ValueError(f"checkpoint weights do not fit its model config: "
                         f"{' '.join(s.strip() for s in first[:3])[:300]}") from None


def _build_without_download(cfg: ModelConfig) -> model_lib.CaptionModel:
    """The model of `cfg` without ImageNet weights: a checkpoint's state dict replaces them."""
    return model_lib.build_model(dataclasses.replace(cfg, pretrained=False, encoder_weights=None))


def model_from_checkpoint(ckpt: dict) -> tuple[model_lib.CaptionModel, Vocabulary, ModelConfig]:
    """Rebuild (CaptionModel, Vocabulary, ModelConfig) from a loaded checkpoint, in eval mode."""
    cfg = model_config_from_dict(ckpt["model_config"])
    vocab = Vocabulary.from_list(list(ckpt["vocab"]))
    if len(vocab) != cfg.vocab_size:
        raise ValueError(f"checkpoint vocabulary has {len(vocab)} words but its model config "
                         f"says vocab_size={cfg.vocab_size}")
    model = _build_without_download(cfg)
    _load_weights(model, ckpt["model"])
    model.eval()
    return model, vocab, cfg


def build_or_restore_model(model_cfg: ModelConfig, ckpt: dict | None, path: str | os.PathLike = "checkpoint",
                           ignore: tuple[str, ...] = INIT_FIELDS) -> tuple[model_lib.CaptionModel, ModelConfig]:
    """(model, resolved model_cfg): a new model, or the checkpoint's weights in a model of the
    requested config (ValueError naming every field, except `ignore`, where the two differ)."""
    if ckpt is None:
        model = model_lib.build_model(model_cfg)
        return model, model.cfg
    # How the encoder was initialised is the checkpoint's business (its weights replace any
    # initialisation): take those fields from it, compare the rest.
    saved = model_config_from_dict(ckpt["model_config"])
    model_cfg = dataclasses.replace(model_cfg, **{f: getattr(saved, f) for f in INIT_FIELDS})
    check_model_config(ckpt, model_cfg, path, ignore)
    model_cfg = encoders.resolve(model_cfg)
    model = _build_without_download(model_cfg)
    _load_weights(model, ckpt["model"])
    return model, model_cfg


def decode_config_from(ckpt: dict, given: DecodeConfig | dict | None = None) -> DecodeConfig:
    """The decoding settings: `given` when it is a DecodeConfig; else the exported folder's defaults
    (DecodeConfig's where it has none; fields this version lacks are ignored) with the fields in
    `given` (the flags typed) on top."""
    if isinstance(given, DecodeConfig):
        return given
    saved = ckpt.get("decoding")
    known = {f.name for f in dataclasses.fields(DecodeConfig)}
    values = {k: v for k, v in saved.items() if k in known} if isinstance(saved, dict) else {}
    return DecodeConfig(**{**values, **(given or {})})


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
                       ignore: tuple[str, ...] = INIT_FIELDS, *,
                       way_out: str = "pass the same model flags, or start a new run without --resume") -> None:
    """Raise ValueError naming every model-config field where `ckpt` and `requested` differ.

    A requested ModelConfig and the saved one are compared resolved (encoders.resolve): flags that
    leave the spec's fields unset mean the encoder's own values, as an older checkpoint does."""
    saved = ckpt["model_config"]
    if isinstance(requested, ModelConfig):
        saved, requested = to_plain(model_config_from_dict(saved)), to_plain(encoders.resolve(requested))
    diffs = config_differences(saved, requested, ignore=ignore)
    if diffs:
        listed = "; ".join(f"{k}: checkpoint {old!r} vs requested {new!r}"
                           for k, (old, new) in diffs.items())
        raise ValueError(f"{path} does not fit the requested model ({listed}); {way_out}")
