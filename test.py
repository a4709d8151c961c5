"""Caption photos with a trained checkpoint (`--mode test`) and draw attention maps.

The model is loaded once with its own preprocessing (`model.image_transform` of the
checkpoint's config), images are decoded in batches, and each caption can come with a
figure: the photo as the model saw it, then one panel per generated word with that step's
attention weights upsampled to the photo and overlaid.

Letters in shape comments: B batch, P encoder positions (S x S), C channels, L decoded
length, H/W image height/width.

This file shadows Python's standard-library `test` package and sits next to pytest's
collection: never name a function `test_*` here.
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

logger = logging.getLogger(__name__)

# Suffixes picked up when a folder is given (files named explicitly are tried whatever their name).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
FIGURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".pdf", ".svg")
DEFAULT_GRAPHS_DIR = Path("graphs")


def resolve_device(device: str = "auto"):
    """`auto` picks the GPU when there is one, else the CPU; anything else is passed to torch."""
    import torch

    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"--device {device!r} is not a device (expected auto, cpu, cuda, cuda:N): {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device!r} asked for a GPU but torch sees none; use --device cpu")
    return dev


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


def open_image(path: Path):
    """The photo as RGB PIL image; ValueError naming the file when it cannot be read as one."""
    import data_utils

    if not os.access(path, os.R_OK):
        raise ValueError(f"image {path} is not readable (permission denied)")
    try:
        return data_utils.load_image(path)
    except (ValueError, OSError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if str(path) in reason:
            raise ValueError(reason) from None
        raise ValueError(f"{path} is not a readable image: {reason}") from None


@dataclass
class Captioner:
    """A loaded model with everything needed to caption photos."""
    model: object          # model.CaptionModel, eval mode, on `device`
    vocab: object          # data_utils.Vocabulary
    model_cfg: object      # model.ModelConfig
    transform: object      # PIL image -> (3, H, W) tensor
    device: object         # torch.device
    source: str            # the checkpoint path, for messages
    epoch: int | None = None  # training epoch the checkpoint was saved at
    features: dict | None = None  # the features directory a features model was trained on


def load_captioner(checkpoint, device="auto", *, need_encoder: bool = True) -> Captioner:
    """Load a checkpoint (a path, or a dict already loaded) once, ready to caption.

    With `need_encoder` a checkpoint trained on external features is refused: it has no CNN
    to turn a photo into features.
    """
    import checkpoint as ckpt_mod
    import model as model_mod

    if isinstance(checkpoint, dict):
        ckpt, source = checkpoint, "checkpoint"
    else:
        ckpt, source = ckpt_mod.load_checkpoint(checkpoint), str(checkpoint)
    encoder = (ckpt.get("model_config") or {}).get("encoder")
    if need_encoder and encoder == "features":
        feats = ckpt.get("features") or {}
        where = f" ({feats.get('path') or feats.get('key')})" if isinstance(feats, dict) and feats else ""
        raise ValueError(f"checkpoint {source} was trained on precomputed features{where}: it has no "
                         f"image encoder, so it cannot caption photos; use a checkpoint trained on "
                         f"images, or --mode eval with the same features directory")
    model, vocab, cfg = ckpt_mod.model_from_checkpoint(ckpt)
    dev = resolve_device(device)
    model.to(dev).eval()
    transform = model_mod.image_transform(cfg, train=False) if cfg.encoder != "features" else None
    return Captioner(model, vocab, cfg, transform, dev, source, ckpt.get("epoch"), ckpt.get("features"))


def decode_images(captioner: Captioner, inputs, decode_cfg):
    """Caption a batch of model inputs (B, 3, H, W): (word lists, (L, P) attention tensors on CPU)."""
    import torch

    import model as model_mod

    with torch.inference_mode():
        feats = captioner.model.encode(inputs.to(captioner.device))  # (B, P, C)
        out = model_mod.decode(captioner.model, feats, sos_id=captioner.vocab.sos_id,
                               eos_id=captioner.vocab.eos_id, unk_id=captioner.vocab.unk_id,
                               cfg=decode_cfg)
    words = [captioner.vocab.decode(ids) for ids in out.tokens]
    alphas = [a.detach().float().cpu() for a in out.alphas]
    return words, alphas


def caption_paths(paths: list, checkpoint, decode_cfg, device="auto", *, batch_size: int = 16,
                  return_details: bool = False):
    """Caption image files and/or folders with one model load; returns [(path, caption)].

    `checkpoint` is a path or an already loaded checkpoint dict. With `return_details`, each
    item is a dict with the path, caption, words, attention (L, P) and the model input (3, H, W).
    """
    import torch

    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    files = collect_images(paths)
    captioner = load_captioner(checkpoint, device)
    results = []
    for start in range(0, len(files), batch_size):
        chunk = files[start:start + batch_size]
        inputs = torch.stack([captioner.transform(open_image(p)) for p in chunk])  # (B, 3, H, W)
        words, alphas = decode_images(captioner, inputs, decode_cfg)
        for p, x, w, a in zip(chunk, inputs, words, alphas):
            if return_details:
                results.append({"path": str(p), "caption": " ".join(w), "words": w, "alphas": a, "input": x})
            else:
                results.append((str(p), " ".join(w)))
    return results


# ---------------------------------------------------------------- attention figure

def display_image(x) -> "np.ndarray":
    """Undo the ImageNet normalisation of a (3, H, W) model input: (H, W, 3) floats in [0, 1]."""
    import numpy as np

    from model import IMAGENET_MEAN, IMAGENET_STD

    arr = x.detach().float().cpu().numpy()  # (3, H, W)
    arr = arr * np.array(IMAGENET_STD)[:, None, None] + np.array(IMAGENET_MEAN)[:, None, None]
    return np.clip(arr.transpose(1, 2, 0), 0.0, 1.0)  # (H, W, 3)


def attention_figure(photo, words: Sequence[str], alphas, *, title: str | None = None,
                     max_cols: int = 5):
    """Figure: the photo, then one panel per word with its attention upsampled and overlaid.

    `photo` is (H, W, 3) in [0, 1] (`display_image` of the model input, so the attention grid
    lines up with what the model saw) or a PIL image; `alphas` is (L, P) with P = S*S, L >= len(words)
    (a step for `<eos>` may follow the words; it is not drawn). Each panel's weights are
    stretched to their own min..max and drawn as shade: the photo stays bright where the model
    looked most for that word and darkens where it looked least (a colour map over the photo
    would hide the colours the words name). A word whose attention is uniform is marked
    "(uniform)" and left unshaded.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch
    import torch.nn.functional as F

    import numpy as np

    if not isinstance(photo, np.ndarray):  # a PIL image: shown whole, attention stretched over it
        photo = np.asarray(photo.convert("RGB"), dtype=np.float32) / 255.0  # (H, W, 3)
    h, w = photo.shape[:2]
    n_words = len(words)
    alphas = torch.as_tensor(alphas, dtype=torch.float32)
    if alphas.dim() != 2 or alphas.shape[0] < n_words:
        raise ValueError(f"attention of shape {tuple(alphas.shape)} does not cover {n_words} words")
    side = math.isqrt(alphas.shape[1])
    if side * side != alphas.shape[1]:
        raise ValueError(f"attention over {alphas.shape[1]} positions is not a square grid")
    maps = alphas[:n_words].view(n_words, 1, side, side)  # (L, 1, S, S)
    maps = F.interpolate(maps, size=(h, w), mode="bilinear", align_corners=False)[:, 0]  # (L, H, W)
    low = maps.flatten(1).amin(dim=1)[:, None, None]  # (L, 1, 1)
    spread = maps.flatten(1).amax(dim=1)[:, None, None] - low  # (L, 1, 1)
    # Min-max per word, so a peak shows even when the weights are spread out; attention that
    # is (almost) uniform has nothing to show and stays dark instead of turning all red.
    flat = spread < 1e-3 * alphas[:n_words].mean(dim=1).clamp_min(1e-12)[:, None, None]
    maps = torch.where(flat, torch.zeros_like(maps), (maps - low) / spread.clamp_min(1e-12)).numpy()
    flat = flat.flatten().tolist()

    panels = n_words + 1
    cols = min(max_cols, panels)
    rows = math.ceil(panels / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.8 * rows), squeeze=False,
                             layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    axes.flat[0].imshow(photo)
    axes.flat[0].set_title(title or "input", fontsize=9)
    for i, word in enumerate(words):
        ax = axes.flat[i + 1]
        ax.imshow(photo)
        shade = np.zeros((h, w, 4), dtype=np.float32)  # (H, W, RGBA): black, opacity from attention
        shade[..., 3] = 0.0 if flat[i] else 0.8 * (1.0 - maps[i])
        ax.imshow(shade)
        ax.set_title(f"{word} (uniform)" if flat[i] else word, fontsize=11)
    fig.suptitle(" ".join(words) or "(empty caption)", fontsize=11)
    return fig


