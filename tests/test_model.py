"""model.py: shapes per backbone, loss and masking, what trains, the reference step, weights errors.

Tiny random-init models only (no network): dims 16-32, small images, seeded.
"""
from __future__ import annotations

import dataclasses
import re
import socket
import urllib.error

import pytest
import torch
import torch.nn.functional as F

import config
import decoding
import encoders
import model as M

SOS, EOS, UNK = 1, 2, 3


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny models gain nothing from threads, and on a busy machine a second thread that is not
    # scheduled stalls every parallel region.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
IDS = dict(sos_id=SOS, eos_id=EOS, unk_id=UNK)
TINY = dict(embed_dim=24, attention_dim=20, decoder_dim=28, dropout=0.0, embed_dropout=0.0, feature_dropout=0.0)


def features_model(vocab_size=40, feature_dim=32, seed=0, **kw) -> M.CaptionModel:
    torch.manual_seed(seed)
    cfg = M.ModelConfig(vocab_size=vocab_size, encoder="features", feature_dim=feature_dim, **{**TINY, **kw})
    return M.build_model(cfg).eval()


def lively(model: M.CaptionModel, std=0.3, eos_bias=1.0) -> M.CaptionModel:
    """Larger random weights, so an untrained decoder's words depend on the image and captions end
    at different steps (the default init gives near-uniform, image-independent words)."""
    with torch.no_grad():
        for p in model.decoder.parameters():
            p.normal_(0, std)
        model.decoder.fc.bias[EOS] += eos_bias
    return model


def random_feats(n, p=9, c=32, seed=1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, p, c, generator=g) * 2  # (N, P, C): spread so images decode differently


def batch(B=4, T=7, V=40, seed=2):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, T + 1, (B,), generator=g)
    lengths[0] = T  # the longest sets T
    captions = torch.randint(4, V, (B, T), generator=g)
    captions[:, 0] = SOS
    for i, n in enumerate(lengths.tolist()):
        captions[i, n - 1] = EOS
        captions[i, n:] = 0
    return captions, lengths


# -- configs --------------------------------------------------------------------------------------

def test_config_rejects_bad_values_with_the_valid_choices():
    with pytest.raises(ValueError, match=r"unknown encoder 'vgg16'.*resnet50.*inception_v3"):
        M.ModelConfig(vocab_size=10, encoder="vgg16")
    with pytest.raises(ValueError, match="dropout"):
        M.ModelConfig(vocab_size=10, dropout=1.0)
    with pytest.raises(ValueError, match="fine_tune_encoder"):
        M.ModelConfig(vocab_size=10, encoder="features", fine_tune_encoder=True)
    with pytest.raises(ValueError, match="beam_size"):
        M.DecodeConfig(beam_size=0)
    with pytest.raises(ValueError, match="needs feature_dim"):
        M.ModelConfig(vocab_size=10, encoder="features")
    # The encoder spec, not a default, decides C and the input (encoders.resolve).
    assert M.ModelConfig(vocab_size=10, encoder="resnet18").feature_dim is None
    assert M.resolve(M.ModelConfig(vocab_size=10, encoder="resnet18")).feature_dim == 512
    assert M.resolve(M.ModelConfig(vocab_size=10, encoder="features", feature_dim=300)).feature_dim == 300
    assert M.resolve(M.ModelConfig(vocab_size=10, encoder="inception_v3")).input_size == 299


def test_flags_match_config_fields_and_help_states_the_real_defaults():
    import main

    parser = main.build_parser()
    actions = {a.dest: a for a in parser._actions}
    for cls in (M.ModelConfig, M.DecodeConfig):
        for f in dataclasses.fields(cls):
            if f.name in config.DERIVED_FIELDS:
                continue  # set by the caller (vocabulary, features file), the encoder spec, or derived
            assert f.name in actions, f"no --{f.name} flag"
            shown = re.search(r"\[([^\]]+)\]", actions[f.name].help or "")
            if f.default is None or shown is None:
                continue
            text = ("on" if f.default else "off") if isinstance(f.default, bool) else str(f.default)
            assert shown.group(1) == text, f"--{f.name} help says [{shown.group(1)}], config default is {text}"
    args = parser.parse_args(["--encoder", "resnet18", "--no-pretrained", "--beam_size", "3"])
    assert main._config(M.ModelConfig, args, vocab_size=50).encoder == "resnet18"
    assert main._config(M.ModelConfig, args, vocab_size=50).pretrained is False
    assert main._config(M.DecodeConfig, args).beam_size == 3


