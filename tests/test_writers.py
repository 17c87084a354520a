"""OutputSink: journal + state sidecar, torn-line repair, resume, atomic ordered finalize in three formats."""
from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bitnet_batch.errors import BitnetBatchError, ConfigError
from bitnet_batch.io import OutputSink, writers

REPO = Path(__file__).resolve().parents[1]
FP = {"model_sha256": "ab12", "temperature": 0.0, "max_tokens": 16, "stop": ["\n"],
      "sampling": {"top_k": 0, "top_p": 1.0, "min_p": 0.0}}
TIMING_KEYS = ("queue_s", "prefill_s", "ttft_s", "decode_s", "total_s", "tokens_per_s")


def record(i: int, **extra) -> dict:
    """A plausible output record; every 5th is an error record, every 3rd carries logprobs."""
    rec = {"id": f"q{i}" if i % 2 else i, "index": i, "text": f"answer {i} \u00e9", "finish_reason": "stop",
           "usage": {"prompt_tokens": 3 + i, "completion_tokens": i % 7, "cached_tokens": 16 * (i % 3)},
           "timing": {k: round(0.001 * (i + j), 6) for j, k in enumerate(TIMING_KEYS)}, "error": None}
    if i % 5 == 4:
        rec.update(text=None, finish_reason="error", usage={"prompt_tokens": 0, "completion_tokens": 0},
                   error={"type": "ContextOverflowError", "message": f"prompt {i} too long"})
    if i % 3 == 0:
        rec["logprobs"] = [{"token": "a", "token_id": 5, "logprob": -0.25,
                            "top": [{"token": "a", "token_id": 5, "logprob": -0.25},
                                    {"token": "\u00e9", "token_id": 9, "logprob": -1.5}]}]
    rec.update(extra)
    return rec


def completion_order(n: int, seed: int = 0) -> list[int]:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order


def journal_of(path: Path) -> Path:
    return path.with_name(path.name + ".partial.jsonl")


def state_of(path: Path) -> Path:
    return path.with_name(path.name + ".state.json")


def read_result(path: Path, fmt: str):
    """The final file in a comparable form (Parquet: table; OpenAI: lines without the wall-clock stamp)."""
    if fmt == "parquet":
        return pq.read_table(path)
    if fmt == "openai":
        lines = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]
        for line in lines:
            if line["response"]:
                line["response"]["body"]["created"] = 0
        return lines
    return path.read_bytes()


CASES = [("out.jsonl", None, True), ("out.jsonl", None, False), ("out.parquet", None, True),
         ("out.jsonl", "openai", True)]


def uninterrupted(tmp_path: Path, name: str, fmt, ordered, order):
    path = tmp_path / "clean" / name
    sink = OutputSink(path, fmt=fmt, fingerprint=FP, ordered=ordered)
    for i in order:
        sink.write(record(i))
    assert sink.finalize() == path
    return path


# --------------------------------------------------------------------------------------- crash + resume

@pytest.mark.parametrize("name,fmt,ordered", CASES, ids=["jsonl", "jsonl-unordered", "parquet", "openai"])
def test_crash_resume_gives_the_same_file_as_an_uninterrupted_run(tmp_path, name, fmt, ordered):
    n, k = 40, 17
    order = completion_order(n)
    clean = uninterrupted(tmp_path, name, fmt, ordered, order)

    path = tmp_path / "crashy" / name
    sink = OutputSink(path, fmt=fmt, fingerprint=FP, ordered=ordered)
    for i in order[:k]:
        sink.write(record(i))
    journal = sink.journal_path
    assert journal == (path if (fmt is None and name.endswith(".jsonl") and not ordered) else journal_of(path))
    del sink  # crash: no finalize, no close
    good_size = journal.stat().st_size
    with open(journal, "ab") as f:  # a write torn in the middle of a line
        f.write(json.dumps(record(order[k]))[:37].encode())

    sink = OutputSink(path, fmt=fmt, fingerprint=FP, ordered=ordered)
    assert sink.done == {record(i)["id"]: i for i in order[:k]}
    assert journal.stat().st_size == good_size  # torn line truncated away
    lines = journal.read_bytes().split(b"\n")
    assert lines[-1] == b"" and len(lines) == k + 1 and [json.loads(x)["index"] for x in lines[:-1]] == order[:k]
    for i in order[k:]:
        sink.write(record(i))
    assert sink.finalize() == path
    assert not journal_of(path).exists()
    state = json.loads(state_of(path).read_text())
    assert state["complete"] is True and state["fingerprint"] == FP

    got, want = read_result(path, fmt or path.suffix[1:]), read_result(clean, fmt or clean.suffix[1:])
    if fmt is None and name.endswith(".jsonl") and not ordered:
        assert got == want  # completion order, same write sequence
    elif isinstance(got, pa.Table):
        assert got.equals(want) and got.schema.equals(want.schema, check_metadata=True)
    else:
        assert got == want
    if fmt == "openai":
        assert [line["id"] for line in got] == [f"batch_req_{i}" for i in range(n)]
    elif isinstance(got, pa.Table):
        assert got.column("index").to_pylist() == list(range(n))
    else:
        indices = [json.loads(x)["index"] for x in path.read_text().splitlines()]
        assert indices == (list(range(n)) if ordered else order)


