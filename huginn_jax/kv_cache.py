"""A fixed-shape, preallocated key/value cache shared by all samplers.

The cache is one pair of arrays `k, v: [slots, batch, kv_heads, length, head_dim]` (heads before
positions, the layout attention consumes without transposing). Buffer index along `length` is the
absolute token position, so attention needs no bookkeeping beyond
"keys at positions <= the query's position": rolling back (rejected drafts, unfrozen diffusion
positions) is moving a cursor, and entries past it are overwritten before anything reads them.

A *slot* is the key/value store of one layer application. The lookup strategy decides which
layer application owns which slot:

- ``"full"``: one slot per core layer and recurrence step (the reference's default), so a token at
  step s attends to the step-s keys of earlier tokens. Needs `max_steps` slots per core layer.
- ``"latest-m4-compress-s4"``: one slot per core layer shared by all steps (the reference's
  KV sharing). Each step overwrites the slot, so later tokens see the keys of the last step that
  ran at a position. The reference hard-codes 4 core layers ("m4", "s4"); here the name means one
  slot per core layer, whatever their number.

Prelude and coda layers always have one slot each.

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

FULL = "full"
SHARED = "latest-m4-compress-s4"
CACHE_STRATEGIES = (FULL, SHARED)


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
class CacheLayout:
    """Maps each layer application (group, layer, recurrence step) to a cache slot."""

    strategy: str
    n_prelude: int
    n_core: int
    n_coda: int
    max_steps: int

    @classmethod
    def create(cls, config: HuginnConfig, strategy: str, max_steps: int) -> "CacheLayout":
        check_strategy(strategy)
        if max_steps < 1:
            raise ValueError(f"the cache needs room for at least one recurrence step, got max_steps={max_steps}")
        return cls(strategy, config.n_layers_in_prelude, config.n_layers_in_recurrent_block,
                   config.n_layers_in_coda, max_steps if strategy == FULL else 1)

    @property
    def n_slots(self) -> int:
        return self.n_prelude + self.n_core * self.max_steps + self.n_coda

    def prelude_slot(self, layer: int) -> int:
        return layer

    def core_slot(self, step: jax.Array | int, layer: int) -> jax.Array | int:
        """Slot of core layer `layer` at recurrence step `step` (a traced value inside loops)."""
        if self.strategy == FULL:
            return self.n_prelude + step * self.n_core + layer
        return self.n_prelude + layer

    def coda_slot(self, layer: int) -> int:
        return self.n_prelude + self.n_core * self.max_steps + layer


@flax.struct.dataclass
class KVCache:
    """Keys and values of every layer application, indexed [slot, batch, kv_head, position, head_dim]."""

    k: jax.Array
    v: jax.Array
    layout: CacheLayout = flax.struct.field(pytree_node=False)
    visible: int | None = flax.struct.field(pytree_node=False, default=None)

    @classmethod
    def create(cls, config: HuginnConfig, layout: CacheLayout, batch: int, capacity: int,
               dtype: Any = jnp.float32) -> "KVCache":
        """A zeroed cache for `batch` sequences of up to `capacity` positions."""
        if capacity > config.block_size:
            raise ValueError(f"a cache of {capacity} positions exceeds the context of {config.block_size}")
        shape = (layout.n_slots, batch, config.num_key_value_heads, capacity, config.head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), layout)

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

    def write(self, slot: jax.Array | int, k: jax.Array, v: jax.Array, positions: jax.Array) -> "KVCache":
        """Stores k, v [B, kv_heads, T, head_dim] of tokens at `positions` [B, T] in `slot`.

        Positions past the end of the buffer are dropped (they belong to finished sequences).
        """
        rows = jnp.arange(k.shape[0])[:, None, None]
        heads = jnp.arange(k.shape[1])[None, :, None]
        at = (slot, rows, heads, positions[:, None, :])
        new_k = self.k.at[at].set(k.astype(self.k.dtype), mode="drop")
        new_v = self.v.at[at].set(v.astype(self.v.dtype), mode="drop")
        return self.replace(k=new_k, v=new_v)

    def read(self, slot: jax.Array | int) -> tuple[jax.Array, jax.Array]:
        """Keys and values [B, kv_heads, length, head_dim] of `slot`; entry i is position i."""
        return tuple(jax.lax.dynamic_index_in_dim(a, slot, 0, keepdims=False)[:, :, : self.length]
                     for a in (self.k, self.v))
