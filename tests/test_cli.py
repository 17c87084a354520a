"""The CLI through click's CliRunner and as real subprocesses (incl. a SIGKILL crash and resume)."""
import errno
import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from bitnet_batch.cli import EXIT_ITEM_ERRORS, main
from conftest import kill_when_journaled, read_jsonl, write_jsonl


def _prompts(n):
    return [{"id": i, "prompt": f"number {i} is here", "max_tokens": 6 + i % 5} for i in range(n)]


def test_run_via_clirunner(tmp_path, small_model_path):
    src = write_jsonl(tmp_path / "in.jsonl", _prompts(6) + ['{"id": 99, "prompt": 3}'])
    out = tmp_path / "out.jsonl"
    res = CliRunner().invoke(main, ["run", str(src), "-o", str(out), "-m", str(small_model_path), "--max-batch", "4",
                                    "--temperature", "0.7", "--seed", "3", "--quiet"])
    assert res.exit_code == 0, res.output
    recs = read_jsonl(out)
    assert [r["id"] for r in recs] == [0, 1, 2, 3, 4, 5, 99]
    assert recs[-1]["finish_reason"] == "error" and "in.jsonl:7" in recs[-1]["error"]["message"]
    meta = json.loads((tmp_path / "out.jsonl.meta.json").read_text())
    assert meta["items"]["ok"] == 6 and meta["parameters"]["sampling"]["temperature"] == 0.7
    # --strict turns item errors into a non-zero exit (for cron); a rerun resumes (nothing left to do)
    res = CliRunner().invoke(main, ["run", str(src), "-o", str(out), "-m", str(small_model_path), "--temperature",
                                    "0.7", "--seed", "3", "--quiet", "--strict"])
    assert res.exit_code == EXIT_ITEM_ERRORS, res.output
    # a float16 KV cache is a different numerics choice: recorded, and a fresh output runs with it
    f16 = tmp_path / "f16.jsonl"
    res = CliRunner().invoke(main, ["run", str(src), "-o", str(f16), "-m", str(small_model_path), "--temperature",
                                    "0.7", "--seed", "3", "--quiet", "--kv-dtype", "f16"])
    assert res.exit_code == 0, res.output
    meta = json.loads((tmp_path / "f16.jsonl.meta.json").read_text())
    assert meta["parameters"]["engine"]["kv_dtype"] == "f16" and meta["items"]["ok"] == 6
    # so is a bf16 lm_head: resuming the float32 output with it is refused, a fresh output records it
    res = CliRunner().invoke(main, ["run", str(src), "-o", str(out), "-m", str(small_model_path), "--temperature",
                                    "0.7", "--seed", "3", "--quiet", "--lm-head-dtype", "bf16"])
    assert res.exit_code == 1 and "lm_head_dtype" in res.output and "overwrite" in res.output, res.output
    res = CliRunner().invoke(main, ["run", str(src), "-o", str(tmp_path / "bf16.jsonl"), "-m", str(small_model_path),
                                    "--temperature", "0.7", "--seed", "3", "--quiet", "--lm-head-dtype", "bf16"])
    assert res.exit_code == 0, res.output
    meta = json.loads((tmp_path / "bf16.jsonl.meta.json").read_text())
    assert meta["parameters"]["engine"]["lm_head_dtype"] == "bf16" and meta["items"]["ok"] == 6


