"""Benchmark the ternary matmul kernels on the BitNet b1.58 2B4T projection shapes.

    python scripts/bench_kernels.py                      # selected kernel, T = 1, 8, 32, 128, all threads
    python scripts/bench_kernels.py --kernels avx512,avx2,portable,baseline --T 1,32 --threads 2
    python scripts/bench_kernels.py --T 1,2,4 --cold     # decode: weights streamed from DRAM
    python scripts/bench_kernels.py --threads 1 --cpu-time --kernels avx2,baseline   # per core, on a busy box

Prints, per kernel, shape and T: the best time of one ``ternary_matmul`` call (float64 out, as the engine), GMAC/s
(T * N * K ternary multiply-adds per second) and effective GB/s (packed 2-bit weight bytes N * K / 4 read per
second; the bound for decode, T = 1), plus ``quantize_rows`` time for the same activations. ``baseline`` is
the scalar kernel the project shipped before the AVX2 kernel (kept here only for comparison). The machine is
shared: the kernels take turns (3 rounds per case, best of each kept), compare kernels within one run. The
weights and activations start cache lines, as the engine allocates them. JIT compile time is reported apart.
"""
import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numba  # noqa: E402
from numba import njit, prange  # noqa: E402

from bitnet_batch.model.layout import deinterleave_rows, pack_kernel, padded  # noqa: E402
from jit_kernels import _cpu, ternary  # noqa: E402
from jit_kernels.buffers import aligned_empty, aligned_zeros  # noqa: E402

# 2B4T fused projections: rows N (outputs) x inputs K
ROUNDS = 3           # turns per kernel and case
SHAPES = {"qkv": (3840, 2560), "o": (2560, 2560), "gate_up": (13824, 2560), "down": (2560, 6912)}


@njit(nogil=True, parallel=True, boundscheck=False, fastmath={"reassoc", "contract", "nsz"})
def _baseline(xq, xscale, xsum, packed, wscale, out):
    """The previous kernel: one weight row at a time, scalar code that LLVM vectorised (int64 lanes); it reads
    the rows ungrouped (``deinterleave_rows`` of the kernel layout)."""
    T, Kp = xq.shape
    N = packed.shape[0]
    nblk = Kp // 128
    for n in prange(N):
        w = packed[n]
        ws = wscale[n]
        for t in range(T):
            x = xq[t]
            acc = 0
            for b in range(nblk):
                wb = w[b * 32:(b + 1) * 32]
                xb = x[b * 128:(b + 1) * 128]
                a = 0
                for m in range(32):
                    c = np.int32(wb[m])
                    a += ((c >> 6) & 3) * np.int32(xb[m]) + ((c >> 4) & 3) * np.int32(xb[m + 32]) \
                        + ((c >> 2) & 3) * np.int32(xb[m + 64]) + (c & 3) * np.int32(xb[m + 96])
                acc += a
            out[t, n] = np.float64(acc - xsum[t]) / np.float64(xscale[t]) * np.float64(ws)


def _call(kernel):
    if kernel == "baseline":
        return _baseline
    return lambda xq, s, sm, p, ws, out: ternary.ternary_matmul(xq, s, sm, p, ws, out, kernel=kernel)


