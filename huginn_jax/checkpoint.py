"""Converted huginn-jax checkpoints: an Orbax parameter tree plus the files that describe it.

A converted checkpoint is a folder that describes itself:

    config.json            the model's Hugging Face config (what `HuginnConfig.from_hf_json` reads)
    huginn_jax.json        format name and version, stored dtype, where it came from
    params/                an Orbax PyTree checkpoint of our parameter tree (see `huginn_jax.params`)
    hf_buffers.safetensors non-parameter tensors of the source (`freqs_cis`), kept so that an export
                           reproduces them bit for bit (optional)
    tokenizer.json, ...    tokenizer, generation config and model code files of the source, copied

`restore` loads it in one call onto a device, or straight into the shardings of a device mesh:
Orbax reads each device's shard from storage, so no device gets a full host copy. `save` writes a
parameter tree (from training, say) in the same format; `write` is the shared, atomic writer,
which also streams: a `LazyArray` leaf is loaded only when it is written and dropped right after,
so a conversion never holds more than one tensor in memory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding
from orbax.checkpoint import future as ocp_future
from orbax.checkpoint import type_handlers

from huginn_jax.config import HuginnConfig
from huginn_jax.loading import CheckpointError
from huginn_jax.params import BLOCK_GROUPS, Params, abstract_params, logical_axes

FORMAT = "huginn-jax-orbax"
FORMAT_VERSION = 1
PARAMS_DIR = "params"
CONFIG_FILE = "config.json"
METADATA_FILE = "huginn_jax.json"
BUFFERS_FILE = "hf_buffers.safetensors"
CHUNK_BYTES = 64 * 2**20
"""Largest storage chunk: a sharded restore reads only the chunks of its shard."""

ShardingRules = Mapping[str, "str | tuple[str, ...] | None"]


# ---------------------------------------------------------------- writing

@dataclasses.dataclass(frozen=True)
class LazyArray:
    """A parameter that is produced only when it is written (`load()` returns the numpy array)."""

    shape: tuple[int, ...]
    dtype: np.dtype
    load: Callable[[], np.ndarray]

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def ndim(self) -> int:
        return len(self.shape)


class _StreamingNumpyHandler(type_handlers.NumpyHandler):
    """Writes `LazyArray` leaves one after the other, each in Orbax's numpy-array format.

    Orbax hands a type handler all of its leaves at once; the stock handler would write them
    concurrently (all in memory). This one loads, writes and drops them in turn, so the
    checkpoint on disk is identical to one of numpy arrays and restores with stock Orbax.
    """

    def __init__(self) -> None:
        super().__init__(deepcopy_host_arrays=False)
        if not hasattr(self, "_background_serialize"):
            raise RuntimeError("this orbax-checkpoint version has no NumpyHandler._background_serialize; "
                               "install orbax-checkpoint 0.11 or 0.12")

    async def serialize(self, values: Sequence[LazyArray], infos: Sequence[Any],
                        args: Sequence[Any] | None = None) -> list[Any]:
        args = args or [ocp.SaveArgs()] * len(values)

        async def write_in_turn() -> None:
            for value, info, arg in zip(values, infos, args):
                array = value.load()
                if array.shape != tuple(value.shape) or array.dtype != value.dtype:
                    raise ValueError(f"{info.name}: produced {array.dtype}{list(array.shape)}, "
                                     f"announced {value.dtype}{list(value.shape)}")
                await self._background_serialize([array], [info], [arg])
                del array

        return [ocp_future.CommitFutureAwaitingContractedSignals(write_in_turn(), name="huginn_stream")]


def write_params(directory: str | os.PathLike[str], params: Params) -> None:
    """Saves a parameter tree whose leaves are `jax.Array`, `np.ndarray` or (all) `LazyArray` with Orbax."""
    leaves = jax.tree.leaves(params)
    if any(isinstance(leaf, LazyArray) for leaf in leaves):
        if not all(isinstance(leaf, LazyArray) for leaf in leaves):
            raise ValueError("either every leaf is a LazyArray or none is")
        handler = ocp.PyTreeCheckpointHandler(type_handler_registry=type_handlers.create_type_handler_registry(
            (LazyArray, _StreamingNumpyHandler()), (jax.Array, type_handlers.ArrayHandler())))
    else:
        handler = ocp.PyTreeCheckpointHandler()
    save_args = jax.tree.map(lambda _: ocp.SaveArgs(chunk_byte_size=CHUNK_BYTES), params)
    with ocp.Checkpointer(handler) as checkpointer:
        checkpointer.save(os.path.abspath(os.fspath(directory)),
                          args=ocp.args.PyTreeSave(params, save_args=save_args))


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """Yields a fresh temporary folder next to `path` and renames it to `path` on success.

    On any error (or interruption) the temporary folder is removed, so nothing that looks like a
    finished output is ever left behind. An existing `path` is an error unless `overwrite`, in which
    case it is replaced only once the new folder is complete.
    """
    path = Path(path).absolute()
    check_output_path(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.incomplete-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        check_output_path(path, overwrite)
        if path.exists():
            old = path.parent / f".{path.name}.replaced-{uuid.uuid4().hex[:8]}"
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            tmp.rename(path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def check_output_path(path: str | os.PathLike[str], overwrite: bool) -> None:
    """Refuses an existing output unless `overwrite`."""
    if os.path.lexists(path) and not overwrite:
        raise FileExistsError(f"{os.fspath(path)} already exists; pass overwrite=True (--overwrite) to replace it")


def write_description(directory: str | os.PathLike[str], config: HuginnConfig, dtype: Any,
                      hf_config: Mapping[str, Any] | None = None, **metadata: Any) -> None:
    """Writes `config.json` (the source's, when given, else ours) and `huginn_jax.json`."""
    directory = Path(directory)
    hf = dict(hf_config) if hf_config is not None else config.to_hf_dict()
    (directory / CONFIG_FILE).write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    description = {"format": FORMAT, "format_version": FORMAT_VERSION, "dtype": jnp.dtype(dtype).name,
                   "params": PARAMS_DIR, **metadata}
    (directory / METADATA_FILE).write_text(json.dumps(description, indent=2) + "\n", encoding="utf-8")


def save(path: str | os.PathLike[str], config: HuginnConfig, params: Params, *, overwrite: bool = False,
         files: Sequence[str | os.PathLike[str]] = ()) -> None:
    """Writes `params` (e.g. after training) as a converted checkpoint, atomically.

    `files` are copied into the folder (tokenizer files, say), so that it describes itself and
    `python -m convert export` can turn it into a Hugging Face checkpoint.
    """
    dtypes = {jnp.dtype(leaf.dtype) for leaf in jax.tree.leaves(params)}
    if len(dtypes) != 1:
        raise ValueError(f"parameters must share one dtype, got {sorted(d.name for d in dtypes)}")
    check_tree(params, config, dtypes.pop(), "params")
    with atomic_directory(path, overwrite) as tmp:
        write_params(tmp / PARAMS_DIR, params)
        for file in files:
            shutil.copy2(file, tmp / os.path.basename(file))
        write_description(tmp, config, jax.tree.leaves(params)[0].dtype, created_by="huginn_jax.checkpoint.save",
                          files=sorted(os.path.basename(f) for f in files))


# ---------------------------------------------------------------- reading

def read_description(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The contents of `huginn_jax.json`, after checking that `path` is a converted checkpoint."""
    path = Path(path)
    problems = []
    if not path.is_dir():
        raise CheckpointError(os.fspath(path), ["is not a folder"])
    for name in (METADATA_FILE, CONFIG_FILE, PARAMS_DIR):
        if not (path / name).exists():
            problems.append(f"{name} is missing (not a converted huginn-jax checkpoint; see `python -m convert`)")
    if problems:
        raise CheckpointError(os.fspath(path), problems)
    description = json.loads((path / METADATA_FILE).read_text(encoding="utf-8"))
    if description.get("format") != FORMAT or description.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(os.fspath(path), [
            f"{METADATA_FILE} says format {description.get('format')!r} version "
            f"{description.get('format_version')!r}; this code reads {FORMAT!r} version {FORMAT_VERSION}"])
    return description


def read_config(path: str | os.PathLike[str]) -> HuginnConfig:
    return HuginnConfig.from_hf_json(Path(path) / CONFIG_FILE)


def is_checkpoint(path: str | os.PathLike[str]) -> bool:
    """Whether `path` holds a converted checkpoint (cheap: looks at its description only)."""
    try:
        read_description(path)
    except (CheckpointError, OSError, ValueError):
        return False
    return True


def stored_metadata(path: str | os.PathLike[str]) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Dotted leaf name -> (shape, dtype) of every array stored under `params/`."""
    with ocp.PyTreeCheckpointer() as checkpointer:
        tree = checkpointer.metadata(Path(path).absolute() / PARAMS_DIR).item_metadata.tree
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
    return {leaf_name(p): (tuple(m.shape), np.dtype(m.dtype)) for p, m in flat}


def leaf_name(path: Sequence[Any]) -> str:
    """'core.2.wqkv' for a jax key path."""
    return ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def check_tree(params: Params, config: HuginnConfig, dtype: Any, where: str) -> None:
    """Raises CheckpointError naming every leaf of `params` missing, extra or of the wrong shape."""
    problems = compare_shapes({leaf_name(p): (tuple(a.shape), np.dtype(a.dtype))
                               for p, a in jax.tree_util.tree_flatten_with_path(params)[0]}, config, dtype)
    if problems:
        raise CheckpointError(where, problems)


def compare_shapes(found: Mapping[str, tuple[tuple[int, ...], np.dtype]], config: HuginnConfig,
                   dtype: Any | None) -> list[str]:
    """Problems of a stored tree against `config` (and `dtype`, unless None)."""
    expected = {leaf_name(p): (tuple(a.shape), np.dtype(a.dtype))
                for p, a in jax.tree_util.tree_flatten_with_path(abstract_params(config, dtype or jnp.float32))[0]}
    problems = [f"{name}: missing (expected shape {list(shape)})" for name, (shape, _) in expected.items()
                if name not in found]
    problems += [f"{name}: unexpected array of shape {list(found[name][0])}" for name in found if name not in expected]
    for name, (shape, found_dtype) in found.items():
        if name in expected and shape != expected[name][0]:
            problems.append(f"{name}: shape {list(shape)} but the config needs {list(expected[name][0])}")
        elif name in expected and dtype is not None and found_dtype != np.dtype(dtype):
            problems.append(f"{name}: dtype {found_dtype} but the checkpoint says {np.dtype(dtype)}")
    return problems


def default_rules(mesh: Mesh) -> dict[str, str | None]:
    """Tensor parallelism over the mesh's last axis (vocab, heads, MLP); with two or more axes,
    the embedding dimension is also split over the first (FSDP-style)."""
    last = mesh.axis_names[-1]
    rules: dict[str, str | None] = {"vocab": last, "heads": last, "kv_heads": last, "mlp": last}
    if len(mesh.axis_names) > 1:
        rules.update(embed=mesh.axis_names[0], embed_concat=mesh.axis_names[0])
    return rules


def param_shardings(config: HuginnConfig, mesh: Mesh, rules: ShardingRules | None = None) -> Params:
    """A `NamedSharding` per parameter from its logical axes and `rules` (logical axis -> mesh axes).

    A dimension that its mesh axes do not divide evenly (55 heads over 4 devices, say), or whose
    mesh axes an earlier dimension already uses, is replicated instead.
    """
    rules = default_rules(mesh) if rules is None else rules
    unknown = sorted(set(rules) - {a for axes in jax.tree.leaves(logical_axes(config), is_leaf=_is_axes)
                                   for a in axes})
    if unknown:
        raise ValueError(f"sharding rules name unknown logical axes {unknown}")

    def spec(axes: tuple[str, ...], shape: jax.ShapeDtypeStruct) -> NamedSharding:
        used: set[str] = set()
        parts = []
        for axis, size in zip(axes, shape.shape):
            mesh_axes = rules.get(axis)
            names = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes or ())
            devices = int(np.prod([mesh.shape[n] for n in names])) if names else 1
            if names and not used & set(names) and size % devices == 0:
                parts.append(names[0] if len(names) == 1 else names)
                used.update(names)
            else:
                parts.append(None)
        return NamedSharding(mesh, PartitionSpec(*parts))

    return jax.tree.map(spec, logical_axes(config), abstract_params(config), is_leaf=_is_axes)


def _is_axes(x: Any) -> bool:
    return isinstance(x, tuple) and all(isinstance(a, str) for a in x)


def restore(path: str | os.PathLike[str], *, mesh: Mesh | None = None, rules: ShardingRules | None = None,
            sharding: Any = None, dtype: Any = None) -> tuple[HuginnConfig, Params]:
    """(config, parameters) of a converted checkpoint, placed where asked, in one call.

    - nothing: on the default device;
    - `sharding`: a `jax.Device`, one `jax.sharding.Sharding` for every array, or a tree of them
      shaped like the parameters;
    - `mesh` (with optional `rules`, logical axis -> mesh axes; `default_rules` otherwise): each
      array sharded by its logical axes (`param_shardings`).
    Each device reads only its own shard. `dtype` casts while reading (default: the stored dtype).
    """
    if mesh is not None and sharding is not None:
        raise ValueError("pass either mesh (and rules) or sharding, not both")
    description = read_description(path)
    config = read_config(path)
    dtype = jnp.dtype(dtype or description["dtype"])
    problems = compare_shapes(stored_metadata(path), config, None)
    if problems:
        raise CheckpointError(os.fspath(path), problems)
    abstract = abstract_params(config, dtype)
    if mesh is not None:
        shardings = param_shardings(config, mesh, rules)
    elif sharding is None or isinstance(sharding, (jax.Device, jax.sharding.Sharding)):
        one = sharding or jax.devices()[0]
        one = SingleDeviceSharding(one) if isinstance(one, jax.Device) else one
        shardings = jax.tree.map(lambda _: one, abstract)
    else:
        shardings = sharding
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    with ocp.PyTreeCheckpointer() as checkpointer:
        params = checkpointer.restore(
            Path(path).absolute() / PARAMS_DIR,
            args=ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target)))
    return config, params


def restore_host(path: str | os.PathLike[str], select: Params) -> Params:
    """The numpy arrays of a part of the parameter tree, in their stored dtype.

    `select` is shaped like the parameters, with None for what to skip, e.g.
    `{"core": [None, {...names...}]}`; used to stream a checkpoint one layer at a time.
    """
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), select)
    with ocp.PyTreeCheckpointer() as checkpointer:
        return checkpointer.restore(Path(path).absolute() / PARAMS_DIR, args=ocp.args.PyTreeRestore(
            item=select, restore_args=restore_args, partial_restore=True))


def layer_selection(config: HuginnConfig, group: str | None, index: int = 0) -> Params:
    """A `restore_host` selection of one block (group, index), or of the non-block arrays (None)."""
    names = abstract_params(config)
    if group is None:
        return {k: 0 for k, v in names.items() if k not in BLOCK_GROUPS}
    layers: list[Any] = [None] * len(names[group])
    layers[index] = {k: 0 for k in names[group][index]}
    return {group: layers}
