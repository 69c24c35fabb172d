#!/usr/bin/env bash
# README command 1: set everything up, adapt SmolLM2-135M-Instruct (an AR model) into a
# masked-diffusion LM on CPU in a few minutes, then sample from the result.
#
# The config names its own model (embedded:smollm2-135m-instruct) and corpus (this checkout's
# veomni/ sources), so it also runs by itself:
#   python3 tasks/train_torch.py configs/quickstart/smollm2_mdm.yaml
# Override the corpus with CORPUS=/path/to/dir_or.jsonl, the output with OUT=dir; extra arguments go
# to the trainer (e.g. --train.max_steps=50).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
OUT=${OUT:-outputs/quickstart}
EXTRA=()
if [ -n "${CORPUS:-}" ]; then EXTRA+=("--data.train_path=$CORPUS"); fi

python3 tasks/train_torch.py configs/quickstart/smollm2_mdm.yaml --train.output_dir="$OUT" ${EXTRA[@]+"${EXTRA[@]}"} "$@"

python3 tasks/infer.py --model_path "$OUT/hf" --prompt "def parse_header(line):" \
  --infer.max_new_tokens=32 --infer.steps=32 --infer.alg=maskgit_plus
