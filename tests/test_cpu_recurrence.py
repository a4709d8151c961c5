"""cpu_recurrence.py computes model.py's reference step, outputs and every gradient, where it runs.

The reference itself (plain autograd through AttentionDecoder.step) is checked by gradcheck.
"""
from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

import cpu_recurrence
import model as M
from test_model import batch, features_model, one_thread, random_feats  # noqa: F401

FOLLOW = "update cpu_recurrence.py to follow model.py's step"
CONFIGS = [{}, {"num_layers": 1}, {"encoder_proj_dim": 12, "num_layers": 3}, {"dropout": 0.5, "num_layers": 3}]


def seeded_pass(model, feats, captions, lengths, accelerate: bool):
    """Outputs and every gradient (parameters, and the features when they need one) of one seeded pass."""
    model.zero_grad()
    feats.grad = None
    torch.manual_seed(7)  # the same dropout masks on both paths
    logits, alphas = model(feats, captions, lengths, cpu_recurrence=accelerate)
    M.caption_loss(logits, captions, lengths, alphas, alpha_c=1.0)[0].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    if feats.requires_grad:
        grads["feats"] = feats.grad.clone()
    return (logits.detach(), alphas.detach()), grads


@pytest.mark.parametrize("fine_tune", [True, False], ids=["feats_need_grad", "cached_feats"])
@pytest.mark.parametrize("kw", CONFIGS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "default")
def test_accelerator_gives_the_reference_outputs_and_gradients_in_float64(kw, fine_tune):
    model = features_model(**kw).double().train()
    feats = random_feats(4).double().requires_grad_(fine_tune)  # grad: as when the encoder is fine-tuned
    captions, lengths = batch()
    assert cpu_recurrence.supports(feats, model.decoder.ctx_gates.weight)
    fast_out, fast_grads = seeded_pass(model, feats, captions, lengths, accelerate=True)
    ref_out, ref_grads = seeded_pass(model, feats, captions, lengths, accelerate=False)
    for name, a, b in zip(("logits", "alphas"), fast_out, ref_out):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=lambda m: f"{name}: {m}\n{FOLLOW}")
    assert fast_grads.keys() == ref_grads.keys(), FOLLOW
    for name in ref_grads:
        torch.testing.assert_close(fast_grads[name], ref_grads[name], rtol=1e-9, atol=1e-12,
                                   msg=lambda m: f"gradient of {name}: {m}\n{FOLLOW}")


def test_accelerator_runs_only_for_cpu_training_without_autocast_and_when_asked(monkeypatch):
    model = features_model().train()
    feats = random_feats(4)
    captions, lengths = batch()
    calls = []
    real_run = cpu_recurrence.run
    monkeypatch.setattr(cpu_recurrence, "run", lambda *a, **k: calls.append(1) or real_run(*a, **k))
    model(feats, captions, lengths)
    assert calls == [1]  # the default: used where supported
    model(feats, captions, lengths, cpu_recurrence=False)
    with torch.no_grad():
        model(feats, captions, lengths)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(feats, captions, lengths)
    assert calls == [1]
    w = model.decoder.ctx_gates.weight
    assert not cpu_recurrence.supports(feats.bfloat16(), w.bfloat16())
    assert not cpu_recurrence.supports(feats.double(), w)  # one dtype for inputs and weights
    assert not cpu_recurrence.supports(torch.empty(1, device="meta"), w)  # any other device: the reference


def test_reference_step_passes_gradcheck_in_float64():
    model = features_model(vocab_size=7, feature_dim=5, embed_dim=3, attention_dim=4, decoder_dim=3,
                           encoder_proj_dim=4).double()
    feats = random_feats(2, p=3, c=5).double().requires_grad_()
    captions, lengths = batch(B=2, T=4, V=7)
    names = [n for n, _ in model.named_parameters()]

    def loss(feats, *params):
        logits, alphas = functional_call(model, dict(zip(names, params)), (feats, captions, lengths),
                                         {"cpu_recurrence": False})
        return M.caption_loss(logits, captions, lengths, alphas, alpha_c=1.0)[0]

    params = [p.detach().clone().requires_grad_() for p in model.parameters()]
    assert torch.autograd.gradcheck(loss, (feats, *params), eps=1e-6, atol=1e-5)
