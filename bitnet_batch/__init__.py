"""bitnet-batch: run ternary (BitNet b1.58) language models over whole datasets on CPUs."""
from .errors import (BitnetBatchError, ConfigError, ContextOverflowError, InputError, ModelFormatError,
                     ModelNotFoundError, TokenizerError)

__version__ = "0.1.0"


def load_model(path_or_repo_id, *, filename=None, **kwargs):
    """Load a BitNet GGUF (local path or Hugging Face repo id). See :func:`bitnet_batch.model.model.load_model`."""
    from .model.model import load_model as _load

    return _load(path_or_repo_id, filename=filename, **kwargs)


def load_tokenizer(gguf_path):
    """Build the tokenizer of a GGUF file (also works on weightless tokenizer-only GGUFs)."""
    from .tokenizer import load_tokenizer as _load

    return _load(gguf_path)


__all__ = ["load_model", "load_tokenizer", "BitnetBatchError", "ConfigError", "ContextOverflowError", "InputError",
           "ModelFormatError", "ModelNotFoundError", "TokenizerError", "__version__"]
