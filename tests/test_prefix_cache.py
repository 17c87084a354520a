"""Prefix caching end to end: cached blocks hold what a fresh prefill writes, and jobs (run with n samples,
constraints and stops, score) give the same records with and without the cache, for any batching, also when a
tight KV budget evicts. The bookkeeping is tested in test_kv_cache.py and test_scheduler.py."""
import json

import numpy as np
import pytest

from bitnet_batch.engine.engine import Engine, EngineConfig
from bitnet_batch.engine.kv_cache import KVCache
from bitnet_batch.pipeline import load_pipeline
from bitnet_batch.jobs.run import JobConfig, run_job
from bitnet_batch.sampling.params import SamplingParams
from bitnet_batch.scheduler import Scheduler
from bitnet_batch.jobs.score import ScoreJobConfig, score_job
from conftest import read_jsonl, write_jsonl
from conftest import sequence as seq

# ------------------------------------------------------------------------------------------ the engine

def test_cached_blocks_hold_what_a_fresh_prefill_writes_and_are_never_written(small_model):
    eng = Engine(small_model, EngineConfig(max_batch=2, max_seq_len=128, prefill_chunk=64, block_size=16))
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, small_model.config.n_vocab, 53).astype(np.int32)
    other = np.concatenate([prompt[:40], rng.integers(0, 512, 9).astype(np.int32)])
    cache, sched = eng.kv, Scheduler(eng.kv, 2, eng.max_rows)
    first = seq(0, prompt, max_new=1)
    sched.add(first)
    sched.admit()
    parts = sched.plan()
    fresh = eng.step([(p.seq.slot, p.tokens, p.start, p.want_logits) for p in parts])[0].copy()
    sched.commit(parts)
    shared = cache.block_tables[first.slot, :2].tolist()
    before = cache.k[:, :, shared].copy(), cache.v[:, :, shared].copy()
    sched.retire(first)                                                 # its registered blocks stay cached
    second = seq(1, other, max_new=1)
    sched.add(second)
    assert sched.admit() == [second] and second.n_cached == 32
    with pytest.raises(RuntimeError, match="shared prefix block"):
        eng.step([(second.slot, other[20:], 20, True)])
    parts = sched.plan()
    assert [(p.start, len(p.tokens)) for p in parts] == [(32, 17)]
    cached = eng.step([(p.seq.slot, p.tokens, p.start, p.want_logits) for p in parts])[0].copy()
    assert np.array_equal(cache.k[:, :, shared], before[0]) and np.array_equal(cache.v[:, :, shared], before[1])
    # the same two prompts on a fresh engine without the cache
    plain = Engine(small_model, EngineConfig(max_batch=2, max_seq_len=128, prefill_chunk=128, prefix_cache=False))
    s0, s1 = plain.kv.allocate(), plain.kv.allocate()
    a, b = plain.step([(s0, prompt, 0, True), (s1, other, 0, True)])
    assert np.array_equal(a, fresh) and np.array_equal(b, cached)      # bit for bit


# ------------------------------------------------------------------------------------------ jobs

WORDS = "apple river stone cloud seven orange window quiet music paper".split()


def shared_prefix_items(n=24):
    """Records whose prompts start with one of several shared instructions (lengths around block and chunk
    boundaries), some with n samples, a stop string, a regex or a choice constraint."""
    rng = np.random.default_rng(5)
    heads = [" ".join(rng.choice(WORDS, k)) for k in (3, 14, 33, 70)]
    items = []
    for i in range(n):
        tail = " ".join(rng.choice(WORDS, 2 + i % 5))
        rec = {"id": f"r{i}", "prompt": f"{heads[i % 4]}: {tail}", "max_tokens": 4 + i % 5}
        if i % 6 == 1:
            rec["n"] = 3
        if i % 7 == 2:
            rec["stop"] = ["e"]
        if i % 8 == 3:
            rec["regex"] = "[a-z]{2,5}"
        if i % 8 == 5:
            rec["choice"] = ["yes", "no", "maybe"]
        items.append(rec)
    return items


def comparable(records):
    """Records without what may differ with the cache: timings and usage.cached_tokens."""
    out = []
    for r in records:
        r = dict(r, usage={k: v for k, v in r["usage"].items() if k != "cached_tokens"})
        r.pop("timing")
        out.append(r)
    return out


def _job(tmp_path, src, model_path, name, engine, **kw):
    return JobConfig(inputs=(str(src),), output=str(tmp_path / name), model=str(model_path),
                     sampling=kw.pop("sampling", SamplingParams(temperature=0.9, top_p=0.95, logprobs=2)),
                     engine=engine, **kw)


