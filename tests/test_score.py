"""`bitnet-batch score`: log-likelihoods equal a numpy log-softmax of ``Model.logits``; records, errors, resume,
ordering, Parquet, the CLI verb."""
import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

import bitnet_batch
from bitnet_batch.cli import EXIT_ITEM_ERRORS
from bitnet_batch.cli import main as cli_main
from bitnet_batch.engine.engine import Engine, EngineConfig
from bitnet_batch.errors import ConfigError
from bitnet_batch.io.writers import OutputSink
from bitnet_batch.jobs.loop import run_loop
from bitnet_batch.jobs.score import ScoreFields, ScoreJobConfig, ScoreKind, read_score_items, score_job
from conftest import read_jsonl, write_jsonl

TEXTS = [
    "The small town sat at the edge of a wide river.",
    "Science is a way of asking questions about the world and testing the answers with care. " * 3,
    "Snow.",
    "Computers follow instructions very quickly, but they do only what they are told.",
    "In autumn the leaves on the hills turned red and gold, and the farmers worked from dawn until dark.",
]
PAIRS = [("Question: what did the children like best?\nAnswer:", " The boats from the north."),
         ("", "History is the story of people making choices.")]
# small steps: several sequences share a step, long ones are prefilled in several chunks
ENGINE = EngineConfig(max_batch=3, prefill_chunk=24, max_seq_len=96)


def log_softmax64(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    m = x.max(axis=1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=1, keepdims=True))


def reference_logprob(model, context: list[int], scored: list[int]) -> float:
    """sum of log p(token | everything before it) over ``scored`` tokens, from Model.logits in numpy."""
    ids = context + scored
    lp = log_softmax64(model.logits(ids))
    return float(sum(lp[p - 1, ids[p]] for p in range(len(context), len(ids))))


def job(tmp_path, inputs, output="out.jsonl", **kw):
    kw.setdefault("engine", ENGINE)
    return ScoreJobConfig(inputs=tuple(str(p) for p in inputs), output=str(tmp_path / output), model="unused", **kw)


def strip_timing(records):
    return [{k: v for k, v in r.items() if k != "timing"} for r in records]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("score_in")
    records = [{"id": f"t{i}", "text": t} for i, t in enumerate(TEXTS)]
    records += [{"id": f"p{i}", "prompt": p, "completion": c} for i, (p, c) in enumerate(PAIRS)]
    return write_jsonl(d / "items.jsonl", records)


