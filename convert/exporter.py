"""Converted (Orbax) huginn-jax checkpoint -> Hugging Face layout that the official PyTorch code loads.

Writes `config.json`, safetensors shards of at most `max_shard_size` with the official tensor
names (one `model.safetensors` when everything fits, else `model-0000i-of-0000n.safetensors` plus
`model.safetensors.index.json`), and the tokenizer / model-code files that came with the checkpoint.
Arrays are restored one block at a time and each tensor is appended to its shard as soon as it is
made, so memory stays near one layer; every array read is verified against the checksum recorded
when it was written. NaN or Inf values are looked for in the values as written (a float32 weight
beyond the range of bfloat16 becomes Inf). `freqs_cis` is written back as imported, or recomputed.
The output appears only when complete and never touches the source
(`huginn_jax.checkpoint.atomic_directory`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from convert.checks import count_nonfinite, nonfinite_warning
from convert.progress import Progress
from convert.safetensors_io import StreamingWriter, dtype_name, read_header, read_tensor
from huginn_jax import checkpoint
from huginn_jax.config import HuginnConfig
from huginn_jax.hf_layout import (LM_HEAD, ROPE_BUFFER, TOP_LEVEL_TENSORS, BlockTensor, block_key, block_tensors,
                                  flip_top_level, hf_shapes, top_level_names)
from huginn_jax.loading import INDEX_FILE, SINGLE_FILE, CheckpointError

DEFAULT_MAX_SHARD_SIZE = "5GB"
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*$", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class ExportResult:
    output: Path
    shards: list[str]
    tensors: int
    bytes_written: int
    seconds: float
    warnings: list[str]


@dataclasses.dataclass(frozen=True)
class PlannedTensor:
    """One official tensor to write: where its values come from in our tree."""

    key: str
    shape: tuple[int, ...]
    dtype: np.dtype
    layer: tuple[str, int] | None = None  # (group, index) for block tensors
    block: BlockTensor | None = None
    top_level: str | None = None  # our array's name for tensors outside the blocks
    buffer: np.ndarray | None = None  # non-parameter tensors, written as they are

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def parse_size(text: str | int) -> int:
    """Bytes in '5GB' (10^9), '2GiB' (2^30), '500MB', '1000' ..., as `save_pretrained` reads them."""
    if isinstance(text, int):
        return text
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"max_shard_size: cannot read {text!r} as a size (examples: 5GB, 2GiB, 500MB)")
    number, unit = float(match.group(1)), match.group(2).upper()
    powers = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}
    base = 1024 if "I" in unit else 1000
    return int(number * base ** powers[unit.replace("I", "").replace("B", "")])


def export_checkpoint(source: str | os.PathLike[str], output: str | os.PathLike[str], *, dtype: str | None = None,
                      max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE, overwrite: bool = False,
                      strict: bool = False, tied_head: bool | None = None, progress: bool = True) -> ExportResult:
    """Writes the converted checkpoint at `source` in the Hugging Face layout at `output`.

    `dtype` defaults to the stored one; `tied_head` (store `lm_head.weight` as a copy of the tied
    embedding) defaults to what the imported checkpoint did, else True as in the released models.
    Raises CheckpointError for a damaged checkpoint (checksums included) and, with `strict`, NaN
    or Inf values as written; ValueError for an `output` that is, contains or lies inside `source`;
    FileExistsError when `output` exists and not `overwrite`; OSError when it cannot be written.
    Nothing is left at `output` then, nor after SIGINT or SIGTERM (`huginn_jax.interruption`).
    """
    start = time.perf_counter()
    checkpoint.check_output_path(output, overwrite, [source])
    description = checkpoint.read_description(source)
    config = checkpoint.read_config(source)
    problems = checkpoint.compare_shapes(checkpoint.stored_metadata(source), config, description["dtype"])
    if problems:
        raise CheckpointError(os.fspath(source), problems)
    out_dtype = np.dtype(jnp.dtype(dtype or description["dtype"]))
    include_head = description.get("stored_tied_head", True) if tied_head is None else tied_head
    plan = tensor_plan(config, out_dtype, include_head and config.tie_embeddings, buffers(source, config))
    shards = split(plan, parse_size(max_shard_size))
    names = shard_names(len(shards))
    warnings: list[str] = []
    with checkpoint.atomic_directory(output, overwrite, [source]) as tmp, \
            Progress(sum(t.nbytes for t in plan), len(plan), "export", progress) as bar:
        arrays = _ArrayCache(source, config, description.get("checksums"))
        for name, shard in zip(names, shards):
            with StreamingWriter(tmp / name, [(t.key, dtype_name(t.dtype), t.shape) for t in shard],
                                 {"format": "pt"}) as writer:
                for tensor in shard:
                    stored = arrays.official(tensor)
                    value = np.ascontiguousarray(stored, dtype=tensor.dtype)
                    bad = count_nonfinite(stored)
                    written_bad = bad if value.dtype == stored.dtype else count_nonfinite(value)
                    warning = nonfinite_warning(tensor.key, bad, written_bad, value.size, tensor.dtype)
                    if warning:
                        warnings.append(warning)
                    del stored
                    writer.write(tensor.key, value)
                    bar.update(tensor.nbytes)
        if strict and warnings:
            raise CheckpointError(os.fspath(source), [f"{w} (--strict)" for w in warnings])
        if len(shards) > 1:
            weight_map = {t.key: n for n, shard in zip(names, shards) for t in shard}
            index = {"metadata": {"total_size": sum(t.nbytes for t in plan)},
                     "weight_map": dict(sorted(weight_map.items()))}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        (tmp / "config.json").write_text(json.dumps(hf_config(source, out_dtype), indent=2, sort_keys=True) + "\n",
                                         encoding="utf-8")
        for file in description.get("files", []):
            if (Path(source) / file).is_file():
                shutil.copy2(Path(source) / file, tmp / file)
    return ExportResult(Path(output), names, len(plan), sum(t.nbytes for t in plan), time.perf_counter() - start,
                        warnings)


def tensor_plan(config: HuginnConfig, dtype: np.dtype, tied_head: bool,
                buffer_values: dict[str, np.ndarray]) -> list[PlannedTensor]:
    """Every official tensor, in writing order: outside the blocks, block by block, buffers."""
    shapes = hf_shapes(config)
    plan = []
    for name in top_level_names(config):
        key = TOP_LEVEL_TENSORS[name][0]
        plan.append(PlannedTensor(key, shapes[key], dtype, top_level=name))
        if name == "wte" and tied_head:
            plan.append(PlannedTensor(LM_HEAD, shapes[key], dtype, top_level="wte"))
    for group, i, block in block_tensors(config):
        key = block_key(group, i, block)
        plan.append(PlannedTensor(key, shapes[key], dtype, layer=(group, i), block=block))
    for key, value in sorted(buffer_values.items()):
        plan.append(PlannedTensor(key, value.shape, value.dtype, buffer=value))
    return plan


def split(plan: list[PlannedTensor], max_bytes: int) -> list[list[PlannedTensor]]:
    """Consecutive groups of at most `max_bytes` (a larger tensor gets a shard of its own)."""
    if max_bytes <= 0:
        raise ValueError(f"max_shard_size must be positive, got {max_bytes}")
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for tensor in plan:
        if shards[-1] and size + tensor.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    return shards


def shard_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE_FILE]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def buffers(source: str | os.PathLike[str], config: HuginnConfig) -> dict[str, np.ndarray]:
    """The non-parameter tensors to write: as imported, else `freqs_cis` recomputed."""
    path = Path(source) / checkpoint.BUFFERS_FILE
    if path.exists():
        entries, _ = read_header(path)
        return {key: read_tensor(path, entry) for key, entry in entries.items()}
    return {ROPE_BUFFER: rope_buffer(config)}


def rope_buffer(config: HuginnConfig) -> np.ndarray:
    """The reference's `freqs_cis` [1, block_size, 1, head_dim / 2, 2] (cos, sin) in float32.

    With torch installed it is computed by the same float32 operations as the reference (bit-exact);
    otherwise with numpy, whose float32 `pow` may differ in the last bit.
    """
    d, n, base = config.head_dim, config.block_size, config.rope_base
    try:
        import torch
    except ImportError:
        inv = (1.0 / (np.float32(base) ** (np.arange(0, d, 2, dtype=np.float32) / np.float32(d)))).astype(np.float32)
        angles = np.outer(np.arange(n, dtype=np.float32), inv).astype(np.float32)
        return np.stack([np.cos(angles), np.sin(angles)], axis=-1)[None, :, None].astype(np.float32)
    inv_t = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float32)[: d // 2] / d))
    angles_t = torch.outer(torch.arange(n, dtype=torch.float32), inv_t)
    return torch.stack([torch.cos(angles_t), torch.sin(angles_t)], dim=-1)[None, :, None].numpy()


def hf_config(source: str | os.PathLike[str], dtype: np.dtype) -> dict[str, Any]:
    """The stored config.json, with its dtype fields set to the exported dtype."""
    config = json.loads((Path(source) / checkpoint.CONFIG_FILE).read_text(encoding="utf-8"))
    keys = [k for k in ("torch_dtype", "dtype") if k in config] or ["torch_dtype"]
    config.update({k: dtype.name for k in keys})
    return config


class _ArrayCache:
    """Restores our arrays from the Orbax checkpoint one top-level array or one block at a time,
    verifying each against its `recorded` checksum (when the checkpoint records them)."""

    def __init__(self, source: str | os.PathLike[str], config: HuginnConfig, recorded: dict[str, int] | None):
        self._source, self._config, self._recorded = source, config, recorded
        self._key: Any = None
        self._arrays: dict[str, np.ndarray] = {}

    def _load(self, key: Any, select: dict) -> dict[str, np.ndarray]:
        if key != self._key:
            self._arrays = {}  # drop the previous block before reading the next
            restored = checkpoint.restore_host(self._source, select, self._recorded)
            self._arrays = restored[key[0]][key[1]] if isinstance(key, tuple) else restored
            self._key = key
        return self._arrays

    def official(self, tensor: PlannedTensor) -> np.ndarray:
        """The tensor in the official layout, in its stored dtype (cast it to `tensor.dtype` to write)."""
        if tensor.buffer is not None:
            return tensor.buffer
        if tensor.top_level is not None:
            arrays = self._load(tensor.top_level, {tensor.top_level: 0})
            return flip_top_level(tensor.top_level, arrays[tensor.top_level])
        group, i = tensor.layer
        layer = self._load((group, i), checkpoint.layer_selection(self._config, group, i))
        return tensor.block.to_hf(layer, self._config)
