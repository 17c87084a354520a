"""Structured output: constraint specs, the grammar mask against a brute-force reference, completions, and whole
jobs on the tiny random model (noise unless constrained) under a JSON schema, a regex and a choice."""
import json
import re

import jsonschema
import numpy as np
import pytest
from click.testing import CliRunner

from bitnet_batch.cli import main
from bitnet_batch.completion import Completion
from bitnet_batch.engine.engine import EngineConfig
from bitnet_batch.errors import ConfigError, InputError
from bitnet_batch.jobs.run import JobConfig, run_job
from bitnet_batch.sampling.chain import make_sampler
from bitnet_batch.sampling.constraints import (MaskBatch, choice_constraint, constraint_from_fields,
                                               job_constraint, load_json_arg,
                                               regex_constraint, request_constraint, response_format_constraint)
from bitnet_batch.sampling.params import SamplingParams
from bitnet_batch.sampling.steps import as_allowed_mask
from conftest import read_jsonl, write_jsonl

SCHEMA = {                     # required string / integer / boolean / enum, a nested object, a bounded array
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "ok": {"type": "boolean"},
        "hue": {"enum": ["red", "green", "blue"]},
        "home": {"type": "object", "additionalProperties": False, "required": ["city", "zip"],
                 "properties": {"city": {"type": "string", "maxLength": 5},
                                "zip": {"type": "integer", "minimum": 10000, "maximum": 99999}}},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 3}, "maxItems": 2},
    },
    "required": ["name", "age", "ok", "hue", "home", "tags"],
    "additionalProperties": False,
}
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
REGEX = r"[a-z]{2,5}-[0-9]{2,3}( [A-Z][a-z]{0,3})?"
CHOICES = ["apple", "banana split", "cherry", "kiwi"]


def job(tmp_path, src, model_path, out="out.jsonl", **kw):
    return JobConfig(inputs=(str(src),), output=str(tmp_path / out), model=str(model_path),
                     sampling=kw.pop("sampling", SamplingParams(temperature=1.0, max_tokens=200)),
                     engine=kw.pop("engine", EngineConfig(max_batch=32, prefill_chunk=256)), **kw)


def items(n, **extra):
    return [{"id": f"q{i}", "prompt": f"record {i}: " + "abc xyz "[: 2 + i % 7], **extra} for i in range(n)]


# ------------------------------------------------------------------------------------------------ specs

def test_specs_from_the_openai_shapes():
    spec = response_format_constraint(RESPONSE_FORMAT)
    assert spec.kind == "json" and spec.describe() == {"response_format": RESPONSE_FORMAT}
    assert spec.parse('{"a": [1, true]}') == {"a": [1, True]}
    obj = response_format_constraint({"type": "json_object"})
    assert obj.kind == "json" and obj.describe() == {"response_format": {"type": "json_object"}}
    assert response_format_constraint({"type": "text"}) is None
    assert regex_constraint("[0-9]+").parse("12") == "12"
    assert choice_constraint(["a", "b", "a"]).source == ["a", "b"]          # de-duplicated, order kept
    assert constraint_from_fields({"prompt": "x"}) == (False, None)
    assert constraint_from_fields({"response_format": {"type": "text"}}) == (True, None)
    given, spec = constraint_from_fields({"choice": ["x", "y"]})
    assert given and spec.kind == "choice"
    default = regex_constraint("[a-z]")
    assert request_constraint({}, default) is default                     # the job default applies
    assert request_constraint({"response_format": {"type": "text"}}, default) is None   # ... unless turned off


