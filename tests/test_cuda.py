"""The GPU path for real, where a GPU is lent: training steps under each AMP mode, `run_training`
end to end on the demo set with a resume in the middle (and a resume under another precision),
DataParallel under bf16, a two-GPU torchrun/NCCL run, SCST steps, decoding and extraction.

conftest.py hides every GPU from the suite, so on a CPU machine this module is skipped with its
reason (tests/test_cuda_paths.py checks the same paths on fake CUDA tensors there). On a GPU
machine run it with the GPU left visible, or run bench/gpu_check.sh, which also times the decoder:

    CAPTIONER_TEST_CUDA=1 .venv/bin/python -m pytest -q tests/test_cuda.py
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import data_utils
import decoding
import devices
import extract
import features
import helpers_infer as hi
import main as cli
import model
import train
import train_net
from config import DecodeConfig, TrainConfig

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.device("cuda")
pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="no CUDA GPU visible (conftest.py hides GPUs unless CAPTIONER_TEST_CUDA=1 is set)")
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2,
                              reason=f"needs 2 GPUs, {torch.cuda.device_count()} visible")


@pytest.fixture(scope="module")
def trained():
    """The tiny fixture model, trained on the CPU until its words depend on the photo."""
    cfg = hi.tiny_model_config()
    return hi.train_tiny(cfg), cfg


def photo_batch(cfg, kinds=("red", "blue", "red", "blue"), seed: int = 10) -> torch.Tensor:
    tf = model.image_transform(cfg, train=False)
    return torch.stack([tf(hi.photo(kind, seed + i)) for i, kind in enumerate(kinds)])  # (B, 3, H, W)


def caption_batch(cfg) -> data_utils.CaptionBatch:
    """Two photos of each kind with their captions, as the training loader makes them."""
    kinds = ("red", "blue", "red", "blue")
    caps = [hi._encode(hi.KINDS[k][1]) for k in kinds]
    T = max(len(c) for c in caps)
    captions = torch.tensor([c + [0] * (T - len(c)) for c in caps])  # (B, T)
    lengths = torch.tensor([len(c) for c in caps])  # (B,)
    return data_utils.CaptionBatch(images=photo_batch(cfg, kinds), features=None, captions=captions,
                                   lengths=lengths, image_idx=torch.arange(len(kinds)))


def run_steps(net: nn.Module, m: model.CaptionModel, cfg, amp: str, steps: int) -> list[float]:
    """`steps` optimizer steps through train.train_step; the loss of each, read at the end."""
    device = CUDA
    train_cfg = TrainConfig(amp=amp, lr=1e-2, device=device.type)
    amp_dtype = devices.resolve_amp(amp, device)
    optimizer = train.make_optimizer(m, cfg, train_cfg)
    scaler = train.make_scaler(device, amp_dtype)
    batch, losses = caption_batch(cfg), []
    for _ in range(steps):
        sums = train.DeviceSums(device)
        train.train_step(net, batch, optimizer, scaler, device, train_cfg, alpha_c=cfg.alpha_c,
                         amp_dtype=amp_dtype, sums=sums)
        totals = train.EpochTotals()
        assert sums.read(totals) == 0, "a non-finite loss"
        losses.append(totals.loss_sum / totals.captions)
    return losses


@pytest.mark.parametrize("amp", ["off", "bf16", "fp16"])
def test_training_steps_lower_the_loss_under_each_amp_mode(amp):
    cfg = hi.tiny_model_config()
    torch.manual_seed(0)
    m = model.build_model(cfg).to(CUDA)
    losses = run_steps(train.TrainStep(m, devices.resolve_amp(amp, CUDA)), m, cfg, amp, steps=15)
    assert losses[-1] < 0.7 * losses[0], losses
    assert all(torch.isfinite(p).all() for p in m.parameters())


@two_gpus
def test_data_parallel_under_bf16_computes_in_bf16_on_every_gpu_and_learns():
    """Each replica's output projection runs in bf16 (not the fp16 a replica thread defaults to)."""
    cfg = hi.tiny_model_config()
    torch.manual_seed(0)
    m = model.build_model(cfg).to(CUDA)
    net = train.wrap_for_devices(train.TrainStep(m, torch.bfloat16), TrainConfig(multi_gpu=True), CUDA,
                                 devices.Dist())
    assert isinstance(net, train_net.HostDataParallel)
    seen, lock = set(), threading.Lock()

    def hook(module, args, out):
        with lock:
            seen.add((out.device.index, out.dtype))

    handle = m.decoder.fc.register_forward_hook(hook)  # replicate() copies the hook to each replica
    try:
        losses = run_steps(net, m, cfg, "bf16", steps=15)
    finally:
        handle.remove()
    assert seen == {(0, torch.bfloat16), (1, torch.bfloat16)}
    assert losses[-1] < 0.7 * losses[0], losses


