"""`--engine ray`: shards read by Ray Data, one engine per actor, the local runner's records, resume and
fault tolerance. Ray jobs share one local Ray instance (4 logical CPUs: two 1-CPU engine actors plus room for
Ray Data) started once for the module; the local runner's output for the same input is the reference."""
import json
import subprocess
import sys
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from click.testing import CliRunner

from bitnet_batch.cli import main
from bitnet_batch.distributed import RayConfig, run_ray_job
from bitnet_batch.distributed.config import import_ray
from bitnet_batch.distributed.inputs import Shard, expand_inputs, parse_shards
from bitnet_batch.distributed.outputs import is_directory_output
from bitnet_batch.distributed.pool import Task
from bitnet_batch.distributed.worker import EngineWorker, raise_portable
from bitnet_batch.engine.engine import EngineConfig
from bitnet_batch.errors import BitnetBatchError, ConfigError, ModelNotFoundError
from bitnet_batch.io.readers import BadRecord, Request, read_items, read_requests
from bitnet_batch.io.writers import OutputSink
from bitnet_batch.jobs.common import meta_path
from bitnet_batch.jobs.embed import EmbedJobConfig, EmbedKind, read_embed_items
from bitnet_batch.jobs.loop import run_local
from bitnet_batch.jobs.run import JobConfig, RunKind, run_job
from bitnet_batch.jobs.score import ScoreJobConfig, ScoreKind, read_score_items
from bitnet_batch.sampling.params import SamplingParams
from conftest import read_jsonl, write_jsonl

WORDS = "apple river stone cloud seven orange window quiet music paper".split()
TWO_ACTORS = RayConfig(actors=2, threads_per_actor=1, items_per_task=16)
ON_TWO_ACTORS = ["--engine", "ray", "--actors", "2", "--threads-per-actor", "1", "--quiet"]     # the CLI's


def prompts(n):
    return [{"id": f"item-{i}", "prompt": " ".join(WORDS[(i * 7 + k) % 10] for k in range(3 + i % 9)),
             "max_tokens": 4 + i % 7} for i in range(n)]


def job(inputs, output, model, **kw):
    return JobConfig(inputs=tuple(str(p) for p in inputs), output=str(output), model=str(model),
                     sampling=SamplingParams(temperature=0.9, top_p=0.95),
                     engine=EngineConfig(max_batch=8, prefill_chunk=64), **kw)


def without_timing(records):
    """Records without what depends on how the work was spread: timings and usage.cached_tokens (each actor
    has its own prefix cache)."""
    return [{**{k: v for k, v in r.items() if k != "timing"},
             **({"usage": {k: v for k, v in r["usage"].items() if k != "cached_tokens"}} if r.get("usage") else {})}
            for r in records]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, small_model_path, small_model):
    """200 good rows around 5 bad ones, and the local runner's output for them."""
    d = tmp_path_factory.mktemp("ray_ref")
    good = prompts(200)
    lines = [json.dumps(r) for r in good[:100]]
    lines += ['{"id": "broken", "prompt": ', '[1, 2]', '{"id": "noprompt"}',
              '{"id": "neg", "prompt": "a", "max_tokens": -1}', json.dumps({"id": "long", "prompt": "apple " * 600})]
    lines += [json.dumps(r) for r in good[100:]]
    src = write_jsonl(d / "in.jsonl", lines)
    import numba

    threads = numba.get_num_threads()
    local = job([src], d / "local.jsonl", small_model_path)      # 1 thread: what one actor runs with
    t0 = time.perf_counter()
    try:
        summary = run_job(replace(local, engine=replace(local.engine, threads=1)), model=small_model, quiet=True)
    finally:
        numba.set_num_threads(threads)
    seconds = time.perf_counter() - t0
    return {"src": src, "records": read_jsonl(d / "local.jsonl"), "summary": summary, "seconds": seconds}


def crashed_output(config, model, records) -> list[dict]:
    """The journal a crashed job of ``config`` left: every third of its ``records`` (returned)."""
    sink = OutputSink(config.output, fingerprint=config.fingerprint(model.sha256()))
    journaled = records[::3]
    for record in journaled:
        sink.write(record)
    sink.close()
    return journaled


@pytest.fixture(scope="module")
def ray_session():
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


# ------------------------------------------------------------------------------------- without Ray

def test_ray_config_is_validated():
    with pytest.raises(ConfigError, match="actors must be an integer >= 0, got -1"):
        RayConfig(actors=-1)
    with pytest.raises(ConfigError, match="tasks_per_actor must be an integer >= 1, got 0"):
        RayConfig(tasks_per_actor=0)
    with pytest.raises(ConfigError, match="ray address"):
        RayConfig(address=" ")
    assert RayConfig().task_size(16) == 64 and RayConfig(items_per_task=5).task_size(16) == 5
    assert is_directory_output("out/answers/") and is_directory_output("out/answers")
    assert not is_directory_output("out/answers.parquet")


