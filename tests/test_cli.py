"""The command line's promises: flags generated from config.py, one-line errors returned as 2,
every flag validated in every mode, the demo preset only where the user gave nothing."""
from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import config
import extract
import helpers_infer as hi
import main
import train
from helpers_infer import one_torch_thread  # noqa: F401  (autouse fixture)

ROOT = Path(__file__).resolve().parent.parent


def run_cli(argv, capsys):
    rc = main.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_help_shows_each_config_default_and_choice(capsys):
    rc, out, _ = run_cli(["--help"], capsys)
    assert rc == 0 and f"--mode {{{','.join(main.MODES)}}}" in out and "export" in main.MODES
    actions = {a.dest: a for a in main.build_parser()._actions}
    for cls in main.CONFIGS:
        for f in dataclasses.fields(cls):
            if f.name in main.NO_FLAG:
                continue
            action = actions.get(f.name)
            assert action is not None, f"{cls.__name__}.{f.name} has no --{f.name} flag"
            shown = re.search(r"\[([^\]]*)\]$", action.help).group(1)
            assert shown == main._shown(f.default), f"--{f.name} shows [{shown}], {cls.__name__} says {f.default!r}"
            assert action.default is main.argparse.SUPPRESS  # unset flags stay unset (demo preset)
    # --encoder takes timm/NAME beside the built-in names, so its help lists them instead of choices.
    assert actions["encoder"].choices is None
    assert all(name in actions["encoder"].help for name in config.BUILTIN_ENCODERS + (config.TIMM_PREFIX,))
    for name, choices in [("optimizer", config.OPTIMIZERS), ("amp", config.AMP_MODES),
                          ("device", config.DEVICES), ("wandb", config.WANDB_MODES)]:
        assert actions[name].choices == choices
        assert f"--{name} {{{','.join(choices)}}}" in out


def test_a_new_config_field_becomes_a_flag(monkeypatch):
    @dataclasses.dataclass(frozen=True)
    class Extra:
        keep_going: bool = False          # carry on after a failure
        epochs: int = 7                   # a name another config has: one flag sets both
        stages: tuple[int, ...] = (1, 2)  # epochs per stage
        scale: float | None = None        # a float that may stay unset

    monkeypatch.setattr(main, "CONFIGS", {**main.CONFIGS, Extra: "extra"})
    args = main.build_parser().parse_args(["--keep_going", "--stages", "3", "4", "5", "--scale", "0.5",
                                             "--epochs", "2"])
    assert main._config(Extra, args) == Extra(True, 2, (3, 4, 5), 0.5)
    assert main._config(config.TrainConfig, args).epochs == 2
    assert main._config(Extra, main.build_parser().parse_args([])) == Extra()
    help_text = main.build_parser().format_help()
    assert "carry on after a failure [off]" in help_text and "[1 2]" in help_text


def test_help_and_bad_flags_answer_without_importing_torch():
    code = ("import sys, main\n"
            "assert main.main(['--help']) == 0\n"
            "assert main.main(['--beam_size', 'abc']) == 2\n"
            "assert 'torch' not in sys.modules, 'main.py imported torch to parse'\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("argv, bad, expected", [
    (["--beam_size", "abc"], "'abc'", "invalid int value"),
    (["--mode", "bogus"], "'bogus'", "'train', 'test', 'eval', 'extract'"),
    (["--encoder", "vgg16"], "'vgg16'", "resnet18, "),
    (["--encoder", "timm/"], "'timm/'", "timm/<model name>"),
    (["--device", "tpu"], "'tpu'", "'auto', 'cpu', 'cuda'"),
    (["--select_by", "loss"], "'loss'", "'cider', 'bleu4'"),
    (["--split_sizes", "10"], "--split_sizes", "expected 2 arguments"),
    (["--no_such_flag"], "--no_such_flag", "unrecognized arguments"),
    (["--beam"], "--beam", "unrecognized arguments"),  # no abbreviations: a later flag cannot break them
])
def test_argparse_errors_are_one_line_and_returned(argv, bad, expected, capsys):
    rc, out, err = run_cli(argv, capsys)  # a SystemExit here fails the test
    line = one_error_line(err)
    assert rc == 2 and out == ""
    assert bad in line and expected in line and line.endswith("; see --help"), line


