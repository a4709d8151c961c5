"""CPU (or GPU) time of an image encoder: frozen (extraction) and fine-tuned (forward + backward of
its last stages), in images per second. What an epoch of end-to-end fine-tuning costs is roughly
images / the fine-tuned rate (the decoder's share comes on top: bench_epoch.py).

    python bench/bench_encoder.py                                    # timm/tf_efficientnet_lite0, 224 px
    python bench/bench_encoder.py --encoder timm/tf_efficientnet_lite2 --stages 1 2 3
    python bench/bench_encoder.py --encoder resnet50 --threads 2

Random weights unless --encoder_weights FILE (the time does not depend on them). The input size is
the encoder's own (its preprocessing) unless --image_size. The backward pass goes into the encoder's
output only (a sum of the features), as the decoder's gradient does. Prints JSON.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import model as model_lib  # noqa: E402
from config import ModelConfig  # noqa: E402


def images_per_second(encoder: torch.nn.Module, x: torch.Tensor, repeats: int, train: bool) -> float:
    """Mean rate over `repeats` batches after one warm-up batch."""
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        if train:
            encoder.zero_grad(set_to_none=True)
            encoder(x).float().sum().backward()
        else:
            with torch.no_grad():
                encoder(x)
        if x.is_cuda:
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
    return x.size(0) * len(times) / sum(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--encoder", default="timm/tf_efficientnet_lite0")
    p.add_argument("--encoder_weights", default=None)
    p.add_argument("--image_size", type=int, default=None)
    p.add_argument("--encoded_size", type=int, default=7)
    p.add_argument("--batch", type=int, default=16, help="images per batch")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--stages", type=int, nargs="*", default=[1, 2, 3], help="fine-tuned stages to time")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=5, encoder=args.encoder, pretrained=False, encoder_weights=args.encoder_weights,
                      encoder_from_scratch=False, image_size=args.image_size, encoded_size=args.encoded_size)
    model = model_lib.build_model(cfg).to(args.device)
    size = model.cfg.input_size
    x = torch.randn(args.batch, 3, size, size, device=args.device)  # (B, 3, H, W)
    encoder = model.encoder.eval()
    result = {"encoder": args.encoder, "input": size, "batch": args.batch, "threads": torch.get_num_threads(),
              "device": args.device, "stages": encoder.num_stages,
              "frozen_images_per_s": round(images_per_second(encoder, x, args.repeats, train=False), 2)}
    for k in args.stages:
        tuned = model_lib.Encoder(dataclasses.replace(cfg, fine_tune_encoder=True, fine_tune_stages=k))
        tuned.to(args.device)
        tuned.load_state_dict(encoder.state_dict())
        tuned.train()
        params = sum(q.numel() for q in tuned.trainable_parameters())
        result[f"fine_tune_{k}_stages"] = {
            "trainable_params": params,
            "images_per_s": round(images_per_second(tuned, x, args.repeats, train=True), 2)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
