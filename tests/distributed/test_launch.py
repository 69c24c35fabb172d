"""The launch scripts, run as users run them, on this one machine.

1 node x 2 processes (`scripts/train.sh`, NPROC_PER_NODE=2) is the reference. The same training
must come out of
  - 2 "nodes" x 1 process: two `scripts/train.sh` agents with NNODES=2, NODE_RANK=0/1,
    MASTER_ADDR=127.0.0.1 and a free MASTER_PORT (torchrun's static rendezvous), and
  - `scripts/slurm/train.sbatch` on a 2-node "allocation": test doubles of `srun` (starts the
    command once per node, here) and `scontrol` (the node list) run its two agents, which meet by
    c10d rendezvous,
with equal losses and gradient norms at every step and equal exported weights. Every process a
launch started is killed by pid if it fails or hangs (torchrun puts workers in their own sessions).
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.trainer.conftest import tiny_corpus, tiny_model_dir  # noqa: F401  (fixtures, used by name)
from tests.trainer.test_train_e2e import CONFIG, _args

pytestmark = pytest.mark.dist
REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 300

FAKE_SRUN = """#!/usr/bin/env bash
# Test double of srun: the command once per node of the allocation, all on this machine.
while [[ "${1:-}" == -* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NNODES; i++)); do
  SLURM_NODEID=$i SLURM_PROCID=$i SLURM_LOCALID=0 "$@" &
  pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit $rc
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
# Test double of `scontrol show hostnames`: every node of the allocation is this machine.
for ((i = 0; i < SLURM_NNODES; i++)); do echo 127.0.0.1; done
"""


# ---------------------------------------------------------------------------- process handling
def _start_time(pid: int):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _descendants(root: int) -> set:
    """{(pid, start time)} of every live process below `root` (by parent links, across sessions)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add((child, _start_time(child)))
            todo.append(child)
    return found


class Launch:
    """Launcher processes started together; their process trees are tracked so that a failure or a
    hang kills every one of them (by pid, checking the start time so a reused pid is left alone)."""

    def __init__(self, tmp: Path):
        self.tmp, self.procs, self.logs, self.seen = tmp, [], [], set()

    def start(self, name: str, cmd, env: dict):
        log = self.tmp / f"{name}.log"
        self.logs.append(log)
        full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), PYTHON=sys.executable, **env)
        with open(log, "w") as out:
            self.procs.append(subprocess.Popen(cmd, env=full_env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                               start_new_session=True))

    def _kill_all(self) -> None:
        for p in self.procs:
            self.seen |= _descendants(p.pid)
            self.seen.add((p.pid, _start_time(p.pid)))
        for pid, started in self.seen:
            if started is not None and _start_time(pid) == started:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for p in self.procs:
            p.wait()

    def tails(self) -> str:
        return "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for log in self.logs)

    def wait(self, timeout: float = TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while True:
            codes = [p.poll() for p in self.procs]
            if all(c == 0 for c in codes):
                return
            failed = any(c not in (None, 0) for c in codes)
            if failed or time.monotonic() > deadline:
                self._kill_all()
                raise AssertionError(f"launch {'failed' if failed else 'timed out'} (exit codes {codes})\n"
                                     + self.tails())
            for p in self.procs:  # workers are only found while their parents live
                self.seen |= _descendants(p.pid)
            time.sleep(0.5)


def _free_port() -> int:
    from veomni.distributed.utils import find_free_port

    return find_free_port()


# ---------------------------------------------------------------------------- the test
def _metrics(out):
    return [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_multi_node_launches_equal_one_node(tiny_model_dir, tiny_corpus, tmp_path):  # noqa: F811
    def args(out):
        return [CONFIG, *_args(tiny_model_dir, tiny_corpus, out, "--train.max_steps=3", "--train.data_parallel=fsdp2",
                                "--train.export_hf=true")]

    one = Launch(tmp_path)
    one.start("one_node", ["bash", "scripts/train.sh", *args(tmp_path / "one")], {"NPROC_PER_NODE": "2"})
    one.wait()

    two = Launch(tmp_path)
    port = str(_free_port())
    for rank in (0, 1):
        two.start(f"node{rank}", ["bash", "scripts/train.sh", *args(tmp_path / "two")],
                  {"NNODES": "2", "NODE_RANK": str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
                   "NPROC_PER_NODE": "1"})
    two.wait()
    assert "node 1/2" in (tmp_path / "node1.log").read_text()
    ckpt = tmp_path / "two" / "checkpoints" / "global_step_3"
    assert sorted(p.name for p in ckpt.glob("rng_rank*.pt")) == ["rng_rank0.pt", "rng_rank1.pt"]  # world size 2

    fake = tmp_path / "bin"
    fake.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (fake / name).write_text(text)
        (fake / name).chmod(0o755)
    slurm = Launch(tmp_path)
    slurm.start("slurm", ["bash", "scripts/slurm/train.sbatch", *args(tmp_path / "slurm")],
                {"PATH": f"{fake}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242", "SLURM_NNODES": "2",
                 "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_SUBMIT_DIR": str(REPO), "NPROC_PER_NODE": "1",
                 "MASTER_PORT": str(_free_port())})
    slurm.wait()
    assert "2 node(s) x 1 process(es)" in (tmp_path / "slurm.log").read_text()

    from veomni.models.hf_io import load_model

    ref = _metrics(tmp_path / "one")
    ref_w = dict(load_model(tmp_path / "one" / "hf").named_parameters())
    assert [r["step"] for r in ref] == [1, 2, 3]
    for name in ("two", "slurm"):
        rows = _metrics(tmp_path / name)
        assert [(r["loss"], r["grad_norm"], r["tokens_seen"]) for r in rows] == \
               [(r["loss"], r["grad_norm"], r["tokens_seen"]) for r in ref], name
        w = dict(load_model(tmp_path / name / "hf").named_parameters())
        assert w.keys() == ref_w.keys()
        for key in w:
            assert torch.equal(w[key], ref_w[key]), (name, key)


def test_train_sh_refuses_a_multi_node_launch_without_master_addr(tmp_path):
    env = dict(os.environ, NNODES="2", NODE_RANK="1")
    env.pop("MASTER_ADDR", None)
    proc = subprocess.run(["bash", "scripts/train.sh", CONFIG], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and "needs MASTER_ADDR" in proc.stderr
    proc = subprocess.run(["bash", "scripts/train.sh", CONFIG], cwd=REPO, capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, NNODES="2", NODE_RANK="2", MASTER_ADDR="127.0.0.1"))
    assert proc.returncode == 2 and "NODE_RANK=2 must be below NNODES=2" in proc.stderr
