"""Input readers: JSONL / Parquet / OpenAI Batch lines -> Request or BadRecord, streamed, with file:line."""
from __future__ import annotations

import dataclasses
import json
import tracemalloc

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bitnet_batch.errors import ConfigError, InputError
from bitnet_batch.io import BadRecord, Request, count_records, read_requests


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def fifty_records():
    """50 records mixing prompt / messages, ids present or absent, and per-item overrides."""
    records = []
    for i in range(50):
        r: dict = {}
        if i % 7 != 3:
            r["id"] = 1000 + i
        if i % 3 == 0:
            r["messages"] = [{"role": "system", "content": "be brief"}, {"role": "user", "content": f"q{i}"}]
        else:
            r["prompt"] = f"prompt number {i} \u00e9\u4e2d"
        if i % 4 == 0:
            r["temperature"] = 0.25 * (i % 3)
            r["max_tokens"] = 10 + i
        if i % 5 == 0:
            r["stop"] = ["\n", "END"]
        r["category"] = f"cat{i % 2}"  # an extra field, kept in fields only
        records.append(r)
    return records


def without_location(item):
    return dataclasses.replace(item, location="")


# ------------------------------------------------------------------------------------------------ formats

def test_jsonl_and_parquet_give_the_same_requests(tmp_path):
    records = fifty_records()
    jl = write_jsonl(tmp_path / "in.jsonl", records)
    pqp = tmp_path / "in.parquet"
    columns = sorted({k for r in records for k in r})  # from_pylist takes its columns from the first row
    pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in columns} for r in records]), pqp,
                   row_group_size=16)

    from_jsonl, from_parquet = list(read_requests(jl)), list(read_requests(pqp))
    assert len(from_jsonl) == len(from_parquet) == 50
    assert all(isinstance(r, Request) for r in from_jsonl + from_parquet)
    assert [without_location(r) for r in from_jsonl] == [without_location(r) for r in from_parquet]
    # spot-check content and the two location styles (1-based line vs 0-based row)
    r3 = from_jsonl[3]
    assert r3.id == "row-3" and r3.index == 3 and r3.prompt is None
    assert r3.messages == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q3"}]
    assert from_jsonl[4].overrides == {"temperature": 0.25, "max_tokens": 14}
    assert from_jsonl[5].overrides == {"stop": ["\n", "END"]}
    assert from_jsonl[1].prompt == "prompt number 1 \u00e9\u4e2d" and from_jsonl[1].id == 1001
    assert from_jsonl[1].fields["category"] == "cat1"
    assert from_jsonl[17].location == f"{jl}:18"
    assert from_parquet[17].location == f"{pqp}:row 17"


def test_format_from_extension_and_explicit_fmt(tmp_path):
    for name in ("a.json", "b.ndjson", "c.JSONL"):
        p = write_jsonl(tmp_path / name, [{"prompt": "x"}])
        assert [r.prompt for r in read_requests(p)] == ["x"]
    txt = write_jsonl(tmp_path / "data.txt", [{"prompt": "y"}])
    with pytest.raises(ConfigError, match=r"data\.txt.*unknown input extension '\.txt'"):
        read_requests(txt)
    assert [r.prompt for r in read_requests(txt, fmt="jsonl")] == ["y"]
    with pytest.raises(ConfigError, match="input format must be one of jsonl, parquet, got 'csv'"):
        read_requests(txt, fmt="csv")


def test_missing_unreadable_and_corrupt_files_are_config_errors(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", [{"prompt": "x"}])
    with pytest.raises(ConfigError, match=r"nope\.jsonl: input file not found"):
        read_requests(tmp_path / "nope.jsonl")
    # a list whose second file is missing fails before anything of the first file is yielded
    with pytest.raises(ConfigError, match=r"missing\.jsonl"):
        read_requests([good, tmp_path / "missing.jsonl"])
    (tmp_path / "dir.jsonl").mkdir()
    with pytest.raises(ConfigError, match=r"dir\.jsonl: input is a directory"):
        read_requests(tmp_path / "dir.jsonl")
    bad_pq = tmp_path / "broken.parquet"
    bad_pq.write_bytes(b"PAR1 this is not really parquet at all")
    with pytest.raises(ConfigError, match=r"broken\.parquet: not a readable Parquet file"):
        read_requests(bad_pq)
    with pytest.raises(ConfigError, match=r"broken\.parquet"):
        count_records(bad_pq)
    # a Parquet file cut in half (torn download)
    whole = tmp_path / "whole.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b"]}), whole)
    torn = tmp_path / "torn.parquet"
    torn.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(ConfigError, match=r"torn\.parquet"):
        read_requests(torn)
    with pytest.raises(ConfigError, match="no input files"):
        read_requests([])


