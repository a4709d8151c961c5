"""Greedy decoding with and without the positions-last copy of the features (model._positions_last).

    python bench/bench_positions_last.py          # 128 images, 196 x 2048 features, 5 alternated runs

Beam search reads the features K times per image and step, and takes the (N, D, P) copy when they
do not fit in the cache; greedy decoding (one query per image) does not. This prints both timings
of greedy decoding, alternated, so the choice can be re-checked on another machine.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import model as M  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(args.images, 196, 2048, generator=gen).relu()  # (N, P, C)
    torch.manual_seed(0)
    model = M.build_model(M.ModelConfig(vocab_size=2600, encoder="features", feature_dim=2048,
                                        pretrained=False)).eval()
    original = M._positions_last
    layouts = {"positions_last": lambda f, _queries: original(f, 2), "as_is": original}
    seconds: dict[str, list[float]] = {name: [] for name in layouts}
    try:
        for _ in range(args.runs):
            for name, fn in layouts.items():
                M._positions_last = fn
                start = time.perf_counter()
                M.greedy_decode(model, feats, sos_id=1, eos_id=2, unk_id=3,
                                cfg=M.DecodeConfig(beam_size=1, max_len=20))
                seconds[name].append(round(time.perf_counter() - start, 3))
    finally:
        M._positions_last = original
    median = {name: sorted(v)[len(v) // 2] for name, v in seconds.items()}
    print(json.dumps({"images": args.images, "threads": torch.get_num_threads(), "seconds": seconds,
                      "median_seconds": median}))


if __name__ == "__main__":
    main()
