"""Recurrence controllers: who decides how many core steps each row of a block takes.

`huginn_jax.model.iterate` is the one loop over the recurrent core; a controller steers it, in
the spirit of the reference's exit evaluators and of gemma's early-stopping policies:

- `init(block, state) -> memory`: the controller's own state before the first step;
- `running(memory, step) -> [B] bool`: which rows take step `step` (0-based); the loop ends when
  no row runs;
- `after_step(memory, step, state, ran, cache, decode) -> (memory, cache)`: sees the state after
  the step (and, through `decode(state, cache) -> (logits [B, V], cache)`, the logits of each row's
  last real token, for criteria that need them) and updates its memory.

A row that does not run keeps its state and writes nothing into the cache, so a batch's rows
recur independently. Controllers are pytrees (flax struct dataclasses): their numbers are traced,
so new depths or thresholds do not recompile; only their kind and static options do.

- `FixedDepth(num_steps)`: every row takes `num_steps` steps (the reference's `num_steps`).
- `Trajectory(num_steps)`: the same, keeping the state after every step ([S, B, T, E]).
- `AdaptiveExit(...)`: each row stops when its exit criterion fires (`huginn_jax.exit_criteria`),
  optionally recording the criterion after every step.
- `StateNoise(inner, keys, amount, ...)`: another controller's steps with the reference's test-time
  noise mixed into the state before each step (`before_step(memory, step, state)` may change the
  state a step starts from; the others leave it alone).
"""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp

from huginn_jax.exit_criteria import ExitCriterion
from huginn_jax.layers import rms_norm

Array = jax.Array
Memory = Any
Decode = Callable[[Array, Any], tuple[Array, Any]]  # (state [B, T, E], cache) -> (last-token logits [B, V], cache)


@flax.struct.dataclass
class Recurrence:
    """Base controller: no memory, every row runs until `running` says otherwise."""

    def init(self, block: Any, state: Array) -> Memory:
        return ()

    def running(self, memory: Memory, step: Array) -> Array:
        raise NotImplementedError

    def before_step(self, memory: Memory, step: Array, state: Array) -> tuple[Memory, Array]:
        """The state the core step starts from (test-time noise changes it)."""
        return memory, state

    def after_step(self, memory: Memory, step: Array, state: Array, ran: Array, cache: Any,
                   decode: Decode) -> tuple[Memory, Any]:
        return memory, cache


@flax.struct.dataclass
class FixedDepth(Recurrence):
    """`num_steps` core steps for every row (traced: any depth, one compile)."""

    num_steps: Array | int

    def init(self, block: Any, state: Array) -> Memory:
        return jnp.zeros((state.shape[0],), bool)  # only its shape matters: one flag per row

    def running(self, memory: Memory, step: Array) -> Array:
        return jnp.broadcast_to(step < self.num_steps, memory.shape)


@flax.struct.dataclass
class Trajectory(Recurrence):
    """`num_steps` steps for every row, keeping the raw state after each: memory [S, B, T, E].
    The step count is the memory's shape, so it is static."""

    num_steps: int = flax.struct.field(pytree_node=False)

    def init(self, block: Any, state: Array) -> Memory:
        return jnp.zeros((self.num_steps, *state.shape), state.dtype)

    def running(self, memory: Memory, step: Array) -> Array:
        return jnp.broadcast_to(step < self.num_steps, memory.shape[1:2])

    def after_step(self, memory: Memory, step: Array, state: Array, ran: Array, cache: Any,
                   decode: Decode) -> tuple[Memory, Any]:
        return jax.lax.dynamic_update_index_in_dim(memory, state, step, 0), cache


@flax.struct.dataclass
class ExitMemory:
    """What `AdaptiveExit` carries from step to step."""

    criterion: Any  # the criterion's own state
    real: Array  # [B, T] the block's real tokens, which latent criteria average over
    running: Array  # [B] rows that have not exited
    values: Array | None  # [B, W] the criterion after every step (NaN: not checked), when recording


