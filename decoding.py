"""Captions from a trained model: greedy decoding, beam search, sampling, and decoding a loader.

Every function here runs model.py's one decoder step (`AttentionDecoder.step`) for K hypotheses
per image, batched over images: an image leaves the batch when its caption is finished. Greedy,
beam search and `caption_loader` run under inference mode; `sample_decode` keeps the graph when grad
is enabled (self-critical training, issue 12). Special-token ids come from the vocabulary.

Letters in shape comments: N images (n still running), K hypotheses per image, P positions,
D channels the decoder attends over, A attention, H hidden, G LSTM gates (4H), V vocabulary,
Y layers, t steps so far, L decoded length.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from torch import Tensor
from tqdm import tqdm

from config import DecodeConfig
from devices import autocast, to_device
from model import AttentionDecoder, CaptionModel


@dataclass
class Decoded:
    """One row per image (beam_search's n_best > 1: n_best rows per image, grouped, best first)."""
    tokens: list[list[int]]   # per row, without <sos>/<eos>
    scores: list[float]       # per row, log-probability / length**length_penalty
    alphas: list[Tensor]      # per row, (L, P) attention of each returned word


@dataclass
class Caption:
    index: int                # the image's index in the loader's dataset
    words: list[str]
    score: float              # as Decoded.scores
    alphas: Tensor            # (L, P) float32 on the CPU


# -- shared pieces ------------------------------------------------------------------------------

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


def _word_gate_table(decoder: AttentionDecoder, lookups: int) -> Tensor | None:
    """The embedding's share of the first layer's gates for every word (V,G), when decoding will look up
    at least twice as many rows (images x beams x max_len) as there are words; else None (per step).

    One (V,E) x (E,G) product instead of one per step: for 100 images x 5 beams x 20 steps and 2,600
    words, 4x fewer FLOPs in that layer; one image alone stays per step.
    """
    if lookups < 2 * decoder.cfg.vocab_size:
        return None
    return decoder.word_gates(torch.arange(decoder.cfg.vocab_size, device=decoder.fc.weight.device))  # (V, G)


@dataclass
class _Running:
    """The images still being decoded; every tensor holds one row per image in dim 0 (h, c: dim 1)."""
    live: Tensor      # (n,) original index of each image
    feats: Tensor     # (n, P, D)
    enc_proj: Tensor  # (n, P, A)
    h: Tensor         # (Y, n, K, H)
    c: Tensor         # (Y, n, K, H)
    words: Tensor     # (n, K) the last token of each hypothesis
    history: Tensor   # (n, K, t) tokens so far
    alphas: Tensor    # (n, K, t, P) attention so far
    scores: Tensor    # (n, K) summed log-probabilities


def _keep_rows(state: _Running | _Ended, keep: Tensor) -> None:
    """Drops finished images: keeps rows `keep` (n',) of every tensor of the state."""
    for f in fields(state):
        x = getattr(state, f.name)
        setattr(state, f.name, x.index_select(1 if f.name in ("h", "c") else 0, keep))


def _start(model: CaptionModel, feats: Tensor, sos_id: int) -> tuple[AttentionDecoder, _Running]:
    """feats (N,P,C) or images (N,3,H,W) -> the decoder and one hypothesis per image at <sos>."""
    decoder = model.decoder
    feats, enc_proj, h, c = decoder.prepare(model.features(feats))  # (N,P,D), (N,P,A), (Y,N,H)
    N, P, dev = enc_proj.size(0), enc_proj.size(1), enc_proj.device
    words = torch.full((N, 1), sos_id, dtype=torch.long, device=dev)  # (N, 1)
    # Scores and attention maps in float32 even under autocast: summed log-probabilities rank beams.
    return decoder, _Running(live=torch.arange(N, device=dev), feats=feats, enc_proj=enc_proj,
                             h=h.unsqueeze(2), c=c.unsqueeze(2), words=words, history=words.new_zeros(N, 1, 0),
                             alphas=torch.zeros(N, 1, 0, P, device=dev), scores=torch.zeros(N, 1, device=dev))


def _step(decoder: AttentionDecoder, run: _Running, table: Tensor | None) -> tuple[Tensor, Tensor]:
    """One decoder step for every running hypothesis; updates run.h, run.c -> log_probs (n,k,V), alpha (n,k,P)."""
    words = run.words
    emb_gates = decoder.word_gates(words) if table is None else table[words]  # (n, k, G)
    run.h, run.c, alpha = decoder.step(emb_gates, run.feats, run.enc_proj, run.h, run.c)
    log_probs = torch.log_softmax(decoder.logits(run.h[-1]).float(), dim=-1)  # (n, k, V)
    return log_probs, alpha.float()


# -- greedy ------------------------------------------------------------------------------------

@torch.inference_mode()
def greedy_decode(model: CaptionModel, feats: Tensor, *, sos_id: int, eos_id: int, unk_id: int,
                  cfg: DecodeConfig = DecodeConfig()) -> Decoded:
    """Most likely next word at each step, batched over images (finished captions leave the batch).

    feats (N,P,C) features (or images (N,3,H,W), encoded first) -> Decoded.
    """
    decoder, run = _start(model, feats, sos_id)
    N = run.live.numel()
    out = Decoded([[] for _ in range(N)], [0.0] * N, [run.alphas.new_zeros(0, run.feats.size(1))] * N)
    table = _word_gate_table(decoder, N * cfg.max_len)  # (V, G) or None
    for t in range(cfg.max_len):
        log_probs, alpha = _step(decoder, run, table)  # (n,1,V), (n,1,P)
        log_probs = _mask_log_probs(log_probs, run.history, sos_id=sos_id, unk_id=unk_id, cfg=cfg)
        best, words = log_probs.topk(1, dim=-1)  # (n,1,1): topk, as beam search, so ties break alike
        run.words = words.squeeze(-1)  # (n, 1)
        run.scores = run.scores + best.squeeze(-1)
        run.history = torch.cat([run.history, run.words.unsqueeze(-1)], dim=-1)  # (n, 1, t+1)
        run.alphas = torch.cat([run.alphas, alpha.unsqueeze(2)], dim=2)  # (n, 1, t+1, P)
        done = (run.words[:, 0] == eos_id) | (t == cfg.max_len - 1)  # (n,)
        if bool(done.any()):
            for j in done.nonzero().view(-1).tolist():
                toks = run.history[j, 0].tolist()
                n_words = len(toks) - 1 if toks[-1] == eos_id else len(toks)
                i = int(run.live[j])
                out.tokens[i] = toks[:n_words]
                out.alphas[i] = run.alphas[j, 0, :n_words].clone()
                out.scores[i] = float(_normalise(run.scores[j, 0], float(len(toks)), cfg.length_penalty))
            if bool(done.all()):
                break
            _keep_rows(run, (~done).nonzero().view(-1))
    return out


# -- beam search --------------------------------------------------------------------------------

@dataclass
class _Ended:
    """Per running image: the M best hypotheses that ended so far (normalised score, best first)."""
    score: Tensor     # (n, M) -inf in a slot not filled yet
    tokens: Tensor    # (n, M, max_len) their tokens, <eos> included
    length: Tensor    # (n, M) their tokens, <eos> included
    alphas: Tensor    # (n, M, max_len, P)
    count: Tensor     # (n,) hypotheses ended within the top K so far


def _record_ended(ended: _Ended, run: _Running, cand: tuple[Tensor, Tensor, Tensor], alpha: Tensor,
                  eos_id: int, K: int, lp: float) -> None:
    """Hypotheses that end at this step: only those ranked within the top K count, as in standard
    beam search; an image keeps its M best (stable sorts: an earlier, shorter tie stays ahead)."""
    cand_scores, parent, token = cand  # (n, 2K) each
    t, M = run.history.size(-1), ended.score.size(1)
    ends = (token == eos_id) & (torch.arange(token.size(1), device=token.device) < K)  # (n, 2K)
    ends &= torch.isfinite(cand_scores)
    if not bool(ends.any()):
        return
    ended.count += ends.sum(dim=1)
    norm = torch.where(ends, _normalise(cand_scores, float(t + 1), lp), -math.inf)  # (n, 2K)
    # Only images where one beats the M-th kept hypothesis change (a tie keeps the earlier one).
    rows = (norm.max(dim=1).values > ended.score[:, -1]).nonzero().view(-1)  # (m,)
    if not rows.numel():
        return
    new_score, j = torch.sort(norm[rows], dim=1, descending=True, stable=True)
    new_score, p = new_score[:, :M], parent[rows].gather(1, j[:, :M])  # (m, M') M' = min(M, 2K)
    new_tokens = ended.tokens.new_full((rows.numel(), p.size(1), ended.tokens.size(-1)), eos_id)
    new_tokens[..., :t] = run.history[rows.unsqueeze(1), p]  # (m, M', max_len)
    new_alphas = ended.alphas.new_zeros(rows.numel(), p.size(1), *ended.alphas.shape[2:])
    new_alphas[..., :t, :] = run.alphas[rows.unsqueeze(1), p]  # (m, M', max_len, P)
    new_alphas[..., t, :] = alpha[rows.unsqueeze(1), p]
    # Kept ones first, so a tie keeps the earlier (shorter) hypothesis ahead.
    score = torch.cat([ended.score[rows], new_score], dim=1)  # (m, M + M')
    order = torch.sort(score, dim=1, descending=True, stable=True).indices[:, :M]  # (m, M)
    ended.score[rows] = score.gather(1, order)
    ended.length[rows] = torch.cat([ended.length[rows], torch.full_like(p, t + 1)], dim=1).gather(1, order)
    pick = order[..., None]  # (m, M, 1)
    tokens = torch.cat([ended.tokens[rows], new_tokens], dim=1)  # (m, M + M', max_len)
    ended.tokens[rows] = tokens.gather(1, pick.expand(-1, -1, tokens.size(-1)))
    alphas = torch.cat([ended.alphas[rows], new_alphas], dim=1)  # (m, M + M', max_len, P)
    ended.alphas[rows] = alphas.gather(1, pick[..., None].expand(-1, -1, *alphas.shape[2:]))


def _advance(run: _Running, cand: tuple[Tensor, Tensor, Tensor], alpha: Tensor, eos_id: int, K: int) -> None:
    """The next live beams: the K best candidates that do not end (a stable sort keeps score order)."""
    cand_scores, parent, token = cand  # (n, 2K) each
    ends = token == eos_id
    keep = torch.sort(ends.to(torch.uint8), dim=1, stable=True).indices[:, :K]  # (n, K)
    parent = parent.gather(1, keep)  # (n, K)
    n, k = run.words.shape
    K = keep.size(1)  # fewer than K when a tiny vocabulary gives fewer candidates
    run.words = token.gather(1, keep)  # (n, K)
    # With fewer than 2K candidates (tiny vocabularies) an ending one can be kept: it must not run on.
    run.scores = cand_scores.gather(1, keep).masked_fill(ends.gather(1, keep), -math.inf)  # (n, K)
    rows = (parent + torch.arange(n, device=parent.device).unsqueeze(1) * k).view(-1)  # (n*K,)
    run.history = torch.cat([run.history.flatten(0, 1)[rows], run.words.view(-1, 1)], dim=-1).view(n, K, -1)
    run.alphas = torch.cat([run.alphas.flatten(0, 1)[rows], alpha.flatten(0, 1)[rows].unsqueeze(1)],
                           dim=1).view(n, K, -1, alpha.size(-1))  # (n, K, t+1, P)
    Y, H = run.h.size(0), run.h.size(-1)
    run.h = run.h.flatten(1, 2).index_select(1, rows).view(Y, n, K, H)  # (Y, n, K, H)
    run.c = run.c.flatten(1, 2).index_select(1, rows).view(Y, n, K, H)


def _emit_beams(out: Decoded, run: _Running, ended: _Ended, done: Tensor, lp: float) -> None:
    """Writes the answers of each finished image: its M best ended hypotheses, and when fewer than M
    ended (max_len reached), its best running ones after them (running beams are in score order)."""
    M = ended.score.size(1)
    for j in done.nonzero().view(-1).tolist():
        i = int(run.live[j])
        n_ended = int(torch.isfinite(ended.score[j]).sum())
        for r in range(M):
            row = i * M + r
            if r < n_ended:
                n_words = int(ended.length[j, r]) - 1  # drop <eos>
                out.tokens[row] = ended.tokens[j, r, :n_words].tolist()
                out.alphas[row] = ended.alphas[j, r, :n_words].clone()
                out.scores[row] = float(ended.score[j, r])
            else:
                b = r - n_ended
                out.tokens[row] = run.history[j, b].tolist()
                out.alphas[row] = run.alphas[j, b].clone()
                out.scores[row] = float(_normalise(run.scores[j, b], float(run.history.size(-1)), lp))


@torch.inference_mode()
def beam_search(model: CaptionModel, feats: Tensor, *, sos_id: int, eos_id: int, unk_id: int,
                cfg: DecodeConfig = DecodeConfig(), n_best: int = 1) -> Decoded:
    """Beam search, all beams of all images in one tensor; returns the n_best best hypotheses per image.

    Decoded holds N * n_best rows, image i's at rows i*n_best .. i*n_best + n_best - 1, best first
    (n_best=1: one row per image). An image is finished when K of its hypotheses have ended, or when
    no running beam can beat its n_best-th ended one any more (that stop never changes the answer);
    it then leaves the batch. Ended hypotheses rank first; when fewer than n_best end within max_len
    tokens, the best unfinished ones follow. Step 0 runs one beam per image (all K would be
    identical), later steps run K.
    feats (N,P,C) features (or images (N,3,H,W), encoded first) -> Decoded.
    """
    K, lp, M = cfg.beam_size, cfg.length_penalty, n_best
    if not 1 <= M <= K:
        raise ValueError(f"n_best must be between 1 and the beam size {K}, got {M}")
    decoder, run = _start(model, feats, sos_id)
    N, P = run.live.numel(), run.feats.size(1)
    out = Decoded([[] for _ in range(N * M)], [0.0] * (N * M), [run.alphas.new_zeros(0, P) for _ in range(N * M)])
    ended = _Ended(score=run.scores.new_full((N, M), -math.inf), tokens=run.words.new_zeros(N, M, cfg.max_len),
                   length=run.words.new_zeros(N, M), alphas=run.scores.new_zeros(N, M, cfg.max_len, P),
                   count=run.words.new_zeros(N))
    table = _word_gate_table(decoder, N * K * cfg.max_len)  # (V, G) or None
    for t in range(cfg.max_len):
        log_probs, alpha = _step(decoder, run, table)  # (n,k,V), (n,k,P)
        log_probs = _mask_log_probs(log_probs, run.history, sos_id=sos_id, unk_id=unk_id, cfg=cfg)
        n, k, V = log_probs.shape
        cand = (log_probs + run.scores.unsqueeze(-1)).view(n, k * V)  # (n, k*V)
        # 2K candidates always hold K that do not end: each beam has one <eos> candidate.
        cand_scores, cand_ids = cand.topk(min(2 * K, k * V), dim=1)  # (n, 2K)
        cand = (cand_scores, cand_ids // V, cand_ids % V)  # scores, parent beam, token
        _record_ended(ended, run, cand, alpha, eos_id, K, lp)
        _advance(run, cand, alpha, eos_id, K)
        # Finished: K ended, or nothing running can still beat the n_best-th ended hypothesis (summed
        # log-probabilities only fall; with a length penalty the bound divides by the longest length).
        bound = _normalise(run.scores.max(dim=1).values, float(cfg.max_len) if lp else 1.0, lp)  # (n,)
        last = ended.score[:, -1]  # (n,) the n_best-th ended score
        done = (ended.count >= K) | (torch.isfinite(last) & (last >= bound)) | (t == cfg.max_len - 1)
        if bool(done.any()):
            _emit_beams(out, run, ended, done, lp)
            if bool(done.all()):
                break
            keep = (~done).nonzero().view(-1)  # (n',)
            _keep_rows(run, keep)
            _keep_rows(ended, keep)
    return out


def decode(model: CaptionModel, feats: Tensor, *, sos_id: int, eos_id: int, unk_id: int,
           cfg: DecodeConfig = DecodeConfig(), n_best: int = 1) -> Decoded:
    """Greedy when cfg.beam_size == 1, beam search otherwise (n_best hypotheses per image, as beam_search)."""
    if cfg.beam_size == 1 and n_best == 1:
        return greedy_decode(model, feats, sos_id=sos_id, eos_id=eos_id, unk_id=unk_id, cfg=cfg)
    return beam_search(model, feats, sos_id=sos_id, eos_id=eos_id, unk_id=unk_id, cfg=cfg, n_best=n_best)


# -- sampling -----------------------------------------------------------------------------------

def sample_decode(model: CaptionModel, feats: Tensor, *, sos_id: int, eos_id: int, unk_id: int, k: int,
                  temperature: float = 1.0, max_len: int, suppress_unk: bool = True,
                  generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """k captions per image drawn from the model's distribution (divided by temperature), batched.

    feats (N,P,C) features (or images) -> tokens (N*k, L) long, log_probs (N*k, L), lengths (N*k,),
    rows grouped by image (image i's samples are rows i*k .. i*k+k-1), L <= max_len. lengths count
    <eos> when it was drawn (a caption cut off at max_len has none); past its length a row holds
    <eos> with log-probability 0. log_probs are those of the distribution sampled from (<sos>, and
    <unk> when suppressed, get probability 0) and keep the graph when grad is enabled.
    """
    if k < 1 or max_len < 1 or not temperature > 0:
        raise ValueError(f"sample_decode needs k >= 1, max_len >= 1 and temperature > 0, got k={k}, "
                         f"max_len={max_len}, temperature={temperature}")
    decoder, run = _start(model, feats, sos_id)
    N = run.live.numel()
    run.h, run.c = run.h.repeat_interleave(k, dim=2), run.c.repeat_interleave(k, dim=2)  # (Y, N, k, H)
    words = run.words.expand(N, k)  # (N, k)
    running = torch.ones(N, k, dtype=torch.bool, device=words.device)  # (N, k)
    tokens, log_probs = [], []
    for _ in range(max_len):
        emb_gates = decoder.word_gates(words)  # (N, k, G)
        run.h, run.c, _ = decoder.step(emb_gates, run.feats, run.enc_proj, run.h, run.c)
        logits = decoder.logits(run.h[-1]).float() / temperature  # (N, k, V)
        logits[..., sos_id] = -math.inf
        if suppress_unk:
            logits[..., unk_id] = -math.inf
        dist = torch.log_softmax(logits, dim=-1)  # (N, k, V)
        # A non-finite row (an fp16 overflow) would make multinomial raise mid-epoch; it draws at
        # random instead, and its NaN log-probabilities make the step non-finite, which training skips.
        probs = dist.detach().exp().nan_to_num_(1.0).view(N * k, -1)  # (N*k, V)
        drawn = torch.multinomial(probs, 1, generator=generator).view(N, k)
        words = torch.where(running, drawn, eos_id)  # (N, k)
        tokens.append(words)
        log_probs.append(dist.gather(-1, words.unsqueeze(-1)).squeeze(-1) * running)  # (N, k)
        running = running & (words != eos_id)
        if not bool(running.any()):
            break
    tokens_t = torch.stack(tokens, dim=-1).view(N * k, -1)  # (N*k, L)
    log_probs_t = torch.stack(log_probs, dim=-1).view(N * k, -1)  # (N*k, L)
    ended = tokens_t == eos_id  # (N*k, L)
    first_eos = torch.where(ended.any(-1), ended.float().argmax(-1) + 1, tokens_t.size(1))  # (N*k,)
    return tokens_t, log_probs_t, first_eos


# -- a loader -----------------------------------------------------------------------------------

@torch.inference_mode()
def caption_loader(model: CaptionModel, loader, vocab, cfg: DecodeConfig, device: torch.device | str, *,
                   amp_dtype: torch.dtype | None = None, desc: str = "decoding",
                   show_progress: bool = True) -> tuple[list[Caption], int]:
    """Decodes every image of the loader once (greedy or beam search, as cfg says).

    Batches have .inputs (images or features), .image_idx, .n_skipped; an empty one (every image
    corrupt) is skipped. -> captions in loader order, and the number of corrupt images skipped.
    """
    device = torch.device(device)
    captions: list[Caption] = []
    skipped = 0
    # disable only when hidden: an explicit disable=False would override TQDM_DISABLE.
    bar = tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, **({} if show_progress else {"disable": True}))
    for batch in bar:
        skipped += batch.n_skipped
        if len(batch) == 0:
            continue
        inputs = to_device(batch.inputs, device)
        with autocast(device, amp_dtype):
            out = decode(model, inputs, sos_id=vocab.sos_id, eos_id=vocab.eos_id, unk_id=vocab.unk_id, cfg=cfg)
        for index, tokens, score, alphas in zip(batch.image_idx.tolist(), out.tokens, out.scores, out.alphas):
            captions.append(Caption(int(index), vocab.decode(tokens), score, alphas.float().cpu()))
    return captions, skipped
