"""cider.CiderD against pycocoevalcap's Cider, a value worked by hand, and the training-split df."""
import math
import random

import numpy as np
import pytest
from pycocoevalcap.cider.cider import Cider

from cider import CiderD, ngram_keys


def coco_scores(candidates, references):
    """pycocoevalcap's per-caption CIDEr-D; its document frequencies come from these references."""
    gts = {i: [" ".join(ref) for ref in refs] for i, refs in enumerate(references)}
    res = {i: [" ".join(cand)] for i, cand in enumerate(candidates)}
    _, scores = Cider().compute_score(gts, res)
    return np.asarray(scores)


def words(text):
    return text.split()


# (candidate, references): each a case pycocoevalcap's arithmetic treats specially
HAND_MADE = [
    ("a dog dog dog dog runs", ["a dog runs on the grass", "the dog runs", "a brown dog is running"]),
    ("a man", ["a man rides a bike down a steep hill", "a man on a bike", "a cyclist rides down a hill"]),
    ("a man rides a red bike down a very steep hill in the rain near the sea",
     ["a man rides a bike", "a man on a red bike"]),
    ("", ["a cat sleeps on a sofa", "a grey cat on a couch"]),
    ("cat", ["a cat sleeps on a sofa", "a grey cat on a couch"]),
    ("two children play in the water", ["two children play in the water"]),
    ("a girl in a pink dress", ["a girl in a pink dress jumps", "", "a little girl jumps"]),
    ("the the the the", ["the dog", "a dog on the the beach"]),
    ("a dog runs on the grass", ["a dog runs on the grass", "a dog runs on the grass"]),
    ("people walk down a busy street", ["people walk down a busy city street", "a crowd walks",
                                       "pedestrians on a street", "many people walk", "a busy street"]),
]


def test_equals_pycocoevalcap_on_hand_made_sets():
    candidates = [words(c) for c, _ in HAND_MADE]
    references = [[words(r) for r in refs] for _, refs in HAND_MADE]
    ours = CiderD(references).score(candidates, references)
    expected = coco_scores(candidates, references)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-6)
    assert (expected > 0.5).sum() >= 5   # the cases are not all trivially zero


def demo_style_sets(n_images, seed):
    """Captions in the demo set's style (shapes, colours, relations), candidates perturbed from them."""
    rng = random.Random(seed)
    colours, shapes, sizes = ("red", "green", "blue", "yellow"), ("circle", "square", "triangle"), ("small", "large")
    candidates, references = [], []
    for _ in range(n_images):
        a = f"{rng.choice(sizes)} {rng.choice(colours)} {rng.choice(shapes)}"
        b = f"{rng.choice(sizes)} {rng.choice(colours)} {rng.choice(shapes)}"
        rel, inv = rng.choice([("left of", "right of"), ("above", "below")])
        if rng.random() < 0.3:
            refs = [f"a {a}", f"there is a {a} on the background", f"a picture of a {a}",
                    f"a {a} on a textured background", f"an image showing a {a}"]
        else:
            refs = [f"a {a} {rel} a {b}", f"a {b} {inv} a {a}", f"there is a {a} {rel} a {b}",
                    f"a picture of a {b} {inv} a {a}", f"a {a} is {rel} a {b}"]
        cand = words(rng.choice(refs))
        edit = rng.randrange(4)
        if edit == 0:     # cut off without <eos>
            cand = cand[:rng.randint(0, len(cand))]
        elif edit == 1:   # a wrong word
            cand[rng.randrange(len(cand))] = rng.choice(colours + shapes)
        elif edit == 2:   # a stutter
            i = rng.randrange(len(cand))
            cand = cand[:i + 1] + cand[i:]
        candidates.append(cand)
        references.append([words(r) for r in refs])
    return candidates, references


def test_equals_pycocoevalcap_on_demo_style_captions():
    candidates, references = demo_style_sets(200, seed=3)
    ours = CiderD(references).score(candidates, references)
    expected = coco_scores(candidates, references)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-6)
    corpus_score, _ = Cider().compute_score({i: [" ".join(r) for r in refs] for i, refs in enumerate(references)},
                                            {i: [" ".join(c)] for i, c in enumerate(candidates)})
    assert ours.mean() == pytest.approx(corpus_score, abs=1e-9)
    assert expected.std() > 0.1   # scores spread: perturbations matter


