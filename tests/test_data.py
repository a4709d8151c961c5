"""data_utils: layouts and their dirt, splits, tokenizer, vocabulary, images, loaders, features, CLI."""
import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data_utils as du
import demo_data
import features
import text
from config import DataConfig
from main import main
from text import Vocabulary

CAPS = [
    "A black dog is running after a white dog in the snow .",
    "Two dogs chase each other across the snowy ground .",
    "A girl in a pink dress climbs the stairs .",
    "Man wearing a red t-shirt , riding a bike .",
    "The dog's ball is in the water .",
]


def _jpg(path: Path, colour=(120, 60, 30), size=(32, 24)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, quality=90)
    return path


def _names(n):
    return [f"{1000 + i}_abc.jpg" for i in range(n)]


def _caption(i, j):
    return f"a dog number {i} runs on grass {j}"


# ----------------------------------------------------------------------------- layout fixtures

@pytest.fixture
def original_dir(tmp_path):
    """Original release layout with its real quirks."""
    root = tmp_path / "orig"
    text = root / "Flickr8k_text"
    text.mkdir(parents=True)
    names = _names(10)
    for name in names:
        _jpg(root / "Flicker8k_Dataset" / name)
    lines = []
    for i, name in enumerate(names):
        for j in range(5):
            sep = " " if (i, j) == (0, 0) else "\t"          # space instead of tab
            lines.append(f"{name}#{j}{sep}{_caption(i, j)}".encode())
    lines.append(f"{names[1]}#1\t{_caption(1, 1)}".encode())   # duplicate line
    lines.append(f"{names[2]}#5\t  . , ".encode())              # empty caption after cleaning
    lines.append("1999_gone.jpg#0\ta caption of a missing image".encode())  # no file
    lines.append(f"{names[3]}#5\tcaf\xe9 by the dog".encode("latin-1"))   # not UTF-8
    lines.append(f"{names[0]}.1#0\ta name with a suffix".encode())         # no such file
    (text / "Flickr8k.token.txt").write_bytes(b"\n".join(lines) + b"\n")
    (text / "Flickr_8k.trainImages.txt").write_text("\n".join(names[:6] + ["1999_gone.jpg"]) + "\n")
    (text / "Flickr_8k.devImages.txt").write_text("\n".join(names[6:8]) + "\n")
    (text / "Flickr_8k.testImages.txt").write_text("\n".join(names[8:] + ["9000_nocaps.jpg"]) + "\n")
    return root


