"""Words: the caption tokenizer and the vocabulary (plain data: a list of words, id = position)."""
from __future__ import annotations

import functools
import json
import os
import re
import unicodedata
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

import spacy

from fileio import atomic_write

PAD, SOS, EOS, UNK = "<pad>", "<sos>", "<eos>", "<unk>"
SPECIALS = (PAD, SOS, EOS, UNK)  # ids are positions in the word list
EXAMPLES = 5                     # duplicate words named in an error

_APOSTROPHES = re.compile(r"['\u2018\u2019`]")
_NON_ALNUM = re.compile(r"[^a-z0-9]+")


@functools.lru_cache(maxsize=1)
def _spacy_tokenizer():
    """spaCy's rule-based English tokenizer (no model, no download), built once per process."""
    return spacy.blank("en").tokenizer


def clean(text: str) -> str:
    """Lowercase, drop accents ("naive") and apostrophes ("dogs", "dont"); every other
    non-alphanumeric character separates words ("t-shirt" -> "t shirt", as in the Karpathy tokens)."""
    text = unicodedata.normalize("NFKD", text.lower())
    text = "".join(c for c in text if not unicodedata.combining(c))
    return " ".join(_NON_ALNUM.split(_APOSTROPHES.sub("", text))).strip()


def tokenize(text: str) -> list[str]:
    """Words of a caption: `clean`, then spaCy's English tokenizer, which splits clitics
    ("dont" -> "do", "nt"), times ("10am" -> "10", "am") and units ("5km" -> "5", "km")."""
    cleaned = clean(text)
    return [t.text for t in _spacy_tokenizer()(cleaned)] if cleaned else []


class Vocabulary:
    """Plain data: a list of words; a word's id is its position. Specials come first."""

    def __init__(self, words: Sequence[str]):
        words = list(words)
        if tuple(words[:len(SPECIALS)]) != SPECIALS:
            raise ValueError(f"a vocabulary must start with {list(SPECIALS)}, got {words[:len(SPECIALS)]}")
        if not all(isinstance(w, str) for w in words):
            raise ValueError("a vocabulary must be a list of strings")
        if len(set(words)) != len(words):
            dupes = [w for w, c in Counter(words).items() if c > 1][:EXAMPLES]
            raise ValueError(f"the vocabulary repeats words: {dupes}")
        self.words = words
        self._index = {w: i for i, w in enumerate(words)}

    @classmethod
    def build(cls, token_lists: Iterable[list[str]], min_freq: int = 5) -> Vocabulary:
        """Words seen at least `min_freq` times, most frequent first (ties alphabetical)."""
        if min_freq < 1:
            raise ValueError(f"min_freq must be >= 1, got {min_freq}")
        counts = Counter(tok for tokens in token_lists for tok in tokens)
        kept = sorted((w for w, c in counts.items() if c >= min_freq and w not in SPECIALS),
                      key=lambda w: (-counts[w], w))
        return cls([*SPECIALS, *kept])

    @property
    def pad_id(self) -> int:
        return self._index[PAD]

    @property
    def sos_id(self) -> int:
        return self._index[SOS]

    @property
    def eos_id(self) -> int:
        return self._index[EOS]

    @property
    def unk_id(self) -> int:
        return self._index[UNK]

    def __len__(self) -> int:
        return len(self.words)

    def __contains__(self, word: str) -> bool:
        return word in self._index

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.words == other.words

    def __repr__(self) -> str:
        return f"Vocabulary({len(self)} words)"

    def word_id(self, word: str) -> int:
        return self._index.get(word, self.unk_id)

    def encode(self, tokens: Sequence[str]) -> list[int]:
        """[<sos>, ids..., <eos>]; unknown words become <unk>."""
        return [self.sos_id, *(self._index.get(t, self.unk_id) for t in tokens), self.eos_id]

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Words up to the first <eos>, without <sos>/<pad>."""
        out = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i in (self.sos_id, self.pad_id):
                continue
            out.append(self.words[i])
        return out

    def to_list(self) -> list[str]:
        return list(self.words)

    @classmethod
    def from_list(cls, words: Sequence[str]) -> Vocabulary:
        return cls(words)

    def save(self, path: str | os.PathLike) -> None:
        data = json.dumps(self.words, ensure_ascii=False).encode("utf-8")
        atomic_write(path, lambda f: f.write(data))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Vocabulary:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"vocabulary file not found: {path}")
        try:
            words = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path} is not a JSON vocabulary file: {exc}") from None
        if not isinstance(words, list):
            raise ValueError(f"{path}: expected a JSON list of words, got {type(words).__name__}")
        return cls(words)
