"""Confine this process, then replace it with `python -I -B` running the program (the sandbox's child side).

Run by `huginn_jax.tasks.sandbox` as `python -I -S sandbox_launcher.py CONFIG_JSON` with the working
directory set to the program's empty folder. It uses only the standard library (ctypes for the
kernel interfaces) and applies, in this order, each layer the kernel offers:

1. resource limits: CPU seconds, address space, file size, open files, processes, no core dumps;
2. `no_new_privs` (needed for 3 and 5 without privileges);
3. Landlock (Linux >= 5.13): the file system is read-only, and only in the folders listed in
   `read_paths` (the Python installation, system libraries); the program's folder is the only place
   it can create, write or delete files; where the kernel's Landlock ABI has them (>= 4, >= 6) TCP
   bind/connect are denied and signals to processes outside the sandbox are blocked;
4. as root: every capability is dropped from the bounding set, so the program runs as uid 0 without
   any capability (it cannot raise its limits, mount, reboot, load modules, ...);
5. seccomp (x86-64, aarch64): no new processes (fork, vfork, clone without CLONE_THREAD, clone3),
   no sockets at all, no io_uring, no ptrace or cross-process memory access, signals only to
   itself (kill, tkill, tgkill, rt_sigqueueinfo, pidfd_*), and no changes of file metadata
   (chmod, chown, utime, extended attributes: Landlock does not cover them), enforced by the
   kernel even for root.

A layer the kernel lacks is skipped and recorded in the JSON line this script prints to stderr
with `--probe` (the parent's `sandbox.protections()`). Errors while confining exit with code 125.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import platform
import resource
import struct
import sys

SETUP_FAILED = 125

# Runs the program as __main__ and, only when it returns normally, writes the parent's token as
# the last line of stdout: an early exit (sys.exit, os._exit, a signal) cannot count as a pass.
RUNNER = """\
import os, sys
path, token = sys.argv[1], sys.argv[2].encode()
del sys.argv[1:]
try:
    with open(path, encoding="utf-8") as f:
        code = compile(f.read(), path, "exec")
    exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
except BaseException:
    import traceback
    traceback.print_exc()
    sys.stderr.flush()
    os._exit(1)
sys.stdout.flush()
os.write(1, b"\\n" + token + b"\\n")
os._exit(0)
"""

# --------------------------------------------------------------------------- Landlock (uapi)
_SYS_LANDLOCK_CREATE_RULESET, _SYS_LANDLOCK_ADD_RULE, _SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446
_LANDLOCK_CREATE_RULESET_VERSION = 1
_LANDLOCK_RULE_PATH_BENEATH = 1
_FS_EXECUTE, _FS_READ_FILE, _FS_READ_DIR = 1 << 0, 1 << 2, 1 << 3
_FS_ALL_BY_ABI = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 5: (1 << 16) - 1}
_FS_FILE_RIGHTS = (1 << 0) | (1 << 1) | (1 << 2) | (1 << 14) | (1 << 15)  # execute, write, read, truncate, ioctl
_NET_BIND_TCP, _NET_CONNECT_TCP = 1 << 0, 1 << 1
_SCOPE_ABSTRACT_UNIX_SOCKET, _SCOPE_SIGNAL = 1 << 0, 1 << 1
_PR_SET_NO_NEW_PRIVS, _PR_CAPBSET_DROP, _PR_SET_SECCOMP = 38, 24, 22
_SECCOMP_MODE_FILTER = 2

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def landlock_abi() -> int:
    """The kernel's Landlock ABI version, 0 when Landlock is missing or disabled."""
    if platform.system() != "Linux":
        return 0
    version = _libc.syscall(_SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0),
                            ctypes.c_uint32(_LANDLOCK_CREATE_RULESET_VERSION))
    return max(int(version), 0)


