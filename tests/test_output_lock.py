"""One writer per output, from the first byte: ``<output>.lock`` is taken before any file of the job is read,
created, written or deleted, so a second job on the same output stops with the holder's pid and changes nothing
(local jobs, score jobs, Ray drivers; sinks in this process and in other processes, started at the same moment)."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from bitnet_batch.errors import ConfigError, ModelNotFoundError
from bitnet_batch.io import OutputSink
from bitnet_batch.io.writers import OutputLock
from bitnet_batch.jobs.run import JobConfig, run_job
from bitnet_batch.sampling.params import SamplingParams
from bitnet_batch.jobs.score import ScoreJobConfig, score_job
from conftest import read_jsonl, write_jsonl

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
FP = {"job": 1}


def busy(path: Path) -> str:
    """The refusal every second job gets while this process holds ``path``."""
    return f"{path} is being written by another bitnet-batch job (pid {os.getpid()})"


def snapshot(directory: Path) -> dict:
    """Every file and directory under ``directory``: inode, size, mtime and content hash (nothing may change)."""
    out = {}
    for p in sorted(directory.rglob("*")):
        st = p.stat()
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        out[str(p.relative_to(directory))] = (st.st_ino, st.st_size, st.st_mtime_ns, digest)
    return out


def rec(i: int) -> dict:
    return {"id": f"r{i}", "index": i, "text": f"t{i}", "finish_reason": "stop"}


# ----------------------------------------------------------------------------- the lock comes first

@pytest.mark.parametrize("state", ["in_progress", "complete", "locked_only"])
def test_a_second_sink_on_a_held_output_touches_nothing(tmp_path, state):
    """While one sink holds the output, every way of opening it again (same job, --overwrite, another
    fingerprint, another format or order) is refused with the holder's pid and leaves every file as it was."""
    out = tmp_path / "o.jsonl"
    if state == "complete":
        done = OutputSink(out, fingerprint=FP)
        done.write(rec(0))
        done.finalize()
    holder = OutputSink(out, fingerprint=FP) if state != "locked_only" else OutputLock(out)
    if state == "in_progress":
        holder.write(rec(0))
        holder.write(rec(1))
    before = snapshot(tmp_path)
    attempts = [dict(), dict(overwrite=True), dict(fingerprint={"job": 2}),
                dict(fingerprint={"job": 2}, overwrite=True), dict(fmt="openai"), dict(ordered=False, overwrite=True)]
    for kw in attempts:
        with pytest.raises(ConfigError) as err:
            OutputSink(out, **{"fingerprint": FP, **kw})
        assert str(err.value) == busy(out), kw
        assert snapshot(tmp_path) == before, kw
    with pytest.raises(ConfigError, match="is being written by another bitnet-batch job"):
        OutputLock(out)
    assert snapshot(tmp_path) == before
    holder.close() if state != "locked_only" else holder.release()
    again = OutputSink(out, fingerprint=FP)                # released: the output opens again
    assert len(again.done) == {"in_progress": 2, "complete": 1, "locked_only": 0}[state]
    again.close()


def test_jobs_fail_fast_before_loading_the_model(tmp_path):
    """run, score and Ray jobs take the lock before anything else: with the output held, a job whose model does
    not even exist stops on the lock (nothing loaded, nothing written), for a file and for a directory output."""
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": 1, "prompt": "x", "text": "x"}])
    out, parts = tmp_path / "out" / "o.jsonl", tmp_path / "out" / "parts"
    missing = str(tmp_path / "no-such-model.gguf")
    with OutputLock(out), OutputLock(parts):
        before = snapshot(tmp_path)
        with pytest.raises(ConfigError, match=f"^{busy(out)}$".replace("(", r"\(").replace(")", r"\)")):
            run_job(JobConfig(inputs=(str(src),), output=str(out), model=missing), quiet=True)
        with pytest.raises(ConfigError, match="is being written by another bitnet-batch job"):
            run_job(JobConfig(inputs=(str(src),), output=str(out), model=missing, overwrite=True), quiet=True)
        with pytest.raises(ConfigError, match="is being written by another bitnet-batch job"):
            score_job(ScoreJobConfig(inputs=(str(src),), output=str(out), model=missing), quiet=True)
        from bitnet_batch.distributed import run_ray_job           # the lock is taken before Ray is imported
        for target in (out, parts):
            with pytest.raises(ConfigError, match="is being written by another bitnet-batch job"):
                run_ray_job(JobConfig(inputs=(str(src),), output=str(target) + ("/" if target == parts else ""),
                                      model=missing), quiet=True)
        assert snapshot(tmp_path) == before
    assert not parts.exists() and not (tmp_path / "out" / "parts.journal").exists()


