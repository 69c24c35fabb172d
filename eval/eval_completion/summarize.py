#!/usr/bin/env python
"""Collect the per-task score summaries of a run_eval.sh run into one summary.json and a table.

    python eval/eval_completion/summarize.py OUT_DIR --tasks humaneval,mbpp_plus [--settings JSON]

Reads OUT_DIR/<task>.summary.json, or OUT_DIR/<task>.len<N>.summary.json for infilling with several
lengths (then pass@k is the mean over the lengths: DreamOn's "average over fixed lengths").
Writes OUT_DIR/summary.json and prints a Markdown table (used by both run_eval.sh scripts).
"""
import argparse
import json
import re
import sys
from pathlib import Path

METRICS = ("pass@1", "pass@10", "base_pass@1", "base_pass@10")


def collect(out_dir: Path, task: str) -> dict:
    single = out_dir / f"{task}.summary.json"
    per_len = sorted(out_dir.glob(f"{task}.len*.summary.json"),
                     key=lambda p: int(re.search(r"\.len(\d+)\.", p.name).group(1)))
    if single.is_file():
        s = json.loads(single.read_text())
        return {"task": task, "n_problems": s.get("n_problems"), **{m: s[m] for m in METRICS if m in s}}
    if not per_len:
        raise FileNotFoundError(f"no {single.name} or {task}.len<N>.summary.json in {out_dir}")
    runs = {int(re.search(r"\.len(\d+)\.", p.name).group(1)): json.loads(p.read_text()) for p in per_len}
    row = {"task": task, "n_problems": next(iter(runs.values())).get("n_problems"), "lengths": sorted(runs)}
    for m in METRICS:
        if all(m in s for s in runs.values()):
            row[m] = sum(s[m] for s in runs.values()) / len(runs)
            row[f"{m}_per_length"] = {n: s[m] for n, s in runs.items()}
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir")
    p.add_argument("--tasks", required=True, help="comma-separated task names")
    p.add_argument("--settings", default="{}", help="JSON object of the run's settings, stored as is")
    args = p.parse_args(argv)
    out_dir = Path(args.out_dir)
    rows = [collect(out_dir, t) for t in args.tasks.split(",") if t]
    summary = {"settings": json.loads(args.settings), "results": rows}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    shown = [m for m in METRICS if any(m in r for r in rows)]
    print("| task | problems | " + " | ".join(shown) + " |")
    print("|---|---:|" + "---:|" * len(shown))
    for r in rows:
        cells = [f"{100 * r[m]:.1f}" if m in r else "-" for m in shown]
        name = r["task"] + (f" (mean over lengths {r['lengths']})" if "lengths" in r else "")
        print(f"| {name} | {r['n_problems']} | " + " | ".join(cells) + " |")
    print(f"summary: {out_dir / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
