"""Data sets: layouts, cleaning, splits, records, Datasets, collate, loaders, image loading.

Layouts read by `load_dataset` (auto-detected from `DataConfig.dataset_path`):
    original  Flickr8k_text/Flickr8k.token.txt + Flickr_8k.{train,dev,test}Images.txt (official split)
    kaggle    captions.txt (CSV, header image,caption) + Images/ (seeded split by image)
    karpathy  dataset_{flickr8k,flickr30k,coco}.json (its split field; restval joins train)
    demo      synthetic shapes (demo_data.py), generated into data/demo/ in the Kaggle layout
    huggingface  --hf_dataset, materialised once into the Karpathy layout (hf_data.py) and read back

Words live in text.py (tokenizer, Vocabulary), the features-file format in features.py.
Dirt in real files is counted per reason and reported once with a few examples; it never crashes
the load. Images that turn out corrupt while training come back as None from the data sets and
the collate functions drop and count them (`batch.n_skipped`).

Letters in shape comments: B batch, T caption length (with <sos>/<eos>), P encoder positions,
C encoder channels.
"""
from __future__ import annotations

import dataclasses
import functools
import io
import json
import logging
import os
import random
import re
import signal
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset

import demo_data
import hf_data
from config import DataConfig
from features import FeatureStore
from text import PAD, SPECIALS, Vocabulary, tokenize

log = logging.getLogger(__name__)

_PAD_ID = SPECIALS.index(PAD)

# Refuse images above this many pixels before decoding them (PIL's own default limit): a tiny
# PNG can claim 50,000 x 50,000 pixels and take gigabytes once decoded.
MAX_IMAGE_PIXELS = 89_478_485
EXAMPLES_PER_REASON = 5


# ----------------------------------------------------------------------------- records

@dataclass
class ImageRecord:
    name: str                    # file name as the captions name it (unique within a data set)
    path: Path                   # where the image is
    captions: list[str]          # raw captions
    tokens: list[list[str]]      # tokenized, truncated to max_caption_len words


@dataclass
class DatasetSplits:
    layout: str                  # original / kaggle / karpathy / demo / huggingface
    root: Path
    train: list[ImageRecord]
    val: list[ImageRecord]
    test: list[ImageRecord]
    skipped: dict[str, dict[str, Any]] = field(default_factory=dict)   # reason -> {count, examples}
    repaired: dict[str, dict[str, Any]] = field(default_factory=dict)  # read anyway: same form
    truncated_captions: int = 0

    def split(self, name: str) -> list[ImageRecord]:
        if name not in ("train", "val", "test"):
            raise ValueError(f"unknown split {name!r}; expected train, val or test")
        return getattr(self, name)


class _Tally:
    """Counts per reason with a few examples, reported once at the end of a load."""

    def __init__(self):
        self.counts: dict[str, dict[str, Any]] = {}

    def add(self, reason: str, example: str, n: int = 1) -> None:
        entry = self.counts.setdefault(reason, {"count": 0, "examples": []})
        entry["count"] += n
        if len(entry["examples"]) < EXAMPLES_PER_REASON and example not in entry["examples"]:
            entry["examples"].append(example)

    def report(self, what: str) -> None:
        for reason, entry in sorted(self.counts.items()):
            log.warning("%s %d x %s, e.g. %s", what, entry["count"], reason, entry["examples"])


@dataclass
class _Raw:
    """What a layout parser found, before files are checked and captions cleaned."""
    layout: str
    root: Path
    images_dir: Path
    captions: dict[str, list[str]]           # name -> raw captions, in file order
    splits: dict[str, list[str]] | None      # official split names, or None for a seeded split
    paths: dict[str, Path] | None = None     # name -> path when the layout says (Karpathy filepath)


# ----------------------------------------------------------------------------- reading text files

