"""The int8 screen of the argmax lm_head (``jit_kernels.lm_head_int8``) against numpy twins: the quantized table
and rows, the exact integer dots on every kernel family this CPU runs, and the screen's bound entry by entry; and
the reads of its candidates' rows from the file (``buffers.read_rows``)."""
import os

import numba
import numpy as np
import pytest

from jit_kernels import embedding
from jit_kernels import lm_head_int8 as I
from jit_kernels._cpu import AVAILABLE


def quantize_twin(w):
    """(q int64 [D], s, ||w - s q||, ||w||) in float64, as the module docstring defines them."""
    w = w.astype(np.float64)
    amax = np.abs(w).max()
    if amax == 0:
        return np.zeros(len(w), np.int64), 0.0, 0.0, 0.0
    s = amax / 127
    q = np.clip(np.rint(w / s), -127, 127).astype(np.int64)
    return q, s, np.linalg.norm(w - s * q), np.linalg.norm(w)


def table_of(kind, V, D, rng):
    w = (rng.standard_normal((V, D)) * 0.05).astype(np.float32)
    w[3] = 0                                              # a zero row
    w[5, 7] = 40.0                                        # a row with one outlier
    if kind == embedding.F16:
        w = w.astype(np.float16)
        return w.view(np.uint16), w.astype(np.float32)
    if kind == embedding.BF16:
        bits = (w.view(np.uint32) >> 16).astype(np.uint16)
        return bits, (bits.astype(np.uint32) << 16).view(np.float32)
    return w, w


def make_table(table, kind):
    V, D = table.shape
    codes = np.zeros((V, I.padded_dim(D)), np.uint8)
    scale, enorm, wnorm = np.zeros((3, V))
    I.int8_table(table, kind, codes, scale, enorm, wnorm)
    return codes, scale, enorm, wnorm


@pytest.mark.parametrize("kind", [embedding.F16, embedding.BF16, embedding.F32])
def test_table_matches_the_twin(kind):
    rng = np.random.default_rng(0)
    table, w = table_of(kind, 97, 200, rng)               # 200: 56 columns of padding
    codes, scale, enorm, wnorm = make_table(table, kind)
    for v in range(len(w)):
        q, s, e, n = quantize_twin(w[v])
        assert np.array_equal(codes[v, :200].astype(np.int64) - 128, q) and np.all(codes[v, 200:] == 128)
        assert scale[v] == s
        assert e <= enorm[v] <= e * (1 + 1e-9) + 1e-12 and n <= wnorm[v] <= n * (1 + 1e-9) + 1e-300
    assert scale[3] == enorm[3] == wnorm[3] == 0 and np.all(codes[3] == 128)
    assert codes[5, 7] == 255 and enorm[5] > 10 * np.median(enorm)       # the outlier sets the row's step


def test_rows_match_the_twin_and_a_bad_value_marks_its_row():
    rng = np.random.default_rng(1)
    D = 130
    x = (rng.standard_normal((4, D)) * 10.0 ** rng.integers(-4, 4, (4, 1))).astype(np.float32)
    x[2] = 0
    x[3, 9] = np.inf
    xq = np.full((5, I.padded_dim(D)), 7, np.int8)
    xsum = np.zeros(5, np.int32)
    xscale, P, Q = np.zeros((3, 5))
    I.quantize_rows(x, xq, xsum, xscale, P, Q)
    gamma = I.f32_sum_bound(D)
    for r in range(3):
        q, s, e, n = quantize_twin(x[r])
        assert np.array_equal(xq[r, :D], q) and np.all(xq[r, D:] == 0) and xsum[r] == q.sum()
        assert xscale[r] == s
        assert s * np.linalg.norm(q) <= P[r] <= s * np.linalg.norm(q) * (1 + 1e-9)
        assert e + gamma * n <= Q[r] <= (e + gamma * n) * (1 + 1e-9) + 1e-300
    assert P[2] == Q[2] == xscale[2] == 0
    assert np.isnan(P[3]) and np.isnan(Q[3])
    assert np.all(xq[4] == 7)                                # rows past R untouched
    with pytest.raises(ValueError, match="quantize_rows"):
        I.quantize_rows(x, xq[:, :-64], xsum, xscale, P, Q)


