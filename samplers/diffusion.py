"""The diffusion forcing sampler (arXiv 2510.14961), the reference's `generate_diffusion_style`.

Every sampler step runs the prelude, `inner_recurrence` core steps and the coda over a wavefront
of not-yet-frozen positions, drafts a token for each of them plus one new position, and freezes
the positions whose latents converged; frozen positions leave the wavefront and keep their keys
in the cache. A new token is decoded on every step while earlier ones keep being refined.

Implementation: one jitted `lax.while_loop` over sampler steps for a whole batch. Each sequence has
its own wavefront (start, width), freeze front, stop state and statistics. Latent states live in a
ring buffer of `max_wavefront` entries indexed by position, so the wavefront slides without moving
memory. The model runs on a window of static width (the smallest of a few power-of-two buckets that
holds every wavefront, chosen by `lax.switch`), so the loop never recompiles whether the wavefront
grows, shrinks or stalls, and a narrow wavefront does not pay for `max_wavefront` positions.

The reference's bookkeeping is reproduced exactly, including where it is surprising: the latent
criteria compare a position with the previous step's state `start - previous start` positions
further right after the freeze front moved (the reference slices `previous_states` as if it began
at the previous cache index); `latent-acceleration-1` compares deltas by window index. Two quirks
that hurt users change by default and come back with `reference_compatible=True`:
- stop tokens: the reference looks for them only after `num_steps` sampler steps and only among the
  tokens frozen in that step, so a stop token frozen earlier is missed and generation overruns;
  here every newly frozen token is checked at every step and the output ends at the first stop, and
  with the latent freeze rules a stop token drafted by a state that converged in this step ends it
  too (it is final, as AR would emit it; the reference waits for the latent of the position that
  reads the stop token, which a model may never have trained and which need not converge);
- headway filler: the reference fills the extra `headway - 1` positions with random ids from
  [0, 65510), special tokens included; here the ids come from [0, 65504), the ordinary vocabulary.
In default mode the output also stops at `max_new_tokens`; the reference returns every frozen token.
With `full_prefill=False` the prompt enters the wavefront (it must fit in `max_wavefront`); its
tokens are given and never replaced by drafts (the reference would overwrite its unfrozen tail).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from huginn_jax import validation
from huginn_jax.config import HuginnConfig
from huginn_jax.kv_cache import SHARED, KVCache
from huginn_jax.model import embed_inputs, iterate, lm_head, predict_from_latents
from huginn_jax.recurrence import FixedDepth
from samplers import streaming
from samplers.common import (CHOOSE, DRAFT, FILLER, NEW_STATE, NO_TOKEN, GenerateOutput, Stops, choose_tokens,
                             make_cache, prefill, random_state, row_keys, seen_tokens, setup)
from samplers.sampling import GREEDY, SamplingConfig

Array = jax.Array

FREEZE_STRATEGIES = ("latent-diff", "latent-acceleration-1", "latent-acceleration-2", "token-stability", "fixed")

PRESETS: dict[str, dict[str, Any]] = {
    # Table 1 of the paper, "Diff. sampler r'=4, beta_t=0 (default)": 4.4-4.8x AR r=32 on Huginn-0125.
    "paper-main": dict(inner_recurrence=4, state_noise_mixing=0.0, ema_embeds=0.1, exit_t=0.03,
                       freeze_strategy="latent-diff", headway=1, max_wavefront=128),
    # Table 1, "Diff. sampler r'=2, beta_t=0.5": faster, about one point less accurate.
    "paper-fast": dict(inner_recurrence=2, state_noise_mixing=0.5, ema_embeds=0.1, exit_t=0.03,
                       freeze_strategy="latent-diff", headway=1, max_wavefront=128),
}

REFERENCE_FILLER_IDS = 65510  # the reference draws headway filler from [0, 65510)
ORDINARY_IDS = 65504  # Huginn's special tokens start at <|begin_text|> = 65504

STAT_NAMES = ("num_core_forward_passes", "num_tokens_forward", "num_cache_clears", "num_standing_waves",
              "diffusion_steps", "gen_seq_length", "len_prefill")


@dataclasses.dataclass(frozen=True)
class Plan:
    """The static shape of a diffusion run: what changes the compiled program. Every other option
    (freeze strategy, mixing, momentum, thresholds, compatibility) is a traced value."""

    headway: int
    ring: int  # max_wavefront: ring buffer entries and largest wavefront
    windows: tuple[int, ...]  # static window widths the model may run on
    full_prefill: bool
    max_new_tokens: int
    tablet_rows: int  # 0: no analysis tablets


@flax.struct.dataclass
class Wave:
    """Every sequence's sampler state ([B, ...] leaves)."""

    seq: Array  # [B, S] current sequence: frozen tokens, drafts, filler
    prompt_len: Array  # [B]
    n_frozen: Array  # [B]
    n_cur: Array  # [B] length of seq
    start: Array  # [B] first wavefront position (the reference's cache index)
    width: Array  # [B] wavefront positions holding a state
    states: Array  # [B, R, E] latent states by position mod R
    prev_states: Array  # [B, R, E] states after the previous step's freeze (latent strategies)
    prev_width: Array  # [B]
    prev2_states: Array  # [B, R, E] states after the freeze before that (latent-acceleration-2)
    prev2_width: Array  # [B]
    prev_delta: Array  # [B, R, E] latent-acceleration-1: last step's state changes by window index
    prev_delta_len: Array  # [B]
    old_start: Array  # [B] the previous step's start (the reference's old_cache_index)
    old_old_start: Array  # [B]
    embeds: Array  # [B, R, E] last step's (EMA-mixed) embeddings by position mod R
    embeds_end: Array  # [B] one past the last position they cover
    counter: Array  # [B, S] core steps spent per position
    stable: Array  # [B, S] steps in which a position's token did not change
    k: Array  # [B] the reference's freeze index variable
    old_k: Array  # [B]
    step: Array  # [B] diffusion steps completed
    done: Array  # [B]
    core_passes: Array  # [B]
    tokens_forward: Array  # [B]
    cache_clears: Array  # [B]
    standing_waves: Array  # [B]
    tablets: Array  # [4, B, rows, S] token, frozen, counter, stability tablets (rows may be 0)
    criterion_tablet: Array  # [B, rows, S] float32 freeze criterion per position (NaN: not judged)


