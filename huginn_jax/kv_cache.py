"""A fixed-shape, preallocated key/value cache shared by all samplers.

The cache is one pair of arrays `k, v: [slots, batch, kv_heads, capacity, head_dim]` (heads before
positions, the layout attention consumes without transposing). Buffer index along `capacity` is
the absolute token position, so attention needs no bookkeeping beyond "keys at positions <= the
query's position": rolling back (rejected drafts, unfrozen diffusion positions) is moving a
cursor, and entries past it are overwritten before anything reads them.

A *slot* is the key/value store of one layer application. Prelude and coda layers have one slot
each. For the core, the lookup strategy decides (the reference's names):

- ``"full"``: a slot per core layer and recurrence step. A token at step s attends to the step-s
  keys of the earlier positions that reached step s; a position that exited earlier is left out.
- ``"latest-m4"``: the same slots; a position that did not reach step s lends the keys of the
  latest step it reached, of the same core layer. ("m4" is the reference's 4 core layers; here it
  means the same core layer, whatever their number.)
- ``"latest-m4-compress-s4"``: one slot per core layer shared by all steps (KV sharing): every
  step overwrites it, so later tokens see the keys of the last step that ran at a position.

`depth[b, p]` counts the core steps whose keys position p holds in the per-step slots; "full" and
"latest-m4" read it. With a static depth every position holds every step and the three
strategies differ only in memory (and, for sharing, in which step's keys later tokens see).

Attention reads a slot only up to `visible` positions (static; the whole buffer when None). A
sampler that knows no position beyond some bound is in use narrows the view, so that the cost of a
decoding step follows the length of the text, not the size of the buffer.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from huginn_jax.config import HuginnConfig

Array = jax.Array

FULL = "full"
LATEST = "latest-m4"
SHARED = "latest-m4-compress-s4"
CACHE_STRATEGIES = (FULL, LATEST, SHARED)


def attention_views(capacity: int, smallest: int = 128) -> list[int]:
    """Growing view lengths (powers of two from `smallest`, then the whole buffer) for decoding in
    phases: a phase whose positions all lie below its view attends over that view only."""
    views = []
    view = smallest
    while view < capacity:
        views.append(view)
        view *= 2
    return views + [capacity]


def check_strategy(strategy: str) -> str:
    """The strategy name, or a ValueError listing the known ones."""
    if strategy not in CACHE_STRATEGIES:
        raise ValueError(f"unknown cache_lookup_strategy {strategy!r}; choose one of {list(CACHE_STRATEGIES)}")
    return strategy


@dataclasses.dataclass(frozen=True)
class LayerRef:
    """One layer application: its group ("prelude", "core" or "coda"), layer index, and the
    recurrence step (a traced value inside loops; core layers only)."""

    group: str
    layer: int
    step: Array | int = 0


@dataclasses.dataclass(frozen=True)
class CacheLayout:
    """Maps each layer application to a cache slot."""

    strategy: str
    n_prelude: int
    n_core: int
    n_coda: int
    max_steps: int  # recurrence steps with slots of their own (1 when steps share a slot)

    @classmethod
    def create(cls, config: HuginnConfig, strategy: str, max_steps: int) -> "CacheLayout":
        check_strategy(strategy)
        if max_steps < 1:
            raise ValueError(f"the cache needs room for at least one recurrence step, got max_steps={max_steps}")
        return cls(strategy, config.n_layers_in_prelude, config.n_layers_in_recurrent_block,
                   config.n_layers_in_coda, 1 if strategy == SHARED else max_steps)

    @property
    def per_step(self) -> bool:
        return self.strategy != SHARED

    @property
    def n_slots(self) -> int:
        return self.n_prelude + self.n_core * self.max_steps + self.n_coda

    def slot(self, ref: LayerRef) -> Array | int:
        if ref.group == "prelude":
            return ref.layer
        if ref.group == "coda":
            return self.n_prelude + self.n_core * self.max_steps + ref.layer
        return self.n_prelude + (ref.step if self.per_step else 0) * self.n_core + ref.layer


@flax.struct.dataclass
class KVCache:
    """Keys and values of every layer application, [slot, batch, kv_head, position, head_dim], and
    the number of core steps each position holds, [batch, position]."""

    k: Array
    v: Array
    depth: Array
    layout: CacheLayout = flax.struct.field(pytree_node=False)
    visible: int | None = flax.struct.field(pytree_node=False, default=None)

    @classmethod
    def create(cls, config: HuginnConfig, layout: CacheLayout, batch: int, capacity: int,
               dtype: Any = jnp.float32) -> "KVCache":
        """A zeroed cache for `batch` sequences of up to `capacity` positions."""
        if capacity > config.block_size:
            raise ValueError(f"a cache of {capacity} positions exceeds the context of {config.block_size}")
        shape = (layout.n_slots, batch, config.num_key_value_heads, capacity, config.head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch, capacity), jnp.int32),
                   layout)

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

    def update(self, ref: LayerRef, k: Array, v: Array,
               positions: Array) -> tuple["KVCache", Array, Array, Array | None]:
        """Stores the keys and values k, v [B, kv_heads, T, head_dim] of tokens at `positions` [B, T]
        for layer application `ref`, then returns (cache, keys, values, valid) for its attention:
        keys and values [B, kv_heads, length, head_dim] by position, and valid [B, length] (None
        when every position may be read). Positions past the buffer are dropped: samplers use that
        to keep a sequence's cache untouched."""
        slot = self.layout.slot(ref)
        rows = jnp.arange(k.shape[0])[:, None, None]
        heads = jnp.arange(k.shape[1])[None, :, None]
        at = (slot, rows, heads, positions[:, None, :])
        cache = self.replace(k=self.k.at[at].set(k.astype(self.k.dtype), mode="drop"),
                             v=self.v.at[at].set(v.astype(self.v.dtype), mode="drop"))
        if ref.group != "core" or not self.layout.per_step:
            return cache, *cache._read_slot(slot), None
        if ref.layer == 0:  # the first core layer of step s: positions now hold s + 1 steps
            depth = cache.depth.at[jnp.arange(k.shape[0])[:, None], positions].set(ref.step + 1, mode="drop")
            cache = cache.replace(depth=depth)
        depth = cache.depth[:, : cache.length]
        if self.layout.strategy == FULL:
            return cache, *cache._read_slot(slot), depth > ref.step
        # LATEST: each position lends the keys of step min(step, depth - 1) of this core layer.
        steps = jnp.clip(jnp.minimum(ref.step, depth - 1), 0, self.layout.max_steps - 1)
        slots = self.layout.n_prelude + steps * self.layout.n_core + ref.layer  # [B, length]
        gather = (slots[:, None, :], jnp.arange(k.shape[0])[:, None, None], heads, jnp.arange(cache.length))
        return cache, cache.k[gather], cache.v[gather], None

    def _read_slot(self, slot: Array | int) -> tuple[Array, Array]:
        """Keys and values [B, kv_heads, length, head_dim] of `slot`; entry i is position i."""
        return tuple(jax.lax.dynamic_index_in_dim(a, slot, 0, keepdims=False)[:, :, : self.length]
                     for a in (self.k, self.v))
