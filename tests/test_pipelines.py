"""Pipelines: the shipped TOML files end to end on a test model, validation errors naming the key, prompt
templates, n samples per input with their seeds, dedupe, and resume by (id, sample_index)."""
import json
import textwrap
from pathlib import Path

import jsonschema
import pytest
from click.testing import CliRunner

from bitnet_batch.cli import main
from bitnet_batch.errors import ConfigError, InputError
from bitnet_batch.io.writers import OutputSink
from bitnet_batch.model.hub import DEFAULT_REPO
from bitnet_batch.pipeline import PromptTemplate, load_pipeline
from bitnet_batch.jobs.run import run_job, sample_seed
from bitnet_batch.sampling.params import derive_seed
from conftest import read_jsonl, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ("summarize", "classify", "extract", "synthesize_qa")


def write_pipeline(tmp_path, body: str, name="p.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


def run(pipe_path, overrides, model):
    return run_job(load_pipeline(pipe_path).job(overrides), model=model, quiet=True)


# ------------------------------------------------------------------------------------- shipped pipelines

@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_pipeline_runs_end_to_end(name, tmp_path, small_model_path, small_model):
    pipe = load_pipeline(ROOT / "pipelines" / f"{name}.toml")
    assert pipe.model == DEFAULT_REPO and pipe.name == name and pipe.description
    assert pipe.output.startswith(str(ROOT / "out")) or pipe.output.startswith("out")
    lines = [line for p in pipe.inputs for line in open(p) if line.strip()]
    assert len(lines) >= 6 and all(json.loads(line)["id"] for line in lines)
    n_inputs = 3                                 # the first 3 example records keep the 2-core test fast
    subset = tmp_path / "subset.jsonl"
    subset.write_text("".join(lines[:n_inputs]))
    out = tmp_path / "out.jsonl"
    summary = run_job(pipe.job({"model": str(small_model_path), "output": str(out), "inputs": (str(subset),)}),
                      model=small_model, quiet=True)
    recs = read_jsonl(out)
    assert summary["items"]["error"] == 0 and summary["items"]["total"] == n_inputs
    assert summary["parameters"]["pipeline"] == str(pipe.path)
    spec = pipe.constraint
    if spec is None:                                           # summarize: free text
        assert len(recs) == n_inputs and all(isinstance(r["text"], str) and r["text"] for r in recs)
    elif spec.kind == "choice":                                # classify
        assert all(r["text"] in spec.source and r["parsed"] == r["text"] for r in recs)
    else:                                                      # extract, synthesize_qa: JSON under a schema
        validator = jsonschema.Draft202012Validator(spec.source["json_schema"]["schema"])
        for r in recs:
            if r["finish_reason"] == "length":
                assert r["incomplete"] is True and r["parsed"] is None
            else:
                assert r["incomplete"] is False
                validator.validate(r["parsed"])
        assert sum(not r["incomplete"] for r in recs) >= len(recs) // 2
    if pipe.sampling.n > 1:                                           # synthesize_qa: n samples per article, deduped
        by_id = {}
        for r in recs:
            by_id.setdefault(r["id"], []).append(r["sample_index"])
        assert len(by_id) == n_inputs
        assert all(samples[0] == 0 and samples == sorted(set(samples)) for samples in by_id.values())
        assert len(recs) + summary["samples"]["dropped_duplicates"] == pipe.sampling.n * n_inputs
    else:
        assert "sample_index" not in recs[0] and len(recs) == n_inputs


def test_cli_runs_a_pipeline_from_anywhere_with_overrides(tmp_path, small_model_path, monkeypatch):
    """`run pipelines/classify.toml` from another directory (paths are relative to the file); explicit options
    override the file; `--pipeline FILE INPUT` replaces its input."""
    monkeypatch.chdir(tmp_path)
    pipe = ROOT / "pipelines" / "classify.toml"
    res = CliRunner().invoke(main, ["run", str(pipe), "-m", str(small_model_path), "-o", "a.jsonl", "-q"])
    assert res.exit_code == 0, res.output
    recs = read_jsonl(tmp_path / "a.jsonl")
    assert len(recs) == 8 and all(r["text"] in ("positive", "negative", "neutral") for r in recs)
    res = CliRunner().invoke(main, ["run", str(pipe), "-m", str(small_model_path), "-o", "b.jsonl", "-q",
                                    "--max-tokens", "2"])
    assert res.exit_code == 0, res.output
    assert all(r["finish_reason"] == "length" and r["incomplete"] and r["usage"]["completion_tokens"] == 2
               for r in read_jsonl(tmp_path / "b.jsonl"))
    own = write_jsonl(tmp_path / "mine.jsonl", [{"id": "x", "product": "pen", "review": "fine"}])
    res = CliRunner().invoke(main, ["run", "--pipeline", str(pipe), str(own), "-m", str(small_model_path),
                                    "-o", "c.jsonl", "-q", "--choice", "good", "--choice", "bad"])
    assert res.exit_code == 0, res.output
    (rec,) = read_jsonl(tmp_path / "c.jsonl")
    assert rec["id"] == "x" and rec["text"] in ("good", "bad")
    res = CliRunner().invoke(main, ["run", str(pipe), "-m", str(small_model_path), "-o", "d.jsonl", "--chat"])
    assert res.exit_code == 2 and "--chat does not apply to a pipeline" in res.output
    res = CliRunner().invoke(main, ["run", "-m", str(small_model_path), "-o", "d.jsonl"])
    assert res.exit_code == 2 and "give INPUTS" in res.output


# ------------------------------------------------------------------------------------------- validation

GOOD = """\
    [input]
    path = "in.jsonl"
    [prompt]
    user = "Say {word}"
    [output]
    path = "out.jsonl"
"""


@pytest.mark.parametrize("body, needle", [
    (GOOD + "[sampling]\ntemprature = 0.5\n", "[sampling] unknown key 'temprature' (did you mean 'temperature'?)"),
    (GOOD + "[sampling]\ntemperature = -1\n", "[sampling] temperature must be a number >= 0, got -1"),
    (GOOD + "[sampling]\nn = 0\n", "[sampling] n must be an integer in [1, 1024], got 0"),
    (GOOD + "[sampling]\ndedupe = 1\n", "[sampling] dedupe must be a boolean (true or false), got 1"),
    (GOOD + "[outptu]\npath = 'x'\n", "unknown section 'outptu' (did you mean 'output'?)"),
    (GOOD + "[engine]\nmax_batch = '8'\n", "[engine] max_batch must be an integer, got '8'"),
    (GOOD + "[engine]\nmax_batch = 0\n", "[engine] max_batch must be >= 1, got 0"),
    (GOOD + "[engine]\nlm_head_dtype = 'f16'\n", "[engine] lm_head_dtype must be one of f32, bf16, got 'f16'"),
    (GOOD.replace('path = "out.jsonl"', 'path = "o.jsonl"\nformat = "csv"'),
     "[output] format must be one of jsonl, parquet, openai, got 'csv'"),
    (GOOD + "[constraint]\nregex = 'a'\nchoice = ['a']\n", "[constraint] give only one of choice, regex"),
    (GOOD + "[constraint]\nregex = '(a'\n", "[constraint] regex: regular expression is not valid"),
    (GOOD + "[constraint]\njson_schema_file = 'nope.json'\n",
     "[constraint] json_schema_file 'nope.json' cannot be read"),
    (GOOD + "[constraint]\nresponse_format = {type = 'json_schema'}\n",
     "[constraint] response_format.json_schema must be an object with a 'schema'"),
    (GOOD.replace("in.jsonl", "data/*.jsonl"), "[input] path 'data/*.jsonl' matches no file"),
    (GOOD.replace("Say {word}", "Say {word"), "[prompt] user: unmatched '{' at character 4; write {{"),
    (GOOD.replace("Say {word}", "Say {a b}"), "[prompt] user: placeholder '{a b}' must name a field"),
    (GOOD.replace('user = "Say {word}"', 'user = "a"\ntext = "b"'), "[prompt] needs exactly one of 'user'"),
    (GOOD.replace('path = "in.jsonl"', 'path = "in.jsonl"\nfields = {x = "y"}'),
     "[input] fields maps 'x', but no template uses {x}"),
    (GOOD.replace('    [prompt]\n    user = "Say {word}"\n', ""), "missing section [prompt]"),
    (GOOD + "[sampling\n", "not valid TOML"),
])
def test_validation_errors_name_the_file_section_and_key(tmp_path, body, needle):
    write_jsonl(tmp_path / "in.jsonl", [{"word": "hi"}])
    path = write_pipeline(tmp_path, body, name="x.toml")
    with pytest.raises(ConfigError) as info:
        load_pipeline(path)
    assert str(info.value).startswith(f"{path}: ") and needle in str(info.value), str(info.value)


def test_paths_globs_schema_file_and_defaults(tmp_path):
    (tmp_path / "data").mkdir()
    for name in ("b", "a"):
        write_jsonl(tmp_path / "data" / f"{name}.jsonl", [{"word": name}])
    (tmp_path / "schema.json").write_text(json.dumps({"type": "object", "properties": {"w": {"type": "string"}}}))
    (tmp_path / "pipes").mkdir()
    path = write_pipeline(tmp_path / "pipes", """\
        [input]
        path = ["../data/*.jsonl", "../data/a.jsonl"]
        [prompt]
        text = "Say {word}"
        truncate = "left"
        [model]
        name = "../models/m.gguf"
        [sampling]
        seed = 7
        stop = ["."]
        [constraint]
        json_schema_file = "../schema.json"
        [output]
        path = "../out/x.parquet"
        ordered = false
        [engine]
        lm_head_dtype = "bf16"
    """)
    pipe = load_pipeline(path)
    assert pipe.inputs == (str(tmp_path / "data" / "a.jsonl"), str(tmp_path / "data" / "b.jsonl"))   # sorted, once
    assert pipe.model == str(tmp_path / "models" / "m.gguf") and pipe.output == str(tmp_path / "out" / "x.parquet")
    assert pipe.name == "p" and pipe.seed == 7 and pipe.sampling.stop == (".",) and pipe.truncate == "left"
    assert pipe.constraint.kind == "json" and not pipe.ordered
    job = pipe.job({"temperature": 0.5, "n": 2, "model": "other.gguf", "inputs": ("z.jsonl",)})
    assert job.sampling.temperature == 0.5 and job.sampling.stop == (".",) and job.sampling.n == 2 and job.seed == 7
    assert job.model == "other.gguf" and job.inputs == ("z.jsonl",) and job.template.text == "Say {word}"
    with pytest.raises(ConfigError, match="cannot override prompt_field"):
        pipe.job({"prompt_field": "q"})
    fp = job.fingerprint("sha")
    assert fp["n"] == 2 and fp["template"]["text"] == "Say {word}" and "response_format" in fp["constraint"]
    assert job.engine.lm_head_dtype == "bf16" and fp["lm_head_dtype"] == "bf16"


# --------------------------------------------------------------------------------------------- templates

def test_template_rendering():
    t = PromptTemplate(user="{title} by {who}: {{literal}} {tags} {n} {flag}", system="Be {tone}.",
                       fields=(("who", "meta.author"),))
    record = {"title": "T", "meta": {"author": "Ann"}, "tags": ["a", "é"], "n": 3, "flag": False, "tone": "brief"}
    prompt, messages = t.render(record)
    assert prompt is None and messages == [{"role": "system", "content": "Be brief."},
                                           {"role": "user", "content": 'T by Ann: {literal} ["a", "é"] 3 false'}]
    assert PromptTemplate(text="{a.b} {a.b.c}").render({"a.b": "dotted key", "a": {"b": {"c": 1}}}) == \
        ("dotted key 1", None)
    with pytest.raises(InputError) as info:
        t.render({"title": "T", "meta": {}, "tags": [], "n": 1, "flag": True, "tone": "x"})
    assert info.value.field == "meta.author" and "(placeholder {who})" in str(info.value)
    with pytest.raises(InputError, match="needs field 'title'"):
        t.render({"title": None, "meta": {"author": "a"}, "tone": "x"})


def test_missing_fields_become_error_records(tmp_path, small_model_path, small_model):
    write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "word": "x"}, {"id": "b", "other": 1}, "not json",
                                        {"id": "a", "word": "dup"}, {"word": "no id", "max_tokens": 1}])
    path = write_pipeline(tmp_path, GOOD + "[sampling]\nmax_tokens = 3\n")
    summary = run(path, {"model": str(small_model_path)}, small_model)
    recs = read_jsonl(tmp_path / "out.jsonl")
    assert [r["id"] for r in recs] == ["a", "b", "row-2", "row-3", "row-4"]
    errors = {r["id"]: r["error"]["message"] for r in recs if r["error"]}
    assert errors["b"].startswith(f"{tmp_path / 'in.jsonl'}:2: prompt template [prompt] user needs field 'word'")
    assert errors["row-2"].startswith(f"{tmp_path / 'in.jsonl'}:3: invalid JSON")
    assert "duplicate value 'a'" in errors["row-3"]
    assert recs[4]["usage"]["completion_tokens"] == 1                  # per-item parameters still apply
    assert summary["items"]["error"] == 3


