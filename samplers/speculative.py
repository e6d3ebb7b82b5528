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

import dataclasses
import functools
from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from huginn_jax.config import HuginnConfig
from huginn_jax.kv_cache import FULL, KVCache, attention_views
from huginn_jax.model import lm_logits
from samplers.autoregressive import prepare
from samplers.common import (NO_TOKEN, GenerateOutput, StreamCallback, check_num_steps, random_state, run_tokens,
                             seen_tokens, stream)
from samplers.sampling import GREEDY, SamplingConfig, first_argmax, next_token

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class SpeculativeOutput(GenerateOutput):
    """Generated tokens plus per-sequence statistics: `rounds`, `draft_forward_passes` (shallow
    one-token passes), `verify_forward_passes` (full-depth passes, the prefill included) ([B]
    each) and `accepted_per_round` (a list per sequence: how many drafted tokens each round
    accepted; a round that rejects one also adds the deep pass's own token)."""

    stats: dict[str, Any] = dataclasses.field(default_factory=dict)


@flax.struct.dataclass
class Draft:
    """Every sequence's decoding state ([B, ...] leaves)."""

    seq: Array  # [B, S] prompt and generated tokens (drafts beyond `length` are tentative)
    length: Array  # [B] tokens in seq; the cache holds keys for positions < length - 1
    count: Array  # [B] generated tokens
    done: Array  # [B]
    next_state: Array  # [B, E] where continuous compute starts the next token
    rounds: Array  # [B]
    accepted: Array  # [B, max_rounds] drafted tokens accepted per round (-1: no such round)


def generate_speculative(params: dict, input_ids: Any, *, config: HuginnConfig, max_new_tokens: int,
                         draft_steps: int = 32, lookahead_for_draft: int = 8, verification_threshold: float = 1.0,
                         num_steps: int | None = None, continuous_compute: bool = False, init_scale: float = 1.0,
                         cache_lookup_strategy: str = FULL, sampling: SamplingConfig = GREEDY,
                         stop_token_ids: Sequence[int] | None = None, key: Array | None = None,
                         streamer: StreamCallback | None = None) -> SpeculativeOutput:
    """Generates with self-speculative decoding; options and defaults as the reference's (the paper's
    tuned setting is draft_steps=4, lookahead_for_draft=4).

    num_steps: the verifying depth (default: the config's mean_recurrence).
    streamer: called once per round with (tokens [B, lookahead_for_draft], count [B]): the first
        count[b] entries of row b are its new tokens.
    The output holds at most max_new_tokens tokens per sequence (the reference may return up to
    lookahead_for_draft - 1 more); the round that reaches it keeps only the tokens it needs.
    """
    num_steps = check_num_steps(config.mean_recurrence if num_steps is None else num_steps)
    draft_steps = check_num_steps(draft_steps, "draft_steps")
    if int(lookahead_for_draft) != lookahead_for_draft or lookahead_for_draft < 1:
        raise ValueError(f"lookahead_for_draft must be an integer >= 1, got {lookahead_for_draft!r}")
    if not verification_threshold > 0:
        raise ValueError(f"verification_threshold must be positive (>= 1: exact match), got {verification_threshold}")
    lookahead = int(lookahead_for_draft)
    # The last round may draft and verify up to lookahead - 1 positions past max_new_tokens.
    prep = prepare(params, input_ids, config, max_new_tokens, cache_lookup_strategy, max(num_steps, draft_steps),
                   init_scale, sampling, stop_token_ids, key, headroom=lookahead - 1)
    depth = (jnp.int32(num_steps), jnp.int32(draft_steps), jnp.float32(verification_threshold))
    draft, _ = _generate(params, prep.cache, prep.prompts, prep.lengths, depth, jnp.float32(init_scale),
                         prep.sampling, prep.stops, prep.key, config=config, max_new_tokens=max_new_tokens,
                         lookahead=lookahead, continuous_compute=bool(continuous_compute), streamer=streamer)
    draft = jax.device_get(draft)
    generated = np.asarray(draft.count)
    batch = generated.shape[0]
    tokens = np.full((batch, max(int(generated.max()), 1)), NO_TOKEN, np.int32)
    for b in range(batch):
        tokens[b, : generated[b]] = draft.seq[b, prep.lengths[b]: prep.lengths[b] + generated[b]]
    steps = np.where(tokens != NO_TOKEN, num_steps, 0).astype(np.int32)
    rounds = np.asarray(draft.rounds)
    stats = {"rounds": rounds, "draft_forward_passes": rounds * lookahead, "verify_forward_passes": rounds + 1,
             "accepted_per_round": [draft.accepted[b, : rounds[b]].tolist() for b in range(batch)]}
    return SpeculativeOutput(tokens=tokens, lengths=generated.astype(np.int64), recurrence_steps=steps, stats=stats)


