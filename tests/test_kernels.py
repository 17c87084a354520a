"""Every kernel against its plain-numpy twin (tests/naive.py), on several shapes."""
import numpy as np
import pytest

import naive
from bitnet_batch.model.layout import pack_kernel, padded, unpack_kernel
from jit_kernels import activations, attention, embedding, norms, rope, ternary

RNG = np.random.default_rng(1234)


def _ternary(n, k):
    return RNG.integers(-1, 2, size=(n, k)).astype(np.int8)


@pytest.mark.parametrize("T,K", [(1, 128), (3, 256), (7, 200), (16, 640)])
def test_quantize_rows(T, K):
    x = (RNG.standard_normal((T, K)) * RNG.uniform(0.01, 20, (T, 1))).astype(np.float32)
    x[0, :3] = [0.5 / 127 * 3, -2.5 / 127 * 3, 0]         # exercise ties
    kp = padded(K)
    xq = np.full((T, kp), 99, np.int8)
    s = np.zeros(T, np.float32)
    sm = np.zeros(T, np.int32)
    ternary.quantize_rows(x, xq, s, sm)
    q_ref, s_ref, sum_ref = naive.quantize_rows(x)
    np.testing.assert_array_equal(xq[:, :K], q_ref)
    assert (xq[:, K:] == 0).all()
    np.testing.assert_array_equal(s, s_ref)
    np.testing.assert_array_equal(sm, sum_ref)


def test_quantize_zero_row_uses_floor():
    x = np.zeros((1, 128), np.float32)
    xq, s, sm = np.zeros((1, 128), np.int8), np.zeros(1, np.float32), np.zeros(1, np.int32)
    ternary.quantize_rows(x, xq, s, sm)
    assert s[0] == np.float32(127.0) / np.float32(1e-5) and (xq == 0).all()


@pytest.mark.parametrize("T,N,K", [(1, 8, 128), (5, 33, 256), (4, 17, 200), (9, 64, 640)])
def test_ternary_matmul_matches_twin(T, N, K):
    t = _ternary(N, K)
    wscale = RNG.uniform(0.1, 2.0, N).astype(np.float32)
    x = RNG.standard_normal((T, K)).astype(np.float32)
    kp = padded(K)
    xq, s, sm = np.zeros((T, kp), np.int8), np.zeros(T, np.float32), np.zeros(T, np.int32)
    ternary.quantize_rows(x, xq, s, sm)
    out = np.zeros((T, N), np.float32)
    ternary.ternary_matmul(xq, s, sm, pack_kernel(t), wscale, out)
    ref = naive.bitlinear(x, t, wscale)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_ternary_matmul_row_independent_of_batch():
    t, wscale = _ternary(40, 256), np.ones(40, np.float32)
    x = RNG.standard_normal((8, 256)).astype(np.float32)
    xq, s, sm = np.zeros((8, 256), np.int8), np.zeros(8, np.float32), np.zeros(8, np.int32)
    ternary.quantize_rows(x, xq, s, sm)
    full = np.zeros((8, 40), np.float32)
    ternary.ternary_matmul(xq, s, sm, pack_kernel(t), wscale, full)
    one = np.zeros((1, 40), np.float32)
    ternary.ternary_matmul(xq[5:6], s[5:6], sm[5:6], pack_kernel(t), wscale, one)
    np.testing.assert_array_equal(one[0], full[5])