def _read_lines(path: Path, repaired: _Tally) -> list[str]:
    """Lines of a text file; lines that are not UTF-8 are read as cp1252 and counted."""
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    lines = []
    for number, raw in enumerate(data.splitlines(), 1):
        try:
            lines.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            lines.append(raw.decode("cp1252", errors="replace"))
            repaired.add("non_utf8_line", f"{path.name}:{number}")
    return lines


_TOKEN_LINE = re.compile(r"^(\S+?)(?:#(\d+))?\s+(.*)$")


def _parse_token_file(path: Path, skipped: _Tally, repaired: _Tally) -> dict[str, list[str]]:
    """Flickr8k.token.txt: `IMAGE#N<TAB>caption` per line."""
    captions: dict[str, list[str]] = {}
    for number, line in enumerate(_read_lines(path, repaired), 1):
        if not line.strip():
            continue
        if "\t" in line:
            key, caption = line.split("\t", 1)
            name = key.split("#", 1)[0].strip()
        else:
            match = _TOKEN_LINE.match(line.strip())
            if not match:
                skipped.add("malformed_line", f"{path.name}:{number}")
                continue
            name, _, caption = match.groups()
            repaired.add("space_instead_of_tab", f"{path.name}:{number}")
        if not name:
            skipped.add("malformed_line", f"{path.name}:{number}")
            continue
        captions.setdefault(name, []).append(caption)
    return captions


def _parse_kaggle_csv(path: Path, skipped: _Tally, repaired: _Tally) -> dict[str, list[str]]:
    """captions.txt: CSV with header image,caption; captions with commas are double-quoted."""

    def rejoin(cells: list[str]) -> list[str] | None:
        # A line with more cells than the header: an unquoted caption with commas. The caption
        # is the last column in every release, so the extra cells go back into it.
        if not any(cell.strip() for cell in cells):
            return None
        repaired.add("unquoted_comma", f"{path.name}: {','.join(cells)[:60]}")
        return [*cells[:n_cols - 1], ",".join(cells[n_cols - 1:])]

    text = "\n".join(_read_lines(path, repaired))
    try:   # the first line decides how many cells a line has
        n_cols = pd.read_csv(io.StringIO(text), header=None, nrows=1, dtype=str).shape[1]
    except pd.errors.EmptyDataError:
        raise ValueError(f"{path} is empty; expected a CSV with the header image,caption") from None
    # Everything as text: an empty caption stays "", names are not parsed as numbers; a short
    # line's missing cells come back as NaN.
    rows = pd.read_csv(io.StringIO(text), header=None, dtype=str, keep_default_na=False,
                       engine="python", on_bad_lines=rejoin).values.tolist()
    header = [str(h).strip().lower() for h in rows[0]]
    if "image" in header and "caption" in header:
        i_img, i_cap, rows = header.index("image"), header.index("caption"), rows[1:]
    else:  # no header: the first line is data
        i_img, i_cap = 0, 1
    captions: dict[str, list[str]] = {}
    for row in rows:
        cells = [c if isinstance(c, str) else "" for c in row]
        if not any(c.strip() for c in cells):
            continue
        short = i_cap >= len(row) or not isinstance(row[i_cap], str)
        name = cells[i_img].strip()
        if short or not name:
            skipped.add("malformed_line", f"{path.name}: {','.join(cells).strip(',')[:60]}")
            continue
        caption = cells[i_cap]
        captions.setdefault(name, []).append(caption)
    return captions


def _read_name_list(path: Path, repaired: _Tally) -> list[str]:
    return [line.strip() for line in _read_lines(path, repaired) if line.strip()]


# ----------------------------------------------------------------------------- layout detection

_IMAGE_DIR_NAMES = ("Images", "images", "Flicker8k_Dataset", "Flickr8k_Dataset",
                    "Flickr8k_Dataset/Flicker8k_Dataset", "flickr30k-images", "flickr30k_images")
_TOKEN_FILES = ("Flickr8k_text/Flickr8k.token.txt", "Flickr8k.token.txt",
                "Flickr8k_text/Flickr8k.lemma.token.txt")
