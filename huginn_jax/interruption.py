"""SIGINT and SIGTERM during a checkpoint write: stop in order, clean up, then honour the signal.

A write that is cut short must leave nothing behind, and Orbax writes from background threads,
which keep going after the main thread has been interrupted. So while a folder is being written
(`huginn_jax.checkpoint.atomic_directory`):
- `stop_on_signal`: the first SIGINT or SIGTERM raises `Interrupted` in the main thread, which
  unwinds into the cleanup; further signals are held, so that the cleanup runs to its end;
- `signals_held`: around a background write, a signal only asks it to stop (at the next array)
  and is raised once the write has ended, so that no thread still writes when the folder is
  removed; likewise around a short read (one layer), so that no read is abandoned half-way
  (TensorStore would then report into an event loop that is gone, with a traceback).
On leaving, the previous handlers come back and the first signal received is delivered to them:
Python's default SIGINT handler raises KeyboardInterrupt, the default SIGTERM action ends the
process (after the cleanup), an application's own handler does what it does. Signals that are
ignored (SIG_IGN) stay ignored. Only the main thread can handle signals; elsewhere these context
managers do nothing. SIGKILL cannot be caught: it may leave a hidden `.NAME.incomplete-*` folder.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Callable, Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """A SIGINT or SIGTERM received while a checkpoint folder was being written."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")


@contextlib.contextmanager
def _intercepted(handle: Callable[[int, bool], None]) -> Iterator[None]:
    """Inside: `handle(signum, first)` for every SIGINT or SIGTERM; on leaving: the previous
    handlers restored and the first signal received delivered to them."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    caught = [s for s, h in previous.items() if h is not None and h != signal.SIG_IGN]
    received: list[int] = []

    def handler(signum: int, frame: object) -> None:
        received.append(signum)
        handle(signum, len(received) == 1)

    for s in caught:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s in caught:
            signal.signal(s, previous[s])
        if received:
            signal.raise_signal(received[0])


def stop_on_signal() -> contextlib.AbstractContextManager[None]:
    """The first SIGINT or SIGTERM raises `Interrupted`; later ones wait for the end of the block."""

    def handle(signum: int, first: bool) -> None:
        if first:
            raise Interrupted(signum)

    return _intercepted(handle)


def signals_held(stop: threading.Event | None = None) -> contextlib.AbstractContextManager[None]:
    """SIGINT and SIGTERM only set `stop` (if given) inside, and are delivered when the block ends."""
    return _intercepted(lambda signum, first: stop.set() if stop is not None else None)