def test_the_lock_is_released_by_close_finalize_and_a_failed_open(tmp_path, small_model_path, small_model):
    out = tmp_path / "o.jsonl"
    OutputSink(out, fingerprint=FP).close()
    sink = OutputSink(out, fingerprint=FP)
    sink.write(rec(0))
    sink.finalize()                                        # a sink's own lock goes with finalize
    OutputSink(out, fingerprint=FP).close()
    with pytest.raises(ConfigError, match="different job"):
        OutputSink(out, fingerprint={"job": 2})           # refused for its fingerprint, and unlocked again
    lock = OutputLock(out)
    with pytest.raises(ConfigError, match="different job"):
        OutputSink(out, fingerprint={"job": 2}, lock=lock)
    assert not lock.held                                   # a handed-in lock belongs to the sink, failed or not
    lock = OutputLock(out)
    held = OutputSink(out, fingerprint=FP, lock=lock)
    held.finalize()
    assert lock.held                                       # a handed-in lock outlives finalize (the job's summary)
    held.close()
    assert not lock.held
    with pytest.raises(ConfigError, match="not this output's held lock"):
        OutputSink(out, fingerprint=FP, lock=OutputLock(tmp_path / "other.jsonl"))
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": 1, "prompt": "hi"}])
    job = JobConfig(inputs=(str(src),), output=str(tmp_path / "run.jsonl"), model=str(small_model_path),
                    sampling=SamplingParams(max_tokens=3))
    run_job(job, model=small_model, quiet=True)
    OutputLock(job.output).release()                       # the finished job let go of it
    with pytest.raises(ModelNotFoundError):
        run_job(JobConfig(inputs=(str(src),), output=job.output, model=str(tmp_path / "nope.gguf")), quiet=True)
    OutputLock(job.output).release()                       # ... and so did one that failed to load its model


# ------------------------------------------------------------------------------------ races between processes

_SINK_CHILD = textwrap.dedent("""
    import sys
    from bitnet_batch.io import OutputSink
    path, overwrite = sys.argv[1], sys.argv[2] == "1"
    sys.stdin.readline()                                   # "go": both children open at the same moment
    try:
        sink = OutputSink(path, fingerprint={"job": 1}, overwrite=overwrite)
    except Exception as e:
        print(f"{type(e).__name__}: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    print("opened", flush=True)
    sys.stdin.readline()                                   # "finish": hold the lock until the other one is done
    for i in range(len(sink.done), 40):
        sink.write({"id": i, "index": i, "text": "x" * i, "finish_reason": "stop"})
    sink.finalize()
""")


def test_two_processes_opening_one_output_at_once_never_both_write(tmp_path):
    """20 rounds of two processes opening the same output at the same instant (fresh, resumed and --overwrite
    of a finished job): each time exactly one opens it, the other stops with the lock message naming the
    winner's pid and deletes, truncates or renames nothing of the winner's; the output has every record once."""
    for round_ in range(20):
        out = tmp_path / f"r{round_}" / "o.jsonl"
        overwrite = round_ % 3 == 2
        if round_ % 3:                                     # a previous run: half done, or finished
            prev = OutputSink(out, fingerprint=FP)
            for i in range(10):
                prev.write({"id": i, "index": i, "text": "x" * i, "finish_reason": "stop"})
            prev.finalize() if overwrite else prev.close()
        procs = [subprocess.Popen([sys.executable, "-c", _SINK_CHILD, str(out), "1" if overwrite else "0"],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
                 for _ in range(2)]
        time.sleep(0.3)                                    # both imported and waiting
        for p in procs:
            p.stdin.write(b"go\n")
            p.stdin.flush()
        first = [p.stdout.readline() for p in procs]       # "opened", or b"" from the one that exited
        winners = [p for p, line in zip(procs, first) if line == b"opened\n"]
        assert len(winners) == 1, (round_, first, [p.stderr.read() for p in procs])
        (winner,), (loser,) = winners, [p for p in procs if p is not winners[0]]
        assert loser.wait(30) == 1
        err = loser.stderr.read().decode()
        assert err.strip() == f"ConfigError: {out} is being written by another bitnet-batch job (pid {winner.pid})"
        winner.stdin.write(b"finish\n")
        winner.stdin.close()
        assert winner.wait(30) == 0, winner.stderr.read()
        lines = [json.loads(x) for x in out.read_text().splitlines()]
        assert [r["id"] for r in lines] == list(range(40))
        assert sorted(p.name for p in out.parent.iterdir()) == ["o.jsonl", "o.jsonl.lock", "o.jsonl.state.json"]


def _cli(*args):
    return [sys.executable, "-m", "bitnet_batch.cli", *map(str, args)]


def test_two_cli_jobs_started_together(tmp_path, small_model_path):
    """`bitnet-batch run` twice at the same moment on one output, 3 rounds: one exits 1 with
    `error: OUT is being written by another bitnet-batch job (pid N)` (N the other one), the other's output has
    every record exactly once, the same in every round (the job is deterministic)."""
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": f"k{i}", "prompt": f"count {i} stones", "max_tokens": 24}
                                               for i in range(80)])
    common = ["-m", small_model_path, "--temperature", "0.8", "--seed", "5", "--max-batch", "4", "--quiet"]
    expect = None
    refused = 0
    for round_ in range(3):
        out = tmp_path / f"race{round_}.jsonl"
        procs = [subprocess.Popen(_cli("run", src, "-o", out, *common), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=ENV) for _ in range(2)]
        results = [(p.pid, *p.communicate(timeout=300), p.returncode) for p in procs]
        assert any(rc == 0 for *_, rc in results), results
        for pid, _, err, rc in results:
            if rc != 0:
                other = next(q for q, *_ in results if q != pid)
                assert rc == 1 and err == f"error: {out} is being written by another bitnet-batch job (pid {other})\n"
                refused += 1
        got = [(r["id"], r["text"]) for r in read_jsonl(out)]
        assert [rid for rid, _ in got] == [f"k{i}" for i in range(80)]
        expect = expect or got
        assert got == expect
    assert refused >= 2          # the jobs overlap (the lock is held for seconds); rarely one starts late
