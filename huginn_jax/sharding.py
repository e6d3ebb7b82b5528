"""Many devices: one set of logical-axis rules for the parameters, the KV cache and the activations.

Every array dimension has a logical name (the parameters' come from `ParamSpec.logical_axes`);
`default_rules(mesh)` maps names to the axes of a device mesh, as jax-llm-examples'
`ShardingRules` does:

    logical axis       where                                              mesh axis
    batch              prompts, keys, activations, cache rows             data
    heads, kv_heads    wqkv, wo, q/k biases; queries, keys, values;       model
                       the cache's heads
    mlp                w_gate_up, w_down; the MLP's hidden activations    model
    vocab              wte (and lm_head)                                  model
    embed, embed_concat, qkv, head_dim, gate_up                           (replicated)

So a mesh `(data, model)` runs `data` groups of rows side by side, each over `model` devices that
split every layer Megatron-style (column-parallel qkv and gate/up, row-parallel wo and down, one
all-reduce after each), and holds each weight once per data group: what decoding wants, where
gathering weights at every recurrence step (FSDP) would cost more than it saves.

Meshes. `make_mesh((data, model))` builds one (axis names "data" and "model"); any mesh whose
axes are named so works, a mesh with other names uses its first axis for data and its last for
the model (one axis: model). The model's code relies on the compiler to place everything between
a few constraints, so meshes are used with `Auto` axes (`resolve_mesh` converts `Explicit` ones,
the default of `jax.make_mesh`). Entry points (`forward`, every sampler, `checkpoint.restore`)
take `mesh=`; without it they use the mesh set with `jax.set_mesh(mesh)` (JAX 0.10's successor of
`jax.sharding.use_mesh`), and without either they run on one device exactly as before.

Inside jitted code, `constrain(x, axes)` pins an activation to its logical axes under the mesh
in context (`jax.sharding.get_abstract_mesh()`, which entry points set with `use(mesh)`), and is
a no-op without one: the single-device programs are unchanged. The model constrains the
embeddings, the state at every recurrence step, queries, keys and values, the MLP's hidden
activations and every block's output; the cache is created in its shardings (`cache_shardings`).

Heads. Huginn-0125 has 55 heads (and 55 kv heads), which no power of two divides. `pad_heads`
appends zero heads (zero q/k/v columns and biases, zero rows of wo): a zero head's query, key and
value are 0, its attention output is a uniform average of zero values, 0, and its zero rows of wo
add nothing: the same function, exactly, whose heads a model axis of 2, 4 or 8 divides (56). The
padding is a config field (`HuginnConfig.kv_head_padding`, never written to a checkpoint) so that
parameter shapes, the cache and `check_params` agree; `shard_params` pads as far as the mesh
needs and places the parameters; `checkpoint.restore(mesh=...)` does it at load time. The other
exact option, splitting head_dim (96 = 8 x 12) over the model axis, sums every attention score
over devices, an all-reduce of the scores (batch x heads x queries x keys) in every layer, where
zero heads cost 1/55 more compute and cache and no communication beyond the usual two
all-reduces per block. `python -m experiments.head_padding` compiles one core step both ways (and
replicated) for the Huginn-0125 shape and counts the bytes each moves between devices.

Multi-host runs (one process per host) are process-level data parallel: see
`huginn_jax.distributed`; each process builds its mesh from its own devices.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from huginn_jax.config import HuginnConfig
from huginn_jax.params import Params, abstract_params, leaf_name, logical_axes

DATA = "data"
MODEL = "model"
ShardingRules = Mapping[str, "str | tuple[str, ...] | None"]
"""Logical axis -> mesh axis name(s), or None for replicated."""

ACTIVATION_AXES = ("batch",)
"""Logical axes of activations and the cache that no parameter has (the others reuse the
parameters' names: heads, kv_heads, mlp, vocab)."""

HEAD_AXES = ("heads", "kv_heads")


# ---------------------------------------------------------------- meshes

def make_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, model) mesh of `shape` over the first data x model of `devices` (default: all
    devices; `jax.local_devices()` for one process of a multi-host run), with Auto axes."""
    shape = tuple(shape)
    if len(shape) != 2 or not all(isinstance(n, (int, np.integer)) and n >= 1 for n in shape):
        raise ValueError(f"a mesh shape is (data, model) with two positive integers, got {shape}")
    devices = list(jax.devices() if devices is None else devices)
    wanted = math.prod(shape)
    if wanted > len(devices):
        raise ValueError(f"a mesh of {shape[0]} x {shape[1]} needs {wanted} devices, but {len(devices)} are "
                         f"available ({devices[0].platform}); choose data x model <= {len(devices)}")
    return jax.make_mesh(shape, (DATA, MODEL), devices=devices[:wanted], axis_types=(AxisType.Auto,) * 2)


def parse_mesh(text: str, flag: str = "--mesh") -> tuple[int, int] | None:
    """(data, model) from "2,4" (a command line's `--mesh`); None for an empty value."""
    if text is None or not str(text).strip():
        return None
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) != 2 or not all(p.isdigit() and int(p) >= 1 for p in parts):
        raise ValueError(f"{flag}={text!r} must be DATA,MODEL: two positive integers, e.g. {flag}=2,4 (2 groups of "
                         "rows, each over 4 devices that split the heads, MLP and vocabulary)")
    return int(parts[0]), int(parts[1])


