"""95% bootstrap intervals over images for every corpus metric, and paired comparisons.

A resample draws N images with replacement (each with all its references) and recomputes each
corpus metric from per-image statistics computed once (metrics.score_captions' tokenised text):

- BLEU-1..4: each image's hypothesis length, closest reference length, n-gram guesses and clipped
  matches, from pycocoevalcap's own `cook_refs`/`cook_test`; a resample sums them and applies
  `BleuScorer`'s corpus formula, so with every image once it gives pycocoevalcap's corpus BLEU.
- ROUGE-L, CIDEr-D: pycocoevalcap's corpus scores are means of its per-image scores; a resample
  averages the same per-image scores. CIDEr-D's document frequencies stay those of the whole split's
  references (as the scorer defines them for the split scored): a resample does not recount them.
- METEOR: the jar's corpus score pools statistics over all segments and is not a mean of its
  per-image scores, so a resample's METEOR is the mean of its per-image METEOR plus the (fixed)
  gap between the corpus score and the split's per-image mean.

Intervals are percentile intervals. A paired comparison scores A and B on the same images and
the same resamples: the interval of B - A and the share of resamples where B beats A.
Resamples are a (resamples, N) matrix of counts, so every metric of every resample is one matrix
product (1,000 resamples of 1,000 images: bench/bench_bootstrap.py).

Letters in shape comments: R resamples, N images, S BLEU statistics (10).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pycocoevalcap.bleu.bleu_scorer import cook_refs, cook_test

ORDERS = 4
TINY, SMALL = 1e-15, 1e-9   # BleuScorer.compute_score's guards against zero counts
LEVEL = 0.95
# How the intervals are computed, in the words eval_<split>.json and the report page use.
METHOD = ("percentile intervals over images drawn with replacement, each with all its references; BLEU "
          "recomputed from per-image clipped n-gram counts and lengths; ROUGE-L and CIDEr-D as means of per-image "
          "scores, with CIDEr-D's document frequencies those of the whole split's references (not recounted per "
          "resample); METEOR as the per-image mean plus its fixed gap to the jar's corpus score")
# A difference below this is a tie, not B beating A: BLEU's guards against zero counts give a
# caption set without any matching n-gram a score of about 1e-6 or less rather than 0.
NOISE = 1e-6
MEANS = ("METEOR", "ROUGE-L", "CIDEr-D")   # corpus score = mean of per-image scores (METEOR: + gap)


@dataclass(frozen=True)
class ImageStats:
    """Per-image statistics of one set of captions, enough to recompute every corpus metric."""
    names: tuple[str, ...]
    bleu: np.ndarray                       # (N, S): test length, reference length, guesses 1..4, correct 1..4
    means: dict[str, np.ndarray | None]    # METEOR / ROUGE-L / CIDEr-D per image (N,); None: unavailable
    meteor_gap: float = 0.0                # corpus METEOR minus the mean of the per-image METEOR

    def subset(self, names) -> ImageStats:
        """The same statistics for `names` only, in that order (CIDEr-D's idf stays the split's)."""
        index = {n: i for i, n in enumerate(self.names)}
        rows = np.array([index[n] for n in names], dtype=np.int64)
        return ImageStats(tuple(names), self.bleu[rows],
                          {m: None if v is None else v[rows] for m, v in self.means.items()}, self.meteor_gap)


def bleu_statistics(references: dict[str, list[str]], hypotheses: dict[str, str], names) -> np.ndarray:
    """(N, S) BLEU statistics of tokenised text, by pycocoevalcap's cook functions ("closest" length)."""
    rows = []
    for name in names:
        comps = cook_test(hypotheses[name], cook_refs(references[name]), eff="closest")
        rows.append([comps["testlen"], comps["reflen"], *comps["guess"], *comps["correct"]])
    return np.asarray(rows, dtype=np.float64).reshape(len(rows), 2 + 2 * ORDERS)


