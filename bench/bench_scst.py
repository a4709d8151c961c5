"""Where an SCST step's time goes: sampling, the CIDEr-D reward, and the backward pass.

    python bench/bench_scst.py --checkpoint weights/best.pt --dataset_path FLICKR8K \\
        --features_dir data/features/KEY          # a real run: its model, captions and features
    python bench/bench_scst.py                    # synthetic: a random default decoder
    python bench/bench_scst.py --quick            # a tiny model: the suite's smoke test

Runs the real training step (train.train_step with scst.ScstObjective, the --objective scst
defaults: K = 5 samples per image, batch 128 // K = 25 images, the mean baseline) on --steps
batches of training images after one warm-up step, and splits each step's wall time into
  sample   scst.SampleStep's forward: K captions per image drawn step by step, with the graph
  words    token ids -> words (Vocabulary.decode)
  reward   CIDEr-D of every sample against its image's references (cider.CiderD, on the host)
  greedy   the greedy baseline's decoding (--scst_baseline greedy only; its scoring is in reward)
  rest     the loss, its backward pass through the sampled steps, clipping and the optimizer.
Prints JSON: the mean milliseconds of a step and of each part, its share, and the mean sampled length.

A random decoder rarely draws <eos>, so in the synthetic mode every sample runs to --max_len
(default 10: about the 9 words plus <eos> a trained Flickr8k model samples); a real checkpoint
samples its own lengths (up to the data set's max caption length, 35).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_epoch import synthetic_records, write_synthetic_features  # noqa: E402
import checkpoint as ckpt_lib  # noqa: E402
from config import AMP_MODES, DataConfig, TrainConfig  # noqa: E402
import data_utils  # noqa: E402
import decoding  # noqa: E402
import devices  # noqa: E402
import model as model_lib  # noqa: E402
import scst  # noqa: E402
import train  # noqa: E402
from train_sums import DeviceSums  # noqa: E402

PARTS = ("sample", "words", "reward", "greedy", "rest")


class Clock:
    """Wall seconds per part of the current step; `timed(fn, part)` wraps a callable to add to it."""

    def __init__(self):
        self.now: dict[str, float] = defaultdict(float)

    def timed(self, fn, part: str):
        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.now[part] += time.perf_counter() - t
        return wrapper


def real_setup(args) -> tuple:
    """The checkpoint's model and vocabulary, the data set's training split, the features' store."""
    model, vocab, model_cfg = ckpt_lib.model_from_checkpoint(ckpt_lib.load_checkpoint(args.checkpoint))
    splits = data_utils.load_dataset(DataConfig(dataset_path=args.dataset_path))
    store = data_utils.FeatureStore.open(Path(args.features_dir))
    cached = set(store.names)
    records = [r for r in splits.train if r.name in cached]
    return model, model_cfg, vocab, records, store, DataConfig().max_caption_len


