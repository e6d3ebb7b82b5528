"""Checks of user-facing options, each failing with a ValueError that names the option.

Every public entry point (`forward`, the samplers, the CLIs) validates its numbers through these,
so that a bad value is reported the same way everywhere and before anything is compiled.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def integer(name: str, value: Any, minimum: int | None = None, maximum: int | None = None) -> int:
    """`value` as a Python int: an int (or numpy / 0-d integer array), not a bool, float or string."""
    if isinstance(value, (bool, np.bool_)) or not _is_integer(value):
        raise ValueError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return value


def _is_integer(value: Any) -> bool:
    if isinstance(value, (numbers.Integral, np.integer)):
        return True
    dtype = getattr(value, "dtype", None)
    return dtype is not None and getattr(value, "ndim", 1) == 0 and jnp.issubdtype(dtype, jnp.integer)


def number(name: str, value: Any, minimum: float | None = None, maximum: float | None = None, *,
           above: float | None = None, below: float | None = None) -> float:
    """`value` as a finite Python float within [minimum, maximum] and (above, below)."""
    if isinstance(value, (bool, np.bool_, str, bytes)) or not (
            isinstance(value, numbers.Real) or getattr(value, "ndim", 1) == 0 and hasattr(value, "dtype")):
        raise ValueError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    if above is not None and not value > above:
        raise ValueError(f"{name} must be > {above}, got {value}")
    if below is not None and not value < below:
        raise ValueError(f"{name} must be < {below}, got {value}")
    return value


def boolean(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
    return bool(value)


def choice(name: str, value: Any, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {list(choices)}")
    return value


def token_id_list(name: str, value: Any, vocab_size: int) -> list[int]:
    """A list (or tuple, or 1-D integer array) of ids in [0, vocab_size)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple, np.ndarray, jax.Array)):
        raise ValueError(f"{name} must be a list of token ids, got {value!r} ({type(value).__name__})")
    ids = [integer(f"{name}[{i}]", v) for i, v in enumerate(np.asarray(value).reshape(-1).tolist()
                                                            if not isinstance(value, (list, tuple)) else value)]
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise ValueError(f"{name} must lie in [0, {vocab_size}), got {bad}")
    return ids


def prng_keys(value: Any, batch: int, name: str = "key") -> jax.Array:
    """One typed PRNG key per row [batch] from a key (`jax.random.key(seed)`, or a legacy uint32[2]
    `PRNGKey`) or `batch` of them (shape [batch] typed, or [batch, 2] legacy). A single key is used by
    every row: identical prompts then give identical samples, as each would alone."""
    if isinstance(value, (bool, int, float, str, bytes)) or value is None or not hasattr(value, "dtype"):
        raise ValueError(f"{name} must be a PRNG key (jax.random.key(seed)) or one per row, "
                         f"got {value!r} ({type(value).__name__})")
    if jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
        keys = value
    elif value.dtype == np.uint32 and value.ndim >= 1 and value.shape[-1] == 2:
        keys = jax.random.wrap_key_data(jnp.asarray(value))
    else:
        raise ValueError(f"{name} must be a PRNG key (jax.random.key(seed)) or one per row, got an array of "
                         f"dtype {value.dtype} and shape {tuple(value.shape)}")
    if keys.ndim == 0:
        return jnp.broadcast_to(keys, (batch,))
    if keys.shape != (batch,):
        raise ValueError(f"{name} holds keys of shape {tuple(keys.shape)}: pass one key, or one per row "
                         f"(shape [{batch}])")
    return keys
