"""Benchmark tasks on the real data: references pass 100%, wrong answers 0%, plus-test semantics.

CI scores a fixed seeded subset (SUBSET problems per task); VEOMNI_FULL_EVAL=1 scores everything.
"""

import gzip
import json
import random
import time

import pytest

from veomni.eval.scoring import ScoreConfig
from veomni.eval.tasks import TASK_NAMES, get_task

SUBSET = 20
SEED = 1234
EXEC_TASKS = [t for t in TASK_NAMES if t != "santacoder_fim"]
# References that take > 0.5 s over all their inputs on a slow 2-core box: kept out of the CI
# subset for speed only (the full run covers them).
HEAVY = {
    "HumanEval/15", "HumanEval/139", "HumanEval/36", "HumanEval/59", "HumanEval/130", "HumanEval/94",
    "HumanEval/83", "Mbpp/599", "Mbpp/392", "Mbpp/271", "Mbpp/123", "Mbpp/603", "Mbpp/592", "Mbpp/589",
    "Mbpp/300", "Mbpp/389", "Mbpp/255", "Mbpp/583", "Mbpp/84", "Mbpp/630", "Mbpp/162", "Mbpp/453",
    "Mbpp/745",
}
# evalplus special oracles accept any output here (Mbpp/164) or 0 (Mbpp/295): a wrong answer can pass.
LENIENT_ORACLES = {"Mbpp/164", "Mbpp/295"}


def _base_id(task_id):
    # "SingleLineInfilling/HumanEval/12/L3" -> "HumanEval/12"
    parts = task_id.split("/")
    return "/".join(parts[1:3]) if "Infilling" in parts[0] else task_id


def _subset(task, full):
    if full:
        return task.problems
    eligible = [p for p in task.problems if _base_id(p.task_id) not in HEAVY]
    return random.Random(SEED).sample(eligible, SUBSET)


@pytest.fixture(scope="module")
def tasks(data_dir):
    return {name: get_task(name, data_dir) for name in EXEC_TASKS}


CONFIG = ScoreConfig(n_workers=2)


def test_dataset_sizes(tasks):
    sizes = {name: len(t.problems) for name, t in tasks.items()}
    assert sizes == {
        "humaneval": 164, "humaneval_plus": 164, "mbpp_plus": 378, "humaneval_infill_single": 1033,
        "humaneval_infill_multi": 5815, "humaneval_infill_span": 1640, "humaneval_infill_span_light": 164,
    }


def test_humaneval_is_derived_from_humanevalplus_fields(tasks, data_dir):
    task = tasks["humaneval"]
    if not (data_dir / "humaneval").exists():
        assert task.data_file.name.startswith("HumanEvalPlus")
    rows = {r["task_id"]: r for r in map(json.loads, gzip.open(task.data_file, "rt"))}
    p = task.get_problem("HumanEval/0")
    assert p.test == rows["HumanEval/0"]["test"] and "def check(candidate)" in p.test
    assert p.prompt == rows["HumanEval/0"]["prompt"] and p.entry_point == "has_close_elements"


@pytest.mark.parametrize("name", EXEC_TASKS)
def test_canonical_solutions_pass(tasks, name, full_eval, tmp_path):
    task = tasks[name]
    ids = {p.task_id for p in _subset(task, full_eval)}
    samples = [s for s in task.canonical_samples() if s["task_id"] in ids]
    out = tmp_path / "results.jsonl"
    summary = task.score(samples, CONFIG, allow_partial=True, out_path=out)
    assert summary["n_problems"] == len(ids)
    failed = [r for r in map(json.loads, out.read_text().splitlines()) if not r["passed"]]
    assert summary["pass@1"] == 1.0, failed[:5]
    if task.kind == "io":
        assert summary["base_pass@1"] == 1.0 and summary["plus_pass@1"] == 1.0


