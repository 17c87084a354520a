"""The argmax lm_head (``bitnet_batch.model.argmax_head``): the float32 argmax of a row through a screen's logits
(bf16 or int8) and the float32 logits of a few candidates. The bounds hold entry by entry, the candidates' logits
are the float32 lm_head's bit for bit, the argmax (first index among equal maxima) is the float32 lm_head's on rows
made to tie and nearly tie, rows it cannot narrow take the whole float32 lm_head, and greedy jobs write the same
records with it and without."""
import json
from pathlib import Path

import numba
import numpy as np
import pytest

import bitnet_batch
from bitnet_batch.config import EngineConfig
from bitnet_batch.engine.engine import Engine
from bitnet_batch.jobs.run import JobConfig, RunKind, run_job
from bitnet_batch.jobs.score import ScoreJobConfig, ScoreKind
from bitnet_batch.model import argmax_head as A
from bitnet_batch.model.model import Int8Table
from bitnet_batch.sampling.constraints import regex_constraint
from bitnet_batch.sampling.params import SamplingParams
from conftest import read_jsonl, write_jsonl
from jit_kernels import argmax_screen, embedding
from jit_kernels import lm_head_bf16 as L
from jit_kernels import lm_head_int8 as I
from jit_kernels._cpu import KERNEL

REF = Path(__file__).parent / "data" / "reference"
pytestmark = pytest.mark.skipif(KERNEL == "portable", reason="the argmax lm_head needs the SIMD lm_head (AVX2 "
                                                              "or AVX-512); this process runs the portable kernels")


def f16_table(V, D, rng):
    """An F16 table (uint16 bits) whose rows tie and nearly tie: row 7 repeats row 3 (equal logits), row 11 is
    row 5 with its last element one F16 step away (logits a few ulp apart), the rest random."""
    w = (rng.standard_normal((V, D)) * 0.05).astype(np.float16)
    w[7] = w[3]
    w[11] = w[5]
    w[11, -1] = np.nextafter(w[5, -1], np.float16(1))
    return w.view(np.uint16)


def head_of(table, kind, rows, screen="bf16"):
    """What ``ArgmaxHead`` needs of a model, for a bare table."""
    class Weights:
        output, output_kind = table, kind

    class Model:
        weights = Weights

        def bf16_lm_head(self):
            out = np.zeros((table.shape[0], L.padded_dim(table.shape[1])), np.uint16)
            L.bf16_table(table, kind, out)
            return out

        def bf16_row_norms(self):
            out = np.empty(table.shape[0], np.float64)
            L.row_norm_bounds(self.bf16_lm_head(), out)
            return out

        def int8_lm_head(self):
            V, D = table.shape
            t = Int8Table(np.zeros((V, I.padded_dim(D)), np.uint8), *np.zeros((3, V)))
            I.int8_table(table, kind, *t)
            return t
    head = A.ArgmaxHead(Model(), rows, screen)
    head.prepare()
    return head


def full_logits(x, table, kind):
    out = np.zeros((x.shape[0], table.shape[0]), np.float32)
    embedding.lm_head(x, table, kind, embedding.lm_head_scratch(numba.config.NUMBA_NUM_THREADS, x.shape[1]), out)
    return out


def test_the_bound_holds_for_every_entry():
    rng = np.random.default_rng(1)
    V, D = 701, 264                                       # D: 8 columns of padding in the bf16 table
    table = f16_table(V, D, rng)
    x = (rng.standard_normal((9, D)) * 10.0 ** rng.integers(-3, 3, (9, 1))).astype(np.float32)
    head = head_of(table, embedding.F16, 9)
    exact = full_logits(x, table, embedding.F16)
    xb, xr = np.zeros((9, L.padded_dim(D)), np.uint16), np.zeros((9, L.padded_dim(D)), np.float32)
    L.round_rows(x, xb, xr)
    approx = np.zeros_like(exact)
    L.lm_head_bf16(xb, xr, head.bf16, head.scratch, approx)
    w = table.view(np.float16).astype(np.float64)
    assert np.all(head.wnorm >= np.linalg.norm(w, axis=1))
    eps = L.argmax_bound(D) * np.linalg.norm(x.astype(np.float64), axis=1)[:, None] * head.wnorm[None, :]
    gap = np.abs(approx.astype(np.float64) - exact)
    assert np.all(gap <= eps) and gap.max() > 0          # the bf16 logits do differ, within the bound
    assert 0.01 < (gap / eps).max() < 1                   # and the bound is not vacuous


