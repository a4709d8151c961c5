"""decoding.py: greedy, beam search and sampling through the one decoder step, and decoding a loader.

Tiny random-init models only (no network), seeded.
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch

import decoding as D
import model as M
from test_model import EOS, IDS, SOS, UNK, TINY, features_model, lively, one_thread, random_feats  # noqa: F401


def check_decoded(out: D.Decoded, n: int, max_len: int, p: int = 9) -> None:
    assert len(out.tokens) == len(out.scores) == len(out.alphas) == n
    for toks, score, alphas in zip(out.tokens, out.scores, out.alphas):
        assert len(toks) <= max_len and not {SOS, EOS, UNK} & set(toks)
        assert alphas.shape == (len(toks), p) and math.isfinite(score)


@pytest.mark.parametrize("extra", [{}, {"length_penalty": 0.7, "block_repeat_trigrams": True},
                                   {"suppress_unk": False, "max_len": 4}])
def test_beam_size_1_is_exactly_greedy(extra):
    model = lively(features_model())
    feats = random_feats(6)
    cfg = M.DecodeConfig(beam_size=1, **{"max_len": 12, **extra})
    greedy = D.greedy_decode(model, feats, cfg=cfg, **IDS)
    beam = D.beam_search(model, feats, cfg=cfg, **IDS)
    assert beam.tokens == greedy.tokens
    assert beam.scores == pytest.approx(greedy.scores, abs=1e-5)
    for a, b in zip(beam.alphas, greedy.alphas):
        torch.testing.assert_close(a, b)
    if extra.get("suppress_unk", True):
        check_decoded(greedy, 6, cfg.max_len)
    assert len({tuple(t) for t in greedy.tokens}) > 1  # the images really decode differently


@pytest.mark.parametrize("beam_size", [1, 3])
def test_a_batch_decodes_as_each_image_alone(beam_size):
    model = lively(features_model())  # captions of different lengths: images leave the batch early
    feats = random_feats(5)
    cfg = M.DecodeConfig(beam_size=beam_size, max_len=10, block_repeat_trigrams=True)
    together = D.decode(model, feats, cfg=cfg, **IDS)
    check_decoded(together, 5, 10)
    assert len({len(t) for t in together.tokens}) > 1
    for i in range(5):
        alone = D.decode(model, feats[i:i + 1], cfg=cfg, **IDS)
        assert alone.tokens[0] == together.tokens[i]
        assert alone.scores[0] == pytest.approx(together.scores[i], abs=1e-4)
        torch.testing.assert_close(alone.alphas[0], together.alphas[i], rtol=1e-4, atol=1e-5)


def tiny_exhaustive_case():
    """Vocabulary of 3 words + specials, at most 3 tokens: a beam of 64 keeps every hypothesis.

    -> model, feats, every finished caption (tokens + <eos>), score(seq) = summed log-probabilities
    without renormalisation (<sos>/<unk> get -inf, <pad> and the words keep log-softmax values).
    """
    model = features_model(vocab_size=7, seed=4)
    with torch.no_grad():
        model.decoder.fc.bias[EOS] += 1.5
    feats = random_feats(1, seed=5)
    allowed = [0, 4, 5, 6]  # <pad> is not forbidden by the search, so it counts as a word here
    candidates = [list(s) + [EOS] for n in range(3) for s in itertools.product(allowed, repeat=n)]
    dec = model.decoder
    f, enc, h0, c0 = dec.prepare(feats)

    def score(seq):
        h, c, word, total = h0.unsqueeze(2), c0.unsqueeze(2), torch.tensor([[SOS]]), 0.0
        with torch.no_grad():
            for tok in seq:
                h, c, _ = dec.step(dec.word_gates(word), f, enc, h, c)
                total += float(torch.log_softmax(dec.logits(h[-1]), dim=-1)[0, 0, tok])
                word = torch.tensor([[tok]])
        return total

    return model, feats, candidates, score


def test_a_wide_beam_finds_the_exhaustive_best_caption():
    model, feats, candidates, score = tiny_exhaustive_case()
    for penalty in (0.0, 1.0):
        cfg = M.DecodeConfig(beam_size=64, max_len=3, length_penalty=penalty)
        best = max(candidates, key=lambda s: score(s) / (len(s) ** penalty if penalty else 1.0))
        out = D.beam_search(model, feats, cfg=cfg, **IDS)
        assert out.tokens[0] + [EOS] == best
        assert out.scores[0] == pytest.approx(score(best) / (len(best) ** penalty if penalty else 1.0), abs=1e-4)


def test_a_wide_beams_n_best_are_the_exhaustive_best_few():
    model, feats, candidates, score = tiny_exhaustive_case()
    for penalty in (0.0, 1.0):
        norm = {tuple(s): score(s) / (len(s) ** penalty if penalty else 1.0) for s in candidates}
        expected = sorted(norm, key=lambda s: -norm[s])[:6]
        out = D.beam_search(model, feats, cfg=M.DecodeConfig(beam_size=64, max_len=3, length_penalty=penalty),
                            n_best=6, **IDS)
        assert [tuple(t) + (EOS,) for t in out.tokens] == expected
        assert out.scores == pytest.approx([norm[s] for s in expected], abs=1e-4)
        assert [a.shape for a in out.alphas] == [(len(s) - 1, 9) for s in expected]


@pytest.mark.parametrize("extra", [{}, {"length_penalty": 0.7}])
def test_n_best_gives_distinct_captions_ranked_by_score_the_first_as_the_single_best(extra):
    model = lively(features_model())
    feats = random_feats(4)
    cfg = M.DecodeConfig(beam_size=4, max_len=10, **extra)
    single = D.beam_search(model, feats, cfg=cfg, **IDS)
    many = D.beam_search(model, feats, cfg=cfg, n_best=4, **IDS)
    check_decoded(many, 16, 10)
    for i in range(4):
        rows = range(i * 4, i * 4 + 4)
        assert len({tuple(many.tokens[r]) for r in rows}) == 4
        scores = [many.scores[r] for r in rows]
        assert scores == sorted(scores, reverse=True) and scores[0] > scores[-1]
        assert many.tokens[i * 4] == single.tokens[i]
        assert many.scores[i * 4] == pytest.approx(single.scores[i], abs=1e-5)
        torch.testing.assert_close(many.alphas[i * 4], single.alphas[i])
    assert D.decode(model, feats, cfg=cfg, n_best=4, **IDS).tokens == many.tokens
    with pytest.raises(ValueError, match="n_best must be between 1 and the beam size 4, got 5"):
        D.beam_search(model, feats, cfg=cfg, n_best=5, **IDS)


def test_beam_search_terminates_on_an_untrained_model_and_returns_unfinished_captions():
    model = features_model()
    with torch.no_grad():
        model.decoder.fc.bias[EOS] = -50.0  # never ends: the best unfinished beam must come back
    feats = random_feats(3)
    for cfg in (M.DecodeConfig(beam_size=4, max_len=7), M.DecodeConfig(beam_size=1, max_len=7)):
        out = D.decode(model, feats, cfg=cfg, **IDS)
        check_decoded(out, 3, 7)
        assert all(len(t) == 7 for t in out.tokens)
    with torch.no_grad():
        model.decoder.fc.bias[EOS] = 50.0  # ends at once: empty captions
    out = D.beam_search(model, feats, cfg=M.DecodeConfig(beam_size=4, max_len=7), **IDS)
    assert out.tokens == [[], [], []] and all(a.shape == (0, 9) for a in out.alphas)


def test_trigram_blocking_removes_repeated_trigrams():
    model = features_model(vocab_size=8)  # 4 words: repeats are likely without blocking
    feats = random_feats(4)
    with torch.no_grad():
        model.decoder.fc.bias[EOS] = -50.0

    def has_repeat(toks):
        grams = [tuple(toks[i:i + 3]) for i in range(len(toks) - 2)]
        return len(grams) != len(set(grams))

    free = D.beam_search(model, feats, cfg=M.DecodeConfig(beam_size=3, max_len=15), **IDS)
    blocked = D.beam_search(model, feats, cfg=M.DecodeConfig(beam_size=3, max_len=15, block_repeat_trigrams=True),
                            **IDS)
    assert any(has_repeat(t) for t in free.tokens)
    assert not any(has_repeat(t) for t in blocked.tokens)
    assert all(len(t) == 15 for t in blocked.tokens)


def test_decoding_images_encodes_them_first():
    torch.manual_seed(0)
    cfg = M.ModelConfig(vocab_size=30, encoder="resnet18", pretrained=False, encoded_size=2, **TINY)
    model = M.build_model(cfg).eval()
    images = torch.randn(2, 3, 64, 64)
    a = D.decode(model, images, cfg=M.DecodeConfig(max_len=5), **IDS)
    b = D.decode(model, model.encode(images), cfg=M.DecodeConfig(max_len=5), **IDS)
    assert a.tokens == b.tokens


def test_the_word_gate_table_gives_the_per_step_products():
    # Large decoding batches look the embedding's gate share up in a (V, G) table: the same step.
    model = lively(features_model())
    decoder, run = D._start(model, random_feats(3), SOS)
    run.words = torch.tensor([[5], [9], [SOS]])
    table = D._word_gate_table(decoder, lookups=10 ** 6)
    assert table.shape == (40, 4 * TINY["decoder_dim"]) and D._word_gate_table(decoder, lookups=79) is None
    h, c = run.h, run.c
    per_step = D._step(decoder, run, None)
    run.h, run.c = h, c
    looked_up = D._step(decoder, run, table)
    for a, b in zip(per_step, looked_up):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def masked_log_softmax(logits: torch.Tensor) -> torch.Tensor:
    logits = logits.clone()
    logits[..., SOS] = -math.inf
    logits[..., UNK] = -math.inf
    return torch.log_softmax(logits, dim=-1)


def test_sample_decode_returns_what_teacher_forcing_scores_and_is_differentiable():
    model = lively(features_model(), eos_bias=2.0)
    feats = random_feats(3)
    gen = torch.Generator().manual_seed(0)
    tokens, log_probs, lengths = D.sample_decode(model, feats, k=4, max_len=8, generator=gen, **IDS)
    assert tokens.shape == log_probs.shape and tokens.shape[0] == 12 and tokens.shape[1] <= 8
    assert not ({SOS, UNK} & set(tokens.view(-1).tolist()))
    assert len(set(lengths.tolist())) > 1  # captions of different lengths
    for row in range(12):
        n = int(lengths[row])
        toks = tokens[row].tolist()
        ended = EOS in toks[:n]
        assert (toks.index(EOS) + 1 == n) if ended else n == tokens.size(1) == 8
        assert (tokens[row, n:] == EOS).all() and (log_probs[row, n:] == 0).all()
        # Re-scored by teacher forcing on <sos> + the sample, the same per-token log-probabilities.
        caption = torch.tensor([[SOS] + toks[:n]])
        logits, _ = model(feats[row // 4:row // 4 + 1], caption, torch.tensor([n + 1]))
        expected = masked_log_softmax(logits[0]).gather(-1, caption[0, 1:].unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(log_probs[row, :n], expected, rtol=1e-5, atol=1e-5)
    log_probs.sum().backward()  # the graph is kept: a policy gradient reaches the weights
    assert model.decoder.query.weight.grad.abs().sum() > 0
    again = D.sample_decode(model, feats, k=4, max_len=8, generator=torch.Generator().manual_seed(0), **IDS)
    assert torch.equal(again[0], tokens)  # seeded: repeatable


def test_sampling_at_a_low_temperature_is_greedy_and_bad_arguments_are_named():
    model = lively(features_model())
    feats = random_feats(4)
    greedy = D.greedy_decode(model, feats, cfg=M.DecodeConfig(beam_size=1, max_len=10), **IDS)
    with torch.no_grad():
        tokens, _, lengths = D.sample_decode(model, feats, k=2, max_len=10, temperature=1e-4,
                                             generator=torch.Generator().manual_seed(1), **IDS)
    for row in range(8):
        n = int(lengths[row])
        toks = tokens[row, :n].tolist()
        assert (toks[:-1] if toks[-1:] == [EOS] else toks) == greedy.tokens[row // 2]
    with pytest.raises(ValueError, match="temperature=0"):
        D.sample_decode(model, feats, k=2, max_len=10, temperature=0, **IDS)


def test_non_finite_logits_give_nan_log_probabilities_instead_of_an_error():
    """An fp16 overflow must not crash SCST mid-epoch: the step's loss is NaN and training skips it."""
    model = lively(features_model())
    feats = random_feats(2) * float("nan")
    with torch.no_grad():
        tokens, log_probs, lengths = D.sample_decode(model, feats, k=2, max_len=5,
                                                     generator=torch.Generator().manual_seed(0), **IDS)
    assert tokens.shape[0] == 4 and log_probs[:, 0].isnan().all() and (lengths >= 1).all()


