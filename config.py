"""Every config of the toolkit, one frozen dataclass per concern, with its choices.

Defaults and choices are defined here once: main.py builds its flags from these fields, and the
modules that do the work take the dataclasses as explicit arguments. Plain Python only (no torch),
so `python main.py --help` and a bad flag answer without loading the heavy libraries.
"""
from __future__ import annotations

from dataclasses import dataclass

# The names --encoder takes (what each one is, its channels, preprocessing and stages: encoders.py).
RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
SMALL_CNN = "small_cnn"
BUILTIN_ENCODERS = RESNETS + ("inception_v3", SMALL_CNN)
TIMM_PREFIX = "timm/"                 # --encoder timm/<model name>: any timm backbone
FEATURES = "features"                 # no CNN: the model reads cached features (--features_dir)
# ModelConfig fields that say how the encoder's weights were initialised: a checkpoint's weights
# replace them, so a checkpoint trained from ImageNet weights resumes without those weights on disk.
INIT_FIELDS = ("pretrained", "encoder_weights", "encoder_from_scratch")
# ModelConfig fields that say how a model trains, not what its weights are: --init_from may change
# them (e.g. fine-tune the encoder of a run trained frozen on cached features).
TRAINING_FIELDS = ("fine_tune_encoder", "fine_tune_stages", "dropout", "embed_dropout", "feature_dropout",
                   "alpha_c")
# ModelConfig fields without a flag: set from the vocabulary, the encoder spec (encoders.resolve)
# or a features file, or derived from other fields.
DERIVED_FIELDS = ("vocab_size", "feature_dim", "preprocess", "encoder_from_scratch")
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "lanczos")  # torchvision's names (PIL images)
OPTIMIZERS = ("adamw", "adam")
AMP_MODES = ("auto", "off", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
WANDB_MODES = ("auto", "online", "offline", "disabled")
OBJECTIVES = ("xe", "scst")
SELECTION_SCORES = ("cider", "bleu4")
# Batch 128 trains well at 1e-3 (2x the usual 5e-4: a quarter of the updates of batch 32); SCST
# fine-tunes a trained model at a fifth of that: 5e-5 barely moved it, 4e-4 first set it back
# (README: measured on real Flickr8k).
DEFAULT_LR = {"xe": 1e-3, "scst": 2e-4}
SCST_BASELINES = ("mean", "greedy")
# --mode eval: bootstrap resamples behind each metric's 95% interval (0: none). 1,000 resamples of
# 1,000 images take about 0.05 s once per-image statistics exist (bench/bench_bootstrap.py).
BOOTSTRAP_RESAMPLES = 1000


def check_encoder_name(name: str) -> None:
    """The syntax of --encoder (whether a timm model of that name exists is known when it is built)."""
    if name in BUILTIN_ENCODERS or name == FEATURES:
        return
    if name.startswith(TIMM_PREFIX) and len(name) > len(TIMM_PREFIX) and "/" not in name[len(TIMM_PREFIX):]:
        return
    raise ValueError(f"unknown encoder {name!r}; expected one of {', '.join(BUILTIN_ENCODERS)}, or "
                     f"{TIMM_PREFIX}<model name> for a timm backbone (e.g. {TIMM_PREFIX}tf_efficientnet_lite0)")


def _choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"--{name} {value!r} is not one of {', '.join(choices)}")


