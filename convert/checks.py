"""Value checks shared by import, export and verification."""

from __future__ import annotations

import ml_dtypes
import numpy as np

CHECK_CHUNK = 1 << 22
"""Elements examined at a time, so that a check needs little extra memory for any tensor size."""
_FLOATS = (np.dtype(np.float64), np.dtype(np.float32), np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16))


def count_nonfinite(array: np.ndarray, chunk: int = CHECK_CHUNK) -> int:
    """Number of NaN or infinite values of a floating-point array (0 for other dtypes), counted
    `chunk` elements at a time."""
    if chunk <= 0:
        raise ValueError(f"chunk must be positive, got {chunk}")
    if np.dtype(array.dtype) not in _FLOATS:
        return 0
    flat = array.reshape(-1)
    total = 0
    for start in range(0, flat.size, chunk):
        part = flat[start:start + chunk]
        total += part.size - int(np.count_nonzero(np.isfinite(part)))
    return total


def nonfinite_warning(key: str, source_bad: int, written_bad: int, size: int, dtype: np.dtype) -> str | None:
    """The warning for a tensor whose written values hold `written_bad` NaN or Inf of `size`, of which
    `source_bad` were already so in the source (the rest are finite values that overflow `dtype`)."""
    if not written_bad:
        return None
    overflow = written_bad - source_bad
    if not overflow:
        return f"{key}: {written_bad} NaN or Inf value(s) of {size}"
    return (f"{key}: {written_bad} NaN or Inf value(s) of {size} as written in {np.dtype(dtype).name}, "
            f"{overflow} of them finite in the source but beyond the range of {np.dtype(dtype).name}")


def bitwise_equal(a: np.ndarray, b: np.ndarray) -> bool:
    """Same dtype, shape and bytes (NaN payloads included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    as_int = np.dtype(f"u{a.dtype.itemsize}")
    return bool(np.array_equal(np.ascontiguousarray(a).view(as_int), np.ascontiguousarray(b).view(as_int)))
