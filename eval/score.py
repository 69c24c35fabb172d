#!/usr/bin/env python
"""Score code samples on a benchmark (execution in a sandbox; no generation here).

    python eval/score.py --task humaneval_plus --samples samples.jsonl --out results.jsonl
    python eval/score.py --task mbpp_plus --canonical            # the dataset's own references: 100%

Prints progress lines, then the summary as one JSON object on the LAST line of stdout.
Sample lines: {"task_id": ..., "completion": ...} or {"task_id": ..., "solution": ...}.
See docs/evaluation.md for tasks, protocols and sandbox limits.
"""

import argparse
import json
import sys
from pathlib import Path

# Run from a checkout without `pip install -e .`: make the repo's `veomni` importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from veomni.eval.sandbox import FS_ISOLATION_MODES, NET_ISOLATION_MODES, SandboxConfig  # noqa: E402
from veomni.eval.scoring import ScoreConfig, load_samples  # noqa: E402
from veomni.eval.tasks import TASK_NAMES, get_task  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--task", required=True, choices=TASK_NAMES)
    p.add_argument("--samples", help="JSONL samples file (omit with --canonical)")
    p.add_argument("--canonical", action="store_true", help="score the dataset's reference solutions")
    p.add_argument("--data_dir", help="data directory or the task's data file "
                   "(default: $VEOMNI_EVAL_DATA, then ~/.cache/veomni/eval)")
    p.add_argument("--out", help="per-sample results JSONL (default: <samples>.results.jsonl, "
                   "or <task>.canonical.results.jsonl with --canonical)")
    p.add_argument("--n_workers", type=int, default=None, help="parallel sandboxes (default: CPU count)")
    p.add_argument("--limit", type=int, default=None, help="score only the first N problems")
    p.add_argument("--allow_partial", action="store_true",
                   help="score only problems that have samples instead of failing on missing ones")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds per program (exec tasks, default 3) / per test group cap (*_plus, default 60)")
    p.add_argument("--min_time_limit", type=float, default=1.0, help="*_plus: per-input limit floor (s)")
    p.add_argument("--gt_time_limit_factor", type=float, default=4.0,
                   help="*_plus: per-input limit = max(floor, factor * reference time)")
    p.add_argument("--k", default="1,10", help="comma-separated k for pass@k (reported when n >= k)")
    p.add_argument("--memory_mb", type=int, default=4096, help="address-space cap per program (MiB)")
    p.add_argument("--net_isolation", default="auto", choices=NET_ISOLATION_MODES,
                   help="netns: require an empty network namespace; patch: socket patch only")
    p.add_argument("--santacoder_language", default="py",
                   help="santacoder_fim: language rows to keep ('all' keeps every language)")
    p.add_argument("--santacoder_match", default="open_dllm", choices=("open_dllm", "first_nonempty"),
                   help="santacoder_fim: which line of the completion is compared with the reference: "
                        "open_dllm = the first, or the second after one leading newline (Open-dLLM); "
                        "first_nonempty = the first non-blank line")
    p.add_argument("--fs_isolation", default="auto", choices=FS_ISOLATION_MODES,
                   help="landlock: require Landlock (programs cannot read files outside the interpreter "
                        "and their working directory); none: do not use it")
    args = p.parse_args(argv)
    if args.canonical == bool(args.samples):
        p.error("give exactly one of --samples FILE or --canonical")
    if args.task != "santacoder_fim" and (args.santacoder_language != "py" or args.santacoder_match != "open_dllm"):
        p.error("--santacoder_language and --santacoder_match only apply to --task santacoder_fim")
    try:
        args.k = tuple(int(k) for k in args.k.split(",") if k.strip())
    except ValueError:
        p.error(f"--k must be comma-separated integers, got {args.k!r}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    log = lambda line: print(line, flush=True)  # noqa: E731
    try:
        options = {}
        if args.task == "santacoder_fim":
            options["language"] = None if args.santacoder_language == "all" else args.santacoder_language
            options["match"] = args.santacoder_match
        task = get_task(args.task, args.data_dir, **options)
        log(f"[score] loaded {task.name}: {len(task.problems)} problems from {task.data_file}")
        if args.canonical:
            samples = task.canonical_samples()[: args.limit] if args.limit else task.canonical_samples()
        else:
            samples = load_samples(args.samples)
        out = args.out or (f"{args.task}.canonical.results.jsonl" if args.canonical
                           else str(Path(args.samples).with_suffix("")) + ".results.jsonl")
        sandbox = SandboxConfig(memory_bytes=args.memory_mb * 1024**2, net_isolation=args.net_isolation,
                                fs_isolation=args.fs_isolation)
        config = ScoreConfig(timeout=args.timeout, min_time_limit=args.min_time_limit,
                             gt_time_limit_factor=args.gt_time_limit_factor, ks=args.k, sandbox=sandbox,
                             **({"n_workers": args.n_workers} if args.n_workers is not None else {}))
        summary = task.score(samples, config, allow_partial=args.allow_partial, limit=args.limit,
                             progress=log, out_path=out)
    except (ValueError, FileNotFoundError, ImportError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    summary["samples"] = "canonical" if args.canonical else str(args.samples)
    summary["results_file"] = str(out)
    log(f"[score] per-sample results written to {out}")
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
