"""encoders.py: the encoder spec (resolved into the config, stored in checkpoints) and timm backbones.

timm's own tiny test models with random weights (a CNN, test_efficientnet, and a ViT, test_vit),
offline (conftest sets HF_HUB_OFFLINE): weights files are written here from timm's models.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import checkpoint as ck
import config
import encoders
import extract
import main as cli
import model as M
import test as captioning
from config import Preprocess
from helpers_infer import one_torch_thread  # noqa: F401  (autouse: one thread, tiny models)
from test_train import make_dataset


TINY = dict(embed_dim=16, attention_dim=16, decoder_dim=16, dropout=0.0, embed_dropout=0.0,
            feature_dropout=0.0)
CNN, VIT = "timm/test_efficientnet", "timm/test_vit"


def timm_weights(tmp_path: Path, name: str, suffix: str = ".safetensors", seed: int = 0) -> tuple[Path, dict]:
    """A weights file of timm's `name` with its classifier, as a user downloads or converts one."""
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    state = {k: v.contiguous() for k, v in timm.create_model(name, pretrained=False).state_dict().items()
             if not k.endswith("num_batches_tracked")}  # as ../shared/pretrained's converter writes them
    path = tmp_path / f"{name}{suffix}"
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    return path, state


# ---------------------------------------------------------------- the spec

def test_resolve_fills_channels_preprocessing_and_stages_from_the_encoder():
    r50 = M.resolve(M.ModelConfig(vocab_size=9))
    assert (r50.feature_dim, r50.fine_tune_stages) == (2048, 3)
    assert r50.preprocess == Preprocess(224, 256, "bilinear", encoders.IMAGENET_MEAN, encoders.IMAGENET_STD)
    # Inception's weights expect [-1, 1]: its own mean/std, not a rescale inside forward.
    inception = M.resolve(M.ModelConfig(vocab_size=9, encoder="inception_v3", image_size=75))
    assert inception.preprocess == Preprocess(75, 86, "bilinear", (0.5,) * 3, (0.5,) * 3)
    # timm: from the model's pretrained config (tf_efficientnet_lite0: bicubic, 256 -> 224, mean/std 0.5).
    lite0 = M.resolve(M.ModelConfig(vocab_size=9, encoder="timm/tf_efficientnet_lite0"))
    assert (lite0.feature_dim, lite0.preprocess) == (1280, Preprocess(224, 256, "bicubic", (0.5,) * 3, (0.5,) * 3))
    vit = M.resolve(M.ModelConfig(vocab_size=9, encoder=VIT))
    assert (vit.feature_dim, vit.preprocess.size, vit.preprocess.interpolation) == (64, 160, "bicubic")
    assert M.resolve(r50) is r50  # idempotent: a stored spec is kept
    # The grid: the backbone's own last feature map unless --encoded_size says otherwise, never
    # enlarged by default (ResNet-50 at 224 px is 7x7; pooling that to 14x14 repeats each cell).
    assert (r50.encoded_size, lite0.encoded_size, vit.encoded_size, inception.encoded_size) == (7, 7, 10, 1)
    assert M.resolve(M.ModelConfig(vocab_size=9, encoder="resnet18", image_size=128)).encoded_size == 4
    assert M.resolve(M.ModelConfig(vocab_size=9, encoder="inception_v3")).encoded_size == 8
    assert M.resolve(M.ModelConfig(vocab_size=9, encoded_size=14)).encoded_size == 14  # asked for: kept
    assert set(encoders.BUILTIN) == set(config.BUILTIN_ENCODERS)  # every name --encoder takes has a spec


def test_bad_timm_names_and_sizes_are_one_line_errors():
    with pytest.raises(ValueError, match=r"timm has no model 'test_efficientnot'.*similar: test_efficientnet"):
        M.resolve(M.ModelConfig(vocab_size=9, encoder="timm/test_efficientnot"))
    with pytest.raises(ValueError, match="--image_size 64: timm/test_vit takes 160 px inputs only"):
        M.resolve(M.ModelConfig(vocab_size=9, encoder=VIT, image_size=64))
    with pytest.raises(ValueError, match="--fine_tune_stages 9: timm/test_efficientnet has 6 stages"):
        M.build_model(M.ModelConfig(vocab_size=9, encoder=CNN, pretrained=False, fine_tune_stages=9, **TINY))


