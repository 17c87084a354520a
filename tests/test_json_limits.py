"""Output that always finishes: JsonLimits bounds what a JSON schema leaves open (number literals through a
lexical grammar checked beside the schema's, strings and arrays by maxLength / maxItems), configurable per job
(--json-limits, [constraint] json_limits), part of the fingerprint only when not the default."""
import json
import re

import jsonschema
import numpy as np
import pytest
from click.testing import CliRunner

from bitnet_batch.cli import main
from bitnet_batch.engine.engine import EngineConfig
from bitnet_batch.errors import ConfigError
from bitnet_batch.pipeline import load_pipeline
from bitnet_batch.jobs.run import JobConfig, run_job
from bitnet_batch.sampling.constraints import (DEFAULT_LIMITS, JsonLimits, job_constraint,
                                               json_schema_constraint, request_constraint)
from bitnet_batch.sampling.params import SamplingParams
from bitnet_batch.sampling.steps import as_allowed_mask
from conftest import read_jsonl, write_jsonl

NUMBERS = {                     # the issue's schema shape: numbers and integers with no bound at all
    "type": "object",
    "properties": {"lat": {"type": "number"}, "lon": {"type": "number"}, "n": {"type": "integer"},
                   "xs": {"type": "array", "items": {"type": "number"}, "maxItems": 3}},
    "required": ["lat", "lon", "n", "xs"],
    "additionalProperties": False,
}
OPEN = {                        # a string and arrays with no bound: the documented defaults bound them
    "type": "object",
    "properties": {"lat": {"type": "number"}, "name": {"type": "string"},
                   "flags": {"type": "array", "items": {"type": "boolean"}},
                   "hues": {"type": "array", "items": {"enum": ["red", "blue"]}}},
    "required": ["lat", "name", "flags", "hues"],
    "additionalProperties": False,
}
NUMBER_LITERAL = re.compile(r'(?<![\w".])-?(\d+)(?:\.(\d+))?(?:[eE][+-]?(\d+))?')


def job(tmp_path, model_path, schema, n=30, out="out.jsonl", max_tokens=200, **kw):
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": f"q{i}", "prompt": f"point {i}:"} for i in range(n)])
    return JobConfig(inputs=(str(src),), output=str(tmp_path / out), model=str(model_path),
                     sampling=SamplingParams(temperature=1.0, max_tokens=max_tokens),
                     engine=kw.pop("engine", EngineConfig(max_batch=16, prefill_chunk=256)),
                     constraint=job_constraint(json_schema=schema), **kw)


def check_numbers(text: str, digits: int, exponent: int) -> None:
    """Every number literal of ``text`` (outside strings) has <= digits before its exponent, <= exponent in it."""
    stripped = re.sub(r'"(?:[^"\\]|\\.)*"', '""', text)
    for m in NUMBER_LITERAL.finditer(stripped):
        whole, frac, exp = m.groups()
        assert len(whole) + len(frac or "") <= digits and len(exp or "") <= exponent, (m.group(0), text)


# ------------------------------------------------------------------------------------------- the setting

def test_limits_parse_validate_and_describe():
    assert JsonLimits() == DEFAULT_LIMITS == JsonLimits(digits=17, exponent=3, string=256, items=32)
    assert JsonLimits.parse("digits=20, string=1000") == JsonLimits(digits=20, string=1000)
    assert JsonLimits.parse({"items": 0}) == JsonLimits(items=0)
    assert JsonLimits.parse("none") == JsonLimits.none() == JsonLimits(0, 0, 0, 0)
    assert JsonLimits.parse("") == JsonLimits()
    assert JsonLimits().describe() == {"digits": 17, "exponent": 3, "string": 256, "items": 32}
    for bad, needle in [("digits=x", "json limit digits must be an integer >= 0 and <= 100 (0: no bound), got 'x'"),
                        ("digits=101", "got 101"), ("digits", "KEY=N pairs separated by commas"),
                        ("width=3", "unknown json limit 'width' (known: digits, exponent, string, items)"),
                        ({"string": -1}, "string must be an integer >= 0 (0: no bound), got -1"), (3, "got 3")]:
        with pytest.raises(ConfigError, match=re.escape(needle)):
            JsonLimits.parse(bad)


