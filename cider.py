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
most any image has), N n-gram orders, M n-gram occurrences of a batch.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

import numpy as np

Tokens = Sequence[str]
ORDERS = 4   # n-gram orders 1..4: coco-caption's Cider only works with 4


class _Cooked(NamedTuple):
    """The n-gram occurrences of some sentences as flat arrays (M,), plus each sentence's length."""
    sent: np.ndarray      # sentence index
    gid: np.ndarray       # n-gram id
    tf: np.ndarray        # count of the n-gram in the sentence
    order: np.ndarray     # n-gram order - 1
    lengths: np.ndarray   # (sentences,) length as coco-caption counts it


def ngram_counts(tokens: Tokens, n: int = ORDERS) -> dict[tuple[str, ...], int]:
    """Every n-gram of orders 1..n in `tokens` with its count."""
    if isinstance(tokens, str):
        raise TypeError(f"a caption must be a list of tokens, not the string {tokens[:40]!r}")
    counts: dict[tuple[str, ...], int] = {}
    for k in range(1, n + 1):
        for i in range(len(tokens) - k + 1):
            gram = tuple(tokens[i:i + k])
            counts[gram] = counts.get(gram, 0) + 1
    return counts


class CiderD:
    """CIDEr-D scorer whose document frequencies come from `corpus`, one reference set per image."""

    def __init__(self, corpus: Iterable[Sequence[Tokens]], *, sigma: float = 6.0):
        if not sigma > 0:
            raise ValueError(f"CIDEr-D's length penalty needs sigma > 0, got {sigma}")
        self.n, self.sigma = ORDERS, sigma
        self._ids: dict[tuple[str, ...], int] = {}
        df: list[int] = []
        documents = 0
        for refs in corpus:
            documents += 1
            seen = set()
            for ref in refs:
                seen.update(ngram_counts(ref))
            for gram in seen:
                gid = self._ids.setdefault(gram, len(df))
                if gid == len(df):
                    df.append(0)
                df[gid] += 1
        if documents == 0:
            raise ValueError("CiderD needs a corpus of at least one reference set, got none")
        self.num_documents = documents
        self._df = np.asarray(df, dtype=np.int64)  # (G,)
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
        dots = self._clipped_dots(cand, ref, img, col, ref_index, idf, int(n_refs.max()))  # (S, N, R)
        norm_c = self._norms(cand, len(candidates), idf)  # (S, N)
        norm_r = np.zeros((len(references), int(n_refs.max()), self.n))  # (I, R, N)
        norm_r[img, col] = self._norms(ref, len(ref_sents), idf)
        len_r = np.zeros((len(references), int(n_refs.max())))  # (I, R)
        len_r[img, col] = ref.lengths
        denom = norm_c[:, :, None] * norm_r[ref_index].transpose(0, 2, 1)  # (S, N, R)
        cos = np.divide(dots, denom, out=np.zeros_like(dots), where=denom > 0)  # (S, N, R)
        delta = cand.lengths[:, None] - len_r[ref_index]  # (S, R)
        penalty = np.exp(-(delta ** 2) / (2 * self.sigma ** 2))  # (S, R)
        live = np.arange(int(n_refs.max()))[None, :] < n_refs[ref_index][:, None]  # (S, R)
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
        """The n-gram occurrences of `sentences` as flat arrays; new n-grams get ids in `extra`."""
        sent, gids, tfs, orders = [], [], [], []
        base = len(self._ids)
        for s, tokens in enumerate(sentences):
            for gram, tf in ngram_counts(tokens).items():
                gid = self._ids.get(gram)
                if gid is None:
                    gid = base + extra.setdefault(gram, len(extra))
                sent.append(s)
                gids.append(gid)
                tfs.append(tf)
                orders.append(len(gram) - 1)
        # coco-caption counts a caption's length in bigrams
        lengths = np.array([max(len(t) - 1, 0) for t in sentences], dtype=np.float64)
        return _Cooked(np.array(sent, dtype=np.int64), np.array(gids, dtype=np.int64),
                       np.array(tfs, dtype=np.float64), np.array(orders, dtype=np.int64), lengths)

    def _norms(self, cooked: _Cooked, n_sents: int, idf: np.ndarray) -> np.ndarray:
        """Euclidean norm of each sentence's tf-idf vector, per order: (n_sents, N)."""
        sq = (cooked.tf * idf[cooked.gid]) ** 2  # (M,)
        flat = np.bincount(cooked.sent * self.n + cooked.order, weights=sq, minlength=n_sents * self.n)
        return np.sqrt(flat).reshape(n_sents, self.n)

    def _clipped_dots(self, cand: _Cooked, ref: _Cooked, img: np.ndarray, col: np.ndarray,
                      ref_index: np.ndarray, idf: np.ndarray, max_refs: int) -> np.ndarray:
        """sum over shared n-grams of min(tf_c, tf_r) * tf_r * idf^2 for every (candidate, reference).

        Each image's references become one table row per (image, n-gram) holding the n-gram's tf
        in each reference, so a candidate's n-grams find their reference counts by one sorted
        search instead of a loop over pairs. Returns (S, N, R).
        """
        dots = np.zeros((len(ref_index) * self.n, max_refs))
        if len(ref.sent) == 0:   # every reference is empty: nothing to share
            return dots.reshape(len(ref_index), self.n, max_refs)
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
        slot = cand.sent[hit] * self.n + cand.order[hit]
        np.add.at(dots, slot, contrib)
        return dots.reshape(len(ref_index), self.n, max_refs)

