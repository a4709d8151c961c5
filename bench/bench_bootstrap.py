"""Time bootstrap.py: 95% intervals and a paired comparison over 1,000 Flickr8k-sized images.

    python bench/bench_bootstrap.py [--images 1000] [--resamples 1000] [--threads 2]

Synthetic captions of Flickr8k's shape (five references of ~11 words per image, hypotheses of
~9 words from a 300-word vocabulary), scored once by metrics.score_captions (no Java), then timed:
the per-image statistics (computed once), the intervals of one caption set, a paired comparison.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _captions(rng, words, n: int, length: float) -> list[str]:
    return [" ".join(rng.choice(words, size=max(1, int(rng.normal(length, 3))))) for _ in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2, help="BLAS/OpenMP threads")
    args = parser.parse_args()
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    import numpy as np

    import bootstrap
    import metrics

    rng = np.random.default_rng(0)
    words = np.array([f"w{i}" for i in range(300)])
    names = [f"{i}.jpg" for i in range(args.images)]
    refs = {k: _captions(rng, words, 5, 11) for k in names}
    hyp_a = {k: _captions(rng, words, 1, 9)[0] for k in names}
    hyp_b = {k: _captions(rng, words, 1, 9)[0] for k in names}
    t = time.perf_counter()
    scores_a = metrics.score_captions(refs, hyp_a, use_java=False)
    scores_b = metrics.score_captions(refs, hyp_b, use_java=False)
    t_score = (time.perf_counter() - t) / 2
    t = time.perf_counter()
    stats_a, stats_b = bootstrap.image_stats(scores_a), bootstrap.image_stats(scores_b)
    t_stats = (time.perf_counter() - t) / 2
    t = time.perf_counter()
    bootstrap.intervals(stats_a, args.resamples)
    t_intervals = time.perf_counter() - t
    t = time.perf_counter()
    bootstrap.paired(stats_a, stats_b, args.resamples)
    t_paired = time.perf_counter() - t
    print(f"{args.images} images, {args.resamples} resamples, {args.threads} threads")
    print(f"  scoring one caption set (pycocoevalcap, no Java, for scale): {t_score:.2f} s")
    print(f"  per-image statistics, once per caption set:                 {t_stats:.3f} s")
    print(f"  intervals of every metric:                                  {t_intervals:.3f} s")
    print(f"  paired comparison of two caption sets:                      {t_paired:.3f} s")


if __name__ == "__main__":
    main()
