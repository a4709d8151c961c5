"""Data side of the toolkit: data sets, cleaning, tokenizer, vocabulary, loaders, features files.

Layouts read by `load_dataset` (auto-detected from `DataConfig.dataset_path`):
    original  Flickr8k_text/Flickr8k.token.txt + Flickr_8k.{train,dev,test}Images.txt (official split)
    kaggle    captions.txt (CSV, header image,caption) + Images/ (seeded split by image)
    karpathy  dataset_{flickr8k,flickr30k,coco}.json (its split field; restval joins train)
    demo      synthetic shapes, generated into data/demo/ in the Kaggle layout (dataset_path=None)
    huggingface  --hf_dataset, materialised once into the Karpathy layout and read back like it

Dirt in real files is counted per reason and reported once with a few examples; it never crashes
the load. Images that turn out corrupt while training come back as None from the data sets and
the collate functions drop and count them (`batch.n_skipped`).

Letters in shape comments: B batch, T caption length (with <sos>/<eos>), P encoder positions,
C encoder channels, N images.
"""
from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import io
import json
import logging
import math
import os
import random
import re
import shutil
import unicodedata
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps
from torch.utils.data import DataLoader, Dataset

from config import DataConfig

log = logging.getLogger(__name__)

PAD, SOS, EOS, UNK = "<pad>", "<sos>", "<eos>", "<unk>"
SPECIALS = (PAD, SOS, EOS, UNK)  # ids are positions in the word list
_PAD_ID = SPECIALS.index(PAD)

REPO_ROOT = Path(__file__).resolve().parent
DEFAULT_DEMO_DIR = REPO_ROOT / "data" / "demo"
DEFAULT_HF_CACHE = REPO_ROOT / "data" / "hf"

# Refuse images above this many pixels before decoding them (PIL's own default limit): a tiny
# PNG can claim 50,000 x 50,000 pixels and take gigabytes once decoded.
MAX_IMAGE_PIXELS = 89_478_485
EXAMPLES_PER_REASON = 5


# ----------------------------------------------------------------------------- tokenizer

# spaCy's English tokenizer splits these once apostrophes are gone ("dont" -> "do", "nt"). The
# table is spaCy's exception list restricted to [a-z0-9]+ keys; a test checks it entry by entry.
_CLITIC_BASES = {
    "he": "d dve llve s", "how": "d dve ll llve re s ve", "i": "d dve llve m ve",
    "it": "d dve ll llve", "she": "dve llve s", "that": "d dve ll llve s",
    "there": "d dve ll llve re s ve", "these": "d dve ll llve re ve",
    "they": "d dve ll llve re ve", "this": "d dve ll llve s", "those": "d dve ll llve re ve",
    "we": "d dve llve ve", "what": "d dve ll llve re s ve", "when": "d dve ll llve re s ve",
    "where": "d dve ll llve re s ve", "who": "d dve ll llve s ve", "why": "d dve ll llve re s ve",
    "you": "d dve ll llve re ve",
}
_NEGATIONS_WITH_VE = "ca could did do does had may might must need ought sha should wo would"
_NEGATIONS = "ai are dare has have is was were"
_MODALS_VE = "could might must should would not"
_OTHER_SPLITS = {"cannot": ("can", "not"), "gonna": ("gon", "na"), "gotta": ("got", "ta"),
                 "yall": ("y", "all"), "ima": ("i", "m", "a")}
# Units that spaCy's suffix rule splits off a number ("10kg" -> "10", "kg"), lowercase ASCII only.
_UNITS = "km|m|dm|cm|mm|ha|nm|yd|in|ft|kg|g|mg|t|lb|oz|kmh|mph|mb|kb|gb|tb"