@pytest.mark.parametrize("name", EXEC_TASKS)
def test_wrong_solutions_score_zero(tasks, name):
    task = tasks[name]
    problems = [p for p in _subset(task, False) if p.task_id not in LENIENT_ORACLES]
    # Defines the entry point but answers with a fresh object, equal to nothing.
    samples = [{"task_id": p.task_id, "solution": f"def {p.entry_point}(*args, **kwargs):\n    return object()\n"}
               for p in problems]
    summary = task.score(samples, CONFIG, allow_partial=True)
    assert summary["pass@1"] == 0.0, summary
    if task.kind == "io":
        assert summary["base_pass@1"] == 0.0


def test_completion_form_wrong_body_fails(tasks, tmp_path):
    task = tasks["humaneval"]
    samples = [{"task_id": "HumanEval/0", "completion": "    return not True\n"},
               {"task_id": "HumanEval/0", "completion": task.get_problem("HumanEval/0").canonical}]
    out = tmp_path / "r.jsonl"
    summary = task.score(samples, CONFIG, allow_partial=True, out_path=out)
    assert summary["pass@1"] == 0.5 and summary["samples_per_problem"] == [2, 2]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["task_id"], r["completion_id"], r["passed"]) for r in rows] == [
        ("HumanEval/0", 0, False), ("HumanEval/0", 1, True)]
    assert rows[0]["result"].startswith("failed: AssertionError")


def test_pass_at_10_with_ten_samples(tasks):
    task = tasks["humaneval"]
    p = task.get_problem("HumanEval/4")
    samples = [{"task_id": p.task_id, "completion": p.canonical if i < 3 else "    return -1.0\n"} for i in range(10)]
    summary = task.score(samples, CONFIG, allow_partial=True)
    assert summary["pass@1"] == pytest.approx(0.3) and summary["pass@10"] == pytest.approx(1.0)


def test_plus_reports_base_and_plus_separately(tasks, tmp_path):
    task = tasks["humaneval_plus"]
    p = task.get_problem("HumanEval/0")
    assert max(len(inp[0]) for inp in p.meta["base_input"]) <= 6 < max(len(inp[0]) for inp in p.meta["plus_input"])
    # Right on every base input (all lists have <= 6 numbers), wrong or too slow on longer plus inputs.
    guard = "\n\n    sorted_numbers"
    assert guard in p.canonical
    wrong_on_long = p.canonical.replace(guard, "\n\n    if len(numbers) > 6:\n        return None" + guard, 1)
    slow_on_long = "import time\n" + p.prompt + p.canonical.replace(
        guard, "\n\n    if len(numbers) > 6:\n        time.sleep(30)" + guard, 1)
    samples = [
        {"task_id": p.task_id, "completion": wrong_on_long},
        {"task_id": p.task_id, "solution": slow_on_long},
        {"task_id": p.task_id, "completion": p.canonical},
        {"task_id": p.task_id, "completion": p.canonical + "\nimport sys\nsys.exit(0)\n"},
        {"task_id": p.task_id, "completion": "    import os\n    os._exit(0)\n"},
    ]
    out = tmp_path / "plus.jsonl"
    summary = task.score(samples, CONFIG, allow_partial=True, out_path=out)
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["base_passed"] for r in results] == [True, True, True, False, False]
    assert [r["passed"] for r in results] == [False, False, True, False, False]
    assert results[0]["result"].startswith("failed (plus): wrong output on input #")
    assert "timed out on input #" in results[1]["result"]
    assert "SystemExit" in results[3]["result"]
    assert summary["base_pass@1"] == pytest.approx(0.6) and summary["plus_pass@1"] == pytest.approx(0.2)
    assert summary["pass@1"] == summary["plus_pass@1"]


