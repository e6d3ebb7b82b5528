"""`--verify`: read a converted checkpoint back, compare it with its source, run a forward pass.

Each array is restored (one block at a time, so memory stays at one layer) and compared bitwise
with the source tensor mapped into our layout and cast to the stored dtype; casting is
deterministic, so bitwise equality is the exact test (a float32 source stored as bfloat16 equals
its rounding). Then the whole model is restored on the default device and a short forward pass
must give finite logits of the right shape.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from convert.checks import bitwise_equal
from huginn_jax import checkpoint
from huginn_jax.config import HuginnConfig
from huginn_jax.hf_layout import TOP_LEVEL_TENSORS, block_key, block_tensors, flip_top_level, top_level_names
from huginn_jax.interruption import signals_held

FORWARD_TOKENS = 8
FORWARD_STEPS = 2


def verify_import(path: str | os.PathLike[str], src: Any, config: HuginnConfig, dtype: np.dtype) -> list[str]:
    """Every difference between the converted checkpoint at `path` and its source `src`."""
    problems: list[str] = []

    def compare(name: str, stored: np.ndarray, expected: np.ndarray) -> None:
        if not bitwise_equal(np.asarray(stored), np.ascontiguousarray(expected, dtype=dtype)):
            problems.append(f"{name}: the stored array differs from its source tensor")

    top = checkpoint.restore_host(path, checkpoint.layer_selection(config, None))
    for name in top_level_names(config):
        compare(name, top[name], flip_top_level(name, src.reader(TOP_LEVEL_TENSORS[name][0])))
    del top
    layer: dict[str, np.ndarray] = {}
    current = None
    for group, i, tensor in block_tensors(config):
        if current != (group, i):
            current = (group, i)
            layer = checkpoint.restore_host(path, checkpoint.layer_selection(config, group, i))[group][i]
        expected = tensor.to_ours(src.reader(block_key(group, i, tensor)), config)
        for leaf in tensor.ours:
            compare(f"{group}.{i}.{leaf}", layer[leaf], expected[leaf])
    del layer
    problems += forward_problems(path)
    return problems


def forward_problems(path: str | os.PathLike[str]) -> list[str]:
    """Restores the checkpoint on the default device and checks a short forward pass."""
    from huginn_jax.model import forward

    with signals_held():  # a read cut short would be reported by TensorStore with a traceback
        config, params = checkpoint.restore(path)
    ids = (np.arange(FORWARD_TOKENS, dtype=np.int32) % config.vocab_size)[None]
    logits = np.asarray(forward(params, ids, FORWARD_STEPS, config=config, init_scale=0.0).logits, np.float32)
    if logits.shape != (1, FORWARD_TOKENS, config.vocab_size):
        return [f"forward pass: logits of shape {list(logits.shape)}, expected "
                f"{[1, FORWARD_TOKENS, config.vocab_size]}"]
    if not np.isfinite(logits).all():
        return [f"forward pass: {int((~np.isfinite(logits)).sum())} non-finite logits"]
    return []
