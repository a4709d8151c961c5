"""Training (`--mode train`) and encoder feature extraction (`--mode extract`).

One process on CPU or one GPU, `nn.DataParallel` over the visible GPUs (`--multi_gpu`), or
DistributedDataParallel when launched by `torchrun` (NCCL on GPUs, gloo on CPU). With a frozen
encoder the CNN runs once per image: its features are cached on disk as float16 and memory
mapped (see data_utils.FeatureStore). Validation BLEU-4 from real greedy decoding of each
validation image drives the learning-rate schedule, early stopping and `best.pt`.

Shape letters: B batch, T caption length (with <sos>/<eos>), P encoder positions,
C encoder channels, V vocabulary.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import signal
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

import checkpoint as ckpt_lib
from config import AMP_MODES, DEVICES, OPTIMIZERS, WANDB_MODES, TrainConfig, _choice
import data_utils
import decoding
import model as model_lib

logger = logging.getLogger(__name__)

EXIT_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}

# `python main.py --mode train` with no data set: what a 2-core CPU trains in minutes on the
# embedded demo data. Applied field by field unless the user gave that flag (see main.py).
# There are no ImageNet weights offline, so the demo trains the small CNN (model.SMALL_CNN) from
# random weights, end to end at 64 px (an 8x8 map). Measured on one core: ResNet-18 from scratch
# learns colours and sizes but not shapes in this budget, and frozen random ResNet-18 features
# plateau at val BLEU-4 ~0.70; the small CNN reaches ~0.8 in ~15 epochs of ~30 s.
# Two threads: on an idle 2-core machine the whole run takes 8 min 39 s (one thread, with the
# other core busy: 11 min). On a machine that is busy, pass --threads 1: an OpenMP thread that is
# not scheduled stalls every small product.
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
    "batch_size": 40,
    "epochs": 16,
    "lr": 3e-3,
    "encoder_lr": 3e-3,
    "lr_patience": 0,
    "patience": 0,
    "threads": 2,
    "num_workers": 0,
    "min_word_freq": 1,
}


# ---------------------------------------------------------------- demo preset

def is_demo(data_cfg) -> bool:
    """No data set given: the embedded demo data set (and the demo preset) is used."""
    return data_cfg.dataset_path is None and not getattr(data_cfg, "hf_dataset", None)


def demo_overrides(explicit: Iterable[str]) -> dict[str, Any]:
    """The demo preset's values for every field the user did not set on the command line."""
    explicit = set(explicit)
    return {k: v for k, v in DEMO_PRESET.items() if k not in explicit}


# ---------------------------------------------------------------- devices, AMP, processes

@dataclasses.dataclass(frozen=True)
class Dist:
    """Where this process stands in a torchrun job (world_size 1 when not launched by it)."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_choice: str) -> Dist:
    """Join the torchrun process group when WORLD_SIZE > 1: NCCL on GPUs, gloo on CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Dist()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_choice != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        # Long timeout: ranks > 0 wait at a collective while rank 0 decodes the validation set.
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(minutes=60))
    logger.info("distributed: rank %d of %d (%s)", rank, world_size, dist.get_backend())
    return Dist(rank, world_size, local_rank)


def resolve_device(choice: str, d: Dist = Dist()) -> torch.device:
    """`auto` picks CUDA when present; `cuda` without a GPU is an error, not a silent CPU run."""
    _choice("device", choice, DEVICES)
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    return torch.device("cuda", d.local_rank if d.enabled else torch.cuda.current_device())