def test_torn_tail_of_several_bad_lines_is_cut_but_a_corrupt_middle_is_refused(tmp_path):
    path = tmp_path / "o.jsonl"
    sink = OutputSink(path, fingerprint=FP)
    for i in range(3):
        sink.write(record(i))
    sink.close()
    journal = journal_of(path)
    good = journal.read_bytes()
    journal.write_bytes(good + b'{"id": 9, "ind\n' + b"\x00" * 100)  # garbage line + zero-filled block
    sink = OutputSink(path, fingerprint=FP)
    assert sorted(sink.done.values()) == [0, 1, 2] and journal.read_bytes() == good
    sink.close()
    journal.write_bytes(good.replace(b"\n", b"\n{broken\n", 1))
    with pytest.raises(ConfigError, match=r"o\.jsonl\.partial\.jsonl:2: corrupt journal line"):
        OutputSink(path, fingerprint=FP)


def test_real_crash_sigkill_never_tears_or_duplicates(tmp_path):
    """A child writes records in a loop and is SIGKILLed at a random moment; the reopened journal holds a
    prefix 0..k-1 of the records exactly once each, and the job can be finished."""
    child = textwrap.dedent("""
        import sys
        from bitnet_batch.io import OutputSink, writers
        sink = OutputSink(sys.argv[1], fingerprint={"job": 1})
        start = len(sink.done)
        print("ready", flush=True)
        for i in range(start, 10**9):
            sink.write({"id": i, "index": i, "text": "x" * (1000 + (i * 7919) % 60000), "finish_reason": "stop"})
    """)
    path = tmp_path / "killed.jsonl"
    rng = random.Random(1234)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    total = 0
    for attempt in range(3):
        proc = subprocess.Popen([sys.executable, "-c", child, str(path)], stdout=subprocess.PIPE, env=env)
        assert proc.stdout.readline() == b"ready\n"
        time.sleep(rng.uniform(0.05, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        sink = OutputSink(path, fingerprint={"job": 1})
        k = len(sink.done)
        assert k > total, "the child made no progress"
        assert sink.done == {i: i for i in range(k)}
        raw = journal_of(path).read_bytes()
        assert raw.endswith(b"\n")
        lines = raw.split(b"\n")[:-1]
        assert [json.loads(x)["id"] for x in lines] == list(range(k))  # no torn line, no duplicate
        total = k
        sink.close()
    sink = OutputSink(path, fingerprint={"job": 1})
    sink.write({"id": total, "index": total, "text": "last", "finish_reason": "stop"})
    sink.finalize()
    assert [json.loads(x)["index"] for x in path.read_text().splitlines()] == list(range(total + 1))


class FullDisk:
    """A journal file whose write fails with ENOSPC after ``ok`` more writes; the failing write first puts half
    of its bytes on disk, as a short write on a filling disk does."""

    def __init__(self, f, ok: int):
        self.f, self.ok = f, ok

    def write(self, data):
        if self.ok <= 0:
            self.f.write(bytes(data[: len(data) // 2]))
            raise OSError(errno.ENOSPC, "No space left on device")
        self.ok -= 1
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)


@pytest.mark.parametrize("name,fmt,ordered", CASES, ids=["jsonl", "jsonl-unordered", "parquet", "openai"])
def test_disk_full_says_what_is_safe_and_resume_equals_an_uninterrupted_run(tmp_path, name, fmt, ordered):
    """ENOSPC on the 18th record: an error naming the journal, the 17 safe records and the rerun; the torn half
    line is gone; reopening resumes and the final file equals an uninterrupted run's."""
    n, k = 40, 17
    order = completion_order(n)
    clean = uninterrupted(tmp_path, name, fmt, ordered, order)
    path = tmp_path / "full" / name
    sink = OutputSink(path, fmt=fmt, fingerprint=FP, ordered=ordered)
    sink._file = FullDisk(sink._file, ok=k)
    for i in order[:k]:
        sink.write(record(i))
    with pytest.raises(BitnetBatchError) as err:
        sink.write(record(order[k]))
    journal = sink.journal_path
    assert str(err.value) == (f"{journal}: no space left on device while writing a record; the {k} finished "
                              f"records before it are safely written in {journal}. Free some space and run the "
                              f"same command again to resume (finished items are skipped)")
    assert isinstance(err.value.__cause__, OSError) and err.value.__cause__.errno == errno.ENOSPC
    assert journal.read_bytes().count(b"\n") == k and journal.read_bytes().endswith(b"\n")   # no torn line
    sink.close()
    sink = OutputSink(path, fmt=fmt, fingerprint=FP, ordered=ordered)
    assert sink.done == {record(i)["id"]: i for i in order[:k]}
    for i in order[k:]:
        sink.write(record(i))
    sink.finalize()
    got, want = read_result(path, fmt or path.suffix[1:]), read_result(clean, fmt or clean.suffix[1:])
    assert got.equals(want) if isinstance(got, pa.Table) else got == want


def test_disk_full_while_finalizing_or_starting(tmp_path, monkeypatch):
    """ENOSPC while writing the final file: its partial temp file is removed, every record stays in the journal
    and the next run finishes the job. ENOSPC on the state file of a fresh job: nothing is left behind but the
    lock file."""
    path = tmp_path / "o.parquet"
    sink = OutputSink(path, fingerprint=FP)
    for i in range(5):
        sink.write(record(i))
    real = writers._FINALIZERS["parquet"]

    def full(self, tmp):
        tmp.write_bytes(b"PAR1 partial")
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp))

    monkeypatch.setitem(writers._FINALIZERS, "parquet", full)
    with pytest.raises(BitnetBatchError, match=r"o\.parquet\.tmp: no space left on device while writing the final "
                                               r"output; the 5 finished records before it are safely written in "
                                               r".*o\.parquet\.partial\.jsonl\. Free some space and run the same "
                                               r"command again to resume"):
        sink.finalize()
    sink.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.parquet.lock", "o.parquet.partial.jsonl",
                                                          "o.parquet.state.json"]
    monkeypatch.setitem(writers._FINALIZERS, "parquet", real)
    again = OutputSink(path, fingerprint=FP)
    assert len(again.done) == 5
    again.finalize()
    assert pq.read_table(path).column("index").to_pylist() == list(range(5))

    fresh = tmp_path / "fresh" / "f.jsonl"

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writers.json, "dump", no_space)
    with pytest.raises(BitnetBatchError, match=r"f\.jsonl\.state\.json: no space left on device while starting the "
                                               r"job; no record was written yet\. Free some space"):
        OutputSink(fresh, fingerprint=FP)
    assert sorted(p.name for p in fresh.parent.iterdir()) == ["f.jsonl.lock"]


