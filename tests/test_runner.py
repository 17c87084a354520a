"""The batch job end to end (in-process): records, errors, determinism, resume, formats."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bitnet_batch.engine.engine import EngineConfig
from bitnet_batch.errors import ConfigError
from bitnet_batch.jobs.common import meta_path
from bitnet_batch.jobs.run import JobConfig, run_job
from bitnet_batch.sampling.params import SamplingParams
from conftest import read_jsonl, write_jsonl

WORDS = "apple river stone cloud seven orange window quiet music paper".split()


def prompts(n, seed=0):
    return [{"id": f"item-{i}", "prompt": " ".join(WORDS[(i * 7 + k + seed) % 10] for k in range(3 + i % 9)),
             "max_tokens": 4 + i % 7} for i in range(n)]


def job(tmp_path, inputs, out="out.jsonl", model=None, **kw):
    engine = kw.pop("engine", EngineConfig(max_batch=8, prefill_chunk=64))
    return JobConfig(inputs=tuple(str(p) for p in inputs), output=str(tmp_path / out), model=str(model),
                     sampling=kw.pop("sampling", SamplingParams(temperature=0.9, top_p=0.95)), engine=engine, **kw)


def texts(path):
    return {r["id"]: r["text"] for r in read_jsonl(path)}


def test_jsonl_and_parquet_jobs_agree_with_bad_lines(tmp_path, small_model_path, small_model):
    good = prompts(200)
    lines = [json.dumps(r) for r in good[:100]]
    lines += ['{"id": "broken", "prompt": ', '[1, 2]', '{"id": "noprompt"}', '{"id": "neg", "prompt": "a", '
              '"max_tokens": -1}', json.dumps({"id": "long", "prompt": "apple " * 600})]
    lines += [json.dumps(r) for r in good[100:]]
    src = write_jsonl(tmp_path / "in.jsonl", lines)
    summary = run_job(job(tmp_path, [src], model=small_model_path), model=small_model, quiet=True)
    recs = read_jsonl(tmp_path / "out.jsonl")
    assert [r["index"] for r in recs] == list(range(205))               # one record per input line, in order
    assert len({r["id"] for r in recs}) == 205
    errors = {r["index"]: r for r in recs if r["finish_reason"] == "error"}
    assert sorted(errors) == [100, 101, 102, 103, 104]
    assert "in.jsonl:101" in errors[100]["error"]["message"]
    assert "in.jsonl:103" in errors[102]["error"]["message"] and "prompt" in errors[102]["error"]["message"]
    assert errors[103]["id"] == "neg" and "max_tokens" in errors[103]["error"]["message"]
    assert errors[104]["error"]["type"] == "ContextOverflowError"
    ok = [r for r in recs if r["finish_reason"] != "error"]
    assert len(ok) == 200 and all(isinstance(r["text"], str) for r in ok)
    assert all(r["usage"]["completion_tokens"] <= 4 + int(r["id"].split("-")[1]) % 7 for r in ok)
    assert all(r["timing"]["total_s"] >= r["timing"]["ttft_s"] >= r["timing"]["queue_s"] >= 0 for r in ok)
    assert summary["items"] == {"total": 205, "ok": 200, "error": 5, "skipped_resume": 0, "errors_in_output": 5}
    meta = json.loads(meta_path(tmp_path / "out.jsonl").read_text())
    assert meta["model"]["sha256"] == small_model.sha256() and meta["peak_rss_mb"] > 0
    # the same good records as Parquet in, Parquet out
    table = pa.Table.from_pylist(good)
    pq.write_table(table, tmp_path / "in.parquet", row_group_size=64)
    run_job(job(tmp_path, [tmp_path / "in.parquet"], out="out.parquet", model=small_model_path),
            model=small_model, quiet=True)
    back = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert [r["id"] for r in back] == [r["id"] for r in good]
    jsonl_texts = texts(tmp_path / "out.jsonl")
    assert all(r["text"] == jsonl_texts[r["id"]] for r in back)


@pytest.mark.parametrize("threads", [1, 2])
def test_outputs_do_not_depend_on_batch_size_or_threads(tmp_path, small_model_path, small_model, threads):
    src = write_jsonl(tmp_path / "in.jsonl", prompts(40, seed=3))
    results = []
    for mb in (1, 16):
        run_job(job(tmp_path, [src], out=f"out{mb}.jsonl", model=small_model_path,
                    engine=EngineConfig(max_batch=mb, prefill_chunk=32 if mb == 1 else 64, threads=threads)),
                model=small_model, quiet=True)
        results.append(texts(tmp_path / f"out{mb}.jsonl"))
    assert results[0] == results[1]
    assert len(set(results[0].values())) > 30            # temperature > 0 really samples different texts


def test_same_request_same_output_in_any_input_order(tmp_path, small_model_path, small_model):
    recs = prompts(12)
    a = write_jsonl(tmp_path / "a.jsonl", recs)
    b = write_jsonl(tmp_path / "b.jsonl", recs[::-1])
    run_job(job(tmp_path, [a], out="a_out.jsonl", model=small_model_path), model=small_model, quiet=True)
    run_job(job(tmp_path, [b], out="b_out.jsonl", model=small_model_path), model=small_model, quiet=True)
    assert texts(tmp_path / "a_out.jsonl") == texts(tmp_path / "b_out.jsonl")


def test_resume_skips_finished_and_refuses_changed_parameters(tmp_path, small_model_path, small_model):
    src = write_jsonl(tmp_path / "in.jsonl", prompts(30))
    full = run_job(job(tmp_path, [src], out="full.jsonl", model=small_model_path), model=small_model, quiet=True)
    assert full["items"]["ok"] == 30
    # a partial journal as a crash would leave it: the first 10 finished records plus a torn line
    out = tmp_path / "resumed.jsonl"
    finished = (tmp_path / "full.jsonl").read_text().splitlines()[:10]
    j = job(tmp_path, [src], out="resumed.jsonl", model=small_model_path)
    from bitnet_batch.io.writers import OutputSink
    sink = OutputSink(out, fingerprint=j.fingerprint(small_model.sha256()))
    for line in finished:
        sink.write(json.loads(line))
    sink.close()
    with open(str(out) + ".partial.jsonl", "a") as f:
        f.write('{"id": "item-10", "ind')
    summary = run_job(j, model=small_model, quiet=True)
    assert summary["items"]["skipped_resume"] == 10 and summary["items"]["ok"] == 20
    assert (tmp_path / "full.jsonl").read_text().splitlines() != []
    assert texts(out) == texts(tmp_path / "full.jsonl")
    assert [r["id"] for r in read_jsonl(out)] == [r["id"] for r in read_jsonl(tmp_path / "full.jsonl")]
    # rerunning a complete job does nothing; a changed parameter is refused unless overwrite
    again = run_job(j, model=small_model, quiet=True)
    assert again["items"]["skipped_resume"] == 30
    changed = job(tmp_path, [src], out="resumed.jsonl", model=small_model_path, seed=5)
    with pytest.raises(ConfigError, match="overwrite"):
        run_job(changed, model=small_model, quiet=True)
    f16 = job(tmp_path, [src], out="resumed.jsonl", model=small_model_path,          # float16 K/V: other outputs
              engine=EngineConfig(max_batch=8, prefill_chunk=64, kv_dtype="f16"))
    with pytest.raises(ConfigError, match="overwrite"):
        run_job(f16, model=small_model, quiet=True)
    j2 = job(tmp_path, [src], out="resumed.jsonl", model=small_model_path, seed=5, overwrite=True)
    assert run_job(j2, model=small_model, quiet=True)["items"]["ok"] == 30


def test_stop_string_cuts_the_text_across_tokens(tmp_path, small_model_path, small_model):
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": 1, "prompt": "apple river stone", "max_tokens": 40,
                                               "ignore_eos": True}])
    greedy = SamplingParams(temperature=0.0)
    run_job(job(tmp_path, [src], out="g.jsonl", model=small_model_path, sampling=greedy), model=small_model, quiet=True)
    text = read_jsonl(tmp_path / "g.jsonl")[0]["text"]
    assert len(text) >= 6
    stop = text[len(text) // 2: len(text) // 2 + 3]         # a stop string that can span token boundaries
    cut = text[:text.index(stop)]
    src2 = write_jsonl(tmp_path / "in2.jsonl", [{"id": 1, "prompt": "apple river stone", "max_tokens": 40,
                                                 "ignore_eos": True, "stop": [stop]}])
    run_job(job(tmp_path, [src2], out="s.jsonl", model=small_model_path, sampling=greedy), model=small_model,
            quiet=True)
    rec = read_jsonl(tmp_path / "s.jsonl")[0]
    assert rec["text"] == cut and rec["finish_reason"] == "stop"


def test_truncate_logprobs_max_tokens_zero_and_openai_output(tmp_path, small_model_path, small_model):
    recs = [{"id": "long", "prompt": "apple " * 600, "max_tokens": 3},
            {"id": "lp", "prompt": "quiet music", "max_tokens": 3, "logprobs": 2},
            {"id": "zero", "prompt": "paper", "max_tokens": 0}]
    src = write_jsonl(tmp_path / "in.jsonl", recs)
    run_job(job(tmp_path, [src], out="o.jsonl", model=small_model_path, truncate="left"), model=small_model,
            quiet=True)
    out = {r["id"]: r for r in read_jsonl(tmp_path / "o.jsonl")}
    assert out["long"]["finish_reason"] in ("length", "stop") and out["long"]["usage"]["prompt_tokens"] < 512
    lp = out["lp"]["logprobs"]
    assert len(lp) == out["lp"]["usage"]["completion_tokens"] and all(len(e["top"]) == 2 for e in lp)
    assert all(e["top"][0]["logprob"] >= e["logprob"] - 1e-6 for e in lp)
    assert out["zero"]["text"] == "" and out["zero"]["usage"]["completion_tokens"] == 0
    run_job(job(tmp_path, [src], out="oa.jsonl", model=small_model_path, truncate="left", output_format="openai"),
            model=small_model, quiet=True)
    oa = read_jsonl(tmp_path / "oa.jsonl")
    assert [r["custom_id"] for r in oa] == ["long", "lp", "zero"]
    assert oa[1]["response"]["body"]["choices"][0]["message"]["content"] == out["lp"]["text"]


def test_chat_messages_and_system(tmp_path, small_model_path, small_model):
    recs = [{"id": "m", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 3},
            {"id": "bad", "messages": [{"role": "robot", "content": "hello"}]}]
    src = write_jsonl(tmp_path / "in.jsonl", recs)
    run_job(job(tmp_path, [src], out="c.jsonl", model=small_model_path, system="Be brief."), model=small_model,
            quiet=True)
    out = {r["id"]: r for r in read_jsonl(tmp_path / "c.jsonl")}
    tok = small_model.tokenizer
    expect = tok.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}])
    assert out["m"]["usage"]["prompt_tokens"] == len(expect)
    assert out["bad"]["finish_reason"] == "error" and "role" in out["bad"]["error"]["message"]


def test_small_kv_budget_admits_fewer_and_gives_the_same_texts(tmp_path, small_model_path, small_model):
    src = write_jsonl(tmp_path / "in.jsonl", prompts(24, seed=5))
    run_job(job(tmp_path, [src], out="big.jsonl", model=small_model_path), model=small_model, quiet=True)
    # 2 layers x 2 x 64 floats x 4 B = 1 KiB per token: 0.05 MiB holds ~51 tokens, about two sequences at once
    tight = EngineConfig(max_batch=8, prefill_chunk=64, kv_cache_mb=0.05, max_seq_len=48)
    run_job(job(tmp_path, [src], out="small.jsonl", model=small_model_path, engine=tight), model=small_model,
            quiet=True)
    assert texts(tmp_path / "small.jsonl") == texts(tmp_path / "big.jsonl")


def test_unordered_output_has_every_record(tmp_path, small_model_path, small_model):
    src = write_jsonl(tmp_path / "in.jsonl", prompts(20))
    run_job(job(tmp_path, [src], out="u.jsonl", model=small_model_path, ordered=False), model=small_model, quiet=True)
    recs = read_jsonl(tmp_path / "u.jsonl")
    assert sorted(r["index"] for r in recs) == list(range(20))