_SPLIT_FILES = {"train": "Flickr_8k.trainImages.txt", "val": "Flickr_8k.devImages.txt",
                "test": "Flickr_8k.testImages.txt"}
_KARPATHY_NAMES = ("dataset_flickr8k.json", "dataset_flickr30k.json", "dataset_coco.json")
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def _find_images_dir(root: Path, override: str | None) -> Path:
    if override:
        path = Path(override)
        if not path.is_dir():
            raise FileNotFoundError(f"--images_dir {override} is not a folder")
        return path
    for name in _IMAGE_DIR_NAMES:
        if (root / name).is_dir():
            return root / name
    if any(p.suffix.lower() in _IMAGE_SUFFIXES for p in root.iterdir()):
        return root
    raise FileNotFoundError(f"no image folder in {root}: looked for {', '.join(_IMAGE_DIR_NAMES)} "
                            "or images in the folder itself; pass --images_dir")


def _detect_captions_file(root: Path) -> tuple[str, Path]:
    for name in _KARPATHY_NAMES:
        if (root / name).is_file():
            return "karpathy", root / name
    karpathy_like = sorted(root.glob("dataset_*.json"))
    if karpathy_like:
        return "karpathy", karpathy_like[0]
    if (root / "captions.txt").is_file():
        return "kaggle", root / "captions.txt"
    for name in _TOKEN_FILES:
        if (root / name).is_file():
            return "original", root / name
    looked_for = [*_KARPATHY_NAMES, "dataset_*.json", "captions.txt", *_TOKEN_FILES]
    raise FileNotFoundError(f"no captions found in {root}: looked for {', '.join(looked_for)}; "
                            "pass --captions_file and --images_dir for another layout")


def _layout_of_file(path: Path) -> str:
    if path.suffix.lower() == ".json":
        return "karpathy"
    with open(path, "rb") as f:
        head = f.readline().decode("utf-8", errors="replace").strip().lower()
    if path.suffix.lower() == ".csv" or head.replace(" ", "").startswith("image,caption"):
        return "kaggle"
    return "original"


def _read_layout(cfg: DataConfig, skipped: _Tally, repaired: _Tally) -> _Raw:
    if cfg.captions_file:
        captions_file = Path(cfg.captions_file)
        if not captions_file.is_file():
            raise FileNotFoundError(f"--captions_file {cfg.captions_file} does not exist")
        layout = _layout_of_file(captions_file)
        root = Path(cfg.dataset_path) if cfg.dataset_path else captions_file.parent
    else:
        root = Path(cfg.dataset_path)
        if not root.exists():
            raise FileNotFoundError(f"--dataset_path {cfg.dataset_path} does not exist")
        if not root.is_dir():
            raise NotADirectoryError(f"--dataset_path {cfg.dataset_path} is not a folder "
                                     "(expected a data set folder; a captions file goes to --captions_file)")
        layout, captions_file = _detect_captions_file(root)
    log.info("layout %s: %s", layout, captions_file)
    if layout == "karpathy":
        return _read_karpathy(captions_file, root, cfg.images_dir, skipped, repaired)
    images_dir = _find_images_dir(root, cfg.images_dir)
    if layout == "kaggle":
        return _Raw("kaggle", root, images_dir, _parse_kaggle_csv(captions_file, skipped, repaired), None)
    captions = _parse_token_file(captions_file, skipped, repaired)
    splits = None
    split_dir = captions_file.parent
    if all((split_dir / f).is_file() for f in _SPLIT_FILES.values()):
        splits = {s: _read_name_list(split_dir / f, repaired) for s, f in _SPLIT_FILES.items()}
    else:
        log.warning("no Flickr_8k.{train,dev,test}Images.txt beside %s: using a seeded split by image",
                    captions_file)
    return _Raw("original", root, images_dir, captions, splits)


