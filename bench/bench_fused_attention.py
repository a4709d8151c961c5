"""Decoding with the compiled attention energies (model.FusedAttention) against eager ops, alternated in one process.

    python bench/bench_fused_attention.py            # about 3 minutes on 2 cores
    python bench/bench_fused_attention.py --quick    # smoke run

This machine's speed drifts by 10% and more between runs, so both variants run in the same process,
alternating (on/off, then off/on, ...), after a warm-up of each (the first fused call compiles), and
the medians are compared. Default model, 196x2048 features, vocabulary 2,600. Prints one JSON
object with the median seconds of each variant and on/off:
- beam_s: beam 5 over --images images together (max length 20, the untrained model never ends);
- greedy_s: greedy decoding of the same images (max length 20), as validation runs it.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bench_decoder as BD  # noqa: E402  (ids of the special tokens)
import model as M  # noqa: E402


def alternated(run, reps: int) -> dict:
    """Median seconds of run() with the kernels on and off, alternating which goes first."""
    for enabled in (True, False):  # warm-up: compiles, first-touch of buffers
        M.FusedAttention.enabled = enabled
        run()
    times = {True: [], False: []}
    for i in range(reps):
        for enabled in ((True, False) if i % 2 == 0 else (False, True)):
            M.FusedAttention.enabled = enabled
            start = time.perf_counter()
            run()
            times[enabled].append(time.perf_counter() - start)
    on, off = statistics.median(times[True]), statistics.median(times[False])
    return {"fused_s": round(on, 4), "eager_s": round(off, 4), "fused_over_eager": round(on / off, 3),
            "fused_runs_s": [round(t, 3) for t in times[True]], "eager_runs_s": [round(t, 3) for t in times[False]]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--images", type=int, default=100, help="images decoded together (beam and greedy)")
    p.add_argument("--reps", type=int, default=6, help="timed runs of each variant")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="25 images, 2 repetitions (smoke test)")
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.reps = 25, 2  # still above min_elements
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    P, C, V = 196, 2048, 2600
    model = M.build_model(M.ModelConfig(vocab_size=V, encoder="features", feature_dim=C))
    result = {"threads": torch.get_num_threads(), "torch": torch.__version__, "reps": args.reps}
    if M.FusedAttention.get(M.FusedAttention.min_elements, torch.device("cpu")) is None:
        print(json.dumps({**result, "error": "the fused kernels could not be compiled here"}))
        return 1

    model.eval()
    with torch.no_grad():
        model.decoder.fc.bias[BD.EOS] = -1e4  # an untrained model that never ends: every run decodes 20 steps
    feats = torch.randn(args.images, P, C, generator=gen).relu()
    ids = dict(sos_id=BD.SOS, eos_id=BD.EOS, unk_id=BD.UNK)
    beam, greedy = M.DecodeConfig(beam_size=5, max_len=20), M.DecodeConfig(beam_size=1, max_len=20)
    result[f"beam_s_{args.images}_images"] = alternated(lambda: M.beam_search(model, feats, cfg=beam, **ids), args.reps)
    result[f"greedy_s_{args.images}_images"] = alternated(
        lambda: M.greedy_decode(model, feats, cfg=greedy, **ids), args.reps)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