@pytest.mark.parametrize("screen", A.SCREENS)
@pytest.mark.parametrize("kind", [embedding.F16, embedding.F32])
def test_argmax_and_candidates_are_the_float32_lm_heads(kind, screen):
    rng = np.random.default_rng(2)
    V, D = A.MAX_CANDIDATES[screen] + 179, 256
    table = f16_table(V, D, rng)
    if kind == embedding.F32:
        table = table.view(np.float16).astype(np.float32)
    x = rng.standard_normal((40, D)).astype(np.float32)
    w = table.view(np.float16).astype(np.float32) if kind == embedding.F16 else table
    x[0] = w[3] * 40                                      # rows whose maximum is the tie 3 / 7 ...
    x[1] = w[5] * 40 + w[11] * 40                         # ... or the near tie 5 / 11
    x[2] = 0                                              # every logit 0: the first index, through the fallback
    x[3, 5] = np.nan                                      # a NaN row: the whole float32 row
    exact = full_logits(x, table, kind)
    head = head_of(table, kind, 40, screen)
    got = np.full_like(exact, 7.0)
    head(x, got)
    assert np.array_equal(np.argmax(got, 1), np.argmax(exact, 1))
    assert np.argmax(got[0]) == 3 and exact[0, 3] == exact[0, 7] and np.isfinite(got[0, 7])
    assert set(np.flatnonzero(np.isfinite(got[1]))) >= {5, 11}
    finite = np.isfinite(got)
    np.testing.assert_array_equal(got[finite], exact[finite])          # candidates: the float32 bits
    narrowed_rows = [0, 1] + list(range(4, 40))
    assert np.all(got[narrowed_rows][~finite[narrowed_rows]] == -np.inf)
    np.testing.assert_array_equal(got[2], exact[2])                    # V candidates > MAX_CANDIDATES: full row
    np.testing.assert_array_equal(got[3], exact[3])                    # NaN: full row (NaN included)
    assert head.full_rows == 2 and head.rows == 40
    narrowed = finite[4:].sum(1)
    assert narrowed.max() < V // 5 and head.candidates == int(finite[narrowed_rows].sum())
    # a row's result does not depend on the rows beside it
    alone = np.zeros((1, V), np.float32)
    head(x[20:21], alone)
    np.testing.assert_array_equal(alone[0], got[20])


@pytest.mark.parametrize("screen", A.SCREENS)
def test_masks_restrict_the_argmax_to_their_tokens(screen):
    """A row's bitmask (as a grammar gives it): the argmax of the allowed tokens' float32 logits, candidates among
    them only; a mask of one token, of none (every entry -inf, as the sampler's mask makes it) and of all."""
    rng = np.random.default_rng(4)
    V, D = 1000, 128
    table = f16_table(V, D, rng)
    x = rng.standard_normal((6, D)).astype(np.float32)
    exact = full_logits(x, table, embedding.F16)
    allowed = rng.random((6, V)) < 0.1
    allowed[1] = False
    allowed[1, 777] = True
    allowed[2] = False
    allowed[3] = True
    allowed[4, np.argmax(exact[4])] = False               # the unmasked winner excluded
    words = np.packbits(np.pad(allowed, ((0, 0), (0, 24))), axis=1, bitorder="little").view(np.int32)
    head = head_of(table, embedding.F16, 6, screen)
    got = np.zeros_like(exact)
    head(x, got, [words[0], words[1], words[2], words[3], words[4], None])
    for r in range(6):
        want = np.where(allowed[r], exact[r], -np.inf) if r < 5 else exact[r]
        finite = np.isfinite(got[r])
        assert np.all(allowed[r][finite]) if r < 5 else True
        if r == 2:
            assert not finite.any()
            continue
        assert np.argmax(got[r]) == np.argmax(want)
        np.testing.assert_array_equal(got[r][finite], exact[r][finite])
    assert np.flatnonzero(np.isfinite(got[1])).tolist() == [777]
    again = np.zeros_like(exact)
    head(x, again)                                         # no masks: every token again
    assert np.argmax(again[0]) == np.argmax(exact[0])


