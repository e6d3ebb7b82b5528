"""The diffusion sampler's state, one struct per concern; every leaf has a leading batch axis [B, ...]
(each sequence has its own wavefront, freeze front, stop state and statistics).

- `Wavefront`: the sequence and the positions being refined: tokens, the frozen front, the
  wavefront's start and width, and the latent states and (momentum-mixed) embeddings of its
  positions in ring buffers of R = max_wavefront entries indexed by position mod R, so that the
  wavefront slides without moving memory.
- `FreezeMemory`: what the freeze rules remember of earlier steps.
- `Statistics`: the reference's counts, per sequence and per position.
- `Tablets`: the analysis tablets (per recorded step and position), when asked for.
- `Diffusion`: all of them with the step counter and the stop state.

Shapes: B batch, S the sequence buffer (prompt + new tokens + wavefront), R ring, E width, W window.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

Array = jax.Array


@flax.struct.dataclass
class Wavefront:
    """Each sequence's tokens and the positions being refined."""

    seq: Array  # [B, S] frozen tokens, then drafts and filler up to n_cur
    prompt_len: Array  # [B]
    n_frozen: Array  # [B] tokens that are final (the prompt included)
    n_cur: Array  # [B] length of seq (frozen + drafted + filler)
    start: Array  # [B] first wavefront position (the reference's cache index)
    width: Array  # [B] wavefront positions holding a state
    states: Array  # [B, R, E] latent states by position mod R
    embeds: Array  # [B, R, E] last step's (momentum-mixed) embeddings by position mod R
    embeds_end: Array  # [B] one past the last position `embeds` covers


@flax.struct.dataclass
class FreezeMemory:
    """What the freeze rules remember (the reference's variables of the same meaning)."""

    k: Array  # [B] the reference's freeze index k after the previous step (its old_k in this step)
    old_start: Array  # [B] the previous step's start (old_cache_index)
    old_old_start: Array  # [B] the start before that (latent-acceleration-2)
    prev_states: Array  # [B, R, E] states after the previous step (previous_states)
    prev_width: Array  # [B]
    prev2_states: Array  # [B, R, E] states after the step before (latent-acceleration-2)
    prev2_width: Array  # [B]
    prev_delta: Array  # [B, R, E] latent-acceleration-1: the last step's state changes, by window index
    prev_delta_len: Array  # [B]


@flax.struct.dataclass
class Statistics:
    """The reference's statistics. (Cache memory statistics are added on the host, from the cache.)"""

    core_passes: Array  # [B] num_core_forward_passes
    tokens_forward: Array  # [B] num_tokens_forward
    cache_clears: Array  # [B] num_cache_clears
    standing_waves: Array  # [B] num_standing_waves
    counter: Array  # [B, S] core steps spent per position (the noise mixer reads it too)
    stable: Array  # [B, S] steps in which a position's token did not change ("token-stability" reads it)


@flax.struct.dataclass
class Tablets:
    """Per recorded step [B, rows, S]: what the reference's analysis tablets hold, and the latent
    freeze rules' criterion (NaN where a step did not judge a position)."""

    token: Array  # int32: the sequence after the step (frozen, drafts, filler)
    frozen: Array  # int32: the frozen tokens after the step
    counter: Array  # int32: core steps per position
    stability: Array  # int32: stability counts
    criterion: Array  # float32


@flax.struct.dataclass
class Diffusion:
    """The whole sampler state between steps."""

    wave: Wavefront
    memory: FreezeMemory
    stats: Statistics
    tablets: Tablets | None  # None without return_analysis_tablets
    step: Array  # [B] sampler steps completed (the reference's step; randomness and "fixed" read it)
    done: Array  # [B]
    stop_state: Array  # [B] the stop strings' automaton state (`samplers.common.Stops`)


# ---------------------------------------------------------------- ring buffers and gathers

def ring_read(ring: Array, positions: Array) -> Array:
    """ring [B, R, E] at positions [B, W] (by position mod R) -> [B, W, E]."""
    return jnp.take_along_axis(ring, (positions % ring.shape[1])[:, :, None], axis=1)


def ring_write(ring: Array, positions: Array, values: Array, mask: Array) -> Array:
    """Writes values [B, W, E] at positions [B, W] where mask [B, W] holds."""
    index = jnp.where(mask, positions % ring.shape[1], ring.shape[1])  # out of range: dropped
    return ring.at[jnp.arange(ring.shape[0])[:, None], index].set(values.astype(ring.dtype), mode="drop")


def gather(values: Array, positions: Array) -> Array:
    """values [B, S] at positions [B, W], clipped into range."""
    return jnp.take_along_axis(values, jnp.clip(positions, 0, values.shape[1] - 1), axis=1)


def scatter(values: Array, positions: Array, new: Array, mask: Array) -> Array:
    """values [B, S] with new [B, W] written at positions [B, W] where mask [B, W] holds."""
    index = jnp.where(mask, positions, values.shape[1])  # out of range: dropped
    return values.at[jnp.arange(values.shape[0])[:, None], index].set(new, mode="drop")
