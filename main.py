"""Command line of the captioning toolkit: parse arguments, build configs, dispatch.

    python main.py --mode train                          # demo data set, demo preset
    python main.py --mode train --dataset_path DIR       # Flickr8k/30k/COCO in any supported layout
    python main.py --mode test --image_path photo.jpg    # caption photos
    python main.py --mode eval                           # score the test split
    python main.py --mode eval --split val --compare other.pt   # B - A with paired intervals
    python main.py --mode extract --dataset_path DIR --features_dir OUT
    python main.py --mode export --output my-captioner/ [--push_to_hub OWNER/NAME]
    python main.py --mode serve                          # a local page: http://127.0.0.1:7860/

The flags of the config dataclasses (config.py) are generated from their fields: name, type,
default and choices come from there, the help from the field's comment unless HELP below has a
longer text. A flag the user did not give is absent from the parsed namespace (its default is
argparse.SUPPRESS), which is how the demo preset tells a given flag from one left alone.
Every config is built in every mode, so every flag given is validated even where it is unused.
Each mode's module is imported only when it runs, so `--help` and bad flags answer without torch.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import logging
import re
import sys
import types
import typing

import config
from config import DataConfig, DecodeConfig, ModelConfig, ServeConfig, TrainConfig

MODES = ("train", "test", "eval", "extract", "export", "serve")
CONFIGS = {DataConfig: "data", ModelConfig: "model", DecodeConfig: "decoding", TrainConfig: "training",
           ServeConfig: "serve"}
# Fields without a flag: set from the vocabulary, the encoder spec or the features file, or derived.
NO_FLAG = frozenset(config.DERIVED_FIELDS)
CHOICES = {
    "optimizer": config.OPTIMIZERS,
    "amp": config.AMP_MODES,
    "device": config.DEVICES,
    "wandb": config.WANDB_MODES,
    "objective": config.OBJECTIVES,
    "scst_baseline": config.SCST_BASELINES,
    "select_by": config.SELECTION_SCORES,
}


def _encoder_name(text: str) -> str:
    """--encoder's check at parse time (its names are open-ended: timm/NAME), as choices= are checked."""
    try:
        config.check_encoder_name(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("unknown encoder ")) from None
    return text


# Flags whose values are checked while parsing, like choices (the config checks them again).
TYPES = {"encoder": _encoder_name}
METAVARS = {"split_sizes": ("TRAIN", "VAL"), "hf_caption_columns": "NAME", "resume": "PATH|auto",
            "captions_file": "PATH", "images_dir": "DIR", "hf_dataset": "NAME_OR_PATH",
            "encoder_weights": "FILE", "features_dir": "DIR", "graphs_dir": "DIR", "init_from": "PATH", "encoder": "NAME"}