def _best(fn, repeat, budget_s, clock=time.perf_counter):
    """Best time of at least ``repeat`` calls, going on while under ``budget_s`` (a shared machine has quiet
    moments; the best call is the one that ran in one)."""
    best, spent, n = float("inf"), 0.0, 0
    while n < repeat or (spent < budget_s and n < 1000):
        t0 = clock()
        fn()
        dt = clock() - t0
        best, spent, n = min(best, dt), spent + dt, n + 1
    return best


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernels", default=ternary.KERNEL,
                    help=f"comma list of amx, avx512, avx2, portable, baseline (default: selected = {ternary.KERNEL})")
    ap.add_argument("--shapes", default=",".join(SHAPES), help="comma list of " + ", ".join(SHAPES))
    ap.add_argument("--T", default="1,8,32,128", help="token rows per call, comma list")
    ap.add_argument("--repeat", type=int, default=5, help="timed calls per case at least (best is kept)")
    ap.add_argument("--budget", type=float, default=1.0, help="seconds per case: repeat while under it")
    ap.add_argument("--cold", action="store_true",
                    help="rotate over copies of the weights (>= 128 MB) so every call reads them from DRAM, as "
                         "a decode step of the real model does (default: weights stay hot in L3 when they fit)")
    ap.add_argument("--threads", type=int, default=0, help="Numba threads (default: all)")
    ap.add_argument("--cpu-time", action="store_true",
                    help="with --threads 1: time with the calling thread's CPU clock (time lost to other "
                         "processes on a shared machine is not counted)")
    args = ap.parse_args(argv)
    if args.threads:
        numba.set_num_threads(args.threads)
    if args.cpu_time and numba.get_num_threads() != 1:
        ap.error("--cpu-time needs --threads 1 (the work must run on the calling thread)")
    clock = time.thread_time if args.cpu_time else time.perf_counter
    kernels = [k.strip() for k in args.kernels.split(",") if k.strip()]
    for k in kernels:
        if k not in _cpu.FAMILIES + ("baseline",):
            ap.error(f"--kernels: unknown kernel {k!r}")
        if k != "baseline" and k not in _cpu.AVAILABLE:
            ap.error(f"--kernels: this CPU runs only {', '.join(_cpu.AVAILABLE)}")
    shapes = [s.strip() for s in args.shapes.split(",")]
    for s in shapes:
        if s not in SHAPES:
            ap.error(f"--shapes: unknown shape {s!r}")
    Ts = [int(t) for t in args.T.split(",")]
    print(f"threads={numba.get_num_threads()} selected={ternary.KERNEL} available={','.join(_cpu.AVAILABLE)} "
          f"weights={'cold (DRAM)' if args.cold else 'hot (cache when they fit)'} "
          f"clock={'thread CPU time' if args.cpu_time else 'wall'}")
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    _warm(kernels)
    print(f"JIT compile / cache load: {time.perf_counter() - t0:.2f} s")
    print(f"{'kernel':9s} {'shape':8s} {'N':>6s} {'K':>5s} {'T':>4s} {'ms':>9s} {'GMAC/s':>8s} {'GB/s':>7s} "
          f"{'quant ms':>9s}")
    for name in shapes:
        N, K = SHAPES[name]
        packed = _aligned_copy(pack_kernel(rng.integers(-1, 2, size=(N, K)).astype(np.int8)))
        copies = [packed] + [_aligned_copy(packed) for _ in range(128_000_000 // packed.nbytes if args.cold else 0)]
        rows = [deinterleave_rows(c) for c in copies] if "baseline" in kernels else None
        wscale = np.ones(N, np.float32)
        for T in Ts:
            x = rng.standard_normal((T, K)).astype(np.float32)
            xq = aligned_zeros((T, padded(K)), np.int8)        # cache-line aligned, as the engine's buffers
            s, sm = np.zeros(T, np.float32), np.zeros(T, np.int32)
            tq = _best(lambda: ternary.quantize_rows(x, xq, s, sm), args.repeat, args.budget / 4, clock)
            out = np.zeros((T, N), np.float64)
            best = dict.fromkeys(kernels, float("inf"))
            for _ in range(ROUNDS):         # the kernels take turns: a busy minute slows them all
                for k in kernels:
                    fn, turn, mats = _call(k), iter(range(10 ** 9)), rows if k == "baseline" else copies
                    best[k] = min(best[k], _best(lambda: fn(xq, s, sm, mats[next(turn) % len(mats)], wscale, out),
                                                 args.repeat, args.budget / ROUNDS, clock))
            for k, dt in best.items():
                print(f"{k:9s} {name:8s} {N:6d} {K:5d} {T:4d} {dt * 1e3:9.3f} {T * N * K / dt / 1e9:8.1f} "
                      f"{N * K / 4 / dt / 1e9:7.2f} {tq * 1e3:9.3f}", flush=True)


def _aligned_copy(a):
    b = aligned_empty(a.shape, a.dtype)
    b[...] = a
    return b


def _warm(kernels):
    """Compile (or load from the cache) everything the timed calls use."""
    for T in (1, 5, 1024):          # quantize_rows: serial up to _config.SERIAL_MAX elements, parallel above
        xq, s, sm = np.zeros((T, 128), np.int8), np.ones(T, np.float32), np.zeros(T, np.int32)
        ternary.quantize_rows(np.zeros((T, 128), np.float32), xq, s, sm)
        p, ws, out = np.zeros((4, 32), np.uint8), np.ones(3, np.float32), np.zeros((T, 3), np.float64)
        for k in kernels:        # 3 weight rows: one row group for the kernels, 3 plain rows for the baseline
            _call(k)(xq, s, sm, p[:3] if k == "baseline" else p, ws, out)


if __name__ == "__main__":
    main()
