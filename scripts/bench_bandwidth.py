"""Measure this machine's memory read bandwidth: the ceiling of one-stream decode, which reads every weight once
per token.

    python scripts/bench_bandwidth.py                        # 1 GiB, all threads and one, best of 10
    python scripts/bench_bandwidth.py --gib 2 --threads 2 --repeat 20
    python scripts/bench_bandwidth.py --decode-tok-s 20.3 --bytes-per-token 1.19e9    # + the fraction one stream reaches

A parallel sum of a buffer far larger than the caches (uint64 lanes: the loop vectorises and the adds never bound
it), each thread over a contiguous share, as a decode step streams its weight matrices; the buffer is written once
before timing so its pages exist. The best call is kept (the machine may be shared). With ``--decode-tok-s`` and
``--bytes-per-token`` (the bytes one decode step reads: the ternary weights plus the lm_head table, e.g. 2B4T
I2_S: 521 MB + 657 MB) it prints the share of the measured bandwidth that rate uses.
"""
import argparse
import time

import numba
import numpy as np
from numba import njit, prange


@njit(parallel=True, nogil=True, boundscheck=False, fastmath=True, cache=True)
def _parallel_sum(a, parts):
    """Sum of a uint64 array, one contiguous share per part (a task per thread)."""
    n = a.shape[0]
    sums = np.zeros(parts, np.uint64)
    for p in prange(parts):
        share = a[n * p // parts:n * (p + 1) // parts]
        s = np.uint64(0)
        for i in range(share.shape[0]):       # indexed by the loop counter alone: the loop vectorises
            s += share[i]
        sums[p] = s
    return sums.sum()


def read_gbps(a, threads, repeat) -> float:
    """Best read rate in GB/s over ``repeat`` parallel sums of ``a`` with ``threads`` threads."""
    numba.set_num_threads(threads)
    _parallel_sum(a, threads)              # compile (or load from the cache) and warm up
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        _parallel_sum(a, threads)
        best = min(best, time.perf_counter() - t0)
    return a.nbytes / best / 1e9


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=1.0, help="buffer size in GiB (default 1)")
    ap.add_argument("--threads", type=int, default=0, help="threads (default: all Numba threads), then 1")
    ap.add_argument("--repeat", type=int, default=10, help="timed sums per thread count; the best is kept")
    ap.add_argument("--decode-tok-s", type=float, default=None, help="a measured one-stream decode rate")
    ap.add_argument("--bytes-per-token", type=float, default=None, help="bytes one decode step reads")
    args = ap.parse_args(argv)
    threads = args.threads or numba.config.NUMBA_NUM_THREADS
    a = np.ones(int(args.gib * 2**30) // 8, np.uint64)
    print(f"buffer {a.nbytes / 2**30:.2f} GiB, best of {args.repeat}")
    rates = {}
    for t in sorted({threads, 1}, reverse=True):
        rates[t] = read_gbps(a, t, args.repeat)
        print(f"threads {t}: {rates[t]:.1f} GB/s")
    if args.decode_tok_s and args.bytes_per_token:
        need = args.decode_tok_s * args.bytes_per_token / 1e9
        print(f"one stream at {args.decode_tok_s} tok/s reads {need:.1f} GB/s = {need / rates[threads]:.0%} of "
              f"{threads} threads' {rates[threads]:.1f} GB/s")


if __name__ == "__main__":
    main()
