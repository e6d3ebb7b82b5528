"""Loading parameters from a checkpoint in the reference's Hugging Face layout.

A checkpoint folder holds `config.json` and either `model.safetensors` or shards listed in
`model.safetensors.index.json`. Every problem (missing, unexpected or mis-shaped tensors, a shard
that is absent or lacks a tensor its index promises, a stored head that contradicts the tied
embedding) is collected and reported in one `CheckpointError`.

safetensors >= 0.8 reads bfloat16 into numpy (via ml_dtypes), so tensors stay on the host until
they are placed, one at a time.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

from huginn_jax.config import ConfigError, HuginnConfig
from huginn_jax.hf_layout import LM_HEAD, NON_PARAMETER_KEYS, hf_shapes, params_from_hf
from huginn_jax.params import Params, ParamSpec, is_spec, param_specs

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
FLOAT_DTYPES = ("F32", "BF16", "F16", "F64")


class CheckpointError(ValueError):
    """A checkpoint that does not match its config, with every problem listed."""

    def __init__(self, where: str, problems: list[str]):
        self.problems = problems
        super().__init__(f"{where}: {len(problems)} problem(s):\n  - " + "\n  - ".join(problems))


def tensor_files(folder: str | os.PathLike[str]) -> dict[str, str]:
    """Official key -> path of the safetensors file that holds it."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise CheckpointError(folder, ["is not a folder" if os.path.exists(folder) else "does not exist"])
    index_path = os.path.join(folder, INDEX_FILE)
    if os.path.exists(index_path):
        try:
            with open(index_path, encoding="utf-8") as f:
                index = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CheckpointError(index_path, [f"is not valid JSON ({err})"]) from None
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict):
            raise CheckpointError(index_path, ["has no 'weight_map' object"])
        return {key: os.path.join(folder, name) for key, name in weight_map.items()}
    single = os.path.join(folder, SINGLE_FILE)
    if not os.path.exists(single):
        raise CheckpointError(folder, [f"neither {SINGLE_FILE} nor {INDEX_FILE} exists"])
    try:
        with safe_open(single, framework="numpy") as f:
            return {key: single for key in f.keys()}
    except Exception as err:  # safetensors raises its own error types for damaged files
        raise CheckpointError(single, [f"cannot be read as safetensors ({err})"]) from None


class TensorReader:
    """Reads official tensors one at a time from the files of a checkpoint, keeping files open."""

    def __init__(self, files: dict[str, str], stack: contextlib.ExitStack):
        self.files = files
        self._handles: dict[str, Any] = {}
        self._stack = stack

    def _handle(self, path: str) -> Any:
        if path not in self._handles:
            self._handles[path] = self._stack.enter_context(safe_open(path, framework="numpy"))
        return self._handles[path]

    def header(self, key: str) -> tuple[tuple[int, ...], str]:
        """(shape, safetensors dtype name) without reading the data."""
        tensor_slice = self._handle(self.files[key]).get_slice(key)
        return tuple(tensor_slice.get_shape()), tensor_slice.get_dtype()

    def __call__(self, key: str) -> np.ndarray:
        return self._handle(self.files[key]).get_tensor(key)


