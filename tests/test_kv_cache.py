"""The KV cache's slot mapping and lookup rules against a plain-Python model of the reference's
dict-based `HuginnDynamicCache`, for 4 and other core-layer counts; strategy names; memory."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from huginn_jax.config import HUGINN_0125, HuginnConfig
from huginn_jax.kv_cache import (LOOKUP_RULES, CacheLayout, CacheStrategy, KVCache, LayerRef, cache_bytes_per_token,
                                 entry_bytes)

# ---------------------------------------------------------------- the reference's cache, in plain Python


class DictCache:
    """The reference's `HuginnDynamicCache` for one sequence, as plain dicts: update() stores an
    entry id under the (compressed) layer index and position and returns, per position before the
    end of the sequence, the id the rule reads (None: left out; "none" when the reference finds
    nothing to lend and raises); for `randomized`, the set of ids it may read. Its layer indices:
    prelude 0..P-1, core P + C step + layer, coda -1, -2, ...; "m4" is generalised to C core layers
    (the reference's `s % 4 == step_idx % 4` with P = 2, C = 4) and anchor's 34 = 2 + 4 x 8 to
    P + 8 C."""

    def __init__(self, strategy: str, n_prelude: int, n_core: int):
        self.strategy, self.p, self.c = strategy, n_prelude, n_core
        self.lookup = strategy.split("-compress-")[0]
        self.entries: dict[int, dict[int, int]] = {}
        self.seen = 0

    def compress(self, idx: int) -> int:
        if "-compress-" not in self.strategy or idx < self.p:  # prelude and (negative) coda indices
            return idx
        rule = self.strategy.split("-compress-")[1]
        i = idx - self.p
        if rule == "anchor":
            kept = 8 * self.c
            return idx if i < kept else self.p + kept + (i - kept) % self.c
        stage = int(rule[1:])
        return self.p + (i % stage if rule[0] == "s" else i // stage)

    def clear_from(self, position: int) -> None:
        """The reference's clear_last_k_entries(seen - position)."""
        self.seen = position
        self.entries = {idx: {p: e for p, e in d.items() if p < position} for idx, d in self.entries.items()}

    def same_layer(self, idx: int) -> list[int]:
        return [s for s in self.entries if s >= self.p and (s - self.p) % self.c == (idx - self.p) % self.c]

    def update(self, idx: int, positions: list[int], ids: list[int]) -> list:
        idx = self.compress(idx)
        self.seen = max(self.seen, max(positions) + 1)
        slot = self.entries.setdefault(idx, {})
        for p, e in zip(positions, ids):
            slot[p] = e
        if len(slot) == self.seen or self.lookup == "full":
            return [slot.get(p) for p in range(self.seen)]
        out = []
        for p in range(self.seen):
            if self.lookup == "skip":
                out.append(slot.get(p))
                continue
            if idx < self.p:  # prelude or coda: never missing in these runs
                out.append(slot[p] if p in slot else self.entries[0][p])
                continue
            held = [s for s in self.same_layer(idx) if p in self.entries[s]]
            if self.lookup in ("latest-m4", "available-m4"):
                held = [s for s in held if s <= idx]
            elif self.lookup == "randomized":
                out.append({self.entries[s][p] for s in held if s <= idx} or "none")
                continue
            out.append(self.entries[max(held)][p] if held else "none")
        return out

    def memory_entries(self) -> int:
        return sum(len(d) for d in self.entries.values())


# ---------------------------------------------------------------- the same run through KVCache


def tiny_config(n_prelude: int, n_core: int, n_coda: int) -> HuginnConfig:
    return HuginnConfig(n_embd=4, n_heads=2, num_key_value_heads=2, intermediate_size=4, vocab_size=8,
                        block_size=32, n_layers_in_prelude=n_prelude, n_layers_in_recurrent_block=n_core,
                        n_layers_in_coda=n_coda, mean_recurrence=4, mean_backprop_depth=1)


def entry_id(position, application):
    """A distinct float id per (position, layer application): what a write stores as its key."""
    return 1.0 + position * 1000.0 + application


@functools.partial(jax.jit, static_argnames=("block", "max_steps"))
def simulate(cache: KVCache, block_depth, positions, depths, *, block: int, max_steps: int):
    """A prompt block of `block` positions at per-row depths block_depth [B], then one token per
    event at positions [E] with per-row depths [E, B] (a position seen before is recomputed). Every
    layer writes entry_id(position, application) as its keys. Returns, per event, step and core
    layer, the ids attention reads [E, S, C, B, L], which are valid [E, S, C, B, L], and the block's
    [S, C, B, L] alike."""
    layout = cache.layout
    batch = block_depth.shape[0]
    p, c = layout.n_prelude, layout.n_core

    def write(cache, ref, application, at, runs):  # at [B, T] positions, runs [B] rows that compute
        ids = entry_id(at, application).astype(jnp.float32)  # [B, T]
        kv = jnp.broadcast_to(ids[:, None, :, None], (batch, 2, at.shape[1], 2))
        cache, keys, _, valid = cache.update(ref, kv, kv, jnp.where(runs[:, None], at, cache.capacity))
        valid = jnp.ones(keys.shape[::2], bool) if valid is None else valid
        return cache, keys[:, 0, :, 0], valid

    def token(cache, at, depth):
        runs = jnp.ones((batch,), bool)
        for layer in range(p):
            cache, _, _ = write(cache, LayerRef("prelude", layer), layer, at, runs)

        def step(s, carry):
            cache, reads, valids = carry
            for layer in range(c):
                cache, ids, valid = write(cache, LayerRef("core", layer, s), p + c * s + layer, at, depth > s)
                reads, valids = reads.at[s, layer].set(ids), valids.at[s, layer].set(valid)
            return cache, reads, valids

        shape = (max_steps, c, batch, cache.capacity)
        cache, reads, valids = jax.lax.fori_loop(0, max_steps, step, (cache, jnp.zeros(shape), jnp.zeros(shape, bool)))
        for layer in range(layout.n_coda):
            cache, _, _ = write(cache, LayerRef("coda", layer), 5000 + layer, at, runs)
        return cache, reads, valids

    cache, block_reads, block_valid = token(cache, jnp.broadcast_to(jnp.arange(block), (batch, block)), block_depth)

    def event(cache, inputs):
        at, depth = inputs
        cache, reads, valids = token(cache, jnp.full((batch, 1), at), depth)
        return cache, (reads, valids)

    cache, (reads, valids) = jax.lax.scan(event, cache, (positions, depths))
    return block_reads, block_valid, reads, valids, cache.filled_entries(jnp.full((batch,), positions.max() + 1))


STRUCTURES = [(2, 4, 2), (1, 3, 1), (0, 2, 1)]  # (prelude, core, coda): the reference's, and others
COMPRESSIONS = {4: ["", "-compress-s4", "-compress-s8", "-compress-r4", "-compress-anchor"],
                3: ["", "-compress-s6", "-compress-anchor"],
                2: ["", "-compress-r3"]}
RANDOMIZED = {4: ["", "-compress-s8"], 3: ["-compress-anchor"], 2: ["-compress-r3"]}
"""`randomized` (a compile of its own per shape: the cache carries its keys) under fewer compressions."""
MAX_STEPS, BLOCK, BATCH = 10, 3, 3


def exit_pattern(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random depths for a block and 6 tokens, then 2 positions recomputed (rolled back), per row."""
    rng = np.random.default_rng(seed)
    positions = np.array([3, 4, 5, 6, 7, 8, 7, 8], np.int32)
    block_depth = rng.integers(1, MAX_STEPS + 1, BATCH).astype(np.int32)
    depths = rng.integers(1, MAX_STEPS + 1, (len(positions), BATCH)).astype(np.int32)
    depths[:, 0] = np.minimum(depths[:, 0], 3)  # row 0 exits early: later tokens look up missing steps
    return block_depth, positions, depths


def reference_reads(strategy: str, structure: tuple[int, int, int], block_depth, positions, depths, row: int):
    """The DictCache's reads in the layout of `simulate`'s outputs (for the block and every event)."""
    p, c, coda = structure
    ref = DictCache(strategy, p, c)

    def token(at: list[int], depth: int) -> dict:
        if at[0] < ref.seen:
            ref.clear_from(at[0])
        for layer in range(p):
            ref.update(layer, at, [entry_id(a, layer) for a in at])
        reads = {}
        for s in range(depth):
            for layer in range(c):
                application = p + c * s + layer
                reads[s, layer] = ref.update(application, at, [entry_id(a, application) for a in at])
        for layer in range(coda):
            ref.update(-1 - layer, at, [entry_id(a, 5000 + layer) for a in at])
        return reads

    block = token(list(range(BLOCK)), int(block_depth[row]))
    events = [token([int(at)], int(depth[row])) for at, depth in zip(positions, depths)]
    return block, events, ref.memory_entries()


def assert_same_reads(got_ids, got_valid, want: list, where: str) -> None:
    for position, expected in enumerate(want):
        if expected is None or expected == "none":
            assert not got_valid[position], f"{where}: position {position} should be left out"
        elif isinstance(expected, set):
            assert got_valid[position] and got_ids[position] in expected, f"{where}: position {position}"
        else:
            assert got_valid[position], f"{where}: position {position} should be read"
            assert got_ids[position] == expected, f"{where}: position {position} reads {got_ids[position]}, " \
                                                  f"want {expected}"


@pytest.mark.parametrize("structure", STRUCTURES, ids=lambda s: f"{s[0]}-{s[1]}-{s[2]}")
def test_every_lookup_and_compression_reads_what_the_reference_cache_reads(structure):
    """Random exit patterns (one row exits early), a rollback, every rule and compression: each
    core layer reads, for every earlier position, the entry the reference's dict cache reads, and
    the filled-entry count is its memory."""
    config = tiny_config(*structure)
    n_core = structure[1]
    block_depth, positions, depths = (jnp.asarray(a) for a in exit_pattern(seed=n_core))
    names = [rule + compression for compression in COMPRESSIONS[n_core] for rule in LOOKUP_RULES
             if rule != "randomized"] + ["randomized" + compression for compression in RANDOMIZED[n_core]]
    for name in names:
        keys = jax.random.split(jax.random.key(7), BATCH) if name.startswith("randomized") else None
        cache = KVCache.create(config, name, MAX_STEPS, BATCH, 12, jnp.float32, lookup_keys=keys)
        block_ids, block_valid, ids, valid, filled = jax.device_get(
            simulate(cache, block_depth, positions, depths, block=BLOCK, max_steps=MAX_STEPS))
        for row in range(BATCH):
            want_block, want_events, want_entries = reference_reads(name, structure, block_depth, positions,
                                                                    depths, row)
            for (s, layer), want in want_block.items():
                assert_same_reads(block_ids[s, layer, row], block_valid[s, layer, row], want,
                                  f"{name} block step {s} layer {layer} row {row}")
            for e, reads in enumerate(want_events):
                for (s, layer), want in reads.items():
                    assert_same_reads(ids[e, s, layer, row], valid[e, s, layer, row], want,
                                      f"{name} event {e} step {s} layer {layer} row {row}")
            assert filled[row] == want_entries, f"{name} row {row}: memory"


def test_lookup_rules_really_differ_on_the_exit_pattern():
    """The exit pattern makes the rules disagree (else the comparison above could not fail)."""
    structure = STRUCTURES[0]
    block_depth, positions, depths = exit_pattern(seed=4)
    reads = {}
    for rule in ("latest-m4", "always-last-m4", "skip"):
        _, events, _ = reference_reads(rule, structure, block_depth, positions, depths, row=0)
        reads[rule] = [str(r) for event in events for r in event.values()]
    assert reads["latest-m4"] != reads["always-last-m4"] and reads["latest-m4"] != reads["skip"]


# ---------------------------------------------------------------- the slot mapping itself


@pytest.mark.parametrize("n_core", [1, 2, 3, 4, 5])
def test_slot_mapping_matches_the_reference_index_arithmetic(n_core):
    """Every core application's slot is the reference's compressed index (generalised), and the
    layout holds exactly the slots used."""
    config = tiny_config(2, n_core, 2)
    steps = 11
    for name in ["full", f"latest-m4-compress-s{n_core}", f"latest-m4-compress-s{3 * n_core}",
                 "skip-compress-r1", "skip-compress-r2", f"skip-compress-r{n_core + 1}", "latest-m4-compress-anchor"]:
        strategy = CacheStrategy.parse(name, n_core)
        layout = CacheLayout.create(config, strategy, steps)
        ref = DictCache(name, 2, n_core)
        slots = [int(layout.slot(jnp.asarray(strategy.code), LayerRef("core", layer, step)))
                 for step in range(steps) for layer in range(n_core)]
        assert slots == [ref.compress(2 + i) for i in range(steps * n_core)], name
        assert layout.n_core_slots == len(set(slots)) and max(slots) == 1 + layout.n_core_slots, name
        assert layout.slot(strategy.code, LayerRef("coda", 1)) == 2 + layout.n_core_slots + 1


def test_reference_slot_counts_for_huginn_0125():
    """32 recurrences of 4 core layers: 128 core slots in full, 4/8/16 under s4/s8/s16, 32 under r4
    and 36 under anchor (the reference's 34 + (i - 34) % 4 reaches index 37)."""
    counts = {name: CacheLayout.create(HUGINN_0125, name, 32).n_slots for name in
              ("full", "latest-m4-compress-s4", "latest-m4-compress-s8", "latest-m4-compress-s16",
               "latest-m4-compress-r4", "latest-m4-compress-anchor")}
    assert counts == {"full": 132, "latest-m4-compress-s4": 8, "latest-m4-compress-s8": 12,
                      "latest-m4-compress-s16": 20, "latest-m4-compress-r4": 36, "latest-m4-compress-anchor": 40}
    # the paper-notes arithmetic: 21,120 bytes per layer slot and token in bfloat16; 2.79 MB full, 169 KB shared
    assert entry_bytes(HUGINN_0125, jnp.bfloat16) == 21_120
    assert cache_bytes_per_token(HUGINN_0125, "full", 32) == 132 * 21_120
    assert cache_bytes_per_token(HUGINN_0125, "latest-m4-compress-s4", 32) == 8 * 21_120


# ---------------------------------------------------------------- names


@pytest.mark.parametrize("name, message", [
    ("latest", "unknown cache_lookup_strategy 'latest'"),
    ("latest-m8", "its lookup rule 'latest-m8' is none of"),
    ("", "unknown cache_lookup_strategy ''"),
    ("latest-m4-compress-s0", "malformed cache_lookup_strategy 'latest-m4-compress-s0'"),
    ("latest-m4-compress-sx", "'compress-sx' must be compress-sN or compress-rN"),
    ("latest-m4-compress-r", "malformed"),
    ("latest-m4-compress-s-4", "malformed"),
    ("latest-m4-compress-x4", "malformed"),
    ("latest-m4-compress-anchor2", "malformed"),
    ("latest-m4-compress-", "malformed"),
    ("full-compress-s4-compress-s8", "malformed"),
    ("latest-m4-compress-s6", "cannot be used with this model: compress-s6 shares core slots modulo 6"),
    (4, "must be a string"),
])
def test_bad_strategy_names_are_refused_with_a_clear_error(name, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        CacheStrategy.parse(name, 4)


def test_names_round_trip_and_only_randomized_needs_a_key():
    for rule in LOOKUP_RULES:
        for compression in ("", "-compress-s8", "-compress-r3", "-compress-anchor"):
            strategy = CacheStrategy.parse(rule + compression, 4)
            assert strategy.name == rule + compression
            assert strategy.needs_key == (rule == "randomized")
    config = tiny_config(2, 4, 2)
    with pytest.raises(ValueError, match="draws random lookups: pass one PRNG key per row"):
        KVCache.create(config, "randomized", 4, 1, 8)
    with pytest.raises(ValueError, match="draws nothing"):
        KVCache.create(config, "latest-m4", 4, 1, 8, lookup_keys=jax.random.split(jax.random.key(0), 1))


def test_compress_s6_is_fine_for_3_or_6_core_layers():
    for n_core in (1, 2, 3, 6):
        assert CacheStrategy.parse("latest-m4-compress-s6", n_core).stage == 6


# ---------------------------------------------------------------- memory


def test_memory_statistics_count_filled_entries_below_the_extent():
    config = tiny_config(2, 4, 2)
    cache = KVCache.create(config, "latest-m4-compress-s4", 8, 2, 16)
    memory = cache.memory()
    assert memory.entry_bytes == 2 * 2 * 2 * 4 and memory.allocated_bytes == 8 * 16 * memory.entry_bytes
    kv = jnp.zeros((2, 2, 5, 2))
    positions = jnp.asarray([[0, 1, 2, 3, 4], [0, 1, 2, 16, 16]])  # row 1 writes 3 positions
    for layer in range(2):
        cache, *_ = cache.update(LayerRef("prelude", layer), kv, kv, positions)
    cache, *_ = cache.update(LayerRef("core", 1, 5), kv, kv, positions)  # core slot 1
    entries = np.asarray(cache.filled_entries(jnp.asarray([4, 16])))
    assert entries.tolist() == [3 * 4, 3 * 3]
    stats = memory.stats(entries)
    assert stats["cache_memory_mb"].tolist() == [12 * 32 / 2 ** 20, 9 * 32 / 2 ** 20]
    assert stats["cache_allocated_mb"].tolist() == [8 * 16 * 32 / 2 ** 20] * 2


def test_a_recomputed_position_drops_its_older_entries():
    """Prelude layer 0 starts a token afresh (the reference clears the position before it recomputes it)."""
    config = tiny_config(2, 4, 2)
    cache = KVCache.create(config, "full", 4, 1, 8)
    kv = jnp.zeros((1, 2, 1, 2))
    at = jnp.asarray([[3]])
    for step in range(3):
        cache, *_ = cache.update(LayerRef("core", 0, step), kv, kv, at)
    assert int(cache.filled_entries(jnp.asarray([8]))[0]) == 3
    cache, *_ = cache.update(LayerRef("prelude", 0), kv, kv, at)
    assert int(cache.filled_entries(jnp.asarray([8]))[0]) == 1


def test_randomized_lookups_follow_the_row_key_not_the_batch():
    """The same row key draws the same lookups alone or in a batch; another key draws others."""
    config = tiny_config(2, 4, 2)
    block_depth, positions, depths = exit_pattern(seed=11)
    depths[:, 1:] = depths[:, :1]  # every row the same exit pattern
    block_depth[:] = block_depth[0]
    keys = jax.random.split(jax.random.key(3), BATCH)

    def reads(row_keys):
        batch = len(row_keys)
        cache = KVCache.create(config, "randomized", MAX_STEPS, batch, 12, jnp.float32, lookup_keys=row_keys)
        out = simulate(cache, jnp.asarray(block_depth[:batch]), jnp.asarray(positions), jnp.asarray(depths[:, :batch]),
                       block=BLOCK, max_steps=MAX_STEPS)
        return np.where(out[3], out[2], 0)  # [E, S, C, B, L]

    batched = reads(keys)
    for row in range(BATCH):
        alone = reads(keys[row: row + 1])
        np.testing.assert_array_equal(batched[..., row, :], alone[..., 0, :])
    assert (batched[..., 0, :] != batched[..., 1, :]).any()  # other keys, other draws
