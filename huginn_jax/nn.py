"""The Huginn model as a Flax (linen) module over the functional code: same parameters, same functions.

`Huginn(config)` has no layers of its own. Its Flax parameters are the tree of
`huginn_jax.params` (top-level entries wte, prelude, adapter, core, coda, ln_f [, lm_head], each a
Flax param holding that entry's arrays, lists of blocks included), and each method hands that tree
to the function of `huginn_jax.model` of the same name. So

    Huginn(config).apply({"params": params}, ids, num_steps=r) == model.forward(params, ids, r, config=config)

bit for bit, any functional tree (`init_params`, a restored checkpoint) applies as it is, and
`nn.meta.unbox(module.init(...)["params"])` goes into `forward` and every sampler.

Initialization: `init` boxes every array in `nn.LogicallyPartitioned` with its
`ParamSpec.logical_axes`, so `nn.get_partition_spec`, `nn.logical_to_mesh_sharding` and
`tabulate` work; `logical_axis_rules` turns the project's sharding rules into Flax's, under which
those shardings are `sharding.param_shardings`. The values are `init_params(config, k)` for one
key k drawn with `make_rng("params")`: Flax never hands a module its raw `rng`, only keys folded
with the module path and a counter, so k is that first fold of `rng`, not `rng` itself.
"""

from __future__ import annotations

import graphlib
import itertools
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from huginn_jax import model, training
from huginn_jax.sharding import default_rules, param_shardings
from huginn_jax.config import HuginnConfig
from huginn_jax.kv_cache import KVCache
from huginn_jax.layers import TokenPositions
from huginn_jax.model import BlockOutput, Embedded, ForwardOutput, Recurred
from huginn_jax.params import Params, check_params, init_params, is_spec, leaf_name, param_specs
from huginn_jax.recurrence import Recurrence

Array = jax.Array
STATE_RNG = "state"  # the Flax rng stream of the random initial state (when no `key` is passed)


class _Holder:
    """Carries the parameter tree through `setup` unchanged (Flax would freeze its lists into tuples)."""

    def __init__(self, tree: Params) -> None:
        self.tree = tree


def _boxed(specs: Any, values: Any | None) -> Any:
    """An init function for one top-level entry: its `values` (or, for Flax's shape check at apply
    time, which only traces it, zeros of the spec's shapes), each leaf boxed with its logical axes."""

    def init(key: Array) -> Any:
        del key  # the whole tree is drawn at once from one key, as init_params does
        leaves = values if values is not None else jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), specs,
                                                                is_leaf=is_spec)
        return jax.tree.map(lambda s, v: nn.LogicallyPartitioned(v, s.logical_axes), specs, leaves, is_leaf=is_spec)

    return init


class Huginn(nn.Module):
    """The whole Huginn model; every method delegates to `huginn_jax.model` (or `training`).

    config: the architecture; param_dtype: the dtype `init` draws (float32 or bfloat16; `apply`
    takes trees of either, like the functions).
    """

    config: HuginnConfig
    param_dtype: Any = jnp.float32

    def setup(self) -> None:
        specs = param_specs(self.config, self.param_dtype)
        drawn = None
        if self.is_initializing():
            drawn = init_params(self.config, self.make_rng("params"), self.param_dtype)
        else:  # the functions' check (every missing, extra or mis-shaped array named) before Flax's own
            check_params(nn.meta.unbox(dict(self.variables.get("params", {}))), self.config)
        self._params = _Holder({name: self.param(name, _boxed(spec, None if drawn is None else drawn[name]))
                                for name, spec in specs.items()})

    @property
    def tree(self) -> Params:
        """The functional parameter tree (unboxed), as `huginn_jax.model` takes it."""
        return self._params.tree

    def __call__(self, input_ids: Any, num_steps: Array | int | None = None, *, key: Array | None = None,
                 init_scale: float = 1.0, input_states: Array | None = None,
                 return_trajectory: bool = False) -> ForwardOutput:
        """`model.forward`: logits [B, T, V], latents [B, T, E] (and the trajectory) of input_ids [B, T].

        num_steps defaults to the config's mean_recurrence. The random initial state uses `key`;
        without one, a key from the rng stream "state" (`apply(..., rngs={"state": k})`, or the
        "params" stream while initializing), else forward's error.
        """
        num_steps = self.config.mean_recurrence if num_steps is None else num_steps
        if key is None and input_states is None and (self.has_rng(STATE_RNG) or self.has_rng("params")):
            key = self.make_rng(STATE_RNG)
        return model.forward(self.tree, input_ids, num_steps, config=self.config, key=key, init_scale=init_scale,
                             input_states=input_states, return_trajectory=return_trajectory)

    def embed_inputs(self, tokens: Array, positions: Array, cache: KVCache | None = None, *,
                     lengths: Array | None = None, active: Array | None = None,
                     writes: Array | None = None) -> tuple[Embedded, KVCache | None]:
        """`model.embed_inputs`: tokens [B, T] at positions [B, T] through embedding and prelude."""
        return model.embed_inputs(self.tree, self.config, tokens, positions, cache, lengths=lengths, active=active,
                                  writes=writes)

    def iterate(self, block: Embedded, state: Array, recurrence: Recurrence, cache: KVCache | None = None, *,
                unroll: int = 0, remat: bool = False) -> tuple[Recurred, KVCache | None]:
        """`model.iterate`: the core loop from state [B, T, E] under a recurrence controller."""
        return model.iterate(self.tree, self.config, block, state, recurrence, cache, unroll=unroll, remat=remat)

    def predict_from_latents(self, state: Array, where: TokenPositions,
                             cache: KVCache | None = None) -> tuple[Array, KVCache | None]:
        """`model.predict_from_latents`: raw states [B, T, E] -> the head's input [B, T, E]."""
        return model.predict_from_latents(self.tree, self.config, state, where, cache)

    def lm_head(self, hidden: Array) -> Array:
        """`model.lm_head`: float32 logits [..., V] of hidden states [..., E]."""
        return model.lm_head(self.tree, self.config, hidden)

    def run_block(self, tokens: Array, positions: Array, state: Array, recurrence: Recurrence,
                  cache: KVCache | None = None, *, lengths: Array | None = None, active: Array | None = None,
                  writes: Array | None = None) -> tuple[BlockOutput, KVCache | None]:
        """`model.run_block`: prelude, core and coda over a block of tokens, with an optional cache."""
        return model.run_block(self.tree, self.config, tokens, positions, state, recurrence, cache, lengths=lengths,
                               active=active, writes=writes)

    def logit_lens(self, states: Array) -> Array:
        """`model.logit_lens`: raw states [..., B, T, E] (a trajectory) -> float32 logits [..., B, T, V]."""
        return model.logit_lens(self.tree, states, config=self.config)

    def unrolled_logits(self, tokens: Array, no_grad_steps: Array, grad_steps: Array, key: Array,
                        remat: bool = True) -> Array:
        """`training.unrolled_logits`: the training forward (truncated backprop through the last
        `grad_steps` of the recurrence), for a Flax training step."""
        return training.unrolled_logits(self.tree, self.config, tokens, no_grad_steps, grad_steps, key, remat)