# -- encoders -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "inception_v3",
                                  "small_cnn"])
def test_each_backbone_gives_finite_outputs_of_the_right_shape(name):
    torch.manual_seed(0)
    cfg = M.ModelConfig(vocab_size=30, encoder=name, pretrained=False, encoded_size=3,
                        image_size=75 if name == "inception_v3" else 64, **TINY)
    model = M.build_model(cfg).eval()
    cfg = model.cfg  # resolved: channels and input size from the encoder spec
    images = torch.randn(2, 3, cfg.input_size, cfg.input_size)
    feats = model.encode(images)
    assert feats.shape == (2, 9, cfg.feature_dim)
    captions, lengths = batch(B=2, T=5, V=30)
    logits, alphas = model(images, captions, lengths)
    assert logits.shape == (2, 4, 30) and alphas.shape == (2, 4, 9)
    assert torch.isfinite(logits).all() and torch.isfinite(alphas).all()
    out = decoding.decode(model, feats, cfg=M.DecodeConfig(beam_size=2, max_len=4), **IDS)
    assert len(out.tokens) == 2 and all(len(t) <= 4 for t in out.tokens)


def test_inception_has_no_aux_head_and_native_299_preprocessing():
    from PIL import Image

    cfg = M.ModelConfig(vocab_size=30, encoder="inception_v3", pretrained=False)
    enc = M.Encoder(dataclasses.replace(cfg, encoded_size=8))
    assert not any("AuxLogits" in k or k.startswith("fc.") for k in enc.state_dict())
    image = Image.new("RGB", (400, 320), (200, 30, 30))
    for train in (True, False):
        assert M.image_transform(cfg, train)(image).shape == (3, 299, 299)
    x = M.image_transform(dataclasses.replace(cfg, image_size=75), False)(image).unsqueeze(0)
    assert enc.eval()(x).shape == (1, 64, 2048)


def test_image_transform_never_flips_and_normalises():
    from PIL import Image

    cfg = M.ModelConfig(vocab_size=30, encoder="resnet18", pretrained=False, image_size=32)
    names = [type(t).__name__ for t in M.image_transform(cfg, True).transforms]
    assert "RandomHorizontalFlip" not in names and "RandomCrop" in names
    # Left half white, right half black: must stay so after the training transform.
    image = Image.new("RGB", (64, 48), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 32, 48))
    torch.manual_seed(0)
    for _ in range(5):
        x = M.image_transform(cfg, True)(image)  # (3, 32, 32)
        assert x.shape == (3, 32, 32)
        assert x[:, :, 0].mean() > x[:, :, -1].mean()
    x = M.image_transform(cfg, False)(Image.new("RGB", (40, 40), (124, 116, 104)))  # ~ ImageNet mean
    assert x.abs().max() < 0.05


def test_frozen_encoder_gets_no_gradient_and_keeps_batchnorm_statistics():
    torch.manual_seed(0)
    cfg = M.ModelConfig(vocab_size=30, encoder="resnet18", pretrained=False, encoded_size=2, **TINY)
    model = M.build_model(cfg).train()
    assert list(model.encoder.trainable_parameters()) == []
    bn_before = model.encoder.body[1].running_mean.clone()
    captions, lengths = batch(B=2, T=5, V=30)
    logits, alphas = model(torch.randn(2, 3, 64, 64), captions, lengths)
    M.caption_loss(logits, captions, lengths, alphas, 1.0)[0].backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert all(p.grad is not None for p in model.decoder.parameters())
    assert torch.equal(model.encoder.body[1].running_mean, bn_before)