def test_a_checkpoint_from_before_the_spec_loads_with_its_encoders_preprocessing(tmp_path):
    torch.manual_seed(0)
    model = M.build_model(M.ModelConfig(vocab_size=9, encoder="resnet18", pretrained=False, image_size=32,
                                        encoded_size=2, **TINY))
    old = {k: v for k, v in ck.to_plain(model.cfg).items() if k not in ("preprocess", "fine_tune_stages")}
    state = {"format": ck.FORMAT, "model_config": old, "vocab": ["<pad>", "<sos>", "<eos>", "<unk>"] +
             [f"w{i}" for i in range(5)], "model": model.state_dict()}
    _, _, cfg = ck.model_from_checkpoint(state)
    assert cfg == model.cfg and cfg.preprocess.resize == 37  # round(32 * 256 / 224), as before


def test_the_attention_figure_undoes_the_models_own_normalisation():
    # A mean/std of 0.5 (timm's tf_efficientnet_lite0) read as ImageNet's would tint the photo.
    cfg = M.resolve(M.ModelConfig(vocab_size=9, encoder=VIT))
    image = Image.fromarray(np.full((200, 200, 3), (200, 40, 90), np.uint8))
    shown = captioning.display_image(M.image_transform(cfg, train=False)(image), cfg.preprocess)  # (H, W, 3)
    assert shown.shape == (160, 160, 3)
    np.testing.assert_allclose(shown[80, 80], np.array([200, 40, 90]) / 255, atol=0.01)


def test_the_feature_cache_key_covers_the_preprocessing():
    cfg = M.resolve(M.ModelConfig(vocab_size=9, encoder=CNN, pretrained=False, image_size=64, encoded_size=2))
    encoder = encoders.Encoder(cfg)
    key, meta = extract.features_key(cfg, encoder, ["a.jpg"])
    assert key.startswith("timm-test_efficientnet-") and "/" not in key
    squashed = dataclasses.replace(cfg, preprocess=dataclasses.replace(cfg.preprocess, squash=True))
    other_mean = dataclasses.replace(cfg, preprocess=dataclasses.replace(cfg.preprocess, mean=(0.5,) * 3))
    assert len({key, extract.features_key(squashed, encoder, ["a.jpg"])[0],
                extract.features_key(other_mean, encoder, ["a.jpg"])[0]}) == 3


# ---------------------------------------------------------------- timm backbones

def test_timm_cnn_grid_is_its_last_feature_map_pooled():
    cfg = M.ModelConfig(vocab_size=9, encoder=CNN, pretrained=False, image_size=64, encoded_size=2, **TINY)
    model = M.build_model(cfg).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        grid = model.encoder.body.forward_features(x)  # (2, 256, 2, 2): 64 px / 32
        assert torch.equal(model.encoder(x), grid.flatten(2).transpose(1, 2))  # (2, 4, 256)


def test_a_grid_smaller_than_encoded_size_is_named_once_with_the_size_to_pass(caplog):
    # 64 px through test_efficientnet is a 2x2 grid; --encoded_size 4 would repeat each cell 4 times.
    cfg = M.ModelConfig(vocab_size=9, encoder=CNN, pretrained=False, image_size=64, encoded_size=4, **TINY)
    model = M.build_model(cfg).eval()
    with caplog.at_level("WARNING", logger="encoders"), torch.no_grad():
        assert model.encoder(torch.randn(1, 3, 64, 64)).shape == (1, 16, 256)
        model.encoder(torch.randn(1, 3, 64, 64))
    warned = [r.getMessage() for r in caplog.records if "repeats its cells" in r.getMessage()]
    assert warned == ["the encoder's grid is 2x2 at this input size; --encoded_size 4 repeats its cells "
                      "(16 positions, no new information): pass --encoded_size 2"]
    caplog.clear()
    with caplog.at_level("WARNING", logger="encoders"), torch.no_grad():  # a grid pooled down: silent
        M.build_model(dataclasses.replace(cfg, encoded_size=1)).eval().encoder(torch.randn(1, 3, 64, 64))
    assert not caplog.records


