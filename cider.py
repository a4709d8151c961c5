"""CIDEr-D (Vedantam et al., CVPR 2015) with document frequencies fixed once, for self-critical training.

The arithmetic is coco-caption's (pycocoevalcap's `Cider`, which is CIDEr-D): n-grams of orders
1..4; each n-gram weighted by tf * idf with idf = log(D) - log(max(1, df)), where D is the number
of reference sets in the df corpus and df the number of those sets that contain the n-gram; per
order, the cosine of candidate and reference vectors with the candidate's tf clipped by the
reference's; a Gaussian penalty exp(-delta^2 / (2 sigma^2)) on the length difference, with sigma 6
and a caption's length counted, as coco-caption counts it, in bigrams (len - 1, 0 when empty); the
mean over orders, then over the image's references, times 10.

pycocoevalcap takes the document frequencies from the very references it scores. Self-critical
training (Rennie et al., CVPR 2017) takes them once from the training split's references and scores
many batches against them: `CiderD(corpus)` does that, and `CiderD(refs).score(cands, refs).mean()`
is pycocoevalcap's corpus score. A candidate is scored as the tokens it is given: a sample cut off
without <eos> is not padded or penalised here (truncated captions inflate CIDEr-D: SacreEOS, 2023).

Speed: words become integer ids and each n-gram one uint64 key (its word ids as base-2^16
digits), so n-gram extraction, counting, document-frequency look-up and the clipped dot products
are numpy array operations; only the word look-up is a Python loop over tokens.

Letters in shape comments: S candidates, I images (reference sets), R references per image (the
most any image has), N n-gram orders (4), M (sentence, distinct n-gram) entries of a batch, G
n-grams of the corpus.
"""
from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import numpy as np

Tokens = Sequence[str]
ORDERS = 4   # n-gram orders 1..4: coco-caption's Cider only works with 4
WORD_BITS = 16   # an n-gram of up to 4 word ids (1..2^16 - 1) packs into one uint64 key
MAX_WORDS = (1 << WORD_BITS) - 1


class _Cooked(NamedTuple):
    """Some sentences' n-grams as flat arrays (M,), one entry per (sentence, distinct n-gram)."""
    sent: np.ndarray      # sentence index
    gid: np.ndarray       # n-gram id: a row of the batch's n-gram table
    tf: np.ndarray        # count of the n-gram in the sentence
    order: np.ndarray     # n-gram order - 1
    lengths: np.ndarray   # (sentences,) length as coco-caption counts it: in bigrams