def generate_diffusion_style(
        params: dict, input_ids: Any, *, config: HuginnConfig, max_new_tokens: int,
        num_steps: int | None = None, inner_recurrence: int = 4, headway: int = 1,
        state_noise_mixing: float = 0.5, dampened_state_mixer: bool = True, sqrt_mixer: bool = False,
        ema_embeds: float = 0.1, freeze_strategy: str = "latent-diff", exit_t: float = 0.03,
        max_wavefront: int = 128, continuous_compute: bool = False, full_prefill: bool = True,
        cache_lookup_strategy: str = SHARED, init_scale: float = 1.0, max_diffusion_steps: int = 4096,
        return_analysis_tablets: bool | int = False, reference_compatible: bool = False,
        sampling: SamplingConfig = GREEDY, stop_token_ids: Sequence[int] | None = None, key: Array | None = None,
        streamer: streaming.Streamer | None = None) -> GenerateOutput:
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
    reference_compatible: the reference's stop-token check, headway filler and overrun (see module).

    stats: the reference's scalar statistics (`STAT_NAMES`, [B] each), `recurrence_per_position`
    and `token_stable_per_position` (lists over the prompt and all frozen tokens of each sequence),
    and the core-step counts every sampler reports. tablets (with `return_analysis_tablets`): per
    sequence the per-step arrays `token_tablet`, `frozen_tablet`, `counter_tablet`,
    `stability_tablet` [steps, positions] (as the reference) and `criterion_tablet`: the latent
    freeze rules' criterion at each position the step judged (NaN elsewhere, and throughout for
    "token-stability" and "fixed", whose rules read the stability and counter tablets).
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
    run = setup(params, input_ids, config, max_new_tokens=max_new_tokens, init_scale=init_scale, sampling=sampling,
                stop_token_ids=stop_token_ids, key=key, random=sampling.do_sample or headway > 1,
                random_why="do_sample=True or headway > 1")
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
    cache = make_cache(config, params, run.batch, cache_lookup_strategy, max(num_steps, inner_recurrence), capacity)
    plan = Plan(headway=headway, ring=max_wavefront, windows=window_widths(max_wavefront),
                full_prefill=flags["full_prefill"], max_new_tokens=run.max_new_tokens,
                tablet_rows=tablet_rows(return_analysis_tablets, run.max_new_tokens, headway))
    values = dict(num_steps=jnp.int32(num_steps), inner_recurrence=jnp.int32(inner_recurrence),
                  freeze=jnp.int32(FREEZE_STRATEGIES.index(freeze_strategy)), exit_t=jnp.float32(exit_t),
                  ema=jnp.float32(ema_embeds), ema_keep=jnp.float32(1 - ema_embeds),
                  noise=jnp.float32(state_noise_mixing), dampened=jnp.bool_(flags["dampened_state_mixer"]),
                  sqrt_mixer=jnp.bool_(flags["sqrt_mixer"]), continuous=jnp.bool_(flags["continuous_compute"]),
                  compatible=jnp.bool_(flags["reference_compatible"]), init_scale=jnp.float32(run.init_scale),
                  max_diffusion_steps=jnp.int32(max_diffusion_steps))
    with streaming.session(streamer) as number:
        wave, _, _ = _generate(params, cache, jnp.asarray(run.prompts), jnp.asarray(run.lengths), values,
                               run.sampling, run.stops, run.keys, number, config=config, plan=plan,
                               stream=streamer is not None)
        wave = jax.device_get(wave)
    return diffusion_output(wave, run.lengths, plan, flags["reference_compatible"], num_steps)


