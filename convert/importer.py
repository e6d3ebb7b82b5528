"""Hugging Face / PyTorch checkpoint -> converted (Orbax) huginn-jax checkpoint, streamed.

Everything that can be checked before writing is checked first (config, files, tensor names,
shapes, dtypes, duplicates, truncation) and reported together; then each tensor is read, reshaped
into our layout (`huginn_jax.hf_layout`), cast and written before the next is read. NaN or Inf
values are found on the way, in the values as written (a finite float32 weight beyond the range
of bfloat16 becomes Inf): a warning, or an error with `strict`. The output appears only when
complete and never touches the source (`huginn_jax.checkpoint.atomic_directory`); the checksum of
every array as written is recorded in `huginn_jax.json`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np

from convert.checks import count_nonfinite, nonfinite_warning
from convert.progress import Progress
from convert.safetensors_io import StreamingWriter, dtype_name
from convert.sources import Source, open_source, resolve, source_paths
from convert.verify import verify_import
from huginn_jax import checkpoint
from huginn_jax.config import ConfigError, HuginnConfig
from huginn_jax.hf_layout import (LM_HEAD, NON_PARAMETER_KEYS, TOP_LEVEL_TENSORS, block_key, block_tensors,
                                  flip_top_level, top_level_names)
from huginn_jax.loading import CheckpointError, check_checkpoint
from huginn_jax.params import BLOCK_GROUPS, Params, param_specs

DTYPES = ("bfloat16", "float32")


@dataclasses.dataclass(frozen=True)
class ImportResult:
    output: Path
    config: HuginnConfig
    dtype: str
    tensors: int
    bytes_read: int
    seconds: float
    warnings: list[str]
    verified: bool


def import_checkpoint(source: str, output: str | os.PathLike[str], *, dtype: str = "bfloat16",
                      overwrite: bool = False, strict: bool = False, verify: bool = False,
                      revision: str | None = None, config_path: str | None = None,
                      progress: bool = True) -> ImportResult:
    """Converts `source` (folder, weights file or Hub id) into a converted checkpoint at `output`.

    Raises CheckpointError listing every problem of the source (and, with `strict`, its NaN/Inf
    tensors; with `verify`, every tensor that does not read back bitwise or a failed forward pass);
    ValueError for an `output` that is, contains or lies inside the source (`sources.source_paths`:
    the folder or weights file, its config and every file read, a Hub cache folder), or for an
    unknown `dtype`; FileExistsError when `output`
    exists and not `overwrite`; OSError when the output cannot be written. Nothing is left at
    `output` then, nor after SIGINT or SIGTERM (`huginn_jax.interruption`).
    """
    start = time.perf_counter()
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, not {dtype!r}")
    if os.path.exists(source):
        checkpoint.check_output_path(output, overwrite, source_paths(Path(source), config_path))
    else:  # a Hub id: refuse an existing output before downloading
        checkpoint.check_output_path(output, overwrite)
    location = resolve(source, revision)
    src = open_source(location, config_path, description=source)
    protected = source_paths(location, src.config_path, src.reader.files.values(), src.side_files)
    checkpoint.check_output_path(output, overwrite, protected)
    config, hf_config = validate(src)
    keys = expected_keys(src, config)
    with checkpoint.atomic_directory(output, overwrite, protected) as tmp, \
            Progress(sum(src.nbytes(k) for k in keys), len(keys), "import", progress) as bar:
        loader = _Loader(src, jnp.dtype(dtype), bar)
        recorded = checkpoint.write_params(tmp / checkpoint.PARAMS_DIR,
                                           lazy_params(config, jnp.dtype(dtype), loader))
        warnings = loader.warnings()
        if strict and warnings:
            raise CheckpointError(src.description, [f"{w} (--strict)" for w in warnings])
        buffers = write_buffers(src, tmp / checkpoint.BUFFERS_FILE)
        bar.update(sum(src.nbytes(k) for k in buffers), len(buffers))
        side_files = [f.name for f in src.side_files]
        for file in src.side_files:
            shutil.copy2(file, tmp / file.name)
        checkpoint.write_description(
            tmp, config, dtype, hf_config=hf_config, checksums=recorded, created_by="python -m convert import",
            source={"location": src.description, "format": src.kind,
                    "files": sorted({os.path.basename(p) for p in src.reader.files.values()})},
            stored_tied_head=config.tie_embeddings and LM_HEAD in src.reader.files,
            buffers=buffers, files=side_files, nonfinite=warnings)
        if verify:
            problems = verify_import(tmp, src, config, jnp.dtype(dtype))
            if problems:
                raise CheckpointError(f"verification of {os.fspath(output)}", problems)
    return ImportResult(Path(output), config, dtype, len(keys), loader.bytes_read, time.perf_counter() - start,
                        warnings, verify)


def validate(src: Source) -> tuple[HuginnConfig, dict[str, Any]]:
    """(config, config.json contents) of a source with no problem, else CheckpointError listing all."""
    problems = list(src.problems)
    config = hf_config = None
    try:
        hf_config = json.loads(src.config_path.read_text(encoding="utf-8"))
        config = HuginnConfig.from_hf_dict(hf_config)
    except FileNotFoundError:
        problems.append(f"{src.config_path}: missing (pass --config for a weights file without one beside it)")
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        problems.append(f"{src.config_path.name}: not valid JSON ({err})")
    except ConfigError as err:
        problems.append(f"{src.config_path.name}: {err}".replace("\n", "\n    "))
    if config is not None:
        problems += [p for p in check_checkpoint(src.reader, config)
                     if p.split(":", 1)[0] not in src.unreadable_keys]
    if problems:
        raise CheckpointError(src.description, problems)
    return config, hf_config


def expected_keys(src: Source, config: HuginnConfig) -> list[str]:
    """Every tensor of the source that the conversion writes: parameters and buffers (a stored tied
    head is only compared with the embedding, during validation)."""
    keys = [TOP_LEVEL_TENSORS[n][0] for n in top_level_names(config)]
    keys += [block_key(g, i, t) for g, i, t in block_tensors(config)]
    return keys + sorted(NON_PARAMETER_KEYS & set(src.reader.files))


class _Loader:
    """Reads a source tensor, notes progress once, makes one of our arrays, and counts the NaN/Inf of
    the source tensor and of the arrays as written."""

    def __init__(self, src: Source, dtype: np.dtype, bar: Progress):
        self._src, self._dtype, self._bar = src, dtype, bar
        self._counts: dict[str, list[int]] = {}  # key -> [source NaN/Inf, written NaN/Inf, size]
        self.bytes_read = 0

    def __call__(self, key: str, transform: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        tensor = self._src.reader(key)
        self.bytes_read += tensor.nbytes
        if key not in self._counts:
            self._counts[key] = [count_nonfinite(tensor), 0, tensor.size]
            self._bar.update(self._src.nbytes(key))
        array = np.ascontiguousarray(transform(tensor), dtype=self._dtype)
        self._counts[key][1] += count_nonfinite(array)  # the arrays of one key split its tensor
        return array

    def warnings(self) -> list[str]:
        """One line per tensor with NaN or Inf values as written, in reading order."""
        found = (nonfinite_warning(k, source, written, size, self._dtype)
                 for k, (source, written, size) in self._counts.items())
        return [w for w in found if w]


def lazy_params(config: HuginnConfig, dtype: np.dtype, load: Callable[[str, Callable], np.ndarray]) -> Params:
    """Our parameter tree of `LazyArray`s, each made from its official tensor when written."""
    specs = param_specs(config, dtype)
    tree: Params = {}
    for name in top_level_names(config):
        tree[name] = checkpoint.LazyArray(specs[name].shape, np.dtype(dtype), functools.partial(
            load, TOP_LEVEL_TENSORS[name][0], functools.partial(flip_top_level, name)))
    for group in BLOCK_GROUPS:
        tree[group] = [{} for _ in specs[group]]
    for group, i, tensor in block_tensors(config):
        for leaf in tensor.ours:
            pick = functools.partial(_pick, tensor.to_ours, config, leaf)
            tree[group][i][leaf] = checkpoint.LazyArray(specs[group][i][leaf].shape, np.dtype(dtype),
                                                        functools.partial(load, block_key(group, i, tensor), pick))
    return tree


def _pick(to_ours: Callable, config: HuginnConfig, leaf: str, tensor: np.ndarray) -> np.ndarray:
    return to_ours(tensor, config)[leaf]


def write_buffers(src: Source, path: Path) -> list[str]:
    """Keeps the source's non-parameter tensors (`freqs_cis`) as they are, for a bit-exact export."""
    keys = sorted(NON_PARAMETER_KEYS & set(src.reader.files))
    if keys:
        tensors = {k: src.reader(k) for k in keys}
        with StreamingWriter(path, [(k, dtype_name(v.dtype), v.shape) for k, v in tensors.items()],
                             {"format": "pt"}) as writer:
            for key, value in tensors.items():
                writer.write(key, value)
    return keys
