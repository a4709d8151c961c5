"""CIDEr-D and METEOR against values worked out by hand, and figures that hold what they claim.

The README promises coco-caption's metrics; ranges would pass a scorer that is wired wrong, so
these cases are small enough to compute on paper (the arithmetic is in each test's comment).
"""
import math
import types

import numpy as np
import pytest

import metrics
import plots
import run_logging

needs_java = pytest.mark.skipif(not metrics.java_available(), reason="Java is not installed (METEOR needs it)")

# Two images, two identical references each. Image "a" is captioned exactly; image "b" gets one
# of its two words right.
REFS = {"a": ["a dog runs", "a dog runs"], "b": ["red car", "red car"]}
HYPS = {"a": "a dog runs", "b": "red bus"}


def test_cider_d_equals_the_hand_computed_value():
    # D = 2 reference sets, so a word seen in one set has idf log(2) - log(1) = log 2 ("bus",
    # in none, also gets log(2 / max(1, 0))). Image a: every n-gram of orders 1..3 matches with
    # cosine 1, order 4 has no n-grams (cosine 0): mean over orders 3/4, times 10 -> 7.5 per
    # reference; the lengths are equal, so no penalty: 7.5.
    # Image b: order 1 vectors {red, bus} and {red, car}, all weights log 2: cosine 1/2;
    # orders 2..4: no shared n-gram: 0. Mean (1/2)/4 = 1/8, times 10 -> 1.25.
    scores = metrics.score_captions(REFS, HYPS, use_java=False)
    assert scores.per_image["a"]["CIDEr-D"] == pytest.approx(7.5, abs=1e-9)
    assert scores.per_image["b"]["CIDEr-D"] == pytest.approx(1.25, abs=1e-9)
    assert scores.metrics["CIDEr-D"] == pytest.approx((7.5 + 1.25) / 2, abs=1e-9)


def test_cider_d_penalises_a_length_difference_with_sigma_6():
    # Image a: "a dog runs fast" against "a dog runs", every n-gram weighted log 2 (D = 2; "fast",
    # in no set, gets log(2 / max(1, 0)) too). Order n: the reference has 4-n n-grams, the
    # candidate 5-n, all of the reference's shared: cosine (4-n) / sqrt((4-n)(5-n)) for n = 1..3,
    # 0 for n = 4 (the reference has none). Lengths are counted in bigrams (3 against 2): the
    # Gaussian penalty exp(-1 / (2 * 6**2)) multiplies every order. Image b is exact on orders
    # 1 and 2 and has no n-grams of orders 3 and 4: 10 * 2/4 = 5.
    refs = {"a": ["a dog runs"], "b": ["red car"]}
    hyps = {"a": "a dog runs fast", "b": "red car"}
    per = metrics.score_captions(refs, hyps, use_java=False).per_image
    cos = [(4 - n) / math.sqrt((4 - n) * (5 - n)) for n in (1, 2, 3)] + [0.0]
    assert per["a"]["CIDEr-D"] == pytest.approx(10 * np.mean(cos) * math.exp(-1 / 72), abs=1e-9)
    assert per["b"]["CIDEr-D"] == pytest.approx(5.0, abs=1e-9)


