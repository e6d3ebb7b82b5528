"""Self-speculative decoding, the reference's `generate_speculative`.

The model drafts for itself: `lookahead_for_draft` tokens, one at a time, at a shallow depth of
`draft_steps`; then one forward pass at the full depth `num_steps` over [last token, drafts]
verifies them all in parallel. Drafted tokens are accepted up to the first one the deep pass
disagrees with (`verification_threshold >= 1`: not its argmax; below 1: its probability under the
deep pass is less than that fraction of the largest); at a disagreement the deep pass's own token
is taken instead. Every round adds at least one token.

Everything runs in one jitted loop over rounds. Batched sequences accept independently: each has
its own cursor into the fixed-shape cache, and rejected drafts are rolled back by moving the
cursor, never by copying (their keys are overwritten before anything reads them). The reference
batches by clearing every sequence's cache to the shortest acceptance and padding the others.

With `continuous_compute`, a draft starts from the previous token's final latent; the deep pass
starts from the random state (the reference's deep pass would need one state per position).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from huginn_jax import sharding, validation
from huginn_jax.config import HuginnConfig
from huginn_jax.kv_cache import FULL, CacheStrategy, KVCache, attention_views
from huginn_jax.model import lm_head, run_block
from huginn_jax.recurrence import FixedDepth
from samplers import streaming
from samplers.common import (CHOOSE, DRAFT, INIT_STATE, NO_TOKEN, GenerateOutput, Stops, choose_tokens, keep_rows,
                             make_cache, prefill, random_state, row_keys, seen_tokens, setup)
from samplers.sampling import GREEDY, SamplingConfig, first_argmax

Array = jax.Array


@flax.struct.dataclass
class Draft:
    """Every sequence's decoding state ([B, ...] leaves)."""

    seq: Array  # [B, S] prompt and generated tokens (drafts beyond `length` are tentative)
    length: Array  # [B] tokens in seq; the cache holds keys for positions < length - 1
    count: Array  # [B] generated tokens
    done: Array  # [B]
    stop_state: Array  # [B] the stop strings' automaton state (see `samplers.common.Stops`)
    next_state: Array  # [B, E] where continuous compute starts the next token
    rounds: Array  # [B]
    accepted: Array  # [B, max_rounds] drafted tokens accepted per round (-1: no such round)


@flax.struct.dataclass
class Rounds:
    """The loop's carry: every sequence's draft state, the cache, whether the streamer raised."""

    draft: Draft
    cache: KVCache
    aborted: Array  # scalar bool


