# Shared settings of eval/eval_completion/run_eval.sh and eval/eval_infill/run_eval.sh (sourced).
# Defaults follow Open-dCoder's protocol (0-shot, 128 new tokens, 128 steps, temperature 0.8, p2);
# every one can be overridden by the environment variable of the same name.
PYTHON=${PYTHON:-python}
N_SAMPLES=${N_SAMPLES:-1}
LIMIT=${LIMIT:-}
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-128}
STEPS=${STEPS:-128}
ALG=${ALG:-p2}
TEMPERATURE=${TEMPERATURE:-0.8}
BATCH_SIZE=${BATCH_SIZE:-1}
SEED=${SEED:-0}
N_WORKERS=${N_WORKERS:-2}
DATA_DIR=${DATA_DIR:-${VEOMNI_EVAL_DATA:-}}

# Arguments passed to eval/generate.py (common) and eval/score.py (score_common) by both scripts.
common=(--seed "$SEED")
[[ -n "$DATA_DIR" ]] && common+=(--data_dir "$DATA_DIR")
[[ -n "$LIMIT" ]] && common+=(--limit "$LIMIT")
score_common=(--n_workers "$N_WORKERS")
[[ -n "$DATA_DIR" ]] && score_common+=(--data_dir "$DATA_DIR")
[[ -n "$LIMIT" ]] && score_common+=(--limit "$LIMIT")