def _read_json(path: Path, repaired: _Tally):
    raw_bytes = path.read_bytes()
    try:
        text = raw_bytes.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = raw_bytes.decode("utf-8-sig", errors="replace")
        repaired.add("non_utf8_bytes", path.name)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None


def _karpathy_base(entries: list[dict], root: Path, images_dir: str | None) -> Path:
    """The image folder: the candidate under which most of the first entries exist."""
    candidates = [Path(images_dir)] if images_dir else [root / n for n in _IMAGE_DIR_NAMES] + [root]
    candidates = [c for c in candidates if c.is_dir()]
    if images_dir and not candidates:
        raise FileNotFoundError(f"--images_dir {images_dir} is not a folder")
    probe = entries[:50]
    return max(candidates, key=lambda base: sum(any((base / r).is_file() for r in _karpathy_paths(img))
                                                for img in probe)) if candidates else root


def _karpathy_paths(img: dict) -> list[Path]:
    """Where an entry's image may be, relative to the image folder (filepath/filename first)."""
    options = [Path(img["filename"])]
    if img.get("filepath"):
        options.insert(0, Path(img["filepath"]) / img["filename"])
    return options


_KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "val", "dev": "val", "valid": "val",
                    "validation": "val", "test": "test"}


def _read_karpathy(path: Path, root: Path, images_dir: str | None, skipped: _Tally,
                   repaired: _Tally) -> _Raw:
    """Karpathy JSON: its split field (restval joins train); no split field at all: a seeded split."""
    data = _read_json(path, repaired)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{path}: expected a Karpathy JSON object with an 'images' list")
    entries = []
    for i, img in enumerate(data["images"]):
        if not (isinstance(img, dict) and img.get("filename")):
            skipped.add("malformed_entry", f"{path.name}: images[{i}]")
            continue
        entries.append(img)
    base = _karpathy_base(entries, root, images_dir)
    has_splits = any("split" in img for img in entries)
    captions: dict[str, list[str]] = {}
    paths: dict[str, Path] = {}
    splits: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for img in entries:
        options = _karpathy_paths(img)
        name = str(options[0])
        if name in captions:
            skipped.add("duplicate_image_entry", name)
            continue
        paths[name] = next((base / r for r in options if (base / r).is_file()), base / options[0])
        captions[name] = [s.get("raw") or " ".join(s.get("tokens", []))
                          for s in img.get("sentences") or [] if isinstance(s, dict)]
        split = _KARPATHY_SPLITS.get(img.get("split", "train"))
        if split is None:
            skipped.add("unknown_split", f"{name}: {img.get('split')}")
            continue
        splits[split].append(name)
    return _Raw("karpathy", root, base, captions, splits if has_splits else None, paths)


# ----------------------------------------------------------------------------- splitting

def split_sizes_for(n_images: int, sizes: tuple[int, int] | None) -> tuple[int, int]:
    """(train, val) image counts of a seeded split; the test split gets the rest."""
    if sizes is None:
        if n_images > 7000:
            return 6000, 1000
        n_val = round(n_images * 0.1)
        return n_images - 2 * n_val, n_val
    if sizes[0] + sizes[1] > n_images:
        raise ValueError(f"split_sizes {sizes[0]} {sizes[1]} need {sizes[0] + sizes[1]} images; "
                         f"the data set has {n_images}")
    return sizes


def seeded_split(names: Iterable[str], sizes: tuple[int, int] | None, seed: int) -> dict[str, list[str]]:
    """Deterministic split by image: sorted names, shuffled with `seed`, cut into train/val/test."""
    order = sorted(set(names))
    random.Random(seed).shuffle(order)
    n_train, n_val = split_sizes_for(len(order), sizes)
    return {"train": order[:n_train], "val": order[n_train:n_train + n_val], "test": order[n_train + n_val:]}


# ----------------------------------------------------------------------------- load_dataset

