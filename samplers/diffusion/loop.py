"""The sampler loop: a start (prefill, first wavefront), then phases of sampler steps, each phase
one compiled `lax.while_loop` on a window and an attention view of static width.

A phase runs while every running sequence's wavefront fits its window (width <= window) and the
positions in use fit its attention view (start + width <= view). When a wavefront outgrows the
window, or shrinks to a quarter of it, or the text outgrows the view, the phase ends and the host
picks the next: the narrowest window that holds the widest wavefront (`settings.WINDOW_WIDTHS`:
8, then steps of at most 25 %) and the narrowest view that holds the text
(`kv_cache.attention_views`). Only the (window, view) pairs a run meets are compiled, once each,
and a step's cost follows its wavefront (padded by at most 20 % above 8 positions) and the length
of its text, not max_wavefront or the buffer's size. Between phases the host reads four numbers
per sequence; the sampler state and the cache stay on the device.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from huginn_jax.kv_cache import KVCache, attention_views
from huginn_jax.model import embed_inputs
from huginn_jax.recurrence import FixedDepth
from samplers.common import CHOOSE, NEW_STATE, choose_tokens, prefill, random_state, row_keys, seen_tokens
from samplers.diffusion.settings import window_for
from samplers.diffusion.state import Diffusion, FreezeMemory, Statistics, Tablets, Wavefront, gather, ring_write
from samplers.diffusion.step import Context, Loop, sampler_step, stream_frozen

Array = jax.Array

PREFILL_SCOPE = "prefill"
SHRINK = 4
"""A phase ends when the widest wavefront fits a quarter of its window."""


def run(ctx: Context, cache: KVCache, prompts: Array, lengths: Array) -> Loop:
    """Runs every sequence to its end; returns the final loop carry (on the device)."""
    loop = start(ctx, cache, prompts, lengths)
    views = attention_views(cache.capacity)
    while True:
        done, width, first, aborted = jax.device_get(
            (loop.state.done, loop.state.wave.width, loop.state.wave.start, loop.aborted))
        running = ~np.asarray(done)
        if aborted or not running.any():
            return loop
        widest = int(width[running].max())
        reach = int((first + width)[running].max())
        window = window_for(widest, ctx.plan.ring)
        view = next(v for v in views if v >= reach)
        loop = run_phase(ctx, loop, jnp.int32(shrink_below(window, ctx.plan.ring)), window=window, view=view)


def shrink_below(window: int, ring: int) -> int:
    """The width at or below which a phase on `window` ends for a narrower one: a quarter of it, if
    that fits a narrower window (else 0: never). The host picks the narrowest window that holds the
    widest wavefront, so a phase always runs at least one step."""
    low = window // SHRINK
    return low if window_for(low, ring) < window else 0


@functools.partial(jax.jit, static_argnames=("window", "view"), donate_argnames=("loop",))
def run_phase(ctx: Context, loop: Loop, low: Array, *, window: int, view: int) -> Loop:
    """Sampler steps on a window of `window` positions and an attention view of `view` positions
    while every running wavefront is wider than `low` and fits both."""

    def fits(loop: Loop) -> Array:
        wave, running = loop.state.wave, ~loop.state.done
        widest = jnp.max(jnp.where(running, wave.width, 0))
        reach = jnp.max(jnp.where(running, wave.start + wave.width, 0))
        return jnp.any(running) & ~loop.aborted & (widest <= window) & (widest > low) & (reach <= view)

    loop = loop.replace(cache=loop.cache.view(view))
    loop = jax.lax.while_loop(fits, functools.partial(sampler_step, ctx, window), loop)
    return loop.replace(cache=loop.cache.view(None))


@functools.partial(jax.jit, donate_argnames=("cache",))
def start(ctx: Context, cache: KVCache, prompts: Array, lengths: Array) -> Loop:
    """The state before the first step: the prompt prefilled at num_steps and its next token frozen
    (or, without full_prefill, the prompt as the first wavefront), the first wavefront's states and
    embeddings (the reference's prelude over the sequence, the first step's momentum reference)."""
    config, plan, s = ctx.config, ctx.plan, ctx.settings
    batch, prompt_width = prompts.shape
    capacity, dtype = cache.capacity, ctx.dtype
    positions = jnp.arange(capacity)[None, :]
    seq = jnp.zeros((batch, capacity), jnp.int32).at[:, :prompt_width].set(prompts)
    empty = jnp.zeros((batch, plan.ring, config.n_embd), dtype)
    zero, one = jnp.zeros_like(lengths), jnp.ones_like(lengths)
    stop_state, stopped = ctx.stops.start(batch), jnp.zeros((batch,), bool)
    if plan.full_prefill:
        with jax.named_scope(PREFILL_SCOPE):
            prompt, cache = prefill(ctx.params, config, cache, prompts, lengths, ctx.keys, s.init_scale,
                                    FixedDepth(s.num_steps))
            first = choose_tokens(row_keys(ctx.keys, CHOOSE, lengths), prompt.logits,
                                  seen_tokens(prompts, lengths, config.vocab_size), ctx.sampling)
        seq = seq.at[jnp.arange(batch), lengths].set(first)
        n_frozen, begin, width = lengths + 1, lengths, one
        counter = jnp.where(positions < n_frozen[:, None], s.num_steps, 0)
        core_passes, tokens_forward = one, lengths
        stop_state, first_stop = ctx.stops.first_stop(stop_state, first[:, None], one)
        stopped = (first_stop == 0) & ~s.compatible  # the reference checks stops only after num_steps steps
        first_window = 1  # the wavefront is the first new token
    else:
        n_frozen, begin, width = lengths, zero, lengths
        counter = jnp.zeros((batch, capacity), jnp.int32)
        core_passes, tokens_forward = zero, zero
        first_window = min(plan.ring, prompt_width)  # the wavefront is the prompt
    window = begin[:, None] + jnp.arange(first_window)[None, :]
    real = jnp.arange(first_window)[None, :] < width[:, None]
    states = ring_write(empty, window, random_state(config, ctx.keys, window, s.init_scale, dtype, NEW_STATE), real)
    block, cache = embed_inputs(ctx.params, config, gather(seq, window), window, cache, writes=real)
    tablets = None
    if plan.tablet_rows:
        grid = jnp.zeros((batch, plan.tablet_rows, capacity), jnp.int32)
        tablets = Tablets(token=grid, frozen=grid, counter=grid, stability=grid,
                          criterion=jnp.full(grid.shape, jnp.nan, jnp.float32))
    state = Diffusion(
        wave=Wavefront(seq=seq, prompt_len=lengths, n_frozen=n_frozen, n_cur=n_frozen, start=begin, width=width,
                       states=states, embeds=ring_write(empty, window, block.embeds, real), embeds_end=n_frozen),
        memory=FreezeMemory(k=zero, old_start=zero, old_old_start=zero, prev_states=states, prev_width=width,
                            prev2_states=empty, prev2_width=width, prev_delta=empty, prev_delta_len=width),
        stats=Statistics(core_passes=core_passes, tokens_forward=tokens_forward, cache_clears=zero,
                         standing_waves=zero, counter=counter, stable=jnp.zeros_like(counter)),
        tablets=tablets, step=zero, done=(n_frozen - lengths >= plan.max_new_tokens) | stopped,
        stop_state=stop_state)
    aborted = stream_frozen(ctx, seq, lengths, n_frozen, jnp.ones((batch,), bool))  # the prefill's token
    return Loop(state=state, cache=cache, aborted=aborted)
