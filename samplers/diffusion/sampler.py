"""`generate_diffusion_style`: options, checks, and the run from setup to output."""

from __future__ import annotations

from typing import Any, Sequence

import jax

from huginn_jax import sharding, validation
from huginn_jax.config import HuginnConfig
from huginn_jax.kv_cache import SHARED, CacheStrategy
from samplers import streaming
from samplers.common import GenerateOutput, make_cache, setup
from samplers.diffusion import loop
from samplers.diffusion.freeze import FREEZE_STRATEGIES
from samplers.diffusion.output import diffusion_output
from samplers.diffusion.settings import Plan, Settings, tablet_rows
from samplers.diffusion.step import Context
from samplers.sampling import GREEDY, SamplingConfig

Array = jax.Array


@sharding.on_mesh
def generate_diffusion_style(
        params: dict, input_ids: Any, *, config: HuginnConfig, max_new_tokens: int,
        num_steps: int | None = None, inner_recurrence: int = 4, headway: int = 1,
        state_noise_mixing: float = 0.5, dampened_state_mixer: bool = True, sqrt_mixer: bool = False,
        ema_embeds: float = 0.1, freeze_strategy: str = "latent-diff", exit_t: float = 0.03,
        max_wavefront: int = 128, continuous_compute: bool = False, full_prefill: bool = True,
        cache_lookup_strategy: str = SHARED, init_scale: float = 1.0, max_diffusion_steps: int = 4096,
        return_analysis_tablets: bool | int = False, reference_compatible: bool = False,
        sampling: SamplingConfig = GREEDY, stop_token_ids: Sequence[int] | None = None,
        stop_strings: Sequence[str] | None = None, tokenizer: Any = None, key: Array | None = None,
        streamer: streaming.Streamer | None = None, mesh: Any = None) -> GenerateOutput:
    """Generates with the diffusion forcing sampler; options and defaults are the reference's
    (see `PRESETS` for the paper's settings, which differ: no noise in its main row).

    num_steps: the prefill depth, and the recurrence after which tokens count as done for the
        "fixed" (num_steps // inner_recurrence steps) and "token-stability" rules (default: the
        config's mean_recurrence).
    inner_recurrence: core steps per sampler step. headway: new positions per step.
    state_noise_mixing: weight of fresh random state mixed into every state before each step,
        divided by 1 + the position's recurrence count when `dampened_state_mixer`, and mixed
        variance-preserving when `sqrt_mixer`.
    ema_embeds: momentum on the prelude embeddings of positions already in the wavefront.
    freeze_strategy: one of FREEZE_STRATEGIES; exit_t is the threshold of the latent rules.
    max_wavefront: the most positions refined at once (the ring buffer's size).
    continuous_compute: new positions start from copies of the rightmost states.
    full_prefill: prefill the prompt at num_steps (else the prompt joins the wavefront).
    max_diffusion_steps: a cap on sampler steps.
    return_analysis_tablets: also return per-step tokens, frozen tokens, recurrence counts and
        stability for every position (plots like the paper's Fig. 4): True records the first
        2 (max_new_tokens + headway) steps, as the reference; a number records that many.
    reference_compatible: the reference's stop-token check, headway filler and overrun (see
        `samplers.diffusion`); it takes no stop_strings.
    stop_token_ids, stop_strings (with the `tokenizer`): a sequence ends at the first stop token,
        or at the token that completes a stop string, among its frozen tokens.

    stats: the reference's scalar statistics (`STAT_NAMES`, [B] each), `recurrence_per_position`
    and `token_stable_per_position` (lists over the prompt and all frozen tokens of each sequence),
    and the core-step counts and cache memory (`cache_memory_mb`: keys and values held before the
    wavefront, as the reference's `get_memory_usage()`; `cache_allocated_mb`) every sampler
    reports. tablets (with `return_analysis_tablets`): per
    sequence the per-step arrays `token_tablet`, `frozen_tablet`, `counter_tablet`,
    `stability_tablet` [steps, positions] (as the reference) and `criterion_tablet`: the latent
    freeze rules' criterion at each position the step judged (NaN elsewhere, and throughout for
    "token-stability" and "fixed", whose rules read the stability and counter tablets).
    mesh: a device mesh to run on (`huginn_jax.sharding`; default: the one set with `jax.set_mesh`,
        else one device); its data axis must divide the batch. The tokens are those of one device.
    """
    v = validation
    num_steps = v.integer("num_steps", config.mean_recurrence if num_steps is None else num_steps, minimum=0)
    freeze_strategy = v.choice("freeze_strategy", freeze_strategy, FREEZE_STRATEGIES)
    inner_recurrence = v.integer("inner_recurrence", inner_recurrence, minimum=1)
    headway = v.integer("headway", headway, minimum=1)
    max_wavefront = v.integer("max_wavefront", max_wavefront)
    if max_wavefront <= headway:
        raise ValueError(f"max_wavefront must be > headway={headway} (the wavefront keeps the last frozen position "
                         f"and appends headway new ones), got {max_wavefront}")
    state_noise_mixing = v.number("state_noise_mixing", state_noise_mixing, 0.0, 1.0)
    ema_embeds = v.number("ema_embeds", ema_embeds, minimum=0.0, below=1.0)
    exit_t = v.number("exit_t", exit_t, above=0.0)
    max_diffusion_steps = v.integer("max_diffusion_steps", max_diffusion_steps, minimum=0)
    flags = {name: v.boolean(name, value) for name, value in (
        ("dampened_state_mixer", dampened_state_mixer), ("sqrt_mixer", sqrt_mixer),
        ("continuous_compute", continuous_compute), ("full_prefill", full_prefill),
        ("reference_compatible", reference_compatible))}
    if flags["reference_compatible"] and stop_strings:
        raise ValueError("stop_strings cannot be used with reference_compatible=True (the reference checks only "
                         "stop ids, and only after num_steps sampler steps); use reference_compatible=False")
    strategy = CacheStrategy.parse(cache_lookup_strategy, config.n_layers_in_recurrent_block)
    run = setup(params, input_ids, config, max_new_tokens=max_new_tokens, init_scale=init_scale, sampling=sampling,
                stop_token_ids=stop_token_ids, stop_strings=stop_strings, tokenizer=tokenizer, key=key,
                random=sampling.do_sample or headway > 1 or strategy.needs_key,
                random_why="do_sample=True, headway > 1 or cache_lookup_strategy='randomized'", mesh=mesh)
    longest = int(run.lengths.max())
    if not full_prefill and longest > max_wavefront:
        raise ValueError(f"without full_prefill the prompt joins the wavefront: a prompt of {longest} tokens needs "
                         f"max_wavefront >= {longest} (got {max_wavefront}); use full_prefill=True")
    needed = longest + run.max_new_tokens + max_wavefront + headway
    if needed > config.block_size:
        raise ValueError(f"a prompt of {longest} tokens plus max_new_tokens={run.max_new_tokens} and a wavefront of "
                         f"max_wavefront={max_wavefront} + headway={headway} positions needs {needed} positions, "
                         f"more than the context of {config.block_size}")

    capacity = run.prompts.shape[1] + run.max_new_tokens + max_wavefront + headway
    cache = make_cache(run.config, run.params, run.batch, strategy, max(num_steps, inner_recurrence), capacity,
                       keys=run.keys, mesh=run.mesh)
    plan = Plan(headway=headway, ring=max_wavefront, full_prefill=flags["full_prefill"],
                max_new_tokens=run.max_new_tokens,
                tablet_rows=tablet_rows(return_analysis_tablets, run.max_new_tokens, headway))
    settings = Settings.create(
        num_steps=num_steps, inner_recurrence=inner_recurrence, freeze_rule=FREEZE_STRATEGIES.index(freeze_strategy),
        exit_t=exit_t, ema_embeds=ema_embeds, state_noise_mixing=state_noise_mixing,
        dampened_state_mixer=flags["dampened_state_mixer"], sqrt_mixer=flags["sqrt_mixer"],
        continuous_compute=flags["continuous_compute"], reference_compatible=flags["reference_compatible"],
        init_scale=run.init_scale, max_diffusion_steps=max_diffusion_steps)
    with streaming.session(streamer) as number:
        prompts, lengths, keys = run.device_inputs()  # rows over the mesh's data axis, if any
        ctx = Context(params=run.params, settings=settings, sampling=run.sampling, stops=run.stops, keys=keys,
                      stream_number=number, config=run.config, plan=plan, stream=streamer is not None)
        memory = cache.memory()  # static sizes, read before the run donates the buffers
        final = loop.run(ctx, cache, prompts, lengths)
        # the entries at positions before the wavefront's start: what the reference's cache holds
        # once it has cleared the wavefront (`KVCache.filled_entries`, reduced on the device)
        state, filled = jax.device_get((final.state, final.cache.filled_entries(final.state.wave.start)))
    return diffusion_output(state, run.lengths, plan, flags["reference_compatible"], num_steps,
                            extra_stats=memory.stats(filled))
