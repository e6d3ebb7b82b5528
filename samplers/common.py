"""Pieces every sampler shares: packing prompts into a right-padded batch, stop tokens, running
new tokens through the model with the cache, streaming, and the output record.

A batch of prompts of unequal length is right-padded and each sequence keeps its own cursor:
sequence b's next token sits at position lengths[b] + (tokens generated so far). Attention is
causal by absolute position, so the padding written into the cache is never read: a real token at
position p only sees positions <= p, all of which hold real tokens by then.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from huginn_jax.config import HuginnConfig
from huginn_jax.kv_cache import KVCache
from huginn_jax.layers import rms_norm
from huginn_jax.model import check_token_ids, coda, initial_state, prelude, recur

Array = jax.Array

HUGINN_STOP_TOKEN_IDS = (65504, 65505, 65508)
"""<|begin_text|>, <|end_text|>, <|end_turn|>: the reference always stops on these."""

PROMPT_BUCKET = 8
"""Padded prompt lengths are rounded up to a multiple of this, so nearby lengths share a compile."""

NO_TOKEN = -1
"""Fills the token slots of a sequence after it has stopped."""

StreamCallback = Callable[[np.ndarray, np.ndarray], None]
"""Called once per decoding step with (tokens [B], active [B]); inactive rows hold NO_TOKEN."""


def pack_prompts(input_ids: Any, config: HuginnConfig) -> tuple[np.ndarray, np.ndarray]:
    """(right-padded ids [B, S] int32, lengths [B]) from an integer array [B, T] or a list of 1-D
    integer sequences of any lengths."""
    if isinstance(input_ids, (list, tuple)):
        rows = [np.asarray(row) for row in input_ids]
        if not rows:
            raise ValueError("no prompts given")
        for i, row in enumerate(rows):
            if row.ndim != 1 or row.size == 0:
                raise ValueError(f"prompt {i} must be a non-empty 1-D sequence of token ids, got shape {row.shape}")
            if not np.issubdtype(row.dtype, np.integer):
                raise ValueError(f"prompt {i} must hold integer token ids, got dtype {row.dtype}")
        lengths = np.array([row.size for row in rows], np.int32)
        packed = np.zeros((len(rows), int(lengths.max())), np.int64)
        for i, row in enumerate(rows):
            packed[i, : row.size] = row
    else:
        packed = np.asarray(input_ids)
        lengths = np.full(packed.shape[:1], packed.shape[-1], np.int32) if packed.ndim == 2 else None
    checked = np.asarray(check_token_ids(packed, config))
    padded_length = min(-(-checked.shape[1] // PROMPT_BUCKET) * PROMPT_BUCKET, config.block_size)
    padded = np.zeros((checked.shape[0], padded_length), np.int32)
    padded[:, : checked.shape[1]] = checked
    return padded, lengths


def check_room(lengths: np.ndarray, max_new_tokens: int, config: HuginnConfig, headroom: int = 0) -> None:
    """Every prompt plus its new tokens (and `headroom` positions a sampler looks ahead) must fit
    into the model's context."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    longest = int(lengths.max())
    if longest + max_new_tokens + headroom > config.block_size:
        extra = f" plus {headroom} positions of lookahead" if headroom else ""
        raise ValueError(f"a prompt of {longest} tokens plus max_new_tokens={max_new_tokens}{extra} exceeds the "
                         f"context of {config.block_size} tokens")


