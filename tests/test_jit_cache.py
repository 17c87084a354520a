"""Compiled kernels are cached on disk: a second process loads every kernel it uses from the cache."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from jit_kernels._cpu import KERNEL

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
    import jit_kernels.argmax_screen, jit_kernels.buffers, jit_kernels.lm_head_int8
    m = bitnet_batch.load_model(sys.argv[1])
    cold_before = kernel_cache_cold()
    # with the argmax lm_head (its int8 screen, and its reads of candidate rows: pread called from a cached kernel)
    compile_s = warm_up(Engine(m, EngineConfig(max_batch=2, max_seq_len=32, prefill_chunk=16, argmax_head="on")))
    hits, misses = {}, 0
    for mod in (jit_kernels.activations, jit_kernels.attention, jit_kernels.embedding, jit_kernels.layer,
                jit_kernels.norms, jit_kernels.rope, jit_kernels.ternary, jit_kernels.argmax_screen,
                jit_kernels.buffers, jit_kernels.lm_head_int8):
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
    if KERNEL != "portable":                 # the argmax lm_head's: its candidate search and its reads from the file
        assert second["hits"].get("_argmax_candidates", 0) >= 1 and second["hits"].get("_read_rows", 0) >= 1, second


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


def test_the_guard_looks_where_numba_caches_the_kernels():
    from jit_kernels import _config, layer

    assert _config.cache_dir() == Path(layer.bitnet_layer._cache._cache_path)


def test_kernels_built_from_other_sources_are_dropped(tmp_path):
    """Numba checks a cached function against its own file only, while the compiled layer holds the tiles of
    other files: kernels built from any other version of the package's sources are deleted, the rest kept."""
    from jit_kernels import _config

    for name in ("layer.bitnet_layer-113.py311.nbi", "layer.bitnet_layer-113.py311.1.nbc", "layer.cpython-311.pyc"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / _config.SOURCES_STAMP).write_text("an older version")
    assert _config.drop_stale_cache(tmp_path, "abc")
    assert sorted(p.name for p in tmp_path.iterdir()) == [_config.SOURCES_STAMP, "layer.cpython-311.pyc"]
    assert (tmp_path / _config.SOURCES_STAMP).read_text() == "abc"
    (tmp_path / "norms._rmsnorm-20.py311.nbi").write_bytes(b"x")
    assert not _config.drop_stale_cache(tmp_path, "abc")          # built from these sources: kept
    assert (tmp_path / "norms._rmsnorm-20.py311.nbi").exists()
    empty = tmp_path / "new"
    assert _config.drop_stale_cache(empty, "abc") and (empty / _config.SOURCES_STAMP).read_text() == "abc"


def test_a_process_drops_a_cache_built_from_other_sources(tmp_path):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    where = "import jit_kernels._config as c; print(c.cache_dir())"
    res = subprocess.run([sys.executable, "-c", where], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    cache = Path(res.stdout.strip().splitlines()[-1])
    assert cache.is_relative_to(tmp_path / "cache")
    stale = cache / "layer.bitnet_layer-113.py311.nbi"
    stale.write_bytes(b"from another version")
    (cache / "jit_kernels.sources").write_text("another version")
    res = subprocess.run([sys.executable, "-c", where], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert not stale.exists() and (cache / "jit_kernels.sources").read_text() != "another version"
