"""Resolve a model argument (local path or Hugging Face repo id) to a local GGUF file or a Hugging Face
checkpoint directory (``config.json`` + ``*.safetensors`` + tokenizer files; see ``hf.py``).

A repo id with a GGUF file name (``--model-file``, or the default repo's known file) downloads that file; a repo
id without one is a checkpoint repo, fetched with ``snapshot_download`` restricted to ``CHECKPOINT_PATTERNS``.
Downloads go through ``huggingface_hub`` and its cache (``HF_HOME`` / ``HF_HUB_CACHE``); with
``HF_HUB_OFFLINE=1`` only the cache is used. Before a download the Hub's host (``HF_ENDPOINT``, or the HTTPS
proxy in the way) is probed with one short TCP connection: when it cannot be reached (no DNS, refused, no
route), the cached copy is used if there is one, and otherwise the job fails at once with one line saying what
to do, instead of huggingface_hub's retries (five, about 23 s). A repo that cannot be reached and is not cached
gives a ``ModelNotFoundError`` that says so and how to fix it; no other model is ever used in its place.
"""
from __future__ import annotations

import os
import re
import socket
import threading
import urllib.parse
import urllib.request
from pathlib import Path

from ..errors import ModelNotFoundError

DEFAULT_REPO = "microsoft/bitnet-b1.58-2B-4T-gguf"
DEFAULT_FILES = {DEFAULT_REPO: "ggml-model-i2_s.gguf"}
#: the files of a Hugging Face checkpoint repo that a model needs (weights, config, tokenizer)
CHECKPOINT_PATTERNS = ["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.json",
                       "tokenizer_config.json", "generation_config.json", "special_tokens_map.json",
                       "chat_template.jinja"]
_REPO_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
PROBE_TIMEOUT_S = 1.5       # DNS lookup + TCP connect to the Hub (or its proxy) before a download
DEMO_MODEL = "examples/models/shakespeare-b158-i2s.gguf"      # shipped with the repository, named in hints


def looks_like_repo_id(s: str) -> bool:
    return bool(_REPO_RE.match(s)) and not s.endswith(".gguf")


def resolve_model_path(path_or_repo_id: str | os.PathLike, filename: str | None = None,
                       revision: str | None = None) -> Path:
    """A GGUF file, or a Hugging Face checkpoint directory (one holding config.json)."""
    p = Path(path_or_repo_id).expanduser()
    if p.is_file():
        return p
    if p.is_dir():
        if filename is None and (p / "config.json").is_file():
            return p
        ggufs = sorted(p.glob("*.gguf")) if filename is None else [p / filename]
        if len(ggufs) == 1 and ggufs[0].is_file():
            return ggufs[0]
        raise ModelNotFoundError(f"{p}: directory must be a Hugging Face checkpoint (config.json + *.safetensors) "
                                 f"or hold exactly one .gguf file (or pass filename=); found {[g.name for g in ggufs]}")
    s = str(path_or_repo_id)
    if not looks_like_repo_id(s):
        raise ModelNotFoundError(f"model file not found: {s}")
    fname = filename or DEFAULT_FILES.get(s)
    if fname is None:
        return _snapshot(s, revision)
    return _download(s, fname, revision)