# ----------------------------------------------------------------------------------------------- bad rows

def test_bad_lines_become_bad_records_and_good_rows_still_come(tmp_path):
    lines = [
        {"id": "a", "prompt": "good one"},                         # 1
        "",                                                        # 2 blank: skipped, numbering stays true
        '{"id": "b", "prompt": "unterminated',                     # 3 invalid JSON
        "[1, 2]",                                                  # 4 not an object
        {"id": "c", "text": "no prompt here"},                     # 5 missing prompt
        {"id": "d", "prompt": 42},                                 # 6 prompt of wrong type
        {"id": "e", "messages": []},                               # 7 empty messages
        {"id": "f", "messages": [{"role": "user"}]},               # 8 message without content
        {"id": "g", "messages": ["hello"]},                        # 9 message not a dict
        {"id": 1.5, "prompt": "float id"},                         # 10 bad id type
        {"id": True, "prompt": "bool id"},                         # 11 bad id type
        {"id": None, "prompt": "null id"},                         # 12 bad id type
        {"id": "a", "prompt": "again"},                            # 13 duplicate id
        {"id": "h", "prompt": "x", "messages": [{"role": "user", "content": "y"}]},  # 14 both
        {"id": 7, "messages": [{"role": "user", "content": "fine"}]},                # 15 good
        "   ",                                                     # 16 blank
        {"prompt": "good, no id"},                                 # 17 good
    ]
    path = write_jsonl(tmp_path / "mixed.jsonl", lines)
    with open(path, "ab") as f:
        f.write(b'{"id": "u", "prompt": "\xff\xfe"}\n')            # 18 not UTF-8
    items = list(read_requests(path))
    assert [it.index for it in items] == list(range(16))
    by_line = {int(it.location.rsplit(":", 1)[1]): it for it in items}
    assert sorted(by_line) == [1, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 17, 18]

    good = {line: it for line, it in by_line.items() if isinstance(it, Request)}
    assert sorted(good) == [1, 15, 17]
    assert good[1].id == "a" and good[1].prompt == "good one"
    assert good[15].id == 7 and good[15].messages == [{"role": "user", "content": "fine"}]
    assert good[17].id == f"row-{good[17].index}" == "row-14"

    row = "fallback"  # the record's own id is unusable: BadRecord.id is the reserved row-{index}
    expected = {  # line -> (error.field, words the message must contain, BadRecord.id)
        3: (None, "invalid JSON: Unterminated string starting at column 23", row),   # not the line ending's column
        4: (None, "must be a JSON object, got list", row),
        5: ("prompt", "missing prompt", "c"),
        6: ("prompt", "field 'prompt' must be a string, got int (42)", "d"),
        7: ("messages", "field 'messages' must be a non-empty list", "e"),
        8: ("messages", "item 0: 'content' must be a string, got null", "f"),
        9: ("messages", "item 0 is str", "g"),
        10: ("id", "field 'id' must be a string or an integer, got float (1.5)", row),
        11: ("id", "got bool (True)", row),
        12: ("id", "got null (None)", row),
        13: ("id", f"field 'id': duplicate value 'a' (first used at {path}:1)", row),
        14: ("prompt", "both field 'prompt' and field 'messages'", "h"),
        18: (None, "not valid UTF-8", row),
    }
    for line, (field, words, bad_id) in expected.items():
        bad = by_line[line]
        assert isinstance(bad, BadRecord), line
        assert isinstance(bad.error, InputError)
        assert bad.location == f"{path}:{line}" == bad.error.location
        assert bad.error.field == field, line
        message = str(bad.error)
        assert message.startswith(f"{path}:{line}: "), message
        assert words in message, message
        assert bad.id == (f"row-{bad.index}" if bad_id is row else bad_id), line
    assert count_records(path) == len(items)


def test_ids_are_unique_across_files_and_index_is_global(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"id": 1, "prompt": "x"}, {"prompt": "y"}])
    b = tmp_path / "b.parquet"
    pq.write_table(pa.table({"id": ["1", "z", "row-1"], "prompt": ["p", "q", "r"]}), b)
    items = list(read_requests([a, b]))
    assert [it.index for it in items] == [0, 1, 2, 3, 4]
    assert [type(it).__name__ for it in items] == ["Request", "Request", "BadRecord", "Request", "BadRecord"]
    # "1" collides with 1 (ids are strings in Parquet/OpenAI output), "row-1" with a generated id
    assert f"first used at {a}:1" in str(items[2].error) and items[2].location == f"{b}:row 0"
    assert f"first used at {a}:2" in str(items[4].error)
    assert items[3].id == "z" and items[3].location == f"{b}:row 1"
    assert (items[2].id, items[4].id) == ("row-2", "row-4")  # the error rows get reserved stand-in ids
    assert count_records([a, b]) == 5


