"""One run per output_dir, and no orphaned workers.

Why: torchrun starts each worker in a session of its own, so a SIGKILL of the launcher (the OOM
killer, a scheduler's preemption) does not reach the workers. The orphan kept training and saving
while the user's re-launch started in the same output_dir; the two then pruned and renamed each
other's checkpoints (seen: FileNotFoundError .../global_step_3.tmp-*/.metadata.tmp).

Two guards, both started by the trainer:
  * `OutputDirLock`: an exclusive flock on <output_dir>/.veomni.lock, held by the main rank for
    the whole run. A second run refuses at once and names the holder (host, pid, since when). The
    kernel drops a flock when its process dies, so the lock of a dead run is simply taken over
    (its stale holder line is reported and replaced).
  * `watch_launcher()`: in a torchrun worker, a daemon thread that notices the launcher is gone
    (the worker was re-parented) and ends the process within about a second.
"""
from __future__ import annotations

import datetime
import errno
import json
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Optional

logger = logging.getLogger("veomni")

LOCK_NAME = ".veomni.lock"


class OutputDirBusyError(RuntimeError):
    """Another live run holds the output directory."""


def _describe(holder: dict) -> str:
    return (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, running since "
            f"{holder.get('since', '?')}")


class OutputDirLock:
    """Exclusive, process-lifetime lock on an output directory (fcntl.flock; Linux/macOS)."""

    def __init__(self, output_dir):
        self.dir = Path(output_dir)
        self.path = self.dir / LOCK_NAME
        self._fd: Optional[int] = None

    def read_holder(self) -> dict:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def acquire(self) -> None:
        import fcntl

        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            raise OutputDirBusyError(
                f"train.output_dir={self.dir} is in use by another run: {_describe(self.read_holder())} "
                f"(lock file {self.path}). Wait for it to finish, stop it, or choose another "
                "train.output_dir.") from None
        previous = self.read_holder()
        if previous:
            logger.warning("taking over the lock of %s: that run is no longer alive", _describe(previous))
        holder = {"host": socket.gethostname(), "pid": os.getpid(),
                  "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                  "argv": sys.argv}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        # Empty the holder line first so the next run does not report a "stale" holder.
        try:
            os.ftruncate(self._fd, 0)
        except OSError:
            pass
        os.close(self._fd)  # closing the descriptor drops the flock
        self._fd = None


def launched_by_torchrun() -> bool:
    # torchrun's elastic agent sets these for the processes it starts (not for plain `python`).
    return "TORCHELASTIC_RUN_ID" in os.environ and "LOCAL_RANK" in os.environ


def watch_launcher(poll_s: float = 0.5, parent_pid: Optional[int] = None) -> Optional[threading.Thread]:
    """End this process soon after its launcher dies (torchrun workers only; None otherwise).

    The launcher is this process's parent. When it dies the kernel re-parents us (to init or a
    subreaper), so os.getppid() changes; the thread then logs why and calls os._exit. A checkpoint
    being written at that moment is left as a `.tmp-` directory, which resume ignores.
    """
    if parent_pid is None:
        if not launched_by_torchrun():
            return None
        parent_pid = os.getppid()
        if parent_pid == 1:  # the launcher died before we got here: we are already an orphan
            print("[veomni] the launcher is already gone; exiting", file=sys.stderr, flush=True)
            os._exit(1)

    def _watch():
        while True:
            time.sleep(poll_s)
            if os.getppid() != parent_pid:
                print(f"[veomni] the launcher (pid {parent_pid}) is gone; worker pid {os.getpid()} exits "
                      "so that no orphan keeps writing into train.output_dir", file=sys.stderr, flush=True)
                os._exit(1)

    thread = threading.Thread(target=_watch, name="veomni-launcher-watch", daemon=True)
    thread.start()
    return thread
