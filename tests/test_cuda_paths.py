"""The CUDA path on every CPU (issue 20): the training step, DataParallel replicas and decoding on
fake CUDA tensors (tests/fakecuda.py), the host-device syncs of a step counted, resuming across
--amp modes, --amp auto's choice, and a DDP rank whose batch was all unreadable images.

On fake CUDA every op runs under CUDA's dispatch keys (CUDA's autocast lists, a device mismatch
raises as on a GPU), but nothing is computed: what is checked is devices, dtypes and the ops that
would make the host wait. tests/test_cuda.py runs the real thing where a GPU is lent.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

import cpu_recurrence
import data_utils
import decoding
import devices
import fakecuda as fc
import model as model_lib
import train
import train_net
from config import DecodeConfig, ModelConfig, TrainConfig
from devices import Dist
from text import Vocabulary
from helpers_infer import one_torch_thread  # noqa: F401  (autouse: one thread, tiny models)
from train_sums import DeviceSums

ROOT = Path(__file__).resolve().parents[1]
CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)
AMP = {"bf16": torch.bfloat16, "fp16": torch.float16}
V = 12  # vocabulary: 0 pad, 1 <sos>, 2 <eos>, 3 <unk>, 4.. words


def tiny_config(inputs: str) -> ModelConfig:
    """A tiny model reading features, or images end to end (the small CNN, fine-tuned)."""
    kw = dict(vocab_size=V, pretrained=False, encoded_size=2, encoder_proj_dim=16, embed_dim=16,
              attention_dim=16, decoder_dim=32)
    if inputs == "features":
        return ModelConfig(encoder="features", feature_dim=8, image_size=None, **kw)
    return ModelConfig(encoder="small_cnn", image_size=32, fine_tune_encoder=True, **kw)


def caption_batch(cfg: ModelConfig, B: int = 6) -> data_utils.CaptionBatch:
    """B captions of different lengths, two per image, as collate_captions makes them."""
    g = torch.Generator().manual_seed(0)
    image_idx = torch.arange(B) // 2  # (B,)
    shape = (B // 2, 4, cfg.feature_dim) if cfg.encoder == "features" else (B // 2, 3, 32, 32)
    inputs = torch.randn(*shape, generator=g)[image_idx]
    caps = [[1] + [4 + (b + i) % (V - 4) for i in range(2 + (b * 5) % 6)] + [2] for b in range(B)]
    T = max(map(len, caps))
    captions = torch.tensor([c + [0] * (T - len(c)) for c in caps])  # (B, T)
    lengths = torch.tensor([len(c) for c in caps])  # (B,)
    features = inputs.dim() == 3
    return data_utils.CaptionBatch(None if features else inputs, inputs if features else None,
                                   captions, lengths, image_idx)


@pytest.fixture
def cuda_path(monkeypatch):
    """The CPU takes the same code as a GPU: no hand-written CPU recurrence."""
    monkeypatch.setattr(cpu_recurrence, "supports", lambda *a, **k: False)


def one_step(cfg: ModelConfig, batch, device: torch.device, amp: str, fake=None, seen=None):
    """One train.train_step as run_training makes it: fused AdamW, the scaler, device sums."""
    torch.manual_seed(0)
    model = fc.real(model_lib.build_model, cfg)
    if fake is not None:
        fc.to_fake(model, fake)
    amp_dtype = AMP.get(amp)
    tcfg = TrainConfig(amp=amp, lr=1e-2, device=device.type)
    optimizer = train.make_optimizer(model, cfg, tcfg)
    scaler = train.make_scaler(device, amp_dtype)
    real_loss = model_lib.caption_loss

    def spy(logits, *args, **kwargs):
        loss, ce = real_loss(logits, *args, **kwargs)
        if seen is not None:
            seen.update(logits=logits.dtype, loss=loss.dtype, ce=ce.dtype)
        return loss, ce

    backward = fc.fake_backward(list(model.parameters())) if fake is not None else contextlib.nullcontext()
    with pytest.MonkeyPatch.context() as mp, backward:
        mp.setattr(model_lib, "caption_loss", spy)
        train.train_step(train.TrainStep(model, amp_dtype), batch, optimizer, scaler, device, tcfg,
                         amp_dtype=amp_dtype, sums=DeviceSums(device))
    return optimizer


def sync_points(record: fc.Syncs, replay: fc.Replay) -> list[str]:
    """The places a step on CUDA would wait for the device: syncs on cuda tensors (a .tolist()
    of n values is one), the backward's (counted on the CPU run), blocking uploads."""
    points, last = [], None
    for kind, where, device in replay.seen:
        if device != "cpu" and not (kind.startswith("scalar") and (kind, where) == last):
            points.append(f"{where} {kind}")
        last = (kind, where)
    points += [f"{e['where']} {e['kind']} (backward)" for e in record.log if e["backward"]]
    return points + [f"{where} blocking host-to-device copy" for where in replay.blocking_copies]


