"""Compiled kernels are cached on disk: a second process loads every kernel it uses from the cache."""
import json
import os
import subprocess
import sys
import textwrap

CHILD = textwrap.dedent("""
    import sys
    sys.path = [p for p in sys.path if p not in ("", ".")]     # this child imports the packages under test
    import json, time
    import numba
    import bitnet_batch
    from bitnet_batch.engine.engine import Engine, EngineConfig
    from bitnet_batch.engine.warmup import kernel_cache_cold, warm_up
    import jit_kernels.activations, jit_kernels.attention, jit_kernels.embedding, jit_kernels.norms
    import jit_kernels.layer, jit_kernels.rope, jit_kernels.ternary
    m = bitnet_batch.load_model(sys.argv[1])
    cold_before = kernel_cache_cold()
    compile_s = warm_up(Engine(m, EngineConfig(max_batch=2, max_seq_len=32, prefill_chunk=16)))
    hits, misses = {}, 0
    for mod in (jit_kernels.activations, jit_kernels.attention, jit_kernels.embedding, jit_kernels.layer,
                jit_kernels.norms, jit_kernels.rope, jit_kernels.ternary):
        for name, obj in vars(mod).items():
            if isinstance(obj, numba.core.registry.CPUDispatcher) and obj.signatures:
                hits[name] = sum(obj.stats.cache_hits.values())
                misses += sum(obj.stats.cache_misses.values())
    print(json.dumps({"compile_s": compile_s, "hits": hits, "misses": misses, "cold_before": cold_before,
                      "cold_after": kernel_cache_cold()}))
""")


def _child(model, env=None, cwd=None):
    res = subprocess.run([sys.executable, "-c", CHILD, str(model)], capture_output=True, text=True, timeout=600,
                         env=env, cwd=cwd)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_second_process_loads_kernels_from_cache(small_model_path):
    _child(small_model_path)                 # compiles (or already finds the cache)
    second = _child(small_model_path)
    assert second["misses"] == 0, second     # every kernel the step uses came from the cache, the compiled layer
    assert second["hits"].get("bitnet_layer", 0) >= 1 and sum(second["hits"].values()) >= 5, second   # among them
    assert not second["cold_before"] and not second["cold_after"]


def test_a_cold_cache_is_filled_by_a_child_process(small_model_path, tmp_path):
    """With an empty kernel cache, ``warm_up`` compiles in a child process (which writes the cache) and the
    process itself loads every kernel from the cache: it never holds the compiler's state (~200 MB for 2B4T)."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba-cache"))
    # run from a directory holding another jit_kernels (as another checkout would): the compiling child must
    # still build the kernels of the packages this process imports
    decoy = tmp_path / "elsewhere" / "jit_kernels"
    decoy.mkdir(parents=True)
    (decoy / "__init__.py").write_text("raise ImportError('another checkout of jit_kernels')\n")
    cold = _child(small_model_path, env, cwd=decoy.parent)
    assert cold["misses"] == 0 and cold["hits"].get("bitnet_layer", 0) >= 1, cold
    assert cold["cold_before"] and not cold["cold_after"]      # what a job tells the user before compiling
    assert any((tmp_path / "numba-cache").rglob("*.nbi"))
