"""Score a split the way captioning papers do (`--mode eval`).

The metrics are pycocoevalcap's scorers called one by one (BLEU-1..4, METEOR, ROUGE-L,
CIDEr-D) after PTB tokenisation; its all-in-one evaluation is not used because it also runs
SPICE, which downloads Stanford models. Heavy imports happen inside functions so that
`import test_eval` stays cheap (the training loop imports it for validation BLEU).

Never name a function `test_*` here: pytest would collect it.
"""
from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


def _as_text(caption) -> str:
    """A caption as one space-separated string (accepts a token list too)."""
    if isinstance(caption, str):
        return " ".join(caption.split())
    return " ".join(caption)


def corpus_bleu(references: dict[str, list[str]], hypotheses: dict[str, str]) -> list[float]:
    """Corpus BLEU-1..4 of one hypothesis per image against all its references.

    Text must already be tokenised and lowercased (tokens separated by spaces; token lists
    are accepted too). Uses pycocoevalcap's `Bleu(4)` (closest reference length for the
    brevity penalty), pure Python, no Java. Images without a hypothesis are ignored; a
    hypothesis without references is an error.
    """
    if not hypotheses:
        return [0.0, 0.0, 0.0, 0.0]
    missing = [k for k in hypotheses if not references.get(k)]
    if missing:
        raise ValueError(f"no reference captions for {len(missing)} image(s), e.g. {missing[0]!r}")
    from pycocoevalcap.bleu.bleu import Bleu

    gts = {k: [_as_text(r) for r in references[k]] for k in hypotheses}
    res = {k: [_as_text(h)] for k, h in hypotheses.items()}
    score, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return [float(s) for s in score]
