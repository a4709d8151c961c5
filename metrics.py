"""Caption metrics the way captioning papers compute them: PTB tokenisation, then pycocoevalcap.

The scorers are pycocoevalcap's, called one by one (BLEU-1..4, METEOR, ROUGE-L, CIDEr-D); its
all-in-one evaluation is not used because it also runs SPICE, which downloads Stanford models.
Tokenisation is Stanford's PTBTokenizer (Java, the jar pycocoevalcap ships); without Java, nltk's
Treebank tokenizer stands in, followed by the same punctuation removal. METEOR needs Java.
"""
from __future__ import annotations

import logging
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pycocoevalcap.tokenizer.ptbtokenizer as ptb
from nltk.tokenize import TreebankWordTokenizer
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

logger = logging.getLogger(__name__)

# The tokens pycocoevalcap's PTBTokenizer drops after tokenising. Its Java call lowercases
# first, so the bracket codes come out as "-lrb-" and survive: the fallback keeps that quirk.
PUNCTUATION = frozenset(ptb.PUNCTUATIONS)
JAVA_TOKENIZER = "PTBTokenizer (Stanford CoreNLP 3.4.1, Java), punctuation removed as in pycocoevalcap"
FALLBACK_TOKENIZER = ("nltk TreebankWordTokenizer (lowercased, brackets as -lrb-), "
                      "punctuation removed as in pycocoevalcap")
_TREEBANK = TreebankWordTokenizer()

# Name and meaning of each reported metric. pycocoevalcap's `Cider` class is CIDEr-D
# (Vedantam et al. 2015): tf-idf n-gram vectors with clipped counts, a Gaussian length
# penalty (sigma 6) and a x10 scale, no stemming; its idf comes from the references of the
# images being scored, so the number depends on the split (as in every captioning paper).
METRIC_NOTES = {
    "BLEU-1": "pycocoevalcap Bleu(4), corpus level, closest reference length",
    "BLEU-2": "pycocoevalcap Bleu(4), corpus level, closest reference length",
    "BLEU-3": "pycocoevalcap Bleu(4), corpus level, closest reference length",
    "BLEU-4": "pycocoevalcap Bleu(4), corpus level, closest reference length",
    "METEOR": "pycocoevalcap Meteor (meteor-1.5.jar, -l en -norm), one process",
    "ROUGE-L": "pycocoevalcap Rouge (LCS F-measure, beta 1.2), mean over images",
    "CIDEr-D": "pycocoevalcap Cider: CIDEr-D (clipped tf-idf, Gaussian length penalty sigma 6, x10), "
               "idf from this split's references",
}
METRICS = tuple(METRIC_NOTES)
# Per-image score columns kept for the histograms (the corpus BLEU-4 is not a mean of these).
PER_IMAGE = ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D")


def _as_text(caption) -> str:
    """A caption as one space-separated string (accepts a token list too)."""
    if isinstance(caption, str):
        return " ".join(caption.split())
    return " ".join(caption)


def _check_references(references: dict, hypotheses: dict) -> None:
    missing = [k for k in hypotheses if not references.get(k)]
    if missing:
        raise ValueError(f"no reference captions for {len(missing)} image(s), e.g. {missing[0]!r}")


def corpus_bleu(references: dict[str, list[str]], hypotheses: dict[str, str]) -> list[float]:
    """Corpus BLEU-1..4 of one hypothesis per image against all its references.

    Text must already be tokenised and lowercased (tokens separated by spaces; token lists
    are accepted too). Uses pycocoevalcap's `Bleu(4)` (closest reference length for the
    brevity penalty), pure Python, no Java. Images without a hypothesis are ignored; a
    hypothesis without references is an error.
    """
    if not hypotheses:
        return [0.0, 0.0, 0.0, 0.0]
    _check_references(references, hypotheses)
    gts = {k: [_as_text(r) for r in references[k]] for k in hypotheses}
    res = {k: [_as_text(h)] for k, h in hypotheses.items()}
    score, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return [float(s) for s in score]


# ---------------------------------------------------------------- tokenisation

