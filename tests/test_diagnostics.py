"""diagnostics.py against values worked out by hand."""
from __future__ import annotations

import pytest

import diagnostics

# Four generated captions (the fourth empty), their references and the training captions:
#   c1 "a dog runs in the"       5 words, ends on "the" (bad), no repeat
#   c2 "a dog runs on the grass" 6 words, a training caption word for word
#   c3 "a man and a man"         5 words, repeats the content word "man"
#   c4 ""                        0 words, empty
CAPTIONS = [["a", "dog", "runs", "in", "the"], ["a", "dog", "runs", "on", "the", "grass"],
            ["a", "man", "and", "a", "man"], []]
REFERENCES = [[["a", "dog", "runs", "fast"]], [["a", "dog", "on", "grass"], ["the", "grass"]],
              [["two", "men"]], [["a", "cat"]]]
TRAINING = {("a", "dog", "runs", "on", "the", "grass"), ("two", "men", "walk")}
VOCAB = ["<pad>", "<sos>", "<eos>", "<unk>", "a", "dog", "runs", "in", "the", "on", "grass", "man", "and",
         "two", "men", "cat"]


def test_every_diagnostic_against_hand_worked_values():
    d = diagnostics.caption_diagnostics(CAPTIONS, REFERENCES, TRAINING, VOCAB)
    assert d["mean_length"] == pytest.approx((5 + 6 + 5 + 0) / 4)
    assert d["mean_reference_length"] == pytest.approx((4 + 4 + 2 + 2 + 2) / 5)  # over all 5 references
    assert d["vocabulary_used"] == 9  # a dog runs in the on grass man and
    assert d["vocabulary_size"] == 12  # the 16 entries less <pad> <sos> <eos> <unk>
    assert d["copied_share"] == pytest.approx(1 / 4)  # c2 only; the empty caption is no training caption
    # 16 words, 9 distinct; bigrams: c1 4 + c2 5 + c3 4 = 13, distinct 10 ("a dog", "dog runs" and
    # "a man" come twice)
    assert d["div1"] == pytest.approx(9 / 16)
    assert d["div2"] == pytest.approx(10 / 13)
    assert d["bad_ending_share"] == pytest.approx(1 / 4)
    assert d["repetition_share"] == pytest.approx(1 / 4)
    assert d["empty_share"] == pytest.approx(1 / 4)


def test_vocabulary_size_is_unknown_for_captions_read_from_a_file():
    d = diagnostics.caption_diagnostics(CAPTIONS, REFERENCES, TRAINING, None)
    assert d["vocabulary_size"] is None and d["vocabulary_used"] == 9
    assert "of" not in diagnostics.shown(d)["vocabulary_used"]


@pytest.mark.parametrize("caption, bad", [
    ("a dog runs in the", True), ("two men and", True), ("a girl with", True), ("a dog on a", True),
    ("a dog sits down", False), ("a man jumps up", False), ("a dog runs on the grass", False), ("", False)])
def test_ends_badly_on_determiners_prepositions_and_conjunctions_only(caption, bad):
    assert diagnostics.ends_badly(caption.split()) is bad


@pytest.mark.parametrize("caption, repeated", [
    ("a dog a dog", True),                              # content word twice
    ("the the dog", True),                              # a word twice in a row
    ("in the in the in", True),                         # only a trigram ("in the in") repeats
    ("a man and a woman", False),                       # function words may come back
    ("a man is sitting while a woman is standing", False),
    ("a dog runs on the grass", False)])
def test_repetition_rules(caption, repeated):
    assert diagnostics.repeats(caption.split()) is repeated


def test_div_n_counts_over_all_captions_and_is_zero_without_ngrams():
    assert diagnostics.distinct_ngrams([["a", "b"], ["a", "b"]], 1) == pytest.approx(2 / 4)
    assert diagnostics.distinct_ngrams([["a", "b"], ["a", "b"]], 2) == pytest.approx(1 / 2)
    assert diagnostics.distinct_ngrams([["a"], []], 2) == 0.0


def test_the_text_table_shows_both_columns_when_comparing():
    d = diagnostics.caption_diagnostics(CAPTIONS, REFERENCES, TRAINING, VOCAB)
    table = diagnostics.format_diagnostics(d, {**d, "copied_share": 0.5})
    assert "copied from training  25.0%" in table and table.splitlines()[2].endswith("50.0%")
    assert "9 of 12" in table and "references 2.80" in table


def test_no_captions_is_an_error():
    with pytest.raises(ValueError, match="no captions"):
        diagnostics.caption_diagnostics([], [], set(), None)