@pytest.fixture(scope="module")
def plain_records(tmp_path_factory, small_model_path, small_model):
    tmp = tmp_path_factory.mktemp("plain")
    src = write_jsonl(tmp / "in.jsonl", shared_prefix_items())
    run_job(_job(tmp, src, small_model_path, "plain.jsonl", EngineConfig(max_batch=8, prefill_chunk=32,
                                                                         prefix_cache=False)),
            model=small_model, quiet=True)
    return src, read_jsonl(tmp / "plain.jsonl")


@pytest.mark.parametrize("max_batch,prefill_chunk,threads", [(1, 16, 1), (4, 24, 2), (16, 128, 0)])
def test_job_records_are_the_same_with_and_without_the_prefix_cache(tmp_path, small_model_path, small_model,
                                                                      plain_records, max_batch, prefill_chunk, threads):
    src, plain = plain_records
    engine = EngineConfig(max_batch=max_batch, prefill_chunk=prefill_chunk, threads=threads)
    summary = run_job(_job(tmp_path, src, small_model_path, "cached.jsonl", engine), model=small_model, quiet=True)
    cached = read_jsonl(tmp_path / "cached.jsonl")
    assert comparable(cached) == comparable(plain)
    assert all(r["usage"]["cached_tokens"] == 0 for r in plain)
    hits = [r["usage"]["cached_tokens"] for r in cached]
    assert all(c % 16 == 0 and c < r["usage"]["prompt_tokens"] for c, r in zip(hits, cached))
    pc = summary["prefix_cache"]
    assert pc["prompt_tokens_cached"] == sum(hits) > 0
    assert pc["prompt_tokens_computed"] + pc["prompt_tokens_cached"] == sum(r["usage"]["prompt_tokens"] for r in cached)
    assert 0 < pc["hit_rate"] < 1 and pc["enabled"]


def test_each_shared_prefix_is_computed_once(tmp_path, small_model_path, small_model):
    """Twelve requests with one instruction arrive in one step: the instruction's blocks are computed once and
    every other request maps all of them."""
    tok = small_model.tokenizer
    head = " ".join(WORDS * 5)
    items = [{"id": i, "prompt": f"{head} {i}", "max_tokens": 3} for i in range(12)]
    src = write_jsonl(tmp_path / "in.jsonl", items)
    summary = run_job(_job(tmp_path, src, small_model_path, "out.jsonl", EngineConfig(max_batch=16, prefill_chunk=32),
                           sampling=SamplingParams()), model=small_model, quiet=True)
    ids = [tok.encode(r["prompt"], add_bos=tok.add_bos) for r in items]
    common = [next((k for k, (a, b) in enumerate(zip(x, y)) if a != b), min(len(x), len(y)))
              for x in ids for y in ids if x is not y]
    full = min(common) // 16 * 16
    assert max(common) // 16 * 16 == full                   # every pair shares the same full blocks
    recs = read_jsonl(tmp_path / "out.jsonl")
    assert recs[0]["usage"]["cached_tokens"] == 0
    assert all(r["usage"]["cached_tokens"] == full for r in recs[1:]) and full >= 48
    assert summary["prefix_cache"]["prompt_tokens_computed"] == sum(map(len, ids)) - 11 * full


