"""The image encoder, in one place: what each backbone is, how a photo becomes its input, where its
weights come from, which stages fine-tuning trains.

Three families share one interface (`Encoder`: images (B,3,H,W) -> feats (B,P,C)):
- torchvision: ResNet-18..152 and Inception v3 (average pool and classifier removed), ImageNet
  weights through torchvision's download or `--encoder_weights FILE`;
- the small CNN: four convolutions trained from random weights (the demo);
- timm (`--encoder timm/NAME`): any timm backbone. The grid is its last feature map
  (`forward_features`; a ViT's patch tokens without class/register tokens, laid out on the patch
  grid). Preprocessing comes from the model's pretrained config; weights from `--encoder_weights
  FILE` (offline) or `--pretrained` (timm through the Hugging Face cache).

`resolve(cfg)` fills a ModelConfig's channels (`feature_dim`), preprocessing (`preprocess`) and
default `fine_tune_stages` from the spec; checkpoints store the resolved config, so test, serve,
eval, extraction and export read the preprocessing the model was trained with. Every grid is
pooled to S x S (`encoded_size`; unset, the backbone's own grid at its input size, 7 x 7 for
ResNet-50 at 224 px, so nothing is pooled up).

A stage is a block of the backbone that fine-tuning trains or keeps frozen, counted from the top:
ResNets have 5 (stem, layer1..layer4; default 3: layer2..4, as in the reference tutorial),
Inception v3 4 (stem, Mixed_5, Mixed_6, Mixed_7; default 2), the small CNN 4 (all train: it
starts from random weights), timm models their coarse parameter groups (`group_matcher(coarse=True)`:
the stem, then each block stage; default 3: for tf_efficientnet_lite0 blocks.4-6, the last with
conv_head (3.1 M of its 3.4 M backbone parameters, but the low-resolution end of its compute), for a
ViT its last three blocks (the last with the final norm), for ConvNeXt stages.1-3). Only groups on
the grid's path count: ConvNeXt's head norm, which `forward_features` never uses, is no stage and
never trains.

Shape letters: B batch, P positions (S*S), C channels, h/w the backbone's grid, N tokens.
"""
from __future__ import annotations

import bisect
import dataclasses
import functools
import logging
import math
import os
import socket
from pathlib import Path
from typing import Callable, Iterator

import torch
import torchvision
from torch import Tensor, nn
from torchvision import transforms as T

from config import BUILTIN_ENCODERS, FEATURES, SMALL_CNN, TIMM_PREFIX, ModelConfig, Preprocess

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# A download that cannot connect must fail, not hang (torch.hub's urlopen has no timeout).
DOWNLOAD_TIMEOUT_S = 30.0
RESNET_STAGES = ["conv1", "bn1", "relu", "maxpool"], ["layer1"], ["layer2"], ["layer3"], ["layer4"]
INCEPTION_STAGES = (["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1",
                     "Conv2d_4a_3x3", "maxpool2"], ["Mixed_5b", "Mixed_5c", "Mixed_5d"],
                    ["Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"], ["Mixed_7a", "Mixed_7b", "Mixed_7c"])
TIMM_DEFAULT_STAGES = 3
OFF_PATH = -1  # the stage of a parameter the grid never uses: never trained


class EncoderWeightsError(ValueError):
    """Pretrained encoder weights could not be downloaded or loaded."""


@dataclasses.dataclass(frozen=True)
class Builtin:
    """A torchvision backbone or the small CNN: its channels, native preprocessing and stages."""
    channels: int
    preprocess: Preprocess
    default_stages: int   # stages fine-tuning trains unless --fine_tune_stages says otherwise (of RESNET_STAGES, ...)


def _imagenet(size: int, resize: int) -> Preprocess:
    # torchvision's ImageNet evaluation transform: bilinear resize of the shorter side, centre crop.
    return Preprocess(size, resize, "bilinear", IMAGENET_MEAN, IMAGENET_STD)


