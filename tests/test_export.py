"""Exported model folders, the Hugging Face Hub download (an offline cache) and upload (network call replaced)."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from huggingface_hub import errors

import checkpoint
import decoding
import export
import helpers_infer as hi
import hub
import main
import model as model_lib
import test_eval
from config import DataConfig, DecodeConfig
from helpers_infer import one_torch_thread  # noqa: F401  (autouse fixture)


@pytest.fixture(scope="module")
def tiny_pt(tmp_path_factory) -> Path:
    return hi.tiny_checkpoint(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def folder(tiny_pt, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "my-captioner"
    return export.export_model(checkpoint.load_checkpoint(tiny_pt), out, decode_cfg=DecodeConfig(beam_size=3))


def _caption(ckpt: dict) -> tuple[list[int], float]:
    model, vocab, cfg = checkpoint.model_from_checkpoint(ckpt)
    tf = model_lib.image_transform(cfg, train=False)
    with torch.inference_mode():
        feats = model.features(tf(hi.photo("blue", 7)).unsqueeze(0))  # (1, P, C)
        out = decoding.decode(model, feats, sos_id=vocab.sos_id, eos_id=vocab.eos_id, unk_id=vocab.unk_id,
                              cfg=DecodeConfig(beam_size=3))
    return out.tokens[0], out.scores[0]


def test_the_folder_has_the_four_files_and_loads_to_the_same_model(tiny_pt, folder):
    assert sorted(p.name for p in folder.iterdir()) == sorted(checkpoint.FILES)
    original = checkpoint.load_checkpoint(tiny_pt)
    loaded = checkpoint.read_model_folder(folder)
    for key in checkpoint.REQUIRED_KEYS:
        assert key in loaded
    assert loaded["vocab"] == original["vocab"]
    assert loaded["model_config"] == original["model_config"]
    assert loaded["model"].keys() == original["model"].keys()
    for k, v in original["model"].items():
        assert torch.equal(loaded["model"][k], v), k
    assert _caption(loaded) == _caption(original)
    assert checkpoint.decode_config_from(loaded) == DecodeConfig(beam_size=3)
    config = json.loads((folder / "config.json").read_text())
    assert config["format_version"] == checkpoint.FORMAT_VERSION and config["input"] == "images"
    # The preprocessing is kept once, at the top, and read back into the model config.
    assert "preprocess" not in config["model_config"]
    assert config["preprocessing"] == {"size": 64, "resize": 73, "interpolation": "bilinear", "squash": False,
                                       "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def test_the_model_card_says_not_evaluated_without_eval_results(folder):
    card = (folder / "README.md").read_text()
    for part in ("## Architecture", "resnet18", "## Training data", "Not evaluated", "--mode test",
                 "research use"):
        assert part in card, part


def test_the_model_card_shows_the_metrics_beside_the_checkpoint(tiny_pt, tmp_path):
    pt = tmp_path / "weights" / "best.pt"
    pt.parent.mkdir()
    pt.write_bytes(tiny_pt.read_bytes())
    (pt.parent / "eval_test.json").write_text(json.dumps(
        {"split": "test", "num_images": 300, "decoding": {"beam_size": 5},
         "metrics": {"BLEU-4": 0.8215, "CIDEr-D": 1.5}}))
    out = export.run_export(pt, tmp_path / "out")
    card = (out / "README.md").read_text()
    assert "| test | 300 | 5 | 0.8215 |" in card and "Not evaluated" not in card


def test_the_model_card_shows_intervals_and_diagnostics_of_a_real_evaluation(tiny_pt, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pt = tmp_path / "weights" / "best.pt"
    pt.parent.mkdir()
    pt.write_bytes(tiny_pt.read_bytes())
    data_cfg = DataConfig(dataset_path=str(hi.make_kaggle_set(tmp_path / "set")), split_sizes=(4, 2),
                          min_word_freq=1, num_workers=0)
    summary = test_eval.run_evaluation(pt, data_cfg, DecodeConfig(beam_size=2), use_java=False, device="cpu",
                                       grid_images=0, resamples=100, with_report=False)
    card = (export.run_export(pt, tmp_path / "out") / "README.md").read_text()
    bleu, ci = summary["metrics"]["BLEU-4"], summary["intervals"]["BLEU-4"]
    assert "| test | 4 | 2 | " in card and f"{bleu:.4f} [{ci['low']:.3f}, {ci['high']:.3f}]" in card
    assert "95% bootstrap intervals" in card
    assert f"copied from training {100 * summary['diagnostics']['copied_share']:.1f}%" in card


def test_a_features_model_exports_and_says_it_needs_features(tmp_path_factory, tmp_path):
    pt, _, feats = hi.features_run(tmp_path_factory.getbasetemp())
    out = export.export_model(checkpoint.load_checkpoint(pt), tmp_path / "feat")
    card = (out / "README.md").read_text()
    assert "precomputed features, not photos" in card and "--features_dir" in card
    loaded = checkpoint.read_model_folder(out)
    assert loaded["features"]["dir"] == str(feats)  # what training recorded, kept by the export
    assert json.loads((out / "config.json").read_text())["input"] == "features"


def test_export_refuses_a_non_empty_folder_and_overwrite_keeps_other_files(tiny_pt, tmp_path):
    ckpt = checkpoint.load_checkpoint(tiny_pt)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="exists and is not empty.*--overwrite"):
        export.export_model(ckpt, out)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    export.export_model(ckpt, out, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine" and (out / "config.json").exists()
    with pytest.raises(ValueError, match="is a file"):
        export.export_model(ckpt, out / "notes.txt")


def _copy(folder: Path, dest: Path) -> Path:
    dest.mkdir()
    for p in folder.iterdir():
        (dest / p.name).write_bytes(p.read_bytes())
    return dest


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "vocab.json").unlink(), "lacks vocab.json"),
    (lambda d: (d / "model.safetensors").unlink(), "lacks model.safetensors"),
    (lambda d: (d / "config.json").unlink(), "lacks config.json"),
    (lambda d: (d / "config.json").write_text("{not json"), "config.json is not valid JSON"),
    (lambda d: (d / "vocab.json").write_text('{"a": 1}'), "must be a JSON list of words"),
    (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:300]),
     "cannot be read"),
    (lambda d: _edit_config(d, format_version=99), "format_version 99; this version reads 1"),
    (lambda d: _edit_config(d, format="something-else"), "expected 'captioner-folder'"),
])
def test_a_damaged_folder_gives_a_one_line_error(folder, tmp_path, damage, message):
    d = _copy(folder, tmp_path / "damaged")
    damage(d)
    with pytest.raises(ValueError, match=message) as info:
        checkpoint.read_model_folder(d)
    assert "\n" not in str(info.value)


def _edit_config(d: Path, **changes) -> None:
    config = json.loads((d / "config.json").read_text())
    config.update(changes)
    (d / "config.json").write_text(json.dumps(config))


def test_tensors_that_do_not_fit_the_config_give_a_one_line_error(folder, tmp_path):
    d = _copy(folder, tmp_path / "misfit")
    _edit_config(d, model_config={**json.loads((d / "config.json").read_text())["model_config"],
                                  "decoder_dim": 48})
    ckpt = checkpoint.read_model_folder(d)
    with pytest.raises(ValueError, match="do not fit its model config") as info:
        checkpoint.model_from_checkpoint(ckpt)
    assert "\n" not in str(info.value)


def test_a_missing_folder_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        checkpoint.read_model_folder(tmp_path / "nowhere")


# ------------------------------------------------------------------------ the Hub

def _lay_out_cache(folder: Path, cache: Path, repo_id: str, commit: str) -> Path:
    """The layout huggingface_hub's cache uses: blobs by hash, snapshots/<commit> of symlinks, refs/main."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for p in folder.iterdir():
        data = p.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, snap), snap / p.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snap