def test_a_value_worked_by_hand():
    # D = 2 sets; "a" is in both (idf 0); "dog", "a dog" in one and "dog dog" in none: idf log 2 = l.
    scorer = CiderD([[["a", "dog"]], [["a", "cat"]]])
    refs = [[["a", "dog"]]]
    # a perfect two-word match: cosine 1 for unigrams and bigrams, 0 for the absent 3-, 4-grams
    assert scorer.score([["a", "dog"]], refs)[0] == pytest.approx(5.0, abs=1e-12)
    # "a dog dog": unigram "dog" tf 2 clipped to 1: l*l / (2l * l) = 1/2; bigrams {a dog, dog dog}
    # against {a dog}: l*l / (sqrt(2) l * l); lengths 2 and 1 bigrams: exp(-1/72)
    expected = 10 * (0.5 + 1 / math.sqrt(2)) / 4 * math.exp(-1 / 72)
    assert scorer.score([["a", "dog", "dog"]], refs)[0] == pytest.approx(expected, abs=1e-12)


def test_training_split_document_frequencies_move_weight_to_words_rare_in_training():
    scored = [[["dog", "on", "grass"]], [["cat", "on", "grass"]], [["bird", "over", "grass"]]]
    train = CiderD([[["a", "dog", "runs"]], [["the", "dog", "jumps"]], [["dog", "in", "grass"]]])
    split = CiderD(scored)
    assert train.num_documents == 3
    assert (train.document_frequency(["dog"]), train.document_frequency(["grass"])) == (3, 1)
    assert (split.document_frequency(["dog"]), split.document_frequency(["grass"])) == (1, 3)
    # each candidate shares one word with its references
    dog, grass = [["the", "dog"]], [["the", "grass"]]
    # "dog" is in every training set (idf 0) but rare in the scored split
    assert train.score(dog, scored[:1])[0] == pytest.approx(0.0, abs=1e-12)
    assert split.score(dog, scored[:1])[0] > 0.5
    # "grass" the other way round
    assert split.score(grass, scored[:1])[0] == pytest.approx(0.0, abs=1e-12)
    assert train.score(grass, scored[:1])[0] > 0.5
    # words training never saw (df 0) still match each other, at the highest weight, log(D)
    assert train.document_frequency(["zebra"]) == 0
    assert train.score([["zebra", "grazes"]], [[["a", "zebra", "grazes"]]])[0] > 2.0


def test_ref_index_shares_reference_sets_between_samples():
    candidates, references = demo_style_sets(12, seed=5)
    scorer = CiderD(references)
    k = 3
    samples = [c[:len(c) - j] for c in candidates for j in range(k)]   # K samples per image
    shared = scorer.score(samples, references, ref_index=np.repeat(np.arange(len(references)), k))
    repeated = scorer.score(samples, [refs for refs in references for _ in range(k)])
    np.testing.assert_array_equal(shared, repeated)
    assert shared.shape == (len(samples),)


def test_bad_inputs_are_named():
    refs = [[["a", "dog"]], [["a", "cat"]]]
    scorer = CiderD(refs)
    with pytest.raises(ValueError, match="2 candidates but 1 reference sets"):
        scorer.score([["a"], ["b"]], refs[:1])
    with pytest.raises(ValueError, match="ref_index has 1 entries"):
        scorer.score([["a"], ["b"]], refs, ref_index=[0])
    with pytest.raises(ValueError, match=r"ref_index must lie in \[0, 2\)"):
        scorer.score([["a"]], refs, ref_index=[2])
    with pytest.raises(ValueError, match="reference set 0 is empty"):
        scorer.score([["a"]], [[]])
    with pytest.raises(ValueError, match="at least one reference set"):
        CiderD([])
    with pytest.raises(ValueError, match="sigma > 0, got 0"):
        CiderD(refs, sigma=0)
    with pytest.raises(TypeError, match="list of tokens"):
        scorer.score(["a dog"], refs[:1])
    assert scorer.score([], refs, ref_index=[]).shape == (0,)


def test_ngram_keys_pack_word_ids_and_stop_at_sentence_ends():
    # sentences [1, 1, 2] and [3]: no n-gram spans "2 3"
    keys, sent, order = ngram_keys(np.array([1, 1, 2, 3], dtype=np.uint64), np.array([3, 1]))
    b = 1 << 16
    found = sorted(zip(order.tolist(), sent.tolist(), keys.tolist()))
    assert found == [(0, 0, 1), (0, 0, 1), (0, 0, 2), (0, 1, 3), (1, 0, b + 1), (1, 0, b + 2),
                     (2, 0, (b + 1) * b + 2)]
    empty = ngram_keys(np.zeros(0, dtype=np.uint64), np.array([0, 0]))
    assert all(len(a) == 0 for a in empty)
