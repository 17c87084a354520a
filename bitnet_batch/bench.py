"""`bitnet-batch bench`: prefill and batched decode throughput on random prompts, per batch size.

For each batch size B: B sequences of ``prompt_tokens`` random token ids are prefilled (chunked steps
of up to ``prefill_chunk`` rows), then decoded together for ``gen_tokens`` greedy steps (one row per
sequence per step, EOG ignored). Kernel compilation happens in a warm-up before anything is timed, and each
batch size's engine writes its KV pool (sized to the run) once before the clock starts, as llama.cpp's benches
clear the KV buffer at context creation (``kv_prefault_s``; see ``EngineConfig.prefault_kv``).
``repeat`` > 1 runs every batch size that many times and reports the run with the best total throughput
(the others' figures are kept in ``runs``): on a shared machine the best run is the one least disturbed.
Before each run the previous engines' garbage and freed C heap go back to the OS and the process's peak RSS
count restarts (Linux ``/proc/self/clear_refs``), so a run's ``peak_rss_mb`` is what that batch size needs on
top of the loaded model and compiled kernels, as in a job that runs it alone, not the high-water mark of the
runs before it (up to ~45 MB of heap they left behind); ``peak_rss_scope`` says "run", or "process" where the
count cannot be restarted.

``--baseline FILE`` compares the results with other engines' figures (or targets) from a JSON file::

    {"source": "where the numbers come from",
     "baselines": [{"name": "bitnet.cpp I2_S", "prefill_tok_s": 64.3,
                    "decode_tok_s": {"1": 9.6, "8": 21.3, "32": 16.6}, "peak_rss_mb": {"32": 2000}}, ...]}

and prints, per baseline and batch size, ours / theirs for prefill and decode throughput (> 1: faster) and
theirs / ours for peak RSS (>= 1: at or below theirs). Every figure is optional; ``examples/bench-baselines.json``
holds the reference engines' published numbers for the 2-core Zen3 machine kind and the performance targets.
"""
from __future__ import annotations

import gc
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .engine.engine import Engine, EngineConfig
from .engine.warmup import COMPILE_NOTICE, engine_kernels_cold, warm_up
from .errors import ConfigError
from .jobs.common import peak_rss_mb
from .model.model import load_model, release_free_heap


@dataclass
class BenchResult:
    batch: int
    prompt_tokens: int
    gen_tokens: int
    prefill_tok_s: float     # prompt tokens of all B sequences / prefill wall time
    decode_tok_s: float      # generated tokens of all B sequences / decode wall time (aggregate)
    ttft_s: float            # time until every sequence has its first token (prefill of the batch)
    total_tok_s: float       # (prompt + generated tokens) / total wall time
    step_ms: float           # mean wall time of one decode step
    peak_rss_mb: float
    kv_prefault_s: float     # writing the KV pool once before the clock starts (EngineConfig.prefault_kv)
    argmax_candidates: float | None = None   # the argmax lm_head's candidates a greedy row (None: no screen) ...
    argmax_full_rows: int = 0                # ... and rows that took the whole float32 lm_head


