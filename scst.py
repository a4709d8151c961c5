"""Self-critical sequence training (SCST, Rennie et al., CVPR 2017): fine-tuning on CIDEr-D.

Each image of a batch gets K captions sampled from the model (decoding.sample_decode: one more
caller of the decoder's one step). Each sample is rewarded with CIDEr-D against the image's
references, with document frequencies taken once from the training split's references
(cider.CiderD), and the loss is REINFORCE with a baseline: -(reward - baseline) x the sample's
summed log-probability, averaged over the samples. The baseline is either `mean`, the mean reward
of the image's other K-1 samples (Luo, "A Better Variant of Self-Critical Sequence Training",
2020), or `greedy`, the reward of the image's greedy caption decoded in eval mode (the original).
A sample cut off at max_len without <eos> is scored as it is.

train.py runs this objective inside its step (AMP, gradient clipping, the NaN skip, DDP), on
batches of images (data_utils.ImageDataset: one item per image, its references in the records).
The reward is computed on the host, so an SCST step waits for its samples.

Shape letters: N images of a batch, K samples per image, L sampled length (max_len).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cider import CiderD
from config import DecodeConfig, TrainConfig
import decoding
from devices import autocast, to_device, unwrap
from text import Vocabulary

Tokens = list[str]


class SampleStep(nn.Module):
    """What DataParallel/DDP wrap in SCST training: encoder + K sampled captions per image.

    inputs: images (N, 3, H, W) or features (N, P, C) -> tokens (N*K, L), log-probabilities
    (N*K, L) and lengths (N*K,) as sample_decode returns them, padded to L = max_len (with <eos>
    and log-probability 0) so that DataParallel can gather the replicas' outputs. Autocast is
    entered here, inside the module, so that DataParallel's replica threads compute in the run's
    dtype (see train.TrainStep).
    """

    def __init__(self, model: nn.Module, amp_dtype: torch.dtype | None = None):
        super().__init__()
        self.model = model
        self.amp_dtype = amp_dtype

    def forward(self, inputs: torch.Tensor, *, k: int, max_len: int, temperature: float, sos_id: int,
                eos_id: int, unk_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with autocast(inputs.device, self.amp_dtype):
            tokens, log_probs, lengths = decoding.sample_decode(
                self.model, inputs, sos_id=sos_id, eos_id=eos_id, unk_id=unk_id, k=k,
                temperature=temperature, max_len=max_len)  # (N*K, l), (N*K, l), (N*K,)
        pad = max_len - tokens.size(1)
        return F.pad(tokens, (0, pad), value=eos_id), F.pad(log_probs, (0, pad)), lengths


def leave_one_out_mean(rewards: np.ndarray, k: int) -> np.ndarray:
    """rewards (N*K,) grouped by image -> each sample's baseline: the mean of its image's other samples."""
    r = rewards.reshape(-1, k)  # (N, K)
    return ((r.sum(axis=1, keepdims=True) - r) / (k - 1)).reshape(-1)


class ScstObjective:
    """The SCST loss of a batch of images: train.train_step's `objective`.

    `references[i]`: the reference token lists of the training set's image i (a batch's
    `image_idx` indexes them); CIDEr-D's document frequencies come from all of them, once.
    """

    def __init__(self, references: list[list[Tokens]], vocab: Vocabulary, cfg: TrainConfig, max_len: int):
        self.references = references
        self.scorer = CiderD(references)
        self.vocab, self.cfg, self.max_len = vocab, cfg, max_len

    def __call__(self, net: nn.Module, batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """-> the loss () and the step's sums (samples, words, 0, reward sum, baseline sum) float64."""
        cfg, vocab, k = self.cfg, self.vocab, self.cfg.scst_samples
        inputs = to_device(batch.inputs, device)
        tokens, log_probs, _ = net(inputs, k=k, max_len=self.max_len, temperature=cfg.scst_temperature,
                                   sos_id=vocab.sos_id, eos_id=vocab.eos_id, unk_id=vocab.unk_id)
        refs = [self.references[i] for i in batch.image_idx.tolist()]
        samples = [vocab.decode(row) for row in tokens.tolist()]  # the one sync of the step
        rewards = self.scorer.score(samples, refs, np.repeat(np.arange(len(refs)), k))  # (N*K,)
        if cfg.scst_baseline == "greedy":
            baseline = np.repeat(self._greedy_rewards(net, inputs, refs), k)  # (N*K,)
        else:
            baseline = leave_one_out_mean(rewards, k)  # (N*K,)
        advantage = torch.as_tensor(rewards - baseline, dtype=torch.float32, device=device)  # (N*K,)
        loss = -(advantage * log_probs.float().sum(dim=1)).mean()
        stats = torch.tensor([len(samples), sum(map(len, samples)), 0.0, rewards.sum(), baseline.sum()],
                             dtype=torch.float64, device=device)
        return loss, stats

    def _greedy_rewards(self, net: nn.Module, inputs: torch.Tensor, refs: list[list[Tokens]]) -> np.ndarray:
        """CIDEr-D of each image's greedy caption, decoded as at test time (eval mode: no dropout)."""
        model = unwrap(net).model
        model.eval()
        try:
            out = decoding.greedy_decode(model, inputs, sos_id=self.vocab.sos_id, eos_id=self.vocab.eos_id,
                                         unk_id=self.vocab.unk_id,
                                         cfg=DecodeConfig(beam_size=1, max_len=self.max_len))
        finally:
            model.train()
        return self.scorer.score([self.vocab.decode(t) for t in out.tokens], refs)  # (N,)
