"""The token-by-token decoding loop that the static-depth and adaptive-depth AR samplers share.

A sampler supplies a `TokenRunner`: how to run a block of tokens (the prompt, then one token at a
time) through the model. This module prefills, then decodes in a `lax.while_loop` on device until
every sequence has stopped or `max_new_tokens` are out: no Python dispatch per token or per
recurrence step. Decoding runs in phases of growing attention views, so a step reads the keys of
the positions in use (rounded up to a power of two), not the whole preallocated buffer.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from huginn_jax.config import HuginnConfig
from huginn_jax.kv_cache import CacheLayout, KVCache, attention_views, check_strategy
from samplers.common import (NO_TOKEN, GenerateOutput, StreamCallback, check_key, check_room, pack_prompts,
                             random_state, seen_tokens, stop_token_array, stream)
from samplers.sampling import SamplingConfig, next_token

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class TokenBlock:
    """Tokens [B, T] to run at `positions` [B, T]; the first `lengths[b]` of row b are real (the
    rest is padding); rows where `active` is False must leave the cache untouched."""

    tokens: Array
    positions: Array
    lengths: Array
    active: Array
    state: Array  # [B, T, E] initial latent state
    is_prompt: bool


@dataclasses.dataclass(frozen=True)
class TokenResult:
    logits: Array  # [B, V] float32, at each row's last real token
    next_state: Array  # [B, E] where continuous compute starts the next token
    steps: Array  # [B] core steps spent
    exit_values: Array | None = None  # [B, W] the exit criterion after each step (NaN: not checked)


class TokenRunner(Protocol):
    def __call__(self, cache: KVCache, block: TokenBlock) -> tuple[KVCache, TokenResult]: ...


@dataclasses.dataclass(frozen=True)
class Prepared:
    """Validated inputs of an AR sampler, ready for `decode`."""

    prompts: np.ndarray
    lengths: np.ndarray
    cache: KVCache
    stops: np.ndarray
    key: Array
    sampling: SamplingConfig


def prepare(params: dict, input_ids: Any, config: HuginnConfig, max_new_tokens: int, cache_lookup_strategy: str,
            max_steps: int, init_scale: float, sampling: SamplingConfig,
            stop_token_ids: Sequence[int] | None, key: Array | None, headroom: int = 0) -> Prepared:
    """Checks the inputs common to the AR samplers and allocates their cache, with room for
    `headroom` positions past max_new_tokens (speculative drafts)."""
    check_strategy(cache_lookup_strategy)
    sampling = sampling.validate()
    prompts, lengths = pack_prompts(input_ids, config)
    check_room(lengths, max_new_tokens, config, headroom)
    key = check_key(key, init_scale != 0 or sampling.do_sample, "init_scale > 0 or do_sample=True")
    layout = CacheLayout.create(config, cache_lookup_strategy, max(max_steps, 1))
    capacity = min(prompts.shape[1] + max_new_tokens + headroom, config.block_size)
    cache = KVCache.create(config, layout, prompts.shape[0], capacity, params["wte"].dtype)
    return Prepared(prompts, lengths, cache, stop_token_array(stop_token_ids, config), key, sampling)


def output(tokens: Array, steps: Array, exit_values: Array | None = None) -> GenerateOutput:
    tokens, steps = np.asarray(tokens), np.asarray(steps)
    return GenerateOutput(tokens=tokens, lengths=(tokens != NO_TOKEN).sum(axis=1), recurrence_steps=steps,
                          exit_values=None if exit_values is None else np.asarray(exit_values))


def decode(params: dict, config: HuginnConfig, runner: TokenRunner, cache: KVCache, prompts: Array, lengths: Array,
           init_scale: Array, sampling: SamplingConfig, stop_ids: Array, key: Array, max_new_tokens: int,
           continuous_compute: bool, streamer: StreamCallback | None) -> tuple[Array, Array, Array | None, KVCache]:
    """Prefill, then decode up to `max_new_tokens` per sequence: (tokens [B, N], core steps per
    token [B, N], exit values per token and step [B, N, W] if the runner records them, the cache).
    Runs inside the sampler's jit."""
    batch, prompt_width = prompts.shape
    rows = jnp.arange(batch)
    dtype = params["wte"].dtype
    init_key, sample_key = jax.random.split(key)
    all_rows = jnp.ones((batch,), bool)

    prompt_positions = jnp.broadcast_to(jnp.arange(prompt_width), (batch, prompt_width))
    prompt = TokenBlock(tokens=prompts, positions=prompt_positions, lengths=lengths, active=all_rows, is_prompt=True,
                        state=random_state(config, init_key, prompt_positions, init_scale, dtype))
    cache, result = runner(cache.view(prompt_width), prompt)
    cache = cache.view(None)

    def emit(i: Array, result: TokenResult, seen: Array, done: Array, record: tuple):
        """Chooses token i of every running sequence and records it (tokens, steps, exit values)."""
        token = next_token(jax.random.fold_in(sample_key, i), result.logits, seen, sampling)
        token = jnp.where(done, NO_TOKEN, token)
        tokens, steps, values = record
        tokens = tokens.at[:, i].set(token)
        steps = steps.at[:, i].set(jnp.where(done, 0, result.steps))
        if values is not None:
            values = values.at[:, i].set(jnp.where(done[:, None], jnp.nan, result.exit_values))
        seen = seen.at[rows, jnp.maximum(token, 0)].max(~done)
        stream(streamer, token, ~done)
        done = done | jnp.isin(token, stop_ids)
        return token, seen, done, (tokens, steps, values)

    tokens = jnp.full((batch, max_new_tokens), NO_TOKEN, jnp.int32)
    steps = jnp.zeros((batch, max_new_tokens), jnp.int32)
    values = None
    if result.exit_values is not None:
        values = jnp.full((batch, max_new_tokens, result.exit_values.shape[-1]), jnp.nan, jnp.float32)
    seen = seen_tokens(prompts, lengths, config.vocab_size)
    token, seen, done, record = emit(0, result, seen, ~all_rows, (tokens, steps, values))

    def running(view: int, carry) -> Array:
        i, _, _, _, _, done, _ = carry
        return (i < max_new_tokens) & ~jnp.all(done) & (jnp.max(lengths) + i - 1 < view)

    def decode_one(view: int, carry):
        """Feeds token i - 1 of every running sequence (at its own position) and chooses token i."""
        i, cache, token, next_state, seen, done, record = carry
        positions = (lengths + i - 1)[:, None]
        if continuous_compute:
            state = next_state[:, None, :]
        else:
            state = random_state(config, init_key, positions, init_scale, dtype)
        block = TokenBlock(tokens=jnp.where(done, 0, token)[:, None], positions=positions,
                           lengths=jnp.ones_like(lengths), active=~done, state=state, is_prompt=False)
        cache, result = runner(cache.view(view), block)
        token, seen, done, record = emit(i, result, seen, done, record)
        return i + 1, cache.view(None), token, result.next_state, seen, done, record

    carry = (jnp.int32(1), cache, token, result.next_state, seen, done, record)
    for view in attention_views(cache.capacity):
        carry = jax.lax.while_loop(functools.partial(running, view), functools.partial(decode_one, view), carry)
    _, cache, _, _, _, _, (tokens, steps, values) = carry
    return tokens, steps, values, cache


def write_positions(block: TokenBlock, active: Array, capacity: int) -> Array:
    """Positions at which a block writes the cache: past the buffer (dropped) for inactive rows."""
    return jnp.where(active[:, None], block.positions, capacity)


def last_real(values: Array, lengths: Array) -> Array:
    """values [B, T, ...] at each row's last real token, lengths - 1."""
    return values[jnp.arange(values.shape[0]), lengths - 1]