def test_hf_refs_resolve_from_the_cache_offline(folder, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = _lay_out_cache(folder, tmp_path / "hub", "someone/tiny-captioner", commit)
    for ref in ("hf://someone/tiny-captioner", f"hf://someone/tiny-captioner@{commit}",
                "hf://someone/tiny-captioner@main"):
        resolved = hub.resolve(ref, cache_dir=tmp_path / "hub")
        assert resolved == snap
    ckpt = checkpoint.read_model_folder(resolved)
    assert _caption(ckpt) == _caption(checkpoint.read_model_folder(folder))


@pytest.mark.parametrize("ref, message", [
    ("hf://someone/absent", "not in the Hugging Face cache and HF_HUB_OFFLINE is set"),
    ("hf://someone/tiny-captioner@v9", "not in the Hugging Face cache"),
    ("hf://", "expected hf://OWNER/NAME"),
    ("hf://a/b/c", "expected hf://OWNER/NAME"),
    ("hf://a/b@", "expected hf://OWNER/NAME"),
])
def test_bad_or_uncached_hf_refs_give_a_one_line_error(folder, tmp_path, monkeypatch, ref, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _lay_out_cache(folder, tmp_path / "hub", "someone/tiny-captioner", "a" * 40)
    with pytest.raises(ValueError, match=message) as info:
        hub.resolve(ref, cache_dir=tmp_path / "hub")
    assert "\n" not in str(info.value)


@pytest.fixture()
def fake_hub(monkeypatch):
    """HfApi with only its network calls replaced: they record what they were asked."""
    from huggingface_hub import HfApi

    calls = []
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("create", repo_id, kw)))
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: calls.append(("upload", kw["repo_id"], kw)))
    return calls


def test_push_folder_creates_the_repo_and_uploads_the_folder(folder, fake_hub):
    url = hub.push_folder(folder, "someone/tiny-captioner", private=True)
    assert url == "https://huggingface.co/someone/tiny-captioner"
    (op1, repo1, kw1), (op2, repo2, kw2) = fake_hub
    assert (op1, repo1, kw1["private"], kw1["exist_ok"]) == ("create", "someone/tiny-captioner", True, True)
    assert (op2, repo2, kw2["folder_path"]) == ("upload", "someone/tiny-captioner", str(folder))


