"""Score a split the way captioning papers do (`--mode eval`).

Decode every image of the split once (decoding.caption_loader), score the captions with the COCO
caption metrics (metrics.py), write the results as JSON and draw the pictures (plots.py).

Never name a function `test_*` here: pytest would collect it.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import numpy as np

import data_utils
import decoding
import devices
import fileio
import metrics
import plots
import run_logging
import test as captioning
from config import DataConfig, DecodeConfig
from features import FeatureStore

logger = logging.getLogger(__name__)


def _check_arguments(split: str, batch_size: int, grid_images: int) -> None:
    if split not in ("train", "val", "test"):
        raise ValueError(f"--split {split!r}: expected train, val or test")
    if batch_size < 1:
        raise ValueError(f"--batch_size must be at least 1, got {batch_size}")
    if grid_images < 0:
        raise ValueError(f"--grid_images must be 0 or more, got {grid_images}")


def _features_dir(captioner, checkpoint_path: Path, features_dir) -> Path | None:
    """The features folder to read (None: images), checked against the model's channels."""
    if features_dir is None and captioner.transform is None:
        # A features model can only read features: default to the directory it was trained on.
        recorded = (captioner.features or {}).get("path") if isinstance(captioner.features, dict) else None
        if not recorded or not Path(recorded).is_dir():
            raise ValueError(f"checkpoint {checkpoint_path} was trained on precomputed features and has "
                             f"no image encoder: pass --features_dir with this data set's features")
        features_dir = recorded
    if features_dir is None:
        return None
    features_dir = Path(features_dir)
    if not features_dir.is_dir():
        raise FileNotFoundError(f"features directory {features_dir} does not exist")
    channels = FeatureStore.open(features_dir).channels
    if channels != captioner.model_cfg.feature_dim:
        raise ValueError(f"features in {features_dir} have {channels} channels but the model "
                         f"of {checkpoint_path} expects {captioner.model_cfg.feature_dim}")
    return features_dir


def _split_records(data_cfg: DataConfig, split: str) -> tuple[data_utils.DatasetSplits, list]:
    splits = data_utils.load_dataset(data_cfg)
    records = list(splits.split(split))
    if not records:
        raise ValueError(f"the {split} split of {splits.root} is empty: nothing to evaluate")
    return splits, records


def _decode_split(captioner, records, decode_cfg: DecodeConfig, features_dir: Path | None,
                  batch_size: int, num_workers: int) -> tuple[dict[str, str], int]:
    """Decode every image of `records` exactly once: ({name: caption}, corrupt images skipped)."""
    if features_dir is not None:
        dataset = data_utils.ImageDataset(records, features=FeatureStore.open(features_dir))
    else:
        dataset = data_utils.ImageDataset(records, transform=captioner.transform)
    loader = data_utils.make_loader(dataset, batch_size, shuffle=False, num_workers=num_workers)
    captions, skipped = decoding.caption_loader(captioner.model, loader, captioner.vocab, decode_cfg,
                                                captioner.device)
    hypotheses = {records[c.index].name: " ".join(c.words) for c in captions}
    assert len(hypotheses) == len(captions), "an image was decoded twice"
    return hypotheses, skipped