# ------------------------------------------------------------------------------------- fingerprint & state

def test_fingerprint_change_is_refused_and_overwrite_starts_fresh(tmp_path):
    path = tmp_path / "o.jsonl"
    sink = OutputSink(path, fingerprint=FP)
    sink.write(record(0))
    sink.close()
    changed = {**FP, "temperature": 0.7, "top_k": 40, "sampling": {**FP["sampling"], "min_p": 0.05}}
    changed.pop("stop")
    with pytest.raises(ConfigError) as err:
        OutputSink(path, fingerprint=changed)
    message = str(err.value)
    assert "stop: ['\\n'] -> '<absent>'" in message and "temperature: 0.0 -> 0.7" in message
    assert "top_k: '<absent>' -> 40" in message and "--overwrite" in message
    assert "sampling.min_p: 0.0 -> 0.05" in message  # nested parameters are named by dotted path
    assert "max_tokens" not in message and "model_sha256" not in message and "top_p" not in message
    with pytest.raises(ConfigError, match="output format: 'jsonl' -> 'openai'"):
        OutputSink(path, fingerprint=FP, fmt="openai")
    with pytest.raises(ConfigError, match="ordered: True -> False"):
        OutputSink(path, fingerprint=FP, ordered=False)
    # tuples and lists are the same fingerprint once written to JSON
    OutputSink(path, fingerprint={**FP, "stop": ("\n",)}).close()

    fresh = OutputSink(path, fingerprint=changed, overwrite=True)
    assert fresh.done == {} and journal_of(path).read_bytes() == b""
    assert json.loads(state_of(path).read_text())["fingerprint"] == changed
    fresh.write(record(5))
    fresh.finalize()
    assert [json.loads(x)["index"] for x in path.read_text().splitlines()] == [5]
    # overwrite of a complete job removes the old final output too
    again = OutputSink(path, fingerprint=FP, overwrite=True)
    assert again.done == {} and not path.exists()
    again.close()


