"""Shared fixtures: small models made by the project's own test-model writer."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))          # tests/naive.py

from bitnet_batch.testing.models import write_test_model  # noqa: E402

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def small_model_path(tmp_path_factory) -> Path:
    """A 2-layer random I2_S model with the synthetic 512-token tokenizer (fast enough for job tests)."""
    return write_test_model(tmp_path_factory.mktemp("models") / "small.gguf", n_embd=128, n_layer=2, n_head=4,
                            n_head_kv=2, n_ff=256, n_vocab=512, seed=7, context_length=512)


@pytest.fixture(scope="session")
def small_model(small_model_path):
    import bitnet_batch

    return bitnet_batch.load_model(small_model_path)


@pytest.fixture(scope="module")
def tok(small_model):
    """The small model's tokenizer (tests/test_tokenizer.py has a ``tok`` of its own)."""
    return small_model.tokenizer


@pytest.fixture(scope="module")
def compiler(tok):
    """A grammar constraint compiler for ``tok``."""
    from bitnet_batch.sampling.constraints import ConstraintCompiler

    return ConstraintCompiler.for_tokenizer(tok)


def write_jsonl(path: Path, records) -> Path:
    with open(path, "w") as f:
        for r in records:
            f.write(r if isinstance(r, str) else json.dumps(r))
            f.write("\n")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def kill_when_journaled(proc, journal: Path, lines: int = 10, timeout: float = 120) -> None:
    """SIGKILL a job subprocess once its journal holds ``lines`` records (it must still be running then)."""
    import os
    import signal
    import time

    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if journal.exists() and journal.read_text().count("\n") >= lines:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the job finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def small_kv(n_blocks=16, max_seqs=4, prefix_cache=True, block_size=4):
    """A KV cache of one tiny layer for bookkeeping tests: n_blocks blocks of block_size tokens, sequences of up
    to 8 blocks."""
    from bitnet_batch.engine.kv_cache import KVCache

    return KVCache(n_layer=1, n_kv_heads=1, head_dim=2, max_seqs=max_seqs, max_seq_len=8 * block_size,
                   n_tokens=n_blocks * block_size, block_size=block_size, prefix_cache=prefix_cache)


def sequence(key, tokens, max_new=2, **kw):
    """A scheduler Sequence of the given prompt tokens."""
    import numpy as np

    from bitnet_batch.scheduler import Sequence

    return Sequence(key=key, prompt=np.asarray(tokens, np.int32), max_new=max_new, **kw)