def bleu_from_sums(sums: np.ndarray) -> np.ndarray:
    """Corpus BLEU-1..4 from summed statistics (..., S) -> (..., 4), as BleuScorer computes it."""
    test_len, ref_len = sums[..., 0], sums[..., 1]
    guess, correct = sums[..., 2:2 + ORDERS], sums[..., 2 + ORDERS:]
    log_p = np.log((correct + TINY) / (guess + SMALL))  # (..., 4)
    bleu = np.exp(np.cumsum(log_p, axis=-1) / np.arange(1, ORDERS + 1))  # geometric means of 1..n
    ratio = (test_len + TINY) / (ref_len + SMALL)
    brevity = np.exp(1 - 1 / np.minimum(ratio, 1.0))  # 1 when the hypotheses are long enough
    return bleu * brevity[..., None]


def image_stats(scores) -> ImageStats:
    """ImageStats of a metrics.Scores (which keeps the tokenised text it scored)."""
    names = tuple(scores.per_image)
    bleu = bleu_statistics(scores.references_tokenized, scores.hypotheses_tokenized, names)
    means: dict[str, np.ndarray | None] = {}
    for metric in MEANS:
        values = [scores.per_image[n][metric] for n in names]
        means[metric] = None if any(v is None for v in values) else np.asarray(values, dtype=np.float64)
    gap = 0.0
    if means["METEOR"] is not None and scores.metrics.get("METEOR") is not None:
        gap = float(scores.metrics["METEOR"]) - float(means["METEOR"].mean())
    return ImageStats(names, bleu, means, gap)


def resample_counts(n: int, resamples: int, seed: int) -> np.ndarray:
    """(R, N) how often each image is drawn in each resample (rows sum to N)."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n, size=(resamples, n))  # (R, N) image indices
    flat = draws + n * np.arange(resamples)[:, None]
    return np.bincount(flat.ravel(), minlength=resamples * n).reshape(resamples, n).astype(np.float64)


def corpus_metrics(stats: ImageStats, weights: np.ndarray) -> dict[str, np.ndarray | None]:
    """Every corpus metric under image weights (R, N) (counts of a resample; ones: the split) -> (R,)."""
    n = weights.sum(axis=1)  # (R,)
    bleu = bleu_from_sums(weights @ stats.bleu)  # (R, 4)
    out: dict[str, np.ndarray | None] = {f"BLEU-{k + 1}": bleu[:, k] for k in range(ORDERS)}
    for metric, values in stats.means.items():
        out[metric] = None if values is None else weights @ values / n
    if out["METEOR"] is not None:
        out["METEOR"] = out["METEOR"] + stats.meteor_gap
    return out


def _percentiles(values: np.ndarray, level: float) -> tuple[float, float]:
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def intervals(stats: ImageStats, resamples: int = 1000, seed: int = 0, level: float = LEVEL) -> dict:
    """{metric: {"low", "high"}} percentile bootstrap intervals (None for an unavailable metric)."""
    counts = resample_counts(len(stats.names), resamples, seed)
    out = {}
    for metric, values in corpus_metrics(stats, counts).items():
        out[metric] = None if values is None else dict(zip(("low", "high"), _percentiles(values, level)))
    return out


def paired(a: ImageStats, b: ImageStats, resamples: int = 1000, seed: int = 0, level: float = LEVEL) -> dict:
    """B - A on the same images and resamples: {metric: {"a", "b", "diff", "low", "high", "b_better"}}.

    "b_better" is the share of resamples in which B's corpus score is above A's (by more than NOISE).
    """
    if a.names != b.names:
        raise ValueError("a paired comparison needs both caption sets on the same images, in the same order")
    n = len(a.names)
    ones = np.ones((1, n))
    counts = resample_counts(n, resamples, seed)
    full_a, full_b = corpus_metrics(a, ones), corpus_metrics(b, ones)
    res_a, res_b = corpus_metrics(a, counts), corpus_metrics(b, counts)
    out = {}
    for metric in full_a:
        if full_a[metric] is None or full_b[metric] is None:
            out[metric] = None
            continue
        diffs = res_b[metric] - res_a[metric]  # (R,)
        low, high = _percentiles(diffs, level)
        out[metric] = {"a": float(full_a[metric][0]), "b": float(full_b[metric][0]),
                       "diff": float(full_b[metric][0] - full_a[metric][0]), "low": low, "high": high,
                       "b_better": float((diffs > NOISE).mean())}
    return out


def format_difference(d: dict) -> str:
    """"+0.017 [-0.004, +0.038], B better in 94% of resamples"."""
    return f"{d['diff']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}], B better in {100 * d['b_better']:.0f}% of resamples"