def stop_token_array(stop_token_ids: Sequence[int] | None, config: HuginnConfig) -> np.ndarray:
    """The stop ids as an int32 array, padded with NO_TOKEN to a multiple of 8 so that a different
    number of stop ids does not recompile; None means Huginn's stop tokens (those in the vocabulary)."""
    if stop_token_ids is None:
        stop_token_ids = [t for t in HUGINN_STOP_TOKEN_IDS if t < config.vocab_size]
    ids = np.asarray(list(stop_token_ids), np.int64).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= config.vocab_size):
        raise ValueError(f"stop token ids must lie in [0, {config.vocab_size}), got {ids.tolist()}")
    padded = np.full((max(8, -(-ids.size // 8) * 8),), NO_TOKEN, np.int32)
    padded[: ids.size] = ids
    return padded


def check_key(key: Array | None, needs_randomness: bool, why: str) -> Array:
    """The PRNG key to use; a key is required whenever something is drawn at random."""
    if key is None:
        if needs_randomness:
            raise ValueError(f"{why} draws random numbers: pass a PRNG key (jax.random.key(seed))")
        return jax.random.key(0)  # never consumed in a way that changes results
    return key


def check_num_steps(num_steps: int, name: str = "num_steps") -> int:
    if int(num_steps) != num_steps or num_steps < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {num_steps!r}")
    return int(num_steps)


@dataclasses.dataclass(frozen=True)
class StepResult:
    """What running tokens through the model gives: the raw state, the latents, the coda output."""

    state: Array  # [B, T, E] core output after the last step
    latents: Array  # [B, T, E] ln_f(state), the reference's latent_states
    hidden: Array  # [B, T, E] coda output, input of the head


def run_tokens(params: dict, config: HuginnConfig, cache: KVCache, tokens: Array, positions: Array,
               state: Array, num_steps: Array | int) -> tuple[StepResult, KVCache]:
    """Runs tokens [B, T] at positions [B, T] from initial `state` through prelude, `num_steps`
    core steps and coda, writing every layer's keys and values into the cache."""
    embeds, cache = prelude(params, config, tokens, positions, cache)
    state, cache = recur(params, config, state, embeds, positions, num_steps, cache)
    hidden, cache = coda(params, config, state, positions, cache)
    latents = rms_norm(state, params["ln_f"], config.norm_eps)
    return StepResult(state=state, latents=latents, hidden=hidden), cache


def random_state(config: HuginnConfig, key: Array, positions: Array, init_scale: Array | float,
                 dtype: Any) -> Array:
    """Random initial states [B, T, E] for tokens at positions [B, T]. Each position draws from its
    own key, folded from `key`, so a sequence's states do not depend on the batch it runs in."""
    def one(position: Array) -> Array:
        return initial_state(config, jax.random.fold_in(key, position), (config.n_embd,), init_scale, dtype)

    return jax.vmap(jax.vmap(one))(positions)


def seen_tokens(prompts: Array, lengths: Array, vocab_size: int) -> Array:
    """[B, V] bool: which ids occur in each prompt (for the repetition penalty)."""
    batch, width = prompts.shape
    real = jnp.arange(width)[None, :] < lengths[:, None]
    seen = jnp.zeros((batch, vocab_size), bool)
    return seen.at[jnp.arange(batch)[:, None], prompts].max(real)


def stream(callback: StreamCallback | None, tokens: Array, active: Array) -> None:
    """Hands one step's tokens to the host callback, in order, if there is one."""
    if callback is not None:
        io_callback(lambda t, a: callback(np.asarray(t), np.asarray(a)), None, tokens, active,
                                     ordered=True)


@dataclasses.dataclass(frozen=True)
class GenerateOutput:
    """Generated tokens of a batch with per-token statistics (host arrays)."""

    tokens: np.ndarray  # [B, max_new_tokens] int32; NO_TOKEN after a sequence has stopped
    lengths: np.ndarray  # [B] generated tokens per sequence, a stop token included
    recurrence_steps: np.ndarray  # [B, max_new_tokens] core steps spent on each token, 0 past the end
    # [B, max_new_tokens, num_steps] float32, when the adaptive sampler records them: the exit
    # criterion's value after each core step of each token; NaN where it was not checked.
    exit_values: np.ndarray | None = None

    def sequences(self) -> list[list[int]]:
        """The generated ids of each sequence, without the fill."""
        return [row[:n].tolist() for row, n in zip(self.tokens, self.lengths)]