@needs_java
def test_meteor_equals_the_hand_computed_value():
    # METEOR 1.5, English parameters: alpha 0.85, beta 0.2, gamma 0.6, delta 0.75 (content words
    # weigh delta, function words such as "a" 1 - delta). Reference "a dog runs": content dog,
    # runs; function a. Hypothesis "a dog" matches both its words in one chunk: P = 1,
    # R = (0.75 + 0.25) / (0.75 * 2 + 0.25) = 1 / 1.75, Fmean = P R / (alpha P + (1 - alpha) R),
    # fragmentation 1 chunk / 2 matches, penalty gamma * (1/2)**beta. "dog runs": P = 1,
    # R = 1.5 / 1.75, the same penalty. An exact match has no fragmentation penalty: 1.
    def expected(recall: float) -> float:
        fmean = recall / (0.85 + 0.15 * recall)
        return fmean * (1 - 0.6 * 0.5 ** 0.2)

    refs = {"x": ["a dog runs"], "y": ["a dog runs"], "z": ["a dog runs"]}
    scores = metrics.score_captions(refs, {"x": "a dog", "y": "dog runs", "z": "a dog runs"}, use_java=True)
    assert scores.per_image["x"]["METEOR"] == pytest.approx(expected(1 / 1.75), abs=1e-6)
    assert scores.per_image["y"]["METEOR"] == pytest.approx(expected(1.5 / 1.75), abs=1e-6)
    assert scores.per_image["z"]["METEOR"] == pytest.approx(1.0, abs=1e-9)


def test_the_score_histograms_have_one_titled_panel_per_metric():
    per_image = {f"img{i}": {"BLEU-4": i / 10, "METEOR": None, "ROUGE-L": 0.5, "CIDEr-D": float(i)}
                 for i in range(8)}
    fig = plots.score_histograms(per_image, metrics.PER_IMAGE, title="test split")
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == list(metrics.PER_IMAGE)
    meteor_ax = fig.axes[titles.index("METEOR")]
    assert any("unavailable" in t.get_text() for t in meteor_ax.texts)  # None scores: said, not drawn
    bleu_ax = fig.axes[titles.index("BLEU-4")]
    assert len(bleu_ax.patches) > 0 and any("mean 0.350" in (l.get_label() or "") for l in bleu_ax.lines)
    assert fig._suptitle.get_text() == "test split"


def test_the_caption_grid_shows_each_image_with_its_caption_and_references():
    items = [{"image": np.zeros((4, 4, 3)), "name": f"p{i}.jpg", "caption": f"caption {i}",
              "references": [f"ref {i}a", f"ref {i}b", f"ref {i}c"], "score": 1.0 + i} for i in range(5)]
    fig = plots.caption_grid(items, title="grid", cols=3)
    image_axes = [ax for ax in fig.axes if ax.images]
    assert len(image_axes) == 5
    assert [ax.get_title() for ax in image_axes] == [f"p{i}.jpg  CIDEr-D {1.0 + i:.2f}" for i in range(5)]
    texts = " ".join(t.get_text() for ax in fig.axes for t in ax.texts)
    for i in range(5):
        assert f"generated: caption {i}" in texts and f"ref 1: ref {i}a" in texts and f"ref {i}c" not in texts


def test_the_attention_figure_has_the_photo_and_one_panel_per_word():
    words = ["a", "red", "square"]
    alphas = np.random.default_rng(0).random((3, 16)).astype(np.float32)
    alphas /= alphas.sum(axis=1, keepdims=True)
    fig = plots.attention_figure(np.zeros((32, 32, 3)), words, alphas, title="photo.jpg")
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == 1 + len(words)
    assert [ax.get_title() for ax in panels[1:]] == words


def test_wandb_sample_figures_are_all_one_size_whatever_the_caption_length():
    # wandb warns "Images sizes do not match" at every epoch when logged images differ in size.
    fake = types.SimpleNamespace(Image=lambda array, caption=None: array)
    rng = np.random.default_rng(0)
    samples = []
    for n_words, side in ((2, 32), (9, 48), (17, 64)):
        alphas = rng.random((n_words, 16)).astype(np.float32)
        samples.append({"photo": np.zeros((side, side, 3)), "words": ["w"] * n_words,
                        "alphas": alphas / alphas.sum(axis=1, keepdims=True), "caption": "w " * n_words})
    samples.append({"photo": None, "words": ["x"], "alphas": None, "caption": "no photo: not logged"})
    images = run_logging._wandb_samples(fake, samples)
    assert len(images) == 3 and len({im.shape for im in images}) == 1
