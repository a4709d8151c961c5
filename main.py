"""Command line of the captioning toolkit: parse arguments, build configs, dispatch.

    python main.py --mode train                          # demo data set, demo preset
    python main.py --mode train --dataset_path DIR       # Flickr8k/30k/COCO in any supported layout
    python main.py --mode test --image_path photo.jpg    # caption photos
    python main.py --mode eval                           # score the test split
    python main.py --mode extract --dataset_path DIR --features_dir OUT

Each mode's work lives in its own module; this file only parses and dispatches.
Modules are imported lazily so `--help` and bad flags answer fast.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

MODES = ("train", "test", "eval", "extract")


def _config(cls, args: argparse.Namespace, **overrides):
    """Build a config dataclass from the parsed flags that share its field names."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in vars(args).items() if k in names and v is not None}
    values.update(overrides)
    return cls(**values)


def _add_data_args(parser: argparse.ArgumentParser) -> None:
    """Data set flags (owner: data_utils.py)."""
    # Defaults live in data_utils.DataConfig (None here = "use the config's"), so parsing never
    # imports torch; the help states them.
    g = parser.add_argument_group("data")
    g.add_argument("--dataset_path", default=None,
                   help="data set folder, layout auto-detected: original Flickr8k (Flickr8k_text/), "
                        "Kaggle (captions.txt + Images/) or Karpathy JSON (dataset_*.json); "
                        "default: the embedded demo data set")
    g.add_argument("--captions_file", default=None, metavar="PATH",
                   help="captions file, overriding detection (Flickr8k.token.txt, captions.txt CSV or "
                        "Karpathy .json)")
    g.add_argument("--images_dir", default=None, metavar="DIR",
                   help="image folder, overriding detection")
    g.add_argument("--hf_dataset", default=None, metavar="NAME_OR_PATH",
                   help="Hugging Face data set: a save_to_disk folder, an imagefolder with a captions "
                        "column, or a hub name (downloaded only then); needs `pip install datasets`")
    g.add_argument("--hf_image_column", default=None, metavar="NAME",
                   help="Hugging Face image column [image]")
    g.add_argument("--hf_caption_columns", nargs="+", default=None, metavar="NAME",
                   help="Hugging Face caption column(s): several string columns or one list column "
                        "[guessed: caption_0..caption_4, captions, sentences, caption, text]")
    g.add_argument("--min_word_freq", type=int, default=None,
                   help="training words seen fewer times become <unk> [5]")
    g.add_argument("--max_caption_len", type=int, default=None,
                   help="words per caption; longer captions are truncated and counted [35]")
    g.add_argument("--split_sizes", type=int, nargs=2, default=None, metavar=("TRAIN", "VAL"),
                   help="images in train and val for seeded splits (Kaggle layout, demo, unsplit "
                        "Hugging Face sets); the rest is test [6000 1000; 80/10/10 below 7,000 images]")
    g.add_argument("--split_seed", type=int, default=None, help="seed of the split by image [0]")
    g.add_argument("--num_workers", type=int, default=None, help="data loader worker processes [2]")
    g.add_argument("--dry_run", action="store_true",
                   help="check the data, build the vocabulary, print a JSON summary and exit")


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    """Model and decoding flags (owner: model.py)."""
    # Defaults live in model.ModelConfig / model.DecodeConfig (None here = "use the config's"), so
    # parsing never imports torch; the help states them.
    g = parser.add_argument_group("model")
    g.add_argument("--encoder", default=None,
                   choices=("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "inception_v3",
                            "small_cnn"),
                   help="image encoder backbone [resnet50]; small_cnn: a 4-layer CNN without pretrained "
                        "weights, for quick runs (the demo), 64 px")
    g.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=None,
                   help="ImageNet weights through torchvision (torch hub cache) [on]")
    g.add_argument("--encoder_weights", default=None, metavar="PATH",
                   help="local torchvision state-dict file for the encoder, instead of the download")
    g.add_argument("--encoded_size", type=int, default=None,
                   help="pool the encoder's feature map to S x S positions [14]")
    g.add_argument("--image_size", type=int, default=None,
                   help="input crop size [the encoder's own: 224, 299 for inception_v3]")
    g.add_argument("--encoder_proj_dim", type=int, default=None,
                   help="1x1 conv reducing encoder channels to N before attention; 0 = off [0]")
    g.add_argument("--fine_tune_encoder", action=argparse.BooleanOptionalAction, default=None,
                   help="train the encoder's last stages too [off]")
    g.add_argument("--embed_dim", type=int, default=None, help="word embedding size [512]")
    g.add_argument("--attention_dim", type=int, default=None, help="attention size [512]")
    g.add_argument("--decoder_dim", type=int, default=None, help="LSTM hidden size [512]")
    g.add_argument("--num_layers", type=int, default=None, help="stacked LSTM layers [2]")
    g.add_argument("--dropout", type=float, default=None, help="dropout in the decoder [0.5]")
    g.add_argument("--alpha_c", type=float, default=None,
                   help="weight of the doubly stochastic attention regularisation [1.0]")
    g.add_argument("--fused_attention", action=argparse.BooleanOptionalAction, default=None,
                   help="on CPU, compile the attention energies of greedy/beam search over large batches with "
                        "torch.compile (a few seconds once per process; falls back to eager ops if compiling "
                        "fails) [on for train (validation) and eval, off for test]")
    g = parser.add_argument_group("decoding")
    g.add_argument("--beam_size", type=int, default=None, help="beam width; 1 = greedy [5]")
    g.add_argument("--max_len", type=int, default=None, help="most tokens generated per caption [35]")
    g.add_argument("--length_penalty", type=float, default=None,
                   help="rank beams by log-prob / length**penalty; 0 = off [0.0]")
    g.add_argument("--block_repeat_trigrams", action=argparse.BooleanOptionalAction, default=None,
                   help="never repeat a word trigram within a caption [off]")
    g.add_argument("--suppress_unk", action=argparse.BooleanOptionalAction, default=None,
                   help="never emit <unk> [on]")


