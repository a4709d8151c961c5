"""The report page of one evaluation: `eval_<split>.html`, one self-contained file.

`web/eval_report.html` is the page (markup, style and script); this module fills it with one JSON
object: the settings, metrics with intervals, diagnostics, the histogram picture, attention maps of
a sample of images and every image's thumbnail, captions and scores. Pictures are embedded as data
URIs, so the page needs nothing else: it opens offline, survives being moved or mailed, and does not
depend on where the data set lives on the machine that evaluated (paths relative to the data set
would break as soon as the page left that machine). The cost is size: a thumbnail of at most
THUMB_SIZE px is 3-5 kB, about 5 MB for 1,000 images.
"""
from __future__ import annotations

import base64
import io
import json
import logging
from pathlib import Path

import numpy as np
from PIL import Image

import data_utils
import diagnostics
import fileio
import plots

logger = logging.getLogger(__name__)

TEMPLATE = Path(__file__).resolve().parent / "web" / "eval_report.html"
PLACEHOLDER = "/*__DATA__*/"
THUMB_SIZE = 112        # px, the longer side of a thumbnail
COMPARE_METRIC = "CIDEr-D"
INTERVAL_NOTE = "95% bootstrap intervals ({n} resamples of the {images} images): {method}."


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def thumbnail(path: Path, size: int = THUMB_SIZE) -> str | None:
    """A JPEG data URI of the image at most `size` px a side; None when it cannot be read."""
    try:
        with Image.open(path) as img:
            img.draft("RGB", (2 * size, 2 * size))   # JPEG: decode at a reduced scale, much faster
            img = img.convert("RGB")
            img.thumbnail((size, size))
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=75)
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    return data_uri(buf.getvalue(), "image/jpeg")


def _figure_uri(fig, dpi: int = 60) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="jpeg", dpi=dpi, pil_kwargs={"quality": 80})
    return data_uri(buf.getvalue(), "image/jpeg")


def attention_maps(sample: list, alphas: dict[str, np.ndarray], captions: dict[str, str]) -> tuple[list, str]:
    """([{name, caption, src}], note): attention figures of the `sample` records."""
    out = []
    for record in sample:
        words = captions[record.name].split()
        try:
            photo = data_utils.load_image(record.path)
            out.append({"name": record.name, "caption": captions[record.name],
                        "src": _figure_uri(plots.attention_figure(photo, words, alphas[record.name],
                                                                  title=record.name))})
        except (data_utils.CorruptImageError, OSError, ValueError) as exc:
            logger.warning("no attention map for %s: %s", record.name, exc)
    return out, "" if out else "no image of the sample could be drawn"


def _settings(summary: dict) -> dict:
    decoding = summary["decoding"]
    items = {"checkpoint": f"{summary['checkpoint']} (epoch {summary.get('epoch')}, encoder {summary['encoder']})",
             "data": f"{summary['data']['root']} ({summary['data']['layout']} layout), {summary['split']} split",
             "features": summary["data"]["features_dir"] or "images, through the checkpoint's encoder",
             "images": f"{summary['num_images']} scored, {summary['num_skipped']} skipped, "
                       f"{summary['num_references']} references",
             "decoding": ", ".join(f"{k} {v}" for k, v in decoding.items()),
             "tokenizer": summary["tokenizer"] + (f"; {summary['meteor_note']}" if summary["meteor_note"] else "")}
    if summary.get("compare"):
        items["compared with (B)"] = summary["compare"]["other"]
    return {"checkpoint": _short(summary["checkpoint"]), "split": summary["split"], "items": items}


def _short(path: str) -> str:
    """A checkpoint's folder and name ("run2/best.pt"): names alone are often both best.pt."""
    return "/".join(Path(path).parts[-2:])


def _compare(summary: dict) -> dict | None:
    cmp = summary.get("compare")
    if not cmp:
        return None
    return {"label_a": _short(summary["checkpoint"]), "label_b": _short(cmp["other"]),
            "metrics": cmp["metrics"], "difference": cmp["difference"],
            "diagnostics_shown": diagnostics.shown(cmp["diagnostics"]),
            "per_image": {k: {"caption": v["caption"], "scores": {m: v.get(m) for m in cmp["per_image_metrics"]}}
                          for k, v in cmp["per_image"].items()}}


def page_data(summary: dict, records: dict, thumbnails: dict[str, str | None], histograms: Path | None,
              attention: tuple[list, str], per_image_metrics) -> dict:
    """The JSON object the page reads (see web/eval_report.html)."""
    boot = summary.get("bootstrap") or {}
    return {
        "settings": _settings(summary),
        "metrics": summary["metrics"], "intervals": summary.get("intervals"),
        "interval_note": INTERVAL_NOTE.format(n=boot.get("resamples"), images=summary["num_images"],
                                              method=boot.get("method"))
        if summary.get("intervals") else "No intervals: --bootstrap 0.",
        "diagnostics_shown": diagnostics.shown(summary["diagnostics"]),
        "diagnostic_labels": diagnostics.LABELS,
        "diagnostic_notes": {k: diagnostics.NOTES[k] for k in diagnostics.LABELS},
        "histograms": data_uri(histograms.read_bytes(), "image/png") if histograms else None,
        "attention": attention[0], "attention_note": attention[1],
        "thumbnails": {k: v for k, v in thumbnails.items() if v},
        "per_image_metrics": list(per_image_metrics),
        "images": [{"name": k, "caption": v["caption"], "references": list(records[k].captions),
                    "scores": {m: v.get(m) for m in per_image_metrics}} for k, v in summary["per_image"].items()],
        "compare": _compare(summary), "compare_metric": COMPARE_METRIC,
    }


def render(data: dict) -> str:
    """The template with `data` embedded; `<`, `>` and `&` escaped so no text can end the script."""
    text = json.dumps(data, ensure_ascii=False, allow_nan=False)
    text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    template = TEMPLATE.read_text(encoding="utf-8")
    assert template.count(PLACEHOLDER) == 1, f"{TEMPLATE} must hold {PLACEHOLDER} once"
    return template.replace(PLACEHOLDER, text)


def write_report(path: Path, summary: dict, records: list, *, alphas: dict[str, np.ndarray],
                 histograms: Path | None, sample: list, per_image_metrics) -> Path:
    """Write eval_<split>.html (atomically) for an evaluation's summary; returns its path."""
    by_name = {r.name: r for r in records if r.name in summary["per_image"]}
    thumbs = {name: thumbnail(r.path) for name, r in by_name.items()}
    attention = attention_maps(sample, alphas, {k: v["caption"] for k, v in summary["per_image"].items()})
    html = render(page_data(summary, by_name, thumbs, histograms, attention, per_image_metrics))
    return fileio.atomic_write(path, lambda f: f.write(html.encode("utf-8")))
