"""Score a split the way captioning papers do (`--mode eval`).

The metrics are pycocoevalcap's scorers called one by one (BLEU-1..4, METEOR, ROUGE-L,
CIDEr-D) after PTB tokenisation; its all-in-one evaluation is not used because it also runs
SPICE, which downloads Stanford models. Heavy imports happen inside functions so that
`import test_eval` stays cheap (the training loop imports it for validation BLEU).

Never name a function `test_*` here: pytest would collect it.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

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


# ---------------------------------------------------------------- tokenisation

# pycocoevalcap's PTBTokenizer drops these tokens after tokenising. Its Java call lowercases
# first, so the bracket codes come out as "-lrb-" and survive: the fallback keeps that quirk.
_PTB_DROP = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
                       ".", "?", "!", ",", ":", "-", "--", "...", ";"])
JAVA_TOKENIZER = "PTBTokenizer (Stanford CoreNLP 3.4.1, Java), punctuation removed as in pycocoevalcap"
FALLBACK_TOKENIZER = ("python PTB rule (test_eval.ptb_like_tokenize: lowercase, split clitics and "
                      "punctuation as PTB does, drop pycocoevalcap's punctuation list)")


def java_available() -> bool:
    """True when a `java` that starts is on PATH (needed by the PTB tokenizer and METEOR)."""
    import shutil
    import subprocess

    java = shutil.which("java")
    if java is None:
        return False
    try:
        return subprocess.run([java, "-version"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


_LINE_BREAKS = str.maketrans({c: " " for c in "\n\r\x0b\x0c\x85\u2028\u2029"})


def _one_line(text: str) -> str:
    return text.translate(_LINE_BREAKS)


def _java_ptb_lines(lines: list[str]) -> list[str]:
    """Run the Stanford PTB tokenizer jar shipped with pycocoevalcap on lines (one out per in).

    Same jar and options as pycocoevalcap's PTBTokenizer, but fed through stdin: its wrapper
    writes a temporary file into site-packages (fails on a read-only install) and lets the
    jar's progress line through to our stderr.
    """
    import subprocess
    from pathlib import Path

    import pycocoevalcap.tokenizer.ptbtokenizer as ptb

    jar = Path(ptb.__file__).with_name(ptb.STANFORD_CORENLP_3_4_1_JAR)
    # Java also ends lines at \r, U+0085, U+2028 and U+2029: keep one caption per line.
    text = "\n".join(_one_line(line) for line in lines) + "\n"
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
    return [" ".join(w for w in line.split() if w not in _PTB_DROP) for line in out]


# Rewrites the PTB tokenizer applies before splitting on spaces (already lowercased text).
_ABBREVIATIONS = frozenset("mr mrs ms dr st jr sr vs etc inc ltd co mt ft jan feb mar apr jun jul aug "
                           "sep sept oct nov dec".split())
_CLITICS = frozenset(["n't", "'s", "'re", "'ve", "'m", "'ll", "'d"])
_SPLIT_WORDS = {"cannot": "can not", "gonna": "gon na", "gotta": "got ta", "wanna": "wan na",
                "lemme": "lem me", "gimme": "gim me", "dunno": "du n no"}


def _ptb_like_line(text: str) -> list[str]:
    import re

    s = text.lower()
    for a, b in (("\u2014", " -- "), ("\u2013", " -- "), ("\u201c", " `` "), ("\u201d", " '' "),
                 ("\u2018", " ` "), ("\u2019", "'"), ("\u2026", " ... ")):
        s = s.replace(a, b)
    s = re.sub(r'"', " '' ", s)
    s = re.sub(r"(^|\s)-(?=[a-z])", r"\1- ", s)
    for br, code in (("(", "-lrb-"), (")", "-rrb-"), ("[", "-lsb-"), ("]", "-rsb-"),
                     ("{", "-lcb-"), ("}", "-rcb-")):
        s = s.replace(br, f" {code} ")
    # Symbols PTB always splits off; '@', '/', '_' stay inside words.
    s = re.sub(r"([#$%;?&=]|!+|\.\.\.|--)", r" \1 ", s)
    # Commas and colons split unless between digits (1,000 and 3:30 stay whole).
    s = re.sub(r"(?<!\d)([,:])|([,:])(?!\d)", lambda m: f" {m.group(0)} ", s)
    tokens: list[str] = []
    for word in s.split():
        # Clitics: does n't, dog 's, they 're; a leading or lone quote is punctuation.
        m = re.fullmatch(r"(.+?)(n't|'s|'re|'ve|'m|'ll|'d)", word)
        if m and m.group(1) not in ("'", "`"):
            word, clitic = m.group(1), m.group(2)
        else:
            clitic = None
        pieces = [word]
        if word in _CLITICS:
            tokens.append(word)
            continue
        if word.startswith(("'", "`")) and len(word) > 1 and word not in ("''", "``"):
            pieces = [word[0], word[1:]]
        last = pieces[-1]
        if last.endswith(("'", "`")) and len(last) > 1 and last not in ("''", "``"):
            pieces[-1:] = [last[:-1], last[-1]]
        last = pieces[-1]
        # A final period splits off unless the word is an abbreviation (p.m., u.s., mr., u.).
        if (last.endswith(".") and len(last) > 1 and last != "..."
                and "." not in last[:-1] and last[:-1] not in _ABBREVIATIONS
                and not (len(last) == 2 and last[0].isalpha())):
            pieces[-1:] = [last[:-1], "."]
        for piece in pieces:
            tokens.extend(_SPLIT_WORDS.get(piece, piece).split())
        if clitic:
            tokens.append(clitic)
    return tokens


def ptb_like_tokenize(text: str) -> str:
    """Java-less stand-in for pycocoevalcap's PTB tokenisation of one caption.

    Lowercases, splits clitics ("does n't", "dog 's"), brackets ("-lrb-"), quotes and
    punctuation the way Stanford's PTBTokenizer does on caption-like text, then drops the
    same punctuation tokens as pycocoevalcap. Agrees with the Java path on Flickr8k's
    captions (see tests/test_evaluation.py); exotic text (URLs, emoticons) may differ.
    """
    return " ".join(w for w in _ptb_like_line(text) if w not in _PTB_DROP)


def tokenize_captions(captions: dict[str, list[str]], use_java: bool) -> tuple[dict[str, list[str]], str]:
    """PTB-tokenise every caption, keeping the grouping per image; returns (tokenised, method)."""
    keys = list(captions)
    flat = [c for k in keys for c in captions[k]]
    if use_java:
        out, method = _java_ptb_lines(flat), JAVA_TOKENIZER
    else:
        out, method = [ptb_like_tokenize(c) for c in flat], FALLBACK_TOKENIZER
    result: dict[str, list[str]] = {}
    pos = 0
    for k in keys:
        n = len(captions[k])
        result[k] = out[pos:pos + n]
        pos += n
    return result, method


# ---------------------------------------------------------------- metrics

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


@dataclass
class Scores:
    """Corpus metrics (None = unavailable), per-image scores and how they were computed."""
    metrics: dict[str, float | None]
    per_image: dict[str, dict[str, float | None]]   # image -> metric -> score
    tokenizer: str
    meteor_note: str | None = None                  # why METEOR is missing, when it is


class _MeteorProcess:
    """One METEOR JVM for a whole evaluation (starting it costs seconds)."""

    def __init__(self) -> None:
        from pycocoevalcap.meteor.meteor import Meteor

        self._meteor = Meteor()

    def score(self, gts: dict[str, list[str]], res: dict[str, list[str]]) -> tuple[float, list[float]]:
        score, scores = self._meteor.compute_score(gts, res)
        return float(score), [float(s) for s in scores]

    def close(self) -> None:
        proc = self._meteor.meteor_p
        if proc.poll() is None:
            proc.stdin.close()
            proc.kill()
            proc.wait()

    def __enter__(self) -> "_MeteorProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def score_captions(references: dict[str, list[str]], hypotheses: dict[str, str], *,
                   use_java: bool | None = None, with_meteor: bool = True) -> Scores:
    """Score one raw hypothesis per image against all its raw references (COCO caption metrics).

    Both sides are PTB-tokenised first (Java; without Java the fallback rule, named in the
    result). `use_java=None` detects Java. METEOR needs Java: without it, it is None and
    `meteor_note` says why. Keys of `hypotheses` choose the images; each needs references.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    if not hypotheses:
        raise ValueError("nothing to score: no generated captions")
    names = list(hypotheses)
    missing = [k for k in names if not references.get(k)]
    if missing:
        raise ValueError(f"no reference captions for {len(missing)} image(s), e.g. {missing[0]!r}")
    auto = use_java is None
    if auto:
        use_java = java_available()
    java_problem = "Java was not found" if auto else "Java was turned off (--no-java)"
    # One tokenizer run for both sides (each Java run starts a JVM): the hypothesis goes last.
    grouped = {k: [*references[k], hypotheses[k]] for k in names}
    try:
        both, tokenizer = tokenize_captions(grouped, use_java)
    except (RuntimeError, OSError) as exc:
        if not auto:
            raise ValueError(f"{exc}; rerun with --no-java to use the Python tokenisation rule") from None
        logger.warning("%s; using the Python tokenisation rule and no METEOR instead", exc)
        use_java, java_problem = False, "the Java tokenizer failed"
        both, tokenizer = tokenize_captions(grouped, use_java)
    gts = {k: v[:-1] for k, v in both.items()}
    res = {k: [v[-1]] for k, v in both.items()}

    metrics: dict[str, float | None] = {}
    per: dict[str, dict[str, float | None]] = {k: {} for k in names}
    bleu, bleu_per = Bleu(4).compute_score(gts, res, verbose=0)
    for n in range(4):
        metrics[f"BLEU-{n + 1}"] = float(bleu[n])
    for k, s in zip(names, bleu_per[3]):
        per[k]["BLEU-4"] = float(s)

    meteor_note = None
    if use_java and with_meteor:
        with _MeteorProcess() as meteor:  # an empty hypothesis scores 0.0 (checked by hand)
            m, m_per = meteor.score(gts, res)
        metrics["METEOR"] = m
        for k, s in zip(names, m_per):
            per[k]["METEOR"] = s
    else:
        meteor_note = f"METEOR unavailable: it needs Java and {java_problem}" if not use_java else "METEOR skipped"
        metrics["METEOR"] = None
        for k in names:
            per[k]["METEOR"] = None

    rouge, rouge_per = Rouge().compute_score(gts, res)
    metrics["ROUGE-L"] = float(rouge)
    cider, cider_per = Cider().compute_score(gts, res)
    metrics["CIDEr-D"] = float(cider)
    for k, r, c in zip(names, rouge_per, cider_per):
        per[k]["ROUGE-L"] = float(r)
        per[k]["CIDEr-D"] = float(c)
    return Scores({m: metrics[m] for m in METRICS}, per, tokenizer, meteor_note)


