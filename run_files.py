"""A training run's files: which checkpoint to resume, never replacing an earlier run's files
without being asked, the files each epoch writes, and pruning the periodic checkpoints."""
from __future__ import annotations

import logging
from pathlib import Path

import checkpoint as ckpt_lib
from config import TrainConfig
from devices import Dist
import fileio
import plots

logger = logging.getLogger(__name__)

# What a training run writes; a new run refuses to start over them (see protect_earlier_run).
RUN_FILES = ("last.pt", "best.pt", "history.json")
GRAPH_FILES = ("loss.png", "bleu.png", "cider.png", "sample_length.png")


def resolve_resume(resume: str | None, weights_dir: Path) -> Path | None:
    if resume is None:
        return None
    if resume == "auto":
        path = weights_dir / "last.pt"
        if not path.exists():
            logger.info("--resume auto: no %s yet, starting a new run", path)
            return None
        return path
    path = Path(resume)
    if not path.exists():
        raise FileNotFoundError(f"--resume {resume}: no such checkpoint")
    return path


def earlier_run_files(cfg: TrainConfig) -> list[Path]:
    """Files of an earlier run that a new run in these folders would replace."""
    weights_dir, graphs_dir = Path(cfg.weights_dir), Path(cfg.run_graphs_dir)
    found = [weights_dir / n for n in RUN_FILES] + sorted(weights_dir.glob("epoch_*.pt"))
    found += [graphs_dir / n for n in GRAPH_FILES]
    return [p for p in found if p.exists()]


def protect_earlier_run(cfg: TrainConfig, d: Dist) -> None:
    """A new run never silently replaces an earlier one: refuse, or (--overwrite) remove it."""
    found = earlier_run_files(cfg)
    given_graphs = cfg.graphs_dir is not None and any(p.suffix == ".png" for p in found)
    where = "--weights_dir NEW" + (" / --graphs_dir NEW" if given_graphs else "")
    fileio.refuse_to_replace(found, overwrite=cfg.overwrite, what="holds an earlier training run",
                             ways_out=f"--resume auto to continue it, {where} for another run, or --overwrite "
                                      f"to replace it")
    if not cfg.overwrite:
        return
    if d.is_main and found:
        logger.warning("--overwrite: removing the earlier run's %s", ", ".join(str(p) for p in found))
        for p in found:
            p.unlink(missing_ok=True)
    d.barrier()


def prune_periodic(weights_dir: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` epoch_NNN.pt files (0 keeps all)."""
    if keep_last <= 0:
        return
    files = sorted(weights_dir.glob("epoch_*.pt"))
    for old in files[:-keep_last]:
        old.unlink(missing_ok=True)


def save_epoch_files(snapshot: dict, history: list[dict], cfg: TrainConfig, *, improved: bool) -> None:
    """last.pt (always), best.pt (on a new best), epoch_NNN.pt (--save_every), history, graphs."""
    weights_dir, epoch = Path(cfg.weights_dir), snapshot["epoch"]
    ckpt_lib.save_checkpoint(weights_dir / "last.pt", snapshot)
    if improved:
        ckpt_lib.save_checkpoint(weights_dir / "best.pt", snapshot)
    if cfg.save_every and epoch % cfg.save_every == 0:
        ckpt_lib.save_checkpoint(weights_dir / f"epoch_{epoch:03d}.pt", snapshot)
        prune_periodic(weights_dir, cfg.keep_last)
    fileio.write_json(weights_dir / "history.json", history)
    plots.plot_history(history, cfg.run_graphs_dir)