@pytest.mark.parametrize("kernel", AVAILABLE)
@pytest.mark.parametrize("R", [1, 3, 4, 9])
def test_dots_are_exact_on_every_family(kernel, R):
    """Every tile shape (6 x 4, 1 x 4, 8 x 1, 1 x 1; V = 6 * 20 + 5 vocabulary rows over tasks of 64), and the
    extreme codes: the integer dots of the numpy twin."""
    rng = np.random.default_rng(R)
    V, Dp = 125, 256
    codes = rng.integers(0, 256, (V, Dp), dtype=np.uint8)
    codes[0] = 255
    codes[1] = 0
    xq = rng.integers(-127, 128, (R, Dp), dtype=np.int8)
    xq[0] = -127
    xsum = xq.astype(np.int32).sum(1, dtype=np.int32)
    out = np.zeros((R + 1, V), np.int32)
    I.lm_head_int8(xq, xsum, codes, out, kernel=kernel)
    np.testing.assert_array_equal(out[:R], xq.astype(np.int64) @ (codes.astype(np.int64) - 128).T)
    assert np.all(out[R] == 0)


def test_dots_check_their_inputs():
    codes, xq, xsum = np.zeros((5, 64), np.uint8), np.zeros((2, 64), np.int8), np.zeros(2, np.int32)
    for args in ((xq, xsum, codes, np.zeros((2, 5), np.float32)), (xq, xsum, codes[:, :32], np.zeros((2, 5), np.int32)),
                 (xq.view(np.uint8), xsum, codes, np.zeros((2, 5), np.int32))):
        with pytest.raises(ValueError, match="lm_head_int8"):
            I.lm_head_int8(*args)
    with pytest.raises(ValueError, match="kernel"):
        I.lm_head_int8(xq, xsum, codes, np.zeros((2, 5), np.int32), kernel="sse")


@pytest.mark.parametrize("kind", [embedding.F16, embedding.BF16, embedding.F32])
def test_the_bound_holds_for_every_entry(kind):
    """|A - R| <= P E + Q W for every entry, R the float32 lm_head's logit (its SIMD tiles where this CPU has them,
    else the plain loop), on rows of every scale, a row with an outlier and a table row with one."""
    rng = np.random.default_rng(2)
    V, D = 301, 264
    table, w = table_of(kind, V, D, rng)
    codes, scale, enorm, wnorm = make_table(table, kind)
    R = 8
    x = (rng.standard_normal((R, D)) * 10.0 ** rng.integers(-3, 3, (R, 1))).astype(np.float32)
    x[1, 100] = 500.0                                      # an outlier sets the row's step
    exact = np.zeros((R, V), np.float32)
    embedding.lm_head(x, table, kind, embedding.lm_head_scratch(numba.config.NUMBA_NUM_THREADS, D), exact)
    xq = np.zeros((R, I.padded_dim(D)), np.int8)
    xsum = np.zeros(R, np.int32)
    xscale, P, Q = np.zeros((3, R))
    I.quantize_rows(x, xq, xsum, xscale, P, Q)
    dots = np.zeros((R, V), np.int32)
    I.lm_head_int8(xq, xsum, codes, dots)
    approx = xscale[:, None] * scale[None, :] * dots
    eps = P[:, None] * enorm[None, :] + Q[:, None] * wnorm[None, :]
    gap = np.abs(approx - exact.astype(np.float64))
    assert np.all(gap <= eps) and gap.max() > 0
    assert 0.02 < (gap / np.where(eps > 0, eps, 1)).max() < 1     # and the bound is not vacuous


def test_read_rows_reads_scattered_rows_of_a_file(tmp_path):
    """``buffers.read_rows``: the rows of a table at an offset in a file, in the order asked, by both threads; rows
    past the end of the file count as short."""
    from jit_kernels.buffers import read_rows

    table = np.arange(50 * 12, dtype=np.uint16).reshape(50, 12)
    path = tmp_path / "t.bin"
    path.write_bytes(b"x" * 100 + table.tobytes())
    rows = np.array([7, 0, 49, 7, 23], np.int64)
    out = np.zeros((6, 12), np.uint16)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert read_rows(fd, 100, rows, out) == 0
        np.testing.assert_array_equal(out[:5], table[rows])
        assert np.all(out[5] == 0)
        assert read_rows(fd, 100, np.array([48, 50, 51], np.int64), out) == 2
        with pytest.raises(ValueError, match="read_rows"):
            read_rows(fd, 100, rows.astype(np.int32), out)
    finally:
        os.close(fd)
