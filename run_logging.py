"""What a run reports besides its files: the epoch line, Weights & Biases and TensorBoard.

wandb and TensorBoard are optional dependencies, imported only when turned on. Neither may ever
stop or stall training: wandb gets `timeout` seconds to start (a start-up that hangs, e.g. on a
network that drops packets, is abandoned with one warning) and any later failure turns it off.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable

from tqdm import tqdm

from config import WANDB_MODES
import plots

logger = logging.getLogger(__name__)

# Every logged sample figure is rendered at this size (inches): wandb shows a list of images
# correctly only when they share one size.
SAMPLE_FIGURE_SIZE = (12.0, 6.0)


def progress(iterable=None, show: bool = True, **kwargs):
    """A tqdm bar; hidden where `show` is false (ranks > 0). Left to tqdm otherwise, so
    TQDM_DISABLE=1 silences it."""
    if not show:
        kwargs["disable"] = True
    return tqdm(iterable, dynamic_ncols=True, **kwargs)


def epoch_line(row: dict, epochs: int) -> str:
    """One log line per epoch: losses, accuracies, BLEU, rate, time and what was skipped."""
    bleu = "/".join(f"{row[f'bleu{n}']:.3f}" for n in range(1, 5))
    # Self-critical training has no teacher-forced accuracy of its own (its loss is REINFORCE's).
    acc = "" if "reward" in row else f"acc {row['acc']:.3f} "
    line = (f"epoch {row['epoch']}/{epochs} loss {row['loss']:.4f} val_loss {row['val_loss']:.4f} "
            f"{acc}val_acc {row['val_acc']:.3f} BLEU-1..4 {bleu} "
            f"lr {row['lr']:.2e} time {row['seconds']:.1f}s {row['captions_per_s']:.0f} captions/s")
    if "cider" in row:
        line += f" CIDEr-D {row['cider']:.3f}"
    if "reward" in row:  # self-critical training
        line += (f" reward {row['reward']:.3f} baseline {row['baseline']:.3f} "
                 f"sample_len {row['sample_len']:.1f}")
    skipped = [f"{row[k]} {what}" for k, what in (("skipped_images", "corrupt image(s)"),
                                                 ("skipped_nonfinite", "non-finite step(s)"))
               if row.get(k)]
    return line + (f" skipped {', '.join(skipped)}" if skipped else "")


# ---------------------------------------------------------------- wandb

def _wandb_has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


def wandb_mode(mode: str) -> str:
    """`auto`: WANDB_MODE when set, else online with credentials, else offline."""
    if mode not in WANDB_MODES:
        raise ValueError(f"--wandb {mode!r} is not one of {', '.join(WANDB_MODES)}")
    if mode != "auto":
        return mode
    env = os.environ.get("WANDB_MODE")
    if env in ("online", "offline", "disabled"):
        return env
    return "online" if _wandb_has_credentials() else "offline"


def _call_with_timeout(fn: Callable[..., Any], timeout: float, **kwargs) -> Any:
    """fn(**kwargs) in a daemon thread; TimeoutError when it has not returned after `timeout` s."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = fn(**kwargs)
        except BaseException as exc:  # handed to the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target, name="wandb-init", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(f"wandb did not start within {timeout:g} s (--wandb_timeout)")
    if "error" in box:
        raise box["error"]
    return box["result"]


def start_wandb(mode: str, config: dict, *, project: str = "captioner", entity: str | None = None,
                timeout: float = 30.0, job_type: str | None = None):
    """A wandb run, or None (mode disabled, wandb missing, or it failed or hung: one warning)."""
    mode = wandb_mode(mode)
    if mode == "disabled":
        return None
    try:
        import wandb

        run = _call_with_timeout(wandb.init, timeout, project=project, entity=entity, mode=mode,
                                 config=config, job_type=job_type,
                                 settings=wandb.Settings(init_timeout=timeout))
        logger.info("wandb %s run: %s", mode, getattr(run, "url", None) or getattr(run, "dir", ""))
        return run
    except Exception as exc:  # wandb has many failure modes (network, auth, disk): none may stop us
        logger.warning("wandb disabled for this run: %s", str(exc).splitlines()[0][:200] if str(exc) else exc)
        return None


def _wandb_samples(wandb, samples: list[dict]) -> list:
    """Attention figures of the validation samples that carry a photo, all at one size."""
    images = []
    for s in samples:
        if s.get("photo") is None:
            continue
        fig = plots.attention_figure(s["photo"], s["words"], s["alphas"], title=s["caption"])
        images.append(wandb.Image(plots.figure_image(fig, SAMPLE_FIGURE_SIZE), caption=s["caption"]))
    return images


# ---------------------------------------------------------------- both

class RunLoggers:
    """wandb and TensorBoard of one training run (rank 0); every call is a no-op where neither is on."""

    def __init__(self, cfg, config: dict, weights_dir: Path, enabled: bool):
        self.wandb = None
        self.tb = None
        if not enabled:
            return
        self.wandb = start_wandb(cfg.wandb, config, project=cfg.wandb_project,
                                 entity=cfg.wandb_entity, timeout=cfg.wandb_timeout, job_type="train")
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            run_dir = Path(weights_dir) / "runs" / time.strftime("%Y%m%d-%H%M%S")
            self.tb = SummaryWriter(log_dir=str(run_dir))
            logger.info("TensorBoard: tensorboard --logdir %s", run_dir.parent)

    @property
    def wants_photos(self) -> bool:
        """Whether log_epoch draws the samples' attention figures (they then need a "photo")."""
        return self.wandb is not None

    def log_epoch(self, row: dict, samples: list[dict]) -> None:
        step = row["epoch"]
        scalars = {"train/loss": row["loss"], "train/acc": row["acc"], "val/loss": row["val_loss"],
                   "val/acc": row["val_acc"], "lr": row["lr"], "captions_per_s": row["captions_per_s"],
                   "train/skipped_images": row.get("skipped_images", 0),
                   **{f"val/bleu{n}": row[f"bleu{n}"] for n in range(1, 5)}}
        if row.get("encoder_lr") is not None:
            scalars["encoder_lr"] = row["encoder_lr"]
        scalars.update({name: row[key] for key, name in (
            ("cider", "val/cider"), ("reward", "train/reward"), ("baseline", "train/baseline"),
            ("sample_len", "train/sample_len")) if key in row})
        if self.tb is not None:
            self._log_tensorboard(step, scalars, samples)
        if self.wandb is not None:
            try:
                import wandb

                data = dict(scalars, epoch=step)
                images = _wandb_samples(wandb, samples)
                if images:
                    data["val/samples"] = images
                self.wandb.log(data, step=step)
            except Exception as exc:
                logger.warning("wandb logging failed, turned off: %s", exc)
                self.wandb = None

    def _log_tensorboard(self, step: int, scalars: dict, samples: list[dict]) -> None:
        for k, v in scalars.items():
            self.tb.add_scalar(k, v, step)
        text = "\n\n".join(f"**{s['name']}**: {s['caption']}  \n_refs_: {' | '.join(s['references'][:2])}"
                           for s in samples)
        if text:
            self.tb.add_text("val/samples", text, step)
        self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            try:
                self.wandb.finish()
            except Exception as exc:
                logger.warning("wandb finish failed: %s", exc)