def test_bad_record_ids_are_unique_stand_ins(tmp_path):
    """An error row's id is reserved like any other: never a clash with an explicit id, same on every run."""
    path = write_jsonl(tmp_path / "ids.jsonl", [
        {"id": "row-1", "prompt": "takes the name row 1 would get"},
        "{not json",                               # index 1: row-1 is taken -> row-1-1
        {"id": 2.5, "prompt": "bad id"},           # index 2: row-2
        {"id": "row-2", "prompt": "clashes with the stand-in of index 2"},
        {"prompt": "no id"},                       # index 4: row-4
    ])
    items = list(read_requests(path))
    assert [it.id for it in items] == ["row-1", "row-1-1", "row-2", "row-3", "row-4"]
    assert [type(it).__name__ for it in items] == ["Request", "BadRecord", "BadRecord", "BadRecord", "Request"]
    assert f"duplicate value 'row-2' (first used at {path}:3)" in str(items[3].error)
    assert [it.id for it in read_requests(path)] == [it.id for it in items]
    assert len({str(it.id) for it in items}) == len(items)


def test_parquet_null_cells_mean_absent(tmp_path):
    path = tmp_path / "n.parquet"
    table = pa.Table.from_pylist([
        {"id": 5, "prompt": "x", "messages": None, "temperature": None},
        {"id": None, "prompt": None, "messages": [{"role": "user", "content": "m", "name": None}],
         "temperature": 0.5},
    ])
    pq.write_table(table, path)
    first, second = read_requests(path)
    assert first.id == 5 and first.prompt == "x" and first.overrides == {} and "messages" not in first.fields
    assert second.id == "row-1" and second.messages == [{"role": "user", "content": "m"}]
    assert second.overrides == {"temperature": 0.5}


# ------------------------------------------------------------------------------------------ OpenAI batch

def test_openai_batch_lines(tmp_path):
    chat = {"custom_id": "req-1", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "gpt-x", "messages": [{"role": "user", "content": "hi"}],
                     "max_completion_tokens": 20, "temperature": 0.3, "top_p": 0.9, "seed": 11, "stop": "###",
                     "logprobs": True, "top_logprobs": 4, "presence_penalty": 0.1, "frequency_penalty": 0.2,
                     "response_format": {"type": "json_object"}}}
    completion = {"custom_id": "req-2", "method": "POST", "url": "/v1/completions",
                  "body": {"prompt": "Once upon", "max_tokens": 7, "logprobs": True, "stop": ["a", "b"]}}
    legacy = {"custom_id": "req-3", "body": {"prompt": "p", "logprobs": 2}}  # no url: by body, int logprobs
    no_top = {"custom_id": "req-4", "url": "/v1/chat/completions",
              "body": {"messages": [{"role": "user", "content": "x"}], "logprobs": False}}
    bad = [
        {"custom_id": "b1", "url": "/v1/embeddings", "body": {"input": "x"}},
        {"custom_id": "b2", "url": "/v1/chat/completions", "body": {"prompt": "wrong shape"}},
        {"custom_id": "b3", "url": "/v1/completions", "body": {"prompt": ["a", "b"]}},
        {"custom_id": "b4", "body": "not an object"},
        {"custom_id": "b5", "body": {"prompt": "p", "top_logprobs": 3}},
        {"custom_id": "b6", "body": {"prompt": "p", "max_tokens": 3, "max_completion_tokens": 4}},
        {"custom_id": "b7", "method": "GET", "body": {"prompt": "p"}},
        {"custom_id": 2.5, "body": {"prompt": "p"}},
        {"custom_id": "req-1", "body": {"prompt": "p"}},
    ]
    path = write_jsonl(tmp_path / "batch.jsonl", [chat, completion, legacy, no_top] + bad)
    items = list(read_requests(path))
    r1, r2, r3, r4 = items[:4]
    assert r1.id == "req-1" and r1.messages == [{"role": "user", "content": "hi"}] and r1.prompt is None
    assert r1.overrides == {"max_tokens": 20, "temperature": 0.3, "top_p": 0.9, "seed": 11, "stop": ["###"],
                            "logprobs": 4, "presence_penalty": 0.1, "frequency_penalty": 0.2,
                            "response_format": {"type": "json_object"}}
    assert r1.fields == chat
    assert r2.id == "req-2" and r2.prompt == "Once upon"
    assert r2.overrides == {"max_tokens": 7, "logprobs": 0, "stop": ["a", "b"]}
    assert r3.prompt == "p" and r3.overrides == {"logprobs": 2}
    assert r4.overrides == {}
    fields = [(b.error.field, b.id) for b in items[4:]]
    assert all(isinstance(b, BadRecord) for b in items[4:])
    assert fields == [("url", "b1"), ("body.messages", "b2"), ("body.prompt", "b3"), ("body", "b4"),
                      ("body.top_logprobs", "b5"), ("body.max_completion_tokens", "b6"), ("method", "b7"),
                      ("custom_id", "row-11"), ("custom_id", "row-12")]
    assert "field 'url' must be one of /v1/chat/completions, /v1/completions" in str(items[4].error)
    assert "duplicate value 'req-1'" in str(items[12].error)


