"""Shared test set-up: no network, no GPU, fast."""
import os

# Set before any test module imports wandb, datasets or huggingface_hub.
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ["CUDA_VISIBLE_DEVICES"] = ""


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _restore_fused_attention():
    """main() sets model.FusedAttention.enabled for its mode: no test leaks it to the next."""
    import model

    enabled = model.FusedAttention.enabled
    yield
    model.FusedAttention.enabled = enabled