def _snapshot(repo_id: str, revision: str | None) -> Path:
    """A checkpoint repo's model files (``CHECKPOINT_PATTERNS``) in the cache; the snapshot directory."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:       # pragma: no cover - a declared dependency
        raise ModelNotFoundError(f"huggingface_hub is needed to download {repo_id}: {e}") from None
    kwargs = dict(repo_id=repo_id, revision=revision, allow_patterns=CHECKPOINT_PATTERNS)
    try:
        path = Path(_from_cache_when_unreachable(snapshot_download, repo_id, "", kwargs))
    except ModelNotFoundError:
        raise
    except Exception as e:         # noqa: BLE001 - huggingface_hub's errors differ across versions
        raise _hub_error(repo_id, "", e) from None
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"{repo_id}: no config.json in the repo, so it is not a Hugging Face checkpoint; "
                                 "for a GGUF repo give the file name (--model-file / filename=)")
    return path


def _hub_error(repo_id: str, filename: str, e: Exception) -> ModelNotFoundError:
    """The ModelNotFoundError for a failed download of ``repo_id`` (a file of it, or its checkpoint files)."""
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    what = f"{repo_id}/{filename}" if filename else repo_id
    if isinstance(e, LocalEntryNotFoundError) or type(e).__name__ == "IncompleteSnapshotError":
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        why = "offline mode (HF_HUB_OFFLINE=1) is on" if offline else "the Hugging Face Hub cannot be reached"
        return ModelNotFoundError(
            f"{what} is not in the local Hugging Face cache and {why}. Download it once with "
            f"network access (bitnet-batch download {repo_id}), or pass --model PATH. ({type(e).__name__})")
    if isinstance(e, (RepositoryNotFoundError, EntryNotFoundError)):
        return ModelNotFoundError(f"{what}: not found on the Hub ({type(e).__name__})")
    return ModelNotFoundError(f"{what}: download failed: {e}")


def _download(repo_id: str, filename: str, revision: str | None) -> Path:
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError
    except ImportError as e:       # pragma: no cover - a declared dependency
        raise ModelNotFoundError(f"huggingface_hub is needed to download {repo_id}: {e}") from None
    kwargs = dict(repo_id=repo_id, filename=filename, revision=revision)
    try:
        return Path(_from_cache_when_unreachable(hf_hub_download, repo_id, filename, kwargs))
    except ModelNotFoundError:
        raise
    except (LocalEntryNotFoundError, RepositoryNotFoundError, EntryNotFoundError, OSError) as e:
        raise _hub_error(repo_id, filename, e) from None


def _from_cache_when_unreachable(fetch, repo_id: str, filename: str, kwargs: dict) -> str:
    """``fetch(**kwargs)`` (a huggingface_hub download) when the Hub can be reached or offline mode is on; when
    it cannot be reached, the cached copy (``local_files_only``) or at once a ModelNotFoundError."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return fetch(**kwargs)
    problem = hub_unreachable(constants.ENDPOINT)
    if problem is None:
        return fetch(**kwargs)
    try:
        return fetch(**kwargs, local_files_only=True)
    except Exception:              # noqa: BLE001 - not cached (the error type differs across versions)
        pass
    what = f"{repo_id}/{filename}" if filename else repo_id
    raise ModelNotFoundError(
        f"cannot download {what}: {problem}, and it is not in the local Hugging Face cache. Run "
        f"`bitnet-batch download {repo_id}` once where the Hub is reachable (or set HF_ENDPOINT to a mirror), or "
        f"pass --model PATH.gguf (the repository ships {DEMO_MODEL})")


def hub_unreachable(endpoint: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Why ``endpoint`` (or the HTTPS proxy requests to it go through) cannot be reached: a DNS or connection
    failure within ``timeout`` seconds, in words; None when a TCP connection succeeds."""
    url = urllib.parse.urlsplit(endpoint)
    proxy = None if urllib.request.proxy_bypass(url.hostname or "") else \
        urllib.request.getproxies().get(url.scheme)
    target = urllib.parse.urlsplit(proxy) if proxy else url
    host, port = target.hostname, target.port or (443 if target.scheme == "https" else 80)
    via = f" (through the proxy {host}:{port})" if proxy else ""
    result: list = []

    def probe():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(None)
        except socket.gaierror:
            result.append(f"the Hub's host {host} cannot be resolved (no DNS or no network){via}")
        except OSError as e:
            result.append(f"{url.scheme}://{url.netloc} cannot be reached{via}: "
                          f"{e.strerror or type(e).__name__}")

    worker = threading.Thread(target=probe, daemon=True)     # getaddrinfo itself has no timeout
    worker.start()
    worker.join(timeout)
    if not result:
        return f"{url.scheme}://{url.netloc} did not answer within {timeout:g} s{via}"
    return result[0]
