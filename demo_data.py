"""The demo data set: synthetic shapes with captions that state what is drawn (Kaggle layout).

`ensure_demo_dataset` generates it once into data/demo/ (seeded, so every run gets the same
images and captions); `load_dataset` reads it when no data set is given.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from fileio import publish_folder, write_json

log = logging.getLogger(__name__)

DEFAULT_DEMO_DIR = Path(__file__).resolve().parent / "data" / "demo"


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


def _is_complete(root: Path, wanted: dict) -> bool:
    try:
        return json.loads((root / _DEMO_MARKER).read_text()) == wanted
    except (OSError, json.JSONDecodeError):
        return False


def _write_demo(folder: Path, spec: DemoSpec) -> None:
    """Images, captions.txt, then the marker: written last, it says the set is complete."""
    (folder / "Images").mkdir(parents=True)
    rows = []
    for i in range(spec.n_images):
        name = f"demo_{i:05d}.jpg"
        img, captions = demo_example(i, spec)
        img.save(folder / "Images" / name, quality=92)
        rows.extend((name, c) for c in captions)
    with open(folder / "captions.txt", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption"])
        writer.writerows(rows)
    write_json(folder / _DEMO_MARKER, dataclasses.asdict(spec))


def ensure_demo_dataset(root: str | os.PathLike | None = None, spec: DemoSpec | None = None) -> Path:
    """Generate the demo set into `root` (default DEFAULT_DEMO_DIR, Kaggle layout) unless a
    complete one is already there; the folder is written aside and renamed into place."""
    root = Path(root) if root is not None else DEFAULT_DEMO_DIR
    spec = spec or DEMO
    if _is_complete(root, dataclasses.asdict(spec)):
        return root
    if root.exists():
        unknown = [p.name for p in root.iterdir() if p.name not in ("Images", "captions.txt", _DEMO_MARKER)]
        if unknown:
            raise ValueError(f"{root} holds files the demo generator did not write ({unknown[:3]}); "
                             "move them or choose another demo folder")
    log.info("generating the demo data set (%d images) into %s", spec.n_images, root)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.with_name(f".{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    _write_demo(tmp, spec)
    if root.exists():
        shutil.rmtree(root)
    return publish_folder(tmp, root, _DEMO_MARKER)
