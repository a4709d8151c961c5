"""The training sampler: one order per (seed, epoch), resumable mid-epoch, sharded over ranks."""
from __future__ import annotations

import math

import torch


class ResumableSampler(torch.utils.data.Sampler):
    """The distributed sampler of training (also for one process), resumable mid-epoch.

    The order depends only on (seed, epoch), so a run resumed mid-epoch sees the same remaining
    batches as the interrupted one (`skip` drops the samples already trained). `groups` (item
    indices that belong together, e.g. one image's captions) are shuffled as units and stay
    next to each other, so that a batch holds few images and the CNN runs once for each.
    Every rank gets a contiguous, equally long share (padded by wrapping around, as
    torch's DistributedSampler does), so all ranks take the same number of steps.
    """

    def __init__(self, num_items: int, *, num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int = 0, groups: list[list[int]] | None = None):
        self.num_items, self.num_replicas, self.rank = num_items, num_replicas, rank
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0
        self.groups = groups
        self.skip = 0  # samples of this epoch already trained (a multiple of the batch size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _per_rank(self) -> int:
        return math.ceil(self.num_items / self.num_replicas)

    def _order(self) -> list[int]:
        units = self.groups if self.groups is not None else [[i] for i in range(self.num_items)]
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            perm = torch.randperm(len(units), generator=g).tolist()
        else:
            perm = range(len(units))
        order = [i for u in perm for i in units[u]]
        size = self._per_rank()
        while len(order) < size * self.num_replicas:
            order += order[: size * self.num_replicas - len(order)]
        return order[self.rank * size:(self.rank + 1) * size]

    def __iter__(self):
        return iter(self._order()[self.skip:])

    def __len__(self) -> int:
        return max(0, self._per_rank() - self.skip)


def image_groups(dataset) -> list[list[int]]:
    """Item indices of a CaptionDataset grouped by image (its items are (image, caption) pairs)."""
    groups: dict[int, list[int]] = {}
    for k, (image, _) in enumerate(dataset.items):
        groups.setdefault(image, []).append(k)
    return list(groups.values())
