"""One sampler step of every running sequence, as a composition of named stages:

1. `embed_with_momentum`: the prelude over the window's tokens, with momentum on the embeddings
   of positions already seen;
2. `mix_noise`: fresh random state mixed into every state;
3. `recur`: `inner_recurrence` core steps (`huginn_jax.model.iterate`);
4. `draft_tokens`: coda and head, a draft token from every position;
5. `place_drafts`: drafts and headway filler into the sequence, stability counts;
6. `append_headway`: states for the new positions, the wavefront cap;
7. `freeze.decide`: which tokens become final;
8. `check_stops`: stop tokens and stop strings among the newly frozen tokens;
9. `advance`: the new state, statistics and tablets; streaming.

The model runs on a window of W positions (static) from each sequence's wavefront start; positions
past a sequence's wavefront compute nothing that is kept and write nothing. Sequence bookkeeping
reads and writes only a span of W + headway positions from the start (the positions a step can
change), except where a rule looks at the whole sequence ("token-stability", the reference's stop
check).

Randomness: per sequence, keys depend on (row key, step, purpose, position) only (see
`samplers.common`), so a sequence samples the same alone or batched, whatever the window width.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from huginn_jax.config import HuginnConfig
from huginn_jax.kv_cache import KVCache
from huginn_jax.model import Embedded, embed_inputs, iterate, lm_head, predict_from_latents
from huginn_jax.recurrence import FixedDepth
from samplers import streaming
from samplers.common import DRAFT, FILLER, Stops, choose_tokens, keep_rows, random_state, row_keys, seen_tokens
from samplers.diffusion import freeze
from samplers.diffusion.settings import ORDINARY_IDS, REFERENCE_FILLER_IDS, Plan, Settings
from samplers.diffusion.state import Diffusion, FreezeMemory, Statistics, Tablets, Wavefront, gather, ring_read, \
    ring_write, scatter
from samplers.sampling import SamplingConfig

Array = jax.Array

STEP_SCOPE = "sampler_step"
"""Every step runs under this named scope (profiles separate it from the prefill)."""


@flax.struct.dataclass
class Context:
    """What every step reads and never changes."""

    params: dict
    settings: Settings
    sampling: SamplingConfig
    stops: Stops
    keys: Array  # [B] one PRNG key per sequence
    stream_number: Array  # the streaming session (0: none)
    config: HuginnConfig = flax.struct.field(pytree_node=False)
    plan: Plan = flax.struct.field(pytree_node=False)
    stream: bool = flax.struct.field(pytree_node=False)

    @property
    def dtype(self) -> Any:
        return self.params["wte"].dtype


@flax.struct.dataclass
class Loop:
    """The carry of the sampler loop."""

    state: Diffusion
    cache: KVCache
    aborted: Array  # bool scalar: the streamer raised


@flax.struct.dataclass
class Window:
    """This step's window over every sequence's wavefront (W positions from its start)."""

    positions: Array  # [B, W] position start + i of window index i
    real: Array  # [B, W] inside the wavefront of a running sequence
    active: Array  # [B] running sequences
    keys: Array  # [B, 4] this step's keys: noise, drafts, filler, new states

    @property
    def index(self) -> Array:
        return jnp.arange(self.positions.shape[1])[None, :]

    @property
    def write_at(self) -> Array:
        """[B, W] positions to write, past any buffer where nothing may be written."""
        return jnp.where(self.real, self.positions, jnp.iinfo(jnp.int32).max)


def open_window(ctx: Context, state: Diffusion, width: int) -> Window:
    """The window of `width` positions from each wavefront's start, and this step's keys."""
    wave = state.wave
    active = ~state.done
    index = jnp.arange(width)[None, :]
    # Per-sequence randomness depends on (key, step) only, so a sequence samples the same alone or batched.
    keys = jax.vmap(lambda k, s: jax.random.split(jax.random.fold_in(k, s + 3), 4))(ctx.keys, state.step)
    return Window(positions=wave.start[:, None] + index, real=(index < wave.width[:, None]) & active[:, None],
                  active=active, keys=keys)


# ---------------------------------------------------------------- the model's part

def embed_with_momentum(ctx: Context, wave: Wavefront, win: Window,
                        cache: KVCache) -> tuple[Embedded, Array, KVCache]:
    """The prelude over the window's tokens; positions already seen mix in their previous
    embeddings with weight ema. Returns the block (momentum embeddings), the updated embedding
    ring and the cache."""
    s = ctx.settings
    block, cache = embed_inputs(ctx.params, ctx.config, gather(wave.seq, win.positions), win.positions, cache,
                                writes=win.real)
    with jax.named_scope("momentum"):
        had = (win.positions < wave.embeds_end[:, None])[..., None]
        old = ring_read(wave.embeds, win.positions)
        embeds = block.embeds * s.ema_keep.astype(ctx.dtype) + jnp.where(had, old * s.ema.astype(ctx.dtype), 0)
        ring = ring_write(wave.embeds, win.positions, embeds, win.real)
    return block.replace(embeds=embeds), ring, cache


def mix_noise(ctx: Context, state: Diffusion, win: Window) -> Array:
    """The window's states [B, W, E] with fresh random state mixed in (weight state_noise_mixing,
    divided by 1 + the position's recurrence count when dampened); with no noise they stay as they are."""
    s = ctx.settings

    def mix(current: Array) -> Array:
        counts = gather(state.stats.counter, win.positions)
        noise = random_state(ctx.config, win.keys[:, 0], win.positions, s.init_scale, ctx.dtype)
        beta = jnp.where(s.dampened, s.noise / (1.0 + counts), s.noise)[..., None].astype(ctx.dtype)
        return jnp.where(s.sqrt_mixer, current * jnp.sqrt(jax.nn.relu(1 - beta)) + jnp.sqrt(beta) * noise,
                         current * (1 - beta) + beta * noise)

    with jax.named_scope("noise"):
        current = ring_read(state.wave.states, win.positions)
        # with no noise both mixers return the state exactly (a weight of 0): skip the draw
        return jax.lax.cond(s.noise > 0, mix, lambda current: current, current)