def save_attention_figure(path: Path, photo, words, alphas, title: str | None = None) -> Path:
    """Draw and save the attention figure; the PNG keeps the words as metadata (Description)."""
    import matplotlib.pyplot as plt

    fig = attention_figure(photo, words, alphas, title=title)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"panels": len(words) + 1, "words": list(words)}
    kwargs = {"metadata": {"Description": json.dumps(meta)}} if path.suffix.lower() == ".png" else {}
    fig.savefig(path, dpi=100, **kwargs)
    plt.close(fig)
    return path


def attention_paths(target: str | None, images: Sequence[str]) -> list[Path]:
    """Where each image's attention figure goes.

    `target` empty: `graphs/attention_<image stem>.png`. A file name (one image): that file.
    A file name with several images: `<stem>_<image stem><suffix>` beside it. A folder (an
    existing one, or a name without a figure suffix): `<folder>/attention_<image stem>.png`.
    """
    stems = _unique_stems(images)
    if not target:
        return [DEFAULT_GRAPHS_DIR / f"attention_{s}.png" for s in stems]
    t = Path(target)
    if t.is_dir() or t.suffix.lower() not in FIGURE_SUFFIXES:
        if t.suffix and not t.is_dir():
            raise ValueError(f"--attention_map {target}: expected a folder or a file ending in "
                             f"{', '.join(FIGURE_SUFFIXES)}")
        return [t / f"attention_{s}.png" for s in stems]
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