def resolve_mesh(mesh: Mesh | None = None) -> Mesh | None:
    """The mesh to run on: `mesh`, else the one set with `jax.set_mesh`, else None (one device);
    with Auto axes."""
    if mesh is None:
        try:
            mesh = jax.sharding.get_mesh()
        except ValueError:  # inside jit/grad: the caller's trace already places the arrays
            return None
        if mesh.empty:
            return None
    if not isinstance(mesh, Mesh):
        raise ValueError(f"mesh must be a jax.sharding.Mesh (sharding.make_mesh), got {type(mesh).__name__}")
    if all(t == AxisType.Auto for t in mesh.axis_types):
        return mesh
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))


_RULES: contextvars.ContextVar[ShardingRules | None] = contextvars.ContextVar("huginn_sharding_rules", default=None)


@contextlib.contextmanager
def use(mesh: Mesh | None, rules: ShardingRules | None = None) -> Iterator[None]:
    """Runs the body under `mesh` (jitted code then traces with `constrain` active); nothing
    without a mesh. `rules` (default: `default_rules(mesh)`) are for experiments that compare
    rule sets: JAX retraces a jitted function for a new mesh but not for new rules, so trace a
    fresh function for each set (every entry point of the project uses the default rules)."""
    if mesh is None:
        yield
        return
    token = _RULES.set(rules)
    try:
        with jax.set_mesh(mesh):
            yield
    finally:
        _RULES.reset(token)


def on_mesh(entry: Callable[..., Any]) -> Callable[..., Any]:
    """Decorates an entry point that takes `mesh=`: the mesh (or the one set with `jax.set_mesh`)
    is resolved to Auto axes and the whole call runs under it, so that arrays made inside, and
    jax arrays passed in that live on another version of the mesh (its Explicit one, say), all
    belong to the mesh the compiled programs use. Without a mesh the call is unchanged."""

    @functools.wraps(entry)
    def run(*args: Any, mesh: Mesh | None = None, **kwargs: Any) -> Any:
        mesh = resolve_mesh(mesh)
        if mesh is None:
            return entry(*args, mesh=None, **kwargs)
        with use(mesh):
            args, kwargs = jax.tree.map(lambda leaf: _adopt(leaf, mesh), (args, kwargs))
            return entry(*args, mesh=mesh, **kwargs)

    return run


def _adopt(leaf: Any, mesh: Mesh) -> Any:
    """A jax array sharded over another mesh of the same devices, moved onto `mesh` (same spec)."""
    placed = getattr(leaf, "sharding", None)
    if isinstance(leaf, jax.Array) and isinstance(placed, NamedSharding) and placed.mesh != mesh:
        if tuple(placed.mesh.axis_names) == tuple(mesh.axis_names) and placed.mesh.devices.shape == mesh.devices.shape:
            return jax.device_put(leaf, NamedSharding(mesh, placed.spec))
        return jax.device_put(leaf, NamedSharding(mesh, PartitionSpec()))
    return leaf


# ---------------------------------------------------------------- rules

def _roles(mesh: Any) -> tuple[str | None, str | None]:
    """(data axis, model axis) of a mesh, by name ("data", "model") or else by position."""
    names = tuple(mesh.axis_names)
    if DATA in names or MODEL in names:
        return (DATA if DATA in names else None), (MODEL if MODEL in names else None)
    if not names:
        return None, None
    return (names[0] if len(names) > 1 else None), names[-1]


