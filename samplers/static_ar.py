"""Static-depth autoregressive generation, the reference's `generate_minimal`.

Every token runs the full `num_steps` core steps. The prompt is prefilled in one pass, then a
`lax.while_loop` on device decodes one token per iteration until every sequence has stopped or
`max_new_tokens` are out: no Python dispatch per token or per recurrence step. One compile serves
every `num_steps`, `init_scale` and sampling value for a given batch size, padded prompt length,
`max_new_tokens` and cache strategy (the "full" cache holds a slot per step, so there the
cache's shape, and with it the compile, also follows `num_steps`).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from huginn_jax.config import HuginnConfig
from huginn_jax.kv_cache import FULL, CacheLayout, KVCache, attention_views, check_strategy
from huginn_jax.model import lm_logits
from samplers.common import (NO_TOKEN, GenerateOutput, StreamCallback, check_key, check_num_steps, check_room,
                             last_position_logits, pack_prompts, random_state, run_tokens, seen_tokens,
                             stop_token_array, stream)
from samplers.sampling import GREEDY, SamplingConfig, next_token

Array = jax.Array


def generate_minimal(params: dict, input_ids: Any, *, config: HuginnConfig, max_new_tokens: int,
                     num_steps: int | None = None, init_scale: float = 1.0, continuous_compute: bool = False,
                     cache_lookup_strategy: str = FULL, sampling: SamplingConfig = GREEDY,
                     stop_token_ids: Sequence[int] | None = None, key: Array | None = None,
                     streamer: StreamCallback | None = None) -> GenerateOutput:
    """Generates up to `max_new_tokens` per prompt at a fixed recurrence depth.

    input_ids: an integer array [B, T], or a list of 1-D id sequences of unequal lengths.
    num_steps: core steps per token (default: the config's mean_recurrence).
    init_scale: scale of the random initial state; 0 starts from zeros.
    continuous_compute: start each token's state from the previous token's final latent.
    cache_lookup_strategy: "full" (a KV slot per step) or "latest-m4-compress-s4" (one per core layer).
    stop_token_ids: a sequence ends after emitting one of these (None: Huginn's stop tokens).
    key: PRNG key, required when init_scale > 0 or when sampling.
    streamer: called on the host with each step's tokens while decoding runs; it is compiled into
        the program, so pass the same callable again to reuse the compiled program.
    """
    num_steps = check_num_steps(config.mean_recurrence if num_steps is None else num_steps)
    check_strategy(cache_lookup_strategy)
    sampling = sampling.validate()
    prompts, lengths = pack_prompts(input_ids, config)
    check_room(lengths, max_new_tokens, config)
    key = check_key(key, init_scale != 0 or sampling.do_sample, "init_scale > 0 or do_sample=True")
    stops = stop_token_array(stop_token_ids, config)

    layout = CacheLayout.create(config, cache_lookup_strategy, max(num_steps, 1))
    cache_length = min(prompts.shape[1] + max_new_tokens, config.block_size)
    cache = KVCache.create(config, layout, prompts.shape[0], cache_length, params["wte"].dtype)
    tokens, steps, _ = _generate(params, cache, prompts, lengths, jnp.int32(num_steps), jnp.float32(init_scale),
                                 sampling, stops, key, config=config, max_new_tokens=max_new_tokens,
                                 continuous_compute=continuous_compute, streamer=streamer)
    tokens, steps = np.asarray(tokens), np.asarray(steps)
    return GenerateOutput(tokens=tokens, lengths=(tokens != NO_TOKEN).sum(axis=1), recurrence_steps=steps)


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "continuous_compute", "streamer"),
                   donate_argnames=("cache",))
def _generate(params: dict, cache: KVCache, prompts: Array, lengths: Array, num_steps: Array, init_scale: Array,
              sampling: SamplingConfig, stop_ids: Array, key: Array, *, config: HuginnConfig,
              max_new_tokens: int, continuous_compute: bool,
              streamer: StreamCallback | None) -> tuple[Array, Array, KVCache]:
    """(tokens [B, N], recurrence steps [B, N], the cache after the last step)."""
    batch, prompt_width = prompts.shape
    rows = jnp.arange(batch)
    dtype = params["wte"].dtype
    init_key, sample_key = jax.random.split(key)

    positions = jnp.broadcast_to(jnp.arange(prompt_width), (batch, prompt_width))
    state = random_state(config, jax.random.fold_in(init_key, 0), (batch, prompt_width), init_scale, dtype)
    result, cache = run_tokens(params, config, cache.view(prompt_width), prompts, positions, state, num_steps)
    cache = cache.view(None)
    logits, latent = last_position_logits(params, config, result, lengths)

    def emit(i: Array, logits: Array, seen: Array, done: Array, tokens: Array, steps: Array):
        """Chooses token i of every running sequence and records it."""
        token = next_token(jax.random.fold_in(sample_key, i), logits, seen, sampling)
        token = jnp.where(done, NO_TOKEN, token)
        tokens = tokens.at[:, i].set(token)
        steps = steps.at[:, i].set(jnp.where(done, 0, num_steps))
        seen = seen.at[rows, jnp.maximum(token, 0)].max(~done)
        stream(streamer, token, ~done)
        done = done | jnp.isin(token, stop_ids)
        return token, seen, done, tokens, steps

    tokens = jnp.full((batch, max_new_tokens), NO_TOKEN, jnp.int32)
    steps = jnp.zeros((batch, max_new_tokens), jnp.int32)
    done = jnp.zeros((batch,), bool)
    token, seen, done, tokens, steps = emit(0, logits, seen_tokens(prompts, lengths, config.vocab_size), done,
                                            tokens, steps)

    def running(view: int, carry) -> Array:
        i, _, _, _, _, done, _, _ = carry
        return (i < max_new_tokens) & ~jnp.all(done) & (jnp.max(lengths) + i - 1 < view)

    def decode_one(view: int, carry):
        """Feeds token i - 1 of every sequence (at its own position) and chooses token i."""
        i, cache, token, latent, seen, done, tokens, steps = carry
        positions = (lengths + i - 1)[:, None]
        if continuous_compute:
            state = latent[:, None, :]
        else:
            state = random_state(config, jax.random.fold_in(init_key, i), (batch, 1), init_scale, dtype)
        feed = jnp.where(done, 0, token)[:, None]
        result, cache = run_tokens(params, config, cache.view(view), feed, positions, state, num_steps)
        logits = lm_logits(params, config, result.hidden[:, 0])
        token, seen, done, tokens, steps = emit(i, logits, seen, done, tokens, steps)
        return i + 1, cache.view(None), token, result.latents[:, 0], seen, done, tokens, steps

    # Decoding runs in phases of growing attention views, so a step reads the keys of the positions
    # in use (rounded up to a power of two), not the whole buffer.
    carry = (jnp.int32(1), cache, token, latent, seen, done, tokens, steps)
    for view in attention_views(cache.capacity):
        carry = jax.lax.while_loop(functools.partial(running, view), functools.partial(decode_one, view), carry)
    _, cache, _, _, _, _, tokens, steps = carry
    return tokens, steps, cache