def check_checkpoint(reader: TensorReader, config: HuginnConfig) -> list[str]:
    """Every way in which the checkpoint behind `reader` fails to match `config`."""
    problems = []
    expected = hf_shapes(config)
    present: dict[str, tuple[tuple[int, ...], str]] = {}
    unreadable: dict[str, str] = {}  # file -> why: one problem per damaged file, not per tensor
    for key, path in sorted(reader.files.items()):
        if not os.path.exists(path):
            problems.append(f"{key}: its file {os.path.basename(path)} does not exist")
            continue
        if path in unreadable:
            continue
        try:
            present[key] = reader.header(key)
        except Exception as err:  # safetensors raises its own error types for absent keys and damaged files
            if isinstance(reader, TensorReader) and not _readable(path):
                unreadable[path] = str(err)
            else:
                problems.append(f"{key}: cannot be read from {os.path.basename(path)} ({err})")
    problems += [f"{os.path.basename(path)}: cannot be read as safetensors ({why}); the tensors it should hold are "
                 "not checked" for path, why in sorted(unreadable.items())]
    for key in sorted(set(expected) - set(present) - {k for k in reader.files if k not in present}):
        problems.append(f"{key}: missing (expected shape {list(expected[key])})")
    allowed_extra = set(NON_PARAMETER_KEYS) | ({LM_HEAD} if config.tie_embeddings else set())
    for key in sorted(set(present) - set(expected) - allowed_extra):
        problems.append(f"{key}: unexpected tensor of shape {list(present[key][0])}")
    for key, (shape, dtype) in sorted(present.items()):
        want = expected.get(key, (config.vocab_size, config.n_embd) if key == LM_HEAD else None)
        if want is not None and shape != want:
            problems.append(f"{key}: shape {list(shape)} but the config needs {list(want)}")
        elif want is not None and dtype not in FLOAT_DTYPES:
            problems.append(f"{key}: dtype {dtype} is not a floating-point type")
    if config.tie_embeddings and LM_HEAD in present and not problems:
        if not np.array_equal(reader(LM_HEAD), reader("transformer.wte.weight")):
            problems.append(f"{LM_HEAD} differs from transformer.wte.weight, but the config ties the embeddings")
    return problems


def _readable(path: str) -> bool:
    """Whether safetensors can open `path` at all."""
    try:
        with safe_open(path, framework="numpy"):
            return True
    except Exception:  # safetensors raises its own error types
        return False


def iter_hf_tensors(folder: str | os.PathLike[str], config: HuginnConfig) -> Iterator[tuple[str, np.ndarray]]:
    """Yields every validated parameter tensor of a checkpoint, one at a time, in its stored dtype."""
    files = tensor_files(folder)
    with contextlib.ExitStack() as stack:
        reader = TensorReader(files, stack)
        problems = check_checkpoint(reader, config)
        if problems:
            raise CheckpointError(os.fspath(folder), problems)
        for key in hf_shapes(config):
            yield key, reader(key)


def _folder_config(folder: str | os.PathLike[str]) -> HuginnConfig:
    """The config of a checkpoint folder, or CheckpointError naming the folder or its config.json."""
    path = os.path.join(os.fspath(folder), "config.json")
    if not os.path.isdir(folder):
        raise CheckpointError(os.fspath(folder), ["is not a folder" if os.path.exists(folder) else "does not exist"])
    try:
        return HuginnConfig.from_hf_json(path)
    except FileNotFoundError:
        raise CheckpointError(path, ["does not exist"]) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(path, [f"is not valid JSON ({err})"]) from None
    except (ConfigError, TypeError, ValueError) as err:
        raise CheckpointError(path, [str(err).replace("\n", "\n    ")]) from None


def load_hf_checkpoint(folder: str | os.PathLike[str], dtype: Any = jnp.float32,
                       config: HuginnConfig | None = None) -> tuple[HuginnConfig, Params]:
    """(config, parameters on the default device in `dtype`) from a Hugging Face layout folder.

    The config comes from the folder's `config.json` unless one is given. Each array is placed
    according to its `ParamSpec`.
    """
    if config is None:
        config = _folder_config(folder)
    tensors = dict(iter_hf_tensors(folder, config))
    host = params_from_hf(tensors.__getitem__, config)

    def place(spec: ParamSpec, array: np.ndarray) -> jax.Array:
        assert array.shape == spec.shape, (array.shape, spec.shape)  # guaranteed by check_checkpoint
        return jnp.asarray(np.asarray(array).astype(spec.dtype))

    return config, jax.tree.map(place, param_specs(config, dtype), host, is_leaf=is_spec)
