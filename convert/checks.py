"""Value checks shared by import, export and verification."""

from __future__ import annotations

import numpy as np

ROWS_PER_CHECK = 1 << 22  # elements examined at a time, so the check needs little extra memory


def count_nonfinite(array: np.ndarray) -> int:
    """Number of NaN or infinite values of a floating-point array (0 for other dtypes)."""
    if array.dtype.kind not in "fV":  # ml_dtypes' bfloat16 has kind 'V'
        return 0
    flat = array.reshape(-1)
    return int(sum(flat.size - np.count_nonzero(np.isfinite(flat[i:i + ROWS_PER_CHECK]))
                   for i in range(0, flat.size, ROWS_PER_CHECK)))


def bitwise_equal(a: np.ndarray, b: np.ndarray) -> bool:
    """Same dtype, shape and bytes (NaN payloads included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    as_int = np.dtype(f"u{a.dtype.itemsize}")
    return bool(np.array_equal(np.ascontiguousarray(a).view(as_int), np.ascontiguousarray(b).view(as_int)))
