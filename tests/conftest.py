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


def write_jsonl(path: Path, records) -> Path:
    with open(path, "w") as f:
        for r in records:
            f.write(r if isinstance(r, str) else json.dumps(r))
            f.write("\n")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