WINDOW_WIDTHS = tuple(sorted({4, 8, 12} | {2 ** k for k in range(4, 13)} | {3 * 2 ** k for k in range(3, 12)}))
"""4, 8, 12, 16, 24, 32, 48, 64, 96, ...: neighbours at most 1.5x apart."""


def tablet_rows(return_analysis_tablets: bool | int, max_new_tokens: int, headway: int) -> int:
    """Steps the analysis tablets record (0: none)."""
    if return_analysis_tablets is True:
        return (max_new_tokens + headway) * 2
    if return_analysis_tablets is False:
        return 0
    if int(return_analysis_tablets) != return_analysis_tablets or return_analysis_tablets < 1:
        raise ValueError(f"return_analysis_tablets must be a bool or a positive number of steps, "
                         f"got {return_analysis_tablets!r}")
    return int(return_analysis_tablets)


def window_widths(ring: int) -> tuple[int, ...]:
    """Static widths the model may run a wavefront on: those of WINDOW_WIDTHS below `ring`, and
    `ring`. A wavefront runs on the narrowest that holds it, so it wastes at most a third of its
    window; each width is one more compiled copy of the model (powers of two alone compile 40 %
    faster and ran 9 % slower on the `cpu` benchmark profile)."""
    return tuple(w for w in WINDOW_WIDTHS if w < ring) + (ring,)


def diffusion_output(wave: Wave, lengths: np.ndarray, plan: Plan, reference_compatible: bool,
                     num_steps: int) -> GenerateOutput:
    """Host-side output record: generated tokens, per-token recurrence, statistics, tablets."""
    batch = lengths.shape[0]
    n_frozen = np.asarray(wave.n_frozen)
    generated = n_frozen - lengths
    if not reference_compatible:
        generated = np.minimum(generated, plan.max_new_tokens)
    width = max(int(generated.max()), 1)
    tokens = np.full((batch, width), NO_TOKEN, np.int32)
    steps = np.zeros((batch, width), np.int32)
    for b in range(batch):
        n = int(generated[b])
        tokens[b, :n] = wave.seq[b, lengths[b]: lengths[b] + n]
        steps[b, :n] = wave.counter[b, lengths[b]: lengths[b] + n]
    stats = {
        "num_core_forward_passes": np.asarray(wave.core_passes), "num_tokens_forward": np.asarray(wave.tokens_forward),
        "num_cache_clears": np.asarray(wave.cache_clears), "num_standing_waves": np.asarray(wave.standing_waves),
        "diffusion_steps": np.asarray(wave.step), "gen_seq_length": np.asarray(wave.n_cur),
        "len_prefill": np.asarray(lengths),
        # the prefill (num_steps on every prompt position), then inner_recurrence steps per sampler step
        "sequential_core_steps": num_steps * plan.full_prefill + np.asarray(wave.core_passes) - plan.full_prefill,
        "core_position_steps": (num_steps * np.asarray(lengths) + np.asarray(wave.tokens_forward) - np.asarray(lengths)
                                if plan.full_prefill else np.asarray(wave.tokens_forward)),
        "recurrence_per_position": [wave.counter[b, : n_frozen[b]].tolist() for b in range(batch)],
        "token_stable_per_position": [wave.stable[b, : n_frozen[b]].tolist() for b in range(batch)],
    }
    tablets = None
    if plan.tablet_rows:
        tablets = {name: np.asarray(wave.tablets[i]) for i, name in
                   enumerate(("token_tablet", "frozen_tablet", "counter_tablet", "stability_tablet"))}
        tablets["criterion_tablet"] = np.asarray(wave.criterion_tablet)
    return GenerateOutput(tokens=tokens, lengths=generated.astype(np.int64), recurrence_steps=steps, stats=stats,
                           tablets=tablets)


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


