"""Golden jobs: fixed run / score / pipeline jobs on the test model whose records (timings aside) must stay
identical to the committed ones in tests/data/golden/ while the job machinery is reworked: every token, text and
field the same, and every float (logprobs) to 1e-12 relative. Floats are not held to the bit: the kernels reduce
with fastmath reassociation, whose vectorised order depends on the vector width the CPU gives LLVM (a float64 log
of a sum over the vocabulary differs in its last bits between an AVX2 and an AVX-512 CPU), while on one CPU they
are bit-identical whatever the batch or thread count (tests/test_engine.py).

Regenerate (only when a change is meant to alter outputs, and say so in the commit):
``BITNET_BATCH_WRITE_GOLDEN=1 python -m pytest tests/test_golden_jobs.py tests/test_ray.py -k golden``
"""
import json
import math
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from bitnet_batch.engine.engine import EngineConfig
from bitnet_batch.pipeline import load_pipeline
from bitnet_batch.jobs.run import JobConfig, run_job
from bitnet_batch.sampling.constraints import job_constraint
from bitnet_batch.sampling.params import SamplingParams
from bitnet_batch.jobs.score import ScoreJobConfig, score_job
from conftest import read_jsonl, write_jsonl

GOLDEN = Path(__file__).parent / "data" / "golden"
WRITE = os.environ.get("BITNET_BATCH_WRITE_GOLDEN") == "1"
WORDS = "apple river stone cloud seven orange window quiet music paper".split()
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "size"],
          "properties": {"name": {"type": "string", "maxLength": 12}, "size": {"type": "integer", "minimum": 0,
                                                                                "maximum": 99}}}