def apply_landlock(abi: int, read_paths: list[str], write_path: str) -> dict[str, bool]:
    """Deny every file-system access except reading/executing under `read_paths` and everything
    under `write_path`; deny TCP and outside signals where the ABI allows."""
    fs_all = _FS_ALL_BY_ABI[max(k for k in _FS_ALL_BY_ABI if k <= abi)]
    net = _NET_BIND_TCP | _NET_CONNECT_TCP if abi >= 4 else 0
    scoped = _SCOPE_ABSTRACT_UNIX_SOCKET | _SCOPE_SIGNAL if abi >= 6 else 0
    attr = struct.pack("=QQQ", fs_all, net, scoped)
    size = 24 if abi >= 6 else 16 if abi >= 4 else 8
    buffer = ctypes.create_string_buffer(attr[:size], size)
    ruleset = _check(_libc.syscall(_SYS_LANDLOCK_CREATE_RULESET, buffer, ctypes.c_size_t(size),
                                   ctypes.c_uint32(0)), "landlock_create_ruleset")
    read_access = _FS_EXECUTE | _FS_READ_FILE | _FS_READ_DIR
    for path, access in [*((p, read_access) for p in read_paths), (write_path, fs_all)]:
        try:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        if not os.path.isdir(path):  # a rule on a file takes only the rights that apply to files
            access &= _FS_FILE_RIGHTS
        rule = ctypes.create_string_buffer(struct.pack("=Qi", access, fd), 12)
        _check(_libc.syscall(_SYS_LANDLOCK_ADD_RULE, ctypes.c_int(ruleset),
                             ctypes.c_int(_LANDLOCK_RULE_PATH_BENEATH), rule, ctypes.c_uint32(0)),
               f"landlock_add_rule {path}")
        os.close(fd)
    _check(_libc.syscall(_SYS_LANDLOCK_RESTRICT_SELF, ctypes.c_int(ruleset), ctypes.c_uint32(0)),
           "landlock_restrict_self")
    os.close(ruleset)
    return {"filesystem": True, "tcp": bool(net), "signals_scoped": bool(scoped)}


# --------------------------------------------------------------------------- seccomp (classic BPF)
_AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
# name: (x86_64 number, aarch64 number); None where the architecture has no such call
_SYSCALLS = {
    "fork": (57, None), "vfork": (58, None), "clone": (56, 220), "clone3": (435, 435),
    "socket": (41, 198), "io_uring_setup": (425, 425), "io_uring_enter": (426, 426),
    "io_uring_register": (427, 427), "ptrace": (101, 117), "process_vm_readv": (310, 270),
    "process_vm_writev": (311, 271), "pidfd_open": (434, 434), "pidfd_send_signal": (424, 424),
    "pidfd_getfd": (438, 438), "kill": (62, 129), "tkill": (200, 130), "tgkill": (234, 131),
    "rt_sigqueueinfo": (129, 138), "rt_tgsigqueueinfo": (297, 240),
    # file metadata, which Landlock does not cover: denied everywhere
    "chmod": (90, None), "fchmod": (91, 52), "fchmodat": (268, 53), "fchmodat2": (452, 452),
    "chown": (92, None), "fchown": (93, 55), "lchown": (94, None), "fchownat": (260, 54),
    "utime": (132, None), "utimes": (235, None), "futimesat": (261, None), "utimensat": (280, 88),
    "setxattr": (188, 5), "lsetxattr": (189, 6), "fsetxattr": (190, 7), "removexattr": (197, 14),
    "lremovexattr": (198, 15), "fremovexattr": (199, 16), "setxattrat": (463, 463),
    "removexattrat": (466, 466),
}
_METADATA_CALLS = ("chmod", "fchmod", "fchmodat", "fchmodat2", "chown", "fchown", "lchown",
                   "fchownat", "utime", "utimes", "futimesat", "utimensat", "setxattr", "lsetxattr",
                   "fsetxattr", "removexattr", "lremovexattr", "fremovexattr", "setxattrat",
                   "removexattrat")
_LD_W_ABS, _JEQ_K, _JSET_K, _JGE_K, _RET_K = 0x20, 0x15, 0x45, 0x35, 0x06
_RET_ALLOW, _RET_KILL_PROCESS = 0x7FFF0000, 0x80000000
_CLONE_THREAD = 0x00010000
_OFFSET_NR, _OFFSET_ARCH, _OFFSET_ARG0 = 0, 4, 16  # struct seccomp_data; low word of args[0]


def _errno(code: int) -> int:
    return 0x00050000 | code