def norm(x: Array) -> Array:
    """Euclidean norm over the last axis, in float32."""
    return jnp.linalg.norm(x.astype(jnp.float32), axis=-1)


def relative_change(a: Array, b: Array) -> Array:
    """||a - b|| / ||a|| over the last axis."""
    return norm(a - b) / norm(a)


def last_true(mask: Array) -> tuple[Array, Array]:
    """(whether any entry of each row of mask [B, W] holds, the index of the last that does)."""
    index = jnp.arange(mask.shape[1])
    return jnp.any(mask, axis=1), jnp.max(jnp.where(mask, index, -1), axis=1)


@functools.partial(jax.jit, static_argnames=("config", "plan", "stream"), donate_argnames=("cache",))
def _generate(params: dict, cache: KVCache, prompts: Array, lengths: Array, values: dict[str, Array],
              sampling: SamplingConfig, stops: Stops, keys: Array, stream_number: Array, *, config: HuginnConfig,
              plan: Plan, stream: bool) -> tuple[Wave, KVCache, Array]:
    wave, cache = start_wave(params, config, plan, cache, prompts, lengths, values, sampling, keys)
    emit = functools.partial(stream_frozen, stream, stream_number, plan.ring)
    aborted = emit(wave.seq, lengths, wave.n_frozen, jnp.ones_like(wave.done))  # the prefill's token
    branches = [functools.partial(sampler_step, params, config, plan, width, values, sampling, stops, keys, emit)
                for width in plan.windows]

    def one_step(carry: tuple[Wave, KVCache, Array]) -> tuple[Wave, KVCache, Array]:
        wave, cache, aborted = carry
        widest = jnp.max(jnp.where(wave.done, 1, wave.width))
        wave, cache, raised = jax.lax.switch(jnp.searchsorted(jnp.asarray(plan.windows), widest), branches, wave,
                                             cache)
        return wave, cache, aborted | raised

    return jax.lax.while_loop(lambda carry: jnp.any(~carry[0].done) & ~carry[2], one_step, (wave, cache, aborted))


