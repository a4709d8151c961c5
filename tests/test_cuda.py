"""The GPU path (issue 11, item 8): a training step under each AMP mode, a DataParallel step,
greedy and beam search, and feature extraction, all on CUDA.

conftest.py hides every GPU from the suite, so on a CPU machine this module is skipped with its
reason. On a GPU machine run it with the GPU left visible:

    CAPTIONER_TEST_CUDA=1 .venv/bin/python -m pytest -q tests/test_cuda.py
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import data_utils
import decoding
import devices
import extract
import features
import helpers_infer as hi
import model
import train
from config import DecodeConfig, TrainConfig

CUDA = torch.device("cuda")
pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="no CUDA GPU visible (conftest.py hides GPUs unless CAPTIONER_TEST_CUDA=1 is set)")


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
    losses = run_steps(train.TrainStep(m), m, cfg, amp, steps=15)
    assert losses[-1] < 0.7 * losses[0], losses
    assert all(torch.isfinite(p).all() for p in m.parameters())


def test_data_parallel_step_equals_the_plain_step():
    cfg = hi.tiny_model_config()
    torch.manual_seed(0)
    plain = model.build_model(cfg).to(CUDA)
    wrapped = model.build_model(cfg).to(CUDA)
    wrapped.load_state_dict(plain.state_dict())
    a = run_steps(train.TrainStep(plain), plain, cfg, "off", steps=2)
    b = run_steps(nn.DataParallel(train.TrainStep(wrapped)), wrapped, cfg, "off", steps=2)
    assert b == pytest.approx(a, rel=1e-3)


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