@sharding.on_mesh
def generate_speculative(params: dict, input_ids: Any, *, config: HuginnConfig, max_new_tokens: int,
                         draft_steps: int = 32, lookahead_for_draft: int = 8, verification_threshold: float = 1.0,
                         num_steps: int | None = None, continuous_compute: bool = False, init_scale: float = 1.0,
                         cache_lookup_strategy: str = FULL, sampling: SamplingConfig = GREEDY,
                         stop_token_ids: Sequence[int] | None = None, stop_strings: Sequence[str] | None = None,
                         tokenizer: Any = None, key: Array | None = None,
                         streamer: streaming.Streamer | None = None, mesh: Any = None) -> GenerateOutput:
    """Generates with self-speculative decoding; options and defaults as the reference's (the paper's
    tuned setting is draft_steps=4, lookahead_for_draft=4).

    num_steps: the verifying depth (default: the config's mean_recurrence).
    mesh: a device mesh to run on, as in `generate_minimal`.
    The output holds at most max_new_tokens tokens per sequence (the reference may return up to
    lookahead_for_draft - 1 more); the round that reaches it keeps only the tokens it needs.
    stats: `rounds`, `draft_forward_passes` (shallow one-token passes), `verify_forward_passes`
    (full-depth passes, the prefill included) ([B] each) and `accepted_per_round` (a list per
    sequence: how many drafted tokens each round accepted; a round that rejects one also adds the
    deep pass's own token), besides the core-step counts every sampler reports.
    """
    num_steps = validation.integer("num_steps", config.mean_recurrence if num_steps is None else num_steps,
                                   minimum=1)
    draft_steps = validation.integer("draft_steps", draft_steps, minimum=1)
    lookahead = validation.integer("lookahead_for_draft", lookahead_for_draft, minimum=1)
    threshold = validation.number("verification_threshold", verification_threshold, above=0.0)
    continuous_compute = validation.boolean("continuous_compute", continuous_compute)
    strategy = CacheStrategy.parse(cache_lookup_strategy, config.n_layers_in_recurrent_block)
    # The last round may draft and verify up to lookahead - 1 positions past max_new_tokens.
    run = setup(params, input_ids, config, max_new_tokens=max_new_tokens, init_scale=init_scale, sampling=sampling,
                stop_token_ids=stop_token_ids, stop_strings=stop_strings, tokenizer=tokenizer, key=key,
                random=sampling.do_sample or strategy.needs_key,
                random_why="do_sample=True or cache_lookup_strategy='randomized'", headroom=lookahead - 1,
                mesh=mesh)
    # Drafts no deeper than the verifying pass never read a step that an earlier position lacks.
    cache = make_cache(run.config, run.params, run.batch, strategy, max(num_steps, draft_steps),
                       run.prompts.shape[1] + run.max_new_tokens + lookahead - 1, keys=run.keys, mesh=run.mesh,
                       uniform_depth=draft_steps <= num_steps)
    memory = cache.memory()
    depth = (jnp.int32(num_steps), jnp.int32(draft_steps), jnp.float32(threshold))
    prompts, lengths, keys = run.device_inputs()
    with streaming.session(streamer) as number, sharding.use(run.mesh):
        loop, filled = _generate(run.params, cache, prompts, lengths, depth, jnp.float32(run.init_scale),
                                 run.sampling, run.stops, keys, number, config=run.config,
                                 max_new_tokens=run.max_new_tokens, lookahead=lookahead,
                                 continuous_compute=continuous_compute, stream=streamer is not None)
        draft, filled = jax.device_get((loop.draft, filled))
    generated = np.asarray(draft.count)
    batch = generated.shape[0]
    tokens = np.full((batch, max(int(generated.max()), 1)), NO_TOKEN, np.int32)
    for b in range(batch):
        tokens[b, : generated[b]] = draft.seq[b, run.lengths[b]: run.lengths[b] + generated[b]]
    steps = np.where(tokens != NO_TOKEN, num_steps, 0).astype(np.int32)
    rounds = np.asarray(draft.rounds)
    per_round = draft_steps * lookahead + num_steps  # drafts one after another, then one verifying pass
    stats = {"rounds": rounds, "draft_forward_passes": rounds * lookahead, "verify_forward_passes": rounds + 1,
             "accepted_per_round": [draft.accepted[b, : rounds[b]].tolist() for b in range(batch)],
             "sequential_core_steps": num_steps + rounds * per_round,
             "core_position_steps": num_steps * run.lengths + rounds * lookahead * (draft_steps + num_steps),
             **memory.stats(filled)}
    return GenerateOutput(tokens=tokens, lengths=generated.astype(np.int64), recurrence_steps=steps, stats=stats)


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "lookahead", "continuous_compute",
                                             "stream"), donate_argnames=("cache",))