# Help texts longer than config.py's field comments (no defaults here: they are appended).
HELP = {
    "dataset_path": "data set folder, layout auto-detected: original Flickr8k (Flickr8k_text/), Kaggle "
                    "(captions.txt + Images/) or Karpathy JSON (dataset_*.json); unset: the embedded "
                    "demo data set and the demo preset",
    "captions_file": "captions file, overriding detection (Flickr8k.token.txt, captions.txt CSV or "
                     "Karpathy .json)",
    "hf_dataset": "Hugging Face data set: a save_to_disk folder, an imagefolder with a captions column, "
                  "or a hub name (downloaded only then)",
    "hf_caption_columns": "Hugging Face caption column(s): several string columns or one list column; "
                          "unset: guessed (caption_0..caption_4, captions, sentences, caption, text)",
    "split_sizes": "images in train and val for seeded splits (Kaggle layout, demo, unsplit Hugging Face "
                   "sets), the rest is test; unset: 6000 1000, or 80/10/10 below 7,000 images",
    "encoder": f"image encoder backbone: {', '.join(config.BUILTIN_ENCODERS)} (small_cnn: 4 convolutions "
               f"without pretrained weights, 64 px, for quick runs: the demo), or {config.TIMM_PREFIX}NAME for "
               f"any timm model (e.g. {config.TIMM_PREFIX}tf_efficientnet_lite0, {config.TIMM_PREFIX}convnext_tiny, "
               f"{config.TIMM_PREFIX}vit_base_patch16_clip_224.openai; preprocessing from its pretrained config)",
    "pretrained": "pretrained weights: torchvision's ImageNet download, or timm's through the Hugging Face "
                  "cache (online); --encoder_weights FILE works offline",
    "encoder_weights": "the backbone's weights from this file (safetensors or a torch state dict, read "
                       "without pickle) instead of the download",
    "image_size": "input crop size; unset: the encoder's own (224, 299 for inception_v3, a timm model's "
                  "pretrained input size)",
    "crop_pct": "share of the resized shorter side the centre crop keeps (resize = image_size / crop_pct; "
                "1: the whole shorter side, nothing cut off a square photo); unset: the encoder's own "
                "(224/256 for torchvision and tf_efficientnet_lite0)",
    "fine_tune_stages": "with --fine_tune_encoder: stages that train, counted from the top; unset: resnets 3 "
                        "(layer2-4), inception_v3 2 (Mixed_6, Mixed_7), small_cnn all, timm 3 (its last "
                        "coarse parameter groups: tf_efficientnet_lite0 blocks.4-6 and conv_head, a ViT its last 3 blocks)",
    "batch_size": "captions per training step (per process under torchrun); test and eval: images "
                  "per batch, their own default unless given",
    "device": "auto = cuda when available, else cpu (every mode)",
    "threads": "torch CPU threads; on a busy machine 1 can be much faster; unset: torch's default",
    "multi_gpu": "nn.DataParallel over the visible GPUs (for several machines use torchrun)",
    "features_dir": "train/eval: a folder with features.npy (N x P x C) + names.json to use instead of "
                    "a CNN; extract mode: where to write them",
    "tensorboard": "also write TensorBoard scalars and sample captions to weights_dir/runs/",
}
# The tiniest vocabulary ModelConfig accepts: training replaces it with the built vocabulary's size.
VOCAB_PLACEHOLDER = 5


class _ParserExit(Exception):
    """argparse wants to stop (an error, or --help): main() returns the status instead of exiting."""

    def __init__(self, status: int, message: str | None = None):
        super().__init__(message)
        self.status, self.message = status, message


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise _ParserExit(2, f"error: {message}; see --help")

    def exit(self, status: int = 0, message: str | None = None):
        raise _ParserExit(status, message)