def test_missing_ray_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)       # import ray -> ImportError
    with pytest.raises(ConfigError, match=r"bitnet-batch\[ray\]"):
        import_ray()


def _as_tuples(items):
    out = []
    for it in items:
        if isinstance(it, BadRecord):
            out.append(("bad", it.index, it.id, it.location, str(it.error), it.error.field))
        else:
            out.append(("ok", it.index, it.id, it.location, it.prompt, it.messages, it.overrides))
    return out


def _parse_locally(shards, job_):
    """What the driver parses, with the shards' bytes read from disk instead of by Ray Data."""
    return list(parse_shards(((s, Path(s.uri).read_bytes()) for s in shards), shards, RunKind.record_spec(job_)))


def test_shards_parse_exactly_like_the_local_reader(tmp_path):
    a = tmp_path / "a.jsonl"
    a.write_bytes(b'\xef\xbb\xbf{"id": "x", "prompt": "hi", "temperature": 0.5}\n\n{"id": "y", "prompt": 3}\n'
                  b'not json\n{"id": "x", "prompt": "dup"}\n{"prompt": "no id"}\n{"id": "z", "prompt": "tail"}')
    pq.write_table(pa.Table.from_pylist([{"id": "p1", "prompt": "from parquet", "messages": None},
                                         {"id": "z", "prompt": "dup across files", "messages": None},
                                         {"id": "p3", "prompt": None,
                                          "messages": [{"role": "user", "content": "hey"}]}]),
                   tmp_path / "b.parquet", row_group_size=2)
    files = [a, tmp_path / "b.parquet"]
    j = job(files, tmp_path / "o.jsonl", "unused.gguf")
    shards = expand_inputs(j.inputs)
    assert [(s.name, s.fmt) for s in shards] == [(str(a), "jsonl"), (str(tmp_path / "b.parquet"), "parquet")]
    got, want = _as_tuples(_parse_locally(shards, j)), _as_tuples(read_requests(files))
    assert got == want
    assert [t[0] for t in got] == ["ok", "bad", "bad", "bad", "ok", "ok", "ok", "bad", "ok"]
    assert "a.jsonl:7" in got[7][4] and got[7][2] == "row-7"        # duplicate id names its first use
    # a directory of shards: data files only, sorted; hidden and _-prefixed names skipped
    d = tmp_path / "shards"
    (d / "sub").mkdir(parents=True)
    for name in ("part-1.jsonl", "sub/part-2.jsonl", ".hidden.jsonl", "_tmp/part-9.jsonl"):
        (d / name).parent.mkdir(exist_ok=True)
        (d / name).write_text('{"prompt": "p"}\n')
    (d / "_SUCCESS").write_text("")
    (d / "part-0.parquet").write_bytes((tmp_path / "b.parquet").read_bytes())
    assert [Path(s.name).relative_to(d).as_posix() for s in expand_inputs([d])] == \
        ["part-0.parquet", "part-1.jsonl", "sub/part-2.jsonl"]
    with pytest.raises(ConfigError, match="input file not found"):
        expand_inputs([tmp_path / "nope.jsonl"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no"):
        expand_inputs([tmp_path / "empty"])
    uri = Shard("s3://bucket/x.jsonl", "s3://bucket/x.jsonl", "jsonl")
    bad = list(parse_shards(iter([(uri, b'{"id": 1}\n')]), [uri], RunKind.record_spec(j)))
    assert bad[0].location == "s3://bucket/x.jsonl:1"                   # URIs are not folded by Path()


def test_pipeline_template_records_parse_like_its_own_reader(tmp_path, small_model_path):
    from bitnet_batch.pipeline import load_pipeline

    src = write_jsonl(tmp_path / "reviews.jsonl", [{"id": "r1", "product": "pen", "review": "fine"},
                                                    {"id": "r2", "product": "cup"}, "oops"])
    toml = tmp_path / "p.toml"
    toml.write_text(f'[input]\npath = "reviews.jsonl"\n[prompt]\nuser = "{{product}}: {{review}}"\n'
                    f'[model]\nname = "{small_model_path}"\n[output]\npath = "out.jsonl"\n')
    j = load_pipeline(toml).job()
    shards = expand_inputs(j.inputs)
    got = _as_tuples(_parse_locally(shards, j))
    assert got == _as_tuples(j.template.requests(list(j.inputs), id_field=j.id_field))
    assert [t[0] for t in got] == ["ok", "bad", "bad"] and got[0][5][-1]["content"] == "pen: fine"
    assert str(src) in got[1][3]


@pytest.fixture
def keep_numba_threads():
    """An in-process EngineWorker sets this thread's Numba thread count; later tests expect the default."""
    import numba

    before = numba.get_num_threads()
    yield
    numba.set_num_threads(before)


def test_engine_worker_runs_tasks_like_the_local_runner(tmp_path, reference, small_model_path, keep_numba_threads):
    src = reference["src"]
    j = job([src], tmp_path / "o.jsonl", small_model_path)
    worker = EngineWorker(j, threads=1, kind=RunKind)
    info = worker.info()
    assert info["threads"] == 1 and len(info["sha256"]) == 64 and info["n_vocab"] == 512
    items = [r for r in read_requests([src]) if not isinstance(r, BadRecord)][:12]
    result = worker.run_task([(r, None) for r in items])
    local = {r["id"]: r for r in reference["records"]}
    assert result["threads"] == 1
    assert sorted(without_timing(result["records"]), key=lambda r: r["index"]) == \
        without_timing([local[r.id] for r in items])
    # an n = 3 item resumed with sample 0 written: only samples 1 and 2 are generated, as the local runner does
    three = replace(items[0], overrides={**items[0].overrides, "n": 3})
    fresh = worker.run_task([(three, None)])["records"]
    resumed = worker.run_task([(three, [0])])["records"]
    assert sorted(r["sample_index"] for r in fresh) == [0, 1, 2]
    assert sorted((r["sample_index"], r["text"]) for r in resumed) == \
        sorted((r["sample_index"], r["text"]) for r in fresh if r["sample_index"] > 0)
    # a model that cannot load is reported as data, then raised as its own type by the driver
    broken = EngineWorker(replace(j, model=str(tmp_path / "nope.gguf")), threads=1, kind=RunKind)
    assert broken.info()["error"]["type"] == "ModelNotFoundError"
    assert broken.run_task([(items[0], None)])["error"]["type"] == "ModelNotFoundError"
    with pytest.raises(ModelNotFoundError, match="nope.gguf"):
        raise_portable(broken.info()["error"], "engine actor")


class _FakeRay:
    """Just enough of ``ray`` for ActorPool: calls run when their result is fetched; an actor given a task
    with a "POISON" prompt dies (as a segfault or OOM kill would), failing every call it still holds."""

    class exceptions:
        RayActorError = type("RayActorError", (Exception,), {})
        RayTaskError = type("RayTaskError", (Exception,), {})

    def __init__(self):
        self.started = 0

    def remote(self, cls):
        fake = self

        class ActorClass:
            def options(self, **kw):
                return self

            def remote(self, job, threads, kind):
                fake.started += 1
                return _FakeActor(fake, fake.started)
        return ActorClass()

    def wait(self, refs, num_returns, timeout):
        return refs[:num_returns], refs[num_returns:]

    def get(self, ref):
        return ref()

    def kill(self, actor, no_restart=True):
        actor.dead = True

    def cluster_resources(self):
        return {"CPU": 4}


class _FakeActor:
    def __init__(self, fake, pid):
        self.fake, self.pid, self.dead = fake, pid, False
        self.info = _FakeMethod(self, self._info)
        self.run_task = _FakeMethod(self, self._run_task)

    def _info(self):
        return {"sha256": "0" * 64, "path": "m.gguf", "host": "fake", "pid": self.pid}

    def _run_task(self, items):
        if any(request.prompt == "POISON" for request, _ in items):
            self.dead = True
            raise self.fake.exceptions.RayActorError("the actor died unexpectedly")
        records = [{"id": r.id, "index": r.index, "text": r.prompt.upper(), "finish_reason": "length",
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "cached_tokens": 0}, "timing": dict.fromkeys(
                        ("queue_s", "prefill_s", "ttft_s", "decode_s", "total_s", "tokens_per_s"), 0.0),
                    "error": None, "tokens": 1, "logprob": -1.0} for r, _ in items]     # a run's and a score's
        return {"records": records, "stats": {"steps": 1}, "run_s": 0.0, "threads": 1, "pid": self.pid,
                "peak_rss_mb": 1.0}


class _FakeMethod:
    def __init__(self, actor, fn):
        self.actor, self.fn = actor, fn

    def remote(self, *args):
        def call():
            if self.actor.dead:
                raise self.actor.fake.exceptions.RayActorError("the actor died unexpectedly")
            return self.fn(*args)
        return call


@pytest.mark.parametrize("kind", [RunKind, ScoreKind])
def test_pool_retries_a_dead_actors_tasks_and_gives_up_on_a_poison_item(tmp_path, kind):
    from bitnet_batch.distributed.driver import _Driver
    from bitnet_batch.distributed.outputs import SingleOutput
    from bitnet_batch.distributed.pool import ActorPool

    rows = [{"id": f"i{k}", "prompt": "POISON" if k == 7 else f"p{k}", "completion": "c"} for k in range(20)]
    src = write_jsonl(tmp_path / "in.jsonl", rows[:10] + ['{"id": "bad"'] + rows[10:])
    j = (job([src], tmp_path / "out.jsonl", "m.gguf") if kind is RunKind else
         ScoreJobConfig(inputs=(str(src),), output=str(tmp_path / "out.jsonl"), model="m.gguf"))
    fake = _FakeRay()
    pool = ActorPool(fake, j, kind, n_actors=2, threads=1, tasks_per_actor=2, max_attempts=2)
    assert pool.wait_ready(5)["host"] == "fake"
    output = SingleOutput(OutputSink(j.output, fingerprint={"job": 1}))
    driver = _Driver(j, kind, output, pool, task_size=4)
    driver.run(read_items([src], kind.record_spec(j)))
    output.finalize()
    records = read_jsonl(j.output)
    assert [r["index"] for r in records] == list(range(21))          # every item once, in order
    failed = [r for r in records if r["error"] and r["error"]["type"] == "WorkerCrashError"]
    assert [r["id"] for r in failed] == ["i7"] and "in.jsonl:8" in failed[0]["error"]["message"]
    assert "died 2 times" in failed[0]["error"]["message"]
    assert all(r["text"] == r["id"].replace("i", "P") for r in records if r["error"] is None)
    # its task of 4 died twice, then alone it died twice more: 4 replacements; innocent tasks were retried
    assert pool.stats.restarts == 4 and pool.stats.failed_items == 1 and driver.duplicates == 0
    assert pool.stats.retried_tasks >= 4 and driver.stats.ok == 19 and driver.stats.errors == 2
    assert driver.stats.steps == sum(w["tasks"] for w in driver.by_actor.values())     # the actors' counters
    # actors that die on everything stop the job instead of restarting forever
    pool = ActorPool(_FakeRay(), j, RunKind, n_actors=1, threads=1, tasks_per_actor=1, max_attempts=1)
    pool.wait_ready(5)
    for k in range(10):
        pool.put(Task([(Request(index=k, id=f"x{k}", prompt="POISON", messages=None, overrides={},
                                location=f"x:{k}", fields={}), None)]))
    with pytest.raises(BitnetBatchError, match="keep dying"):
        while pool.busy():
            pool.wait(timeout=0)


def test_local_engine_stays_default_and_never_imports_ray(tmp_path, small_model_path):
    src = write_jsonl(tmp_path / "in.jsonl", prompts(3))
    code = ("import sys; from bitnet_batch.cli import main\n"
            f"try:\n    main(['run', {str(src)!r}, '-o', {str(tmp_path / 'o.jsonl')!r}, '-m', "
            f"{str(small_model_path)!r}, '--max-tokens', '3', '--quiet'])\n"
            "except SystemExit as e:\n    assert not e.code, e.code\n"
            "assert 'ray' not in sys.modules, 'the local engine imported ray'\nprint('RAY-FREE')\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "RAY-FREE" in res.stdout, res.stderr[-2000:]
    assert len(read_jsonl(tmp_path / "o.jsonl")) == 3
    res = CliRunner().invoke(main, ["run", str(src), "-o", str(tmp_path / "p.jsonl"), "-m", str(small_model_path),
                                    "--actors", "2"])
    assert res.exit_code == 2 and "--actors needs --engine ray" in res.output


# ---------------------------------------------------------------------------------------- on Ray

@pytest.mark.ray
def test_ray_data_reads_many_shards_in_order(tmp_path, ray_session):
    from bitnet_batch.distributed.inputs import read_shards

    d = tmp_path / "shards"
    d.mkdir()
    for k in range(6):      # uneven shards, both formats, names that sort differently as numbers
        rows = [{"id": f"s{k}-{i}", "prompt": "p" * (i + 1)} for i in range(3 + 5 * k)]
        if k % 2:
            pq.write_table(pa.Table.from_pylist(rows), d / f"part-{k * 5}.parquet")
        else:
            write_jsonl(d / f"part-{k * 5}.jsonl", rows + ['{"id": "s%d-0"}' % k])    # a duplicate id
    j = job([d], tmp_path / "o.jsonl", "m.gguf")
    shards = expand_inputs(j.inputs)
    via_ray = list(parse_shards(read_shards(ray, shards), shards, RunKind.record_spec(j)))
    assert _as_tuples(via_ray) == _as_tuples(_parse_locally(shards, j))
    assert len(via_ray) == sum(3 + 5 * k for k in range(6)) + 3
    (d / "part-0.jsonl").unlink()                    # vanished between listing and reading
    with pytest.raises(ConfigError, match="part-0.jsonl"):
        list(read_shards(ray, shards))


@pytest.mark.ray
def test_ray_job_equals_the_local_runner(tmp_path, reference, small_model_path, ray_session):
    out = tmp_path / "ray.jsonl"
    t0 = time.perf_counter()
    summary = run_ray_job(job([reference["src"]], out, small_model_path), TWO_ACTORS, quiet=True)
    seconds = time.perf_counter() - t0
    print(f"\n200-item job: local {reference['seconds']:.1f}s, Ray (2 actors x 1 thread) {seconds:.1f}s")
    records = read_jsonl(out)
    assert without_timing(records) == without_timing(reference["records"])    # texts, errors, usage, order
    assert [r["index"] for r in records] == list(range(205))
    errors = [r for r in records if r["finish_reason"] == "error"]
    assert [r["index"] for r in errors] == [100, 101, 102, 103, 104]
    assert "in.jsonl:101" in errors[0]["error"]["message"] and errors[4]["error"]["type"] == "ContextOverflowError"
    assert all(r["timing"]["total_s"] >= r["timing"]["ttft_s"] >= r["timing"]["queue_s"] >= 0 for r in records)
    assert summary["items"] == reference["summary"]["items"]
    assert summary["tokens"] == reference["summary"]["tokens"]
    meta = json.loads(meta_path(out).read_text())
    assert meta["engine"] == "ray" and meta["model"] == reference["summary"]["model"]
    assert set(reference["summary"]) <= set(meta)                      # every local summary key, plus ray's
    work = meta["ray"]["actor_work"]
    # 2 actors ran; which of them got how many tasks depends on start-up timing (one may take them all on a
    # loaded machine), so only the totals and the thread count are fixed
    assert meta["ray"]["actors"] == 2 and 1 <= len(work) <= 2 and all(w["threads"] == [1] for w in work)
    assert sum(w["items"] for w in work) == 202 and meta["ray"]["restarts"] == 0     # + 2 that fail planning


def _kill_actors_once_records_land(journal_dir: Path, killed: list, stop: threading.Event):
    """As soon as the job has written its first record (mid-job: ~190 items left), kill every engine actor
    alive: the one that returned it holds further tasks (the driver keeps two queued per actor)."""
    while not stop.is_set():
        actors = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("bitnet-batch-")]
        written = journal_dir.exists() and any(f.stat().st_size for f in journal_dir.glob("*.partial.jsonl"))
        if actors and written:
            for victim in actors:
                ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=True)
                killed.append(victim["name"])
            return
        time.sleep(0.02)


