"""One streaming protocol for every sampler.

A streamer is any callable `streamer(new_tokens)`, where `new_tokens` is a list with one 1-D int
numpy array per sequence of the batch: the tokens that became final since the previous call, in
order (empty when a sequence has nothing new). It is called on the host while decoding runs on the
device: once per token by the AR samplers, once per round by speculative decoding (the accepted
tokens), once per sampler step by the diffusion sampler (the newly frozen tokens), and once for
the token that the prefill produces. If the streamer has an `end()` method, it is called once
after generation (to flush text, say). `samplers.TextStreamer` prints decoded text.

If the streamer raises (a KeyboardInterrupt included), decoding stops at the next step and the
sampler re-raises that exception once the device loop has ended.

Implementation: the compiled program calls back into the host through `io_callback` with a small
session number (a traced value), and the session table maps it to the streamer of the call in
progress. A new streamer therefore never recompiles the sampler; only whether one is given does.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from huginn_jax.sharding import constrain

Array = jax.Array
Streamer = Callable[[list[np.ndarray]], None]


class _Session:
    """The streamer of one sampler call and the first exception it raised."""

    def __init__(self, streamer: Streamer):
        self.streamer = streamer
        self.error: BaseException | None = None


_SESSIONS: dict[int, _Session] = {}
_LOCK = threading.Lock()
_NUMBERS = itertools.count(1)


@contextlib.contextmanager
def session(streamer: Streamer | None) -> Iterator[Array]:
    """Opens a streaming session for one sampler call; yields its number (int32, 0 when there is
    no streamer) to pass into the compiled program. On exit, re-raises what the streamer raised,
    else calls its `end()` if it has one."""
    if streamer is None:
        yield jnp.int32(0)
        return
    if not callable(streamer):
        raise ValueError(f"streamer must be callable with the new tokens of every sequence, got {streamer!r}")
    with _LOCK:
        number = next(_NUMBERS) % (2**31 - 1) or 1
        _SESSIONS[number] = current = _Session(streamer)
    try:
        yield jnp.int32(number)
    finally:
        with _LOCK:
            del _SESSIONS[number]
    if current.error is not None:
        raise current.error
    end = getattr(streamer, "end", None)
    if callable(end):
        end()


def _deliver(number: np.ndarray, tokens: np.ndarray, counts: np.ndarray) -> np.ndarray:
    current = _SESSIONS.get(int(number))
    if current is None or current.error is not None:
        return np.bool_(current is not None)
    try:
        current.streamer([row[:n].copy() for row, n in zip(np.asarray(tokens), np.asarray(counts))])
    except BaseException as err:  # noqa: BLE001 - handed back to the caller after the loop
        current.error = err
        return np.bool_(True)
    return np.bool_(False)


def emit(enabled: bool, number: Array, tokens: Array, counts: Array) -> Array:
    """Hands row b's first counts[b] entries of tokens [B, K] to the session's streamer, in order
    with every other call. Returns a scalar bool: True once the streamer has raised (stop
    decoding). Compiles to nothing when not `enabled` (static)."""
    if not enabled:
        return jnp.bool_(False)
    # on a mesh, gathered first: the callback runs on one device, and takes the whole batch
    tokens, counts = (constrain(a, (None,) * a.ndim) for a in (tokens, counts))
    return io_callback(_deliver, jax.ShapeDtypeStruct((), jnp.bool_), number, tokens, counts, ordered=True)


def collect() -> tuple[Streamer, list[list[int]]]:
    """A streamer that appends every sequence's tokens to lists (for tests and scripts)."""
    rows: list[list[int]] = []

    def streamer(new_tokens: list[np.ndarray]) -> None:
        while len(rows) < len(new_tokens):
            rows.append([])
        for row, new in zip(rows, new_tokens):
            row.extend(int(t) for t in new)

    return streamer, rows
