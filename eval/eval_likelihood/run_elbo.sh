#!/usr/bin/env bash
# Perplexity bound of a text under a masked-diffusion model (and, with AR=1, the exact AR number).
#
#   bash eval/eval_likelihood/run_elbo.sh MODEL_PATH TEXT_FILE [extra elbo.py args]
#   MC_NUM=128 BATCH_SIZE=32 AR=1 bash eval/eval_likelihood/run_elbo.sh outputs/run/hf doc.txt --max_len 256
#
# Writes the JSON results to OUT_DIR (default outputs/eval/<model name>/likelihood) and prints them.
set -euo pipefail
if [[ $# -lt 2 || "$1" == "-h" || "$1" == "--help" ]]; then sed -n '2,7p' "$0"; exit 2; fi
MODEL_PATH=$1; TEXT_FILE=$2; shift 2
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PYTHON=${PYTHON:-python}
OUT_DIR=${OUT_DIR:-outputs/eval/$(basename "${MODEL_PATH%/}")/likelihood}
mkdir -p "$OUT_DIR"
name=$(basename "$TEXT_FILE"); name=${name%.*}
"$PYTHON" "$REPO/eval/eval_likelihood/elbo.py" --model_path "$MODEL_PATH" --text_file "$TEXT_FILE" \
    --mc_num "${MC_NUM:-128}" --batch_size "${BATCH_SIZE:-32}" "$@" | tail -n 1 | tee "$OUT_DIR/$name.elbo.json"
if [[ "${AR:-0}" == 1 ]]; then
    "$PYTHON" "$REPO/eval/eval_likelihood/elbo.py" --model_path "$MODEL_PATH" --text_file "$TEXT_FILE" \
        --mode ar "$@" | tail -n 1 | tee "$OUT_DIR/$name.ar.json"
fi