@pytest.mark.ray
def test_killed_actor_mid_job_leaves_every_item_exactly_once(tmp_path, reference, small_model_path, ray_session):
    out = tmp_path / "parts"                         # a directory: Parquet part files of 64 items each
    j = job([reference["src"]], out, small_model_path)
    cfg = replace(TWO_ACTORS, rows_per_part=64)
    killed, stop = [], threading.Event()
    watcher = threading.Thread(target=_kill_actors_once_records_land,
                               args=(tmp_path / "parts.journal", killed, stop), daemon=True)
    watcher.start()
    try:
        summary = run_ray_job(j, cfg, quiet=True)
    finally:
        stop.set()
        watcher.join()
    assert len(killed) == 2, killed
    assert summary["ray"]["restarts"] == 2 and summary["ray"]["retried_tasks"] >= 1     # replaced, retried
    assert summary["ray"]["duplicate_records"] == 0 and summary["ray"]["failed_items"] == 0
    parts = sorted(out.iterdir())
    assert [p.name for p in parts] == [f"part-0000{k}.parquet" for k in range(4)]
    records = [r for p in parts for r in pq.read_table(p).to_pylist()]
    assert [r["index"] for r in records] == list(range(205))           # every item once, in order
    local = reference["records"]
    assert [r["text"] for r in records] == [r["text"] for r in local]
    assert [r["id"] for r in records] == [str(r["id"]) for r in local]
    assert summary["items"]["ok"] == 200 and summary["items"]["errors_in_output"] == 5
    # a re-run finds every part complete: nothing is generated, the parts stay as they are
    before = [p.read_bytes() for p in parts]
    again = run_ray_job(j, cfg, quiet=True)
    assert again["items"]["skipped_resume"] == 205 and again["items"]["ok"] == 0
    assert [p.read_bytes() for p in sorted(out.iterdir())] == before