def resolve_amp(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for full float32."""
    _choice("amp", mode, AMP_MODES)
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return None
    if mode == "fp16" and device.type != "cuda":
        raise ValueError("--amp fp16 needs a CUDA device (float16 on CPU is slow and needs a "
                         "gradient scaler); use --amp bf16 or --amp off")
    if mode == "bf16" or (mode == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device_type=device.type, dtype=dtype or torch.float32,
                          enabled=dtype is not None)


def unwrap(model: nn.Module) -> nn.Module:
    """The CaptionModel inside DataParallel/DDP wrappers."""
    while isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        model = model.module
    return model


# ---------------------------------------------------------------- randomness

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Python, numpy and torch RNG states as plain data (loadable with weights_only=True)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    state = {"python": random.getstate(),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)},
             "torch": torch.get_rng_state(), "cuda": []}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        cuda_states = list(state["cuda"])[: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all(cuda_states)


class ResumableSampler(torch.utils.data.Sampler):
    """The distributed sampler of training (also for one process), resumable mid-epoch.

    The order depends only on (seed, epoch), so a run resumed mid-epoch sees the same remaining
    batches as the interrupted one (`skip` drops the samples already trained). `groups` (item
    indices that belong together, e.g. one image's captions) are shuffled as units and stay
    next to each other, so that a batch holds few images and the CNN runs once for each.
    Every rank gets a contiguous, equally long share (padded by wrapping around, as
    torch's DistributedSampler does), so all ranks take the same number of steps.
    """

    def __init__(self, num_items: int, *, num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int = 0, groups: list[list[int]] | None = None):
        self.num_items, self.num_replicas, self.rank = num_items, num_replicas, rank
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0
        self.groups = groups
        self.skip = 0  # samples of this epoch already trained (a multiple of the batch size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _per_rank(self) -> int:
        return math.ceil(self.num_items / self.num_replicas)

    def _order(self) -> list[int]:
        units = self.groups if self.groups is not None else [[i] for i in range(self.num_items)]
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            perm = torch.randperm(len(units), generator=g).tolist()
        else:
            perm = range(len(units))
        order = [i for u in perm for i in units[u]]
        size = self._per_rank()
        while len(order) < size * self.num_replicas:
            order += order[: size * self.num_replicas - len(order)]
        return order[self.rank * size:(self.rank + 1) * size]

    def __iter__(self):
        return iter(self._order()[self.skip:])

    def __len__(self) -> int:
        return max(0, self._per_rank() - self.skip)


def image_groups(dataset) -> list[list[int]]:
    """Item indices of a CaptionDataset grouped by image (its items are (image, caption) pairs)."""
    groups: dict[int, list[int]] = {}
    for k, (image, _) in enumerate(dataset.items):
        groups.setdefault(image, []).append(k)
    return list(groups.values())


class TrainStep(nn.Module):
    """What DataParallel/DDP wrap in training: encoder (once per distinct image) + decoder.

    inputs: images (B, 3, H, W) or features (B, P, C). With images, captions of the same image
    (same `image_idx`) share one encoder pass: end-to-end training costs one CNN pass per image,
    not per caption.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, inputs: torch.Tensor, captions: torch.Tensor, lengths: torch.Tensor,
                image_idx: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if inputs.dim() == 4 and image_idx is not None:
            unique, inverse = torch.unique(image_idx, return_inverse=True)  # (U,), (B,)
            positions = torch.arange(inverse.numel(), device=inverse.device)  # (B,)
            first = inverse.new_full((unique.numel(),), inverse.numel()).scatter_reduce(
                0, inverse, positions, reduce="amin")  # (U,) first caption of each image
            feats = self.model.encode(inputs[first])[inverse]  # (B, P, C)
        else:
            feats = _features(self.model, inputs)  # (B, P, C)
        return self.model.decoder(feats, captions, lengths)  # (B, T-1, V), (B, T-1, P)


# ---------------------------------------------------------------- stop signals

class StopFlag:
    """Set by SIGINT/SIGTERM; the loop finishes the current step, saves last.pt and exits."""

    def __init__(self):
        self.signum: int | None = None

    def __call__(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: the user wants out now (saves are atomic)
        self.signum = signum
        logger.warning("%s received: finishing this step, then saving last.pt",
                       signal.Signals(signum).name)

    def __bool__(self) -> bool:
        return self.signum is not None


@contextlib.contextmanager
def stop_signals(flag: StopFlag):
    """Route SIGINT/SIGTERM to `flag` while training (main thread only), then restore."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = {s: signal.signal(s, flag) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _any_rank(flag: bool, device: torch.device, d: Dist) -> bool:
    """True when `flag` is set on any rank, so that all ranks stop at the same step."""
    if not d.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t)
    return bool(t.item() > 0)


# ---------------------------------------------------------------- one epoch

class TrainingDiverged(RuntimeError):
    """Too many NaN/inf losses in a row."""


@dataclasses.dataclass
class EpochTotals:
    """Running sums of one training epoch (kept in last.pt when interrupted mid-epoch)."""
    loss_sum: float = 0.0       # sum of per-batch loss x captions
    captions: int = 0
    tokens: int = 0
    correct: int = 0
    steps: int = 0              # optimizer steps taken or skipped in this epoch
    skipped_nonfinite: int = 0
    skipped_images: int = 0
    seconds: float = 0.0

    def summary(self) -> dict:
        return {"loss": self.loss_sum / max(self.captions, 1),
                "acc": self.correct / max(self.tokens, 1),
                "captions_per_s": self.captions / max(self.seconds, 1e-9),
                "skipped_nonfinite": self.skipped_nonfinite}


def batch_inputs(batch, device: torch.device) -> torch.Tensor:
    """Images (B, 3, H, W) or features (B, P, C) of a collated batch, on `device`."""
    x = batch.features if getattr(batch, "features", None) is not None else batch.images
    return x.to(device, non_blocking=True)


def token_accuracy(logits: torch.Tensor, captions: torch.Tensor, lengths: torch.Tensor) -> tuple[int, int]:
    """Teacher-forced top-1 accuracy counts (correct, tokens) over the real (unpadded) targets."""
    targets = captions[:, 1:]  # (B, T-1)
    steps = torch.arange(targets.size(1), device=targets.device)  # (T-1,)
    mask = steps[None, :] < (lengths.to(targets.device) - 1)[:, None]  # (B, T-1)
    correct = (logits.argmax(-1) == targets) & mask  # (B, T-1)
    return int(correct.sum()), int(mask.sum())


def compute_loss(net: nn.Module, inputs, captions, lengths, alpha_c: float, image_idx=None):
    """Forward + the design card's loss: cross-entropy without padding + attention regulariser.

    `net` is a TrainStep (possibly wrapped by DataParallel/DDP) or a decoder (inputs: features).
    """
    args = (inputs, captions, lengths) if image_idx is None else (inputs, captions, lengths, image_idx)
    logits, alphas = net(*args)  # (B, T-1, V), (B, T-1, P)
    loss, ce = model_lib.caption_loss(logits, captions, lengths, alphas, alpha_c)
    return loss, ce, logits


def train_one_epoch(loader, model: nn.Module, optimizer, scaler, epoch: int, device: torch.device,
                    cfg: TrainConfig, *, alpha_c: float, amp_dtype: torch.dtype | None = None,
                    totals: EpochTotals | None = None, stop: StopFlag | None = None,
                    d: Dist = Dist(), desc: str = "train") -> tuple[EpochTotals, bool]:
    """Train over `loader` once (or over what is left of it). Returns (totals, stopped early).

    A NaN/inf loss skips its step with a warning; `cfg.max_bad_steps` of them in a row raise
    TrainingDiverged before any bad update reaches the weights.
    """
    totals = totals or EpochTotals()
    model.train()
    bad_in_row = 0
    params = [p for p in model.parameters() if p.requires_grad]
    bar = progress(loader, desc=desc, leave=False, show=d.is_main)
    start = time.perf_counter()
    stopped = False
    for batch in bar:
        if len(batch) == 0:  # every image of the batch was unreadable
            totals.skipped_images += int(batch.n_skipped)
            totals.steps += 1
            continue
        captions = batch.captions.to(device, non_blocking=True)  # (B, T)
        lengths = batch.lengths.to(device, non_blocking=True)  # (B,)
        inputs = batch_inputs(batch, device)
        totals.skipped_images += int(getattr(batch, "n_skipped", 0) or 0)
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, amp_dtype):
            loss, ce, logits = compute_loss(model, inputs, captions, lengths, alpha_c,
                                            batch.image_idx.to(device, non_blocking=True))
        # Under DDP every rank must agree whether to step, or their weights drift apart.
        finite = not _any_rank(not bool(torch.isfinite(loss.detach())), device, d)
        totals.steps += 1
        if not finite:
            bad_in_row += 1
            totals.skipped_nonfinite += 1
            logger.warning("epoch %d step %d: non-finite loss (%s), step skipped (%d in a row)",
                           epoch + 1, totals.steps, float(loss.detach()), bad_in_row)
            if bad_in_row >= cfg.max_bad_steps:
                raise TrainingDiverged(
                    f"{bad_in_row} non-finite losses in a row at epoch {epoch + 1}; stopped "
                    f"(last good checkpoint kept). Try a lower --lr, --amp off, or --grad_clip")
        else:
            bad_in_row = 0
            scaler.scale(loss).backward()
            if cfg.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            n = captions.size(0)
            correct, tokens = token_accuracy(logits.detach(), captions, lengths)
            totals.loss_sum += float(loss.detach()) * n
            totals.captions += n
            totals.correct += correct
            totals.tokens += tokens
            bar.set_postfix(loss=f"{totals.loss_sum / max(totals.captions, 1):.3f}", refresh=False)
        if stop is not None and _any_rank(bool(stop), device, d):
            stopped = True
            break
    totals.seconds += time.perf_counter() - start
    return totals, stopped


# ---------------------------------------------------------------- validation

def _features(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """Images (B, 3, H, W) through the encoder; features (B, P, C), cached or external, as they are."""
    return model.encode(inputs) if inputs.dim() == 4 else inputs


def progress(iterable=None, show: bool = True, **kwargs):
    """A tqdm bar; hidden on ranks > 0. Left to tqdm otherwise, so TQDM_DISABLE=1 silences it."""
    if not show:
        kwargs["disable"] = True
    return tqdm(iterable, dynamic_ncols=True, **kwargs)


@dataclasses.dataclass
class Validation:
    loss: float
    acc: float
    bleu: list[float]                   # BLEU-1..4 of greedy captions, one per image
    samples: list[dict]                 # name, path, caption, references, alphas (first images)


@torch.no_grad()
def validate(caption_loader, image_loader, model: nn.Module, vocab, device: torch.device, *,
             alpha_c: float, max_len: int, amp_dtype: torch.dtype | None = None,
             num_samples: int = 4, show_progress: bool = True) -> Validation:
    """Teacher-forced loss/accuracy over the validation captions (logged only), and BLEU-1..4 of
    greedy captions decoded once per validation image against all its references (drives
    the schedule, early stopping and best.pt)."""
    import test_eval

    model = unwrap(model)
    model.eval()
    loss_sum, n_captions, correct, tokens = 0.0, 0, 0, 0
    for batch in progress(caption_loader, desc="val loss", leave=False, show=show_progress):
        if len(batch) == 0:
            continue
        captions = batch.captions.to(device)  # (B, T)
        lengths = batch.lengths.to(device)  # (B,)
        with autocast(device, amp_dtype):
            feats = _features(model, batch_inputs(batch, device))  # (B, P, C)
            loss, _, logits = compute_loss(model.decoder, feats, captions, lengths, alpha_c)
        if torch.isfinite(loss):
            loss_sum += float(loss) * captions.size(0)
            n_captions += captions.size(0)
        c, t = token_accuracy(logits, captions, lengths)
        correct, tokens = correct + c, tokens + t

    records = image_loader.dataset.records
    decode_cfg = model_lib.DecodeConfig(beam_size=1, max_len=max_len)
    hypotheses, references, samples = {}, {}, []
    for batch in progress(image_loader, desc="val decode", leave=False, show=show_progress):
        if len(batch) == 0:
            continue
        with autocast(device, amp_dtype):
            feats = _features(model, batch_inputs(batch, device))  # (B, P, C)
            out = decoding.greedy_decode(model, feats, sos_id=vocab.sos_id, eos_id=vocab.eos_id,
                                         unk_id=vocab.unk_id, cfg=decode_cfg)
        for i, idx in enumerate(batch.image_idx.tolist()):
            record = records[idx]
            words = vocab.decode(out.tokens[i])
            hypotheses[record.name] = " ".join(words)
            references[record.name] = [" ".join(t) for t in record.tokens]
            if len(samples) < num_samples:
                samples.append({"name": record.name, "path": str(record.path),
                                "caption": " ".join(words), "words": words,
                                "references": references[record.name],
                                "alphas": out.alphas[i].float().cpu()})
    bleu = test_eval.corpus_bleu(references, hypotheses) if hypotheses else [0.0] * 4
    return Validation(loss=loss_sum / max(n_captions, 1), acc=correct / max(tokens, 1),
                      bleu=bleu, samples=samples)


# ---------------------------------------------------------------- cached features

def _encoder_digest(encoder: nn.Module) -> str:
    """Hash of the encoder's weights: random-init and fine-tuned encoders never share a cache."""
    h = hashlib.sha256()
    for name, t in sorted(encoder.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def features_key(model_cfg, encoder: nn.Module, names: list[str]) -> tuple[str, dict]:
    """Cache key: encoder, its weights, image size, pooling and the image list."""
    meta = {"encoder": model_cfg.encoder, "weights": _encoder_digest(encoder),
            "image_size": model_cfg.image_size, "encoded_size": model_cfg.encoded_size,
            "images": hashlib.sha256("\n".join(names).encode()).hexdigest()[:16],
            "num_images": len(names)}
    key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]
    return f"{model_cfg.encoder}-{key}", meta


@torch.no_grad()
def extract_features(model: nn.Module, records: list, model_cfg, out_dir: Path, device: torch.device,
                     *, batch_size: int, num_workers: int, amp_dtype: torch.dtype | None = None,
                     meta: dict | None = None, show_progress: bool = True) -> list[str]:
    """Run the encoder once per image and write features.npy (N, P, C) float16 + names.json.

    Batches stream into a memory-mapped file, so memory does not grow with the data set.
    Returns the names of images that could not be read: their rows are zeros, and meta.json
    lists them under "unreadable" so that training leaves them out.
    """
    model = unwrap(model)
    model.eval()
    transform = model_lib.image_transform(model_cfg, train=False)
    # Seeded: extracting (a cache miss) must leave the global RNG as a cache hit does.
    loader = data_utils.make_loader(data_utils.ImageDataset(records, transform=transform), batch_size,
                                    shuffle=False, num_workers=num_workers,
                                    collate=data_utils.collate_images, seed=0)
    positions, channels = model_cfg.num_positions, model_cfg.feature_dim
    unreadable: list[str] = []

    def encoded():
        done = 0
        for batch in progress(loader, desc="extract features", show=show_progress):
            n = len(batch) + batch.n_skipped
            rows = np.zeros((n, positions, channels), dtype=np.float16)  # (b, P, C)
            if len(batch):
                with autocast(device, amp_dtype):
                    feats = model.encode(batch.images.to(device))  # (b', P, C)
                rows[batch.image_idx.numpy() - done] = feats.float().cpu().numpy()
            kept = set(batch.image_idx.tolist())
            unreadable.extend(records[i].name for i in range(done, done + n) if i not in kept)
            done += n
            yield rows

    meta = dict(meta or {})
    data_utils.write_features(out_dir, [r.name for r in records], encoded(), positions, channels,
                              meta)
    if unreadable:
        logger.warning("%d image(s) could not be read; they are left out of training: %s",
                       len(unreadable), ", ".join(unreadable[:5]))
        meta["unreadable"] = unreadable
        write_json_atomic(out_dir / "meta.json", meta)
    return unreadable


def cached_features(model: nn.Module, records: list, model_cfg, cfg: TrainConfig,
                    device: torch.device, amp_dtype, d: Dist, num_workers: int = 0):
    """Open the feature cache for a frozen encoder, extracting it first when missing (rank 0)."""
    names = [r.name for r in records]
    key, meta = features_key(model_cfg, unwrap(model).encoder, names)
    out_dir = Path(cfg.features_root) / key
    if d.is_main and not (out_dir / "features.npy").exists():
        logger.info("frozen encoder: caching its features once per image in %s", out_dir)
        extract_features(model, records, model_cfg, out_dir, device, batch_size=cfg.batch_size,
                         num_workers=num_workers, amp_dtype=amp_dtype, meta=meta)
    elif d.is_main:
        logger.info("frozen encoder: reusing cached features in %s", out_dir)
    if d.enabled:
        dist.barrier()
    return data_utils.FeatureStore.open(out_dir), {"dir": str(out_dir), "key": key, **meta}


# ---------------------------------------------------------------- bookkeeping

def _plain(obj):
    """Config values as plain data for checkpoints (weights_only) and JSON."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return str(obj)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)


def write_json_atomic(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def plot_history(history: list[dict], graphs_dir: Path) -> list[Path]:
    """graphs/loss.png (train and val loss) and graphs/bleu.png (BLEU-1..4) against epoch."""
    from matplotlib.figure import Figure  # no pyplot: no global backend, works headless

    graphs_dir.mkdir(parents=True, exist_ok=True)
    epochs = [h["epoch"] for h in history]
    curves = {
        "loss.png": ("Loss (cross-entropy + attention term)", "loss",
                     {"train": [h["loss"] for h in history],
                      "validation": [h["val_loss"] for h in history]}),
        "bleu.png": ("Validation BLEU (greedy decoding)", "score",
                     {f"BLEU-{n}": [h[f"bleu{n}"] for h in history] for n in range(1, 5)}),
    }
    paths = []
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
        fig.savefig(graphs_dir / name, dpi=90)
        paths.append(graphs_dir / name)
    return paths


def epoch_line(row: dict, epochs: int) -> str:
    bleu = "/".join(f"{row[f'bleu{n}']:.3f}" for n in range(1, 5))
    return (f"epoch {row['epoch']}/{epochs} loss {row['loss']:.4f} val_loss {row['val_loss']:.4f} "
            f"acc {row['acc']:.3f} val_acc {row['val_acc']:.3f} BLEU-1..4 {bleu} "
            f"lr {row['lr']:.2e} time {row['seconds']:.1f}s {row['captions_per_s']:.0f} captions/s")


def save_epoch_files(snapshot: dict, history: list[dict], cfg: TrainConfig, *, improved: bool) -> None:
    """last.pt (always), best.pt (on a new best), epoch_NNN.pt (--save_every), history, graphs."""
    weights_dir, epoch = Path(cfg.weights_dir), snapshot["epoch"]
    ckpt_lib.save_checkpoint(weights_dir / "last.pt", snapshot)
    if improved:
        ckpt_lib.save_checkpoint(weights_dir / "best.pt", snapshot)
    if cfg.save_every and epoch % cfg.save_every == 0:
        ckpt_lib.save_checkpoint(weights_dir / f"epoch_{epoch:03d}.pt", snapshot)
        prune_periodic(weights_dir, cfg.keep_last)
    write_json_atomic(weights_dir / "history.json", history)
    plot_history(history, Path(cfg.graphs_dir))


def resolve_resume(resume: str | None, weights_dir: Path) -> Path | None:
    if resume is None:
        return None
    if resume == "auto":
        path = weights_dir / "last.pt"
        if not path.exists():
            logger.warning("--resume auto: no %s yet, starting a new run", path)
            return None
        return path
    path = Path(resume)
    if not path.exists():
        raise FileNotFoundError(f"--resume {resume}: no such checkpoint")
    return path


def prune_periodic(weights_dir: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` epoch_NNN.pt files (0 keeps all)."""
    if keep_last <= 0:
        return
    files = sorted(weights_dir.glob("epoch_*.pt"))
    for old in files[:-keep_last]:
        old.unlink(missing_ok=True)


# ---------------------------------------------------------------- wandb and TensorBoard

def _wandb_has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


def start_wandb(cfg: TrainConfig, config: dict):
    """A wandb run, or None. Never blocks training for long and never raises: one warning."""
    mode = cfg.wandb
    if mode == "auto":
        env = os.environ.get("WANDB_MODE")
        mode = env if env in ("online", "offline", "disabled") else (
            "online" if _wandb_has_credentials() else "offline")
    if mode == "disabled":
        return None
    try:
        import wandb

        run = wandb.init(project=cfg.wandb_project, entity=cfg.wandb_entity, mode=mode,
                         config=config, settings=wandb.Settings(init_timeout=cfg.wandb_timeout))
        logger.info("wandb %s run: %s", mode, getattr(run, "url", None) or getattr(run, "dir", ""))
        return run
    except Exception as exc:  # wandb has many failure modes (network, auth, disk): none may stop us
        logger.warning("wandb disabled for this run: %s", str(exc).splitlines()[0][:200] if str(exc) else exc)
        return None


def _sample_figure(sample: dict):
    """An image with its caption and attention maps, as a matplotlib Figure, or None."""
    try:
        import test as test_lib

        photo = data_utils.load_image(sample["path"])
        return test_lib.attention_figure(photo, sample["words"], sample["alphas"],
                                         title=sample["caption"])
    except Exception as exc:
        logger.debug("no attention figure for %s: %s", sample.get("name"), exc)
        return None


class RunLoggers:
    """wandb and TensorBoard on rank 0; every call is a no-op where neither is on."""

    def __init__(self, cfg: TrainConfig, config: dict, weights_dir: Path, enabled: bool):
        self.wandb = start_wandb(cfg, config) if enabled else None
        self.tb = None
        if enabled and cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            run_dir = weights_dir / "runs" / time.strftime("%Y%m%d-%H%M%S")
            self.tb = SummaryWriter(log_dir=str(run_dir))
            logger.info("TensorBoard: tensorboard --logdir %s", run_dir.parent)

    def log_epoch(self, row: dict, samples: list[dict]) -> None:
        step = row["epoch"]
        scalars = {"train/loss": row["loss"], "train/acc": row["acc"], "val/loss": row["val_loss"],
                   "val/acc": row["val_acc"], "lr": row["lr"], "captions_per_s": row["captions_per_s"],
                   **{f"val/bleu{n}": row[f"bleu{n}"] for n in range(1, 5)}}
        if row.get("encoder_lr") is not None:
            scalars["encoder_lr"] = row["encoder_lr"]
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
            text = "\n\n".join(f"**{s['name']}**: {s['caption']}  \n_refs_: {' | '.join(s['references'][:2])}"
                               for s in samples)
            if text:
                self.tb.add_text("val/samples", text, step)
            self.tb.flush()
        if self.wandb is not None:
            try:
                import wandb

                data = dict(scalars, epoch=step)
                images = []
                for s in samples:
                    fig = _sample_figure(s)
                    if fig is not None:
                        images.append(wandb.Image(fig, caption=s["caption"]))
                if images:
                    data["val/samples"] = images
                self.wandb.log(data, step=step)
            except Exception as exc:
                logger.warning("wandb logging failed, turned off: %s", exc)
                self.wandb = None

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            try:
                self.wandb.finish()
            except Exception as exc:
                logger.warning("wandb finish failed: %s", exc)


# ---------------------------------------------------------------- building blocks

def make_optimizer(model: nn.Module, model_cfg, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Decoder parameters at `lr`; encoder parameters (only when fine-tuned) at `encoder_lr`."""
    model = unwrap(model)
    encoder_ids = {id(p) for p in model.encoder.parameters()} if model.encoder is not None else set()
    decoder = [p for p in model.parameters() if p.requires_grad and id(p) not in encoder_ids]
    encoder = [p for p in model.parameters() if p.requires_grad and id(p) in encoder_ids]
    groups = [{"params": decoder, "lr": cfg.lr, "name": "decoder"}]
    if encoder:
        groups.append({"params": encoder, "lr": cfg.encoder_lr, "name": "encoder"})
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    try:
        # The fused kernel (CPU and CUDA): ~6x faster than the per-tensor loop torch uses on CPU
        # by default (resnet18's 11M parameters: 19 ms against 110 ms a step, one thread).
        return cls(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):  # older torch, or a device without the kernel
        return cls(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _group_lr(optimizer, name: str) -> float | None:
    for g in optimizer.param_groups:
        if g.get("name") == name:
            return g["lr"]
    return None


# ---------------------------------------------------------------- the run

def run_training(data_cfg, model_cfg, train_cfg: TrainConfig) -> int:
    """Train; returns the exit status (0 done, 1 diverged, 130/143 stopped by SIGINT/SIGTERM).

    `model_cfg.vocab_size` is replaced by the size of the vocabulary built from the training
    captions (or the one in the checkpoint being resumed).
    """
    d = init_distributed(train_cfg.device)
    try:
        return _run_training(data_cfg, model_cfg, train_cfg, d)
    finally:
        if d.enabled and dist.is_initialized():
            dist.destroy_process_group()


def _run_training(data_cfg, model_cfg, cfg: TrainConfig, d: Dist) -> int:
    if cfg.threads:
        # On a busy machine fewer threads than cores is faster: OpenMP threads that wait for a
        # core spin (measured: 12x slower with 2 threads than 1 on 2 shared cores).
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device, d)
    amp_dtype = resolve_amp(cfg.amp, device)
    if not d.is_main:
        # One voice: ranks > 0 only report problems.
        logging.getLogger().setLevel(max(logging.WARNING, logging.getLogger().level))
    weights_dir = Path(cfg.weights_dir)
    if is_demo(data_cfg):
        logger.info("demo data set with the demo preset: encoder %s %s, %s px images, %s; "
                    "flags you pass override the preset", model_cfg.encoder,
                    "trained from random weights (no ImageNet download)" if not model_cfg.pretrained
                    else "from ImageNet weights", model_cfg.image_size or "native",
                    "trained end to end" if model_cfg.fine_tune_encoder else "frozen")
    resume_path = resolve_resume(cfg.resume, weights_dir)
    ckpt = ckpt_lib.load_checkpoint(resume_path) if resume_path else None
    # The same seed on every rank: models (and feature-cache keys) start identical everywhere.
    seed_everything(cfg.seed)

    # Rank 0 first: creating the demo data set (or any cache) must not race between ranks.
    if d.enabled and not d.is_main:
        dist.barrier()
    splits = data_utils.load_dataset(data_cfg)
    if d.enabled and d.is_main:
        dist.barrier()
    if not splits.train or not splits.val:
        raise ValueError(f"need training and validation images, got {len(splits.train)} and "
                         f"{len(splits.val)} (check the data set and --split_sizes)")

    if ckpt is not None:
        vocab = data_utils.Vocabulary.from_list(list(ckpt["vocab"]))
    else:
        vocab = data_utils.build_vocabulary(splits, data_cfg.min_word_freq)

    store, features_info = None, None
    if cfg.features_dir:
        if model_cfg.fine_tune_encoder:
            raise ValueError("--fine_tune_encoder needs images, but --features_dir gives fixed "
                             "features; drop one of the two")
        store = data_utils.FeatureStore.open(Path(cfg.features_dir))
        # Fields about images mean nothing without a CNN: canonical values, so resuming compares
        # only what matters.
        model_cfg = dataclasses.replace(model_cfg, encoder="features", feature_dim=store.channels,
                                        encoded_size=_side(store.num_positions, model_cfg.encoded_size),
                                        image_size=None, pretrained=False, encoder_weights=None,
                                        **_if_field(model_cfg, encoder_from_scratch=False))
        features_info = {"dir": str(cfg.features_dir), "positions": store.num_positions,
                         "channels": store.channels}
        logger.info("training on features from %s (P=%d, C=%d): no CNN is built",
                    cfg.features_dir, store.num_positions, store.channels)
    model_cfg = dataclasses.replace(model_cfg, vocab_size=len(vocab))
    model, model_cfg = build_or_restore_model(model_cfg, ckpt, resume_path)
    model.to(device)
    if d.rank > 0:
        # Other dropout masks and augmentations per rank, once the weights are built alike.
        seed_everything(cfg.seed + 7919 * d.rank)

    if store is None and model.encoder is not None and not model_cfg.fine_tune_encoder:
        if cfg.cache_features:
            # Every split, as --mode extract does: the same key, and eval can use the cache too.
            records = splits.train + splits.val + splits.test
            store, features_info = cached_features(model, records, model_cfg, cfg, device,
                                                   amp_dtype, d, data_cfg.num_workers)
        else:
            logger.info("frozen encoder without a feature cache (--no-cache_features): the CNN "
                        "runs on every image at every step")
    elif model_cfg.fine_tune_encoder:
        logger.info("fine-tuning the encoder: feature caching is off, every step runs the CNN")

    train_records, val_records = splits.train, splits.val
    if store is not None:
        unreadable = set(store.meta.get("unreadable", []))
        train_records = [r for r in train_records if r.name not in unreadable]
        val_records = [r for r in val_records if r.name not in unreadable]
        inputs = {"features": store}
        train_set = data_utils.CaptionDataset(train_records, vocab, **inputs)
    else:
        inputs = {"transform": model_lib.image_transform(model_cfg, train=False)}
        train_set = data_utils.CaptionDataset(
            train_records, vocab, transform=model_lib.image_transform(model_cfg, train=True))
    val_set = data_utils.CaptionDataset(val_records, vocab, **inputs)
    val_images = data_utils.ImageDataset(val_records, **inputs)

    workers = data_cfg.num_workers
    # End to end, an image's captions share a batch and one CNN pass (see TrainStep).
    groups = image_groups(train_set) if store is None and cfg.group_by_image else None
    sampler = ResumableSampler(len(train_set), num_replicas=d.world_size, rank=d.rank, shuffle=True,
                               seed=cfg.seed, groups=groups)
    # Seeded loader generators: creating an epoch's iterators must not consume the global RNG,
    # or a run resumed mid-epoch would draw other dropout masks than the uninterrupted one.
    train_loader = data_utils.make_loader(train_set, cfg.batch_size, num_workers=workers,
                                          sampler=sampler, seed=cfg.seed + d.rank)
    val_loader = data_utils.make_loader(val_set, cfg.batch_size, num_workers=workers, seed=cfg.seed)
    val_image_loader = data_utils.make_loader(val_images, cfg.batch_size, num_workers=workers,
                                              seed=cfg.seed)

    optimizer = make_optimizer(model, model_cfg, cfg)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="max", factor=cfg.lr_factor, patience=cfg.lr_patience)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    early = {"best": -math.inf, "bad_epochs": 0}
    history: list[dict] = []
    start_epoch, start_step, partial = 0, 0, None
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        # Lrs come from the checkpoint (the schedule may have lowered them); log any change asked.
        scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler") and scaler.is_enabled():
            scaler.load_state_dict(ckpt["scaler"])
        early = dict(ckpt["early_stopping"])
        history = list(ckpt.get("history", []))
        start_epoch, start_step = int(ckpt["epoch"]), int(ckpt.get("step_in_epoch", 0))
        partial = EpochTotals(**ckpt["partial"]) if ckpt.get("partial") else None
        set_rng_state(ckpt["rng"])
        logger.info("resumed from %s: epoch %d%s, best val BLEU-4 %.4f", resume_path,
                    start_epoch + 1 if start_step else start_epoch,
                    f" step {start_step}" if start_step else " done", early["best"])

    net = wrap_for_devices(TrainStep(model), cfg, device, d)

    if d.is_main:
        weights_dir.mkdir(parents=True, exist_ok=True)
        vocab.save(weights_dir / "vocab.json")
        if ckpt is None and (weights_dir / "last.pt").exists():
            logger.info("%s from an earlier run will be replaced (--resume auto continues a run)",
                        weights_dir / "last.pt")
    run_config = {"model": _plain(model_cfg), "train": _plain(cfg), "data": _plain(data_cfg)}
    loggers = RunLoggers(cfg, run_config, weights_dir, enabled=d.is_main)

    def state(epoch: int, step: int, totals: EpochTotals | None) -> dict:
        return {"format": ckpt_lib.FORMAT, "model_config": _plain(model_cfg), "vocab": vocab.to_list(),
                "model": model.state_dict(), "train_config": _plain(cfg),
                "data_config": _plain(data_cfg), "epoch": epoch, "step_in_epoch": step,
                "partial": dataclasses.asdict(totals) if totals is not None and step else None,
                "best_score": float(early["best"]), "history": history,
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                "early_stopping": dict(early), "rng": rng_state(), "features": features_info}

    alpha_c = model_cfg.alpha_c
    status = 0
    stop = StopFlag()
    best_path = weights_dir / "best.pt"
    try:
        with stop_signals(stop):
            if early["bad_epochs"] >= cfg.patience > 0 and start_step == 0:
                logger.info("this run had already stopped early (no better BLEU-4 for %d epochs)",
                            early["bad_epochs"])
            epochs = range(start_epoch, cfg.epochs)
            for epoch in progress(epochs, desc="epochs", show=d.is_main, initial=start_epoch,
                                  total=cfg.epochs):
                if early["bad_epochs"] >= cfg.patience > 0 and not (epoch == start_epoch and start_step):
                    break
                skip = start_step if epoch == start_epoch else 0
                sampler.set_epoch(epoch)
                sampler.skip = skip * cfg.batch_size
                totals = partial if (skip and partial is not None) else EpochTotals(steps=skip)
                try:
                    totals, stopped = train_one_epoch(
                        train_loader, net, optimizer, scaler, epoch, device, cfg, alpha_c=alpha_c,
                        amp_dtype=amp_dtype, totals=totals, stop=stop, d=d,
                        desc=f"epoch {epoch + 1}/{cfg.epochs}")
                except TrainingDiverged as exc:
                    logger.error("%s", exc)
                    return 1
                if stopped:
                    if d.is_main:
                        ckpt_lib.save_checkpoint(weights_dir / "last.pt", state(epoch, totals.steps, totals))
                        logger.warning("stopped at epoch %d step %d; saved %s (resume with "
                                       "--resume auto)", epoch + 1, totals.steps, weights_dir / "last.pt")
                    status = EXIT_SIGNAL.get(stop.signum, 130)
                    break
                totals = _reduce_totals(totals, device, d)
                metrics = None
                if d.is_main:
                    metrics = validate(val_loader, val_image_loader, model, vocab, device,
                                       alpha_c=alpha_c, max_len=data_cfg.max_caption_len,
                                       amp_dtype=amp_dtype, num_samples=cfg.num_samples)
                metrics = _broadcast(metrics, d)
                bleu4 = metrics.bleu[3]
                improved = bleu4 > early["best"]
                early = {"best": bleu4 if improved else early["best"],
                         "bad_epochs": 0 if improved else early["bad_epochs"] + 1}
                row = {"epoch": epoch + 1, **totals.summary(), "val_loss": metrics.loss,
                       "val_acc": metrics.acc, **{f"bleu{n}": metrics.bleu[n - 1] for n in range(1, 5)},
                       "lr": _group_lr(optimizer, "decoder"), "encoder_lr": _group_lr(optimizer, "encoder"),
                       "seconds": totals.seconds, "best": improved}
                history.append(row)
                scheduler.step(bleu4)
                if d.is_main:
                    logger.info(epoch_line(row, cfg.epochs))
                    save_epoch_files(state(epoch + 1, 0, None), history, cfg, improved=improved)
                    loggers.log_epoch(row, metrics.samples)
                if early["bad_epochs"] >= cfg.patience > 0:
                    logger.info("early stopping: no better validation BLEU-4 for %d epochs (best %.4f)",
                                early["bad_epochs"], early["best"])
                    break
                if stop:
                    status = EXIT_SIGNAL.get(stop.signum, 130)
                    break
    finally:
        loggers.close()
    if status == 0 and d.is_main and history:
        best = max(history, key=lambda h: h["bleu4"])
        logger.info("best validation BLEU-4 %.4f at epoch %d; checkpoints in %s", best["bleu4"],
                    best["epoch"], weights_dir)
        if is_demo(data_cfg) and splits.test and best_path.exists():
            _caption_demo_image(splits.test[0].path, best_path, device)
    return status


def build_or_restore_model(model_cfg, ckpt: dict | None, path: Path | None = None):
    """(model, model_cfg): a new model, or the checkpoint's weights in a model of the requested
    config (ValueError naming every field where the two differ)."""
    if ckpt is None:
        return model_lib.build_model(model_cfg), model_cfg
    # How the encoder was initialised is the checkpoint's business (its weights replace any
    # initialisation): take those fields from it, compare the rest.
    saved = ckpt["model_config"]
    init_fields = [f for f in ckpt_lib.INIT_ONLY_FIELDS + ("encoder_from_scratch",) if f in saved]
    model_cfg = dataclasses.replace(model_cfg, **_if_field(model_cfg, **{f: saved[f] for f in init_fields}))
    ckpt_lib.check_model_config(ckpt, model_cfg, path or "checkpoint")
    # No ImageNet download for weights that are about to be replaced.
    model = model_lib.build_model(dataclasses.replace(model_cfg, pretrained=False, encoder_weights=None))
    model.load_state_dict(ckpt_lib.strip_module_prefix(ckpt["model"]))
    return model, model_cfg


def wrap_for_devices(net: nn.Module, cfg: TrainConfig, device: torch.device, d: Dist) -> nn.Module:
    """DDP under torchrun, DataParallel with --multi_gpu and several GPUs, else `net` itself."""
    if d.enabled:
        return nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.multi_gpu:
        n_gpus = torch.cuda.device_count() if device.type == "cuda" else 0
        if n_gpus > 1:
            logger.info("DataParallel over %d GPUs", n_gpus)
            return nn.DataParallel(net)
        logger.warning("--multi_gpu ignored: %d GPU(s) visible", n_gpus)
    return net


def _if_field(cfg, **values) -> dict:
    """The values whose names are fields of the dataclass `cfg` (fields other modules may add)."""
    names = {f.name for f in dataclasses.fields(cfg)}
    return {k: v for k, v in values.items() if k in names}


def _side(positions: int, default: int) -> int:
    """The grid side of P positions when P is a square (ModelConfig.encoded_size), else default."""
    side = math.isqrt(positions)
    return side if side * side == positions else default


def _reduce_totals(totals: EpochTotals, device: torch.device, d: Dist) -> EpochTotals:
    """Sum the epoch's running totals over ranks (seconds: the slowest rank)."""
    if not d.enabled:
        return totals
    t = torch.tensor([totals.loss_sum, totals.captions, totals.tokens, totals.correct,
                      totals.skipped_nonfinite, totals.skipped_images], dtype=torch.float64,
                     device=device)
    dist.all_reduce(t)
    s = torch.tensor([totals.seconds], dtype=torch.float64, device=device)
    dist.all_reduce(s, op=dist.ReduceOp.MAX)
    return dataclasses.replace(totals, loss_sum=float(t[0]), captions=int(t[1]), tokens=int(t[2]),
                               correct=int(t[3]), skipped_nonfinite=int(t[4]),
                               skipped_images=int(t[5]), seconds=float(s[0]))


def _broadcast(metrics: Validation | None, d: Dist) -> Validation:
    """Rank 0's validation result on every rank: they step the schedule and stop together."""
    if not d.enabled:
        return metrics
    box = [None if metrics is None else (metrics.loss, metrics.acc, list(metrics.bleu))]
    dist.broadcast_object_list(box, src=0)
    loss, acc, bleu = box[0]
    return metrics if metrics is not None else Validation(loss, acc, bleu, [])


def _caption_demo_image(path: Path, checkpoint_path: Path, device: torch.device) -> None:
    """The demo ends by captioning a held-out test image with the best checkpoint."""
    import test as test_lib

    decode_cfg = model_lib.DecodeConfig(beam_size=3)
    for image, caption in test_lib.caption_paths([str(path)], checkpoint_path, decode_cfg,
                                                 device=device.type):
        print(f"{image}: {caption}")


# ---------------------------------------------------------------- extract mode

def run_extract(data_cfg, model_cfg, train_cfg: TrainConfig, out_dir: str | None = None) -> int:
    """`--mode extract`: write the frozen encoder's features of every image of the data set to
    `out_dir` (default: --features_dir, else the cache folder) and print a JSON summary."""
    if train_cfg.threads:
        torch.set_num_threads(train_cfg.threads)
    device = resolve_device(train_cfg.device)
    amp_dtype = resolve_amp(train_cfg.amp, device)
    if model_cfg.encoder == "features":
        raise ValueError("--mode extract needs a CNN encoder, not --encoder features")
    splits = data_utils.load_dataset(data_cfg)
    records = splits.train + splits.val + splits.test
    if not records:
        raise ValueError("the data set has no images to extract features from")
    seed_everything(train_cfg.seed)
    model = model_lib.build_model(dataclasses.replace(model_cfg, fine_tune_encoder=False))
    model.to(device)
    key, meta = features_key(model_cfg, model.encoder, [r.name for r in records])
    explicit = out_dir or train_cfg.features_dir
    # Default: the cache folder training looks in (same key), so training reuses this extraction.
    target = Path(explicit or Path(train_cfg.features_root) / key)
    if (target / "features.npy").exists():
        if explicit:
            raise ValueError(f"{target} already holds features.npy; choose another --features_dir "
                             f"or delete it")
        logger.info("features already extracted in %s", target)
    else:
        extract_features(model, records, model_cfg, target, device,
                         batch_size=train_cfg.batch_size, num_workers=data_cfg.num_workers,
                         amp_dtype=amp_dtype, meta=dict(meta, model_config=_plain(model_cfg)))
    store = data_utils.FeatureStore.open(target)
    print(json.dumps({"features_dir": str(target), "images": len(store.names),
                      "positions": store.num_positions, "channels": store.channels,
                      "key": key}, indent=2))
    return 0