def _build_exceptions() -> dict[str, tuple[str, ...]]:
    table: dict[str, tuple[str, ...]] = dict(_OTHER_SPLITS)
    clitic_parts = {"d": ("d",), "dve": ("d", "ve"), "ll": ("ll",), "llve": ("ll", "ve"),
                    "re": ("re",), "s": ("s",), "ve": ("ve",), "m": ("m",)}
    for base, suffixes in _CLITIC_BASES.items():
        for suffix in suffixes.split():
            table[base + suffix] = (base, *clitic_parts[suffix])
    for base in _NEGATIONS_WITH_VE.split():
        table[base + "nt"] = (base, "nt")
        table[base + "ntve"] = (base, "nt", "ve")
    for base in _NEGATIONS.split():
        table[base + "nt"] = (base, "nt")
    for base in _MODALS_VE.split():
        table[base + "ve"] = (base, "ve")
    for hour in range(1, 13):
        table[f"{hour}am"] = (str(hour), "am")
        table[f"{hour}pm"] = (str(hour), "pm")
    return table


_EXCEPTIONS = _build_exceptions()
_UNIT_SUFFIX = re.compile(rf"^([0-9]+)({_UNITS})$")
_APOSTROPHES = re.compile(r"['\u2018\u2019`]")
_NON_ALNUM = re.compile(r"[^a-z0-9]+")


def tokenize(text: str) -> list[str]:
    """Lowercase, strip special characters, split into words.

    Accents are dropped ("cafe"), apostrophes deleted ("dog's" -> "dogs", "don't" -> "dont"),
    and every other non-alphanumeric character separates words ("t-shirt" -> "t shirt", as in
    the Karpathy tokens).
    On the result this gives the same words as `spacy.blank("en")` (whitespace tokens aside)
    without importing spaCy: its exceptions and number-unit suffixes are applied from a table.
    """
    # Accents go, letters stay ("naïve" -> "naive"), before everything else non-alphanumeric goes.
    text = unicodedata.normalize("NFKD", text.lower())
    text = _APOSTROPHES.sub("", "".join(c for c in text if not unicodedata.combining(c)))
    tokens: list[str] = []
    for word in _NON_ALNUM.split(text):
        if not word:
            continue
        if word in _EXCEPTIONS:
            tokens.extend(_EXCEPTIONS[word])
            continue
        unit = _UNIT_SUFFIX.match(word)
        if unit:
            tokens.extend(unit.groups())
        else:
            tokens.append(word)
    return tokens


# ----------------------------------------------------------------------------- vocabulary

