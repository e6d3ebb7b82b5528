"""Checksums of stored arrays: the same number from numpy while writing, and from jax on a device
or a device mesh while restoring, without gathering a sharded array.

    checksum(a) = sum over i of (2 i + 1) * bits(a_i)   mod 2^32

where i is the element's row-major index (mod 2^32) and bits(a_i) its raw bit pattern (uint8,
uint16 or uint32 for 1-, 2- or 4-byte dtypes) widened to uint32. Why this one:
- integer sums mod 2^32 are exact and do not depend on the order of addition, so a stream of
  chunks on the host, or per-device partial sums of a sharded array (XLA adds them), all give the
  same number; the index comes from per-axis iotas, so no array is reshaped or moved;
- every weight is odd, hence invertible mod 2^32: changing any one element always changes the
  checksum; changing several goes unnoticed only when their weighted changes cancel mod 2^32
  (about 1 in 4e9 for random damage); swapping two elements is noticed unless (i - j) (b_i - b_j)
  is a multiple of 2^31;
- it reads the bits, not the values, so NaN payloads and signed zeros count.
It detects damage; it is no defence against deliberate tampering (use a cryptographic hash
of the files for that).
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

SCHEME = "sum((2i+1)*bits_i) mod 2^32"
"""Recorded next to the checksums, so that a future change of scheme is recognised."""
HOST_CHUNK = 1 << 22  # elements per step on the host: little extra memory for any array size
_MASK = (1 << 32) - 1


def _bits_dtype(dtype: Any) -> np.dtype:
    itemsize = np.dtype(dtype).itemsize
    if itemsize not in (1, 2, 4):
        raise ValueError(f"checksums cover 1-, 2- and 4-byte dtypes, not {np.dtype(dtype)}")
    return np.dtype(f"u{itemsize}")


def host_checksum(array: np.ndarray, chunk: int = HOST_CHUNK) -> int:
    """The checksum of a numpy array, `chunk` elements at a time.

    Per chunk starting at element s, with j the index inside it:
    sum (2 (s + j) + 1) b_j = 2 (s * sum b_j + sum j b_j) + sum b_j, two wrapping uint32 sums.
    """
    bits = np.ascontiguousarray(array).reshape(-1).view(_bits_dtype(array.dtype))
    offsets = np.arange(min(chunk, bits.size), dtype=np.uint32)
    total = 0
    for start in range(0, bits.size, chunk):
        part = bits[start:start + chunk]
        plain = int(np.sum(part, dtype=np.uint32))  # uint32 products and sums wrap around
        weighted = int(np.sum(part * offsets[:part.size], dtype=np.uint32))
        total += 2 * (start * plain + weighted) + plain
    return total & _MASK


def _device_checksum(array: jax.Array) -> jax.Array:
    """The checksum as a uint32 scalar, computed where `array` lives (sharded or not)."""
    bits = jax.lax.bitcast_convert_type(array, jnp.dtype(_bits_dtype(array.dtype))).astype(jnp.uint32)
    index = jnp.zeros(array.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(array.ndim)):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, array.shape, axis) * jnp.uint32(stride & _MASK)
        stride *= array.shape[axis]
    return jnp.sum(bits * (index * jnp.uint32(2) + jnp.uint32(1)), dtype=jnp.uint32)


_device_checksums = jax.jit(lambda tree: jax.tree.map(_device_checksum, tree))


def tree_checksums(tree: Any) -> Any:
    """The checksum (a Python int) of every leaf of a tree of jax arrays (on device, one compiled
    program per tree structure, shapes and shardings) or numpy arrays (on the host)."""
    leaves, treedef = jax.tree.flatten(tree)
    if all(isinstance(leaf, np.ndarray) for leaf in leaves):
        return jax.tree.unflatten(treedef, [host_checksum(leaf) for leaf in leaves])
    return jax.tree.map(int, jax.device_get(_device_checksums(tree)))


def mismatches(found: Mapping[str, int], recorded: Mapping[str, int]) -> list[str]:
    """A problem for every array whose checksum differs from the recorded one."""
    return [f"{name}: checksum {value:#010x}, but {recorded[name]:#010x} was recorded when it was written "
            "(the stored data changed)" for name, value in sorted(found.items())
            if name in recorded and int(recorded[name]) != value]