BUILTIN = {
    **{name: Builtin(512 if name in ("resnet18", "resnet34") else 2048, _imagenet(224, 256), 3)
       for name in BUILTIN_ENCODERS if name.startswith("resnet")},
    # torchvision's Inception v3 weights expect inputs in [-1, 1] (its transform_input=True).
    "inception_v3": Builtin(2048, Preprocess(299, 342, "bilinear", (0.5,) * 3, (0.5,) * 3), 2),
    # Trained from scratch on the whole image (resize == size: nothing is cropped off a square photo).
    SMALL_CNN: Builtin(128, _imagenet(64, 64), 4),
}


def family(name: str) -> str:
    """torchvision, small_cnn, timm or features."""
    if name == FEATURES:
        return FEATURES
    if name.startswith(TIMM_PREFIX):
        return "timm"
    return SMALL_CNN if name == SMALL_CNN else "torchvision"


# --------------------------------------------------------------------------------------------
# The spec, resolved into the config
# --------------------------------------------------------------------------------------------

def resolve(cfg: ModelConfig) -> ModelConfig:
    """`cfg` with the encoder's channels, preprocessing and default fine-tuned stages filled in
    (fields already set are kept: a checkpoint's stored values win). No weights are loaded."""
    if cfg.encoder == FEATURES or (cfg.feature_dim and cfg.preprocess and cfg.fine_tune_stages
                                   and cfg.encoded_size):
        return cfg
    if family(cfg.encoder) == "timm":
        channels, native, default_stages = _timm_native(cfg.encoder[len(TIMM_PREFIX):], cfg.image_size)
    else:
        spec = BUILTIN[cfg.encoder]
        channels, native, default_stages = spec.channels, spec.preprocess, spec.default_stages
    preprocess = cfg.preprocess or _at_size(native, cfg.image_size, cfg.crop_pct)
    return dataclasses.replace(cfg, feature_dim=channels, preprocess=preprocess,
                               fine_tune_stages=cfg.fine_tune_stages or default_stages,
                               encoded_size=cfg.encoded_size or native_side(cfg.encoder, preprocess.size))


@functools.lru_cache(maxsize=32)
def native_side(encoder: str, size: int) -> int:
    """The side of the backbone's last feature map for `size` px inputs (ResNet-50 at 224: 7), from
    one forward on the meta device (no weights, no compute; a model that cannot be built there, on
    the CPU)."""
    fam = family(encoder)

    def side() -> int:
        body = (_create_timm(encoder[len(TIMM_PREFIX):], pretrained=False) if fam == "timm"
                else _builtin_body(ModelConfig(vocab_size=5, encoder=encoder, pretrained=False))[0])
        with torch.no_grad():
            return min(_grid(fam, body.eval(), torch.zeros(1, 3, size, size)).shape[-2:])

    return _meta_first(side, encoder)


def _meta_first(fn: Callable, what: str):
    """`fn()` with tensors created on the meta device (no memory, no compute); on the CPU for a model
    whose constructor or forward computes on its tensors. A ValueError (a bad name) is not retried."""
    try:
        with torch.device("meta"):
            return fn()
    except ValueError:
        raise
    except Exception as exc:
        log.debug("%s cannot run on the meta device (%s); on the CPU", what, exc)
        return fn()


def _at_size(native: Preprocess, size: int | None, crop_pct: float | None) -> Preprocess:
    """The native preprocessing at another crop size and/or crop share (else its own crop ratio)."""
    size = size or native.size
    if crop_pct is not None:
        return dataclasses.replace(native, size=size, resize=max(size, round(size / crop_pct)))
    if size == native.size:
        return native
    resize = size if native.resize == native.size else round(size * native.resize / native.size)  # 256 for 224
    return dataclasses.replace(native, size=size, resize=resize)