def test_vit_grid_is_its_patch_tokens_without_the_class_token():
    cfg = M.ModelConfig(vocab_size=9, encoder=VIT, pretrained=False, encoded_size=10, **TINY)
    model = M.build_model(cfg).eval()
    x = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        tokens = model.encoder.body.forward_features(x)  # (2, 1 + 100, 64)
        feats = model.encoder(x)  # (2, 100, 64): the 10x10 patch grid, row by row
    assert tokens.shape == (2, 101, 64) and feats.shape == (2, 100, 64)
    torch.testing.assert_close(feats, tokens[:, 1:])


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_encoder_weights_load_offline_and_bad_files_are_named(tmp_path, suffix):
    path, state = timm_weights(tmp_path, "test_efficientnet", suffix)
    cfg = M.ModelConfig(vocab_size=9, encoder=CNN, encoder_weights=str(path), image_size=64, encoded_size=2, **TINY)
    body = M.build_model(cfg).encoder.body
    for k, v in body.state_dict().items():
        if not k.endswith("num_batches_tracked"):
            assert torch.equal(v, state[k]), k
    wrong, _ = timm_weights(tmp_path, "test_vit", suffix)
    with pytest.raises(M.EncoderWeightsError, match=r"does not fit a timm test_efficientnet: \d+ missing"):
        M.build_model(dataclasses.replace(cfg, encoder_weights=str(wrong)))


def test_timm_pretrained_offline_is_one_line_naming_encoder_weights():
    cfg = M.ModelConfig(vocab_size=9, encoder=CNN, pretrained=True, image_size=64, encoded_size=2, **TINY)
    with pytest.raises(M.EncoderWeightsError) as info:
        M.build_model(cfg)
    message = str(info.value)
    assert "\n" not in message and "--encoder_weights FILE" in message and "test_efficientnet" in message


def test_fine_tuning_trains_the_last_stages_of_timms_coarse_groups():
    cfg = M.ModelConfig(vocab_size=9, encoder=CNN, pretrained=False, encoder_from_scratch=False,
                        fine_tune_encoder=True, image_size=64, encoded_size=2, **TINY)
    for stages, first in ((None, "blocks.2."), (1, "blocks.4."), (6, "conv_stem.")):  # stem, blocks.0-4 (4 with the head)
        encoder = M.build_model(dataclasses.replace(cfg, fine_tune_stages=stages)).encoder
        trained = [n for n, p in encoder.body.named_parameters() if p.requires_grad]
        assert trained[0].startswith(first), (stages, trained[:2])
        assert trained == [n for n, _ in encoder.body.named_parameters()][-len(trained):]  # a top block
    vit = M.build_model(dataclasses.replace(cfg, encoder=VIT, image_size=None, fine_tune_stages=2)).encoder
    assert {n.split(".")[0] + n.split(".")[1] * n.startswith("blocks")
            for n, p in vit.body.named_parameters() if p.requires_grad} == {"blocks4", "blocks5", "norm"}


def test_a_head_norm_off_the_grids_path_is_no_stage_and_never_trains():
    # ConvNeXt's head.norm is a coarse group of its own, but forward_features never uses it: the
    # last stage must be stages.3, or --fine_tune_stages 1 would train nothing the grid passes.
    cfg = M.ModelConfig(vocab_size=9, encoder="timm/test_convnext", pretrained=False, encoder_from_scratch=False,
                        fine_tune_encoder=True, fine_tune_stages=1, image_size=64, encoded_size=2, **TINY)
    encoder = M.build_model(cfg).encoder
    assert encoder.num_stages == 5  # stem, stages.0-3
    assert {n.split(".")[0] + n.split(".")[1] for n, p in encoder.body.named_parameters()
            if p.requires_grad} == {"stages3"}
    assert encoder(torch.randn(2, 3, 64, 64)).requires_grad
    scratch = M.build_model(dataclasses.replace(cfg, encoder_from_scratch=True)).encoder
    assert not any(p.requires_grad for n, p in scratch.body.named_parameters() if n.startswith("head."))


# ---------------------------------------------------------------- end to end