@pytest.mark.parametrize("fields, needle", [
    ({"response_format": {"type": "xml"}}, "response_format.type must be one of text, json_object, json_schema"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema must be an object with a 'schema'"),
    ({"response_format": {"type": "json_object", "schema": {}}}, "unexpected key 'schema'"),
    ({"response_format": "json"}, "response_format must be an object"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "integer", "minimum": 5,
                                                                            "maximum": 3}}}},
     "response_format.json_schema.schema: JSON schema is not valid: Unsatisfiable schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "wat"}}}},
     "JSON schema is not valid: Invalid type: wat"),
    ({"regex": "[a-"}, "regex: regular expression is not valid"),
    ({"regex": ""}, "regex must be a non-empty string"),
    ({"choice": []}, "choice must be a non-empty list of strings"),
    ({"choice": ["a", 3]}, "choice[1] must be a non-empty string, got 3"),
    ({"regex": "a", "choice": ["a"]}, "choice: give only one of response_format, regex, choice"),
])
def test_bad_constraints_name_the_field(fields, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        constraint_from_fields(fields)
    with pytest.raises(InputError) as info:
        request_constraint(fields, None, location="in.jsonl:7")
    assert str(info.value).startswith("in.jsonl:7: ") and info.value.field == list(fields)[-1]
    assert needle in str(info.value)


def test_job_level_options(tmp_path):
    assert job_constraint() is None
    assert job_constraint(choice=("a", "b")).source == ["a", "b"]
    assert job_constraint(json_schema=SCHEMA).describe() == {"response_format": {"type": "json_schema",
                                                                                 "json_schema": {"schema": SCHEMA}}}
    with pytest.raises(ConfigError, match="give only one of --response-format, --json-schema, --regex, --choice"):
        job_constraint(regex="a", choice=("a",))
    path = tmp_path / "rf.json"
    path.write_text(json.dumps(RESPONSE_FORMAT))
    assert load_json_arg(str(path), "--response-format") == RESPONSE_FORMAT
    assert load_json_arg('{"type": "json_object"}', "--response-format") == {"type": "json_object"}
    with pytest.raises(ConfigError, match="--response-format: 'nope.json' is neither inline JSON nor a readable"):
        load_json_arg("nope.json", "--response-format")
    with pytest.raises(ConfigError, match="--json-schema: inline value is not valid JSON"):
        load_json_arg("{bad", "--json-schema")


# ------------------------------------------------------------------------------------------ the mask

def _matches_prefix(pattern: re.Pattern, text: str) -> bool:
    """Brute force: can ``text`` be continued into a full match? (tries every completion up to 4 chars)."""
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789- "
    frontier = {text}
    for _ in range(5):
        if any(pattern.fullmatch(t) for t in frontier):
            return True
        frontier = {t + c for t in frontier for c in alphabet} if len(frontier) < 2000 else set()
    return False


def test_mask_matches_a_brute_force_reference(tok, compiler):
    """Allowed tokens at each step == tokens whose bytes keep the output a prefix of a match (checked for every
    token of the vocabulary); EOG only where the output is a complete match."""
    pattern = re.compile(r"[a-c]{1,3}-[0-9]")
    c = compiler.make(regex_constraint(pattern.pattern))
    vocab = tok.vocab_bytes()
    so_far = ""
    for step_text in ["a", "b", "-", "7"]:
        allowed = as_allowed_mask(c.allowed_tokens(), tok.vocab_size)
        expect = np.zeros(tok.vocab_size, bool)
        for i, raw in enumerate(vocab):
            if tok.is_control(i):
                expect[i] = i in tok.eog_ids and bool(pattern.fullmatch(so_far))
                continue
            try:
                piece = raw.decode("utf-8")
            except UnicodeDecodeError:
                continue
            expect[i] = bool(piece) and _matches_prefix(pattern, so_far + piece)
        assert np.array_equal(allowed, expect), (so_far, np.flatnonzero(allowed ^ expect)[:10])
        token = tok.encode(step_text)[0]
        c.accept(token)
        so_far += step_text
    assert c.finished and c.accepting
    allowed = as_allowed_mask(c.allowed_tokens(), tok.vocab_size)
    assert set(np.flatnonzero(allowed)) == set(tok.eog_ids)              # only end-of-generation is left
    c.reset()
    assert not c.accepting and not as_allowed_mask(c.allowed_tokens(), tok.vocab_size)[sorted(tok.eog_ids)].any()


def test_mask_is_applied_by_the_sampler_chain(tok, compiler):
    """The disallowed token with the largest logit is never chosen; grammar state advances with accept."""
    c = compiler.make(choice_constraint(["cherry", "kiwi"]))
    sampler = make_sampler(SamplingParams(temperature=0.0), 0, tok.vocab_size, tok.eog_ids, constraint=c)
    logits = np.zeros(tok.vocab_size, np.float32)
    logits[tok.encode("z")[0]] = 50.0                                   # not allowed anywhere
    logits[tok.encode("k")[0]] = 5.0
    out = []
    while not c.finished:
        t = sampler.sample(logits)
        sampler.accept(t)
        out.append(t)
    assert tok.decode(out) == "kiwi"
    sampler.reset()                                                     # back to the grammar's start
    assert sampler.sample(logits) == tok.encode("k")[0]


def test_mask_batch_equals_masks_computed_one_by_one(tok, compiler):
    """The runner computes a step's masks together on llguidance's threads: same bits as one at a time."""
    specs = [regex_constraint(REGEX), choice_constraint(CHOICES), response_format_constraint(RESPONSE_FORMAT),
             response_format_constraint({"type": "json_object"})]
    prefixes = ["ab-1", "ban", '{"name": "x', '{"k": [1, ']
    constraints = []
    for spec, prefix in zip(specs * 2, prefixes + [""] * 4):
        c = compiler.make(spec)
        for t in tok.encode(prefix):
            c.accept(t)
        constraints.append(c)
    alone = [c.allowed_tokens().copy() for c in constraints]
    batch = MaskBatch(tok.vocab_size, threads=2)
    batch.fill(constraints)
    together = [c.allowed_tokens().copy() for c in constraints]
    assert all(np.array_equal(a, b) for a, b in zip(alone, together))
    assert len({a.tobytes() for a in alone}) == 7        # eight states; both JSON starts allow only "{"
    assert all(c._pre is None for c in constraints)                    # each precomputed mask used once


def test_completion_stops_when_the_grammar_is_complete(tok, compiler):
    params = SamplingParams(temperature=0.0, max_tokens=50)
    comp = Completion(tok, params, 0, [1, 2], 50, constraint=compiler.make(regex_constraint("ab[0-9]{2}")))
    logits = np.zeros(tok.vocab_size, np.float32)
    while not comp.done:
        comp.push(logits)
    assert comp.finish_reason == "stop" and comp.text == "ab00"
    assert comp.structured() == {"parsed": "ab00", "incomplete": False}
    assert not set(comp.tokens) & tok.eog_ids                       # stopped by the grammar, no EOG sampled
    cut = Completion(tok, params, 0, [1, 2], 2, constraint=compiler.make(regex_constraint("ab[0-9]{2}")))
    while not cut.done:
        cut.push(logits)
    assert cut.finish_reason == "length" and cut.structured() == {"parsed": None, "incomplete": True}
    stopped = Completion(tok, SamplingParams(temperature=0.0, stop=("b",)), 0, [1], 50,
                         constraint=compiler.make(regex_constraint("ab[0-9]{2}")))
    while not stopped.done:
        stopped.push(logits)
    assert stopped.finish_reason == "stop" and stopped.text == "a"       # a stop string cut the match short
    assert stopped.structured() == {"parsed": None, "incomplete": True}
    plain = Completion(tok, params, 0, [1], 3)
    assert plain.structured() == {}


def test_eog_only_where_the_grammar_accepts(tok, compiler):
    """An open-ended regex: EOG is masked until the output matches, then allowed (and ends the output)."""
    c = compiler.make(regex_constraint("[a-z]{3,}"))
    eog = sorted(tok.eog_ids)
    for ch in "abc":
        assert not as_allowed_mask(c.allowed_tokens(), tok.vocab_size)[eog].any()
        c.accept(tok.encode(ch)[0])
    assert as_allowed_mask(c.allowed_tokens(), tok.vocab_size)[eog].all() and not c.finished
    c.accept(eog[0])
    assert c.finished


# -------------------------------------------------------------------------------------------- jobs

def test_json_schema_job_every_record_validates(tmp_path, small_model_path, small_model):
    """100 items under the schema with a generous max_tokens: every record is complete and validates."""
    src = write_jsonl(tmp_path / "in.jsonl", items(100))
    summary = run_job(job(tmp_path, src, small_model_path, constraint=job_constraint(response_format=RESPONSE_FORMAT)),
                      model=small_model, quiet=True)
    recs = read_jsonl(tmp_path / "out.jsonl")
    assert len(recs) == 100 and summary["structured"] == {"records": 100, "incomplete": 0}
    validator = jsonschema.Draft202012Validator(SCHEMA)
    for r in recs:
        assert r["finish_reason"] == "stop" and r["incomplete"] is False, r
        assert r["parsed"] == json.loads(r["text"])
        validator.validate(r["parsed"])
    assert len({r["text"] for r in recs}) > 90                       # really sampled, not one fixed object
    assert summary["parameters"]["constraint"] == {"response_format": RESPONSE_FORMAT}


def test_cut_outputs_are_length_and_incomplete(tmp_path, small_model_path, small_model):
    """Small per-item max_tokens: each record validates or is finish_reason length + incomplete; the job goes
    on through per-item constraint errors."""
    recs_in = [dict(r, max_tokens=85 + 2 * i) for i, r in enumerate(items(20))]
    recs_in += [{"id": "bad-schema", "prompt": "x", "response_format": {"type": "json_schema",
                                                                       "json_schema": {"schema": {"type": "nope"}}}},
                {"id": "bad-regex", "prompt": "x", "regex": "(unclosed"},
                {"id": "two", "prompt": "x", "regex": "a", "choice": ["a"]}]
    src = write_jsonl(tmp_path / "in.jsonl", recs_in)
    summary = run_job(job(tmp_path, src, small_model_path, constraint=job_constraint(json_schema=SCHEMA)),
                      model=small_model, quiet=True)
    recs = {r["id"]: r for r in read_jsonl(tmp_path / "out.jsonl")}
    validator = jsonschema.Draft202012Validator(SCHEMA)
    n_cut = 0
    for i in range(20):
        r = recs[f"q{i}"]
        if r["finish_reason"] == "length":
            n_cut += 1
            assert r["incomplete"] is True and r["parsed"] is None
            assert r["usage"]["completion_tokens"] == 85 + 2 * i
        else:
            assert r["finish_reason"] == "stop" and r["incomplete"] is False
            validator.validate(json.loads(r["text"]))
    assert 3 <= n_cut <= 17 and summary["structured"]["incomplete"] == n_cut
    for rid, field, needle in [("bad-schema", "response_format", "Invalid type: nope"),
                               ("bad-regex", "regex", "regular expression is not valid"),
                               ("two", "choice", "give only one of")]:
        err = recs[rid]["error"]
        assert recs[rid]["finish_reason"] == "error" and err["type"] == "InputError"
        assert f"in.jsonl:{21 + ['bad-schema', 'bad-regex', 'two'].index(rid)}: {field}" in err["message"]
        assert needle in err["message"]
    assert summary["items"]["error"] == 3


def test_regex_and_choice_jobs(tmp_path, small_model_path, small_model):
    src = write_jsonl(tmp_path / "in.jsonl", items(100))
    run_job(job(tmp_path, src, small_model_path, out="re.jsonl", constraint=job_constraint(regex=REGEX)),
            model=small_model, quiet=True)
    recs = read_jsonl(tmp_path / "re.jsonl")
    assert len(recs) == 100
    for r in recs:
        assert r["finish_reason"] == "stop" and re.fullmatch(REGEX, r["text"]) and r["parsed"] == r["text"], r
    assert len({r["text"] for r in recs}) > 50
    run_job(job(tmp_path, src, small_model_path, out="ch.jsonl", constraint=job_constraint(choice=CHOICES)),
            model=small_model, quiet=True)
    recs = read_jsonl(tmp_path / "ch.jsonl")
    assert all(r["text"] in CHOICES and r["parsed"] == r["text"] and r["finish_reason"] == "stop" for r in recs)
    assert len({r["text"] for r in recs}) >= 3                        # temperature 1: several options drawn


def test_constrained_outputs_do_not_depend_on_batch_size(tmp_path, small_model_path, small_model):
    """Per-item constraints of all three kinds (and an unconstrained item) in one job: max_batch 1 vs 8 give
    identical records."""
    kinds = [{"response_format": {"type": "json_object"}, "max_tokens": 40}, {"regex": REGEX},
             {"choice": CHOICES}, {"response_format": RESPONSE_FORMAT}, {"max_tokens": 12}]
    recs_in = [dict(r, **kinds[i % len(kinds)]) for i, r in enumerate(items(20))]
    src = write_jsonl(tmp_path / "in.jsonl", recs_in)
    outs = []
    for mb in (1, 8):
        run_job(job(tmp_path, src, small_model_path, out=f"o{mb}.jsonl",
                    sampling=SamplingParams(temperature=0.8, top_p=0.95, max_tokens=200),
                    engine=EngineConfig(max_batch=mb, prefill_chunk=16 if mb == 1 else 64)),
                model=small_model, quiet=True)
        outs.append([(r["id"], r["text"], r.get("parsed"), r.get("incomplete"), r["finish_reason"])
                     for r in read_jsonl(tmp_path / f"o{mb}.jsonl")])
    assert outs[0] == outs[1]
    by_kind = {i % len(kinds): o for i, o in enumerate(outs[0])}
    assert by_kind[4][3] is None                                     # unconstrained: no parsed/incomplete fields
    assert isinstance(by_kind[0][2], dict) or by_kind[0][3] is True  # json_object: an object or cut short


def test_cli_constraint_options(tmp_path, small_model_path):
    src = write_jsonl(tmp_path / "in.jsonl", items(3))
    schema_file = tmp_path / "schema.json"
    schema_file.write_text(json.dumps({"type": "object", "properties": {"ok": {"type": "boolean"}},
                                       "required": ["ok"], "additionalProperties": False}))
    base = ["run", str(src), "-m", str(small_model_path), "-q", "--max-batch", "4"]
    res = CliRunner().invoke(main, base + ["-o", str(tmp_path / "a.jsonl"), "--json-schema", str(schema_file)])
    assert res.exit_code == 0, res.output
    assert all(r["parsed"] in ({"ok": True}, {"ok": False}) for r in read_jsonl(tmp_path / "a.jsonl"))
    res = CliRunner().invoke(main, base + ["-o", str(tmp_path / "b.jsonl"), "--choice", "yes", "--choice", "no"])
    assert res.exit_code == 0 and all(r["text"] in ("yes", "no") for r in read_jsonl(tmp_path / "b.jsonl"))
    res = CliRunner().invoke(main, base + ["-o", str(tmp_path / "c.jsonl"), "--regex", "x", "--choice", "y"])
    assert res.exit_code == 1 and "give only one of" in res.output
    res = CliRunner().invoke(main, base + ["-o", str(tmp_path / "d.jsonl"), "--response-format", '{"type": "yaml"}'])
    assert res.exit_code == 1 and "response_format.type must be one of" in res.output
