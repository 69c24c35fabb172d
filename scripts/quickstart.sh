#!/usr/bin/env bash
# README command 1: set everything up, adapt SmolLM2-135M-Instruct (an AR model) into a
# masked-diffusion LM on CPU in a few minutes, then sample from the result.
#
# Corpus: the Python standard library's `email` package of the interpreter that runs this (real
# code that every machine has, so nothing is downloaded). Override with CORPUS=/path/to/dir.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
MODEL=$(python3 scripts/prepare_smollm2.py | tail -n 1)
CORPUS=${CORPUS:-$(python3 -c "import os, sysconfig; print(os.path.join(sysconfig.get_paths()['stdlib'], 'email'))")}
OUT=${OUT:-outputs/quickstart}

python3 tasks/train_torch.py configs/quickstart/smollm2_mdm.yaml \
  --model.model_path="$MODEL" --data.train_path="$CORPUS" --train.output_dir="$OUT" "$@"

python3 tasks/infer.py --model_path "$OUT/hf" --prompt "def parse_header(line):" \
  --infer.max_new_tokens=32 --infer.steps=32 --infer.alg=maskgit_plus