def _http_error(status: int):
    import httpx

    request = httpx.Request("POST", "https://huggingface.co/api/repos/create")
    return errors.HfHubHTTPError("denied", response=httpx.Response(status, request=request))


@pytest.mark.parametrize("failure, message", [
    (lambda: errors.LocalTokenNotFoundError("no token"), "no Hugging Face token"),
    (lambda: _http_error(401), "the token was refused"),
    (lambda: _http_error(403), "may not write there"),
    (lambda: ConnectionError("Name or service not known"), "offline"),
])
def test_a_failed_upload_says_why_in_one_line_and_keeps_the_folder(folder, fake_hub, monkeypatch,
                                                                    failure, message):
    from huggingface_hub import HfApi

    def fail(self, **kw):
        raise failure()

    monkeypatch.setattr(HfApi, "upload_folder", fail)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(ValueError, match=message) as info:
        hub.push_folder(folder, "someone/tiny-captioner")
    assert "\n" not in str(info.value) and "is intact" in str(info.value)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_push_refuses_offline_a_bad_repo_id_and_a_broken_folder(folder, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE is set"):
        hub.push_folder(folder, "someone/tiny-captioner")
    with pytest.raises(ValueError, match="expected OWNER/NAME"):
        hub.push_folder(folder, "no-owner")
    with pytest.raises(FileNotFoundError):
        hub.push_folder(tmp_path / "absent", "someone/tiny-captioner")


def test_run_export_writes_the_folder_first_so_a_failed_upload_loses_nothing(tiny_pt, tmp_path, fake_hub,
                                                                             monkeypatch, capsys):
    from huggingface_hub import HfApi

    out = export.run_export(tiny_pt, tmp_path / "pushed", push_to_hub="someone/tiny-captioner")
    assert [c[0] for c in fake_hub] == ["create", "upload"] and "uploaded" in capsys.readouterr().out

    def offline(self, **kw):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(HfApi, "upload_folder", offline)
    with pytest.raises(ValueError, match="is intact"):
        export.run_export(tiny_pt, tmp_path / "second", push_to_hub="someone/tiny-captioner")
    assert checkpoint.read_model_folder(tmp_path / "second")["vocab"] == checkpoint.read_model_folder(out)["vocab"]


def test_the_command_line_exports_then_captions_from_the_folder_as_from_the_pt(tiny_pt, tmp_path, capsys):
    photo = hi.make_photo(tmp_path / "blue.png", "blue", 3)
    out = tmp_path / "cli-export"
    assert main.main(["--mode", "export", "--checkpoint", str(tiny_pt), "--output", str(out)]) == 0
    captions = {}
    for source in (tiny_pt, out):
        target = tmp_path / f"{Path(source).name}.json"
        assert main.main(["--mode", "test", "--checkpoint", str(source), "--image_path", str(photo),
                          "--output", str(target), "--beam_size", "3"]) == 0
        captions[source] = [r["caption"] for r in json.loads(target.read_text())]
    assert captions[tiny_pt] == captions[out] and captions[out][0]
    # A second export into the same folder is refused (nothing made earlier disappears unasked).
    assert main.main(["--mode", "export", "--checkpoint", str(tiny_pt), "--output", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err


def test_export_without_output_is_a_one_line_error(tiny_pt, capsys):
    assert main.main(["--mode", "export", "--checkpoint", str(tiny_pt)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --mode export needs --output") and "\n" not in err


def test_the_folders_decoding_defaults_are_used_under_the_flags_typed(tiny_pt, tmp_path, capsys):
    photo = hi.make_photo(tmp_path / "blue.png", "blue", 3)
    out = tmp_path / "short"
    assert main.main(["--mode", "export", "--checkpoint", str(tiny_pt), "--output", str(out), "--max_len", "2"]) == 0
    assert checkpoint.read_model_folder(out)["decoding"]["max_len"] == 2
    words = {}
    for name, flags in (("folder", []), ("beam", ["--beam_size", "3"]), ("long", ["--max_len", "35"])):
        capsys.readouterr()
        assert main.main(["--mode", "test", "--checkpoint", str(out), "--image_path", str(photo), *flags]) == 0
        words[name] = capsys.readouterr().out.split()
    # The folder says at most 2 tokens (<eos> counts); a typed flag changes only its own field.
    assert len(words["folder"]) <= 2 and len(words["beam"]) <= 2 and len(words["long"]) > 2
    # A re-export of the folder keeps its defaults unless flags say otherwise.
    again = tmp_path / "again"
    assert main.main(["--mode", "export", "--checkpoint", str(out), "--output", str(again), "--beam_size", "2"]) == 0
    assert {k: checkpoint.read_model_folder(again)["decoding"][k] for k in ("max_len", "beam_size")} == \
        {"max_len": 2, "beam_size": 2}
