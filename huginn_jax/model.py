"""The Huginn forward pass: prelude, a recurrent core iterated `num_steps` times, coda, head.

Every function is pure: parameters, inputs and the optional KV cache go in, results and the
updated cache come out. `num_steps` is a traced value (the core runs under `lax.fori_loop`), so
changing the depth never recompiles.

Shapes: B batch, T tokens in this call, E width, V vocabulary.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from huginn_jax.config import HuginnConfig
from huginn_jax.kv_cache import KVCache, LayerRef
from huginn_jax.layers import rms_norm, rope_angles, sandwich_block

Array = jax.Array
Params = dict[str, Any]


@flax.struct.dataclass
class ForwardOutput:
    logits: Array  # [B, T, V] float32
    latents: Array  # [B, T, E] state after the last recurrence step, after ln_f ("latent_states")
    # [steps, B, T, E] raw state after every recurrence step, with `return_trajectory` (else None):
    # trajectory[-1] is the final state, `latents` its ln_f; `logit_lens` decodes any entry.
    trajectory: Array | None = None


def embed(params: Params, config: HuginnConfig, input_ids: Array) -> Array:
    """Token embeddings scaled by sqrt(width): [B, T] -> [B, T, E]. The product is taken in float32
    and rounded once, as torch does for a bfloat16 tensor times a Python float."""
    table = params["wte"]
    return (jnp.take(table, input_ids, axis=0).astype(jnp.float32) * config.embed_scale).astype(table.dtype)


def initial_state(config: HuginnConfig, key: Array, shape: tuple[int, ...], init_scale: Array | float,
                  dtype: Any) -> Array:
    """The random latent state: truncated normal (+-3 std) with std init_std * init_scale, times
    sqrt(width); all zeros when init_scale is 0."""
    std = config.init_std * config.embed_scale
    noise = jax.random.truncated_normal(key, -3.0, 3.0, shape, jnp.float32)
    return (noise * (std * jnp.asarray(init_scale, jnp.float32))).astype(dtype)


def run_blocks(blocks: list[Params], x: Array, positions: Array, rope: tuple[Array, Array],
               config: HuginnConfig, cache: KVCache | None, group: str,
               step: Array | int = 0) -> tuple[Array, KVCache | None]:
    """Applies a group of sandwich blocks in order (the core's at recurrence step `step`)."""
    for i, block in enumerate(blocks):
        x, cache = sandwich_block(block, x, positions, rope, config, cache, LayerRef(group, i, step))
    return x, cache


def prelude(params: Params, config: HuginnConfig, input_ids: Array, positions: Array,
            cache: KVCache | None = None) -> tuple[Array, KVCache | None]:
    """Embeds tokens and runs the prelude: [B, T] -> embeddings e [B, T, E] injected at every step."""
    rope = rope_angles(positions, config.head_dim, config.rope_base)
    return run_blocks(params["prelude"], embed(params, config, input_ids), positions, rope, config, cache, "prelude")


def injection(params: Params, config: HuginnConfig, embeds: Array) -> Array:
    """The embeddings' share of the adapter on concat([state, embeds]): computed once per token,
    added at every step."""
    return jnp.einsum("bte,ef->btf", embeds, params["adapter"][config.n_embd:])


def core_step(params: Params, config: HuginnConfig, state: Array, injected: Array, positions: Array,
              rope: tuple[Array, Array], step: Array | int,
              cache: KVCache | None = None) -> tuple[Array, KVCache | None]:
    """One recurrence step: the adapter on concat([state, embeds]), then the core blocks."""
    x = jnp.einsum("bte,ef->btf", state, params["adapter"][: config.n_embd]) + injected
    return run_blocks(params["core"], x, positions, rope, config, cache, "core", step)


def recur(params: Params, config: HuginnConfig, state: Array, embeds: Array, positions: Array,
          num_steps: Array | int, cache: KVCache | None = None) -> tuple[Array, KVCache | None]:
    """Iterates the core `num_steps` times from `state` [B, T, E], injecting `embeds` at every step."""
    rope = rope_angles(positions, config.head_dim, config.rope_base)
    injected = injection(params, config, embeds)

    def one_step(step: Array, carry: tuple[Array, KVCache | None]) -> tuple[Array, KVCache | None]:
        return core_step(params, config, carry[0], injected, positions, rope, step, carry[1])

    return jax.lax.fori_loop(0, num_steps, one_step, (state, cache))


def recur_trajectory(params: Params, config: HuginnConfig, state: Array, embeds: Array, positions: Array,
                     num_steps: int) -> Array:
    """`recur` without cache that keeps the state after every step: [num_steps, B, T, E]. The step
    count sets the output's shape, so it is static here."""
    rope = rope_angles(positions, config.head_dim, config.rope_base)
    injected = injection(params, config, embeds)

    def one_step(state: Array, step: Array) -> tuple[Array, Array]:
        state, _ = core_step(params, config, state, injected, positions, rope, step)
        return state, state

    return jax.lax.scan(one_step, state, jnp.arange(num_steps))[1]


def coda(params: Params, config: HuginnConfig, state: Array, positions: Array,
         cache: KVCache | None = None) -> tuple[Array, KVCache | None]:
    """ln_f, the coda blocks, ln_f again: the raw state [B, T, E] -> hidden states for the head."""
    rope = rope_angles(positions, config.head_dim, config.rope_base)
    x = rms_norm(state, params["ln_f"], config.norm_eps)
    x, cache = run_blocks(params["coda"], x, positions, rope, config, cache, "coda")
    return rms_norm(x, params["ln_f"], config.norm_eps), cache


def lm_logits(params: Params, config: HuginnConfig, hidden: Array) -> Array:
    """Float32 logits [..., V] from hidden states [..., E]; the head is the embedding when tied."""
    head = params["wte"] if config.tie_embeddings else params["lm_head"]
    return jnp.einsum("...e,ve->...v", hidden, head, preferred_element_type=jnp.float32)


def decode_latents(params: Params, config: HuginnConfig, state: Array, positions: Array,
                   cache: KVCache | None = None) -> tuple[Array, KVCache | None]:
    """Logits of any raw latent state (the reference's `predict_from_latents`)."""
    hidden, cache = coda(params, config, state, positions, cache)
    return lm_logits(params, config, hidden), cache


def forward(params: Params, input_ids: Array, num_steps: Array | int, *, config: HuginnConfig,
            key: Array | None = None, init_scale: float = 1.0, input_states: Array | None = None,
            return_trajectory: bool = False) -> ForwardOutput:
    """A full causal forward pass without cache, the reference's `model(input_ids, num_steps=...)`.

    input_ids [B, T] integers; the recurrence starts from `input_states` [B, T, E] if given, else
    from the random state drawn with `key` (zeros when init_scale is 0, where no key is needed).
    Jitted; `num_steps` and `init_scale` are traced, so new values do not recompile, except with
    `return_trajectory`, which also returns the state after every step ([num_steps, B, T, E], so
    one compilation per depth) and changes no result.
    """
    input_ids = check_token_ids(input_ids, config)
    if input_states is not None and input_states.shape != (*input_ids.shape, config.n_embd):
        raise ValueError(f"input_states has shape {input_states.shape}, expected "
                         f"{(*input_ids.shape, config.n_embd)}")
    if input_states is None and key is None:
        if init_scale != 0:
            raise ValueError("init_scale > 0 draws a random initial state: pass a PRNG key")
        key = jax.random.key(0)  # multiplied by init_scale = 0 below
    if return_trajectory and (int(num_steps) != num_steps or num_steps < 1):
        raise ValueError(f"return_trajectory needs an integer num_steps >= 1, got {num_steps!r}")
    return _forward(params, input_ids, jnp.int32(num_steps), config=config, key=key,
                    init_scale=jnp.float32(init_scale), input_states=input_states,
                    trajectory_steps=int(num_steps) if return_trajectory else 0)


@functools.partial(jax.jit, static_argnames=("config", "trajectory_steps"))
def _forward(params: Params, input_ids: Array, num_steps: Array, *, config: HuginnConfig, key: Array | None,
             init_scale: Array, input_states: Array | None, trajectory_steps: int = 0) -> ForwardOutput:
    batch, length = input_ids.shape
    positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
    embeds, _ = prelude(params, config, input_ids, positions)
    if input_states is None:
        input_states = initial_state(config, key, embeds.shape, init_scale, embeds.dtype)
    input_states = input_states.astype(embeds.dtype)
    trajectory = None
    if trajectory_steps:
        trajectory = recur_trajectory(params, config, input_states, embeds, positions, trajectory_steps)
        state = trajectory[-1]
    else:
        state, _ = recur(params, config, input_states, embeds, positions, num_steps)
    logits, _ = decode_latents(params, config, state, positions)
    return ForwardOutput(logits=logits, latents=rms_norm(state, params["ln_f"], config.norm_eps),
                         trajectory=trajectory)


def logit_lens(params: Params, states: Array, *, config: HuginnConfig) -> Array:
    """Decodes raw latent states [..., B, T, E] (a `trajectory`, or any state) through ln_f, the
    coda and the head into float32 logits [..., B, T, V], each state at positions 0..T-1."""
    if states.ndim < 3 or states.shape[-1] != config.n_embd:
        raise ValueError(f"states must have shape [..., batch, length, {config.n_embd}], got {states.shape}")
    return _logit_lens(params, states, config=config)


@functools.partial(jax.jit, static_argnames=("config",))
def _logit_lens(params: Params, states: Array, *, config: HuginnConfig) -> Array:
    *lead, length, width = states.shape
    flat = states.reshape(-1, length, width)  # every leading index is one more sequence of the batch
    positions = jnp.broadcast_to(jnp.arange(length), flat.shape[:2])
    logits, _ = decode_latents(params, config, flat.astype(params["wte"].dtype), positions)
    return logits.reshape(*lead, length, -1)


def check_token_ids(input_ids: Any, config: HuginnConfig) -> Array:
    """Token ids as an int32 array [B, T], or a ValueError that says what is wrong with them."""
    dtype = getattr(input_ids, "dtype", None)
    if dtype is None:
        raise ValueError(f"token ids must be an integer array of shape [batch, length], got {type(input_ids)}")
    if not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(f"token ids must have an integer dtype, got {dtype}")
    if input_ids.ndim != 2:
        raise ValueError(f"token ids must have shape [batch, length], got rank {input_ids.ndim} "
                         f"(shape {tuple(input_ids.shape)})")
    if input_ids.shape[0] < 1 or input_ids.shape[1] < 1:
        raise ValueError(f"token ids must not be empty, got shape {tuple(input_ids.shape)}")
    if input_ids.shape[1] > config.block_size:
        raise ValueError(f"{input_ids.shape[1]} tokens exceed the model's context of {config.block_size}")
    if isinstance(input_ids, np.ndarray) and (input_ids.min() < 0 or input_ids.max() >= config.vocab_size):
        raise ValueError(f"token ids must lie in [0, {config.vocab_size}), got values in "
                         f"[{input_ids.min()}, {input_ids.max()}]")
    return jnp.asarray(input_ids, jnp.int32)
