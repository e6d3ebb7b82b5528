"""The code sandbox against ordinary and hostile programs.

Every hostile program must end as a failure (never "passed"), leave a watched folder outside the
sandbox byte-for-byte unchanged, leave this process (its parent) alive, and not stop the programs
run after it. Limits are small so that the module runs in a few seconds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import socket
import time
from pathlib import Path

import pytest

from huginn_jax.tasks import sandbox

FAST = sandbox.Limits(wall_seconds=2.5, cpu_seconds=1, memory_bytes=512 << 20, file_size_bytes=1 << 20)


def folder_digest(folder: Path) -> str:
    """A hash of every path, mode and content under `folder`."""
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        digest.update(str(path.relative_to(folder)).encode())
        digest.update(oct(path.lstat().st_mode).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.fixture()
def watched(tmp_path: Path) -> Path:
    folder = tmp_path / "watched"
    (folder / "sub").mkdir(parents=True)
    (folder / "keep.txt").write_text("precious\n")
    (folder / "sub" / "data.bin").write_bytes(os.urandom(256))
    return folder


def test_this_machine_gives_every_protection():
    """The CI machines (Linux with Landlock and seccomp) must confine programs fully; elsewhere
    this test names the layer that is missing."""
    assert sandbox.protections() == {"rlimits": True, "filesystem": True, "tcp": True,
                                     "signals_scoped": True, "capabilities_dropped": os.geteuid() == 0,
                                     "seccomp": True}


def test_ordinary_programs_pass_or_fail_by_their_outcome():
    ok, failing, syntax, early_exit, hard_exit = sandbox.run_programs([
        "import math, collections, heapq, re\nassert math.gcd(12, 18) == 6\nprint('done')",
        "def f(x):\n    return x + 1\nassert f(1) == 3, 'wrong'",
        "def f(:\n    pass",
        "import sys\nsys.exit(0)\nassert False",   # exits before its tests: not a pass
        "import os\nos._exit(0)\nassert False",
    ], FAST)
    assert (ok.passed, ok.status, ok.returncode) == (True, "passed", 0)
    assert (failing.passed, failing.status) == (False, "failed") and "AssertionError: wrong" in failing.stderr_tail
    assert syntax.status == "failed" and "SyntaxError" in syntax.stderr_tail
    assert early_exit.status == "failed" and "SystemExit" in early_exit.stderr_tail
    assert hard_exit.status == "failed" and hard_exit.returncode == 0  # exit 0 without the token


def test_program_runs_in_an_empty_scrubbed_folder_that_is_removed(monkeypatch):
    monkeypatch.setenv("HUGINN_TEST_SECRET", "s3cr3t")
    probe = ("import os, sys\n"
             "assert sorted(os.listdir('.')) == ['program.py'], os.listdir('.')\n"
             "assert 'HUGINN_TEST_SECRET' not in os.environ, 'secret leaked'\n"
             "assert set(os.environ) <= {'PATH', 'HOME', 'TMPDIR', 'LANG', 'LC_CTYPE'}, sorted(os.environ)\n"
             "assert sys.flags.isolated == 1\n"
             "assert os.environ['HOME'] == os.getcwd() == os.environ['TMPDIR']\n"
             "open('left_behind.txt', 'w').write('x')\n"
             "print(os.getcwd())")
    before = set(Path(os.environ.get("TMPDIR", "/tmp")).glob("huginn-sandbox-*"))
    result = sandbox.run_program(probe, FAST)
    assert result.status == "passed", result.stderr_tail
    assert set(Path(os.environ.get("TMPDIR", "/tmp")).glob("huginn-sandbox-*")) <= before


HOSTILE = {
    "infinite loop": ("while True:\n    pass", "timeout"),
    "sleeping past the wall clock": ("import time\ntime.sleep(60)", "timeout"),
    "memory bomb": ("blocks = []\nwhile True:\n    blocks.append(bytearray(50 << 20))", "failed"),
    "fork bomb": ("import os\nwhile True:\n    os.fork()", "failed"),
    "subprocess": ("import subprocess\nsubprocess.run(['/bin/true'], check=True)", "failed"),
    "raw fork system call": ("import ctypes\nassert ctypes.CDLL(None).fork() >= 0", "failed"),
    "raising its own limits": ("import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))", "failed"),
    "huge file": ("open('big.bin', 'wb').write(b'0' * (8 << 20))", "failed"),
    "killing its parent": ("import os\nos.kill(os.getppid(), 9)", "failed"),
    "killing everything": ("import os\nos.kill(-1, 9)", "failed"),
}


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_programs_are_contained(name, watched):
    source, status = HOSTILE[name]
    # touching 500 MB costs the kernel about a second of CPU time in a VM: the memory bomb gets the
    # CPU to reach its memory limit, which must be what stops it
    limits = dataclasses.replace(FAST, cpu_seconds=5, wall_seconds=6) if name == "memory bomb" else FAST
    before = folder_digest(watched)
    start = time.monotonic()
    result = sandbox.run_program(source, limits)
    assert not result.passed and result.status == status, (result.status, result.stderr_tail)
    assert time.monotonic() - start < limits.wall_seconds + 2
    assert folder_digest(watched) == before


def test_file_system_outside_its_folder_is_out_of_reach(watched):
    before = folder_digest(watched)
    attacks = [
        f"open({str(watched / 'new.txt')!r}, 'w').write('x')",                 # write outside
        f"open({str(watched / 'keep.txt')!r}, 'a').write('tampered')",         # append
        f"import os\nos.remove({str(watched / 'keep.txt')!r})",                # delete a file
        f"import shutil\nshutil.rmtree({str(watched / 'sub')!r})",             # delete a tree
        f"import os\nos.rename({str(watched / 'keep.txt')!r}, 'stolen.txt')",  # move it in
        f"import os\nos.chmod({str(watched / 'keep.txt')!r}, 0)",
        f"print(open({str(watched / 'keep.txt')!r}).read())",                  # even reading
        "print(open('/proc/self/environ').read())",
    ]
    results = sandbox.run_programs(attacks, FAST)
    assert [r.status for r in results] == ["failed"] * len(attacks), [r.stderr_tail for r in results]
    assert all("Error" in r.stderr_tail for r in results)
    assert folder_digest(watched) == before


def test_network_is_unreachable():
    """Connecting to a listening socket on this machine's loopback fails, and nothing arrives."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        server.settimeout(0.2)
        port = server.getsockname()[1]
        tcp, udp = sandbox.run_programs([
            f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1).sendall(b'hi')",
            f"import socket\nsocket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'hi', ('127.0.0.1', {port}))",
        ], FAST)
        with pytest.raises(socket.timeout):
            server.accept()
    assert tcp.status == udp.status == "failed"
    assert "PermissionError" in tcp.stderr_tail and "PermissionError" in udp.stderr_tail


def test_pool_runs_programs_side_by_side_and_keeps_going_after_hostile_ones(watched):
    before = folder_digest(watched)
    sources = [HOSTILE["infinite loop"][0], "assert sum(range(10)) == 45",
               HOSTILE["fork bomb"][0], "assert 1 == 2", HOSTILE["killing its parent"][0],
               "print('still running')"]
    start = time.monotonic()
    results = sandbox.run_programs(sources, FAST, workers=3)
    assert [r.status for r in results] == ["timeout", "passed", "failed", "failed", "failed", "passed"]
    assert time.monotonic() - start < 2 * FAST.wall_seconds  # the loop did not hold up the rest
    assert folder_digest(watched) == before
    assert sandbox.run_programs([], FAST) == []
