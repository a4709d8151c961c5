"""How much the library tokenizers move the numbers (issue 11, item 4), on the real Flickr8k text.

    python bench/bench_tokenizers.py [--text_dir ../shared/flickr8k-sample/original/Flickr8k_text]
                                     [--old 4acb0bd] [--json]
    python bench/bench_tokenizers.py --quick   # six made-up images: the suite's smoke test

Compares the code of commit `--old` (hand-copied spaCy exception table in data_utils.tokenize,
hand-written PTB rule in test_eval.ptb_like_tokenize) with today's (spaCy's tokenizer in
text.tokenize, nltk's Treebank tokenizer in metrics.treebank_tokenize):
  - the vocabulary: min_word_freq 5 over the official train split's captions, sizes and the words
    that differ, plus how many captions tokenise differently;
  - corpus BLEU of the Java-less fallback: on every dev image the first reference is scored as a
    hypothesis against the other four, tokenised the old way and the new way;
  - the Java PTB path (when Java is installed): the same BLEU, old code against new, and how many
    captions the fallback tokenises differently from Java, old and new.
Reads only the text files (no images); the tests run only `--quick` (it needs the git history).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import metrics  # noqa: E402
import text  # noqa: E402

DEFAULT_TEXT = ROOT.parent / "shared" / "flickr8k-sample" / "original" / "Flickr8k_text"


def old_module(commit: str, path: str, name: str, folder: Path):
    """A module of an old commit, imported from a temporary copy under another name."""
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{commit}:{path}"], check=True,
                            capture_output=True, text=True).stdout
    file = folder / f"{name}.py"
    file.write_text(source)
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module   # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def read_captions(text_dir: Path) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """({image: captions} of Flickr8k.token.txt, {split: image names}) of the official release."""
    captions: dict[str, list[str]] = {}
    for line in (text_dir / "Flickr8k.token.txt").read_text(encoding="utf-8").splitlines():
        if "\t" in line:
            key, caption = line.split("\t", 1)
            captions.setdefault(key.split("#", 1)[0], []).append(caption)
    splits = {s: (text_dir / f"Flickr_8k.{f}Images.txt").read_text().split()
              for s, f in (("train", "train"), ("val", "dev"), ("test", "test"))}
    return captions, splits


def compare_vocabularies(train_captions: list[str], old_tokenize) -> dict:
    old = [old_tokenize(c) for c in train_captions]
    new = [text.tokenize(c) for c in train_captions]
    old_vocab, new_vocab = text.Vocabulary.build(old, 5), text.Vocabulary.build(new, 5)
    differ = [(c, o, n) for c, o, n in zip(train_captions, old, new) if o != n]
    return {"train_captions": len(train_captions), "captions_tokenised_differently": len(differ),
            "examples": [{"caption": c, "old": o, "new": n} for c, o, n in differ[:5]],
            "vocab_old": len(old_vocab), "vocab_new": len(new_vocab),
            "only_old": sorted(set(old_vocab.words) - set(new_vocab.words)),
            "only_new": sorted(set(new_vocab.words) - set(old_vocab.words))}


def leave_one_out(captions: dict[str, list[str]], names: list[str]) -> tuple[dict, dict]:
    """Raw references (captions 2..5) and hypotheses (caption 1) of every image with 5 captions."""
    kept = [n for n in names if len(captions.get(n, [])) >= 5]
    return {n: captions[n][1:] for n in kept}, {n: captions[n][0] for n in kept}


def bleu_of(tokenise, refs: dict, hyps: dict) -> list[float]:
    tok_refs = {k: [tokenise(r) for r in v] for k, v in refs.items()}
    return [round(b, 6) for b in metrics.corpus_bleu(tok_refs, {k: tokenise(h) for k, h in hyps.items()})]


def compare_bleu(refs: dict, hyps: dict, old_eval) -> dict:
    out = {"images": len(hyps),
           "fallback_old": bleu_of(old_eval.ptb_like_tokenize, refs, hyps),
           "fallback_new": bleu_of(metrics.treebank_tokenize, refs, hyps)}
    if metrics.java_available():
        lines = [c for k in hyps for c in (*refs[k], hyps[k])]
        java_new, java_old = metrics.java_ptb_lines(lines), old_eval._java_ptb_lines(lines)
        table = dict(zip(lines, java_new))
        out["java_old_equals_new_tokens"] = java_old == java_new
        out["java"] = bleu_of(table.__getitem__, refs, hyps)
        out["captions"] = len(lines)
        out["fallback_old_differs_from_java"] = sum(old_eval.ptb_like_tokenize(c) != j for c, j in zip(lines, java_new))
        new_diff = [(c, j) for c, j in zip(lines, java_new) if metrics.treebank_tokenize(c) != j]
        out["fallback_new_differs_from_java"] = len(new_diff)
        out["new_differs_examples"] = [{"caption": c, "java": j, "treebank": metrics.treebank_tokenize(c)}
                                       for c, j in new_diff[:5]]
    return out


QUICK_CAPTIONS = ["A dog's ball is red .", "Two kids don't swim , they run !", "A man in a T-shirt jumps.",
                  "The girl (left) smiles", "a black-and-white dog catches a frisbee"]


def write_quick_text(folder: Path) -> Path:
    """A made-up Flickr8k_text of six images (two per split), five captions each."""
    names = [f"im{i}.jpg" for i in range(6)]
    lines = [f"{n}#{k}\t{QUICK_CAPTIONS[(i + k) % 5]}" for i, n in enumerate(names) for k in range(5)]
    (folder / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    for k, split in enumerate(("train", "dev", "test")):
        (folder / f"Flickr_8k.{split}Images.txt").write_text("\n".join(names[2 * k:2 * k + 2]) + "\n")
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text_dir", type=Path, default=DEFAULT_TEXT)
    parser.add_argument("--old", default="4acb0bd", help="commit with the hand-written tokenizers")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--quick", action="store_true", help="made-up captions instead of --text_dir")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        text_dir = write_quick_text(Path(tmp)) if args.quick else args.text_dir
        captions, splits = read_captions(text_dir)
        old_data = old_module(args.old, "data_utils.py", "old_data_utils", Path(tmp))
        old_eval = old_module(args.old, "test_eval.py", "old_test_eval", Path(tmp))
        train = [c for n in splits["train"] for c in captions.get(n, [])]
        result = {"vocabulary": compare_vocabularies(train, old_data.tokenize),
                  "bleu_dev_leave_one_out": compare_bleu(*leave_one_out(captions, splits["val"]), old_eval)}
    print(json.dumps(result, indent=None if args.json else 2, ensure_ascii=False))


if __name__ == "__main__":
    main()
