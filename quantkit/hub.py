"""Models named by their Hugging Face repo id, resolved to a local snapshot directory.

The rule (so that a local directory is never taken for a repo id, nor the reverse):

1. a path that exists is that path (whatever it looks like);
2. otherwise ``org/name`` — exactly one ``/``, not starting with ``.``, ``/`` or ``~``, letters,
   digits, ``-``, ``_`` and ``.`` only — is a repo id: ``huggingface_hub.snapshot_download``
   fetches it (or finds it in the cache: ``HF_HUB_CACHE``/``HF_HOME``; with ``HF_HUB_OFFLINE=1``
   only the cache is read), as ``mlx_lm.load`` does, model files only;
3. anything else (``./x``, ``/x``, ``x/y/z``, ``name``) is a path that does not exist.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import ModelLoadError

_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")

#: What ``snapshot_download`` fetches when mlx-lm has no list of its own (older mlx-lm).
ALLOW_PATTERNS = ["*.json", "model*.safetensors", "*.py", "tokenizer.model", "*.tiktoken",
                  "tiktoken.model", "*.txt", "*.jsonl", "*.jinja"]


def allow_patterns() -> list[str]:
    """The files mlx-lm reads (its own list when it has one; imported only for a download)."""
    try:
        from mlx_lm.utils import DEFAULT_ALLOW_PATTERNS
    except ImportError:
        return ALLOW_PATTERNS
    return list(DEFAULT_ALLOW_PATTERNS)


def is_repo_id(name: str) -> bool:
    """Whether ``name`` has the form of a Hugging Face repo id (``org/name``)."""
    return _REPO_ID.fullmatch(name) is not None and ".." not in name


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "on", "yes", "true")


def resolve_model(name: str | Path, what: str = "model directory") -> Path:
    """The local directory of model ``name``: an existing path, or the snapshot of a Hugging
    Face repo id (downloaded unless cached or offline). One-line :class:`ModelLoadError` when it
    is neither."""
    text = str(name)
    path = Path(text).expanduser()
    if path.exists():
        return path
    if not is_repo_id(text):
        raise ModelLoadError(f"{what} {text} does not exist; check the path "
                             "(or give a Hugging Face repo id, org/name)")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (
            GatedRepoError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError:
        raise ModelLoadError(f"{text} is not a local directory, and huggingface_hub (needed to "
                             "fetch a repo id) is not installed: pip install huggingface_hub"
                             ) from None
    offline = _offline()
    try:
        # HF_HUB_CACHE / HF_HUB_OFFLINE are read when huggingface_hub is imported; pass them
        # explicitly so that their values now count.
        local = snapshot_download(text, allow_patterns=allow_patterns(),
                                  cache_dir=os.environ.get("HF_HUB_CACHE") or None,
                                  local_files_only=offline)
    except GatedRepoError:
        raise ModelLoadError(f"Hugging Face repo {text} is gated: accept its licence on "
                             "huggingface.co and log in (hf auth login)") from None
    except (RepositoryNotFoundError, RevisionNotFoundError):
        raise ModelLoadError(f"{text} is neither a local directory nor a Hugging Face repo "
                             "(not found, or private: log in with hf auth login)") from None
    except LocalEntryNotFoundError:
        why = ("HF_HUB_OFFLINE is set" if offline else "the Hugging Face Hub is unreachable")
        raise ModelLoadError(f"{text} is neither a local directory nor in the Hugging Face cache, "
                             f"and {why}; download it first or check the name") from None
    except Exception as exc:  # network errors of many kinds (requests, httpx, OSError)
        raise ModelLoadError(f"could not fetch {text} from the Hugging Face Hub "
                             f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
                             "; check the name and the network, or pass a local directory") from None
    return Path(local)