def _add_train_args(parser: argparse.ArgumentParser) -> None:
    """Training and extraction flags (owner: train.py)."""
    # Defaults live in train.TrainConfig (None here = "use the config's", and lets the demo preset
    # tell a flag the user gave from one left alone); the help states them.
    g = parser.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=None, help="most epochs; early stopping may end sooner [100]")
    g.add_argument("--batch_size", type=int, default=None,
                   help="captions per step (per process under torchrun) [128]")
    g.add_argument("--lr", type=float, default=None, help="decoder learning rate [5e-4]")
    g.add_argument("--encoder_lr", type=float, default=None,
                   help="encoder learning rate with --fine_tune_encoder [1e-4]")
    g.add_argument("--optimizer", choices=("adamw", "adam"), default=None, help="optimizer [adamw]")
    g.add_argument("--weight_decay", type=float, default=None, help="weight decay [0.01]")
    g.add_argument("--grad_clip", type=float, default=None,
                   help="clip the gradient's global norm to this; 0 = off [5.0]")
    g.add_argument("--patience", type=int, default=None,
                   help="early stopping: epochs without a better validation BLEU-4; 0 = off [5]")
    g.add_argument("--lr_patience", type=int, default=None,
                   help="epochs without a better validation BLEU-4 before the lr drops [2]")
    g.add_argument("--lr_factor", type=float, default=None, help="lr multiplier on a plateau [0.5]")
    g.add_argument("--max_bad_steps", type=int, default=None,
                   help="NaN/inf losses in a row that stop training [5]")
    g.add_argument("--amp", choices=("auto", "off", "bf16", "fp16"), default=None,
                   help="mixed precision: auto = bf16 (else fp16 + gradient scaler) on CUDA, off on CPU [auto]")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None,
                   help="auto = cuda when available [auto]")
    g.add_argument("--multi_gpu", action=argparse.BooleanOptionalAction, default=None,
                   help="nn.DataParallel over the visible GPUs (for several machines use torchrun) [off]")
    g.add_argument("--seed", type=int, default=None, help="random seed; CPU runs repeat exactly [0]")
    g.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads; on a busy machine 1 can be much faster [torch's default]")
    g.add_argument("--resume", default=None, metavar="PATH|auto",
                   help="continue training from a checkpoint; auto = <weights_dir>/last.pt")
    g.add_argument("--weights_dir", default=None, help="checkpoints and history [weights]")
    g.add_argument("--graphs_dir", default=None, help="loss.png and bleu.png [graphs]")
    g.add_argument("--save_every", type=int, default=None,
                   help="also keep weights_dir/epoch_NNN.pt every N epochs; 0 = off [0]")
    g.add_argument("--keep_last", type=int, default=None,
                   help="epoch_NNN.pt files to keep; 0 = all [0]")
    g.add_argument("--group_by_image", action=argparse.BooleanOptionalAction, default=None,
                   help="end to end: batch an image's captions together so the CNN runs once per "
                        "image, not once per caption [on]")
    g.add_argument("--features_dir", default=None, metavar="DIR",
                   help="train/eval: a folder with features.npy (N x P x C) + names.json to train on "
                        "(no CNN); extract mode: where to write them")
    g.add_argument("--features_root", default=None,
                   help="where a frozen encoder's features are cached [data/features]")
    g.add_argument("--cache_features", action=argparse.BooleanOptionalAction, default=None,
                   help="frozen encoder: run the CNN once per image and train on the cache [on]")
    g.add_argument("--wandb", choices=("auto", "online", "offline", "disabled"), default=None,
                   help="Weights & Biases: auto = online with credentials, else offline [auto]")
    g.add_argument("--wandb_project", default=None, help="wandb project [captioner]")
    g.add_argument("--wandb_entity", default=None, help="wandb team or user [the account's default]")
    g.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=None,
                   help="also write TensorBoard scalars and sample captions to weights_dir/runs/ [off]")


