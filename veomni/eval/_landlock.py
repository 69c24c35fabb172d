"""Landlock (Linux >= 5.13): let a sandbox child give up filesystem access before running code.

Used by `_sandbox_child.py` (by path, so stdlib only; must not import veomni) and probed by
`sandbox.py`. After `restrict(read, write)` the process can only open files beneath the `read`
paths (read / execute) and the `write` paths (everything), cannot ptrace or read the memory of any
process outside its own Landlock domain (this covers /proc/<pid>/mem of the scorer), and, where the
kernel has them (ABI >= 4 / 6), cannot bind or connect TCP sockets, signal processes outside the
domain or reach abstract Unix sockets. Open file descriptors keep working.

Why: without it a program can read the benchmark file with the reference solutions, the
harness' temporary files or the scorer's environment, and pass without solving anything.
"""

import ctypes
import os
import stat
import sys

_CREATE_RULESET, _ADD_RULE, _RESTRICT_SELF = 444, 445, 446  # the same numbers on every Linux arch
_VERSION_FLAG = 1  # LANDLOCK_CREATE_RULESET_VERSION
_RULE_PATH_BENEATH = 1
_PR_SET_NO_NEW_PRIVS = 38

_EXECUTE, _WRITE_FILE, _READ_FILE, _READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
_ABI1_ALL = (1 << 13) - 1  # execute .. make_sym
_REFER, _TRUNCATE, _IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
_NET_BIND_TCP, _NET_CONNECT_TCP = 1 << 0, 1 << 1
_SCOPE_ABSTRACT_UNIX, _SCOPE_SIGNAL = 1 << 0, 1 << 1


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def abi_version() -> tuple:
    """(abi, reason): abi >= 1 when Landlock can be used here, else 0 and why not."""
    if not sys.platform.startswith("linux"):
        return 0, f"Landlock is Linux-only (platform {sys.platform})"
    libc = _libc()
    libc.syscall.restype = ctypes.c_long
    abi = libc.syscall(_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(_VERSION_FLAG))
    if abi < 1:
        err = ctypes.get_errno()
        return 0, f"landlock_create_ruleset failed: {os.strerror(err)} (kernel without Landlock, or disabled)"
    return int(abi), "ok"


def _fs_rights(abi: int) -> int:
    rights = _ABI1_ALL
    if abi >= 2:
        rights |= _REFER
    if abi >= 3:
        rights |= _TRUNCATE
    if abi >= 5:
        rights |= _IOCTL_DEV
    return rights


def _file_only(rights: int) -> int:
    # A rule on a non-directory may only carry the rights that make sense for a file.
    return rights & (_EXECUTE | _WRITE_FILE | _READ_FILE | _TRUNCATE | _IOCTL_DEV)


def restrict(read_paths, write_paths) -> int:
    """Apply the ruleset to this process (irreversible); returns the ABI used. Missing paths are
    skipped. Raises OSError when Landlock is unavailable or a call fails."""
    abi, reason = abi_version()
    if abi < 1:
        raise OSError(reason)
    libc = _libc()
    libc.syscall.restype = ctypes.c_long
    handled = _fs_rights(abi)
    attr = _RulesetAttr(handled, _NET_BIND_TCP | _NET_CONNECT_TCP if abi >= 4 else 0,
                        _SCOPE_ABSTRACT_UNIX | _SCOPE_SIGNAL if abi >= 6 else 0)
    size = 8 if abi < 4 else (16 if abi < 6 else 24)  # the struct grew with the ABI
    ruleset = libc.syscall(_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    if ruleset < 0:
        raise OSError(ctypes.get_errno(), "landlock_create_ruleset")
    try:
        rules = [(p, _EXECUTE | _READ_FILE | _READ_DIR) for p in read_paths]
        rules += [(p, handled) for p in write_paths]
        for path, rights in rules:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                if not stat.S_ISDIR(os.fstat(fd).st_mode):
                    rights = _file_only(rights)
                rule = _PathBeneathAttr(rights & handled, fd)
                if libc.syscall(_ADD_RULE, ctypes.c_int(ruleset), ctypes.c_int(_RULE_PATH_BENEATH),
                                ctypes.byref(rule), ctypes.c_uint32(0)) != 0:
                    raise OSError(ctypes.get_errno(), f"landlock_add_rule({path!r})")
            finally:
                os.close(fd)
        if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
        if libc.syscall(_RESTRICT_SELF, ctypes.c_int(ruleset), ctypes.c_uint32(0)) != 0:
            raise OSError(ctypes.get_errno(), "landlock_restrict_self")
    finally:
        os.close(ruleset)
    return abi


# What a Python program needs to read after start-up: the interpreter's own trees (stdlib,
# site-packages), shared libraries and the few /etc files libc and the stdlib consult. Nothing
# else: not $HOME, not /tmp (other samples' working directories), not /proc (other processes).
SYSTEM_READ_PATHS = (
    "/usr", "/lib", "/lib64", "/lib32", "/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d",
    "/etc/localtime", "/etc/timezone", "/etc/passwd", "/etc/group", "/etc/nsswitch.conf",
    "/etc/mime.types", "/dev/urandom", "/dev/random", "/dev/zero", "/sys/devices/system/cpu",
)


def python_read_paths() -> list:
    """The interpreter's prefixes and every sys.path entry (call after dropping the script dir)."""
    paths = [sys.prefix, sys.exec_prefix, getattr(sys, "base_prefix", sys.prefix),
             getattr(sys, "base_exec_prefix", sys.exec_prefix)]
    paths += [p for p in sys.path if p]
    return list(dict.fromkeys(os.path.abspath(p) for p in paths))