def bench_batch(model, batch: int, prompt_tokens: int, gen_tokens: int, *, prefill_chunk: int = 128,
                threads: int = 0, seed: int = 0, kv_dtype: str = "f32", lm_head_dtype: str = "f32",
                argmax_head: str = "auto") -> BenchResult:
    cfg = model.config
    config = EngineConfig(max_batch=batch, max_seq_len=prompt_tokens + gen_tokens,
                          prefill_chunk=max(prefill_chunk, batch), threads=threads, kv_dtype=kv_dtype,
                          lm_head_dtype=lm_head_dtype, argmax_head=argmax_head, prefault_kv=True)
    eng = Engine(model, config)
    if eng.argmax_head is not None:
        eng.argmax_head.prepare()           # as a job's warm-up does, before anything is timed
    rng = np.random.default_rng(seed)
    prompts = rng.integers(0, cfg.n_vocab, size=(batch, prompt_tokens)).astype(np.int32)
    slots = [eng.kv.allocate() for _ in range(batch)]
    t0 = time.perf_counter()
    last = [None] * batch
    queue = [(b, 0) for b in range(batch)]
    while queue:                               # prefill: pack chunks of several sequences into each step
        parts, budget, nxt = [], eng.max_rows, []
        for b, start in queue:
            n = min(budget, prompt_tokens - start)
            if n <= 0:
                nxt.append((b, start))
                continue
            parts.append((slots[b], prompts[b, start:start + n], start, "argmax" if start + n == prompt_tokens
                          else False))
            budget -= n
            if start + n < prompt_tokens:
                nxt.append((b, start + n))
        outs = eng.step(parts)
        for (slot, _, start, want), out in zip(parts, outs):
            if want:
                last[slots.index(slot)] = int(np.argmax(out))
        queue = nxt
    t1 = time.perf_counter()
    tokens = np.array(last, np.int32)
    for g in range(gen_tokens - 1):
        outs = eng.step([(slots[b], tokens[b:b + 1], prompt_tokens + g, "argmax") for b in range(batch)])
        tokens = np.array([int(np.argmax(o)) for o in outs], np.int32)
    t2 = time.perf_counter()
    steps = max(gen_tokens - 1, 1)
    head = eng.argmax_head
    return BenchResult(batch=batch, prompt_tokens=prompt_tokens, gen_tokens=gen_tokens,
                       prefill_tok_s=round(batch * prompt_tokens / (t1 - t0), 2),
                       decode_tok_s=round(batch * (gen_tokens - 1) / (t2 - t1), 2) if gen_tokens > 1 else 0.0,
                       ttft_s=round(t1 - t0, 4),
                       total_tok_s=round(batch * (prompt_tokens + gen_tokens) / (t2 - t0), 2),
                       step_ms=round(1000 * (t2 - t1) / steps, 2), peak_rss_mb=round(peak_rss_mb(), 1),
                       kv_prefault_s=round(eng.kv_prefault_s, 3),
                       argmax_candidates=None if head is None else round(head.candidates / max(head.rows, 1), 1),
                       argmax_full_rows=0 if head is None else head.full_rows)


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; elsewhere what ``platform`` knows), to name beside a measurement."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def fresh_peak_rss() -> bool:
    """Give the garbage and freed C heap of earlier runs back to the OS and restart the process's peak RSS count
    (``ru_maxrss`` / VmHWM; Linux >= 4.0). False where it cannot be restarted."""
    gc.collect()
    release_free_heap()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def run_bench(model_ref, batch_sizes=(1, 8, 32), prompt_tokens=64, gen_tokens=64, threads=0, model_file=None,
              prefill_chunk=128, kv_dtype="f32", lm_head_dtype="f32", repeat=1, argmax_head="auto",
              log=print) -> dict:
    t0 = time.perf_counter()
    model = load_model(model_ref, filename=model_file)
    load_s = time.perf_counter() - t0
    rss_load = peak_rss_mb()
    engine = Engine(model, EngineConfig(max_batch=max(batch_sizes), max_seq_len=8, prefill_chunk=prefill_chunk,
                                        threads=threads, kv_dtype=kv_dtype, lm_head_dtype=lm_head_dtype,
                                        argmax_head=argmax_head))
    if engine_kernels_cold(engine):
        log(f"{COMPILE_NOTICE} ...")
    compile_s = warm_up(engine)
    screen = None if engine.argmax_head is None else engine.argmax_head.screen     # of greedy rows
    del engine
    import numba
    from jit_kernels._cpu import KERNEL

    out = {"model": str(model.path), "arch": model.config.arch, "n_layer": model.config.n_layer,
           "n_embd": model.config.n_embd, "kernel": KERNEL, "threads": numba.get_num_threads(),
           "threading_layer": numba.threading_layer(), "load_s": round(load_s, 3),
           "rss_after_load_mb": round(rss_load, 1), "compile_s": round(compile_s, 3), "kv_dtype": kv_dtype,
           "lm_head_dtype": lm_head_dtype, "argmax_head": screen or "off",
           "prefill_chunk": prefill_chunk, "repeat": repeat, "peak_rss_scope": "run", "results": []}
    log(f"model {model.path.name}: load {load_s:.2f}s (RSS {rss_load:.0f} MB), compile {compile_s:.2f}s, "
        f"{out['threads']} threads, KV {kv_dtype}, lm_head {lm_head_dtype}"
        f"{f' (greedy rows: argmax lm_head, {screen} screen)' if screen else ''}, kernels {KERNEL}")
    for b in batch_sizes:
        runs = []
        for _ in range(repeat):
            if not fresh_peak_rss():
                out["peak_rss_scope"] = "process"
            runs.append(bench_batch(model, b, prompt_tokens, gen_tokens, prefill_chunk=prefill_chunk,
                                    threads=threads, kv_dtype=kv_dtype, lm_head_dtype=lm_head_dtype,
                                    argmax_head=argmax_head))
        r = max(runs, key=lambda run: run.total_tok_s)
        out["results"].append(dict(asdict(r), runs=[{"prefill_tok_s": x.prefill_tok_s, "decode_tok_s": x.decode_tok_s,
                                                      "total_tok_s": x.total_tok_s} for x in runs]))
        spread = "" if repeat == 1 else (f" | decode over {repeat} runs {min(x.decode_tok_s for x in runs):.1f}-"
                                          f"{max(x.decode_tok_s for x in runs):.1f}")
        if r.argmax_candidates is not None:    # how well the screen narrows this model's rows (random prompts)
            spread += f" | screen {r.argmax_candidates:.0f} candidates a row, {r.argmax_full_rows} whole rows"
        log(f"batch {r.batch:3d}: prefill {r.prefill_tok_s:8.1f} tok/s | decode {r.decode_tok_s:8.1f} tok/s "
            f"({r.step_ms:.0f} ms/step) | ttft {r.ttft_s:.3f}s | total {r.total_tok_s:8.1f} tok/s | "
            f"peak RSS {r.peak_rss_mb:.0f} MB | KV prefault {r.kv_prefault_s:.2f}s{spread}")
    return out