def load_dataset(cfg: DataConfig, *, check_images: bool = False) -> DatasetSplits:
    """Read the data set named by `cfg` (layout auto-detected), clean it, split it by image.

    `check_images` opens every image's header (cheap) and drops unreadable ones; images that
    are corrupt beyond the header are caught later, when a batch loads them.
    """
    if cfg.hf_dataset:
        root = hf_data.materialise_hf_dataset(cfg)
        return _load_as(cfg, "huggingface", root, check_images)
    if cfg.dataset_path is None and cfg.captions_file is None:
        return _load_as(cfg, "demo", demo_data.ensure_demo_dataset(cfg.demo_dir or None), check_images)
    skipped, repaired = _Tally(), _Tally()
    raw = _read_layout(cfg, skipped, repaired)
    split_names = _assign_splits(raw, cfg, skipped)
    exists = _FileIndex()
    truncated = 0
    out: dict[str, list[ImageRecord]] = {}
    for split, names in split_names.items():
        out[split] = []
        for name in names:
            path = raw.paths[name] if raw.paths else raw.images_dir / name
            if not exists(path):
                skipped.add("missing_image", name)
                continue
            problem = check_image_header(path) if check_images else None
            if problem:
                skipped.add("unreadable_image", f"{name}: {problem}")
                continue
            record, n_truncated = _clean_record(name, path, raw.captions[name], cfg.max_caption_len, skipped)
            truncated += n_truncated
            if record is not None:
                out[split].append(record)
    if truncated:
        log.info("truncated %d captions to %d words", truncated, cfg.max_caption_len)
    skipped.report("skipped")
    repaired.report("read anyway")
    if not out["train"]:
        raise ValueError(f"no usable training images in {raw.root} (layout {raw.layout}); "
                         f"skipped: { {k: v['count'] for k, v in skipped.counts.items()} }")
    return DatasetSplits(raw.layout, raw.root, out["train"], out["val"], out["test"],
                         skipped.counts, repaired.counts, truncated)


def _load_as(cfg: DataConfig, layout: str, root: Path, check_images: bool) -> DatasetSplits:
    """A generated folder (demo, Hugging Face) read like any other, reported under its own name."""
    plain = dataclasses.replace(cfg, hf_dataset=None, dataset_path=str(root), captions_file=None,
                                images_dir=None)
    splits = load_dataset(plain, check_images=check_images)
    splits.layout = layout
    return splits


def _assign_splits(raw: _Raw, cfg: DataConfig, skipped: _Tally) -> dict[str, list[str]]:
    """Names per split, by image, over every captioned name (so a photo's split does not depend
    on which other files happen to be present): the layout's own split, else a seeded one."""
    captioned = [name for name, caps in raw.captions.items() if caps]
    if raw.splits is None:
        return seeded_split(captioned, cfg.split_sizes, cfg.split_seed)
    split_names, placed = {}, set()
    for split in ("train", "val", "test"):
        kept = []
        for name in raw.splits.get(split, []):
            if name in placed:
                skipped.add("in_several_splits", name)
                continue
            placed.add(name)
            if name not in raw.captions:
                skipped.add("split_entry_without_captions", f"{split}: {name}")
                continue
            kept.append(name)
        split_names[split] = kept
    for name in captioned:
        if name not in placed:
            skipped.add("not_in_any_split", name)
    return split_names


class _FileIndex:
    """`exists(path)`: one directory listing per folder instead of a stat per image."""

    def __init__(self):
        self._listing: dict[Path, set[str]] = {}

    def __call__(self, path: Path) -> bool:
        folder = path.parent
        if folder not in self._listing:
            self._listing[folder] = set(os.listdir(folder)) if folder.is_dir() else set()
        return path.name in self._listing[folder]