def _grid_items(records, hypotheses: dict[str, str], per_image: dict, n: int) -> list[dict]:
    """N images spread evenly over the split (deterministic), with their captions."""
    scored = [r for r in records if r.name in hypotheses]
    if n <= 0 or not scored:
        return []
    items = []
    for r in scored[::max(1, len(scored) // n)][:n]:
        try:
            image = np.asarray(data_utils.load_image(r.path))   # (H, W, 3)
        except data_utils.CorruptImageError:
            image = None
        items.append({"image": image, "name": r.name, "caption": hypotheses[r.name],
                      "references": list(r.captions), "score": per_image.get(r.name, {}).get("CIDEr-D")})
    return items


def _figure_paths(graphs_dir: Path, split: str) -> dict[str, Path]:
    return {"histograms": graphs_dir / f"eval_{split}_scores.png", "grid": graphs_dir / f"eval_{split}_grid.png"}


def _output_paths(checkpoint_path: Path, split: str, results_dir, graphs_dir,
                  overwrite: bool) -> tuple[Path, Path]:
    """(results_dir, graphs_dir), checked before anything is decoded: folders where files go, and no
    earlier evaluation of the split replaced unless `overwrite` (the policy of training's files)."""
    given = f"--results_dir {results_dir}" if results_dir is not None else "the checkpoint's folder"
    results_dir = fileio.check_folder(checkpoint_path.parent if results_dir is None else results_dir, given)
    graphs_dir = fileio.check_folder(results_dir / "graphs" if graphs_dir is None else graphs_dir,
                                     f"--graphs_dir {graphs_dir}" if graphs_dir is not None else given)
    results = [results_dir / f"eval_{split}.json", results_dir / f"captions_{split}.json"]
    figures = list(_figure_paths(graphs_dir, split).values())
    found = [p for p in results + figures if p.exists()]
    keep = " / ".join(flag for flag, paths in (("--results_dir NEW", results), ("--graphs_dir NEW", figures))
                      if set(paths) & set(found))
    fileio.refuse_to_replace(found, overwrite=overwrite, what=f"holds an earlier evaluation of the {split} split",
                             ways_out=f"--overwrite to replace it, or {keep} to keep it")
    if found:
        logger.warning("--overwrite: replacing the earlier evaluation's %s", ", ".join(map(str, found)))
    return results_dir, graphs_dir


def _draw_figures(records, hypotheses, scores: metrics.Scores, split: str, beam_size: int,
                  grid_images: int, graphs_dir: Path) -> dict[str, str]:
    label = f"{split} split, {len(hypotheses)} images, beam {beam_size}"
    paths = _figure_paths(graphs_dir, split)
    hist = plots.save_figure(plots.score_histograms(scores.per_image, metrics.PER_IMAGE,
                                                    title=f"per-image scores ({label})"), paths["histograms"])
    grid = plots.save_figure(plots.caption_grid(_grid_items(records, hypotheses, scores.per_image, grid_images),
                                                title=f"generated vs reference ({label})"), paths["grid"])
    return {"histograms": str(hist), "grid": str(grid)}


def _summary(split, splits, data_cfg, features_dir, checkpoint_path, captioner, decode_cfg, hypotheses,
             skipped, references, scores: metrics.Scores, seconds: tuple[float, float]) -> dict:
    """What eval_<split>.json holds: metrics, how they were computed, settings, counts, timings."""
    t_decode, t_score = seconds
    n = len(hypotheses)
    return {
        "split": split,
        "data": {"root": str(splits.root), "layout": splits.layout,
                 "features_dir": str(features_dir) if features_dir else None,
                 "config": dataclasses.asdict(data_cfg)},
        "checkpoint": str(checkpoint_path),
        "epoch": captioner.epoch,
        "encoder": captioner.model_cfg.encoder,
        "decoding": dataclasses.asdict(decode_cfg),
        "num_images": n,
        "num_skipped": skipped,
        "num_references": sum(len(v) for v in references.values()),
        "metrics": scores.metrics,
        "metric_notes": {m: metrics.METRIC_NOTES[m] for m in scores.metrics},
        "tokenizer": scores.tokenizer,
        "meteor_note": scores.meteor_note,
        "timing": {"decode_s": round(t_decode, 3), "score_s": round(t_score, 3),
                   "images_per_s_decode": round(n / t_decode, 2) if t_decode > 0 else None,
                   "images_per_s_total": round(n / (t_decode + t_score), 2),
                   "device": str(captioner.device)},
        "per_image": {k: {"caption": hypotheses[k], **scores.per_image[k]} for k in hypotheses},
    }


def _print_report(summary: dict, eval_path: Path) -> None:
    print(metrics.format_table(summary["metrics"]))
    print(f"{summary['num_images']} images ({summary['num_skipped']} skipped), tokenizer: {summary['tokenizer']}")
    if summary["meteor_note"]:
        print(summary["meteor_note"])
    print(f"decoding {summary['timing']['images_per_s_decode']} images/s, scoring "
          f"{summary['timing']['score_s']:.1f} s; wrote {eval_path} and {summary['results_file']}")


def run_evaluation(checkpoint_path, data_cfg: DataConfig, decode_cfg: DecodeConfig | dict | None = None, *,
                   split: str = "test",
                   features_dir=None, batch_size: int = 32, num_workers: int | None = None,
                   device: str = "auto", results_dir=None, graphs_dir=None,
                   grid_images: int = 6, use_java: bool | None = None, wandb_mode: str = "disabled",
                   wandb_project: str = "captioner", wandb_entity: str | None = None,
                   overwrite: bool = False, threads: int | None = None) -> dict:
    """`--mode eval`: decode every image of `split` once, score it, write results and pictures.

    Writes `eval_<split>.json` (metrics, how they were computed, decoding settings, checkpoint,
    image counts, timings, per-image scores) and `captions_<split>.json` (COCO results format:
    [{"image_id", "caption"}]) in `results_dir` (default: the checkpoint's folder), and
    `eval_<split>_scores.png` / `eval_<split>_grid.png` in `graphs_dir` (default: `graphs/` beside
    the results, with the evaluated run). Prints the metrics
    table. An earlier evaluation's files are refused (before decoding) unless `overwrite`.
    Returns the summary written to `eval_<split>.json`.
    """
    _check_arguments(split, batch_size, grid_images)
    devices.set_threads(threads)
    checkpoint_path = Path(checkpoint_path)
    results_dir, graphs_dir = _output_paths(checkpoint_path, split, results_dir, graphs_dir, overwrite)
    captioner = captioning.load_captioner(checkpoint_path, device, need_encoder=False)
    decode_cfg = captioner.decode_config(decode_cfg)  # flags typed over an exported folder's defaults
    features_dir = _features_dir(captioner, checkpoint_path, features_dir)
    splits, records = _split_records(data_cfg, split)
    logger.info("evaluating %s: %d images of the %s split of %s", checkpoint_path, len(records),
                split, splits.root)
    t0 = time.perf_counter()
    hypotheses, skipped = _decode_split(captioner, records, decode_cfg, features_dir, batch_size,
                                        data_cfg.num_workers if num_workers is None else num_workers)
    t1 = time.perf_counter()
    if not hypotheses:
        raise ValueError(f"no image of the {split} split could be read ({skipped} skipped)")
    references = {r.name: list(r.captions) for r in records if r.name in hypotheses}
    scores = metrics.score_captions(references, hypotheses, use_java=use_java)
    summary = _summary(split, splits, data_cfg, features_dir, checkpoint_path, captioner, decode_cfg,
                       hypotheses, skipped, references, scores, (t1 - t0, time.perf_counter() - t1))
    eval_path, captions_path = results_dir / f"eval_{split}.json", results_dir / f"captions_{split}.json"
    summary["results_file"] = str(captions_path)
    fileio.write_json(captions_path, [{"image_id": k, "caption": v} for k, v in hypotheses.items()])
    summary["figures"] = _draw_figures(records, hypotheses, scores, split, decode_cfg.beam_size,
                                       grid_images, graphs_dir)
    fileio.write_json(eval_path, summary)
    _print_report(summary, eval_path)
    if wandb_mode != "disabled":
        _log_wandb(summary, wandb_mode, wandb_project, wandb_entity)
    return summary


def _log_wandb(summary: dict, mode: str, project: str, entity: str | None) -> None:
    """Log metrics, the per-image table and both pictures to Weights & Biases.

    Started the way training starts it (`run_logging.start_wandb`: auto = online with credentials,
    else offline; WANDB_MODE=disabled turns it off), and never fails the evaluation.
    """
    split = summary["split"]
    run = run_logging.start_wandb(mode, {"job": f"eval_{split}", "checkpoint": summary["checkpoint"],
                                         "split": split, **summary["decoding"]},
                                  project=project, entity=entity, job_type="eval")
    if run is None:
        return
    import wandb   # optional; start_wandb returned a run, so it is installed

    try:
        run.log({f"eval_{split}/{m}": v for m, v in summary["metrics"].items() if v is not None})
        table = wandb.Table(columns=["image", "caption", *metrics.PER_IMAGE])
        for name, row in summary["per_image"].items():
            table.add_data(name, row["caption"], *(row.get(m) for m in metrics.PER_IMAGE))
        run.log({f"eval_{split}/per_image": table,
                 f"eval_{split}/histograms": wandb.Image(summary["figures"]["histograms"]),
                 f"eval_{split}/grid": wandb.Image(summary["figures"]["grid"])})
    except Exception as exc:  # logging is a side channel: the results are already on disk
        logger.warning("wandb logging failed: %s", str(exc).splitlines()[0][:200] if str(exc) else exc)
    finally:
        run.finish()