def recur(ctx: Context, block: Embedded, state: Array, cache: KVCache) -> tuple[Array, KVCache]:
    """inner_recurrence core steps from `state` [B, W, E]."""
    recurred, cache = iterate(ctx.params, ctx.config, block, state, FixedDepth(ctx.settings.inner_recurrence), cache)
    return recurred.state, cache


def draft_tokens(ctx: Context, wave: Wavefront, win: Window, block: Embedded, state: Array,
                 cache: KVCache) -> tuple[Array, KVCache]:
    """Coda and head over the window: window index i drafts the token at position start + i + 1
    ([B, W]), with one key per (sequence, step, position)."""
    hidden, cache = predict_from_latents(ctx.params, ctx.config, state, block.where, cache)
    logits = lm_head(ctx.params, ctx.config, hidden)
    with jax.named_scope("choose"):
        penalty = jnp.asarray(ctx.sampling.repetition_penalty, jnp.float32)
        # the frozen tokens, for a repetition penalty (not computed without one)
        seen = jax.lax.cond(penalty == 1.0, lambda: jnp.zeros((wave.seq.shape[0], ctx.config.vocab_size), bool),
                            lambda: seen_tokens(wave.seq, wave.n_frozen, ctx.config.vocab_size))
        keys = jax.vmap(lambda k, p: row_keys(jnp.broadcast_to(k, p.shape), DRAFT, p))(win.keys[:, 1], win.positions)
        drafts = jax.vmap(lambda ks, lg, sn: choose_tokens(ks, lg, jnp.broadcast_to(sn, lg.shape), ctx.sampling))(
            keys, logits, seen)
    return drafts, cache


# ---------------------------------------------------------------- the sequence's part

@flax.struct.dataclass
class Placed:
    """The sequence after this step's drafts."""

    seq: Array  # [B, S]
    stable: Array  # [B, S]
    n_cur: Array  # [B] start + width + headway (before the cap)