def test_fingerprint_keeps_default_jobs_and_changes_with_the_limits(small_model_path):
    """A default job's fingerprint has no new key (older partial outputs stay resumable); another setting adds
    one, so resume refuses it. The job's constraint is rebuilt with the job's limits."""
    kw = dict(inputs=("x.jsonl",), output="o.jsonl", model=str(small_model_path),
              constraint=job_constraint(json_schema=NUMBERS))
    default = JobConfig(**kw)
    assert "json_limits" not in default.fingerprint("sha") and default.constraint.limits == DEFAULT_LIMITS
    wider = JobConfig(**kw, json_limits=JsonLimits(digits=30))
    assert wider.fingerprint("sha")["json_limits"] == {**DEFAULT_LIMITS.describe(), "digits": 30}
    assert wider.constraint.limits == JsonLimits(digits=30) and wider.constraint.bound != default.constraint.bound
    assert wider.fingerprint("sha")["constraint"] == default.fingerprint("sha")["constraint"]   # as given
    assert JobConfig(**kw, json_limits=JsonLimits.none()).constraint.bound is None


def test_strings_and_arrays_get_the_default_bounds_where_the_schema_sets_none():
    schema = {"type": "object", "$defs": {"tag": {"type": "string"}},
              "properties": {"a": {"type": "string"}, "b": {"type": ["string", "null"], "minLength": 300},
                             "c": {"type": "string", "maxLength": 5}, "d": {"type": "string", "pattern": "^x+$"},
                             "e": {"type": "string", "enum": ["x"]}, "f": {"anyOf": [{"type": "array"}, {"const": 1}]},
                             "g": {"type": "array", "prefixItems": [{"type": "string"}], "items": False},
                             "h": {"type": "array", "items": {"$ref": "#/$defs/tag"}, "minItems": 40}}}
    out = JsonLimits().bound_schema(schema)
    props = out["properties"]
    assert out["$defs"]["tag"]["maxLength"] == 256 and props["a"]["maxLength"] == 256
    assert props["b"]["maxLength"] == 300                                  # never below the schema's own minimum
    assert props["c"]["maxLength"] == 5 and "maxLength" not in props["d"] and "maxLength" not in props["e"]
    assert props["f"]["anyOf"][0]["maxItems"] == 32 and props["g"]["prefixItems"][0]["maxLength"] == 256
    assert "maxItems" not in props["g"] and props["h"]["maxItems"] == 40
    assert "maxLength" not in schema["properties"]["a"]                   # the given schema is not modified
    assert JsonLimits(string=0, items=0).bound_schema(schema) is schema
    # a bounded schema that cannot compile (another branch needs longer strings) is used as given
    spec = json_schema_constraint({"allOf": [{"type": "string"}, {"minLength": 300}]})
    assert spec.kind == "json" and spec.bound is not None


# --------------------------------------------------------------------------------------- the number bound

