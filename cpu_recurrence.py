"""A CPU training accelerator: the teacher-forcing loop of model.py's decoder step with a
hand-written backward through time. Quarantined: model.py's `AttentionDecoder.step` is the
reference, and this file only repeats its arithmetic for the case where that pays.

Why it exists: teacher forcing runs the same weights and the same per-image tensors at every step.
Plain autograd then pays, at every step, a full-size weight gradient from a handful of rows (a
memory-bound outer product), a zero-filled full-size gradient for each `x[:b]` slice, and a fresh
(b, P, A) tensor for each elementwise op of the attention (fresh pages cost several times the op
itself on CPU). `_Recurrence` runs the whole loop as one autograd node instead: the forward writes
each step's inputs and activations into step-major buffers (rows of step t at offs[t]:offs[t]+b_t,
as in a PackedSequence), the backward runs back through time by hand and computes every weight
gradient once, as one large product over all steps. The attention energies w . relu(e + q) keep no
(b, P, A) tensor per step: the backward recomputes e + q in one reused buffer, and only
S = sum_t dE_t * [e + q_t > 0] is accumulated, from which dE/de = S * w and dE/dw follow
(w . relu(e + q) = w . (e + q) where it is positive: dw = sum(S * e) + sum_t u_t . q_t, u_t the
per-step sum of S's increment over positions, which dE/dq_t needs anyway). bench/bench_decoder.py
measures it against the reference step; tests/test_cpu_recurrence.py checks that it computes the
reference step's outputs and gradients.

Where it runs is declared once, in `supports`: CPU, under grad, without autocast, float32/float64.
Everything else (CUDA, AMP, decoding) runs the reference step.

What it implements, as model.py's step computes it for K = 1 hypothesis per caption:
  q | g = query(h_top)                          attention query (A) | context gate (D)
  alpha = softmax(w . relu(enc + q))            additive soft attention over P positions
  x_1 = [(alpha @ feats) * sigmoid(g), h_1]     gated context and the first layer's h
  gates_1 = emb_gates + W_ctx x_1               the embedding's share comes precomputed
  x_y = [dropout(h_{y-1}), h_y]; gates_y = W_y x_y + b_y   layers 2..Y
  LSTM cell with gates laid out (input, forget, output | cell)
Dropout masks are drawn as F.dropout draws them (bernoulli(1-p) / (1-p)), layer by layer within a
step, step by step, so a seeded pass equals the reference. This file imports only torch: model.py
passes the tensors.

Letters: R rows of all steps (sum of b_t), b_t captions still running at step t, B captions, P
positions, D attended channels, A attention, H hidden, G = 4H gates, Y layers.
"""
from __future__ import annotations

import torch
from torch import Tensor

FLOAT_TYPES = (torch.float32, torch.float64)


def supports(inputs: Tensor, weight: Tensor) -> bool:
    """Whether `run` may replace the reference loop: CPU training under grad, one float dtype, no autocast.

    CUDA is excluded on purpose: there the reference step runs under autocast, and this code was
    never measured there.
    """
    return (inputs.device.type == "cpu" and torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")
            and inputs.dtype in FLOAT_TYPES and weight.dtype == inputs.dtype)


def run(sizes: list[int], dropout: float, feats: Tensor, enc_proj: Tensor, h0: Tensor, c0: Tensor,
        emb_gates: Tensor, query: tuple[Tensor, Tensor], w_att: Tensor, w_ctx: Tensor,
        upper: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """The teacher-forcing loop over captions sorted by length.

    sizes: b_t per step (non-increasing); dropout: the probability in training, 0 otherwise;
    feats (B,P,D), enc_proj (B,P,A), h0/c0 (Y,B,H), emb_gates (R,G) step-major; query (weight
    (A+D,H), bias), w_att (1,A), w_ctx (G,D+H), upper: (weight (G,2H), bias) of layers 2..Y
    -> top hidden states (R,H) and attention weights (R,P), step-major.
    """
    plan = _Plan(sizes, dropout, enc_proj.size(-1))
    weights = [query[0], query[1], w_att, w_ctx] + [w for pair in upper for w in pair]
    inputs = [x.contiguous() for x in (feats, enc_proj, h0, c0, emb_gates)]
    return _Recurrence.apply(plan, *inputs, *weights)


class _Plan:
    """Sizes of one teacher-forcing pass: b_t captions still running at step t, dropout, attention dim."""

    def __init__(self, sizes: list[int], dropout: float, attention_dim: int) -> None:
        self.sizes = sizes
        self.offs = [0]
        for b in sizes:
            self.offs.append(self.offs[-1] + b)
        self.dropout = dropout
        self.A = attention_dim

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
    attention weights (R,P), step-major. Computes what model.py's AttentionDecoder.step computes.
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
                    dh[y - 1, :b].add_(dx[:, :H] if masks is None else dx[:, :H] * masks[y - 1][r])
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
        return (None, d_feats, d_enc, dh, dc, dgates[0], dq.t() @ hq, dq.sum(0), d_w,
                dgates[0].t() @ xs[0], *d_upper)