@pytest.mark.parametrize("screen", A.SCREENS)
def test_top_k_rows_hold_the_k_best_float32_logits(screen):
    """ks[r] = k: every token among the k largest float32 logits is a candidate, with its float32 value, so the
    sampler's top-k (ties at the k-th to the lowest ids) keeps the same tokens with the same logits; with a mask,
    the k best allowed ones."""
    rng = np.random.default_rng(5)
    V, D = 1500, 128
    table = f16_table(V, D, rng)
    x = rng.standard_normal((7, D)).astype(np.float32)
    w = table.view(np.float16).astype(np.float32)
    x[0] = w[3] * 30 + w[5] * 30                          # exact ties (rows 3 / 7) near the top
    exact = full_logits(x, table, embedding.F16)
    head = head_of(table, embedding.F16, 7, screen)
    ks = [40, 2, 256, 5, 1, 40, 3]
    allowed = np.ones((7, V), bool)
    allowed[5] = rng.random(V) < 0.2
    allowed[6] = False
    allowed[6, [10, 20]] = True                           # fewer allowed than k: both, and no others
    words = np.packbits(np.pad(allowed, ((0, 0), (0, 4))), axis=1, bitorder="little").view(np.int32)
    got = np.zeros_like(exact)
    head(x, got, [None, None, None, None, None, words[5], words[6]], ks)
    for r, k in enumerate(ks):
        want = np.where(allowed[r], exact[r], -np.inf)
        order = np.lexsort((np.arange(V), -want))[:k]      # value descending, ties by ascending id
        order = order[np.isfinite(want[order])]
        finite = np.isfinite(got[r])
        assert set(order) <= set(np.flatnonzero(finite)) and np.all(allowed[r][finite])
        np.testing.assert_array_equal(got[r][finite], exact[r][finite])
        assert np.array_equal(np.lexsort((np.arange(V), -got[r]))[:len(order)], order)
    assert np.flatnonzero(np.isfinite(got[6])).tolist() == [10, 20]
    assert head.full_rows == 0


def test_entries_and_candidates_check_their_inputs():
    x = np.zeros((2, 16), np.float32)
    table = np.zeros((5, 16), np.uint16)
    out = np.zeros((2, 5), np.float32)
    rows, cols = np.array([0, 1]), np.array([4, 5])
    with pytest.raises(ValueError, match="outside"):
        embedding.lm_head_entries(x, table, embedding.F16, rows, cols, out)
    with pytest.raises(ValueError, match="int64"):
        embedding.lm_head_entries(x, table, embedding.F16, rows.astype(np.int32), cols.astype(np.int32), out)
    with pytest.raises(ValueError, match="SIMD"):
        embedding.lm_head_entries(x, table, embedding.F16, rows, cols - 1, out, kernel="portable")
    ks, best, cand, counts = np.ones(2, np.int64), np.zeros((2, 4)), np.zeros((2, 3), np.int64), np.zeros(2, np.int64)
    xs, norms, words = np.zeros(2), np.zeros(5), np.full((2, 1), -1, np.int32)

    def search(approx=out, wscale=norms[:0], E=norms, W=norms, allowed=words, k=ks):
        argmax_screen.argmax_candidates(approx, xs, wscale, xs, E, xs, W, cand, counts, allowed, k, best, out)
    search()
    search(approx=out.view(np.int32), wscale=norms)
    for bad in (dict(W=np.zeros(4)), dict(E=np.zeros(4)), dict(wscale=np.zeros(3)), dict(approx=out.astype(np.int64)),
                dict(allowed=np.full((2, 2), -1, np.int32)), dict(k=np.array([1, 5]))):
        with pytest.raises(ValueError, match="argmax_candidates"):
            search(**bad)


@pytest.fixture(scope="module")
def model():
    return bitnet_batch.load_model(REF / "tiny-i2s-b158.gguf")