def test_the_number_bound_masks_long_literals(tok, compiler):
    """digits=3, exponent=2: after three digits only the exponent or the end may follow; after two exponent
    digits only the end; a fraction stops at the digit budget. The schema alone would allow all of it."""
    limits = JsonLimits(digits=3, exponent=2)
    spec = json_schema_constraint({"type": "array", "items": {"type": "number"}}, limits=limits)
    free = json_schema_constraint({"type": "array", "items": {"type": "number"}}, limits=JsonLimits.none())

    def allowed_after(spec, text):
        c = compiler.make(spec)
        for ch in text:
            c.accept(tok.encode(ch)[0])
        mask = as_allowed_mask(c.allowed_tokens(), tok.vocab_size)
        return {ch for ch in "0123456789.eE-+,]" if mask[tok.encode(ch)[0]]}

    assert allowed_after(spec, "[12") >= set("0123456789.eE,]")
    assert allowed_after(spec, "[123") == set("eE,]")
    assert allowed_after(spec, "[1.2") == set("0123456789eE,]")
    assert allowed_after(spec, "[1.23") == set("eE,]")
    assert allowed_after(spec, "[-0.1") == set("0123456789eE,]")          # the sign is no digit
    assert allowed_after(spec, "[1e+4") == set("0123456789,]")
    assert allowed_after(spec, "[1e+45") == set(",]")
    assert allowed_after(spec, "[123, 45") >= set("0123456789")           # each literal has its own budget
    assert allowed_after(free, "[123") >= set("0123456789.eE,]")
    assert allowed_after(free, "[1e+45") >= set("0123456789,]")


def test_a_schema_that_needs_a_longer_number_wins_over_the_bound(tok, compiler):
    """const 123456 with digits=3: the masks share no token at the fourth digit, the bound is dropped for this
    output (the schema is never broken); reset() brings the bound back."""
    c = compiler.make(json_schema_constraint({"const": 123456}, limits=JsonLimits(digits=3)))
    out = []
    while not c.finished:
        mask = as_allowed_mask(c.allowed_tokens(), tok.vocab_size)
        t = int(np.flatnonzero(mask)[0])
        c.accept(t)
        out.append(t)
    assert tok.decode(out) == "123456" and not c.bounded
    c.reset()
    assert c.bounded


# ------------------------------------------------------------------------------------------------ jobs

def test_unbounded_numbers_finish_and_validate(tmp_path, small_model_path, small_model):
    """The issue's job: a schema of unbounded numbers on the random model at temperature 1. Without limits the
    numbers run to max_tokens; with the defaults every record finishes, validates and keeps to the bound, and
    the records do not depend on the batch size."""
    free = run_job(job(tmp_path, small_model_path, NUMBERS, n=6, max_tokens=120, out="free.jsonl",
                       json_limits=JsonLimits.none()), model=small_model, quiet=True)
    assert free["structured"]["incomplete"] >= 4                      # the failure this guards against
    summary = run_job(job(tmp_path, small_model_path, NUMBERS, n=24), model=small_model, quiet=True)
    recs = read_jsonl(tmp_path / "out.jsonl")
    validator = jsonschema.Draft202012Validator(NUMBERS)
    assert len(recs) == 24 and summary["structured"] == {"records": 24, "incomplete": 0}
    for r in recs:
        assert r["finish_reason"] == "stop" and r["incomplete"] is False and r["usage"]["completion_tokens"] < 200
        validator.validate(r["parsed"])
        check_numbers(r["text"], 17, 3)
    assert summary["parameters"]["json_limits"] == DEFAULT_LIMITS.describe()
    assert len({r["text"] for r in recs}) > 20
    run_job(job(tmp_path, small_model_path, NUMBERS, n=24, out="mb3.jsonl", engine=EngineConfig(max_batch=3)),
            model=small_model, quiet=True)
    assert [r["text"] for r in read_jsonl(tmp_path / "mb3.jsonl")] == [r["text"] for r in recs]


def test_open_strings_and_arrays_finish_under_the_defaults(tmp_path, small_model_path, small_model):
    """A string and two arrays without bounds: every record finishes within max_tokens 400 and validates; the
    string and arrays keep to the default maxLength / maxItems."""
    summary = run_job(job(tmp_path, small_model_path, OPEN, n=16, max_tokens=400), model=small_model, quiet=True)
    recs = read_jsonl(tmp_path / "out.jsonl")
    validator = jsonschema.Draft202012Validator(OPEN)
    assert summary["structured"] == {"records": 16, "incomplete": 0}
    for r in recs:
        assert r["finish_reason"] == "stop" and r["incomplete"] is False
        validator.validate(r["parsed"])
        p = r["parsed"]
        assert len(p["name"]) <= 256 and len(p["flags"]) <= 32 and len(p["hues"]) <= 32
        check_numbers(r["text"], 17, 3)
    assert max(len(r["parsed"]["name"]) for r in recs) > 100              # the model really uses the room


