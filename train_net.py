"""What DataParallel/DDP wrap in cross-entropy training, and how they wrap it.

`TrainStep` encodes each distinct image once and runs the decoder under the run's autocast
(entered inside the module: DataParallel's replica threads do not inherit its dtype). `HostSide`
carries the host copy of a batch's lengths and image ids, so that the step never waits for the
device to learn its loop's shape; `HostDataParallel` gives each replica its own rows of it.
`stand_in_batch` is what a DDP rank steps on (with weight 0) when its whole batch was unreadable.

Shape letters: B batch, T caption length, U distinct images of a batch, P positions, C channels.
"""
from __future__ import annotations

import dataclasses
import logging

import torch
from torch import nn

from config import TrainConfig
import data_utils
from devices import Dist, autocast
from text import Vocabulary

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class HostSide:
    """The host copy of a caption batch's lengths and image ids (Python ints, read from the
    collated CPU tensors): the training step learns its loop's shape and the batch's distinct
    images from them, never by waiting for the device."""
    lengths: tuple[int, ...]
    image_idx: tuple[int, ...]

    @classmethod
    def of(cls, batch) -> "HostSide":
        return cls(tuple(batch.lengths.tolist()), tuple(batch.image_idx.tolist()))

    def rows(self, start: int, stop: int) -> "HostSide":
        return HostSide(self.lengths[start:stop], self.image_idx[start:stop])


class TrainStep(nn.Module):
    """What DataParallel/DDP wrap in training: encoder (once per distinct image) + decoder, under
    the run's autocast.

    inputs: images (B, 3, H, W) or features (B, P, C). With images, captions of the same image
    (same `image_idx`) share one encoder pass: end-to-end training costs one CNN pass per image,
    not per caption. Autocast is entered here, inside the module, because autocast's dtype is
    thread-local: DataParallel runs each replica in a thread of its own that re-enters autocast
    without a dtype (CUDA's default float16), so an autocast around the wrapper would not reach it.
    """

    def __init__(self, model: nn.Module, amp_dtype: torch.dtype | None = None):
        super().__init__()
        self.model = model
        self.amp_dtype = amp_dtype

    def forward(self, inputs: torch.Tensor, captions: torch.Tensor, lengths: torch.Tensor,
                image_idx: torch.Tensor | None = None, *, host: HostSide | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        with autocast(captions.device, self.amp_dtype):
            if inputs.dim() == 4 and image_idx is not None:
                feats = self._encode_once_per_image(inputs, image_idx, host)  # (B, P, C)
            else:
                feats = self.model.features(inputs)  # (B, P, C)
            return self.model.decoder(feats, captions, lengths, host_lengths=host and host.lengths)

    def _encode_once_per_image(self, images: torch.Tensor, image_idx: torch.Tensor,
                               host: HostSide | None) -> torch.Tensor:
        """The CNN on the first caption of each distinct image -> feats (B, P, C) for every caption.
        Built from (B, B) comparisons, with the image count from the host: no sync."""
        positions = torch.arange(image_idx.numel(), device=image_idx.device)  # (B,)
        same = image_idx.unsqueeze(0) == image_idx.unsqueeze(1)  # (B, B)
        first_of = same.int().argmax(dim=1)  # (B,) the first caption of each caption's image
        is_first = first_of == positions  # (B,)
        n_images = len(set(host.image_idx)) if host is not None else int(is_first.sum())
        firsts = torch.argsort((~is_first).int(), stable=True)[:n_images]  # (U,) in batch order
        inverse = (is_first.cumsum(0) - 1)[first_of]  # (B,) each caption's image among the U
        return self.model.encode(images[firsts])[inverse]  # (B, P, C)


class HostDataParallel(nn.DataParallel):
    """nn.DataParallel whose replicas each get their own rows of the batch's HostSide (torch
    would give every replica all of it, as it does with any object that is not a tensor)."""

    def scatter(self, inputs, kwargs, device_ids):
        inputs, kwargs = super().scatter(inputs, kwargs, device_ids)
        start = 0
        for args, kw in zip(inputs, kwargs):
            if kw.get("host") is not None:
                rows = args[1].size(0)  # this replica's captions (B_i, T)
                kw["host"] = kw["host"].rows(start, start + rows)
                start += rows
        return inputs, kwargs


def stand_in_batch(model_cfg, vocab: Vocabulary, store=None, images_only: bool = False):
    """A one-item batch of zeros in the shape the model reads (features of `store`, else images):
    under DDP, a rank whose whole batch was unreadable steps on it with weight 0, so that it
    enters the gradient all-reduce and the NaN flag's all_reduce like every other rank."""
    if store is not None:
        inputs = torch.zeros(1, store.num_positions, store.channels)  # (1, P, C)
    else:
        inputs = torch.zeros(1, 3, model_cfg.input_size, model_cfg.input_size)  # (1, 3, H, W)
    images, features = (None, inputs) if inputs.dim() == 3 else (inputs, None)
    image_idx = torch.zeros(1, dtype=torch.long)
    if images_only:
        return data_utils.ImageBatch(images, features, image_idx)
    captions = torch.tensor([[vocab.sos_id, vocab.eos_id]])  # (1, 2)
    return data_utils.CaptionBatch(images, features, captions, torch.tensor([2]), image_idx)


def wrap_for_devices(net: nn.Module, cfg: TrainConfig, device: torch.device, d: Dist) -> nn.Module:
    """DDP under torchrun, DataParallel with --multi_gpu and several GPUs, else `net` itself."""
    if d.enabled:
        return nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.multi_gpu:
        n_gpus = torch.cuda.device_count() if device.type == "cuda" else 0
        if n_gpus > 1:
            logger.info("DataParallel over %d GPUs", n_gpus)
            return HostDataParallel(net)
        logger.warning("--multi_gpu ignored: %d GPU(s) visible", n_gpus)
    return net
