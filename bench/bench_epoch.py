"""CPU (or GPU) time of one training epoch on a Flickr8k-sized cached-features file.

Writes a synthetic features file in the public format (N images x P positions x C channels,
float16, default 6,000 x 196 x 2,048 = 4.8 GB, like ResNet-50 features of Flickr8k's training
split at 448 px, a 14 x 14 grid; `--positions 49` is its own 7 x 7 grid at the default 224 px), five random captions per image over a 2,500-word vocabulary (lengths like Flickr8k's:
mean ~11 words), then trains the default decoder (512/512/512, two layers) on it with the real
training loop (`train.train_one_epoch`, batch 128) and greedy-decodes the validation images as
the real validation does. Prints JSON.

    python bench/bench_epoch.py                      # full size (needs ~5 GB of disk)
    python bench/bench_epoch.py --images 600 --max_steps 10   # quick look, extrapolated
    python bench/bench_epoch.py --quick              # a tiny file and model: the suite's smoke test

`--max_steps` times that many steps and extrapolates to the full epoch. Peak memory is
reported to show it does not grow with the features file (it is memory-mapped): compare
`rssanon_mb` across `--images` sizes; `rssfile_mb` is mapped file pages, reclaimable page cache.
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from config import AMP_MODES, DecodeConfig  # noqa: E402
import data_utils  # noqa: E402
import decoding  # noqa: E402
import devices  # noqa: E402
import features  # noqa: E402
import model as model_lib  # noqa: E402
import train  # noqa: E402


def synthetic_records(n_images: int, captions: int, vocab_words: int, seed: int) -> list:
    rng = np.random.default_rng(seed)
    words = [f"w{i}" for i in range(vocab_words)]
    # Zipf-like word frequencies, as in real captions.
    p = 1.0 / np.arange(1, vocab_words + 1)
    p /= p.sum()
    records = []
    for i in range(n_images):
        tokens = [list(rng.choice(words, size=int(np.clip(rng.normal(11, 4), 3, 35)), p=p))
                  for _ in range(captions)]
        records.append(data_utils.ImageRecord(name=f"img{i:05d}.jpg", path=Path(f"img{i:05d}.jpg"),
                                              captions=[" ".join(t) for t in tokens], tokens=tokens))
    return records


def write_synthetic_features(directory: Path, names: list[str], positions: int, channels: int,
                             seed: int, chunk: int = 64) -> float:
    rng = np.random.default_rng(seed)

    def batches():
        for start in range(0, len(names), chunk):
            n = min(chunk, len(names) - start)
            # ReLU-like, non-negative activations as a ResNet's last stage gives.
            yield np.abs(rng.standard_normal((n, positions, channels), dtype=np.float32)).astype(np.float16)

    t = time.perf_counter()
    features.write_features(directory, names, batches(), positions, channels, {"synthetic": True})
    return time.perf_counter() - t


def max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_split_mb() -> dict:
    """Resident memory now, split into anonymous (the process's own) and file-backed pages
    (the memory-mapped features: page cache the kernel can drop at any time). Linux only."""
    out = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile"):
                out[f"{key.lower()}_mb"] = round(int(value.split()[0]) / 1024)
    except OSError:
        pass
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=6000, help="training images")
    ap.add_argument("--captions", type=int, default=5, help="captions per image")
    ap.add_argument("--positions", type=int, default=196, help="P (14 x 14)")
    ap.add_argument("--channels", type=int, default=2048, help="C")
    ap.add_argument("--vocab", type=int, default=2500, help="vocabulary words")
    ap.add_argument("--batch_size", type=int, default=128)
    ap.add_argument("--max_steps", type=int, default=0, help="time this many steps and extrapolate; 0 = all")
    ap.add_argument("--val_images", type=int, default=100,
                    help="images greedy-decoded to time validation (Flickr8k has 1,000; extrapolated)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    ap.add_argument("--amp", default="auto", choices=AMP_MODES)
    ap.add_argument("--num_workers", type=int, default=0)
    ap.add_argument("--dir", default=None, help="where to write the features (default: a temp folder, removed)")
    ap.add_argument("--keep", action="store_true", help="keep the features folder")
    ap.add_argument("--quick", action="store_true",
                    help="40 images of 4 x 16 features, a 64-wide decoder, 3 steps, 4 validation images")
    args = ap.parse_args(argv)
    dims = {}
    if args.quick:
        args.images, args.positions, args.channels, args.vocab = 40, 4, 16, 50
        args.batch_size, args.max_steps, args.val_images = 16, 3, 4
        dims = {"embed_dim": 64, "attention_dim": 64, "decoder_dim": 64}
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = devices.resolve_device(args.device)
    amp_dtype = devices.resolve_amp(args.amp, device)

    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench_epoch_"))
    feats_dir = root / "features"
    try:
        records = synthetic_records(args.images, args.captions, args.vocab, seed=0)
        write_s = write_synthetic_features(feats_dir, [r.name for r in records], args.positions,
                                           args.channels, seed=0)
        rss_after_write = max_rss_mb()
        store = data_utils.FeatureStore.open(feats_dir)
        vocab = data_utils.Vocabulary.build((t for r in records for t in r.tokens), min_freq=1)
        model_cfg = model_lib.ModelConfig(vocab_size=len(vocab), encoder="features",
                                          feature_dim=store.channels, **dims)
        model = model_lib.build_model(model_cfg).to(device)
        cfg = train.TrainConfig(batch_size=args.batch_size, wandb="disabled")
        optimizer = train.make_optimizer(model, model_cfg, cfg)
        scaler = train.make_scaler(device, amp_dtype)
        dataset = data_utils.CaptionDataset(records, vocab, features=store)
        sampler = train.ResumableSampler(len(dataset), seed=0)
        steps_per_epoch = len(sampler) // args.batch_size + bool(len(sampler) % args.batch_size)
        timed_steps = min(args.max_steps or steps_per_epoch, steps_per_epoch)
        # Skipping the start of the epoch leaves exactly `timed_steps` batches to time.
        sampler.skip = max(0, len(sampler) - timed_steps * args.batch_size)
        loader = data_utils.make_loader(dataset, args.batch_size, sampler=sampler,
                                        num_workers=args.num_workers, seed=0)
        net = train.TrainStep(model, amp_dtype)
        t = time.perf_counter()
        totals, _ = train.train_one_epoch(loader, net, optimizer, scaler, 0, device, cfg,
                                          alpha_c=model_cfg.alpha_c, amp_dtype=amp_dtype)
        if device.type == "cuda":
            torch.cuda.synchronize()
        train_s = time.perf_counter() - t
        per_step = train_s / max(totals.steps, 1)

        val_n = min(args.val_images, len(records))
        val_loader = data_utils.make_loader(data_utils.ImageDataset(records[:val_n], features=store),
                                            args.batch_size, num_workers=args.num_workers)
        model.eval()
        # Twice: the first pass of a process also pays one-time costs (allocator warm-up; what
        # every later validation costs is the second pass).
        val_passes = []
        for _ in range(2):
            t = time.perf_counter()
            decoded = 0
            for batch in val_loader:
                with devices.autocast(device, amp_dtype):
                    out = decoding.greedy_decode(model, devices.to_device(batch.inputs, device), sos_id=vocab.sos_id,
                                                  eos_id=vocab.eos_id, unk_id=vocab.unk_id,
                                                  cfg=DecodeConfig(beam_size=1, max_len=35))
                decoded += len(out.tokens)
            val_passes.append(time.perf_counter() - t)
        first_val_s, val_s = val_passes
        result = {
            "device": str(device), "amp": str(amp_dtype), "torch_threads": torch.get_num_threads(),
            "images": args.images, "captions": len(dataset), "positions": store.num_positions,
            "channels": store.channels, "features_gb": round((feats_dir / "features.npy").stat().st_size / 1e9, 2),
            "batch_size": args.batch_size, "steps_per_epoch": steps_per_epoch, "timed_steps": totals.steps,
            "seconds_per_step": round(per_step, 3),
            "epoch_seconds": round(per_step * steps_per_epoch, 1),
            "captions_per_s": round(totals.captions / max(train_s, 1e-9), 1),
            "extrapolated": totals.steps < steps_per_epoch,
            "val_greedy_seconds_per_1000_images": round(val_s / max(decoded, 1) * 1000, 1),
            "val_first_pass_seconds": round(first_val_s, 1),  # includes the one-time compile
            "val_images": decoded,
            "write_features_seconds": round(write_s, 1),
            "peak_rss_mb_after_writing": round(rss_after_write, 0),
            "peak_rss_mb": round(max_rss_mb(), 0),
            **rss_split_mb(),
            "final_loss": round(totals.summary()["loss"], 3),
        }
        print(json.dumps(result, indent=2))
    finally:
        if not args.keep and not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
