"""One description of every parameter: shape, dtype, logical axes and initializer.

`param_specs` is the single source that initialization (`init_params`), checkpoint loading and
export (`huginn_jax.hf_layout`), and sharding over a device mesh (`logical_axes`) all read, so that
none of them repeats the model's shapes.

Layout (weights are [in, out] so that activations multiply from the left; each block group is a
list with one dict per layer, so that a layer's weights are separate buffers: slicing a stacked
array inside the recurrence loop would copy the weights at every step):

    wte      [vocab, embed]                  token embedding, also the head when tied
    prelude / core / coda: lists of blocks, each a dict of
        norm_1..norm_4 [embed]               sandwich norms
        wqkv [embed, kv_heads, group + 2, head_dim]   per kv head: its `group` query heads, its key,
                                             its value (one matrix product for all three; query
                                             head h uses kv head h // group)
        wo [heads, head_dim, embed]
        q_bias [heads, head_dim]  k_bias [kv_heads, head_dim]   (only with qk_bias)
        w_gate_up [embed, 2, mlp]            gate and up projections of the gated MLP, fused
        w_down [mlp, embed]
    adapter  [2 * embed, embed]              input injection on concat([state, embeds])
    ln_f     [embed]                         final norm, used before and after the coda
    lm_head  [vocab, embed]                  only when embeddings are not tied
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

from huginn_jax.config import HuginnConfig

Initializer = Callable[[jax.Array, tuple[int, ...], Any], jax.Array]
Params = dict[str, Any]

BLOCK_GROUPS = ("prelude", "core", "coda")


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """What one parameter array is: its shape, dtype, the logical name of each axis, how to init it."""

    shape: tuple[int, ...]
    dtype: Any
    logical_axes: tuple[str, ...]
    initializer: Initializer

    def __post_init__(self) -> None:
        if len(self.shape) != len(self.logical_axes):
            raise ValueError(f"shape {self.shape} and logical axes {self.logical_axes} differ in rank")


def truncated_normal(std: float) -> Initializer:
    """Normal with the given std truncated at +-3 std, the reference's `_normal_`."""

    def init(key: jax.Array, shape: tuple[int, ...], dtype: Any) -> jax.Array:
        return (jax.random.truncated_normal(key, -3.0, 3.0, shape, jnp.float32) * std).astype(dtype)

    return init


def constant(value: float) -> Initializer:
    def init(key: jax.Array, shape: tuple[int, ...], dtype: Any) -> jax.Array:
        del key
        return jnp.full(shape, value, dtype)

    return init


def block_specs(config: HuginnConfig, dtype: Any) -> dict[str, ParamSpec]:
    """The parameters of one sandwich block."""
    # the stored heads: with `kv_head_padding`, zero heads follow the real ones (huginn_jax.sharding)
    e, h, kv, d, m = (config.n_embd, config.stored_heads, config.stored_kv_heads, config.head_dim,
                      config.intermediate_size)
    std, out_std = config.init_std, config.out_proj_std
    group = h // kv

    def spec(shape: tuple[int, ...], axes: tuple[str, ...], init: Initializer) -> ParamSpec:
        return ParamSpec(shape, dtype, axes, init)

    specs = {f"norm_{i}": spec((e,), ("embed",), constant(1.0)) for i in range(1, 5)}
    specs.update(
        wqkv=spec((e, kv, group + 2, d), ("embed", "kv_heads", "qkv", "head_dim"), truncated_normal(std)),
        wo=spec((h, d, e), ("heads", "head_dim", "embed"), truncated_normal(out_std)),
        # The reference initialises the two halves of its fused fc differently (gate: std, up: out_proj).
        w_gate_up=spec((e, 2, m), ("embed", "gate_up", "mlp"), per_slice(1, (std, out_std))),
        w_down=spec((m, e), ("mlp", "embed"), truncated_normal(out_std)),
    )
    if config.qk_bias:
        specs.update(
            q_bias=spec((h, d), ("heads", "head_dim"), constant(0.0)),
            k_bias=spec((kv, d), ("kv_heads", "head_dim"), constant(0.0)),
        )
    return specs


def per_slice(axis: int, stds: tuple[float, ...]) -> Initializer:
    """Truncated normal with a different std for each index along `axis`."""

    def init(key: jax.Array, shape: tuple[int, ...], dtype: Any) -> jax.Array:
        scale = jnp.asarray(stds, jnp.float32).reshape([-1 if i == axis else 1 for i in range(len(shape))])
        return (jax.random.truncated_normal(key, -3.0, 3.0, shape, jnp.float32) * scale).astype(dtype)

    return init