# ------------------------------------------------------------------------------- samples, dedupe, resume

SAMPLES = GOOD + """\
[sampling]
n = 3
temperature = 1.0
max_tokens = 6
seed = 5
"""


def test_samples_have_their_own_seeds_and_sample_0_matches_n_1(tmp_path, small_model_path, small_model):
    """Sample k of id x is exactly what a single request seeded with sample_seed(derive_seed(job seed, x), k)
    generates; sample 0 keeps the request's own seed, so it equals the n = 1 output."""
    words = [{"id": f"w{i}", "word": f"word {i}"} for i in range(4)]
    write_jsonl(tmp_path / "in.jsonl", words)
    path = write_pipeline(tmp_path, SAMPLES)
    model = str(small_model_path)
    run(path, {"model": model}, small_model)
    recs = read_jsonl(tmp_path / "out.jsonl")
    assert [(r["id"], r["sample_index"]) for r in recs] == [(f"w{i}", k) for i in range(4) for k in range(3)]
    seeds = {(w["id"], k): sample_seed(derive_seed(5, w["id"]), k) for w in words for k in range(3)}
    assert len(set(seeds.values())) == 12 and all(seeds[(w["id"], 0)] == derive_seed(5, w["id"]) for w in words)
    explicit = write_jsonl(tmp_path / "seeded.jsonl", [dict(w, id=f"{w['id']}#{k}", seed=seeds[(w["id"], k)])
                                                        for w in words for k in range(3)])
    run(path, {"model": model, "n": 1, "inputs": (str(explicit),), "output": str(tmp_path / "seeded.out.jsonl")},
        small_model)
    assert [r["text"] for r in read_jsonl(tmp_path / "seeded.out.jsonl")] == [r["text"] for r in recs]
    run(path, {"model": model, "n": 1, "output": str(tmp_path / "one.jsonl")}, small_model)
    single = read_jsonl(tmp_path / "one.jsonl")
    assert "sample_index" not in single[0]
    assert [r["text"] for r in single] == [r["text"] for r in recs if r["sample_index"] == 0]