@pytest.mark.parametrize("name, ordered", [("o.jsonl", True), ("u.jsonl", False), ("p.parquet", True)])
def test_an_unfinished_job_that_wrote_nothing_gives_way_to_a_different_one(tmp_path, name, ordered):
    """A job stopped before its first record (interrupted while compiling, say) leaves a state and an empty
    journal: a different job on that output starts afresh (nothing is lost) and says what differed; once a
    record is written, a different job is refused as before."""
    path = tmp_path / name
    OutputSink(path, fingerprint=FP, ordered=ordered).close()
    changed = {**FP, "max_tokens": 8}
    sink = OutputSink(path, fingerprint=changed, ordered=ordered)
    assert sink.replaced == ["max_tokens: 16 -> 8"] and sink.done == {}
    assert json.loads(state_of(path).read_text())["fingerprint"] == changed
    sink.write(record(0))
    sink.close()
    with pytest.raises(ConfigError, match="the existing partial output was made by a different job"):
        OutputSink(path, fingerprint=FP, ordered=ordered)
    again = OutputSink(path, fingerprint=changed, ordered=ordered)
    assert again.replaced == [] and list(again.done) == [record(0)["id"]]
    again.finalize()
    with pytest.raises(ConfigError, match="the existing output was made by a different job"):
        OutputSink(path, fingerprint=FP, ordered=ordered)


def test_existing_foreign_output_or_bad_state_is_refused(tmp_path):
    path = tmp_path / "o.jsonl"
    path.write_text("someone else's file\n")
    with pytest.raises(ConfigError, match=r"o\.jsonl: exists but has no job state .*--overwrite"):
        OutputSink(path, fingerprint=FP)
    OutputSink(path, fingerprint=FP, overwrite=True).close()
    assert not path.exists()
    state_of(path).write_text("{not json")
    with pytest.raises(ConfigError, match=r"state\.json: unreadable job state"):
        OutputSink(path, fingerprint=FP)
    with pytest.raises(ConfigError, match="unknown output extension '.csv'"):
        OutputSink(tmp_path / "o.csv", fingerprint=FP)
    with pytest.raises(ConfigError, match="JSON-serialisable"):
        OutputSink(tmp_path / "p.jsonl", fingerprint={"x": object()})


def test_complete_job_reopens_with_everything_done(tmp_path):
    for name, fmt in (("a.jsonl", None), ("b.parquet", None), ("c.jsonl", "openai")):
        path = tmp_path / name
        sink = OutputSink(path, fmt=fmt, fingerprint=FP)
        for i in completion_order(12, seed=3):
            sink.write(record(i))
        sink.finalize()
        before = (path.read_bytes(), path.stat().st_mtime_ns)
        again = OutputSink(path, fmt=fmt, fingerprint=FP)
        assert again.complete
        assert again.done == {record(i)["id"]: i for i in range(12)}  # int and str ids keep their type
        assert again.finalize() == path
        assert (path.read_bytes(), path.stat().st_mtime_ns) == before
        with pytest.raises(BitnetBatchError, match="already complete"):
            again.write(record(12))
        with pytest.raises(ConfigError, match="different job"):
            OutputSink(path, fmt=fmt, fingerprint={**FP, "max_tokens": 1})


def test_crash_between_marking_complete_and_deleting_the_journal(tmp_path):
    path = tmp_path / "o.jsonl"
    sink = OutputSink(path, fingerprint=FP)
    for i in range(4):
        sink.write(record(i))
    saved = journal_of(path).read_bytes()
    sink.finalize()
    journal_of(path).write_bytes(saved)  # as if the process died right before unlinking it
    again = OutputSink(path, fingerprint=FP)
    assert again.complete and len(again.done) == 4 and not journal_of(path).exists()
    again.close()
    path.unlink()
    with pytest.raises(ConfigError, match="output file is missing"):
        OutputSink(path, fingerprint=FP)