def _add_infer_args(parser: argparse.ArgumentParser) -> None:
    """Captioning and evaluation flags (owner: test.py, test_eval.py)."""
    g = parser.add_argument_group("test / eval")
    g.add_argument("--image_path", nargs="+", default=None,
                   help="image file(s) or folder(s) to caption (test mode)")
    g.add_argument("--checkpoint", default="weights/best.pt", help="checkpoint to load")
    g.add_argument("--output", default=None,
                   help="test mode: write the captions to this .json file instead of printing them")
    g.add_argument("--attention_map", nargs="?", const="", default=None, metavar="PATH",
                   help="test mode: save attention figures (photo + one panel per word); the flag "
                        "alone writes graphs/attention_<image>.png, PATH a .png file or a folder")
    g.add_argument("--split", choices=("val", "test"), default="test",
                   help="eval mode: the split to score")
    g.add_argument("--results_dir", default=None,
                   help="eval mode: where eval_<split>.json and captions_<split>.json go "
                        "(None: the checkpoint's folder)")
    g.add_argument("--grid_images", type=int, default=6,
                   help="eval mode: images in the graphs/eval_<split>_grid.png picture")
    g.add_argument("--java", action=argparse.BooleanOptionalAction, default=None,
                   help="eval mode: PTB tokenizer and METEOR in Java (None: when Java is "
                        "installed); --no-java uses the Python tokenisation rule, no METEOR")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show a flag's default only when argparse holds it; None means the config's, already in [brackets]."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False:
            return action.help or ""
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="main.py",
        description="Image captioning: ResNet encoder + two-layer attention LSTM (Show, Attend and Tell).",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--mode", choices=MODES, default="train", help="what to do")
    parser.add_argument("--log_level", choices=("debug", "info", "warning", "error"), default="info",
                        help="logging verbosity (stderr)")
    _add_data_args(parser)
    _add_model_args(parser)
    _add_train_args(parser)
    _add_infer_args(parser)
    return parser


def _set_fused_attention(args: argparse.Namespace) -> None:
    """Captioning a few photos (test) does not pay for a compile; validation and evaluation do."""
    import model

    on = args.fused_attention if args.fused_attention is not None else args.mode != "test"
    model.FusedAttention.enabled = on


def _dispatch(args: argparse.Namespace) -> int:
    if args.mode == "train" and args.dry_run:
        import json

        import data_utils

        summary = data_utils.dry_run(_config(data_utils.DataConfig, args))
        print(json.dumps(summary, indent=2))
        return 0
    _set_fused_attention(args)
    if args.mode == "test":
        import model
        import test

        if not args.image_path:
            raise ValueError("--mode test needs --image_path FILE_OR_FOLDER [...]")
        test.run_test(args.image_path, args.checkpoint, _config(model.DecodeConfig, args),
                      output=args.output, attention_map=args.attention_map,
                      device=args.device or "auto", batch_size=args.batch_size or 16)
        return 0
    if args.mode == "eval":
        import data_utils
        import model
        import test_eval

        test_eval.run_evaluation(
            args.checkpoint, _config(data_utils.DataConfig, args), _config(model.DecodeConfig, args),
            split=args.split, features_dir=args.features_dir, batch_size=args.batch_size or 32,
            device=args.device or "auto", results_dir=args.results_dir,
            graphs_dir=args.graphs_dir or "graphs", grid_images=args.grid_images, use_java=args.java,
            wandb_mode=args.wandb or "auto", wandb_project=args.wandb_project or "captioner",
            wandb_entity=args.wandb_entity)
        return 0
    if args.mode in ("train", "extract"):
        import data_utils
        import model
        import train

        if args.mode == "train" and train.is_demo(_config(data_utils.DataConfig, args)):
            # The demo preset fills every field whose flag the user left at its default.
            defaults = vars(build_parser().parse_args([]))
            explicit = {k for k, v in vars(args).items() if v != defaults.get(k)}
            for name, value in train.demo_overrides(explicit).items():
                setattr(args, name, value)
        data_cfg = _config(data_utils.DataConfig, args)
        # vocab_size is a placeholder: training sets it from the vocabulary it builds.
        model_cfg = _config(model.ModelConfig, args, vocab_size=len(data_utils.SPECIALS) + 1)
        train_cfg = _config(train.TrainConfig, args)
        if args.mode == "extract":
            return train.run_extract(data_cfg, model_cfg, train_cfg)
        return train.run_training(data_cfg, model_cfg, train_cfg)
    raise ValueError(f"--mode {args.mode} is not implemented yet")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    try:
        return _dispatch(args)
    except (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