@pytest.mark.parametrize("inputs", ["features", "images"])
def test_a_training_step_on_fake_cuda_never_waits_for_the_device(inputs, monkeypatch, cuda_path):
    """Zero host-device syncs in the step (the issue counted 6 with features, 7 end to end):
    the CPU run notes every sync op, the fake-CUDA run replays them and says which touch cuda."""
    cfg, batch = tiny_config(inputs), caption_batch(tiny_config(inputs))
    record = fc.record(lambda: one_step(cfg, batch, CPU, "off"))
    fc.pretend_cuda(monkeypatch)
    with fc.replaying(record) as (fake, replay):
        one_step(cfg, batch, CUDA, "bf16", fake)
    assert sync_points(record, replay) == []


@pytest.mark.parametrize("inputs", ["features", "images"])
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_a_training_step_on_fake_cuda_keeps_devices_and_cuda_autocast_dtypes(inputs, amp, monkeypatch, cuda_path):
    cfg, batch = tiny_config(inputs), caption_batch(tiny_config(inputs))
    record = fc.record(lambda: one_step(cfg, batch, CPU, "off"))
    fc.pretend_cuda(monkeypatch)
    seen = {}
    with fc.replaying(record) as (fake, _):  # a cpu tensor meeting a cuda one would raise here
        optimizer = one_step(cfg, batch, CUDA, amp, fake, seen)
    assert seen == {"logits": AMP[amp], "loss": torch.float32, "ce": torch.float32}
    for state in optimizer.state.values():  # the fused AdamW keeps its state on the device, in fp32
        assert {k: (v.device, v.dtype) for k, v in state.items()} == dict.fromkeys(
            ("step", "exp_avg", "exp_avg_sq"), (CUDA, torch.float32))


def test_a_cpu_tensor_in_the_loss_is_caught_on_fake_cuda(monkeypatch, cuda_path):
    """The check can fail: a factory without device= (a typo's arange) raises on fake CUDA."""
    cfg, batch = tiny_config("features"), caption_batch(tiny_config("features"))
    real_loss = model_lib.caption_loss

    def careless_loss(logits, captions, lengths, alphas, *args, **kwargs):
        offset = torch.zeros(logits.size(1))  # (T-1,) on the CPU, whatever the logits' device
        return real_loss(logits + offset[None, :, None], captions, lengths, alphas, *args, **kwargs)

    monkeypatch.setattr(model_lib, "caption_loss", careless_loss)
    record = fc.record(lambda: one_step(cfg, batch, CPU, "off"))
    fc.pretend_cuda(monkeypatch)
    with pytest.raises(Exception, match="cpu|device"), fc.replaying(record) as (fake, _):
        one_step(cfg, batch, CUDA, "bf16", fake)


def test_a_new_sync_in_the_step_is_counted(monkeypatch, cuda_path):
    """The budget is counted, not assumed: an .item() added to the loss shows up by its line."""
    cfg, batch = tiny_config("features"), caption_batch(tiny_config("features"))
    real_objective = train.cross_entropy_objective

    def chatty(*args, **kwargs):
        loss, stats = real_objective(*args, **kwargs)
        print(f"loss {loss.item():.3f}")
        return loss, stats

    monkeypatch.setattr(train, "cross_entropy_objective", chatty)
    record = fc.record(lambda: one_step(cfg, batch, CPU, "off"))
    fc.pretend_cuda(monkeypatch)
    with fc.replaying(record) as (fake, replay):
        one_step(cfg, batch, CUDA, "bf16", fake)
    assert len(sync_points(record, replay)) == 1