@pytest.mark.parametrize("screen", A.SCREENS)
def test_engine_argmax_rows(model, screen):
    """want "argmax": the candidates' logits are those of want True, the rest -inf, the argmax the same; cached
    decode steps too; "off" has no argmax lm_head."""
    ids = np.array(json.loads((REF / "tiny-i2s-b158.json").read_text())["sequences"]["s2_len40"]["ids"], np.int32)
    eng = Engine(model, EngineConfig(max_batch=3, max_seq_len=64, prefill_chunk=32, block_size=8,
                                     argmax_head=screen))
    assert eng.argmax_head.screen == screen and eng.argmax_head.file_rows is not None    # rows read from the file
    assert Engine(model, EngineConfig(max_batch=3, argmax_head="off")).argmax_head is None
    slot = eng.kv.allocate()
    full = eng.all_logits(slot, ids)
    eng.kv.free(slot)
    a, b, c = eng.kv.allocate(), eng.kv.allocate(), eng.kv.allocate()
    got = eng.step([(a, ids[:10], 0, "argmax"), (b, ids[:6], 0, True), (c, ids[:8], 0, "argmax")])
    np.testing.assert_array_equal(got[1], full[5])
    for row, want in ((got[0], full[9]), (got[2], full[7])):
        finite = np.isfinite(row)
        assert np.argmax(row) == np.argmax(want) and 0 < finite.sum() < len(row)
        np.testing.assert_array_equal(row[finite], want[finite])
    for p in range(10, 30):
        got = eng.step([(a, ids[p:p + 1], p, "argmax"), (c, ids[p - 2:p - 1], p - 2, "argmax")])
        assert np.argmax(got[0]) == np.argmax(full[p]) and np.argmax(got[1]) == np.argmax(full[p - 2])
        finite = np.isfinite(got[0])
        np.testing.assert_array_equal(got[0][finite], full[p][finite])


def test_which_screen_an_engine_takes(model, monkeypatch):
    """"auto": int8 where vpdpbusd runs and the table is large enough to pay, whatever the streams; "on" int8 on any
    SIMD family; a screen by name for any engine; none for "off" or with the opt-in bf16 lm_head."""
    def screen(setting, batch, **kw):
        head = Engine(model, EngineConfig(max_batch=batch, max_seq_len=16, argmax_head=setting, **kw)).argmax_head
        return None if head is None else head.screen
    assert model.weights.output.size < A.AUTO_MIN_ENTRIES and screen("auto", 4) is None     # a tiny table
    monkeypatch.setattr(A, "AUTO_MIN_ENTRIES", model.weights.output.size)
    auto = "int8" if I.has_fast_path() else None
    assert screen("auto", 1) == screen("auto", 4) == auto
    assert (screen("on", 1), screen("on", 4), screen("int8", 4), screen("bf16", 1)) == ("int8", "int8", "int8", "bf16")
    assert screen("off", 1) is screen("off", 4) is screen("on", 4, lm_head_dtype="bf16") is None


def test_one_stream_decode_through_the_int8_screen(model):
    """A one-stream engine (the int8 screen under "on" / "auto"): greedy decode by argmax rows gives the tokens of
    the float32 lm_head's logits, step after step, and the candidates' logits bit for bit."""
    ids = np.array(json.loads((REF / "tiny-i2s-b158.json").read_text())["sequences"]["s2_len40"]["ids"], np.int32)
    eng = Engine(model, EngineConfig(max_batch=1, max_seq_len=64, prefill_chunk=16, argmax_head="on"))
    ref = Engine(model, EngineConfig(max_batch=1, max_seq_len=64, prefill_chunk=16, argmax_head="off"))
    assert eng.argmax_head.screen == "int8" and ref.argmax_head is None
    a, b = eng.kv.allocate(), ref.kv.allocate()
    tok_a = np.argmax(eng.step([(a, ids[:12], 0, "argmax")])[0])
    tok_b = np.argmax(ref.step([(b, ids[:12], 0, "argmax")])[0])
    for p in range(12, 40):
        assert tok_a == tok_b
        got, want = eng.step([(a, np.array([tok_a], np.int32), p, "argmax")])[0], \
            ref.step([(b, np.array([tok_b], np.int32), p, "argmax")])[0]
        finite = np.isfinite(got)
        assert 0 < finite.sum() < len(got)
        np.testing.assert_array_equal(got[finite], want[finite])
        tok_a, tok_b = np.argmax(got), np.argmax(want)
    assert eng.argmax_head.rows == 29 and eng.argmax_head.full_rows == 0