def start_wave(params: dict, config: HuginnConfig, plan: Plan, cache: KVCache, prompts: Array, lengths: Array,
               values: dict[str, Array], sampling: SamplingConfig, keys: Array) -> tuple[Wave, KVCache]:
    """The sampler state before the first step: prefilled (or not) prompt, first wavefront."""
    batch, prompt_width = prompts.shape
    ring, width_e = plan.ring, config.n_embd
    capacity = cache.capacity
    dtype = params["wte"].dtype
    rows = jnp.arange(batch)
    positions = jnp.arange(capacity)[None, :]
    seq = jnp.zeros((batch, capacity), jnp.int32).at[:, :prompt_width].set(prompts)
    zeros = jnp.zeros((batch, ring, width_e), dtype)
    counter = jnp.zeros((batch, capacity), jnp.int32)
    if plan.full_prefill:
        prompt, cache = prefill(params, config, cache, prompts, lengths, keys, values["init_scale"],
                                FixedDepth(values["num_steps"]))
        first = choose_tokens(row_keys(keys, CHOOSE, lengths), prompt.logits,
                              seen_tokens(prompts, lengths, config.vocab_size), sampling)
        seq = seq.at[rows, lengths].set(first)
        n_frozen = lengths + 1
        start, width = lengths, jnp.ones_like(lengths)
        counter = jnp.where(positions < n_frozen[:, None], values["num_steps"], 0)
        embeds_end = n_frozen  # the reference's first EMA reference covers the whole sequence
        core_passes, tokens_forward = jnp.ones_like(lengths), lengths
    else:
        n_frozen = lengths
        start, width = jnp.zeros_like(lengths), lengths
        embeds_end = lengths
        core_passes, tokens_forward = jnp.zeros_like(lengths), jnp.zeros_like(lengths)
    window = start[:, None] + jnp.arange(ring)[None, :]
    in_window = jnp.arange(ring)[None, :] < width[:, None]
    states = ring_write(zeros, window, random_state(config, keys, window, values["init_scale"], dtype, NEW_STATE),
                        in_window)
    # The first wavefront's EMA reference: the reference's prelude over the whole sequence.
    block, cache = embed_inputs(params, config, gather(seq, window), window, cache, writes=in_window)
    embeds = ring_write(zeros, window, block.embeds, in_window)
    tablets = jnp.zeros((4, batch, plan.tablet_rows, capacity), jnp.int32)
    zero = jnp.zeros_like(lengths)
    wave = Wave(seq=seq, prompt_len=lengths, n_frozen=n_frozen, n_cur=n_frozen, start=start, width=width,
                states=states, prev_states=states, prev_width=width, prev2_states=zeros, prev2_width=width,
                prev_delta=zeros, prev_delta_len=width, old_start=zero, old_old_start=zero, embeds=embeds,
                embeds_end=embeds_end, counter=counter, stable=jnp.zeros_like(counter), k=zero, old_k=zero,
                step=zero, done=n_frozen - lengths >= plan.max_new_tokens, core_passes=core_passes,
                tokens_forward=tokens_forward, cache_clears=zero, standing_waves=zero, tablets=tablets,
                criterion_tablet=jnp.full((batch, plan.tablet_rows, capacity), jnp.nan, jnp.float32))
    return wave, cache