def ngram_keys(word_ids: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every n-gram occurrence of orders 1..4 in some sentences, each as one integer key.

    word_ids (sum of lengths,) uint64 in 1..MAX_WORDS are the sentences' words one after the other.
    A key holds an n-gram's word ids as digits in base 2^16: no digit is 0, so different n-grams
    have different keys, across orders too. Returns keys, sentence index and order - 1 (occurrences,).
    """
    n_sents = len(lengths)
    flat = np.zeros(len(word_ids) + n_sents, dtype=np.uint64)  # a 0 after each sentence ends its n-grams
    flat[np.arange(len(word_ids)) + np.repeat(np.arange(n_sents), lengths)] = word_ids
    owner = np.repeat(np.arange(n_sents), np.asarray(lengths) + 1)  # sentence of each slot of flat
    key, live = flat, flat != 0
    keys, sents, orders = [], [], []
    for k in range(ORDERS):
        if k:   # the k-grams starting at i, extended by the word at i + k
            key = (key[:-1] << np.uint64(WORD_BITS)) | flat[k:]
            live = live[:-1] & (flat[k:] != 0)
        keys.append(key[live])
        sents.append(owner[:len(live)][live])
        orders.append(np.full(len(keys[-1]), k))
    return np.concatenate(keys), np.concatenate(sents), np.concatenate(orders)


def _lengths(sentences: Sequence[Tokens]) -> np.ndarray:
    for tokens in sentences:
        if isinstance(tokens, str):
            raise TypeError(f"a caption must be a list of tokens, not the string {tokens[:40]!r}")
    return np.fromiter(map(len, sentences), dtype=np.int64, count=len(sentences))


def _split(cooked: _Cooked, n_first: int) -> tuple[_Cooked, _Cooked]:
    """The entries of sentences [0, n_first) and of the rest, renumbered from 0."""
    first = cooked.sent < n_first
    rest = ~first
    return (_Cooked(cooked.sent[first], cooked.gid[first], cooked.tf[first], cooked.order[first],
                    cooked.lengths[:n_first]),
            _Cooked(cooked.sent[rest] - n_first, cooked.gid[rest], cooked.tf[rest], cooked.order[rest],
                    cooked.lengths[n_first:]))


class CiderD:
    """CIDEr-D scorer whose document frequencies come from `corpus`, one reference set per image."""

    def __init__(self, corpus: Iterable[Sequence[Tokens]], *, sigma: float = 6.0):
        if not sigma > 0:
            raise ValueError(f"CIDEr-D's length penalty needs sigma > 0, got {sigma}")
        self.sigma = sigma
        sets = [list(refs) for refs in corpus]
        if not sets:
            raise ValueError("CiderD needs a corpus of at least one reference set, got none")
        self.num_documents = len(sets)
        self._log_docs = float(np.log(float(len(sets))))
        sentences = [ref for refs in sets for ref in refs]
        lengths = _lengths(sentences)
        self._words: dict[str, int] = {}   # word -> id, from 1
        for word in itertools.chain.from_iterable(sentences):
            self._words.setdefault(word, len(self._words) + 1)
        if len(self._words) > MAX_WORDS:
            raise ValueError(f"the corpus has {len(self._words)} distinct words, at most {MAX_WORDS} fit")
        ids = np.fromiter(map(self._words.get, itertools.chain.from_iterable(sentences)),
                          dtype=np.uint64, count=int(lengths.sum()))
        keys, sent, _ = ngram_keys(ids, lengths)
        doc = np.repeat(np.arange(len(sets)), [len(refs) for refs in sets])[sent]
        self._keys, gid = np.unique(keys, return_inverse=True)  # (G,) sorted n-gram keys
        # df counts a reference set once however many of its references hold the n-gram; sorting
        # then dropping repeats is measured 10x faster here than np.unique's hash table
        pairs = np.sort(doc * len(self._keys) + gid)
        pairs = pairs[np.concatenate([[True], pairs[1:] != pairs[:-1]])] if len(pairs) else pairs
        self._df = np.bincount(pairs % max(len(self._keys), 1), minlength=len(self._keys))  # (G,)

    def document_frequency(self, ngram: Tokens) -> int:
        """How many reference sets of the corpus contain `ngram` (0 when none does)."""
        if not 1 <= len(ngram) <= ORDERS or any(word not in self._words for word in ngram):
            return 0
        key = 0
        for word in ngram:
            key = (key << WORD_BITS) | self._words[word]
        return int(self._corpus_df(np.array([key], dtype=np.uint64))[0])

    def _corpus_df(self, keys: np.ndarray) -> np.ndarray:
        """Document frequency of each n-gram key; 0 for n-grams outside the corpus."""
        if len(self._keys) == 0:
            return np.zeros(len(keys), dtype=np.int64)
        pos = np.minimum(np.searchsorted(self._keys, keys), len(self._keys) - 1)
        return np.where(self._keys[pos] == keys, self._df[pos], 0)

    def score(self, candidates: Sequence[Tokens], references: Sequence[Sequence[Tokens]],
              ref_index: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """CIDEr-D of each candidate against its image's references: float64 array (S,).

        references[i] is image i's reference set; candidate s is scored against
        references[ref_index[s]] (ref_index=None: references[s]), so K samples of an image share
        one reference set: `ref_index = np.repeat(np.arange(len(references)), K)`.
        """
        ref_index = self._check_index(len(candidates), references, ref_index)
        if len(candidates) == 0:
            return np.zeros(0)
        ref_sents = [ref for refs in references for ref in refs]
        cand, ref, idf = self._cook(list(candidates), ref_sents)
        n_refs = np.array([len(refs) for refs in references])  # (I,)
        first_ref = np.concatenate([[0], np.cumsum(n_refs)[:-1]])  # (I,)
        col = np.arange(len(ref_sents)) - np.repeat(first_ref, n_refs)  # position in its set
        img = np.repeat(np.arange(len(references)), n_refs)
        max_refs = int(n_refs.max())
        dots = self._clipped_dots(cand, ref, img, col, ref_index, idf, max_refs)  # (S, N, R)
        norm_c = self._norms(cand, len(candidates), idf)  # (S, N)
        norm_r = np.zeros((len(references), max_refs, ORDERS))  # (I, R, N)
        norm_r[img, col] = self._norms(ref, len(ref_sents), idf)
        len_r = np.zeros((len(references), max_refs))  # (I, R)
        len_r[img, col] = ref.lengths
        denom = norm_c[:, :, None] * norm_r[ref_index].transpose(0, 2, 1)  # (S, N, R)
        cos = np.divide(dots, denom, out=np.zeros_like(dots), where=denom > 0)  # (S, N, R)
        delta = cand.lengths[:, None] - len_r[ref_index]  # (S, R)
        penalty = np.exp(-(delta ** 2) / (2 * self.sigma ** 2))  # (S, R)
        live = np.arange(max_refs)[None, :] < n_refs[ref_index][:, None]  # (S, R)
        per_ref = cos.mean(axis=1) * penalty * live  # (S, R)
        return 10.0 * per_ref.sum(axis=1) / n_refs[ref_index]

    @staticmethod
    def _check_index(n_cands: int, references: Sequence[Sequence[Tokens]],
                     ref_index: Sequence[int] | np.ndarray | None) -> np.ndarray:
        if ref_index is None:
            if len(references) != n_cands:
                raise ValueError(f"{n_cands} candidates but {len(references)} reference sets: "
                                 "pass ref_index to share reference sets between candidates")
            ref_index = np.arange(n_cands)
        ref_index = np.asarray(ref_index, dtype=np.int64).reshape(-1)
        if len(ref_index) != n_cands:
            raise ValueError(f"ref_index has {len(ref_index)} entries, expected one per candidate ({n_cands})")
        if n_cands and (ref_index.min() < 0 or ref_index.max() >= len(references)):
            raise ValueError(f"ref_index must lie in [0, {len(references)}), got {ref_index.min()}..{ref_index.max()}")
        empty = [i for i in np.unique(ref_index) if len(references[i]) == 0]
        if empty:
            raise ValueError(f"reference set {empty[0]} is empty: CIDEr-D needs at least one reference per image")
        return ref_index

    def _cook(self, candidates: list[Tokens], ref_sents: list[Tokens]) -> tuple[_Cooked, _Cooked, np.ndarray]:
        """The n-grams of candidates and references with their counts, and each n-gram's idf."""
        sentences = candidates + ref_sents
        lengths = _lengths(sentences)
        tokens = list(itertools.chain.from_iterable(sentences))
        ids = list(map(self._words.get, tokens))
        extra: dict[str, int] = {}   # words outside the corpus: their n-grams have df 0, idf log(D)
        for i in [i for i, word_id in enumerate(ids) if word_id is None]:
            ids[i] = extra.setdefault(tokens[i], len(self._words) + 1 + len(extra))
        if len(self._words) + len(extra) > MAX_WORDS:
            raise ValueError(f"{len(self._words) + len(extra)} distinct words, at most {MAX_WORDS} fit")
        keys, sent, order = ngram_keys(np.array(ids, dtype=np.uint64), lengths)
        table, gid = np.unique(keys, return_inverse=True)  # the batch's distinct n-grams
        idf = self._log_docs - np.log(np.maximum(self._corpus_df(table), 1).astype(np.float64))
        # one entry per (sentence, n-gram); its number of occurrences is the term frequency
        _, first, tf = np.unique(sent * len(table) + gid, return_index=True, return_counts=True)
        cooked = _Cooked(sent[first], gid[first], tf.astype(np.float64), order[first],
                         np.maximum(lengths - 1, 0).astype(np.float64))
        cand, ref = _split(cooked, len(candidates))
        return cand, ref, idf

    def _norms(self, cooked: _Cooked, n_sents: int, idf: np.ndarray) -> np.ndarray:
        """Euclidean norm of each sentence's tf-idf vector, per order: (n_sents, N)."""
        sq = (cooked.tf * idf[cooked.gid]) ** 2  # (M,)
        flat = np.bincount(cooked.sent * ORDERS + cooked.order, weights=sq, minlength=n_sents * ORDERS)
        return np.sqrt(flat).reshape(n_sents, ORDERS)

    def _clipped_dots(self, cand: _Cooked, ref: _Cooked, img: np.ndarray, col: np.ndarray,
                      ref_index: np.ndarray, idf: np.ndarray, max_refs: int) -> np.ndarray:
        """sum over shared n-grams of min(tf_c, tf_r) * tf_r * idf^2 for every (candidate, reference).

        Each image's references become one table row per (image, n-gram) holding the n-gram's tf
        in each reference, so a candidate's n-grams find their reference counts by one sorted
        search instead of a loop over pairs. Returns (S, N, R).
        """
        dots = np.zeros((len(ref_index) * ORDERS, max_refs))
        if len(ref.sent) == 0:   # every reference is empty: nothing to share
            return dots.reshape(len(ref_index), ORDERS, max_refs)
        n_grams = len(idf)
        ref_keys = img[ref.sent] * n_grams + ref.gid  # (M_ref,)
        keys, row = np.unique(ref_keys, return_inverse=True)
        table = np.zeros((len(keys), max_refs))  # (U, R) tf of the n-gram in each reference
        table[row, col[ref.sent]] = ref.tf
        cand_keys = ref_index[cand.sent] * n_grams + cand.gid  # (M_cand,)
        pos = np.minimum(np.searchsorted(keys, cand_keys), len(keys) - 1)
        hit = keys[pos] == cand_keys
        tf_r = table[pos[hit]]  # (H, R)
        tf_c = cand.tf[hit][:, None]  # (H, 1)
        # min(tf_c * idf, tf_r * idf) * tf_r * idf, with idf >= 0 because df <= D
        contrib = np.minimum(tf_c, tf_r) * tf_r * (idf[cand.gid[hit]] ** 2)[:, None]  # (H, R)
        slot = cand.sent[hit] * ORDERS + cand.order[hit]
        np.add.at(dots, slot, contrib)
        return dots.reshape(len(ref_index), ORDERS, max_refs)


def corpus_cider(candidates: Sequence[Tokens], references: Sequence[Sequence[Tokens]]) -> float:
    """coco-caption's corpus CIDEr-D: document frequencies from these very references."""
    if not candidates:
        return 0.0
    return float(CiderD(references).score(candidates, references).mean())