@flax.struct.dataclass
class AdaptiveExit(Recurrence):
    """Each row iterates until its exit criterion fires, or `max_steps`.

    The criterion is checked after steps min_steps, min_steps + check_every, ... (0-based), unless
    `may_exit` is False (the reference's `do_not_exit_in_prefill`). `record_width` > 0 keeps the
    criterion's value after every step ([B, record_width], NaN where not checked).
    """

    criterion: ExitCriterion = flax.struct.field(pytree_node=False)
    threshold: Array | float
    max_steps: Array | int
    min_steps: Array | int = 0
    check_every: Array | int = 1
    vocab_size: int = flax.struct.field(pytree_node=False, default=0)
    may_exit: bool = flax.struct.field(pytree_node=False, default=True)
    record_width: int = flax.struct.field(pytree_node=False, default=0)

    def init(self, block: Any, state: Array) -> ExitMemory:
        batch = state.shape[0]
        values = jnp.full((batch, self.record_width), jnp.nan, jnp.float32) if self.record_width else None
        real = block.real
        return ExitMemory(self.criterion.init(state, real, self.vocab_size), real, block.active, values)

    def running(self, memory: ExitMemory, step: Array) -> Array:
        return memory.running & (step < self.max_steps)

    def after_step(self, memory: ExitMemory, step: Array, state: Array, ran: Array, cache: Any,
                   decode: Decode) -> tuple[ExitMemory, Any]:
        checked = self.may_exit & (step >= self.min_steps) & ((step - self.min_steps) % self.check_every == 0)
        logits = None
        if self.criterion.needs_logits:
            def skip(cache: Any) -> tuple[Array, Any]:
                return jnp.zeros((state.shape[0], self.vocab_size), jnp.float32), cache

            logits, cache = jax.lax.cond(checked, decode, lambda s, c: skip(c), state, cache)
        new, value = self.criterion.update(memory.criterion, state, memory.real, logits)
        kept = jax.tree.map(lambda a, b: jnp.where(checked, a, b), new, memory.criterion)
        exits = checked & self.criterion.exits(value, self.threshold) & ran
        values = memory.values
        if values is not None:
            values = values.at[:, step].set(jnp.where(checked & ran, value.astype(jnp.float32), jnp.nan))
        return ExitMemory(kept, memory.real, memory.running & ~exits, values), cache


NOISE_SCHEDULES = ("geom", "sqrt", "line", "chi", "fixed")


@flax.struct.dataclass
class StateNoise(Recurrence):
    """Another controller's steps with noise mixed into the state before each step: the reference's
    test-time noise (`test_time_noise`, `test_time_noise_type`).

    With n = amount * init_std * sqrt(width) (`amount` is the reference's `test_time_noise`), the
    state x becomes x (1 - a) + N(0, 1) a before step s, where a is n / (s + 1) ("geom"),
    n / sqrt(s + 1) ("sqrt"), max(n, (mean_recurrence - s) / mean_recurrence) ("line"), uniform in
    [0, 2n) ("chi") or n ("fixed"), and is then renormalised by the RMSNorm `renorm` (the last core
    block's norm_4 in the reference; None skips it). Each row draws from its own key folded with the
    step, so a row's noise does not depend on its batch.
    """

    inner: Recurrence
    keys: Array  # [B] one PRNG key per row
    amount: Array | float  # n, already scaled by init_std * sqrt(width)
    renorm: Array | None = None  # [E] RMSNorm weight applied after mixing
    schedule: str = flax.struct.field(pytree_node=False, default="fixed")
    mean_recurrence: int = flax.struct.field(pytree_node=False, default=32)
    eps: float = flax.struct.field(pytree_node=False, default=1e-6)

    def init(self, block: Any, state: Array) -> Memory:
        return self.inner.init(block, state)

    def running(self, memory: Memory, step: Array) -> Array:
        return self.inner.running(memory, step)

    def mix(self, step: Array) -> Array:
        """The noise weight a of step `step` (an int), per row [B]."""
        s = jnp.asarray(step, jnp.float32)
        n = jnp.asarray(self.amount, jnp.float32)
        batch = self.keys.shape[:1]
        if self.schedule == "chi":
            draw = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(jax.random.fold_in(k, step), 1)))
            return 2 * draw(self.keys) * n
        weight = {"geom": lambda: n / (s + 1), "sqrt": lambda: n / jnp.sqrt(s + 1), "fixed": lambda: n,
                  "line": lambda: jnp.maximum(n, (self.mean_recurrence - s) / self.mean_recurrence)}[self.schedule]
        return jnp.broadcast_to(weight(), batch)

    def before_step(self, memory: Memory, step: Array, state: Array) -> tuple[Memory, Array]:
        memory, state = self.inner.before_step(memory, step, state)
        noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, step), state.shape[1:], jnp.float32))(
            self.keys)
        a = self.mix(step)[:, None, None]
        mixed = (state.astype(jnp.float32) * (1 - a) + noise * a).astype(state.dtype)
        if self.renorm is not None:
            mixed = rms_norm(mixed, self.renorm, self.eps)
        return memory, mixed

    def after_step(self, memory: Memory, step: Array, state: Array, ran: Array, cache: Any,
                   decode: Decode) -> tuple[Memory, Any]:
        return self.inner.after_step(memory, step, state, ran, cache, decode)