def test_fatal_errors_exit_1_with_a_message(tmp_path, small_model_path):
    src = write_jsonl(tmp_path / "in.jsonl", _prompts(2))
    res = CliRunner().invoke(main, ["run", str(src), "-o", str(tmp_path / "o.jsonl"), "-m", str(tmp_path / "nope.gguf")])
    assert res.exit_code == 1 and "nope.gguf" in res.output
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\x01" * 7)
    res = CliRunner().invoke(main, ["run", str(src), "-o", str(tmp_path / "o.jsonl"), "-m", str(bad)])
    assert res.exit_code == 1 and "bad.gguf" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(main, ["run", str(tmp_path / "missing.jsonl"), "-o", str(tmp_path / "out" / "m.jsonl"),
                                    "-m", str(small_model_path)])
    assert res.exit_code == 1 and "missing.jsonl: input file not found" in res.output
    assert not (tmp_path / "out").exists()       # checked before the output is locked or the model loaded
    res = CliRunner().invoke(main, ["run", str(src), "-o", str(tmp_path / "out" / "m.csv"), "-m", str(small_model_path)])
    assert res.exit_code == 1 and "m.csv: unknown output extension '.csv'" in res.output
    assert not (tmp_path / "out").exists()
    res = CliRunner().invoke(main, ["run", str(src), "-o", "/proc/m.jsonl", "-m", str(small_model_path)])
    assert res.exit_code == 1 and "/proc/m.jsonl: cannot create the output's lock file m.jsonl.lock" in res.output
    res = CliRunner().invoke(main, ["run", str(src), "-o", str(tmp_path / "out" / "m.jsonl"), "-m",
                                    str(small_model_path), "--max-tokens", "4"])
    assert res.exit_code == 0 and len(read_jsonl(tmp_path / "out" / "m.jsonl")) == 2


def _records(path):
    """Records without their timings (which differ from run to run)."""
    return [{k: v for k, v in r.items() if k != "timing"} for r in read_jsonl(path)]