def _clean_record(name: str, path: Path, raw_captions: list[str], max_len: int,
                  skipped: _Tally) -> tuple[ImageRecord | None, int]:
    """An image's record without duplicate or empty captions, truncated to `max_len` words;
    None when no caption is left. Also returns how many captions were truncated."""
    seen: set[str] = set()
    captions, tokens_list, truncated = [], [], 0
    for caption in raw_captions:
        key = caption.strip()
        if key in seen:
            skipped.add("duplicate_caption", f"{name}: {key[:60]}")
            continue
        seen.add(key)
        tokens = tokenize(caption)
        if not tokens:
            skipped.add("empty_caption", name)
            continue
        if len(tokens) > max_len:
            tokens = tokens[:max_len]
            truncated += 1
        captions.append(key)
        tokens_list.append(tokens)
    if not tokens_list:
        skipped.add("image_without_captions", name)
        return None, truncated
    return ImageRecord(name, path, captions, tokens_list), truncated


# ----------------------------------------------------------------------------- images

class CorruptImageError(ValueError):
    """An image file that cannot be decoded, or one that is refused (decompression bomb)."""


_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError,
                 Image.DecompressionBombWarning)


def _open_checked(path: Path) -> Image.Image:
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        img = Image.open(path)
    width, height = img.size
    if width * height > MAX_IMAGE_PIXELS:
        img.close()
        raise CorruptImageError(f"{path}: {width}x{height} pixels is over the limit of "
                                f"{MAX_IMAGE_PIXELS:,} (decompression bomb?); refused")
    return img