def default_rules(mesh: Any) -> dict[str, str | None]:
    """The rules of the table above for `mesh` (a Mesh or an AbstractMesh): batch over its data
    axis; heads, kv heads, MLP and vocabulary over its model axis; everything else replicated."""
    data, model = _roles(mesh)
    rules: dict[str, str | None] = {"batch": data}
    rules.update({axis: model for axis in ("vocab", "heads", "kv_heads", "mlp")})
    return {axis: names for axis, names in rules.items() if names is not None}


def _mesh_axes(rules: ShardingRules, axis: str | None) -> tuple[str, ...]:
    names = rules.get(axis) if axis is not None else None
    return (names,) if isinstance(names, str) else tuple(names or ())


def axis_size(mesh: Any, rules: ShardingRules, axis: str) -> int:
    """Devices that logical `axis` is split over (1 when the rules replicate it)."""
    return math.prod(mesh.shape[n] for n in _mesh_axes(rules, axis))


def logical_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Any, rules: ShardingRules) -> PartitionSpec:
    """The PartitionSpec of an array with logical `axes` and `shape`: each dimension on its mesh
    axes, unless they do not divide it or an earlier dimension already uses them (replicated)."""
    used: set[str] = set()
    parts: list[Any] = []
    for axis, size in zip(axes, shape):
        names = tuple(n for n in _mesh_axes(rules, axis) if n in mesh.shape)
        devices = math.prod(mesh.shape[n] for n in names) if names else 1
        if names and not used & set(names) and size % devices == 0:
            parts.append(names[0] if len(names) == 1 else names)
            used.update(names)
        else:
            parts.append(None)
    return PartitionSpec(*parts)


def known_axes(config: HuginnConfig) -> set[str]:
    """Every logical axis the rules may name: the parameters' and `ACTIVATION_AXES`."""
    return {a for axes in jax.tree.leaves(logical_axes(config), is_leaf=_is_axes) for a in axes} | set(ACTIVATION_AXES)


def check_rules(config: HuginnConfig, rules: ShardingRules) -> None:
    unknown = sorted(set(rules) - known_axes(config))
    if unknown:
        raise ValueError(f"sharding rules name unknown logical axes {unknown}; known: {sorted(known_axes(config))}")


def _is_axes(x: Any) -> bool:
    return isinstance(x, tuple) and all(isinstance(a, str) for a in x)


# ---------------------------------------------------------------- parameters

def param_shardings(config: HuginnConfig, mesh: Mesh, rules: ShardingRules | None = None) -> Params:
    """A `NamedSharding` per parameter from its logical axes and `rules` (default:
    `default_rules(mesh)`). A dimension that its mesh axes do not divide evenly (55 heads over 4
    devices, say), or whose mesh axes an earlier dimension already uses, is replicated:
    `shard_params` pads the heads first and refuses the rest."""
    rules = default_rules(mesh) if rules is None else rules
    check_rules(config, rules)
    return jax.tree.map(lambda axes, a: NamedSharding(mesh, logical_spec(axes, a.shape, mesh, rules)),
                        logical_axes(config), abstract_params(config), is_leaf=_is_axes)


def head_padding(config: HuginnConfig, mesh: Any, rules: ShardingRules | None = None) -> int:
    """The fewest zero kv heads after which the mesh axes of the heads divide the real heads and
    the zero ones (0 when they divide the real ones)."""
    rules = default_rules(mesh) if rules is None else rules
    padding = 0
    while not _heads_divide(config.replace(kv_head_padding=padding), mesh, rules):
        padding += 1
    return padding


def _heads_divide(config: HuginnConfig, mesh: Any, rules: ShardingRules) -> bool:
    return (config.stored_kv_heads % axis_size(mesh, rules, "kv_heads") == 0
            and config.stored_heads % axis_size(mesh, rules, "heads") == 0)


