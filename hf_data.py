"""Hugging Face image-caption data sets, materialised once into the Karpathy layout.

`materialise_hf_dataset` writes `<cache>/<name>-<fingerprint>/` with images/ and
dataset_hf.json (Karpathy JSON); `data_utils.load_dataset` then reads it like any Karpathy
folder. `datasets` is an optional dependency, imported only when a HF set is asked for.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Sequence

from PIL import Image

from config import DataConfig
from fileio import publish_folder, write_json

log = logging.getLogger(__name__)

DEFAULT_HF_CACHE = Path(__file__).resolve().parent / "data" / "hf"
MARKER = "dataset_hf.json"   # written last: a folder with it is complete
_SPLIT_NAMES = {"train": "train", "validation": "val", "valid": "val", "val": "val", "dev": "val",
                "test": "test"}
_LIST_COLUMNS = ("captions", "sentences", "caption", "text", "raw")
# What Image.open raises on bytes that are not an image it can read (header only).
_PROBE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


def _import_datasets():
    try:
        import datasets
    except ImportError:
        raise ValueError("--hf_dataset needs the optional `datasets` package: pip install datasets") from None
    return datasets


def _caption_columns(columns: Sequence[str], override: tuple[str, ...] | None) -> list[str]:
    if override:
        missing = [c for c in override if c not in columns]
        if missing:
            raise ValueError(f"--hf_caption_columns {missing} not in the data set; columns: {list(columns)}")
        return list(override)
    numbered = sorted((c for c in columns if re.fullmatch(r"(caption|sentence|text)_?\d+", c)),
                      key=lambda c: int(re.search(r"\d+", c).group()))
    if numbered:
        return numbered
    for name in _LIST_COLUMNS:
        if name in columns:
            return [name]
    raise ValueError(f"no caption column found; columns: {list(columns)}; pass --hf_caption_columns")


def _captions(row: dict, columns: list[str]) -> list[str]:
    out: list[str] = []
    for c in columns:
        value = row.get(c)
        if isinstance(value, str):
            out.append(value)
        elif isinstance(value, (list, tuple)):
            for v in value:
                if isinstance(v, str):
                    out.append(v)
                elif isinstance(v, dict) and isinstance(v.get("raw"), str):
                    out.append(v["raw"])
    return out


def _open(name: str, cache_dir: Path):
    datasets = _import_datasets()
    path = Path(name)
    if path.exists():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file() \
                or (path / "dataset_info.json").is_file() and any(path.glob("*.arrow")):
            return datasets.load_from_disk(str(path))
        if path.is_dir():
            return datasets.load_dataset("imagefolder", data_dir=str(path),
                                         cache_dir=str(cache_dir / "_hf_cache"))
        raise ValueError(f"--hf_dataset {name} is a file; expected a save_to_disk folder, "
                         "an imagefolder folder or a hub name")
    try:
        return datasets.load_dataset(name, cache_dir=str(cache_dir / "_hf_cache"))
    except Exception as exc:   # the hub raises many types (connection, missing repo, offline)
        raise ValueError(f"--hf_dataset {name}: could not load it ({type(exc).__name__}: {exc})") from None


def _columns(first, cfg: DataConfig, datasets) -> tuple[str, list[str], str | None]:
    """(image column, caption columns, split column or None) of a data set."""
    columns = first.column_names
    image_column = cfg.hf_image_column
    if image_column not in columns:
        guesses = [c for c, f in first.features.items() if isinstance(f, datasets.Image)]
        if image_column != DataConfig.hf_image_column or not guesses:
            raise ValueError(f"--hf_image_column {image_column} not in the data set; columns: {columns}")
        image_column = guesses[0]
    # Some uploads (e.g. of Flickr30k) keep the Karpathy split in a column.
    known = {*_SPLIT_NAMES, "restval"}
    split_column = "split" if "split" in columns and set(first.unique("split")) <= known else None
    return image_column, _caption_columns(columns, cfg.hf_caption_columns), split_column


def _entries(parts: dict, image_column: str, caption_columns: list[str], split_column: str | None,
             folder: Path, datasets) -> list[dict]:
    """Write every row's image into `folder`; Karpathy entries, with a split where the set has one.

    Without any split (one part, no split column) the entries carry none and load_dataset makes
    its seeded split by image, as for the Kaggle layout.
    """
    split_known = split_column is not None or (all(k in _SPLIT_NAMES for k in parts) and len(parts) > 1)
    entries: list[dict] = []
    used: set[str] = set()
    for part_name, part in parts.items():
        if isinstance(part.features.get(image_column), datasets.Image):
            part = part.cast_column(image_column, datasets.Image(decode=False))
        for i, row in enumerate(part):
            fallback = f"{part_name}_{i:06d}"
            # A row without a usable image keeps a name with no file: every load then counts and
            # reports it as a missing image, like the other layouts do.
            name = _write_image(row[image_column], folder, fallback, used) or f"{fallback}.jpg"
            entry = {"filename": name, "sentences": [{"raw": c} for c in _captions(row, caption_columns)]}
            if split_known:
                entry["split"] = row[split_column] if split_column else _SPLIT_NAMES[part_name]
            entries.append(entry)
    return entries


def materialise_hf_dataset(cfg: DataConfig) -> Path:
    """Write a Hugging Face image-caption data set once into the Karpathy layout; return its folder."""
    datasets = _import_datasets()
    cache = Path(cfg.hf_cache_dir) if cfg.hf_cache_dir else DEFAULT_HF_CACHE
    ds = _open(cfg.hf_dataset, cache)
    parts = dict(ds) if isinstance(ds, datasets.DatasetDict) else {"train": ds}
    fingerprint = hashlib.sha1(json.dumps(
        [cfg.hf_dataset, cfg.hf_image_column, cfg.hf_caption_columns,
         sorted((k, getattr(v, "_fingerprint", "")) for k, v in parts.items())]).encode()).hexdigest()[:12]
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(cfg.hf_dataset).name or cfg.hf_dataset)[:40]
    root = cache / f"{slug}-{fingerprint}"
    if (root / MARKER).is_file():
        return root
    image_column, caption_columns, split_column = _columns(next(iter(parts.values())), cfg, datasets)
    log.info("materialising Hugging Face data set %s into %s (image column %s, captions from %s)",
             cfg.hf_dataset, root, image_column, caption_columns)
    tmp = root.with_name(f".{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "images").mkdir(parents=True)
    entries = _entries(parts, image_column, caption_columns, split_column, tmp / "images", datasets)
    write_json(tmp / MARKER, {"dataset": cfg.hf_dataset, "images": entries})
    return publish_folder(tmp, root, MARKER)


def _write_image(value, folder: Path, fallback: str, used: set[str]) -> str | None:
    """Write one row's image (bytes, a path or a PIL image) into `folder`; its file name, or None."""
    data: bytes | None = None
    source: str | None = None
    if isinstance(value, dict):
        data, source = value.get("bytes"), value.get("path")
    elif isinstance(value, str):
        source = value
    elif isinstance(value, Image.Image):
        buffer = io.BytesIO()
        value.convert("RGB").save(buffer, format="JPEG", quality=95)
        data, source = buffer.getvalue(), f"{fallback}.jpg"
    if data is None and source and Path(source).is_file():
        data = Path(source).read_bytes()
    if data is None:
        return None
    name = Path(source).name if source else ""
    if not name or name in used or Path(name).suffix.lower() not in Image.registered_extensions():
        try:   # name the file after what the bytes are, so viewers and PIL agree
            with Image.open(io.BytesIO(data)) as probe:
                suffix = "." + (probe.format or "jpeg").lower().replace("jpeg", "jpg")
        except _PROBE_ERRORS:
            suffix = ".jpg"   # unreadable: written anyway, and skipped with a count when loaded
        name = fallback + suffix
    used.add(name)
    (folder / name).write_bytes(data)
    return name
