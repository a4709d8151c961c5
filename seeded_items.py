"""Training items whose random augmentation a resumed run repeats exactly, whichever process loads them.

torchvision's random transforms draw from the global torch RNG of the process that runs them. In
DataLoader workers that is each worker's own stream, and which worker loads which batch shifts
when a run resumes mid-epoch (fresh workers, fewer batches left): the resumed run would crop and
jitter other copies of the photos than the uninterrupted run did. Here item k of epoch e draws from
a generator seeded with (seed, e, k), in workers and in the main process alike, and the calling
process's own RNG stream is left as it was (dropout draws from it).
"""
from __future__ import annotations

import torch
from torch.utils.data import Dataset

_MIX = 1_000_003  # a prime: distinct (seed, epoch, item) triples get distinct seeds


class SeededItems(Dataset):
    """`dataset[k]` under a CPU generator seeded by (seed, epoch, k); `set_epoch` before each epoch."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed
        # In shared memory, so that persistent workers see each new epoch without a restart.
        self.epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch: int) -> None:
        self.epoch.fill_(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, k: int):
        seed = ((self.seed * _MIX + int(self.epoch)) * _MIX + k) % 2**63
        # CPU only: torch.manual_seed would also reseed the CUDA generators that dropout uses.
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(seed)
            return self.dataset[k]
