"""Every config of the toolkit, one frozen dataclass per concern, with its choices.

Defaults and choices are defined here once: main.py builds its flags from these fields, and the
modules that do the work take the dataclasses as explicit arguments. Plain Python only (no torch),
so `python main.py --help` and a bad flag answer without loading the heavy libraries.
"""
from __future__ import annotations

from dataclasses import dataclass

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
SMALL_CNN = "small_cnn"
ENCODERS = RESNETS + ("inception_v3", SMALL_CNN, "features")
# Channels of the last feature map of each backbone.
CHANNELS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048, "resnet152": 2048,
             "inception_v3": 2048, SMALL_CNN: 128}
NATIVE_SIZE = {"inception_v3": 299, SMALL_CNN: 64}  # everything else: 224
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


def _choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"--{name} {value!r} is not one of {', '.join(choices)}")


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int                       # V, from the vocabulary
    encoder: str = "resnet50"             # resnet18/34/50/101/152, inception_v3, small_cnn, or "features" (no CNN)
    pretrained: bool = True               # ImageNet weights through torchvision's weights API
    encoder_weights: str | None = None    # local torchvision state-dict file instead of the download
    encoded_size: int = 14                # adaptive pool of the feature map to S x S, P = S*S
    image_size: int | None = None         # input crop; None: the encoder's native size (224; 299 Inception)
    feature_dim: int = 2048               # C; set from the backbone, or by the caller from a features file
    encoder_proj_dim: int = 0             # 1x1 conv C -> N before attention; 0 = off
    fine_tune_encoder: bool = False       # train the encoder's last stages (frozen otherwise)
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
        if self.encoder not in ENCODERS:
            raise ValueError(f"unknown encoder {self.encoder!r}; expected one of {', '.join(ENCODERS)}")
        if self.encoder != "features":
            # The backbone decides C; storing it keeps asdict(cfg) in a checkpoint self-describing.
            object.__setattr__(self, "feature_dim", CHANNELS[self.encoder])
        if self.encoder == SMALL_CNN and (self.pretrained or self.encoder_weights):
            raise ValueError(f"--encoder {SMALL_CNN} has no pretrained weights; pass --no-pretrained "
                             f"(and --fine_tune_encoder to train it)")
        if self.encoder_from_scratch is None:
            object.__setattr__(self, "encoder_from_scratch", not (self.pretrained or self.encoder_weights))
        if self.encoder == "features" and self.fine_tune_encoder:
            raise ValueError("--fine_tune_encoder needs an image encoder, but the model reads cached features")
        for name in ("vocab_size", "encoded_size", "feature_dim", "embed_dim", "attention_dim",
                     "decoder_dim", "num_layers"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.vocab_size < 5:
            raise ValueError(f"vocab_size must be at least 5 (4 special tokens and a word), got {self.vocab_size}")
        if self.image_size is not None and self.image_size < 32:
            raise ValueError(f"image_size must be at least 32 pixels (or None for the encoder's native size), "
                             f"got {self.image_size}")
        if self.encoder_proj_dim < 0:
            raise ValueError(f"encoder_proj_dim must be 0 (off) or a positive channel count, got {self.encoder_proj_dim}")
        for name in ("dropout", "embed_dropout", "feature_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.alpha_c < 0:
            raise ValueError(f"alpha_c must be >= 0, got {self.alpha_c}")

    @property
    def input_size(self) -> int:
        """Side of the square crop the encoder sees."""
        return self.image_size or NATIVE_SIZE.get(self.encoder, 224)

    @property
    def num_positions(self) -> int:
        """P for an image encoder (a features file brings its own)."""
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
    graphs_dir: str = "graphs"          # figures: loss, bleu, cider, sample_length (SCST), eval_<split>_*
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
