"""Layers against straightforward float64 numpy re-computations."""

import numpy as np
import jax.numpy as jnp

from huginn_jax.layers import apply_rope, dot_product_attention, rms_norm, rope_angles


def test_rms_norm_matches_float64():
    rng = np.random.default_rng(0)
    x, w = rng.normal(size=(3, 5, 64)) * 7, rng.normal(size=64)
    want = x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-6) * w
    got = rms_norm(jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32), 1e-6)
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-6, atol=2e-6)


def test_rms_norm_of_bfloat16_accumulates_in_float32():
    # A bfloat16 running sum of 4096 ones stalls at 256; accumulated in float32 the rms is exactly 1.
    x = jnp.ones((1, 4096), jnp.bfloat16) * 3
    got = rms_norm(x, jnp.ones(4096, jnp.bfloat16), 1e-6)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), 1.0, rtol=1e-2)


def test_rope_rotates_adjacent_pairs_like_complex_multiplication():
    rng = np.random.default_rng(1)
    b, t, h, d, base = 2, 6, 3, 8, 50000.0
    x = rng.normal(size=(b, t, h, d))
    positions = np.array([[0, 1, 2, 3, 4, 5], [7, 9, 11, 100, 200, 255]])
    inv_freq = base ** (-np.arange(0, d, 2) / d)
    phase = np.exp(1j * positions[..., None] * inv_freq)[:, :, None, :]
    z = (x[..., 0::2] + 1j * x[..., 1::2]) * phase
    want = np.stack([z.real, z.imag], axis=-1).reshape(x.shape)
    cos, sin = rope_angles(jnp.asarray(positions), d, base)
    got = apply_rope(jnp.asarray(x, jnp.float32), cos, sin)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


def naive_attention(q, k, v, q_pos, k_pos):
    """Loops over every query: softmax over the keys at positions <= its own."""
    b, t, h, d = q.shape
    kv = k.shape[1]
    out = np.zeros((b, t, h, d))
    for bi in range(b):
        for ti in range(t):
            for hi in range(h):
                kh = hi // (h // kv)
                visible = k_pos[min(bi, len(k_pos) - 1)] <= q_pos[bi, ti]
                s = k[bi, kh] @ q[bi, ti, hi] / np.sqrt(d)
                s = np.where(visible, s, -np.inf)
                p = np.exp(s - s.max())
                out[bi, ti, hi] = (p / p.sum()) @ v[bi, kh]
    return out.reshape(b, t, h * d)


def test_attention_with_grouped_heads_matches_naive_loops():
    rng = np.random.default_rng(2)
    b, t, s, h, kv, d = 2, 3, 7, 4, 2, 8
    q = rng.normal(size=(b, t, h, d))
    k, v = rng.normal(size=(b, kv, s, d)), rng.normal(size=(b, kv, s, d))
    q_pos = np.array([[2, 3, 4], [4, 5, 6]])
    k_pos = np.arange(s)[None]
    got = dot_product_attention(*(jnp.asarray(a, jnp.float32) for a in (q, k, v)), jnp.asarray(q_pos),
                                jnp.asarray(k_pos))
    np.testing.assert_allclose(np.asarray(got), naive_attention(q, k, v, q_pos, k_pos), rtol=1e-5, atol=1e-5)
