"""Resolve a model argument (local path or Hugging Face repo id) to a local GGUF file.

Downloads go through ``huggingface_hub`` and its cache (``HF_HOME`` / ``HF_HUB_CACHE``); with
``HF_HUB_OFFLINE=1`` only the cache is used. A repo that cannot be reached and is not cached gives a
``ModelNotFoundError`` that says so and how to fix it.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import ModelNotFoundError

DEFAULT_REPO = "microsoft/bitnet-b1.58-2B-4T-gguf"
DEFAULT_FILES = {DEFAULT_REPO: "ggml-model-i2_s.gguf"}
_REPO_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def looks_like_repo_id(s: str) -> bool:
    return bool(_REPO_RE.match(s)) and not s.endswith(".gguf")


def resolve_model_path(path_or_repo_id: str | os.PathLike, filename: str | None = None,
                       revision: str | None = None) -> Path:
    p = Path(path_or_repo_id).expanduser()
    if p.is_file():
        return p
    if p.is_dir():
        ggufs = sorted(p.glob("*.gguf")) if filename is None else [p / filename]
        if len(ggufs) == 1 and ggufs[0].is_file():
            return ggufs[0]
        raise ModelNotFoundError(f"{p}: directory must hold exactly one .gguf file (or pass filename=); "
                                 f"found {[g.name for g in ggufs]}")
    s = str(path_or_repo_id)
    if not looks_like_repo_id(s):
        raise ModelNotFoundError(f"model file not found: {s}")
    fname = filename or DEFAULT_FILES.get(s)
    if fname is None:
        raise ModelNotFoundError(f"{s}: give the GGUF file name inside the repo (--model-file / filename=)")
    return _download(s, fname, revision)


def _download(repo_id: str, filename: str, revision: str | None) -> Path:
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError
    except ImportError as e:       # pragma: no cover - a declared dependency
        raise ModelNotFoundError(f"huggingface_hub is needed to download {repo_id}: {e}") from None
    try:
        return Path(hf_hub_download(repo_id=repo_id, filename=filename, revision=revision))
    except LocalEntryNotFoundError as e:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        why = "offline mode (HF_HUB_OFFLINE=1) is on" if offline else "the Hugging Face Hub cannot be reached"
        raise ModelNotFoundError(
            f"{repo_id}/{filename} is not in the local Hugging Face cache and {why}. Download it once with "
            f"network access (bitnet-batch download {repo_id}), or pass --model PATH.gguf. ({type(e).__name__})"
        ) from None
    except (RepositoryNotFoundError, EntryNotFoundError) as e:
        raise ModelNotFoundError(f"{repo_id}/{filename}: not found on the Hub ({type(e).__name__})") from None
    except OSError as e:
        raise ModelNotFoundError(f"{repo_id}/{filename}: download failed: {e}") from None
