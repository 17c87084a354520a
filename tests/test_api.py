"""Jobs on records in memory (``bitnet_batch.run`` / ``score`` / ``embed``): the records a file job writes for
the same input lines (timing aside), in input order, error records for unusable entries, and the options that a job
without files refuses."""
import re
from pathlib import Path

import pytest

import bitnet_batch
from bitnet_batch.config import EngineConfig
from bitnet_batch.jobs.embed import EmbedJobConfig, embed_job
from bitnet_batch.jobs.run import JobConfig, run_job
from bitnet_batch.jobs.score import ScoreJobConfig, score_job
from bitnet_batch.sampling.params import SamplingParams
from conftest import read_jsonl, write_jsonl

EMBED_MODEL = Path(__file__).parent / "data" / "embed" / "tiny-qwen3-i2s.gguf"
WORDS = "apple river stone cloud seven orange window quiet music paper".split()


def untimed(records):
    """The records without their timing, and error messages without locations (file:line vs records[i])."""
    out = []
    for r in records:
        r = {k: v for k, v in r.items() if k != "timing"}
        if r["error"] is not None:
            r["error"] = dict(r["error"], message=re.sub(r"records\[\d+\]|\S+\.jsonl:\d+", "<where>",
                                                        r["error"]["message"]))
        out.append(r)
    return out


def file_records(tmp_path, run, config_class, records, model, **options):
    """What the file job writes for the same records (JSONL in, JSONL out)."""
    src = write_jsonl(tmp_path / "in.jsonl", records)
    out = tmp_path / "out.jsonl"
    run(config_class(inputs=(str(src),), output=str(out), model=str(model.path), **options), model=model, quiet=True)
    return read_jsonl(out)


def test_run_gives_the_file_jobs_records(tmp_path, small_model):
    records = [{"id": "a", "prompt": "the cat"}, {"id": "b", "prompt": "a dog", "max_tokens": 3, "n": 2},
               {"prompt": "no id here", "temperature": 0.0},
               {"id": "d", "messages": [{"role": "user", "content": "hi"}]},
               {"id": "e", "prompt": 7}, {"id": "a", "prompt": "duplicate id"}, {"id": "f", "max_tokens": 2}]
    options = dict(sampling=SamplingParams(max_tokens=6, temperature=0.9, top_k=20), seed=5,
                   engine=EngineConfig(max_batch=2, prefill_chunk=16, max_seq_len=128))
    got = bitnet_batch.run(records, small_model, **options)
    want = file_records(tmp_path, run_job, JobConfig, records, small_model, **options)
    assert untimed(got) == untimed(want)
    assert [(r["id"], r.get("sample_index")) for r in got] == [
        ("a", None), ("b", 0), ("b", 1), ("row-2", None), ("d", None), ("e", None), ("row-5", None), ("f", None)]
    errors = {r["id"]: r["error"]["message"] for r in got if r["error"]}
    assert errors == {"e": "records[4]: field 'prompt' must be a string, got int (7)",
                      "row-5": "records[5]: field 'id': duplicate value 'a' (first used at records[0])",
                      "f": "records[6]: missing prompt: record has neither field 'prompt' nor field 'messages'"}
    assert all(r["timing"]["total_s"] >= 0 for r in got)


def test_strings_are_prompts_and_a_path_loads_the_model(small_model_path, small_model):
    by_path = bitnet_batch.run(["the cat", "a dog"], str(small_model_path),
                                    sampling=SamplingParams(max_tokens=4))
    loaded = bitnet_batch.run([{"prompt": "the cat"}, {"prompt": "a dog"}], small_model,
                                   sampling=SamplingParams(max_tokens=4), engine=EngineConfig(max_batch=1))
    assert untimed(by_path) == untimed(loaded)
    assert [r["id"] for r in by_path] == ["row-0", "row-1"] and all(r["usage"]["completion_tokens"] == 4
                                                                      for r in by_path)


def test_score_gives_the_file_jobs_records(tmp_path, small_model):
    records = [{"id": "t", "text": "the cat sat on the mat"}, {"id": "pc", "prompt": "the cat", "completion": " sat"},
               "a plain string is a text", {"id": "bad", "text": ""}]
    got = bitnet_batch.score(records, small_model, engine=EngineConfig(max_batch=2, max_seq_len=128))
    want = file_records(tmp_path, score_job, ScoreJobConfig,
                        [r if isinstance(r, dict) else {"text": r} for r in records], small_model,
                        engine=EngineConfig(max_batch=2, max_seq_len=128))
    assert untimed(got) == untimed(want)
    assert [r["error"] is None for r in got] == [True, True, True, False]


def test_embed_gives_the_file_jobs_records(tmp_path):
    model = bitnet_batch.load_model(EMBED_MODEL)
    records = [{"id": f"t{i}", "text": " ".join(WORDS[i:i + 3 + i])} for i in range(5)]
    records[2]["instruction"] = "Find passages about fruit"
    options = dict(dimensions=16, engine=EngineConfig(max_batch=2, prefill_chunk=24, max_seq_len=128))
    got = bitnet_batch.embed(records + ["a string"], model, **options)
    want = file_records(tmp_path, embed_job, EmbedJobConfig, records + [{"text": "a string"}], model, **options)
    assert untimed(got) == untimed(want)
    assert len(got[0]["embedding"]) == 16


@pytest.mark.parametrize("option", ["inputs", "output", "overwrite", "ordered", "output_format"])
def test_file_options_are_refused(small_model, option):
    with pytest.raises(bitnet_batch.ConfigError, match=f"'{option}' is not an option of a job in memory"):
        bitnet_batch.run(["x"], small_model, **{option: "x"})


def test_no_module_of_the_package_shadows_the_functions():
    """``bitnet_batch.run`` / ``score`` / ``embed`` stay the functions once every module of the package is imported
    (importing a submodule sets an attribute of its package: a module named like a function would replace it)."""
    import importlib
    import inspect
    import pkgutil

    for info in pkgutil.iter_modules(bitnet_batch.__path__):
        if not info.ispkg:
            importlib.import_module(f"bitnet_batch.{info.name}")
    assert all(inspect.isfunction(getattr(bitnet_batch, name)) for name in ("run", "score", "embed", "load_model"))
