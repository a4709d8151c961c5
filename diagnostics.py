"""What generated captions look like, measured without any extra model (`--mode eval`).

Everything here counts words, on the toolkit's own tokenisation (`text.tokenize`, the words the
model was trained to produce): the generated captions as decoded, the references and training
captions as the data set's records hold them. The definitions (README, "Reading an evaluation"):

- length: mean words per generated caption, against the mean over all reference captions;
- vocabulary used: distinct words over all generated captions, out of the words the model can
  produce (its vocabulary without `<pad>`, `<sos>`, `<eos>`, `<unk>`);
- copied from training: share of generated captions identical, word for word, to some training
  caption (novel: the rest);
- Div-1 / Div-2: distinct 1-grams / 2-grams over all generated captions, divided by the number of
  1-grams / 2-grams they hold (Shetty et al. 2017; 1.0 means nothing is ever said twice);
- ends badly: share of captions whose last word is a determiner, preposition or conjunction
  ("a dog runs in the"), from the word lists below;
- repetition: share of captions that repeat a word (the same word twice in a row, or any word
  outside the function words twice) or a trigram.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

Words = Sequence[str]

DETERMINERS = frozenset("a an the this that these those some any each every another his her its their "
                        "my your our no".split())
PREPOSITIONS = frozenset("in on at of with by for from to into onto over under near behind through across "
                         "along around between beside inside outside towards toward against above below "
                         "beneath among past during without like".split())
CONJUNCTIONS = frozenset("and or but nor while because although whereas if".split())
BAD_ENDINGS = DETERMINERS | PREPOSITIONS | CONJUNCTIONS
# Words a caption may repeat without repeating itself ("a man and a dog", "is ... is").
FUNCTION_WORDS = BAD_ENDINGS | frozenset("is are was were be being been has have it he she they who "
                                         "which one two three".split())
SPECIAL_WORDS = frozenset(("<pad>", "<sos>", "<eos>", "<unk>"))

# Name, and what it means, of every diagnostic in eval_<split>.json's "diagnostics".
NOTES = {
    "mean_length": "mean words per generated caption",
    "mean_reference_length": "mean words per reference caption",
    "vocabulary_used": "distinct words over all generated captions",
    "vocabulary_size": "words the model can produce (vocabulary without <pad> <sos> <eos> <unk>)",
    "copied_share": "share of captions identical to a training caption (novel: the rest)",
    "div1": "distinct 1-grams / all 1-grams over the generated captions",
    "div2": "distinct 2-grams / all 2-grams over the generated captions",
    "bad_ending_share": "share of captions ending on a determiner, preposition or conjunction",
    "repetition_share": "share of captions repeating a word (twice in a row, or a content word twice) or a trigram",
    "empty_share": "share of empty captions",
}


def _ngrams(words: Words, n: int) -> list[tuple[str, ...]]:
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


def distinct_ngrams(captions: Iterable[Words], n: int) -> float:
    """Div-n: distinct n-grams over all captions / all their n-grams (0.0 when there are none)."""
    counts = Counter(g for words in captions for g in _ngrams(words, n))
    total = sum(counts.values())
    return len(counts) / total if total else 0.0


def ends_badly(words: Words) -> bool:
    """Whether the caption's last word is a determiner, preposition or conjunction."""
    return bool(words) and words[-1] in BAD_ENDINGS


def repeats(words: Words) -> bool:
    """Whether the caption says a word twice in a row, a content word twice, or a trigram twice."""
    if any(a == b for a, b in zip(words, words[1:])):
        return True
    content = Counter(w for w in words if w not in FUNCTION_WORDS)
    if any(c > 1 for c in content.values()):
        return True
    return any(c > 1 for c in Counter(_ngrams(words, 3)).values())


def _mean(values: Sequence[float]) -> float:
    return float(sum(values)) / len(values) if values else 0.0


def caption_diagnostics(captions: Sequence[Words], references: Sequence[Sequence[Words]],
                        training: set[tuple[str, ...]], vocabulary: Sequence[str] | None = None) -> dict:
    """The diagnostics (NOTES) of one generated caption per image.

    `captions[i]` is image i's generated words, `references[i]` its reference captions' words,
    `training` every training caption as a tuple of words, `vocabulary` the model's word list
    (None: unknown, e.g. captions read from a file; then vocabulary_size is None).
    """
    if not captions:
        raise ValueError("no captions to describe")
    n = len(captions)
    used = {w for words in captions for w in words}
    size = len([w for w in vocabulary if w not in SPECIAL_WORDS]) if vocabulary is not None else None
    return {
        "mean_length": _mean([len(w) for w in captions]),
        "mean_reference_length": _mean([len(r) for refs in references for r in refs]),
        "vocabulary_used": len(used),
        "vocabulary_size": size,
        "copied_share": sum(tuple(w) in training for w in captions) / n,
        "div1": distinct_ngrams(captions, 1),
        "div2": distinct_ngrams(captions, 2),
        "bad_ending_share": sum(map(ends_badly, captions)) / n,
        "repetition_share": sum(map(repeats, captions)) / n,
        "empty_share": sum(not w for w in captions) / n,
    }


# The diagnostics shown in the table and the report page, with their labels.
LABELS = {"mean_length": "mean length", "vocabulary_used": "vocabulary used", "copied_share": "copied from training",
          "div1": "Div-1", "div2": "Div-2", "bad_ending_share": "ends badly", "repetition_share": "repeats itself",
          "empty_share": "empty"}


def shown(diag: dict) -> dict[str, str]:
    """Each diagnostic of LABELS as text: shares in %, "12 of 2,538" for the vocabulary."""
    out = {}
    for key in LABELS:
        v = diag[key]
        if key == "mean_length":
            out[key] = f"{v:.2f} words (references {diag['mean_reference_length']:.2f})"
        elif key == "vocabulary_used":
            out[key] = f"{v:,}" + (f" of {diag['vocabulary_size']:,}" if diag.get("vocabulary_size") else "")
        elif key.endswith("_share"):
            out[key] = f"{100 * v:.1f}%"
        else:
            out[key] = f"{v:.3f}"
    return out


def format_diagnostics(diag: dict, other: dict | None = None) -> str:
    """The diagnostics as text lines (with a second column when comparing)."""
    a, b = shown(diag), shown(other) if other is not None else None
    width = max(map(len, LABELS.values()))
    first = max(map(len, a.values()))
    return "\n".join((f"{LABELS[k]:<{width}}  {a[k]:<{first}}" + (f"  {b[k]}" if b else "")).rstrip()
                     for k in LABELS)
