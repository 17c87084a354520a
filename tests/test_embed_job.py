"""The `embed` job: records and error records, every output dtype and --dimensions, Parquet fixed-size-list
columns, the same vectors whatever the batching, queries with an instruction, a generative model's pooled states,
and resume after kill -9."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import bitnet_batch
from bitnet_batch.config import EngineConfig
from bitnet_batch.embeddings import (Embedder, embedding_config, prepare_tokens, quantize_binary, quantize_float16,
                                     quantize_int8)
from bitnet_batch.jobs.embed import EmbedJobConfig, embed_job
from conftest import kill_when_journaled, read_jsonl, write_jsonl

MODEL = Path(__file__).parent / "data" / "embed" / "tiny-qwen3-i2s.gguf"
WORDS = "apple river stone cloud seven orange window quiet music paper".split()
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model():
    return bitnet_batch.load_model(MODEL)


def texts(n, seed=0):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, 2 + int(rng.integers(0, 30)))) for _ in range(n)]


def reference(model, items, **kw):
    """The Embedder's vectors for the same texts (what the job must write)."""
    ecfg = embedding_config(model)
    ids = [prepare_tokens(model, r["text"], ecfg, instruction=r.get("instruction")) for r in items]
    return Embedder(model, max_rows=64, max_texts=4, max_seq_len=256).embed(ids, pooling=ecfg.pooling, **kw)


def job(tmp_path, src, out="out.parquet", **kw):
    engine = kw.pop("engine", EngineConfig(max_batch=4, prefill_chunk=48, max_seq_len=256))
    return EmbedJobConfig(inputs=(str(src),), output=str(tmp_path / out), model=str(MODEL), engine=engine, **kw)


def test_records_errors_and_the_parquet_column(tmp_path, model):
    good = [{"id": f"t{i}", "text": t} for i, t in enumerate(texts(12))]
    good[3]["instruction"] = "Find passages about fruit"
    lines = [json.dumps(r) for r in good[:6]] + ['{"id": "broken", "text": ', json.dumps({"id": "num", "text": 7}),
                                                  json.dumps({"id": "long", "text": "apple " * 400})]
    lines += [json.dumps(r) for r in good[6:]]
    src = write_jsonl(tmp_path / "in.jsonl", lines)
    summary = embed_job(job(tmp_path, src), model=model, quiet=True)
    table = pq.read_table(tmp_path / "out.parquet")
    dim = model.config.n_embd
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), dim)
    rows = table.to_pylist()
    assert [r["index"] for r in rows] == list(range(15))
    errors = {r["id"]: r for r in rows if r["finish_reason"] == "error"}
    assert set(errors) == {"row-6", "num", "long"} and all(r["embedding"] is None for r in errors.values())
    assert f"{src}:7: invalid JSON" in errors["row-6"]["error"]["message"]
    assert errors["num"]["error"]["message"].startswith(f"{src}:8: field 'text' must be a non-empty string")
    assert errors["long"]["error"]["type"] == "ContextOverflowError" and "--truncate" in errors["long"]["error"]["message"]
    ok = [r for r in rows if r["finish_reason"] == "embedded"]
    want = reference(model, good)
    assert np.array_equal(np.array([r["embedding"] for r in ok], np.float32), want)      # bit for bit
    assert all(r["usage"]["prompt_tokens"] > 0 for r in ok)
    assert summary["items"] == {"total": 15, "ok": 12, "error": 3, "skipped_resume": 0, "errors_in_output": 3}
    assert summary["parameters"]["pooling"] == embedding_config(model).pooling and summary["tokens"] > 0
    # the instruction made item 3 a query: not the vector of its bare text
    bare = reference(model, [{"text": good[3]["text"]}])
    assert not np.array_equal(want[3], bare[0])


def test_a_job_of_errors_keeps_the_embedding_column_and_hints_at_the_field(tmp_path, model):
    """Records without the text field (a prompts file, say) are errors naming the fields they have; a Parquet
    output of errors only still has the typed embedding column, so shards of one dataset share a schema."""
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "prompt": "apple river", "n": 3}, {"id": "b"}])
    embed_job(job(tmp_path, src, dtype="int8"), model=model, quiet=True)
    table = pq.read_table(tmp_path / "out.parquet")
    assert table.schema.field("embedding").type == pa.list_(pa.int8(), model.config.n_embd)
    assert table.schema.field("scale").type == pa.float32()
    rows = table.to_pylist()
    assert [r["embedding"] for r in rows] == [None, None]
    assert rows[0]["error"]["message"] == (f"{src}:1: field 'text' must be a non-empty string, got missing (its "
                                           f"string fields: 'prompt'; see --text-field)")
    assert rows[1]["error"]["message"] == f"{src}:2: field 'text' must be a non-empty string, got missing"


@pytest.mark.parametrize("dtype", ["float32", "float16", "int8", "binary"])
def test_every_dtype_and_dimensions_in_jsonl_and_parquet(tmp_path, model, dtype):
    items = [{"id": i, "text": t} for i, t in enumerate(texts(6, seed=1))]
    src = write_jsonl(tmp_path / "in.jsonl", items)
    vec = reference(model, items, dimensions=16)
    want = {"float32": vec, "float16": quantize_float16(vec), "int8": quantize_int8(vec)[0],
            "binary": quantize_binary(vec)}[dtype]
    for out in ("o.jsonl", "o.parquet"):
        embed_job(job(tmp_path, src, out=out, dtype=dtype, dimensions=16), model=model, quiet=True)
        recs = read_jsonl(tmp_path / out) if out.endswith("jsonl") else pq.read_table(tmp_path / out).to_pylist()
        got = np.array([r["embedding"] for r in recs]).astype(want.dtype)
        assert np.array_equal(got, want), (dtype, out)
        if dtype == "int8":
            assert np.allclose([r["scale"] for r in recs], quantize_int8(vec)[1])
    assert want.shape[1] == (2 if dtype == "binary" else 16)