# ---------------------------------------------------------------- DataParallel

@pytest.fixture
def two_fake_gpus(monkeypatch, cuda_path):
    """torch's own DataParallel scatter and parallel_apply over two fake GPUs (streams stubbed)."""
    fc.pretend_cuda(monkeypatch, n_gpus=2)
    dp_module = sys.modules[torch.nn.DataParallel.__module__]  # torch.nn.parallel names a function so

    monkeypatch.setattr(dp_module, "_get_available_device_type", lambda: "cuda")
    monkeypatch.setattr(dp_module, "_get_all_device_indices", lambda: [0, 1])
    monkeypatch.setattr(dp_module, "_check_balance", lambda ids: None)
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda *a, **k: torch.device("cuda"))
    monkeypatch.setattr(torch.accelerator, "current_stream", lambda *a, **k: contextlib.nullcontext())
    monkeypatch.setattr(torch.accelerator, "device_index", lambda *a, **k: contextlib.nullcontext())


def test_dataparallel_replicas_compute_in_the_runs_bf16_with_their_own_host_rows(two_fake_gpus):
    """DataParallel runs each replica in a thread that re-enters autocast without a dtype (CUDA's
    default fp16): under --amp bf16 the replicas must still compute in bf16."""
    from torch.nn.parallel.parallel_apply import parallel_apply

    cfg = tiny_config("features")
    batch = caption_batch(cfg)
    fake, lock, seen = fc.FakeCuda(), threading.Lock(), []
    model = fc.real(model_lib.build_model, cfg)
    net = train.wrap_for_devices(train.TrainStep(model, torch.bfloat16),
                                 TrainConfig(multi_gpu=True, amp="bf16"), CUDA, Dist())
    assert isinstance(net, torch.nn.DataParallel)

    class Replica(torch.nn.Module):
        """The step on GPU i (what replicate() copies). The fake mode is per thread and not
        thread-safe, so it is entered here, one replica at a time; any sync op is answered from
        a CPU run of the replica's rows (none today: this test is about dtypes)."""
        def __init__(self, i):
            super().__init__()
            rows = slice(3 * i, 3 * i + 3)
            host = train_net.HostSide.of(batch).rows(rows.start, rows.stop)
            cpu_step = train.TrainStep(model_lib.build_model(cfg))
            self.syncs = fc.record(lambda: cpu_step(*(t[rows] for t in args), host=host))
            self.step = train.TrainStep(fc.to_fake(fc.real(model_lib.build_model, cfg), fake, f"cuda:{i}"),
                                        net.module.amp_dtype)

        def forward(self, inputs, captions, lengths, image_idx, *, host):
            with lock, fc.tolist_through_item(), fake, fc.Replay(self.syncs):
                seen.append((torch.get_autocast_dtype("cuda"), host.lengths, captions.size(0)))
                return self.step(inputs, captions, lengths, image_idx, host=host)

    args = (batch.features, batch.captions, batch.lengths, batch.image_idx)
    replicas = [Replica(0), Replica(1)]
    with fake:
        inputs, kwargs = net.scatter(tuple(t.to(CUDA) for t in args), {"host": train_net.HostSide.of(batch)}, [0, 1])
    with devices.autocast(CUDA, torch.bfloat16):  # train_step's own autocast, in the main thread
        outs = parallel_apply(replicas, inputs, kwargs, devices=[0, 1])
    assert [logits.dtype for logits, _ in outs] == [torch.bfloat16, torch.bfloat16]
    assert [s[0] for s in seen] == [torch.float16, torch.float16]  # what torch gave the threads
    lengths = batch.lengths.tolist()
    assert sorted((s[1], s[2]) for s in seen) == [(tuple(lengths[:3]), 3), (tuple(lengths[3:]), 3)]


# ---------------------------------------------------------------- decoding