class Vocabulary:
    """Plain data: a list of words; a word's id is its position. Specials come first."""

    def __init__(self, words: Sequence[str]):
        words = list(words)
        if tuple(words[:len(SPECIALS)]) != SPECIALS:
            raise ValueError(f"a vocabulary must start with {list(SPECIALS)}, got {words[:len(SPECIALS)]}")
        if not all(isinstance(w, str) for w in words):
            raise ValueError("a vocabulary must be a list of strings")
        if len(set(words)) != len(words):
            dupes = [w for w, c in Counter(words).items() if c > 1][:EXAMPLES_PER_REASON]
            raise ValueError(f"the vocabulary repeats words: {dupes}")
        self.words = words
        self._index = {w: i for i, w in enumerate(words)}

    @classmethod
    def build(cls, token_lists: Iterable[list[str]], min_freq: int = 5) -> Vocabulary:
        """Words seen at least `min_freq` times, most frequent first (ties alphabetical)."""
        if min_freq < 1:
            raise ValueError(f"min_freq must be >= 1, got {min_freq}")
        counts = Counter(tok for tokens in token_lists for tok in tokens)
        kept = sorted((w for w, c in counts.items() if c >= min_freq and w not in SPECIALS),
                      key=lambda w: (-counts[w], w))
        return cls([*SPECIALS, *kept])

    @property
    def pad_id(self) -> int:
        return self._index[PAD]

    @property
    def sos_id(self) -> int:
        return self._index[SOS]

    @property
    def eos_id(self) -> int:
        return self._index[EOS]

    @property
    def unk_id(self) -> int:
        return self._index[UNK]

    def __len__(self) -> int:
        return len(self.words)

    def __contains__(self, word: str) -> bool:
        return word in self._index

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.words == other.words

    def __repr__(self) -> str:
        return f"Vocabulary({len(self)} words)"

    def word_id(self, word: str) -> int:
        return self._index.get(word, self.unk_id)

    def encode(self, tokens: Sequence[str]) -> list[int]:
        """[<sos>, ids..., <eos>]; unknown words become <unk>."""
        return [self.sos_id, *(self._index.get(t, self.unk_id) for t in tokens), self.eos_id]

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Words up to the first <eos>, without <sos>/<pad>."""
        out = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i in (self.sos_id, self.pad_id):
                continue
            out.append(self.words[i])
        return out

    def to_list(self) -> list[str]:
        return list(self.words)

    @classmethod
    def from_list(cls, words: Sequence[str]) -> Vocabulary:
        return cls(words)

    def save(self, path: str | os.PathLike) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(self.words, ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Vocabulary:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"vocabulary file not found: {path}")
        try:
            words = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path} is not a JSON vocabulary file: {exc}") from None
        if not isinstance(words, list):
            raise ValueError(f"{path}: expected a JSON list of words, got {type(words).__name__}")
        return cls(words)


# ----------------------------------------------------------------------------- config

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
    lines = _read_lines(path, repaired)
    captions: dict[str, list[str]] = {}
    reader = csv.reader(lines)
    header = next(reader, None)
    if header is None:
        raise ValueError(f"{path} is empty; expected a CSV with the header image,caption")
    header = [h.strip().lower() for h in header]
    if "image" in header and "caption" in header:
        i_img, i_cap, n_cols, first = header.index("image"), header.index("caption"), len(header), 2
    else:  # no header: the first line is data
        i_img, i_cap, n_cols, first = 0, 1, 2, 1
        reader = csv.reader(lines)
    for number, row in enumerate(reader, first):
        if not row or not any(cell.strip() for cell in row):
            continue
        if len(row) <= max(i_img, i_cap):
            skipped.add("malformed_line", f"{path.name}:{number}")
            continue
        caption = row[i_cap]
        if len(row) > n_cols and i_cap == n_cols - 1:
            # An unquoted caption with commas splits into extra cells: rejoin them.
            caption = ",".join(row[i_cap:])
            repaired.add("unquoted_comma", f"{path.name}:{number}")
        name = row[i_img].strip()
        if not name:
            skipped.add("malformed_line", f"{path.name}:{number}")
            continue
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


def _read_karpathy(path: Path, root: Path, images_dir: str | None, skipped: _Tally,
                   repaired: _Tally) -> _Raw:
    raw_bytes = path.read_bytes()
    try:
        text = raw_bytes.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = raw_bytes.decode("utf-8-sig", errors="replace")
        repaired.add("non_utf8_bytes", path.name)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{path}: expected a Karpathy JSON object with an 'images' list")
    candidates = [Path(images_dir)] if images_dir else [root / n for n in _IMAGE_DIR_NAMES] + [root]
    candidates = [c for c in candidates if c.is_dir()]
    if images_dir and not candidates:
        raise FileNotFoundError(f"--images_dir {images_dir} is not a folder")
    entries = []
    for i, img in enumerate(data["images"]):
        filename = img.get("filename") if isinstance(img, dict) else None
        if not filename:
            skipped.add("malformed_entry", f"{path.name}: images[{i}]")
            continue
        entries.append(img)
    # The image folder is the candidate under which most of the first entries exist.
    probe = entries[:50]

    def rel(img: dict) -> list[Path]:
        options = [Path(img["filename"])]
        if img.get("filepath"):
            options.insert(0, Path(img["filepath"]) / img["filename"])
        return options

    def hits(base: Path) -> int:
        return sum(any((base / r).is_file() for r in rel(img)) for img in probe)

    base = max(candidates, key=hits) if candidates else root
    captions: dict[str, list[str]] = {}
    paths: dict[str, Path] = {}
    splits: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for img in entries:
        options = rel(img)
        name = str(options[0])
        if name in captions:
            skipped.add("duplicate_image_entry", name)
            continue
        paths[name] = next((base / r for r in options if (base / r).is_file()), base / options[0])
        sentences = img.get("sentences") or []
        captions[name] = [s.get("raw") or " ".join(s.get("tokens", []))
                          for s in sentences if isinstance(s, dict)]
        split = img.get("split", "train")
        split = {"restval": "train", "dev": "val", "valid": "val", "validation": "val"}.get(split, split)
        if split not in splits:
            skipped.add("unknown_split", f"{name}: {split}")
            continue
        splits[split].append(name)
    return _Raw("karpathy", root, base, captions, splits, paths)


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
        root = materialise_hf_dataset(cfg)
        splits = load_dataset(dataclasses.replace(cfg, hf_dataset=None, dataset_path=str(root)),
                              check_images=check_images)
        splits.layout = "huggingface"
        return splits
    if cfg.dataset_path is None and cfg.captions_file is None:
        root = ensure_demo_dataset(Path(cfg.demo_dir) if cfg.demo_dir else DEFAULT_DEMO_DIR)
        splits = load_dataset(dataclasses.replace(cfg, dataset_path=str(root), images_dir=None),
                              check_images=check_images)
        splits.layout = "demo"
        return splits

    skipped, repaired = _Tally(), _Tally()
    raw = _read_layout(cfg, skipped, repaired)

    # Assign splits (by image, over every captioned name, so a photo's split does not depend on
    # which other files happen to be present).
    captioned = [name for name, caps in raw.captions.items() if caps]
    if raw.splits is None:
        split_names = seeded_split(captioned, cfg.split_sizes, cfg.split_seed)
    else:
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

    # Check the files exist (one directory listing instead of a stat per image).
    listing: dict[Path, set[str]] = {}

    def exists(path: Path) -> bool:
        folder = path.parent
        if folder not in listing:
            listing[folder] = set(os.listdir(folder)) if folder.is_dir() else set()
        return path.name in listing[folder]

    # Clean the captions of the images that are there: duplicates, empties, truncation.
    truncated = 0
    out: dict[str, list[ImageRecord]] = {}
    for split, names in split_names.items():
        records = []
        for name in names:
            path = raw.paths[name] if raw.paths else raw.images_dir / name
            if not exists(path):
                skipped.add("missing_image", name)
                continue
            if check_images:
                problem = check_image_header(path)
                if problem:
                    skipped.add("unreadable_image", f"{name}: {problem}")
                    continue
            seen: set[str] = set()
            captions, tokens_list = [], []
            for caption in raw.captions[name]:
                key = caption.strip()
                if key in seen:
                    skipped.add("duplicate_caption", f"{name}: {key[:60]}")
                    continue
                seen.add(key)
                tokens = tokenize(caption)
                if not tokens:
                    skipped.add("empty_caption", name)
                    continue
                if len(tokens) > cfg.max_caption_len:
                    tokens = tokens[:cfg.max_caption_len]
                    truncated += 1
                captions.append(key)
                tokens_list.append(tokens)
            if not tokens_list:
                skipped.add("image_without_captions", name)
                continue
            records.append(ImageRecord(name, path, captions, tokens_list))
        out[split] = records
    if truncated:
        log.info("truncated %d captions to %d words", truncated, cfg.max_caption_len)
    skipped.report("skipped")
    repaired.report("read anyway")
    if not out["train"]:
        raise ValueError(f"no usable training images in {raw.root} (layout {raw.layout}); "
                         f"skipped: { {k: v['count'] for k, v in skipped.counts.items()} }")
    return DatasetSplits(raw.layout, raw.root, out["train"], out["val"], out["test"],
                         skipped.counts, repaired.counts, truncated)


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


# ----------------------------------------------------------------------------- demo data set

@dataclass(frozen=True)
class DemoSpec:
    """Everything that determines the demo set; change it here and the set is regenerated."""
    n_images: int = 3000
    image_size: int = 128
    seed: int = 0
    version: int = 1   # bump when the drawing or the captions change


DEMO = DemoSpec()
_DEMO_MARKER = ".complete.json"
_COLOURS = {"red": (220, 35, 35), "green": (35, 175, 55), "blue": (40, 70, 225), "yellow": (240, 215, 30)}
_SHAPES = ("circle", "square", "triangle")
_SIZES = {"small": 12, "large": 26}   # half-extent in pixels at 128 px
_ONE_SHAPE_TEMPLATES = ("a {a}", "there is a {a} on the background", "a picture of a {a}",
                        "a {a} on a textured background", "an image showing a {a}")
_TWO_SHAPE_TEMPLATES = ("a {a} {rel} a {b}", "a {b} {inv} a {a}", "there is a {a} {rel} a {b}",
                        "a picture of a {b} {inv} a {a}", "a {a} is {rel} a {b}")


def _demo_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Grey/brown texture: stripes plus noise, equal in all channels so it stays unsaturated."""
    base = rng.choice(np.array([[128, 124, 118], [140, 122, 104], [110, 108, 104], [150, 140, 128]],
                               dtype=np.float32))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    angle = rng.uniform(0, math.pi)
    period = rng.uniform(6, 18)
    stripes = 18 * np.sin((xx * math.cos(angle) + yy * math.sin(angle)) * 2 * math.pi / period)
    coarse = rng.normal(0, 10, (size // 8, size // 8)).repeat(8, 0).repeat(8, 1)
    fine = rng.normal(0, 8, (size, size))
    light = (stripes + coarse + fine)[..., None]          # (H, W, 1)
    return np.clip(base + light, 0, 255).astype(np.uint8)  # (H, W, 3)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, colour) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif shape == "square":
        h = r * 0.88   # similar area to the circle of radius r
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=colour)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.85), (cx + r, cy + r * 0.85)], fill=colour)