def place_drafts(ctx: Context, state: Diffusion, win: Window, drafts: Array) -> Placed:
    """Drafts into the sequence after the frozen tokens (never over the prompt), filler ids at the
    headway's extra positions, and +1 stability where a token stayed (frozen tokens always do)."""
    wave, headway = state.wave, ctx.plan.headway
    window = win.positions.shape[1]
    with jax.named_scope("place"):
        span = wave.start[:, None] + jnp.arange(window + headway)[None, :]  # [B, L] positions a step may change
        draft_index = span - wave.start[:, None] - 1
        draft_at = jnp.take_along_axis(drafts, jnp.clip(draft_index, 0, window - 1), axis=1)
        offset = jnp.maximum(wave.n_frozen - 1 - wave.start, 0)  # window positions that only reread frozen tokens
        is_draft = (draft_index >= offset[:, None]) & (draft_index < wave.width[:, None])
        given = span < jnp.maximum(wave.n_frozen, wave.prompt_len)[:, None]  # frozen, or prompt (never drafted)
        tokens = gather(wave.seq, span)
        unchanged = given | ((span < wave.n_cur[:, None]) & (tokens == draft_at))
        n_cur = wave.start + wave.width + headway
        end = wave.start + wave.width  # the last drafted position
        is_filler = (span > end[:, None]) & (span < n_cur[:, None])
        tokens = jnp.where(is_draft & ~given, draft_at, jnp.where(is_filler, filler(ctx, win, end, window), tokens))
        # every position before the wavefront is frozen: its token stayed
        before = (jnp.arange(wave.seq.shape[1])[None, :] < wave.start[:, None]) & win.active[:, None]
        stable = state.stats.stable + before.astype(jnp.int32)
        stable = scatter(stable, span, gather(stable, span) + unchanged.astype(jnp.int32), win.active[:, None])
        return Placed(seq=scatter(wave.seq, span, tokens, win.active[:, None]), stable=stable, n_cur=n_cur)


def filler(ctx: Context, win: Window, end: Array, window: int) -> Array:
    """[B, W + headway] filler ids at span index width + 1 + m (the headway's extra positions
    end + 1 + m, m < headway - 1), drawn per position; 0 elsewhere."""
    headway, vocab = ctx.plan.headway, ctx.config.vocab_size
    ids = jnp.where(ctx.settings.compatible, min(REFERENCE_FILLER_IDS, vocab), min(ORDINARY_IDS, vocab))
    extra = jnp.arange(max(headway - 1, 1))[None, :]
    at = (end + 1)[:, None] + extra  # [B, headway - 1]
    keys = jax.vmap(lambda k, p: row_keys(jnp.broadcast_to(k, p.shape), FILLER, p))(win.keys[:, 2], at)
    values = jax.vmap(jax.vmap(lambda k: jax.random.randint(k, (), 0, ids, jnp.int32)))(keys)
    index = (end + 1 - win.positions[:, 0])[:, None] + extra  # span index of each extra position
    return jnp.zeros((end.shape[0], window + headway), jnp.int32).at[
        jnp.arange(end.shape[0])[:, None], index].set(values, mode="drop")


@flax.struct.dataclass
class Appended:
    """The wavefront after this step's new positions."""

    states: Array  # [B, R, E] the window's new states and the appended positions' states
    grown: Array  # [B] width after the append and the cap
    capped: Array  # [B] bool: the cap bound (a standing wave)
    headway_in_step: Array  # [B] positions appended
    n_cur: Array  # [B] sequence length after the cap


def append_headway(ctx: Context, state: Diffusion, win: Window, recurred: Array, n_cur: Array) -> Appended:
    """Writes the window's states and appends `headway` positions (fresh random states, or copies
    of the rightmost states with continuous compute), at most up to max_wavefront positions."""
    wave, headway, ring = state.wave, ctx.plan.headway, ctx.plan.ring
    window = win.positions.shape[1]
    with jax.named_scope("append"):
        appended = jnp.arange(headway)[None, :]
        end = wave.start + wave.width
        fresh = random_state(ctx.config, win.keys[:, 3], end[:, None] + appended, ctx.settings.init_scale, ctx.dtype)
        copied = jnp.take_along_axis(
            recurred, jnp.clip(wave.width[:, None] - headway + appended, 0, window - 1)[..., None], axis=1)
        new = jnp.where((ctx.settings.continuous & (wave.width >= headway))[:, None, None], copied, fresh)
        states = ring_write(wave.states, win.positions, recurred, win.real)
        states = ring_write(states, end[:, None] + appended, new,
                            ((wave.width[:, None] + appended) < ring) & win.active[:, None])
        grown = wave.width + headway
        capped = grown > ring
        return Appended(states=states, grown=jnp.minimum(grown, ring), capped=capped,
                        headway_in_step=jnp.where(capped, ring - wave.width, headway),
                        n_cur=jnp.where(capped, jnp.minimum(n_cur, wave.start + ring), n_cur))


