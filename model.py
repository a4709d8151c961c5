"""Show, Attend and Tell with a torchvision encoder and a two-layer attention LSTM.

Encoder (ResNet-18..152 or Inception v3, average pool and classifier removed; or a small plain CNN
for quick runs from random weights) -> adaptive pool to S x S -> P = S*S positions of C channels.
Decoder: soft additive attention over the positions, a
sigmoid gate on the attended context, stacked LSTM layers whose first layer reads the word embedding
and the gated context, initial states from the mean feature, output projection to the vocabulary.
Greedy and beam search are batched over images.

Letters in shape comments: B batch, T caption length (with <sos>/<eos>), L decoded length,
P encoder positions, C encoder channels, D channels the decoder attends over (C, or
encoder_proj_dim), E embedding, A attention, H hidden, V vocabulary, K beam size, N images,
G LSTM gates (4H), Y layers.

This module knows nothing of files on disk (except a weights file named in the config) or the CLI.
"""
from __future__ import annotations

import logging
import math
import os
import socket
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from config import CHANNELS, ENCODERS, NATIVE_SIZE, RESNETS, SMALL_CNN, DecodeConfig, ModelConfig

log = logging.getLogger(__name__)


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# A download that cannot connect must fail, not hang (torch.hub's urlopen has no timeout).
DOWNLOAD_TIMEOUT_S = 30.0


class EncoderWeightsError(ValueError):
    """Pretrained encoder weights could not be downloaded or loaded."""


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------

@dataclass
class Decoded:
    tokens: list[list[int]]   # per image, without <sos>/<eos>
    scores: list[float]       # per image, log-probability / length**length_penalty
    alphas: list[Tensor]      # per image, (L, P) attention of each returned word


# --------------------------------------------------------------------------------------------
# Encoder
# --------------------------------------------------------------------------------------------

def _torchvision_model(name: str) -> nn.Module:
    import torchvision

    if name == "inception_v3":
        # aux_logits=True keeps the AuxLogits keys so ImageNet state dicts load strictly;
        # the aux head is discarded below (only the feature map is used).
        return torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False)
    return getattr(torchvision.models, name)(weights=None)


def _expected_cache_path(name: str) -> str:
    import torchvision

    url = torchvision.models.get_model_weights(name).DEFAULT.url
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))


def _download_state_dict(name: str) -> dict[str, Tensor]:
    """ImageNet weights through torchvision (read from the torch hub cache when already there)."""
    import torchvision

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


def _load_weights_file(backbone: nn.Module, name: str, path: str) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--encoder_weights {path}: no such file (expected a torchvision {name} state dict)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise EncoderWeightsError(f"--encoder_weights {path}: cannot read a state dict ({type(exc).__name__}: "
                                  f"{exc})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise EncoderWeightsError(f"--encoder_weights {path}: expected a state dict (name -> tensor) of a "
                                  f"torchvision {name}")
    # Files saved from a DataParallel-wrapped model carry a "module." prefix.
    state = {k.removeprefix("module."): v for k, v in state.items()}
    result = backbone.load_state_dict(state, strict=False)
    head = ("fc.", "AuxLogits.")  # the classifier is not used, so a file without it is fine
    missing = [k for k in result.missing_keys if not k.startswith(head)]
    if missing or result.unexpected_keys:
        raise EncoderWeightsError(
            f"--encoder_weights {path} does not fit a torchvision {name}: {len(missing)} missing keys "
            f"(e.g. {missing[:3]}), {len(result.unexpected_keys)} unexpected keys (e.g. {result.unexpected_keys[:3]})")
    log.info("encoder %s: weights from %s", name, path)


def _small_cnn() -> nn.Sequential:
    """Three 3x3 stride-2 convolutions (32, 64, 128 channels) and a stride-1 one (128), each with
    BatchNorm and ReLU: a 64 px image becomes an 8x8x128 map.

    For quick runs from random weights (the demo preset). The demo needs a network that learns
    shapes within minutes on a CPU: ResNet-18 from scratch does not (it sees colours and sizes,
    not circle against square), and frozen random features plateau below the demo's target.
    """
    stages, channels = [], 3
    for out, stride in ((32, 2), (64, 2), (128, 2), (CHANNELS[SMALL_CNN], 1)):
        stages.append(nn.Sequential(nn.Conv2d(channels, out, 3, stride, 1, bias=False), nn.BatchNorm2d(out),
                                    nn.ReLU(inplace=True)))
        channels = out
    return nn.Sequential(*stages)


def _torchvision_body(cfg: ModelConfig) -> tuple[nn.Sequential, int]:
    """The backbone's stages up to the last feature map, and the first stage fine-tuning trains."""
    name = cfg.encoder
    backbone = _torchvision_model(name)
    if cfg.encoder_weights:
        _load_weights_file(backbone, name, cfg.encoder_weights)
    elif cfg.pretrained:
        backbone.load_state_dict(_download_state_dict(name), strict=False)
    if name == "inception_v3":
        names = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1",
                 "Conv2d_4a_3x3", "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b",
                 "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"]
        tune_from = "Mixed_6a"
    else:
        names = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
        tune_from = "layer2"  # the last three stages, as in the reference tutorial
    return nn.Sequential(*(getattr(backbone, n) for n in names)), names.index(tune_from)


