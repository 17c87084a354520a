"""Typed errors. Every error raised at an edge (loader, reader, config) names what it is about.

Hierarchy::

    BitnetBatchError
      ConfigError          a bad option or parameter value (names the field, range and value)
      InputError           a bad input record (names file:line and field); becomes an error record
      ModelFormatError     a corrupt, truncated or unsupported GGUF (names file, tensor, problem)
      ModelNotFoundError   a path or hub repo that cannot be resolved (offline and not cached, ...)
      TokenizerError       a tokenizer that cannot be built from the GGUF metadata
      ContextOverflowError a prompt that does not fit the context window
      JobInterrupted       a job stopped by SIGINT / SIGTERM after writing what was complete
"""
from __future__ import annotations


class BitnetBatchError(Exception):
    """Base class of all errors raised on purpose by bitnet-batch."""


class ConfigError(BitnetBatchError, ValueError):
    """A configuration value is out of range or of the wrong type."""


class InputError(BitnetBatchError, ValueError):
    """One input record is malformed. ``location`` is ``file:line`` (or ``file:row N``)."""

    def __init__(self, message: str, *, location: str | None = None, field: str | None = None):
        self.location = location
        self.field = field
        prefix = f"{location}: " if location else ""
        super().__init__(prefix + message)


class ModelFormatError(BitnetBatchError):
    """A GGUF file is corrupt, truncated or uses something we do not support."""

    def __init__(self, path, problem: str, *, tensor: str | None = None):
        self.path = str(path)
        self.tensor = tensor
        self.problem = problem
        where = f"{self.path}" + (f": tensor '{tensor}'" if tensor else "")
        super().__init__(f"{where}: {problem}")


class ModelNotFoundError(BitnetBatchError, FileNotFoundError):
    """A model path or hub repository could not be resolved to a local file."""


class TokenizerError(BitnetBatchError):
    """The tokenizer could not be built from the GGUF metadata."""


class ContextOverflowError(BitnetBatchError, ValueError):
    """A sequence is longer than the model's context window."""


class JobInterrupted(BitnetBatchError):
    """A job was stopped by a signal; every complete record is in the journal and a rerun resumes.
    ``exit_code`` is the shell's convention for the signal (130 for SIGINT, 143 for SIGTERM)."""

    def __init__(self, signum: int, written: int, total: int | None):
        self.signum = signum
        self.exit_code = 128 + signum
        of = f" of {total}" if total is not None else ""
        super().__init__(f"interrupted: {written}{of} items written; run the same command to resume")