@flax.struct.dataclass
class Stopped:
    stop: Array  # [B] bool: the sequence ends in this step
    frozen: Array  # [B] the frozen length (cut after the stop in the default mode)
    stop_state: Array  # [B]


def check_stops(ctx: Context, state: Diffusion, decision: freeze.Decision, seq: Array, n_cur: Array) -> Stopped:
    """Default: the first stop id or stop string among the tokens frozen in this step ends the
    sequence after it; so does a stop id drafted at the frozen front by a state that converged in
    this step (latent rules). reference_compatible: the reference's check, only after num_steps
    steps and only among this step's freezes by its spans (stop ids)."""
    wave, ring = state.wave, ctx.plan.ring
    with jax.named_scope("stops"):
        lo = jnp.maximum(wave.n_frozen, wave.prompt_len)
        newly = jnp.clip(decision.frozen - lo, 0, ring)
        tokens = gather(seq, lo[:, None] + jnp.arange(ring)[None, :])
        stop_state, first = ctx.stops.first_stop(state.stop_state, tokens, jnp.where(state.done, 0, newly))
        found = first < ring
        at_front = gather(seq, decision.frozen[:, None])[:, 0]
        drafted = (decision.latent & decision.freeze & jnp.isin(at_front, ctx.stops.ids)
                   & (decision.frozen < n_cur))
        ours = jnp.where(found, lo + first + 1, decision.frozen + 1)

        def reference_check() -> Array:
            positions = jnp.arange(seq.shape[1])[None, :]
            latent_span = (positions >= state.memory.k[:, None]) & (positions < decision.k[:, None])
            headway_span = ((positions >= (decision.frozen - ctx.plan.headway)[:, None])
                            & (positions < decision.frozen[:, None]))
            span = jnp.where(decision.latent, latent_span, headway_span)
            return (state.step > ctx.settings.num_steps) & jnp.any(jnp.isin(seq, ctx.stops.ids) & span, axis=1)

        compatible = ctx.settings.compatible
        stop = jax.lax.cond(compatible, reference_check, lambda: found | drafted)
        return Stopped(stop=stop, frozen=jnp.where(~compatible & stop, ours, decision.frozen), stop_state=stop_state)


def stream_frozen(ctx: Context, seq: Array, before: Array, after: Array, active: Array) -> Array:
    """Hands each sequence's newly frozen tokens seq[before:after] to the streamer; True once it raised."""
    if not ctx.stream:
        return jnp.bool_(False)
    most = ctx.plan.ring
    window = gather(seq, before[:, None] + jnp.arange(most)[None, :])
    return streaming.emit(True, ctx.stream_number, window, jnp.where(active, jnp.clip(after - before, 0, most), 0))