def describe(cfg: ModelConfig) -> str:
    """The encoder in words (the model card): name, weights, what trained, input, grid."""
    cfg = resolve(cfg)
    if cfg.encoder_weights:
        weights = f"initialised from {Path(cfg.encoder_weights).name}"
    elif cfg.pretrained:
        weights = "timm's pretrained weights" if family(cfg.encoder) == "timm" else "ImageNet-initialised (torchvision)"
    else:
        weights = "trained from scratch" if cfg.encoder_from_scratch else "random weights"
    tuned = "frozen" if not cfg.fine_tune_encoder else (
        "every stage trained" if cfg.encoder_from_scratch else f"fine-tuned: its last {cfg.fine_tune_stages} stages")
    p = cfg.preprocess
    crop = "whole image" if p.resize == p.size else f"{'squashed' if p.squash else 'resized'} to {p.resize}, centre crop"
    return (f"{cfg.encoder} ({weights}, {tuned}), {p.size} px input ({crop}, {p.interpolation}, mean "
            f"{list(p.mean)}, std {list(p.std)}), {cfg.encoded_size}x{cfg.encoded_size} attention grid")


def image_transform(cfg: ModelConfig, train: bool) -> Callable:
    """PIL image -> normalised tensor (3, size, size): the preprocessing of the resolved config.

    Evaluation resizes (the shorter side, or both sides when squashing) and crops the centre, as
    the backbone's weights were made. Training crops at random and jitters brightness/contrast
    very mildly; there is no horizontal flip and no hue change, because captions name left/right
    and colours. An encoder that sees the whole image (resize == size: the small CNN) trains on
    copies shifted by up to 1/16 of the side instead, so nothing at the border is cut off.
    """
    p = resolve(cfg).preprocess
    if p is None:
        raise ValueError(f"encoder {cfg.encoder!r} reads features: it has no image preprocessing")
    interpolation = T.InterpolationMode(p.interpolation)
    steps: list = [T.Resize((p.resize, p.resize) if p.squash else p.resize, interpolation=interpolation,
                            antialias=True)]
    whole = p.resize == p.size
    if train:
        shift = T.RandomCrop(p.size, padding=p.size // 16, padding_mode="edge") if whole else T.RandomCrop(p.size)
        steps += [shift, T.ColorJitter(brightness=0.1, contrast=0.1, saturation=0.05)]
    else:
        steps += [T.CenterCrop(p.size)]
    steps += [T.ToTensor(), T.Normalize(p.mean, p.std)]
    return T.Compose(steps)


# --------------------------------------------------------------------------------------------
# Weights files
# --------------------------------------------------------------------------------------------

def read_weights_file(path: str, what: str) -> dict[str, Tensor]:
    """A state dict from a safetensors file or a torch file (read with weights_only=True)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--encoder_weights {path}: no such file (expected a {what} state dict, "
                                f"safetensors or .pt/.pth)")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path, device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors/torch raise many kinds for a file that is not theirs
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise EncoderWeightsError(f"--encoder_weights {path}: cannot read a state dict ({type(exc).__name__}: "
                                  f"{reason})") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise EncoderWeightsError(f"--encoder_weights {path}: expected a state dict (name -> tensor) of a {what}")
    # Files saved from a DataParallel-wrapped model carry a "module." prefix.
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_weights(module: nn.Module, state: dict[str, Tensor], path: str, what: str, head: tuple[str, ...]) -> None:
    """Load `state` into `module`; only the classifier (`head` prefixes, unused here) may differ."""
    result = module.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(head) and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in result.unexpected_keys if not k.startswith(head)]
    if missing or unexpected:
        raise EncoderWeightsError(
            f"--encoder_weights {path} does not fit a {what}: {len(missing)} missing keys (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})")
    log.info("encoder %s: weights from %s", what, path)


# --------------------------------------------------------------------------------------------
# torchvision and the small CNN
# --------------------------------------------------------------------------------------------

def _torchvision_model(name: str) -> nn.Module:
    if name == "inception_v3":
        # aux_logits=True keeps the AuxLogits keys so ImageNet state dicts load strictly;
        # the aux head is discarded below (only the feature map is used).
        return torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False)
    return getattr(torchvision.models, name)(weights=None)


def _expected_cache_path(name: str) -> str:
    url = torchvision.models.get_model_weights(name).DEFAULT.url
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))


def _download_state_dict(name: str) -> dict[str, Tensor]:
    """ImageNet weights through torchvision (read from the torch hub cache when already there)."""
    weights = torchvision.models.get_model_weights(name).DEFAULT
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        return weights.get_state_dict(progress=False)
    except Exception as exc:  # URLError, timeouts, HTTP errors, a truncated file: all mean "no weights"
        raise EncoderWeightsError(
            f"could not get ImageNet weights for {name} ({type(exc).__name__}: {exc}); either copy "
            f"{os.path.basename(weights.url)} (from {weights.url}) to {_expected_cache_path(name)}, "
            f"or pass --encoder_weights PATH to a local state-dict file (or --no-pretrained)") from None
    finally:
        socket.setdefaulttimeout(old_timeout)


def _small_cnn() -> list[nn.Module]:
    """Three 3x3 stride-2 convolutions (32, 64, 128 channels) and a stride-1 one (128), each with
    BatchNorm and ReLU: a 64 px image becomes an 8x8x128 map.

    For quick runs from random weights (the demo preset). The demo needs a network that learns
    shapes within minutes on a CPU: ResNet-18 from scratch does not (it sees colours and sizes,
    not circle against square), and frozen random features plateau below the demo's target.
    """
    stages, channels = [], 3
    for out, stride in ((32, 2), (64, 2), (128, 2), (BUILTIN[SMALL_CNN].channels, 1)):
        stages.append(nn.Sequential(nn.Conv2d(channels, out, 3, stride, 1, bias=False), nn.BatchNorm2d(out),
                                    nn.ReLU(inplace=True)))
        channels = out
    return stages


def _builtin_body(cfg: ModelConfig) -> tuple[nn.Sequential, dict[str, int]]:
    """The backbone's modules up to the last feature map, and each parameter's stage."""
    if cfg.encoder == SMALL_CNN:
        modules = _small_cnn()
        starts = list(range(len(modules)))
    else:
        backbone = _torchvision_model(cfg.encoder)
        if cfg.encoder_weights:
            load_weights(backbone, read_weights_file(cfg.encoder_weights, f"torchvision {cfg.encoder}"),
                         cfg.encoder_weights, f"torchvision {cfg.encoder}", head=("fc.", "AuxLogits."))
        elif cfg.pretrained:
            backbone.load_state_dict(_download_state_dict(cfg.encoder), strict=False)
        stages = INCEPTION_STAGES if cfg.encoder == "inception_v3" else RESNET_STAGES
        names = [n for stage in stages for n in stage]
        starts = [names.index(stage[0]) for stage in stages]
        modules = [getattr(backbone, n) for n in names]
    body = nn.Sequential(*modules)
    # Parameter "4.0.conv1.weight" belongs to module 4 of the body, in the stage that starts at or before it.
    stage_of = {name: bisect.bisect_right(starts, int(name.split(".")[0])) - 1 for name, _ in body.named_parameters()}
    return body, stage_of


# --------------------------------------------------------------------------------------------
# timm
# --------------------------------------------------------------------------------------------

def _timm():
    try:
        import timm
    except ImportError:
        raise ValueError("--encoder timm/...: the timm package is not installed (pip install timm)") from None
    return timm


def _create_timm(name: str, pretrained: bool) -> nn.Module:
    timm = _timm()
    if not timm.is_model(name):
        near = timm.list_models(f"*{name.split('.')[0][:12]}*")[:5]
        raise ValueError(f"--encoder {TIMM_PREFIX}{name}: timm has no model {name!r}"
                         + (f" (similar: {', '.join(near)})" if near else "; see timm.list_models()"))
    # num_classes=0: no classifier, forward_features gives the feature map.
    return timm.create_model(name, pretrained=pretrained, num_classes=0)


@functools.lru_cache(maxsize=16)
def _timm_native(name: str, image_size: int | None) -> tuple[int, Preprocess, int]:
    """(channels, native preprocessing, default stages) of a timm model, built on the meta device
    (no memory, no weights)."""
    model = _meta_first(lambda: _create_timm(name, pretrained=False), name)
    data = _timm().data.resolve_model_data_config(model)
    size = int(data["input_size"][-1])
    if image_size not in (None, size) and model.pretrained_cfg.get("fixed_input_size"):
        raise ValueError(f"--image_size {image_size}: {TIMM_PREFIX}{name} takes {size} px inputs only; "
                         f"drop --image_size")
    if data.get("crop_mode", "center") not in ("center", "squash"):
        log.warning("%s: crop mode %r is approximated by a centre crop", name, data["crop_mode"])
    preprocess = Preprocess(size, max(size, math.floor(size / data["crop_pct"])), data["interpolation"],
                            data["mean"], data["std"], squash=data.get("crop_mode") == "squash")
    return int(model.num_features), preprocess, TIMM_DEFAULT_STAGES


def _timm_body(cfg: ModelConfig) -> tuple[nn.Module, dict[str, int]]:
    """The timm model without its classifier, and each parameter's stage (timm's coarse groups)."""
    name = cfg.encoder[len(TIMM_PREFIX):]
    what = f"timm {name}"
    if cfg.encoder_weights:
        model = _create_timm(name, pretrained=False)
        head = model.pretrained_cfg.get("classifier") or "head"
        heads = tuple(head) if isinstance(head, (list, tuple)) else (head,)
        load_weights(model, read_weights_file(cfg.encoder_weights, what), cfg.encoder_weights, what,
                     head=tuple(h + "." for h in heads))
    elif cfg.pretrained:
        try:
            model = _create_timm(name, pretrained=True)
        except ValueError:
            raise
        except Exception as exc:  # offline (HF_HUB_OFFLINE, no network), HTTP errors, a broken cache
            reason = str(exc).strip().splitlines()[0].split(". ")[0][:160] if str(exc).strip() else ""
            raise EncoderWeightsError(
                f"could not get timm's pretrained weights for {name} ({type(exc).__name__}: {reason}); pass "
                f"--encoder_weights FILE (safetensors or state dict) to work offline, or --no-pretrained") from None
    else:
        model = _create_timm(name, pretrained=False)
    groups = _timm().models.group_parameters(model, model.group_matcher(coarse=True))
    # Stages count only groups on the grid's path: a head's own norm (ConvNeXt's head.norm) is not,
    # and "fine-tune the last stage" must not mean training a layer the grid never passes.
    on_path = _grid_path(name, cfg.preprocess.size)
    used = sorted(gid for gid, names in groups.items() if any(n in on_path for n in names))
    stage_of = {p: i for i, gid in enumerate(used) for p in groups[gid]}
    return model, {n: stage_of.get(n, len(used) - 1) if n in on_path else OFF_PATH
                   for n, _ in model.named_parameters()}


@functools.lru_cache(maxsize=16)
def _grid_path(name: str, size: int) -> frozenset[str]:
    """Names of the parameters timm's `name` uses in `forward_features`: one forward of a blank
    image through a copy built on the meta device, its autograd graph walked back to the parameters."""
    def forward() -> tuple[Tensor, dict[int, str]]:
        model = _create_timm(name, pretrained=False).eval().requires_grad_(True)
        with torch.enable_grad():
            out = model.forward_features(torch.zeros(1, 3, size, size))
        return out, {id(p): n for n, p in model.named_parameters()}

    out, names = _meta_first(forward, name)
    on_path, seen, todo = set(), set(), [out.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if hasattr(fn, "variable"):  # AccumulateGrad: a leaf, i.e. a parameter
            on_path.add(names.get(id(fn.variable)))
        todo.extend(f for f, _ in fn.next_functions)
    return frozenset(on_path)


def _grid(fam: str, body: nn.Module, images: Tensor) -> Tensor:
    """images (B,3,H,W) -> the backbone's last feature map (B,C,h,w)."""
    if fam != "timm":
        return body(images)  # (B, C, h, w)
    x = body.forward_features(images)
    if x.dim() == 3:
        return _token_grid(body, x)  # (B, C, h, w)
    return x.permute(0, 3, 1, 2) if getattr(body, "output_fmt", "NCHW") == "NHWC" else x


