"""One run per output_dir; a torchrun worker whose launcher is SIGKILLed exits by itself.

torchrun starts each worker in a session of its own, so these tests find every process of a run
(launcher pid from Popen, worker pid from the lock file) and kill each one by pid at the end.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from veomni.trainer.run_guard import LOCK_NAME, OutputDirBusyError, OutputDirLock

REPO = Path(__file__).resolve().parents[2]
TRAIN = str(REPO / "tasks" / "train_torch.py")
CONFIG = str(REPO / "configs" / "quickstart" / "smollm2_mdm.yaml")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped) is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _wait_for(cond, timeout: float, what: str):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = cond()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def test_lock_is_exclusive_names_the_holder_and_is_released(tmp_path):
    first = OutputDirLock(tmp_path)
    first.acquire()
    holder = json.loads((tmp_path / LOCK_NAME).read_text())
    assert holder["pid"] == os.getpid() and holder["host"] and holder["since"]
    with pytest.raises(OutputDirBusyError, match=rf"pid {os.getpid()} on host .* running since"):
        OutputDirLock(tmp_path).acquire()
    first.release()
    again = OutputDirLock(tmp_path)
    again.acquire()  # released: a later run takes it
    again.release()


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, caplog):
    code = ("import sys, time; from veomni.trainer.run_guard import OutputDirLock; "
            f"OutputDirLock({str(tmp_path)!r}).acquire(); print('locked', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(OutputDirBusyError, match=f"pid {proc.pid}"):
            OutputDirLock(tmp_path).acquire()
        proc.kill()
        proc.wait(timeout=10)
        lock = OutputDirLock(tmp_path)
        with caplog.at_level("WARNING", logger="veomni"):
            lock.acquire()
        assert f"pid {proc.pid}" in caplog.text and "no longer alive" in caplog.text
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
        lock.release()
    finally:
        _kill(proc.pid)


@pytest.mark.dist
def test_second_run_refuses_and_orphan_exits_when_launcher_dies(tiny_model_dir, tiny_corpus, tmp_path):
    out = tmp_path / "run"
    args = [f"--model.model_path={tiny_model_dir}", f"--data.train_path={tiny_corpus}", f"--train.output_dir={out}",
            "--data.max_seq_len=32", "--train.micro_batch_size=2", "--train.global_batch_size=2",
            "--train.progress_bar=false", "--train.export_hf=false", "--data.eval_split_ratio=0",
            "--train.eval_steps=0", "--train.warmup_steps=0", "--train.data_parallel=none",
            f"--data.cache_dir={tmp_path / 'cache'}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    launcher = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", "--master_port=0",
         "--rdzv_backend=c10d", "--rdzv_endpoint=localhost:0", TRAIN, CONFIG, *args,
         "--train.max_steps=100000", "--train.save_steps=0"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    worker = None
    try:
        lock_file = out / LOCK_NAME
        worker = _wait_for(lambda: lock_file.exists() and lock_file.read_text().strip()
                           and json.loads(lock_file.read_text())["pid"], 120, "the worker to lock output_dir")
        assert worker != launcher.pid
        _wait_for(lambda: (out / "metrics.jsonl").exists(), 120, "the first training step")

        # A second run in the same output_dir stops at once and names the holder.
        second = subprocess.run([sys.executable, TRAIN, CONFIG, *args, "--train.max_steps=1"], env=env,
                                capture_output=True, text=True, timeout=300)
        assert second.returncode != 0
        assert f"is in use by another run: pid {worker} on host" in second.stderr, second.stderr[-2000:]

        # SIGKILL reaches the launcher only; its worker must notice and exit by itself.
        launcher.kill()
        launcher.wait(timeout=30)
        _wait_for(lambda: not _alive(worker), 30, f"the orphaned worker {worker} to exit")

        # The dead run's lock is taken over by the next run, which then trains normally.
        third = subprocess.run([sys.executable, TRAIN, CONFIG, *args, "--train.max_steps=1"], env=env,
                               capture_output=True, text=True, timeout=300)
        assert third.returncode == 0, third.stderr[-3000:]
        assert f"taking over the lock of pid {worker}" in third.stderr
        assert (out / "checkpoints" / "global_step_1" / "COMPLETE").exists()
    finally:
        for pid in (launcher.pid, worker):
            if pid:
                _kill(pid)