def run_side_by_side(kernels, model_ref, batch_sizes=(1, 8, 32), prompt_tokens=64, gen_tokens=64, threads=0,
                     model_file=None, prefill_chunk=128, kv_dtype="f32", lm_head_dtype="f32", repeat=1,
                     argmax_head="auto", log=print) -> dict:
    """``run_bench`` for each kernel family of ``kernels`` (``BITNET_BATCH_KERNEL`` values; the family is fixed
    when a process imports the kernels), each run in a child process of its own: for every batch size, ``repeat``
    rounds in which the families take turns, so a busy minute on a shared machine slows them all. Per family and
    batch size the best run (total tok/s) is kept, as ``run_bench`` does; ``ratios`` compares each family with the
    last one (e.g. ``avx512,avx2``: avx512 / avx2, > 1 faster)."""
    from jit_kernels import _cpu

    for k in kernels:
        if k not in _cpu.FAMILIES or k not in _cpu.AVAILABLE:
            raise ConfigError(f"--kernels: {k!r} is not a kernel family this CPU runs (it runs "
                              f"{', '.join(_cpu.AVAILABLE)})")
    import jit_kernels

    # the children import these very packages: they run in their root (``-m`` puts the working directory first
    # on sys.path), so a local model path is made absolute
    root = str(Path(jit_kernels.__file__).resolve().parent.parent)
    model_arg = str(Path(model_ref).resolve()) if Path(model_ref).exists() else str(model_ref)
    args = ["--prompt-tokens", str(prompt_tokens), "--gen-tokens", str(gen_tokens), "--threads", str(threads),
            "--prefill-chunk", str(prefill_chunk), "--kv-dtype", kv_dtype, "--lm-head-dtype", lm_head_dtype,
            "--argmax-head", argmax_head, "--json", "-m", model_arg]
    args += ["--model-file", model_file] if model_file else []
    runs = {k: {} for k in kernels}
    for b in batch_sizes:
        for _ in range(repeat):
            for k in kernels:
                env = dict(os.environ, **{_cpu.KERNEL_ENV: k})
                env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
                res = subprocess.run([sys.executable, "-m", "bitnet_batch.cli", "bench", "--batch-sizes", str(b)]
                                     + args, env=env, cwd=root, capture_output=True, text=True)
                if res.returncode != 0:
                    raise ConfigError(f"bench with kernels {k} failed: {res.stderr.strip()[-2000:]}")
                child = json.loads(res.stdout)
                r = child["results"][0]
                runs[k].setdefault(b, []).append(dict(r, kernel=child["kernel"], load_s=child["load_s"],
                                                      compile_s=child["compile_s"]))
                log(f"[{k:8s}] batch {b:3d}: prefill {r['prefill_tok_s']:8.1f} tok/s | decode "
                    f"{r['decode_tok_s']:8.1f} tok/s ({r['step_ms']:.0f} ms/step) | peak RSS {r['peak_rss_mb']:.0f} MB")
    best = {k: [max(runs[k][b], key=lambda run: run["total_tok_s"]) for b in batch_sizes] for k in kernels}
    base = kernels[-1]
    ratios = [{"kernel": k, "vs": base, "batch": b, "prefill_ratio": _ratio(r["prefill_tok_s"], s["prefill_tok_s"]),
               "decode_ratio": _ratio(r["decode_tok_s"], s["decode_tok_s"])}
              for k in kernels[:-1] for b, r, s in zip(batch_sizes, best[k], best[base])]
    log(f"best of {repeat} per kernel family (turns alternating per batch size):")
    for b, rows in zip(batch_sizes, zip(*(best[k] for k in kernels))):
        for k, r in zip(kernels, rows):
            spread = runs[k][b]
            log(f"  batch {b:3d} {k:8s}: prefill {r['prefill_tok_s']:8.1f} | decode {r['decode_tok_s']:8.1f} tok/s "
                f"({min(x['decode_tok_s'] for x in spread):.1f}-{max(x['decode_tok_s'] for x in spread):.1f}) | "
                f"peak RSS {r['peak_rss_mb']:.0f} MB")
    for row in ratios:
        log(f"  batch {row['batch']:3d} {row['kernel']} / {row['vs']}: prefill {row['prefill_ratio']:.2f}x, "
            f"decode {row['decode_ratio']:.2f}x")
    return {"model": str(model_ref), "kernels": list(kernels), "repeat": repeat, "threads": threads,
            "kv_dtype": kv_dtype, "lm_head_dtype": lm_head_dtype, "argmax_head": argmax_head, "results": best,
            "runs": {k: [x for b in batch_sizes for x in runs[k][b]] for k in kernels}, "ratios": ratios}