def _demo_layout(rng: random.Random, size: int) -> tuple[list[tuple[str, str, str, float, float]], str | None]:
    """Shapes (size, colour, shape, cx, cy) and the relation of the first to the second."""
    n = 1 if rng.random() < 0.5 else 2
    picks = [(rng.choice(tuple(_SIZES)), rng.choice(tuple(_COLOURS)), rng.choice(_SHAPES)) for _ in range(n)]
    margin = 3
    if n == 1:
        r = _SIZES[picks[0][0]]
        cx, cy = (rng.uniform(r + margin, size - r - margin) for _ in range(2))
        return [(*picks[0], cx, cy)], None
    ra, rb = _SIZES[picks[0][0]], _SIZES[picks[1][0]]
    horizontal = rng.random() < 0.5
    gap = 8
    while True:   # rejection sampling: the first shape before the second, clearly apart on the axis
        a = rng.uniform(ra + margin, size - ra - margin)
        b = rng.uniform(rb + margin, size - rb - margin)
        pa = rng.uniform(ra + margin, size - ra - margin)
        pb = rng.uniform(rb + margin, size - rb - margin)
        # Along the axis apart by both extents plus a gap; across it, offset at most half the
        # separation, so "left of" / "above" is the only sensible reading.
        if b - a >= ra + rb + gap and abs(pb - pa) <= 0.5 * (b - a):
            break
    if horizontal:
        return [(*picks[0], a, pa), (*picks[1], b, pb)], "left of"
    return [(*picks[0], pa, a), (*picks[1], pb, b)], "above"


