"""Freeze rules: after each step, which tokens become final.

A rule is a small policy object chosen by name (`FREEZE_RULES`): `decide(view) -> Decision`. The
rule of a run is a traced index (`Settings.freeze_rule`), and `decide` runs the rule it names
through `lax.switch`, so every rule lives in one compiled program and switching rules never
recompiles.

- "latent-diff": a position converged when its state moved less than exit_t (relative) in this
  step; every token up to the last converged position's freezes.
- "latent-acceleration-1": the change of the state change (by window index, as the reference).
- "latent-acceleration-2": the second difference of the state over the last three steps.
- "token-stability": a token that stayed the same for num_steps // inner_recurrence steps.
- "fixed": after num_steps // inner_recurrence steps, `headway` tokens per step (the paper's Alg. 1).

The bookkeeping around a freeze (how far the wavefront moves, the reference's cache-clear count
and freeze index k) follows the reference's branches exactly, including where it surprises: the
latent rules compare a position with the previous step's state `start - previous start` positions
further right after the freeze front moved (the reference slices `previous_states` as if it began
at the previous cache index), and "latent-acceleration-1" compares deltas by window index.
"""

from __future__ import annotations

from typing import ClassVar

import flax.struct
import jax
import jax.numpy as jnp

from samplers.diffusion.settings import Settings
from samplers.diffusion.state import FreezeMemory, ring_read, ring_write

Array = jax.Array


@flax.struct.dataclass
class FreezeView:
    """What a rule may look at after a step's recurrence and append (W: the window)."""

    state: Array  # [B, W, E] the window's states after this step's recurrence
    before: Array  # [B, W, E] the previous states the reference compares them with (see module)
    states: Array  # [B, R, E] the ring after this step, new positions appended
    positions: Array  # [B, W] positions of the window
    start: Array  # [B] first wavefront position
    grown: Array  # [B] wavefront width after the append
    n_frozen: Array  # [B]
    n_cur: Array  # [B] sequence length after the append
    headway_in_step: Array  # [B] positions appended (fewer when the wavefront is capped)
    stable: Array  # [B, S] stability counts after this step
    step: Array  # [B] sampler steps completed before this one
    active: Array  # [B]
    memory: FreezeMemory
    settings: Settings
    headway: int = flax.struct.field(pytree_node=False)  # new positions per step

    @property
    def index(self) -> Array:
        """[1, W] window index i of position start + i."""
        return jnp.arange(self.positions.shape[1])[None, :]

    @property
    def shift(self) -> Array:
        """[B] how far the reference's slice of the previous states is displaced (see module)."""
        return self.start - self.memory.old_start

    @property
    def n_match(self) -> Array:
        """[B] window positions that have a previous state to compare with."""
        return jnp.maximum(self.memory.prev_width - self.shift, 0)

    @classmethod
    def create(cls, **fields) -> "FreezeView":
        """The view; the previous states are read here, once for every rule."""
        view = cls(before=None, **fields)
        return view.replace(before=ring_read(view.memory.prev_states, view.positions + view.shift[:, None]))


@flax.struct.dataclass
class Decision:
    """A rule's verdict for every sequence ([B] unless noted)."""

    freeze: Array  # bool: tokens freeze in this step
    frozen: Array  # the frozen length after the step (n_frozen when nothing freezes)
    moved: Array  # positions the wavefront's start advances
    clears: Array  # cache entries the reference clears (num_cache_clears)
    k: Array  # the reference's k after the step
    latent: Array  # bool scalar: the rule judges latent states (the reference's stop check differs)
    prev_delta: Array  # [B, R, E] latent-acceleration-1's memory after the step
    prev_delta_len: Array
    criterion: Array  # [B, W] float32 the rule's criterion where judged, NaN elsewhere
    criterion_at: Array  # [B, W] the positions judged (past the buffer elsewhere)


class FreezeRule:
    """A freeze rule. Subclasses set `name` and implement `decide`."""

    name: ClassVar[str]
    latent: ClassVar[bool] = False

    def decide(self, view: FreezeView) -> Decision:
        raise NotImplementedError


@flax.struct.dataclass
class Passed:
    """What a cut rule found ([B] unless noted)."""

    any: Array  # bool: some position passes
    k: Array  # one past the last position that passes
    criterion: Array  # [B, W] the criterion of each judged position
    judged: Array  # [B, W] bool
    at: Array  # [B, W] the position each criterion belongs to


class CutRule(FreezeRule):
    """Rules that freeze every token before k, one past the last position that passes
    (`passes(view) -> Passed`); the wavefront then starts at k - 1, the position that reads the
    last frozen token and drafts the next."""

    resets_k: ClassVar[bool] = False  # the reference sets k = 0 when nothing freezes ("token-stability")

    def passes(self, view: FreezeView) -> Passed:
        raise NotImplementedError

    def delta_memory(self, view: FreezeView) -> tuple[Array, Array]:
        return view.memory.prev_delta, view.memory.prev_delta_len

    def decide(self, view: FreezeView) -> Decision:
        found = self.passes(view)
        freeze, k_new = found.any, found.k
        prev_delta, prev_delta_len = self.delta_memory(view)
        return Decision(
            freeze=freeze, frozen=jnp.where(freeze, k_new, view.n_frozen),
            moved=jnp.where(freeze, k_new - 1 - view.start, 0),
            clears=jnp.where(freeze, view.n_cur - view.headway_in_step - k_new + 1,
                             view.grown - view.headway_in_step),
            k=jnp.where(freeze, k_new, 0 if self.resets_k else view.memory.k), latent=jnp.bool_(self.latent),
            prev_delta=prev_delta, prev_delta_len=prev_delta_len,
            criterion=jnp.where(found.judged, found.criterion, jnp.nan).astype(jnp.float32),
            criterion_at=jnp.where(found.judged, found.at, view.stable.shape[1]))