def test_disk_full_exits_1_with_what_is_safe_then_resume_equals_uninterrupted(tmp_path, small_model_path,
                                                                              monkeypatch):
    """The journal's 7th write fails with ENOSPC: exit 1, a message naming the journal, the 6 records safely
    written and the rerun; the rerun of the same command resumes and gives an uninterrupted run's records."""
    from bitnet_batch.io import writers
    from test_writers import FullDisk

    src = write_jsonl(tmp_path / "in.jsonl", _prompts(12))
    args = ["-m", str(small_model_path), "--max-batch", "3", "--temperature", "0.7", "--seed", "3", "--quiet"]
    assert CliRunner().invoke(main, ["run", str(src), "-o", str(tmp_path / "ref.jsonl"), *args]).exit_code == 0
    out = tmp_path / "o.jsonl"
    journal = tmp_path / "o.jsonl.partial.jsonl"
    real_open = writers.OutputSink._open_journal

    def open_on_a_filling_disk(self):
        real_open(self)
        self._file = FullDisk(self._file, ok=6)

    monkeypatch.setattr(writers.OutputSink, "_open_journal", open_on_a_filling_disk)
    res = CliRunner().invoke(main, ["run", str(src), "-o", str(out), *args])
    assert res.exit_code == 1
    assert res.output == (f"error: {journal}: no space left on device while writing a record; the 6 finished "
                          f"records before it are safely written in {journal}. Free some space and run the same "
                          f"command again to resume (finished items are skipped)\n")
    assert journal.read_text().count("\n") == 6 and not out.exists()
    monkeypatch.setattr(writers.OutputSink, "_open_journal", real_open)
    res = CliRunner().invoke(main, ["run", str(src), "-o", str(out), *args])
    assert res.exit_code == 0, res.output
    assert _records(out) == _records(tmp_path / "ref.jsonl")
    assert json.loads((tmp_path / "o.jsonl.meta.json").read_text())["items"]["skipped_resume"] == 6
    # a full disk elsewhere (here: the summary) names its file too
    def no_space(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    monkeypatch.setattr(Path, "write_text", no_space)
    res = CliRunner().invoke(main, ["run", str(src), "-o", str(tmp_path / "m.jsonl"), *args])
    assert res.exit_code == 1 and res.output == (f"error: {tmp_path / 'm.jsonl.meta.json'}: no space left on device; "
                                                 f"records already written are kept. Free some space and run the "
                                                 f"same command again to resume\n")


def test_generate_inspect_and_chat(small_model_path):
    r = CliRunner()
    res = r.invoke(main, ["generate", "apple river", "-m", str(small_model_path), "--max-tokens", "5"])
    assert res.exit_code == 0, res.output
    assert "tokens" in res.output
    res = r.invoke(main, ["inspect", str(small_model_path)])
    assert res.exit_code == 0 and "bitnet-b1.58" in res.output and "blk.1.ffn_down.weight" in res.output
    res = r.invoke(main, ["inspect", str(small_model_path), "--json"])
    info = json.loads(res.output)
    assert info["config"]["n_layer"] == 2
    assert info["memory"]["kv_cache_kb_per_token_f16"] * 2 == pytest.approx(info["memory"]["kv_cache_kb_per_token"],
                                                                             abs=0.1)
    res = r.invoke(main, ["chat", "-m", str(small_model_path), "--max-tokens", "4", "--system", "Be kind."],
                   input="hello\nmore\n\n")
    assert res.exit_code == 0, res.output
    assert res.output.count("assistant>") == 2


@pytest.mark.parametrize("kv_dtype, lm_head_dtype", [("f32", "f32"), ("f16", "bf16")])
def test_bench_json(small_model_path, kv_dtype, lm_head_dtype):
    res = CliRunner().invoke(main, ["bench", "-m", str(small_model_path), "--batch-sizes", "1,2",
                                    "--prompt-tokens", "8", "--gen-tokens", "4", "--kv-dtype", kv_dtype,
                                    "--lm-head-dtype", lm_head_dtype, "--repeat", "2", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["kv_dtype"] == kv_dtype and out["lm_head_dtype"] == lm_head_dtype and out["repeat"] == 2
    for r in out["results"]:                 # the best of the 2 runs is reported
        assert len(r["runs"]) == 2 and r["total_tok_s"] == max(x["total_tok_s"] for x in r["runs"])
    assert [r["batch"] for r in out["results"]] == [1, 2]
    for key in ("prefill_tok_s", "decode_tok_s", "ttft_s", "total_tok_s", "peak_rss_mb"):
        assert out["results"][0][key] > 0
    assert out["results"][0]["kv_prefault_s"] >= 0            # a tiny model's pool: well under a millisecond
    assert out["results"][0]["argmax_candidates"] is None      # no screen for so small a table ("auto")
    assert out["compile_s"] >= 0 and out["load_s"] > 0
    assert out["threading_layer"] in ("omp", "tbb", "workqueue")


def test_bench_reports_how_many_candidates_the_screen_leaves(small_model_path, small_model):
    """With the argmax lm_head ("on": any table) the bench says how many candidates a greedy row needed and how many
    rows took the whole float32 lm_head (what to look at on a model of one's own)."""
    from jit_kernels import embedding

    if not embedding.simd_table(small_model.weights.output):
        pytest.skip("the argmax lm_head needs a SIMD kernel family")
    res = CliRunner().invoke(main, ["bench", "-m", str(small_model_path), "--batch-sizes", "2", "--prompt-tokens",
                                    "8", "--gen-tokens", "4", "--argmax-head", "on"])
    assert res.exit_code == 0, res.output
    assert re.search(r"screen \d+ candidates a row, 0 whole rows", res.output), res.output


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="the peak RSS count restarts on Linux only")
def test_bench_peak_rss_is_each_runs_own(small_model_path):
    """A high-water mark left by earlier work in the process (300 MB here) is not charged to the runs."""
    big = np.ones(300 << 20, np.uint8)
    del big
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    res = CliRunner().invoke(main, ["bench", "-m", str(small_model_path), "--batch-sizes", "2,1",
                                    "--prompt-tokens", "4", "--gen-tokens", "2", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["peak_rss_scope"] == "run"
    for r in out["results"]:
        assert 0 < r["peak_rss_mb"] < before - 200, (r["peak_rss_mb"], before)


def test_thread_scaling_script(tmp_path, small_model_path):
    """scripts/bench_threads.py: one bench process per thread count, each JSON saved, the speed-up table."""
    script = Path(__file__).parents[1] / "scripts" / "bench_threads.py"
    res = subprocess.run([sys.executable, str(script), "--model", str(small_model_path), "--threads", "2,1",
                          "--batch-sizes", "1,2", "--prompt-tokens", "4", "--gen-tokens", "2", "--out-dir",
                          str(tmp_path), "--json"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout.strip().splitlines()[-1])
    assert sorted(doc["runs"]) == ["1", "2"] and {p.name for p in tmp_path.iterdir()} == {"threads-1.json",
                                                                                          "threads-2.json"}
    for n, run in doc["runs"].items():
        assert run["threads"] == int(n) and [r["batch"] for r in run["results"]] == [1, 2]
        assert run == json.loads((tmp_path / f"threads-{n}.json").read_text())
    rows = [line for line in res.stdout.splitlines() if line.startswith("| 1 |")]
    assert len(rows) == 2 and all(row.count("1.00x") == 2 for row in rows)


def test_bench_compares_with_baselines(tmp_path, small_model_path):
    base = tmp_path / "base.json"
    base.write_text(json.dumps({"baselines": [
        {"name": "peer", "prefill_tok_s": 2.0, "decode_tok_s": {"1": 4.0, "8": 1.0}, "peak_rss_mb": {"1": 100000}},
        {"name": "only-8", "decode_tok_s": {"8": 3.0}}]}))
    args = ["bench", "-m", str(small_model_path), "--batch-sizes", "1", "--prompt-tokens", "8", "--gen-tokens", "4",
            "--baseline", str(base)]
    res = CliRunner().invoke(main, args + ["--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    (row,) = out["comparisons"]                       # "only-8" has nothing for batch 1
    r = out["results"][0]
    assert row["baseline"] == "peer" and row["batch"] == 1
    assert row["prefill_ratio"] == round(r["prefill_tok_s"] / 2.0, 3)
    assert row["decode_ratio"] == round(r["decode_tok_s"] / 4.0, 3)
    assert row["rss_ratio"] == round(100000 / r["peak_rss_mb"], 3)
    text = CliRunner().invoke(main, args)
    assert text.exit_code == 0 and "vs peer (ours / theirs" in text.output and "decode" in text.output
    # the shipped file parses
    from bitnet_batch.bench import load_baselines
    shipped = load_baselines(Path(__file__).parents[1] / "examples" / "bench-baselines.json")
    assert [b["decode_tok_s"].get(32) for b in shipped] == [16.6, 24.5, 50.0]


@pytest.mark.parametrize("doc, message", [
    ("{", "not valid JSON"),
    ('{"baselines": []}', "non-empty 'baselines' list"),
    ('{"baselines": [{"name": "x", "decode_tok_s": {"8": -1}}]}', "baselines[0].decode_tok_s['8']: want a positive"),
    ('{"baselines": [{"name": "x", "decode_tok_s": {"eight": 1}}]}', "batch size 'eight' is not a positive integer"),
    ('{"baselines": [{"name": "x", "prefil_tok_s": 1}]}', "unknown field 'prefil_tok_s'"),
])
def test_bench_rejects_a_bad_baseline_file_before_loading_the_model(tmp_path, doc, message):
    base = tmp_path / "base.json"
    base.write_text(doc)
    res = CliRunner().invoke(main, ["bench", "-m", str(tmp_path / "no-such-model.gguf"), "--baseline", str(base)])
    assert res.exit_code != 0
    assert str(base) in res.output and message in res.output


def _cli(*args):
    return [sys.executable, "-m", "bitnet_batch.cli", *map(str, args)]


def test_subprocess_sigkill_then_resume_equals_uninterrupted(tmp_path, small_model_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": f"k{i}", "prompt": f"count {i} stones", "max_tokens": 16}
                                               for i in range(60)])
    common = ["-m", small_model_path, "--temperature", "0.8", "--seed", "11", "--max-batch", "2", "--quiet"]
    ref = subprocess.run(_cli("run", src, "-o", tmp_path / "ref.jsonl", *common), capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "crash.jsonl"
    journal = tmp_path / "crash.jsonl.partial.jsonl"
    proc = subprocess.Popen(_cli("run", src, "-o", out, *common), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    kill_when_journaled(proc, journal)
    assert not out.exists() and journal.exists()
    done_before = journal.read_text().count("\n")
    assert 10 <= done_before < 60
    again = subprocess.run(_cli("run", src, "-o", out, *common[:-1]), capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert "resuming" in again.stderr
    assert out.read_text() == (tmp_path / "ref.jsonl").read_text().replace("ref.jsonl", "crash.jsonl") or \
        [(r["id"], r["text"]) for r in read_jsonl(out)] == [(r["id"], r["text"]) for r in read_jsonl(tmp_path / "ref.jsonl")]
    meta = json.loads((tmp_path / "crash.jsonl.meta.json").read_text())
    assert meta["items"]["skipped_resume"] >= done_before - 1


@pytest.mark.parametrize("entry", [["bitnet-batch"], [sys.executable, "-m", "bitnet_batch.cli"]])
def test_console_entry_points(entry):
    res = subprocess.run(entry + ["--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "run" in res.stdout and "bench" in res.stdout


def _start_and_wait_for_records(args, journal, n):
    proc = subprocess.Popen(_cli(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if journal.exists() and journal.read_text().count("\n") >= n:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the job finished before it could be stopped"
    return proc


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_stops_the_job_cleanly_and_a_rerun_resumes(tmp_path, small_model_path, sig, code):
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": f"s{i}", "prompt": f"count {i} stones", "max_tokens": 16}
                                               for i in range(60)])
    common = ["-m", small_model_path, "--temperature", "0.8", "--seed", "5", "--max-batch", "2", "--quiet"]
    ref = CliRunner().invoke(main, list(map(str, ["run", src, "-o", tmp_path / "ref.jsonl", *common])))
    assert ref.exit_code == 0, ref.output
    out, journal = tmp_path / "out.jsonl", tmp_path / "out.jsonl.partial.jsonl"
    proc = _start_and_wait_for_records(["run", src, "-o", out, *common], journal, 10)
    os.kill(proc.pid, sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    written = journal.read_text().count("\n")
    assert 10 <= written < 60 and not out.exists()
    assert err.strip().splitlines()[-1] == (f"interrupted: {written} of 60 items written; run the same command "
                                             f"to resume")
    again = subprocess.run(_cli("run", src, "-o", out, *common), capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    strip = lambda recs: [{k: v for k, v in r.items() if k != "timing"} for r in recs]  # noqa: E731
    assert strip(read_jsonl(out)) == strip(read_jsonl(tmp_path / "ref.jsonl"))


def test_sigterm_stops_a_score_job_cleanly(tmp_path, small_model_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": i, "text": f"count {i} stones " * 20} for i in range(80)])
    out, journal = tmp_path / "s.jsonl", tmp_path / "s.jsonl.partial.jsonl"
    args = ["score", src, "-o", out, "-m", small_model_path, "--max-batch", "1", "--prefill-chunk", "16", "--quiet"]
    proc = _start_and_wait_for_records(args, journal, 5)
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and "items written; run the same command to resume" in err
    again = subprocess.run(_cli(*args), capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert [r["id"] for r in read_jsonl(out)] == list(range(80))


@pytest.mark.parametrize("cold", [True, False])
def test_a_job_says_so_before_it_compiles_the_kernels(tmp_path, small_model, small_model_path, monkeypatch, cold):
    """A first run compiles for about a minute: the job says so before, and only then."""
    import io

    from bitnet_batch.engine.warmup import COMPILE_NOTICE
    from bitnet_batch.jobs import JobConfig, run_job
    from bitnet_batch.jobs.run import RunKind

    seen = []
    monkeypatch.setattr(RunKind, "kernels_cold", staticmethod(lambda engine: seen.append(engine) or cold))
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "prompt": "apple river", "max_tokens": 2}])
    log = io.StringIO()
    run_job(JobConfig(inputs=(str(src),), output=str(tmp_path / "o.jsonl"), model=str(small_model_path)),
            model=small_model, out=log)
    assert len(seen) == 1 and (COMPILE_NOTICE in log.getvalue()) == cold, log.getvalue()
    if cold:
        assert log.getvalue().index(COMPILE_NOTICE) < log.getvalue().index("kernels ready in")
