"""Static-depth autoregressive generation, the reference's `generate_minimal`.

Every token runs the full `num_steps` core steps. One compile serves every `num_steps`,
`init_scale` and sampling value for a given batch size, padded prompt length, `max_new_tokens` and
cache strategy (a per-step cache holds a slot per step, so there the cache's shape, and with it the
compile, also follows `num_steps`).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from huginn_jax.config import HuginnConfig
from huginn_jax.kv_cache import FULL, KVCache
from huginn_jax.model import lm_logits
from samplers.autoregressive import TokenBlock, TokenResult, decode, last_real, output, prepare, write_positions
from samplers.common import GenerateOutput, StreamCallback, check_num_steps, run_tokens
from samplers.sampling import GREEDY, SamplingConfig

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
    cache_lookup_strategy: "full" (a KV slot per step), "latest-m4" (the same with a per-position
        fallback, identical at a static depth) or "latest-m4-compress-s4" (one slot per core layer).
    stop_token_ids: a sequence ends after emitting one of these (None: Huginn's stop tokens).
    key: PRNG key, required when init_scale > 0 or when sampling.
    streamer: called on the host with each step's tokens while decoding runs; it is compiled into
        the program, so pass the same callable again to reuse the compiled program.
    """
    num_steps = check_num_steps(config.mean_recurrence if num_steps is None else num_steps)
    prep = prepare(params, input_ids, config, max_new_tokens, cache_lookup_strategy, num_steps, init_scale,
                   sampling, stop_token_ids, key)
    tokens, steps, _, _ = _generate(params, prep.cache, prep.prompts, prep.lengths, jnp.int32(num_steps),
                                 jnp.float32(init_scale), prep.sampling, prep.stops, prep.key, config=config,
                                 max_new_tokens=max_new_tokens, continuous_compute=continuous_compute,
                                 streamer=streamer)
    return output(tokens, steps)


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "continuous_compute", "streamer"),
                   donate_argnames=("cache",))
def _generate(params: dict, cache: KVCache, prompts: Array, lengths: Array, num_steps: Array, init_scale: Array,
              sampling: SamplingConfig, stop_ids: Array, key: Array, *, config: HuginnConfig,
              max_new_tokens: int, continuous_compute: bool,
              streamer: StreamCallback | None) -> tuple[Array, Array, None, KVCache]:
    def run(cache: KVCache, block: TokenBlock) -> tuple[KVCache, TokenResult]:
        positions = write_positions(block, block.active, cache.capacity)
        result, cache = run_tokens(params, config, cache, block.tokens, positions, block.state, num_steps)
        logits = lm_logits(params, config, last_real(result.hidden, block.lengths))
        # continuous compute starts the next token from this one's latent_states (after ln_f)
        return cache, TokenResult(logits=logits, next_state=last_real(result.latents, block.lengths),
                                  steps=jnp.full(block.lengths.shape, num_steps))

    return decode(params, config, run, cache, prompts, lengths, init_scale, sampling, stop_ids, key,
                  max_new_tokens, continuous_compute, streamer)
