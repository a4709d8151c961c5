"""Every matplotlib figure of the toolkit: training curves, attention maps (and eval pictures).

Figures are `matplotlib.figure.Figure` objects made without pyplot: no global backend or figure
registry, so they work headless and never need closing. Callers save them through `save_figure`.

Letters in shape comments: L decoded length, P encoder positions (S x S), H/W image height/width.
"""
from __future__ import annotations

import io
import json
import math
import textwrap
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
    """{"loss.png": train and val loss, "bleu.png": validation BLEU-1..4, "cider.png": validation
    CIDEr-D (and SCST's reward and baseline), "sample_length.png" (SCST)} against epoch."""
    epochs = [h["epoch"] for h in history]
    curves = {
        "loss.png": ("Loss (cross-entropy + attention term)", "loss",
                     {"train": [h["loss"] for h in history],
                      "validation": [h["val_loss"] for h in history]}),
        "bleu.png": ("Validation BLEU (greedy decoding)", "score",
                     {f"BLEU-{n}": [h[f"bleu{n}"] for h in history] for n in range(1, 5)}),
    }
    nan = float("nan")
    if any("cider" in h for h in history):
        curves["cider.png"] = ("CIDEr-D: validation (greedy), training samples (SCST)", "CIDEr-D",
                               {label: [h.get(key, nan) for h in history] for key, label in (
                                   ("cider", "validation"), ("reward", "sample reward"),
                                   ("baseline", "baseline")) if any(key in h for h in history)})
    if any("sample_len" in h for h in history):
        curves["sample_length.png"] = ("Mean length of the sampled captions (SCST)", "words",
                                       {"samples": [h.get("sample_len", nan) for h in history]})
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
    """graphs/loss.png, bleu.png, cider.png and (SCST) sample_length.png (see `history_figures`),
    written atomically."""
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


# ---------------------------------------------------------------- evaluation

def score_density(values, grid: np.ndarray) -> np.ndarray | None:
    """Gaussian kernel density of `values` on `grid`; None when degenerate.

    Silverman's robust bandwidth (the smaller of the std and IQR/1.34): per-image caption
    scores pile up at 0 and 1, and the plain std rule smooths those piles away.
    """
    v = np.asarray(values, dtype=float)
    if v.size < 2 or float(v.std()) == 0.0:
        return None
    q75, q25 = np.percentile(v, [75, 25])
    spread = min(v.std(ddof=1), (q75 - q25) / 1.34) or v.std(ddof=1)
    bw = 0.9 * spread * v.size ** (-1 / 5)
    z = (grid[:, None] - v[None, :]) / bw  # (G, N): G grid points, N images
    return np.exp(-0.5 * z * z).sum(axis=1) / (v.size * bw * math.sqrt(2 * math.pi))


def score_histograms(per_image: dict[str, dict[str, float | None]], metrics: Sequence[str],
                     title: str = "") -> Figure:
    """Histograms (density scale) with a kernel density curve of each per-image metric
    (up to four: `metrics`, e.g. metrics.PER_IMAGE); an unavailable one gets a note."""
    fig = Figure(figsize=(10, 7), layout="constrained")
    for ax, metric in zip(fig.subplots(2, 2).flat, metrics):
        values = [s[metric] for s in per_image.values() if s.get(metric) is not None]
        ax.set_title(metric)
        if not values:
            ax.text(0.5, 0.5, f"{metric} unavailable", ha="center", va="center", transform=ax.transAxes)
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        v = np.asarray(values, dtype=float)
        bins = min(30, max(5, int(math.sqrt(v.size)) + 1))
        ax.hist(v, bins=bins, density=True, color="#9ecae1", edgecolor="#3182bd", label="images")
        # The curve stays within the observed range: scores outside it do not exist.
        grid = np.linspace(float(v.min()), float(v.max()), 200)
        dens = score_density(v, grid)
        if dens is not None:
            ax.plot(grid, dens, color="#08519c", lw=2, label="density")
        ax.axvline(v.mean(), color="#de2d26", ls="--", lw=1.5, label=f"mean {v.mean():.3f}")
        ax.set(xlabel=f"per-image {metric}", ylabel="density")
        ax.legend(fontsize=8)
    fig.suptitle(title or "per-image scores", fontsize=11)
    return fig


def caption_grid(items: list[dict], title: str = "", cols: int = 3) -> Figure:
    """Grid of images, each with its generated caption and two references underneath.

    `items`: dicts with "image" ((H, W, 3) array, or None: a grey box is drawn), "name",
    "caption", "references" and optionally "score" (per-image CIDEr-D).
    """
    n = max(1, len(items))
    cols = min(cols, n)
    rows = math.ceil(n / cols)
    # Each image gets a text panel under it, so captions never run into the next row.
    fig = Figure(figsize=(4.2 * cols, 5.2 * rows), layout="constrained")
    axes = fig.subplots(2 * rows, cols, squeeze=False, gridspec_kw={"height_ratios": [3.2, 1.0] * rows})
    for ax in axes.flat:
        ax.axis("off")
    for i, item in enumerate(items):
        ax, text_ax = axes[2 * (i // cols), i % cols], axes[2 * (i // cols) + 1, i % cols]
        if item.get("image") is None:
            ax.imshow(np.full((8, 8, 3), 0.8))
            ax.text(0.5, 0.5, "image file not available", ha="center", va="center",
                    transform=ax.transAxes, fontsize=8)
        else:
            ax.imshow(item["image"])
        head = item["name"] if item.get("score") is None else f"{item['name']}  CIDEr-D {item['score']:.2f}"
        ax.set_title(head, fontsize=8)
        lines = [textwrap.fill("generated: " + (item["caption"] or "(empty)"), 50)]
        lines += [textwrap.fill(f"ref {j}: {ref}", 50) for j, ref in enumerate(item["references"][:2], 1)]
        text_ax.text(0.0, 1.0, "\n".join(lines), transform=text_ax.transAxes, va="top", ha="left", fontsize=8)
    fig.suptitle(title, fontsize=11)
    return fig
