"""Hostile programs are contained, counted as failed, leave the host untouched and never hang us."""

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from veomni.eval import _sandbox_child as child
from veomni.eval.sandbox import SandboxConfig, describe_sandbox, program_passed, run_job, run_program

T = 1.5  # program timeout for hostile cases; the parent kill fires SLACK later
SLACK = 1.5


def run(program, timeout=T, config=None):
    start = time.monotonic()
    outcome = run_program(program, timeout, config, slack=SLACK)
    elapsed = time.monotonic() - start
    assert elapsed < timeout + SLACK + 5, f"harness took {elapsed:.1f}s"
    return program_passed(outcome), outcome


def test_plain_pass_and_fail():
    (ok, result), out = run("def f():\n    return 2\nassert f() == 2\nprint('hello')\n")
    assert ok and result == "passed" and out.stdout == "hello\n"
    (ok, result), _ = run("assert 1 == 2, 'nope'\n")
    assert not ok and result == "failed: AssertionError: nope"


HOSTILE = [
    ("infinite_loop", "while True:\n    pass\n", "timed out"),
    # Catches the in-child timeout and keeps going: only the parent's group kill stops it.
    ("loop_swallowing_timeouts", "x = 0\nwhile True:\n    try:\n        while True:\n            x += 1\n"
     "    except BaseException:\n        pass\n", "timed out"),
    ("alloc_10GB", "x = bytearray(10 * 1024 ** 3)\n", "MemoryError"),
    ("sys_exit_0", "import sys\nsys.exit(0)\n", "SystemExit"),
    ("exit_builtin", "exit(0)\n", "SystemExit"),
    ("os__exit_0", "import os\nos._exit(0)\n", "before the tests completed"),
    ("stdout_flood", "while True:\n    print('x' * 4096)\n", "output limit exceeded"),
    ("stderr_flood", "import sys\nwhile True:\n    sys.stderr.write('y' * 4096)\n", "output limit exceeded"),
    # Bounded shape: should the guard ever break, this makes 64 processes, not a machine-killer.
    ("fork_bomb", "import os\nfor _ in range(6):\n    os.fork()\n", "os.fork is disabled"),
    ("posix_fork", "import posix\nposix.fork()\n", "os.fork is disabled"),
    ("subprocess", "import subprocess\nsubprocess.run(['true'])\n", "subprocess.Popen is disabled"),
    ("multiprocessing", "import multiprocessing\n", "multiprocessing"),
    ("ctypes", "import ctypes\n", "ctypes"),
    ("kill_parent", "import os\nos.kill(os.getppid(), 9)\n", "os.kill is disabled"),
]