@pytest.mark.ray
def test_cli_rerun_after_a_crash_skips_finished_ids(tmp_path, reference, small_model, small_model_path,
                                                    ray_session):
    """A crash left a journal of every third record (completion order) and a torn line; `bitnet-batch run
    --engine ray` resumes it: journaled records are kept as they are, only the rest is generated."""
    out = tmp_path / "resumed.jsonl"
    journaled = crashed_output(job([reference["src"]], out, small_model_path), small_model, reference["records"])
    with open(str(out) + ".partial.jsonl", "a") as f:
        f.write('{"id": "item-1", "ind')
    args = ["run", str(reference["src"]), "-o", str(out), "-m", str(small_model_path), "--temperature", "0.9",
            "--top-p", "0.95", "--max-batch", "8", "--prefill-chunk", "64", *ON_TWO_ACTORS]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    meta = json.loads(meta_path(out).read_text())
    assert meta["items"]["skipped_resume"] == len(journaled) == 69
    assert meta["items"]["ok"] + meta["items"]["error"] == 205 - 69 and meta["items"]["errors_in_output"] == 5
    records = read_jsonl(out)
    assert without_timing(records) == without_timing(reference["records"])
    assert [records[r["index"]] for r in journaled] == journaled       # kept byte for byte, timings included
    res = CliRunner().invoke(main, args + ["--seed", "5"])               # a changed job is refused
    assert res.exit_code == 1 and "overwrite" in res.output


