"""`--mode test`: captioning photos, attention figures, and every bad input as a one-line error."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

import checkpoint
import decoding
import helpers_infer as hi
import main
import plots
import test as captioning
from config import DecodeConfig
from helpers_infer import one_torch_thread  # noqa: F401  (autouse fixture)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return hi.tiny_checkpoint(tmp_path_factory.getbasetemp())


@pytest.fixture()
def photos(tmp_path):
    """A folder with three photos (two formats) and a file that is not an image."""
    folder = tmp_path / "photos"
    hi.make_photo(folder / "red1.jpg", "red", 1)
    hi.make_photo(folder / "blue1.png", "blue", 2)
    hi.make_photo(folder / "red2.jpeg", "red", 3)
    (folder / "notes.txt").write_text("not a photo")
    return folder


def run_cli(args, capsys):
    rc = main.main(args)
    out, err = capsys.readouterr()
    return rc, out, err


def caption_words_ok(caption: str) -> bool:
    words = caption.split()
    return bool(words) and all(w in hi.WORDS for w in words)


def test_one_image_prints_its_caption(ckpt, photos, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    rc, out, err = run_cli(["--mode", "test", "--image_path", str(photos / "red1.jpg"),
                            "--checkpoint", str(ckpt), "--beam_size", "3"], capsys)
    assert rc == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 1 and caption_words_ok(lines[0])
    assert not (tmp_path / "graphs").exists()  # no figure unless asked


def test_folder_gives_one_line_per_image_and_json(ckpt, photos, capsys, tmp_path):
    rc, out, err = run_cli(["--mode", "test", "--image_path", str(photos), "--checkpoint", str(ckpt)], capsys)
    assert rc == 0, err
    lines = out.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(photos / n) for n in ("blue1.png", "red1.jpg", "red2.jpeg")]
    assert all(caption_words_ok(line.split("\t")[1]) for line in lines)

    target = tmp_path / "out" / "captions.json"
    rc, out, err = run_cli(["--mode", "test", "--image_path", str(photos), str(photos / "red1.jpg"),
                            "--checkpoint", str(ckpt), "--output", str(target)], capsys)
    assert rc == 0, err
    rows = json.loads(target.read_text())
    assert [r["image"] for r in rows] == [str(photos / n) for n in ("blue1.png", "red1.jpg", "red2.jpeg", "red1.jpg")]
    # Same photo, same caption: batching and position in the batch do not change the result.
    assert rows[1]["caption"] == rows[3]["caption"]
    assert [r["caption"] for r in rows[:3]] == [line.split("\t")[1] for line in lines]


def test_batch_size_and_threads_given_are_used(ckpt, photos, monkeypatch, capsys):
    batches = []
    real_decode = decoding.decode
    monkeypatch.setattr(decoding, "decode", lambda m, feats, **kw: batches.append(feats.shape[0])
                        or real_decode(m, feats, **kw))
    rc, out, err = run_cli(["--mode", "test", "--image_path", str(photos), "--checkpoint", str(ckpt),
                            "--batch_size", "2", "--threads", "2"], capsys)
    assert rc == 0, err
    assert batches == [2, 1] and torch.get_num_threads() == 2  # the autouse fixture puts 1 back


def test_model_loaded_once_and_images_batched(ckpt, photos, monkeypatch):
    loads, batches = [], []
    real_load, real_decode = checkpoint.load_checkpoint, decoding.decode
    monkeypatch.setattr(checkpoint, "load_checkpoint", lambda *a, **k: loads.append(a) or real_load(*a, **k))

    def counting_decode(m, feats, **kw):
        batches.append(feats.shape[0])
        return real_decode(m, feats, **kw)

    monkeypatch.setattr(decoding, "decode", counting_decode)
    captions = captioning.caption_paths([photos], ckpt, DecodeConfig(beam_size=2), "cpu", batch_size=2)
    assert len(loads) == 1 and batches == [2, 1] and len(captions) == 3


@pytest.mark.parametrize("beam_size", [1, 3])
def test_batched_captions_equal_one_by_one_with_two_threads(beam_size, ckpt, tmp_path):
    """With the demo's 2 threads, a photo's caption does not depend on its batch or its place in it."""
    files = [hi.make_photo(tmp_path / f"{kind}{i}.png", kind, 50 + i)
             for i, kind in enumerate(["red", "blue", "blue", "red", "blue"])]
    cfg = DecodeConfig(beam_size=beam_size)
    captioner = captioning.load_captioner(ckpt, "cpu")
    torch.set_num_threads(2)  # the module's autouse fixture puts 1 back afterwards
    batched = captioning.caption_files(captioner, files, cfg, batch_size=5)
    alone = [captioning.caption_files(captioner, [f], cfg, batch_size=1)[0] for f in files]
    assert [c.words for c in batched] == [c.words for c in alone]
    for b, a in zip(batched, alone):
        assert b.score == pytest.approx(a.score, abs=1e-4)
        assert torch.allclose(b.alphas, a.alphas, atol=1e-4)
    # The words depend on the photo, so equal captions mean something: red and blue differ.
    by_kind = {f.stem.rstrip("0123456789"): " ".join(c.words) for f, c in zip(files, batched)}
    assert by_kind == {kind: caption for kind, (_, caption) in hi.KINDS.items()}


def test_attention_figure_has_one_panel_per_word(ckpt, photos, capsys, monkeypatch, tmp_path):
    target = tmp_path / "maps" / "att.png"
    rc, out, err = run_cli(["--mode", "test", "--image_path", str(photos / "blue1.png"),
                            "--checkpoint", str(ckpt), "--attention_map", str(target)], capsys)
    assert rc == 0, err
    words = out.split()
    meta = json.loads(Image.open(target).text["Description"])
    assert meta == {"panels": len(words) + 1, "words": words}

    # The flag alone: one figure per image under graphs/ of the working folder.
    monkeypatch.chdir(tmp_path)
    rc, out, err = run_cli(["--mode", "test", "--image_path", str(photos), "--checkpoint", str(ckpt),
                            "--attention_map"], capsys)
    assert rc == 0, err
    made = sorted(p.name for p in (tmp_path / "graphs").iterdir())
    assert made == ["attention_blue1.png", "attention_red1.png", "attention_red2.png"]

    # The figure itself: photo + one overlay per word; a uniform attention is said to be one.
    alphas = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25], [0.1, 0.2, 0.3, 0.4]])
    fig = plots.attention_figure(torch.rand(64, 64, 3).numpy(), ["a", "red", "wall"], alphas)
    drawn = [ax for ax in fig.axes if ax.images]
    assert len(drawn) == 4 and [ax.get_title() for ax in drawn[1:]] == ["a", "red (uniform)", "wall"]
    assert all(len(ax.images) == 2 for ax in drawn[1:])  # photo + upsampled attention
    shade = drawn[1].images[1].get_array()  # (64, 64, RGBA): least shade where the 0.7 was (top left)
    assert shade.shape == (64, 64, 4) and shade[48:, 48:, 3].mean() > shade[:16, :16, 3].mean() + 0.4
    assert drawn[2].images[1].get_array()[..., 3].max() == 0  # uniform: nothing shaded
    with pytest.raises(ValueError, match="square"):
        plots.attention_figure(torch.rand(8, 8, 3).numpy(), ["a"], torch.full((1, 3), 1 / 3))


def _truncated_checkpoint(ckpt, tmp_path):
    data = ckpt.read_bytes()
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(data[: len(data) // 2])
    return bad


def _incompatible_checkpoint(ckpt, tmp_path):
    state = torch.load(ckpt, weights_only=True)
    state["model_config"]["decoder_dim"] = 24  # the saved weights are 32 wide
    bad = tmp_path / "incompatible.pt"
    checkpoint.save_checkpoint(bad, state)
    return bad


@pytest.mark.parametrize("case, expected", [
    ("missing_image", "does not exist"),
    ("not_an_image", "notes.txt"),
    ("truncated_image", "truncated.jpg"),
    ("empty_folder", "holds no images"),
    ("missing_checkpoint", "does not exist"),
    ("truncated_checkpoint", "cannot be read"),
    ("incompatible_checkpoint", "do not fit"),
    ("features_checkpoint", "no image encoder"),
    ("output_not_json", "expected a file name ending in .json"),
    ("output_folder", "is a folder"),
    ("no_gpu", "no CUDA GPU is visible"),
    ("batch_size_0", "--batch_size must be at least 1, got 0"),
])
def test_bad_input_is_one_line_error_exit_2(case, expected, ckpt, photos, tmp_path, capsys, tmp_path_factory):
    image, checkpoint_path, extra = str(photos / "red1.jpg"), str(ckpt), []
    if case == "missing_image":
        image = str(tmp_path / "nope.jpg")
    elif case == "not_an_image":
        image = str(photos / "notes.txt")
    elif case == "truncated_image":
        data = (photos / "red1.jpg").read_bytes()
        (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 3])
        image = str(tmp_path / "truncated.jpg")
    elif case == "empty_folder":
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "readme.md").write_text("no photos here")
        image = str(tmp_path / "empty")
    elif case == "missing_checkpoint":
        checkpoint_path = str(tmp_path / "weights" / "best.pt")
    elif case == "truncated_checkpoint":
        checkpoint_path = str(_truncated_checkpoint(ckpt, tmp_path))
    elif case == "incompatible_checkpoint":
        checkpoint_path = str(_incompatible_checkpoint(ckpt, tmp_path))
    elif case == "features_checkpoint":
        checkpoint_path = str(hi.features_checkpoint(tmp_path_factory.getbasetemp()))
    elif case == "output_not_json":
        extra = ["--output", str(tmp_path / "captions.txt")]
    elif case == "output_folder":
        (tmp_path / "out.json").mkdir()
        extra = ["--output", str(tmp_path / "out.json")]
    elif case == "no_gpu":
        extra = ["--device", "cuda"]
    elif case == "batch_size_0":
        extra = ["--batch_size", "0"]
    rc, out, err = run_cli(["--mode", "test", "--image_path", image, "--checkpoint", checkpoint_path, *extra],
                           capsys)
    assert rc == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], err


# ---------------------------------------------------------------- nothing earlier is replaced silently

def _never_loads(*args, **kwargs):
    pytest.fail("the model was loaded before the outputs were checked")


def test_an_earlier_output_or_attention_figure_is_refused_before_the_model_loads(ckpt, photos, tmp_path,
                                                                                monkeypatch):
    output, figures = tmp_path / "captions.json", tmp_path / "maps"
    captioning.run_test([str(photos)], ckpt, DecodeConfig(beam_size=2), output=str(output),
                        attention_map=str(figures), device="cpu")
    before = {p: p.read_bytes() for p in [output, *figures.iterdir()]}
    inode = (figures / "attention_red1.png").stat().st_ino
    assert len(before) == 4
    monkeypatch.setattr(captioning, "load_captioner", _never_loads)
    with pytest.raises(ValueError) as info:
        captioning.run_test([str(photos)], ckpt, DecodeConfig(), output=str(output), device="cpu")
    assert str(info.value) == f"{output} exists; pass --overwrite to replace it, or another --output FILE.json"
    with pytest.raises(ValueError, match=f"^{figures / 'attention_blue1.png'} holds an earlier attention "
                                         "figure; pass --overwrite to replace it, or --attention_map NEW_FOLDER$"):
        captioning.run_test([str(photos)], ckpt, DecodeConfig(), output=str(tmp_path / "new.json"),
                            attention_map=str(figures), device="cpu")
    assert {p: p.read_bytes() for p in before} == before and not (tmp_path / "new.json").exists()
    monkeypatch.undo()
    rows = captioning.run_test([str(photos / "red1.jpg")], ckpt, DecodeConfig(), output=str(output),
                               attention_map=str(figures), device="cpu", overwrite=True)
    assert json.loads(output.read_text()) == rows and len(rows) == 1  # replaced, as asked
    assert (figures / "attention_red1.png").stat().st_ino != inode  # written anew (atomic replace)


@pytest.mark.parametrize("flag", ["output", "attention_map"])
def test_a_file_where_a_folder_must_be_is_refused_before_the_model_loads(flag, ckpt, photos, tmp_path,
                                                                          monkeypatch):
    (tmp_path / "notes").write_text("a file, not a folder")
    target = tmp_path / "notes" / "out.json" if flag == "output" else tmp_path / "notes"
    monkeypatch.setattr(captioning, "load_captioner", _never_loads)
    with pytest.raises(ValueError, match=f"--{flag} {target}: {tmp_path / 'notes'} is a file, expected a folder"):
        captioning.run_test([str(photos)], ckpt, DecodeConfig(), device="cpu", **{flag: str(target)})
