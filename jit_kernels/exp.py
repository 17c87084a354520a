"""A vectorisable float64 exp for arguments <= 0 (the attention's softmax, the SiLU activation)."""
import numpy as np
from numba import njit

from ._config import JIT_CONTRACT
from .bits import f64_bits, f64_from_bits

# float64 exp of t <= 0: Cephes exp (Cody-Waite range reduction t = n ln2 + r, |r| <= ln2 / 2, and Cephes' rational
# form e^r = 1 + 2 r P(r^2) / (Q(r^2) - r P(r^2))), 2^n built from its exponent bits. Within 2 ulp of numpy's exp
# (measured over 2.2 million arguments) and exactly 1 at 0; below ln(2^-1022) the result is 0 (no subnormals: a softmax
# weight under 1e-308 of the largest one adds nothing).
# Vectorises 4-wide, where numpy's exp is a call per element (the softmax was a quarter of the attention's time).
_LOG2E = 1.4426950408889634074
_LN2_HI = 6.93145751953125e-1                     # ln 2 = _LN2_HI + _LN2_LO; n * _LN2_HI is exact
_LN2_LO = 1.42860682030941723212e-6
_EXP_MIN = -7.08396418532264106224e2              # ln(2^-1022)
_TWO52_PLUS_BIAS = 4503599627371519.0              # 2^52 + 1023: adding it puts n + 1023 in the low bits
_P0, _P1, _P2 = 1.26177193074810590878e-4, 3.02994407707441961300e-2, 9.99999999999999999910e-1
_Q0, _Q1, _Q2, _Q3 = 3.00198505138664455042e-6, 2.52448340349684104192e-3, 2.27265548208155028766e-1, 2.0


@njit(inline="always", **JIT_CONTRACT)
def exp_nonpositive(t):
    """exp(t) for float64 t <= 0 (positive t is treated as 0); NaN stays NaN."""
    c = min(max(t, _EXP_MIN), 0.0)
    n = np.floor(c * _LOG2E + 0.5)
    r = c - n * _LN2_HI
    r = r - n * _LN2_LO
    rr = r * r
    px = r * ((_P0 * rr + _P1) * rr + _P2)
    e = 1.0 + 2.0 * (px / ((((_Q0 * rr + _Q1) * rr + _Q2) * rr + _Q3) - px))
    v = e * f64_from_bits(f64_bits(n + _TWO52_PLUS_BIAS) << np.uint64(52)) if t >= _EXP_MIN else 0.0
    return t if t != t else v
