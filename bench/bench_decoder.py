"""Speed of the decoder: both teacher-forcing paths against the textbook step, batched against serial beam search.

    python bench/bench_decoder.py --json          # one JSON object on stdout (a few minutes on 2 cores)
    python bench/bench_decoder.py --quick --json  # a tiny model, a few batches: the suite's smoke test
    python bench/bench_decoder.py --json --threads 1   # on a machine others are using: a second OpenMP
                                                      # thread that is not scheduled stalls every small op
    python bench/bench_decoder.py --json --device cuda --amp bf16

All figures come from one run on the same machine (CPU unless --device says otherwise):
- train_captions_per_s: forward + loss + backward + AdamW (fused, as train.py uses it) at batch 32,
  196 x 2048 features (a 14 x 14 grid: ResNet-50 at 448 px), vocabulary 2,600, sizes 512, caption lengths drawn like Flickr8k's (mean
  about 12 tokens, max 35), through the default path: cpu_recurrence.py where it supports the
  inputs (CPU training without autocast), the reference step otherwise;
- reference_train_captions_per_s: the same with cpu_recurrence=False (model.py's step, plain autograd);
- baseline_train_captions_per_s: the same model and step written as the textbook does: the
  encoder-side attention projection recomputed at every decoding step (`textbook_forward` below);
- train_captions_per_s_batch128: the default path at batch 128, train.py's default batch size;
- beam_images_per_s / serial_beam_images_per_s: beam 5 over 100 images together / one at a time,
  both through the reference step and capped at the same max length (the untrained model never
  ends, so both run every step);
- train_gflops_per_s: matmul FLOPs of the training step (torch's FlopCounterMode) per second;
  matmul_gflops_per_s: a large fp32 matmul in the same run, the machine's practical ceiling.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import decoding  # noqa: E402
import model as M  # noqa: E402

SOS, EOS, UNK = 1, 2, 3


def flickr_like_lengths(n: int, gen: torch.Generator, max_tokens: int = 35) -> torch.Tensor:
    """Caption lengths in tokens (<sos> and <eos> included) like Flickr8k's: mean about 12, long tail.

    Words are drawn from a log-normal (mean ~10, sd ~3.5), then capped so captions have at most 35 tokens.
    """
    words = torch.exp(torch.randn(n, generator=gen) * 0.33 + math.log(9.5))  # (n,)
    return words.round().clamp(1, max_tokens - 2).long() + 2  # (n,)


def make_batches(n_batches: int, B: int, P: int, C: int, V: int, gen: torch.Generator, device):
    batches = []
    for _ in range(n_batches):
        lengths = flickr_like_lengths(B, gen)  # (B,)
        T = int(lengths.max())
        captions = torch.randint(4, V, (B, T), generator=gen)  # (B, T)
        captions[:, 0] = SOS
        for i, n in enumerate(lengths.tolist()):
            captions[i, n - 1] = EOS
            captions[i, n:] = 0
        feats = torch.randn(B, P, C, generator=gen).relu()  # (B, P, C): ResNet features are post-ReLU
        # The host copy of the lengths travels with the batch, as train.py's does (HostSide): the
        # forward then never waits for the device.
        batches.append((feats.to(device), captions.to(device), lengths.to(device), tuple(lengths.tolist())))
    return batches


def textbook_forward(dec: M.AttentionDecoder, feats: torch.Tensor, captions: torch.Tensor, lengths: torch.Tensor,
                     host_lengths=None):
    """The baseline: the same decoder step, sort-and-shrink loop and loss, but as the textbook writes
    it: the encoder-side attention projection recomputed from the features at every decoding step,
    plain autograd."""
    B, T = captions.shape
    steps = (lengths - 1).clamp(min=0, max=T - 1)
    order = torch.argsort(steps, descending=True, stable=True)
    steps_sorted = steps[order].tolist()
    feats, _, h0, c0 = dec.prepare(feats[order])  # (B,P,D); the once-per-image projection is not used
    emb_gates = dec.word_gates(captions[order, :-1])  # (B, T-1, G)
    h, c = h0.unsqueeze(2), c0.unsqueeze(2)  # (Y, B, 1, H)
    outs, att, rows = [], [], []
    for t in range(steps_sorted[0]):
        b = sum(1 for s in steps_sorted if s > t)
        enc_proj = dec.enc_att(feats[:b])  # (b, P, A): recomputed every step
        h, c, alpha = dec.step(emb_gates[:b, t:t + 1], feats[:b], enc_proj, h[:, :b], c[:, :b])
        outs.append(h[-1, :, 0])
        att.append(alpha[:, 0])
        rows.append(order[:b] * (T - 1) + t)  # (b,) where step t's outputs go in the (B*(T-1)) output
    return dec._scatter_packed(torch.cat(outs), torch.cat(att), torch.cat(rows), B, T)


def train_step(model, forward, opt, scaler, batch, alpha_c: float, amp: torch.dtype | None) -> None:
    """As train.py steps: no read of the loss (the host never waits for the device)."""
    feats, captions, lengths, host = batch
    with torch.autocast(feats.device.type, dtype=amp, enabled=amp is not None):
        logits, alphas = forward(feats, captions, lengths, host_lengths=host)
        loss, _ = M.caption_loss(logits, captions, lengths, alphas, alpha_c)
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_train(model, forward, batches, warmup: int, device, amp: torch.dtype | None) -> float:
    """Captions per second over the timed batches (after warm-up batches)."""
    # The optimizer train.py uses: fused AdamW, for every path alike; the scaler only for fp16.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    for b in batches[:warmup]:
        train_step(model, forward, opt, scaler, b, model.cfg.alpha_c, amp)
    sync(device)
    start = time.perf_counter()
    n = 0
    for b in batches[warmup:]:
        train_step(model, forward, opt, scaler, b, model.cfg.alpha_c, amp)
        n += b[1].size(0)
    sync(device)
    return n / (time.perf_counter() - start)


def count_train_flops(model, batch) -> int:
    """Matmul FLOPs (forward + backward) of one training step, as torch counts them."""
    feats, captions, lengths, host = batch
    with FlopCounterMode(display=False) as counter:
        logits, alphas = model(feats, captions, lengths, host_lengths=host)
        loss, _ = M.caption_loss(logits, captions, lengths, alphas, model.cfg.alpha_c)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def matmul_gflops(n: int, reps: int, device) -> float:
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    torch.mm(a, b)
    sync(device)
    best = math.inf
    for _ in range(reps):  # best of: the practical ceiling, not the average under load
        start = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best / 1e9


AMP = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--json", action="store_true", help="print one JSON object (otherwise a table)")
    p.add_argument("--quick", action="store_true",
                   help="a tiny model (P 16, C 64, sizes 64, vocabulary 200), few batches and images: a smoke test")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--amp", default="off", choices=tuple(AMP), help="autocast dtype of training and decoding")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--large_batch_size", type=int, default=128, help="the default path again at train.py's batch")
    p.add_argument("--vocab_size", type=int, default=2600)
    p.add_argument("--train_batches", type=int, default=6, help="timed training steps (after 2 warm-up)")
    p.add_argument("--baseline_batches", type=int, default=2, help="timed baseline steps (after 1 warm-up)")
    p.add_argument("--beam_images", type=int, default=100)
    p.add_argument("--serial_images", type=int, default=25,
                   help="of the same images, how many to time one at a time (the rate is per image)")
    p.add_argument("--beam_size", type=int, default=5)
    p.add_argument("--max_len", type=int, default=20, help="decoding cap for both beam runs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--encoder_proj_dim", type=int, default=0,
                   help="time the model with this 1x1 channel projection (0: off, the reference model)")
    args = p.parse_args(argv)
    args.positions, args.channels, args.dim = 196, 2048, 512
    if args.quick:
        args.train_batches, args.baseline_batches = 2, 1
        args.beam_images, args.serial_images, args.max_len = 20, 5, 8
        args.positions, args.channels, args.dim, args.vocab_size = 16, 64, 64, 200
        args.batch_size, args.large_batch_size = 8, 16
    return args


def check_same_function(model, batch) -> None:
    """The default path, the reference step and the textbook loop compute the same function.

    Compared in training mode (the CPU recurrence runs only with gradients on) on a copy of the
    model without dropout: the three paths draw their masks in different orders, so with dropout
    on they compute the same function of different masks."""
    quiet = M.build_model(dataclasses.replace(model.cfg, dropout=0.0, embed_dropout=0.0, feature_dropout=0.0))
    quiet.load_state_dict(model.state_dict())
    quiet.to(batch[0].device).train()
    feats, captions, lengths, host = batch
    outputs = [quiet(feats, captions, lengths, host_lengths=host),
               quiet(feats, captions, lengths, host_lengths=host, cpu_recurrence=False),
               textbook_forward(quiet.decoder, feats, captions, lengths)]
    for other in outputs[1:]:
        for a, b in zip(outputs[0], other):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def bench_training(model, args, gen, device, amp, result: dict) -> None:
    P, C = result["positions"], result["channels"]
    check_same_function(model, make_batches(1, 4, P, C, args.vocab_size, gen, device)[0])

    batches = make_batches(2 + args.train_batches, args.batch_size, P, C, args.vocab_size, gen, device)
    lengths = torch.cat([b[2] for b in batches]).float()
    result["mean_caption_tokens"] = round(float(lengths.mean()), 2)  # with <sos>/<eos>
    result["max_caption_tokens"] = int(lengths.max())
    result["train_captions_per_s"] = time_train(model, model, batches, 2, device, amp)
    result["reference_train_captions_per_s"] = time_train(
        model, lambda *b, **k: model(*b, **k, cpu_recurrence=False), batches[:4], 1, device, amp)
    result["baseline_train_captions_per_s"] = time_train(
        model, lambda *b, **k: textbook_forward(model.decoder, *b), batches[:1 + args.baseline_batches], 1,
        device, amp)
    large = make_batches(3 if args.quick else 4, args.large_batch_size, P, C, args.vocab_size, gen, device)
    result["train_captions_per_s_batch128"] = time_train(model, model, large, 1, device, amp)
    flops = count_train_flops(model, batches[2])
    result["train_gflops_per_step"] = flops / 1e9
    result["train_gflops_per_s"] = flops / 1e9 * result["train_captions_per_s"] / args.batch_size
    size = 1024 if args.quick else 4096 if device.type == "cpu" else 8192
    result["matmul_gflops_per_s"] = matmul_gflops(size, 5, device)


def bench_beam(model, args, gen, device, amp, result: dict) -> None:
    # An untrained model whose <eos> is never chosen runs exactly max_len steps.
    model.eval()
    with torch.no_grad():
        model.decoder.fc.bias[EOS] = -1e4
    feats = torch.randn(args.beam_images, result["positions"], result["channels"], generator=gen).relu().to(device)
    dcfg = M.DecodeConfig(beam_size=args.beam_size, max_len=args.max_len)
    ids = dict(sos_id=SOS, eos_id=EOS, unk_id=UNK)

    def search(x):
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            return decoding.beam_search(model, x, cfg=dcfg, **ids)

    search(feats[:10])  # warm-up of both runs' shapes
    search(feats[:1])
    sync(device)
    start = time.perf_counter()
    together = search(feats)
    sync(device)
    result["beam_images_per_s"] = args.beam_images / (time.perf_counter() - start)
    n_serial = min(args.serial_images, args.beam_images)
    start = time.perf_counter()
    alone = [search(feats[i:i + 1]) for i in range(n_serial)]
    sync(device)
    result["serial_beam_images_per_s"] = n_serial / (time.perf_counter() - start)
    result["serial_beam_images_timed"] = n_serial
    result["beam_size"], result["beam_max_len"] = args.beam_size, args.max_len
    result["beam_same_captions"] = all(a.tokens[0] == together.tokens[i] for i, a in enumerate(alone))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, amp = torch.device(args.device), AMP[args.amp]
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    cfg = M.ModelConfig(vocab_size=args.vocab_size, encoder="features", feature_dim=args.channels,
                        encoder_proj_dim=args.encoder_proj_dim, embed_dim=args.dim, attention_dim=args.dim,
                        decoder_dim=args.dim)
    model = M.build_model(cfg).to(device)
    result = {"device": str(device), "amp": args.amp, "threads": torch.get_num_threads(), "torch": torch.__version__,
              "batch_size": args.batch_size, "positions": args.positions, "channels": args.channels,
              "dim": args.dim, "vocab_size": args.vocab_size, "large_batch_size": args.large_batch_size,
              "quick": args.quick,
              "encoder_proj_dim": args.encoder_proj_dim}
    bench_training(model, args, gen, device, amp, result)
    bench_beam(model, args, gen, device, amp, result)
    base = result["baseline_train_captions_per_s"]
    result["train_speedup_vs_baseline"] = result["train_captions_per_s"] / base
    result["reference_speedup_vs_baseline"] = result["reference_train_captions_per_s"] / base
    result["beam_speedup_vs_serial"] = result["beam_images_per_s"] / result["serial_beam_images_per_s"]
    result["train_fraction_of_matmul"] = result["train_gflops_per_s"] / result["matmul_gflops_per_s"]
    result["targets_met"] = {"train_3.5x_baseline": result["train_speedup_vs_baseline"] >= 3.5,
                             "beam_6.5x_serial": result["beam_speedup_vs_serial"] >= 6.5}
    result = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in result.items()}
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:34s} {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