def logical_axis_rules(config: HuginnConfig, mesh: Mesh,
                       rules: Mapping[str, str | tuple[str, ...] | None] | None = None) -> list[tuple[str, Any]]:
    """Flax logical-axis rules (a list of (logical axis, mesh axes)) under which
    `nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, result)` gives every parameter
    of `config` the sharding of `sharding.param_shardings(config, mesh, rules)` (default:
    `sharding.default_rules(mesh)`; the rules of activations, such as "batch", are left out).

    Two differences between the two are bridged here: `param_shardings` replicates a dimension
    its mesh axes do not divide (every array has the same size along one logical axis, so such an
    axis is left out of the rules), and where two axes of one array want the same mesh axis it
    gives the earlier dimension priority, while Flax gives the earlier rule priority (so the rules
    are ordered to agree within every array). A ValueError names the arrays when no order agrees.
    """
    rules = default_rules(mesh) if rules is None else rules
    param_shardings(config, mesh, rules)  # the same validation (unknown logical axes), the same error
    specs = jax.tree_util.tree_flatten_with_path(param_specs(config), is_leaf=is_spec)[0]
    sizes = {axis: size for _, spec in specs for axis, size in zip(spec.logical_axes, spec.shape)}
    mesh_axes = {axis: (names,) if isinstance(names, str) else tuple(names or ()) for axis, names in rules.items()}
    kept = {axis: names for axis, names in mesh_axes.items()
            if names and axis in sizes and sizes[axis] % math.prod(mesh.shape[n] for n in names) == 0}
    order = graphlib.TopologicalSorter({axis: set() for axis in kept})
    where: dict[tuple[str, str], str] = {}  # (earlier, later) axis pair -> an array that orders them so
    for path, spec in specs:
        axes = [a for a in spec.logical_axes if a in kept]
        for i, earlier in enumerate(axes):
            for later in axes[i + 1:]:
                if set(kept[earlier]) & set(kept[later]):
                    order.add(later, earlier)
                    where.setdefault((earlier, later), leaf_name(path))
    try:
        ranked = list(order.static_order())
    except graphlib.CycleError as err:
        cycle = err.args[1]  # [a, b, ..., a], consecutive axes ordered one way by some array
        pairs = list(itertools.pairwise(cycle))
        arrays = sorted({where[p] for p in pairs + [(b, a) for a, b in pairs] if p in where})
        raise ValueError(f"sharding rules {dict(rules)} put logical axes {sorted(set(cycle))} on the same mesh axes "
                         f"in opposite orders ({', '.join(arrays)}): no Flax rule order reproduces "
                         "sharding.param_shardings; use it directly") from None
    return [(axis, kept[axis][0] if len(kept[axis]) == 1 else kept[axis]) for axis in ranked]


__all__ = ["STATE_RNG", "Huginn", "logical_axis_rules"]