def test_n_samples_share_their_prompt(tmp_path, small_model_path, small_model):
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": "q", "prompt": " ".join(WORDS * 4), "n": 5, "max_tokens": 4}])
    summary = run_job(_job(tmp_path, src, small_model_path, "out.jsonl", EngineConfig(max_batch=8)),
                      model=small_model, quiet=True)
    recs = read_jsonl(tmp_path / "out.jsonl")
    p = recs[0]["usage"]["prompt_tokens"]
    assert [r["usage"]["cached_tokens"] for r in recs] == [0] + [(p - 1) // 16 * 16] * 4
    assert summary["prefix_cache"]["prompt_tokens_cached"] == 4 * ((p - 1) // 16 * 16)


def test_a_tight_kv_budget_evicts_and_gives_the_same_records(tmp_path, small_model_path, small_model, plain_records,
                                                             monkeypatch):
    src, plain = plain_records
    evicted = []
    take = KVCache._take

    def counting_take(self):
        evicted.append(not self._free_blocks)
        return take(self)

    monkeypatch.setattr(KVCache, "_take", counting_take)
    per_token = 2 * 2 * 64 * 4                       # 2 layers x (K, V) x kv_dim 64 x float32
    engine = EngineConfig(max_batch=8, prefill_chunk=32, kv_cache_mb=40 * 16 * per_token / 2**20)
    summary = run_job(_job(tmp_path, src, small_model_path, "tight.jsonl", engine), model=small_model, quiet=True)
    assert comparable(read_jsonl(tmp_path / "tight.jsonl")) == comparable(plain)
    assert summary["prefix_cache"]["prompt_tokens_cached"] > 0 and sum(evicted) > 10


def test_openai_output_and_meta_report_cached_tokens(tmp_path, small_model_path, small_model, plain_records):
    src, _ = plain_records
    run_job(_job(tmp_path, src, small_model_path, "out.jsonl", EngineConfig(max_batch=4), output_format="openai"),
            model=small_model, quiet=True)
    lines = read_jsonl(tmp_path / "out.jsonl")
    usage = [line["response"]["body"]["usage"] for line in lines]
    assert all(u["prompt_tokens_details"]["cached_tokens"] <= u["prompt_tokens"] for u in usage)
    assert sum(u["prompt_tokens_details"]["cached_tokens"] for u in usage) > 0
    meta = json.loads((tmp_path / "out.jsonl.meta.json").read_text())
    assert meta["prefix_cache"]["enabled"] and meta["parameters"]["engine"]["prefix_cache"]


def test_score_with_shared_prompts_equals_score_without(tmp_path, small_model):
    prompt = "Question: " + " ".join(WORDS * 3) + " Answer:"
    recs = [{"id": f"c{i}", "prompt": prompt, "completion": f" {w} {WORDS[(i + 3) % 10]}"}
            for i, w in enumerate(WORDS)] + [{"id": "t", "text": prompt + " stone"}]
    src = write_jsonl(tmp_path / "in.jsonl", recs)
    out = {}
    for pc in (False, True):
        job = ScoreJobConfig(inputs=(str(src),), output=str(tmp_path / f"s{pc}.jsonl"), model="unused",
                             engine=EngineConfig(max_batch=4, prefill_chunk=24, prefix_cache=pc))
        out[pc] = (score_job(job, model=small_model, quiet=True), read_jsonl(tmp_path / f"s{pc}.jsonl"))
    assert comparable(out[True][1]) == comparable(out[False][1])
    cached = [r["usage"]["cached_tokens"] for r in out[True][1]]
    assert cached[0] == 0 and all(c > 0 and c <= r["usage"]["prompt_tokens"] - 1
                                  for c, r in zip(cached[1:10], out[True][1][1:10]))
    assert out[True][0]["prefix_cache"]["prompt_tokens_cached"] == sum(cached)
    assert out[True][0]["this_run"]["rows"] + sum(cached) == out[False][0]["this_run"]["rows"]


def test_prefix_cache_switches(tmp_path, small_model_path, small_model):
    import io

    from click.testing import CliRunner

    from bitnet_batch.cli import main

    src = write_jsonl(tmp_path / "in.jsonl", [{"id": i, "prompt": " ".join(WORDS * 3), "max_tokens": 2}
                                              for i in range(3)])
    res = CliRunner().invoke(main, ["run", str(src), "-o", str(tmp_path / "off.jsonl"), "--model",
                                    str(small_model_path), "--no-prefix-cache", "--quiet"])
    assert res.exit_code == 0, res.output
    meta = json.loads((tmp_path / "off.jsonl.meta.json").read_text())
    assert not meta["parameters"]["engine"]["prefix_cache"] and meta["prefix_cache"]["prompt_tokens_cached"] == 0
    log = io.StringIO()
    run_job(_job(tmp_path, src, small_model_path, "on.jsonl", EngineConfig()), model=small_model, out=log)
    assert "prompt tokens" in log.getvalue() and "from the prefix cache (" in log.getvalue()
    log = io.StringIO()
    run_job(_job(tmp_path, src, small_model_path, "off2.jsonl", EngineConfig(prefix_cache=False)), model=small_model,
            out=log)
    assert "| prefix cache off |" in log.getvalue()
    toml = tmp_path / "p.toml"
    toml.write_text(f'[input]\npath = "in.jsonl"\n[prompt]\ntext = "{{prompt}}"\n[model]\nname = '
                    f'"{small_model_path}"\n[output]\npath = "p.jsonl"\n[engine]\nprefix_cache = false\n')
    assert load_pipeline(toml).job().engine.prefix_cache is False
    toml.write_text(toml.read_text().replace("false", '"no"'))
    with pytest.raises(Exception, match=r"\[engine\] prefix_cache must be a boolean"):
        load_pipeline(toml)
