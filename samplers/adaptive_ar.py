"""Adaptive-depth autoregressive generation, the reference's `generate_with_adaptive_compute`.

Each token iterates the core until its exit criterion fires (or `num_steps` is reached); the
prompt is one block whose tokens all run the same number of steps, as in the reference. Batched
sequences exit independently: a sequence that has exited stops computing and stops writing the
cache, so its cache holds exactly the steps it ran. (The reference keeps iterating exited
sequences while others run and lets later tokens read those keys; its docstring says so.)

Where a position that exited early is looked up by a later, deeper token, the cache strategy
decides: "full" leaves it out of that step's attention, "latest-m4" lends the keys of the latest
step it reached, "latest-m4-compress-s4" shares one slot per core layer.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from huginn_jax.config import HuginnConfig
from huginn_jax.kv_cache import FULL, KVCache
from huginn_jax.layers import rope_angles
from huginn_jax.model import coda, core_step, injection, lm_logits, prelude
from samplers.autoregressive import TokenBlock, TokenResult, decode, last_real, output, prepare, write_positions
from samplers.common import GenerateOutput, StreamCallback, check_num_steps
from samplers.exit_criteria import ExitCriterion, get_criterion
from samplers.sampling import GREEDY, SamplingConfig

Array = jax.Array


def generate_with_adaptive_compute(
        params: dict, input_ids: Any, *, config: HuginnConfig, max_new_tokens: int,
        criterion: str | ExitCriterion = "latent-diff", exit_threshold: float | str = "auto",
        num_steps: int | None = None, min_steps: int = 0, check_criterion_every_n_steps: int = 1,
        do_not_exit_in_prefill: bool = False, init_scale: float = 1.0, continuous_compute: bool = False,
        cache_lookup_strategy: str = FULL, sampling: SamplingConfig = GREEDY,
        stop_token_ids: Sequence[int] | None = None, key: Array | None = None,
        streamer: StreamCallback | None = None, record_exit_values: bool = False) -> GenerateOutput:
    """Generates with a per-token recurrence depth chosen by an exit criterion.

    criterion: "latent-diff", "entropy-diff", "kl", "minp-kl", "argmax-stability", "cosine",
        "none", or an `ExitCriterion`; exit_threshold "auto" takes the criterion's default.
    num_steps: the most core steps per token (default: the config's mean_recurrence).
    min_steps, check_criterion_every_n_steps: checks happen at steps min_steps, min_steps + n, ...
        (counting from 0, after the step ran).
    do_not_exit_in_prefill: run the prompt at the full depth.
    continuous_compute: start each token from the previous token's final state.
    record_exit_values: also return `exit_values` [B, max_new_tokens, num_steps]: the criterion's
        value after every step of every token (NaN where it was not checked, or after the exit);
        recording changes no token (it compiles one program per num_steps).
    Other options as in `generate_minimal`. `recurrence_steps` holds each token's depth.
    """
    criterion = get_criterion(criterion)
    threshold = criterion.threshold(exit_threshold)
    num_steps = check_num_steps(config.mean_recurrence if num_steps is None else num_steps)
    min_steps = check_num_steps(min_steps, "min_steps")
    if int(check_criterion_every_n_steps) != check_criterion_every_n_steps or check_criterion_every_n_steps < 1:
        raise ValueError(f"check_criterion_every_n_steps must be a positive integer, "
                         f"got {check_criterion_every_n_steps!r}")
    prep = prepare(params, input_ids, config, max_new_tokens, cache_lookup_strategy, num_steps, init_scale,
                   sampling, stop_token_ids, key)
    depth = (jnp.int32(num_steps), jnp.int32(min_steps), jnp.int32(check_criterion_every_n_steps))
    tokens, steps, values, _ = _generate(
        params, prep.cache, prep.prompts, prep.lengths, depth, jnp.float32(threshold), jnp.float32(init_scale),
        prep.sampling, prep.stops, prep.key, config=config, criterion=criterion,
        do_not_exit_in_prefill=bool(do_not_exit_in_prefill), max_new_tokens=max_new_tokens,
        continuous_compute=continuous_compute, streamer=streamer, record_width=num_steps if record_exit_values else 0)
    return output(tokens, steps, values)


@functools.partial(jax.jit, static_argnames=("config", "criterion", "do_not_exit_in_prefill", "max_new_tokens",
                                             "continuous_compute", "streamer", "record_width"),
                   donate_argnames=("cache",))
def _generate(params: dict, cache: KVCache, prompts: Array, lengths: Array, depth: tuple[Array, Array, Array],
              threshold: Array, init_scale: Array, sampling: SamplingConfig, stop_ids: Array, key: Array, *,
              config: HuginnConfig, criterion: ExitCriterion, do_not_exit_in_prefill: bool, max_new_tokens: int,
              continuous_compute: bool, streamer: StreamCallback | None,
              record_width: int) -> tuple[Array, Array, Array | None, KVCache]:
    """record_width: 0, or num_steps to record the exit values of every step."""
    max_steps, min_steps, check_every = depth

    def run(cache: KVCache, block: TokenBlock) -> tuple[KVCache, TokenResult]:
        batch, width = block.tokens.shape
        real = jnp.arange(width)[None, :] < block.lengths[:, None]
        capacity = cache.capacity
        embeds, cache = prelude(params, config, block.tokens, write_positions(block, block.active, capacity), cache)
        rope = rope_angles(block.positions, config.head_dim, config.rope_base)
        injected = injection(params, config, embeds)
        may_exit = not (do_not_exit_in_prefill and block.is_prompt)

        def step(carry):
            s, state, cache, memory, running, spent, values = carry
            positions = write_positions(block, running, capacity)
            new_state, cache = core_step(params, config, state, injected, positions, rope, s, cache)
            state = jnp.where(running[:, None, None], new_state, state)
            checked = may_exit & (s >= min_steps) & ((s - min_steps) % check_every == 0)
            logits = None
            if criterion.needs_logits:
                def decode_check(cache: KVCache) -> tuple[KVCache, Array]:
                    hidden, cache = coda(params, config, state, positions, cache)
                    return cache, lm_logits(params, config, last_real(hidden, block.lengths))

                def skip(cache: KVCache) -> tuple[KVCache, Array]:
                    return cache, jnp.zeros((batch, config.vocab_size), jnp.float32)

                cache, logits = jax.lax.cond(checked, decode_check, skip, cache)
            new_memory, value = criterion.update(memory, state, real, logits)
            memory = jax.tree.map(lambda new, old: jnp.where(checked, new, old), new_memory, memory)
            exits = checked & criterion.exits(value, threshold) & running
            if record_width:
                values = values.at[:, s].set(jnp.where(checked & running, value.astype(jnp.float32), jnp.nan))
            return s + 1, state, cache, memory, running & ~exits, jnp.where(exits, s + 1, spent), values

        def continues(carry) -> Array:
            return (carry[0] < max_steps) & jnp.any(carry[4])

        memory = criterion.init(block.state, real, config.vocab_size)
        values = jnp.full((batch, record_width), jnp.nan, jnp.float32) if record_width else None
        carry = (jnp.int32(0), block.state, cache, memory, block.active, jnp.zeros((batch,), jnp.int32), values)
        s, state, cache, _, running, spent, values = jax.lax.while_loop(continues, step, carry)
        spent = jnp.where(running, s, spent)
        hidden, cache = coda(params, config, state, write_positions(block, block.active, capacity), cache)
        logits = lm_logits(params, config, last_real(hidden, block.lengths))
        # continuous compute starts the next token from this one's raw final state, as the reference
        return cache, TokenResult(logits=logits, next_state=last_real(state, block.lengths), steps=spent,
                                  exit_values=values)

    return decode(params, config, run, cache, prompts, lengths, init_scale, sampling, stop_ids, key,
                  max_new_tokens, continuous_compute, streamer)
