"""Static-depth autoregressive generation, the reference's `generate_minimal`.

Every token runs the full `num_steps` core steps (`FixedDepth`). One compile serves every
`num_steps`, `init_scale` and sampling value for a given batch size, padded prompt length,
`max_new_tokens` and cache strategy (a per-step cache holds a slot per step, so there the cache's
shape, and with it the compile, also follows `num_steps`).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp

from huginn_jax import sharding, validation
from huginn_jax.config import HuginnConfig
from huginn_jax.kv_cache import FULL, CacheStrategy
from huginn_jax.recurrence import FixedDepth
from samplers import autoregressive
from samplers.common import GenerateOutput, make_cache, setup
from samplers.sampling import GREEDY, SamplingConfig
from samplers.streaming import Streamer

Array = jax.Array


@sharding.on_mesh
def generate_minimal(params: dict, input_ids: Any, *, config: HuginnConfig, max_new_tokens: int,
                     num_steps: int | None = None, init_scale: float = 1.0, continuous_compute: bool = False,
                     cache_lookup_strategy: str = FULL, sampling: SamplingConfig = GREEDY,
                     stop_token_ids: Sequence[int] | None = None, stop_strings: Sequence[str] | None = None,
                     tokenizer: Any = None, key: Array | None = None,
                     streamer: Streamer | None = None, mesh: Any = None) -> GenerateOutput:
    """Generates up to `max_new_tokens` per prompt at a fixed recurrence depth.

    input_ids: an integer array [B, T], or a list of 1-D id sequences of unequal lengths.
    num_steps: core steps per token (default: the config's mean_recurrence).
    init_scale: scale of the random initial state; 0 starts from zeros.
    continuous_compute: start each token's state from the previous token's final latent.
    cache_lookup_strategy: a lookup rule ("full": a KV slot per step; at a static depth every rule
        reads the same keys) optionally followed by a compression rule that shares slots between
        steps: "latest-m4-compress-s4" (one slot per core layer), "-compress-s16", "-compress-r4",
        "-compress-anchor", ... (see `huginn_jax.kv_cache`); "randomized" needs a key.
    stop_token_ids: a sequence ends after emitting one of these (None: Huginn's stop tokens).
    key: PRNG key (or one per row, shape [B]), required when init_scale > 0 or when sampling.
    streamer: receives each step's new tokens while decoding runs (see `samplers.streaming`).
    mesh: a device mesh to run on (`huginn_jax.sharding`; default: the one set with `jax.set_mesh`,
        else one device); its data axis must divide the batch. The tokens are those of one device.
    """
    num_steps = validation.integer("num_steps", config.mean_recurrence if num_steps is None else num_steps,
                                   minimum=0)
    continuous_compute = validation.boolean("continuous_compute", continuous_compute)
    strategy = CacheStrategy.parse(cache_lookup_strategy, config.n_layers_in_recurrent_block)
    run = setup(params, input_ids, config, max_new_tokens=max_new_tokens, init_scale=init_scale, sampling=sampling,
                stop_token_ids=stop_token_ids, stop_strings=stop_strings, tokenizer=tokenizer, key=key,
                random=sampling.do_sample or strategy.needs_key,
                random_why="do_sample=True or cache_lookup_strategy='randomized'", mesh=mesh)
    cache = make_cache(run.config, run.params, run.batch, strategy, num_steps,
                       run.prompts.shape[1] + run.max_new_tokens, keys=run.keys, mesh=run.mesh, uniform_depth=True)
    depth = FixedDepth(jnp.int32(num_steps))
    return autoregressive.generate(run.params, run.config, run, cache, depth, depth,
                                   continuous_compute=continuous_compute, resume_from_latents=True, streamer=streamer)
