"""The running sums of a training epoch: kept on the device between logging points (no sync per
step), then read into EpochTotals, which last.pt keeps when a run stops mid-epoch."""
from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class EpochTotals:
    """Running sums of one training epoch (kept in last.pt when interrupted mid-epoch).

    SCST counts sampled captions as captions and their words as tokens (`correct` stays 0)."""
    loss_sum: float = 0.0       # sum of per-batch loss x captions
    captions: int = 0
    tokens: int = 0
    correct: int = 0
    reward_sum: float = 0.0     # SCST: sum of the samples' CIDEr-D rewards
    baseline_sum: float = 0.0   # SCST: sum of their baselines
    steps: int = 0              # optimizer steps taken or skipped in this epoch
    skipped_nonfinite: int = 0
    skipped_images: int = 0
    seconds: float = 0.0

    def summary(self, objective: str = "xe") -> dict:
        out = {"loss": self.loss_sum / max(self.captions, 1), "acc": self.correct / max(self.tokens, 1),
               "captions_per_s": self.captions / max(self.seconds, 1e-9),
               "skipped_nonfinite": self.skipped_nonfinite, "skipped_images": self.skipped_images}
        if objective == "scst":
            n = max(self.captions, 1)
            out.update(reward=self.reward_sum / n, baseline=self.baseline_sum / n, sample_len=self.tokens / n)
        return out


class DeviceSums:
    """The step's sums, accumulated on the device; `read` (a sync) moves them into EpochTotals.

    `bad_in_row` counts non-finite losses since the last finite one; `worst` its largest value
    since the last read, so a divergence between two reads is not missed.
    """
    FIELDS = ("loss_sum", "captions", "tokens", "correct", "reward_sum", "baseline_sum", "skipped_nonfinite")

    def __init__(self, device: torch.device):
        self.sums = torch.zeros(len(self.FIELDS), dtype=torch.float64, device=device)
        self.bad_in_row = torch.zeros((), dtype=torch.float64, device=device)
        self.worst = torch.zeros((), dtype=torch.float64, device=device)

    def add(self, loss: torch.Tensor, bad: torch.Tensor, stats: torch.Tensor) -> None:
        """stats: the step's (captions, tokens, correct, reward sum, baseline sum), float64."""
        good = 1.0 - bad
        loss_sum = torch.where(bad > 0, 0.0, loss.double()) * stats[0]
        self.sums += torch.cat([loss_sum[None], stats * good, bad[None]])
        self.bad_in_row = (self.bad_in_row + 1.0) * bad
        self.worst = torch.maximum(self.worst, self.bad_in_row)

    def read(self, totals: EpochTotals) -> int:
        """Add the sums to `totals`, reset them; returns the longest run of bad steps seen."""
        values = torch.cat([self.sums, self.worst[None]]).tolist()
        for name, value in zip(self.FIELDS, values):
            kind = type(getattr(totals, name))
            setattr(totals, name, getattr(totals, name) + kind(value))
        self.sums.zero_()
        self.worst = self.bad_in_row.clone()
        return int(values[-1])


def token_accuracy(logits: torch.Tensor, captions: torch.Tensor, lengths: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced top-1 accuracy counts (correct, tokens) over the real targets, on the device."""
    targets = captions[:, 1:]  # (B, T-1)
    steps = torch.arange(targets.size(1), device=targets.device)  # (T-1,)
    mask = steps[None, :] < (lengths - 1)[:, None]  # (B, T-1)
    correct = (logits.argmax(-1) == targets) & mask  # (B, T-1)
    return correct.sum(), mask.sum()
