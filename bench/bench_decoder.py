"""Speed of the decoder: training step against the textbook baseline, batched against serial beam search.

    python bench/bench_decoder.py --json          # one JSON object on stdout (about 2-3 minutes on 2 cores)
    python bench/bench_decoder.py --quick --json  # smaller run, for a smoke test
    python bench/bench_decoder.py --json --threads 1   # on a machine others are using: a second OpenMP
                                                      # thread that is not scheduled stalls every small op

All figures come from one run on the same machine (CPU unless --device says otherwise):
- train_captions_per_s: forward + loss + backward + AdamW (fused, as train.py uses it) at batch 32,
  196 x 2048 features, vocabulary 2,600, sizes 512, caption lengths drawn like Flickr8k's (mean about 12 tokens, max 35);
- baseline_train_captions_per_s: the same model and step written as the textbook does: the
  encoder-side attention projection recomputed at every decoding step, plain autograd
  (`textbook_forward` below);
- beam_images_per_s / serial_beam_images_per_s: beam 5 over 100 images together / one at a time,
  both capped at the same max length (the untrained model never ends, so both run every step);
- train_gflops_per_s: matmul FLOPs of the training step (torch's FlopCounterMode) per second;
  matmul_gflops_per_s: a large fp32 matmul in the same run, the machine's practical ceiling.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
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
        batches.append((feats.to(device), captions.to(device), lengths.to(device)))
    return batches


def textbook_forward(dec: M.AttentionDecoder, feats: torch.Tensor, captions: torch.Tensor, lengths: torch.Tensor):
    """The reference: the same decoder, sort-and-shrink loop and loss, but as the textbook writes it:
    the encoder-side attention projection recomputed from the features at every decoding step, and
    plain autograd (no gradient tapes)."""
    B, T = captions.shape
    steps = (lengths - 1).clamp(min=0, max=T - 1)
    order = torch.argsort(steps, descending=True, stable=True)
    steps_sorted = steps[order].tolist()
    feats, _, h0, c0 = dec.prepare(feats[order])  # (B,P,D); the once-per-image projection is not used
    emb_gates = dec.emb_gates(dec.embedding(captions[order, :-1]))  # (B, T-1, G)
    h, c = list(h0), list(c0)
    outs, att = [], []
    for t in range(steps_sorted[0]):
        b = sum(1 for s in steps_sorted if s > t)
        h = [x[:b] for x in h]
        c = [x[:b] for x in c]
        enc_proj = dec.enc_att(feats[:b])  # (b, P, A): recomputed every step
        context, alpha = dec.attend(feats[:b], enc_proj, h[-1].unsqueeze(1))  # (b,1,D), (b,1,P)
        h, c = dec.lstm(emb_gates[:b, t], context.squeeze(1), h, c)
        outs.append(h[-1])
        att.append(alpha.squeeze(1))
    return dec._scatter_packed(torch.cat(outs), torch.cat(att), [x.size(0) for x in outs], order, B, T)


def train_step(model, forward, opt, batch, alpha_c: float) -> float:
    feats, captions, lengths = batch
    logits, alphas = forward(feats, captions, lengths)
    loss, _ = M.caption_loss(logits, captions, lengths, alphas, alpha_c)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item()


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_train(model, forward, batches, warmup: int, device) -> float:
    """Captions per second over the timed batches (after warm-up batches)."""
    # The optimizer train.py uses (train.make_optimizer): fused AdamW, for ours and the baseline alike.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    for b in batches[:warmup]:
        train_step(model, forward, opt, b, model.cfg.alpha_c)
    sync(device)
    start = time.perf_counter()
    n = 0
    for b in batches[warmup:]:
        train_step(model, forward, opt, b, model.cfg.alpha_c)
        n += b[1].size(0)
    sync(device)
    return n / (time.perf_counter() - start)


def count_train_flops(model, batch) -> int:
    """Matmul FLOPs (forward + backward) of one training step, as torch counts them."""
    feats, captions, lengths = batch
    with FlopCounterMode(display=False) as counter:
        logits, alphas = model(feats, captions, lengths)
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--json", action="store_true", help="print one JSON object (otherwise a table)")
    p.add_argument("--quick", action="store_true", help="fewer batches and images (smoke test)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--batch_size", type=int, default=32)
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
    p.add_argument("--untaped", action="store_true",
                   help="also time the fast loop without gradient tapes (untaped_train_captions_per_s)")
    p.add_argument("--fused_attention", action=argparse.BooleanOptionalAction, default=True,
                   help="compiled attention energies for large decoding batches (model.FusedAttention), "
                        "as validation and eval use")
    args = p.parse_args(argv)
    M.FusedAttention.enabled = args.fused_attention
    if args.quick:
        args.train_batches, args.baseline_batches = 2, 1
        args.beam_images, args.serial_images, args.max_len = 20, 5, 8
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    P, C = 196, 2048
    cfg = M.ModelConfig(vocab_size=args.vocab_size, encoder="features", feature_dim=C,
                        encoder_proj_dim=args.encoder_proj_dim)
    model = M.build_model(cfg).to(device)
    result = {"device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
              "batch_size": args.batch_size, "positions": P, "channels": C, "vocab_size": args.vocab_size,
              "encoder_proj_dim": args.encoder_proj_dim}

    # The fast path and the textbook loop compute the same function: check it before timing.
    check = make_batches(1, 4, P, C, args.vocab_size, gen, device)[0]
    model.eval()
    with torch.no_grad():
        fast = model(*check)
        slow = textbook_forward(model.decoder, *check)
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)

    model.train()
    batches = make_batches(2 + args.train_batches, args.batch_size, P, C, args.vocab_size, gen, device)
    lengths = torch.cat([b[2] for b in batches]).float()
    result["mean_caption_tokens"] = round(float(lengths.mean()), 2)  # with <sos>/<eos>
    result["max_caption_tokens"] = int(lengths.max())
    result["train_captions_per_s"] = time_train(model, model, batches, 2, device)
    if args.untaped:  # the fast loop with plain autograd: what the gradient tapes buy
        M.AttentionDecoder.use_tapes = False
        result["untaped_train_captions_per_s"] = time_train(model, model, batches[:4], 1, device)
        M.AttentionDecoder.use_tapes = True
    baseline_batches = batches[:1 + args.baseline_batches]
    result["baseline_train_captions_per_s"] = time_train(
        model, lambda f, c, l: textbook_forward(model.decoder, f, c, l), baseline_batches, 1, device)
    flops = count_train_flops(model, batches[2])
    result["train_gflops_per_step"] = flops / 1e9
    result["train_gflops_per_s"] = flops / 1e9 * result["train_captions_per_s"] / args.batch_size
    result["matmul_gflops_per_s"] = matmul_gflops(4096 if device.type == "cpu" else 8192, 5, device)

    # Beam search: an untrained model whose <eos> is never chosen runs exactly max_len steps.
    model.eval()
    with torch.no_grad():
        model.decoder.fc.bias[EOS] = -1e4
    feats = torch.randn(args.beam_images, P, C, generator=gen).relu().to(device)  # (N, P, C)
    dcfg = M.DecodeConfig(beam_size=args.beam_size, max_len=args.max_len)
    ids = dict(sos_id=SOS, eos_id=EOS, unk_id=UNK)
    # Warm-up of both runs' paths (the first large batch compiles the fused attention energies).
    M.beam_search(model, feats, cfg=dcfg, **ids)
    M.beam_search(model, feats[:1], cfg=dcfg, **ids)
    sync(device)
    start = time.perf_counter()
    together = M.beam_search(model, feats, cfg=dcfg, **ids)
    sync(device)
    result["beam_images_per_s"] = args.beam_images / (time.perf_counter() - start)
    n_serial = min(args.serial_images, args.beam_images)
    start = time.perf_counter()
    alone = [M.beam_search(model, feats[i:i + 1], cfg=dcfg, **ids) for i in range(n_serial)]
    sync(device)
    result["serial_beam_images_per_s"] = n_serial / (time.perf_counter() - start)
    result["serial_beam_images_timed"] = n_serial
    result["beam_size"], result["beam_max_len"] = args.beam_size, args.max_len
    # Whether the batched search ran the compiled energies (FusedAttention; one image is eager).
    result["fused_attention"] = M.FusedAttention.enabled and M.FusedAttention._kernel is not None
    result["beam_same_captions"] = all(a.tokens[0] == together.tokens[i] for i, a in enumerate(alone))

    result["train_speedup_vs_baseline"] = result["train_captions_per_s"] / result["baseline_train_captions_per_s"]
    result["beam_speedup_vs_serial"] = result["beam_images_per_s"] / result["serial_beam_images_per_s"]
    result["train_fraction_of_matmul"] = result["train_gflops_per_s"] / result["matmul_gflops_per_s"]
    result["targets_met"] = {"train_5x_baseline": result["train_speedup_vs_baseline"] >= 5,
                             "beam_10x_serial": result["beam_speedup_vs_serial"] >= 10,
                             "train_35pct_matmul": result["train_fraction_of_matmul"] >= 0.35}
    result = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in result.items()}
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:34s} {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