def demo_example(index: int, spec: DemoSpec | None = None) -> tuple[Image.Image, list[str]]:
    """Image `index` of the demo set and its five captions (a pure function of index and spec)."""
    spec = spec or DEMO
    rng = random.Random(spec.seed * 1_000_003 + index)
    nrng = np.random.default_rng([spec.seed, index])
    img = Image.fromarray(_demo_background(nrng, spec.image_size))
    draw = ImageDraw.Draw(img)
    scale = spec.image_size / 128
    shapes, relation = _demo_layout(rng, 128)
    for size_word, colour, shape, cx, cy in shapes:
        _draw_shape(draw, shape, cx * scale, cy * scale, _SIZES[size_word] * scale, _COLOURS[colour])
    words = [f"{s} {c} {sh}" for s, c, sh, _, _ in shapes]
    if relation is None:
        captions = [t.format(a=words[0]) for t in _ONE_SHAPE_TEMPLATES]
    else:
        inverse = {"left of": "right of", "above": "below"}[relation]
        captions = [t.format(a=words[0], b=words[1], rel=relation, inv=inverse) for t in _TWO_SHAPE_TEMPLATES]
    return img, captions


def ensure_demo_dataset(root: str | os.PathLike = DEFAULT_DEMO_DIR, spec: DemoSpec | None = None) -> Path:
    """Generate the demo set into `root` (Kaggle layout) unless a complete one is already there."""
    root = Path(root)
    spec = spec or DEMO
    marker = root / _DEMO_MARKER
    wanted = dataclasses.asdict(spec)
    if marker.is_file():
        try:
            if json.loads(marker.read_text()) == wanted:
                return root
        except (OSError, json.JSONDecodeError):
            pass
    if root.exists():
        unknown = [p.name for p in root.iterdir() if p.name not in ("Images", "captions.txt", _DEMO_MARKER)]
        if unknown:
            raise ValueError(f"{root} holds files the demo generator did not write ({unknown[:3]}); "
                             "move them or choose another demo folder")
    log.info("generating the demo data set (%d images) into %s", spec.n_images, root)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.with_name(f".{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "Images").mkdir(parents=True)
    rows = []
    for i in range(spec.n_images):
        name = f"demo_{i:05d}.jpg"
        img, captions = demo_example(i, spec)
        img.save(tmp / "Images" / name, quality=92)
        rows.extend((name, c) for c in captions)
    with open(tmp / "captions.txt", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption"])
        writer.writerows(rows)
    (tmp / _DEMO_MARKER).write_text(json.dumps(wanted))   # written last: marks the set complete
    if root.exists():
        shutil.rmtree(root)
    try:
        os.replace(tmp, root)
    except OSError:   # another process finished first (e.g. a DDP rank): keep its copy
        shutil.rmtree(tmp, ignore_errors=True)
        if not (root / _DEMO_MARKER).is_file():
            raise
    return root


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


# ----------------------------------------------------------------------------- features files

class FeatureStore:
    """Read side of the public features format: features.npy (N, P, C) + names.json (+ meta.json).

    The array is memory-mapped, so opening a large file costs nothing and memory does not grow
    with it; `get` copies one image's features out as float32.
    """

    def __init__(self, directory: Path, names: list[str], array: np.ndarray, meta: dict):
        self.directory = directory
        self.names = names
        self.meta = meta
        self._array = array
        self._index = {n: i for i, n in enumerate(names)}

    @classmethod
    def open(cls, directory: str | os.PathLike) -> FeatureStore:
        directory = Path(directory)
        npy, names_file = directory / "features.npy", directory / "names.json"
        for f in (npy, names_file):
            if not f.is_file():
                raise FileNotFoundError(f"features folder {directory} has no {f.name} "
                                        "(expected features.npy + names.json)")
        try:
            array = np.load(npy, mmap_mode="r")
        except (ValueError, OSError) as exc:
            raise ValueError(f"{npy} is not a readable .npy file: {exc}") from None
        names = json.loads(names_file.read_text(encoding="utf-8"))
        if array.ndim != 3 or array.dtype not in (np.float16, np.float32):
            raise ValueError(f"{npy}: expected a (N, P, C) float16/float32 array, "
                             f"got {array.shape} {array.dtype}")
        if not isinstance(names, list) or len(names) != array.shape[0]:
            raise ValueError(f"{directory}: names.json has {len(names)} names for {array.shape[0]} rows")
        meta_file = directory / "meta.json"
        meta = json.loads(meta_file.read_text(encoding="utf-8")) if meta_file.is_file() else {}
        return cls(directory, names, array, meta)

    @property
    def num_positions(self) -> int:
        return int(self._array.shape[1])

    @property
    def channels(self) -> int:
        return int(self._array.shape[2])

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name: str) -> bool:
        return name in self._index

    def get(self, name: str) -> torch.Tensor:
        if name not in self._index:
            raise KeyError(f"{name} is not in the features file {self.directory}")
        row = np.array(self._array[self._index[name]], dtype=np.float32)   # (P, C), a copy off the map
        return torch.from_numpy(row)

    # Workers started with spawn pickle the data set: send the path, not the mapped array.
    def __getstate__(self):
        state = dict(self.__dict__)
        state["_array"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._array = np.load(self.directory / "features.npy", mmap_mode="r")


def write_features(directory: str | os.PathLike, names: Sequence[str], batches: Iterable[np.ndarray],
                   positions: int, channels: int, meta: dict | None = None) -> None:
    """Write features in the public format, atomically (a temporary folder renamed into place).

    `batches` yields (b, P, C) arrays in the order of `names`; stored as float16.
    """
    directory = Path(directory)
    names = list(names)
    if len(set(names)) != len(names):
        raise ValueError("write_features: names must be unique")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        out = np.lib.format.open_memmap(tmp / "features.npy", mode="w+", dtype=np.float16,
                                        shape=(len(names), positions, channels))
        filled = 0
        for batch in batches:
            batch = np.asarray(batch)
            if batch.ndim != 3 or batch.shape[1:] != (positions, channels):
                raise ValueError(f"write_features: batch of shape {batch.shape}, "
                                 f"expected (b, {positions}, {channels})")
            if filled + len(batch) > len(names):
                raise ValueError(f"write_features: more rows than the {len(names)} names")
            out[filled:filled + len(batch)] = batch
            filled += len(batch)
        if filled != len(names):
            raise ValueError(f"write_features: {filled} rows written for {len(names)} names")
        out.flush()
        del out
        (tmp / "names.json").write_text(json.dumps(names), encoding="utf-8")
        (tmp / "meta.json").write_text(json.dumps(meta or {}, indent=2), encoding="utf-8")
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
            os.replace(directory, old)
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
                      drop_last=drop_last, persistent_workers=num_workers > 0, generator=generator)


# ----------------------------------------------------------------------------- Hugging Face datasets

_HF_SPLIT_NAMES = {"train": "train", "validation": "val", "valid": "val", "val": "val", "dev": "val",
                   "test": "test"}
_HF_LIST_COLUMNS = ("captions", "sentences", "caption", "text", "raw")


def _hf_caption_columns(columns: Sequence[str], override: tuple[str, ...] | None) -> list[str]:
    if override:
        missing = [c for c in override if c not in columns]
        if missing:
            raise ValueError(f"--hf_caption_columns {missing} not in the data set; columns: {list(columns)}")
        return list(override)
    numbered = sorted((c for c in columns if re.fullmatch(r"(caption|sentence|text)_?\d+", c)),
                      key=lambda c: int(re.search(r"\d+", c).group()))
    if numbered:
        return numbered
    for name in _HF_LIST_COLUMNS:
        if name in columns:
            return [name]
    raise ValueError(f"no caption column found; columns: {list(columns)}; pass --hf_caption_columns")


def _hf_captions(row: dict, columns: list[str]) -> list[str]:
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


def _import_datasets():
    try:
        import datasets
    except ImportError:
        raise ValueError("--hf_dataset needs the optional `datasets` package: pip install datasets") from None
    return datasets


def _open_hf(name: str, cache_dir: Path):
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


def materialise_hf_dataset(cfg: DataConfig) -> Path:
    """Write a Hugging Face image-caption data set once into the Karpathy layout; return its folder."""
    datasets = _import_datasets()

    cache = Path(cfg.hf_cache_dir) if cfg.hf_cache_dir else DEFAULT_HF_CACHE
    ds = _open_hf(cfg.hf_dataset, cache)
    parts = dict(ds) if isinstance(ds, datasets.DatasetDict) else {"train": ds}
    fingerprint = hashlib.sha1(json.dumps(
        [cfg.hf_dataset, cfg.hf_image_column, cfg.hf_caption_columns, cfg.split_sizes, cfg.split_seed,
         sorted((k, getattr(v, "_fingerprint", "")) for k, v in parts.items())]).encode()).hexdigest()[:12]
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(cfg.hf_dataset).name or cfg.hf_dataset)[:40]
    root = cache / f"{slug}-{fingerprint}"
    if (root / "dataset_hf.json").is_file():
        return root

    first = next(iter(parts.values()))
    columns = first.column_names
    image_column = cfg.hf_image_column
    if image_column not in columns:
        guesses = [c for c, f in first.features.items() if isinstance(f, datasets.Image)]
        if image_column != DataConfig.hf_image_column or not guesses:
            raise ValueError(f"--hf_image_column {image_column} not in the data set; columns: {columns}")
        image_column = guesses[0]
    caption_columns = _hf_caption_columns(columns, cfg.hf_caption_columns)
    # Some uploads (e.g. of Flickr30k) keep the Karpathy split in a column.
    known_splits = {*_HF_SPLIT_NAMES, "restval"}
    split_column = "split" if "split" in columns and set(first.unique("split")) <= known_splits else None
    log.info("materialising Hugging Face data set %s into %s (image column %s, captions from %s)",
             cfg.hf_dataset, root, image_column, caption_columns)

    tmp = root.with_name(f".{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "images").mkdir(parents=True)
    images: list[dict] = []
    used: set[str] = set()
    split_known = split_column is not None or (all(k in _HF_SPLIT_NAMES for k in parts) and len(parts) > 1)
    for part_name, part in parts.items():
        if isinstance(part.features.get(image_column), datasets.Image):
            part = part.cast_column(image_column, datasets.Image(decode=False))
        for i, row in enumerate(part):
            fallback = f"{part_name}_{i:06d}"
            # A row without a usable image keeps a name with no file: every load then counts and
            # reports it as a missing image, like the other layouts do.
            name = _hf_write_image(row[image_column], tmp / "images", fallback, used) or f"{fallback}.jpg"
            sentences = [{"raw": c} for c in _hf_captions(row, caption_columns)]
            if split_column:
                split = row[split_column]
            else:
                split = _HF_SPLIT_NAMES.get(part_name, "train") if split_known else "train"
            images.append({"filename": name, "split": split, "sentences": sentences})
    if not split_known:   # one split only: make a seeded split by image like the Kaggle layout
        names = seeded_split([im["filename"] for im in images], cfg.split_sizes, cfg.split_seed)
        where = {n: s for s, ns in names.items() for n in ns}
        for im in images:
            im["split"] = where[im["filename"]]
    (tmp / "dataset_hf.json").write_text(json.dumps({"dataset": cfg.hf_dataset, "images": images}),
                                         encoding="utf-8")
    try:
        os.replace(tmp, root)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (root / "dataset_hf.json").is_file():
            raise
    return root


def _hf_write_image(value, folder: Path, fallback: str, used: set[str]) -> str | None:
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
    if not name or name in used or Path(name).suffix.lower() not in _IMAGE_SUFFIXES:
        try:   # name the file after what the bytes are, so viewers and PIL agree
            with Image.open(io.BytesIO(data)) as probe:
                suffix = "." + (probe.format or "jpeg").lower().replace("jpeg", "jpg")
        except _IMAGE_ERRORS:
            suffix = ".jpg"   # unreadable: written anyway, and skipped with a count when loaded
        name = fallback + suffix
    used.add(name)
    (folder / name).write_bytes(data)
    return name