def _field_comments(cls) -> dict[str, str]:
    """The comment after each field's line in config.py."""
    names = {f.name for f in dataclasses.fields(cls)}
    comments = {}
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s+(\w+):[^#]*#\s*(.+)", line)
        if m and m.group(1) in names:
            comments[m.group(1)] = m.group(2).strip()
    return comments


def _shown(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (tuple, list)):
        return " ".join(map(str, value))
    return "unset" if value is None else str(value)


def _type_kwargs(hint) -> dict:
    """argparse keywords for a field's type: bool, int, float, str, tuple[X, X], tuple[X, ...]."""
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if hint is bool:
        return {"action": argparse.BooleanOptionalAction}
    if typing.get_origin(hint) is tuple:
        args = typing.get_args(hint)
        return {"type": args[0], "nargs": "+" if args[-1] is Ellipsis else len(args)}
    return {"type": hint}


def _add_config_flags(parser: argparse.ArgumentParser, cls, taken: set[str]) -> None:
    """One flag per field of `cls`, absent from the namespace unless given.

    A field name that an earlier config already has keeps that one flag, which sets both."""
    group = parser.add_argument_group(CONFIGS[cls], f"{cls.__name__} in config.py")
    comments, hints = _field_comments(cls), typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in NO_FLAG or f.name in taken or f.default is dataclasses.MISSING:
            continue
        taken.add(f.name)
        text = HELP.get(f.name) or re.sub(r"\bNone\b", "unset", comments.get(f.name, ""))
        kwargs = {**_type_kwargs(hints[f.name]), "default": argparse.SUPPRESS,
                  "help": f"{text} [{_shown(f.default)}]".replace("%", "%%").strip()}
        if f.name in CHOICES:
            kwargs["choices"] = CHOICES[f.name]
        if f.name in TYPES:
            kwargs["type"] = TYPES[f.name]
        if "action" not in kwargs and f.name not in CHOICES:
            kwargs["metavar"] = METAVARS.get(f.name) or {int: "N", float: "X"}.get(kwargs["type"])
        group.add_argument(f"--{f.name}", **kwargs)


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a count >= 0, got {value}")
    return value


def _add_infer_flags(parser: argparse.ArgumentParser) -> None:
    """Flags of test.py (--mode test) and test_eval.py (--mode eval)."""
    g = parser.add_argument_group("test / eval")
    g.add_argument("--image_path", nargs="+", default=None, metavar="PATH",
                   help="test mode: image file(s) or folder(s) to caption")
    g.add_argument("--checkpoint", default=None, metavar="PATH",
                   help="checkpoint to load [<weights_dir>/best.pt]")
    g.add_argument("--output", default=None, metavar="PATH",
                   help="test mode: write the captions to this .json file instead of printing them; "
                        "export mode: the folder to write (model.safetensors, config.json, vocab.json, "
                        "README.md)")
    g.add_argument("--attention_map", nargs="?", const="", default=None, metavar="PATH",
                   help="test mode: save attention figures (photo + one panel per word); the flag alone "
                        "writes graphs/attention_<image>.png, PATH a .png file or a folder")
    g.add_argument("--split", choices=("val", "test"), default="test", help="eval mode: the split to score [test]")
    g.add_argument("--results_dir", default=None, metavar="DIR",
                   help="eval mode: where eval_<split>.json and captions_<split>.json go "
                        "[the checkpoint's folder]")
    g.add_argument("--grid_images", type=_count, default=6,
                   help="eval mode: images in the graphs/eval_<split>_grid.png picture and attention maps "
                        "in the report page [6]")
    g.add_argument("--push_to_hub", default=None, metavar="OWNER/NAME",
                   help="export mode: then upload the folder to this Hugging Face model repository "
                        "(token from `hf auth login` or HF_TOKEN)")
    g.add_argument("--private", action=argparse.BooleanOptionalAction, default=False,
                   help="export mode, with --push_to_hub: create the repository as private [off]")
    g.add_argument("--bootstrap", type=_count, default=config.BOOTSTRAP_RESAMPLES, metavar="N",
                   help="eval mode: bootstrap resamples of the images behind each metric's 95%% interval and "
                        f"--compare's paired differences; 0: no intervals [{config.BOOTSTRAP_RESAMPLES}]")
    g.add_argument("--compare", default=None, metavar="PATH",
                   help="eval mode: a second checkpoint, or a captions_<split>.json, scored on the same images; "
                        "reports each metric's difference B - A with a paired bootstrap interval")
    g.add_argument("--report", action=argparse.BooleanOptionalAction, default=True,
                   help="eval mode: write the page eval_<split>.html beside eval_<split>.json (thumbnails, "
                        "every image's captions and scores, attention maps) [on]")
    g.add_argument("--java", action=argparse.BooleanOptionalAction, default=None,
                   help="eval mode: PTB tokenizer and METEOR in Java; --no-java uses the Python "
                        "tokenisation, no METEOR [when Java is installed]")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="main.py", allow_abbrev=False, usage="%(prog)s [--mode MODE] [options]",
                     description="Image captioning: ResNet encoder + two-layer attention LSTM "
                                 "(Show, Attend and Tell).")
    parser.add_argument("--mode", choices=MODES, default="train", help="what to do [train]")
    parser.add_argument("--log_level", choices=("debug", "info", "warning", "error"), default="info",
                        help="logging verbosity, on stderr [info]")
    parser.add_argument("--dry_run", action="store_true",
                        help="train mode: check the data, build the vocabulary, print a JSON summary and exit")
    taken: set[str] = set()
    for cls in CONFIGS:
        _add_config_flags(parser, cls, taken)
    _add_infer_flags(parser)
    return parser


# ---------------------------------------------------------------- configs

def given(args: argparse.Namespace) -> dict:
    """The config fields the user gave on the command line, with their values (lists as tuples)."""
    names = {f.name for cls in CONFIGS for f in dataclasses.fields(cls)}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in vars(args).items() if k in names}