def test_golden_run_on_ray(tmp_path, small_model_path, ray_session):
    """The golden run job (tests/test_golden_jobs.py) on two actors gives the golden records."""
    from test_golden_jobs import check, run_job_config, run_records

    src = write_jsonl(tmp_path / "in.jsonl", run_records())
    out = tmp_path / "out.jsonl"
    run_ray_job(run_job_config(src, out, small_model_path), TWO_ACTORS, quiet=True)
    check("run.jsonl.jsonl", read_jsonl(out), src)


# ---------------------------------------------------------------------------------------- score and embed

EMBED_MODEL = Path(__file__).parent / "data" / "embed" / "tiny-qwen3-i2s.gguf"
SCORE_ENGINE = EngineConfig(max_batch=3, prefill_chunk=24, max_seq_len=96)       # as tests/test_score.py
EMBED_ENGINE = EngineConfig(max_batch=4, prefill_chunk=48, max_seq_len=256)      # as tests/test_embed_job.py
SMALL_TASKS = replace(TWO_ACTORS, items_per_task=6)


def texts(n):
    return [" ".join(WORDS[(i * 7 + k) % 10] for k in range(3 + i % 9)) for i in range(n)]


def score_config(inputs, output, model, **kw):
    return ScoreJobConfig(inputs=tuple(str(p) for p in inputs), output=str(output), model=str(model),
                          engine=SCORE_ENGINE, **kw)