def test_fine_tuned_pretrained_encoder_trains_its_last_stages_end_to_end_at_batch_4():
    torch.manual_seed(0)
    # As a pretrained encoder (weights not needed for what trains) and as rebuilt from its checkpoint.
    cfg = M.ModelConfig(vocab_size=30, encoder="resnet18", pretrained=False, encoder_from_scratch=False,
                        encoded_size=2, fine_tune_encoder=True, **TINY)
    assert dataclasses.replace(cfg, pretrained=False).encoder_from_scratch is False
    model = M.build_model(cfg).train()
    trainable = {id(p) for p in model.encoder.trainable_parameters()}
    stem = list(model.encoder.body[0].parameters())
    last = list(model.encoder.body[-1].parameters())
    assert all(id(p) in trainable for p in last) and not any(id(p) in trainable for p in stem)
    captions, lengths = batch(B=4, T=5, V=30)
    logits, alphas = model(torch.randn(4, 3, 64, 64), captions, lengths)
    M.caption_loss(logits, captions, lengths, alphas, 1.0)[0].backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in last)
    assert all(p.grad is None for p in stem)
    assert not model.encoder.body[1].training  # ImageNet statistics kept


def test_encoder_trained_from_scratch_trains_every_stage_with_batch_statistics():
    torch.manual_seed(0)
    cfg = M.ModelConfig(vocab_size=30, encoder="resnet18", pretrained=False, encoded_size=2,
                        fine_tune_encoder=True, **TINY)
    assert cfg.encoder_from_scratch is True
    model = M.build_model(cfg).train()
    assert all(p.requires_grad for p in model.encoder.parameters())
    bn = model.encoder.body[1]
    before = bn.running_mean.clone()
    model(torch.randn(4, 3, 64, 64) + 3.0, *batch(B=4, T=5, V=30))
    assert bn.training and not torch.equal(bn.running_mean, before)
    model.eval()
    assert not bn.training
    assert M.ModelConfig(vocab_size=30, encoder="resnet18").encoder_from_scratch is False


def test_small_cnn_has_no_pretrained_weights_trains_whole_and_sees_the_whole_image():
    from PIL import Image

    for bad in ({}, {"pretrained": False, "encoder_weights": "w.pt"}):
        with pytest.raises(ValueError, match="small_cnn has no pretrained weights; pass --no-pretrained"):
            M.ModelConfig(vocab_size=30, encoder="small_cnn", **bad)
    cfg = M.ModelConfig(vocab_size=30, encoder="small_cnn", pretrained=False, fine_tune_encoder=True,
                        encoded_size=8, **TINY)
    resolved = M.resolve(cfg)
    assert (resolved.input_size, resolved.feature_dim, cfg.encoder_from_scratch) == (64, 128, True)
    model = M.build_model(cfg).train()
    assert all(p.requires_grad for p in model.encoder.parameters())
    images = torch.randn(4, 3, 64, 64)
    captions, lengths = batch(B=4, T=5, V=30)
    logits, alphas = model(images, captions, lengths)
    M.caption_loss(logits, captions, lengths, alphas, 1.0)[0].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder.body[0].parameters())
    # A shape touching the border of a 128 px image stays whole: resized, never cropped.
    image = Image.new("RGB", (128, 128), (128, 128, 128))
    image.paste((255, 0, 0), (0, 0, 8, 128))                         # a red band at the left edge
    x = M.image_transform(cfg, train=False)(image)                   # (3, 64, 64)
    assert x.shape == (3, 64, 64) and (x[0, :, :3] > x[1, :, :3] + 1).all()


# -- weights --------------------------------------------------------------------------------------

def test_failed_download_names_both_ways_out_and_restores_the_socket_timeout(monkeypatch):
    import torchvision

    weights_cls = type(torchvision.models.get_model_weights("resnet18").DEFAULT)
    seen = {}

    def offline(self, *args, **kwargs):
        seen["timeout"] = socket.getdefaulttimeout()
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(weights_cls, "get_state_dict", offline)
    before = socket.getdefaulttimeout()
    with pytest.raises(M.EncoderWeightsError) as info:
        M.build_model(M.ModelConfig(vocab_size=30, encoder="resnet18", pretrained=True, **TINY))
    message = str(info.value)
    assert isinstance(info.value, ValueError) and "\n" not in message
    assert "--encoder_weights" in message and "resnet18-f37072fd.pth" in message
    assert str(torch.hub.get_dir()) in message  # the real cache path to copy the file to
    assert seen["timeout"] == encoders.DOWNLOAD_TIMEOUT_S and socket.getdefaulttimeout() == before


