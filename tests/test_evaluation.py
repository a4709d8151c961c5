"""`--mode eval` and metrics.py: hand-computed BLEU, the Java-less fallback, the pictures."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import data_utils
import features
import helpers_infer as hi
from helpers_infer import one_torch_thread  # noqa: F401  (autouse fixture)
import decoding
import main
import metrics
import model
import plots
import test_eval

needs_java = pytest.mark.skipif(not metrics.java_available(), reason="Java is not installed")

# ---------------------------------------------------------------- hand-computed BLEU
#
# Image "cat" (raw text; the PTB step lowercases and drops the final period):
#   refs  r1 "a cat sits on the mat"      (6 tokens)
#         r2 "there is a cat on the mat"  (7 tokens)
#   hyp   "the cat the cat on the mat"    (7 tokens)
#   1-grams: the x3 (max in one ref 1 -> clipped 1), cat x2 (-> 1), on 1, mat 1      -> 4 / 7
#   2-grams: the cat x2 (0), cat the (0), cat on (r2: 1), on the (1), the mat (1)    -> 3 / 6
#   3-grams: the cat the, cat the cat, the cat on (0); cat on the (r2), on the mat   -> 2 / 5
#   4-grams: the cat the cat, cat the cat on, the cat on the (0); cat on the mat (r2) -> 1 / 4
#   closest reference length to 7 is 7 -> no brevity penalty.
#   BLEU-1 = 4/7, BLEU-2 = (4/7 * 3/6)^(1/2), BLEU-3 = (4/7 * 3/6 * 2/5)^(1/3),
#   BLEU-4 = (4/7 * 3/6 * 2/5 * 1/4)^(1/4) = (1/35)^(1/4)
CAT_REFS = ["A cat sits on the mat.", "There is a cat on the mat."]
CAT_HYP = "The cat the cat on the mat."
CAT_BLEU = [4 / 7, (4 / 7 * 3 / 6) ** (1 / 2), (4 / 7 * 3 / 6 * 2 / 5) ** (1 / 3),
            (4 / 7 * 3 / 6 * 2 / 5 * 1 / 4) ** (1 / 4)]
#
# Adding image "dogs": refs "Two dogs play." (3 tokens), "Dogs are playing in the park!" (6)
#   hyp "Dogs play." -> "dogs play" (2 tokens): 1-grams 2/2, 2-grams "dogs play" 1/1,
#   no 3- or 4-grams (0 guesses); closest reference length to 2 is 3.
# Corpus BLEU pools the counts of both images (it is not a mean of per-image BLEU):
#   correct 4+2, 3+1, 2+0, 1+0 = 6, 4, 2, 1 ; guesses 7+2, 6+1, 5+0, 4+0 = 9, 7, 5, 4
#   hypothesis length 7+2 = 9, reference length 7+3 = 10 -> BP = exp(1 - 10/9) = exp(-1/9)
DOG_REFS = ["Two dogs play.", "Dogs are playing in the park!"]
DOG_HYP = "Dogs play."
BP = math.exp(1 - 10 / 9)
BOTH_BLEU = [6 / 9 * BP, (6 / 9 * 4 / 7) ** (1 / 2) * BP, (6 / 9 * 4 / 7 * 2 / 5) ** (1 / 3) * BP,
             (6 / 9 * 4 / 7 * 2 / 5 * 1 / 4) ** (1 / 4) * BP]


def test_hand_computed_bleu_one_image():
    scores = metrics.score_captions({"cat": CAT_REFS}, {"cat": CAT_HYP}, use_java=False)
    assert [scores.metrics[f"BLEU-{n}"] for n in range(1, 5)] == pytest.approx(CAT_BLEU, rel=1e-6)
    assert scores.metrics["METEOR"] is None and "Java" in scores.meteor_note
    assert "Treebank" in scores.tokenizer


def test_hand_computed_bleu_pools_counts_over_images_and_groups_references_per_image():
    refs = {"cat": CAT_REFS, "dogs": DOG_REFS}
    hyps = {"dogs": DOG_HYP, "cat": CAT_HYP}  # order of the keys must not matter
    got = metrics.score_captions(refs, hyps, use_java=False).metrics
    assert [got[f"BLEU-{n}"] for n in range(1, 5)] == pytest.approx(BOTH_BLEU, rel=1e-6)
    # Same numbers from the validation helper on already tokenised text.
    tokenised_refs = {"cat": ["a cat sits on the mat", "there is a cat on the mat"],
                      "dogs": ["two dogs play", "dogs are playing in the park"]}
    assert metrics.corpus_bleu(tokenised_refs, {"cat": "the cat the cat on the mat", "dogs": "dogs play"}) \
        == pytest.approx(BOTH_BLEU, rel=1e-6)
    # Swapping the reference groups must change the score: references are matched per image.
    swapped = metrics.score_captions({"cat": DOG_REFS, "dogs": CAT_REFS}, hyps, use_java=False).metrics
    assert swapped["BLEU-1"] < 0.5 * got["BLEU-1"]


def test_without_java_the_fallback_is_named_and_meteor_reported_unavailable(monkeypatch):
    monkeypatch.setattr(metrics, "java_available", lambda: False)
    scores = metrics.score_captions({"cat": CAT_REFS}, {"cat": CAT_HYP})  # auto-detect
    assert scores.tokenizer == metrics.FALLBACK_TOKENIZER
    assert scores.metrics["METEOR"] is None and scores.meteor_note.endswith("Java was not found")
    assert all(s["METEOR"] is None for s in scores.per_image.values())
    assert scores.metrics["BLEU-4"] == pytest.approx(CAT_BLEU[3], rel=1e-6)


def test_scoring_refuses_images_without_references():
    with pytest.raises(ValueError, match="no reference captions"):
        metrics.score_captions({"cat": CAT_REFS}, {"cat": CAT_HYP, "dogs": DOG_HYP}, use_java=False)
    with pytest.raises(ValueError, match="no generated captions"):
        metrics.score_captions({"cat": CAT_REFS}, {}, use_java=False)


# Caption-like text with the punctuation, clitics and case PTB tokenisation has to handle.
MIXED_REFS = {
    "a": ["A dog's ball (red) is on the grass.", "The dog doesn't want to let go of its toy!"],
    "b": ["Two men, one in a t-shirt, play soccer at 3:30 p.m.", "Men playing \"soccer\" on a field ..."],
    "c": ["A girl in a pink dress; she's climbing stairs.", "A little girl climbing into a wooden playhouse."],
}
MIXED_HYPS = {"a": "A dog's red ball on the grass.", "b": "Two men play soccer on a field.",
              "c": "A little girl in a pink dress is climbing stairs."}


@needs_java
def test_fallback_tokenisation_agrees_with_the_java_path():
    java = metrics.score_captions(MIXED_REFS, MIXED_HYPS, use_java=True)
    python = metrics.score_captions(MIXED_REFS, MIXED_HYPS, use_java=False)
    for n in range(1, 5):
        assert abs(java.metrics[f"BLEU-{n}"] - python.metrics[f"BLEU-{n}"]) < 1e-3
    assert java.metrics["ROUGE-L"] == pytest.approx(python.metrics["ROUGE-L"], abs=1e-3)
    assert java.tokenizer != python.tokenizer  # the output names which rule ran
    # METEOR ran in one Java process and gave a score per image.
    assert 0.0 < java.metrics["METEOR"] <= 1.0
    assert all(0.0 <= s["METEOR"] <= 1.0 for s in java.per_image.values())
    assert python.metrics["METEOR"] is None


@needs_java
def test_java_and_fallback_tokenise_captions_identically_but_a_final_abbreviation():
    lines = [c for caps in MIXED_REFS.values() for c in caps] + list(MIXED_HYPS.values())
    java = metrics.java_ptb_lines(lines)
    fallback = [metrics.treebank_tokenize(c) for c in lines]
    differ = [(j, f) for j, f in zip(java, fallback) if j != f]
    # Treebank splits only the final period, so a closing "p.m." loses its dot (documented).
    assert differ == [("two men one in a t-shirt play soccer at 3:30 p.m.",
                       "two men one in a t-shirt play soccer at 3:30 p.m")]


def test_fallback_tokenizer_splits_clitics_brackets_and_quotes_like_ptb():
    assert metrics.treebank_tokenize("The dog doesn't fetch (a red ball), \"he\" said; it's 3:30!") \
        == "the dog does n't fetch -lrb- a red ball -rrb- he said it 's 3:30"
    assert metrics.treebank_tokenize("A man cannot\nswim ...") == "a man can not swim"


# ---------------------------------------------------------------- --mode eval end to end

@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    return hi.make_kaggle_set(tmp_path_factory.mktemp("kaggle"))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return hi.tiny_checkpoint(tmp_path_factory.getbasetemp())


def data_cfg(root):
    return data_utils.DataConfig(dataset_path=str(root), split_sizes=(4, 2), min_word_freq=1, num_workers=0)


def test_eval_writes_results_and_pictures_and_decodes_each_image_once(tiny_set, ckpt, tmp_path, monkeypatch,
                                                                         capsys):
    test_names = sorted(r.name for r in data_utils.load_dataset(data_cfg(tiny_set)).test)
    assert len(test_names) == 4
    decoded, threads = [], []
    real_decode = decoding.decode

    def counting_decode(m, feats, **kw):
        decoded.append(feats.shape[0])
        threads.append(torch.get_num_threads())
        return real_decode(m, feats, **kw)

    monkeypatch.setattr(decoding, "decode", counting_decode)
    monkeypatch.chdir(tmp_path)
    results = tmp_path / "results"
    rc = main.main(["--mode", "eval", "--dataset_path", str(tiny_set), "--checkpoint", str(ckpt),
                    "--results_dir", str(results), "--no-java", "--beam_size", "2", "--grid_images", "3",
                    "--batch_size", "3", "--split_sizes", "4", "2", "--threads", "2"])
    torch.set_num_threads(1)  # as the module's autouse fixture set it, for the tests after this one
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert decoded == [3, 1]  # 4 test images, batched by 3, each decoded once
    assert threads == [2, 2]  # --threads is honoured

    summary = json.loads((results / "eval_test.json").read_text())
    assert summary["num_images"] == 4 and summary["split"] == "test"
    assert summary["decoding"]["beam_size"] == 2 and summary["checkpoint"] == str(ckpt)
    assert set(summary["metrics"]) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D"}
    assert summary["metrics"]["METEOR"] is None and "Treebank" in summary["tokenizer"]
    assert sorted(summary["per_image"]) == test_names

    captions = json.loads((results / "captions_test.json").read_text())
    assert sorted(c["image_id"] for c in captions) == test_names  # COCO results format, one per image
    assert all(set(c) == {"image_id", "caption"} for c in captions)
    # The printed table holds the same numbers as the JSON.
    assert f"{summary['metrics']['BLEU-4']:.4f}" in out and "METEOR" in out and "n/a" in out
    for picture in ("eval_test_scores.png", "eval_test_grid.png"):  # beside the results, with the run
        assert (results / "graphs" / picture).stat().st_size > 10_000


def test_eval_on_a_features_directory_and_the_folder_training_recorded(tmp_path, tmp_path_factory, monkeypatch):
    # The checkpoint comes from a real (tiny) training run on features: what it records is what
    # --mode eval falls back on.
    ckpt, root, feats_dir = hi.features_run(tmp_path_factory.getbasetemp())
    cfg = data_cfg(root)
    monkeypatch.chdir(tmp_path)
    run = dict(split="val", use_java=False, grid_images=2, device="cpu", resamples=50, with_report=False)
    summary = test_eval.run_evaluation(ckpt, cfg, model.DecodeConfig(beam_size=2), features_dir=feats_dir,
                                       results_dir=tmp_path / "given", **run)
    assert summary["num_images"] == 2 and summary["encoder"] == "features"
    assert summary["data"]["features_dir"] == str(feats_dir)
    assert (tmp_path / "given" / "eval_val.json").is_file() and (tmp_path / "given" / "graphs" / "eval_val_grid.png").is_file()
    # Without --features_dir: the folder the checkpoint was trained on, the same captions.
    fallback = test_eval.run_evaluation(ckpt, cfg, model.DecodeConfig(beam_size=2), results_dir=tmp_path / "recorded",
                                        overwrite=True, **run)
    assert fallback["data"]["features_dir"] == str(feats_dir)
    assert {k: v["caption"] for k, v in fallback["per_image"].items()} == \
        {k: v["caption"] for k, v in summary["per_image"].items()}
    # With the recorded folder gone, the error names it and says what to pass.
    moved = feats_dir.with_name(feats_dir.name + "_moved")
    feats_dir.rename(moved)
    try:
        with pytest.raises(ValueError, match=f"{feats_dir}.* pass --features_dir"):
            test_eval.run_evaluation(ckpt, cfg, model.DecodeConfig(), results_dir=tmp_path / "gone",
                                     overwrite=True, **run)
    finally:
        moved.rename(feats_dir)


def _never_decodes(*args, **kwargs):
    pytest.fail("the split was decoded before the outputs were checked")


def test_an_earlier_evaluation_is_refused_before_decoding_and_replaced_with_overwrite(tiny_set, ckpt, tmp_path,
                                                                                    monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg, results, graphs = data_cfg(tiny_set), tmp_path / "results", tmp_path / "graphs"
    run = dict(split="test", results_dir=results, graphs_dir=graphs, use_java=False, device="cpu", grid_images=2)
    test_eval.run_evaluation(ckpt, cfg, model.DecodeConfig(beam_size=2), **run)
    files = [results / "eval_test.json", results / "captions_test.json", graphs / "eval_test_scores.png",
             graphs / "eval_test_grid.png"]
    before = {p: p.read_bytes() for p in files}
    monkeypatch.setattr(decoding, "caption_loader", _never_decodes)
    with pytest.raises(ValueError) as info:
        test_eval.run_evaluation(ckpt, cfg, model.DecodeConfig(beam_size=1), **run)
    assert str(info.value) == (f"{files[0]} holds an earlier evaluation of the test split; pass --overwrite to "
                               "replace it, or --results_dir NEW / --graphs_dir NEW to keep it")
    # A new results folder is not enough: the pictures of the split would still be replaced.
    with pytest.raises(ValueError, match=f"^{files[2]} holds an earlier evaluation .* or --graphs_dir NEW to keep"):
        test_eval.run_evaluation(ckpt, cfg, model.DecodeConfig(beam_size=1), **{**run, "results_dir": tmp_path / "r2"})
    assert {p: p.read_bytes() for p in files} == before and not (tmp_path / "r2").exists()
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    summary = test_eval.run_evaluation(ckpt, cfg, model.DecodeConfig(beam_size=1), overwrite=True, **run)
    assert json.loads(files[0].read_text())["decoding"]["beam_size"] == summary["decoding"]["beam_size"] == 1


@pytest.mark.parametrize("flag", ["--results_dir", "--graphs_dir"])
def test_a_file_given_as_an_output_folder_is_refused_before_decoding(flag, tiny_set, ckpt, tmp_path, monkeypatch,
                                                                     capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes").write_text("a file, not a folder")
    monkeypatch.setattr(decoding, "caption_loader", _never_decodes)
    rc = main.main(["--mode", "eval", "--dataset_path", str(tiny_set), "--checkpoint", str(ckpt), "--no-java",
                    "--split_sizes", "4", "2", "--min_word_freq", "1", "--num_workers", "0",
                    "--results_dir", str(tmp_path / "results"), flag, "notes"])
    err = capsys.readouterr().err
    assert rc == 2 and err == f"error: {flag} notes: notes is a file, expected a folder\n"


def test_histograms_keep_per_image_scores_and_draw_density_curves(tmp_path):
    rng = np.random.default_rng(0)
    per = {str(i): {"BLEU-4": float(rng.random()), "METEOR": None, "ROUGE-L": float(rng.random()),
                    "CIDEr-D": float(rng.exponential())} for i in range(50)}
    path = plots.save_figure(plots.score_histograms(per, metrics.PER_IMAGE), tmp_path / "h.png")
    assert path.stat().st_size > 10_000
    grid = np.linspace(-1, 2, 3001)
    dens = plots.score_density([s["ROUGE-L"] for s in per.values()], grid)
    assert dens.sum() * (grid[1] - grid[0]) == pytest.approx(1.0, abs=0.02)  # a density integrates to 1
    assert plots.score_density([0.5, 0.5], grid) is None


def test_wandb_gets_the_metrics_table_and_pictures(tmp_path, monkeypatch):
    import sys
    import types

    import run_logging

    logged, finished = [], []
    run = types.SimpleNamespace(log=logged.append, finish=lambda: finished.append(True))
    monkeypatch.setattr(run_logging, "start_wandb", lambda mode, config, **kw: run)

    class Table:
        def __init__(self, columns):
            self.columns, self.rows = columns, []

        def add_data(self, *row):
            self.rows.append(row)

    fake = types.SimpleNamespace(Table=Table, Image=lambda path: ("image", path))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    summary = {"split": "test", "checkpoint": "c.pt", "decoding": {"beam_size": 3},
               "metrics": {"BLEU-4": 0.25, "METEOR": None, "CIDEr-D": 0.5},
               "per_image": {"x.jpg": {"caption": "a dog", "BLEU-4": 0.1, "METEOR": None, "ROUGE-L": 0.3,
                                       "CIDEr-D": 0.2}},
               "figures": {"histograms": str(tmp_path / "h.png"), "grid": str(tmp_path / "g.png")}}
    test_eval._log_wandb(summary, "offline", "p", None)
    assert logged[0] == {"eval_test/BLEU-4": 0.25, "eval_test/CIDEr-D": 0.5}  # unavailable METEOR left out
    table = logged[1]["eval_test/per_image"]
    assert table.rows == [("x.jpg", "a dog", 0.1, None, 0.3, 0.2)]
    assert logged[1]["eval_test/grid"] == ("image", str(tmp_path / "g.png")) and finished == [True]


# ---------------------------------------------------------------- intervals, diagnostics, --compare

def _eval_argv(tiny_set, ckpt, results, *extra):
    return ["--mode", "eval", "--dataset_path", str(tiny_set), "--checkpoint", str(ckpt), "--results_dir",
            str(results), "--no-java", "--split_sizes", "4", "2", "--min_word_freq", "1", "--num_workers", "0",
            "--grid_images", "2", "--threads", "1", *extra]


def test_eval_reports_intervals_and_diagnostics_and_compares_with_a_checkpoint(tiny_set, ckpt, tmp_path,
                                                                                 tmp_path_factory, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    weak = hi.weak_checkpoint(tmp_path_factory.getbasetemp())
    rc = main.main(_eval_argv(tiny_set, ckpt, tmp_path / "r", "--compare", str(weak), "--bootstrap", "300"))
    out, err = capsys.readouterr()
    assert rc == 0, err
    summary = json.loads((tmp_path / "r" / "eval_test.json").read_text())
    for m, v in summary["metrics"].items():
        ci = summary["intervals"][m]
        assert (ci is None) == (v is None) and (ci is None or ci["low"] <= v + 1e-12 and v - 1e-12 <= ci["high"]), m
    assert summary["bootstrap"]["resamples"] == 300 and "document frequencies" in summary["bootstrap"]["method"]
    diag = summary["diagnostics"]
    assert diag["vocabulary_size"] == len(hi.WORDS) and 0 < diag["vocabulary_used"] <= len(hi.WORDS)
    assert set(diag) == set(summary["diagnostic_notes"])
    cmp = summary["compare"]
    assert cmp["kind"] == "checkpoint" and cmp["num_images"] == 4 and cmp["other"] == str(weak)
    for m, d in cmp["difference"].items():
        if d is None:
            continue
        assert d["a"] == pytest.approx(summary["metrics"][m], abs=1e-9)
        assert d["b"] == pytest.approx(cmp["metrics"][m], abs=1e-9)
        assert d["diff"] == pytest.approx(d["b"] - d["a"]) and 0.0 <= d["b_better"] <= 1.0
    cider = cmp["difference"]["CIDEr-D"]
    assert "B better in" in out and f"{cider['diff']:+.4f} [{cider['low']:+.4f}, {cider['high']:+.4f}]" in out
    assert "copied from training" in out and "95% interval" in out
    assert (tmp_path / "r" / "eval_test.html").stat().st_size > 10_000


def test_compare_with_its_own_captions_file_finds_no_difference(tiny_set, ckpt, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main.main(_eval_argv(tiny_set, ckpt, tmp_path / "a", "--bootstrap", "0", "--no-report")) == 0
    first = json.loads((tmp_path / "a" / "eval_test.json").read_text())
    assert first["intervals"] is None and first["bootstrap"] is None
    assert not (tmp_path / "a" / "eval_test.html").exists() and first["timing"]["report_s"] == 0.0
    captions = tmp_path / "a" / "captions_test.json"
    rc = main.main(_eval_argv(tiny_set, ckpt, tmp_path / "b", "--compare", str(captions), "--bootstrap", "100",
                              "--graphs_dir", "g2"))
    assert rc == 0, capsys.readouterr().err
    cmp = json.loads((tmp_path / "b" / "eval_test.json").read_text())["compare"]
    assert cmp["kind"] == "captions" and cmp["diagnostics"]["vocabulary_size"] is None
    for m, d in cmp["difference"].items():
        assert d is None or (d["diff"] == d["low"] == d["high"] == 0.0 and d["b_better"] == 0.0), m


def test_compare_refuses_captions_of_another_split_and_a_missing_file(tiny_set, ckpt, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    other = tmp_path / "other.json"
    other.write_text(json.dumps([{"image_id": "elsewhere.jpg", "caption": "a red square"}]))
    rc = main.main(_eval_argv(tiny_set, ckpt, tmp_path / "r", "--compare", str(other)))
    assert rc == 2 and "outside this split, e.g. 'elsewhere.jpg'" in capsys.readouterr().err
    rc = main.main(_eval_argv(tiny_set, ckpt, tmp_path / "r2", "--compare", str(tmp_path / "nope.pt")))
    assert rc == 2 and capsys.readouterr().err == (f"error: --compare {tmp_path / 'nope.pt'} does not exist: "
                                                   "expected a checkpoint or a captions_<split>.json\n")
    other.write_text('{"not": "a list"}')
    rc = main.main(_eval_argv(tiny_set, ckpt, tmp_path / "r3", "--compare", str(other)))
    assert rc == 2 and "expected a list of" in capsys.readouterr().err