@pytest.mark.parametrize("dedupe", [False, True])
def test_resume_skips_finished_id_sample_pairs(tmp_path, small_model_path, small_model, dedupe):
    """An interrupted job (some (id, sample) records in the journal) resumes to the uninterrupted output,
    generating only what is missing (under dedupe, a partly written input is regenerated, not rewritten)."""
    write_jsonl(tmp_path / "in.jsonl", [{"id": f"w{i}", "word": f"word {i}"} for i in range(4)])
    path = write_pipeline(tmp_path, SAMPLES + f"dedupe = {str(dedupe).lower()}\n")
    model = str(small_model_path)
    run(path, {"model": model, "output": str(tmp_path / "full.jsonl")}, small_model)
    full = read_jsonl(tmp_path / "full.jsonl")
    job = load_pipeline(path).job({"model": model})
    assert len(full) >= 6                                         # dedupe drops some identical noise
    mid = len(full) // 2
    done = [full[0], full[mid], full[mid + 1], full[-1]]          # partly written inputs, out of order
    with OutputSink(job.output, fingerprint=job.fingerprint(small_model.sha256())) as sink:
        for r in done:
            sink.write(r)
    summary = run_job(job, model=small_model, quiet=True)
    resumed = read_jsonl(tmp_path / "out.jsonl")
    strip = [(r["id"], r["sample_index"], r["text"]) for r in resumed]
    assert strip == [(r["id"], r["sample_index"], r["text"]) for r in full]
    assert summary["items"]["ok"] == len(full) - len(done) and summary["items"]["skipped_resume"] == 0
    again = run_job(job, model=small_model, quiet=True)                     # complete: nothing to do
    assert again["items"]["skipped_resume"] == 4 and again["items"]["ok"] == 0


