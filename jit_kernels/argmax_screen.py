"""The candidate search of the argmax lm_head: from a screen's approximate logits A_v and a proven bound eps_v on
|A_v - R_v| (R_v the float32 lm_head's logit), the rows that may hold a row's maximum (or its k largest logits).

Every row v with A_v + eps_v < L, where L is the k-th largest of A_u - eps_u, has R_v below k others' (each of
those is >= L), so the k largest float32 logits, ties included, are among the candidates {v : A_v + eps_v >= L}.
Computing R exactly for the candidates alone (a few dozen of a vocabulary of 128k, for a peaked row) gives the
same argmax, and the same first index among equal maxima, as the whole float32 lm_head.

The two screens write their logits in one form: A_v = xscale[r] wscale[v] approx[r, v] and eps_v = P[r] E[v] +
Q[r] W[v]. ``lm_head_bf16``: approx the bf16 logits (float32), scales 1, P = 0, Q = c ||x||, W the row norms.
``lm_head_int8``: approx the integer dots (int32), the row's and the table row's scales, P / Q from the row's
quantization, E / W the table's residual and row norms.
"""
import numpy as np
from numba import njit, prange

from ._config import JIT, JIT_PARALLEL

_ABS_SLACK = 1e-20   # covers vdpbf16ps treating subnormal inputs and results as zero (< Dp 2^-126 |w|)
_REL_SLACK = 1e-12   # covers float64 rounding in A_v +- eps_v


def argmax_candidates(approx, xscale, wscale, P, E, Q, W, cand, counts, allowed, ks, best, out):
    """For each row r < R = len(counts): the vocabulary rows v allowed by ``allowed[r]`` (int32 words [ceil(V/32)],
    bit j of word i: v = 32 i + j; all bits set: every row) with A_v + eps_v >= L, L the ks[r]-th largest of
    A_u - eps_u over the allowed u (the maximum for ks[r] = 1; -inf where fewer are allowed), into
    cand[r, :counts[r]] in increasing order (module docstring: approx float32 or int32 [>= R, V]; xscale, P, Q
    float64 [>= R]; wscale float64 [V], or [0] for scales of 1; E, W float64 [V]). Then out[r] (float32 [>= R,
    V], which may be approx's memory) is set to -inf, ready for the candidates' exact logits. counts[r] = -1 (and
    out[r] left as it is) where a value is not finite or more than cand.shape[1] rows qualify: that row wants the
    whole float32 lm_head. ks int64 [>= R], 1 <= ks[r] <= best.shape[1]; best: float64 [>= R, k max] scratch."""
    R = counts.shape[0]
    V = W.shape[0]
    rows = (xscale, P, Q)
    if approx.dtype not in (np.float32, np.int32) or approx.ndim != 2 or approx.shape[0] < R \
            or approx.shape[1] != V or any(a.dtype != np.float64 or a.ndim != 1 or a.shape[0] < R for a in rows) \
            or any(a.dtype != np.float64 or a.shape != (V,) for a in (E, W)) or wscale.dtype != np.float64 \
            or wscale.shape not in ((V,), (0,)) or out.dtype != np.float32 or out.ndim != 2 or out.shape[0] < R \
            or out.shape[1] != V or cand.dtype != np.int64 or cand.ndim != 2 or cand.shape[0] < R \
            or counts.dtype != np.int64 or allowed.dtype != np.int32 or allowed.ndim != 2 \
            or allowed.shape[0] < R or allowed.shape[1] != -(-V // 32) or ks.dtype != np.int64 or ks.shape[0] < R \
            or best.dtype != np.float64 or best.ndim != 2 or best.shape[0] < R \
            or (R and not 1 <= ks[:R].min() <= ks[:R].max() <= best.shape[1]):
        raise ValueError(f"argmax_candidates: approx {approx.shape} {approx.dtype}, xscale / P / Q "
                         f"{[a.shape for a in rows]}, wscale {wscale.shape}, E {E.shape}, W {W.shape}, out "
                         f"{out.shape} {out.dtype}, cand {cand.shape} {cand.dtype}, counts {counts.shape} "
                         f"{counts.dtype}, allowed {allowed.shape} {allowed.dtype}, ks {ks.shape} {ks.dtype}, best "
                         f"{best.shape}")
    _argmax_candidates(approx, xscale, wscale, P, E, Q, W, cand, counts, allowed, ks, best, out)


@njit(inline="always", **JIT)
def _value(row, v, s, wscale):
    a = s * np.float64(row[v])
    return a * wscale[v] if wscale.shape[0] else a


@njit(inline="always", **JIT)
def _eps(a, p, e, q, w):
    return p * e + q * w + _REL_SLACK * abs(a) + _ABS_SLACK


@njit(**JIT_PARALLEL)
def _argmax_candidates(approx, xscale, wscale, P, E, Q, W, cand, counts, allowed, ks, best, out):
    V = W.shape[0]
    cap = cand.shape[1]
    for r in prange(counts.shape[0]):
        row, bits, k = approx[r], allowed[r], ks[r]
        s, p, q = xscale[r], P[r], Q[r]
        bad = 0 if np.isfinite(s) and np.isfinite(p) and np.isfinite(q) else 1
        top = best[r, :k]           # the k largest lower bounds, with their minimum at top[low]
        top[:] = -np.inf
        low = 0
        for v in range(V):
            a = _value(row, v, s, wscale)
            bad += 0 if np.isfinite(a) else 1
            if (bits[v >> 5] >> (v & 31)) & 1:
                b = a - _eps(a, p, E[v], q, W[v])
                if b > top[low]:
                    top[low] = b
                    for j in range(k):
                        if top[j] < top[low]:
                            low = j
        lo = top[low]
        if bad:
            counts[r] = -1
            continue
        n = 0
        for v in range(V):
            a = _value(row, v, s, wscale)
            if (bits[v >> 5] >> (v & 31)) & 1 and a + _eps(a, p, E[v], q, W[v]) >= lo:
                if n < cap:
                    cand[r, n] = v
                n += 1
        if n > cap:
            counts[r] = -1
            continue
        counts[r] = n
        out[r] = -np.inf