def synthetic_setup(args, root: Path) -> tuple:
    """A random decoder over random features of (steps + 1) batches of synthetic images."""
    n_images = (args.steps + 1) * max(1, args.batch_size // args.samples)
    records = synthetic_records(n_images, 5, args.vocab, seed=0)
    write_synthetic_features(root, [r.name for r in records], args.positions, args.channels, seed=0)
    store = data_utils.FeatureStore.open(root)
    vocab = data_utils.Vocabulary.build((t for r in records for t in r.tokens), min_freq=1)
    dims = {"embed_dim": 64, "attention_dim": 64, "decoder_dim": 64} if args.quick else {}
    model_cfg = model_lib.ModelConfig(vocab_size=len(vocab), encoder="features", feature_dim=store.channels, **dims)
    return model_lib.build_model(model_cfg), model_cfg, vocab, records, store, args.max_len


@contextlib.contextmanager
def instrumented(objective: scst.ScstObjective, net: torch.nn.Module, clock: Clock):
    """Time the step's parts where they happen, without changing what they compute; the module
    function it wraps (decoding.greedy_decode) is put back on the way out."""
    objective.scorer.score = clock.timed(objective.scorer.score, "reward")
    objective.vocab.decode = clock.timed(objective.vocab.decode, "words")
    net.forward = clock.timed(net.forward, "sample")
    with mock.patch.object(decoding, "greedy_decode", clock.timed(decoding.greedy_decode, "greedy")):
        yield


def summary(steps: list[dict], lengths: list[float], args, vocab, images: int) -> dict:
    """Mean milliseconds per part over the timed steps (they add up to the step), and each share."""
    ms = {p: statistics.mean(s[p] for s in steps) * 1000 for p in PARTS}
    total = statistics.mean(s["total"] for s in steps) * 1000
    return {
        "device": str(args.device), "torch_threads": torch.get_num_threads(),
        "images_per_step": images, "samples_per_image": args.samples, "baseline": args.baseline,
        "vocab": len(vocab), "timed_steps": len(steps), "mean_sample_words": round(statistics.mean(lengths), 2),
        "step_ms": round(total, 1), **{f"{p}_ms": round(v, 1) for p, v in ms.items()},
        **{f"{p}_share": round(v / total, 3) for p, v in ms.items()},
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="a trained checkpoint (with --dataset_path and --features_dir)")
    ap.add_argument("--dataset_path", help="the checkpoint's data set: its training captions are the references")
    ap.add_argument("--features_dir", help="features of the data set's images (--features_dir or a cache folder)")
    ap.add_argument("--steps", type=int, default=10, help="steps timed, after one warm-up step")
    ap.add_argument("--batch_size", type=int, default=128, help="samples a step (images = this // --samples)")
    ap.add_argument("--samples", type=int, default=5, help="K, captions sampled per image")
    ap.add_argument("--baseline", default="mean", choices=("mean", "greedy"))
    ap.add_argument("--max_len", type=int, default=10, help="synthetic mode: tokens sampled per caption")
    ap.add_argument("--positions", type=int, default=49, help="synthetic mode: P (Lite0's 7 x 7)")
    ap.add_argument("--channels", type=int, default=1280, help="synthetic mode: C (Lite0's 1,280)")
    ap.add_argument("--vocab", type=int, default=2500, help="synthetic mode: vocabulary words")
    ap.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    ap.add_argument("--amp", default="auto", choices=AMP_MODES)
    ap.add_argument("--quick", action="store_true", help="a 64-wide decoder, 2 steps of 4 images")
    args = ap.parse_args(argv)
    real = [args.checkpoint, args.dataset_path, args.features_dir]
    if any(real) and not all(real):
        ap.error("--checkpoint, --dataset_path and --features_dir go together")
    args.real = all(real)
    if args.quick:
        args.steps, args.batch_size, args.positions, args.channels, args.vocab = 2, 20, 4, 16, 50
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    args.device = devices.resolve_device(args.device)
    amp_dtype = devices.resolve_amp(args.amp, args.device)
    root = Path(tempfile.mkdtemp(prefix="bench_scst_"))
    try:
        model, model_cfg, vocab, records, store, max_len = real_setup(args) if args.real else synthetic_setup(args, root)
        model.to(args.device)
        cfg = TrainConfig(objective="scst", batch_size=args.batch_size, scst_samples=args.samples,
                          scst_baseline=args.baseline, wandb="disabled")  # lr: SCST's default
        images = max(1, args.batch_size // args.samples)
        loader = data_utils.make_loader(data_utils.ImageDataset(records, features=store), images,
                                        shuffle=True, seed=0, collate=data_utils.collate_images)
        objective = scst.ScstObjective([r.tokens for r in records], vocab, cfg, max_len)
        net = scst.SampleStep(model, amp_dtype)
        optimizer = train.make_optimizer(model, model_cfg, cfg)
        scaler, sums = train.make_scaler(args.device, amp_dtype), DeviceSums(args.device)
        clock, steps, lengths = Clock(), [], []
        model.train()
        with instrumented(objective, net, clock):
            for i, batch in zip(range(args.steps + 1), loader):
                clock.now.clear()
                t = time.perf_counter()
                train.train_step(net, batch, optimizer, scaler, args.device, cfg, amp_dtype=amp_dtype, sums=sums,
                                 objective=objective)
                if args.device.type == "cuda":
                    torch.cuda.synchronize()
                total = time.perf_counter() - t
                now = {p: clock.now[p] for p in PARTS if p != "rest"}  # a part not run: 0
                now.update(rest=total - sum(now.values()), total=total)
                if i > 0:  # the first step pays one-time costs (allocator, kernels)
                    steps.append(now)
                    totals = train.EpochTotals()
                    sums.read(totals)
                    lengths.append(totals.tokens / max(totals.captions, 1))
        print(json.dumps(summary(steps, lengths, args, vocab, images), indent=2))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
