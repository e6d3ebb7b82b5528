"""Multi-host runs: one process per host, each sampling its share of the prompts on its own devices.

Generation is process-level data parallel: every process loads the model onto a mesh of its local
devices (`sharding.make_mesh(shape, jax.local_devices())`), runs the sampler on its contiguous
share of the prompts, and the results are gathered, in prompt order, where one process (the
chief, process 0) prints, streams and writes them. No step of a sampler waits for another host
(a Huginn-0125 replica fits on the devices of one host), so hosts never run in lockstep.
Training (`experiments/train.py`) is the other kind: one program over the devices of every host.

    distributed.initialize(coordinator_address="10.0.0.1:1234", num_processes=2, process_id=i)
    mine = distributed.share(len(prompts))            # this process's slice of the prompts
    out = generate(params, prompts[mine], config=config, mesh=sharding.make_mesh((1, 4), jax.local_devices()))
    everything = distributed.gather(out)             # every process's `out`, in process order
    if distributed.is_chief(): ...

`initialize` turns what `jax.distributed.initialize` leaves to a crash (a coordinator that is
never reached aborts the process) into errors that say what to change.
"""

from __future__ import annotations

import itertools
import os
import pickle
import socket
import sys
import time
from typing import Any

import jax
import numpy as np

COORDINATOR_HINT = ("pass --coordinator_address=HOST:PORT (process 0's host and a free port), --num_processes=N "
                    "and --process_id=I to every process, or run where JAX finds them itself (a Cloud TPU pod, "
                    "SLURM, Open MPI)")


class DistributedError(ValueError):
    """A multi-process run that cannot start, and what to change."""


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, timeout_s: int = 300) -> None:
    """Joins this process to a multi-process run (`jax.distributed.initialize`); call it before
    anything else touches JAX. Without arguments JAX looks for a cluster (TPU pod, SLURM, ...);
    a DistributedError says what is missing or wrong. Process 0 serves the coordinator at
    `coordinator_address`; the others wait for it up to `timeout_s` seconds."""
    given = {"coordinator_address": coordinator_address, "num_processes": num_processes, "process_id": process_id}
    if coordinator_address is not None:
        missing = [name for name, value in given.items() if value is None]
        if missing:
            raise DistributedError(f"--coordinator_address needs {' and '.join('--' + m for m in missing)} too: "
                                   + COORDINATOR_HINT)
        host, port = _address(coordinator_address)
        if not isinstance(num_processes, int) or num_processes < 1:
            raise DistributedError(f"--num_processes={num_processes} must be a positive integer")
        if not isinstance(process_id, int) or not 0 <= process_id < num_processes:
            raise DistributedError(f"--process_id={process_id} must lie in [0, {num_processes}) for "
                                   f"--num_processes={num_processes}")
        if process_id == 0:
            _check_free(host, port)
        else:
            _wait_for(host, port, timeout_s)
    elif num_processes is not None or process_id is not None:
        raise DistributedError("--num_processes and --process_id need --coordinator_address: " + COORDINATOR_HINT)
    try:
        jax.distributed.initialize(coordinator_address, num_processes, process_id,
                                   initialization_timeout=timeout_s)
    except (ValueError, RuntimeError) as err:
        if "coordinator_address" in str(err):
            raise DistributedError("--distributed found no coordinator: " + COORDINATOR_HINT) from None
        if "only be called once" in str(err):
            raise DistributedError("jax.distributed.initialize was already called in this process") from None
        raise DistributedError(f"jax.distributed.initialize failed: {err}") from err


def _address(text: str) -> tuple[str, int]:
    host, sep, port = str(text).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DistributedError(f"--coordinator_address={text!r} must be HOST:PORT, e.g. 10.0.0.1:1234")
    return host.strip("[]"), int(port)


def _check_free(host: str, port: int) -> None:
    """Process 0 serves the coordinator: its port must be free on this host."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("", port))
        except OSError as err:
            raise DistributedError(f"process 0 serves the coordinator on port {port}, which is taken ({err.strerror}): "
                                   "choose another port in --coordinator_address") from None


def _wait_for(host: str, port: int, timeout_s: float) -> None:
    """The other processes connect to process 0: wait until its coordinator port answers."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=5):
                return
        except OSError as err:
            if time.monotonic() >= deadline:
                raise DistributedError(f"no coordinator answers at {host}:{port} after {timeout_s:.0f} s ({err}): "
                                       "start process 0 (it serves the coordinator) with the same "
                                       "--coordinator_address, or check the address") from None
            time.sleep(0.5)


def native_stdout_to_stderr() -> None:
    """Sends what native libraries print to standard output (Gloo, the CPU collectives of a
    multi-process run, announces every connection there) to standard error, while Python's
    `print` keeps the real standard output: a script's output stays its own."""
    sys.stdout.flush()
    kept = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = os.fdopen(kept, "w", buffering=1, encoding=sys.stdout.encoding or "utf-8")


def is_chief() -> bool:
    """Whether this is process 0, the one that prints, streams and writes."""
    return jax.process_index() == 0


def share(count: int, process_index: int | None = None, process_count: int | None = None) -> slice:
    """This process's contiguous share of `count` items: shares differ by at most one item, earlier
    processes take the larger ones (a process may get none)."""
    index = jax.process_index() if process_index is None else process_index
    processes = jax.process_count() if process_count is None else process_count
    base, extra = divmod(count, processes)
    start = index * base + min(index, extra)
    return slice(start, start + base + (index < extra))


_GATHERS = itertools.count()
"""Numbers the `gather` calls of this process (every process makes the same calls in the same
order), so that each call's values have their own keys."""


def gather(value: Any, timeout_s: int = 3600) -> list[Any]:
    """Every process's `value` (any picklable object: host arrays, a sampler's output), in process
    order, on every process. One process alone gets [value] without communicating.

    The processes finish their shares at different times, and a device collective's first use
    gives up once they arrive 30 s apart: so they first meet at a barrier of the coordinator
    (each waits up to `timeout_s` seconds), then exchange the pickled values in two all-gathers."""
    if jax.process_count() == 1:
        return [value]
    from jax._src import distributed as jax_distributed  # the client jax.distributed.initialize made
    from jax.experimental import multihost_utils

    jax_distributed.global_state.client.wait_at_barrier(f"huginn_jax_gather_{next(_GATHERS)}", timeout_s * 1000)
    data = np.frombuffer(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.array([data.size], np.int64))).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: data.size] = data
    rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
    return [pickle.loads(row[:size].tobytes()) for row, size in zip(rows, sizes)]


__all__ = ["DistributedError", "gather", "initialize", "is_chief", "native_stdout_to_stderr", "share"]