def pad_heads(params: Params, config: HuginnConfig, kv_head_padding: int) -> tuple[HuginnConfig, Params]:
    """(config, params) with `kv_head_padding` zero kv heads after the real ones (each with its
    group of zero query heads: zero q/k/v columns and biases, zero rows of wo): the same function.

    `params` may already be padded (`config.kv_head_padding`); padding is added or removed at the
    end of every head axis, and heads that are removed must be zero (a ValueError otherwise).
    Host (numpy) arrays are padded on the host, device arrays where they lie.
    """
    if kv_head_padding < 0:
        raise ValueError(f"kv_head_padding must be >= 0, got {kv_head_padding}")
    target = config.replace(kv_head_padding=kv_head_padding)
    if target == config:
        return config, params
    axes = logical_axes(target)
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    wanted = jax.tree.leaves(abstract_params(target))
    names = jax.tree.leaves(axes, is_leaf=_is_axes)
    if len(flat) != len(wanted):
        raise ValueError(f"params do not match the config: {len(flat)} arrays, the config has {len(wanted)}")
    resized = [_resize(leaf_name(path), leaf, spec.shape, leaf_axes)
               for (path, leaf), spec, leaf_axes in zip(flat, wanted, names)]
    return target, jax.tree.unflatten(treedef, resized)


def unpad_heads(params: Params, config: HuginnConfig) -> tuple[HuginnConfig, Params]:
    """(config, params) without zero heads: what `checkpoint.save` and an export take."""
    return pad_heads(params, config, 0)


def _resize(name: str, leaf: Any, shape: tuple[int, ...], axes: tuple[str, ...]) -> Any:
    """`leaf` cut or zero-padded at the end of its head axes to `shape`."""
    if tuple(leaf.shape) == tuple(shape):
        return leaf
    xp = np if isinstance(leaf, np.ndarray) else jnp
    for dim, (have, want, axis) in enumerate(zip(leaf.shape, shape, axes)):
        if have == want:
            continue
        if axis not in HEAD_AXES:
            raise ValueError(f"{name}: shape {list(leaf.shape)} but the config needs {list(shape)}")
        index = (slice(None),) * dim
        if have > want:
            dropped = leaf[index + (slice(want, None),)]
            if bool(xp.any(dropped != 0)):
                raise ValueError(f"{name}: the heads beyond {want} along its {axis} axis are not zero, so they are "
                                 "no padding: these parameters belong to a model with more heads")
            leaf = leaf[index + (slice(0, want),)]
        else:
            widths = [(0, 0)] * leaf.ndim
            widths[dim] = (0, want - have)
            leaf = xp.pad(leaf, widths)
    return leaf


def check_divides(config: HuginnConfig, mesh: Mesh, rules: ShardingRules) -> None:
    """A ValueError naming the first parameter dimension that its mesh axes do not divide (what
    `param_shardings` would quietly replicate), and what to change."""
    for path, axes in jax.tree_util.tree_flatten_with_path(logical_axes(config), is_leaf=_is_axes)[0]:
        shape = _leaf_at(abstract_params(config), path).shape
        for axis, size in zip(axes, shape):
            devices = axis_size(mesh, rules, axis)
            if size % devices:
                mesh_axes = "x".join(_mesh_axes(rules, axis))
                hint = ("pad the heads first (sharding.shard_params)" if axis in HEAD_AXES
                        else f"choose a mesh whose {mesh_axes} axis divides {size}")
                raise ValueError(f"the mesh's {mesh_axes} axis of {devices} devices does not divide {axis}={size} of "
                                 f"{leaf_name(path)}: {hint}")


def _leaf_at(tree: Any, path: Sequence[Any]) -> Any:
    for key in path:
        tree = tree[getattr(key, "key", getattr(key, "idx", key))]
    return tree


def shard_params(params: Params, config: HuginnConfig, mesh: Mesh,
                 rules: ShardingRules | None = None) -> tuple[HuginnConfig, Params]:
    """(config, params) ready for `mesh`: heads padded as far as the mesh needs (`pad_heads`; the
    returned config says how far), every array placed by `param_shardings`. A dimension other
    than the heads that its mesh axes do not divide is a ValueError naming it. Arrays already in
    place are not copied: call it once and pass its result to every sampler call."""
    mesh = resolve_mesh(mesh)
    rules = default_rules(mesh) if rules is None else rules
    check_rules(config, rules)
    # keep a padding that already divides (one made for a larger model axis, say), else pad afresh
    padding = config.kv_head_padding if _heads_divide(config, mesh, rules) else head_padding(config, mesh, rules)
    if padding != config.kv_head_padding:
        # device arrays move onto the mesh first (heads replicated) and are padded there, host arrays on the host
        where = param_shardings(config, mesh, rules)
        params = jax.tree.map(lambda a, s: a if isinstance(a, np.ndarray) else jax.device_put(a, s), params, where)
        with jax.set_mesh(mesh):
            config, params = pad_heads(params, config, padding)
    check_divides(config, mesh, rules)
    return config, jax.device_put(params, param_shardings(config, mesh, rules))


