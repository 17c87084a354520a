"""Plain-numpy twins of every kernel (slow, obvious, float64 where it helps). Tests compare against these."""
import numpy as np


def quantize_rows(x):
    """-> (int8 [T, K], scale float32 [T], sum int32 [T]) per-token absmax int8 (round half to even)."""
    x = np.asarray(x, np.float32)
    amax = np.maximum(np.abs(x).max(axis=1), np.float32(1e-5)).astype(np.float32)
    s = (np.float32(127.0) / amax).astype(np.float32)
    q = np.clip(np.rint(x * s[:, None]), -128, 127).astype(np.int8)
    return q, s, q.astype(np.int32).sum(axis=1)


def ternary_matmul(xq, xscale, t, wscale):
    """xq int8 [T, K]; t int8 ternary [N, K]; -> float64 [T, N] = (xq . t) / s_t * wscale."""
    acc = xq.astype(np.int64) @ t.astype(np.int64).T
    return acc / xscale.astype(np.float64)[:, None] * wscale.astype(np.float64)[None, :]


def bitlinear(x, t, wscale):
    q, s, _ = quantize_rows(x)
    return ternary_matmul(q, s, t, wscale)


def rmsnorm(x, w, eps):
    x = np.asarray(x, np.float64)
    return w * x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps)


def rope_neox(x, pos, n_rot, base):
    """x [T, H, hd] float64 -> rotated copy."""
    x = np.array(x, np.float64)
    half = n_rot // 2
    inv = base ** (-np.arange(0, n_rot, 2, dtype=np.float64) / n_rot)
    ang = np.asarray(pos, np.float64)[:, None] * inv[None, :]
    c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    a, b = x[..., :half].copy(), x[..., half:2 * half].copy()
    x[..., :half] = a * c - b * s
    x[..., half:2 * half] = a * s + b * c
    return x


def causal_attention(q, k, v):
    """One sequence: q [T, H, hd], k/v [S, KVH, hd] for positions 0..S-1, row t at position S-T+t (all of 0..p,
    scores times 1 / sqrt(hd))."""
    return causal_attention_window(q, k, v, 0, 1.0 / np.sqrt(q.shape[2]))


def gated(g, u, kind):
    g = np.asarray(g, np.float64)
    if kind == "relu2":
        return np.maximum(g, 0) ** 2 * u
    return g / (1 + np.exp(-g)) * u


def f16_bits_to_f32(bits):
    return np.asarray(bits, np.uint16).view(np.float16).astype(np.float32)


def forward(cfg, layers, embd, output, output_norm, tokens):
    """Whole-sequence float64 reference of the BitNet forward (per-token int8 activations, exact ternary).

    layers: list of dicts of numpy arrays: attn_norm, q/k/v/o (t int8 [N, K], scale), attn_sub_norm, ffn_norm,
    gate/up/down, ffn_sub_norm."""
    T = len(tokens)
    x = embd[np.asarray(tokens)].astype(np.float64)
    H, KVH, hd = cfg.n_head, cfg.n_head_kv, cfg.head_dim
    pos = np.arange(T)
    for L in layers:
        h = rmsnorm(x, L["attn_norm"], cfg.rms_eps).astype(np.float32)
        q = bitlinear(h, *L["q"]).reshape(T, H, hd)
        k = bitlinear(h, *L["k"]).reshape(T, KVH, hd)
        v = bitlinear(h, *L["v"]).reshape(T, KVH, hd)
        q, k = rope_neox(q, pos, cfg.n_rot, cfg.rope_base), rope_neox(k, pos, cfg.n_rot, cfg.rope_base)
        a = causal_attention(q, k, v).reshape(T, H * hd)
        a = rmsnorm(a, L["attn_sub_norm"], cfg.rms_eps).astype(np.float32)
        x = x + bitlinear(a, *L["o"])
        h = rmsnorm(x, L["ffn_norm"], cfg.rms_eps).astype(np.float32)
        m = gated(bitlinear(h, *L["gate"]), bitlinear(h, *L["up"]), cfg.ffn_act)
        m = rmsnorm(m, L["ffn_sub_norm"], cfg.rms_eps).astype(np.float32)
        x = x + bitlinear(m, *L["down"])
    x = rmsnorm(x, output_norm, cfg.rms_eps)
    return x @ output.astype(np.float64).T


def gelu_tanh(g, u):
    """gelu (tanh approximation, transformers ``gelu_pytorch_tanh``) of g times u, float64."""
    g = np.asarray(g, np.float64)
    return 0.5 * g * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (g + 0.044715 * g ** 3))) * u


def paged_cache(kvh, hd, bs, n_blocks, lens, dtype, rng):
    """Empty K/V caches in the kernels' layout (float32, or uint16 float16 bits) [kvh, n_blocks, bs, hd] and a
    block table giving sequences of ``lens`` positions blocks drawn from a shuffled pool (-1: none)."""
    kc = np.zeros((kvh, n_blocks, bs, hd), dtype)
    tables = np.full((len(lens), max(-(-n // bs) for n in lens)), -1, np.int32)
    free = list(rng.permutation(n_blocks))
    for s, n in enumerate(lens):
        for j in range(-(-n // bs)):
            tables[s, j] = free.pop()
    return kc, np.zeros_like(kc), tables


def causal_attention_window(q, k, v, window, scale):
    """One sequence: q [T, H, hd], k/v [S, KVH, hd]; row t at position S-T+t attends to positions
    max(0, p - window + 1)..p (all of 0..p when window <= 0), scores times ``scale``."""
    T, H, hd = q.shape
    S, KVH, _ = k.shape
    g = H // KVH
    out = np.zeros((T, H, hd))
    for t in range(T):
        p = S - T + t
        lo = max(0, p - window + 1) if window > 0 else 0
        for h in range(H):
            sc = (k[lo:p + 1, h // g] @ q[t, h]) * scale
            w = np.exp(sc - sc.max())
            out[t, h] = (w / w.sum()) @ v[lo:p + 1, h // g]
    return out
