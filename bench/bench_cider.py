"""Speed of the CIDEr-D reward: cider.CiderD against pycocoevalcap's Cider on the same batch.

    python bench/bench_cider.py            # a few seconds on 2 cores
    python bench/bench_cider.py --json     # one JSON object on stdout

A training corpus of 6,000 images x 5 references gives the document frequencies once
(`build_s`): synthetic (Zipf-distributed words, 6-18 tokens a caption), or real Flickr8k captions
with --captions_file (the Kaggle layout's captions.txt, lower-cased, split into letter runs). Then
a batch of 128 images x 5 candidates (one of the image's references with 30% of its words
replaced, so they share n-grams as samples do) is scored against each image's 5 references, as one
SCST step scores its samples: `ours_ms` (median of --repeats) and `pycocoevalcap_ms` for the same
640 candidates (which takes its document frequencies from the batch itself, so its scores differ).
"""
from __future__ import annotations

import argparse
import collections
import csv
import json
import os
import re
import statistics
import sys
import time

import numpy as np
from pycocoevalcap.cider.cider import Cider

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from cider import CiderD  # noqa: E402


def synthetic_captions(rng: np.random.Generator, n_captions: int, vocab: list[str]) -> list[list[str]]:
    """Captions of Zipf-distributed words (rank r drawn with weight 1/r), 6..18 tokens long."""
    weights = 1.0 / np.arange(1, len(vocab) + 1)
    lengths = rng.integers(6, 19, size=n_captions)
    ids = rng.choice(len(vocab), size=int(lengths.sum()), p=weights / weights.sum())
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    return [[vocab[i] for i in ids[a:b]] for a, b in zip(bounds[:-1], bounds[1:])]


def flickr_corpus(captions_file: str, corpus_images: int, refs: int) -> list[list[list[str]]]:
    """The first `corpus_images` images of a Kaggle-layout captions.txt with `refs` captions each."""
    captions = collections.defaultdict(list)
    with open(captions_file, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            captions[row["image"]].append(re.findall(r"[a-z]+", row["caption"].lower()))
    sets = [caps[:refs] for caps in captions.values() if len(caps) >= refs]
    if len(sets) < corpus_images:
        raise ValueError(f"{captions_file} has {len(sets)} images with {refs} captions, expected {corpus_images}")
    return sets[:corpus_images]


def perturbed(rng: np.random.Generator, refs: list[list[str]], vocab: list[str]) -> list[str]:
    """One of `refs` with each word replaced by a random vocabulary word with probability 0.3."""
    words = list(refs[rng.integers(len(refs))])
    for j in np.flatnonzero(rng.random(len(words)) < 0.3):
        words[j] = vocab[rng.integers(len(vocab))]
    return words


def run(corpus: list[list[list[str]]], images: int, samples: int, repeats: int) -> dict:
    rng = np.random.default_rng(0)
    vocab = sorted({w for refs in corpus for ref in refs for w in ref})
    start = time.perf_counter()
    scorer = CiderD(corpus)
    build_s = time.perf_counter() - start

    batch_refs = corpus[:images]
    candidates = [perturbed(rng, refs, vocab) for refs in batch_refs for _ in range(samples)]
    ref_index = np.repeat(np.arange(images), samples)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        scores = scorer.score(candidates, batch_refs, ref_index)
        times.append(time.perf_counter() - start)

    gts = {s: [" ".join(r) for r in batch_refs[ref_index[s]]] for s in range(len(candidates))}
    res = {s: [" ".join(c)] for s, c in enumerate(candidates)}
    start = time.perf_counter()
    Cider().compute_score(gts, res)
    coco_s = time.perf_counter() - start
    return {"candidates": len(candidates), "refs_per_image": len(batch_refs[0]), "corpus_images": len(corpus),
            "build_s": round(build_s, 2), "ours_ms": round(1000 * statistics.median(times), 1),
            "pycocoevalcap_ms": round(1000 * coco_s, 1), "mean_score": round(float(scores.mean()), 4)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=128, help="images in the batch")
    parser.add_argument("--samples", type=int, default=5, help="sampled captions per image")
    parser.add_argument("--refs", type=int, default=5, help="references per image")
    parser.add_argument("--corpus_images", type=int, default=6000, help="images of the df corpus")
    parser.add_argument("--vocab", type=int, default=3000, help="distinct words")
    parser.add_argument("--captions_file", help="Kaggle-layout captions.txt: real captions, not synthetic")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls of CiderD.score")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--quick", action="store_true", help="8 images, a corpus of 100, 2 repeats (smoke test)")
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.corpus_images, args.repeats = 8, 100, 2
    if args.captions_file:
        corpus = flickr_corpus(args.captions_file, args.corpus_images, args.refs)
    else:
        flat = synthetic_captions(np.random.default_rng(1), args.corpus_images * args.refs,
                                  [f"w{i}" for i in range(args.vocab)])
        corpus = [flat[i * args.refs:(i + 1) * args.refs] for i in range(args.corpus_images)]
    result = run(corpus, args.images, args.samples, args.repeats)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"df corpus of {result['corpus_images']} images x {args.refs} refs built in {result['build_s']} s")
        print(f"{result['candidates']} candidates x {args.refs} refs: CiderD.score {result['ours_ms']} ms, "
              f"pycocoevalcap Cider {result['pycocoevalcap_ms']} ms (mean score {result['mean_score']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