# ---------------------------------------------------------------- pictures

def _density(values, grid):
    """Gaussian kernel density of `values` on `grid`; None when degenerate.

    Silverman's robust bandwidth (the smaller of the std and IQR/1.34): per-image caption
    scores pile up at 0 and 1, and the plain std rule smooths those piles away.
    """
    import numpy as np

    v = np.asarray(values, dtype=float)
    if v.size < 2 or float(v.std()) == 0.0:
        return None
    q75, q25 = np.percentile(v, [75, 25])
    spread = min(v.std(ddof=1), (q75 - q25) / 1.34) or v.std(ddof=1)
    bw = 0.9 * spread * v.size ** (-1 / 5)
    z = (grid[:, None] - v[None, :]) / bw  # (G, N)
    return np.exp(-0.5 * z * z).sum(axis=1) / (v.size * bw * math.sqrt(2 * math.pi))


def plot_score_histograms(per_image: dict[str, dict[str, float | None]], path: Path,
                          title: str = "") -> Path:
    """Histograms (density scale) with a kernel density curve of each per-image metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, metric in zip(axes.flat, PER_IMAGE):
        values = [s[metric] for s in per_image.values() if s.get(metric) is not None]
        ax.set_title(metric)
        if not values:
            ax.text(0.5, 0.5, f"{metric} unavailable", ha="center", va="center", transform=ax.transAxes)
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        v = np.asarray(values, dtype=float)
        bins = min(30, max(5, int(math.sqrt(v.size)) + 1))
        ax.hist(v, bins=bins, density=True, color="#9ecae1", edgecolor="#3182bd", label="images")
        # The curve stays within the observed range: scores outside it do not exist.
        grid = np.linspace(float(v.min()), float(v.max()), 200)
        dens = _density(v, grid)
        if dens is not None:
            ax.plot(grid, dens, color="#08519c", lw=2, label="density")
        ax.axvline(v.mean(), color="#de2d26", ls="--", lw=1.5, label=f"mean {v.mean():.3f}")
        ax.set_xlabel(f"per-image {metric}")
        ax.set_ylabel("density")
        ax.legend(fontsize=8)
    fig.suptitle(title or "per-image scores", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_caption_grid(items: list[dict], path: Path, title: str = "", cols: int = 3) -> Path:
    """Grid of images, each with its generated caption and two references underneath.

    `items`: dicts with "image_path" (may be missing on disk: a grey box is drawn), "name",
    "caption", "references" and optionally "score" (per-image CIDEr-D).
    """
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    import data_utils

    n = max(1, len(items))
    cols = min(cols, n)
    rows = math.ceil(n / cols)
    # Each image gets a text panel under it, so captions never run into the next row.
    fig, axes = plt.subplots(2 * rows, cols, figsize=(4.2 * cols, 5.2 * rows), squeeze=False,
                             gridspec_kw={"height_ratios": [3.2, 1.0] * rows})
    for ax in axes.flat:
        ax.axis("off")
    for i, item in enumerate(items):
        ax, text_ax = axes[2 * (i // cols), i % cols], axes[2 * (i // cols) + 1, i % cols]
        img = None
        p = item.get("image_path")
        if p and Path(p).is_file():
            try:
                img = np.asarray(data_utils.load_image(p))
            except (ValueError, OSError):
                img = None
        if img is None:
            ax.imshow(np.full((8, 8, 3), 0.8))
            ax.text(0.5, 0.5, "image file not available", ha="center", va="center",
                    transform=ax.transAxes, fontsize=8)
        else:
            ax.imshow(img)
        head = item["name"] if item.get("score") is None else f"{item['name']}  CIDEr-D {item['score']:.2f}"
        ax.set_title(head, fontsize=8)
        lines = [textwrap.fill("generated: " + (item["caption"] or "(empty)"), 50)]
        for j, ref in enumerate(item["references"][:2], 1):
            lines.append(textwrap.fill(f"ref {j}: {ref}", 50))
        text_ax.text(0.0, 1.0, "\n".join(lines), transform=text_ax.transAxes, va="top", ha="left",
                     fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ---------------------------------------------------------------- the command

def _decode_split(captioner, records, decode_cfg, *, features_dir=None, batch_size=32, num_workers=0):
    """Decode every image of `records` exactly once; returns ({name: caption}, n_skipped, n_decoded)."""
    import torch
    from tqdm import tqdm

    import data_utils
    import decoding

    if features_dir is not None:
        store = data_utils.FeatureStore.open(features_dir)
        dataset = data_utils.ImageDataset(records, features=store)
    else:
        dataset = data_utils.ImageDataset(records, transform=captioner.transform)
    loader = data_utils.make_loader(dataset, batch_size, shuffle=False, num_workers=num_workers,
                                    collate=data_utils.collate_images)
    vocab, model = captioner.vocab, captioner.model
    hypotheses: dict[str, str] = {}
    skipped = decoded = 0
    for batch in tqdm(loader, desc="decoding", unit="batch", leave=False):
        skipped += int(getattr(batch, "n_skipped", 0))
        feats = getattr(batch, "features", None)
        images = getattr(batch, "images", None)
        if images is None and feats is None:
            continue  # every item of this batch was a corrupt image
        with torch.inference_mode():
            if feats is not None:
                feats = feats.to(captioner.device, dtype=torch.float32)  # (B, P, C)
            else:
                feats = model.encode(images.to(captioner.device))  # (B, P, C)
            out = decoding.decode(model, feats, sos_id=vocab.sos_id, eos_id=vocab.eos_id,
                                  unk_id=vocab.unk_id, cfg=decode_cfg)
        idx = [int(i) for i in batch.image_idx]
        assert len(idx) == len(out.tokens)
        for i, ids in zip(idx, out.tokens):
            name = records[i].name
            assert name not in hypotheses, f"image {name} decoded twice"
            hypotheses[name] = " ".join(vocab.decode(ids))
        decoded += len(idx)
    return hypotheses, skipped, decoded


def format_table(metrics: dict[str, float | None]) -> str:
    """The metrics as a two-column text table (raw scores, as pycocoevalcap returns them)."""
    width = max(len(m) for m in metrics)
    lines = [f"{'metric':<{width}}  score", f"{'-' * width}  -----"]
    for m, v in metrics.items():
        lines.append(f"{m:<{width}}  {'n/a' if v is None else f'{v:.4f}'}")
    return "\n".join(lines)


def _grid_items(records, hypotheses, per_image, n: int) -> list[dict]:
    """N images spread evenly over the split (deterministic), with their captions."""
    scored = [r for r in records if r.name in hypotheses]
    if n <= 0 or not scored:
        return []
    step = max(1, len(scored) // n)
    chosen = scored[::step][:n]
    return [{"image_path": str(r.path) if getattr(r, "path", None) else None, "name": r.name,
             "caption": hypotheses[r.name], "references": list(r.captions),
             "score": per_image.get(r.name, {}).get("CIDEr-D")} for r in chosen]


def _write_json(path: Path, obj) -> None:
    import json
    import os

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def run_evaluation(checkpoint_path, data_cfg, decode_cfg, *, split: str = "test",
                   features_dir=None, batch_size: int = 32, num_workers: int | None = None,
                   device: str = "auto", results_dir=None, graphs_dir=Path("graphs"),
                   grid_images: int = 6, use_java: bool | None = None, wandb_mode: str = "disabled",
                   wandb_project: str = "captioner", wandb_entity: str | None = None) -> dict:
    """`--mode eval`: decode every image of `split` once, score it, write results and pictures.

    Writes `eval_<split>.json` (metrics, how they were computed, decoding settings, checkpoint,
    image counts, timings, per-image scores) and `captions_<split>.json` (COCO results format:
    [{"image_id", "caption"}]) in `results_dir` (default: the checkpoint's folder), and
    `eval_<split>_scores.png` / `eval_<split>_grid.png` in `graphs_dir`. Prints the metrics
    table. Returns the summary written to `eval_<split>.json`.
    """
    import dataclasses
    import time

    import data_utils
    import test as captioning

    if split not in ("train", "val", "test"):
        raise ValueError(f"--split {split!r}: expected train, val or test")
    if batch_size < 1:
        raise ValueError(f"--batch_size must be at least 1, got {batch_size}")
    if grid_images < 0:
        raise ValueError(f"--grid_images must be 0 or more, got {grid_images}")
    checkpoint_path = Path(checkpoint_path)
    captioner = captioning.load_captioner(checkpoint_path, device, need_encoder=False)
    if features_dir is None and captioner.transform is None:
        # A features model can only read features: default to the directory it was trained on.
        recorded = (captioner.features or {}).get("path") if isinstance(captioner.features, dict) else None
        if not recorded or not Path(recorded).is_dir():
            raise ValueError(f"checkpoint {checkpoint_path} was trained on precomputed features and has "
                             f"no image encoder: pass --features_dir with this data set's features")
        features_dir = recorded
    if features_dir is not None:
        features_dir = Path(features_dir)
        if not features_dir.is_dir():
            raise FileNotFoundError(f"features directory {features_dir} does not exist")
        store_channels = data_utils.FeatureStore.open(features_dir).channels
        if store_channels != captioner.model_cfg.feature_dim:
            raise ValueError(f"features in {features_dir} have {store_channels} channels but the model "
                             f"of {checkpoint_path} expects {captioner.model_cfg.feature_dim}")

    splits = data_utils.load_dataset(data_cfg)
    records = list(getattr(splits, split))
    if not records:
        raise ValueError(f"the {split} split of {splits.root} is empty: nothing to evaluate")
    logger.info("evaluating %s: %d images of the %s split of %s", checkpoint_path, len(records),
                split, splits.root)

    if num_workers is None:
        num_workers = data_cfg.num_workers
    t0 = time.perf_counter()
    hypotheses, skipped, decoded = _decode_split(captioner, records, decode_cfg, features_dir=features_dir,
                                                 batch_size=batch_size, num_workers=num_workers)
    t_decode = time.perf_counter() - t0
    if not hypotheses:
        raise ValueError(f"no image of the {split} split could be read ({skipped} skipped)")
    references = {r.name: list(r.captions) for r in records if r.name in hypotheses}
    t1 = time.perf_counter()
    scores = score_captions(references, hypotheses, use_java=use_java)
    t_score = time.perf_counter() - t1

    results_dir = Path(results_dir) if results_dir is not None else checkpoint_path.parent
    eval_path = results_dir / f"eval_{split}.json"
    captions_path = results_dir / f"captions_{split}.json"
    summary = {
        "split": split,
        "data": {"root": str(splits.root), "layout": splits.layout,
                 "features_dir": str(features_dir) if features_dir else None,
                 "config": dataclasses.asdict(data_cfg)},
        "checkpoint": str(checkpoint_path),
        "epoch": captioner.epoch,
        "encoder": captioner.model_cfg.encoder,
        "decoding": dataclasses.asdict(decode_cfg),
        "num_images": len(hypotheses),
        "num_skipped": skipped,
        "num_references": sum(len(v) for v in references.values()),
        "metrics": scores.metrics,
        "metric_notes": {m: METRIC_NOTES[m] for m in scores.metrics},
        "tokenizer": scores.tokenizer,
        "meteor_note": scores.meteor_note,
        "timing": {"decode_s": round(t_decode, 3), "score_s": round(t_score, 3),
                   "images_per_s_decode": round(decoded / t_decode, 2) if t_decode > 0 else None,
                   "images_per_s_total": round(decoded / (t_decode + t_score), 2),
                   "device": str(captioner.device)},
        "results_file": str(captions_path),
        "per_image": {k: {"caption": hypotheses[k], **scores.per_image[k]} for k in hypotheses},
    }
    _write_json(captions_path, [{"image_id": k, "caption": v} for k, v in hypotheses.items()])

    label = f"{split} split, {len(hypotheses)} images, beam {decode_cfg.beam_size}"
    graphs_dir = Path(graphs_dir)
    hist_path = plot_score_histograms(scores.per_image, graphs_dir / f"eval_{split}_scores.png",
                                      title=f"per-image scores ({label})")
    grid_path = plot_caption_grid(_grid_items(records, hypotheses, scores.per_image, grid_images),
                                  graphs_dir / f"eval_{split}_grid.png", title=f"generated vs reference ({label})")
    summary["figures"] = {"histograms": str(hist_path), "grid": str(grid_path)}
    _write_json(eval_path, summary)

    print(format_table(scores.metrics))
    print(f"{len(hypotheses)} images ({skipped} skipped), tokenizer: {scores.tokenizer}")
    if scores.meteor_note:
        print(scores.meteor_note)
    print(f"decoding {summary['timing']['images_per_s_decode']} images/s, "
          f"scoring {t_score:.1f} s; wrote {eval_path} and {captions_path}")
    if wandb_mode != "disabled":
        _log_wandb(summary, hist_path, grid_path, wandb_mode, wandb_project, wandb_entity)
    return summary


def _log_wandb(summary: dict, hist_path: Path, grid_path: Path, mode: str, project: str,
               entity: str | None) -> None:
    """Log metrics, the per-image table and both pictures to Weights & Biases.

    Started the way training starts it (`train.start_wandb`: auto = online with credentials,
    else offline; WANDB_MODE=disabled turns it off), and never fails the evaluation.
    """
    import train

    split = summary["split"]
    cfg = train.TrainConfig(wandb=mode, wandb_project=project, wandb_entity=entity)
    run = train.start_wandb(cfg, {"job": f"eval_{split}", "checkpoint": summary["checkpoint"],
                                  "split": split, **summary["decoding"]})
    if run is None:
        return
    import wandb

    try:
        run.log({f"eval_{split}/{m}": v for m, v in summary["metrics"].items() if v is not None})
        cols = ["image", "caption", *PER_IMAGE]
        table = wandb.Table(columns=cols)
        for name, row in summary["per_image"].items():
            table.add_data(name, row["caption"], *(row.get(m) for m in PER_IMAGE))
        run.log({f"eval_{split}/per_image": table,
                 f"eval_{split}/histograms": wandb.Image(str(hist_path)),
                 f"eval_{split}/grid": wandb.Image(str(grid_path))})
    except Exception as exc:  # logging is a side channel: the results are already on disk
        logger.warning("wandb logging failed: %s", str(exc).splitlines()[0][:200] if str(exc) else exc)
    finally:
        run.finish()