class FakeBatch:
    def __init__(self, inputs, image_idx, n_skipped=0):
        self.inputs, self.image_idx, self.n_skipped = inputs, torch.tensor(image_idx, dtype=torch.long), n_skipped

    def __len__(self):
        return len(self.image_idx)


class FakeVocab:
    sos_id, eos_id, unk_id = SOS, EOS, UNK

    def decode(self, ids):
        return [f"w{i}" for i in ids]


def test_caption_loader_decodes_each_image_once_in_loader_order_and_counts_skipped():
    model = lively(features_model())
    feats = random_feats(5)
    loader = [FakeBatch(feats[:2], [7, 3]), FakeBatch(feats[:0], [], n_skipped=2),
              FakeBatch(feats[2:], [0, 4, 1], n_skipped=1)]
    cfg = M.DecodeConfig(beam_size=2, max_len=6)
    captions, skipped = D.caption_loader(model, loader, FakeVocab(), cfg, "cpu", show_progress=False)
    assert skipped == 3 and [c.index for c in captions] == [7, 3, 0, 4, 1]
    whole = D.decode(model, feats, cfg=cfg, **IDS)
    for caption, tokens, score in zip(captions, whole.tokens, whole.scores):
        assert caption.words == [f"w{i}" for i in tokens] and caption.score == pytest.approx(score, abs=1e-5)
        assert caption.alphas.dtype == torch.float32 and caption.alphas.shape == (len(tokens), 9)


def test_decoding_runs_under_autocast_with_float32_scores():
    model = lively(features_model())
    feats = random_feats(3)
    cfg = M.DecodeConfig(beam_size=3, max_len=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outs = [D.beam_search(model, feats, cfg=cfg, **IDS), D.greedy_decode(model, feats, cfg=cfg, **IDS)]
    for out in outs:
        check_decoded(out, 3, 8)
        assert all(a.dtype == torch.float32 for a in out.alphas)
