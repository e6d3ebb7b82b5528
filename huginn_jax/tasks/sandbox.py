"""Run untrusted Python programs (generated code plus its tests) one per confined subprocess.

Each program runs in a fresh empty temporary folder (its working directory, HOME and TMPDIR),
removed afterwards, under `python -I` (isolated: no PYTHON* variables, no user site, no script
folder on sys.path) with a scrubbed environment (PATH=/usr/bin:/bin, LANG, HOME, TMPDIR and nothing
else: no inherited tokens or keys), stdin from /dev/null, in a new session (its own process group,
killed as a whole at the end). `sandbox_launcher.py` confines the child before it starts the
program; on Linux with Landlock and seccomp (this project's machines) that means:

protected against
  - time: CPU seconds (RLIMIT_CPU) and a wall-clock timeout after which the group is killed;
  - memory: the address space (RLIMIT_AS);
  - processes: fork/vfork/clone/clone3 of new processes fail (seccomp), also as root where
    RLIMIT_NPROC is not enforced; RLIMIT_NPROC is set as well (it binds for non-root users);
  - the file system: writes, creation, deletion and renames only inside its own folder; reads
    only of the Python installation and the system's library folders (Landlock); no changes of
    file metadata anywhere (chmod, chown, utime, xattrs: seccomp); files written at most
    `file_size_bytes` each (RLIMIT_FSIZE), stdout/stderr included;
  - the network: no socket can be created (seccomp; Landlock also denies TCP where available);
  - other processes: signals only to itself (seccomp; Landlock signal scoping where available),
    no ptrace, no cross-process memory access; as root every capability is dropped, so the
    program can neither raise its limits nor mount, reboot or load modules;
  - early exits: a program passes only if it returns normally and exits 0 (sys.exit, os._exit,
    a signal or an uncaught exception fail).
not protected against
  - reading the Python installation and the system folders (/usr, /lib, /etc, ...);
  - filling its own folder with many files of up to `file_size_bytes` each within its time limit;
  - CPU and memory use by up to `workers` programs at once (limits are per program);
  - kernel exploits, side channels, and exhaustion of shared kernel resources within the limits;
  - on kernels without Landlock or seccomp (or other systems), those layers are missing:
    `protections()` reports what is active, and then only the limits, the session and the
    scrubbed environment hold (as root without seccomp, not even the process limit).

The outcome is a small record: passed / failed (an exception or a non-zero exit) / timeout (wall
clock or CPU limit) / error (killed by another signal, e.g. the file-size limit, or the sandbox
could not be set up), with the tail of stderr.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import os
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Literal, Sequence

from huginn_jax.tasks import sandbox_launcher

Status = Literal["passed", "failed", "timeout", "error"]
PROGRAM_FILE = "program.py"
LAUNCHER = Path(sandbox_launcher.__file__).resolve()
SYSTEM_READ_PATHS = ("/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin", "/etc/ld.so.cache",
                     "/etc/localtime", "/usr/lib/locale")
STDERR_TAIL_CHARS = 2000


@dataclasses.dataclass(frozen=True)
class Limits:
    """Per-program limits. The standard harnesses (human-eval, lm-eval's code_eval) give each
    program 3 s of wall time; most tests take milliseconds, but MBPP 123's reference solution
    needs 2.7 s of CPU on this project's machines, so the CPU limit is 5 s and the wall limit,
    which also absorbs a loaded machine (programs run side by side), 15 s."""

    wall_seconds: float = 15.0
    cpu_seconds: int = 5
    memory_bytes: int = 2 << 30
    file_size_bytes: int = 16 << 20
    open_files: int = 64
    max_processes: int = 64


@dataclasses.dataclass(frozen=True)
class ExecutionResult:
    passed: bool
    status: Status
    returncode: int | None  # None when killed at the wall-clock limit
    seconds: float
    stderr_tail: str


def _read_paths() -> list[str]:
    """Folders (and files) the program may read and execute: the interpreter and its libraries."""
    paths = {sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix,
             sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["platstdlib"],
             str(Path(sys.executable).resolve().parent)}
    return sorted({*paths, *SYSTEM_READ_PATHS})


def _launcher_command(config: dict, probe: bool = False) -> list[str]:
    return [sys.executable, "-I", "-S", str(LAUNCHER), *(["--probe"] if probe else []),
            json.dumps(config)]


def _config(limits: Limits, folder: str, token: str) -> dict:
    return {
        "limits": {"RLIMIT_CPU": int(limits.cpu_seconds), "RLIMIT_AS": int(limits.memory_bytes),
                   "RLIMIT_FSIZE": int(limits.file_size_bytes), "RLIMIT_NOFILE": int(limits.open_files),
                   "RLIMIT_NPROC": int(limits.max_processes), "RLIMIT_CORE": 0},
        "read_paths": _read_paths(), "write_path": folder,
        "program": os.path.join(folder, PROGRAM_FILE), "token": token,
    }


def _environment(folder: str) -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "HOME": folder, "TMPDIR": folder, "LANG": "C.UTF-8"}


def _remove_tree(folder: str) -> None:
    """Remove the program's folder even where it made entries read-only."""

    def make_writable_and_retry(function, path, _exc):
        for p in (os.path.dirname(path), path):
            try:
                os.chmod(p, stat.S_IRWXU)
            except OSError:
                pass
        function(path)

    shutil.rmtree(folder, onexc=make_writable_and_retry) if sys.version_info >= (3, 12) \
        else shutil.rmtree(folder, onerror=make_writable_and_retry)


def _tail(file, chars: int) -> str:
    file.seek(0, os.SEEK_END)
    size = file.tell()
    file.seek(max(0, size - 4 * chars))
    return file.read().decode("utf-8", errors="replace")[-chars:]


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_program(source: str, limits: Limits = Limits()) -> ExecutionResult:
    """Run `source` as `__main__` in a fresh confined subprocess and classify the outcome."""
    folder = tempfile.mkdtemp(prefix="huginn-sandbox-")
    token = secrets.token_hex(16)
    start = time.monotonic()
    try:
        Path(folder, PROGRAM_FILE).write_text(source, encoding="utf-8")
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            process = subprocess.Popen(
                _launcher_command(_config(limits, folder, token)), cwd=folder,
                env=_environment(folder), stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                start_new_session=True, close_fds=True)
            try:
                returncode: int | None = process.wait(timeout=limits.wall_seconds)
            except subprocess.TimeoutExpired:
                _kill_group(process.pid)  # still unreaped, so its pid (the group id) is ours
                process.wait()
                returncode = None
            _kill_group(process.pid)  # anything left in its group (none can exist under seccomp)
            seconds = time.monotonic() - start
            stdout_tail, stderr_tail = _tail(out, 200), _tail(err, STDERR_TAIL_CHARS)
    finally:
        _remove_tree(folder)
    status = _classify(returncode, stdout_tail, stderr_tail, token)
    return ExecutionResult(status == "passed", status, returncode, seconds, stderr_tail)


def _classify(returncode: int | None, stdout_tail: str, stderr_tail: str, token: str) -> Status:
    if returncode is None or returncode == -signal.SIGXCPU:
        return "timeout"
    if returncode == sandbox_launcher.SETUP_FAILED and "sandbox setup failed" in stderr_tail:
        return "error"
    if returncode == 0:
        return "passed" if stdout_tail.endswith(f"\n{token}\n") else "failed"
    return "failed" if returncode > 0 else "error"


def run_programs(sources: Sequence[str], limits: Limits = Limits(),
                 workers: int | None = None) -> list[ExecutionResult]:
    """Run many programs, at most `workers` at once (default: the CPU cores), results in order."""
    workers = workers or os.cpu_count() or 1
    if not sources:
        return []
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(workers, len(sources))) as pool:
        return list(pool.map(functools.partial(run_program, limits=limits), sources))


@functools.cache
def protections() -> dict[str, bool]:
    """Which confinement layers this machine gives a program (probed once, by the launcher)."""
    folder = tempfile.mkdtemp(prefix="huginn-sandbox-probe-")
    try:
        result = subprocess.run(_launcher_command(_config(Limits(), folder, ""), probe=True),
                                cwd=folder, env=_environment(folder), stdin=subprocess.DEVNULL,
                                capture_output=True, text=True, timeout=60)
    finally:
        _remove_tree(folder)
    if result.returncode != 0:
        raise RuntimeError(f"the sandbox cannot be set up on this machine: {result.stderr.strip()}")
    return json.loads(result.stderr.strip().splitlines()[-1])