def test_dedupe_drops_identical_samples(tmp_path, small_model_path, small_model):
    """Greedy sampling gives n identical samples: dedupe keeps sample 0 only and counts the drops."""
    write_jsonl(tmp_path / "in.jsonl", [{"id": f"w{i}", "word": f"word {i}"} for i in range(3)])
    path = write_pipeline(tmp_path, SAMPLES.replace("temperature = 1.0", "temperature = 0.0"))
    run(path, {"model": str(small_model_path)}, small_model)
    plain = read_jsonl(tmp_path / "out.jsonl")
    assert len(plain) == 9 and len({(r["id"], r["text"]) for r in plain}) == 3
    summary = run(path, {"model": str(small_model_path), "dedupe": True, "output": str(tmp_path / "d.jsonl")},
                  small_model)
    kept = read_jsonl(tmp_path / "d.jsonl")
    assert [(r["id"], r["sample_index"]) for r in kept] == [("w0", 0), ("w1", 0), ("w2", 0)]
    assert summary["samples"] == {"n": 3, "dedupe": True, "dropped_duplicates": 6}
    meta = json.loads((tmp_path / "d.jsonl.meta.json").read_text())
    assert meta["samples"]["dropped_duplicates"] == 6


def test_model_paths_are_relative_to_the_pipeline_file(tmp_path):
    """A .gguf file or a checkpoint directory next to the pipeline; a hub repo id stays as it is."""
    (tmp_path / "models" / "ckpt").mkdir(parents=True)
    body = '[input]\npath = "in.jsonl"\n[prompt]\ntext = "{prompt}"\n[output]\npath = "o.jsonl"\n[model]\nname = '
    for name, want in (("models/ckpt", tmp_path / "models" / "ckpt"), ("models/m.gguf", tmp_path / "models" / "m.gguf"),
                       (DEFAULT_REPO, DEFAULT_REPO)):
        assert load_pipeline(write_pipeline(tmp_path, body + f'"{name}"\n')).model == str(want)