def test_greedy_jobs_write_the_same_records_with_it_and_without(tmp_path, small_model_path, small_model):
    """The argmax lm_head in a job: greedy records, bit for bit the float32 lm_head's, whatever the batch; a job
    that samples, or one with penalties, does not build it (nor does a score job)."""
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": i, "prompt": f"KING {'HENRY' if i % 2 else 'LEAR'}. {i}"}
                                              for i in range(10)]
                      + [{"id": "hot", "prompt": "ROMEO.", "temperature": 0.9}])   # a record that samples
    texts = {}
    for setting, batch in (("off", 4), ("on", 4), ("on", 3), ("on", 1), ("bf16", 4)):
        job = JobConfig(inputs=(str(src),), output=str(tmp_path / f"{setting}{batch}.jsonl"),
                        model=str(small_model_path), sampling=SamplingParams(max_tokens=24),
                        engine=EngineConfig(max_batch=batch, prefill_chunk=32, argmax_head=setting))
        summary = run_job(job, model=small_model, quiet=True)
        texts[setting, batch] = [(r["id"], r["text"]) for r in read_jsonl(tmp_path / f"{setting}{batch}.jsonl")]
        head = summary["argmax_head"]
        assert (head["rows"] > 0 and head["candidates_per_row"] >= 1) if setting != "off" else head["rows"] == 0
    assert texts["off", 4] == texts["on", 4] == texts["on", 3] == texts["on", 1] == texts["bf16", 4]
    base = dict(inputs=("x.jsonl",), output=str(tmp_path / "y.jsonl"), model="m", engine=EngineConfig(max_batch=4))
    assert RunKind.engine_config(JobConfig(**base)).argmax_head == "auto"
    assert RunKind.engine_config(JobConfig(**base, sampling=SamplingParams(temperature=0.7))).argmax_head == "off"
    assert RunKind.engine_config(JobConfig(**base, sampling=SamplingParams(repetition_penalty=1.1))
                                 ).argmax_head == "off"
    assert RunKind.engine_config(JobConfig(**base, sampling=SamplingParams(logprobs=2))).argmax_head == "off"
    assert RunKind.engine_config(JobConfig(**base, constraint=regex_constraint("[a-z]+"))).argmax_head == "auto"
    assert ScoreKind.engine_config(ScoreJobConfig(**base)).argmax_head == "off"
    forced = EngineConfig(max_batch=4, argmax_head="on")
    assert RunKind.engine_config(JobConfig(**dict(base, engine=forced), sampling=SamplingParams(temperature=0.7))
                                 ).argmax_head == "on"


def test_ignore_eos_rows_take_it_with_the_end_ids_left_out(tmp_path):
    """Greedy and top-k rows with ``ignore_eos`` (the sampler bans the end-of-generation ids) take the argmax
    lm_head with those ids out of its mask, alone or beside a constraint's: the same records as without it. The
    shipped model never ends a text by itself, so "," (its most frequent token) is made an end id too."""
    path = Path(__file__).parents[1] / "examples" / "models" / "shakespeare-b158-i2s.gguf"
    model = bitnet_batch.load_model(path)
    comma = model.tokenizer.encode(",")
    assert len(comma) == 1
    model.tokenizer.eog_ids = model.tokenizer.eog_ids | set(comma)
    rows = [{"id": i, "prompt": f"{'HAMLET' if i % 2 else 'KING LEAR'}. {i}"} for i in range(6)]
    rows += [{"id": "re", "prompt": "Say a word.", "regex": "[a-z ]{3,40}"},
             {"id": "topk", "prompt": "ROMEO.", "temperature": 0.8, "top_k": 20, "seed": 3}]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    records, heads = {}, {}
    for setting, ignore in (("off", True), ("on", True), ("on", False)):
        name = f"{setting}{ignore}"
        job = JobConfig(inputs=(str(src),), output=str(tmp_path / f"{name}.jsonl"), model=str(path),
                        sampling=SamplingParams(max_tokens=60, ignore_eos=ignore),
                        engine=EngineConfig(max_batch=4, prefill_chunk=32, argmax_head=setting))
        heads[name] = run_job(job, model=model, quiet=True)["argmax_head"]
        records[name] = [(r["id"], r["text"], r["finish_reason"]) for r in read_jsonl(tmp_path / f"{name}.jsonl")]
    assert records["onTrue"] == records["offTrue"]
    assert heads["onTrue"]["rows"] >= 7 * 59 and heads["offTrue"]["rows"] == 0       # "re" may end sooner
    assert all(r[2] == "length" for r in records["onTrue"] if r[0] != "re")
    assert any(r[2] == "stop" for r in records["onFalse"])      # without it, some records end on their own
    base = dict(inputs=("x.jsonl",), output=str(tmp_path / "y.jsonl"), model="m", engine=EngineConfig(max_batch=4))
    assert RunKind.engine_config(JobConfig(**base, sampling=SamplingParams(ignore_eos=True))).argmax_head == "auto"


