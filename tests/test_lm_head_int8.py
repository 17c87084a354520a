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


def row_twin(x, K):
    """A logit row as ``quantize_rows`` defines it, in float64: (int8 codes, 0 at the outliers; outlier columns and
    coefficients, K slots; sx; ||x - x^||; ||x^||; ||x||)."""
    x = x.astype(np.float64)
    a = np.abs(x)
    if not a.any():
        return np.zeros(len(x), np.int64), np.zeros(K, np.int64), np.zeros(K, np.int64), 0.0, 0.0, 0.0, 0.0
    top = sorted(range(len(x)), key=lambda d: (-a[d], d))[:K]
    limit = I.OUTLIER_RMS * np.sqrt(np.delete(a, top) @ np.delete(a, top) / max(len(x) - len(top), 1))
    order = [d for d in top if a[d] > limit]
    bulk = np.delete(a, order).max(initial=0.0)
    s = max(bulk / 127, a.max() / I.COEF_MAX)
    k = np.rint(x / s)
    q = np.clip(k, -127, 127).astype(np.int64)
    q[order] = 0
    dims, coef = np.zeros(K, np.int64), np.zeros(K, np.int64)
    dims[:len(order)], coef[:len(order)] = order, k[order]
    xhat = s * k
    return q, dims, coef, s, np.linalg.norm(x - xhat), np.linalg.norm(xhat), np.linalg.norm(x)


def quantized_rows(x, K=I.OUTLIERS, pad=0):
    R, D = x.shape
    xq = np.full((R + pad, I.padded_dim(D)), 7, np.int8)
    xsum = np.zeros(R + pad, np.int32)
    xscale, P, Q = np.zeros((3, R + pad))
    odims, ocoef = np.full((R + pad, K), 3, np.int64), np.full((R + pad, K), 5, np.int32)
    I.quantize_rows(x, xq, xsum, xscale, P, Q, odims, ocoef)
    return xq, xsum, xscale, P, Q, odims, ocoef


def test_rows_match_the_twin_and_a_bad_value_marks_its_row():
    rng = np.random.default_rng(1)
    D = 130
    x = (rng.standard_normal((9, D)) * 10.0 ** rng.integers(-4, 4, (9, 1))).astype(np.float32)
    x[2] = 0
    x[3, 9] = np.inf
    x[4:6] = rng.standard_normal((2, D))
    x[4, [5, 50, 77]] = [300.0, -2e3, 41.0]                 # outliers among values of ~1: coefficients
    x[5, 3:14] = 50.0 * np.arange(1, 12)                    # more than K = 8 of them: the 8 largest
    x[5, 100] = 550.0                                       # ... equal ones in column order
    x[6] = 0
    x[6, 17] = -3.0                                         # a single value: no bulk at all
    x[7, 0] = 1e30                                          # beyond COEF_MAX x the bulk: the step grows
    x[8, 1] = np.nan
    xq, xsum, xscale, P, Q, odims, ocoef = quantized_rows(x, pad=1)
    gamma = I.f32_sum_bound(D)
    for r in (0, 1, 2, 4, 5, 6, 7):
        q, dims, coef, s, e, n_hat, n = row_twin(x[r], I.OUTLIERS)
        assert np.array_equal(xq[r, :D], q) and np.all(xq[r, D:] == 0) and xsum[r] == q.sum(), r
        assert np.array_equal(odims[r], dims) and np.array_equal(ocoef[r], coef), r
        assert xscale[r] == s
        assert n_hat <= P[r] <= n_hat * (1 + 1e-9), r
        slack = np.sqrt(D) * np.abs(x[r]).max() * 2.0 ** -49      # float64 rounding of the residuals
        assert e + gamma * n <= Q[r] <= (e + gamma * n) * (1 + 1e-9) + slack, r
    assert np.count_nonzero(ocoef[4]) == 3 and set(odims[4, :3]) == {5, 50, 77}
    assert list(odims[5]) == [13, 100, 12, 11, 10, 9, 8, 7] and xscale[5] == 200.0 / 127
    assert list(odims[6]) == [17] + [0] * 7 and ocoef[6, 0] == -I.COEF_MAX and xsum[6] == 0
    assert xscale[7] == np.float64(x[7, 0]) / I.COEF_MAX and ocoef[7, 0] == I.COEF_MAX
    assert P[2] == Q[2] == xscale[2] == 0 and not ocoef[2].any()
    for r in (3, 8):
        assert np.isnan(P[r]) and np.isnan(Q[r]) and not ocoef[r].any()
    assert np.all(xq[9] == 7) and np.all(ocoef[9] == 5)       # rows past R untouched
    # an outlier leaves the step of the others as it was: the bound stays near the row's without it
    base = quantized_rows(x[:1])
    assert Q[4] < 2 * base[4][0] * np.linalg.norm(x[4]) / np.linalg.norm(x[0])
    xq, xsum, xscale, P, Q, odims, ocoef = quantized_rows(x[:2])
    with pytest.raises(ValueError, match="quantize_rows"):
        I.quantize_rows(x[:2], xq[:, :-64], xsum, xscale, P, Q, odims, ocoef)
    with pytest.raises(ValueError, match="quantize_rows"):
        I.quantize_rows(x[:2], xq, xsum, xscale, P, Q, odims, ocoef.astype(np.int64))
    no_outliers = quantized_rows(x[4:5], K=0)
    assert no_outliers[2][0] == np.float64(np.abs(x[4]).max()) / 127   # K = 0: a plain absmax row


