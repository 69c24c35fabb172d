#!/usr/bin/env bash
# README command 1: set everything up, adapt SmolLM2-135M-Instruct (an AR model) into a
# block-diffusion LM on CPU in about ten minutes, sample from the result block by block, and print
# the held-out likelihood before and after.
#
# The config names its own model (embedded:smollm2-135m-instruct) and corpus (this checkout's
# veomni/ sources), so it also runs by itself:
#   python3 tasks/train_torch.py configs/quickstart/smollm2_bd3lm.yaml
# Why block diffusion: it won the recipes head to head (docs/benchmarks.md, "Recipes head to head").
# Override the corpus with CORPUS=/path/to/dir_or.jsonl, the output with OUT=dir; extra arguments go
# to the trainer (e.g. --train.max_steps=100).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
OUT=${OUT:-outputs/quickstart}
EXTRA=()
if [ -n "${CORPUS:-}" ]; then EXTRA+=("--data.train_path=$CORPUS"); fi

python3 tasks/train_torch.py configs/quickstart/smollm2_bd3lm.yaml --train.output_dir="$OUT" ${EXTRA[@]+"${EXTRA[@]}"} "$@"

# Block by block, one token per step, each finished block written once to the exact block cache.
python3 tasks/infer.py --model_path "$OUT/hf" --prompt "def parse_header(line):" \
  --prompt $'import os\n\ndef read_file(path):' \
  --infer.max_new_tokens=32 --infer.steps=32 --infer.alg=low_confidence --infer.block_length=8 \
  --infer.use_cache=block

# The one-line quality figure: the same held-out rows under the same noise, start vs end. For this
# recipe (bd3lm, 1/t weighting) it is a one-sample Monte-Carlo estimate of the held-out -ELBO.
python3 - "$OUT" <<'PY'
import sys
from veomni.trainer.loggers import eval_summary
line = eval_summary(sys.argv[1])
print("quality: " + (line.replace("eval loss", "-ELBO") if line else "no held-out evaluation was run"))
PY