@pytest.fixture(scope="module")
def scored(inputs, small_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("score_out")
    summary = score_job(job(out, [inputs]), model=small_model, quiet=True)
    return summary, read_jsonl(out / "out.jsonl"), out


def test_logprobs_equal_numpy_log_softmax_of_model_logits(scored, small_model):
    summary, records, _ = scored
    tok = small_model.tokenizer
    assert tok.add_bos
    by_id = {r["id"]: r for r in records}
    total_lp, total_n = 0.0, 0
    for i, text in enumerate(TEXTS):
        ids = tok.encode(text)
        ref = reference_logprob(small_model, [tok.bos_id], ids)          # BOS conditions the first token
        rec = by_id[f"t{i}"]
        assert rec["tokens"] == len(ids) and rec["usage"] == {"prompt_tokens": 1, "completion_tokens": len(ids),
                                                                    "cached_tokens": 0}
        assert rec["logprob"] == pytest.approx(ref, rel=1e-9, abs=1e-9)
        assert rec["mean_nll"] == pytest.approx(-ref / len(ids), rel=1e-12)
        assert rec["perplexity"] == pytest.approx(math.exp(-ref / len(ids)), rel=1e-12)
        total_lp, total_n = total_lp + ref, total_n + len(ids)
    for i, (prompt, completion) in enumerate(PAIRS):
        context, scored_ids = [tok.bos_id] + tok.encode(prompt), tok.encode(completion)
        ref = reference_logprob(small_model, context, scored_ids)
        rec = by_id[f"p{i}"]
        assert rec["tokens"] == len(scored_ids) and rec["usage"]["prompt_tokens"] == len(context)
        assert rec["logprob"] == pytest.approx(ref, rel=1e-9, abs=1e-9)
        total_lp, total_n = total_lp + ref, total_n + len(scored_ids)
    corpus = summary["corpus"]
    assert corpus["records"] == len(TEXTS) + len(PAIRS) and corpus["tokens"] == total_n
    assert corpus["perplexity"] == pytest.approx(math.exp(-total_lp / total_n), rel=1e-9)
    assert corpus["mean_nll"] == pytest.approx(-total_lp / total_n, rel=1e-9)


def test_records_are_in_input_order_with_the_record_contract(scored, inputs):
    summary, records, out = scored
    assert [r["index"] for r in records] == list(range(len(TEXTS) + len(PAIRS)))
    assert [r["id"] for r in records] == [json.loads(l)["id"] for l in inputs.read_text().splitlines()]
    for r in records:
        assert r["finish_reason"] == "scored" and r["error"] is None and r["text"] is None
        assert r["timing"]["decode_s"] == 0.0 and r["timing"]["total_s"] >= r["timing"]["prefill_s"] > 0
    meta = json.loads((out / "out.jsonl.meta.json").read_text())
    assert meta["corpus"] == summary["corpus"] and meta["task"] == "score"
    # several sequences share steps: fewer steps than running them one by one in 24-row chunks
    lengths = [r["usage"]["prompt_tokens"] + r["tokens"] for r in records]
    assert summary["steps"] < sum(-(-n // ENGINE.prefill_chunk) for n in lengths)
    assert summary["this_run"]["rows"] == sum(lengths)


def test_scores_do_not_depend_on_batching(inputs, small_model, tmp_path, scored):
    """One sequence per step with big chunks gives the same numbers as 3 sequences with 24-row chunks."""
    score_job(job(tmp_path, [inputs], engine=EngineConfig(max_batch=1, prefill_chunk=96, max_seq_len=96)),
              model=small_model, quiet=True)
    alone = read_jsonl(tmp_path / "out.jsonl")
    for a, b in zip(alone, scored[1]):
        assert a["id"] == b["id"] and a["logprob"] == b["logprob"]                 # bit-identical


def test_token_logprobs_sum_to_the_record_logprob(inputs, small_model, tmp_path):
    score_job(job(tmp_path, [inputs], token_logprobs=True), model=small_model, quiet=True)
    tok = small_model.tokenizer
    for r in read_jsonl(tmp_path / "out.jsonl"):
        entries = r["logprobs"]
        assert len(entries) == r["tokens"]
        assert sum(e["logprob"] for e in entries) == pytest.approx(r["logprob"], rel=1e-12)
        assert all(e["logprob"] <= 0 and e["token"] == tok.decode([e["token_id"]]) for e in entries)
    first = read_jsonl(tmp_path / "out.jsonl")[0]
    assert [e["token_id"] for e in first["logprobs"]] == tok.encode(TEXTS[0])


def test_bad_records_become_error_records_and_the_job_goes_on(tmp_path, small_model):
    src = write_jsonl(tmp_path / "bad.jsonl", [
        {"id": "ok", "text": "A good line."},
        "{not json",
        {"id": "empty", "text": ""},
        {"id": "none", "body": "a text under another name"},
        {"id": "both", "text": "x", "completion": "y"},
        {"id": "num", "text": 42},
        {"id": "long", "text": "river " * 200},
        {"id": "ok", "text": "duplicate id"},
        {"id": "nocomp", "prompt": "only a prompt"},
        {"id": "emptycomp", "prompt": "p", "completion": ""},
        '["a list"]',
        {"id": "last", "text": "The last good line."},
    ])
    summary = score_job(job(tmp_path, [src]), model=small_model, quiet=True)
    recs = {r["index"]: r for r in read_jsonl(tmp_path / "out.jsonl")}
    assert len(recs) == 12 and [recs[i]["finish_reason"] == "scored" for i in range(12)] == \
        [True] + [False] * 10 + [True]
    msg = {i: recs[i]["error"]["message"] for i in range(1, 11)}
    assert msg[1].startswith(f"{src}:2: invalid JSON") and recs[1]["id"] == "row-1"
    assert msg[2] == f"{src}:3: field 'text' is empty: there is nothing to score"
    assert msg[3] == (f"{src}:4: missing text: record has neither field 'text' nor field 'completion' (its string "
                      f"fields: 'body'; see --text-field)")
    assert msg[4].startswith(f"{src}:5: record has both field 'text' and field 'completion'")
    assert msg[5] == f"{src}:6: field 'text' must be a string, got int (42)"
    assert recs[6]["error"]["type"] == "ContextOverflowError" and msg[6].startswith(f"{src}:7: ")
    assert "exceed the context of 96" in msg[6]
    assert msg[7].startswith(f"{src}:8: field 'id': duplicate value 'ok' (first used at {src}:1)")
    assert recs[7]["id"] == "row-7"
    assert msg[8].startswith(f"{src}:9: missing text") and "needs 'completion'" in msg[8]
    assert msg[9] == f"{src}:10: field 'completion' is empty: there is nothing to score"
    assert msg[10].startswith(f"{src}:11: record must be a JSON object, got list")
    assert summary["items"] == {"total": 12, "ok": 2, "error": 10, "skipped_resume": 0, "errors_in_output": 10}
    assert summary["corpus"]["records"] == 2
    assert summary["corpus"]["tokens"] == recs[0]["tokens"] + recs[11]["tokens"]


def test_without_bos_the_first_token_is_context_only(tmp_path, small_model_path):
    model = bitnet_batch.load_model(small_model_path)
    model.tokenizer.add_bos = False
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": 1, "text": TEXTS[0]}, {"id": 2, "text": "a"},
                                               {"id": 3, "prompt": "", "completion": TEXTS[3]}])
    score_job(job(tmp_path, [src]), model=model, quiet=True)
    r1, r2, r3 = read_jsonl(tmp_path / "out.jsonl")
    ids = model.tokenizer.encode(TEXTS[0])
    assert r1["tokens"] == len(ids) - 1 and r1["usage"]["prompt_tokens"] == 1
    assert r1["logprob"] == pytest.approx(reference_logprob(model, ids[:1], ids[1:]), rel=1e-9)
    assert r2["finish_reason"] == "error" and "nothing to score" in r2["error"]["message"]
    assert r3["tokens"] == len(model.tokenizer.encode(TEXTS[3])) - 1


class _Crash(Exception):
    pass


class _CrashAfter:
    """A progress bar that kills the job after n records (a crash between two records)."""

    def __init__(self, n):
        self.n = n

    def update(self, k):
        self.n -= k
        if self.n <= 0:
            raise _Crash()


def test_resume_after_a_crash_gives_the_uninterrupted_output(inputs, small_model, tmp_path, scored):
    cfg = job(tmp_path, [inputs])
    sink = OutputSink(cfg.output, fingerprint=cfg.fingerprint(small_model.sha256()))
    engine = Engine(small_model, ENGINE, logit_rows=ENGINE.prefill_chunk)
    kind = ScoreKind(cfg, small_model, engine, sink)
    kind.emit.progress = _CrashAfter(3)
    with pytest.raises(_Crash):
        run_loop(kind, engine, kind.items())
    sink.close()
    assert len(read_jsonl(tmp_path / "out.jsonl.partial.jsonl")) == 3
    summary = score_job(cfg, model=small_model, quiet=True)
    assert summary["items"]["skipped_resume"] == 3 and summary["items"]["ok"] == len(TEXTS) + len(PAIRS) - 3
    assert strip_timing(read_jsonl(tmp_path / "out.jsonl")) == strip_timing(scored[1])
    assert summary["corpus"] == scored[0]["corpus"]            # earlier run's records count in the corpus
    # a different job on the same output is refused
    with pytest.raises(ConfigError, match="token_logprobs"):
        score_job(job(tmp_path, [inputs], token_logprobs=True), model=small_model, quiet=True)


def test_unordered_output_has_every_record(inputs, small_model, tmp_path, scored):
    score_job(job(tmp_path, [inputs], ordered=False), model=small_model, quiet=True)
    records = read_jsonl(tmp_path / "out.jsonl")
    assert sorted(strip_timing(records), key=lambda r: r["index"]) == strip_timing(scored[1])


def test_parquet_in_and_out(tmp_path, small_model, scored):
    table = pa.table({"id": [f"t{i}" for i in range(len(TEXTS))], "body": TEXTS})
    pq.write_table(table, tmp_path / "in.parquet", row_group_size=2)
    summary = score_job(job(tmp_path, [tmp_path / "in.parquet"], output="out.parquet",
                            fields=ScoreFields(text="body")), model=small_model, quiet=True)
    rows = pq.read_table(tmp_path / "out.parquet").to_pylist()
    want = {r["id"]: r for r in scored[1]}
    assert [r["id"] for r in rows] == [f"t{i}" for i in range(len(TEXTS))]
    for r in rows:          # extra record keys are JSON text columns in our Parquet output
        assert json.loads(r["logprob"]) == pytest.approx(want[r["id"]]["logprob"], rel=1e-12)
        assert json.loads(r["tokens"]) == want[r["id"]]["tokens"]
    assert summary["corpus"]["records"] == len(TEXTS)
    n = sum(want[f"t{i}"]["tokens"] for i in range(len(TEXTS)))
    assert summary["corpus"]["tokens"] == n
    assert summary["corpus"]["logprob"] == pytest.approx(sum(want[f"t{i}"]["logprob"] for i in range(len(TEXTS))))


def test_reader_locations_in_parquet_and_field_names(tmp_path):
    pq.write_table(pa.table({"key": ["a", "b"], "ctx": ["p", None], "cont": ["c", None], "t": [None, "x"]}),
                   tmp_path / "in.parquet")
    items = list(read_score_items(tmp_path / "in.parquet",
                                  fields=ScoreFields(text="t", prompt="ctx", completion="cont", id="key")))
    assert (items[0].id, items[0].prompt, items[0].completion, items[0].text) == ("a", "p", "c", None)
    assert (items[1].id, items[1].text, items[1].location) == ("b", "x", f"{tmp_path / 'in.parquet'}:row 1")
    with pytest.raises(ConfigError, match="input file not found"):
        read_score_items(tmp_path / "missing.jsonl")


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match="output_format must be one of jsonl, parquet, got 'openai'"):
        ScoreJobConfig(inputs=("a.jsonl",), output=str(tmp_path / "o.jsonl"), model="m", output_format="openai")
    with pytest.raises(ConfigError, match="field names must differ"):
        ScoreFields(text="body", completion="body")
    with pytest.raises(ConfigError, match="id field name must be a non-empty string, got ''"):
        ScoreFields(id="")
    with pytest.raises(ConfigError, match="at least one input file"):
        ScoreJobConfig(inputs=(), output="o.jsonl", model="m")