def run(argv: list[str], capsys) -> tuple[int, str, str]:
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def test_timm_photos_end_to_end_cache_then_fine_tune_then_caption_and_export(tmp_path, capsys):
    """Frozen with a weights file (features cached once), --init_from that run with
    --fine_tune_encoder (the CNN once per image of a batch), caption a photo with the stored
    preprocessing, export: the folder's preprocessing is read back."""
    data = make_dataset(tmp_path / "set", n=12)
    weights, _ = timm_weights(tmp_path, "test_efficientnet")
    common = ["--dataset_path", str(data), "--split_sizes", "8", "2", "--min_word_freq", "1", "--epochs", "1",
              "--batch_size", "8", "--num_workers", "0", "--wandb", "disabled",
              "--features_root", str(tmp_path / "features"), "--encoded_size", "2", "--image_size", "64",
              "--embed_dim", "16", "--attention_dim", "16", "--decoder_dim", "16", "--encoder", CNN]
    frozen = ["--encoder_weights", str(weights), "--weights_dir", str(tmp_path / "w1"),
              "--graphs_dir", str(tmp_path / "g1")]
    assert run(["--mode", "train", *common, *frozen], capsys)[0] == 0
    [cache] = (tmp_path / "features").iterdir()
    assert cache.name.startswith("timm-test_efficientnet-")
    saved = ck.load_checkpoint(tmp_path / "w1" / "best.pt")
    assert saved["model_config"]["preprocess"]["interpolation"] == "bicubic" and saved["features"]["dir"] == str(cache)
    tuned = ["--init_from", str(tmp_path / "w1" / "best.pt"), "--fine_tune_encoder", "--fine_tune_stages", "1",
             "--weights_dir", str(tmp_path / "w2"), "--graphs_dir", str(tmp_path / "g2")]
    assert run(["--mode", "train", *common, *tuned], capsys)[0] == 0
    after = ck.load_checkpoint(tmp_path / "w2" / "best.pt")["model"]
    head, stem = "encoder.body.conv_head.weight", "encoder.body.conv_stem.weight"
    assert not torch.equal(after[head], saved["model"][head]) and torch.equal(after[stem], saved["model"][stem])
    photo = tmp_path / "photo.jpg"
    Image.new("RGB", (90, 60), (220, 30, 30)).save(photo)
    rc, out, _ = run(["--mode", "test", "--checkpoint", str(tmp_path / "w2" / "best.pt"), "--image_path",
                      str(photo), "--attention_map", str(tmp_path / "att.png"), "--device", "cpu"], capsys)
    assert rc == 0 and out.strip() and (tmp_path / "att.png").exists()
    assert run(["--mode", "export", "--checkpoint", str(tmp_path / "w2" / "best.pt"), "--output",
                str(tmp_path / "export")], capsys)[0] == 0
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["preprocessing"]["interpolation"] == "bicubic"
    assert "timm/test_efficientnet (initialised from test_efficientnet.safetensors, fine-tuned: its last 1 " \
           "stages)" in (tmp_path / "export" / "README.md").read_text()
    assert run(["--mode", "test", "--checkpoint", str(tmp_path / "export"), "--image_path", str(photo),
                "--device", "cpu"], capsys)[1] == out


def test_crop_pct_and_image_size_change_the_resize_and_are_stored():
    whole = M.resolve(M.ModelConfig(vocab_size=9, encoder="timm/tf_efficientnet_lite0", crop_pct=1.0))
    assert (whole.preprocess.size, whole.preprocess.resize, whole.preprocess.interpolation) == (224, 224, "bicubic")
    assert M.resolve(M.ModelConfig(vocab_size=9, image_size=112, crop_pct=0.5)).preprocess.resize == 224
    assert M.resolve(M.ModelConfig(vocab_size=9, image_size=112)).preprocess.resize == 128
    with pytest.raises(ValueError, match="crop_pct must be in"):
        M.ModelConfig(vocab_size=9, crop_pct=1.5)
    # crop_pct 1 on a square photo: the whole photo, resized (nothing cut off at the border).
    image = Image.new("RGB", (100, 100), (128, 128, 128))
    image.paste((255, 0, 0), (0, 0, 4, 100))  # a red band at the left edge
    x = M.image_transform(whole, train=False)(image)  # (3, 224, 224)
    assert (x[0, :, :4] > x[1, :, :4] + 0.5).all()
