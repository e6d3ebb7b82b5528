"""A fixed-shape, preallocated key/value cache shared by all samplers, with every lookup strategy of
the reference's `HuginnDynamicCache`.

The cache is one pair of arrays `k, v: [slots, batch, kv_heads, capacity, head_dim]` (heads before
positions, the layout attention consumes without transposing) and a mask `filled: [slots, batch,
capacity]` of the (slot, position) entries that hold keys. Buffer index along `capacity` is the
absolute token position, so attention needs no bookkeeping beyond "keys at positions <= the
query's position": rolling back (rejected drafts, unfrozen diffusion positions) is moving a
cursor. A token that is computed again at a position starts afresh: its first layer (prelude
layer 0) clears the position's entries in every slot, as the reference's `clear_last_k_entries`
does before it recomputes them.

Layer applications and slots. The reference numbers layer applications as it runs them: prelude
layers 0..P-1, then core layer l of recurrence step s as P + C s + l (2 + 4 s + l for Huginn-0125's
P = 2 prelude and C = 4 core layers), coda layers as -1, -2, ... Here a `LayerRef(group, layer,
step)` names an application, and core application index i = C s + l. A *slot* stores one
application's keys: prelude and coda layers have one slot each; the core's slots follow the
strategy's compression rule.

A strategy is `<lookup>` or `<lookup>-compress-<rule>` (`CacheStrategy.parse` is the one place
that reads and checks the name).

Compression rules (how many core slots, so memory really shrinks), for C core layers:
- none: a slot per core application, C x max_steps slots.
- ``compress-sN`` (modulo N): application i writes core slot i mod N, so every N / C recurrences
  share the slots of one; N must be a multiple of C (else core layers would read each other's
  keys). ``latest-m4-compress-s4`` is the paper's KV sharing: one slot per core layer.
- ``compress-rN`` (blocks of N): application i writes core slot i // N. Consecutive applications
  share a slot, so with N >= 2 a layer reads keys that another core layer wrote last (the
  reference's r4 on 4 core layers gives each recurrence one slot for its 4 layers); any N >= 1.
- ``compress-anchor``: the first 8 recurrences keep their own slots (applications i < 8 C), every
  later recurrence shares one more recurrence's C slots (slot 8 C + (i - 8 C) mod C). For C = 4
  this is the reference's `34 + (step_idx - 34) % 4`; for other C it is the same rule counted
  in recurrences.

Lookup rules decide what a core layer reads where some earlier position has no entry in the slot
(adaptive exits: a position that exited early never ran the later steps). "Same core layer" means
the same residue of the core slot index modulo C (the reference's `s % 4 == step_idx % 4`; the
m4 in the names is its C = 4). They compare and pick core *slot* indices, like the reference,
which compresses the index before it looks up:
- ``full`` and ``skip``: attend only to positions present in the slot. The reference's dynamic
  cache stacks just the entries it has, dropping missing positions from the keys; its queries
  there are one token (decoding) with no mask, so dropping them is exactly masking them out here
  (rotary angles are applied before caching, so the order and gaps of the keys do not matter).
  (The reference's `full` followed by a compression rule raises once a position is missing;
  here it masks like `full`.)
- ``latest-m4`` and ``available-m4``: a present position reads the slot; a missing one lends the
  keys of the highest slot <= this one of the same core layer that it holds (identical rules in
  the reference's dynamic cache, where `latest-m4` also includes the slot itself).
- ``always-last-m4``: if any position is missing, *every* position reads the highest slot of the
  same core layer that it holds, above this one included.
- ``randomized`` (a sanity check): if any position is missing, every position reads a uniformly
  random slot <= this one of the same core layer that it holds. The draw uses the row's key
  (`KVCache.lookup_keys`) folded with the core application index, the query extent and the
  position: a row's draws do not depend on its batch.
"Missing" is counted per row over the positions before the end of this update's writes (the
reference's `len(cache[step]) == seen_tokens`, batch-wide there since its dicts hold whole batches).
Where a rule finds nothing to lend (the reference would raise), the position is left out.
Prelude and coda slots hold every position that attention reads (each token runs them), so they
are read as they are; compression never touches them (the reference's `step_idx > 1` test leaves
its negative coda indices alone).

The strategy is data (`KVCache.rule`, int32): changing it recompiles nothing unless the number of
slots changes (or `randomized`, whose keys the cache carries, comes or goes).

Attention reads a slot only up to `visible` positions (static; the whole buffer when None). A
sampler that knows no position beyond some bound is in use narrows the view, so that the cost of a
decoding step follows the length of the text, not the size of the buffer.

Memory: `KVCache.filled_entries(extent)` counts, on device, the entries of each row at positions
< extent (what the reference's `get_memory_usage()` counts); `KVCache.memory()` (host, static)
turns such counts into `cache_memory_mb` and `cache_allocated_mb` statistics;
`cache_bytes_per_token` is the bytes of a static-depth run per token, from the config alone.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from huginn_jax.config import HuginnConfig

Array = jax.Array

LOOKUP_RULES = ("full", "latest-m4", "available-m4", "always-last-m4", "skip", "randomized")
FULL, LATEST, AVAILABLE, ALWAYS_LAST, SKIP, RANDOMIZED = LOOKUP_RULES
CACHE_STRATEGIES = LOOKUP_RULES
"""Every lookup rule; each may be followed by `-compress-sN`, `-compress-rN` or `-compress-anchor`."""
SHARED = "latest-m4-compress-s4"
"""KV sharing: one slot per core layer, every recurrence overwrites it (the diffusion default)."""
ANCHOR_RECURRENCES = 8
"""`compress-anchor` keeps the slots of this many first recurrences (the reference's 4 x 8 = 32)."""
MIB = 1024 * 1024

_COMPRESSION = re.compile(r"(?:(?P<kind>[sr])(?P<stage>[0-9]+)|(?P<anchor>anchor))")


def attention_views(capacity: int, smallest: int = 128) -> list[int]:
    """Growing view lengths (powers of two from `smallest`, then the whole buffer) for decoding in
    phases: a phase whose positions all lie below its view attends over that view only."""
    views = []
    view = smallest
    while view < capacity:
        views.append(view)
        view *= 2
    return views + [capacity]


@dataclasses.dataclass(frozen=True)
class CacheStrategy:
    """A parsed `cache_lookup_strategy`: a lookup rule and an optional compression rule
    ("s" modulo `stage`, "r" blocks of `stage`, "anchor")."""

    lookup: str
    compression: str | None = None
    stage: int = 0

    @classmethod
    def parse(cls, name: "str | CacheStrategy", n_core: int | None = None) -> "CacheStrategy":
        """The strategy a name spells, checked against a model of `n_core` core layers when given;
        a ValueError that names the option and what is wrong otherwise."""
        if isinstance(name, CacheStrategy):
            strategy = name
        elif not isinstance(name, str):
            raise ValueError(f"cache_lookup_strategy must be a string such as 'latest-m4-compress-s4', got {name!r}")
        else:
            lookup, sep, rule = name.partition("-compress-")
            if lookup not in LOOKUP_RULES:
                raise ValueError(f"unknown cache_lookup_strategy {name!r}: its lookup rule {lookup!r} is none of "
                                 f"{list(LOOKUP_RULES)} (optionally followed by -compress-sN, -compress-rN or "
                                 "-compress-anchor)")
            if not sep:
                strategy = cls(lookup)
            else:
                match = _COMPRESSION.fullmatch(rule)
                if match is None or (match["stage"] is not None and int(match["stage"]) < 1):
                    raise ValueError(f"malformed cache_lookup_strategy {name!r}: its compression rule "
                                     f"'compress-{rule}' must be compress-sN or compress-rN with N a positive "
                                     "integer, or compress-anchor")
                strategy = (cls(lookup, "anchor") if match["anchor"]
                            else cls(lookup, match["kind"], int(match["stage"])))
        if n_core is not None and strategy.compression == "s" and strategy.stage % n_core:
            raise ValueError(f"cache_lookup_strategy {strategy.name!r} cannot be used with this model: compress-s"
                             f"{strategy.stage} shares core slots modulo {strategy.stage}, which for "
                             f"{n_core} core layers would make one core layer read another's keys; N must be a "
                             f"multiple of {n_core}")
        return strategy

    @property
    def name(self) -> str:
        if self.compression is None:
            return self.lookup
        rule = "anchor" if self.compression == "anchor" else f"{self.compression}{self.stage}"
        return f"{self.lookup}-compress-{rule}"

    @property
    def needs_key(self) -> bool:
        """Whether lookups draw random numbers (`randomized`)."""
        return self.lookup == RANDOMIZED

    @property
    def code(self) -> np.ndarray:
        """int32 [3]: (lookup rule, compression rule, stage), the form the cache carries as data, so
        that changing the strategy recompiles only where the number of slots changes."""
        return np.array([LOOKUP_RULES.index(self.lookup), COMPRESSIONS.index(self.compression),
                         max(self.stage, 1)], np.int32)


COMPRESSIONS = (None, "s", "r", "anchor")


def core_slot(code: Array | np.ndarray, index: Array | np.ndarray | int, n_core: int) -> Array:
    """The core slot of core application `index` = C step + layer under the compression rule of a
    strategy `code` (`CacheStrategy.code`); traced or concrete alike."""
    kind, stage = code[1], code[2]
    kept = n_core * ANCHOR_RECURRENCES
    anchored = jnp.where(index < kept, index, kept + (index - kept) % n_core)
    return jnp.select([kind == COMPRESSIONS.index("s"), kind == COMPRESSIONS.index("r"),
                       kind == COMPRESSIONS.index("anchor")], [index % stage, index // stage, anchored], index)


@dataclasses.dataclass(frozen=True)
class LayerRef:
    """One layer application: its group ("prelude", "core" or "coda"), layer index, and the
    recurrence step (a traced value inside loops; core layers only)."""

    group: str
    layer: int
    step: Array | int = 0


@dataclasses.dataclass(frozen=True)
class CacheLayout:
    """The cache's static shape: prelude slots, `n_core_slots` core slots (what the strategy's
    compression rule needs for the recurrences the cache has room for), coda slots; and whether a
    lookup may have to lend (`lends`: False when the sampler knows that every position a core
    layer reads holds that layer's step, as in static-depth decoding; then no lookup code is
    compiled). Only these: strategies and depths that need as many slots share a compiled program."""

    n_prelude: int
    n_core: int
    n_coda: int
    n_core_slots: int
    kv_head_padding: int = 0  # zero kv heads stored for sharding (`HuginnConfig.kv_head_padding`)
    lends: bool = True

    @classmethod
    def create(cls, config: HuginnConfig, strategy: str | CacheStrategy, max_steps: int,
               lends: bool = True) -> "CacheLayout":
        strategy = CacheStrategy.parse(strategy, config.n_layers_in_recurrent_block)
        if max_steps < 1:
            raise ValueError(f"the cache needs room for at least one recurrence step, got max_steps={max_steps}")
        n_core = config.n_layers_in_recurrent_block
        with jax.ensure_compile_time_eval():  # concrete also while tracing (a cache made inside jit)
            n_core_slots = int(jnp.max(core_slot(strategy.code, jnp.arange(n_core * max_steps), n_core))) + 1
        return cls(config.n_layers_in_prelude, n_core, config.n_layers_in_coda, n_core_slots, config.kv_head_padding,
                   bool(lends))

    @property
    def n_slots(self) -> int:
        return self.n_prelude + self.n_core_slots + self.n_coda

    def slot(self, code: Array, ref: LayerRef) -> Array | int:
        """The slot of layer application `ref` under the strategy `code`."""
        if ref.group == "prelude":
            return ref.layer
        if ref.group == "coda":
            return self.n_prelude + self.n_core_slots + ref.layer
        return self.n_prelude + core_slot(code, ref.step * self.n_core + ref.layer, self.n_core)

    def starts_token(self, ref: LayerRef) -> Array | bool:
        """Whether `ref` is the first layer a token runs (prelude layer 0; core layer 0 of step 0
        in a model without prelude): its writes clear the position's older entries."""
        if self.n_prelude:
            return ref.group == "prelude" and ref.layer == 0
        return ref.group == "core" and ref.layer == 0 and ref.step == 0


def entry_bytes(config: HuginnConfig, dtype: Any) -> int:
    """Bytes of the keys and values of one layer application at one position of one sequence."""
    return 2 * config.num_key_value_heads * config.head_dim * jnp.dtype(dtype).itemsize


def cache_bytes_per_token(config: HuginnConfig, strategy: str | CacheStrategy, num_steps: int,
                          dtype: Any = jnp.bfloat16) -> int:
    """Cache bytes per token of a static-depth run at `num_steps` (every slot of every position
    filled), from the config alone."""
    return CacheLayout.create(config, strategy, num_steps).n_slots * entry_bytes(config, dtype)


@dataclasses.dataclass(frozen=True)
class CacheMemory:
    """A cache's sizes, known on the host before a sampler runs: turns the per-row filled-entry
    counts that the sampler returns into its memory statistics."""

    entry_bytes: int  # keys and values of one layer application at one position of one sequence
    allocated_bytes: int  # keys and values buffers per sequence

    def stats(self, filled_entries: Any) -> dict[str, np.ndarray]:
        """`cache_memory_mb` [B]: MiB of keys and values filled (the reference's
        `get_memory_usage()`); `cache_allocated_mb` [B]: MiB of the buffers per sequence."""
        entries = np.asarray(filled_entries, np.float64)
        return {"cache_memory_mb": entries * self.entry_bytes / MIB,
                "cache_allocated_mb": np.full(entries.shape, self.allocated_bytes / MIB)}


@flax.struct.dataclass
class KVCache:
    """Keys and values of every layer application, [slot, batch, kv_head, position, head_dim];
    which (slot, position) entries hold keys, [slot, batch, position]; the strategy as data,
    `rule` int32 [3] (`CacheStrategy.code`); and the per-row PRNG keys [batch] of the
    `randomized` lookup (None for every other rule)."""

    k: Array
    v: Array
    filled: Array
    rule: Array
    lookup_keys: Array | None
    layout: CacheLayout = flax.struct.field(pytree_node=False)
    visible: int | None = flax.struct.field(pytree_node=False, default=None)

    @classmethod
    def create(cls, config: HuginnConfig, strategy: str | CacheStrategy, max_steps: int, batch: int,
               capacity: int, dtype: Any = jnp.float32, lookup_keys: Array | None = None,
               uniform_depth: bool = False) -> "KVCache":
        """A zeroed cache for `batch` sequences of up to `capacity` positions and `max_steps`
        recurrences under `strategy`; `lookup_keys` [batch] (one PRNG key per row) are required by
        the `randomized` lookup and refused by the others. `uniform_depth`: the caller promises
        that every position a core layer reads holds that layer's step (every token runs at least
        as many steps as any later reader), so lookups never lend and compile to a plain read."""
        strategy = CacheStrategy.parse(strategy, config.n_layers_in_recurrent_block)
        layout = CacheLayout.create(config, strategy, max_steps, lends=not uniform_depth)
        if capacity > config.block_size:
            raise ValueError(f"a cache of {capacity} positions exceeds the context of {config.block_size}")
        if strategy.needs_key != (lookup_keys is not None):
            raise ValueError(f"cache_lookup_strategy {strategy.name!r} "
                             + ("draws random lookups: pass one PRNG key per row" if strategy.needs_key
                                else "draws nothing: pass no lookup keys"))
        shape = (layout.n_slots, batch, config.stored_kv_heads, capacity, config.head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((layout.n_slots, batch, capacity), bool),
                   jnp.asarray(strategy.code), lookup_keys, layout)

    @property
    def capacity(self) -> int:
        """Positions the buffer holds."""
        return self.k.shape[3]

    @property
    def length(self) -> int:
        """Positions that attention reads: the view, or the whole buffer."""
        return self.capacity if self.visible is None else self.visible

    def view(self, visible: int | None) -> "KVCache":
        """The same cache with attention reading only positions [0, visible) (None: all)."""
        if visible is not None and not 0 < visible <= self.capacity:
            raise ValueError(f"a view of {visible} positions does not fit a buffer of {self.capacity}")
        return self.replace(visible=visible)

    def memory(self) -> CacheMemory:
        """The sizes behind the memory statistics (static: callable before or after a run). Zero
        heads stored for sharding count in the buffers' size, not in the entries' (the model's)."""
        stored = 2 * self.k.shape[2] * self.k.shape[4] * self.k.dtype.itemsize
        per_entry = stored * (self.k.shape[2] - self.layout.kv_head_padding) // self.k.shape[2]
        return CacheMemory(per_entry, self.layout.n_slots * self.capacity * stored)

    def filled_entries(self, extent: Array) -> Array:
        """[B] int32: the filled (slot, position) entries of each row at positions < extent[b] (the
        positions whose keys are final; a sampler's cursor). Reduced on device, never copied out."""
        inside = jnp.arange(self.capacity)[None, :] < extent[:, None]  # [B, capacity]
        return jnp.sum(self.filled & inside[None], axis=(0, 2), dtype=jnp.int32)

    def slot(self, ref: LayerRef) -> Array | int:
        """The slot that layer application `ref` writes."""
        return self.layout.slot(self.rule, ref)

    def update(self, ref: LayerRef, k: Array, v: Array,
               positions: Array) -> tuple["KVCache", Array, Array, Array | None]:
        """Stores the keys and values k, v [B, kv_heads, T, head_dim] of tokens at `positions` [B, T]
        for layer application `ref`, then returns (cache, keys, values, valid) for its attention:
        keys and values [B, kv_heads, length, head_dim] by position, and valid [B, length] (None
        when every position may be read). Positions past the buffer are dropped: samplers use that
        to keep a sequence's cache untouched."""
        slot = self.slot(ref)
        rows = jnp.arange(k.shape[0])[:, None]
        # heads as a slice, not an index: on a device mesh each device writes its own heads
        at = (slot, rows, slice(None), positions)  # the updates [B, T, kv_heads, head_dim]
        filled = self.filled
        starts = self.layout.starts_token(ref)
        if starts is not False:  # a token computed (again) at a position: its older entries go
            cleared = positions if starts is True else jnp.where(starts, positions, self.capacity)
            filled = filled.at[:, rows, cleared].set(False, mode="drop")
        cache = self.replace(k=self.k.at[at].set(k.transpose(0, 2, 1, 3).astype(self.k.dtype), mode="drop"),
                             v=self.v.at[at].set(v.transpose(0, 2, 1, 3).astype(self.v.dtype), mode="drop"),
                             filled=filled.at[slot, rows, positions].set(True, mode="drop"))
        if ref.group != "core":
            return cache, *cache._read_slot(slot), None
        if not self.layout.lends:  # every position holds this step: the slot, masked like `full` to be safe
            present = jax.lax.dynamic_index_in_dim(cache.filled, slot, 0, keepdims=False)[:, : self.length]
            return cache, *cache._read_slot(slot), present
        own_only, present, lend = cache._lookup_plan(ref, slot, positions)

        def read_own(_: None) -> tuple[Array, Array, Array]:
            return *cache._read_slot(slot), present

        def read_lent(_: None) -> tuple[Array, Array, Array]:
            slots, valid = lend()
            return *cache._gather(slots), valid

        return cache, *jax.lax.cond(own_only, read_own, read_lent, None)

    def read_sources(self, ref: LayerRef, positions: Array) -> tuple[Array, Array]:
        """Where a layer application's attention reads each position from, after its write at
        `positions` [B, T]: the slot [B, length] and whether the position is read at all [B,
        length]. (What `update` returns keys and values for; exposed for tests.)"""
        slot = self.slot(ref)
        shape = (self.filled.shape[1], self.length)
        own = jnp.broadcast_to(jnp.asarray(slot, jnp.int32), shape)
        if ref.group != "core":
            return own, jnp.ones(shape, bool)
        own_only, present, lend = self._lookup_plan(ref, slot, positions)
        slots, valid = lend()
        return jnp.where(own_only, own, slots), jnp.where(own_only, present, valid)

    def _lookup_plan(self, ref: LayerRef, slot: Array | int, positions: Array):
        """(own_only: the whole batch reads `slot` itself, masked to its present positions;
        present [B, L]; lend() -> (slot [B, L], valid [B, L]) per position under the lookup rule)."""
        layout, lookup = self.layout, self.rule[0]
        present = jax.lax.dynamic_index_in_dim(self.filled, slot, 0, keepdims=False)[:, : self.length]  # [B, L]
        # A row's extent: one past the last position this update wrote (0 for a row that wrote nothing).
        extent = jnp.max(jnp.where(positions < self.capacity, positions, -1), axis=1) + 1  # [B]
        complete = jnp.all(present | (jnp.arange(self.length)[None, :] >= extent[:, None]), axis=1)  # [B]
        masks_only = (lookup == LOOKUP_RULES.index(FULL)) | (lookup == LOOKUP_RULES.index(SKIP))
        own_only = masks_only | jnp.all(complete)

        def lend() -> tuple[Array, Array]:
            own = slot - layout.n_prelude
            index = jnp.arange(layout.n_core_slots)[:, None, None]  # [K, 1, 1]
            held = self.filled[layout.n_prelude: layout.n_prelude + layout.n_core_slots, :, : self.length]  # [K, B, L]
            above_too = lookup == LOOKUP_RULES.index(ALWAYS_LAST)
            candidates = held & (index % layout.n_core == own % layout.n_core) & ((index <= own) | above_too)
            found = jnp.any(candidates, axis=0)
            if self.lookup_keys is None:  # every rule but randomized: the highest candidate
                chosen = jnp.max(jnp.where(candidates, index, -1), axis=0)
            else:
                draws = self._draws(ref, extent, jnp.sum(candidates, axis=0))  # [B, L] in [0, count)
                rank = jnp.cumsum(candidates, axis=0) - 1
                chosen = jnp.argmax(candidates & (rank == draws[None]), axis=0)
            slots = layout.n_prelude + jnp.where(masks_only | complete[:, None] | ~found, own, chosen)
            return slots, jnp.where(masks_only, present, found | complete[:, None])

        return own_only, present, lend

    def _read_slot(self, slot: Array | int) -> tuple[Array, Array]:
        """Keys and values [B, kv_heads, length, head_dim] of `slot`; entry i is position i."""
        return tuple(jax.lax.dynamic_index_in_dim(a, slot, 0, keepdims=False)[:, :, : self.length]
                     for a in (self.k, self.v))

    def _gather(self, slots: Array) -> tuple[Array, Array]:
        """Keys and values [B, kv_heads, length, head_dim]: position i of row b from slot slots[b, i].
        (Along the slot axis only: rows and heads stay where they are on a device mesh.)"""
        index = slots[None, :, None, :, None]  # [1, B, 1, length, 1]
        return tuple(jnp.take_along_axis(a[:, :, :, : self.length], index, axis=0)[0] for a in (self.k, self.v))

    def _draws(self, ref: LayerRef, extent: Array, counts: Array) -> Array:
        """[B, L] uniform integers in [0, counts): row b's key folded with the core application
        index, its extent and the position."""
        application = ref.step * self.layout.n_core + ref.layer

        def row(key: Array, end: Array, row_counts: Array) -> Array:
            key = jax.random.fold_in(jax.random.fold_in(key, application), end)
            return jax.vmap(lambda p, n: jax.random.randint(jax.random.fold_in(key, p), (), 0, jnp.maximum(n, 1)))(
                jnp.arange(row_counts.shape[0]), row_counts)

        return jax.vmap(row)(self.lookup_keys, extent, counts)