def test_vectors_do_not_depend_on_batching_or_pooling_choice_order(tmp_path, model):
    items = [{"id": i, "text": t} for i, t in enumerate(texts(20, seed=2))]
    src = write_jsonl(tmp_path / "in.jsonl", items)
    outs = []
    for k, engine in enumerate([EngineConfig(max_batch=1, prefill_chunk=8, max_seq_len=256),
                                EngineConfig(max_batch=16, prefill_chunk=512, max_seq_len=256)]):
        embed_job(job(tmp_path, src, out=f"o{k}.parquet", engine=engine, pooling="mean"), model=model, quiet=True)
        outs.append(pq.read_table(tmp_path / f"o{k}.parquet").column("embedding").to_pylist())
    assert outs[0] == outs[1]


def test_a_generative_model_gives_mean_pooled_states(tmp_path, small_model_path, small_model):
    items = [{"id": i, "text": t} for i, t in enumerate(texts(5, seed=3))]
    src = write_jsonl(tmp_path / "in.jsonl", items)
    cfg = EmbedJobConfig(inputs=(str(src),), output=str(tmp_path / "g.jsonl"), model=str(small_model_path),
                         engine=EngineConfig(max_batch=2, prefill_chunk=16, max_seq_len=256))
    summary = embed_job(cfg, model=small_model, quiet=True)
    assert summary["parameters"]["pooling"] == "mean" and summary["parameters"]["dimensions"] == 128
    recs = read_jsonl(tmp_path / "g.jsonl")
    ecfg = embedding_config(small_model)
    ids = [prepare_tokens(small_model, r["text"], ecfg) for r in items]
    want = Embedder(small_model, max_rows=32, max_texts=2, max_seq_len=256).embed(ids, pooling="mean")
    assert np.array_equal(np.array([r["embedding"] for r in recs], np.float32), want)


def test_a_generative_job_refuses_an_embedding_model(tmp_path, model):
    from bitnet_batch.errors import ConfigError
    from bitnet_batch.jobs.run import JobConfig, run_job

    src = write_jsonl(tmp_path / "in.jsonl", [{"id": 1, "prompt": "hi"}])
    with pytest.raises(ConfigError, match="use `bitnet-batch embed`"):
        run_job(JobConfig(inputs=(str(src),), output=str(tmp_path / "o.jsonl"), model=str(MODEL)), model=model,
                quiet=True)


def test_kill_9_then_resume_equals_an_uninterrupted_run(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": f"k{i}", "text": t} for i, t in enumerate(texts(150, 4))])
    common = ["-m", str(MODEL), "--max-batch", "1", "--prefill-chunk", "8", "--max-seq-len", "256", "--quiet"]
    cli = [sys.executable, "-m", "bitnet_batch.cli", "embed", str(src)]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    ref = subprocess.run(cli + ["-o", str(tmp_path / "ref.jsonl"), *common], capture_output=True, text=True, env=env)
    assert ref.returncode == 0, ref.stderr
    out, journal = tmp_path / "out.jsonl", tmp_path / "out.jsonl.partial.jsonl"
    proc = subprocess.Popen(cli + ["-o", str(out), *common], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    kill_when_journaled(proc, journal)
    again = subprocess.run(cli + ["-o", str(out), *common], capture_output=True, text=True, env=env)
    assert again.returncode == 0, again.stderr
    strip = lambda recs: [{k: v for k, v in r.items() if k != "timing"} for r in recs]  # noqa: E731
    assert strip(read_jsonl(out)) == strip(read_jsonl(tmp_path / "ref.jsonl"))


def test_kernels_cold_looks_at_the_kernels_the_model_uses(tmp_path, small_model_path):
    """A cold cache is seen for an embedding model (its attention) and a generative one (the compiled layer), and
    a warm one after a job; nothing is compiled to find out."""
    code = ("import sys, json; import bitnet_batch; from bitnet_batch.config import EngineConfig; "
            "from bitnet_batch.jobs.embed import EmbedEngine, EmbedKind; "
            "print(json.dumps([EmbedKind.kernels_cold(EmbedEngine(bitnet_batch.load_model(p), "
            "EngineConfig(max_batch=2, prefill_chunk=16, max_seq_len=64))) for p in sys.argv[1:]]))")
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "empty"))
    res = subprocess.run([sys.executable, "-c", code, str(MODEL), str(small_model_path)], capture_output=True,
                         text=True, timeout=300, env=env, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.strip().splitlines()[-1]) == [True, True]
    assert not (tmp_path / "empty").exists() or not any((tmp_path / "empty").rglob("*.nbc"))
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "text": "apple river"}])
    embed_job(job(tmp_path, src), quiet=True)                     # this process's cache is warm now
    from bitnet_batch.jobs.embed import EmbedEngine, EmbedKind

    engine = EmbedEngine(bitnet_batch.load_model(MODEL), EngineConfig(max_batch=2, prefill_chunk=16, max_seq_len=64))
    assert EmbedKind.kernels_cold(engine) is False
