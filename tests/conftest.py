"""Shared test set-up: no network, no GPU, fast."""
import os

# Set before any test module imports wandb, datasets or huggingface_hub.
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TQDM_DISABLE", "1")
# GPUs stay hidden (the suite is a CPU suite) unless tests/test_cuda.py is asked for on a GPU box.
if os.environ.get("CAPTIONER_TEST_CUDA") != "1":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