def embed_config(inputs, output, **kw):
    return EmbedJobConfig(inputs=tuple(str(p) for p in inputs), output=str(output), model=str(EMBED_MODEL),
                          engine=EMBED_ENGINE, **kw)


def run_with_one_thread(kind, config, model):
    """The local job with 1 Numba thread (what one actor runs with); the thread count is restored after."""
    import numba

    threads = numba.get_num_threads()
    try:
        return run_local(replace(config, engine=replace(config.engine, threads=1)), kind, model=model, quiet=True)
    finally:
        numba.set_num_threads(threads)


def check_summary(summary, local, out, *keys):
    """The Ray job's summary (also its meta.json) is the local one's, plus ``engine`` and ``ray``; the engine
    parameters differ by the actors' thread count."""
    assert json.loads(meta_path(out).read_text()) == summary
    assert summary["engine"] == "ray" and summary["ray"]["actors"] == 2 and set(local) <= set(summary)
    for key in ("task", "items", "model", "kernel", *keys):
        assert summary[key] == local[key], key
    assert {a["kernel"] for a in summary["ray"]["actor_starts"]} == {summary["kernel"]}     # the actors' family
    params = [{k: v for k, v in s["parameters"].items() if k != "engine"} for s in (summary, local)]
    assert params[0] == params[1]


@pytest.fixture(scope="module")
def score_reference(tmp_path_factory, small_model):
    """30 texts and prompt + completion pairs around 6 bad rows, and the local score job's output for them."""
    d = tmp_path_factory.mktemp("ray_score")
    rows = [{"id": f"s{i}", "text": t} for i, t in enumerate(texts(20))]
    rows += [{"id": f"p{i}", "prompt": "Question: what is it?\nAnswer:", "completion": " " + t}
             for i, t in enumerate(texts(10))]
    lines = [json.dumps(r) for r in rows[:15]]
    bad = [{"id": "num", "text": 7}, {"id": "s3", "text": "dup"}, {"id": "both", "text": "a", "completion": "b"},
           {"id": "empty", "text": ""}, {"id": "long", "text": "apple " * 200}]
    lines += ['{"id": "broken", "text": '] + [json.dumps(r) for r in bad]
    lines += [json.dumps(r) for r in rows[15:]]
    src = write_jsonl(d / "in.jsonl", lines)
    config = score_config([src], d / "local.jsonl", "unused")
    summary = run_with_one_thread(ScoreKind, config, small_model)
    return {"src": src, "records": read_jsonl(d / "local.jsonl"), "summary": summary}


