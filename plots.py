"""Every matplotlib figure of the toolkit: training curves, attention maps (and eval pictures).

Figures are `matplotlib.figure.Figure` objects made without pyplot: no global backend or figure
registry, so they work headless and never need closing. Callers save them through `save_figure`.

Letters in shape comments: L decoded length, P encoder positions (S x S), H/W image height/width.
"""
from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from PIL import Image

import fileio


def save_figure(fig: Figure, path: str | Path, *, dpi: int = 100, metadata: dict | None = None) -> Path:
    """Write `fig` atomically (fileio), in the format its suffix names."""
    path = Path(path)
    fmt = path.suffix.lower().lstrip(".") or "png"
    kwargs = {"metadata": metadata} if metadata and fmt == "png" else {}
    return fileio.atomic_write(path, lambda f: fig.savefig(f, format=fmt, dpi=dpi, **kwargs))


def figure_image(fig: Figure, size: tuple[float, float] = (12.0, 6.0), dpi: int = 80) -> np.ndarray:
    """`fig` rendered at a fixed size (inches) as an (H, W, 3) uint8 array.

    wandb shows a list of images well only when they share one size, while an attention
    figure's natural size grows with its caption's length.
    """
    fig.set_size_inches(*size)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    buf.seek(0)
    return np.asarray(Image.open(buf).convert("RGB"))


# ---------------------------------------------------------------- training curves

def history_figures(history: list[dict]) -> dict[str, Figure]:
    """{"loss.png": train and val loss, "bleu.png": validation BLEU-1..4} against epoch."""
    epochs = [h["epoch"] for h in history]
    curves = {
        "loss.png": ("Loss (cross-entropy + attention term)", "loss",
                     {"train": [h["loss"] for h in history],
                      "validation": [h["val_loss"] for h in history]}),
        "bleu.png": ("Validation BLEU (greedy decoding)", "score",
                     {f"BLEU-{n}": [h[f"bleu{n}"] for h in history] for n in range(1, 5)}),
    }
    figures = {}
    for name, (title, ylabel, lines) in curves.items():
        fig = Figure(figsize=(6, 4))
        # Fixed margins: tight_layout costs more than the rest of the plot together.
        fig.subplots_adjust(left=0.12, right=0.97, top=0.92, bottom=0.12)
        ax = fig.subplots()
        for label, ys in lines.items():
            ax.plot(epochs, ys, "o-", label=label, markersize=3)
        ax.set(xlabel="epoch", ylabel=ylabel, title=title)
        ax.legend()
        ax.grid(alpha=0.3)
        figures[name] = fig
    return figures


def plot_history(history: list[dict], graphs_dir: str | Path) -> list[Path]:
    """graphs/loss.png and graphs/bleu.png (see `history_figures`), written atomically."""
    graphs_dir = Path(graphs_dir)
    return [save_figure(fig, graphs_dir / name, dpi=90) for name, fig in history_figures(history).items()]


# ---------------------------------------------------------------- attention

def _attention_maps(alphas, n_words: int, h: int, w: int) -> tuple[np.ndarray, list[bool]]:
    """Per-word attention (L, H, W) stretched to [0, 1], and which words' attention is uniform."""
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
    maps = torch.where(flat, torch.zeros_like(maps), (maps - low) / spread.clamp_min(1e-12))
    return maps.numpy(), flat.flatten().tolist()


def attention_figure(photo, words: Sequence[str], alphas, *, title: str | None = None,
                     max_cols: int = 5) -> Figure:
    """Figure: the photo, then one panel per word with its attention upsampled and overlaid.

    `photo` is (H, W, 3) in [0, 1] (the model input with the normalisation undone, so the
    attention grid lines up with what the model saw) or a PIL image; `alphas` is (L, P) with
    P = S*S, L >= len(words) (a step for `<eos>` may follow the words; it is not drawn). Each
    panel's weights are stretched to their own min..max and drawn as shade: the photo stays
    bright where the model looked most for that word and darkens where it looked least (a colour
    map over the photo would hide the colours the words name). A word whose attention is uniform
    is marked "(uniform)" and left unshaded.
    """
    if not isinstance(photo, np.ndarray):  # a PIL image: shown whole, attention stretched over it
        photo = np.asarray(photo.convert("RGB"), dtype=np.float32) / 255.0  # (H, W, 3)
    h, w = photo.shape[:2]
    maps, flat = _attention_maps(alphas, len(words), h, w)  # (L, H, W)
    panels = len(words) + 1
    cols = min(max_cols, panels)
    rows = math.ceil(panels / cols)
    fig = Figure(figsize=(2.4 * cols, 2.8 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
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


def save_attention_figure(path: str | Path, photo, words: Sequence[str], alphas,
                          title: str | None = None) -> Path:
    """Draw and save the attention figure; a PNG keeps the words as metadata (Description)."""
    fig = attention_figure(photo, words, alphas, title=title)
    meta = {"panels": len(words) + 1, "words": list(words)}
    return save_figure(fig, path, metadata={"Description": json.dumps(meta)})
