"""Export a trained captioner as a self-contained folder anyone can load (`--mode export`).

The folder holds four files, so that loading it runs no code and needs nothing from this checkout's
training outputs:
- `model.safetensors`: the model's tensors (safetensors: a header and raw bytes, no pickle),
- `vocab.json`: the word list (id = position),
- `config.json`: the model config, the encoder's preprocessing (`preprocessing`: size, resize,
  interpolation, mean, std, squash; read back as the model config's `preprocess`), default decoding
  settings (what `--mode test`, `eval` and `serve` use unless flags say otherwise) and the folder's
  format version,
- `README.md`: a model card (architecture, training data and split, metrics, how to caption, licence).

`config.json` is written last: a folder without it is an interrupted export and is refused on load.
`checkpoint.read_model_folder` returns the same dict shape as `checkpoint.load_checkpoint` does for a `.pt`.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

import checkpoint
import diagnostics
import encoders
import fileio
import hub
from config import DecodeConfig, ModelConfig

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------- writing

def export_model(ckpt: dict, out_dir: str | os.PathLike, *, eval_metrics: dict[str, dict] | None = None,
                 decode_cfg: DecodeConfig | dict | None = None, overwrite: bool = False,
                 source: str | None = None) -> Path:
    """Write the model folder for a loaded checkpoint dict; returns the folder.

    `eval_metrics` maps a split to its `eval_<split>.json` summary (`eval_summaries` finds them).
    A folder that exists and holds anything is refused unless `overwrite`; then only the four
    export files are replaced and anything else in it is left alone. `decode_cfg`: the decoding
    defaults written, or the flags typed (a dict) over the checkpoint's own (an exported folder's).
    """
    out = fileio.check_folder(out_dir, f"--output {out_dir}")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"--output {out} exists and is not empty; choose a new folder, or pass "
                         f"--overwrite to replace its model files")
    model_cfg = checkpoint.model_config_from_dict(ckpt["model_config"])
    state = checkpoint.strip_module_prefix(ckpt["model"])
    # Refuse a checkpoint whose weights do not fit its config now, not when someone loads the export.
    checkpoint.model_from_checkpoint({**ckpt, "model": state})
    decode_cfg = checkpoint.decode_config_from(ckpt, decode_cfg)
    config = folder_config(ckpt, model_cfg, decode_cfg)

    from safetensors.torch import save as safetensors_bytes

    # Own contiguous CPU copies: safetensors refuses views and tensors that share storage.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    data = safetensors_bytes(tensors, metadata={"format": "pt"})
    out.mkdir(parents=True, exist_ok=True)
    fileio.atomic_write(out / checkpoint.WEIGHTS_FILE, lambda f: f.write(data))
    fileio.write_json(out / checkpoint.VOCAB_FILE, list(ckpt["vocab"]))
    card = model_card(config, ckpt, eval_metrics or {}, out.name, source)
    fileio.atomic_write(out / checkpoint.CARD_FILE, lambda f: f.write(card.encode("utf-8")))
    fileio.write_json(out / checkpoint.CONFIG_FILE, config)
    logger.info("exported %s to %s", source or "checkpoint", out)
    return out


def folder_config(ckpt: dict, model_cfg: ModelConfig, decode_cfg: DecodeConfig) -> dict:
    """The contents of config.json; the preprocessing is kept once, at the top (read_model_folder
    puts it back into the model config)."""
    features = ckpt.get("features")
    needs = "features" if model_cfg.encoder == "features" else "images"
    plain = checkpoint.to_plain(model_cfg)
    preprocessing = plain.pop("preprocess")
    return {"format": checkpoint.FOLDER_FORMAT, "format_version": checkpoint.FORMAT_VERSION, "input": needs,
            "model_config": plain, "preprocessing": preprocessing,
            "decoding": dataclasses.asdict(decode_cfg),
            "features": features if isinstance(features, dict) else None,
            "epoch": ckpt.get("epoch"), "data_config": ckpt.get("data_config")}


def eval_summaries(checkpoint_path: str | os.PathLike) -> dict[str, dict]:
    """The `eval_<split>.json` summaries beside a checkpoint file, by split (unreadable ones skipped)."""
    found = {}
    for path in sorted(Path(checkpoint_path).parent.glob("eval_*.json")):
        try:
            summary = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            logger.warning("ignoring %s: %s", path, exc)
            continue
        if isinstance(summary, dict) and isinstance(summary.get("metrics"), dict):
            found[str(summary.get("split") or path.stem[len("eval_"):])] = summary
    return found


def _architecture_lines(cfg: ModelConfig) -> list[str]:
    if cfg.encoder == "features":
        enc = f"no image encoder: reads precomputed features of {cfg.feature_dim} channels"
    else:
        enc = encoders.describe(cfg)
    return [f"- Encoder: {enc}.",
            f"- Decoder: Show, Attend and Tell soft attention, {cfg.num_layers}-layer LSTM of {cfg.decoder_dim} units, "
            f"embedding {cfg.embed_dim}, attention {cfg.attention_dim}, vocabulary of {cfg.vocab_size} words."]


def _data_lines(ckpt: dict) -> list[str]:
    data = ckpt.get("data_config") or {}
    if data.get("hf_dataset"):
        where = f"the Hugging Face data set `{data['hf_dataset']}`"
    elif data.get("dataset_path"):
        where = f"`{Path(data['dataset_path']).name}` (Flickr8k layout: Karpathy split, token file or Kaggle captions)"
    elif data:
        where = "the toolkit's generated demo set (synthetic shapes, not photos)"
    else:
        where = "not recorded in the checkpoint"
    lines = [f"- Data: {where}."]
    if data:
        sizes = data.get("split_sizes")
        split = f"{sizes[0]} train / {sizes[1]} val images, the rest test" if sizes else \
            "the data set's own split, or 6000/1000/rest (80/10/10 below 7,000 images)"
        lines.append(f"- Split: {split}, seeded by image (seed {data.get('split_seed', 0)}); "
                     f"words seen fewer than {data.get('min_word_freq', '?')} times are `<unk>`.")
    if ckpt.get("epoch") is not None:
        lines.append(f"- Trained for {ckpt['epoch']} epoch(s).")
    return lines


def _metric_lines(eval_metrics: dict[str, dict]) -> list[str]:
    if not eval_metrics:
        return ["Not evaluated: no `eval_<split>.json` was found beside the checkpoint "
                "(run `python main.py --mode eval` before exporting)."]
    names = sorted({m for s in eval_metrics.values() for m in s["metrics"]})
    lines = ["| split | images | beam | " + " | ".join(names) + " |",
             "|---|---|---|" + "---|" * len(names)]
    for split, s in eval_metrics.items():
        beam = (s.get("decoding") or {}).get("beam_size", "?")
        vals = [_metric_cell(s, m) for m in names]
        lines.append(f"| {split} | {s.get('num_images', '?')} | {beam} | " + " | ".join(vals) + " |")
    if any(s.get("intervals") for s in eval_metrics.values()):
        lines += ["", "In brackets: 95% bootstrap intervals over the split's images."]
    for split, s in eval_metrics.items():
        if isinstance(s.get("diagnostics"), dict):
            shown = diagnostics.shown(s["diagnostics"])
            lines += ["", f"Captions of the {split} split: " + "; ".join(
                f"{label} {shown[k]}" for k, label in diagnostics.LABELS.items()) + "."]
    return lines


def _metric_cell(summary: dict, metric: str) -> str:
    value, ci = summary["metrics"].get(metric), (summary.get("intervals") or {}).get(metric)
    if not isinstance(value, (int, float)):
        return "-"
    return f"{value:.4f}" + (f" [{ci['low']:.3f}, {ci['high']:.3f}]" if isinstance(ci, dict) else "")


def _licence_note(ckpt: dict) -> str:
    data = ckpt.get("data_config") or {}
    if data and not data.get("dataset_path") and not data.get("hf_dataset"):
        return ("The training data is the toolkit's own generated demo set (synthetic shapes): no photo "
                "licence applies.")
    return ("The Flickr8k photos and captions are for research use only (see the data set's terms); "
            "they are not part of this folder, but the weights were learnt from them. Check the terms of "
            "your training data before using this model beyond research.")


def model_card(config: dict, ckpt: dict, eval_metrics: dict[str, dict], name: str, source: str | None) -> str:
    """The exported folder's README.md."""
    cfg = checkpoint.model_config_from_dict(config["model_config"])
    if config["input"] == "features":
        usage = ["This model was trained on precomputed features, not photos: it has no image encoder.",
                 "Caption a features directory of the same kind (`features.npy` + `names.json`) with:", "",
                 f"    python main.py --mode eval --checkpoint {name} --features_dir FEATURES_DIR"]
    else:
        usage = ["    python main.py --mode test --checkpoint " + name + " --image_path photo.jpg",
                 "    python main.py --mode serve --checkpoint " + name + "   # a local web page",
                 "", "or with `--checkpoint hf://OWNER/NAME` once it is on the Hugging Face Hub."]
    lines = [f"# {name}: an image captioner (Show, Attend and Tell)", "",
             "Exported by this toolkit's `--mode export`" + (f" from `{source}`" if source else "") + ".", "",
             "## Architecture", *_architecture_lines(cfg), "",
             "## Training data", *_data_lines(ckpt), "",
             "## Metrics", *_metric_lines(eval_metrics), "",
             "## How to caption with it", *usage, "",
             f"Files: `{checkpoint.WEIGHTS_FILE}` (tensors), `{checkpoint.VOCAB_FILE}`, `{checkpoint.CONFIG_FILE}` (model config, preprocessing, "
             f"default decoding, format version {checkpoint.FORMAT_VERSION}).", "",
             "## Licence note", _licence_note(ckpt), ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- the command

def run_export(checkpoint_path: str | os.PathLike, output: str | os.PathLike, *, push_to_hub: str | None = None,
               private: bool = False, overwrite: bool = False, decode_cfg: DecodeConfig | dict | None = None) -> Path:
    """`--mode export`: write the folder, then (optionally) upload it; prints where it went.

    The folder is written before any upload, so a failed upload loses nothing.
    """
    ckpt = checkpoint.load_checkpoint(checkpoint_path)
    out = export_model(ckpt, output, eval_metrics=eval_summaries(checkpoint_path), decode_cfg=decode_cfg,
                       overwrite=overwrite, source=str(checkpoint_path))
    print(f"exported {checkpoint_path} to {out}")
    if push_to_hub:
        checkpoint.read_model_folder(out)  # publish only a folder that loads
        url = hub.push_folder(out, push_to_hub, private=private)
        print(f"uploaded {out} to {url}")
    return out