# ----------------------------------------------------------------------------------------- write contract

def test_write_contract_duplicates_lock_and_numpy(tmp_path):
    path = tmp_path / "o.jsonl"
    sink = OutputSink(path, fingerprint=FP)
    with pytest.raises(ConfigError, match="is being written by another bitnet-batch job"):
        OutputSink(path, fingerprint=FP)
    with pytest.raises(ConfigError, match="is being written by another bitnet-batch job"):
        OutputSink(path, fingerprint=FP, overwrite=True)
    sink.write(record(1))
    with pytest.raises(BitnetBatchError, match="id 'q1' was already written"):
        sink.write(record(1))
    sink.write(record(2, sample_index=0))
    sink.write({**record(2, sample_index=1), "text": "second sample"})
    with pytest.raises(BitnetBatchError, match="id 2 sample 1 was already written"):
        sink.write(record(2, sample_index=1))
    bad = [({"index": 3}, "'id' must be a str or int"), ({**record(3), "index": -1}, "'index' must be an int >= 0"),
           ({**record(3), "usage": {"prompt_tokens": 1, "cached": 2}}, "unknown: ['cached']"),
           ({**record(3), "timing": {"queue_s": "slow"}}, "'timing' must be a dict of numbers"),
           ({**record(3), "logprobs": [{"token": "a", "token_id": 1.5, "logprob": 0.0}]}, "logprobs[0].token_id"),
           ({**record(3), "text": 7}, "'text' must be a str or None")]
    for rec, words in bad:
        with pytest.raises(ValueError, match=words.replace("[", r"\[").replace("]", r"\]")):
            sink.write(rec)
    # numpy scalars from the sampler serialise as plain numbers
    sink.write({**record(3), "usage": {"prompt_tokens": np.int64(4), "completion_tokens": np.int32(2)},
                "logprobs": [{"token": "z", "token_id": np.int64(7), "logprob": np.float32(-0.5), "top": []}]})
    sink.finalize()
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    assert [(r["index"], r.get("sample_index")) for r in rows] == [(1, None), (2, 0), (2, 1), (3, None)]
    assert rows[3]["usage"] == {"prompt_tokens": 4, "completion_tokens": 2}
    assert rows[3]["logprobs"][0]["logprob"] == -0.5
    with pytest.raises(BitnetBatchError):
        sink.write(record(9))


def test_unordered_jsonl_writes_straight_into_the_output(tmp_path):
    path = tmp_path / "o.jsonl"
    sink = OutputSink(path, fingerprint=FP, ordered=False)
    sink.write(record(3))
    sink.write(record(1))
    assert not journal_of(path).exists()
    assert [json.loads(x)["index"] for x in path.read_text().splitlines()] == [3, 1]
    sink.finalize()
    assert [json.loads(x)["index"] for x in path.read_text().splitlines()] == [3, 1]
    assert json.loads(state_of(path).read_text())["complete"] is True


# ------------------------------------------------------------------------------------------------ formats

def test_parquet_output_schema_and_values(tmp_path):
    path = tmp_path / "o.parquet"
    sink = OutputSink(path, fingerprint=FP)
    for i in (2, 0, 1, 3, 4):
        extra = {"parsed": {"answer": i}} if i == 1 else {}
        if i == 3:
            extra["sample_index"] = 0
        sink.write(record(i, **extra))
    sink.finalize()
    table = pq.read_table(path)
    assert table.column_names == ["id", "index", "text", "finish_reason", "usage", "timing", "error", "logprobs",
                                  "parsed", "sample_index"]
    schema = table.schema
    assert schema.field("id").type == pa.string() and schema.field("index").type == pa.int64()
    assert schema.field("usage").type == pa.struct([("prompt_tokens", pa.int64()), ("completion_tokens", pa.int64()),
                                                    ("cached_tokens", pa.int64())])
    assert schema.field("timing").type == pa.struct([(k, pa.float64()) for k in TIMING_KEYS])
    assert schema.field("error").type == pa.struct([("type", pa.string()), ("message", pa.string())])
    assert schema.field("logprobs").type.value_type.field("top").type.value_type.field("token_id").type == pa.int64()
    assert schema.field("parsed").type == pa.string()
    rows = table.to_pylist()
    assert [r["id"] for r in rows] == ["0", "q1", "2", "q3", "4"]
    assert rows[0]["logprobs"] == record(0)["logprobs"] and rows[1]["logprobs"] is None
    assert rows[1]["parsed"] == '{"answer": 1}' and rows[0]["parsed"] is None
    assert rows[3]["sample_index"] == "0" and rows[2]["sample_index"] is None
    assert rows[4]["error"] == {"type": "ContextOverflowError", "message": "prompt 4 too long"}
    assert rows[4]["text"] is None and rows[0]["error"] is None
    assert rows[2]["timing"] == record(2)["timing"] and rows[2]["usage"] == record(2)["usage"]