def dots_twin(xq, odims, ocoef, codes):
    w = codes.astype(np.int64) - 128
    out = xq.astype(np.int64) @ w.T
    for j in range(odims.shape[1]):
        out += ocoef[:, j:j + 1].astype(np.int64) * w[:, odims[:, j]].T
    return out


@pytest.mark.parametrize("kernel", AVAILABLE)
@pytest.mark.parametrize("R", [1, 3, 4, 9, 17, 33, 40])
def test_dots_are_exact_on_every_family(kernel, R):
    """Every tile shape (vpdpbusd: 6 x 4, 1 x 4, 8 x 1, 1 x 1; amx from 5 rows: 2 x 2, 1 x 2, 2 x 1, 1 x 1 table x
    token tiles, a last token tile of 1-16 rows, the rows past a task's last 16 on the vpdpbusd tiles; V = 6 * 20
    + 5 vocabulary rows over tasks of 64), the extreme codes and the outliers' terms (extreme coefficients, unused
    slots): the integer dots of the numpy twin."""
    rng = np.random.default_rng(R)
    V, Dp, K = 125, 256, 3
    codes = rng.integers(0, 256, (V, Dp), dtype=np.uint8)
    codes[0] = 255
    codes[1] = 0
    xq = rng.integers(-127, 128, (R, Dp), dtype=np.int8)
    xq[0] = -127
    xsum = xq.astype(np.int32).sum(1, dtype=np.int32)
    odims = rng.integers(0, Dp, (R, K))
    ocoef = rng.integers(-I.COEF_MAX, I.COEF_MAX + 1, (R, K)).astype(np.int32)
    ocoef[0] = [-I.COEF_MAX, I.COEF_MAX, 0]
    ocoef[R // 2, 1:] = 0
    out = np.zeros((R + 1, V), np.int32)
    I.lm_head_int8(xq, xsum, odims, ocoef, codes, out, kernel=kernel)
    np.testing.assert_array_equal(out[:R], dots_twin(xq, odims, ocoef, codes))
    assert np.all(out[R] == 0)


def test_dots_check_their_inputs():
    codes, xq, xsum = np.zeros((5, 64), np.uint8), np.zeros((2, 64), np.int8), np.zeros(2, np.int32)
    od, oc = np.zeros((2, 1), np.int64), np.zeros((2, 1), np.int32)
    out = np.zeros((2, 5), np.int32)
    for args in ((xq, xsum, od, oc, codes, out.astype(np.float32)), (xq, xsum, od, oc, codes[:, :32], out),
                 (xq.view(np.uint8), xsum, od, oc, codes, out), (xq, xsum, od, oc.astype(np.int64), codes, out),
                 (xq, xsum, od + 64, oc, codes, out), (xq, xsum, od, oc - I.COEF_MAX - 1, codes, out)):
        with pytest.raises(ValueError, match="lm_head_int8"):
            I.lm_head_int8(*args)
    with pytest.raises(ValueError, match="kernel"):
        I.lm_head_int8(xq, xsum, od, oc, codes, out, kernel="sse")


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
    x[1, 100] = 500.0                                      # outliers: coefficients
    x[2, [3, 9, 200]] = [-80.0, 3e3, 41.0]
    x[3] = 0
    x[3, 17] = 2.5                                         # a single value
    x[4, 0] = 1e25                                         # the step set by COEF_MAX
    exact = np.zeros((R, V), np.float32)
    embedding.lm_head(x, table, kind, embedding.lm_head_scratch(numba.config.NUMBA_NUM_THREADS, D), exact)
    xq, xsum, xscale, P, Q, odims, ocoef = quantized_rows(x)
    assert np.count_nonzero(ocoef[1]) == 1 and np.count_nonzero(ocoef[2]) == 3
    dots = np.zeros((R, V), np.int32)
    I.lm_head_int8(xq, xsum, odims, ocoef, codes, dots)
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
