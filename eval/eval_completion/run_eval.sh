#!/usr/bin/env bash
# Code completion benchmarks end to end: generate samples, score them in the sandbox, summarise.
#
#   bash eval/eval_completion/run_eval.sh MODEL_PATH [TASKS] [extra eval/generate.py args]
#   LIMIT=20 N_SAMPLES=1 MODE=ar bash eval/eval_completion/run_eval.sh ~/.cache/veomni/smollm2-135m-instruct
#
# TASKS: comma- or space-separated (default "humaneval humaneval_plus mbpp_plus"); a 2nd argument
# starting with "--" is taken as the first extra argument instead. Defaults follow Open-dCoder's
# protocol (0-shot, 128 new tokens, 128 steps, temperature 0.8, alg p2); override with the env
# variables below or with --infer.x=y extra args (they come last, so they win).
# Writes under OUT_DIR (default outputs/eval/<model name>/completion): <task>.samples.jsonl,
# <task>.results.jsonl, <task>.summary.json, <task>.generate.json and summary.json.
set -euo pipefail

if [[ $# -lt 1 || "$1" == "-h" || "$1" == "--help" ]]; then
    sed -n '2,13p' "$0"; exit 2
fi
MODEL_PATH=$1; shift
TASKS="humaneval humaneval_plus mbpp_plus"
if [[ $# -gt 0 && "$1" != --* ]]; then TASKS=$1; shift; fi
TASKS=${TASKS//,/ }

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
# shellcheck source=../_settings.sh
source "$REPO/eval/_settings.sh"
MODE=${MODE:-diffusion}
OUT_DIR=${OUT_DIR:-outputs/eval/$(basename "${MODEL_PATH%/}")/completion}
mkdir -p "$OUT_DIR"


start=$(date +%s)
done_tasks=()
for task in $TASKS; do
    echo "=== $task: generating ($MODE) ===" >&2
    "$PYTHON" "$REPO/eval/generate.py" --task "$task" --model_path "$MODEL_PATH" \
        --out "$OUT_DIR/$task.samples.jsonl" --mode "$MODE" --n_samples "$N_SAMPLES" \
        --batch_size "$BATCH_SIZE" "${common[@]}" \
        --infer.max_new_tokens="$MAX_NEW_TOKENS" --infer.steps="$STEPS" --infer.alg="$ALG" \
        --infer.temperature="$TEMPERATURE" "$@" | tail -n 1 > "$OUT_DIR/$task.generate.json"
    echo "=== $task: scoring ===" >&2
    "$PYTHON" "$REPO/eval/score.py" --task "$task" --samples "$OUT_DIR/$task.samples.jsonl" \
        --out "$OUT_DIR/$task.results.jsonl" "${score_common[@]}" | tail -n 1 > "$OUT_DIR/$task.summary.json"
    done_tasks+=("$task")
done
wall=$(( $(date +%s) - start ))

settings=$("$PYTHON" -c 'import json, sys; a = sys.argv; print(json.dumps(dict(zip(a[1::2], a[2::2]))))' \
    model_path "$MODEL_PATH" mode "$MODE" n_samples "$N_SAMPLES" limit "${LIMIT:-all}" \
    max_new_tokens "$MAX_NEW_TOKENS" steps "$STEPS" alg "$ALG" temperature "$TEMPERATURE" \
    seed "$SEED" extra_args "$*" wall_time_s "$wall")
tasks_csv=$(IFS=,; echo "${done_tasks[*]}")
"$PYTHON" "$REPO/eval/eval_completion/summarize.py" "$OUT_DIR" --tasks "$tasks_csv" --settings "$settings"
echo "wall time: ${wall}s"
