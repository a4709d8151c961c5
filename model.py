"""Show, Attend and Tell: an image encoder and a two-layer attention LSTM.

Encoder (encoders.py: a torchvision ResNet or Inception v3, any timm backbone, or a small plain CNN
for quick runs from random weights) -> adaptive pool to S x S -> P = S*S positions of C channels.
Decoder: soft additive attention over the positions, a sigmoid gate on the attended context,
stacked LSTM layers whose first layer reads the word embedding and the gated context, initial
states from the mean feature, output projection to the vocabulary. `AttentionDecoder.step` is the
one decoder step; decoding.py's greedy, beam search and sampling call it too.

Letters in shape comments: B batch, T caption length (with <sos>/<eos>), L decoded length,
P encoder positions, C encoder channels, D channels the decoder attends over (C, or
encoder_proj_dim), E embedding, A attention, H hidden, V vocabulary, K beam size, N images,
G LSTM gates (4H), Y layers.

This module knows nothing of files on disk (except a weights file named in the config) or the CLI.
"""
from __future__ import annotations

import logging
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import cpu_recurrence as cpu_rec
from config import FEATURES, DecodeConfig, ModelConfig  # noqa: F401 (DecodeConfig: re-exported)
# The encoder lives in encoders.py (the one place that knows a backbone); re-exported here.
from encoders import Encoder, EncoderWeightsError, image_transform, resolve  # noqa: F401

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Decoder
# --------------------------------------------------------------------------------------------