@pytest.mark.parametrize("argv, message", [
    (["--mode", "train", "--dry_run", "--epochs", "-1"], "--epochs must be at least 1, got -1"),
    (["--mode", "test", "--batch_size", "0", "--image_path", "x.jpg"], "--batch_size must be at least 1, got 0"),
    (["--mode", "eval", "--batch_size", "0"], "--batch_size must be at least 1, got 0"),
    (["--mode", "eval", "--beam_size", "0"], "beam_size must be >= 1, got 0"),
    (["--mode", "test", "--image_path", "x.jpg", "--min_word_freq", "0"], "min_word_freq must be >= 1"),
    (["--mode", "test", "--image_path", "x.jpg", "--dropout", "1.5"], "dropout must be in [0, 1)"),
    (["--mode", "eval", "--embed_dropout", "1"], "embed_dropout must be in [0, 1), got 1.0"),
    (["--mode", "train", "--dry_run", "--feature_dropout", "-0.1"], "feature_dropout must be in [0, 1), got -0.1"),
    (["--mode", "train", "--dry_run", "--label_smoothing", "1"], "--label_smoothing must be in [0, 1), got 1.0"),
    (["--mode", "extract", "--lr_factor", "2"], "--lr_factor must be between 0 and 1"),
    (["--mode", "test"], "--mode test needs --image_path"),
])
def test_every_flag_is_validated_in_every_mode(argv, message, capsys, monkeypatch):
    # Nothing may run: a flag is refused before any mode starts its work.
    for module, name in ((train, "run_training"), (extract, "run_extract")):
        monkeypatch.setattr(module, name, lambda *a, **k: pytest.fail("ran despite a bad flag"))
    rc, out, err = run_cli(argv, capsys)
    assert rc == 2 and out == "" and message in one_error_line(err)


@pytest.fixture()
def captured_training(monkeypatch):
    seen = {}

    def fake_run_training(data_cfg, model_cfg, train_cfg):
        seen.update(data=data_cfg, model=model_cfg, train=train_cfg)
        return 0

    monkeypatch.setattr(train, "run_training", fake_run_training)
    return seen


def test_demo_preset_fills_only_the_flags_not_given(captured_training, capsys):
    # --batch_size 128 equals TrainConfig's default but was typed: it must win over the preset's 40.
    rc, _, err = run_cli(["--mode", "train", "--batch_size", "128",
                          "--beam_size", "2"], capsys)
    assert rc == 0, err
    m, t = captured_training["model"], captured_training["train"]
    assert t.batch_size == 128
    preset = train.DEMO_PRESET
    assert t.batch_size != preset["batch_size"]
    assert (m.encoder, m.decoder_dim, t.epochs, t.lr) == (preset["encoder"], preset["decoder_dim"],
                                                          preset["epochs"], preset["lr"])
    assert captured_training["data"].min_word_freq == preset["min_word_freq"]


def test_no_preset_with_a_data_set(captured_training, capsys, tmp_path):
    rc, _, err = run_cli(["--mode", "train", "--dataset_path", str(tmp_path), "--epochs", "2"], capsys)
    assert rc == 0, err
    defaults = config.TrainConfig()
    assert captured_training["train"] == dataclasses.replace(defaults, epochs=2)
    assert captured_training["model"].encoder == config.ModelConfig(vocab_size=5).encoder


# ---------------------------------------------------------------- --mode eval bad input

@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return hi.tiny_checkpoint(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def kaggle_set(tmp_path_factory):
    return hi.make_kaggle_set(tmp_path_factory.mktemp("cli_kaggle"), n=6)


@pytest.mark.parametrize("extra, message", [
    (["--device", "cuda"], "no CUDA GPU is visible"),
    (["--batch_size", "0"], "--batch_size must be at least 1, got 0"),
    (["--split", "val", "--split_sizes", "6", "0"], "the val split"),
    (["--checkpoint", "missing.pt"], "missing.pt"),
])
def test_eval_bad_input_is_one_line_error(extra, message, ckpt, kaggle_set, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["--mode", "eval", "--dataset_path", str(kaggle_set), "--checkpoint", str(ckpt), "--min_word_freq", "1",
            "--num_workers", "0", "--wandb", "disabled", "--no-java", "--split_sizes", "2", "2", *extra]
    rc, out, err = run_cli(argv, capsys)
    assert rc == 2 and message in one_error_line(err)
    assert not (tmp_path / "graphs").exists()


def test_dry_run_prints_the_data_summary_and_trains_nothing(kaggle_set, capsys, monkeypatch):
    monkeypatch.setattr(train, "run_training", lambda *a, **k: pytest.fail("--dry_run trained"))
    rc, out, err = run_cli(["--mode", "train", "--dry_run", "--dataset_path", str(kaggle_set),
                            "--split_sizes", "4", "1", "--min_word_freq", "1"], capsys)
    assert rc == 0, err
    summary = json.loads(out)
    assert summary["layout"] == "kaggle" and summary["images"] == {"train": 4, "val": 1, "test": 1}


def test_eval_twice_refuses_to_replace_the_first_results_unless_overwrite(ckpt, kaggle_set, tmp_path, capsys,
                                                                          monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["--mode", "eval", "--dataset_path", str(kaggle_set), "--checkpoint", str(ckpt), "--min_word_freq", "1",
            "--num_workers", "0", "--wandb", "disabled", "--no-java", "--split_sizes", "2", "2",
            "--results_dir", str(tmp_path / "results")]
    assert run_cli(argv, capsys)[0] == 0
    first = (tmp_path / "results" / "eval_test.json").read_bytes()
    rc, _, err = run_cli(argv, capsys)
    assert rc == 2 and "--overwrite" in one_error_line(err)
    assert (tmp_path / "results" / "eval_test.json").read_bytes() == first
    assert run_cli([*argv, "--overwrite"], capsys)[0] == 0
