"""Kernel warm-up before a job's first item: every kernel specialization a job uses is compiled (or loaded from
Numba's on-disk cache) here, so that compile time is reported apart and never lands in an item's timing.

With a cold on-disk cache the kernels are compiled in a child process that writes them to the cache, and this
process then loads them: a process that compiles keeps LLVM's state for its whole life (2B4T model right after
warm-up: 1558 MB resident against 1343 MB when the kernels come from the cache; a 32-stream bench peaked at
2036 against 1984 MB). Should the child fail, the kernels compile here as before.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from jit_kernels import embedding as emb_k

from ..config import EngineConfig
from ..sampling.chain import make_sampler
from ..sampling.params import SamplingParams
from .engine import Engine

_WARM_CHILD_ENV = "BITNET_BATCH_WARM_CHILD"


def warm_up(engine: Engine) -> float:
    """Compile (or load from cache) the kernels of decode steps, small and large prefill steps (serial and
    parallel drivers; logits of any number of rows share one compiled lm_head) and the sampler chain; returns
    seconds spent."""
    from jit_kernels._config import parallel_drivers

    t0 = time.perf_counter()
    if engine_kernels_cold(engine):
        _compile_in_child(engine)
    want = True if engine.argmax_head is None else "argmax"
    slot = engine.kv.allocate()
    try:
        engine.step([(slot, np.array([0, 1], np.int32), 0, want)])
        engine.step([(slot, np.array([2], np.int32), 2, want)])
        with parallel_drivers():          # the drivers that large steps (prefill chunks) take
            engine.step([(slot, np.array([3, 4], np.int32), 3, want)])
    finally:
        engine.kv.free(slot)
    head = engine.argmax_head
    if head is not None:
        head.reset_counts()
        # the float32 lm_head of the other rows, compiled on a slice of the table: the file's table, whose pages
        # the screen table's making released, stays out of memory until such a row comes; and on rows read from
        # the file, as the whole row of one the screen cannot narrow is (``ArgmaxHead.full_logits``)
        part = engine.model.weights.output[:8]
        parts = [part] + ([] if head.file_rows is None else [head.file_rows.span(0, len(part))])
        for part in parts:
            emb_k.lm_head(engine.ws.xl32[:1], part, head.kind, engine.ws.lm_scratch,
                          np.empty((1, len(part)), np.float32))
    n_vocab = engine.model.config.n_vocab
    sampler = make_sampler(SamplingParams(temperature=1.0, top_k=5, top_p=0.9, min_p=0.01, repetition_penalty=1.1),
                           0, n_vocab)
    sampler.sample(np.zeros(n_vocab, np.float32))
    # the constraint mask kernel (grammar bitmasks are int32 words)
    sampler.sample(np.zeros(n_vocab, np.float32), allowed=np.full(-(-n_vocab // 32), -1, np.int32))
    return time.perf_counter() - t0


COMPILE_NOTICE = ("compiling the kernels for this CPU into Numba's cache: about a minute on a first run, once "
                  "(later runs load them in about a second)")


def engine_kernels_cold(engine: Engine) -> bool:
    """Whether the on-disk cache lacks the compiled layer or, with the opt-in bf16 lm_head or the argmax lm_head,
    the tiles of its screen (and the argmax lm_head's candidate search)."""
    from jit_kernels import lm_head_bf16, lm_head_int8
    from jit_kernels.argmax_screen import _argmax_candidates

    head = engine.argmax_head
    tiles = None if head is None else lm_head_int8._lm_head_tiles if head.screen == "int8" \
        else lm_head_bf16._lm_head_tiles
    return kernel_cache_cold() or (engine.lm_bf16 is not None and kernel_cache_cold(lm_head_bf16._lm_head_tiles)) \
        or (head is not None and (kernel_cache_cold(tiles) or kernel_cache_cold(_argmax_candidates)))


def kernel_cache_cold(kernel=None) -> bool:
    """Whether the on-disk cache lacks ``kernel`` (a cached ``@njit`` function; by default the compiled layer, the
    bulk of a first compile), read from Numba's cache index, a private API: any surprise counts as warm, and the
    kernels compile in this process."""
    from jit_kernels import _config, layer

    if not _config.CACHE or os.environ.get(_WARM_CHILD_ENV):
        return False
    try:
        return not (kernel or layer.bitnet_layer)._cache._cache_file._load_index()
    except Exception:          # noqa: BLE001 - NUMBA_DISABLE_JIT, another Numba: compile here
        return False


def _compile_in_child(engine: Engine) -> bool:
    """Run ``warm_up`` for the same model file and kernel-relevant settings in a child process (its kernels go to
    the on-disk cache). The child imports these very packages: it runs in their root directory, since ``python
    -c`` puts its working directory first on ``sys.path``, where another checkout's ``jit_kernels`` would fill
    the cache with kernels of other source files (and this process would compile everything again). True when
    it succeeded."""
    import jit_kernels

    cfg = engine.config
    root = str(Path(jit_kernels.__file__).resolve().parent.parent)
    env = dict(os.environ, **{_WARM_CHILD_ENV: "1"})
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    code = "import sys; from bitnet_batch.engine.warmup import _warm_child; _warm_child(*sys.argv[1:])"
    res = subprocess.run([sys.executable, "-c", code, str(Path(engine.model.path).resolve()), cfg.kv_dtype,
                          cfg.lm_head_dtype, str(cfg.prefill_chunk), str(cfg.threads),
                          "off" if engine.argmax_head is None else engine.argmax_head.screen], env=env, cwd=root,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return res.returncode == 0


def _warm_child(path: str, kv_dtype: str, lm_head_dtype: str, prefill_chunk: str, threads: str,
                argmax_head: str = "off") -> None:
    from ..model.model import load_model

    warm_up(Engine(load_model(path), EngineConfig(max_batch=1, max_seq_len=8,
                                                  prefill_chunk=int(prefill_chunk), threads=int(threads),
                                                  kv_dtype=kv_dtype, lm_head_dtype=lm_head_dtype,
                                                  argmax_head=argmax_head)))