def test_constrained_greedy_jobs_write_the_same_records_with_it_and_without(tmp_path, small_model_path,
                                                                            small_model):
    """A greedy job under a JSON schema (masks computed before the step, kept for the sampler) and a record with a
    regex of its own: the same records with the argmax lm_head and without."""
    from bitnet_batch.sampling.constraints import job_constraint

    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                               "age": {"type": "integer"}}, "required": ["name", "age"]}
    rows = [{"id": i, "prompt": f"Who is {'HAMLET' if i % 2 else 'LEAR'}? {i}"} for i in range(7)]
    rows.append({"id": "re", "prompt": "Say a word.", "regex": "[a-z]{3,8}"})
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    records = {}
    for setting in ("off", "on", "bf16"):
        job = JobConfig(inputs=(str(src),), output=str(tmp_path / f"{setting}.jsonl"), model=str(small_model_path),
                        sampling=SamplingParams(max_tokens=40), constraint=job_constraint(json_schema=schema),
                        engine=EngineConfig(max_batch=4, prefill_chunk=64, argmax_head=setting))
        summary = run_job(job, model=small_model, quiet=True)
        records[setting] = [{k: r[k] for k in ("id", "text", "parsed", "finish_reason")}
                            for r in read_jsonl(tmp_path / f"{setting}.jsonl")]
        assert (summary["argmax_head"]["rows"] > 0) == (setting != "off")
    assert records["on"] == records["off"] == records["bf16"]
    assert sum(r["parsed"] is not None for r in records["on"]) >= 1


def test_top_k_sampling_jobs_write_the_same_records_with_it_and_without(tmp_path, small_model_path, small_model):
    """Seeded top-k sampling (temperature, top-p, min-p after it) through the argmax lm_head's top-k rows ("on"):
    the same records; a record with penalties takes the float32 lm_head; once top-k rows needed too many
    candidates a row, they stop taking it."""
    rows = [{"id": i, "prompt": f"KING {'HENRY' if i % 2 else 'LEAR'}. {i}"} for i in range(9)]
    rows.append({"id": "pen", "prompt": "ROMEO.", "repetition_penalty": 1.2})
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    texts = {}
    for setting in ("off", "on", "bf16"):
        job = JobConfig(inputs=(str(src),), output=str(tmp_path / f"{setting}.jsonl"), model=str(small_model_path),
                        sampling=SamplingParams(max_tokens=30, temperature=0.9, top_k=20, top_p=0.95, min_p=0.02),
                        seed=11, engine=EngineConfig(max_batch=4, prefill_chunk=32, argmax_head=setting))
        summary = run_job(job, model=small_model, quiet=True)
        texts[setting] = [(r["id"], r["text"]) for r in read_jsonl(tmp_path / f"{setting}.jsonl")]
        assert (summary["argmax_head"]["rows"] > 0) == (setting != "off")
    assert texts["on"] == texts["off"] == texts["bf16"]
    judged_at_the_limit(A.ArgmaxHead(small_model, 4), "top_k_pays", "top_k_rows", "top_k_cost", A.TRIAL,
                        A.PAYING_CANDIDATES)
    base = dict(inputs=("x.jsonl",), output=str(tmp_path / "y.jsonl"), model="m", engine=EngineConfig(max_batch=4))
    assert RunKind.engine_config(JobConfig(**base, sampling=SamplingParams(temperature=0.8, top_k=40))
                                 ).argmax_head == "auto"
    assert RunKind.engine_config(JobConfig(**base, sampling=SamplingParams(temperature=0.8, top_p=0.9))
                                 ).argmax_head == "off"
    assert SamplingParams(temperature=0.8, top_k=300).top_k_only == 0 and SamplingParams(top_k=5).top_k_only == 0


@pytest.mark.parametrize("sampling", [SamplingParams(max_tokens=20),
                                      SamplingParams(max_tokens=20, temperature=0.8, top_k=10, seed=4)],
                         ids=["greedy", "top_k"])