def _config(cls, args: argparse.Namespace, preset: dict | None = None, **overrides):
    """`cls` from the flags given, over `preset`, over the dataclass's defaults."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in {**(preset or {}), **given(args), **overrides}.items() if k in names}
    return cls(**values)


@dataclasses.dataclass(frozen=True)
class Configs:
    data: DataConfig
    model: ModelConfig
    decode: DecodeConfig
    train: TrainConfig
    serve: ServeConfig


def build_configs(args: argparse.Namespace, preset: dict | None = None) -> Configs:
    """Every config, in every mode: a bad value is refused even where the mode does not use it."""
    return Configs(_config(DataConfig, args, preset), _config(ModelConfig, args, preset, vocab_size=VOCAB_PLACEHOLDER),
                   _config(DecodeConfig, args, preset), _config(TrainConfig, args, preset),
                   _config(ServeConfig, args, preset))


def _checkpoint(args: argparse.Namespace, cfgs: Configs) -> str:
    return args.checkpoint or f"{cfgs.train.weights_dir}/best.pt"


def _typed(args: argparse.Namespace, *names: str) -> dict:
    """Test and eval have their own batch size and workers; values the user gave are used
    (validated by TrainConfig/DataConfig)."""
    return {name: getattr(args, name) for name in names if name in vars(args)}


# ---------------------------------------------------------------- modes

def _train(args: argparse.Namespace) -> int:
    import train

    preset = train.demo_overrides(given(args)) if train.is_demo(_config(DataConfig, args)) else {}
    cfgs = build_configs(args, preset)
    if args.dry_run:
        import json

        import data_utils

        print(json.dumps(data_utils.dry_run(cfgs.data), indent=2))
        return 0
    return train.run_training(cfgs.data, cfgs.model, cfgs.train)


def _extract(args: argparse.Namespace) -> int:
    cfgs = build_configs(args)
    import extract

    return extract.run_extract(cfgs.data, cfgs.model, cfgs.train)


def _test(args: argparse.Namespace) -> int:
    cfgs = build_configs(args)
    if not args.image_path:
        raise ValueError("--mode test needs --image_path FILE_OR_FOLDER [...]")
    import test

    test.run_test(args.image_path, _checkpoint(args, cfgs), _decoding(args), output=args.output,
                  attention_map=args.attention_map, device=cfgs.train.device,
                  threads=cfgs.train.threads, overwrite=cfgs.train.overwrite,
                  **_typed(args, "batch_size", "num_workers"))
    return 0


def _eval(args: argparse.Namespace) -> int:
    cfgs = build_configs(args)
    import test_eval

    t = cfgs.train
    test_eval.run_evaluation(
        _checkpoint(args, cfgs), cfgs.data, _decoding(args), split=args.split, features_dir=t.features_dir,
        device=t.device, results_dir=args.results_dir, graphs_dir=t.graphs_dir,
        grid_images=args.grid_images, use_java=args.java, wandb_mode=t.wandb, wandb_project=t.wandb_project,
        wandb_entity=t.wandb_entity, overwrite=t.overwrite, threads=t.threads, resamples=args.bootstrap,
        seed=t.seed, compare=args.compare, with_report=args.report, **_typed(args, "batch_size", "num_workers"))
    return 0


def _export(args: argparse.Namespace) -> int:
    cfgs = build_configs(args)
    if not args.output:
        raise ValueError("--mode export needs --output FOLDER (where the model folder is written)")
    import export

    export.run_export(_checkpoint(args, cfgs), args.output, push_to_hub=args.push_to_hub,
                      private=args.private, overwrite=cfgs.train.overwrite,
                      decode_cfg=_decoding(args))
    return 0


def _serve(args: argparse.Namespace) -> int:
    cfgs = build_configs(args)
    import serve

    return serve.run_serve(_checkpoint(args, cfgs), host=cfgs.serve.host, port=cfgs.serve.port,
                           decode_cfg=_decoding(args), device=cfgs.train.device,
                           max_bytes=cfgs.serve.max_upload_mb * 1024 * 1024)


def _decoding(args: argparse.Namespace) -> dict:
    """The decoding flags typed (checked by build_configs): they go over the checkpoint's own
    defaults (an exported folder's `decoding`), field by field."""
    names = {f.name for f in dataclasses.fields(DecodeConfig)}
    return {k: v for k, v in given(args).items() if k in names}


DISPATCH = {"train": _train, "test": _test, "eval": _eval, "extract": _extract, "export": _export,
            "serve": _serve}


def main(argv: list[str] | None = None) -> int:
    """Run one mode; returns the exit status (2 with a one-line `error: ...` for bad input)."""
    try:
        args = build_parser().parse_args(argv)
    except _ParserExit as exc:
        if exc.message:
            print(exc.message.rstrip(), file=sys.stderr)
        return exc.status
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    try:
        return DISPATCH[args.mode](args)
    except (ValueError, OSError) as exc:  # bad input, or a file that cannot be read or written
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
