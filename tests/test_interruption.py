"""`huginn_jax.interruption`: a signal is never lost, also when Python runs its handler inside a
callback that drops exceptions (a garbage-collector callback, a `__del__`), and a dropped signal
never lets `atomic_directory` commit its folder.

The signal is raised in-process with `signal.raise_signal`, which runs the Python handler at once,
i.e. inside the callback, exactly what happened to the converter in CI (a SIGTERM landing inside
JAX's `_xla_gc_callback`).
"""

from __future__ import annotations

import _thread
import gc
import signal
import time

import pytest

from huginn_jax import checkpoint, interruption
from huginn_jax.checkpoint import atomic_directory
from huginn_jax.interruption import Interrupted, stop_on_signal


class SignalOnDelete:
    """Raises `signum` from its `__del__`, where Python drops any exception it raises."""

    def __init__(self, signum: int):
        self.signum = signum

    def __del__(self):
        signal.raise_signal(self.signum)


def busy(seconds: float = 10.0) -> None:
    """Plain Python work for up to `seconds`: gives the interpreter points at which it runs pending
    signal handlers (a dropped `Interrupted` is raised again within milliseconds)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        sum(i * i for i in range(100))


@pytest.fixture
def default_handlers():
    """SIGINT raises KeyboardInterrupt and SIGTERM raises a marker, as in a CLI; restored after."""

    class Terminated(Exception):
        pass

    def on_term(signum, frame):
        raise Terminated

    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, on_term)
    yield Terminated
    for s, h in previous.items():
        signal.signal(s, h)


def interrupted_inside(body, expected_after) -> Interrupted | None:
    """Runs `body()` then `busy()` inside `stop_on_signal`; returns the `Interrupted` raised there
    (None if the block ran to its end). Leaving the block must deliver the signal to the previous
    handler, which raises `expected_after`."""
    raised = None
    with pytest.raises(expected_after):
        with stop_on_signal():
            try:
                body()
                busy()
            except Interrupted as err:
                raised = err
    return raised


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_raised_inside_del_still_stops_the_block(default_handlers, capfd, signum):
    after = KeyboardInterrupt if signum == signal.SIGINT else default_handlers
    raised = interrupted_inside(lambda: SignalOnDelete(signum), after)  # __del__ runs at once, drops its exception
    assert raised is not None and raised.signum == signum
    assert "Exception ignored" not in capfd.readouterr().err


def test_a_signal_arriving_inside_a_gc_callback_still_stops_the_block(default_handlers, capfd):
    fired = []

    def callback(phase, info):
        if phase == "start" and not fired:
            fired.append(True)
            _thread.interrupt_main(signal.SIGTERM)  # as a signal arriving now: handled at the next check,
            sum(range(10))  # here, inside the callback

    gc.callbacks.append(callback)
    try:
        raised = interrupted_inside(gc.collect, default_handlers)
    finally:
        gc.callbacks.remove(callback)
    assert fired and raised is not None and raised.signum == signal.SIGTERM
    assert "Exception ignored" not in capfd.readouterr().err


def test_raise_if_signalled_raises_what_was_dropped_even_if_not_raised_again(default_handlers, monkeypatch):
    """The check before a commit does not depend on the re-raise having happened."""
    monkeypatch.setattr(interruption._thread, "interrupt_main", lambda signum: None)
    with pytest.raises(KeyboardInterrupt):
        with stop_on_signal() as raise_if_signalled:
            SignalOnDelete(signal.SIGINT)
            busy(0.01)  # no re-raise: the work would go on
            with pytest.raises(Interrupted):
                raise_if_signalled()


def test_once_raised_by_the_check_it_is_not_raised_again_during_the_cleanup(default_handlers):
    """The cleanup after `Interrupted` must run to its end: the re-raise of a dropped signal stops
    once the check has raised it (in CI it cut `atomic_directory`'s removal of its folder short)."""
    cleaned = False
    with pytest.raises(KeyboardInterrupt):
        with stop_on_signal() as raise_if_signalled:
            try:
                SignalOnDelete(signal.SIGINT)
                raise_if_signalled()  # before the helper thread asks again (1 ms)
            except Interrupted:
                busy(0.1)  # a cleanup: no second Interrupted may arrive here
                cleaned = True
    assert cleaned


def test_no_exception_without_a_signal(default_handlers):
    with stop_on_signal() as raise_if_signalled:
        busy(0.01)
        raise_if_signalled()


@pytest.mark.parametrize("raised_again", [True, False])
def test_atomic_directory_commits_nothing_after_a_dropped_signal(default_handlers, tmp_path, capfd, monkeypatch,
                                                                 raised_again):
    if not raised_again:
        monkeypatch.setattr(interruption._thread, "interrupt_main", lambda signum: None)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(out) as tmp:
            (tmp / "data.bin").write_bytes(b"x" * 100)
            SignalOnDelete(signal.SIGINT)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary folder left either
    assert "Exception ignored" not in capfd.readouterr().err


def test_atomic_directory_still_commits_without_a_signal(default_handlers, tmp_path):
    out = tmp_path / "out"
    with atomic_directory(out) as tmp:
        (tmp / "data.bin").write_bytes(b"x")
        busy(0.01)
    assert (out / "data.bin").read_bytes() == b"x"


def test_a_signal_during_the_cleanup_of_a_failed_write_waits_for_its_end(default_handlers, tmp_path, monkeypatch):
    """A failed write's cleanup is not cut short by a signal either: the folder is removed, then
    the signal is honoured."""
    out = tmp_path / "out"
    removed = []
    real_rmtree = checkpoint.shutil.rmtree

    def rmtree_with_a_signal(path, *args, **kwargs):
        signal.raise_signal(signal.SIGINT)  # arrives while the cleanup runs
        real_rmtree(path, *args, **kwargs)
        removed.append(path)

    monkeypatch.setattr(checkpoint.shutil, "rmtree", rmtree_with_a_signal)
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(out) as tmp:
            (tmp / "data.bin").write_bytes(b"x")
            raise OSError("disk full")
    assert removed and list(tmp_path.iterdir()) == []

