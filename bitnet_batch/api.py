"""Jobs on records held in memory: ``run``, ``score`` and ``embed`` (the verbs' names) return the records a
`bitnet-batch run`, `score` or `embed` job would write, without input or output files.

Each takes a list of records (dicts with the fields of a JSONL input line, or plain strings for the main text
field) and the job's options as the job configuration's own fields (``sampling=SamplingParams(...)``,
``engine=EngineConfig(...)``, ``seed``, ``system``, ...: ``jobs.run.JobConfig``, ``jobs.score.ScoreJobConfig``,
``jobs.embed.EmbedJobConfig``). The items go through the same job loop as a file job (continuous batching, prefix
caching, per-item seeds, error records for unusable records), so a record here equals the one the file job writes
for the same input line, timing aside. Records come back in input order (``n`` samples of one input: by
``sample_index``). There is no journal and no resume: a job in memory is one call.
"""
from __future__ import annotations

from typing import Iterable

from .errors import ConfigError
from .io.readers import IdRegistry, location, parse_record

RECORDS = "records"        # the input's name in error records: records[i]


def run(records: Iterable, model, **options) -> list[dict]:
    """Completions of ``records`` (``prompt`` or ``messages`` per record, or strings: prompts; per-record sampling
    overrides and constraints as in a JSONL input) with ``model`` (a path, repo id or loaded ``Model``);
    ``options``: ``jobs.run.JobConfig`` fields. Returns the job's records."""
    from .jobs.run import JobConfig, RunKind

    return _run(RunKind, JobConfig, records, model, options, lambda job: job.prompt_field)


def score(records: Iterable, model, **options) -> list[dict]:
    """Log-likelihoods of ``records`` (``text``, or ``prompt`` + ``completion``; strings: texts); ``options``:
    ``jobs.score.ScoreJobConfig`` fields."""
    from .jobs.score import ScoreJobConfig, ScoreKind

    return _run(ScoreKind, ScoreJobConfig, records, model, options, lambda job: job.fields.text)


def embed(records: Iterable, model, **options) -> list[dict]:
    """Embedding vectors of ``records`` (``text`` and an optional ``instruction``; strings: texts); ``options``:
    ``jobs.embed.EmbedJobConfig`` fields."""
    from .jobs.embed import EmbedJobConfig, EmbedKind

    return _run(EmbedKind, EmbedJobConfig, records, model, options, lambda job: job.fields.text)


def _run(kind_class, config_class, records, model, options: dict, text_field) -> list[dict]:
    from .jobs.loop import CollectSink, run_loop
    from .model.model import Model, load_model

    for name in ("inputs", "output", "output_format", "input_format", "ordered", "overwrite"):
        if name in options:
            raise ConfigError(f"{name!r} is not an option of a job in memory (records in, records out)")
    loaded = isinstance(model, Model)
    job = config_class(inputs=(RECORDS,), output=RECORDS, model=str(model.path) if loaded else str(model),
                       **options)
    if getattr(job, "template", None) is not None:
        raise ConfigError("a prompt template builds requests from files: render the prompts into the records")
    if not loaded:
        model = load_model(job.model, filename=job.model_file, ffn_act=job.ffn_act)
    items = list(parse_records(records, kind_class.record_spec(job), text_field(job)))
    engine = kind_class.engine_for(model, kind_class.engine_config(job))
    sink = CollectSink()
    kind = kind_class(job, model, engine, sink)
    kind_class.warm_up(engine)
    kind.prepare()
    run_loop(kind, engine, items)
    return sorted(sink.records, key=lambda r: (r["index"], r.get("sample_index") or 0))


def parse_records(records: Iterable, spec, text_field: str):
    """Each record (a dict, or a string taken as the value of ``text_field``) as ``spec``'s item or a
    ``BadRecord`` located at ``records[i]``, with a file job's checks (ids unique, fields typed)."""
    ids = IdRegistry([(RECORDS, RECORDS)])
    for i, raw in enumerate(records):
        record = {text_field: raw} if isinstance(raw, str) else raw
        yield parse_record(record, i, location(RECORDS, RECORDS, i), spec, ids, 0, i)