@pytest.fixture
def kaggle_dir(tmp_path):
    root = tmp_path / "kaggle"
    names = _names(20)
    for name in names:
        _jpg(root / "Images" / name)
    with open(root / "captions.txt", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption"])
        for i, name in enumerate(names):
            for j in range(5):
                w.writerow([name, _caption(i, j) + (", with a comma" if j == 0 else "")])
        w.writerow(["1999_gone.jpg", "a missing image"])
    return root


@pytest.fixture
def karpathy_dir(tmp_path):
    root = tmp_path / "karpathy"
    names = _names(8)
    splits = ["train", "train", "restval", "restval", "val", "val", "test", "test"]
    images = []
    for i, (name, split) in enumerate(zip(names, splits)):
        _jpg(root / "images" / name)
        images.append({"filename": name, "split": split, "imgid": i,
                       "sentences": [{"raw": _caption(i, j), "tokens": []} for j in range(5)]})
    images.append({"filename": "1999_gone.jpg", "split": "test", "sentences": [{"raw": "gone"}]})
    (root / "dataset_flickr8k.json").write_text(json.dumps({"dataset": "flickr8k", "images": images}))
    return root


def _load(path, **kw):
    return du.load_dataset(DataConfig(dataset_path=str(path), **kw))


# ----------------------------------------------------------------------------- layouts

def test_original_layout_official_split_and_dirt(original_dir):
    s = _load(original_dir)
    assert s.layout == "original"
    assert [len(s.train), len(s.val), len(s.test)] == [6, 2, 2]
    assert s.repaired["space_instead_of_tab"]["count"] == 1
    assert s.repaired["non_utf8_line"]["count"] == 1
    assert s.skipped["duplicate_caption"]["count"] == 1
    assert s.skipped["empty_caption"]["count"] == 1
    assert s.skipped["missing_image"]["examples"] == ["1999_gone.jpg"]
    assert s.skipped["split_entry_without_captions"]["count"] == 1
    assert s.skipped["not_in_any_split"]["count"] == 1          # the ".jpg.1" name
    first = next(r for r in s.train if r.name == "1000_abc.jpg")
    assert first.tokens[0] == text.tokenize(_caption(0, 0))       # the space-separated line is read
    cafe = next(r for r in s.train if r.name == "1003_abc.jpg")
    assert len(cafe.tokens) == 6 and cafe.tokens[-1][:1] == ["cafe"]


def test_kaggle_layout_seeded_split_by_image(kaggle_dir):
    s = _load(kaggle_dir, split_sizes=(14, 3))
    assert s.layout == "kaggle"
    # 21 captioned names (one without a file) split 14/3/4, then the missing file dropped.
    assert sum(map(len, (s.train, s.val, s.test))) == 20
    assert s.skipped["missing_image"]["count"] == 1
    names = [{r.name for r in part} for part in (s.train, s.val, s.test)]
    assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
    for part in (s.train, s.val, s.test):
        for r in part:
            assert len(r.captions) == 5                      # all of a photo's captions stay together
    assert any(c.endswith(", with a comma") for r in s.train for c in r.captions)
    again = _load(kaggle_dir, split_sizes=(14, 3))
    assert [r.name for r in again.test] == [r.name for r in s.test]      # deterministic
    other = _load(kaggle_dir, split_sizes=(14, 3), split_seed=1)
    assert {r.name for r in other.test} != {r.name for r in s.test}


def test_karpathy_layout_restval_joins_train(karpathy_dir):
    s = _load(karpathy_dir)
    assert s.layout == "karpathy"
    assert [len(s.train), len(s.val), len(s.test)] == [4, 2, 2]
    assert s.skipped["missing_image"]["count"] == 1
    assert s.train[0].path.is_file()


def test_karpathy_json_without_any_split_field_gets_the_seeded_split(karpathy_dir):
    data = json.loads((karpathy_dir / "dataset_flickr8k.json").read_text())
    for img in data["images"]:
        del img["split"]
    (karpathy_dir / "dataset_flickr8k.json").write_text(json.dumps(data))
    s = _load(karpathy_dir, split_sizes=(5, 2))
    # The seeded split is made over all 9 captioned names; the one without a file is dropped after.
    assert sum(map(len, (s.train, s.val, s.test))) == 8 and s.skipped["missing_image"]["count"] == 1
    assert [r.name for r in s.test] == [r.name for r in _load(karpathy_dir, split_sizes=(5, 2)).test]
    assert {r.name for r in s.test} != {r.name for r in _load(karpathy_dir, split_sizes=(5, 2), split_seed=1).test}


def test_explicit_files_override_detection(kaggle_dir, tmp_path):
    moved = tmp_path / "elsewhere.csv"
    moved.write_bytes((kaggle_dir / "captions.txt").read_bytes())
    s = du.load_dataset(DataConfig(captions_file=str(moved), images_dir=str(kaggle_dir / "Images")))
    assert s.layout == "kaggle" and len(s.train) + len(s.val) + len(s.test) == 20


def test_unrecognised_folder_lists_what_was_looked_for(tmp_path):
    with pytest.raises(FileNotFoundError, match="captions.txt.*Flickr8k.token.txt"):
        _load(tmp_path)


# ----------------------------------------------------------------------------- tokenizer, vocabulary

def test_tokenize_rules():
    assert text.tokenize("A Dog's ball, in the T-shirt!") == ["a", "dogs", "ball", "in", "the", "t", "shirt"]
    assert text.tokenize("He doesn't run at 10am for 5km") == ["he", "does", "nt", "run", "at", "10", "am",
                                                             "for", "5", "km"]
    assert text.tokenize("  ... ") == []
    assert text.tokenize("Caf\u00e9 na\u00efve") == ["cafe", "naive"]


def test_vocabulary_counts_train_only_and_round_trips(kaggle_dir, tmp_path):
    s = _load(kaggle_dir, split_sizes=(14, 3), min_word_freq=1)
    vocab = du.build_vocabulary(s, min_freq=1)
    assert vocab.words[:4] == [text.PAD, text.SOS, text.EOS, text.UNK]
    train_words = {t for r in s.train for c in r.tokens for t in c}
    held_out = {t for r in s.val + s.test for c in r.tokens for t in c} - train_words
    assert held_out and not held_out & set(vocab.words)       # image numbers only in val/test
    ids = vocab.encode(["a", "dog", "zebra"])
    assert ids[0] == vocab.sos_id and ids[-1] == vocab.eos_id and ids[3] == vocab.unk_id
    assert vocab.decode(ids + [vocab.pad_id, vocab.word_id("dog")]) == ["a", "dog", text.UNK]
    vocab.save(tmp_path / "v.json")
    assert json.loads((tmp_path / "v.json").read_text()) == vocab.words
    assert Vocabulary.load(tmp_path / "v.json") == vocab
    rare = Vocabulary.build([["a", "a", "b"]], min_freq=2)
    assert "a" in rare and "b" not in rare
    (tmp_path / "bad.json").write_text('["x", "y"]')
    with pytest.raises(ValueError, match="must start with"):
        Vocabulary.load(tmp_path / "bad.json")


def test_long_captions_truncated_and_counted(kaggle_dir):
    s = _load(kaggle_dir, split_sizes=(14, 3), max_caption_len=4)
    assert all(len(t) <= 4 for r in s.train for t in r.tokens)
    assert s.truncated_captions == 100


# ----------------------------------------------------------------------------- images

def test_load_image_modes_exif_and_refusals(tmp_path, monkeypatch):
    for mode, value in [("L", 100), ("RGBA", (10, 20, 30, 0)), ("CMYK", (0, 255, 0, 0)), ("P", 3),
                        ("I;16", 65535), ("1", 1)]:
        path = tmp_path / f"{mode.replace(';', '')}.{'jpg' if mode == 'CMYK' else 'png'}"
        Image.new(mode, (6, 4), value).save(path)
        img = du.load_image(path)
        assert img.mode == "RGB" and img.size == (6, 4), mode
    assert du.load_image(tmp_path / "I16.png").getpixel((0, 0)) == (255, 255, 255)
    assert du.load_image(tmp_path / "RGBA.png").getpixel((0, 0)) == (255, 255, 255)   # transparent -> white

    exif = Image.Exif()
    exif[0x0112] = 6    # orientation: rotate 90 degrees clockwise to display
    Image.new("RGB", (8, 4), (200, 0, 0)).save(tmp_path / "rot.jpg", exif=exif.tobytes())
    assert du.load_image(tmp_path / "rot.jpg").size == (4, 8)

    (tmp_path / "junk.jpg").write_bytes(b"not an image at all")
    with pytest.raises(du.CorruptImageError):
        du.load_image(tmp_path / "junk.jpg")
    data = (_jpg(tmp_path / "full.jpg", size=(64, 64))).read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(du.CorruptImageError):
        du.load_image(tmp_path / "cut.jpg")
    monkeypatch.setattr(du, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(du.CorruptImageError, match="decompression bomb"):
        du.load_image(tmp_path / "full.jpg")


# ----------------------------------------------------------------------------- loaders

def _to_tensor(img):
    return torch.from_numpy(np.asarray(img.resize((8, 8)), dtype=np.float32)).permute(2, 0, 1) / 255


def test_caption_batches_pad_and_skip_corrupt_images(kaggle_dir):
    s = _load(kaggle_dir, split_sizes=(14, 3), min_word_freq=1)
    vocab = du.build_vocabulary(s, 1)
    victim = s.train[1].path
    victim.write_bytes(victim.read_bytes()[:200])          # truncated after the split was made
    s.train[2].tokens[0] = ["a", "dog"]                    # a short caption to pad
    ds = du.CaptionDataset(s.train[:3], vocab, transform=_to_tensor)
    assert len(ds) == 15
    loader = du.make_loader(ds, batch_size=15, shuffle=False, num_workers=0)
    batch = next(iter(loader))
    assert batch.n_skipped == 5 and len(batch) == 10
    assert batch.images.shape == (10, 3, 8, 8)
    assert batch.captions.shape == (10, int(batch.lengths.max()))
    short = (batch.image_idx == 2).nonzero()[0].item()
    assert batch.lengths[short] == 4
    assert batch.captions[short, :4].tolist() == vocab.encode(["a", "dog"])
    assert (batch.captions[short, 4:] == vocab.pad_id).all()
    assert set(batch.image_idx.tolist()) == {0, 2}

    images = du.ImageDataset(s.train[:3], transform=_to_tensor)
    ib = next(iter(du.make_loader(images, batch_size=3, num_workers=1)))   # also inside a worker
    assert ib.n_skipped == 1 and ib.image_idx.tolist() == [0, 2]


def test_an_images_captions_load_it_once_when_next_to_each_other(kaggle_dir):
    s = _load(kaggle_dir, split_sizes=(14, 3), min_word_freq=1)
    calls = []

    def counting(img):
        calls.append(1)
        return _to_tensor(img)

    ds = du.CaptionDataset(s.train[:3], du.build_vocabulary(s, 1), transform=counting)
    grouped = [ds[k] for k in range(len(ds))]                       # image 0's five, then image 1's...
    assert len(calls) == 3
    assert all(torch.equal(x, grouped[5 * i][0]) for k, (x, _, i) in enumerate(grouped))
    assert [i for _, _, i in grouped] == [0] * 5 + [1] * 5 + [2] * 5
    calls.clear()
    [ds[k] for k in (0, 5, 1, 6)]                                   # interleaved: no reuse
    assert len(calls) == 4


def test_features_round_trip_and_feature_batches(kaggle_dir, tmp_path):
    s = _load(kaggle_dir, split_sizes=(14, 3), min_word_freq=1)
    names = [r.name for r in s.train]
    feats = np.random.default_rng(0).normal(size=(len(names), 4, 6)).astype(np.float32)
    out = tmp_path / "features" / "key"
    features.write_features(out, names, (feats[i:i + 5] for i in range(0, len(names), 5)), 4, 6, {"key": "k1"})
    store = features.FeatureStore.open(out)
    assert (store.num_positions, store.channels, len(store)) == (4, 6, len(names))
    assert store.meta == {"key": "k1"}
    assert np.load(out / "features.npy").dtype == np.float16
    got = store.get(names[3])
    assert got.dtype == torch.float32 and torch.allclose(got, torch.from_numpy(feats[3]), atol=1e-2)
    ds = du.CaptionDataset(s.train, du.build_vocabulary(s, 1), features=store)
    batch = next(iter(du.make_loader(ds, batch_size=4, num_workers=0)))
    assert batch.features.shape == (4, 4, 6) and batch.images is None
    features.write_features(out, names, [feats], 4, 6, {"key": "k2"})     # replacing in place works
    assert features.FeatureStore.open(out).meta["key"] == "k2"
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]
    with pytest.raises(ValueError, match="rows written"):
        features.write_features(tmp_path / "short", names, [feats[:3]], 4, 6)
    assert not (tmp_path / "short").exists()


# ----------------------------------------------------------------------------- demo

def test_demo_set_is_deterministic_and_captions_state_what_is_drawn(tmp_path, monkeypatch):
    spec = demo_data.DemoSpec(n_images=40, image_size=64, seed=3)
    monkeypatch.setattr(demo_data, "DEMO", spec)
    root = demo_data.ensure_demo_dataset(tmp_path / "demo", spec)
    mtime = (root / "captions.txt").stat().st_mtime_ns
    assert demo_data.ensure_demo_dataset(tmp_path / "demo", spec) == root
    assert (root / "captions.txt").stat().st_mtime_ns == mtime        # idempotent
    assert len(list((root / "Images").iterdir())) == 40
    img0, caps0 = demo_data.demo_example(0, spec)
    img0b, caps0b = demo_data.demo_example(0, spec)
    assert caps0 == caps0b and np.array_equal(np.asarray(img0), np.asarray(img0b))
    relations = re.compile(r"left of|right of|above|below")
    n_two = 0
    for i in range(40):
        _, caps = demo_data.demo_example(i, spec)
        assert len(caps) == 5 and len(set(caps)) == 5
        two = sum(caps[0].count(c) for c in demo_data._COLOURS) == 2
        n_two += two
        assert all(bool(relations.search(c)) == two for c in caps)
    assert 10 <= n_two <= 30
    s = du.load_dataset(DataConfig(demo_dir=str(root)))
    assert s.layout == "demo" and (len(s.train), len(s.val), len(s.test)) == (32, 4, 4)


# ----------------------------------------------------------------------------- CLI

@pytest.mark.parametrize("layout", ["original", "kaggle", "karpathy"])
def test_dry_run_json_for_each_layout(layout, original_dir, kaggle_dir, karpathy_dir, capsys):
    root = {"original": original_dir, "kaggle": kaggle_dir, "karpathy": karpathy_dir}[layout]
    assert main(["--mode", "train", "--dataset_path", str(root), "--dry_run", "--min_word_freq", "1"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["layout"] == layout
    assert summary["skipped"]["missing_image"]["count"] == 1
    assert summary["vocabulary_size"] > 4
    assert sum(summary["images"].values()) == {"original": 10, "kaggle": 20, "karpathy": 8}[layout]


@pytest.mark.parametrize("value,message", [("does/not/exist", "does not exist"),
                                           ("EMPTY", "looked for"), ("FILE", "not a folder")])
def test_bad_dataset_path_is_one_line_error(value, message, tmp_path, capsys):
    value = {"EMPTY": str(tmp_path), "FILE": __file__}.get(value, value)
    assert main(["--mode", "train", "--dataset_path", value, "--dry_run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1]


# ----------------------------------------------------------------------------- more: tokenizer

@pytest.mark.parametrize("caption,words", [
    ("A little girl isn't climbing into a wooden playhouse ; she's 5 years old .",
     "a little girl is nt climbing into a wooden playhouse she s 5 years old"),
    ("Two men (one in a 10kg vest) cannot lift the 3m pole at 9pm !",
     "two men one in a 10 kg vest can not lift the 3 m pole at 9 pm"),
    ("\"Don't look\" , says the dog , which we'd call a tri-colored mutt & it'll run",
     "do nt look says the dog which we d call a tri colored mutt it ll run"),
    ("Theyre rock-climbing at 11am , whos there ? I'm done !",
     "they re rock climbing at 11 am who s there i m done"),
    ("People gonna line up , y'all ; 1st and 2nd place\u2019s door", "people gon na line up y all 1st and 2nd places door"),
])
def test_spacy_splits_clitics_times_and_units_after_cleaning(caption, words):
    assert text.tokenize(caption) == words.split()


def test_the_spacy_tokenizer_is_built_once_per_process():
    text._spacy_tokenizer.cache_clear()
    for caption in CAPS:
        text.tokenize(caption)
    assert text._spacy_tokenizer.cache_info().misses == 1


# ----------------------------------------------------------------------------- more: reporting, images

def test_each_kind_of_dirt_is_reported_once(original_dir, caplog):
    caplog.set_level("WARNING", logger="data_utils")
    _load(original_dir)
    messages = [r.getMessage() for r in caplog.records]
    for reason in ("duplicate_caption", "empty_caption", "missing_image", "space_instead_of_tab",
                   "non_utf8_line", "split_entry_without_captions"):
        hits = [m for m in messages if reason in m]
        assert len(hits) == 1, (reason, messages)
    assert "1999_gone.jpg" in next(m for m in messages if "missing_image" in m)


def test_more_image_modes(tmp_path):
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    pal.info["transparency"] = 0
    pal.save(tmp_path / "pal_t.png", transparency=0)
    assert du.load_image(tmp_path / "pal_t.png").getpixel((0, 0)) == (10, 200, 30)
    Image.new("LA", (4, 4), (50, 255)).save(tmp_path / "la.png")
    assert du.load_image(tmp_path / "la.png").getpixel((0, 0)) == (50, 50, 50)
    Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16)).save(tmp_path / "g16.png")
    assert abs(du.load_image(tmp_path / "g16.png").getpixel((0, 0))[0] - 128) <= 1   # rescaled, not clipped
    assert du.check_image_header(tmp_path / "la.png") is None
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    assert du.check_image_header(tmp_path / "bad.png")


def test_dry_run_drops_unreadable_images(kaggle_dir, capsys):
    (kaggle_dir / "Images" / "1003_abc.jpg").write_bytes(b"garbage")
    assert main(["--dataset_path", str(kaggle_dir), "--dry_run", "--split_sizes", "14", "3"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["skipped"]["unreadable_image"]["count"] == 1
    assert sum(summary["images"].values()) == 19


def test_feature_store_pickles_without_its_array(tmp_path):
    import pickle
    features.write_features(tmp_path / "f", ["a", "b"], [np.ones((2, 3, 4))], 3, 4, {})
    store = features.FeatureStore.open(tmp_path / "f")
    blob = pickle.dumps(store)
    assert len(blob) < 1000
    assert torch.equal(pickle.loads(blob).get("b"), torch.ones(3, 4))
    with pytest.raises(ValueError, match="exactly one"):
        du.ImageDataset([], transform=_to_tensor, features=store)


def test_dry_run_of_the_demo_set_through_the_cli(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo_data, "DEMO", demo_data.DemoSpec(n_images=30, image_size=64))
    monkeypatch.setattr(demo_data, "DEFAULT_DEMO_DIR", tmp_path / "demo")
    assert main(["--mode", "train", "--dry_run"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["layout"] == "demo" and summary["images"] == {"train": 24, "val": 3, "test": 3}
    assert summary["captions"]["train"] == 120 and summary["skipped"] == {}
    assert 15 <= summary["vocabulary_size"] <= 29     # 4 specials + the words of the templates


# ----------------------------------------------------------------------------- Hugging Face

@pytest.fixture(scope="module")
def hf_sets(tmp_path_factory):
    import datasets  # a declared requirement: missing is a failure, never a skip
    tmp = tmp_path_factory.mktemp("hf")
    images = [Image.new("RGB", (12, 12), (20 * i, 0, 0)) for i in range(10)]
    columns = {f"caption_{j}": [f"a red square number {i} view {j}" for i in range(10)] for j in range(5)}
    flat = datasets.Dataset.from_dict({"image": images, **columns}).cast_column("image", datasets.Image())
    flat.save_to_disk(str(tmp / "flat"))
    part = lambda lo, hi: datasets.Dataset.from_dict(   # noqa: E731
        {"img": images[lo:hi], "sentences": [[f"a shape {i}", f"shape {i} again"] for i in range(lo, hi)]})
    datasets.DatasetDict({"train": part(0, 6), "validation": part(6, 8), "test": part(8, 10)}) \
        .save_to_disk(str(tmp / "dict"))
    splits = ["train"] * 6 + ["restval", "val", "test", "test"]
    with_split = datasets.Dataset.from_dict(
        {"photo": images[:9] + [None], "caption": [[f"item {i}"] for i in range(10)], "split": splits},
        features=datasets.Features({"photo": datasets.Image(), "caption": [datasets.Value("string")],
                                    "split": datasets.Value("string")}))
    with_split.save_to_disk(str(tmp / "with_split"))
    folder = tmp / "folder"
    folder.mkdir()
    with open(folder / "metadata.jsonl", "w") as f:
        for i, img in enumerate(images):
            img.save(folder / f"im{i}.png")
            f.write(json.dumps({"file_name": f"im{i}.png", "caption": f"thing {i}"}) + "\n")
    return tmp


def test_hf_save_to_disk_with_caption_columns(hf_sets, tmp_path):
    cfg = DataConfig(hf_dataset=str(hf_sets / "flat"), hf_cache_dir=str(tmp_path))
    s = du.load_dataset(cfg)
    assert s.layout == "huggingface" and (len(s.train), len(s.val), len(s.test)) == (8, 1, 1)
    assert s.train[0].path.is_file() and len(s.train[0].captions) == 5
    assert du.load_image(s.train[0].path).size == (12, 12)
    assert [r.name for r in du.load_dataset(cfg).test] == [r.name for r in s.test]   # cached, same split


def test_hf_dataset_dict_keeps_its_splits_and_list_column(hf_sets, tmp_path):
    s = du.load_dataset(DataConfig(hf_dataset=str(hf_sets / "dict"), hf_image_column="img",
                                   hf_cache_dir=str(tmp_path)))
    assert (len(s.train), len(s.val), len(s.test)) == (6, 2, 2)
    assert s.val[0].captions == ["a shape 6", "shape 6 again"]


def test_hf_imagefolder_and_errors(hf_sets, tmp_path, monkeypatch, capsys):
    s = du.load_dataset(DataConfig(hf_dataset=str(hf_sets / "folder"), hf_cache_dir=str(tmp_path)))
    assert sum(map(len, (s.train, s.val, s.test))) == 10 and s.train[0].captions[0].startswith("thing")
    assert main(["--dry_run", "--hf_dataset", str(hf_sets / "flat"), "--hf_caption_columns", "nope"]) == 2
    assert "nope" in capsys.readouterr().err
    monkeypatch.setitem(__import__("sys").modules, "datasets", None)
    with pytest.raises(ValueError, match="pip install datasets"):
        du.load_dataset(DataConfig(hf_dataset=str(hf_sets / "flat"), hf_cache_dir=str(tmp_path)))


def test_kaggle_dirt_unquoted_commas_empty_and_non_utf8(tmp_path):
    root = tmp_path / "k"
    for name in _names(3):
        _jpg(root / "Images" / name)
    rows = [b"image,caption"]
    for i, name in enumerate(_names(3)):
        rows += [f"{name},{_caption(i, j)}".encode() for j in range(3)]
    rows += [b"1000_abc.jpg,a dog, unquoted, with commas", b"1001_abc.jpg,", b"1002_abc.jpg,a na\xefve dog",
             b"1002_abc.jpg,a na\xefve dog", b"only-one-cell"]
    (root / "captions.txt").write_bytes(b"\r\n".join(rows))
    s = du.load_dataset(DataConfig(dataset_path=str(root), split_sizes=(3, 0)))
    by_name = {r.name: r for r in s.train}
    assert by_name["1000_abc.jpg"].captions[-1] == "a dog, unquoted, with commas"
    assert by_name["1002_abc.jpg"].tokens[-1] == ["a", "naive", "dog"]
    assert s.repaired["unquoted_comma"]["count"] == 1 and s.repaired["non_utf8_line"]["count"] == 2
    assert s.skipped["empty_caption"]["count"] == 1 and s.skipped["duplicate_caption"]["count"] == 1
    assert s.skipped["malformed_line"]["count"] == 1


def test_hf_split_column_guessed_image_column_and_rows_without_image(hf_sets, tmp_path):
    s = du.load_dataset(DataConfig(hf_dataset=str(hf_sets / "with_split"), hf_cache_dir=str(tmp_path)))
    assert (len(s.train), len(s.val), len(s.test)) == (7, 1, 1)     # restval joins train
    assert s.skipped["missing_image"]["count"] == 1                  # the row whose image is None
    assert s.test[0].captions == ["item 8"]


@pytest.mark.parametrize("flags,message", [
    (["--captions_file", "nope.txt"], "--captions_file nope.txt does not exist"),
    (["--dataset_path", "KAGGLE", "--images_dir", "no/such/dir"], "--images_dir no/such/dir"),
    (["--dataset_path", "KAGGLE", "--split_sizes", "20", "5"], "split_sizes 20 5 need 25 images"),
    (["--dataset_path", "KAGGLE", "--split_sizes", "0", "5"], "split_sizes must be two counts"),
    (["--dataset_path", "KAGGLE", "--min_word_freq", "0"], "min_word_freq must be >= 1"),
])
def test_bad_data_flags_are_one_line_errors(flags, message, kaggle_dir, capsys):
    flags = [str(kaggle_dir) if f == "KAGGLE" else f for f in flags]
    assert main(["--mode", "train", "--dry_run", *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1], err
