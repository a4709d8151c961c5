"""bootstrap.py: corpus metrics from per-image statistics, resampling, paired comparisons."""
from __future__ import annotations

import math

import numpy as np
import pytest
from pycocoevalcap.bleu.bleu import Bleu

import bootstrap
import metrics
from test_evaluation import BOTH_BLEU, CAT_BLEU, CAT_HYP, CAT_REFS, DOG_HYP, DOG_REFS, MIXED_HYPS, MIXED_REFS


def _scores(refs, hyps):
    return metrics.score_captions(refs, hyps, use_java=False)


def test_every_image_once_gives_pycocoevalcaps_corpus_scores():
    scores = _scores(MIXED_REFS, MIXED_HYPS)
    stats = bootstrap.image_stats(scores)
    full = bootstrap.corpus_metrics(stats, np.ones((1, len(stats.names))))
    for m, v in scores.metrics.items():
        if v is None:
            assert full[m] is None  # METEOR without Java
        else:
            assert full[m][0] == pytest.approx(v, rel=1e-12, abs=1e-15), m


def test_bleu_of_a_resample_is_bleu_of_the_images_it_drew():
    stats = bootstrap.image_stats(_scores({"cat": CAT_REFS, "dogs": DOG_REFS}, {"cat": CAT_HYP, "dogs": DOG_HYP}))
    assert stats.names == ("cat", "dogs")
    bleu = lambda w: [bootstrap.corpus_metrics(stats, np.array([w], dtype=float))[f"BLEU-{n}"][0] for n in range(1, 5)]
    assert bleu([1, 1]) == pytest.approx(BOTH_BLEU, rel=1e-9)
    assert bleu([2, 0]) == pytest.approx(CAT_BLEU, rel=1e-9)  # "cat" drawn twice: its counts doubled
    # "dogs" alone, by hand: 1- and 2-gram precision 1, no 3- or 4-grams (pycocoevalcap's guards make
    # those precisions 1e-15 / 1e-9 = 1e-6), hypothesis 2 words against the closest reference's 3.
    bp = math.exp(1 - 3 / 2)
    assert bleu([0, 2]) == pytest.approx([bp, bp, 1e-2 * bp, 1e-3 * bp], rel=1e-6)
    # and pycocoevalcap agrees on that one image
    assert bleu([0, 1]) == pytest.approx(Bleu(4).compute_score({"d": ["two dogs play", "dogs are playing in the park"]},
                                                                {"d": ["dogs play"]}, verbose=0)[0], rel=1e-9)


def test_resample_counts_are_draws_with_replacement_and_repeat_with_the_seed():
    counts = bootstrap.resample_counts(7, 500, seed=3)
    assert counts.shape == (500, 7) and (counts.sum(axis=1) == 7).all()
    assert counts.max() > 1 and (counts == 0).any()  # some images drawn twice, some left out
    assert np.array_equal(counts, bootstrap.resample_counts(7, 500, seed=3))
    assert not np.array_equal(counts, bootstrap.resample_counts(7, 500, seed=4))


def _mean_stats(values, names=None) -> bootstrap.ImageStats:
    n = len(values)
    bleu = np.tile(np.array([[5, 5, 5, 4, 3, 2, 5, 4, 3, 2]], dtype=float), (n, 1))  # every hypothesis perfect
    return bootstrap.ImageStats(tuple(names or map(str, range(n))), bleu,
                                {"METEOR": None, "ROUGE-L": np.asarray(values, float), "CIDEr-D": np.asarray(values, float)})


def test_an_interval_of_a_mean_has_the_textbook_width():
    values = np.random.default_rng(0).exponential(1.0, 400)
    ci = bootstrap.intervals(_mean_stats(values), resamples=4000, seed=0)["CIDEr-D"]
    se = values.std() / math.sqrt(len(values))
    assert ci["low"] < values.mean() < ci["high"]
    assert (ci["high"] - ci["low"]) == pytest.approx(2 * 1.96 * se, rel=0.1)
    assert ci == bootstrap.intervals(_mean_stats(values), resamples=4000, seed=0)["CIDEr-D"]  # seeded


def test_paired_comparison_of_identical_captions_is_exactly_zero_and_never_better():
    stats = bootstrap.image_stats(_scores(MIXED_REFS, MIXED_HYPS))
    for m, d in bootstrap.paired(stats, stats, resamples=200).items():
        if d is None:
            continue
        assert d["diff"] == d["low"] == d["high"] == 0.0 and d["b_better"] == 0.0, m


def test_b_better_is_the_share_of_resamples_that_draw_the_one_image_where_b_is_better():
    n = 4
    a = _mean_stats([0.5] * n)
    b = _mean_stats([0.5, 0.5, 0.5, 0.9])
    d = bootstrap.paired(a, b, resamples=20000, seed=1)["CIDEr-D"]
    assert d["diff"] == pytest.approx(0.1)
    assert d["b_better"] == pytest.approx(1 - (1 - 1 / n) ** n, abs=0.01)  # P(image 4 drawn) = 0.684
    assert d["low"] == 0.0 and d["high"] > d["diff"]
    assert bootstrap.format_difference(d).startswith("+0.1000 [+0.0000, +0.")
    assert bootstrap.format_difference(d).endswith(f"B better in {round(100 * d['b_better'])}% of resamples")


def test_paired_needs_the_same_images():
    with pytest.raises(ValueError, match="same images"):
        bootstrap.paired(_mean_stats([1, 2]), _mean_stats([1, 2], names=["x", "y"]))


def test_a_subset_keeps_each_images_statistics():
    stats = _mean_stats([0.1, 0.2, 0.3])
    sub = stats.subset(["2", "0"])
    assert sub.names == ("2", "0") and list(sub.means["CIDEr-D"]) == [0.3, 0.1]


def test_meteor_interval_is_the_per_image_mean_moved_to_the_corpus_score():
    stats = bootstrap.ImageStats(("a", "b"), np.ones((2, 10)), {"METEOR": np.array([0.2, 0.4]),
                                 "ROUGE-L": np.zeros(2), "CIDEr-D": np.zeros(2)}, meteor_gap=0.05)
    got = bootstrap.corpus_metrics(stats, np.array([[1.0, 1.0], [2.0, 0.0]]))["METEOR"]
    assert got == pytest.approx([0.35, 0.25])
