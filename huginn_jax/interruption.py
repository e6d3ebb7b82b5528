"""SIGINT and SIGTERM during a checkpoint write: stop in order, clean up, then honour the signal.

A write that is cut short must leave nothing behind, and Orbax writes from background threads,
which keep going after the main thread has been interrupted. So while a folder is being written
(`huginn_jax.checkpoint.atomic_directory`):
- `stop_on_signal`: the first SIGINT or SIGTERM raises `Interrupted` in the main thread, which
  unwinds into the cleanup; further signals are held, so that the cleanup runs to its end.
  Python runs a signal handler wherever the main thread happens to be, also inside a garbage
  collector callback or a `__del__`, where an exception is printed ("Exception ignored in ...")
  and dropped. Such a dropped `Interrupted` is not lost and nothing is printed: a helper thread
  asks the main thread (`_thread.interrupt_main`) to run the handler again a millisecond later,
  until the exception has been raised where it propagates; and the block's
  `raise_if_signalled()`, called before anything is committed, raises it in any case;
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

import _thread
import contextlib
import dataclasses
import signal
import sys
import threading
import time
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


RETRY_SECONDS = 0.001  # how soon a dropped `Interrupted` is raised again


@dataclasses.dataclass
class _StopState:
    """What `stop_on_signal` knows: the first signal received; whether its `Interrupted` was
    dropped by Python (raised inside a callback that cannot propagate it) and must be raised again;
    whether the unraisable hook is running now (raising there would be dropped too); whether the
    block is still running."""

    signum: int | None = None
    dropped: bool = False
    in_hook: bool = False
    active: bool = True


def _raise_again_soon(state: _StopState) -> None:
    """From a helper thread: asks the main thread to run its handler again until the dropped
    `Interrupted` has been raised where it propagates, or the block has ended."""
    while state.dropped and state.active:
        time.sleep(RETRY_SECONDS)
        if state.dropped and state.active and state.signum is not None:
            _thread.interrupt_main(state.signum)


@contextlib.contextmanager
def stop_on_signal() -> Iterator[Callable[[], None]]:
    """The first SIGINT or SIGTERM raises `Interrupted`; later ones wait for the end of the block.

    Yields `raise_if_signalled()`, which raises `Interrupted` if a signal has arrived in the block:
    call it before committing anything, so that a signal whose exception Python dropped can never
    let the work be committed, even before it has been raised again."""
    state = _StopState()

    def handle(signum: int, first: bool) -> None:
        if first:
            state.signum = signum
        if (first or state.dropped) and not state.in_hook:
            state.dropped = False
            raise Interrupted(state.signum)

    def raise_if_signalled() -> None:
        if state.signum is not None:
            state.dropped = False  # raised here, where it propagates: the helper must not raise it again
            raise Interrupted(state.signum)

    previous_hook = sys.unraisablehook

    def unraisable(report: "sys.UnraisableHookArgs") -> None:
        if not (isinstance(report.exc_value, Interrupted) and state.active):
            previous_hook(report)
            return
        state.in_hook, state.dropped = True, True
        try:
            threading.Thread(target=_raise_again_soon, args=(state,), daemon=True,
                             name="huginn-jax-raise-interrupted-again").start()
        finally:
            state.in_hook = False

    sys.unraisablehook = unraisable
    try:
        with _intercepted(handle):
            yield raise_if_signalled
    finally:
        state.active = False
        sys.unraisablehook = previous_hook


def signals_held(stop: threading.Event | None = None) -> contextlib.AbstractContextManager[None]:
    """SIGINT and SIGTERM only set `stop` (if given) inside, and are delivered when the block ends."""
    return _intercepted(lambda signum, first: stop.set() if stop is not None else None)
