"""Every benchmark in bench/ runs in the suite (`--quick`), so that none rots unseen: each prints
its figures as JSON, and the decoder benchmark's own check (its three teacher-forcing paths
compute the same function) passes. Figures are not asserted: a benchmark measures, a test checks."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from helpers_infer import one_torch_thread  # noqa: F401  (autouse: one thread)

ROOT = Path(__file__).resolve().parents[1]


def run_bench(name: str, argv: list[str], capsys) -> dict:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    try:
        assert module.main(argv) in (0, None)
    finally:
        torch.set_num_threads(threads)
    return json.loads(capsys.readouterr().out)


def test_bench_decoder_quick_checks_its_paths_agree_and_reports(capsys):
    result = run_bench("bench_decoder", ["--quick", "--json", "--threads", "1"], capsys)
    assert result["quick"] and result["beam_same_captions"]
    assert result["train_captions_per_s"] > 0 and result["baseline_train_captions_per_s"] > 0


def test_bench_epoch_quick_trains_and_decodes(capsys):
    result = run_bench("bench_epoch", ["--quick", "--threads", "1"], capsys)
    assert result["timed_steps"] == 3 and result["val_images"] == 4 and result["captions_per_s"] > 0


def test_bench_cider_quick(capsys):
    result = run_bench("bench_cider", ["--quick", "--json"], capsys)
    assert result["candidates"] == 8 * 5 and result["ours_ms"] >= 0


def test_bench_scst_quick_splits_a_step_into_its_parts(capsys):
    result = run_bench("bench_scst", ["--quick", "--threads", "1", "--baseline", "greedy"], capsys)
    assert result["timed_steps"] == 2 and result["images_per_step"] == 4 and result["greedy_ms"] > 0
    parts = sum(result[f"{p}_ms"] for p in ("sample", "words", "reward", "greedy", "rest"))
    assert parts == pytest.approx(result["step_ms"], abs=0.5)


def test_bench_tokenizers_quick(capsys):
    has_old = subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", "4acb0bd^{commit}"],
                             capture_output=True).returncode == 0
    if not has_old:
        pytest.skip("bench_tokenizers compares with commit 4acb0bd, which this checkout's git history lacks")
    result = run_bench("bench_tokenizers", ["--quick", "--json"], capsys)
    assert result["vocabulary"]["train_captions"] == 10 and result["bleu_dev_leave_one_out"]["images"] == 2


def test_gpu_check_says_so_without_a_gpu():
    """bench/gpu_check.sh (run by a person with a GPU) refuses in one line where none is visible."""
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh")], capture_output=True, text=True,
                          env=dict(os.environ, CUDA_VISIBLE_DEVICES=""), cwd=ROOT)
    assert done.returncode == 2 and done.stderr.startswith("error: no CUDA GPU visible")