@dataclass(frozen=True)
class Preprocess:
    """How a photo becomes the encoder's input, resolved from the encoder (encoders.resolve) and
    stored in checkpoints and exports: resize, centre crop, normalise."""
    size: int                             # side of the square crop the encoder sees
    resize: int                           # the shorter side is resized to this first; == size: the whole image
    interpolation: str                    # bilinear, bicubic, nearest or lanczos
    mean: tuple[float, float, float]      # per-channel mean subtracted after scaling to [0, 1]
    std: tuple[float, float, float]       # per-channel divisor
    squash: bool = False                  # resize both sides to `resize` (aspect ratio not kept)

    def __post_init__(self) -> None:
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"preprocessing interpolation {self.interpolation!r} is not one of {', '.join(INTERPOLATIONS)}")
        if not 0 < self.size <= self.resize:
            raise ValueError(f"preprocessing needs 0 < size <= resize, got size {self.size}, resize {self.resize}")
        for name in ("mean", "std"):
            values = tuple(float(v) for v in getattr(self, name))
            if len(values) != 3 or (name == "std" and min(values) <= 0):
                raise ValueError(f"preprocessing {name} must be 3 numbers (std > 0), got {getattr(self, name)}")
            object.__setattr__(self, name, values)


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int                       # V, from the vocabulary
    encoder: str = "resnet50"             # resnet18/34/50/101/152, inception_v3, small_cnn, timm/NAME, or "features" (no CNN)
    pretrained: bool = True               # pretrained weights: torchvision's download, or timm's (Hugging Face)
    encoder_weights: str | None = None    # local weights file (safetensors or state dict) instead of the download
    encoded_size: int | None = None       # adaptive pool of the feature map to S x S, P = S*S; None: the backbone's own grid (7 for ResNet-50 at 224 px)
    image_size: int | None = None         # input crop; None: the encoder's native size (224; 299 Inception)
    crop_pct: float | None = None         # share of the resized shorter side the centre crop keeps; None: the encoder's own
    feature_dim: int | None = None        # C; from the encoder spec, or by the caller from a features file
    preprocess: Preprocess | None = None  # resize, crop, mean/std; from the encoder spec (encoders.resolve)
    encoder_proj_dim: int = 0             # 1x1 conv C -> N before attention; 0 = off
    fine_tune_encoder: bool = False       # train the encoder's last stages (frozen otherwise)
    fine_tune_stages: int | None = None   # stages fine-tuning trains, counted from the top; None: the encoder's default
    # None: set from pretrained/encoder_weights. True (no pretrained weights): fine-tuning trains every
    # stage and BatchNorm uses batch statistics. Stored concretely, so a rebuild with pretrained=False
    # (from a checkpoint) keeps the behaviour it was trained with.
    encoder_from_scratch: bool | None = None
    embed_dim: int = 512                  # E, word embedding
    attention_dim: int = 512              # A, additive attention
    decoder_dim: int = 512                # H, LSTM hidden size of each layer
    num_layers: int = 2                   # stacked LSTM layers
    dropout: float = 0.5                  # between LSTM layers and before the output projection
    embed_dropout: float = 0.3            # on the word embeddings (the first layer's input)
    feature_dropout: float = 0.3          # on the encoder features, before attention and the initial state
    alpha_c: float = 1.0                  # weight of the doubly stochastic attention regularisation

    def __post_init__(self) -> None:
        check_encoder_name(self.encoder)
        if isinstance(self.preprocess, dict):  # read back from a checkpoint or config.json
            object.__setattr__(self, "preprocess", Preprocess(**self.preprocess))
        if self.encoder == SMALL_CNN and (self.pretrained or self.encoder_weights):
            raise ValueError(f"--encoder {SMALL_CNN} has no pretrained weights; pass --no-pretrained "
                             f"(and --fine_tune_encoder to train it)")
        if self.encoder_from_scratch is None:
            object.__setattr__(self, "encoder_from_scratch", not (self.pretrained or self.encoder_weights))
        if self.encoder == FEATURES and self.fine_tune_encoder:
            raise ValueError("--fine_tune_encoder needs an image encoder, but the model reads cached features")
        if self.encoder == FEATURES and self.feature_dim is None:
            raise ValueError("a features model needs feature_dim (the channels of its features file)")
        for name in ("vocab_size", "encoded_size", "feature_dim", "fine_tune_stages", "embed_dim",
                     "attention_dim", "decoder_dim", "num_layers"):
            if getattr(self, name) is not None and int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.vocab_size < 5:
            raise ValueError(f"vocab_size must be at least 5 (4 special tokens and a word), got {self.vocab_size}")
        if self.image_size is not None and self.image_size < 32:
            raise ValueError(f"image_size must be at least 32 pixels (or None for the encoder's native size), "
                             f"got {self.image_size}")
        if self.crop_pct is not None and not 0 < self.crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1] (1: the whole shorter side), got {self.crop_pct}")
        if self.encoder_proj_dim < 0:
            raise ValueError(f"encoder_proj_dim must be 0 (off) or a positive channel count, got {self.encoder_proj_dim}")
        for name in ("dropout", "embed_dropout", "feature_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.alpha_c < 0:
            raise ValueError(f"alpha_c must be >= 0, got {self.alpha_c}")

    @property
    def input_size(self) -> int:
        """Side of the square crop the encoder sees (a resolved config: encoders.resolve)."""
        assert self.preprocess is not None, "resolve the config first (encoders.resolve)"
        return self.preprocess.size

    @property
    def num_positions(self) -> int:
        """P for an image encoder (a features file brings its own; a resolved config: encoders.resolve)."""
        assert self.encoded_size is not None, "resolve the config first (encoders.resolve)"
        return self.encoded_size * self.encoded_size

    @property
    def attend_dim(self) -> int:
        """D: channels the decoder attends over."""
        return self.encoder_proj_dim or self.feature_dim


@dataclass(frozen=True)
class DecodeConfig:
    beam_size: int = 5                    # K; 1 = greedy
    max_len: int = 35                     # most tokens generated per caption (words and <eos>)
    length_penalty: float = 1.0           # rank by score / length**penalty; 0 = raw log-probability
    block_repeat_trigrams: bool = False   # never repeat a word trigram within a caption
    suppress_unk: bool = True             # never emit <unk>

    def __post_init__(self) -> None:
        if self.beam_size < 1:
            raise ValueError(f"beam_size must be >= 1, got {self.beam_size}")
        if self.max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {self.max_len}")
        if self.length_penalty < 0:
            raise ValueError(f"length_penalty must be >= 0, got {self.length_penalty}")


@dataclass(frozen=True)
class DataConfig:
    dataset_path: str | None = None         # data set folder; None = the embedded demo set
    captions_file: str | None = None        # overrides detection: token file, captions.txt or JSON
    images_dir: str | None = None           # overrides detection of the image folder
    hf_dataset: str | None = None           # HF data set: save_to_disk folder, imagefolder or hub name
    hf_image_column: str = "image"          # column holding the image
    hf_caption_columns: tuple[str, ...] | None = None  # None = guess (caption_0.., captions, caption, ...)
    hf_cache_dir: str | None = None         # where a HF set is materialised; None = data/hf
    demo_dir: str | None = None             # where the demo set is generated; None = data/demo
    min_word_freq: int = 5                  # rarer training words become <unk>
    max_caption_len: int = 35               # words per caption (without <sos>/<eos>); longer: truncated
    split_sizes: tuple[int, int] | None = None  # (train, val) of seeded splits; None: split_sizes_for
    split_seed: int = 0                     # seed of the split by image (Kaggle, demo, unsplit HF sets)
    num_workers: int = 2                    # DataLoader worker processes

    def __post_init__(self):
        if self.split_sizes is not None:
            sizes = tuple(int(s) for s in self.split_sizes)
            if len(sizes) != 2 or min(sizes) < 0 or sizes[0] == 0:
                raise ValueError(f"split_sizes must be two counts TRAIN VAL (TRAIN > 0), "
                                 f"got {self.split_sizes}")
            object.__setattr__(self, "split_sizes", sizes)
        if self.hf_caption_columns is not None:
            object.__setattr__(self, "hf_caption_columns", tuple(self.hf_caption_columns))
        if self.min_word_freq < 1:
            raise ValueError(f"min_word_freq must be >= 1, got {self.min_word_freq}")
        if self.max_caption_len < 1:
            raise ValueError(f"max_caption_len must be >= 1, got {self.max_caption_len}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.hf_dataset is not None and (self.dataset_path or self.captions_file):
            raise ValueError("give either --hf_dataset or --dataset_path/--captions_file, not both")


@dataclass(frozen=True)
class TrainConfig:
    optimizer: str = "adamw"            # adamw (decoupled weight decay) or adam
    lr: float | None = None             # decoder learning rate; None: 1e-3 (xe), 2e-4 (scst, fine-tuning)
    encoder_lr: float = 1e-4            # encoder learning rate, used with fine_tune_encoder
    weight_decay: float = 1e-2          # AdamW weight decay (torch's default); adam: L2
    batch_size: int = 128               # captions per step (per process under DDP)
    epochs: int = 100                   # upper bound; early stopping usually ends sooner
    patience: int = 5                   # epochs without a better validation score (select_by) before stopping
    lr_patience: int = 2                # epochs without a better validation score before the lr drops
    select_by: str = "cider"            # validation score of greedy captions (CIDEr-D or BLEU-4) that picks best.pt
    label_smoothing: float = 0.1        # cross-entropy target smoothing (training loss only)
    lr_factor: float = 0.5              # ReduceLROnPlateau: lr *= factor on a plateau
    grad_clip: float = 5.0              # max global gradient norm; 0 turns clipping off
    max_bad_steps: int = 5              # NaN/inf losses in a row that stop training
    amp: str = "auto"                   # auto: bf16 (else fp16 + scaler) on CUDA, off on CPU
    device: str = "auto"                # auto: cuda when available, else cpu
    multi_gpu: bool = False             # nn.DataParallel over the visible GPUs
    seed: int = 0                       # seeds python, numpy and torch: CPU runs repeat exactly (same --threads)
    threads: int | None = None          # torch CPU threads; None: torch's default (all cores)
    wandb: str = "auto"                 # auto: online with credentials, else offline
    wandb_project: str = "captioner"    # wandb project name
    wandb_entity: str | None = None     # wandb team or user; None: the account default
    wandb_timeout: float = 30.0         # seconds wandb may take to start before it is dropped
    tensorboard: bool = False           # also write TensorBoard scalars and captions
    save_every: int = 0                 # also keep epoch_NNN.pt every N epochs; 0: off
    keep_last: int = 0                  # epoch_NNN.pt files kept; 0: all
    group_by_image: bool = True         # end to end: an image's captions share a batch and a CNN pass
    weights_dir: str = "weights"        # checkpoints, vocab.json, history.json, runs/
    graphs_dir: str | None = None       # loss, bleu, cider, sample_length (SCST); None: <weights_dir>/graphs
    features_dir: str | None = None     # train on features.npy + names.json from this folder
    features_root: str = "data/features"  # where cached encoder features are kept
    cache_features: bool = True         # frozen encoder: run the CNN once per image, cache it
    resume: str | None = None           # checkpoint path, or "auto" for <weights_dir>/last.pt
    overwrite: bool = False             # replace files an earlier train/eval/test/export wrote (else: refused)
    num_samples: int = 4                # validation captions shown per epoch (wandb/TensorBoard)
    objective: str = "xe"               # xe: cross-entropy (teacher forcing); scst: self-critical, CIDEr-D reward
    init_from: str | None = None        # start from this checkpoint's weights and vocabulary (fresh optimizer)
    scst_samples: int = 5               # scst: captions sampled per image
    scst_baseline: str = "mean"         # scst: mean reward of the image's other samples, or the greedy caption's
    scst_temperature: float = 1.0       # scst: sampling temperature

    def __post_init__(self):
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("objective", self.objective, OBJECTIVES)
        if self.lr is None:
            object.__setattr__(self, "lr", DEFAULT_LR[self.objective])
        _choice("select_by", self.select_by, SELECTION_SCORES)
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"--label_smoothing must be in [0, 1), got {self.label_smoothing}")
        _choice("scst_baseline", self.scst_baseline, SCST_BASELINES)
        if self.scst_samples < 1 or (self.scst_baseline == "mean" and self.scst_samples < 2):
            raise ValueError(f"--scst_samples must be at least 1 (2 with --scst_baseline mean: the "
                             f"baseline is the other samples' mean), got {self.scst_samples}")
        if not self.scst_temperature > 0:
            raise ValueError(f"--scst_temperature must be > 0, got {self.scst_temperature}")
        _choice("amp", self.amp, AMP_MODES)
        _choice("device", self.device, DEVICES)
        _choice("wandb", self.wandb, WANDB_MODES)
        for name in ("lr", "encoder_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name} must be > 0, got {getattr(self, name)}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads must be at least 1, got {self.threads}")
        for name in ("batch_size", "epochs", "max_bad_steps", "num_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}")
        for name in ("patience", "lr_patience", "save_every", "keep_last", "weight_decay", "grad_clip", "wandb_timeout"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} must be >= 0, got {getattr(self, name)}")
        if not 0 < self.lr_factor < 1:
            raise ValueError(f"--lr_factor must be between 0 and 1, got {self.lr_factor}")

    @property
    def run_graphs_dir(self) -> str:
        """Where this run's graphs go: --graphs_dir, else beside its checkpoints, so a second run
        with another --weights_dir never finds the first run's graphs in its way."""
        return self.graphs_dir if self.graphs_dir is not None else f"{self.weights_dir}/graphs"


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"               # address the page listens on; 127.0.0.1 keeps it on this machine
    port: int = 7860                      # TCP port of the page and its JSON API
    max_upload_mb: int = 20               # larger uploads get HTTP 413 (a large phone photo is 5-12 MB)

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port {self.port} is not a TCP port (0-65535)")
        if self.max_upload_mb < 1:
            raise ValueError(f"--max_upload_mb must be >= 1, got {self.max_upload_mb}")