# ---------------------------------------------------------------- batches, caches, other trees

def check_batch(batch: int, mesh: Mesh | None, what: str = "prompts") -> None:
    """A ValueError unless the mesh's data axis divides `batch`, saying what to change."""
    if mesh is None:
        return
    data = axis_size(mesh, default_rules(mesh), "batch")
    if batch % data:
        model = axis_size(mesh, default_rules(mesh), "heads")
        raise ValueError(f"a batch of {batch} {what} does not split over the mesh's data axis of {data}: pass a "
                         f"multiple of {data} {what}, or a mesh whose data axis divides {batch} (e.g. --mesh=1,"
                         f"{data * model} puts all {data * model} devices on the model axis)")


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Rows over the data axis, the other `ndim - 1` dimensions replicated."""
    data, _ = _roles(mesh)
    return NamedSharding(mesh, PartitionSpec(data, *([None] * (ndim - 1))))


def put_batch(tree: Any, mesh: Mesh | None) -> Any:
    """Every array of `tree` (leading axis: rows) split by rows over the data axis; as it is without a mesh."""
    if mesh is None:
        return tree
    return jax.tree.map(lambda a: jax.device_put(a, batch_sharding(mesh, np.ndim(a))), tree)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def cache_shardings(cache: Any, mesh: Mesh, rules: ShardingRules | None = None) -> Any:
    """Shardings for a `KVCache` (or its `jax.eval_shape`), leaf for leaf: keys and values
    [slots, batch, kv_heads, capacity, head_dim] by rows and heads, `filled` [slots, batch,
    capacity] and the lookup keys [batch] by rows, the strategy code replicated."""
    rules = default_rules(mesh) if rules is None else rules

    def spec(axes: tuple[str | None, ...], array: Any) -> NamedSharding | None:
        return None if array is None else NamedSharding(mesh, logical_spec(axes, array.shape, mesh, rules))

    kv = (None, "batch", "kv_heads", None, "head_dim")
    return cache.replace(k=spec(kv, cache.k), v=spec(kv, cache.v), filled=spec((None, "batch", None), cache.filled),
                         rule=spec((), cache.rule), lookup_keys=spec(("batch",), cache.lookup_keys))


def shardings_like_params(tree: Any, config: HuginnConfig, mesh: Mesh, rules: ShardingRules | None = None) -> Any:
    """Shardings for a tree that holds parameter-shaped subtrees (a training state: params, Adam's
    moments): a leaf whose key path ends with a parameter's path and has its shape gets that
    parameter's sharding, every other leaf (step counts) is replicated."""
    shardings = {tuple(_key(k) for k in path): (s, a.shape) for (path, s), a in zip(
        jax.tree_util.tree_flatten_with_path(param_shardings(config, mesh, rules))[0],
        jax.tree.leaves(abstract_params(config)))}

    def pick(path: Sequence[Any], leaf: Any) -> NamedSharding:
        keys = tuple(_key(k) for k in path)
        for start in range(len(keys)):
            found = shardings.get(keys[start:])
            if found is not None and tuple(found[1]) == tuple(np.shape(leaf)):
                return found[0]
        return replicated(mesh)

    return jax.tree_util.tree_map_with_path(pick, tree)


def _key(k: Any) -> Any:
    return getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))


# ---------------------------------------------------------------- inside jitted code

def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """x pinned to its logical `axes` (one per dimension) under the mesh in context; x itself
    without one. A dimension its mesh axes do not divide stays unconstrained (replicated)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    if len(axes) != x.ndim:
        raise ValueError(f"{len(axes)} logical axes {tuple(axes)} for an array of shape {x.shape}")
    rules = _RULES.get()
    return jax.lax.with_sharding_constraint(x, logical_spec(axes, x.shape, mesh, rules or default_rules(mesh)))


__all__ = [
    "ACTIVATION_AXES", "DATA", "MODEL", "ShardingRules", "batch_sharding", "cache_shardings", "check_batch",
    "check_divides", "constrain", "default_rules", "head_padding", "logical_spec", "make_mesh", "on_mesh", "pad_heads",
    "param_shardings", "parse_mesh", "put_batch", "replicated", "resolve_mesh", "shard_params",
    "shardings_like_params", "unpad_heads", "use",
]