def sample_rows(keys: Array, logits: Array, seen: Array, sampling: SamplingConfig) -> Array:
    """One token per row [B] with one key per row, so a row samples the same alone or batched."""
    return jax.vmap(lambda k, lg, sn: next_token(k, lg[None], sn[None], sampling)[0])(keys, logits, seen)


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "lookahead", "continuous_compute",
                                             "streamer"), donate_argnames=("cache",))
def _generate(params: dict, cache: KVCache, prompts: Array, lengths: Array, depth: tuple[Array, Array, Array],
              init_scale: Array, sampling: SamplingConfig, stop_ids: Array, key: Array, *, config: HuginnConfig,
              max_new_tokens: int, lookahead: int, continuous_compute: bool,
              streamer: StreamCallback | None) -> tuple[Draft, KVCache]:
    num_steps, draft_steps, threshold = depth
    batch, prompt_width = prompts.shape
    capacity = cache.capacity
    dtype = params["wte"].dtype
    rows = jnp.arange(batch)
    init_key, draft_key, final_key = jax.random.split(key, 3)

    def position_keys(base: Array, positions: Array) -> Array:
        return jax.vmap(lambda p: jax.random.fold_in(base, p))(positions)

    # Prefill at the full depth; its logits give the first token.
    positions = jnp.broadcast_to(jnp.arange(prompt_width), (batch, prompt_width))
    state = random_state(config, init_key, positions, init_scale, dtype)
    result, cache = run_tokens(params, config, cache.view(prompt_width), prompts, positions, state, num_steps)
    cache = cache.view(None)
    logits = lm_logits(params, config, result.hidden[rows, lengths - 1])
    first = sample_rows(position_keys(final_key, lengths), logits, seen_tokens(prompts, lengths, config.vocab_size),
                        sampling)
    stream(streamer, jnp.full((batch, lookahead), NO_TOKEN).at[:, 0].set(first), jnp.ones((batch,), jnp.int32))
    seq = jnp.zeros((batch, capacity), jnp.int32).at[:, :prompt_width].set(prompts).at[rows, lengths].set(first)
    draft = Draft(seq=seq, length=lengths + 1, count=jnp.ones_like(lengths),
                  done=jnp.isin(first, stop_ids) | (max_new_tokens <= 1), next_state=result.latents[rows, lengths - 1],
                  rounds=jnp.zeros_like(lengths), accepted=jnp.full((batch, max_new_tokens), -1, jnp.int32))
    offsets = jnp.arange(lookahead)[None, :]

    def one_round(view: int, carry: tuple[Draft, KVCache]) -> tuple[Draft, KVCache]:
        draft, cache = carry
        cache = cache.view(view)
        active = ~draft.done
        base = draft.length - 1  # position of the last accepted token: the first the round feeds

        def draft_one(j: Array, inner: tuple[Array, Array, KVCache]) -> tuple[Array, Array, KVCache]:
            seq, previous, cache = inner
            at = base + j
            write = jnp.where(active, at, capacity)[:, None]
            if continuous_compute:
                state = previous[:, None, :]
            else:
                state = random_state(config, init_key, at[:, None], init_scale, dtype)
            result, cache = run_tokens(params, config, cache, seq[rows, at][:, None], write, state, draft_steps)
            logits = lm_logits(params, config, result.hidden[:, 0])
            guess = sample_rows(position_keys(draft_key, at + 1), logits, seen_tokens(seq, at + 1, config.vocab_size),
                                sampling)
            seq = seq.at[rows, jnp.where(active, at + 1, capacity)].set(guess, mode="drop")
            return seq, result.latents[:, 0], cache

        seq, _, cache = jax.lax.fori_loop(0, lookahead, draft_one, (draft.seq, draft.next_state, cache))

        # Verify [last token, drafts 1..lookahead-1] at the full depth in one pass.
        at = base[:, None] + offsets  # [B, L]
        write = jnp.where(active[:, None], at, capacity)
        state = random_state(config, init_key, at, init_scale, dtype)
        result, cache = run_tokens(params, config, cache, jnp.take_along_axis(seq, at, axis=1), write, state,
                                   num_steps)
        logits = lm_logits(params, config, result.hidden)  # [B, L, V]: the token after each position
        drafted = jnp.take_along_axis(seq, at + 1, axis=1)
        exact = first_argmax(logits) == drafted
        probs = jax.nn.softmax(logits, axis=-1)
        drafted_prob = jnp.take_along_axis(probs, drafted[..., None], axis=-1)[..., 0]
        relaxed = drafted_prob >= threshold * probs.max(axis=-1)
        ok = jnp.where(threshold >= 1, exact, relaxed)
        accepted = jnp.where(jnp.all(ok, axis=1), lookahead, jnp.argmin(ok, axis=1))  # first rejection
        rejected = accepted < lookahead
        resample_at = jnp.minimum(accepted, lookahead - 1)
        final = sample_rows(position_keys(final_key, base + accepted + 1), logits[rows, resample_at],
                            seen_tokens(draft.seq, draft.length, config.vocab_size), sampling)
        seq = seq.at[rows, jnp.where(active & rejected, base + accepted + 1, capacity)].set(final, mode="drop")
        new = jnp.where(rejected, accepted + 1, lookahead)

        # Stops among the new tokens, then the bookkeeping.
        new_positions = draft.length[:, None] + offsets
        is_new = offsets < new[:, None]
        new_tokens = jnp.take_along_axis(seq, jnp.minimum(new_positions, capacity - 1), axis=1)
        stops = jnp.isin(new_tokens, stop_ids) & is_new
        stopped = jnp.any(stops, axis=1)
        new = jnp.where(stopped, jnp.argmax(stops, axis=1) + 1, new)
        new = jnp.minimum(new, max_new_tokens - draft.count)  # never past max_new_tokens
        stream(streamer, jnp.where(offsets < new[:, None], new_tokens, NO_TOKEN), jnp.where(active, new, 0))
        count = draft.count + new
        latest = result.latents[rows, jnp.minimum(new - 1, lookahead - 1)]
        updated = Draft(seq=seq, length=draft.length + new, count=count,
                        done=stopped | (count >= max_new_tokens), next_state=latest, rounds=draft.rounds + 1,
                        accepted=draft.accepted.at[rows, jnp.minimum(draft.rounds, max_new_tokens - 1)].set(accepted))
        keep = jax.tree.map(lambda a: active.reshape((-1,) + (1,) * (a.ndim - 1)), updated)
        return jax.tree.map(jnp.where, keep, updated, draft), cache.view(None)

    def running(view: int, carry: tuple[Draft, KVCache]) -> Array:
        draft = carry[0]
        return jnp.any(~draft.done) & (jnp.max(jnp.where(draft.done, 0, draft.length)) + lookahead <= view)

    carry = (draft, cache)
    for view in attention_views(capacity):
        carry = jax.lax.while_loop(functools.partial(running, view), functools.partial(one_round, view), carry)
    return carry
