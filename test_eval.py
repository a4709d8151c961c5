"""Score a split the way captioning papers do (`--mode eval`).

Decode every image of the split once (decoding.caption_loader), score the captions with the COCO
caption metrics (metrics.py), describe them (diagnostics.py), put a 95% bootstrap interval on every
metric (bootstrap.py), optionally compare them with a second checkpoint or captions file on the same
images (a paired bootstrap), write the results as JSON, draw the pictures (plots.py) and write the
report page (report.py).

Never name a function `test_*` here: pytest would collect it.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import numpy as np

import bootstrap
import data_utils
import decoding
import devices
import diagnostics
import fileio
import metrics
import plots
import report
import run_logging
import test as captioning
import text
from config import BOOTSTRAP_RESAMPLES, DataConfig, DecodeConfig
from features import FeatureStore

logger = logging.getLogger(__name__)


def _check_arguments(split: str, batch_size: int, grid_images: int, resamples: int, compare) -> Path | None:
    if split not in ("train", "val", "test"):
        raise ValueError(f"--split {split!r}: expected train, val or test")
    if batch_size < 1:
        raise ValueError(f"--batch_size must be at least 1, got {batch_size}")
    if grid_images < 0:
        raise ValueError(f"--grid_images must be 0 or more, got {grid_images}")
    if resamples < 0:
        raise ValueError(f"--bootstrap must be 0 (no intervals) or a number of resamples, got {resamples}")
    if compare is None:
        return None
    compare = Path(compare)
    if not compare.exists() and not str(compare).startswith("hf://"):
        raise FileNotFoundError(f"--compare {compare} does not exist: expected a checkpoint or a captions_<split>.json")
    return compare


def _features_dir(captioner, checkpoint_path: Path, features_dir) -> Path | None:
    """The features folder to read (None: images), checked against the model's channels."""
    if features_dir is None and captioner.transform is None:
        # A features model can only read features: default to the folder training recorded
        # (train.py's run.features["dir"], as given to --features_dir then).
        recorded = captioner.features.get("dir") if isinstance(captioner.features, dict) else None
        if not recorded or not Path(recorded).is_dir():
            where = f" ({recorded}, which is not a folder here)" if recorded else ""
            raise ValueError(f"checkpoint {checkpoint_path} was trained on precomputed features{where} and "
                             f"has no image encoder: pass --features_dir with this data set's features")
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
                  batch_size: int, num_workers: int) -> tuple[dict[str, str], int, dict]:
    """Decode every image of `records` exactly once: ({name: caption}, corrupt images skipped,
    {name: attention (L, P)})."""
    if features_dir is not None:
        dataset = data_utils.ImageDataset(records, features=FeatureStore.open(features_dir))
    else:
        dataset = data_utils.ImageDataset(records, transform=captioner.transform)
    loader = data_utils.make_loader(dataset, batch_size, shuffle=False, num_workers=num_workers)
    captions, skipped = decoding.caption_loader(captioner.model, loader, captioner.vocab, decode_cfg,
                                                captioner.device)
    hypotheses = {records[c.index].name: " ".join(c.words) for c in captions}
    assert len(hypotheses) == len(captions), "an image was decoded twice"
    return hypotheses, skipped, {records[c.index].name: c.alphas.numpy() for c in captions}


