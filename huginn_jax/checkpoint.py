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

Guarantees (README, "Guarantees"): a folder appears only complete (written next to its final place
and renamed); an existing one is replaced only by a complete new one; SIGINT or SIGTERM during a
write leaves nothing of it (`huginn_jax.interruption`); every array's checksum
(`huginn_jax.checksums`) is recorded in `huginn_jax.json` as it is written and verified by
`restore`; a damaged folder is one `CheckpointError` that names what is wrong.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import threading
import uuid
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh, SingleDeviceSharding
from orbax.checkpoint import future as ocp_future
from orbax.checkpoint import type_handlers

from huginn_jax import checksums as checksums_lib
from huginn_jax import sharding as sharding_lib
from huginn_jax.config import ConfigError, HuginnConfig
from huginn_jax.interruption import signals_held, stop_on_signal
from huginn_jax.loading import CheckpointError
from huginn_jax.params import BLOCK_GROUPS, Params, abstract_params, leaf_name, tree_problems
from huginn_jax.sharding import ShardingRules, default_rules, param_shardings  # noqa: F401 (re-exported)

FORMAT = "huginn-jax-orbax"
FORMAT_VERSION = 1
PARAMS_DIR = "params"
CONFIG_FILE = "config.json"
METADATA_FILE = "huginn_jax.json"
BUFFERS_FILE = "hf_buffers.safetensors"
CHUNK_BYTES = 64 * 2**20
"""Largest storage chunk: a sharded restore reads only the chunks of its shard."""


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


class _WriteStopped(Exception):
    """Raised in Orbax's writer thread to end a write that a signal asked to stop."""


def write_params(directory: str | os.PathLike[str], params: Params) -> dict[str, int]:
    """Saves a parameter tree whose leaves are `jax.Array`, `np.ndarray` or (all) `LazyArray` with
    Orbax, and returns the checksum of every array as written (dotted leaf name -> int).

    A SIGINT or SIGTERM stops the write at the next `LazyArray` and is raised only once Orbax's
    writer threads have ended (`huginn_jax.interruption.signals_held`). A failed write to storage
    (a full disk, say) is an OSError naming `directory`. Orbax's own log lines are not shown.
    """
    leaves = jax.tree.leaves(params)
    recorded: dict[str, int] = {}
    stop = threading.Event()
    if any(isinstance(leaf, LazyArray) for leaf in leaves):
        if not all(isinstance(leaf, LazyArray) for leaf in leaves):
            raise ValueError("either every leaf is a LazyArray or none is")
        params = jax.tree_util.tree_map_with_path(
            lambda path, leaf: _recording(leaf, leaf_name(path), recorded, stop), params)
        handler = ocp.PyTreeCheckpointHandler(type_handler_registry=type_handlers.create_type_handler_registry(
            (LazyArray, _StreamingNumpyHandler()), (jax.Array, type_handlers.ArrayHandler())))
    else:
        recorded = _named(checksums_lib.tree_checksums(params))
        handler = ocp.PyTreeCheckpointHandler()
    save_args = jax.tree.map(lambda _: ocp.SaveArgs(chunk_byte_size=CHUNK_BYTES), params)
    with signals_held(stop), _quiet_orbax():
        try:
            with ocp.Checkpointer(handler) as checkpointer:
                checkpointer.save(os.path.abspath(os.fspath(directory)),
                                  args=ocp.args.PyTreeSave(params, save_args=save_args))
        except Exception as err:
            code = re.search(r"os_error_code='(\d+)'", str(err))
            if code and not stop.is_set():  # TensorStore reports the failed system call in its message
                raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), os.fspath(directory)) from err
            raise
    return recorded


def _recording(leaf: LazyArray, name: str, recorded: dict[str, int], stop: threading.Event) -> LazyArray:
    """`leaf`, whose loading first checks `stop` and afterwards records the checksum of the array."""

    def load() -> np.ndarray:
        if stop.is_set():
            raise _WriteStopped("stopped by a signal")
        array = leaf.load()
        recorded[name] = checksums_lib.host_checksum(array)
        return array

    return LazyArray(leaf.shape, leaf.dtype, load)