def test_encoder_weights_file_loads_and_bad_files_are_named(tmp_path):
    import torchvision

    torch.manual_seed(3)
    source = torchvision.models.resnet18(weights=None)
    good = tmp_path / "r18.pth"
    torch.save(source.state_dict(), good)
    cfg = M.ModelConfig(vocab_size=30, encoder="resnet18", encoder_weights=str(good), encoded_size=2, **TINY)
    model = M.build_model(cfg)
    assert torch.equal(model.encoder.body[0].weight, source.conv1.weight)
    assert torch.equal(model.encoder.body[-1][1].bn2.running_var, source.layer4[1].bn2.running_var)

    wrong = tmp_path / "r34.pth"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), wrong)
    with pytest.raises(M.EncoderWeightsError, match=r"r34.pth does not fit a torchvision resnet18.*unexpected"):
        M.build_model(dataclasses.replace(cfg, encoder_weights=str(wrong)))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(M.EncoderWeightsError, match="cannot read a state dict"):
        M.build_model(dataclasses.replace(cfg, encoder_weights=str(junk)))
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        M.build_model(dataclasses.replace(cfg, encoder_weights=str(tmp_path / "missing.pth")))


# -- teacher forcing and loss ---------------------------------------------------------------------

def test_outputs_are_in_input_order_and_padded_to_t_minus_1():
    model = features_model()
    feats = random_feats(4)
    captions, lengths = batch()
    logits, alphas = model(feats, captions, lengths)
    assert logits.shape == (4, 6, 40) and alphas.shape == (4, 6, 9)
    for i in range(4):
        n = int(lengths[i]) - 1
        one_logits, one_alphas = model(feats[i:i + 1], captions[i:i + 1, :n + 1], lengths[i:i + 1])
        torch.testing.assert_close(logits[i, :n], one_logits[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(alphas[i, :n], one_alphas[0], rtol=1e-4, atol=1e-5)
        assert (logits[i, n:] == 0).all() and (alphas[i, n:] == 0).all()
        torch.testing.assert_close(alphas[i, :n].sum(-1), torch.ones(n))
    # A short batch (lengths all below T) still returns T-1 steps.
    logits, _ = model(feats, captions, torch.full((4,), 3))
    assert logits.shape[1] == 6


def test_padding_does_not_change_the_loss():
    model = features_model()
    feats = random_feats(4)
    captions, lengths = batch()
    loss, ce = M.caption_loss(*model(feats, captions, lengths)[:1], captions, lengths,
                              model(feats, captions, lengths)[1], alpha_c=1.0)
    # Five more pad columns holding garbage ids: nothing past each length may count.
    wider = torch.cat([captions, torch.randint(4, 40, (4, 5))], dim=1)
    for i, n in enumerate(lengths.tolist()):
        wider[i, n:] = torch.randint(4, 40, (wider.size(1) - n,))
    logits, alphas = model(feats, wider, lengths)
    loss2, ce2 = M.caption_loss(logits, wider, lengths, alphas, alpha_c=1.0)
    torch.testing.assert_close(loss2, loss)
    torch.testing.assert_close(ce2, ce)
    # The regulariser is there and counts: alpha_c changes the loss, not the cross-entropy.
    loss0, ce0 = M.caption_loss(logits, wider, lengths, alphas, alpha_c=0.0)
    assert loss0 < loss2 and torch.equal(ce0, ce2)


def test_label_smoothing_is_torch_s_and_the_reported_cross_entropy_stays_plain():
    model = features_model()
    feats = random_feats(4)
    captions, lengths = batch()
    logits, alphas = model(feats, captions, lengths)
    loss, ce = M.caption_loss(logits, captions, lengths, alphas, alpha_c=0.0, label_smoothing=0.2)
    _, plain = M.caption_loss(logits, captions, lengths, alphas, alpha_c=0.0)
    mask = torch.arange(logits.size(1)) < (lengths - 1).unsqueeze(1)
    targets = captions[:, 1:][mask]
    torch.testing.assert_close(loss, F.cross_entropy(logits[mask], targets, label_smoothing=0.2))
    torch.testing.assert_close(ce, F.cross_entropy(logits[mask], targets))
    torch.testing.assert_close(plain, ce)


@pytest.mark.parametrize("where", ["embed_dropout", "feature_dropout"])
def test_embedding_and_feature_dropout_act_in_training_only(where):
    feats = random_feats(4)
    captions, lengths = batch()
    quiet = features_model(embed_dropout=0.0, feature_dropout=0.0).train()
    torch.testing.assert_close(quiet(feats, captions, lengths)[0], quiet(feats, captions, lengths)[0])
    model = features_model(**{"embed_dropout": 0.0, "feature_dropout": 0.0, where: 0.5}).train()
    first, second = model(feats, captions, lengths)[0], model(feats, captions, lengths)[0]
    assert not torch.allclose(first, second)
    model.eval()
    torch.testing.assert_close(model(feats, captions, lengths)[0], model(feats, captions, lengths)[0])


def test_loss_falls_on_one_repeated_batch():
    model = features_model(dropout=0.1).train()
    feats = random_feats(4)
    captions, lengths = batch()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        logits, alphas = model(feats, captions, lengths)
        loss, ce = M.caption_loss(logits, captions, lengths, alphas, alpha_c=1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(ce.item())
    assert losses[-1] < 0.3 * losses[0]


def test_training_step_runs_under_autocast():
    # Under AMP the reference step runs in autocast's dtype like every other layer (nothing turns
    # autocast off); the loss must match float32 closely and the gradients be finite.
    model = features_model().train()
    feats = random_feats(4)
    captions, lengths = batch()
    with torch.no_grad():
        logits, alphas = model(feats, captions, lengths)
        loss32, _ = M.caption_loss(logits, captions, lengths, alphas, alpha_c=1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, alphas = model(feats, captions, lengths)
        loss, _ = M.caption_loss(logits, captions, lengths, alphas, alpha_c=1.0)
    assert logits.dtype == torch.bfloat16
    loss.backward()
    assert abs(loss.item() - loss32.item()) < 0.05 * loss32.item()
    assert all(torch.isfinite(p.grad).all() for p in model.decoder.parameters() if p.grad is not None)


def test_the_step_of_k_hypotheses_is_each_hypothesis_alone():
    model = features_model(num_layers=3)
    dec = model.decoder
    feats, enc, h0, c0 = dec.prepare(random_feats(2))
    g = torch.Generator().manual_seed(3)
    words = torch.randint(4, 40, (2, 3), generator=g)  # (N, K)
    h = torch.randn(3, 2, 3, TINY["decoder_dim"], generator=g)  # (Y, N, K, H)
    c = torch.randn(h.shape, generator=g)
    with torch.no_grad():
        together = dec.step(dec.word_gates(words), feats, enc, h, c)
        for k in range(3):
            alone = dec.step(dec.word_gates(words[:, k:k + 1]), feats, enc, h[:, :, k:k + 1], c[:, :, k:k + 1])
            for a, b in zip(alone, (together[0][:, :, k:k + 1], together[1][:, :, k:k + 1], together[2][:, k:k + 1])):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert together[2].shape == (2, 3, 9)
    torch.testing.assert_close(together[2].sum(-1), torch.ones(2, 3))


def test_cached_float16_features_are_read_as_float32():
    model = features_model()
    feats = random_feats(2)
    assert model.features(feats.half()).dtype == torch.float32
    logits, _ = model(feats.half(), *batch(B=2))
    assert logits.dtype == torch.float32
    with pytest.raises(ValueError, match=r"expected images \(B, 3, H, W\) or features \(B, P, C\), got \(9, 32\)"):
        model.features(feats[0])


def test_encoder_proj_dim_adds_a_channel_projection():
    model = features_model(encoder_proj_dim=12)
    assert model.decoder.feat_proj.weight.shape == (12, 32)
    assert model.decoder.enc_att.weight.shape == (TINY["attention_dim"], 12)
    feats = random_feats(3)
    captions, lengths = batch(B=3)
    logits, alphas = model(feats, captions, lengths)
    assert torch.isfinite(logits).all()
    out = decoding.beam_search(model, feats, cfg=M.DecodeConfig(beam_size=3, max_len=6), **IDS)
    assert len(out.tokens) == 3
    assert features_model().decoder.feat_proj is None  # off by default


def test_wrong_feature_width_is_a_clear_error():
    with pytest.raises(ValueError, match=r"expected features \(N, P, 32\), got \(2, 9, 16\)"):
        features_model()(torch.randn(2, 9, 16), *batch(B=2))