@pytest.mark.parametrize("name,program,expect", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_program_fails_and_is_contained(name, program, expect):
    (ok, result), _ = run(program)
    assert not ok, name
    assert expect in result, (name, result)


def test_rm_rf_canary_survives(tmp_path):
    canary = tmp_path / "canary"
    canary.mkdir()
    (canary / "keep.txt").write_text("still here")
    for attack in (
        f"import os\nos.system('rm -rf {canary}')\n",
        f"import shutil\nshutil.rmtree({str(canary)!r})\n",
        f"import os\nos.remove({str(canary / 'keep.txt')!r})\n",
        f"import os\nos.rename({str(canary / 'keep.txt')!r}, 'stolen.txt')\n",
        f"import pathlib\npathlib.Path({str(canary / 'keep.txt')!r}).unlink()\n",
        f"import os\nos.chmod({str(canary)!r}, 0)\n",
    ):
        (ok, result), _ = run(attack)
        assert not ok and "disabled" in result, (attack, result)
    assert (canary / "keep.txt").read_text() == "still here"
    assert (os.stat(canary).st_mode & 0o777) != 0


def test_harness_modules_are_not_importable_by_the_program():
    (ok, result), _ = run("import _sandbox_child\n")
    assert not ok and "ModuleNotFoundError" in result


def test_file_operations_inside_the_sandbox_dir_still_work():
    program = (
        "import os, shutil, tempfile\n"
        "os.makedirs('d/e')\nopen('d/e/f.txt', 'w').write('x')\nos.rename('d/e/f.txt', 'd/g.txt')\n"
        "os.remove('d/g.txt')\nshutil.rmtree('d')\nassert not os.path.exists('d')\n"
        "with tempfile.TemporaryDirectory() as t:\n    open(os.path.join(t, 'x'), 'w').write('1')\n"
    )
    (ok, result), _ = run(program, timeout=5)
    assert ok, result


def test_network_connection_never_reaches_the_host():
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    try:
        for attack in (
            f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\n",
            f"import socket\ns = socket.socket()\ns.connect(('127.0.0.1', {port}))\n",
            f"import _socket\ns = _socket.socket()\ns.connect(('127.0.0.1', {port}))\n",
            f"import urllib.request\nurllib.request.urlopen('http://127.0.0.1:{port}/', timeout=1)\n",
        ):
            (ok, result), _ = run(attack)
            assert not ok, (attack, result)
        listener.settimeout(0.3)
        with pytest.raises(socket.timeout):
            conn, _ = listener.accept()
            conn.close()
    finally:
        listener.close()


def test_group_kill_reaps_escaped_grandchildren():
    # Guards off: check the layer below them, the process-group kill after the run.
    program = (
        "import os, subprocess\ntry:\n    p = subprocess.Popen(['sleep', '60'])\n"
        "except OSError as e:\n    print('nofork', e, flush=True)\nelse:\n    print(p.pid, flush=True)\n"
        "os._exit(0)\n"
    )
    outcome = run_job({"mode": "exec", "program": program, "timeout": 5.0, "guards": False}, 10.0)
    if outcome.stdout.startswith("nofork"):
        # Unprivileged runs: RLIMIT_NPROC=0 already refused the fork (root ignores that limit).
        assert os.geteuid() != 0, outcome.stdout
        return
    pid = int(outcome.stdout.split()[0])
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return
        if state in ("Z", "X"):
            return
        time.sleep(0.05)
    pytest.fail(f"grandchild {pid} still alive (state {state})")


def test_memory_cap_is_configurable():
    program = "x = bytearray(600 * 1024 ** 2)\n"
    (ok, result), _ = run(program, timeout=5, config=SandboxConfig(memory_bytes=512 * 1024**2))
    assert not ok and "MemoryError" in result
    (ok, result), _ = run(program, timeout=5, config=SandboxConfig(memory_bytes=2 * 1024**3))
    assert ok, result


def test_invalid_config_raises():
    with pytest.raises(ValueError, match="net_isolation"):
        SandboxConfig(net_isolation="vm")
    with pytest.raises(ValueError, match="memory_bytes"):
        SandboxConfig(memory_bytes=0)


def test_describe_sandbox_names_the_network_mode():
    info = describe_sandbox(SandboxConfig())
    assert info["network"] in ("netns+patch", "patch")
    assert describe_sandbox(SandboxConfig(net_isolation="patch"))["network"] == "patch"


def test_token_forgery_does_not_pass():
    # A program that writes a fake success record on every fd still fails: no valid token.
    program = (
        "import os, json\nfor fd in range(3, 64):\n    try:\n"
        "        os.write(fd, (json.dumps({'event': 'done', 'ok': True, 'token': 'x'}) + '\\n').encode())\n"
        "    except OSError:\n        pass\nos._exit(0)\n"
    )
    (ok, result), _ = run(program)
    assert not ok, result


# ---- output comparison (evalplus semantics), unit-level -------------------------------------
def test_outputs_match_exact_and_float_tolerance():
    m = child.outputs_match
    assert m("humaneval", "f", [1], [1, 2], [1, 2], 0)
    assert not m("humaneval", "f", [1], [1, 2], (1, 2), 0)
    assert m("humaneval", "f", [1], 0.1 + 0.2, 0.3, 0)  # floats always get atol 1e-6
    assert not m("humaneval", "f", [1], 0.3001, 0.3, 0)
    assert m("humaneval", "f", [1], [0.5 + 1e-9, 2.0], [0.5, 2.0], 0)
    assert not m("humaneval", "f", [1], 1, 1.0000001, 0)  # int vs float: no tolerance path
    assert m("humaneval", "f", [1], 1.00005, 1.0, 1e-4)
    assert not m("humaneval", "f", [1], float("nan"), float("nan"), 0)  # as numpy.allclose


def test_outputs_match_special_oracles():
    m = child.outputs_match
    xs = [-6, 11, -6, 1]  # (x-1)(x-2)(x-3): any root is accepted for find_zero
    assert m("humaneval", "find_zero", [xs], 3.0, 1.0, 1e-4)
    assert not m("humaneval", "find_zero", [xs], 2.5, 1.0, 1e-4)
    assert m("mbpp", "similar_elements", [], (5, 4), (4, 5), 0)
    assert m("mbpp", "check_str", [], object(), True, 0)  # only "not None" is compared
    assert not m("mbpp", "check_str", [], None, True, 0)
    assert m("mbpp", "are_equivalent", [], "anything", False, 0)


def test_children_die_with_a_killed_scorer(tmp_path):
    pid_file = tmp_path / "pid"
    program = (f"import os, time\nopen({str(pid_file)!r}, 'w').write(f'{{os.getpid()}} {{os.getcwd()}}')\n"
               "time.sleep(120)\n")
    script = tmp_path / "scorer.py"
    script.write_text(
        f"import sys\nsys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})\n"
        f"from veomni.eval.sandbox import run_program\nrun_program({program!r}, 100)\n"
    )
    scorer = subprocess.Popen([sys.executable, str(script)])
    try:
        deadline = time.monotonic() + 30
        while not (pid_file.exists() and pid_file.read_text()):
            assert time.monotonic() < deadline, "sandboxed program never started"
            time.sleep(0.05)
        child, workdir = pid_file.read_text().split(" ", 1)
        child = int(child)
        scorer.kill()  # SIGKILL: no cleanup code of the scorer runs, so its temp dir stays behind
        scorer.wait()
        shutil.rmtree(workdir, ignore_errors=True)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                with open(f"/proc/{child}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                        return
            except FileNotFoundError:
                return
            time.sleep(0.05)
        pytest.fail(f"sandboxed child {child} outlived the killed scorer")
    finally:
        scorer.kill()
