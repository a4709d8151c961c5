"""Share an exported model folder on the Hugging Face Hub, and load one back by `hf://REPO_ID[@REVISION]`.

A Hub model is an exported folder (export.py) uploaded as a model repository. `resolve` downloads it
once with `huggingface_hub.snapshot_download` into the usual Hugging Face cache (HF_HUB_CACHE, or
~/.cache/huggingface/hub) and returns the snapshot folder; later calls find it there, also offline
(HF_HUB_OFFLINE=1, or no network). huggingface_hub is an optional dependency, imported when used.
Every failure is a one-line ValueError naming the repository and what to do.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path

logger = logging.getLogger(__name__)

SCHEME = "hf://"
# The Hub's own rule for a repository id: "name" or "owner/name" of letters, digits, - _ . (max 96).
_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}$")
_TRUE = {"1", "on", "yes", "true"}


def is_hub_ref(ref) -> bool:
    return isinstance(ref, str) and ref.startswith(SCHEME)


def parse_ref(ref: str) -> tuple[str, str | None]:
    """`hf://owner/name@revision` -> ("owner/name", "revision"); revision None when absent."""
    if not is_hub_ref(ref):
        raise ValueError(f"{ref!r} is not a Hub reference; expected hf://OWNER/NAME[@REVISION]")
    body = ref[len(SCHEME):]
    repo_id, sep, revision = body.partition("@")
    if not _REPO_ID.match(repo_id) or ".." in repo_id or (sep and not revision):
        raise ValueError(f"{ref!r} is not a Hub reference; expected hf://OWNER/NAME[@REVISION]")
    return repo_id, revision or None


def offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) as set now; huggingface_hub reads it only at import."""
    return any(os.environ.get(v, "").strip().lower() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def resolve(ref: str, *, cache_dir: str | os.PathLike | None = None) -> Path:
    """The local snapshot folder of `hf://REPO_ID[@REVISION]`, downloaded into the cache when not there."""
    repo_id, revision = parse_ref(ref)
    try:
        from huggingface_hub import errors, snapshot_download
    except ImportError:
        raise ValueError(f"{ref} needs the huggingface_hub package: pip install huggingface_hub") from None
    try:
        folder = snapshot_download(repo_id, revision=revision, cache_dir=cache_dir,
                                   local_files_only=offline(), repo_type="model")
    except errors.RevisionNotFoundError:
        raise ValueError(f"{ref}: the repository has no revision {revision!r}") from None
    except errors.RepositoryNotFoundError:
        raise ValueError(f"{ref}: no such model repository on the Hub, or it is private and no token "
                         f"with access was found (huggingface-cli login, or HF_TOKEN)") from None
    except errors.LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if offline() else "the Hub cannot be reached"
        raise ValueError(f"{ref} is not in the Hugging Face cache and {why}; download it once "
                         f"with network access") from None
    except (errors.HfHubHTTPError, OSError) as exc:
        raise ValueError(f"{ref} could not be downloaded: {_first_line(exc)}") from None
    return Path(folder)


def push_folder(folder: str | os.PathLike, repo_id: str, *, private: bool = False,
                token: str | None = None) -> str:
    """Upload an exported folder as model repository `repo_id` (created if needed); returns its URL.

    The token comes from the usual places (HF_TOKEN, `huggingface-cli login`) unless given. The
    folder is never changed: a failed upload says so and leaves it intact. (export.run_export checks
    that the folder loads before it calls this.)
    """
    folder = Path(folder)
    if not folder.is_dir() or not any(folder.iterdir()):
        raise FileNotFoundError(f"folder to upload {folder} does not exist or is empty")
    if not _REPO_ID.match(repo_id) or "/" not in repo_id:
        raise ValueError(f"--push_to_hub {repo_id!r}: expected OWNER/NAME (letters, digits, - _ .)")
    kept = f"; the exported folder {folder} is intact"
    if offline():
        raise ValueError(f"cannot upload to {repo_id}: HF_HUB_OFFLINE is set{kept}")
    try:
        from huggingface_hub import HfApi, errors
    except ImportError:
        raise ValueError(f"uploading needs the huggingface_hub package: pip install huggingface_hub{kept}") from None
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                          commit_message="Upload captioner exported with --mode export")
    except errors.LocalTokenNotFoundError:
        raise ValueError(f"cannot upload to {repo_id}: no Hugging Face token (huggingface-cli login, "
                         f"or set HF_TOKEN){kept}") from None
    except errors.HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        why = {401: "the token was refused", 403: "the token may not write there"}.get(status, _first_line(exc))
        raise ValueError(f"cannot upload to {repo_id}: {why}{kept}") from None
    except Exception as exc:  # no network, DNS, timeouts: the HTTP client's own error classes, by case
        raise ValueError(f"cannot upload to {repo_id}: {_first_line(exc)} (offline?){kept}") from None
    url = f"https://huggingface.co/{repo_id}"
    logger.info("uploaded %s to %s", folder, url)
    return url


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]
