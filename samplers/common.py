"""The stages every sampler shares: one setup (pack prompts, check options, keys, stops, cache),
one prefill, one way to draw randomness and choose tokens, one output record.

A batch of prompts of unequal length is right-padded and each sequence keeps its own cursor:
sequence b's next token sits at position lengths[b] + (tokens generated so far). Attention is
causal by absolute position, so the padding written into the cache is never read: a real token at
position p only sees positions <= p, all of which hold real tokens by then.

Randomness follows one rule in every sampler: a sequence's random numbers depend on its key, the
purpose (initial state, token choice, draft, noise, filler), the sampler step where there are
several per position, and the position, never on its row or on the rest of the batch. So a batch
gives exactly what each prompt gives alone; pass one key per row (`key` of shape [B]) for
independent samples of the same prompt.

Every sampler takes `mesh=` (or runs under `jax.set_mesh(mesh)`): `setup` pads and places the
parameters (`sharding.shard_params`), the prompts, lengths and keys go over the mesh's data axis
(which must divide the batch), the cache is created in its shardings, and the compiled program
runs under the mesh, so the model's sharding constraints apply. The tokens are those of one device.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from huginn_jax import sharding, validation
from huginn_jax.config import HuginnConfig
from huginn_jax.kv_cache import CacheStrategy, KVCache
from huginn_jax.model import BlockOutput, check_token_ids, initial_state, lm_head, run_block
from huginn_jax.params import check_params
from huginn_jax.recurrence import Recurrence
from huginn_jax.stop_strings import advance, build_stop_string_table, check_stop_strings
from huginn_jax.tokenizer import check_vocab
from samplers.sampling import SamplingConfig, next_token

Array = jax.Array

HUGINN_STOP_TOKEN_IDS = (65504, 65505, 65508)
"""<|begin_text|>, <|end_text|>, <|end_turn|>: the reference always stops on these."""

PROMPT_BUCKET = 8
"""Padded prompt lengths are rounded up to a multiple of this, so nearby lengths share a compile."""

NO_TOKEN = -1
"""Fills the token slots of a sequence after it has stopped."""

# What a random draw is for: each purpose folds its own number into the row's key.
INIT_STATE, CHOOSE, DRAFT, NOISE, FILLER, NEW_STATE, CACHE_LOOKUP = range(7)


# ---------------------------------------------------------------- setup

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
        packed = np.asarray(input_ids) if isinstance(input_ids, jax.Array) else input_ids
        ndim = getattr(packed, "ndim", 0)
        lengths = np.full(packed.shape[:1], packed.shape[-1], np.int32) if ndim == 2 else None
    checked = np.asarray(check_token_ids(packed, config))
    padded_length = min(-(-checked.shape[1] // PROMPT_BUCKET) * PROMPT_BUCKET, config.block_size)
    padded = np.zeros((checked.shape[0], padded_length), np.int32)
    padded[:, : checked.shape[1]] = checked
    return padded, lengths


def check_room(lengths: np.ndarray, max_new_tokens: int, config: HuginnConfig, headroom: int = 0) -> None:
    """Every prompt plus its new tokens (and `headroom` positions a sampler looks ahead) must fit
    into the model's context."""
    longest = int(lengths.max())
    if longest + max_new_tokens + headroom > config.block_size:
        extra = f" plus {headroom} positions of lookahead" if headroom else ""
        raise ValueError(f"a prompt of {longest} tokens plus max_new_tokens={max_new_tokens}{extra} exceeds the "
                         f"context of {config.block_size} tokens")