class Encoder(nn.Module):
    """A CNN without pooling and classifier: images (B,3,H,W) -> feats (B,P,C)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        name = cfg.encoder
        # The small CNN has no pretrained weights (the config refuses them): every stage trains.
        self.body, tune_from = (_small_cnn(), 0) if name == SMALL_CNN else _torchvision_body(cfg)
        self.name = name
        # Pretrained: the stem's generic filters stay. From scratch: there is nothing to keep.
        self.from_scratch = bool(cfg.encoder_from_scratch)
        self._tune_from = 0 if self.from_scratch else tune_from
        self.pool = nn.AdaptiveAvgPool2d(cfg.encoded_size)
        self.channels = CHANNELS[name]
        self.fine_tune(cfg.fine_tune_encoder)

    def fine_tune(self, enabled: bool) -> None:
        """Frozen: nothing trains. Enabled: the last stages train (every stage when from scratch)."""
        self.tuning = enabled
        for i, stage in enumerate(self.body):
            for p in stage.parameters():
                p.requires_grad_(enabled and i >= self._tune_from)

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
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        return self

    def forward(self, images: Tensor) -> Tensor:
        if self.name == "inception_v3":
            # torchvision's Inception v3 weights expect inputs scaled to [-1, 1]; this turns ImageNet
            # normalisation into that, as the classifier's transform_input=True does.
            mean = images.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
            std = images.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
            images = (images * std + mean - 0.5) / 0.5  # (B, 3, H, W)
        with torch.set_grad_enabled(torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())):
            x = self.body(images)  # (B, C, h, w)
        x = self.pool(x)  # (B, C, S, S)
        return x.flatten(2).transpose(1, 2).contiguous()  # (B, P, C)


def image_transform(cfg: ModelConfig, train: bool) -> Callable:
    """PIL image -> normalised tensor (3, size, size), the preprocessing the encoder was built for.

    Training crops at random and jitters brightness/contrast very mildly; there is no horizontal
    flip and no hue change, because captions name left/right and colours. The torchvision
    backbones get torchvision's resize-then-crop (the ImageNet weights were made with it); the
    small CNN, trained from scratch, sees the whole image, so nothing at the border is cut off, and
    trains on copies shifted by up to 1/16 of the side instead.
    """
    from torchvision import transforms as T

    size = cfg.input_size
    whole = cfg.encoder == SMALL_CNN
    resize = size if whole else round(size * 256 / 224)  # 256 for 224, 342 for 299: torchvision's eval resize
    steps: list = [T.Resize(resize, interpolation=T.InterpolationMode.BILINEAR, antialias=True)]
    if train:
        shift = T.RandomCrop(size, padding=size // 16, padding_mode="edge") if whole else T.RandomCrop(size)
        steps += [shift, T.ColorJitter(brightness=0.1, contrast=0.1, saturation=0.05)]
    else:
        steps += [T.CenterCrop(size)]
    steps += [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return T.Compose(steps)


# --------------------------------------------------------------------------------------------
# Decoder
# --------------------------------------------------------------------------------------------

# Decoding's attention energies, w . relu(e + q) over (images, beams, P, A), are memory bound in eager
# PyTorch: even in cache-sized chunks (_energies_chunked) each op writes a block that the next one reads
# back. torch.compile (inductor) turns the sum below into one C++/OpenMP loop that reads e once per
# step and writes only the (N, K, P) result: beam search over 100 images x 5 beams spent ~600 ms of
# ~2.4 s in those ops, ~75 ms in the compiled loop (bench/bench_fused_attention.py times the whole
# search both ways). Training's attention ops (_Recurrence) were tried compiled too: no measurable gain
# at batch 32 or 128, so they stay eager.

def _energy_kernel(enc: Tensor, neg_q: Tensor, w: Tensor) -> Tensor:
    """sum_a w_a max(e_a, -q_a): enc (N,1,P,A), neg_q (N,K,1,A) -> (N,K,P).

    w . relu(e + q) = w . max(e, -q) + w . q; the caller adds w . q (one value per query).
    """
    return (torch.maximum(enc, neg_q) * w).sum(-1)


class FusedAttention:
    """_energy_kernel compiled by torch.compile, once per process, for decoding batches on CPU of at
    least min_elements (images x beams x P x A; below that eager ops are fast enough and a compile,
    seconds, does not pay: one image's beam search and the demo's small model run eagerly).

    The first use compiles the kernel on small inputs and checks it against the eager function; if
    compiling fails (no C++ compiler, an unsupported platform) or disagrees, a warning says so once
    and the eager path runs from then on. enabled = False turns it off (tests compare the two
    paths). CUDA keeps the eager path: not measured there.
    """

    enabled = True  # main.py: --fused_attention (on for train and eval, off for test)
    min_elements = 2 << 20  # 100 images x beam 5 at 196 x 512: 50M; one image: 0.5M
    _kernel: Callable | None = None
    _failed = False

    @classmethod
    def get(cls, elements: int, device: torch.device) -> Callable | None:
        if not cls.enabled or cls._failed or device.type != "cpu" or elements < cls.min_elements:
            return None
        if cls._kernel is None:
            cls._kernel = cls._compile()
        return cls._kernel

    @classmethod
    def _compile(cls) -> Callable | None:
        g = torch.Generator().manual_seed(0)
        enc = torch.randn(3, 1, 5, 8, generator=g)  # (N, 1, P, A)
        neg_q = torch.randn(3, 4, 1, 8, generator=g)  # (N, K, 1, A)
        w = torch.randn(8, generator=g)
        try:
            kernel = torch.compile(_energy_kernel, dynamic=True)
            with torch.inference_mode():  # as decoding calls it
                torch.testing.assert_close(kernel(enc, neg_q, w), _energy_kernel(enc, neg_q, w),
                                           rtol=1e-5, atol=1e-5)
        except Exception as exc:  # a missing compiler, an inductor bug, a wrong result: all mean "eager"
            log.warning("fused attention kernels unavailable (%s: %s); using eager attention ops",
                        type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
            cls._failed = True
            return None
        return kernel


# Teacher forcing runs the same weights and the same per-image tensors at every step. Plain autograd
# then pays, at every step, a full-size weight gradient from a handful of rows (a memory-bound outer
# product), a zero-filled full-size gradient for each `x[:b]` slice, and a fresh (b, P, A) tensor
# for each elementwise op of the attention (fresh pages cost several times the op itself on CPU).
# _Recurrence runs the whole loop as one autograd node instead: the forward writes each step's
# inputs and activations into step-major buffers (rows of step t at offs[t]:offs[t]+b_t, as in a
# PackedSequence), the backward runs back through time by hand and computes every weight gradient
# once, as one large product over all steps. The attention energies w . relu(e + q) keep no
# (b, P, A) tensor per step: the backward recomputes e + q in one reused buffer, and only
# S = sum_t dE_t * [e + q_t > 0] is accumulated, from which dE/de = S * w and dE/dw follow
# (w . relu(e + q) = w . (e + q) where it is positive: dw = sum(S * e) + sum_t u_t . q_t, u_t the
# per-step sum of S's increment over positions, which dE/dq_t needs anyway).

class _Plan:
    """Sizes of one teacher-forcing pass: b_t captions still running at step t, dropout, attention dim."""

    def __init__(self, sizes: list[int], dropout: float, attention_dim: int) -> None:
        self.sizes = sizes
        self.offs = [0]
        for b in sizes:
            self.offs.append(self.offs[-1] + b)
        self.dropout = dropout
        self.A = attention_dim
        self.release: Callable[[], None] | None = None  # called once, when the backward is done

    def rows(self, t: int) -> slice:
        return slice(self.offs[t], self.offs[t] + self.sizes[t])

    def prev_rows(self, t: int) -> slice:
        """Rows of step t-1 that step t continues (the first b_t of them)."""
        return slice(self.offs[t - 1], self.offs[t - 1] + self.sizes[t])


def _lstm_cell_(gates: Tensor, c_prev: Tensor, c: Tensor, tanh_c: Tensor, h: Tensor) -> None:
    """Activates gates (M, 4H) in place (input, forget, output | cell) and writes c, tanh(c), h (M, H)."""
    H = c.size(-1)
    gates[:, :3 * H].sigmoid_()
    gates[:, 3 * H:].tanh_()
    torch.mul(gates[:, H:2 * H], c_prev, out=c)
    c.addcmul_(gates[:, :H], gates[:, 3 * H:])
    torch.tanh(c, out=tanh_c)
    torch.mul(gates[:, 2 * H:3 * H], tanh_c, out=h)


def _lstm_cell_backward_(gates: Tensor, c_prev: Tensor, tanh_c: Tensor, dh: Tensor, dc: Tensor,
                         dgates: Tensor) -> None:
    """dgates (M, 4H) of the pre-activations from dh, dc (M, H); dc becomes the gradient of c_prev."""
    H = dh.size(-1)
    i, f, o, g = gates.split(H, dim=1)  # (M, H) each
    torch.mul(dh, tanh_c, out=dgates[:, 2 * H:3 * H])  # dh * tanh(c)
    dc.add_(torch.mul(tanh_c, tanh_c).neg_().add_(1).mul_(o).mul_(dh))  # + dh * o * (1 - tanh(c)^2)
    torch.mul(dc, g, out=dgates[:, :H])
    torch.mul(dc, c_prev, out=dgates[:, H:2 * H])
    torch.mul(dc, i, out=dgates[:, 3 * H:]).mul_(torch.mul(g, g).neg_().add_(1))  # tanh'
    sig = gates[:, :3 * H]
    dgates[:, :3 * H].mul_(torch.mul(sig, sig).neg_().add_(sig))  # sigmoid' = s - s^2
    dc.mul_(f)


class _Recurrence(torch.autograd.Function):
    """The teacher-forcing loop of AttentionDecoder (sorted captions, shrinking batch) as one node.

    feats (B,P,D), enc (B,P,A), h0/c0 (Y,B,H), emb_gates (R,G) step-major, the weights of query,
    attention, first layer's [context, h] gates and upper layers -> top hidden states (R,H) and
    attention weights (R,P), step-major. Computes what AttentionDecoder.attend and .lstm compute.
    """

    @staticmethod
    def forward(ctx, plan: _Plan, feats: Tensor, enc: Tensor, h0: Tensor, c0: Tensor, emb_gates: Tensor,
                wq: Tensor, bq: Tensor, w_att: Tensor, wc: Tensor, *upper: Tensor) -> tuple[Tensor, Tensor]:
        Y, B, H = h0.shape
        P, D, A = feats.size(1), feats.size(2), plan.A
        R, G, p = plan.offs[-1], 4 * H, plan.dropout
        new = feats.new_empty
        hq = new(R, H)  # query input: the top layer's h of the step before
        q = new(R, A + D)  # query output: attention query | context gate (pre-sigmoid)
        alpha = new(R, P)
        ctx_raw = new(R, D)  # alpha @ feats, before the gate
        gate = new(R, D)  # sigmoid of the context gate
        xs = [new(R, D + H)] + [new(R, 2 * H) for _ in range(Y - 1)]  # each layer's [input, h] rows
        acts = [new(R, G) for _ in range(Y)]  # activated gates
        cs, tanh_cs, hs = ([new(R, H) for _ in range(Y)] for _ in range(3))
        masks = [new(R, H) for _ in range(Y - 1)] if p > 0 else None  # dropout masks (scaled)
        hidden = new(B, P, A)  # max(e, -q), reused by every step
        energy = new(B, P)
        w = w_att.view(-1)  # (A,)
        for t, b in enumerate(plan.sizes):
            r = plan.rows(t)
            rp = plan.prev_rows(t) if t else None
            h_prev = [hs[y][rp] if t else h0[y, :b] for y in range(Y)]  # (b, H) each
            c_prev = [cs[y][rp] if t else c0[y, :b] for y in range(Y)]
            hq[r] = h_prev[-1]
            qr = torch.addmm(bq, hq[r], wq.t(), out=q[r])  # (b, A+D)
            att_q = qr[:, :A]  # (b, A)
            # w . relu(e + q) = w . max(e, -q) + w . q: one pass over (b, P, A) into the reused buffer.
            torch.maximum(enc[:b], att_q.neg().unsqueeze(1), out=hidden[:b])  # (b, P, A)
            e = torch.matmul(hidden[:b], w, out=energy[:b])  # (b, P)
            e.add_((att_q @ w).unsqueeze(1))
            torch.ops.aten._softmax.out(e, -1, False, out=alpha[r])  # (b, P)
            torch.bmm(alpha[r].unsqueeze(1), feats[:b], out=ctx_raw[r].unsqueeze(1))  # (b, 1, D)
            torch.sigmoid(qr[:, A:], out=gate[r])  # (b, D)
            x = xs[0][r]  # (b, D+H)
            torch.mul(ctx_raw[r], gate[r], out=x[:, :D])
            x[:, D:] = h_prev[0]
            torch.addmm(emb_gates[r], x, wc.t(), out=acts[0][r])  # (b, G)
            _lstm_cell_(acts[0][r], c_prev[0], cs[0][r], tanh_cs[0][r], hs[0][r])
            for y in range(1, Y):
                x = xs[y][r]  # (b, 2H)
                if masks is not None:  # as F.dropout draws it: bernoulli(1-p) / (1-p), same RNG order
                    m = masks[y - 1][r].bernoulli_(1 - p).div_(1 - p)
                    torch.mul(hs[y - 1][r], m, out=x[:, :H])
                else:
                    x[:, :H] = hs[y - 1][r]
                x[:, H:] = h_prev[y]
                torch.addmm(upper[2 * y - 1], x, upper[2 * y - 2].t(), out=acts[y][r])  # (b, G)
                _lstm_cell_(acts[y][r], c_prev[y], cs[y][r], tanh_cs[y][r], hs[y][r])
        ctx.plan = plan
        ctx.buffers = (hq, q, ctx_raw, gate, xs, acts, cs, tanh_cs, hs[:-1], masks, hidden)
        ctx.save_for_backward(feats, enc, h0, c0, wq, w_att, wc, *upper, hs[-1], alpha)
        return hs[-1], alpha

    @staticmethod
    def backward(ctx, d_out: Tensor, d_alpha: Tensor):
        plan = ctx.plan
        feats, enc, h0, c0, wq, w_att, wc, *rest = ctx.saved_tensors
        upper, h_top, alpha = rest[:-2], rest[-2], rest[-1]
        hq, q, ctx_raw, gate, xs, acts, cs, tanh_cs, hs, masks, work = ctx.buffers
        hs = list(hs) + [h_top]
        Y, B, H = h0.shape
        P, D, A = feats.size(1), feats.size(2), plan.A
        R = plan.offs[-1]
        w = w_att.view(-1)  # (A,)
        dh = h0.new_zeros(Y, B, H)  # gradient of each layer's h (then of h0)
        dc = c0.new_zeros(Y, B, H)
        dq = q.new_empty(R, A + D)
        dgates = [acts[0].new_empty(R, 4 * H) for _ in range(Y)]
        u = q.new_empty(R, A)  # per step: sum over positions of dE/de / w
        S = enc.new_zeros(B, P, A)  # sum over steps of dE/d(e + q) / w
        d_feats = feats.new_zeros(feats.shape) if ctx.needs_input_grad[1] else None
        for t in range(len(plan.sizes) - 1, -1, -1):
            b = plan.sizes[t]
            r = plan.rows(t)
            rp = plan.prev_rows(t) if t else None
            dh[-1, :b].add_(d_out[r])
            for y in range(Y - 1, -1, -1):
                c_prev = cs[y][rp] if t else c0[y, :b]
                _lstm_cell_backward_(acts[y][r], c_prev, tanh_cs[y][r], dh[y, :b], dc[y, :b], dgates[y][r])
                if y > 0:
                    dx = dgates[y][r] @ upper[2 * y - 2]  # (b, 2H): [below, h_prev]
                    dh[y, :b].copy_(dx[:, H:])
                    if masks is not None:
                        dh[y - 1, :b].addcmul_(dx[:, :H], masks[y - 1][r])
                    else:
                        dh[y - 1, :b].add_(dx[:, :H])
                else:
                    dx = dgates[0][r] @ wc  # (b, D+H): [context, h_prev]
                    dh[0, :b].copy_(dx[:, D:])
                    d_context = dx[:, :D]  # (b, D)
            # context = ctx_raw * sigmoid(gate_pre), ctx_raw = alpha @ feats
            g = gate[r]
            d_raw = d_context * g  # (b, D)
            torch.mul(d_context, ctx_raw[r], out=dq[r, A:]).mul_(torch.mul(g, g).neg_().add_(g))
            da = torch.bmm(d_raw.unsqueeze(1), feats[:b].transpose(1, 2)).squeeze(1)  # (b, P)
            da += d_alpha[r]
            a = alpha[r]
            if d_feats is not None:
                d_feats[:b].baddbmm_(a.unsqueeze(2), d_raw.unsqueeze(1))  # (b, P, D)
            de = (da - (da * a).sum(-1, keepdim=True)).mul_(a)  # softmax backward, (b, P)
            pre = torch.add(enc[:b], q[r, :A].unsqueeze(1), out=work[:b])  # (b, P, A)
            masked = torch.ops.aten.threshold_backward.grad_input(de.unsqueeze(-1), pre, 0, grad_input=pre)
            S[:b].add_(masked)
            torch.sum(masked, dim=1, out=u[r])  # (b, A)
            torch.mul(u[r], w, out=dq[r, :A])
            # The query read the top h of the step before. (Not addmm_: torch's FLOP counter, which
            # bench_decoder.py uses, does not see in-place products.)
            dh[-1, :b] += dq[r] @ wq
        d_w = (torch.mul(S, enc, out=work).sum((0, 1)) + (u * q[:, :A]).sum(0)).view_as(w_att)
        d_enc = S.mul_(w)  # (B, P, A)
        d_upper = []
        for y in range(1, Y):
            d_upper += [dgates[y].t() @ xs[y], dgates[y].sum(0)]
        if plan.release is not None:
            plan.release()
            plan.release = None
        return (None, d_feats, d_enc, dh, dc, dgates[0], dq.t() @ hq, dq.sum(0), d_w,
                dgates[0].t() @ xs[0], *d_upper)


class AttentionDecoder(nn.Module):
    """Two (num_layers) stacked LSTMs with gated soft attention over D-channel positions.

    Speed choices (bench/bench_decoder.py measures them): the encoder-side attention projection is
    computed once per image; the embedding's share of the first layer's gates and the output
    projection run once for all steps as large matrix products; teacher forcing sorts captions by
    length and shrinks the batch to the captions still running, and with grad runs the loop as one
    autograd node with a hand-written backward through time (_Recurrence); decoding computes the
    query and first-layer products once per parent beam; large batches compute the attention
    energies with compiled kernels (FusedAttention).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        E, A, H, Y = cfg.embed_dim, cfg.attention_dim, cfg.decoder_dim, cfg.num_layers
        C = cfg.feature_dim
        D = cfg.attend_dim
        self.cfg = cfg
        # The 1x1 convolution over the feature map is a linear map of each position's channels.
        self.feat_proj = nn.Linear(C, D) if cfg.encoder_proj_dim else None
        self.embedding = nn.Embedding(cfg.vocab_size, E)
        self.enc_att = nn.Linear(D, A)                     # encoder side of the additive attention
        self.query = nn.Linear(H, A + D)                   # decoder side of attention and the context gate
        self.full_att = nn.Linear(A, 1, bias=False)        # a bias would cancel in the softmax
        self.init_state = nn.Linear(D, 2 * Y * H)          # h and c of every layer from the mean feature
        # Gates are laid out (input, forget, output | cell) so one sigmoid and one tanh cover them.
        self.emb_gates = nn.Linear(E, 4 * H)               # layer 1, word embedding share (+ bias)
        self.ctx_gates = nn.Linear(D + H, 4 * H, bias=False)  # layer 1, [context, h] share
        self.upper = nn.ModuleList(nn.Linear(2 * H, 4 * H) for _ in range(Y - 1))  # layers 2.., [h_below, h]
        self.fc = nn.Linear(H, cfg.vocab_size)
        self.dropout = cfg.dropout
        self.reset_parameters()
        self._row_buffers: list[Tensor] = []  # see _sorted_rows

    # Teacher forcing with grad through _Recurrence (the hand-written backward through time); False:
    # plain autograd through attend() and lstm() (bench/bench_decoder.py --untaped measures both, tests
    # check they give the same gradients).
    use_tapes = True

    def reset_parameters(self) -> None:
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
        nn.init.uniform_(self.fc.weight, -0.1, 0.1)
        nn.init.zeros_(self.fc.bias)
        H = self.cfg.decoder_dim
        for lin in [self.emb_gates, *self.upper]:
            # Forget-gate bias 1: the usual LSTM start, remember by default.
            nn.init.zeros_(lin.bias)
            nn.init.ones_(lin.bias[H:2 * H])

    # -- pieces shared by teacher forcing and decoding ------------------------------------------

    def prepare(self, feats: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Per-image work done once: feats (N,P,C) -> feats (N,P,D), enc_proj (N,P,A), h, c (Y,N,H)."""
        if feats.dim() != 3 or feats.size(-1) != self.cfg.feature_dim:
            raise ValueError(f"expected features (N, P, {self.cfg.feature_dim}), got {tuple(feats.shape)}")
        if self.feat_proj is not None:
            feats = self.feat_proj(feats)  # (N, P, D)
        enc_proj = self.enc_att(feats)  # (N, P, A)
        Y, H = self.cfg.num_layers, self.cfg.decoder_dim
        init = self.init_state(feats.mean(dim=1))  # (N, 2*Y*H)
        init = init.view(-1, 2, Y, H).permute(1, 2, 0, 3)  # (2, Y, N, H)
        return feats, enc_proj, init[0].contiguous(), init[1].contiguous()

    def attend(self, feats: Tensor, enc_proj: Tensor, h_top: Tensor) -> tuple[Tensor, Tensor]:
        """Gated soft attention of K queries per image.

        feats (N,P,D), enc_proj (N,P,A), h_top (N,K,H) -> context (N,K,D), alpha (N,K,P).
        """
        A = self.cfg.attention_dim
        att_q, gate = self.query(h_top).split([A, feats.size(-1)], dim=-1)  # (N,K,A), (N,K,D)
        if torch.is_grad_enabled():
            hidden = torch.relu(enc_proj.unsqueeze(1) + att_q.unsqueeze(2))  # (N, K, P, A)
            scores = self.full_att(hidden).squeeze(-1)  # (N, K, P)
        else:
            scores = self._energies_chunked(enc_proj, att_q)  # (N, K, P)
        alpha = torch.softmax(scores, dim=-1)  # (N, K, P)
        context = torch.bmm(alpha, feats) * torch.sigmoid(gate)  # (N, K, D)
        return context, alpha

    # Elements of relu(enc_proj + q) per chunk when decoding. The (N, K, P, A) tensor of 100 images
    # x 5 beams is 200 MB, so each of its passes runs at memory speed; chunks of ~8 MB stay in the
    # cache (bench/bench_decoder.py: beam_images_per_s); the size is per thread, since the threads
    # split each chunk. Each pass over a chunk is an OpenMP region, so fewer, larger chunks also cost
    # fewer thread synchronisations (on busy cores each one can stall for a time slice).
    energy_chunk = 1 << 21

    def _energies_chunked(self, enc_proj: Tensor, att_q: Tensor) -> Tensor:
        """w . relu(enc_proj + q) without grad, a few images at a time (or all at once by a compiled
        kernel, FusedAttention). (N,P,A), (N,K,A) -> (N,K,P).

        relu(e + q) = max(e, -q) + q, so w . relu(e + q) = w . max(e, -q) + w . q: two passes over each
        chunk (maximum into one reused buffer, then the product with w) instead of add, relu and product,
        and no fresh 4 MB tensor per chunk (together ~25% of the time of this function, measured).
        """
        N, P, A = enc_proj.shape
        K = att_q.size(1)
        w = self.full_att.weight.view(-1)  # (A,)
        fused = FusedAttention.get(N * K * P * A, enc_proj.device)
        if fused:  # one pass over e per step, nothing of (N, K, P, A) written
            out = fused(enc_proj.unsqueeze(1), att_q.neg().unsqueeze(2), w.detach())  # (N, K, P)
            return out.add_((att_q @ w).unsqueeze(-1))
        per_chunk = min(N, max(1, self.energy_chunk * torch.get_num_threads() // (K * P * A)))
        buf = enc_proj.new_empty(per_chunk, K, P, A)
        out = enc_proj.new_empty(N, K, P)
        neg_q = att_q.neg().unsqueeze(2)  # (N, K, 1, A)
        for i in range(0, N, per_chunk):
            n = min(per_chunk, N - i)
            hidden = torch.maximum(enc_proj[i:i + n].unsqueeze(1), neg_q[i:i + n], out=buf[:n])  # (n,K,P,A)
            torch.matmul(hidden, w, out=out[i:i + n])  # (n, K, P)
        return out.add_((att_q @ w).unsqueeze(-1))  # (N, K, P)

    @staticmethod
    def _cell(gates: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        H = c.size(-1)
        ifo = torch.sigmoid(gates[..., :3 * H])  # (..., 3H)
        g = torch.tanh(gates[..., 3 * H:])  # (..., H)
        c = ifo[..., H:2 * H] * c + ifo[..., :H] * g  # (..., H)
        h = ifo[..., 2 * H:] * torch.tanh(c)  # (..., H)
        return h, c

    def lstm(self, emb_gates: Tensor, context: Tensor, h: list[Tensor], c: list[Tensor]
             ) -> tuple[list[Tensor], list[Tensor]]:
        """One step of the stacked LSTM. emb_gates (M,G), context (M,D), h/c: Y tensors (M,H)."""
        x = torch.cat([context, h[0]], dim=1)  # (M, D+H)
        gates = torch.addmm(emb_gates, x, self.ctx_gates.weight.t())  # (M, G)
        h0, c0 = self._cell(gates, c[0])
        new_h, new_c = [h0], [c0]
        for layer, lin in enumerate(self.upper, start=1):
            below = F.dropout(new_h[-1], self.dropout, self.training)  # (M, H)
            x = torch.cat([below, h[layer]], dim=1)  # (M, 2H)
            gates = lin(x)  # (M, G)
            hl, cl = self._cell(gates, c[layer])
            new_h.append(hl)
            new_c.append(cl)
        return new_h, new_c

    def step(self, words: Tensor, feats: Tensor, enc_proj: Tensor, h: Tensor, c: Tensor,
             word_gates: Tensor | None = None, shared: tuple[Tensor, Tensor] | None = None
             ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """One decoding step for K hypotheses per image.

        words (N,K), feats (N,P,D), enc_proj (N,P,A), h/c (Y,N,K,H), word_gates (V,G) or None: the
        embedding's share of the first layer's gates for every word (see _word_gates); shared:
        (first (U,), inverse (N*K,)) when hypotheses continue the same beam (equal h and c): the
        products that depend only on the state run for one row of each (see _shared_rows)
        -> log_probs (N,K,V), alpha (N,K,P), h, c (Y,N,K,H).
        """
        N, K = words.shape
        if word_gates is None:
            emb_gates = self.emb_gates(self.embedding(words.reshape(-1)))  # (N*K, G)
        else:
            emb_gates = word_gates.index_select(0, words.reshape(-1))  # (N*K, G)
        if torch.is_grad_enabled():
            context, alpha = self.attend(feats, enc_proj, h[-1])  # (N,K,D), (N,K,P)
            hs, cs = self.lstm(emb_gates, context.reshape(N * K, -1), list(h.flatten(1, 2)), list(c.flatten(1, 2)))
            h = torch.stack(hs).view(-1, N, K, hs[0].size(-1))  # (Y, N, K, H)
            c = torch.stack(cs).view(-1, N, K, cs[0].size(-1))  # (Y, N, K, H)
        else:
            alpha, h, c = self._step_states(emb_gates, feats, enc_proj, h, c, shared)
        logits = self.fc(h[-1].reshape(N * K, -1))  # (N*K, V)
        log_probs = torch.log_softmax(logits, dim=-1).view(N, K, -1)  # (N, K, V)
        return log_probs, alpha, h, c

    def _step_states(self, emb_gates: Tensor, feats: Tensor, enc_proj: Tensor, h: Tensor, c: Tensor,
                     shared: tuple[Tensor, Tensor] | None = None
                     ) -> tuple[Tensor, Tensor, Tensor]:
        """attend() and lstm() of step() without grad, writing into fresh state tensors instead of
        concatenating and stacking (a 500-row step copied ~10 MB that way). -> alpha (N,K,P), h, c (Y,N,K,H)."""
        Y, N, K, H = h.shape
        A, D, M = self.cfg.attention_dim, self.cfg.attend_dim, N * K
        if shared is None:
            q = self.query(h[-1])  # (N, K, A+D)
        else:
            first, inverse = shared
            q = self.query(h[-1].reshape(M, H).index_select(0, first)).index_select(0, inverse).view(N, K, -1)
        att_q, gate = q.split([A, D], dim=-1)  # (N,K,A), (N,K,D)
        alpha = torch.softmax(self._energies_chunked(enc_proj, att_q), dim=-1)  # (N, K, P)
        raw = torch.bmm(alpha, feats)  # (N, K, D)
        x = h.new_empty(N, K, D + H)  # [context, h of layer 1]
        torch.mul(raw, torch.sigmoid(gate), out=x[..., :D])
        x[..., D:] = h[0]
        new_h, new_c = h.new_empty(Y, M, H), h.new_empty(Y, M, H)
        if shared is None:
            gates = torch.addmm(emb_gates, x.view(M, D + H), self.ctx_gates.weight.t())  # (M, G)
        else:  # [context, h] is equal for hypotheses of one parent: the product runs once per parent
            gates = (x.view(M, D + H).index_select(0, first) @ self.ctx_gates.weight.t())  # (U, G)
            gates = gates.index_select(0, inverse).add_(emb_gates)  # (M, G)
        new_h[0], new_c[0] = self._cell(gates, c[0].view(M, H))
        for layer, lin in enumerate(self.upper, start=1):
            below = F.dropout(new_h[layer - 1], self.dropout, self.training)  # (M, H)
            gates = lin(torch.cat([below, h[layer].view(M, H)], dim=1))  # (M, G)
            new_h[layer], new_c[layer] = self._cell(gates, c[layer].view(M, H))
        return alpha, new_h.view(Y, N, K, H), new_c.view(Y, N, K, H)

    # -- teacher forcing ------------------------------------------------------------------------

    def forward(self, feats: Tensor, captions: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """feats (B,P,C), captions (B,T), lengths (B,) -> logits (B,T-1,V), alphas (B,T-1,P).

        Outputs are in input order and padded to T-1 with zeros (the loss masks them), so every
        DataParallel replica returns the same T.
        """
        B, T = captions.shape
        steps = (lengths - 1).clamp(min=0, max=T - 1)  # (B,) real decoding steps
        order = torch.argsort(steps, descending=True, stable=True)  # (B,)
        steps_sorted = steps[order].tolist()
        feats, release = self._sorted_rows(feats, order)  # (B, P, C)
        feats, enc_proj, h0, c0 = self.prepare(feats)  # (B,P,D), (B,P,A), (Y,B,H)
        # Captions are sorted by length, so the ones still running at step t are a prefix of b_t rows.
        sizes = [sum(1 for s in steps_sorted if s > t) for t in range(steps_sorted[0] if B else 0)]
        if sizes:
            # The input words of real steps only, step-major (as a PackedSequence): the embedding's
            # share of the first layer's gates is one product, and its per-step parts are row ranges.
            dev = captions.device
            row = torch.cat([torch.arange(b, device=dev) for b in sizes])  # (R,)
            col = torch.repeat_interleave(torch.arange(len(sizes), device=dev), torch.tensor(sizes, device=dev))
            words = captions[order[row], col]  # (R,)
            emb_gates = self.emb_gates(self.embedding(words))  # (R, G)
        else:
            emb_gates = feats.new_zeros(0, 4 * self.cfg.decoder_dim)
        if sizes and self.use_tapes and torch.is_grad_enabled():
            hidden, alphas = self._recurrence(sizes, feats, enc_proj, h0, c0, emb_gates, release)
        else:
            h, c = list(h0), list(c0)
            outs, att = [], []
            for t, (b, gates) in enumerate(zip(sizes, emb_gates.split(sizes))):
                if b < h[0].size(0):
                    h = [x[:b] for x in h]
                    c = [x[:b] for x in c]
                context, alpha = self.attend(feats[:b], enc_proj[:b], h[-1].unsqueeze(1))  # (b,1,D), (b,1,P)
                h, c = self.lstm(gates, context.squeeze(1), h, c)
                outs.append(h[-1])
                att.append(alpha.squeeze(1))
            hidden = torch.cat(outs) if outs else feats.new_zeros(0, self.cfg.decoder_dim)  # (R, H)
            alphas = torch.cat(att) if att else feats.new_zeros(0, feats.size(1))  # (R, P)
        return self._scatter_packed(hidden, alphas, sizes, order, feats.size(0), T)

    def _sorted_rows(self, feats: Tensor, order: Tensor) -> tuple[Tensor, Callable[[], None] | None]:
        """feats[order], and for a training pass on CPU a function that hands its buffer back.

        A fresh (32, 196, 2048) tensor costs ~40 ms of page faults on CPU, 5x the copy itself
        (above 32 MiB glibc always maps new pages). A training pass takes a buffer from a small
        pool and _Recurrence's backward returns it: by then nothing of that pass reads it any
        more except the encoder side's weight gradient, which runs within the same backward.
        """
        if (feats.requires_grad or feats.device.type != "cpu" or not self.use_tapes
                or not torch.is_grad_enabled()):
            return feats.index_select(0, order), None
        pool = self._row_buffers
        for i, buf in enumerate(pool):
            if buf.shape == feats.shape and buf.dtype == feats.dtype:
                pool.pop(i)
                break
        else:
            buf = torch.empty_like(feats)

        def release() -> None:
            pool[:] = [b for b in pool if b.shape != buf.shape][:1] + [buf]  # at most 2 kept

        return torch.index_select(feats, 0, order, out=buf), release

    def _recurrence(self, sizes: list[int], feats: Tensor, enc_proj: Tensor, h0: Tensor, c0: Tensor,
                    emb_gates: Tensor, release: Callable[[], None] | None = None) -> tuple[Tensor, Tensor]:
        """The loop through _Recurrence -> top hidden states (R,H), alphas (R,P), step-major.

        It runs in the weights' dtype with autocast off: its buffers have one dtype (under AMP the
        large products around it, encoder side and output projection, still run in low precision).
        """
        dtype = self.ctx_gates.weight.dtype
        weights = [self.query.weight, self.query.bias, self.full_att.weight, self.ctx_gates.weight]
        for lin in self.upper:
            weights += [lin.weight, lin.bias]
        plan = _Plan(sizes, self.dropout if self.training else 0.0, self.cfg.attention_dim)
        plan.release = release
        with torch.autocast(feats.device.type, enabled=False):
            inputs = [x.to(dtype).contiguous() for x in (feats, enc_proj, h0, c0, emb_gates)]
            return _Recurrence.apply(plan, *inputs, *weights)

    def _scatter_packed(self, hidden: Tensor, alphas: Tensor, sizes: list[int], order: Tensor, B: int,
                        T: int) -> tuple[Tensor, Tensor]:
        """Step-major hidden (R,H), alphas (R,P) of b_t rows per step -> padded (B,T-1,.) in input order."""
        P, V = alphas.size(-1), self.cfg.vocab_size
        logits = hidden.new_zeros(B * (T - 1), V)
        out_alphas = alphas.new_zeros(B * (T - 1), P)
        if not sizes:
            return logits.view(B, T - 1, V), out_alphas.view(B, T - 1, P)
        hidden = F.dropout(hidden, self.dropout, self.training)
        rows = torch.cat([order[:b] * (T - 1) + t for t, b in enumerate(sizes)])  # (R,)
        logits = logits.index_copy(0, rows, self.fc(hidden))  # (B*(T-1), V)
        out_alphas = out_alphas.index_copy(0, rows, alphas)  # (B*(T-1), P)
        return logits.view(B, T - 1, V), out_alphas.view(B, T - 1, P)


# --------------------------------------------------------------------------------------------
# Whole model and loss
# --------------------------------------------------------------------------------------------

class CaptionModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg) if cfg.encoder != "features" else None
        self.decoder = AttentionDecoder(cfg)

    def encode(self, images: Tensor) -> Tensor:
        """images (B,3,H,W) -> feats (B,P,C). A features model passes (B,P,C) features through."""
        if self.encoder is None:
            if images.dim() == 3:
                return images
            raise ValueError("this model was trained on cached features and has no image encoder; "
                             "pass features (B, P, C)")
        if images.dim() != 4 or images.size(1) != 3:
            raise ValueError(f"expected images (B, 3, H, W), got {tuple(images.shape)}")
        return self.encoder(images)

    def forward(self, inputs: Tensor, captions: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """inputs: images (B,3,H,W) or features (B,P,C) -> logits (B,T-1,V), alphas (B,T-1,P)."""
        return self.decoder(self.encode(inputs), captions, lengths)


def build_model(cfg: ModelConfig) -> CaptionModel:
    """The model of `cfg`; raises EncoderWeightsError when pretrained weights cannot be had."""
    return CaptionModel(cfg)


def caption_loss(logits: Tensor, captions: Tensor, lengths: Tensor, alphas: Tensor, alpha_c: float
                 ) -> tuple[Tensor, Tensor]:
    """(loss, cross-entropy): mean cross-entropy over real tokens + alpha_c * attention regulariser.

    logits (B,T-1,V), captions (B,T), lengths (B,) counting <sos> and <eos>, alphas (B,T-1,P).
    The regulariser (Xu et al. 2015, eq. 14) pushes each position's attention summed over the real
    steps towards 1; padded steps never count.
    """
    steps = logits.size(1)
    mask = torch.arange(steps, device=logits.device) < (lengths.to(logits.device) - 1).unsqueeze(1)  # (B, T-1)
    targets = captions[:, 1:steps + 1]  # (B, T-1)
    ce = F.cross_entropy(logits[mask], targets[mask])
    attention_sum = (alphas * mask.unsqueeze(-1)).sum(dim=1)  # (B, P)
    reg = ((1.0 - attention_sum) ** 2).mean()
    return ce + alpha_c * reg, ce


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------

def _mask_log_probs(log_probs: Tensor, history: Tensor, *, sos_id: int, unk_id: int, cfg: DecodeConfig) -> Tensor:
    """Forbid tokens: <sos> always, <unk> when suppressed, a trigram's repeat when blocked.

    log_probs (N,K,V), history (N,K,t) of generated tokens.
    """
    log_probs[..., sos_id] = -math.inf
    if cfg.suppress_unk:
        log_probs[..., unk_id] = -math.inf
    t = history.size(-1)
    if cfg.block_repeat_trigrams and t >= 3:
        # The next token would repeat a trigram when the last two tokens occurred earlier as a
        # pair: ban whatever followed that pair. scatter_add keeps duplicates deterministic.
        last2 = history[..., -2:]  # (N, K, 2)
        match = (history[..., :-2] == last2[..., :1]) & (history[..., 1:-1] == last2[..., 1:])  # (N,K,t-2)
        banned = torch.zeros_like(log_probs).scatter_add_(-1, history[..., 2:], match.to(log_probs.dtype))
        log_probs.masked_fill_(banned > 0, -math.inf)
    return log_probs


def _normalise(score: Tensor, length: Tensor | float, penalty: float) -> Tensor:
    return score / (length ** penalty) if penalty else score


def _select(index: Tensor, *tensors: Tensor | None, dim: int = 0) -> list[Tensor | None]:
    return [None if x is None else x.index_select(dim, index) for x in tensors]


def _word_gates(decoder: AttentionDecoder, lookups: int) -> Tensor | None:
    """The embedding's share of the first layer's gates for every word (V,G), when decoding will look up
    at least twice as many rows (images x beams x max_len) as there are words; else None (per step).

    One (V,E) x (E,G) product instead of one per step: for 100 images x 5 beams x 20 steps and 2,600
    words, 4x fewer FLOPs in that layer (about 6% of batched beam search); one image alone stays per step.
    """
    if lookups < 2 * decoder.cfg.vocab_size:
        return None
    return decoder.emb_gates(decoder.embedding.weight)  # (V, G)


def _start(model: CaptionModel, feats: Tensor) -> tuple[AttentionDecoder, Tensor, Tensor, Tensor, Tensor]:
    """-> decoder, feats (N,P,D), enc_proj (N,P,A), h, c (Y,N,1,H)."""
    decoder = model.decoder
    feats = model.encode(feats) if feats.dim() == 4 else feats
    feats, enc_proj, h, c = decoder.prepare(feats)  # (N,P,D), (N,P,A), (Y,N,H)
    return decoder, feats, enc_proj, h.unsqueeze(2), c.unsqueeze(2)


@torch.inference_mode()
def greedy_decode(model: CaptionModel, feats: Tensor, *, sos_id: int, eos_id: int, unk_id: int,
                  cfg: DecodeConfig = DecodeConfig()) -> Decoded:
    """Most likely next word at each step, batched over images (finished captions leave the batch).

    feats (N,P,C) features (or images (N,3,H,W), encoded first) -> Decoded.
    """
    decoder, feats, enc_proj, h, c = _start(model, feats)
    N, P = enc_proj.size(0), enc_proj.size(1)
    out_tokens: list[list[int]] = [[] for _ in range(N)]
    out_scores = [0.0] * N
    out_alphas: list[Tensor] = [enc_proj.new_zeros(0, P) for _ in range(N)]
    live = torch.arange(N, device=enc_proj.device)  # (n,) original index of each running caption
    words = enc_proj.new_full((N, 1), sos_id, dtype=torch.long)  # (n, 1)
    history = words.new_zeros(N, 1, 0)  # (n, 1, t)
    alpha_hist = enc_proj.new_zeros(N, 0, P)  # (n, t, P)
    scores = enc_proj.new_zeros(N)  # (n,)
    word_gates = _word_gates(decoder, N * cfg.max_len)  # (V, G) or None
    for t in range(cfg.max_len):
        log_probs, alpha, h, c = decoder.step(words, feats, enc_proj, h, c, word_gates)  # (n,1,V), (n,1,P)
        log_probs = _mask_log_probs(log_probs, history, sos_id=sos_id, unk_id=unk_id, cfg=cfg)
        best, words = log_probs.topk(1, dim=-1)  # (n,1,1): topk, as beam search, so ties break alike
        words = words.squeeze(-1)  # (n, 1)
        scores = scores + best.view(-1)
        done = words.view(-1) == eos_id  # (n,)
        history = torch.cat([history, words.unsqueeze(-1)], dim=-1)  # (n, 1, t+1)
        alpha_hist = torch.cat([alpha_hist, alpha], dim=1)  # (n, t+1, P)
        last = t == cfg.max_len - 1
        if last:
            done = torch.ones_like(done)
        if bool(done.any()):
            for j in done.nonzero().view(-1).tolist():
                i = int(live[j])
                toks = history[j, 0].tolist()
                ended = toks[-1] == eos_id
                n_words = len(toks) - 1 if ended else len(toks)
                out_tokens[i] = toks[:n_words]
                out_alphas[i] = alpha_hist[j, :n_words].clone()
                out_scores[i] = float(_normalise(scores[j], float(len(toks)), cfg.length_penalty))
            keep = (~done).nonzero().view(-1)  # (n',)
            if keep.numel() == 0:
                break
            live, words, history, alpha_hist, scores, feats, enc_proj = _select(
                keep, live, words, history, alpha_hist, scores, feats, enc_proj)
            h, c = _select(keep, h, c, dim=1)
    return Decoded(out_tokens, out_scores, out_alphas)


def _shared_rows(parent: Tensor) -> tuple[Tensor, Tensor] | None:
    """Hypotheses that extend the same beam have equal states: (first (U,), inverse (n*K,)) for step(),
    first the row of one hypothesis per distinct (image, parent), inverse each row's entry in first;
    None when all parents differ.

    parent (n,K). After the first step every image's K hypotheses share one parent; later, on the
    bench's untrained model, about 4 of 5 are distinct (1 thread: the query and first-layer products
    then run on ~80% of the rows).
    """
    n, K = parent.shape
    key = (parent + torch.arange(n, device=parent.device).unsqueeze(1) * K).view(-1)  # (n*K,)
    uniq, inverse = torch.unique(key, return_inverse=True)  # (U,), (n*K,)
    if uniq.numel() == key.numel():
        return None
    rows = torch.arange(key.numel(), device=key.device)
    first = torch.full_like(uniq, key.numel()).scatter_reduce_(0, inverse, rows, "amin")  # (U,)
    return first, inverse


def _trace_alphas(alphas: list[Tensor], parents: list[Tensor], rows: Tensor, slot: Tensor) -> Tensor:
    """Attention maps of hypotheses, followed back through the beams' parents.

    alphas[s] (n,k,P) of step s, parents[s] (n,K) the beam each slot came from after step s;
    rows (m,), slot (m,) a beam of the last step -> (m, len(alphas), P).
    """
    out = [alphas[-1][rows, slot]]  # (m, P)
    for s in range(len(alphas) - 2, -1, -1):
        slot = parents[s][rows, slot]  # (m,)
        out.append(alphas[s][rows, slot])
    return torch.stack(out[::-1], dim=1)  # (m, t, P)


@torch.inference_mode()
def beam_search(model: CaptionModel, feats: Tensor, *, sos_id: int, eos_id: int, unk_id: int,
                cfg: DecodeConfig = DecodeConfig()) -> Decoded:
    """Beam search, all beams of all images in one tensor; returns the best hypothesis per image.

    An image is finished when K of its hypotheses have ended, or when no running beam can beat its
    best ended one any more (that stop never changes the answer); it then leaves the batch. If no
    hypothesis ends within max_len tokens, the best unfinished one is returned.
    feats (N,P,C) features (or images (N,3,H,W), encoded first) -> Decoded.
    """
    K, lp = cfg.beam_size, cfg.length_penalty
    decoder, feats, enc_proj, h, c = _start(model, feats)
    N, P = enc_proj.size(0), enc_proj.size(1)
    dev = enc_proj.device
    out_tokens: list[list[int]] = [[] for _ in range(N)]
    out_scores = [0.0] * N
    out_alphas: list[Tensor] = [enc_proj.new_zeros(0, P) for _ in range(N)]
    live = torch.arange(N, device=dev)  # (n,) original image of each running row
    # Step 0 runs one beam per image (all K would be identical); later steps run K.
    words = torch.full((N, 1), sos_id, dtype=torch.long, device=dev)  # (n, k)
    scores = enc_proj.new_zeros(N, 1)  # (n, k) summed log-probabilities
    history = words.new_zeros(N, 1, 0)  # (n, k, t)
    # Attention maps stay where each step wrote them, with back-pointers to the parent beams: copying
    # every beam's (t, P) history at every step was O(t) memory traffic per step (backtracked when read).
    alphas: list[Tensor] = []  # per step (n, k, P)
    parents: list[Tensor] = []  # per step (n, K): the beam of the step before that each beam extends
    best_score = enc_proj.new_full((N,), -math.inf)  # (n,) best ended hypothesis, normalised
    best_tokens = words.new_zeros(N, cfg.max_len)  # (n, max_len)
    best_len = words.new_zeros(N)  # (n,) tokens of it, <eos> included
    best_alpha = enc_proj.new_zeros(N, cfg.max_len, P)  # (n, max_len, P)
    n_ended = words.new_zeros(N)  # (n,)
    word_gates = _word_gates(decoder, N * K * cfg.max_len)  # (V, G) or None
    for t in range(cfg.max_len):
        n, k = words.shape
        shared = _shared_rows(parents[-1]) if parents else None
        log_probs, alpha, h, c = decoder.step(words, feats, enc_proj, h, c, word_gates, shared)  # (n,k,V), (n,k,P), (Y,n,k,H)
        alphas.append(alpha)
        log_probs = _mask_log_probs(log_probs, history, sos_id=sos_id, unk_id=unk_id, cfg=cfg)
        V = log_probs.size(-1)
        cand = log_probs.add_(scores.unsqueeze(-1)).view(n, k * V)  # (n, k*V)
        # 2K candidates always hold K that do not end: each beam has one <eos> candidate.
        cand_scores, cand_ids = cand.topk(min(2 * K, k * V), dim=1)  # (n, 2K)
        parent = cand_ids // V  # (n, 2K)
        token = cand_ids % V  # (n, 2K)
        ends = token == eos_id  # (n, 2K)
        # Hypotheses ending here: only those ranked within the top K count, as in standard beam search.
        ranked = torch.arange(cand_ids.size(1), device=dev) < K  # (2K,)
        ended = ends & ranked & torch.isfinite(cand_scores)  # (n, 2K)
        length = t + 1  # tokens including <eos>
        if bool(ended.any()):
            n_ended = n_ended + ended.sum(dim=1)
            norm = torch.where(ended, _normalise(cand_scores, float(length), lp), -math.inf)  # (n, 2K)
            top, top_j = norm.max(dim=1)  # (n,)
            better = top > best_score  # (n,) strict: an earlier (shorter) tie stays
            if bool(better.any()):
                rows = better.nonzero().view(-1)  # (m,)
                p = parent[rows, top_j[rows]]  # (m,)
                best_tokens[rows, :t] = history[rows, p]
                best_tokens[rows, t] = token[rows, top_j[rows]]
                best_alpha[rows, :length] = _trace_alphas(alphas, parents, rows, p)
                best_score = torch.where(better, top, best_score)
                best_len = torch.where(better, torch.full_like(best_len, length), best_len)
        # The next live beams: the K best candidates that do not end (stable sort keeps score order).
        keep_j = torch.sort(ends.to(torch.uint8), dim=1, stable=True).indices[:, :K]  # (n, K)
        parent = parent.gather(1, keep_j)  # (n, K)
        parents.append(parent)
        words = token.gather(1, keep_j)  # (n, K)
        # With fewer than 2K candidates (tiny vocabularies) an ending one can be kept: it must not run on.
        scores = cand_scores.gather(1, keep_j).masked_fill(ends.gather(1, keep_j), -math.inf)  # (n, K)
        history = torch.cat([history.gather(1, parent.unsqueeze(-1).expand(-1, -1, history.size(-1))),
                             words.unsqueeze(-1)], dim=-1)  # (n, K, t+1)
        # Rows of (Y, n*k, H): index_select copies whole rows (gather over an expanded index was ~3x slower).
        rows = (parent + torch.arange(n, device=dev).unsqueeze(1) * k).view(-1)  # (n*K,)
        h = h.flatten(1, 2).index_select(1, rows).view(h.size(0), n, parent.size(1), -1)  # (Y, n, K, H)
        c = c.flatten(1, 2).index_select(1, rows).view(c.size(0), n, parent.size(1), -1)  # (Y, n, K, H)
        # Finished: K ended, or nothing running can still beat the best ended hypothesis (summed
        # log-probabilities only fall; with a length penalty the bound divides by the longest length).
        bound = _normalise(scores.max(dim=1).values, float(cfg.max_len) if lp else 1.0, lp)  # (n,)
        done = (n_ended >= K) | ((n_ended > 0) & (best_score >= bound))  # (n,)
        if t == cfg.max_len - 1:
            done = torch.ones_like(done)
        if bool(done.any()):
            finished = done.nonzero().view(-1)  # (m,)
            unended = finished[n_ended[finished] == 0]  # (u,)
            if unended.numel():  # beam 0 is the best: topk sorts
                traced = _trace_alphas(alphas, parents[:-1], unended, parent[unended, 0])  # (u, t+1, P)
                traced = dict(zip(unended.tolist(), traced))
            for j in finished.tolist():
                i = int(live[j])
                if int(n_ended[j]) > 0:
                    L = int(best_len[j]) - 1  # drop <eos>
                    out_tokens[i] = best_tokens[j, :L].tolist()
                    out_alphas[i] = best_alpha[j, :L].clone()
                    out_scores[i] = float(best_score[j])
                else:
                    out_tokens[i] = history[j, 0].tolist()
                    out_alphas[i] = traced[j].clone()
                    out_scores[i] = float(_normalise(scores[j, 0], float(history.size(-1)), lp))
            keep = (~done).nonzero().view(-1)  # (n',)
            if keep.numel() == 0:
                break
            (live, words, scores, history, best_score, best_tokens, best_len, best_alpha, n_ended,
             feats, enc_proj) = _select(keep, live, words, scores, history, best_score, best_tokens,
                                        best_len, best_alpha, n_ended, feats, enc_proj)
            alphas, parents = _select(keep, *alphas), _select(keep, *parents)
            h, c = _select(keep, h, c, dim=1)
    return Decoded(out_tokens, out_scores, out_alphas)


def decode(model: CaptionModel, feats: Tensor, *, sos_id: int, eos_id: int, unk_id: int,
           cfg: DecodeConfig = DecodeConfig()) -> Decoded:
    """Greedy when cfg.beam_size == 1, beam search otherwise."""
    fn = greedy_decode if cfg.beam_size == 1 else beam_search
    return fn(model, feats, sos_id=sos_id, eos_id=eos_id, unk_id=unk_id, cfg=cfg)