def java_available() -> bool:
    """True when a `java` that starts is on PATH (needed by the PTB tokenizer and METEOR)."""
    java = shutil.which("java")
    if java is None:
        return False
    try:
        return subprocess.run([java, "-version"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


# Java also ends lines at \r, U+0085, U+2028 and U+2029: keep one caption per line.
_LINE_BREAKS = str.maketrans({c: " " for c in "\n\r\x0b\x0c\x85\u2028\u2029"})


def _drop_punctuation(tokens) -> str:
    return " ".join(w for w in tokens if w not in PUNCTUATION)


def java_ptb_lines(lines: list[str]) -> list[str]:
    """Run the Stanford PTB tokenizer jar shipped with pycocoevalcap on lines (one out per in).

    Same jar and options as pycocoevalcap's PTBTokenizer, but fed through stdin: its wrapper
    writes a temporary file into site-packages (fails on a read-only install) and lets the
    jar's progress line through to our stderr.
    """
    jar = Path(ptb.__file__).with_name(ptb.STANFORD_CORENLP_3_4_1_JAR)
    text = "\n".join(line.translate(_LINE_BREAKS) for line in lines) + "\n"
    proc = subprocess.run(["java", "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer",
                           "-preserveLines", "-lowerCase", "-encoding", "utf-8"],
                          input=text.encode("utf-8"), capture_output=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"PTB tokenizer failed: {proc.stderr.decode(errors='replace').strip()[-300:]}")
    out = proc.stdout.decode("utf-8").split("\n")
    if out and out[-1] == "":
        out = out[:-1]
    if len(out) != len(lines):
        raise RuntimeError(f"PTB tokenizer returned {len(out)} lines for {len(lines)} captions")
    return [_drop_punctuation(line.split()) for line in out]


def treebank_tokenize(text: str) -> str:
    """Java-less stand-in for pycocoevalcap's PTB tokenisation of one caption.

    nltk's Treebank tokenizer splits clitics ("does n't", "dog 's"), quotes and punctuation as
    the PTB does; tokens are lowercased afterwards, as Java's -lowerCase does, so brackets
    become "-lrb-" and survive the punctuation list there too. It splits only a caption's final
    period (one sentence per caption), so an abbreviation ending a caption ("p.m.") loses its dot.
    """
    return _drop_punctuation(t.lower() for t in _TREEBANK.tokenize(" ".join(text.split()),
                                                                   convert_parentheses=True))


def tokenize_captions(captions: dict[str, list[str]], use_java: bool) -> tuple[dict[str, list[str]], str]:
    """PTB-tokenise every caption, keeping the grouping per image; returns (tokenised, method)."""
    keys = list(captions)
    flat = [c for k in keys for c in captions[k]]
    if use_java:
        out, method = java_ptb_lines(flat), JAVA_TOKENIZER
    else:
        out, method = [treebank_tokenize(c) for c in flat], FALLBACK_TOKENIZER
    result: dict[str, list[str]] = {}
    pos = 0
    for k in keys:
        n = len(captions[k])
        result[k] = out[pos:pos + n]
        pos += n
    return result, method


# ---------------------------------------------------------------- scores

@dataclass
class Scores:
    """Corpus metrics (None = unavailable), per-image scores and how they were computed."""
    metrics: dict[str, float | None]
    per_image: dict[str, dict[str, float | None]]   # image -> metric -> score
    tokenizer: str
    meteor_note: str | None = None                  # why METEOR is missing, when it is
    references_tokenized: dict[str, list[str]] = field(default_factory=dict)   # what was scored (bootstrap.py)
    hypotheses_tokenized: dict[str, str] = field(default_factory=dict)


def _meteor(gts: dict[str, list[str]], res: dict[str, list[str]]) -> tuple[float, list[float]]:
    """METEOR in one JVM for the whole split (starting it costs seconds); always stopped."""
    from pycocoevalcap.meteor.meteor import Meteor   # Java-backed: starts a process when built

    meteor = Meteor()
    try:
        score, scores = meteor.compute_score(gts, res)   # an empty hypothesis scores 0.0
    finally:
        proc = meteor.meteor_p
        if proc.poll() is None:
            proc.stdin.close()
            proc.kill()
            proc.wait()
    return float(score), [float(s) for s in scores]


def _tokenise_both(references, hypotheses, names, use_java: bool | None):
    """(gts, res, tokenizer, use_java, why Java is off): one tokenizer run for both sides
    (each Java run starts a JVM), the hypothesis last in each image's group."""
    auto = use_java is None
    if auto:
        use_java = java_available()
    java_problem = "Java was not found" if auto else "Java was turned off (--no-java)"
    grouped = {k: [*references[k], hypotheses[k]] for k in names}
    try:
        both, tokenizer = tokenize_captions(grouped, use_java)
    except (RuntimeError, OSError) as exc:
        if not auto:
            raise ValueError(f"{exc}; rerun with --no-java to use the Treebank tokenizer") from None
        logger.warning("%s; using the Treebank tokenizer and no METEOR instead", exc)
        use_java, java_problem = False, "the Java tokenizer failed"
        both, tokenizer = tokenize_captions(grouped, use_java)
    gts = {k: v[:-1] for k, v in both.items()}
    res = {k: [v[-1]] for k, v in both.items()}
    return gts, res, tokenizer, use_java, java_problem


def score_captions(references: dict[str, list[str]], hypotheses: dict[str, str], *,
                   use_java: bool | None = None, with_meteor: bool = True) -> Scores:
    """Score one raw hypothesis per image against all its raw references (COCO caption metrics).

    Both sides are PTB-tokenised first (Java; without Java the Treebank fallback, named in the
    result). `use_java=None` detects Java. METEOR needs Java: without it, it is None and
    `meteor_note` says why. Keys of `hypotheses` choose the images; each needs references.
    """
    if not hypotheses:
        raise ValueError("nothing to score: no generated captions")
    names = list(hypotheses)
    _check_references(references, hypotheses)
    gts, res, tokenizer, use_java, java_problem = _tokenise_both(references, hypotheses, names, use_java)
    metrics: dict[str, float | None] = {}
    per: dict[str, dict[str, float | None]] = {}
    bleu, bleu_per = Bleu(4).compute_score(gts, res, verbose=0)
    metrics.update({f"BLEU-{n + 1}": float(bleu[n]) for n in range(4)})
    meteor_note, meteor = None, (None, [None] * len(names))
    if use_java and with_meteor:
        meteor = _meteor(gts, res)
    else:
        meteor_note = f"METEOR unavailable: it needs Java and {java_problem}" if not use_java else "METEOR skipped"
    metrics["METEOR"] = meteor[0]
    rouge, rouge_per = Rouge().compute_score(gts, res)
    metrics["ROUGE-L"] = float(rouge)
    cider, cider_per = Cider().compute_score(gts, res)
    metrics["CIDEr-D"] = float(cider)
    for k, b, m, r, c in zip(names, bleu_per[3], meteor[1], rouge_per, cider_per):
        per[k] = {"BLEU-4": float(b), "METEOR": m, "ROUGE-L": float(r), "CIDEr-D": float(c)}
    return Scores({m: metrics[m] for m in METRICS}, per, tokenizer, meteor_note, gts,
                  {k: v[0] for k, v in res.items()})


def format_table(metrics: dict[str, float | None], intervals: dict | None = None) -> str:
    """The metrics as a text table (raw scores, as pycocoevalcap returns them), with each one's
    95% bootstrap interval when `intervals` ({metric: {"low", "high"}}) is given."""
    width = max(len(m) for m in metrics)
    lines = [f"{'metric':<{width}}  score" + ("   95% interval" if intervals else ""),
             f"{'-' * width}  -----" + ("   ------------" if intervals else "")]
    for m, v in metrics.items():
        line = f"{m:<{width}}  {'n/a' if v is None else f'{v:.4f}'}"
        ci = (intervals or {}).get(m)
        lines.append(line + (f"  [{ci['low']:.4f}, {ci['high']:.4f}]" if ci and v is not None else ""))
    return "\n".join(lines)