# ------------------------------------------------------------------------------------------ field mapping

def test_field_mapping_and_stop_normalisation(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [
        {"qid": "q1", "question": "What is 2+2?", "id": "ignored", "stop": "\n", "note": 1},
        {"qid": "q2", "conv": [{"role": "user", "content": "hey"}]},
        {"qid": "q3", "prompt": "the default name is not used"},
    ])
    items = list(read_requests(path, prompt_field="question", id_field="qid", messages_field="conv"))
    assert items[0].id == "q1" and items[0].prompt == "What is 2+2?" and items[0].overrides == {"stop": ["\n"]}
    assert items[0].fields["note"] == 1 and items[0].fields["id"] == "ignored"
    assert items[1].id == "q2" and items[1].messages == [{"role": "user", "content": "hey"}]
    assert isinstance(items[2], BadRecord) and items[2].error.field == "question"
    assert str(items[2].error).endswith("neither field 'question' nor field 'conv' (its string fields: 'prompt'; "
                                        "see --prompt-field)")


# ------------------------------------------------------------------------------------------------ streaming

def test_parquet_is_read_row_group_by_row_group(tmp_path, monkeypatch):
    path = tmp_path / "groups.parquet"
    pq.write_table(pa.table({"id": list(range(50)), "prompt": [f"p{i}" for i in range(50)]}), path,
                   row_group_size=10)
    assert pq.ParquetFile(path).num_row_groups == 5
    requested = []
    real = pq.ParquetFile.iter_batches

    def spy(self, *args, **kwargs):
        requested.append(kwargs.get("row_groups"))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    stream = read_requests(path)
    assert requested == []  # nothing read before the first item is asked for
    first = next(stream)
    assert first.id == 0 and requested == [[0]]
    for _ in range(9):
        next(stream)
    assert requested == [[0]]  # rows 0..9 all came from the first row group
    assert next(stream).id == 10 and requested == [[0], [1]]
    rest = list(stream)
    assert [r.id for r in rest] == list(range(11, 50)) and requested == [[0], [1], [2], [3], [4]]
    assert count_records(path) == 50


def test_jsonl_is_streamed_not_loaded(tmp_path):
    path = tmp_path / "big.jsonl"
    line = json.dumps({"prompt": "x" * 4000}) + "\n"
    path.write_text(line * 1500)  # ~6 MB
    stream = read_requests(path)
    tracemalloc.start()
    try:
        first = next(stream)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert first.prompt == "x" * 4000
    assert peak < 500_000, peak  # a whole-file read would need > 6 MB
    assert count_records(path) == 1500


def test_count_records_skips_blank_lines_and_sums_files(tmp_path):
    a = tmp_path / "a.jsonl"
    a.write_text('{"prompt": "1"}\n\n  \n{"prompt": "2"}\nnot json\n{"prompt": "last, no newline"}')
    b = tmp_path / "b.parquet"
    pq.write_table(pa.table({"prompt": ["x"] * 7}), b, row_group_size=3)
    assert count_records(a) == 4 == len(list(read_requests(a)))
    assert count_records([a, b]) == 11
    with pytest.raises(ConfigError, match="not found"):
        count_records(tmp_path / "gone.jsonl")


def test_every_sampling_parameter_and_constraint_is_a_per_record_override(tmp_path):
    """The override keys come from SamplingParams' fields (ignore_eos and n included) and the constraint
    fields; other keys stay in the record only."""
    from bitnet_batch.sampling.params import SamplingParams

    record = {"id": 1, "prompt": "x", "ignore_eos": True, "n": 2, "min_p": 0.1, "choice": ["a"], "other": 3}
    (req,) = read_requests(write_jsonl(tmp_path / "o.jsonl", [record]))
    assert req.overrides == {"ignore_eos": True, "n": 2, "min_p": 0.1, "choice": ["a"]}
    assert SamplingParams.from_overrides(SamplingParams(), req.overrides).ignore_eos