def _token_grid(model: nn.Module, tokens: Tensor) -> Tensor:
    """A ViT's tokens (B, prefix + h*w, C) -> its patch grid (B, C, h, w), class/register tokens dropped."""
    x = tokens[:, getattr(model, "num_prefix_tokens", 0):]  # (B, N, C)
    n = x.size(1)
    h, w = getattr(getattr(model, "patch_embed", None), "grid_size", None) or (0, 0)
    if h * w != n:
        h = w = math.isqrt(n)
        assert h * w == n, f"cannot lay {n} tokens out on a square grid"
    return x.transpose(1, 2).reshape(x.size(0), x.size(2), h, w)


# --------------------------------------------------------------------------------------------
# The encoder module
# --------------------------------------------------------------------------------------------

class Encoder(nn.Module):
    """A backbone without pooling and classifier: images (B,3,H,W) -> feats (B,P,C)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        cfg = resolve(cfg)
        self.family = family(cfg.encoder)
        self.body, self._stage_of = _timm_body(cfg) if self.family == "timm" else _builtin_body(cfg)
        self.num_stages = max(self._stage_of.values()) + 1
        if cfg.fine_tune_stages > self.num_stages:
            raise ValueError(f"--fine_tune_stages {cfg.fine_tune_stages}: {cfg.encoder} has "
                             f"{self.num_stages} stages")
        # Pretrained: the stem's generic filters stay. From scratch: there is nothing to keep.
        self.from_scratch = bool(cfg.encoder_from_scratch)
        self._tune_from = 0 if self.from_scratch else self.num_stages - cfg.fine_tune_stages
        self.pool = nn.AdaptiveAvgPool2d(cfg.encoded_size)
        self._warned_pool = False  # _warn_if_pool_enlarges: once per encoder
        self.channels = cfg.feature_dim
        self.fine_tune(cfg.fine_tune_encoder)

    def fine_tune(self, enabled: bool) -> None:
        """Frozen: nothing trains. Enabled: the last stages train (every stage when from scratch)."""
        self.tuning = enabled
        for name, p in self.body.named_parameters():
            p.requires_grad_(enabled and self._stage_of[name] >= self._tune_from)

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters the optimizer should get (its own learning rate); empty when frozen."""
        return (p for p in self.parameters() if p.requires_grad)

    def train(self, mode: bool = True) -> "Encoder":
        # BatchNorm keeps the ImageNet statistics even when fine-tuning: caption batches (as small
        # as 4 end to end) give noisy batch statistics, and a frozen encoder must not drift. Only
        # an encoder trained from scratch has no statistics worth keeping.
        super().train(mode)
        if self.from_scratch and getattr(self, "tuning", False):
            return self
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return self

    def grid(self, images: Tensor) -> Tensor:
        """images (B,3,H,W) -> the backbone's last feature map (B,C,h,w)."""
        return _grid(self.family, self.body, images)

    def _warn_if_pool_enlarges(self, grid: Tensor) -> None:
        """Once: a grid smaller than --encoded_size is repeated, not refined (more positions to
        attend over, no new information), e.g. EfficientNet-Lite0's 7x7 at the default 14."""
        h, w = grid.shape[-2:]
        s = self.pool.output_size
        if (h < s or w < s) and not self._warned_pool:
            self._warned_pool = True
            log.warning("the encoder's grid is %dx%d at this input size; --encoded_size %d repeats its "
                        "cells (%d positions, no new information): pass --encoded_size %d", h, w, s,
                        s * s, min(h, w))

    def forward(self, images: Tensor) -> Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())):
            x = self.grid(images)  # (B, C, h, w)
        assert x.size(1) == self.channels, f"{x.size(1)} channels, the spec says {self.channels}"
        self._warn_if_pool_enlarges(x)
        x = self.pool(x)  # (B, C, S, S)
        return x.flatten(2).transpose(1, 2).contiguous()  # (B, P, C)