def check_image_header(path: str | os.PathLike) -> str | None:
    """None when the header reads and the size is acceptable, else the reason."""
    try:
        _open_checked(Path(path)).close()
    except CorruptImageError as exc:
        return str(exc).split(": ", 1)[-1]
    except _IMAGE_ERRORS as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        # PIL's convert("L") clips 16-bit values at 255 (a white image): rescale instead.
        arr = np.asarray(img, dtype=np.float32)
        top = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        if img.mode == "I" and arr.max() <= 255:
            top = 255.0
        arr = np.clip(arr / top * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(arr).convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def load_image(path: str | os.PathLike) -> Image.Image:
    """The image as RGB with its EXIF orientation applied; CorruptImageError if unreadable."""
    path = Path(path)
    try:
        img = _open_checked(path)
        with img:
            img.load()
            try:
                img = ImageOps.exif_transpose(img)
            except Exception as exc:   # broken EXIF blocks raise many types; the pixels are fine
                log.debug("ignoring unreadable EXIF in %s: %s", path, exc)
                img = img.copy()
            return _to_rgb(img)
    except CorruptImageError:
        raise
    except FileNotFoundError as exc:
        raise CorruptImageError(f"{path}: file not found") from exc
    except _IMAGE_ERRORS as exc:
        raise CorruptImageError(f"{path}: {type(exc).__name__}: {exc}") from exc


# ----------------------------------------------------------------------------- summary

def caption_length_stats(records: Iterable[ImageRecord]) -> dict[str, float]:
    lengths = [len(t) for r in records for t in r.tokens]
    if not lengths:
        return {"max": 0, "mean": 0.0}
    return {"max": max(lengths), "mean": round(sum(lengths) / len(lengths), 2)}


def dry_run_summary(splits: DatasetSplits, vocab: Vocabulary) -> dict:
    """JSON-able description of a loaded data set and its vocabulary."""
    parts = {"train": splits.train, "val": splits.val, "test": splits.test}
    all_records = [r for recs in parts.values() for r in recs]
    return {
        "layout": splits.layout,
        "root": str(splits.root),
        "images": {k: len(v) for k, v in parts.items()},
        "captions": {k: sum(len(r.tokens) for r in v) for k, v in parts.items()},
        "vocabulary_size": len(vocab),
        "caption_length_words": caption_length_stats(all_records),
        "truncated_captions": splits.truncated_captions,
        "skipped": {k: dict(v) for k, v in sorted(splits.skipped.items())},
        "read_anyway": {k: dict(v) for k, v in sorted(splits.repaired.items())},
    }


def build_vocabulary(splits: DatasetSplits, min_freq: int) -> Vocabulary:
    """Vocabulary from the training captions only (val/test words never leak in)."""
    return Vocabulary.build((t for r in splits.train for t in r.tokens), min_freq)


def dry_run(cfg: DataConfig) -> dict:
    """Load and check the data (image headers included), build the vocabulary, summarise."""
    splits = load_dataset(cfg, check_images=True)
    return dry_run_summary(splits, build_vocabulary(splits, cfg.min_word_freq))


# ----------------------------------------------------------------------------- datasets and batches

def _check_inputs(transform, features) -> None:
    if (transform is None) == (features is None):
        raise ValueError("give a data set exactly one of transform= (images) or features= (a FeatureStore)")


class _ImageSource:
    """Loads one record's input: a transformed image, or its features; None if the image is corrupt."""

    def __init__(self, records: Sequence[ImageRecord], transform, features: FeatureStore | None):
        _check_inputs(transform, features)
        self.records = list(records)
        self.transform = transform
        self.features = features
        if features is not None:
            missing = [r.name for r in self.records if r.name not in features]
            if missing:
                raise ValueError(f"{len(missing)} images have no features in {features.directory}, "
                                 f"e.g. {missing[:3]}; re-run feature extraction")
        self._warned: set[str] = set()

    def load(self, idx: int) -> torch.Tensor | None:
        record = self.records[idx]
        if self.features is not None:
            return self.features.get(record.name)   # (P, C)
        try:
            img = load_image(record.path)
        except CorruptImageError as exc:
            if record.name not in self._warned:
                self._warned.add(record.name)
                log.warning("skipping an unreadable image: %s", exc)
            return None
        return self.transform(img)   # (3, H, W)


class CaptionDataset(Dataset):
    """Training: one item per (image, caption). Item: (input, caption ids (T,), image index) or None."""

    def __init__(self, records: Sequence[ImageRecord], vocab: Vocabulary, *,
                 transform: Callable[[Image.Image], torch.Tensor] | None = None,
                 features: FeatureStore | None = None):
        self.source = _ImageSource(records, transform, features)
        self.records = self.source.records
        self.vocab = vocab
        self.items = [(i, j) for i, r in enumerate(self.records) for j in range(len(r.tokens))]
        self.encoded = [[vocab.encode(t) for t in r.tokens] for r in self.records]
        # The last input loaded: training groups an image's captions next to each other (one CNN
        # pass per image), so they load, decode and transform the image once, not once per caption.
        self._last: tuple[int, torch.Tensor | None] = (-1, None)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, k: int):
        i, j = self.items[k]
        x = self._last[1] if self._last[0] == i else self.source.load(i)
        self._last = (i, x)
        if x is None:
            return None
        return x, torch.tensor(self.encoded[i][j], dtype=torch.long), i


class ImageDataset(Dataset):
    """Evaluation: one item per image. Item: (input, image index) or None. References: records[i].tokens."""

    def __init__(self, records: Sequence[ImageRecord], *,
                 transform: Callable[[Image.Image], torch.Tensor] | None = None,
                 features: FeatureStore | None = None):
        self.source = _ImageSource(records, transform, features)
        self.records = self.source.records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        x = self.source.load(i)
        return None if x is None else (x, i)