@pytest.fixture(scope="module")
def embed_reference(tmp_path_factory):
    """24 texts (some queries with an instruction) around 4 bad rows, and the local embed job's JSONL and
    Parquet outputs for them."""
    import bitnet_batch

    d = tmp_path_factory.mktemp("ray_embed")
    rows = [{"id": f"e{i}", "text": t} for i, t in enumerate(texts(24))]
    rows[5]["instruction"] = "Find passages about fruit"
    lines = [json.dumps(r) for r in rows[:12]]
    bad = [{"id": "num", "text": 7}, {"id": "blank", "text": "x", "instruction": " "},
           {"id": "long", "text": "apple " * 400}]
    lines += ['{"id": "broken", "text": '] + [json.dumps(r) for r in bad]
    lines += [json.dumps(r) for r in rows[12:]]
    src = write_jsonl(d / "in.jsonl", lines)
    model = bitnet_batch.load_model(EMBED_MODEL)
    summary = run_with_one_thread(EmbedKind, embed_config([src], d / "local.jsonl"), model)
    run_with_one_thread(EmbedKind, embed_config([src], d / "local.parquet"), model)
    return {"src": src, "records": read_jsonl(d / "local.jsonl"), "summary": summary,
            "parquet": pq.read_table(d / "local.parquet")}


def _plain(item):
    if isinstance(item, BadRecord):
        return ("bad", item.index, item.id, item.location, str(item.error), item.error.field)
    return ("ok", asdict(item))


def test_score_and_embed_rows_parse_like_their_local_readers(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "text": "t"}, {"id": "b", "prompt": "p", "completion": "c"},
                                              {"id": "c", "text": 3}, "nope", {"id": "a", "text": "dup"},
                                              {"text": "t", "instruction": "Find it"}, {"id": "d", "instruction": ""}])
    shards = expand_inputs([src])
    for kind, config, read, n_bad in (
            (ScoreKind, score_config([src], tmp_path / "o.jsonl", "m.gguf"), read_score_items, 4),
            (EmbedKind, embed_config([src], tmp_path / "o.jsonl"), read_embed_items, 5)):    # b has no text
        got = parse_shards(((s, Path(s.uri).read_bytes()) for s in shards), shards, kind.record_spec(config))
        want = [_plain(item) for item in read([src])]
        assert [_plain(item) for item in got] == want and [w[0] for w in want].count("bad") == n_bad


def test_engine_worker_runs_any_kind_and_refuses_a_model_as_the_local_job(tmp_path, embed_reference,
                                                                          keep_numba_threads):
    src = embed_reference["src"]
    config = embed_config([src], tmp_path / "o.parquet")
    worker = EngineWorker(config, threads=1, kind=EmbedKind)
    info = worker.info()
    assert info["facts"] == {k: embed_reference["summary"]["parameters"][k] for k in ("pooling", "dimensions")}
    assert info["columns"]["embedding"] == embed_reference["parquet"].schema.field("embedding").type
    items = [r for r in read_embed_items([src]) if not isinstance(r, BadRecord)][:8]
    result = worker.run_task([(r, None) for r in items])
    local = {r["id"]: r for r in embed_reference["records"]}
    assert sorted(without_timing(result["records"]), key=lambda r: r["index"]) == \
        without_timing([local[r.id] for r in items])
    assert result["stats"]["steps"] > 0 and result["stats"]["ok"] == 0 == result["stats"]["tokens"]
    # score and run refuse an embedding model, pointing to embed, with the local job's error
    scoring = score_config([src], tmp_path / "s.jsonl", EMBED_MODEL)
    with pytest.raises(ConfigError, match="use `bitnet-batch embed`") as local_error:
        run_local(scoring, ScoreKind, quiet=True)
    for kind, config in ((ScoreKind, scoring), (RunKind, job([src], tmp_path / "r.jsonl", EMBED_MODEL))):
        error = EngineWorker(config, threads=1, kind=kind).info()["error"]
        with pytest.raises(ConfigError) as remote_error:
            raise_portable(error, "engine actor")
        assert str(remote_error.value) == str(local_error.value)