def run_records():
    """Every per-record feature of `run`: raw prompts, chats, sampling overrides, stops, logprobs, n samples,
    constraints, a bad line, an over-long prompt and max_tokens 0."""
    recs = []
    for i in range(18):
        words = " ".join(WORDS[(i * 3 + k) % 10] for k in range(2 + i % 6))
        rec = {"id": f"g{i}", "prompt": f"{words} {i}", "max_tokens": 3 + i % 6}
        if i % 4 == 1:
            rec = {"id": f"g{i}", "messages": [{"role": "system", "content": "be brief"},
                                               {"role": "user", "content": words}], "max_tokens": 5}
        extra = [{"temperature": 0.0}, {"top_k": 5, "seed": 99}, {"stop": ["e", "o"]}, {"logprobs": 2},
                 {"n": 3}, {"choice": ["yes", "no"]}, {"regex": "[a-z]{1,4}"},
                 {"response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMA}}, "max_tokens": 30},
                 {"min_p": 0.1, "repetition_penalty": 1.3}, {"presence_penalty": 0.5, "frequency_penalty": 0.5},
                 {"ignore_eos": True}, {"max_tokens": 0}][i % 12]
        recs.append({**rec, **extra})
    return recs + ['{"id": "bad", "prompt": ', {"id": "long", "prompt": "apple " * 700}]


def normalized(records) -> str:
    """JSON lines without what depends on how the work was scheduled: timings and usage.cached_tokens."""
    out = []
    for r in records:
        r = {k: v for k, v in r.items() if k != "timing"}
        if isinstance(r.get("usage"), dict):
            r["usage"] = {k: v for k, v in r["usage"].items() if k != "cached_tokens"}
        out.append(json.dumps(r, sort_keys=True) + "\n")
    return "".join(out)


def check(name: str, records, src: Path) -> None:
    """``records`` (timings dropped, ``src``'s directory dropped from messages) against the golden file."""
    text = normalized(records).replace(str(src.parent) + os.sep, "")
    path = GOLDEN / name
    if WRITE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    golden = path.read_text()
    if text != golden:
        got, want = text.splitlines(), golden.splitlines()
        assert len(got) == len(want), f"{name}: {len(got)} records, {len(want)} golden ones"
        for i, (g, w) in enumerate(zip(got, want)):
            assert same_values(json.loads(g), json.loads(w)), f"{name}: record {i} differs from the golden one:\n" \
                                                              f"{g}\n{w}"


def same_values(a, b) -> bool:
    """Equal JSON values, floats to 1e-12 relative (and both or neither NaN)."""
    if isinstance(a, float) and isinstance(b, float):
        return a == b or math.isclose(a, b, rel_tol=1e-12) or (math.isnan(a) and math.isnan(b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_values(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_values(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def test_same_values_holds_floats_to_their_digits_and_the_rest_exactly():
    assert same_values({"t": "ab", "lp": [-0.23762640014031433]}, {"t": "ab", "lp": [-0.2376264001403161]})
    assert not same_values({"lp": [-0.2376264]}, {"lp": [-0.2376265]})
    assert not same_values({"t": "ab"}, {"t": "ac"}) and not same_values({"n": 1}, {"n": 1.0})
    assert not same_values({"a": 1}, {"a": 1, "b": 2}) and not same_values([1, 2], [1, 2, 3])
    assert same_values(float("nan"), float("nan")) and not same_values(float("nan"), 0.5)


@pytest.fixture(scope="module")
def run_input(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("golden") / "in.jsonl", run_records())


def run_job_config(src, out, model_path, n=1, **kw) -> JobConfig:
    return JobConfig(inputs=(str(src),), output=str(out), model=str(model_path), seed=3,
                     sampling=SamplingParams(temperature=0.8, top_p=0.95, max_tokens=6, n=n),
                     engine=EngineConfig(max_batch=kw.pop("max_batch", 5), prefill_chunk=24), **kw)


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "openai"])
def test_golden_run(tmp_path, small_model_path, small_model, run_input, fmt):
    out = tmp_path / ("out.parquet" if fmt == "parquet" else "out.jsonl")
    run_job(run_job_config(run_input, out, small_model_path, output_format=fmt), model=small_model, quiet=True)
    records = pq.read_table(out).to_pylist() if fmt == "parquet" else read_jsonl(out)
    if fmt == "openai":
        for r in records:
            if r["response"]:
                r["response"]["body"].pop("created")
                r["response"]["body"]["usage"].pop("prompt_tokens_details")
    check(f"run.{fmt}.jsonl", records, run_input)


def test_golden_run_with_job_options(tmp_path, small_model_path, small_model, run_input):
    """Job-wide n with dedupe, a job constraint, a system message and chat rendering, unordered output."""
    out = tmp_path / "out.jsonl"
    job = run_job_config(run_input, out, small_model_path, max_batch=3, n=2, dedupe=True, system="answer shortly",
                         constraint=job_constraint(choice=("apple", "river", "stone")), ordered=False)
    run_job(job, model=small_model, quiet=True)
    check("run.options.jsonl", sorted(read_jsonl(out), key=lambda r: (r["index"], r.get("sample_index", 0))),
          run_input)


def test_golden_score(tmp_path, small_model):
    recs = [{"id": i, "text": " ".join(WORDS[(i + k) % 10] for k in range(3 + 2 * i))} for i in range(6)]
    recs += [{"id": f"c{i}", "prompt": "Q: which word? A:", "completion": f" {w}"} for i, w in enumerate(WORDS[:4])]
    recs += [{"id": "empty", "text": ""}, '{"id": 3.5']
    src = write_jsonl(tmp_path / "in.jsonl", recs)
    out = tmp_path / "s.jsonl"
    score_job(ScoreJobConfig(inputs=(str(src),), output=str(out), model="unused", token_logprobs=True,
                             engine=EngineConfig(max_batch=3, prefill_chunk=16)), model=small_model, quiet=True)
    check("score.jsonl", read_jsonl(out), src)


def test_golden_pipeline(tmp_path, small_model_path, small_model):
    root = Path(__file__).resolve().parents[1]
    pipeline = root / "pipelines" / "synthesize_qa.toml"
    job = load_pipeline(pipeline).job(
        {"model": str(small_model_path), "output": str(tmp_path / "qa.jsonl"), "max_tokens": 24})
    run_job(job, model=small_model, quiet=True)
    check("pipeline.synthesize_qa.jsonl", read_jsonl(tmp_path / "qa.jsonl"), root / "examples" / "pipelines" / "x")