def last_true(mask: Array) -> tuple[Array, Array]:
    """(whether any entry of each row of mask [B, N] holds, the index of the last that does)."""
    index = jnp.arange(mask.shape[1])
    return jnp.any(mask, axis=1), jnp.max(jnp.where(mask, index, -1), axis=1)


def norm(x: Array) -> Array:
    """Euclidean norm over the last axis, in float32."""
    return jnp.linalg.norm(x.astype(jnp.float32), axis=-1)


def latest_exit(view: FreezeView, criterion: Array, valid: Array, at: Array) -> Passed:
    """Positions pass where their criterion [B, W] (judged where `valid`) is below exit_t."""
    any_exit, last = last_true(valid & (criterion < view.settings.exit_t))
    return Passed(any_exit, view.start + last + 1, criterion, valid, at)


class LatentDiff(CutRule):
    name = "latent-diff"
    latent = True

    def passes(self, view: FreezeView) -> Passed:
        change = norm(view.state - view.before) / norm(view.state)
        return latest_exit(view, change, view.index < view.n_match[:, None], view.positions)


class LatentAcceleration1(CutRule):
    name = "latent-acceleration-1"
    latent = True

    def passes(self, view: FreezeView) -> Passed:
        delta = view.state - view.before
        last_delta = ring_read(view.memory.prev_delta, view.memory.old_start[:, None] + view.index)
        valid = view.index < jnp.minimum(view.n_match, view.memory.prev_delta_len)[:, None]
        acceleration = norm(delta - last_delta) / norm(view.state)
        return latest_exit(view, acceleration, valid, view.positions)

    def delta_memory(self, view: FreezeView) -> tuple[Array, Array]:
        delta = view.state - view.before
        written = (view.index < view.n_match[:, None]) & view.active[:, None]
        return ring_write(view.memory.prev_delta, view.positions, delta, written), view.n_match


class LatentAcceleration2(CutRule):
    name = "latent-acceleration-2"
    latent = True

    @staticmethod
    def overlap(view: FreezeView) -> tuple[Array, Array]:
        """[B] the range of positions that all of the last three steps' wavefronts cover."""
        memory = view.memory
        lo = jnp.maximum(jnp.maximum(view.start, memory.old_start), memory.old_old_start)
        hi = jnp.minimum(jnp.minimum(view.start + view.grown, memory.old_start + memory.prev_width),
                         memory.old_old_start + memory.prev2_width)
        return lo, hi

    def passes(self, view: FreezeView) -> Passed:
        memory = view.memory
        lo, hi = self.overlap(view)
        at = lo[:, None] + view.index
        current = ring_read(view.states, at)
        previous = ring_read(memory.prev_states, at - memory.old_start[:, None] + view.start[:, None])
        earlier = ring_read(memory.prev2_states, at - memory.old_old_start[:, None] + memory.old_start[:, None])
        acceleration = (current - previous) - (previous - earlier)
        # the reference adds the index within the overlap to the start, as here
        criterion, valid = norm(acceleration) / (norm(current) + 1e-6), view.index < (hi - lo)[:, None]
        return latest_exit(view, criterion, valid, at)


class TokenStability(CutRule):
    name = "token-stability"
    resets_k = True

    def passes(self, view: FreezeView) -> Passed:
        # every position of the sequence counts, frozen ones included (as the reference)
        any_stable, last = last_true(view.stable > view.settings.patience)
        nothing = jnp.zeros(view.positions.shape, bool)  # no latent criterion to record
        return Passed(any_stable, last + 1, jnp.zeros(view.positions.shape, jnp.float32), nothing, view.positions)


class Fixed(FreezeRule):
    name = "fixed"

    def decide(self, view: FreezeView) -> Decision:
        freeze = jnp.broadcast_to(view.step > view.settings.patience, view.start.shape)
        memory = view.memory
        return Decision(
            freeze=freeze, frozen=jnp.where(freeze, view.n_frozen + view.headway_in_step, view.n_frozen),
            moved=jnp.where(freeze, view.headway_in_step, 0),
            clears=jnp.where(freeze, view.grown - view.headway - view.headway_in_step,
                             view.grown - view.headway_in_step),
            k=memory.k, latent=jnp.bool_(False), prev_delta=memory.prev_delta, prev_delta_len=memory.prev_delta_len,
            criterion=jnp.full(view.positions.shape, jnp.nan, jnp.float32),
            criterion_at=jnp.full(view.positions.shape, view.stable.shape[1]))


FREEZE_RULES: dict[str, FreezeRule] = {rule.name: rule for rule in (
    LatentDiff(), LatentAcceleration1(), LatentAcceleration2(), TokenStability(), Fixed())}
FREEZE_STRATEGIES = tuple(FREEZE_RULES)


def decide(view: FreezeView) -> Decision:
    """The verdict of the run's rule (`view.settings.freeze_rule`, traced)."""
    return jax.lax.switch(view.settings.freeze_rule, [rule.decide for rule in FREEZE_RULES.values()], view)