def decoder_run(cfg: ModelConfig, amp, fake, how: str):
    def run():
        model = fc.real(model_lib.build_model, cfg).eval()
        device = CPU if fake is None else CUDA
        if fake is not None:
            fc.to_fake(model, fake)
        feats = caption_batch(cfg).features[::2].to(device)  # (3, P, C)
        with devices.autocast(device, amp):
            if how == "sample":
                tokens, log_probs, _ = decoding.sample_decode(model, feats, sos_id=1, eos_id=2, unk_id=3,
                                                               k=2, max_len=5)
                return tokens.device, log_probs.dtype
            out = decoding.decode(model, feats, sos_id=1, eos_id=2, unk_id=3,
                                  cfg=DecodeConfig(beam_size=3 if how == "beam" else 1, max_len=5))
            return out.alphas[0].device, out.alphas[0].dtype
    return run


@pytest.mark.parametrize("how", ["greedy", "beam", "sample"])
def test_greedy_beam_and_sampling_run_on_fake_cuda_under_bf16_and_fp16(how, monkeypatch, cuda_path):
    cfg = tiny_config("features")
    record = fc.record(decoder_run(cfg, None, None, how))
    fc.pretend_cuda(monkeypatch)
    for amp in AMP.values():
        with fc.replaying(record) as (fake, replay):
            device, dtype = decoder_run(cfg, amp, fake, how)()
        assert replay.seen, "decoding reads its tokens back (by design), so it syncs"
        # On the device, in fp32 whatever the autocast (attention maps, the samples' log-probs).
        assert (device, dtype) == (CUDA, torch.float32)


# ---------------------------------------------------------------- precision and resume

def test_amp_auto_takes_native_bf16_only_else_fp16(monkeypatch):
    fc.pretend_cuda(monkeypatch, native_bf16=True)  # Ampere and newer
    assert devices.resolve_amp("auto", CUDA) == torch.bfloat16
    fc.pretend_cuda(monkeypatch, native_bf16=False)  # V100, T4: bf16 only emulated
    assert devices.resolve_amp("auto", CUDA) == torch.float16
    assert devices.resolve_amp("bf16", CUDA) == torch.bfloat16  # asked for: given
    assert devices.resolve_amp("auto", CPU) is None


def test_outside_fp16_the_scale_stays_one_after_non_finite_steps():
    cfg = tiny_config("features")
    model = model_lib.build_model(cfg)
    tcfg = TrainConfig(lr=1e-2)
    optimizer, scaler = train.make_optimizer(model, cfg, tcfg), train.make_scaler(CPU, None)
    batch = caption_batch(cfg)
    batch.features = batch.features * float("nan")
    sums = DeviceSums(CPU)
    for _ in range(3):
        train.train_step(train.TrainStep(model), batch, optimizer, scaler, CPU, tcfg, amp_dtype=None, sums=sums)
    assert scaler.get_scale() == 1.0
    assert sums.read(train.EpochTotals()) == 3  # all three skipped


def tiny_run(amp_dtype, rank: int = 0, seed: int = 0) -> train.Run:
    """A Run with what _restore touches: a features model, its optimizer, schedule and scaler."""
    cfg = tiny_config("features")
    vocab = Vocabulary.from_list(["<pad>", "<sos>", "<eos>", "<unk>"] + [f"w{i}" for i in range(V - 4)])
    run = train.Run(TrainConfig(seed=seed), data_utils.DataConfig(), cfg, Dist(rank, 2 if rank else 1),
                    CPU, amp_dtype, vocab=vocab, model=model_lib.build_model(cfg))
    train._make_optimization(run, None)
    return run


@pytest.mark.parametrize("before,after", [("bf16", "fp16"), (None, "fp16"), ("fp16", "bf16")])
def test_resuming_under_another_amp_gets_a_fresh_scaler(before, after, caplog):
    """A bf16/off run resumed with --amp fp16 must scale its loss dynamically, not keep scale 1."""
    old = tiny_run(AMP.get(before))
    if before == "fp16":
        old.scaler.load_state_dict(dict(old.scaler.state_dict(), scale=1024.0))  # one the run reached
    saved = old.snapshot(epoch=1)
    new = tiny_run(AMP[after])
    fresh = train.make_scaler(CPU, AMP[after]).state_dict()
    caplog.set_level("INFO")
    train._restore(new, saved, Path("last.pt"))
    assert new.scaler.state_dict() == fresh
    assert f"--amp {before or 'off'}, this run with {after}: a fresh gradient scaler" in caplog.text
    same = tiny_run(AMP.get(before))  # the same precision keeps its scaler
    train._restore(same, saved, Path("last.pt"))
    assert same.scaler.state_dict() == old.scaler.state_dict()