def _generate(params: dict, cache: KVCache, prompts: Array, lengths: Array, depth: tuple[Array, Array, Array],
              init_scale: Array, sampling: SamplingConfig, stops: Stops, keys: Array, stream_number: Array, *,
              config: HuginnConfig, max_new_tokens: int, lookahead: int, continuous_compute: bool,
              stream: bool) -> tuple[Rounds, Array]:
    """The rounds' final carry, and each row's filled cache entries [B]."""
    num_steps, draft_steps, threshold = depth
    batch, prompt_width = prompts.shape
    capacity = cache.capacity
    dtype = params["wte"].dtype
    rows = jnp.arange(batch)

    # Prefill at the full depth; its logits give the first token.
    prompt, cache = prefill(params, config, cache, prompts, lengths, keys, init_scale, FixedDepth(num_steps))
    first = choose_tokens(row_keys(keys, CHOOSE, lengths), prompt.logits,
                          seen_tokens(prompts, lengths, config.vocab_size), sampling)
    one = jnp.ones((batch,), jnp.int32)
    aborted = streaming.emit(stream, stream_number, first[:, None], one)
    stop_state, first_stop = stops.first_stop(stops.start(batch), first[:, None], one)
    seq = jnp.zeros((batch, capacity), jnp.int32).at[:, :prompt_width].set(prompts).at[rows, lengths].set(first)
    draft = Draft(seq=seq, length=lengths + 1, count=jnp.ones_like(lengths),
                  done=(first_stop == 0) | (max_new_tokens <= 1), stop_state=stop_state, next_state=prompt.latents,
                  rounds=jnp.zeros_like(lengths), accepted=jnp.full((batch, max_new_tokens), -1, jnp.int32))
    offsets = jnp.arange(lookahead)[None, :]

    def one_round(view: int, carry: Rounds) -> Rounds:
        draft, cache = carry.draft, carry.cache.view(view)
        active = ~draft.done
        base = draft.length - 1  # position of the last accepted token: the first the round feeds

        def draft_one(j: Array, inner: tuple[Array, Array, KVCache]) -> tuple[Array, Array, KVCache]:
            seq, previous, cache = inner
            at = base + j
            if continuous_compute:
                state = previous[:, None, :]
            else:
                state = random_state(config, keys, at[:, None], init_scale, dtype, INIT_STATE)
            out, cache = run_block(params, config, seq[rows, at][:, None], at[:, None], state,
                                   FixedDepth(draft_steps), cache, active=active)
            logits = lm_head(params, config, out.hidden[:, 0])
            guess = choose_tokens(row_keys(keys, DRAFT, at + 1), logits,
                                  seen_tokens(seq, at + 1, config.vocab_size), sampling)
            seq = seq.at[rows, jnp.where(active, at + 1, capacity)].set(guess, mode="drop")
            return seq, out.latents[:, 0], cache

        seq, _, cache = jax.lax.fori_loop(0, lookahead, draft_one, (draft.seq, draft.next_state, cache))

        # Verify [last token, drafts 1..lookahead-1] at the full depth in one pass.
        at = base[:, None] + offsets  # [B, L]
        state = random_state(config, keys, at, init_scale, dtype, INIT_STATE)
        out, cache = run_block(params, config, jnp.take_along_axis(seq, at, axis=1), at, state,
                               FixedDepth(num_steps), cache, active=active)
        logits = lm_head(params, config, out.hidden)  # [B, L, V]: the token after each position
        drafted = jnp.take_along_axis(seq, at + 1, axis=1)
        exact = first_argmax(logits) == drafted
        probs = jax.nn.softmax(logits, axis=-1)
        drafted_prob = jnp.take_along_axis(probs, drafted[..., None], axis=-1)[..., 0]
        relaxed = drafted_prob >= threshold * probs.max(axis=-1)
        ok = jnp.where(threshold >= 1, exact, relaxed)
        accepted = jnp.where(jnp.all(ok, axis=1), lookahead, jnp.argmin(ok, axis=1))  # first rejection
        rejected = accepted < lookahead
        resample_at = jnp.minimum(accepted, lookahead - 1)
        final = choose_tokens(row_keys(keys, CHOOSE, base + accepted + 1), logits[rows, resample_at],
                              seen_tokens(draft.seq, draft.length, config.vocab_size), sampling)
        seq = seq.at[rows, jnp.where(active & rejected, base + accepted + 1, capacity)].set(final, mode="drop")
        new = jnp.where(rejected, accepted + 1, lookahead)

        # Stops among the new tokens, then the bookkeeping.
        new_positions = draft.length[:, None] + offsets
        new_tokens = jnp.take_along_axis(seq, jnp.minimum(new_positions, capacity - 1), axis=1)
        stop_state, first_stop = stops.first_stop(draft.stop_state, new_tokens, jnp.where(active, new, 0))
        stopped = first_stop < lookahead
        new = jnp.where(stopped, first_stop + 1, new)
        new = jnp.minimum(new, max_new_tokens - draft.count)  # never past max_new_tokens
        aborted = carry.aborted | streaming.emit(stream, stream_number, new_tokens, jnp.where(active, new, 0))
        count = draft.count + new
        latest = out.latents[rows, jnp.minimum(new - 1, lookahead - 1)]
        updated = Draft(seq=seq, length=draft.length + new, count=count, done=stopped | (count >= max_new_tokens),
                        stop_state=stop_state, next_state=latest, rounds=draft.rounds + 1,
                        accepted=draft.accepted.at[rows, jnp.minimum(draft.rounds, max_new_tokens - 1)].set(accepted))
        return Rounds(keep_rows(active, updated, draft), cache.view(None), aborted)

    def running(view: int, carry: Rounds) -> Array:
        draft = carry.draft
        return (jnp.any(~draft.done) & ~carry.aborted
                & (jnp.max(jnp.where(draft.done, 0, draft.length)) + lookahead <= view))

    carry = Rounds(draft, cache, aborted)
    for view in attention_views(capacity):
        carry = jax.lax.while_loop(functools.partial(running, view), functools.partial(one_round, view), carry)
    # The cache holds the final keys of positions < length - 1 (later ones are drafts or not yet fed).
    return carry, carry.cache.filled_entries(carry.draft.length - 1)