def _sample(records, hypotheses: dict[str, str], n: int) -> list:
    """N records spread evenly over the decoded ones (deterministic): the grid and attention sample."""
    scored = [r for r in records if r.name in hypotheses]
    return scored[::max(1, len(scored) // n)][:n] if n > 0 and scored else []


def _grid_items(sample, hypotheses: dict[str, str], per_image: dict) -> list[dict]:
    """The sample's images with their captions, for plots.caption_grid."""
    items = []
    for r in sample:
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
                  overwrite: bool, with_report: bool) -> tuple[Path, Path]:
    """(results_dir, graphs_dir), checked before anything is decoded: folders where files go, and no
    earlier evaluation of the split replaced unless `overwrite` (the policy of training's files)."""
    given = f"--results_dir {results_dir}" if results_dir is not None else "the checkpoint's folder"
    results_dir = fileio.check_folder(checkpoint_path.parent if results_dir is None else results_dir, given)
    graphs_dir = fileio.check_folder(results_dir / "graphs" if graphs_dir is None else graphs_dir,
                                     f"--graphs_dir {graphs_dir}" if graphs_dir is not None else given)
    results = [results_dir / f"eval_{split}.json", results_dir / f"captions_{split}.json"]
    results += [results_dir / f"eval_{split}.html"] if with_report else []
    figures = list(_figure_paths(graphs_dir, split).values())
    found = [p for p in results + figures if p.exists()]
    keep = " / ".join(flag for flag, paths in (("--results_dir NEW", results), ("--graphs_dir NEW", figures))
                      if set(paths) & set(found))
    fileio.refuse_to_replace(found, overwrite=overwrite, what=f"holds an earlier evaluation of the {split} split",
                             ways_out=f"--overwrite to replace it, or {keep} to keep it")
    if found:
        logger.warning("--overwrite: replacing the earlier evaluation's %s", ", ".join(map(str, found)))
    return results_dir, graphs_dir


def _draw_figures(sample, hypotheses, scores: metrics.Scores, split: str, beam_size: int,
                  graphs_dir: Path) -> dict[str, str]:
    label = f"{split} split, {len(hypotheses)} images, beam {beam_size}"
    paths = _figure_paths(graphs_dir, split)
    hist = plots.save_figure(plots.score_histograms(scores.per_image, metrics.PER_IMAGE,
                                                    title=f"per-image scores ({label})"), paths["histograms"])
    grid = plots.save_figure(plots.caption_grid(_grid_items(sample, hypotheses, scores.per_image),
                                                title=f"generated vs reference ({label})"), paths["grid"])
    return {"histograms": str(hist), "grid": str(grid)}


@dataclasses.dataclass
class Scored:
    """One set of captions on some images: scores, per-image statistics, diagnostics, intervals."""
    hypotheses: dict[str, str]
    scores: metrics.Scores
    stats: bootstrap.ImageStats
    diagnostics: dict
    intervals: dict | None


def score_set(hypotheses: dict[str, str], records: dict, training: set, vocabulary, *, use_java,
              resamples: int, seed: int) -> Scored:
    """Score, describe and (resamples > 0) bootstrap one caption per image of `hypotheses`."""
    scores = metrics.score_captions({k: list(records[k].captions) for k in hypotheses}, hypotheses,
                                    use_java=use_java)
    stats = bootstrap.image_stats(scores)
    diag = diagnostics.caption_diagnostics([h.split() for h in hypotheses.values()],
                                           [records[k].tokens for k in hypotheses], training, vocabulary)
    ci = bootstrap.intervals(stats, resamples, seed) if resamples else None
    return Scored(hypotheses, scores, stats, diag, ci)


def read_captions_file(path: Path) -> dict[str, str]:
    """{image: caption} of a captions_<split>.json (COCO results format: [{"image_id", "caption"}])."""
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"--compare {path} is not a JSON captions file: {exc}") from None
    if not isinstance(items, list) or not all(isinstance(i, dict) and "image_id" in i and
                                              isinstance(i.get("caption"), str) for i in items):
        raise ValueError(f"--compare {path}: expected a list of {{\"image_id\", \"caption\"}} "
                         "(the captions_<split>.json --mode eval writes)")
    # The toolkit's own tokenisation, as the decoded captions have it
    return {str(i["image_id"]): " ".join(text.tokenize(i["caption"])) for i in items}


def _other_captions(compare: Path, features_dir, records, decode_cfg, device, batch_size, workers):
    """({image: caption}, vocabulary or None, epoch) of --compare: a captions file or a checkpoint."""
    if compare.suffix == ".json":
        return read_captions_file(compare), None, None
    other = captioning.load_captioner(compare, device, need_encoder=False)
    feats = _features_dir(other, compare, features_dir)
    hypotheses, _, _ = _decode_split(other, records, decode_cfg, feats, batch_size, workers)
    return hypotheses, other.vocab.words, other.epoch