def seccomp_program(machine: str, pid: int) -> list[tuple[int, int, int, int]]:
    """The filter as (code, jt, jf, k) instructions: a list of per-syscall blocks, each of which
    returns; anything not listed is allowed."""
    column = {"x86_64": 0, "aarch64": 1}[machine]
    nr = {name: numbers[column] for name, numbers in _SYSCALLS.items() if numbers[column] is not None}
    own = (pid & 0xFFFFFFFF, 0, (-pid) & 0xFFFFFFFF)  # kill() targets that are this process
    prog = [(_LD_W_ABS, 0, 0, _OFFSET_ARCH), (_JEQ_K, 1, 0, _AUDIT_ARCH[machine]),
            (_RET_K, 0, 0, _RET_KILL_PROCESS), (_LD_W_ABS, 0, 0, _OFFSET_NR)]
    if machine == "x86_64":  # x32 system calls share the arch value; refuse them all
        prog += [(_JGE_K, 0, 1, 0x40000000), (_RET_K, 0, 0, _errno(errno.EPERM))]

    def deny(name: str, code: int = errno.EPERM) -> None:
        if name in nr:
            prog.extend([(_JEQ_K, 0, 1, nr[name]), (_RET_K, 0, 0, _errno(code))])

    def allow_if_arg0(name: str, values: tuple[int, ...]) -> None:
        """Allow `name` only when its first argument is one of `values` (this process)."""
        if name not in nr:
            return
        block = [(_LD_W_ABS, 0, 0, _OFFSET_ARG0)]
        for i, value in enumerate(values):
            block.append((_JEQ_K, len(values) - i, 0, value))  # jump to the ALLOW below
        block += [(_RET_K, 0, 0, _errno(errno.EPERM)), (_RET_K, 0, 0, _RET_ALLOW)]
        prog.append((_JEQ_K, 0, len(block), nr[name]))
        prog.extend(block)

    for name in ("fork", "vfork", "socket", "io_uring_setup", "io_uring_enter", "io_uring_register",
                 "ptrace", "process_vm_readv", "process_vm_writev", "pidfd_open",
                 "pidfd_send_signal", "pidfd_getfd", *_METADATA_CALLS):
        deny(name)
    deny("clone3", errno.ENOSYS)  # the C library then falls back to clone, checked below
    # clone: threads (CLONE_THREAD in the flags, the first argument on both architectures) only
    prog += [(_JEQ_K, 0, 4, nr["clone"]), (_LD_W_ABS, 0, 0, _OFFSET_ARG0),
             (_JSET_K, 1, 0, _CLONE_THREAD), (_RET_K, 0, 0, _errno(errno.EPERM)),
             (_RET_K, 0, 0, _RET_ALLOW)]
    allow_if_arg0("kill", own)
    allow_if_arg0("tkill", own[:1])
    for name in ("tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo"):
        allow_if_arg0(name, own[:1])
    prog.append((_RET_K, 0, 0, _RET_ALLOW))
    return prog


def apply_seccomp(machine: str) -> None:
    prog = seccomp_program(machine, os.getpid())
    raw = b"".join(struct.pack("=HBBI", *ins) for ins in prog)
    filters = ctypes.create_string_buffer(raw, len(raw))

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = SockFprog(len(prog), ctypes.cast(filters, ctypes.c_void_p))
    _check(_libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0),
           "prctl(PR_SET_SECCOMP)")


# --------------------------------------------------------------------------- the rest

def set_limits(limits: dict[str, int]) -> None:
    """Soft and hard limits to the given values (never above the inherited hard limit); the CPU
    limit sends SIGXCPU at the value and SIGKILL one second later."""
    for name, value in limits.items():
        kind = getattr(resource, name)
        inherited = resource.getrlimit(kind)[1]
        hard = value + (name == "RLIMIT_CPU")
        if inherited != resource.RLIM_INFINITY:
            hard = min(hard, inherited)
        resource.setrlimit(kind, (min(value, hard), hard))


def drop_capabilities() -> bool:
    """As root, empty the capability bounding set so that the exec'd program has none."""
    if os.geteuid() != 0:
        return False
    for cap in range(64):  # until the kernel says the capability does not exist
        if _libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) < 0:
            if ctypes.get_errno() == errno.EINVAL and cap > 0:
                return True
            _check(-1, f"prctl(PR_CAPBSET_DROP, {cap})")
    return True


def confine(config: dict) -> dict[str, bool]:
    """Apply every layer available; return which ones are active."""
    active = {"rlimits": True, "filesystem": False, "tcp": False, "signals_scoped": False,
              "capabilities_dropped": False, "seccomp": False}
    set_limits(config["limits"])
    if platform.system() != "Linux":
        return active
    _check(_libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
    abi = landlock_abi()
    if abi:
        active.update(apply_landlock(abi, config["read_paths"], config["write_path"]))
    active["capabilities_dropped"] = drop_capabilities()
    machine = platform.machine()
    if machine in _AUDIT_ARCH:
        apply_seccomp(machine)
        active["seccomp"] = True
    return active


def main(argv: list[str]) -> None:
    probe = argv[1] == "--probe"
    config = json.loads(argv[2] if probe else argv[1])
    try:
        active = confine(config)
    except Exception as exc:  # any failure to confine: never run the program unconfined
        print(f"sandbox setup failed: {exc}", file=sys.stderr)
        os._exit(SETUP_FAILED)
    if probe:
        print(json.dumps(active), file=sys.stderr)
        os._exit(0)
    os.execv(sys.executable, [sys.executable, "-I", "-B", "-c", RUNNER, config["program"], config["token"]])


if __name__ == "__main__":
    main(sys.argv)
