"""The token-by-token decoding loop of the static-depth and adaptive-depth AR samplers.

A sampler hands it two recurrence controllers (`huginn_jax.recurrence`): one for the prompt and
one for every new token (`FixedDepth` for static AR, `AdaptiveExit` for adaptive depth). The loop
prefills, then decodes in a `lax.while_loop` on device until every sequence has stopped or
`max_new_tokens` are out: no Python dispatch per token or per recurrence step. One compiled
program serves both samplers. Decoding runs in phases of growing attention views, so a step reads
the keys of the positions in use (rounded up to a power of two), not the whole preallocated buffer.
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from huginn_jax import sharding
from huginn_jax.config import HuginnConfig
from huginn_jax.kv_cache import KVCache, attention_views
from huginn_jax.model import lm_head, run_block
from huginn_jax.recurrence import AdaptiveExit, Recurrence
from samplers import streaming
from samplers.common import (CHOOSE, INIT_STATE, NO_TOKEN, GenerateOutput, Setup, Stops, choose_tokens, prefill,
                             random_state, row_keys, seen_tokens)
from samplers.sampling import SamplingConfig

Array = jax.Array


@flax.struct.dataclass
class Decoding:
    """The decoding loop's carry ([B, ...] leaves but for `index` and `aborted`)."""

    index: Array  # scalar int32: tokens chosen so far per sequence (the next one's slot)
    cache: KVCache
    token: Array  # [B] the last chosen token, fed next
    next_state: Array  # [B, E] where continuous compute starts the next token
    seen: Array  # [B, V] ids in each sequence (repetition penalty)
    done: Array  # [B]
    stop_state: Array  # [B] the stop strings' automaton state (see `Stops`)
    tokens: Array  # [B, N] chosen tokens (NO_TOKEN past a stop)
    steps: Array  # [B, N] core steps each token received
    exit_values: Array | None  # [B, N, W] the exit criterion after every step, when recorded
    aborted: Array  # scalar bool: the streamer raised


def generate(params: dict, config: HuginnConfig, setup: Setup, cache: KVCache, prompt_recurrence: Recurrence,
             token_recurrence: Recurrence, *, continuous_compute: bool, resume_from_latents: bool,
             streamer: streaming.Streamer | None) -> GenerateOutput:
    """Runs the decoding loop for a validated `setup`; `resume_from_latents`: continuous compute
    starts from the previous token's latents (ln_f of the state, static AR) or its raw state
    (adaptive, as the reference)."""
    memory = cache.memory()
    prompts, lengths, keys = setup.device_inputs()
    with streaming.session(streamer) as number, sharding.use(setup.mesh):
        loop, filled = _decode(params, cache, prompts, lengths, keys, jnp.float32(setup.init_scale), setup.sampling,
                               setup.stops, prompt_recurrence, token_recurrence, number, config=config,
                               max_new_tokens=setup.max_new_tokens,
                               continuous_compute=bool(continuous_compute), resume_from_latents=resume_from_latents,
                               stream=streamer is not None)
        # the cache stays on device (its buffers alias the donated input's, then are freed)
        loop, filled = jax.device_get((loop.replace(cache=None), filled))
    tokens, steps = np.asarray(loop.tokens), np.asarray(loop.steps)
    # The first token comes from the prefill, whose steps ran over every prompt position.
    stats = {"sequential_core_steps": steps.sum(axis=1),
             "core_position_steps": steps[:, 0] * setup.lengths + steps[:, 1:].sum(axis=1),
             **memory.stats(filled)}
    return GenerateOutput(tokens=tokens, lengths=(tokens != NO_TOKEN).sum(axis=1), recurrence_steps=steps,
                          stats=stats, exit_values=None if loop.exit_values is None else np.asarray(loop.exit_values))


def recorded_values(recurrence: Recurrence, memory) -> Array | None:
    """The exit criterion's values after every step [B, W], when the controller records them."""
    return memory.values if isinstance(recurrence, AdaptiveExit) and recurrence.record_width else None


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "continuous_compute",
                                             "resume_from_latents", "stream"), donate_argnames=("cache",))