def _compare(compare: Path, a: Scored, other: tuple, records: dict, training: set, *, use_java,
             resamples: int, seed: int) -> dict:
    """The "compare" section: B's scores and diagnostics on the images both have, and B - A."""
    hyps_b, vocab_b, epoch_b = other
    unknown = [k for k in hyps_b if k not in records]
    if unknown:
        raise ValueError(f"--compare {compare} has captions for {len(unknown)} image(s) outside this split, "
                         f"e.g. {unknown[0]!r}: compare captions of the same split")
    common = [k for k in a.hypotheses if k in hyps_b]
    if not common:
        raise ValueError(f"--compare {compare} has no caption for any image evaluated here")
    run = dict(use_java=use_java, resamples=0, seed=seed)
    if len(common) < len(a.hypotheses):   # rescore A on those images: same references, same idf
        logger.warning("--compare %s covers %d of the %d images: comparing on those", compare, len(common),
                       len(a.hypotheses))
        a = score_set({k: a.hypotheses[k] for k in common}, records, training, None, **run)
    b = score_set({k: hyps_b[k] for k in common}, records, training, vocab_b, **run)
    if resamples:
        difference = bootstrap.paired(a.stats, b.stats, resamples, seed)
    else:
        difference = {m: None if a.scores.metrics[m] is None or b.scores.metrics[m] is None else
                      {"a": a.scores.metrics[m], "b": b.scores.metrics[m],
                       "diff": b.scores.metrics[m] - a.scores.metrics[m]} for m in a.scores.metrics}
    return {"other": str(compare), "kind": "captions" if vocab_b is None else "checkpoint", "epoch": epoch_b,
            "num_images": len(common), "metrics": b.scores.metrics, "metrics_a": a.scores.metrics,
            "diagnostics": b.diagnostics, "difference": difference, "per_image_metrics": list(metrics.PER_IMAGE),
            "per_image": {k: {"caption": hyps_b[k], **b.scores.per_image[k]} for k in common}}


def _summary(split, splits, data_cfg, features_dir, checkpoint_path, captioner, decode_cfg, a: Scored,
             skipped, resamples: int, seed: int) -> dict:
    """What eval_<split>.json holds: metrics, intervals, diagnostics, how they were computed, settings,
    counts, per-image scores (timings and the comparison are added by the caller)."""
    scores, hypotheses = a.scores, a.hypotheses
    return {
        "split": split,
        "data": {"root": str(splits.root), "layout": splits.layout,
                 "features_dir": str(features_dir) if features_dir else None,
                 "config": dataclasses.asdict(data_cfg)},
        "checkpoint": str(checkpoint_path),
        "epoch": captioner.epoch,
        "encoder": captioner.model_cfg.encoder,
        "decoding": dataclasses.asdict(decode_cfg),
        "num_images": len(hypotheses),
        "num_skipped": skipped,
        "num_references": sum(len(v) for v in scores.references_tokenized.values()),
        "metrics": scores.metrics,
        "intervals": a.intervals,
        "bootstrap": {"resamples": resamples, "seed": seed, "level": bootstrap.LEVEL,
                      "method": bootstrap.METHOD} if resamples else None,
        "metric_notes": {m: metrics.METRIC_NOTES[m] for m in scores.metrics},
        "diagnostics": a.diagnostics,
        "diagnostic_notes": diagnostics.NOTES,
        "tokenizer": scores.tokenizer,
        "meteor_note": scores.meteor_note,
        "per_image": {k: {"caption": hypotheses[k], **scores.per_image[k]} for k in hypotheses},
    }


def _print_report(summary: dict, eval_path: Path) -> None:
    print(metrics.format_table(summary["metrics"], summary["intervals"]))
    print(f"{summary['num_images']} images ({summary['num_skipped']} skipped), tokenizer: {summary['tokenizer']}")
    if summary["meteor_note"]:
        print(summary["meteor_note"])
    print(diagnostics.format_diagnostics(summary["diagnostics"]))
    cmp = summary.get("compare")
    if cmp:
        print(f"\nA: {summary['checkpoint']}\nB: {cmp['other']} ({cmp['num_images']} images in common)")
        for m, d in cmp["difference"].items():
            if d is not None:
                verdict = bootstrap.format_difference(d) if "low" in d else f"{d['diff']:+.4f}"
                print(f"{m:<8} A {d['a']:.4f}  B {d['b']:.4f}  B - A {verdict}")
        print(diagnostics.format_diagnostics(summary["diagnostics"], cmp["diagnostics"]))
    timing = summary["timing"]
    print(f"decoding {timing['images_per_s_decode']} images/s, scoring {timing['score_s']:.1f} s, "
          f"report {timing['report_s']:.1f} s; wrote {eval_path} and {summary['results_file']}"
          + (f" and {summary['report']}" if summary.get("report") else ""))


def _timing(seconds: dict[str, float], n: int, device) -> dict:
    out = {f"{k}_s": round(v, 3) for k, v in seconds.items()}
    total = sum(seconds.values())
    out["images_per_s_decode"] = round(n / seconds["decode"], 2) if seconds["decode"] > 0 else None
    out["images_per_s_total"] = round(n / total, 2) if total > 0 else None
    out["device"] = str(device)
    return out