# ---------------------------------------------------------------- the command

def run_test(image_paths: Sequence[str], checkpoint_path, decode_cfg, *, output: str | None = None,
             attention_map: str | None = None, device: str = "auto", batch_size: int = 16) -> list[dict]:
    """`--mode test`: caption the images, print them (or write JSON), draw attention maps.

    `attention_map` None: no figures; "" (the flag alone): default location in graphs/.
    Prints one caption per image (just the caption for a single image; `path<TAB>caption` for
    several). With `output`, writes a JSON list of {"image", "caption"} and prints its path.
    """
    if output is not None and Path(output).suffix.lower() != ".json":
        raise ValueError(f"--output {output}: expected a file name ending in .json")
    if output is not None and Path(output).is_dir():
        raise ValueError(f"--output {output} is a folder, expected a .json file name")
    want_maps = attention_map is not None
    results = caption_paths(list(image_paths), checkpoint_path, decode_cfg, device,
                            batch_size=batch_size, return_details=want_maps)
    rows = []
    if want_maps:
        targets = attention_paths(attention_map, [r["path"] for r in results])
        for r, target in zip(results, targets):
            save_attention_figure(target, display_image(r["input"]), r["words"], r["alphas"],
                                  title=Path(r["path"]).name)
            logger.info("attention map for %s: %s", r["path"], target)
            rows.append({"image": r["path"], "caption": r["caption"], "attention_map": str(target)})
    else:
        rows = [{"image": p, "caption": c} for p, c in results]

    if output is not None:
        out = Path(output)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(json.dumps(rows, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, out)
        print(f"wrote {len(rows)} caption(s) to {out}")
    elif len(rows) == 1:
        print(rows[0]["caption"])
    else:
        for row in rows:
            print(f"{row['image']}\t{row['caption']}")
    return rows
