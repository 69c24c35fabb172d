"""Resource limits and call guards for the sandbox children (stdlib only; imported by path).

`set_limits` caps memory, CPU, file size, open files and new processes. `install_guards` disables
destructive calls (process creation and killing, deletion outside the working directory,
chmod/chown, sockets, ctypes, ...) in the interpreter that will run a program. They are patches in
the same interpreter, so they stop accidents of buggy code, not a program written to undo them;
Landlock (`_landlock.py`) is the layer that holds against that.
"""

import os
import signal
import sys


def set_limits(limits):
    import resource

    def _set(name, value):
        if value is None or not hasattr(resource, name):
            return
        kind = getattr(resource, name)
        _, hard = resource.getrlimit(kind)
        if hard != resource.RLIM_INFINITY and value > hard:
            value = hard  # cannot raise a hard limit (unprivileged); the stricter one stays
        resource.setrlimit(kind, (value, value))

    _set("RLIMIT_AS", limits.get("memory_bytes"))
    _set("RLIMIT_CPU", limits.get("cpu_seconds"))
    _set("RLIMIT_FSIZE", limits.get("file_bytes"))
    _set("RLIMIT_NOFILE", limits.get("open_files"))
    _set("RLIMIT_CORE", 0)
    # 0 new processes for this uid. Note: root ignores RLIMIT_NPROC, hence the os/posix patches below.
    _set("RLIMIT_NPROC", 0)


def _disabled(name):
    def blocked(*args, **kwargs):
        raise PermissionError(f"{name} is disabled in the veomni eval sandbox")

    blocked.__name__ = name.rsplit(".", 1)[-1]
    return blocked


def install_guards(root):
    """Disable calls that could damage the host or escape the time/process accounting."""
    import posix
    import shutil
    import socket
    import subprocess

    root = os.path.realpath(root)

    def resolve(path, dir_fd=None, follow_last=False):
        if isinstance(path, int):
            raise PermissionError("fd-based file operations are disabled in the veomni eval sandbox")
        path = os.fsdecode(os.fspath(path))
        if dir_fd is not None and not os.path.isabs(path):
            # shutil.rmtree works relative to directory fds; resolve them through /proc (Linux).
            path = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), path)
        path = os.path.abspath(path)
        if follow_last:
            return os.path.realpath(path)
        # Resolve the parent only: removing a symlink that points outside is harmless.
        return os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))

    def inside(path, dir_fd=None, follow_last=False):
        p = resolve(path, dir_fd, follow_last)
        return p == root or p.startswith(root + os.sep)

    def guard_one(name, fn, follow_last=False):
        def guarded(path, *args, dir_fd=None, **kwargs):
            if not inside(path, dir_fd, follow_last):
                raise PermissionError(f"{name}({path!r}) outside the sandbox directory is disabled")
            if dir_fd is not None:
                kwargs["dir_fd"] = dir_fd
            return fn(path, *args, **kwargs)

        return guarded

    def guard_two(name, fn):
        def guarded(src, dst, *args, src_dir_fd=None, dst_dir_fd=None, **kwargs):
            if not (inside(src, src_dir_fd) and inside(dst, dst_dir_fd)):
                raise PermissionError(f"{name}({src!r}, {dst!r}) outside the sandbox directory is disabled")
            if src_dir_fd is not None:
                kwargs["src_dir_fd"] = src_dir_fd
            if dst_dir_fd is not None:
                kwargs["dst_dir_fd"] = dst_dir_fd
            return fn(src, dst, *args, **kwargs)

        return guarded

    # `os` copies its functions from `posix`: patch both, or `import posix; posix.fork()` escapes.
    for mod in (os, posix):
        for name in ("remove", "unlink", "rmdir"):
            if hasattr(mod, name):
                setattr(mod, name, guard_one(f"os.{name}", getattr(mod, name)))
        if hasattr(mod, "truncate"):
            mod.truncate = guard_one("os.truncate", mod.truncate, follow_last=True)
        for name in ("rename", "replace"):
            if hasattr(mod, name):
                setattr(mod, name, guard_two(f"os.{name}", getattr(mod, name)))
        # os.register_at_fork stays allowed: `random`, `threading` and `logging` call it when they
        # are first imported, so disabling it failed reference solutions that import random (and it
        # is harmless while fork itself is disabled).
        for name in (
            "system", "popen", "kill", "killpg", "fork", "forkpty", "vfork",
            "execv", "execve", "execl", "execle", "execlp", "execlpe", "execvp", "execvpe",
            "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe",
            "posix_spawn", "posix_spawnp", "setsid", "setpgid", "setpgrp", "setuid", "setgid",
            "seteuid", "setegid", "setreuid", "setregid", "setresuid", "setresgid", "chroot",
            "chdir", "fchdir", "chmod", "fchmod", "lchmod", "chown", "fchown", "lchown",
            "lchflags", "chflags", "removedirs", "renames", "link",
            "symlink", "mknod", "mkfifo", "pidfd_open", "sched_setaffinity", "setpriority",
            "nice", "plock", "ftruncate",
        ):
            if hasattr(mod, name):
                setattr(mod, name, _disabled(f"os.{name}"))

    shutil.rmtree = guard_one("shutil.rmtree", shutil.rmtree, follow_last=True)
    shutil.move = guard_two("shutil.move", shutil.move)
    shutil.chown = _disabled("shutil.chown")
    subprocess.Popen = _disabled("subprocess.Popen")
    try:
        import _posixsubprocess

        _posixsubprocess.fork_exec = _disabled("_posixsubprocess.fork_exec")
    except ImportError:
        pass
    for name in ("pthread_kill", "pidfd_send_signal"):
        if hasattr(signal, name):
            setattr(signal, name, _disabled(f"signal.{name}"))

    # No network: creating any socket fails. `import _socket` gets the patched C module too.
    import _socket

    for mod in (socket, _socket):
        for name in ("socket", "socketpair", "fromfd", "create_connection", "create_server",
                     "getaddrinfo", "gethostbyname", "gethostbyname_ex", "gethostbyaddr"):
            if hasattr(mod, name):
                setattr(mod, name, _disabled(f"socket.{name}"))

    # Modules that reach around the patches (raw syscalls, raising rlimits, spawning processes).
    for name in ("ctypes", "_ctypes", "resource", "multiprocessing", "_multiprocessing",
                 "pty", "psutil", "_posixsubprocess"):
        sys.modules[name] = None

