"""bitnet-batch: run ternary (BitNet b1.58) language models over whole datasets on CPUs."""
from .errors import (BitnetBatchError, ConfigError, ContextOverflowError, InputError, ModelFormatError,
                     ModelNotFoundError, TokenizerError)

__version__ = "0.1.0"


def load_model(path_or_repo_id, *, filename=None, **kwargs):
    """Load a BitNet GGUF (local path or Hugging Face repo id). See :func:`bitnet_batch.model.model.load_model`."""
    from .model.model import load_model as _load

    return _load(path_or_repo_id, filename=filename, **kwargs)


def run(records, model, **options):
    """Completions of records held in memory (dicts shaped like JSONL input lines, or prompt strings): the records
    a `run` job writes. See :func:`bitnet_batch.api.run`."""
    from .api import run as _run

    return _run(records, model, **options)


def score(records, model, **options):
    """Log-likelihoods of records held in memory: the records a `score` job writes. See
    :func:`bitnet_batch.api.score`."""
    from .api import score as _score

    return _score(records, model, **options)


def embed(records, model, **options):
    """Embedding vectors of records held in memory: the records an `embed` job writes. See
    :func:`bitnet_batch.api.embed`."""
    from .api import embed as _embed

    return _embed(records, model, **options)


def load_tokenizer(gguf_path):
    """Build the tokenizer of a GGUF file (also works on weightless tokenizer-only GGUFs)."""
    from .tokenizer import load_tokenizer as _load

    return _load(gguf_path)


__all__ = ["load_model", "load_tokenizer", "run", "score", "embed", "BitnetBatchError", "ConfigError",
           "ContextOverflowError", "InputError", "ModelFormatError", "ModelNotFoundError", "TokenizerError",
           "__version__"]
