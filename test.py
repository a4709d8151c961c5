"""Caption photos with a trained checkpoint (`--mode test`) and draw their attention maps.

The model is loaded once with its own preprocessing (`model.image_transform` of the
checkpoint's config); the photos go through data_utils' ImageDataset and loader and are
decoded by `decoding.caption_loader`, the one "decode a loader" helper that validation and
`--mode eval` use too. Each caption can come with a figure (plots.attention_figure): the photo
as the model saw it, then one panel per word with that step's attention overlaid.

Letters in shape comments: H/W image height/width.

This file shadows Python's standard-library `test` package and sits next to pytest's
collection: never name a function `test_*` here.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from PIL import Image

import checkpoint as ckpt_lib
import data_utils
import decoding
import devices
import fileio
import plots
from config import DecodeConfig
from config import Preprocess
from model import CaptionModel, image_transform

logger = logging.getLogger(__name__)

# Suffixes picked up when a folder is given (files named explicitly are tried whatever their name).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
FIGURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".pdf", ".svg")
DEFAULT_GRAPHS_DIR = Path("graphs")


@dataclass
class Captioner:
    """A loaded model with everything needed to caption photos."""
    model: CaptionModel           # eval mode, on `device`
    vocab: object                 # text.Vocabulary
    model_cfg: object             # config.ModelConfig
    transform: object             # PIL image -> (3, H, W) tensor; None for a features model
    device: torch.device
    source: str                   # the checkpoint path, for messages
    epoch: int | None = None      # training epoch the checkpoint was saved at
    features: dict | None = None  # the features directory a features model was trained on
    decoding: dict | None = None  # an exported folder's default decoding settings

    def decode_config(self, given: DecodeConfig | dict | None) -> DecodeConfig:
        """A DecodeConfig as given; else the folder's defaults with `given` (the flags typed) on top."""
        return ckpt_lib.decode_config_from({"decoding": self.decoding}, given)


def load_captioner(checkpoint, device="auto", *, need_encoder: bool = True) -> Captioner:
    """Load a checkpoint (a path, or a dict already loaded) once, ready to caption.

    With `need_encoder` a checkpoint trained on external features is refused: it has no CNN
    to turn a photo into features.
    """
    if isinstance(checkpoint, dict):
        ckpt, source = checkpoint, "checkpoint"
    else:
        ckpt, source = ckpt_lib.load_checkpoint(checkpoint), str(checkpoint)
    encoder = (ckpt.get("model_config") or {}).get("encoder")
    if need_encoder and encoder == "features":
        feats = ckpt.get("features") or {}
        where = f" ({feats.get('dir') or feats.get('key')})" if feats else ""
        raise ValueError(f"checkpoint {source} was trained on precomputed features{where}: it has no "
                         f"image encoder, so it cannot caption photos; use a checkpoint trained on "
                         f"images, or --mode eval with the same features directory")
    dev = devices.resolve_device(device)
    model, vocab, cfg = ckpt_lib.model_from_checkpoint(ckpt)
    model.to(dev).eval()
    transform = image_transform(cfg, train=False) if cfg.encoder != "features" else None
    return Captioner(model, vocab, cfg, transform, dev, source, ckpt.get("epoch"), ckpt.get("features"),
                     ckpt.get("decoding"))


# ---------------------------------------------------------------- photos

