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

Letters in shape comments: S candidates, I images (reference sets), R references per image (the
most any image has), N n-gram orders (4), M (sentence, distinct n-gram) entries of a batch, G
n-grams of the corpus.
"""
from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import numpy as np

Tokens = Sequence[str]
ORDERS = 4   # n-gram orders 1..4: coco-caption's Cider only works with 4


class _Cooked(NamedTuple):
    """Some sentences' n-grams as flat arrays (M,), one entry per (sentence, distinct n-gram)."""
    sent: np.ndarray      # sentence index
    gid: np.ndarray       # n-gram id
    tf: np.ndarray        # count of the n-gram in the sentence
    order: np.ndarray     # n-gram order - 1
    lengths: np.ndarray   # (sentences,) length as coco-caption counts it


def ngrams(tokens: Tokens) -> list[tuple[str, ...]]:
    """Every n-gram occurrence of orders 1..4 in `tokens`, as tuples of words (unigrams first)."""
    if isinstance(tokens, str):
        raise TypeError(f"a caption must be a list of tokens, not the string {tokens[:40]!r}")
    found: list[tuple[str, ...]] = []
    for k in range(1, ORDERS + 1):
        found.extend(zip(*[tokens[i:] for i in range(k)]))
    return found


class CiderD:
    """CIDEr-D scorer whose document frequencies come from `corpus`, one reference set per image."""

    def __init__(self, corpus: Iterable[Sequence[Tokens]], *, sigma: float = 6.0):
        if not sigma > 0:
            raise ValueError(f"CIDEr-D's length penalty needs sigma > 0, got {sigma}")
        self.sigma = sigma
        df: Counter[tuple[str, ...]] = Counter()
        documents = 0
        for refs in corpus:
            documents += 1
            df.update(set(itertools.chain.from_iterable(ngrams(ref) for ref in refs)))
        if documents == 0:
            raise ValueError("CiderD needs a corpus of at least one reference set, got none")
        self.num_documents = documents
        self._ids = {gram: gid for gid, gram in enumerate(df)}  # n-gram -> id, G of them
        self._df = np.fromiter(df.values(), dtype=np.int64, count=len(df))  # (G,)
        self._log_docs = float(np.log(float(documents)))
        self._idf = self._log_docs - np.log(np.maximum(self._df.astype(np.float64), 1.0))  # (G,)

    def document_frequency(self, ngram: Tokens) -> int:
        """How many reference sets of the corpus contain `ngram` (0 when none does)."""
        gid = self._ids.get(tuple(ngram))
        return 0 if gid is None else int(self._df[gid])

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
        extra: dict[tuple[str, ...], int] = {}   # n-grams outside the corpus: df 0, idf log(D)
        cand = self._cook(candidates, extra)
        ref_sents = [ref for refs in references for ref in refs]
        ref = self._cook(ref_sents, extra)
        idf = np.concatenate([self._idf, np.full(len(extra), self._log_docs)])  # (G + extra,)
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

    def _cook(self, sentences: Sequence[Tokens], extra: dict[tuple[str, ...], int]) -> _Cooked:
        """The n-grams of `sentences` with their counts; n-grams outside the corpus get ids in `extra`."""
        grams: list[tuple[str, ...]] = []
        per_sentence = []
        for tokens in sentences:
            found = ngrams(tokens)
            grams.extend(found)
            per_sentence.append(len(found))
        base = len(self._ids)
        gid = np.fromiter(map(self._ids.get, grams, itertools.repeat(-1)), dtype=np.int64, count=len(grams))
        for i in np.flatnonzero(gid < 0).tolist():
            gid[i] = base + extra.setdefault(grams[i], len(extra))
        order = np.fromiter(map(len, grams), dtype=np.int64, count=len(grams)) - 1  # (occurrences,)
        sent = np.repeat(np.arange(len(sentences)), per_sentence)  # (occurrences,)
        # one entry per (sentence, n-gram); its number of occurrences is the term frequency
        _, first, tf = np.unique(sent * (base + len(extra)) + gid, return_index=True, return_counts=True)
        # coco-caption counts a caption's length in bigrams
        lengths = np.array([max(len(t) - 1, 0) for t in sentences], dtype=np.float64)
        return _Cooked(sent[first], gid[first], tf.astype(np.float64), order[first], lengths)

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