def _named(tree: Any) -> dict[str, Any]:
    """Dotted leaf name -> leaf."""
    return {leaf_name(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


class _OrbaxRecords(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return f"{os.sep}orbax{os.sep}" not in record.pathname


@contextlib.contextmanager
def _quiet_orbax() -> Iterator[None]:
    """Drops Orbax's log records (it logs every failure with its traceback, and much at INFO)
    while inside: the failures reach the caller as exceptions."""
    logger, records = logging.getLogger("absl"), _OrbaxRecords()
    logger.addFilter(records)
    try:
        yield
    finally:
        logger.removeFilter(records)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike[str], overwrite: bool = False,
                     sources: Iterable[str | os.PathLike[str]] = ()) -> Iterator[Path]:
    """Yields a fresh temporary folder next to `path` and renames it to `path` on success.

    On any error or interruption (SIGINT, SIGTERM: see `huginn_jax.interruption`) the temporary
    folder, and any parent folder made for it, is removed, so nothing of the attempt is left
    behind. An existing `path` is an error unless `overwrite`, in which case it is replaced only
    once the new folder is complete (the two renames cannot be interrupted). A `path` that is,
    contains or lies inside one of `sources` is refused (`check_output_path`). A failed write
    into the temporary folder (a full or read-only disk) is an OSError naming `path`.
    """
    path, sources = Path(path).absolute(), list(sources)
    check_output_path(path, overwrite, sources)
    with stop_on_signal() as raise_if_signalled:
        made: list[Path] = []
        tmp = path.parent / f".{path.name}.incomplete-{uuid.uuid4().hex[:8]}"
        try:
            _make_parents(path.parent, made)
            tmp.mkdir()
            yield tmp
            check_output_path(path, overwrite, sources)
            with signals_held():
                raise_if_signalled()  # a signal whose exception Python dropped must not be committed
                _move_into_place(tmp, path)
        except OSError as err:
            failed = Path(os.path.abspath(err.filename)) if isinstance(err.filename, str) else None
            if failed is not None and (failed.is_relative_to(tmp) or tmp.is_relative_to(failed)):
                raise OSError(err.errno, err.strerror, os.fspath(path)) from err  # writing the output failed
            raise
        finally:
            with signals_held():  # the cleanup runs to its end; a signal now is raised after it
                if os.path.lexists(tmp):
                    shutil.rmtree(tmp, ignore_errors=True)
                for folder in reversed(made):
                    with contextlib.suppress(OSError):  # only while empty, and only those made here
                        folder.rmdir()


def _make_parents(folder: Path, made: list[Path]) -> None:
    """Makes `folder` and its missing parents, appending each one made to `made`, outermost first."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for parent in reversed(missing):
        try:
            parent.mkdir()
        except FileExistsError:
            continue
        made.append(parent)


def _move_into_place(tmp: Path, path: Path) -> None:
    """Renames `tmp` to `path`; an existing `path` is renamed aside first and removed after."""
    if not os.path.lexists(path):
        tmp.rename(path)
        return
    old = path.parent / f".{path.name}.replaced-{uuid.uuid4().hex[:8]}"
    path.rename(old)
    try:
        tmp.rename(path)
    except BaseException:
        old.rename(path)  # put the original back
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old)
    else:
        old.unlink()


def check_output_path(path: str | os.PathLike[str], overwrite: bool,
                      sources: Iterable[str | os.PathLike[str]] = ()) -> None:
    """Refuses an output that is, contains or lies inside one of `sources` (compared as given and
    with symlinks resolved), since writing or replacing it could destroy them; then an existing
    output unless `overwrite`."""
    outputs = {Path(os.path.abspath(path)), Path(os.path.realpath(path))}
    for source in sources:
        for src in {Path(os.path.abspath(source)), Path(os.path.realpath(source))}:
            for out in outputs:
                relation = ("is" if out == src else "contains" if src.is_relative_to(out)
                            else "lies inside" if out.is_relative_to(src) else None)
                if relation:
                    raise ValueError(
                        f"output {os.fspath(path)} {relation} the source {src}: writing there could destroy the "
                        "source; choose an output outside it (--output)")
    if os.path.lexists(path) and not overwrite:
        raise FileExistsError(f"output {os.fspath(path)} already exists; pass overwrite=True (--overwrite) "
                              "to replace it")


def write_description(directory: str | os.PathLike[str], config: HuginnConfig, dtype: Any,
                      hf_config: Mapping[str, Any] | None = None, *, checksums: Mapping[str, int],
                      **metadata: Any) -> None:
    """Writes `config.json` (the source's, when given, else ours) and `huginn_jax.json`, which
    records the checksum of every array (`huginn_jax.checksums`)."""
    directory = Path(directory)
    hf = dict(hf_config) if hf_config is not None else config.to_hf_dict()
    (directory / CONFIG_FILE).write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    description = {"format": FORMAT, "format_version": FORMAT_VERSION, "dtype": jnp.dtype(dtype).name,
                   "params": PARAMS_DIR, **metadata, "checksum_scheme": checksums_lib.SCHEME,
                   "checksums": dict(sorted(checksums.items()))}
    (directory / METADATA_FILE).write_text(json.dumps(description, indent=2) + "\n", encoding="utf-8")


def save(path: str | os.PathLike[str], config: HuginnConfig, params: Params, *, overwrite: bool = False,
         files: Sequence[str | os.PathLike[str]] = ()) -> None:
    """Writes `params` (e.g. after training) as a converted checkpoint, atomically, with the
    checksum of every array (computed where the arrays live).

    `files` are copied into the folder (tokenizer files, say), so that it describes itself and
    `python -m convert export` can turn it into a Hugging Face checkpoint.
    """
    if config.kv_head_padding:
        raise ValueError(f"these parameters carry {config.kv_head_padding} zero kv heads for sharding; a checkpoint "
                         "stores the model's own heads: save sharding.unpad_heads(params, config) instead")
    dtypes = {jnp.dtype(leaf.dtype) for leaf in jax.tree.leaves(params)}
    if len(dtypes) != 1:
        raise ValueError(f"parameters must share one dtype, got {sorted(d.name for d in dtypes)}")
    check_tree(params, config, dtypes.pop(), "params")
    with atomic_directory(path, overwrite) as tmp:
        recorded = write_params(tmp / PARAMS_DIR, params)
        for file in files:
            shutil.copy2(file, tmp / os.path.basename(file))
        write_description(tmp, config, jax.tree.leaves(params)[0].dtype, checksums=recorded,
                          created_by="huginn_jax.checkpoint.save", files=sorted(os.path.basename(f) for f in files))


def add_checksums(path: str | os.PathLike[str]) -> None:
    """Records the checksums of a checkpoint written before they were recorded, from its data as
    it is now (so only for a folder known to be intact). `huginn_jax.json` is replaced atomically."""
    description = read_description(path)
    if "checksums" in description:
        raise CheckpointError(os.fspath(path), [f"{METADATA_FILE} already records checksums"])
    _, params = restore(path, verify_checksums=False)
    description.update(checksum_scheme=checksums_lib.SCHEME,
                       checksums=dict(sorted(_named(checksums_lib.tree_checksums(params)).items())))
    tmp = Path(path) / f".{METADATA_FILE}.incomplete-{uuid.uuid4().hex[:8]}"
    try:
        tmp.write_text(json.dumps(description, indent=2) + "\n", encoding="utf-8")
        tmp.replace(Path(path) / METADATA_FILE)
    finally:
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------- reading

def read_description(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The contents of `huginn_jax.json`, after checking that `path` is a converted checkpoint."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(os.fspath(path), ["is not a folder" if path.exists() else "does not exist"])
    missing = [name for name in (METADATA_FILE, CONFIG_FILE, PARAMS_DIR) if not (path / name).exists()]
    if missing:
        raise CheckpointError(os.fspath(path), [f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
                                                "missing: not a converted huginn-jax checkpoint (see `python -m "
                                                "convert import`)"])
    description = _read_json(path / METADATA_FILE)
    if description.get("format") != FORMAT or description.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(os.fspath(path), [
            f"{METADATA_FILE} says format {description.get('format')!r} version "
            f"{description.get('format_version')!r}; this code reads {FORMAT!r} version {FORMAT_VERSION}"])
    problems = []
    if description.get("dtype") not in ("float32", "bfloat16"):
        problems.append(f"{METADATA_FILE}: dtype {description.get('dtype')!r} is not 'float32' or 'bfloat16'")
    recorded = description.get("checksums")
    if recorded is not None and not (isinstance(recorded, dict) and all(
            isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**32 for v in recorded.values())):
        problems.append(f"{METADATA_FILE}: checksums must map array names to unsigned 32-bit integers")
    elif recorded is not None and description.get("checksum_scheme") != checksums_lib.SCHEME:
        problems.append(f"{METADATA_FILE}: checksum scheme {description.get('checksum_scheme')!r} is unknown; "
                        f"this code computes {checksums_lib.SCHEME!r}")
    if problems:
        raise CheckpointError(os.fspath(path), problems)
    return description


def _read_json(file: Path) -> dict[str, Any]:
    """The JSON object in `file`, or CheckpointError naming the file."""
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(os.fspath(file), [f"is not valid JSON ({err})"]) from None
    except OSError as err:
        raise CheckpointError(os.fspath(file), [f"cannot be read ({err.strerror})"]) from None
    if not isinstance(value, dict):
        raise CheckpointError(os.fspath(file), [f"holds a JSON {type(value).__name__}, not an object"])
    return value


def read_config(path: str | os.PathLike[str]) -> HuginnConfig:
    """The model config of a checkpoint folder; CheckpointError naming config.json when it is not one."""
    file = Path(path) / CONFIG_FILE
    hf = _read_json(file)
    try:
        return HuginnConfig.from_hf_dict(hf)
    except (ConfigError, TypeError, ValueError) as err:
        raise CheckpointError(os.fspath(file), [str(err).replace("\n", "\n    ")]) from None


def is_checkpoint(path: str | os.PathLike[str]) -> bool:
    """Whether `path` holds a converted checkpoint (cheap: looks at its description only)."""
    try:
        read_description(path)
    except (CheckpointError, OSError, ValueError):
        return False
    return True


@contextlib.contextmanager
def _reading_params(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yields the absolute `params/` folder; any failure of Orbax to read it (a missing, truncated
    or damaged file) becomes one CheckpointError, without Orbax's log lines."""
    params = Path(path).absolute() / PARAMS_DIR
    missing = [name for name in ("_METADATA", "manifest.ocdbt") if not (params / name).is_file()]
    if missing:
        raise CheckpointError(os.fspath(path), [f"{PARAMS_DIR}/{name} is missing (the checkpoint was not written "
                                                "completely, or was damaged)" for name in missing])
    try:
        with _quiet_orbax():
            yield params
    except CheckpointError:
        raise
    except Exception as err:
        raise CheckpointError(os.fspath(path), [f"{PARAMS_DIR}/ cannot be read, its files are damaged or "
                                                f"incomplete ({_first_line(err)})"]) from err


def _first_line(err: BaseException) -> str:
    """The gist of an error: its type and first line (TensorStore appends its whole spec)."""
    text = str(err).split("\n", 1)[0].split(" See full TensorStore details", 1)[0]
    return f"{type(err).__name__}: {text[:300]}{'...' if len(text) > 300 else ''}"


def _local_reader() -> ocp.Checkpointer:
    """An orbax checkpointer that reads on this process alone. Every process of a multi-host run
    loads its own copy of the model (`huginn_jax.distributed`), so a read waits for no other
    process: orbax's default syncs all processes through a device collective, which fails when
    they reach it more than 30 s apart."""
    local = ocp.options.MultiprocessingOptions(primary_host=jax.process_index(),
                                               active_processes={jax.process_index()})
    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(multiprocessing_options=local),
                            multiprocessing_options=local)


def stored_metadata(path: str | os.PathLike[str]) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Dotted leaf name -> (shape, dtype) of every array stored under `params/`."""
    with signals_held(), _reading_params(path) as params, _local_reader() as checkpointer:
        metadata = checkpointer.metadata(params)
        tree = getattr(getattr(metadata, "item_metadata", None), "tree", None)
        if tree is None:
            raise CheckpointError(os.fspath(path), [f"{PARAMS_DIR}/_METADATA cannot be read (damaged)"])
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
    return {leaf_name(p): (tuple(m.shape), np.dtype(m.dtype)) for p, m in flat}


def check_tree(params: Params, config: HuginnConfig, dtype: Any, where: str) -> None:
    """Raises CheckpointError naming every leaf of `params` missing, extra or of the wrong shape."""
    problems = compare_shapes({leaf_name(p): (tuple(a.shape), np.dtype(a.dtype))
                               for p, a in jax.tree_util.tree_flatten_with_path(params)[0]}, config, dtype)
    if problems:
        raise CheckpointError(where, problems)


def compare_shapes(found: Mapping[str, tuple[tuple[int, ...], np.dtype]], config: HuginnConfig,
                   dtype: Any | None) -> list[str]:
    """Problems of a stored tree against `config` (`params.tree_problems`: names, shapes, one float
    dtype) and against the recorded `dtype` (unless None)."""
    problems = tree_problems(dict(found), config)
    expected = {leaf_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(abstract_params(config))[0]}
    other_dtype: dict[str, list[str]] = {}
    for name, (_, found_dtype) in found.items():
        if name in expected and dtype is not None and np.dtype(found_dtype) != np.dtype(dtype):
            other_dtype.setdefault(np.dtype(found_dtype).name, []).append(name)
    for found_dtype, names in sorted(other_dtype.items()):
        problems.append(f"{names[0]}{f' and {len(names) - 1} more array(s)' if len(names) > 1 else ''}: stored as "
                        f"{found_dtype}, but {METADATA_FILE} says {np.dtype(dtype).name}")
    return problems


def restore(path: str | os.PathLike[str], *, mesh: Mesh | None = None, rules: ShardingRules | None = None,
            sharding: Any = None, dtype: Any = None, verify_checksums: bool = True) -> tuple[HuginnConfig, Params]:
    """(config, parameters) of a converted checkpoint, placed where asked, in one call.

    - nothing: on the default device;
    - `sharding`: a `jax.Device`, one `jax.sharding.Sharding` for every array, or a tree of them
      shaped like the parameters;
    - `mesh` (with optional `rules`, logical axis -> mesh axes; `sharding.default_rules` otherwise):
      each array sharded by its logical axes (`sharding.param_shardings`), then the heads padded
      with zero heads where the mesh's model axis does not divide them (`sharding.shard_params`;
      the returned config's `kv_head_padding` says how many; heads read replicated, then padded).
    Each device reads only its own shard. `dtype` casts the arrays (default: the stored dtype).

    `verify_checksums` (default) compares the checksum of every restored array, computed where it
    lies (no gathering), with the one recorded when it was written; a mismatch is a
    CheckpointError. With a `dtype` other than the stored one the arrays are verified as stored and
    cast afterwards (briefly one array more in memory). A checkpoint written before checksums were
    recorded restores unverified, with a warning (`add_checksums` records them). False skips
    the check and casts while reading. Any damaged file (missing, truncated, overwritten,
    inconsistent with `huginn_jax.json` or the config) is one CheckpointError.
    """
    if mesh is not None and sharding is not None:
        raise ValueError("pass either mesh (and rules) or sharding, not both")
    description = read_description(path)
    config = read_config(path)
    stored = jnp.dtype(description["dtype"])
    problems = compare_shapes(stored_metadata(path), config, stored)
    if problems:
        raise CheckpointError(os.fspath(path), problems)
    wanted = jnp.dtype(dtype or stored)
    recorded = description.get("checksums") if verify_checksums else None
    if verify_checksums and recorded is None:
        warnings.warn(f"{os.fspath(path)}: {METADATA_FILE} records no checksums (written before huginn-jax recorded "
                      "them), so the arrays were restored unverified; checkpoint.add_checksums records them",
                      stacklevel=2)
    abstract = abstract_params(config, stored if recorded is not None else wanted)
    if mesh is not None:
        mesh = sharding_lib.resolve_mesh(mesh)
        shardings = param_shardings(config, mesh, rules)
    elif sharding is None or isinstance(sharding, (jax.Device, jax.sharding.Sharding)):
        one = sharding or jax.local_devices()[0]  # this process's (in a multi-host run, devices()[0] is process 0's)
        one = SingleDeviceSharding(one) if isinstance(one, jax.Device) else one
        shardings = jax.tree.map(lambda _: one, abstract)
    else:
        shardings = sharding
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    with _reading_params(path) as folder, _local_reader() as checkpointer:
        params = checkpointer.restore(folder, args=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target)))
    if recorded is not None:
        _verify(path, _named(checksums_lib.tree_checksums(params)), recorded)
        if wanted != stored:
            leaves, treedef = jax.tree.flatten(params)
            del params
            for i, leaf in enumerate(leaves):  # one array at a time, the stored one dropped
                leaves[i] = leaf.astype(wanted)
                del leaf
            params = jax.tree.unflatten(treedef, leaves)
    if mesh is not None:
        config, params = sharding_lib.shard_params(params, config, mesh, rules)
    return config, params


def _verify(path: str | os.PathLike[str], found: Mapping[str, int], recorded: Mapping[str, int]) -> None:
    """CheckpointError naming every array whose checksum differs from the recorded one, or has none."""
    problems = checksums_lib.mismatches(found, recorded)
    problems += [f"{name}: no checksum recorded in {METADATA_FILE}" for name in sorted(set(found) - set(recorded))]
    if problems:
        raise CheckpointError(os.fspath(path), problems)


def restore_host(path: str | os.PathLike[str], select: Params, recorded: Mapping[str, int] | None = None) -> Params:
    """The numpy arrays of a part of the parameter tree, in their stored dtype.

    `select` is shaped like the parameters, with None for what to skip, e.g.
    `{"core": [None, {...names...}]}`; used to stream a checkpoint one layer at a time. With
    `recorded` (the `checksums` of `huginn_jax.json`) every array read is verified against it.
    A SIGINT or SIGTERM takes effect once the read is complete (`interruption.signals_held`).
    """
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), select)
    with signals_held(), _reading_params(path) as folder, _local_reader() as checkpointer:
        arrays = checkpointer.restore(folder, args=ocp.args.PyTreeRestore(
            item=select, restore_args=restore_args, partial_restore=True))
    if recorded is not None:
        _verify(path, _named(checksums_lib.tree_checksums(arrays)), recorded)
    return arrays


def layer_selection(config: HuginnConfig, group: str | None, index: int = 0) -> Params:
    """A `restore_host` selection of one block (group, index), or of the non-block arrays (None)."""
    names = abstract_params(config)
    if group is None:
        return {k: 0 for k, v in names.items() if k not in BLOCK_GROUPS}
    layers: list[Any] = [None] * len(names[group])
    layers[index] = {k: 0 for k in names[group][index]}
    return {group: layers}