def sampler_step(params: dict, config: HuginnConfig, plan: Plan, window: int, values: dict[str, Array],
                 sampling: SamplingConfig, stops: Stops, keys: Array, emit: Any, wave: Wave,
                 cache: KVCache) -> tuple[Wave, KVCache, Array]:
    """One sampler step of every running sequence, on a window of `window` positions (static)."""
    batch = wave.start.shape[0]
    ring, headway, capacity = plan.ring, plan.headway, cache.capacity
    dtype = params["wte"].dtype
    rows = jnp.arange(batch)
    active = ~wave.done
    start, width, n_frozen = wave.start, wave.width, wave.n_frozen
    index = jnp.arange(window)[None, :]  # window index i of position start + i
    positions = start[:, None] + index  # [B, W]
    in_window = (index < width[:, None]) & active[:, None]
    write_at = jnp.where(in_window, positions, capacity)  # positions outside the wavefront write nothing
    # Per-sequence randomness depends on (key, step) only, so a sequence samples the same alone or batched.
    step_keys = jax.vmap(lambda k, s: jax.random.split(jax.random.fold_in(k, s + 3), 4))(keys, wave.step)

    # Prelude over the wavefront's tokens, with momentum on the embeddings already seen.
    block, cache = embed_inputs(params, config, gather(wave.seq, positions), positions, cache, writes=in_window)
    new_embeds = block.embeds
    had = (positions < wave.embeds_end[:, None])[..., None]
    old = ring_read(wave.embeds, positions)
    embeds = new_embeds * values["ema_keep"].astype(dtype) + jnp.where(had, old * values["ema"].astype(dtype), 0)
    embeds_ring = ring_write(wave.embeds, positions, embeds, in_window)
    embeds_end = jnp.where(active, start + width, wave.embeds_end)

    # Noise mixing, then the inner recurrence.
    state = ring_read(wave.states, positions)
    counts = gather(wave.counter, positions)
    # With state_noise_mixing = 0 both mixers leave the state exactly as it is.
    noise = random_state(config, step_keys[:, 0], positions, values["init_scale"], dtype)
    beta = jnp.where(values["dampened"], values["noise"] / (1.0 + counts), values["noise"])[..., None].astype(dtype)
    state = jnp.where(values["sqrt_mixer"], state * jnp.sqrt(jax.nn.relu(1 - beta)) + jnp.sqrt(beta) * noise,
                      state * (1 - beta) + beta * noise)
    block = block.replace(embeds=embeds)
    recurred, cache = iterate(params, config, block, state, FixedDepth(values["inner_recurrence"]), cache)
    state = recurred.state
    r_inner = values["inner_recurrence"]
    counter = wave.counter.at[rows[:, None], write_at].add(r_inner, mode="drop")

    # Drafts: window index i drafts the token of position start + i + 1.
    hidden, cache = predict_from_latents(params, config, state, block.where, cache)
    logits = lm_head(params, config, hidden)
    seen = seen_tokens(wave.seq, n_frozen, config.vocab_size)
    # one key per (row, step, position): a draft never depends on the window's width or the batch
    draft_keys = jax.vmap(lambda k, p: row_keys(jnp.broadcast_to(k, p.shape), DRAFT, p))(step_keys[:, 1], positions)
    drafts = jax.vmap(lambda ks, lg, sn: choose_tokens(ks, lg, jnp.broadcast_to(sn, lg.shape), sampling))(
        draft_keys, logits, seen)
    offset = jnp.maximum(n_frozen - 1 - start, 0)
    seq_pos = jnp.arange(capacity)[None, :]
    draft_index = seq_pos - start[:, None] - 1
    draft_at = jnp.take_along_axis(drafts, jnp.clip(draft_index, 0, window - 1), axis=1)
    is_draft = (draft_index >= offset[:, None]) & (draft_index < width[:, None])
    given = seq_pos < jnp.maximum(n_frozen, wave.prompt_len)[:, None]  # frozen, or prompt (never drafted)
    unchanged = given | ((seq_pos < wave.n_cur[:, None]) & (wave.seq == draft_at))
    stable = wave.stable + (unchanged & active[:, None]).astype(jnp.int32)
    n_cur = start + width + headway
    filler_ids = jnp.where(values["compatible"], min(REFERENCE_FILLER_IDS, config.vocab_size),
                           min(ORDINARY_IDS, config.vocab_size))
    filler_at = (start + width + 1)[:, None] + jnp.arange(max(headway - 1, 1))[None, :]  # [B, headway - 1]
    filler_keys = jax.vmap(lambda k, p: row_keys(jnp.broadcast_to(k, p.shape), FILLER, p))(step_keys[:, 2], filler_at)
    filler_values = jax.vmap(jax.vmap(lambda k: jax.random.randint(k, (), 0, filler_ids, jnp.int32)))(filler_keys)
    filler = jnp.zeros_like(wave.seq).at[rows[:, None], filler_at].set(filler_values, mode="drop")
    is_filler = (seq_pos > (start + width)[:, None]) & (seq_pos < n_cur[:, None])
    seq = jnp.where(is_draft & ~given, draft_at, jnp.where(is_filler, filler, wave.seq))

    # Append headway new positions (fresh states, or copies of the rightmost ones), capped.
    appended = jnp.arange(headway)[None, :]
    new_states = random_state(config, step_keys[:, 3], (start + width)[:, None] + appended, values["init_scale"],
                              dtype)
    copied = jnp.take_along_axis(state, jnp.clip(width[:, None] - headway + appended, 0, window - 1)[..., None],
                                 axis=1)
    new_states = jnp.where((values["continuous"] & (width >= headway))[:, None, None], copied, new_states)
    states = ring_write(wave.states, positions, state, in_window)
    states = ring_write(states, (start + width)[:, None] + appended, new_states,
                        ((width[:, None] + appended) < ring) & active[:, None])
    grown = width + headway
    capped = grown > ring
    headway_in_step = jnp.where(capped, ring - width, headway)
    grown = jnp.minimum(grown, ring)
    n_cur = jnp.where(capped, jnp.minimum(n_cur, start + ring), n_cur)

    # Freeze decision: each strategy gives (freeze?, the new frozen length k, accel-1's delta memory).
    shift = start - wave.old_start  # the reference reads previous states shifted by this (see module)
    n_match = jnp.maximum(wave.prev_width - shift, 0)
    before = ring_read(wave.prev_states, positions + shift[:, None])
    no_delta = (wave.prev_delta, wave.prev_delta_len)

    def judged(criterion: Array, valid: Array, at: Array) -> tuple[Array, Array]:
        """The criterion [B, W] where it was evaluated, and the positions to record it at."""
        return jnp.where(valid, criterion, jnp.nan), jnp.where(valid, at, capacity)

    not_judged = (jnp.full((batch, window), jnp.nan, jnp.float32), jnp.full((batch, window), capacity))

    def latest_exit(criterion: Array, valid: Array) -> tuple[Array, Array]:
        any_exit, last = last_true(valid & (criterion < values["exit_t"]))
        return any_exit, start + last + 1

    def latent_diff():
        change, valid = relative_change(state, before), index < n_match[:, None]
        return *latest_exit(change, valid), *no_delta, *judged(change, valid, positions)

    def latent_acceleration_1():
        delta = state - before
        last_delta = ring_read(wave.prev_delta, wave.old_start[:, None] + index)
        valid = index < jnp.minimum(n_match, wave.prev_delta_len)[:, None]
        memory = ring_write(wave.prev_delta, positions, delta, (index < n_match[:, None]) & active[:, None])
        acceleration = norm(delta - last_delta) / norm(state)
        return *latest_exit(acceleration, valid), memory, n_match, *judged(acceleration, valid, positions)

    def latent_acceleration_2():
        lo = jnp.maximum(jnp.maximum(start, wave.old_start), wave.old_old_start)
        hi = jnp.minimum(jnp.minimum(start + grown, wave.old_start + wave.prev_width),
                         wave.old_old_start + wave.prev2_width)
        at = lo[:, None] + index
        current = ring_read(states, at)
        previous = ring_read(wave.prev_states, at - wave.old_start[:, None] + start[:, None])
        earlier = ring_read(wave.prev2_states, at - wave.old_old_start[:, None] + wave.old_start[:, None])
        acceleration = (current - previous) - (previous - earlier)
        # the reference adds the index within the overlap to the start, as here
        criterion, valid = norm(acceleration) / (norm(current) + 1e-6), index < (hi - lo)[:, None]
        return *latest_exit(criterion, valid), *no_delta, *judged(criterion, valid, at)

    def token_stability():
        any_stable, last = last_true(stable > values["num_steps"] // r_inner)
        return any_stable, last + 1, *no_delta, *not_judged

    def fixed():
        return jnp.broadcast_to(wave.step > values["num_steps"] // r_inner, start.shape), \
            n_frozen + headway_in_step, *no_delta, *not_judged

    freeze, k_new, prev_delta, prev_delta_len, criterion, criterion_at = jax.lax.switch(
        values["freeze"], [latent_diff, latent_acceleration_1, latent_acceleration_2, token_stability, fixed])
    is_fixed = values["freeze"] == FREEZE_STRATEGIES.index("fixed")
    is_token = values["freeze"] == FREEZE_STRATEGIES.index("token-stability")
    clears = jnp.where(freeze, jnp.where(is_fixed, grown - headway - headway_in_step, n_cur - headway_in_step - k_new + 1),
                       grown - headway_in_step)
    moved = jnp.where(freeze, jnp.where(is_fixed, headway_in_step, k_new - 1 - start), 0)
    k = jnp.where(is_fixed, wave.k, jnp.where(freeze, k_new, jnp.where(is_token, 0, wave.k)))
    new_frozen = jnp.where(freeze, k_new, n_frozen)
    new_start, new_width = start + moved, grown - moved

    # Stops: the reference's check (after num_steps steps, among this step's freezes), or ours.
    stops_at = stops.hit(seq)
    latent = values["freeze"] <= FREEZE_STRATEGIES.index("latent-acceleration-2")
    reference_span = jnp.where(latent, (seq_pos >= wave.old_k[:, None]) & (seq_pos < k[:, None]),
                               (seq_pos >= (new_frozen - headway)[:, None]) & (seq_pos < new_frozen[:, None]))
    reference_stop = (wave.step > values["num_steps"]) & jnp.any(stops_at & reference_span, axis=1)
    span = (seq_pos >= n_frozen[:, None]) & (seq_pos < new_frozen[:, None]) & (seq_pos >= wave.prompt_len[:, None])
    stop_here = stops_at & span
    # A stop token drafted by a state that converged in this step (the last frozen position's) is final,
    # as the token AR would emit from that state: it ends generation without waiting for the latent of
    # the position that reads it, which no later token needs (and which models rarely train).
    drafted_stop = latent & freeze & jnp.any(stops_at & (seq_pos == k_new[:, None]), axis=1) & (k_new < n_cur)
    stop_here = stop_here | ((seq_pos == k_new[:, None]) & (drafted_stop & ~jnp.any(stop_here, axis=1))[:, None])
    stop = jnp.where(values["compatible"], reference_stop, jnp.any(stop_here, axis=1))
    new_frozen = jnp.where(~values["compatible"] & stop, jnp.argmax(stop_here, axis=1) + 1, new_frozen)
    finished = stop | (wave.step > values["max_diffusion_steps"])
    end = jnp.where(values["compatible"], new_frozen, jnp.minimum(new_frozen, wave.prompt_len + plan.max_new_tokens))
    raised = emit(seq, jnp.maximum(n_frozen, wave.prompt_len), end, active)

    tablets, criterion_tablet = wave.tablets, wave.criterion_tablet
    if plan.tablet_rows:
        record = active & ~finished & (wave.step < plan.tablet_rows)
        rows_at = jnp.where(record, wave.step, plan.tablet_rows)
        entries = jnp.stack([jnp.where(seq_pos < n_cur[:, None], seq, 0),
                             jnp.where(seq_pos < new_frozen[:, None], seq, 0), counter, stable])
        tablets = tablets.at[:, rows, rows_at].set(entries, mode="drop")
        criterion_tablet = criterion_tablet.at[rows[:, None], rows_at[:, None], criterion_at].set(criterion,
                                                                                                  mode="drop")

    step = wave.step + (~finished).astype(jnp.int32)
    done = finished | (new_frozen - wave.prompt_len >= plan.max_new_tokens) | (n_cur > config.block_size)
    new = Wave(
        seq=seq, prompt_len=wave.prompt_len, n_frozen=new_frozen, n_cur=n_cur, start=new_start, width=new_width,
        states=states, prev_states=states, prev_width=new_width, prev2_states=wave.prev_states,
        prev2_width=wave.prev_width, prev_delta=prev_delta, prev_delta_len=prev_delta_len, old_start=start,
        old_old_start=wave.old_start, embeds=embeds_ring, embeds_end=embeds_end, counter=counter, stable=stable,
        k=k, old_k=k, step=step, done=done, core_passes=wave.core_passes + r_inner,
        tokens_forward=wave.tokens_forward + r_inner * width, cache_clears=wave.cache_clears + clears,
        standing_waves=wave.standing_waves + capped.astype(jnp.int32), tablets=tablets,
        criterion_tablet=criterion_tablet)
    keep = jax.tree.map(lambda a: active.reshape((-1,) + (1,) * (a.ndim - 1)) if a.ndim else active, new)
    keep = keep.replace(tablets=active[None, :, None, None])
    return jax.tree.map(jnp.where, keep, new, wave), cache, raised


def stream_frozen(enabled: bool, stream_number: Array, most: int, seq: Array, before: Array, after: Array,
                  active: Array) -> Array:
    """Hands each sequence's newly frozen tokens seq[before:after] (at most `most`) to the streamer;
    True once it has raised."""
    if not enabled:
        return jnp.bool_(False)
    window = jnp.take_along_axis(seq, jnp.clip(before[:, None] + jnp.arange(most)[None, :], 0, seq.shape[1] - 1),
                                 axis=1)
    return streaming.emit(True, stream_number, window, jnp.where(active, jnp.clip(after - before, 0, most), 0))