def test_after_a_resume_each_ddp_rank_draws_its_own_random_numbers():
    saved = tiny_run(None).snapshot(epoch=1)
    draws = []
    for rank in (0, 1):
        train._restore(tiny_run(None, rank=rank), saved, Path("last.pt"))
        draws.append(torch.rand(4))
    torch.set_rng_state(saved["rng"]["torch"])
    assert torch.equal(draws[0], torch.rand(4))  # rank 0 continues the saved stream
    assert not torch.equal(draws[0], draws[1])  # rank 1 its own (its dropout masks differ)


# ---------------------------------------------------------------- DDP, one rank's batch unreadable

_DDP_SCRIPT = textwrap.dedent("""
    import json, os, sys
    sys.path.insert(0, {root!r})
    import torch
    torch.set_num_threads(1)
    import data_utils, model as model_lib, train
    from config import ModelConfig, TrainConfig
    from pathlib import Path
    out = Path({out!r})
    data_cfg = data_utils.DataConfig(dataset_path={dataset!r}, split_sizes=(2, 1), min_word_freq=1)
    model_cfg = ModelConfig(vocab_size=5, encoder="small_cnn", pretrained=False, fine_tune_encoder=True, image_size=32,
                            encoded_size=2, embed_dim=8, attention_dim=8, decoder_dim=8)
    train_cfg = TrainConfig(batch_size=2, epochs=1, weights_dir=str(out / "weights"),
                            graphs_dir=str(out / "graphs"), wandb="disabled", device="cpu")
    built = []
    real = train.TrainStep.forward
    def spy(self, *args, **kwargs):
        built.append(self.model)
        return real(self, *args, **kwargs)
    train.TrainStep.forward = spy
    status = train.run_training(data_cfg, model_cfg, train_cfg)
    state = built[0].state_dict() if built else {{}}
    torch.save(state, out / f"rank{{os.environ['RANK']}}.pt")
    sys.exit(status)
""")


def test_a_ddp_rank_whose_batch_was_all_unreadable_still_steps_with_the_others(tmp_path):
    """Two gloo ranks, one image each: one image is corrupt, so one rank's batch is empty. It must
    enter the step's collectives (NaN flag, gradient all-reduce), or the other rank hangs."""
    from test_train import make_dataset

    dataset = make_dataset(tmp_path / "set", n=4)
    splits = data_utils.load_dataset(data_utils.DataConfig(dataset_path=str(dataset), split_sizes=(2, 1)))
    splits.train[0].path.write_bytes(b"not a jpeg")
    out = tmp_path / "ddp"
    out.mkdir()
    script = tmp_path / "ddp.py"
    script.write_text(_DDP_SCRIPT.format(root=str(ROOT), out=str(out), dataset=str(dataset)))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, TQDM_DISABLE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2")
    procs = [subprocess.Popen([sys.executable, str(script)], cwd=tmp_path, text=True,
                              env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for r in range(2)]
    try:
        results = [p.communicate(timeout=90) for p in procs]
    except subprocess.TimeoutExpired:
        results = None
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert results is not None, "a rank hung at a collective the other never entered"
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err[-3000:]
    rank0, rank1 = (torch.load(out / f"rank{r}.pt") for r in (0, 1))
    # The gradient all-reduce kept the weights equal (BatchNorm's running statistics are each
    # rank's own until DDP broadcasts rank 0's at the next forward).
    weights = [k for k in rank0 if "running_" not in k and "num_batches" not in k]
    assert weights and all(torch.equal(rank0[k], rank1[k]) for k in weights)
    history = json.loads((out / "weights" / "history.json").read_text())
    assert history[0]["skipped_images"] == 2 and history[0]["captions_per_s"] > 0  # its two captions