def test_auto_stops_screening_when_rows_cannot_be_narrowed(tmp_path, small_model_path, small_model, monkeypatch,
                                                           sampling):
    """Under "auto", once argmax (or top-k) rows cost more than PAYING_CANDIDATES a row over TRIAL rows (here every
    row takes the whole float32 lm_head), the job's next such rows get the float32 lm_head: the same records, fewer
    screened rows."""
    from jit_kernels import embedding

    if not embedding.simd_table(small_model.weights.output):
        pytest.skip("the argmax lm_head needs a SIMD kernel family")
    monkeypatch.setattr(A, "AUTO_MIN_ENTRIES", 0)
    monkeypatch.setattr(A.lm_head_int8, "has_fast_path", lambda kernel=None: True)
    monkeypatch.setattr(A, "TRIAL", 6)
    rows = [{"id": i, "prompt": f"KING {'HENRY' if i % 2 else 'LEAR'}. {i}"} for i in range(4)]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    records, heads = {}, {}
    for setting, cap in (("off", None), ("auto", None), ("auto-full", 0)):
        if cap is not None:
            monkeypatch.setattr(A, "MAX_CANDIDATES", {s: cap for s in A.SCREENS})
        job = JobConfig(inputs=(str(src),), output=str(tmp_path / f"{setting}.jsonl"), model=str(small_model_path),
                        sampling=sampling, seed=5,
                        engine=EngineConfig(max_batch=2, prefill_chunk=32, argmax_head=setting.split("-")[0]))
        heads[setting] = run_job(job, model=small_model, quiet=True)["argmax_head"]
        records[setting] = [(r["id"], r["text"]) for r in read_jsonl(tmp_path / f"{setting}.jsonl")]
    assert records["auto"] == records["off"] == records["auto-full"]
    assert heads["auto"]["rows"] == 80 and heads["auto"]["full_rows"] == 0     # 4 x 20 rows, all screened
    assert 2 <= heads["auto-full"]["rows"] == heads["auto-full"]["full_rows"] <= 4    # 6 x 2048 < 2 x 8192
    judged_at_the_limit(A.ArgmaxHead(small_model, 4), "argmax_pays", "argmax_rows", "argmax_cost", A.TRIAL,
                        A.PAYING_CANDIDATES)
    # a kind that stopped paying lets the screen table go, unless another kind still pays
    head = A.ArgmaxHead(small_model, 4)
    head.prepare()
    head.argmax_rows, head.argmax_cost = A.TRIAL, A.TRIAL * A.PAYING_CANDIDATES + 1
    head.top_k_rows = 1
    assert not head.retire_if_unpaying() and head.int8 is not None
    head.top_k_rows, head.top_k_cost = A.TRIAL, A.TRIAL * A.FULL_ROW_COST
    assert head.retire_if_unpaying() and head.int8 is None and small_model._int8_lm_head is None
    assert not head.argmax_pays and not head.top_k_pays


def judged_at_the_limit(head, pays, rows, cost, trial, per_row):
    """``head.<pays>`` holds up to ``per_row`` candidates a row over ``trial`` rows or more, and not past it."""
    assert getattr(head, pays)
    for n in (1, trial, 2 * trial):
        setattr(head, rows, n)
        setattr(head, cost, max(n, trial) * per_row)
        assert getattr(head, pays)
        setattr(head, cost, max(n, trial) * per_row + 1)
        assert not getattr(head, pays)


@pytest.mark.parametrize("path", sorted(REF.glob("tiny-*.gguf")) + [REF.parent / "hf" / "tiny-master-mha",
                                                                    REF.parent / "hf" / "tiny-packed-gqa"],
                         ids=lambda p: p.name)
@pytest.mark.parametrize("screen", A.SCREENS)
def test_every_table_kind_and_file(path, screen):
    """F32, F16 and BF16 tables (GGUF and safetensors mappings, rows read from either file): argmax rows give the
    float32 lm_head's argmax and, at the candidates, its logits."""
    model = bitnet_batch.load_model(path)
    eng = Engine(model, EngineConfig(max_batch=4, max_seq_len=64, prefill_chunk=64, argmax_head=screen))
    assert eng.argmax_head.file_rows is not None
    ref = Engine(model, EngineConfig(max_batch=4, max_seq_len=64, prefill_chunk=64, argmax_head="off"))
    rng = np.random.default_rng(3)
    ids = [rng.integers(0, model.config.n_vocab, 12).astype(np.int32) for _ in range(4)]
    for engine in (eng, ref):
        slots = [engine.kv.allocate() for _ in ids]
        engine.outs = [x.copy() for x in engine.step([(s, t, 0, "argmax") for s, t in zip(slots, ids)])]
    for got, want in zip(eng.outs, ref.outs):
        finite = np.isfinite(got)
        assert np.argmax(got) == np.argmax(want) and finite.sum() < len(got)
        np.testing.assert_array_equal(got[finite], want[finite])