def _decode(params: dict, cache: KVCache, prompts: Array, lengths: Array, keys: Array, init_scale: Array,
            sampling: SamplingConfig, stops: Stops, prompt_recurrence: Recurrence, token_recurrence: Recurrence,
            stream_number: Array, *, config: HuginnConfig, max_new_tokens: int, continuous_compute: bool,
            resume_from_latents: bool, stream: bool) -> tuple[Decoding, Array]:
    """The decoding loop's final carry, and each row's filled cache entries [B]."""
    batch = prompts.shape[0]
    rows = jnp.arange(batch)
    dtype = params["wte"].dtype

    def choose(index: Array, logits: Array, steps: Array, values: Array | None, loop: Decoding) -> Decoding:
        """Chooses token `index` of every running sequence from logits [B, V] and records it."""
        token = choose_tokens(row_keys(keys, CHOOSE, lengths + index), logits, loop.seen, sampling)
        token = jnp.where(loop.done, NO_TOKEN, token)
        exit_values = loop.exit_values
        if exit_values is not None:
            exit_values = exit_values.at[:, index].set(jnp.where(loop.done[:, None], jnp.nan, values))
        running = (~loop.done).astype(jnp.int32)
        aborted = loop.aborted | streaming.emit(stream, stream_number, token[:, None], running)
        stop_state, first_stop = stops.first_stop(loop.stop_state, token[:, None], running)
        return loop.replace(
            token=token, seen=loop.seen.at[rows, jnp.maximum(token, 0)].max(~loop.done), stop_state=stop_state,
            done=loop.done | (first_stop == 0), tokens=loop.tokens.at[:, index].set(token),
            steps=loop.steps.at[:, index].set(jnp.where(loop.done, 0, steps)), exit_values=exit_values,
            aborted=aborted)

    prompt, cache = prefill(params, config, cache, prompts, lengths, keys, init_scale, prompt_recurrence)
    first_values = recorded_values(prompt_recurrence, prompt.block.memory)
    exit_values = None
    if first_values is not None:
        exit_values = jnp.full((batch, max_new_tokens, first_values.shape[-1]), jnp.nan, jnp.float32)
    loop = Decoding(index=jnp.int32(0), cache=cache, token=jnp.zeros((batch,), jnp.int32),
                    next_state=prompt.latents if resume_from_latents else prompt.state,
                    seen=seen_tokens(prompts, lengths, config.vocab_size), done=jnp.zeros((batch,), bool),
                    stop_state=stops.start(batch),
                    tokens=jnp.full((batch, max_new_tokens), NO_TOKEN, jnp.int32),
                    steps=jnp.zeros((batch, max_new_tokens), jnp.int32), exit_values=exit_values,
                    aborted=jnp.bool_(False))
    loop = choose(0, prompt.logits, prompt.block.steps, first_values, loop)
    loop = loop.replace(index=jnp.int32(1))

    def running(view: int, loop: Decoding) -> Array:
        return ((loop.index < max_new_tokens) & ~jnp.all(loop.done) & ~loop.aborted
                & (jnp.max(lengths) + loop.index - 1 < view))

    def decode_one(view: int, loop: Decoding) -> Decoding:
        """Feeds token index - 1 of every running sequence (at its own position), chooses token index."""
        positions = (lengths + loop.index - 1)[:, None]
        if continuous_compute:
            state = loop.next_state[:, None, :]
        else:
            state = random_state(config, keys, positions, init_scale, dtype, INIT_STATE)
        out, cache = run_block(params, config, jnp.where(loop.done, 0, loop.token)[:, None], positions, state,
                               token_recurrence, loop.cache.view(view), active=~loop.done)
        logits = lm_head(params, config, out.hidden[:, 0])
        next_state = out.latents[:, 0] if resume_from_latents else out.state[:, 0]
        loop = loop.replace(cache=cache.view(None), next_state=next_state)
        loop = choose(loop.index, logits, out.steps, recorded_values(token_recurrence, out.memory), loop)
        return loop.replace(index=loop.index + 1)

    for view in attention_views(cache.capacity):
        loop = jax.lax.while_loop(functools.partial(running, view), functools.partial(decode_one, view), loop)
    # Every chosen token but the last was fed: the cache holds positions < lengths + count - 1.
    count = jnp.sum(loop.tokens != NO_TOKEN, axis=1)
    return loop, loop.cache.filled_entries(lengths + count - 1)