def test_cli_score_writes_records_and_prints_the_corpus_perplexity(inputs, small_model_path, tmp_path, scored):
    out = tmp_path / "cli.jsonl"
    res = CliRunner().invoke(cli_main, ["score", str(inputs), "-o", str(out), "--model", str(small_model_path),
                                        "--max-batch", "2", "--prefill-chunk", "16", "--quiet"])
    assert res.exit_code == 0, res.output
    ppl = scored[0]["corpus"]["perplexity"]
    meta = json.loads(out.with_name("cli.jsonl.meta.json").read_text())
    assert res.output.strip() == f"corpus perplexity: {meta['corpus']['perplexity']} over " \
                                 f"{scored[0]['corpus']['tokens']} tokens"
    assert meta["corpus"]["perplexity"] == pytest.approx(ppl, rel=1e-9)
    assert [r["logprob"] for r in read_jsonl(out)] == pytest.approx([r["logprob"] for r in scored[1]], rel=1e-12)
    bad = CliRunner().invoke(cli_main, ["score", str(inputs), "-o", str(tmp_path / "x.jsonl"), "--model",
                                        str(tmp_path / "nope.gguf"), "--quiet"])
    assert bad.exit_code == 1 and "error:" in bad.output
    # --strict: an output holding error records exits 3 (for cron)
    rows = write_jsonl(tmp_path / "rows.jsonl", [{"id": "ok", "text": TEXTS[0]}, {"id": "bad", "text": 7}])
    strict = CliRunner().invoke(cli_main, ["score", str(rows), "-o", str(tmp_path / "s.jsonl"), "--model",
                                           str(small_model_path), "--quiet", "--strict"])
    assert strict.exit_code == EXIT_ITEM_ERRORS, strict.output
    assert [r.get("error") is None for r in read_jsonl(tmp_path / "s.jsonl")] == [True, False]