@pytest.mark.parametrize("cap", [None, 0])
def test_rows_from_the_file_a_few_at_a_time(model, monkeypatch, cap):
    """Candidate rows read ROWS_AT_ONCE distinct ones at a time, and the whole rows of those the screen cannot
    narrow (over ``cap`` candidates: every row here) read in spans of as many: the float32 lm_head's logits."""
    monkeypatch.setattr(A, "ROWS_AT_ONCE", 5)
    if cap is not None:
        monkeypatch.setattr(A, "MAX_CANDIDATES", {s: cap for s in A.SCREENS})
    rng = np.random.default_rng(6)
    ids = [rng.integers(0, model.config.n_vocab, 9).astype(np.int32) for _ in range(3)]
    outs = {}
    for setting in ("int8", "off"):
        eng = Engine(model, EngineConfig(max_batch=3, max_seq_len=32, prefill_chunk=32, argmax_head=setting))
        slots = [eng.kv.allocate() for _ in ids]
        outs[setting] = [x.copy() for x in eng.step([(s, t, 0, "argmax") for s, t in zip(slots, ids)])]
    for got, want in zip(outs["int8"], outs["off"]):
        finite = np.isfinite(got)
        assert np.argmax(got) == np.argmax(want) and finite.all() == (cap is not None)
        np.testing.assert_array_equal(got[finite], want[finite])
    if cap is None:                                       # more distinct candidate rows than one read holds
        assert len(set().union(*(np.flatnonzero(np.isfinite(o)) for o in outs["int8"]))) > 5


AVX2_CHILD = """
import json, sys, numpy as np
import bitnet_batch
from bitnet_batch.config import EngineConfig
from bitnet_batch.engine.engine import Engine
from jit_kernels import _cpu
engine = Engine(bitnet_batch.load_model(sys.argv[1]), EngineConfig(max_batch=2, max_seq_len=32, argmax_head="on"))
slot = engine.kv.allocate()
out = engine.step([(slot, np.arange(1, 9, dtype=np.int32), 0, "argmax")])[0]
print(json.dumps({"kernel": _cpu.KERNEL, "argmax": int(np.argmax(out)), "screen": engine.argmax_head.screen}))
"""


def test_a_cpu_without_avx512_runs_the_int8_screen(small_model_path, tmp_path):
    """A child that sees this host without AVX-512 (an AVX2 CPU such as Zen 3) compiles and runs a greedy step
    through the int8 screen: the AVX-512 tiles must not even be compiled there (LLVM cannot select ``vpdpbusd``
    and aborts the process), and the token is this process's."""
    import os
    import subprocess
    import sys
    from numba.core.codegen import get_host_cpu_features

    from jit_kernels import _cpu

    if not _cpu.HAS_AVX2:
        pytest.skip("no AVX2 on this CPU")
    feats = ",".join(f"-{f[1:]}" if f[1:].startswith(("avx512", "amx")) else f
                     for f in get_host_cpu_features().split(","))
    env = dict(os.environ, NUMBA_CPU_NAME="haswell", NUMBA_CPU_FEATURES=feats, NUMBA_CACHE_DIR=str(tmp_path))
    env.pop(_cpu.KERNEL_ENV, None)
    res = subprocess.run([sys.executable, "-c", AVX2_CHILD, str(small_model_path)], capture_output=True, text=True,
                         timeout=600, env=env)
    assert res.returncode == 0 and "Fatal Python error" not in res.stderr, res.stderr[-3000:]
    child = json.loads(res.stdout.splitlines()[-1])
    engine = Engine(bitnet_batch.load_model(small_model_path), EngineConfig(max_batch=2, max_seq_len=32,
                                                                           argmax_head="off"))
    want = engine.step([(engine.kv.allocate(), np.arange(1, 9, dtype=np.int32), 0, True)])[0]
    assert child == {"kernel": "avx2", "argmax": int(np.argmax(want)), "screen": "int8"}
