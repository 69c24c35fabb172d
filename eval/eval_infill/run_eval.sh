#!/usr/bin/env bash
# Infilling benchmarks end to end: prefix + N masks + suffix through infill(), sandbox scoring, summary.
#
#   bash eval/eval_infill/run_eval.sh MODEL_PATH [TASKS] [extra eval/generate.py args]
#   LIMIT=20 bash eval/eval_infill/run_eval.sh outputs/run/hf humaneval_infill_single
#
# TASKS: comma- or space-separated (default "humaneval_infill_single humaneval_infill_multi
# humaneval_infill_span_light"; santacoder_fim needs its file, see docs/evaluation.md). Defaults
# follow Open-dLLM's eval_infill: INFILL_LENGTH=oracle (fixed:N or avg: 4..64 generated and scored,
# mean pass@1 shown), STEPS=64 for every middle (INFILL_STEPS=ratio: ceil(N * STEPS / MAX_NEW_TOKENS)
# steps for an N-token middle), TEMPERATURE=0.6, TOP_P=0.95, ALG=p2. Other env variables as in
# eval/eval_completion/run_eval.sh (diffusion only: MODE is not read). Writes under OUT_DIR
# (default outputs/eval/<model name>/infill) the samples, results, per-task summaries and summary.json.
set -euo pipefail

if [[ $# -lt 1 || "$1" == "-h" || "$1" == "--help" ]]; then
    sed -n '2,13p' "$0"; exit 2
fi
MODEL_PATH=$1; shift
TASKS="humaneval_infill_single humaneval_infill_multi humaneval_infill_span_light"
if [[ $# -gt 0 && "$1" != --* ]]; then TASKS=$1; shift; fi
TASKS=${TASKS//,/ }

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
# Open-dLLM's infilling settings (eval/eval_infill/run_eval.sh there), before the shared defaults.
STEPS=${STEPS:-64}
TEMPERATURE=${TEMPERATURE:-0.6}
# shellcheck source=../_settings.sh
source "$REPO/eval/_settings.sh"
TOP_P=${TOP_P:-0.95}
INFILL_LENGTH=${INFILL_LENGTH:-oracle}
INFILL_STEPS=${INFILL_STEPS:-$STEPS}
steps_args=(--infill_steps "$INFILL_STEPS")
[[ "$INFILL_STEPS" == ratio ]] && steps_args+=(--infer.steps="$STEPS")
OUT_DIR=${OUT_DIR:-outputs/eval/$(basename "${MODEL_PATH%/}")/infill}
if [[ -n "${MODE:-}" && "$MODE" != diffusion ]]; then
    echo "error: MODE=$MODE: infilling needs a diffusion model (MODE=diffusion or unset)" >&2; exit 2
fi
mkdir -p "$OUT_DIR"


start=$(date +%s)
done_tasks=()
for task in $TASKS; do
    echo "=== $task: generating (infill_length $INFILL_LENGTH) ===" >&2
    # Old per-length files would be mixed into this run's average: remove this task's outputs first.
    rm -f "$OUT_DIR/$task".len*.jsonl "$OUT_DIR/$task".len*.summary.json "$OUT_DIR/$task".summary.json
    "$PYTHON" "$REPO/eval/generate.py" --task "$task" --model_path "$MODEL_PATH" \
        --out "$OUT_DIR/$task.samples.jsonl" --infill_length "$INFILL_LENGTH" --n_samples "$N_SAMPLES" \
        --batch_size "$BATCH_SIZE" "${common[@]}" "${steps_args[@]}" \
        --infer.max_new_tokens="$MAX_NEW_TOKENS" --infer.alg="$ALG" \
        --infer.temperature="$TEMPERATURE" --infer.top_p="$TOP_P" "$@" | tail -n 1 > "$OUT_DIR/$task.generate.json"
    # One samples file per length: <task>.samples.jsonl, or <task>.samples.len<N>.jsonl for avg.
    files=$("$PYTHON" -c 'import json, sys; [print(f["samples"]) for f in json.load(open(sys.argv[1]))["files"]]' \
        "$OUT_DIR/$task.generate.json")
    for samples in $files; do
        len=$(basename "$samples" .jsonl); len=${len#"$task".samples}
        tag=$task${len:+.${len#.}}
        echo "=== $tag: scoring ===" >&2
        "$PYTHON" "$REPO/eval/score.py" --task "$task" --samples "$samples" \
            --out "$OUT_DIR/$tag.results.jsonl" "${score_common[@]}" | tail -n 1 > "$OUT_DIR/$tag.summary.json"
    done
    done_tasks+=("$task")
done
wall=$(( $(date +%s) - start ))

settings=$("$PYTHON" -c 'import json, sys; a = sys.argv; print(json.dumps(dict(zip(a[1::2], a[2::2]))))' \
    model_path "$MODEL_PATH" mode diffusion infill_length "$INFILL_LENGTH" infill_steps "$INFILL_STEPS" \
    n_samples "$N_SAMPLES" limit "${LIMIT:-all}" max_new_tokens "$MAX_NEW_TOKENS" steps "$STEPS" alg "$ALG" \
    temperature "$TEMPERATURE" top_p "$TOP_P" seed "$SEED" extra_args "$*" wall_time_s "$wall")
tasks_csv=$(IFS=,; echo "${done_tasks[*]}")
"$PYTHON" "$REPO/eval/eval_completion/summarize.py" "$OUT_DIR" --tasks "$tasks_csv" --settings "$settings"
echo "wall time: ${wall}s"