def _write_outputs(summary: dict, a: Scored, records, sample, alphas, results_dir: Path, graphs_dir: Path,
                   split: str, beam_size: int, with_report: bool) -> float:
    """captions_<split>.json, the pictures and (with_report) eval_<split>.html; returns the report's seconds."""
    captions_path = results_dir / f"captions_{split}.json"
    summary["results_file"] = str(captions_path)
    fileio.write_json(captions_path, [{"image_id": k, "caption": v} for k, v in a.hypotheses.items()])
    summary["figures"] = _draw_figures(sample, a.hypotheses, a.scores, split, beam_size, graphs_dir)
    if not with_report:
        return 0.0
    t = time.perf_counter()
    summary["report"] = str(results_dir / f"eval_{split}.html")
    report.write_report(Path(summary["report"]), summary, records, alphas=alphas,
                        histograms=Path(summary["figures"]["histograms"]), sample=sample,
                        per_image_metrics=metrics.PER_IMAGE)
    return time.perf_counter() - t


def run_evaluation(checkpoint_path, data_cfg: DataConfig, decode_cfg: DecodeConfig | dict | None = None, *,
                   split: str = "test",
                   features_dir=None, batch_size: int = 32, num_workers: int | None = None,
                   device: str = "auto", results_dir=None, graphs_dir=None,
                   grid_images: int = 6, use_java: bool | None = None, wandb_mode: str = "disabled",
                   wandb_project: str = "captioner", wandb_entity: str | None = None,
                   overwrite: bool = False, threads: int | None = None,
                   resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0, compare=None,
                   with_report: bool = True) -> dict:
    """`--mode eval`: decode every image of `split` once, score it, write results and pictures.

    Writes `eval_<split>.json` (metrics with 95% intervals from `resamples` bootstrap resamples, diagnostics,
    how they were computed, decoding settings, checkpoint, image counts, timings, per-image scores),
    `captions_<split>.json` (COCO results format: [{"image_id", "caption"}]) and (`with_report`) the page
    `eval_<split>.html` in `results_dir` (default: the checkpoint's folder), and
    `eval_<split>_scores.png` / `eval_<split>_grid.png` in `graphs_dir` (default: `graphs/` beside the
    results). `compare` (a checkpoint or a captions_<split>.json) is scored on the same images: B - A.
    Prints the tables. An earlier evaluation's files are refused (before decoding) unless `overwrite`.
    Returns the summary written to `eval_<split>.json`.
    """
    compare = _check_arguments(split, batch_size, grid_images, resamples, compare)
    devices.set_threads(threads)
    checkpoint_path = Path(checkpoint_path)
    results_dir, graphs_dir = _output_paths(checkpoint_path, split, results_dir, graphs_dir, overwrite, with_report)
    captioner = captioning.load_captioner(checkpoint_path, device, need_encoder=False)
    decode_cfg = captioner.decode_config(decode_cfg)  # flags typed over an exported folder's defaults
    given_features, features_dir = features_dir, _features_dir(captioner, checkpoint_path, features_dir)
    splits, records = _split_records(data_cfg, split)
    logger.info("evaluating %s: %d images of the %s split of %s", checkpoint_path, len(records),
                split, splits.root)
    workers = data_cfg.num_workers if num_workers is None else num_workers
    seconds = {"decode": time.perf_counter()}
    hypotheses, skipped, alphas = _decode_split(captioner, records, decode_cfg, features_dir, batch_size, workers)
    seconds["decode"] = time.perf_counter() - seconds["decode"]
    if not hypotheses:
        raise ValueError(f"no image of the {split} split could be read ({skipped} skipped)")
    by_name = {r.name: r for r in records}
    training = {tuple(t) for r in splits.train for t in r.tokens}
    t = time.perf_counter()
    a = score_set(hypotheses, by_name, training, captioner.vocab.words, use_java=use_java, resamples=resamples,
                  seed=seed)
    seconds["score"] = time.perf_counter() - t
    summary = _summary(split, splits, data_cfg, features_dir, checkpoint_path, captioner, decode_cfg, a,
                       skipped, resamples, seed)
    if compare is not None:
        t = time.perf_counter()
        other = _other_captions(compare, given_features, records, decode_cfg, device, batch_size, workers)
        summary["compare"] = _compare(compare, a, other, by_name, training, use_java=use_java,
                                      resamples=resamples, seed=seed)
        seconds["compare"] = time.perf_counter() - t
    sample = _sample(records, hypotheses, grid_images)
    seconds["report"] = _write_outputs(summary, a, records, sample, alphas, results_dir, graphs_dir, split,
                                       decode_cfg.beam_size, with_report)
    summary["timing"] = _timing(seconds, len(hypotheses), captioner.device)
    eval_path = results_dir / f"eval_{split}.json"
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