def _pin(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.pin_memory()


@dataclass
class CaptionBatch:
    images: torch.Tensor | None      # (B, 3, H, W), or None when features are used
    features: torch.Tensor | None    # (B, P, C), or None when images are used
    captions: torch.Tensor           # (B, T) long, padded with pad_id
    lengths: torch.Tensor            # (B,) long, caption lengths including <sos>/<eos>
    image_idx: torch.Tensor          # (B,) long, index into the data set's records
    n_skipped: int = 0               # items dropped from this batch (corrupt images)

    @property
    def inputs(self) -> torch.Tensor | None:
        return self.images if self.images is not None else self.features

    def __len__(self) -> int:
        return int(self.captions.shape[0])

    def pin_memory(self) -> CaptionBatch:   # DataLoader(pin_memory=True) calls this
        return dataclasses.replace(self, images=_pin(self.images), features=_pin(self.features),
                                   captions=self.captions.pin_memory(), lengths=self.lengths.pin_memory(),
                                   image_idx=self.image_idx.pin_memory())


@dataclass
class ImageBatch:
    images: torch.Tensor | None      # (B, 3, H, W), or None when features are used
    features: torch.Tensor | None    # (B, P, C), or None when images are used
    image_idx: torch.Tensor          # (B,) long
    n_skipped: int = 0

    @property
    def inputs(self) -> torch.Tensor | None:
        return self.images if self.images is not None else self.features

    def __len__(self) -> int:
        return int(self.image_idx.shape[0])

    def pin_memory(self) -> ImageBatch:
        return dataclasses.replace(self, images=_pin(self.images), features=_pin(self.features),
                                   image_idx=self.image_idx.pin_memory())


def _stack_inputs(xs: list[torch.Tensor]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    if not xs:
        return None, None
    stacked = torch.stack(xs)
    return (stacked, None) if stacked.dim() == 4 else (None, stacked)   # (B, 3, H, W) or (B, P, C)


def collate_captions(items: list, pad_id: int = _PAD_ID) -> CaptionBatch:
    """Stack inputs, pad captions with `pad_id`; drops None items and counts them.

    A batch may come out empty (len 0) when every image in it was corrupt: skip it.
    """
    kept = [it for it in items if it is not None]
    n_skipped = len(items) - len(kept)
    images, features = _stack_inputs([it[0] for it in kept])
    lengths = torch.tensor([len(it[1]) for it in kept], dtype=torch.long)          # (B,)
    captions = torch.full((len(kept), int(lengths.max()) if kept else 0), pad_id, dtype=torch.long)  # (B, T)
    for row, it in enumerate(kept):
        captions[row, :len(it[1])] = it[1]
    image_idx = torch.tensor([it[2] for it in kept], dtype=torch.long)             # (B,)
    return CaptionBatch(images, features, captions, lengths, image_idx, n_skipped)


def collate_images(items: list) -> ImageBatch:
    kept = [it for it in items if it is not None]
    images, features = _stack_inputs([it[0] for it in kept])
    image_idx = torch.tensor([it[1] for it in kept], dtype=torch.long)             # (B,)
    return ImageBatch(images, features, image_idx, len(items) - len(kept))


def _leave_stop_signals_to_the_main_process(_worker_id: int) -> None:
    """DataLoader workers ignore SIGINT and SIGTERM. A signal sent to the whole process group (a
    terminal's Ctrl-C, Slurm's scancel, `pkill -f`) reaches them too; a worker it killed made the
    main process die with "DataLoader worker ... is killed by signal" instead of finishing its
    step and saving. The main process shuts the workers down; a worker whose parent died exits."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def make_loader(dataset: Dataset, batch_size: int, *, shuffle: bool = False, num_workers: int = 0,
                sampler=None, collate: Callable | None = None, pin_memory: bool | None = None,
                drop_last: bool = False, seed: int | None = None) -> DataLoader:
    """A DataLoader with the right collate function; workers persist across epochs."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if collate is None:
        if isinstance(dataset, CaptionDataset):
            # A partial, not a lambda: workers started with spawn must pickle it.
            collate = functools.partial(collate_captions, pad_id=dataset.vocab.pad_id)
        else:
            collate = collate_images
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    generator = None
    if seed is not None:
        generator = torch.Generator()
        generator.manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                      num_workers=num_workers, collate_fn=collate, pin_memory=pin_memory,
                      drop_last=drop_last, persistent_workers=num_workers > 0, generator=generator,
                      worker_init_fn=_leave_stop_signals_to_the_main_process if num_workers else None)