def test_records_of_a_job_share_its_limits(tmp_path, small_model_path, small_model):
    """A record's own response_format is bounded by the job's limits too; a cut output is still length +
    incomplete."""
    rf = {"type": "json_schema", "json_schema": {"schema": NUMBERS}}
    spec = request_constraint({"response_format": rf}, None, "in.jsonl:1", JsonLimits(digits=4, exponent=1))
    assert spec.limits == JsonLimits(digits=4, exponent=1)
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": i, "prompt": f"p{i}", "response_format": rf,
                                               "max_tokens": 200 if i else 3} for i in range(8)])
    run_job(JobConfig(inputs=(str(src),), output=str(tmp_path / "o.jsonl"), model=str(small_model_path),
                      sampling=SamplingParams(temperature=1.0), json_limits=JsonLimits(digits=4, exponent=1)),
            model=small_model, quiet=True)
    recs = read_jsonl(tmp_path / "o.jsonl")
    assert recs[0]["finish_reason"] == "length" and recs[0]["incomplete"] is True and recs[0]["parsed"] is None
    for r in recs[1:]:
        assert r["finish_reason"] == "stop" and r["incomplete"] is False
        check_numbers(r["text"], 4, 1)


def test_cli_and_pipeline_options(tmp_path, small_model_path):
    """--json-limits sets the bounds (in the summary and the fingerprint: a rerun with another setting is
    refused, the same one resumes); a bad value exits 1 naming it; a pipeline's [constraint] json_limits."""
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": i, "prompt": f"p{i}"} for i in range(6)])
    schema = tmp_path / "s.json"
    schema.write_text(json.dumps(NUMBERS))
    base = ["run", str(src), "-o", str(tmp_path / "o.jsonl"), "-m", str(small_model_path), "-q", "--json-schema",
            str(schema), "--temperature", "1"]
    res = CliRunner().invoke(main, base + ["--json-limits", "digits=2,exponent=1"])
    assert res.exit_code == 0, res.output
    for r in read_jsonl(tmp_path / "o.jsonl"):
        assert r["finish_reason"] == "stop"
        check_numbers(r["text"], 2, 1)
    meta = json.loads((tmp_path / "o.jsonl.meta.json").read_text())
    assert meta["parameters"]["json_limits"] == {"digits": 2, "exponent": 1, "string": 256, "items": 32}
    res = CliRunner().invoke(main, base)
    assert res.exit_code == 1 and "different job" in res.output and "json_limits" in res.output
    assert CliRunner().invoke(main, base + ["--json-limits", "exponent=1,digits=2"]).exit_code == 0
    res = CliRunner().invoke(main, base + ["--json-limits", "digits=many"])
    assert res.exit_code == 1 and "json limit digits must be an integer" in res.output
    toml = tmp_path / "p.toml"
    toml.write_text(f'[input]\npath = "in.jsonl"\n[prompt]\ntext = "{{prompt}}"\n[model]\nname = "{small_model_path}"\n'
                    f'[constraint]\njson_schema_file = "s.json"\njson_limits = {{ digits = 5, string = 0 }}\n'
                    f'[output]\npath = "p.jsonl"\n')
    pjob = load_pipeline(toml).job()
    assert pjob.json_limits == JsonLimits(digits=5, string=0) and pjob.constraint.limits == pjob.json_limits
    assert load_pipeline(toml).job({"json_limits": JsonLimits.none()}).constraint.bound is None
    toml.write_text(toml.read_text().replace("digits = 5", "digits = -5"))
    with pytest.raises(ConfigError, match=r"p\.toml: \[constraint\] json_limits: json limit digits must be"):
        load_pipeline(toml)