def test_openai_output_lines(tmp_path):
    path = tmp_path / "batch_out.jsonl"
    sink = OutputSink(path, fmt="openai", fingerprint=FP, model_name="bitnet-2b")
    sink.write(record(4))                                    # an error record
    sink.write(record(0))
    sink.write(record(1, sample_index=1, text="B"))           # n=2 samples become two choices of one line
    sink.write(record(1, sample_index=0, text="A"))
    sink.finalize()
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert [x["custom_id"] for x in lines] == [0, "q1", 4]
    ok = lines[0]
    assert ok["id"] == "batch_req_0" and ok["error"] is None
    assert ok["response"]["status_code"] == 200 and ok["response"]["request_id"]
    body = ok["response"]["body"]
    assert body["object"] == "chat.completion" and body["model"] == "bitnet-2b" and isinstance(body["created"], int)
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "answer 0 \u00e9"}
    assert body["choices"][0]["finish_reason"] == "stop" and body["choices"][0]["index"] == 0
    top = body["choices"][0]["logprobs"]["content"][0]
    assert top["token"] == "a" and top["logprob"] == -0.25 and top["bytes"] == [97]
    assert [t["token"] for t in top["top_logprobs"]] == ["a", "\u00e9"]
    assert top["top_logprobs"][1]["bytes"] == [195, 169] and "top_logprobs" not in top["top_logprobs"][1]
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 0, "total_tokens": 3,
                             "prompt_tokens_details": {"cached_tokens": 0}}
    two = lines[1]["response"]["body"]
    assert [(c["index"], c["message"]["content"]) for c in two["choices"]] == [(0, "A"), (1, "B")]
    assert two["usage"] == {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6,
                            "prompt_tokens_details": {"cached_tokens": 16}}         # the first sample's
    assert two["choices"][0]["logprobs"] is None
    err = lines[2]
    assert err == {"id": "batch_req_4", "custom_id": 4, "response": None,
                   "error": {"code": "ContextOverflowError", "message": "prompt 4 too long"}}


# -------------------------------------------------------------------------------------------- large jobs

def fake_crashed_journal(path: Path, n: int) -> None:
    """A job that crashed after n small records (written directly, without n fsyncs), in a shuffled order."""
    OutputSink(path, fingerprint=FP).close()
    order = np.random.default_rng(0).permutation(n).tolist()
    with open(journal_of(path), "w", encoding="utf-8") as f:
        for i in order:
            f.write(json.dumps({"id": i, "index": i, "text": "t", "finish_reason": "stop",
                                "usage": {"prompt_tokens": 1, "completion_tokens": 1}}) + "\n")


def peak_bytes(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_finalize_streams_large_jobs(tmp_path, suffix, monkeypatch):
    n = 30_000
    monkeypatch.setattr(writers, "PARQUET_ROWS_PER_GROUP", 1_000)
    path = tmp_path / f"big{suffix}"
    fake_crashed_journal(path, n)
    sink = OutputSink(path, fingerprint=FP)
    assert len(sink.done) == n
    journal = journal_of(path)
    all_as_dicts = peak_bytes(lambda: [json.loads(line) for line in open(journal, "rb")])
    finalize_peak = peak_bytes(sink.finalize)
    # finalize holds 4 int64 per record plus one chunk of records, never all of them as dicts
    assert finalize_peak < all_as_dicts / 3, (finalize_peak, all_as_dicts)
    if suffix == ".parquet":
        meta = pq.ParquetFile(path).metadata
        assert meta.num_rows == n and meta.num_row_groups == 30
        assert pq.read_table(path, columns=["index"]).column("index").to_pylist() == list(range(n))
    else:
        with open(path, "rb") as f:
            assert all(json.loads(line)["index"] == i for i, line in enumerate(f))
