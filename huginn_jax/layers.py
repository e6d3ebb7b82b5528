"""The building blocks of a Huginn model as pure functions over parameter dicts.

Shapes: B batch, T tokens in this call, S key positions, E width, H heads, K kv heads,
D head dim, M intermediate size.

Under a device mesh, `sharding.constrain` pins queries, keys and values to (rows, heads), the
MLP's hidden activations to (rows, mlp) and every block's output to rows (the residual stream is
replicated over the model axis); without one it does nothing.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from huginn_jax.config import HuginnConfig
from huginn_jax.kv_cache import KVCache, LayerRef
from huginn_jax.sharding import constrain

Array = jax.Array


def rms_norm(x: Array, weight: Array, eps: float) -> Array:
    """RMSNorm computed in float32, cast back to x's dtype, then scaled (the reference's order)."""
    xf = x.astype(jnp.float32)
    normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return normed.astype(x.dtype) * weight.astype(x.dtype)


def rope_angles(positions: Array, head_dim: int, base: float) -> tuple[Array, Array]:
    """cos, sin [B, T, D/2] of the rotary angles position * base^(-2i/D), in float32."""
    inv_freq = 1.0 / (base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """Rotates adjacent pairs (x[2i], x[2i+1]) of x [B, T, heads, D], the reference's complex pairing."""
    xf = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    re, im = xf[..., 0], xf[..., 1]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    rotated = jnp.stack([re * cos - im * sin, im * cos + re * sin], axis=-1)
    return rotated.reshape(x.shape).astype(x.dtype)


@flax.struct.dataclass
class TokenPositions:
    """Where a block of tokens sits in its sequences.

    at [B, T]: absolute positions (rotary angles and the causal mask); rope: their cos, sin
    [B, T, D/2]; writes [B, T] bool or None (all): which tokens store keys and values in a cache
    (a row that has stopped, or a position outside a wavefront, leaves the cache untouched).
    """

    at: Array
    rope: tuple[Array, Array]
    writes: Array | None = None

    @classmethod
    def create(cls, positions: Array, config: HuginnConfig, writes: Array | None = None) -> "TokenPositions":
        return cls(positions, rope_angles(positions, config.head_dim, config.rope_base), writes)

    def with_writes(self, writes: Array | None) -> "TokenPositions":
        """The same positions, writing only where `writes` [B, T] (and where they wrote before)."""
        if writes is None:
            return self
        return self.replace(writes=writes if self.writes is None else self.writes & writes)

    def cache_positions(self, capacity: int) -> Array:
        """[B, T] cache index of each token: its position, or `capacity` (dropped) where it does not write."""
        return self.at if self.writes is None else jnp.where(self.writes, self.at, capacity)


def dot_product_attention(q: Array, k: Array, v: Array, q_pos: Array, k_pos: Array,
                          k_valid: Array | None = None) -> Array:
    """Causal attention by absolute position: query t sees keys whose position is <= its own
    (and, if given, which k_valid [B, S] allows).

    q [B, T, H, D]; k, v [B, K, S, D] (the cache's layout); q_pos [B, T]; k_pos [B or 1, S].
    Returns [B, T, H * D]. Scores and softmax in float32; every query sees at least its own key,
    so no row is empty.
    """
    b, t, h, d = q.shape
    kv_heads = k.shape[1]
    q = q.reshape(b, t, kv_heads, h // kv_heads, d)
    scores = jnp.einsum("btkgd,bksd->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = scores * (1.0 / jnp.sqrt(jnp.float32(d)))
    visible = k_pos[:, None, None, None, :] <= q_pos[:, None, None, :, None]
    if k_valid is not None:
        visible = visible & k_valid[:, None, None, None, :]
    scores = jnp.where(visible, scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bksd->btkgd", probs, v)
    return out.reshape(b, t, h * d)


def attention(p: dict[str, Array], x: Array, where: TokenPositions, cache: KVCache | None,
              ref: LayerRef) -> tuple[Array, KVCache | None]:
    """Self-attention with the learned q/k bias; with a cache, stores this call's keys for layer
    application `ref` (at the positions `where` lets write) and attends over what the cache's
    lookup strategy gives it."""
    b, t, e = x.shape
    wqkv = p["wqkv"]  # [E, K, G + 2, D]: one product for queries, keys and values
    kv_heads, group, d = wqkv.shape[1], wqkv.shape[2] - 2, wqkv.shape[3]
    qkv = (x @ wqkv.reshape(e, -1)).reshape(b, t, kv_heads, group + 2, d)
    q = qkv[:, :, :, :group].reshape(b, t, kv_heads * group, d)
    k, v = qkv[:, :, :, group], qkv[:, :, :, group + 1]
    if "q_bias" in p:
        q = q + p["q_bias"]
        k = k + p["k_bias"]
    q, k = apply_rope(q, *where.rope), apply_rope(k, *where.rope)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, T, D]
    q = constrain(q, ("batch", None, "heads", "head_dim"))
    k, v = (constrain(a, ("batch", "kv_heads", None, "head_dim")) for a in (k, v))
    if cache is None:
        keys, values, key_pos, valid = k, v, where.at, None
    else:
        cache, keys, values, valid = cache.update(ref, k, v, where.cache_positions(cache.capacity))
        key_pos = jnp.arange(cache.length)[None, :]
    out = dot_product_attention(q, keys, values, where.at, key_pos, valid)
    # wo as a [H * D, E] matrix: contracting (h, d) as one axis keeps XLA from transposing the weight.
    wo = p["wo"].reshape(-1, p["wo"].shape[-1])
    return constrain(jnp.einsum("btf,fe->bte", out, wo), ("batch", None, None)), cache


def gated_mlp(p: dict[str, Array], x: Array) -> Array:
    """silu(x W_gate) * (x W_up), projected back: the reference's GatedMLP (one product for gate and up).
    (No reshape of w_gate_up [E, 2, M] to [E, 2M]: split over M on a mesh, that would gather it.)"""
    gate_up = jnp.einsum("bte,egm->btgm", x, p["w_gate_up"])
    hidden = constrain(jax.nn.silu(gate_up[:, :, 0]) * gate_up[:, :, 1], ("batch", None, "mlp"))
    return constrain(hidden @ p["w_down"], ("batch", None, None))


def sandwich_block(p: dict[str, Array], x: Array, where: TokenPositions, config: HuginnConfig,
                   cache: KVCache | None, ref: LayerRef) -> tuple[Array, KVCache | None]:
    """x = n2(attn(n1(x)) + x); x = n4(mlp(n3(x)) + x)."""
    eps = config.norm_eps
    with jax.named_scope("attention"):
        attn_out, cache = attention(p, rms_norm(x, p["norm_1"], eps), where, cache, ref)
    x = rms_norm(attn_out + x, p["norm_2"], eps)
    with jax.named_scope("mlp"):
        x = rms_norm(gated_mlp(p, rms_norm(x, p["norm_3"], eps)) + x, p["norm_4"], eps)
    return x, cache