def demo_args(out: Path, *extra: str) -> list[str]:
    """--mode train on the demo set (the demo preset), two tiny epochs, on the GPU."""
    return ["--mode", "train", "--device", "cuda", "--demo_dir", str(out.parent / "demo"),
            "--weights_dir", str(out / "weights"), "--graphs_dir", str(out / "graphs"),
            "--batch_size", "40", "--num_workers", "0", *extra]


@pytest.mark.parametrize("amp", ["off", "bf16", "fp16"])
def test_run_training_on_the_demo_set_resumes_under_each_amp_mode(amp, tmp_path, caplog):
    out = tmp_path / amp
    assert cli.main(demo_args(out, "--amp", amp, "--epochs", "1")) == 0
    assert cli.main(demo_args(out, "--amp", amp, "--epochs", "2", "--resume", "auto")) == 0
    history = json.loads((out / "weights" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2] and history[1]["loss"] < history[0]["loss"]
    assert all(h["skipped_nonfinite"] == 0 for h in history)
    if amp != "fp16":  # resumed under fp16: a fresh dynamic scaler, said so
        caplog.set_level("INFO")
        assert cli.main(demo_args(out, "--amp", "fp16", "--epochs", "3", "--resume", "auto")) == 0
        assert "this run with fp16: a fresh gradient scaler" in caplog.text


def test_scst_steps_on_cuda(tmp_path):
    xe = tmp_path / "xe"
    assert cli.main(demo_args(xe, "--epochs", "1")) == 0
    scst = tmp_path / "scst"
    assert cli.main(demo_args(scst, "--objective", "scst", "--init_from", str(xe / "weights" / "best.pt"),
                              "--epochs", "1", "--amp", "bf16")) == 0
    history = json.loads((scst / "weights" / "history.json").read_text())
    assert history[0]["reward"] > 0 and history[0]["skipped_nonfinite"] == 0


@two_gpus
def test_torchrun_over_two_gpus_with_nccl(tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "main.py"), *demo_args(out, "--epochs", "1", "--amp", "bf16")]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, TQDM_DISABLE="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "(nccl)" in done.stderr
    history = json.loads((out / "weights" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1]


@pytest.mark.parametrize("beam_size", [1, 3])
def test_decoding_on_cuda_gives_the_cpu_captions(trained, beam_size):
    m, cfg = trained
    x = photo_batch(cfg)
    dcfg = DecodeConfig(beam_size=beam_size)
    kw = dict(sos_id=1, eos_id=2, unk_id=3, cfg=dcfg)
    on_cpu = decoding.decode(m.cpu(), x, **kw)
    on_gpu = decoding.decode(m.to(CUDA), x.to(CUDA), **kw)
    assert on_gpu.tokens == on_cpu.tokens
    assert on_gpu.scores == pytest.approx(on_cpu.scores, abs=1e-3)
    assert len({tuple(t) for t in on_gpu.tokens}) == 2  # red and blue photos get different captions
    with devices.autocast(CUDA, torch.bfloat16):
        assert decoding.decode(m, x.to(CUDA), **kw).tokens == on_cpu.tokens


def test_feature_extraction_on_cuda_matches_the_cpu_encoder(trained, tmp_path):
    m, cfg = trained
    folder = tmp_path / "photos"
    records = [data_utils.ImageRecord(name=f"{kind}{i}.png", path=hi.make_photo(folder / f"{kind}{i}.png", kind, i),
                                      captions=[], tokens=[]) for i, kind in enumerate(["red", "blue", "red"])]
    unreadable = extract.extract_features(m.to(CUDA), records, cfg, tmp_path / "feats", CUDA,
                                          batch_size=2, num_workers=0, show_progress=False)
    assert unreadable == []
    store = features.FeatureStore.open(tmp_path / "feats")
    tf = model.image_transform(cfg, train=False)
    with torch.inference_mode():
        expected = m.cpu().encode(torch.stack([tf(data_utils.load_image(r.path)) for r in records]))  # (N, P, C)
    got = torch.stack([store.get(r.name) for r in records])  # (N, P, C), stored as float16
    assert torch.allclose(got, expected, rtol=1e-2, atol=1e-2)