def collect_images(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Expand files and folders into image files, in the order given (folders sorted by name).

    Raises FileNotFoundError for a path that does not exist and ValueError for a folder
    holding no image files. Files named explicitly are kept whatever their suffix: whether
    they are images is found out when they are opened.
    """
    out: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if not p.exists():
            raise FileNotFoundError(f"image path {p} does not exist")
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise ValueError(f"folder {p} holds no images (looked for {', '.join(IMAGE_SUFFIXES)})")
            out.extend(found)
        else:
            out.append(p)
    if not out:
        raise ValueError("no image given: pass --image_path FILE_OR_FOLDER [...]")
    return out


def open_image(path: Path) -> Image.Image:
    """The photo as an RGB PIL image; ValueError naming the file when it cannot be read as one."""
    if not os.access(path, os.R_OK):
        raise ValueError(f"image {path} is not readable (permission denied)")
    try:
        return data_utils.load_image(path)
    except (ValueError, OSError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if str(path) in reason:
            raise ValueError(reason) from None
        raise ValueError(f"{path} is not a readable image: {reason}") from None


def caption_files(captioner: Captioner, files: Sequence[Path], decode_cfg: DecodeConfig, *,
                  batch_size: int = 16, num_workers: int = 0) -> list[decoding.Caption]:
    """Caption image files in batches: one `decoding.Caption` per file, in order.

    A photo the user names must be captioned or refused, never skipped: every file is opened
    once up front (a one-line error before the model runs), and one that breaks later is an
    error too.
    """
    if batch_size < 1:
        raise ValueError(f"--batch_size must be at least 1, got {batch_size}")
    if captioner.transform is None:
        raise ValueError(f"checkpoint {captioner.source} reads features, not photos")
    for path in files:
        open_image(path)
    records = [data_utils.ImageRecord(name=str(p), path=Path(p), captions=[], tokens=[]) for p in files]
    dataset = data_utils.ImageDataset(records, transform=captioner.transform)
    loader = data_utils.make_loader(dataset, batch_size, shuffle=False, num_workers=num_workers)
    captions, n_skipped = decoding.caption_loader(
        captioner.model, loader, captioner.vocab, decode_cfg, captioner.device,
        desc="captioning", show_progress=len(files) > batch_size)
    if n_skipped:
        missing = sorted(set(range(len(files))) - {c.index for c in captions})
        raise ValueError(f"{files[missing[0]]} could not be read as an image"
                         + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return captions


def caption_paths(paths: Sequence, checkpoint, decode_cfg: DecodeConfig, device="auto", *,
                  batch_size: int = 16, num_workers: int = 0) -> list[tuple[str, str]]:
    """Caption image files and/or folders with one model load: [(path, caption)].

    `checkpoint` is a path or an already loaded checkpoint dict.
    """
    files = collect_images(paths)
    captioner = load_captioner(checkpoint, device)
    captions = caption_files(captioner, files, decode_cfg, batch_size=batch_size, num_workers=num_workers)
    return [(str(files[c.index]), " ".join(c.words)) for c in captions]


# ---------------------------------------------------------------- attention figures

def display_image(x: torch.Tensor, preprocess: Preprocess) -> np.ndarray:
    """Undo the model's normalisation of a (3, H, W) input: (H, W, 3) floats in [0, 1]."""
    arr = x.detach().float().cpu().numpy()  # (3, H, W)
    arr = arr * np.array(preprocess.std)[:, None, None] + np.array(preprocess.mean)[:, None, None]
    return np.clip(arr.transpose(1, 2, 0), 0.0, 1.0)  # (H, W, 3)


def attention_paths(target: str | None, images: Sequence[str]) -> list[Path]:
    """Where each image's attention figure goes.

    `target` empty: `graphs/attention_<image stem>.png`. A file name (one image): that file.
    A file name with several images: `<stem>_<image stem><suffix>` beside it. A folder (an
    existing one, or a name without a figure suffix): `<folder>/attention_<image stem>.png`.
    """
    stems = _unique_stems(images)
    if not target:
        fileio.check_folder(DEFAULT_GRAPHS_DIR, "--attention_map")
        return [DEFAULT_GRAPHS_DIR / f"attention_{s}.png" for s in stems]
    t = Path(target)
    if t.is_dir() or t.suffix.lower() not in FIGURE_SUFFIXES:
        if t.suffix and not t.is_dir():
            raise ValueError(f"--attention_map {target}: expected a folder or a file ending in "
                             f"{', '.join(FIGURE_SUFFIXES)}")
        fileio.check_folder(t, f"--attention_map {target}")
        return [t / f"attention_{s}.png" for s in stems]
    fileio.check_folder(t.parent, f"--attention_map {target}")
    if len(stems) == 1:
        return [t]
    return [t.with_name(f"{t.stem}_{s}{t.suffix}") for s in stems]


def _unique_stems(images: Sequence[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for img in images:
        stem = Path(img).stem
        n = seen.get(stem, 0)
        seen[stem] = n + 1
        out.append(stem if n == 0 else f"{stem}_{n}")
    return out


def save_attention_maps(captioner: Captioner, files: Sequence[Path], captions, paths: Sequence[Path]) -> list[Path]:
    """One figure per photo (at `paths`), drawn on the crop the model saw so the attention grid lines up."""
    for path, file, cap in zip(paths, files, captions):
        photo = display_image(captioner.transform(open_image(file)), captioner.model_cfg.preprocess)  # (H, W, 3)
        plots.save_attention_figure(path, photo, cap.words, cap.alphas, title=file.name)
        logger.info("attention map for %s: %s", file, path)
    return paths


# ---------------------------------------------------------------- the command

def _check_output(output: str | None) -> None:
    if output is None:
        return
    if Path(output).is_dir():
        raise ValueError(f"--output {output} is a folder, expected a .json file name")
    if Path(output).suffix.lower() != ".json":
        raise ValueError(f"--output {output}: expected a file name ending in .json")
    fileio.check_folder(Path(output).parent, f"--output {output}")


def _protect_earlier_files(output: str | None, figures: Sequence[Path], overwrite: bool) -> None:
    """Nothing an earlier run wrote is replaced unless `overwrite` (the policy of training's files)."""
    fileio.refuse_to_replace([Path(output)] if output is not None else [], overwrite=overwrite,
                             what="exists", ways_out="--overwrite to replace it, or another --output FILE.json")
    found = fileio.refuse_to_replace(figures, overwrite=overwrite, what="holds an earlier attention figure",
                                     ways_out="--overwrite to replace it, or --attention_map NEW_FOLDER")
    if found:
        logger.warning("--overwrite: replacing the earlier attention figures %s", ", ".join(map(str, found)))


def run_test(image_paths: Sequence[str], checkpoint, decode_cfg: DecodeConfig | dict | None = None, *,
             output: str | None = None, attention_map: str | None = None, device: str = "auto",
             batch_size: int = 16, num_workers: int = 0, threads: int | None = None,
             overwrite: bool = False) -> list[dict]:
    """`--mode test`: caption the images, print them (or write JSON), draw attention maps.

    `decode_cfg`: a DecodeConfig, or the decoding flags typed (a dict, None: none) over the
    checkpoint's own defaults (an exported folder's `decoding`, else DecodeConfig's).
    `attention_map` None: no figures; "" (the flag alone): default location in graphs/.
    Prints one caption per image (just the caption for a single image; `path<TAB>caption` for
    several). With `output`, writes a JSON list of {"image", "caption"} and prints its path.
    An existing `output` or attention figure is refused (before the model loads) unless `overwrite`.
    """
    _check_output(output)
    devices.set_threads(threads)
    files = collect_images(image_paths)
    figures = attention_paths(attention_map, [str(p) for p in files]) if attention_map is not None else []
    _protect_earlier_files(output, figures, overwrite)
    captioner = load_captioner(checkpoint, device)
    captions = caption_files(captioner, files, captioner.decode_config(decode_cfg), batch_size=batch_size,
                             num_workers=num_workers)
    rows = [{"image": str(files[c.index]), "caption": " ".join(c.words)} for c in captions]
    if attention_map is not None:
        for row, path in zip(rows, save_attention_maps(captioner, files, captions, figures)):
            row["attention_map"] = str(path)
    if output is not None:
        fileio.write_json(output, rows)
        print(f"wrote {len(rows)} caption(s) to {output}")
    elif len(rows) == 1:
        print(rows[0]["caption"])
    else:
        for row in rows:
            print(f"{row['image']}\t{row['caption']}")
    return rows
