"""Adaptive-depth autoregressive generation, the reference's `generate_with_adaptive_compute`.

Each token iterates the core until its exit criterion fires (or `num_steps` is reached), under
the `AdaptiveExit` controller; the prompt is one block whose tokens all run the same number of
steps, as in the reference. Batched sequences exit independently: a sequence that has exited
stops computing and stops writing the cache, so its cache holds exactly the steps it ran. (The
reference keeps iterating exited sequences while others run and lets later tokens read those
keys; its docstring says so.)

Where a position that exited early is looked up by a later, deeper token, the cache strategy's
lookup rule decides (every rule of the reference, with any compression rule: `huginn_jax.kv_cache`):
"full" and "skip" leave it out of that step's attention, "latest-m4" and "available-m4" lend the
keys of the latest step it reached, "always-last-m4" and "randomized" pick other steps of the same
core layer. With "full", later tokens attend to fewer and fewer earlier positions at deep steps,
which hurts accuracy (a warning says so).
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from huginn_jax import sharding, validation
from huginn_jax.config import HuginnConfig
from huginn_jax.exit_criteria import ExitCriterion, get_criterion
from huginn_jax.kv_cache import FULL, CacheStrategy
from huginn_jax.recurrence import AdaptiveExit
from samplers import autoregressive
from samplers.common import GenerateOutput, make_cache, setup
from samplers.sampling import GREEDY, SamplingConfig
from samplers.streaming import Streamer

Array = jax.Array


@sharding.on_mesh
def generate_with_adaptive_compute(
        params: dict, input_ids: Any, *, config: HuginnConfig, max_new_tokens: int,
        criterion: str | ExitCriterion = "latent-diff", exit_threshold: float | str = "auto",
        num_steps: int | None = None, min_steps: int = 0, check_criterion_every_n_steps: int = 1,
        do_not_exit_in_prefill: bool = False, init_scale: float = 1.0, continuous_compute: bool = False,
        cache_lookup_strategy: str = FULL, sampling: SamplingConfig = GREEDY,
        stop_token_ids: Sequence[int] | None = None, stop_strings: Sequence[str] | None = None,
        tokenizer: Any = None, key: Array | None = None, streamer: Streamer | None = None,
        record_exit_values: bool = False, mesh: Any = None) -> GenerateOutput:
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
    Other options (`mesh` among them) as in `generate_minimal`. `recurrence_steps` holds each token's depth.
    """
    criterion = get_criterion(criterion)
    threshold = validation.number("exit_threshold", criterion.threshold(exit_threshold), minimum=0.0)
    num_steps = validation.integer("num_steps", config.mean_recurrence if num_steps is None else num_steps,
                                   minimum=0)
    min_steps = validation.integer("min_steps", min_steps, minimum=0, maximum=num_steps)
    check_every = validation.integer("check_criterion_every_n_steps", check_criterion_every_n_steps, minimum=1)
    do_not_exit_in_prefill = validation.boolean("do_not_exit_in_prefill", do_not_exit_in_prefill)
    continuous_compute = validation.boolean("continuous_compute", continuous_compute)
    record = validation.boolean("record_exit_values", record_exit_values)
    strategy = CacheStrategy.parse(cache_lookup_strategy, config.n_layers_in_recurrent_block)
    run = setup(params, input_ids, config, max_new_tokens=max_new_tokens, init_scale=init_scale, sampling=sampling,
                stop_token_ids=stop_token_ids, stop_strings=stop_strings, tokenizer=tokenizer, key=key,
                random=sampling.do_sample or strategy.needs_key,
                random_why="do_sample=True or cache_lookup_strategy='randomized'", mesh=mesh)
    cache = make_cache(run.config, run.params, run.batch, strategy, num_steps,
                       run.prompts.shape[1] + run.max_new_tokens, keys=run.keys, mesh=run.mesh)
    if strategy.lookup == FULL and criterion.name != "none":
        warnings.warn("adaptive exits with cache_lookup_strategy='full' leave later tokens nothing to attend to at "
                      "the steps that earlier tokens skipped, which costs accuracy; 'latest-m4' lends those "
                      "positions their latest keys", UserWarning, stacklevel=3)  # past on_mesh
    exit_rule = AdaptiveExit(criterion=criterion, threshold=jnp.float32(threshold), max_steps=jnp.int32(num_steps),
                             min_steps=jnp.int32(min_steps), check_every=jnp.int32(check_every),
                             vocab_size=config.vocab_size, record_width=num_steps if record else 0)
    return autoregressive.generate(run.params, run.config, run, cache,
                                   exit_rule.replace(may_exit=not do_not_exit_in_prefill), exit_rule,
                                   continuous_compute=continuous_compute, resume_from_latents=False, streamer=streamer)