def test_score_and_embed_refuse_ray_options_without_engine_ray(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": 1, "text": "hi"}])
    for verb, option in (("score", ["--actors", "2"]), ("embed", ["--threads-per-actor", "1"]),
                         ("embed", ["--ray-address", "auto"])):
        res = CliRunner().invoke(main, [verb, str(src), "-o", str(tmp_path / "o.jsonl"), "-m", str(EMBED_MODEL),
                                        *option])
        assert res.exit_code == 2 and f"{option[0]} needs --engine ray" in res.output, res.output
        assert not (tmp_path / "o.jsonl").exists()


def test_ray_job_kind_must_match_its_configuration(tmp_path, small_model_path):
    with pytest.raises(ConfigError, match="EmbedKind runs a EmbedJobConfig, not a ScoreJobConfig"):
        run_ray_job(score_config([tmp_path / "in.jsonl"], tmp_path / "o.jsonl", small_model_path), kind=EmbedKind)
    with pytest.raises(ConfigError, match="str is not a job configuration"):
        run_ray_job("job.toml")
    assert not (tmp_path / "o.jsonl").exists() and not (tmp_path / "o.jsonl.lock").exists()


@pytest.mark.ray
def test_score_on_ray_equals_the_local_job(tmp_path, score_reference, small_model_path, ray_session):
    out = tmp_path / "ray.jsonl"
    summary = run_ray_job(score_config([score_reference["src"]], out, small_model_path), SMALL_TASKS,
                          quiet=True)       # the kind follows from the configuration
    records = read_jsonl(out)
    assert without_timing(records) == without_timing(score_reference["records"])   # scores, errors, usage, order
    errors = [r for r in records if r["finish_reason"] == "error"]
    assert [r["id"] for r in errors] == ["row-15", "num", "row-17", "both", "empty", "long"]
    assert "in.jsonl:16" in errors[0]["error"]["message"] and errors[5]["error"]["type"] == "ContextOverflowError"
    check_summary(summary, score_reference["summary"], out, "corpus")
    this_run, local = summary["this_run"], score_reference["summary"]["this_run"]
    assert this_run["records"] == local["records"] == 30 and this_run["tokens"] == local["tokens"]
    assert this_run["logprob"] == pytest.approx(local["logprob"])      # summed in the order records came back
    assert summary["steps"] > 0 and summary["time_s"]["engine"] > 0     # the actors' counters


@pytest.mark.ray
def test_cli_score_on_ray_resumes_a_partial_output(tmp_path, score_reference, small_model, small_model_path,
                                                   ray_session):
    out = tmp_path / "resumed.jsonl"
    config = score_config([score_reference["src"]], out, small_model_path)
    journaled = crashed_output(config, small_model, score_reference["records"])
    args = ["score", str(score_reference["src"]), "-o", str(out), "-m", str(small_model_path), "--max-batch", "3",
            "--prefill-chunk", "24", "--max-seq-len", "96", *ON_TWO_ACTORS]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert f"corpus perplexity: {score_reference['summary']['corpus']['perplexity']}" in res.output
    meta = json.loads(meta_path(out).read_text())
    assert meta["engine"] == "ray" and meta["items"]["skipped_resume"] == len(journaled) == 12
    assert meta["items"]["ok"] + meta["items"]["error"] == 36 - 12 and meta["items"]["errors_in_output"] == 6
    records = read_jsonl(out)
    assert without_timing(records) == without_timing(score_reference["records"])
    assert [records[r["index"]] for r in journaled] == journaled       # kept byte for byte, timings included


@pytest.mark.ray
def test_embed_on_ray_equals_the_local_job_in_parquet_parts(tmp_path, embed_reference, ray_session):
    out = tmp_path / "parts"                         # a directory: Parquet part files of 10 items each
    config = embed_config([embed_reference["src"]], out)
    cfg = replace(SMALL_TASKS, rows_per_part=10)
    summary = run_ray_job(config, cfg, kind=EmbedKind, quiet=True)
    parts = sorted(out.iterdir())
    assert [p.name for p in parts] == [f"part-0000{k}.parquet" for k in range(3)]
    local = embed_reference["parquet"]
    tables = [pq.read_table(p) for p in parts]
    assert all(t.schema.field("embedding").type == local.schema.field("embedding").type for t in tables)
    rows = [r for t in tables for r in t.to_pylist()]
    assert without_timing(rows) == without_timing(local.to_pylist())       # vectors bit for bit, errors, order
    assert sum(r["finish_reason"] == "error" for r in rows) == 4
    check_summary(summary, embed_reference["summary"], out, "tokens")
    # a re-run finds every part complete: nothing is embedded, the parts stay as they are
    before = [p.read_bytes() for p in parts]
    again = run_ray_job(config, cfg, kind=EmbedKind, quiet=True)
    assert again["items"]["skipped_resume"] == 28 and again["items"]["ok"] == 0
    assert [p.read_bytes() for p in sorted(out.iterdir())] == before


@pytest.mark.ray
def test_cli_embed_on_ray_equals_the_local_job_in_jsonl(tmp_path, embed_reference, ray_session):
    out = tmp_path / "ray.jsonl"
    res = CliRunner().invoke(main, ["embed", str(embed_reference["src"]), "-o", str(out), "-m", str(EMBED_MODEL),
                                    "--max-batch", "4", "--prefill-chunk", "48", "--max-seq-len", "256",
                                    *ON_TWO_ACTORS])
    assert res.exit_code == 0, res.output
    records = read_jsonl(out)
    assert without_timing(records) == without_timing(embed_reference["records"])
    errors = {r["id"]: r["error"] for r in records if r["finish_reason"] == "error"}
    assert set(errors) == {"row-12", "num", "blank", "long"} and "in.jsonl:16" in errors["long"]["message"]
    check_summary(json.loads(meta_path(out).read_text()), embed_reference["summary"], out, "tokens")