def stop_token_array(stop_token_ids: Sequence[int] | None, config: HuginnConfig) -> np.ndarray:
    """The stop ids as an int32 array, padded with NO_TOKEN to a multiple of 8 so that a different
    number of stop ids does not recompile; None means Huginn's stop tokens (those in the vocabulary)."""
    if stop_token_ids is None:
        ids = [t for t in HUGINN_STOP_TOKEN_IDS if t < config.vocab_size]
    else:
        ids = validation.token_id_list("stop_token_ids", stop_token_ids, config.vocab_size)
    padded = np.full((max(8, -(-len(ids) // 8) * 8),), NO_TOKEN, np.int32)
    padded[: len(ids)] = ids
    return padded


@flax.struct.dataclass
class Stops:
    """What ends a sequence: stop token ids, and stop strings as an automaton over the vocabulary.

    ids [K] (padded with NO_TOKEN); transitions [V + 1, Q] int32 or None: the stop strings' table
    (`huginn_jax.stop_strings`), read one token at a time from a per-row automaton state [B] that
    starts at 0 with the first generated token, so only generated text can match. Checking a new
    token costs one table lookup per row: no host round trip, nothing decoded.
    """

    ids: Array
    transitions: Array | None = None

    def hit(self, tokens: Array) -> Array:
        """Whether each of tokens [...] is a stop token (stop strings aside)."""
        return jnp.isin(tokens, self.ids)

    def start(self, batch: int) -> Array:
        """The automaton state of every row before its first generated token."""
        return jnp.zeros((batch,), jnp.int32)

    def first_stop(self, state: Array, tokens: Array, counts: Array) -> tuple[Array, Array]:
        """Reads the first counts[b] of tokens [B, K] of every row in order: (the automaton state
        after them, the index [B] of the first that ends the sequence (a stop id, or the token
        that completes a stop string), K where none does)."""
        width = tokens.shape[1]
        is_id = jnp.isin(tokens, self.ids) & (jnp.arange(width)[None, :] < counts[:, None])
        if self.transitions is None:
            return state, jnp.where(jnp.any(is_id, axis=1), jnp.argmax(is_id, axis=1), width)

        def read(j: Array, carry: tuple[Array, Array]) -> tuple[Array, Array]:
            state, first = carry
            new_state, hit = advance(self.transitions, state, tokens[:, j])
            real = (j < counts) & (first == width)
            first = jnp.where(real & (hit | is_id[:, j]), j, first)
            return jnp.where(real, new_state, state), first

        return jax.lax.fori_loop(0, jnp.max(counts, initial=0), read, (state, jnp.full(state.shape, width, jnp.int32)))


@functools.lru_cache(maxsize=32)
def _stop_string_table(tokenizer: Any, strings: tuple[str, ...]) -> np.ndarray:
    """The stop strings' transition table, its states padded to a multiple of 8 (padding states are
    never reached), so that stop strings of similar length share a compiled program."""
    table = build_stop_string_table(tokenizer, strings).transitions
    states = -(-table.shape[1] // 8) * 8
    padded = np.tile(2 * np.arange(states, dtype=np.int32), (table.shape[0], 1))
    padded[:, : table.shape[1]] = table
    return padded


def make_stops(config: HuginnConfig, stop_token_ids: Sequence[int] | None, stop_strings: Sequence[str] | None,
               tokenizer: Any) -> Stops:
    """The validated stop ids and, with `stop_strings` (which need the `tokenizer`), their table."""
    ids = jnp.asarray(stop_token_array(stop_token_ids, config))
    if stop_strings is None or len(stop_strings) == 0:
        return Stops(ids)
    strings = check_stop_strings(stop_strings)
    if tokenizer is None:
        raise ValueError("stop_strings are matched on the text of the tokens: pass the tokenizer too "
                         "(tokenizer=load_tokenizer(folder))")
    if not hasattr(tokenizer, "token_bytes"):
        raise ValueError(f"tokenizer must be a huginn_jax.tokenizer.Tokenizer (load_tokenizer), got {tokenizer!r}")
    check_vocab(tokenizer, config)
    return Stops(ids, jnp.asarray(_stop_string_table(tokenizer, strings)))


@dataclasses.dataclass(frozen=True)
class Setup:
    """A sampler call's validated inputs (host values), ready for its compiled program."""

    prompts: np.ndarray  # [B, S] right-padded prompt ids
    lengths: np.ndarray  # [B] prompt lengths
    keys: Array  # [B] one PRNG key per row
    stops: Stops
    sampling: SamplingConfig
    init_scale: float
    max_new_tokens: int
    params: dict | None = None  # the parameters to run: placed on the mesh (heads padded) when there is one
    config: HuginnConfig | None = None  # their config (`kv_head_padding` set where heads were padded)
    mesh: Any = None  # the device mesh (Auto axes), or None for one device

    @property
    def batch(self) -> int:
        return self.prompts.shape[0]

    def device_inputs(self) -> tuple[Array, Array, Array]:
        """(prompts [B, S], lengths [B], keys [B]) on the device, rows over the mesh's data axis."""
        return sharding.put_batch((jnp.asarray(self.prompts), jnp.asarray(self.lengths), self.keys), self.mesh)


def setup(params: dict, input_ids: Any, config: HuginnConfig, *, max_new_tokens: Any, init_scale: Any,
          sampling: SamplingConfig, stop_token_ids: Sequence[int] | None, key: Any, random: bool,
          random_why: str, headroom: int = 0, stop_strings: Sequence[str] | None = None,
          tokenizer: Any = None, mesh: Any = None) -> Setup:
    """Checks the parameters, prompts and options every sampler takes; `random` says whether the
    call draws random numbers (then a key is required; `random_why` names the options that do).
    With a `mesh` (or one set with `jax.set_mesh`), places the parameters on it (see the module's
    docstring); `Setup.params` and `Setup.config` are what to run."""
    check_params(params, config)
    mesh = sharding.resolve_mesh(mesh)
    max_new_tokens = validation.integer("max_new_tokens", max_new_tokens, minimum=1)
    init_scale = validation.number("init_scale", init_scale, minimum=0.0)
    if not isinstance(sampling, SamplingConfig):
        raise ValueError(f"sampling must be a SamplingConfig, got {sampling!r}")
    sampling = sampling.validate()
    prompts, lengths = pack_prompts(input_ids, config)
    check_room(lengths, max_new_tokens, config, headroom)
    stops = make_stops(config, stop_token_ids, stop_strings, tokenizer)
    if key is None:
        if random or init_scale != 0:
            raise ValueError(f"{random_why if random else 'init_scale > 0'} draws random numbers: pass a PRNG key "
                             "(key=jax.random.key(seed))")
        key = jax.random.key(0)  # never consumed in a way that changes results
    keys = validation.prng_keys(key, prompts.shape[0])
    sharding.check_batch(prompts.shape[0], mesh)
    if mesh is not None:
        config, params = sharding.shard_params(params, config, mesh)
    return Setup(prompts, lengths, keys, stops, sampling, init_scale, max_new_tokens, params, config, mesh)


def make_cache(config: HuginnConfig, params: dict, batch: int, strategy: str | CacheStrategy, max_steps: int,
               capacity: int, *, keys: Array | None = None, mesh: Any = None, uniform_depth: bool = False) -> KVCache:
    """A zeroed cache of `capacity` positions for `strategy` (a `cache_lookup_strategy` name, checked
    here) with room for `max_steps` core steps; `keys` [B] (`Setup.keys`) are required by the
    `randomized` lookup, which draws from them (purpose CACHE_LOOKUP), and ignored otherwise.
    On a `mesh` it is created in place, rows and heads split (`sharding.cache_shardings`).
    `uniform_depth`: every token runs at least as many core steps as any later token (static
    depth), so no position misses a step that a later one reads and lookups compile to a plain
    read (`KVCache.create`)."""
    strategy = CacheStrategy.parse(strategy, config.n_layers_in_recurrent_block)
    lookup_keys = None
    if strategy.needs_key:
        if keys is None:
            raise ValueError(f"cache_lookup_strategy {strategy.name!r} draws random lookups: pass the sampler's keys")
        lookup_keys = row_keys(keys, CACHE_LOOKUP)
    shape = (config, strategy, max(max_steps, 1), batch, min(capacity, config.block_size), params["wte"].dtype)
    if mesh is None:
        return KVCache.create(*shape, lookup_keys, uniform_depth=uniform_depth)
    keys_shape = None if lookup_keys is None else jax.ShapeDtypeStruct(lookup_keys.shape, lookup_keys.dtype)
    return _sharded_cache_maker(*shape, keys_shape, mesh, uniform_depth)(sharding.put_batch(lookup_keys, mesh))


@functools.lru_cache(maxsize=32)
def _sharded_cache_maker(config: HuginnConfig, strategy: CacheStrategy, max_steps: int, batch: int, capacity: int,
                         dtype: Any, lookup_keys: Any, mesh: Any, uniform_depth: bool = False) -> Any:
    """A compiled function that makes the zeroed cache directly in its shardings on `mesh` (no
    device ever holds the whole of it)."""
    def create(keys: Array | None) -> KVCache:
        return KVCache.create(config, strategy, max_steps, batch, capacity, dtype, keys, uniform_depth=uniform_depth)

    return jax.jit(create, out_shardings=sharding.cache_shardings(jax.eval_shape(create, lookup_keys), mesh))


# ---------------------------------------------------------------- randomness and token choice

def row_keys(keys: Array, purpose: int, *indices: Array) -> Array:
    """keys [B] folded with a purpose and per-row indices ([B] each, e.g. step and position)."""
    def fold(key: Array, *ix: Array) -> Array:
        key = jax.random.fold_in(key, purpose)
        for i in ix:
            key = jax.random.fold_in(key, i)
        return key

    return jax.vmap(fold)(keys, *indices)


def random_state(config: HuginnConfig, keys: Array, positions: Array, init_scale: Array | float, dtype: Any,
                 purpose: int = INIT_STATE, *indices: Array) -> Array:
    """Random initial states [B, T, E] for tokens at positions [B, T]: each (row, position) draws
    from its row's key folded with the purpose, the extra per-row `indices` and the position."""
    def one_row(key: Array, row_positions: Array, *ix: Array) -> Array:
        key = jax.random.fold_in(key, purpose)
        for i in ix:
            key = jax.random.fold_in(key, i)
        return jax.vmap(lambda p: initial_state(config, jax.random.fold_in(key, p), (config.n_embd,),
                                                init_scale, dtype))(row_positions)

    return jax.vmap(one_row)(keys, positions, *indices)


def choose_tokens(keys: Array, logits: Array, seen: Array, sampling: SamplingConfig) -> Array:
    """One token per row [B] from logits [B, V] with one key per row [B]."""
    return jax.vmap(lambda k, lg, sn: next_token(k, lg[None], sn[None], sampling)[0])(keys, logits, seen)


def seen_tokens(tokens: Array, lengths: Array, vocab_size: int) -> Array:
    """[B, V] bool: which ids occur in the first lengths[b] tokens of each row (repetition penalty)."""
    batch, width = tokens.shape
    real = jnp.arange(width)[None, :] < lengths[:, None]
    seen = jnp.zeros((batch, vocab_size), bool)
    return seen.at[jnp.arange(batch)[:, None], tokens].max(real)


def keep_rows(active: Array, new: Any, old: Any) -> Any:
    """Tree `new` where active [B], else `old` (leaves with a leading batch axis)."""
    return jax.tree.map(lambda a, b: jnp.where(active.reshape((-1,) + (1,) * (a.ndim - 1)), a, b), new, old)


# ---------------------------------------------------------------- prefill

@flax.struct.dataclass
class Prefilled:
    """The prompt after the prefill."""

    block: BlockOutput  # states, latents and coda output of every prompt position
    logits: Array  # [B, V] float32: the distribution of each row's first new token
    latents: Array  # [B, E] latents of the last prompt token (continuous compute starts here)
    state: Array  # [B, E] raw state of the last prompt token


def prefill(params: dict, config: HuginnConfig, cache: KVCache, prompts: Array, lengths: Array, keys: Array,
            init_scale: Array, recurrence: Recurrence) -> tuple[Prefilled, KVCache]:
    """Runs the prompts [B, S] (lengths [B]) from their random initial states under `recurrence`,
    writing the cache; the cache reads only the prompt's positions meanwhile."""
    batch, width = prompts.shape
    positions = jnp.broadcast_to(jnp.arange(width), (batch, width))
    state = random_state(config, keys, positions, init_scale, params["wte"].dtype)
    block, cache = run_block(params, config, prompts, positions, state, recurrence, cache.view(width),
                             lengths=lengths)
    rows = jnp.arange(batch)
    last = lengths - 1
    return Prefilled(block=block, logits=lm_head(params, config, block.hidden[rows, last]),
                     latents=block.latents[rows, last], state=block.state[rows, last]), cache.view(None)


# ---------------------------------------------------------------- output

@dataclasses.dataclass(frozen=True)
class GenerateOutput:
    """What every sampler returns (host arrays).

    tokens [B, N] int32 (NO_TOKEN after a sequence has stopped), lengths [B] (generated tokens, a
    stop token included), recurrence_steps [B, N] (core steps each token received, 0 past the end).
    stats: per-sequence statistics ([B] arrays or lists), for every sampler
      - `sequential_core_steps`: core steps on the critical path to the last token (static AR:
        num_steps per token; diffusion: the prefill's plus inner_recurrence per sampler step);
        on a GPU or TPU, where a step costs about the same for 1 or 100 positions, these set the
        speed;
      - `core_position_steps`: core steps summed over every position computed (prefill included),
        the arithmetic, which sets the speed on a CPU;
      - `cache_memory_mb`: MiB of keys and values the cache holds for the sequence at the end (the
        reference's `past_key_values.get_memory_usage()`), and `cache_allocated_mb`: MiB of the
        preallocated buffers per sequence (`KVCache.memory`, `KVCache.filled_entries`);
    and the sampler's own (the reference's names where it has them).
    exit_values [B, N, W]: the adaptive sampler's criterion after every step (`record_exit_values`).
    tablets: the diffusion sampler's analysis tablets (`return_analysis_tablets`).
    """

    tokens: np.ndarray
    lengths: np.ndarray
    recurrence_steps: np.ndarray
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)
    exit_values: np.ndarray | None = None
    tablets: dict[str, np.ndarray] | None = None

    def sequences(self) -> list[list[int]]:
        """The generated ids of each sequence, without the fill."""
        return [row[:n].tolist() for row, n in zip(self.tokens, self.lengths)]

    @classmethod
    def concatenate(cls, outputs: Sequence["GenerateOutput | None"]) -> "GenerateOutput":
        """The rows of several outputs (of one sampler with the same options, on parts of a batch:
        a multi-host run's shares, say) as one output, in order; None entries (a share without
        prompts) are skipped. Shorter token, step and value tables are filled (NO_TOKEN, 0, NaN)."""
        parts = [out for out in outputs if out is not None]
        if not parts:
            raise ValueError("no outputs to concatenate")
        stats = {}
        for name, first in parts[0].stats.items():
            values = [out.stats[name] for out in parts]
            stats[name] = (sum((list(v) for v in values), []) if isinstance(first, list)
                           else _stack_rows([np.asarray(v) for v in values]))
        optional = [[getattr(out, field) for out in parts] for field in ("exit_values", "tablets")]
        exit_values = None if optional[0][0] is None else _stack_rows(optional[0])
        tablets = None if optional[1][0] is None else {
            name: _stack_rows([t[name] for t in optional[1]]) for name in optional[1][0]}
        return cls(tokens=_stack_rows([out.tokens for out in parts], NO_TOKEN),
                   lengths=np.concatenate([out.lengths for out in parts]),
                   recurrence_steps=_stack_rows([out.recurrence_steps for out in parts], 0), stats=stats,
                   exit_values=exit_values, tablets=tablets)


def _stack_rows(arrays: Sequence[np.ndarray], fill: Any = None) -> np.ndarray:
    """Arrays with a leading row axis, concatenated along it, their other axes filled up to the
    largest (with `fill`, default NaN for floats and 0 otherwise)."""
    arrays = [np.asarray(a) for a in arrays]
    if arrays[0].ndim == 0:
        return np.stack(arrays)
    shape = np.max([a.shape[1:] for a in arrays], axis=0).astype(int) if arrays[0].ndim > 1 else ()
    if fill is None:
        fill = np.nan if np.issubdtype(arrays[0].dtype, np.floating) else 0
    out = []
    for a in arrays:
        full = np.full((a.shape[0], *shape), fill, a.dtype)
        full[(slice(None), *(slice(0, n) for n in a.shape[1:]))] = a
        out.append(full)
    return np.concatenate(out)
