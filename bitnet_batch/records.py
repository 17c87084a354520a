"""The output record: what every job writes for each input item (run, score, the Ray driver), in one place.

    {"id": str|int, "index": int >= 0, "text": str|None, "finish_reason": str,
     "usage": {"prompt_tokens": int, "completion_tokens": int, "cached_tokens": int (optional: prompt tokens
               served from the prefix cache)},
     "timing": {"queue_s", "prefill_s", "ttft_s", "decode_s", "total_s", "tokens_per_s": float},
     "error": None | {"type": str, "message": str},
     "logprobs": absent | [{"token", "token_id", "logprob", "top": [{"token", "token_id", "logprob"}]}],
     ...extra keys of a job kind ("sample_index", "parsed", "incomplete", score's "logprob", ...): any JSON}

``finish_reason`` is ``"error"`` exactly when ``error`` is set. ``io.writers`` checks this contract at write
time and lays it out as JSONL, Parquet (extra keys as JSON text columns) or OpenAI Batch lines;
``read_records`` reads a finished output back.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

KNOWN_KEYS = ("id", "index", "text", "finish_reason", "usage", "timing", "error", "logprobs")
USAGE_KEYS = ("prompt_tokens", "completion_tokens", "cached_tokens")
TIMING_KEYS = ("queue_s", "prefill_s", "ttft_s", "decode_s", "total_s", "tokens_per_s")
ERROR_KEYS = ("type", "message")
PARQUET_EXTRA_COLUMNS = "bitnet_batch.extra_columns"   # Parquet schema metadata: the JSON text columns


def timing(t_enqueue: float, t_admit: float, t_first: float, now: float, tokens: int) -> dict:
    """The timing of a request queued at ``t_enqueue``, admitted at ``t_admit``, whose prompt was done at
    ``t_first`` and which finished at ``now``; ``tokens_per_s`` is ``tokens`` over the time since admission."""
    busy = now - t_admit
    return {"queue_s": round(t_admit - t_enqueue, 6), "prefill_s": round(t_first - t_admit, 6),
            "ttft_s": round(t_first - t_enqueue, 6), "decode_s": round(now - t_first, 6),
            "total_s": round(now - t_enqueue, 6), "tokens_per_s": round(tokens / busy, 3) if busy > 0 else 0.0}


def error_record(index: int, rid, err: Exception, *, prompt_tokens: int = 0, sample_index: int | None = None) -> dict:
    """The record of an input item (or one sample of it) that failed: ``err``'s type and message."""
    rec = {"id": rid if rid is not None else f"row-{index}", "index": index, "text": None,
           "finish_reason": "error", "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 0},
           "timing": {k: 0.0 for k in TIMING_KEYS}, "error": {"type": type(err).__name__, "message": str(err)}}
    if sample_index is not None:
        rec["sample_index"] = sample_index
    return rec


def is_error(record: dict, fmt: str) -> bool:
    """Whether a record (an OpenAI Batch line for ``fmt == "openai"``) of a finished output is an error."""
    return record.get("error") is not None if fmt == "openai" else record.get("finish_reason") == "error"


def read_records(path: Path, fmt: str, columns: list | None = None) -> Iterator[dict]:
    """The records of a finished output, streamed: JSONL and OpenAI lines as written, Parquet rows with their
    extra keys decoded from JSON text (only ``columns`` of them, when given)."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        extra = set(json.loads((pf.schema_arrow.metadata or {}).get(PARQUET_EXTRA_COLUMNS.encode(), b"[]")))
        names = pf.schema_arrow.names if columns is None else [c for c in columns if c in pf.schema_arrow.names]
        for batch in pf.iter_batches(columns=names):
            for row in batch.to_pylist():
                yield {k: (json.loads(v) if k in extra and v is not None else v) for k, v in row.items()}
        return
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def count_errors(path: Path, fmt: str) -> int:
    """Error records in a finished output (this run's and earlier runs' of a resumed job)."""
    return sum(is_error(r, fmt) for r in read_records(path, fmt, columns=["finish_reason"]))