def param_specs(config: HuginnConfig, dtype: Any = jnp.float32) -> Params:
    """The full parameter tree of `config`, as `ParamSpec` leaves."""
    dtype = jnp.dtype(dtype)
    if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
        raise ValueError(f"parameters must be float32 or bfloat16, not {dtype}")
    e, v, std = config.n_embd, config.vocab_size, config.init_std
    specs: Params = {
        "wte": ParamSpec((v, e), dtype, ("vocab", "embed"), truncated_normal(std)),
        "prelude": [block_specs(config, dtype) for _ in range(config.n_layers_in_prelude)],
        "adapter": ParamSpec((2 * e, e), dtype, ("embed_concat", "embed"), truncated_normal(std)),
        "core": [block_specs(config, dtype) for _ in range(config.n_layers_in_recurrent_block)],
        "coda": [block_specs(config, dtype) for _ in range(config.n_layers_in_coda)],
        "ln_f": ParamSpec((e,), dtype, ("embed",), constant(1.0)),
    }
    if not config.tie_embeddings:
        specs["lm_head"] = ParamSpec((v, e), dtype, ("vocab", "embed"), truncated_normal(std))
    return specs


def is_spec(x: Any) -> bool:
    return isinstance(x, ParamSpec)


def init_params(config: HuginnConfig, key: jax.Array, dtype: Any = jnp.float32) -> Params:
    """Random parameters with the reference's 'takase' initialization, one PRNG key per array."""
    specs = param_specs(config, dtype)
    leaves, treedef = jax.tree.flatten(specs, is_leaf=is_spec)
    keys = jax.random.split(key, len(leaves))

    @jax.jit
    def make(keys: jax.Array) -> list[jax.Array]:
        return [s.initializer(k, s.shape, s.dtype) for s, k in zip(leaves, keys)]

    return jax.tree.unflatten(treedef, make(keys))


def abstract_params(config: HuginnConfig, dtype: Any = jnp.float32) -> Params:
    """`jax.ShapeDtypeStruct` leaves, for shape checks and ahead-of-time lowering."""
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), param_specs(config, dtype),
                        is_leaf=is_spec)


def logical_axes(config: HuginnConfig) -> Params:
    """The logical axis names of every parameter, the input to a sharding rule."""
    return jax.tree.map(lambda s: s.logical_axes, param_specs(config), is_leaf=is_spec)


def count_params(config: HuginnConfig) -> int:
    """Number of scalars in the parameter tree (the tied head counted once)."""
    return sum(math.prod(s.shape) for s in jax.tree.leaves(param_specs(config), is_leaf=is_spec))


class ParamsError(ValueError):
    """A parameter tree that does not match its config, with every mismatch named."""


def leaf_name(path: tuple[Any, ...]) -> str:
    """'core.2.wqkv' for a jax key path."""
    return ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def tree_problems(found: dict[str, tuple[tuple[int, ...], Any]], config: HuginnConfig) -> list[str]:
    """Every way in which leaves {dotted name: (shape, dtype)} fail to be `config`'s parameters:
    missing, unexpected, mis-shaped leaves, and dtypes other than one shared float32 or bfloat16."""
    expected = {leaf_name(p): s.shape for p, s in
                jax.tree_util.tree_flatten_with_path(param_specs(config), is_leaf=is_spec)[0]}
    problems = [f"{name}: missing (expected shape {list(shape)})" for name, shape in expected.items()
                if name not in found]
    problems += [f"{name}: not a parameter of this config (shape {list(found[name][0])})"
                 for name in found if name not in expected]
    problems += [f"{name}: shape {list(shape)} but the config needs {list(expected[name])}"
                 for name, (shape, _) in found.items() if name in expected and tuple(shape) != expected[name]]
    dtypes = {}
    for name, (_, dtype) in found.items():
        dtypes.setdefault(jnp.dtype(dtype).name, []).append(name)
    allowed = {"float32", "bfloat16"}
    problems += [f"{names[0]}{f' and {len(names) - 1} more' if len(names) > 1 else ''}: dtype {dtype}; parameters "
                 "must be float32 or bfloat16" for dtype, names in dtypes.items() if dtype not in allowed]
    if len(dtypes) > 1 and set(dtypes) <= allowed:
        counts = ", ".join(f"{len(names)} {dtype} (e.g. {names[0]})" for dtype, names in sorted(dtypes.items()))
        problems.append(f"parameters must share one dtype, got {counts}")
    return problems


@functools.lru_cache(maxsize=64)
def _checked(signature: tuple, config: HuginnConfig) -> tuple[str, ...]:
    return tuple(tree_problems(dict(signature), config))


def check_params(params: Any, config: HuginnConfig) -> None:
    """Raises ParamsError naming every mismatch between a parameter tree and `config` (shapes and
    dtypes only: cheap, and remembered per tree signature)."""
    if not isinstance(params, dict):
        raise ParamsError(f"params must be the parameter dict of init_params or a checkpoint, "
                          f"got {type(params).__name__}")
    try:
        leaves = jax.tree_util.tree_flatten_with_path(params)[0]
        signature = tuple((leaf_name(p), (tuple(a.shape), jnp.dtype(a.dtype).name)) for p, a in leaves)
    except (AttributeError, TypeError) as err:
        raise ParamsError(f"params must hold arrays: {err}") from None
    problems = _checked(signature, config)
    if problems:
        raise ParamsError(f"params do not match the config ({len(problems)} problem(s)):\n  - "
                          + "\n  - ".join(problems))