def _positive(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{where}: want a positive number, got {value!r}")
    return float(value)


def load_baselines(path) -> list[dict]:
    """The baselines of a JSON file (format in the module docstring), checked: [{"name", "prefill_tok_s": float
    | None, "decode_tok_s": {batch: float}, "peak_rss_mb": {batch: float}}]."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the baseline file: {e.strerror or e}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON: {e}") from None
    items = doc.get("baselines") if isinstance(doc, dict) else None
    if not isinstance(items, list) or not items:
        raise ConfigError(f"{path}: want an object with a non-empty 'baselines' list")
    out = []
    for i, item in enumerate(items):
        where = f"{path}: baselines[{i}]"
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not item["name"].strip():
            raise ConfigError(f"{where}: want an object with a non-empty 'name'")
        unknown = sorted(set(item) - {"name", "note", "prefill_tok_s", "decode_tok_s", "peak_rss_mb"})
        if unknown:
            raise ConfigError(f"{where}: unknown field {unknown[0]!r} (known: name, note, prefill_tok_s, "
                              f"decode_tok_s, peak_rss_mb)")
        b = {"name": item["name"], "prefill_tok_s": None, "decode_tok_s": {}, "peak_rss_mb": {}}
        if item.get("prefill_tok_s") is not None:
            b["prefill_tok_s"] = _positive(item["prefill_tok_s"], f"{where}.prefill_tok_s")
        for key in ("decode_tok_s", "peak_rss_mb"):
            per_batch = item.get(key, {})
            if not isinstance(per_batch, dict):
                raise ConfigError(f"{where}.{key}: want an object of batch size -> number, got {per_batch!r}")
            for batch, value in per_batch.items():
                if not str(batch).isdigit() or int(batch) < 1:
                    raise ConfigError(f"{where}.{key}: batch size {batch!r} is not a positive integer")
                b[key][int(batch)] = _positive(value, f"{where}.{key}[{batch!r}]")
        out.append(b)
    return out


def compare(results: list[dict], baselines: list[dict]) -> list[dict]:
    """One row per (baseline, batch size) that has something to compare: prefill_ratio and decode_ratio are
    ours / theirs (> 1: faster), rss_ratio theirs / ours (>= 1: at or below theirs); None where a figure is
    missing."""
    rows = []
    for base in baselines:
        for r in results:
            batch = r["batch"]
            decode, rss = base["decode_tok_s"].get(batch), base["peak_rss_mb"].get(batch)
            row = {"baseline": base["name"], "batch": batch,
                   "prefill_ratio": _ratio(r["prefill_tok_s"], base["prefill_tok_s"]),
                   "decode_ratio": _ratio(r["decode_tok_s"], decode),
                   "rss_ratio": _ratio(rss, r["peak_rss_mb"])}
            if any(row[k] is not None for k in ("prefill_ratio", "decode_ratio", "rss_ratio")):
                rows.append(row)
    return rows


def _ratio(a, b):
    return round(a / b, 3) if a is not None and b else None


def format_comparison(rows: list[dict]) -> list[str]:
    lines, name = [], None
    for row in rows:
        if row["baseline"] != name:
            name = row["baseline"]
            lines.append(f"vs {name} (ours / theirs; RSS: theirs / ours):")
        parts = [f"{label} {row[key]:.2f}x" for label, key in
                 (("prefill", "prefill_ratio"), ("decode", "decode_ratio"), ("peak RSS", "rss_ratio"))
                 if row[key] is not None]
        lines.append(f"  batch {row['batch']:3d}: " + ", ".join(parts))
    return lines