def test_plus_tolerance_and_oracles_are_judged_in_the_scorer(tasks, tmp_path):
    """Outputs that differ from the reference's (so their digests differ) travel as literals and are
    compared in the scorer with evalplus' rules: float tolerance, MBPP's set-equality oracle."""
    he = tasks["humaneval_plus"]
    p = he.get_problem("HumanEval/2")  # truncate_number: float outputs, atol 0 -> 1e-6 allowed
    noisy = p.prompt + p.canonical + "\n_ref = truncate_number\ndef truncate_number(x):\n    return _ref(x) + NOISE\n"
    rows = [{"task_id": p.task_id, "solution": noisy.replace("NOISE", "1e-9")},
            {"task_id": p.task_id, "solution": noisy.replace("NOISE", "1e-3")}]
    out = tmp_path / "he.jsonl"
    he.score(rows, CONFIG, allow_partial=True, out_path=out)
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["passed"] for r in results] == [True, False], results
    assert results[1]["result"] == "failed (base): wrong output on input #0"
    mbpp = tasks["mbpp_plus"]
    p = mbpp.get_problem("Mbpp/2")  # similar_elements: compared as sets
    reversed_order = p.prompt + "def similar_elements(a, b):\n    return tuple(sorted(set(a) & set(b), reverse=True))\n"
    as_list = p.prompt + "def similar_elements(a, b):\n    return sorted(set(a) & set(b)) + [None]\n"
    out = tmp_path / "mbpp.jsonl"
    mbpp.score([{"task_id": p.task_id, "solution": reversed_order}, {"task_id": p.task_id, "solution": as_list}],
               CONFIG, allow_partial=True, out_path=out)
    assert [json.loads(line)["passed"] for line in out.read_text().splitlines()] == [True, False]


def test_mbpp_inputs_get_python_types(tasks):
    p = tasks["mbpp_plus"].get_problem("Mbpp/2")
    assert all(isinstance(a, tuple) for inp in p.meta["base_input"] for a in inp)


def test_infill_program_is_prefix_middle_suffix(tasks):
    task = tasks["humaneval_infill_single"]
    p = task.problems[0]
    assert task.candidate_code(p, {"completion": "MIDDLE"}) == p.prefix + "MIDDLE" + p.suffix
    assert task.candidate_code(p, {"solution": "WHOLE"}) == "WHOLE"


def test_sample_validation_errors(tasks):
    task = tasks["humaneval"]
    with pytest.raises(ValueError, match="exactly one of"):
        task.score([{"task_id": "HumanEval/0", "completion": "", "solution": ""}], CONFIG)
    with pytest.raises(ValueError, match="not a problem of task"):
        task.score([{"task_id": "Mbpp/2", "completion": ""}], CONFIG)
    with pytest.raises(ValueError, match="samples cover 1 of 164"):
        task.score([{"task_id": "HumanEval/0", "completion": ""}], CONFIG)
    summary = task.score([{"task_id": "HumanEval/0", "completion": task.problems[0].canonical},
                          {"task_id": "HumanEval/5", "completion": ""}], CONFIG, limit=1)
    assert summary["n_problems"] == 1 and summary["pass@1"] == 1.0


def test_plus_hostile_solutions_fail_fast(tasks, tmp_path):
    task = tasks["humaneval_plus"]
    ep = task.get_problem("HumanEval/0").entry_point
    bodies = {
        "loops at import": "while True:\n    pass\n",
        "exits when called": f"def {ep}(*a):\n    import sys\n    sys.exit(0)\n",
        "hangs when called": f"def {ep}(*a):\n    while True:\n        pass\n",
        "_exits when called": f"def {ep}(*a):\n    import os\n    os._exit(0)\n",
        "floods stdout": f"def {ep}(*a):\n    while True:\n        print('x' * 4096)\n",
    }
    samples = [{"task_id": "HumanEval/0", "solution": b} for b in bodies.values()]
    out = tmp_path / "r.jsonl"
    start = time.monotonic()
    summary = task.score(samples, ScoreConfig(n_workers=2, load_timeout=1.0), allow_partial=True, out_path=out)
    assert time.monotonic() - start < 20
    assert summary["base_pass@1"] == 0.0 and summary["pass@1"] == 0.0
    results = dict(zip(bodies, (json.loads(line)["result"] for line in out.read_text().splitlines())))
    assert results["loops at import"] == "failed to load: timed out"
    assert "SystemExit" in results["exits when called"]
    assert "timed out on input #0" in results["hangs when called"]
    assert "before the tests completed" in results["_exits when called"]
    assert "timed out on input #0" in results["floods stdout"]  # prints are discarded, as in evalplus
