"""Training (`--mode train`): the loop, validation, early stopping, checkpoints of a run.

One process on CPU or one GPU, `nn.DataParallel` over the visible GPUs (`--multi_gpu`), or
DistributedDataParallel when launched by `torchrun` (NCCL on GPUs, gloo on CPU). With a frozen
encoder the CNN runs once per image (extract.py caches its features). A validation score of real
greedy decoding of each validation image drives the learning-rate schedule, early stopping and
`best.pt`: `--select_by`, CIDEr-D by default (BLEU-4 on request, as the demo preset does), under
cross-entropy (`--objective xe`) and self-critical training alike (`--objective scst`, scst.py:
the same step machinery with another loss, on batches of images). `--init_from` starts a new run
from another run's weights and vocabulary (fresh optimizer).

The cross-entropy step never waits for the device between logging points (tests/test_cuda_paths.py
counts zero syncs on fake CUDA): host copies are non-blocking from pinned memory; the loop's
shape and the batch's distinct images come from the host copy of the batch (train_net.HostSide);
the loss ignores padding instead of indexing it away; the loss and accuracy sums stay on the
device and are read at logging points; a NaN/inf step is skipped on the device by GradScaler
with the fused AdamW (`optimizer.found_inf`), in every AMP mode (outside fp16 the scale is 1,
set back after every update, so it changes no bit of the gradients). Autocast is entered inside
the wrapped module (train_net.TrainStep), so DataParallel's replicas compute in the run's dtype.

Shape letters: B batch, T caption length (with <sos>/<eos>), U distinct images of a batch,
P encoder positions, C encoder channels, V vocabulary.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
import random
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

import checkpoint as ckpt_lib
from cider import corpus_cider
from config import INIT_FIELDS, TRAINING_FIELDS, DecodeConfig, TrainConfig
import data_utils
import decoding
from devices import (Dist, autocast, init_distributed, precision_name, resolve_amp, resolve_device, set_threads,
                     to_device, unwrap)
import extract
from metrics import corpus_bleu
import model as model_lib
from run_files import RUN_FILES, protect_earlier_run, resolve_resume, save_epoch_files
from run_logging import RunLoggers, epoch_line, progress
from sampler import ResumableSampler, image_groups
import scst
from seeded_items import SeededItems
from stopping import EXIT_SIGNAL, StopFlag, any_rank, stop_signals
from text import Vocabulary
from train_net import HostSide, TrainStep, stand_in_batch, wrap_for_devices
from train_sums import DeviceSums, EpochTotals, token_accuracy

logger = logging.getLogger(__name__)

# Steps between reads of the device-side sums (the only host-device syncs of an epoch).
LOG_EVERY = 25

# `python main.py --mode train` with no data set: what a 2-core CPU trains in minutes on the
# embedded demo data. Applied field by field unless the user gave that flag (see main.py).
# There are no ImageNet weights offline, so the demo trains the small CNN (config.SMALL_CNN) from
# random weights, end to end at 64 px (an 8x8 map); it reaches val BLEU-4 ~0.89 in 15 epochs. The lr
# halves after two epochs without a better val BLEU-4, not one: halving on every dip (a dip is
# common with a batch of 40) left the lr at 1/32 by epoch 11 and val BLEU-4 at 0.80.
# Two threads suit an idle 2-core machine; on a busy one pass --threads 1 (an OpenMP thread that
# is not scheduled stalls every small product). `resume: auto`: `make demo` run again continues
# (or, when finished, just reports) the demo run instead of refusing to replace it.
DEMO_PRESET: dict[str, Any] = {
    "encoder": "small_cnn",
    "pretrained": False,
    "fine_tune_encoder": True,
    "image_size": 64,
    "encoded_size": 8,
    "encoder_proj_dim": 0,
    "embed_dim": 128,
    "attention_dim": 128,
    "decoder_dim": 128,
    "dropout": 0.1,
    "embed_dropout": 0.0,
    "feature_dropout": 0.0,
    "label_smoothing": 0.0,
    "select_by": "bleu4",
    "batch_size": 40,
    "epochs": 16,
    "lr": 3e-3,
    "encoder_lr": 3e-3,
    "lr_patience": 1,
    "patience": 0,
    "threads": 2,
    "num_workers": 0,
    "min_word_freq": 1,
    "resume": "auto",
}


# ---------------------------------------------------------------- demo preset

def is_demo(data_cfg) -> bool:
    """No data set given: the embedded demo data set (and the demo preset) is used."""
    return data_cfg.dataset_path is None and not data_cfg.hf_dataset


def demo_overrides(explicit: Iterable[str]) -> dict[str, Any]:
    """The demo preset's values for every field the user did not set on the command line."""
    explicit = set(explicit)
    return {k: v for k, v in DEMO_PRESET.items() if k not in explicit}


# ---------------------------------------------------------------- randomness and the step module

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------- one epoch

class TrainingDiverged(RuntimeError):
    """Too many NaN/inf losses in a row."""