def test_pack_kernel_roundtrip_and_rejects_bad_shapes():
    t = _ternary(6, 300)
    p = pack_kernel(t)
    assert p.shape == (6, padded(300) // 4)
    np.testing.assert_array_equal(unpack_kernel(p, 300), t)
    with pytest.raises(ValueError):
        ternary.ternary_matmul(np.zeros((1, 100), np.int8), np.ones(1, np.float32), np.zeros(1, np.int32),
                               p, np.ones(6, np.float32), np.zeros((1, 6), np.float32))
    with pytest.raises(TypeError):
        ternary.ternary_matmul(np.zeros((1, 384), np.int16), np.ones(1, np.float32), np.zeros(1, np.int32),
                               p, np.ones(6, np.float32), np.zeros((1, 6), np.float32))


@pytest.mark.parametrize("T,D", [(1, 64), (6, 256), (3, 6912)])
def test_rmsnorm(T, D):
    x = (RNG.standard_normal((T, D)) * 3).astype(np.float32)
    w = RNG.uniform(0.5, 1.5, D).astype(np.float32)
    out = np.zeros_like(x)
    norms.rmsnorm(x, w, 1e-5, out)
    np.testing.assert_allclose(out, naive.rmsnorm(x, w, 1e-5), rtol=2e-6, atol=1e-6)
    norms.rmsnorm(x, w, 1e-5, x)      # in place
    np.testing.assert_array_equal(x, out)


@pytest.mark.parametrize("hd,n_rot", [(64, 64), (128, 128), (64, 32)])
def test_rope_neox(hd, n_rot):
    T, H = 5, 3
    x = RNG.standard_normal((T, H, hd)).astype(np.float32)
    pos = np.array([0, 1, 7, 100, 4000], np.int32)
    cos, sin = rope.rope_table(4096, n_rot, 500000.0)
    y = x.copy()
    rope.rope_neox(y, pos, cos, sin)
    np.testing.assert_allclose(y, naive.rope_neox(x, pos, n_rot, 500000.0), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):
        rope.rope_neox(y, np.array([0, 1, 2, 3, 5000], np.int32), cos, sin)


@pytest.mark.parametrize("kind", ["relu2", "silu"])
def test_gated_activation(kind):
    g = RNG.standard_normal((4, 96)).astype(np.float32) * 3
    u = RNG.standard_normal((4, 96)).astype(np.float32)
    out = np.zeros_like(g)
    activations.gated_activation(g, u, activations.RELU2 if kind == "relu2" else activations.SILU, out)
    np.testing.assert_allclose(out, naive.gated(g, u, kind), rtol=1e-5, atol=1e-6)


def _paged(S, KVH, hd, bs, n_blocks, seqs_len):
    """Random K/V for len(seqs_len) sequences scattered over a shuffled block pool."""
    kc = np.zeros((n_blocks, KVH, bs, hd), np.float32)
    vc = np.zeros_like(kc)
    mb = max(-(-n // bs) for n in seqs_len)
    tables = np.full((len(seqs_len), mb), -1, np.int32)
    free = list(RNG.permutation(n_blocks))
    for s, n in enumerate(seqs_len):
        for j in range(-(-n // bs)):
            tables[s, j] = free.pop()
    return kc, vc, tables


@pytest.mark.parametrize("H,KVH,hd,bs", [(4, 2, 64, 16), (4, 4, 32, 8), (6, 1, 16, 4)])
def test_kv_write_and_attention_match_twin(H, KVH, hd, bs):
    lens = [9, 1, 23]
    kc, vc, tables = _paged(None, KVH, hd, bs, 32, lens)
    ks = [RNG.standard_normal((n, KVH, hd)).astype(np.float32) for n in lens]
    vs = [RNG.standard_normal((n, KVH, hd)).astype(np.float32) for n in lens]
    qs = [RNG.standard_normal((n, H, hd)).astype(np.float32) for n in lens]
    # one step holding all rows of all sequences (prefill of several sequences at once)
    row_seq = np.concatenate([np.full(n, s, np.int32) for s, n in enumerate(lens)])
    row_pos = np.concatenate([np.arange(n, dtype=np.int32) for n in lens])
    attention.kv_write(np.concatenate(ks), np.concatenate(vs), kc, vc, tables, row_seq, row_pos)
    q = np.concatenate(qs)
    out = np.zeros_like(q)
    attention.attention(q, kc, vc, tables, row_seq, row_pos, out)
    ref = np.concatenate([naive.causal_attention(qs[s], ks[s], vs[s]) for s in range(len(lens))])
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)
    # a decode row (last position only) gives the same values as its row in the prefill
    last = np.zeros((1, H, hd), np.float32)
    attention.attention(qs[2][-1:].copy(), kc, vc, tables, np.array([2], np.int32), np.array([22], np.int32), last)
    np.testing.assert_array_equal(last[0], out[-1])


def test_attention_rejects_position_beyond_table():
    kc, vc, tables = _paged(None, 1, 8, 4, 4, [4])
    with pytest.raises(ValueError):
        attention.attention(np.zeros((1, 1, 8), np.float32), kc, vc, tables, np.array([0], np.int32),
                            np.array([4], np.int32), np.zeros((1, 1, 8), np.float32))


@pytest.mark.parametrize("kind", [embedding.F16, embedding.BF16, embedding.F32])
def test_embed_and_lm_head(kind):
    import numba
    V, D, R = 300, 96, 3
    table32 = (RNG.standard_normal((V, D)) * 0.1).astype(np.float32)
    table32[0, :4] = [6e-8, -3e-5, 65504.0, 0.0]              # f16 subnormals and the max normal
    if kind == embedding.F16:
        table = table32.astype(np.float16).view(np.uint16)
        wide = table.view(np.float16).astype(np.float32)
    elif kind == embedding.BF16:
        table = (table32.view(np.uint32) >> 16).astype(np.uint16)
        wide = (table.astype(np.uint32) << 16).view(np.float32)
    else:
        table, wide = table32, table32
    toks = np.array([0, 5, 299], np.int32)
    e = np.zeros((3, D), np.float32)
    embedding.embed(toks, table, kind, e)
    np.testing.assert_array_equal(e, wide[toks])
    x = RNG.standard_normal((8, D)).astype(np.float32)
    out = np.zeros((8, V - 1), np.float32)                   # odd vocabulary: the last pair repeats a row
    scratch = np.zeros((numba.config.NUMBA_NUM_THREADS, 2 * D), np.float32)
    embedding.lm_head(x, table[:V - 1], kind, scratch, out)
    np.testing.assert_allclose(out, x.astype(np.float64) @ wide[:V - 1].astype(np.float64).T, rtol=1e-4, atol=1e-3)
    # a row's logits do not depend on its place in the 4-row tile or on the other rows
    alone = np.zeros((4, V - 1), np.float32)
    embedding.lm_head(np.vstack([x[6:7], np.zeros((3, D), np.float32)]), table[:V - 1], kind, scratch, alone)
    np.testing.assert_array_equal(alone[0], out[6])
    with pytest.raises(ValueError):
        embedding.lm_head(x[:3], table, kind, scratch, out)