def advance(ctx: Context, state: Diffusion, win: Window, embeds: Array, placed: Placed, appended: Appended,
            decision: freeze.Decision, stopped: Stopped) -> tuple[Diffusion, Array]:
    """The state after the step (running sequences only), and whether the streamer raised."""
    s, wave, stats, memory = ctx.settings, state.wave, state.stats, state.memory
    with jax.named_scope("advance"):
        finished = stopped.stop | (state.step > s.max_diffusion_steps)
        frozen = stopped.frozen
        end = jnp.where(s.compatible, frozen, jnp.minimum(frozen, wave.prompt_len + ctx.plan.max_new_tokens))
        raised = stream_frozen(ctx, placed.seq, jnp.maximum(wave.n_frozen, wave.prompt_len), end, win.active)
        new_width = appended.grown - decision.moved
        counter = stats.counter.at[jnp.arange(win.positions.shape[0])[:, None], win.write_at].add(
            s.inner_recurrence, mode="drop")
        new = Diffusion(
            wave=Wavefront(seq=placed.seq, prompt_len=wave.prompt_len, n_frozen=frozen, n_cur=appended.n_cur,
                           start=wave.start + decision.moved, width=new_width, states=appended.states,
                           embeds=embeds, embeds_end=jnp.where(win.active, wave.start + wave.width, wave.embeds_end)),
            memory=FreezeMemory(k=decision.k, old_start=wave.start, old_old_start=memory.old_start,
                                prev_states=appended.states, prev_width=new_width, prev2_states=memory.prev_states,
                                prev2_width=memory.prev_width, prev_delta=decision.prev_delta,
                                prev_delta_len=decision.prev_delta_len),
            stats=Statistics(core_passes=stats.core_passes + s.inner_recurrence,
                             tokens_forward=stats.tokens_forward + s.inner_recurrence * wave.width,
                             cache_clears=stats.cache_clears + decision.clears,
                             standing_waves=stats.standing_waves + appended.capped.astype(jnp.int32),
                             counter=counter, stable=placed.stable),
            tablets=None, step=state.step + (~finished).astype(jnp.int32),
            done=finished | (frozen - wave.prompt_len >= ctx.plan.max_new_tokens)
            | (appended.n_cur > ctx.config.block_size),
            stop_state=stopped.stop_state)
        # A batch of one runs only while its sequence does: nothing to keep.
        kept = new if win.active.shape[0] == 1 else keep_rows(win.active, new, state.replace(tablets=None))
        tablets = (record_tablets(ctx, state, win.active & ~finished, new, decision)
                   if state.tablets is not None else None)
        return kept.replace(tablets=tablets), raised


def record_tablets(ctx: Context, state: Diffusion, record: Array, new: Diffusion, decision: freeze.Decision) -> Tablets:
    """Row `step` of each recording sequence's tablets (the first tablet_rows steps)."""
    tablets, rows = state.tablets, ctx.plan.tablet_rows
    batch = jnp.arange(record.shape[0])
    at = jnp.where(record & (state.step < rows), state.step, rows)  # past the tablet: not recorded
    positions = jnp.arange(new.wave.seq.shape[1])[None, :]
    seq = new.wave.seq

    def put(tablet: Array, values: Array) -> Array:
        return tablet.at[batch, at].set(values, mode="drop")

    return Tablets(token=put(tablets.token, jnp.where(positions < new.wave.n_cur[:, None], seq, 0)),
                   frozen=put(tablets.frozen, jnp.where(positions < new.wave.n_frozen[:, None], seq, 0)),
                   counter=put(tablets.counter, new.stats.counter), stability=put(tablets.stability, new.stats.stable),
                   criterion=tablets.criterion.at[batch[:, None], at[:, None], decision.criterion_at].set(
                       decision.criterion, mode="drop"))


# ---------------------------------------------------------------- the step

def sampler_step(ctx: Context, width: int, loop: Loop) -> Loop:
    """One step of every running sequence on a window of `width` positions (static)."""
    with jax.named_scope(STEP_SCOPE):
        state, cache = loop.state, loop.cache
        win = open_window(ctx, state, width)
        block, embeds, cache = embed_with_momentum(ctx, state.wave, win, cache)
        mixed = mix_noise(ctx, state, win)
        recurred, cache = recur(ctx, block, mixed, cache)
        drafts, cache = draft_tokens(ctx, state.wave, win, block, recurred, cache)
        placed = place_drafts(ctx, state, win, drafts)
        appended = append_headway(ctx, state, win, recurred, placed.n_cur)
        with jax.named_scope("freeze"):
            decision = freeze.decide(freeze.FreezeView.create(
                state=recurred, states=appended.states, positions=win.positions, start=state.wave.start,
                grown=appended.grown, n_frozen=state.wave.n_frozen, n_cur=appended.n_cur,
                headway_in_step=appended.headway_in_step, stable=placed.stable, step=state.step, active=win.active,
                memory=state.memory, settings=ctx.settings, headway=ctx.plan.headway))
        stopped = check_stops(ctx, state, decision, placed.seq, appended.n_cur)
        new, raised = advance(ctx, state, win, embeds, placed, appended, decision, stopped)
        return Loop(state=new, cache=cache, aborted=loop.aborted | raised)