def compute_loss(net: nn.Module, inputs, captions, lengths, alpha_c: float, label_smoothing: float = 0.0,
                 **net_kwargs):
    """Forward + the design card's loss: cross-entropy without padding + attention regulariser.

    `net` is a TrainStep (possibly wrapped by DataParallel/DDP; net_kwargs: image_idx, host) or
    a decoder (inputs: features; net_kwargs: host_lengths).
    """
    logits, alphas = net(inputs, captions, lengths, **net_kwargs)  # (B, T-1, V), (B, T-1, P)
    loss, ce = model_lib.caption_loss(logits, captions, lengths, alphas, alpha_c, label_smoothing)
    return loss, ce, logits


def cross_entropy_objective(net: nn.Module, batch, device: torch.device, alpha_c: float,
                            label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher-forced loss of a batch of captions and its sums (captions, tokens, correct, 0, 0)."""
    captions = to_device(batch.captions, device)  # (B, T)
    lengths = to_device(batch.lengths, device)  # (B,)
    loss, _, logits = compute_loss(net, to_device(batch.inputs, device), captions, lengths, alpha_c,
                                   label_smoothing, image_idx=to_device(batch.image_idx, device),
                                   host=HostSide.of(batch))
    correct, tokens = token_accuracy(logits.detach(), captions, lengths)
    zero = correct.new_zeros(())
    return loss, torch.stack([zero + captions.size(0), tokens, correct, zero, zero]).double()


def train_step(net: nn.Module, batch, optimizer, scaler, device: torch.device, cfg: TrainConfig, *,
               alpha_c: float = 1.0, amp_dtype: torch.dtype | None, sums: DeviceSums, d: Dist = Dist(),
               objective: Callable | None = None, weight: float = 1.0) -> None:
    """One optimizer step, without waiting for the device (an SCST objective waits for its reward).

    `objective(net, batch, device) -> (loss, sums)`: scst.ScstObjective, or None for cross-entropy
    with `alpha_c`. A NaN/inf loss (on any rank) leaves the weights and the optimizer untouched:
    its gradients are non-finite, so GradScaler's `found_inf` makes the fused optimizer skip the
    update on the device. `sums` counts it. `weight` 0: a stand-in batch (see stand_in_batch)
    that enters the step's collectives and adds nothing to the gradients or the sums.
    """
    optimizer.zero_grad(set_to_none=True)
    with autocast(device, amp_dtype):  # the loss; the module enters the same autocast itself
        if objective is None:
            loss, stats = cross_entropy_objective(net, batch, device, alpha_c, cfg.label_smoothing)
        else:
            loss, stats = objective(net, batch, device)
    if weight != 1.0:
        loss, stats = loss * weight, stats * weight
    bad = (~torch.isfinite(loss.detach())).double()  # () 1.0 for a skipped step
    if d.enabled:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)  # every rank skips the same steps
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    if cfg.grad_clip > 0:
        nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], cfg.grad_clip)
    scaler.step(optimizer)
    # Outside fp16 the scale stays 1: update() would halve it at each non-finite step for good.
    scaler.update(None if amp_dtype == torch.float16 else 1.0)
    sums.add(loss.detach(), bad, stats)


def _check_diverged(worst: int, epoch: int, cfg: TrainConfig, totals: EpochTotals) -> None:
    if worst:
        logger.warning("epoch %d: %d non-finite loss(es) so far, their steps skipped",
                       epoch + 1, totals.skipped_nonfinite)
    if worst >= cfg.max_bad_steps:
        raise TrainingDiverged(
            f"{worst} non-finite losses in a row at epoch {epoch + 1}; stopped (last good "
            f"checkpoint kept). Try a lower --lr, --amp off, or --grad_clip")


def train_one_epoch(loader, net: nn.Module, optimizer, scaler, epoch: int, device: torch.device,
                    cfg: TrainConfig, *, alpha_c: float, amp_dtype: torch.dtype | None = None,
                    totals: EpochTotals | None = None, stop: StopFlag | None = None,
                    d: Dist = Dist(), desc: str = "train", objective: Callable | None = None,
                    stand_in=None) -> tuple[EpochTotals, bool]:
    """Train over `loader` once (or over what is left of it). Returns (totals, stopped early).
    `objective`: as train_step's (None: cross-entropy). `stand_in`: what a DDP rank steps on
    with weight 0 when every image of its batch was unreadable (stand_in_batch).

    NaN/inf losses skip their steps; `cfg.max_bad_steps` of them in a row raise TrainingDiverged
    at the next logging point (no bad update reaches the weights meanwhile).
    """
    totals = totals or EpochTotals()
    net.train()
    sums = DeviceSums(device)
    bar = progress(loader, desc=desc, leave=False, show=d.is_main)
    start = time.perf_counter()
    stopped = False
    for batch in bar:
        totals.skipped_images += int(batch.n_skipped)
        totals.steps += 1
        if len(batch):
            train_step(net, batch, optimizer, scaler, device, cfg, alpha_c=alpha_c,
                       amp_dtype=amp_dtype, sums=sums, d=d, objective=objective)
        elif d.enabled:  # every image was unreadable, but the other ranks enter the step's collectives
            train_step(net, stand_in, optimizer, scaler, device, cfg, alpha_c=alpha_c,
                       amp_dtype=amp_dtype, sums=sums, d=d, objective=objective, weight=0.0)
        at_log = totals.steps % LOG_EVERY == 0
        if at_log:
            _check_diverged(sums.read(totals), epoch, cfg, totals)
            bar.set_postfix(loss=f"{totals.loss_sum / max(totals.captions, 1):.3f}", refresh=False)
        # Under DDP the ranks agree only at logging points (a collective); alone, every step.
        if stop is not None and (not d.enabled or at_log) and any_rank(bool(stop), device, d):
            stopped = True
            break
    _check_diverged(sums.read(totals), epoch, cfg, totals)
    totals.seconds += time.perf_counter() - start
    return totals, stopped


# ---------------------------------------------------------------- validation

@dataclasses.dataclass
class Validation:
    loss: float
    acc: float
    bleu: list[float]                   # BLEU-1..4 of greedy captions, one per image
    samples: list[dict]                 # name, path, caption, words, references, alphas (first images)
    cider: float = 0.0                  # CIDEr-D of the same captions (coco-caption's corpus score)


@torch.no_grad()
def _teacher_forced(loader, model: nn.Module, device: torch.device, alpha_c: float,
                    amp_dtype: torch.dtype | None, show_progress: bool) -> tuple[float, float]:
    """Mean loss and token accuracy of the validation captions (logged only), one sync."""
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss x captions, captions, correct, tokens
    # Images: the captions of one image (neighbours in the loader) share an encoder pass.
    step = TrainStep(model, amp_dtype).eval()
    for batch in progress(loader, desc="val loss", leave=False, show=show_progress):
        if len(batch) == 0:
            continue
        captions = to_device(batch.captions, device)  # (B, T)
        lengths = to_device(batch.lengths, device)  # (B,)
        with autocast(device, amp_dtype):  # the loss; the module enters the same autocast itself
            loss, _, logits = compute_loss(step, to_device(batch.inputs, device), captions, lengths, alpha_c,
                                           image_idx=to_device(batch.image_idx, device), host=HostSide.of(batch))
        finite = torch.isfinite(loss).double()
        correct, tokens = token_accuracy(logits, captions, lengths)
        n = captions.size(0)
        sums += torch.stack([torch.where(finite > 0, loss.double(), 0.0) * n, finite * n,
                             correct.double(), tokens.double()])
    loss_sum, n_captions, correct, tokens = sums.tolist()
    return loss_sum / max(n_captions, 1), correct / max(tokens, 1)


@torch.no_grad()
def validate(caption_loader, image_loader, model: nn.Module, vocab, device: torch.device, *,
             alpha_c: float, max_len: int, amp_dtype: torch.dtype | None = None,
             num_samples: int = 4, show_progress: bool = True) -> Validation:
    """Teacher-forced loss/accuracy over the validation captions (logged only), and BLEU-1..4 and
    CIDEr-D of greedy captions decoded once per validation image against all its references
    (the --select_by score drives the schedule, early stopping and best.pt)."""
    model = unwrap(model)
    model.eval()
    loss, acc = _teacher_forced(caption_loader, model, device, alpha_c, amp_dtype, show_progress)
    captions, _ = decoding.caption_loader(model, image_loader, vocab, DecodeConfig(beam_size=1, max_len=max_len),
                                          device, amp_dtype=amp_dtype, desc="val decode",
                                          show_progress=show_progress)
    records = image_loader.dataset.records
    hypotheses = {records[c.index].name: " ".join(c.words) for c in captions}
    references = {records[c.index].name: [" ".join(t) for t in records[c.index].tokens] for c in captions}
    bleu = corpus_bleu(references, hypotheses) if hypotheses else [0.0] * 4
    cider_d = corpus_cider([c.words for c in captions], [records[c.index].tokens for c in captions])
    samples = [{"name": records[c.index].name, "path": str(records[c.index].path),
                "caption": " ".join(c.words), "words": c.words,
                "references": references[records[c.index].name], "alphas": c.alphas}
               for c in captions[:num_samples]]
    return Validation(loss=loss, acc=acc, bleu=bleu, samples=samples, cider=cider_d)


# ---------------------------------------------------------------- building blocks

def make_optimizer(model: nn.Module, model_cfg, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Decoder parameters at `lr`; encoder parameters (only when fine-tuned) at `encoder_lr`.

    Always the fused kernel (CPU and CUDA): it skips a step flagged by GradScaler on the device
    (no sync), and is ~6x faster than torch's per-tensor CPU loop (resnet18's 11M parameters:
    19 ms against 110 ms a step, one thread).
    """
    model = unwrap(model)
    encoder_ids = {id(p) for p in model.encoder.parameters()} if model.encoder is not None else set()
    decoder = [p for p in model.parameters() if p.requires_grad and id(p) not in encoder_ids]
    encoder = [p for p in model.parameters() if p.requires_grad and id(p) in encoder_ids]
    groups = [{"params": decoder, "lr": cfg.lr, "name": "decoder"}]
    if encoder:
        groups.append({"params": encoder, "lr": cfg.encoder_lr, "name": "encoder"})
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return cls(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)


def make_scaler(device: torch.device, amp_dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """Dynamic loss scaling for fp16; otherwise a scale of 1 (growth every 2**30 steps, and
    train_step sets it back to 1 after each update), kept for its on-device skip of non-finite
    steps. Powers of two scale exactly."""
    if amp_dtype == torch.float16:
        return torch.amp.GradScaler(device.type)
    return torch.amp.GradScaler(device.type, init_scale=1.0, growth_interval=2**30)


def _group_lr(optimizer, name: str) -> float | None:
    for g in optimizer.param_groups:
        if g.get("name") == name:
            return g["lr"]
    return None


def _side(positions: int, default: int) -> int:
    """The grid side of P positions when P is a square (ModelConfig.encoded_size), else default."""
    side = math.isqrt(positions)
    return side if side * side == positions else default


def _reduce_totals(totals: EpochTotals, device: torch.device, d: Dist) -> EpochTotals:
    """Sum the epoch's running totals over ranks (seconds: the slowest rank)."""
    if not d.enabled:
        return totals
    names = DeviceSums.FIELDS + ("skipped_images",)
    t = torch.tensor([getattr(totals, n) for n in names], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    s = torch.tensor([totals.seconds], dtype=torch.float64, device=device)
    dist.all_reduce(s, op=dist.ReduceOp.MAX)
    summed = {n: type(getattr(totals, n))(v) for n, v in zip(names, t.tolist())}
    return dataclasses.replace(totals, **summed, seconds=float(s[0]))


def _broadcast(metrics: Validation | None, d: Dist) -> Validation:
    """Rank 0's validation result on every rank: they step the schedule and stop together."""
    if not d.enabled:
        return metrics
    box = [None if metrics is None else (metrics.loss, metrics.acc, list(metrics.bleu), metrics.cider)]
    dist.broadcast_object_list(box, src=0)
    loss, acc, bleu, cider_d = box[0]
    return metrics if metrics is not None else Validation(loss, acc, bleu, [], cider_d)


# ---------------------------------------------------------------- the run

@dataclasses.dataclass
class Run:
    """One training run's state, carried from step to step of `run_training`."""
    cfg: TrainConfig
    data_cfg: Any
    model_cfg: Any
    d: Dist
    device: torch.device
    amp_dtype: torch.dtype | None
    splits: Any = None
    vocab: Any = None
    model: nn.Module | None = None
    store: Any = None                   # FeatureStore of --features_dir or the feature cache
    features: dict | None = None        # what the checkpoint records about those features
    net: nn.Module | None = None        # TrainStep (SCST: scst.SampleStep), wrapped for DP/DDP
    init: dict | None = None            # --init_from's checkpoint: weights and vocabulary only
    objective: Any = None               # scst.ScstObjective, or None: cross-entropy
    optimizer: Any = None
    scheduler: Any = None
    scaler: Any = None
    sampler: ResumableSampler | None = None
    loaders: dict = dataclasses.field(default_factory=dict)  # train, val, val_images
    history: list = dataclasses.field(default_factory=list)
    early: dict = dataclasses.field(default_factory=lambda: {"best": -math.inf, "bad_epochs": 0})
    start_epoch: int = 0
    start_step: int = 0
    partial: EpochTotals | None = None
    stand_in: Any = None                # stand_in_batch: a DDP rank's step when its batch held nothing

    @property
    def weights_dir(self) -> Path:
        return Path(self.cfg.weights_dir)

    def snapshot(self, epoch: int, step: int = 0, totals: EpochTotals | None = None) -> dict:
        return ckpt_lib.training_checkpoint(
            self.model, self.vocab, self.model_cfg, train_cfg=self.cfg, data_cfg=self.data_cfg,
            epoch=epoch, step_in_epoch=step,
            partial=dataclasses.asdict(totals) if totals is not None else None,
            best_score=self.early["best"], history=self.history, optimizer=self.optimizer,
            scheduler=self.scheduler, scaler=self.scaler, early_stopping=self.early,
            features=self.features, precision=precision_name(self.amp_dtype))

    def stopped_early(self) -> bool:
        return self.early["bad_epochs"] >= self.cfg.patience > 0

    @property
    def selection(self) -> tuple[str, str]:
        """The history key and name of the validation score that picks best.pt, steps the
        schedule and stops early (--select_by)."""
        return (self.cfg.select_by, {"cider": "CIDEr-D", "bleu4": "BLEU-4"}[self.cfg.select_by])


def run_training(data_cfg, model_cfg, train_cfg: TrainConfig) -> int:
    """Train; returns the exit status (0 done, 1 diverged, 130/143 stopped by SIGINT/SIGTERM).

    `model_cfg.vocab_size` is replaced by the size of the vocabulary built from the training
    captions (or the one in the checkpoint being resumed).
    """
    d = init_distributed(train_cfg.device)
    try:
        run, ckpt, resume_path = _start(data_cfg, model_cfg, train_cfg, d)
        _load_data(run, ckpt)
        _build_model(run, ckpt, resume_path)
        _make_loaders(run)
        _make_optimization(run, ckpt)
        if ckpt is not None:
            _restore(run, ckpt, resume_path)
        step = scst.SampleStep if train_cfg.objective == "scst" else TrainStep
        run.net = wrap_for_devices(step(run.model, run.amp_dtype), run.cfg, run.device, d)
        status = _train_epochs(run)
        if status == 0:
            _report(run)
        return status
    finally:
        if d.enabled and dist.is_initialized():
            dist.destroy_process_group()


def _start(data_cfg, model_cfg, cfg: TrainConfig, d: Dist) -> tuple[Run, dict | None, Path | None]:
    """Threads, device, AMP, the checkpoint to resume (or the guard of an earlier run), seeds."""
    set_threads(cfg.threads)
    device = resolve_device(cfg.device, d.local_rank if d.enabled else None)
    amp_dtype = resolve_amp(cfg.amp, device)
    if not d.is_main:
        # One voice: ranks > 0 only report problems.
        logging.getLogger().setLevel(max(logging.WARNING, logging.getLogger().level))
    if is_demo(data_cfg):
        logger.info("demo data set with the demo preset: encoder %s %s, %s px images, %s; "
                    "flags you pass override the preset", model_cfg.encoder,
                    "trained from random weights (no ImageNet download)" if not model_cfg.pretrained
                    else "from ImageNet weights", model_cfg.image_size or "native",
                    "trained end to end" if model_cfg.fine_tune_encoder else "frozen")
    _check_init_from(cfg)
    model_lib.resolve(model_cfg)  # an unknown timm model or a size it refuses fails before the data loads
    resume_path = resolve_resume(cfg.resume, Path(cfg.weights_dir))
    if resume_path is None:
        protect_earlier_run(cfg, d)
    ckpt = ckpt_lib.load_checkpoint(resume_path) if resume_path else None
    if ckpt is not None:
        _check_objective(ckpt, cfg, resume_path)
    run = Run(cfg, data_cfg, model_cfg, d, device, amp_dtype)
    if ckpt is None and cfg.init_from:
        run.init = ckpt_lib.load_checkpoint(cfg.init_from)
    # The same seed on every rank: models (and feature-cache keys) start identical everywhere.
    seed_everything(cfg.seed)
    return run, ckpt, resume_path


def _check_init_from(cfg: TrainConfig) -> None:
    """SCST starts from a trained model; the run never writes over the file it starts from."""
    if cfg.init_from is None:
        if cfg.objective == "scst":
            raise ValueError("--objective scst fine-tunes a trained captioner: pass --init_from "
                             "CHECKPOINT (e.g. a cross-entropy run's best.pt)")
        return
    path, weights_dir = Path(cfg.init_from).resolve(), Path(cfg.weights_dir).resolve()
    if path.parent == weights_dir and (path.name in RUN_FILES or path.match("epoch_*.pt")):
        raise ValueError(f"--init_from {cfg.init_from} is a file this run would write; pass another "
                         f"--weights_dir for the new run")


def _check_objective(ckpt: dict, cfg: TrainConfig, path: Path) -> None:
    """A resumed run keeps its objective: its best score and schedule are on that objective's metric."""
    saved = (ckpt.get("train_config") or {}).get("objective", "xe")
    if saved != cfg.objective:
        raise ValueError(f"--resume {path}: that run trains with --objective {saved}, not {cfg.objective}; "
                         f"to fine-tune it, start a new run with --init_from {path} --weights_dir NEW")


def _load_data(run: Run, ckpt: dict | None) -> None:
    """The splits (rank 0 first: creating the demo set must not race) and the vocabulary."""
    if run.d.enabled and not run.d.is_main:
        dist.barrier()
    run.splits = data_utils.load_dataset(run.data_cfg)
    if run.d.enabled and run.d.is_main:
        dist.barrier()
    if not run.splits.train or not run.splits.val:
        raise ValueError(f"need training and validation images, got {len(run.splits.train)} and "
                         f"{len(run.splits.val)} (check the data set and --split_sizes)")
    source = ckpt if ckpt is not None else run.init
    if source is not None:
        run.vocab = Vocabulary.from_list(list(source["vocab"]))
    else:
        run.vocab = data_utils.build_vocabulary(run.splits, run.data_cfg.min_word_freq)


def _external_features(run: Run) -> None:
    """--features_dir: the model reads those features and has no CNN."""
    cfg, model_cfg = run.cfg, run.model_cfg
    if model_cfg.fine_tune_encoder:
        raise ValueError("--fine_tune_encoder needs images, but --features_dir gives fixed "
                         "features; drop one of the two")
    store = data_utils.FeatureStore.open(Path(cfg.features_dir))
    # Fields about images mean nothing without a CNN: canonical values, so resuming compares
    # only what matters.
    run.model_cfg = dataclasses.replace(
        model_cfg, encoder="features", feature_dim=store.channels, image_size=None, crop_pct=None, preprocess=None,
        encoded_size=_side(store.num_positions, model_cfg.encoded_size), pretrained=False,
        encoder_weights=None, encoder_from_scratch=False, fine_tune_stages=None)
    run.store = store
    run.features = {"dir": str(cfg.features_dir), "positions": store.num_positions,
                    "channels": store.channels}
    logger.info("training on features from %s (P=%d, C=%d): no CNN is built",
                cfg.features_dir, store.num_positions, store.channels)


def _build_model(run: Run, ckpt: dict | None, resume_path: Path | None) -> None:
    """The model (new or resumed) on its device, and the feature cache of a frozen encoder."""
    if run.cfg.features_dir:
        _external_features(run)
    model_cfg = dataclasses.replace(run.model_cfg, vocab_size=len(run.vocab))
    if ckpt is None and run.init is not None:
        _check_init_fits(run.init, model_cfg, run.cfg.init_from)
    run.model, run.model_cfg = ckpt_lib.build_or_restore_model(
        model_cfg, ckpt if ckpt is not None else run.init, resume_path or run.cfg.init_from or "checkpoint",
        ignore=INIT_FIELDS if ckpt is not None else INIT_FIELDS + TRAINING_FIELDS)
    run.model.to(run.device)
    if run.d.rank > 0:
        # Other dropout masks and augmentations per rank, once the weights are built alike.
        seed_everything(run.cfg.seed + 7919 * run.d.rank)
    if run.store is not None or run.model.encoder is None:
        return
    if run.model_cfg.fine_tune_encoder:
        logger.info("fine-tuning the encoder: feature caching is off, every step runs the CNN")
    elif run.cfg.cache_features:
        # Every split, as --mode extract does: the same key, and eval can use the cache too.
        records = run.splits.train + run.splits.val + run.splits.test
        run.store, run.features = extract.cached_features(
            run.model, records, run.model_cfg, run.cfg, run.device, run.amp_dtype, run.d,
            run.data_cfg.num_workers)
    else:
        logger.info("frozen encoder without a feature cache (--no-cache_features): the CNN "
                    "runs on every image at every step")


def _check_init_fits(init: dict, model_cfg, path: str) -> None:
    """--init_from's model must be the requested one (weights of another shape cannot load); how it
    trains may differ (e.g. --fine_tune_encoder from a frozen run)."""
    ckpt_lib.check_model_config(init, model_cfg, f"--init_from {path}", ignore=INIT_FIELDS + TRAINING_FIELDS,
                                way_out="pass the model flags of the run that trained it")


def _make_loaders(run: Run) -> None:
    """Training loader (resumable sampler) and the two validation loaders."""
    cfg, store, vocab = run.cfg, run.store, run.vocab
    train_records, val_records = run.splits.train, run.splits.val
    if store is not None:
        unreadable = set(store.meta.get("unreadable", []))
        train_records = [r for r in train_records if r.name not in unreadable]
        val_records = [r for r in val_records if r.name not in unreadable]
        inputs = train_inputs = {"features": store}
    else:
        inputs = {"transform": model_lib.image_transform(run.model_cfg, train=False)}
        train_inputs = {"transform": model_lib.image_transform(run.model_cfg, train=True)}
    batch_size, groups = cfg.batch_size, None
    collate = functools.partial(data_utils.collate_captions, pad_id=vocab.pad_id)
    if cfg.objective == "scst":
        # One item per image with all its references; K samples each keep batch_size captions a step.
        train_set = data_utils.ImageDataset(train_records, **train_inputs)
        batch_size, collate = max(1, cfg.batch_size // cfg.scst_samples), data_utils.collate_images
        run.objective = scst.ScstObjective([r.tokens for r in train_set.records], vocab, cfg,
                                           run.data_cfg.max_caption_len)
    else:
        train_set = data_utils.CaptionDataset(train_records, vocab, **train_inputs)
        if store is None and cfg.group_by_image:
            # End to end, an image's captions share a batch and one CNN pass (see TrainStep).
            groups = image_groups(train_set)
    run.sampler = ResumableSampler(len(train_set), num_replicas=run.d.world_size, rank=run.d.rank,
                                   shuffle=True, seed=cfg.seed, groups=groups)
    run.stand_in = stand_in_batch(run.model_cfg, vocab, store, images_only=cfg.objective == "scst")
    workers = run.data_cfg.num_workers
    # Seeded loader generators: creating an epoch's iterators must not consume the global RNG,
    # or a run resumed mid-epoch would draw other dropout masks than the uninterrupted one; and
    # SeededItems augments each item alike in whichever worker loads it (see seeded_items.py).
    run.loaders = {
        "train": data_utils.make_loader(SeededItems(train_set, cfg.seed + run.d.rank), batch_size,
                                        num_workers=workers,
                                        sampler=run.sampler, seed=cfg.seed + run.d.rank,
                                        collate=collate),
        "val": data_utils.make_loader(data_utils.CaptionDataset(val_records, vocab, **inputs),
                                      cfg.batch_size, num_workers=workers, seed=cfg.seed),
        "val_images": data_utils.make_loader(data_utils.ImageDataset(val_records, **inputs),
                                             cfg.batch_size, num_workers=workers, seed=cfg.seed),
    }


def _make_optimization(run: Run, ckpt: dict | None) -> None:
    run.optimizer = make_optimizer(run.model, run.model_cfg, run.cfg)
    run.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        run.optimizer, mode="max", factor=run.cfg.lr_factor, patience=run.cfg.lr_patience)
    run.scaler = make_scaler(run.device, run.amp_dtype)


def _restore(run: Run, ckpt: dict, path: Path) -> None:
    """Optimizer, schedule, scaler, counters, history and RNG states of the checkpoint."""
    run.optimizer.load_state_dict(ckpt["optimizer"])
    # Lrs come from the checkpoint (the schedule may have lowered them).
    run.scheduler.load_state_dict(ckpt["scheduler"])
    _restore_scaler(run, ckpt)
    run.early = dict(ckpt["early_stopping"])
    run.history = list(ckpt.get("history", []))
    run.start_epoch, run.start_step = int(ckpt["epoch"]), int(ckpt.get("step_in_epoch", 0))
    run.partial = EpochTotals(**ckpt["partial"]) if ckpt.get("partial") else None
    ckpt_lib.set_rng_state(ckpt["rng"])  # rank 0's states, saved by rank 0
    if run.d.rank > 0:
        # Each rank its own stream again (as _build_model gives them), not rank 0's masks.
        seq = np.random.SeedSequence([run.cfg.seed, run.d.rank, run.start_epoch, run.start_step])
        seed_everything(int(seq.generate_state(1)[0]))
    logger.info("resumed from %s: epoch %d%s, best val %s %.4f", path,
                run.start_epoch + 1 if run.start_step else run.start_epoch,
                f" step {run.start_step}" if run.start_step else " done", run.selection[1], run.early["best"])


def _restore_scaler(run: Run, ckpt: dict) -> None:
    """The saved gradient scaler, when the checkpoint trained in this run's precision. Another
    precision gets a fresh scaler: an fp16 run needs dynamic loss scaling, never the constant
    scale 1 a bf16/off run saved (nor the reverse)."""
    now = precision_name(run.amp_dtype)
    saved = ckpt.get("precision")
    if saved is None:  # written before the precision was recorded: its scaler says whether fp16
        growth = (ckpt.get("scaler") or {}).get("growth_interval", 2**30)
        saved = "fp16" if growth < 2**30 else ("bf16 or off" if now == "fp16" else now)
    if saved != now:
        logger.info("the checkpoint trained with --amp %s, this run with %s: a fresh gradient scaler",
                    saved, now)
    elif ckpt.get("scaler"):
        run.scaler.load_state_dict(ckpt["scaler"])


def _train_epochs(run: Run) -> int:
    """Epochs from where the run stands until the last, early stopping, a signal or divergence."""
    d, cfg = run.d, run.cfg
    if d.is_main:
        run.weights_dir.mkdir(parents=True, exist_ok=True)
        run.vocab.save(run.weights_dir / "vocab.json")
    if run.stopped_early() and run.start_step == 0:
        logger.info("this run had already stopped early (no better %s for %d epochs)",
                    run.selection[1], run.early["bad_epochs"])
        return 0
    run_config = {"model": ckpt_lib.to_plain(run.model_cfg), "train": ckpt_lib.to_plain(cfg),
                  "data": ckpt_lib.to_plain(run.data_cfg)}
    loggers = RunLoggers(cfg, run_config, run.weights_dir, enabled=d.is_main)
    bar = progress(total=cfg.epochs, initial=run.start_epoch, desc="epochs", show=d.is_main)
    stop = StopFlag()
    try:
        with stop_signals(stop):
            for epoch in range(run.start_epoch, cfg.epochs):
                status = _epoch(run, epoch, stop, loggers)
                bar.update(1)
                if status is not None:
                    return status
                if run.stopped_early():
                    logger.info("early stopping: no better validation %s for %d epochs (best %.4f)",
                                run.selection[1], run.early["bad_epochs"], run.early["best"])
                    bar.total = epoch + 1  # the bar ends where the run did, not at "12/100"
                    bar.refresh()
                    break
        return 0
    finally:
        bar.close()
        loggers.close()


def _epoch(run: Run, epoch: int, stop: StopFlag, loggers: RunLoggers) -> int | None:
    """Train one epoch, validate, record and save it. An exit status when the run must end."""
    d, cfg = run.d, run.cfg
    skip = run.start_step if epoch == run.start_epoch else 0
    run.sampler.set_epoch(epoch)
    run.loaders["train"].dataset.set_epoch(epoch)
    run.sampler.skip = skip * run.loaders["train"].batch_size
    totals = run.partial if (skip and run.partial is not None) else EpochTotals(steps=skip)
    try:
        totals, stopped = train_one_epoch(
            run.loaders["train"], run.net, run.optimizer, run.scaler, epoch, run.device, cfg,
            alpha_c=run.model_cfg.alpha_c, amp_dtype=run.amp_dtype, totals=totals, stop=stop, d=d,
            desc=f"epoch {epoch + 1}/{cfg.epochs}", objective=run.objective, stand_in=run.stand_in)
    except TrainingDiverged as exc:
        logger.error("%s", exc)
        return 1
    if stopped:
        if d.is_main:
            ckpt_lib.save_checkpoint(run.weights_dir / "last.pt", run.snapshot(epoch, totals.steps, totals))
            logger.warning("stopped at epoch %d step %d; saved %s (resume with --resume auto)",
                           epoch + 1, totals.steps, run.weights_dir / "last.pt")
        return EXIT_SIGNAL.get(stop.signum, 130)
    totals = _reduce_totals(totals, run.device, d)
    metrics = None
    if d.is_main:
        metrics = validate(run.loaders["val"], run.loaders["val_images"], run.model, run.vocab,
                           run.device, alpha_c=run.model_cfg.alpha_c,
                           max_len=run.data_cfg.max_caption_len, amp_dtype=run.amp_dtype,
                           num_samples=cfg.num_samples)
    metrics = _broadcast(metrics, d)
    row, improved = _record(run, epoch, totals, metrics)
    if d.is_main:
        logger.info(epoch_line(row, cfg.epochs))
        save_epoch_files(run.snapshot(epoch + 1), run.history, cfg, improved=improved)
        loggers.log_epoch(row, _with_photos(metrics.samples) if loggers.wants_photos else metrics.samples)
    if stop:
        return EXIT_SIGNAL.get(stop.signum, 130)
    return None


def _record(run: Run, epoch: int, totals: EpochTotals, metrics: Validation) -> tuple[dict, bool]:
    """The epoch's history row; early stopping's and the schedule's step on its selection score."""
    row = {"epoch": epoch + 1, **totals.summary(run.cfg.objective), "val_loss": metrics.loss,
           "val_acc": metrics.acc, **{f"bleu{n}": metrics.bleu[n - 1] for n in range(1, 5)},
           "cider": metrics.cider, "lr": _group_lr(run.optimizer, "decoder"),
           "encoder_lr": _group_lr(run.optimizer, "encoder"), "seconds": totals.seconds}
    score = row[run.selection[0]]
    improved = score > run.early["best"]
    run.early = {"best": score if improved else run.early["best"],
                 "bad_epochs": 0 if improved else run.early["bad_epochs"] + 1}
    row["best"] = improved
    run.history.append(row)
    run.scheduler.step(score)
    return row, improved


def _with_photos(samples: list[dict]) -> list[dict]:
    """The samples with their photos loaded (for the attention figures); unreadable ones without."""
    out = []
    for s in samples:
        try:
            photo = data_utils.load_image(s["path"])
        except (OSError, ValueError) as exc:
            logger.debug("no photo for %s: %s", s["name"], exc)
            photo = None
        out.append(dict(s, photo=photo))
    return out


def _report(run: Run) -> None:
    """The run's best epoch; the demo ends by captioning a held-out test image."""
    if not run.d.is_main or not run.history:
        return
    key, name = run.selection
    best = max(run.history, key=lambda h: h[key])
    logger.info("best validation %s %.4f at epoch %d; checkpoints in %s", name, best[key],
                best["epoch"], run.weights_dir)
    best_path = run.weights_dir / "best.pt"
    if is_demo(run.data_cfg) and run.splits.test and best_path.exists():
        _caption_demo_image(run.splits.test[0].path, best_path, run.device)


@torch.no_grad()
def _caption_demo_image(path: Path, checkpoint_path: Path, device: torch.device) -> None:
    """Print the best checkpoint's caption (beam 3) of one image."""
    model, vocab, model_cfg = ckpt_lib.model_from_checkpoint(ckpt_lib.load_checkpoint(checkpoint_path))
    model.to(device)
    image = model_lib.image_transform(model_cfg, train=False)(data_utils.load_image(path))  # (3, H, W)
    out = decoding.decode(model, to_device(image[None], device), sos_id=vocab.sos_id,
                          eos_id=vocab.eos_id, unk_id=vocab.unk_id, cfg=DecodeConfig(beam_size=3))
    print(f"{path}: {' '.join(vocab.decode(out.tokens[0]))}")
