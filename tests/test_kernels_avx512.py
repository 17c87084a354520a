"""The kernel families side by side: a model's logits on each SIMD family, and what the bench, ``inspect`` and a
job's summary say about the family that ran. (Each kernel against its numpy twin: tests/test_kernels.py.)"""
import json

import numpy as np
import pytest
from click.testing import CliRunner

import bitnet_batch
from bitnet_batch.cli import main
from bitnet_batch.engine.engine import Engine, EngineConfig
from jit_kernels import _cpu

from conftest import write_jsonl

SIMD = [k for k in ("amx", "avx512", "avx2") if k in _cpu.AVAILABLE]     # the SIMD families this CPU runs


@pytest.mark.skipif(len(SIMD) < 2, reason=f"needs two SIMD families; the CPU Numba compiles for runs "
                                          f"{', '.join(_cpu.AVAILABLE)}")
@pytest.mark.parametrize("kv_dtype", ["f32", "f16"])
def test_logits_are_the_same_bits_on_every_simd_family(tmp_path, monkeypatch, kv_dtype):
    """The avx512 family's ternary tiles give the avx2 tiles' integer dots and epilogue, the amx family's tile
    products the same dots and epilogue bits, and the lm_head tiles the same 8-lane FMA chains: an engine's
    logits are bit for bit the same on every family, for prefill chunks of several sequences (every tile shape
    and tail: 38 rows, widths of 1, 2 and 3 blocks, an odd vocabulary) and decode steps of 3 rows and of 1 (the
    one-token tiles)."""
    from bitnet_batch.model import bitnet
    from bitnet_batch.testing.models import write_test_model
    from jit_kernels import embedding, ternary

    model = bitnet_batch.load_model(write_test_model(tmp_path / "m.gguf", n_embd=256, n_layer=2, n_head=8,
                                                     n_head_kv=2, n_ff=384, n_vocab=301, seed=11))
    rng = np.random.default_rng(5)
    prompts = [rng.integers(0, 301, n).astype(np.int32) for n in (13, 5, 20)]
    got = {}
    for kernel in SIMD:
        for module in (bitnet, ternary, embedding):
            monkeypatch.setattr(module, "KERNEL", kernel)
        eng = Engine(model, EngineConfig(max_batch=3, max_seq_len=48, prefill_chunk=40, block_size=8,
                                         kv_dtype=kv_dtype))
        slots = [eng.kv.allocate() for _ in prompts]
        steps = [eng.step([(s, p, 0, True) for s, p in zip(slots, prompts)])]
        for i in range(3):
            steps.append(eng.step([(s, np.array([i + 1], np.int32), len(p) + i, True)
                                   for s, p in zip(slots, prompts)]))
        steps.append(eng.step([(slots[1], np.array([7], np.int32), len(prompts[1]) + 3, True)]))
        got[kernel] = [np.array(o) for step in steps for o in step]
    first = got[SIMD[0]]
    assert len(first) == 13 and np.isfinite(first[0]).all()
    for kernel in SIMD[1:]:
        for a, b in zip(first, got[kernel]):
            np.testing.assert_array_equal(a, b, err_msg=f"{SIMD[0]} against {kernel}")


def test_bench_inspect_and_job_summary_name_the_kernel_family(tmp_path, small_model_path):
    r = CliRunner()
    res = r.invoke(main, ["bench", "-m", str(small_model_path), "--batch-sizes", "1", "--prompt-tokens", "4",
                          "--gen-tokens", "2", "--json"])
    assert res.exit_code == 0, res.output
    bench = json.loads(res.stdout.strip().splitlines()[-1])
    assert bench["kernel"] == _cpu.KERNEL
    assert bench["argmax_head"] == "off"            # the greedy rows' screen: none for so small a table
    res = r.invoke(main, ["inspect", str(small_model_path)])
    assert res.exit_code == 0 and f"kernels   {_cpu.KERNEL} (this CPU runs {', '.join(_cpu.AVAILABLE)})" in res.output
    fast = _cpu.simd_family(_cpu.KERNEL) == "avx512" and _cpu.HAS_AVX512_BF16
    assert ("bf16: vdpbf16ps" if fast else "bf16: same results, no faster") in res.output
    res = r.invoke(main, ["inspect", str(small_model_path), "--json"])
    out = json.loads(res.output)
    assert out["kernel"] == _cpu.KERNEL and out["lm_head_bf16_fast"] is fast
    assert out["argmax_head_auto"] == ("off" if _cpu.KERNEL == "portable" else "int8")
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "prompt": "apple river"}])
    res = r.invoke(main, ["run", str(src), "-o", str(tmp_path / "out.jsonl"), "-m", str(small_model_path),
                          "--max-tokens", "2", "--quiet"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "out.jsonl.meta.json").read_text())["kernel"] == _cpu.KERNEL


@pytest.mark.skipif(len(_cpu.AVAILABLE) < 2, reason="this CPU runs one kernel family only")
def test_bench_runs_kernel_families_side_by_side_in_children(small_model_path):
    """``bench --kernels A,B``: each family in child processes of its own that take turns, the best run of each
    and A / B ratios."""
    first, second = _cpu.AVAILABLE[:2]
    res = CliRunner().invoke(main, ["bench", "-m", str(small_model_path), "--batch-sizes", "2", "--prompt-tokens",
                                    "4", "--gen-tokens", "3", "--repeat", "2", "--kernels", f"{first},{second}",
                                    "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["kernels"] == [first, second] and out["repeat"] == 2
    for k in (first, second):
        runs = out["runs"][k]
        assert [x["kernel"] for x in runs] == [k, k] and [x["batch"] for x in runs] == [2, 2]
        best = out["results"][k][0]
        assert best["total_tok_s"] == max(x["total_tok_s"] for x in runs) and best["decode_tok_s"] > 0
    (ratio,) = out["ratios"]
    assert ratio["kernel"] == first and ratio["vs"] == second and ratio["batch"] == 2
    assert ratio["decode_ratio"] == round(out["results"][first][0]["decode_tok_s"]
                                          / out["results"][second][0]["decode_tok_s"], 3)
    res = CliRunner().invoke(main, ["bench", "-m", str(small_model_path), "--kernels", f"{first},sse9"])
    assert res.exit_code != 0 and "'sse9' is not a kernel family this CPU runs" in res.output