def _lstm_cell(gates: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """gates (..., G) laid out (input, forget, output | cell), c (..., H) -> h, c (..., H)."""
    H = c.size(-1)
    ifo = torch.sigmoid(gates[..., :3 * H])  # (..., 3H)
    g = torch.tanh(gates[..., 3 * H:])  # (..., H)
    c = ifo[..., H:2 * H] * c + ifo[..., :H] * g  # (..., H)
    h = ifo[..., 2 * H:] * torch.tanh(c)  # (..., H)
    return h, c


class AttentionDecoder(nn.Module):
    """Stacked LSTMs (num_layers) with gated soft attention over D-channel positions.

    `step` is the one decoder step: teacher forcing, greedy, beam search and sampling all call it,
    on every device. Teacher forcing keeps the ideas that give most of the speed
    (bench/bench_decoder.py measures them): the encoder-side attention projection is computed once
    per image; captions are sorted by length and the batch shrinks to the captions still running;
    the embedding's share of the first layer's gates and the output projection run once for all
    steps as large matrix products. On CPU under grad the loop runs through cpu_recurrence.py (a
    hand-written backward through time; bench/bench_decoder.py times both paths) unless the
    caller turns it off.
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
        feats = F.dropout(feats, self.cfg.feature_dropout, self.training)
        if self.feat_proj is not None:
            feats = self.feat_proj(feats)  # (N, P, D)
        enc_proj = self.enc_att(feats)  # (N, P, A)
        Y, H = self.cfg.num_layers, self.cfg.decoder_dim
        init = self.init_state(feats.mean(dim=1))  # (N, 2*Y*H)
        init = init.view(-1, 2, Y, H).permute(1, 2, 0, 3)  # (2, Y, N, H)
        return feats, enc_proj, init[0].contiguous(), init[1].contiguous()

    def word_gates(self, words: Tensor) -> Tensor:
        """The embedding's share of the first layer's gates: words (...) -> (..., G)."""
        return self.emb_gates(F.dropout(self.embedding(words), self.cfg.embed_dropout, self.training))

    def step(self, emb_gates: Tensor, feats: Tensor, enc_proj: Tensor, h: Tensor, c: Tensor
             ) -> tuple[Tensor, Tensor, Tensor]:
        """The decoder step (Xu et al. 2015, soft attention with the gate of their section 4.2.1)
        for K hypotheses per image: attention, gated context, the stacked LSTM cells.

        emb_gates (N,K,G) of the input words (word_gates), feats (N,P,D), enc_proj (N,P,A),
        h/c (Y,N,K,H) -> h, c (Y,N,K,H), alpha (N,K,P). cpu_recurrence.py repeats this arithmetic.
        """
        att_q, gate = self.query(h[-1]).split([enc_proj.size(-1), feats.size(-1)], dim=-1)  # (N,K,A), (N,K,D)
        # relu in place: the sum is a fresh tensor, and one (N, K, P, A) tensor less per step made
        # batched beam search's energies 1.6x faster (they are memory bound).
        hidden = (enc_proj.unsqueeze(1) + att_q.unsqueeze(2)).relu_()  # (N, K, P, A)
        alpha = torch.softmax(self.full_att(hidden).squeeze(-1), dim=-1)  # (N, K, P)
        context = torch.bmm(alpha, feats) * torch.sigmoid(gate)  # (N, K, D)
        gates = emb_gates + self.ctx_gates(torch.cat([context, h[0]], dim=-1))  # (N, K, G)
        new_h, new_c = _lstm_cell(gates, c[0])  # (N, K, H) each
        hs, cs = [new_h], [new_c]
        for layer, lin in enumerate(self.upper, start=1):
            below = F.dropout(hs[-1], self.dropout, self.training)  # (N, K, H)
            new_h, new_c = _lstm_cell(lin(torch.cat([below, h[layer]], dim=-1)), c[layer])
            hs.append(new_h)
            cs.append(new_c)
        return torch.stack(hs), torch.stack(cs), alpha

    def logits(self, h_top: Tensor) -> Tensor:
        """Output projection of the top layer's hidden state: (..., H) -> (..., V)."""
        return self.fc(F.dropout(h_top, self.dropout, self.training))

    # -- teacher forcing ------------------------------------------------------------------------

    def forward(self, feats: Tensor, captions: Tensor, lengths: Tensor, *, cpu_recurrence: bool = True,
                host_lengths: Sequence[int] | None = None) -> tuple[Tensor, Tensor]:
        """feats (B,P,C), captions (B,T), lengths (B,) -> logits (B,T-1,V), alphas (B,T-1,P).

        Outputs are in input order and padded to T-1 with zeros (the loss masks them), so every
        DataParallel replica returns the same T. cpu_recurrence: run the loop through
        cpu_recurrence.py where it supports the inputs (CPU training); False: always the reference.
        host_lengths: the same lengths as Python ints (the collated batch's host copy). The loop's
        shape (how many captions run at each step) is read from them, so the forward never waits
        for the device; without them it is read from `lengths` (one host-device sync).
        """
        B, T = captions.shape
        host = lengths.tolist() if host_lengths is None else host_lengths
        host_steps = [min(max(n - 1, 0), T - 1) for n in host]
        # Captions are sorted by length, so the ones still running at step t are a prefix of b_t rows.
        sizes = [sum(1 for s in host_steps if s > t) for t in range(max(host_steps, default=0))]
        steps = (lengths - 1).clamp(min=0, max=T - 1)  # (B,) real decoding steps
        order = torch.argsort(steps, descending=True, stable=True)  # (B,)
        feats, enc_proj, h0, c0 = self.prepare(feats.index_select(0, order))  # (B,P,D), (B,P,A), (Y,B,H)
        if not sizes:
            return feats.new_zeros(B, T - 1, self.cfg.vocab_size), feats.new_zeros(B, T - 1, feats.size(1))
        # The input words of real steps only, step-major (as a PackedSequence): the embedding's
        # share of the first layer's gates is one product, and its per-step parts are row ranges.
        # Packed row r is caption row[r] (in sorted order) at step col[r]; built on the device
        # from b_t, with the sizes from the host (output_size: repeat_interleave need not wait).
        dev = captions.device
        running = steps.unsqueeze(0) > torch.arange(len(sizes), device=dev).unsqueeze(1)  # (S, B)
        counts = running.sum(dim=1)  # (S,) b_t, equal to `sizes`
        col = torch.repeat_interleave(torch.arange(len(sizes), device=dev), counts, output_size=sum(sizes))  # (R,)
        row = torch.arange(sum(sizes), device=dev) - (counts.cumsum(0) - counts)[col]  # (R,)
        emb_gates = self.word_gates(captions[order[row], col])  # (R, G)
        if cpu_recurrence and cpu_rec.supports(feats, self.ctx_gates.weight):
            upper = [(lin.weight, lin.bias) for lin in self.upper]
            hidden, alphas = cpu_rec.run(sizes, self.dropout if self.training else 0.0, feats, enc_proj, h0, c0,
                                         emb_gates, (self.query.weight, self.query.bias), self.full_att.weight,
                                         self.ctx_gates.weight, upper)  # (R, H), (R, P)
        else:
            hidden, alphas = self._unroll(sizes, feats, enc_proj, h0, c0, emb_gates)  # (R, H), (R, P)
        return self._scatter_packed(hidden, alphas, order[row] * (T - 1) + col, B, T)

    def _unroll(self, sizes: list[int], feats: Tensor, enc_proj: Tensor, h0: Tensor, c0: Tensor,
                emb_gates: Tensor) -> tuple[Tensor, Tensor]:
        """The reference loop: step() on the b_t captions still running -> hidden (R,H), alphas (R,P)."""
        h, c = h0.unsqueeze(2), c0.unsqueeze(2)  # (Y, B, 1, H)
        outs, att = [], []
        for b, gates in zip(sizes, emb_gates.split(sizes)):
            h, c, alpha = self.step(gates.unsqueeze(1), feats[:b], enc_proj[:b], h[:, :b], c[:, :b])
            outs.append(h[-1, :, 0])  # (b, H)
            att.append(alpha[:, 0])  # (b, P)
        return torch.cat(outs), torch.cat(att)

    def _scatter_packed(self, hidden: Tensor, alphas: Tensor, rows: Tensor, B: int, T: int
                        ) -> tuple[Tensor, Tensor]:
        """Packed hidden (R,H), alphas (R,P) and each one's row of the flat (B*(T-1)) output ->
        padded logits (B,T-1,V), alphas (B,T-1,P) in input order."""
        P, V = alphas.size(-1), self.cfg.vocab_size
        step_logits = self.logits(hidden)  # (R, V)
        logits = step_logits.new_zeros(B * (T - 1), V).index_copy(0, rows, step_logits)  # (B*(T-1), V)
        out_alphas = alphas.new_zeros(B * (T - 1), P).index_copy(0, rows, alphas)  # (B*(T-1), P)
        return logits.view(B, T - 1, V), out_alphas.view(B, T - 1, P)


# --------------------------------------------------------------------------------------------
# Whole model and loss
# --------------------------------------------------------------------------------------------

class CaptionModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        cfg = resolve(cfg)  # channels and preprocessing from the encoder spec
        self.cfg = cfg
        self.encoder = Encoder(cfg) if cfg.encoder != FEATURES else None
        self.decoder = AttentionDecoder(cfg)

    def encode(self, images: Tensor) -> Tensor:
        """images (B,3,H,W) -> feats (B,P,C) through the image encoder."""
        if self.encoder is None:
            raise ValueError("this model was trained on cached features and has no image encoder; "
                             "pass features (B, P, C)")
        if images.dim() != 4 or images.size(1) != 3:
            raise ValueError(f"expected images (B, 3, H, W), got {tuple(images.shape)}")
        return self.encoder(images)

    def features(self, inputs: Tensor) -> Tensor:
        """What the decoder reads: images (B,3,H,W) are encoded; features (B,P,C) (from a features
        file, possibly float16) pass through in the weights' dtype (float32)."""
        if inputs.dim() == 4:
            return self.encode(inputs)
        if inputs.dim() != 3:
            raise ValueError(f"expected images (B, 3, H, W) or features (B, P, C), got {tuple(inputs.shape)}")
        return inputs.to(self.decoder.fc.weight.dtype)

    def forward(self, inputs: Tensor, captions: Tensor, lengths: Tensor, *, cpu_recurrence: bool = True,
                host_lengths: Sequence[int] | None = None) -> tuple[Tensor, Tensor]:
        """inputs: images (B,3,H,W) or features (B,P,C) -> logits (B,T-1,V), alphas (B,T-1,P).

        cpu_recurrence, host_lengths: see AttentionDecoder.forward.
        """
        return self.decoder(self.features(inputs), captions, lengths, cpu_recurrence=cpu_recurrence,
                            host_lengths=host_lengths)


def build_model(cfg: ModelConfig) -> CaptionModel:
    """The model of `cfg` (its `.cfg` resolved: encoders.resolve); raises EncoderWeightsError when
    pretrained weights cannot be had."""
    return CaptionModel(cfg)


_IGNORE = -100  # F.cross_entropy's ignore_index: a target that is padding


def caption_loss(logits: Tensor, captions: Tensor, lengths: Tensor, alphas: Tensor, alpha_c: float,
                 label_smoothing: float = 0.0) -> tuple[Tensor, Tensor]:
    """(loss, cross-entropy): mean smoothed cross-entropy over real tokens + alpha_c * attention
    regulariser, and the plain (unsmoothed) cross-entropy.

    logits (B,T-1,V), captions (B,T), lengths (B,) counting <sos> and <eos>, alphas (B,T-1,P).
    Smoothing is F.cross_entropy's `label_smoothing` (that share of each target's mass spread
    evenly over the vocabulary). The regulariser (Xu et al. 2015, eq. 14) pushes each
    position's attention summed over the real steps towards 1; padded steps never count.
    """
    steps = logits.size(1)
    mask = torch.arange(steps, device=logits.device) < (lengths.to(logits.device) - 1).unsqueeze(1)  # (B, T-1)
    # Padded targets are ignored rather than indexed away: boolean indexing would make the host
    # wait for the device to learn how many tokens are real, in the forward and in the backward.
    targets = captions[:, 1:steps + 1].masked_fill(~mask, _IGNORE).flatten()  # (B*(T-1),)
    flat = logits.flatten(0, 1)  # (B*(T-1), V)
    ce = F.cross_entropy(flat, targets, ignore_index=_IGNORE)
    smoothed = (F.cross_entropy(flat, targets, ignore_index=_IGNORE, label_smoothing=label_smoothing)
                if label_smoothing else ce)
    attention_sum = (alphas * mask.unsqueeze(-1)).sum(dim=1)  # (B, P)
    reg = ((1.0 - attention_sum) ** 2).mean()
    return smoothed + alpha_c * reg, ce
