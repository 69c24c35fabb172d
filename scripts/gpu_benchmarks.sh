#!/usr/bin/env bash
# The GPU figures of docs/benchmarks.md, in one go (one GPU, bf16).
#
#   bash scripts/gpu_benchmarks.sh [MODEL_DIR] [OUT_DIR]
#
# MODEL_DIR: an HF dir of SmolLM2-135M (default: scripts/prepare_smollm2.py's output). If it holds
# no weights (config + tokenizer only: how the lent GPU machine, which has no network and a 64 MiB
# upload limit, received it), weights are random-initialised with the same shape: speed and MFU
# do not depend on the values, decode agreement then shows mechanics only.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
MODEL=${1:-$(python3 scripts/prepare_smollm2.py | tail -n 1)}
OUT=${2:-outputs/gpu_bench}
mkdir -p "$OUT"

if ! ls "$MODEL"/*.safetensors >/dev/null 2>&1; then
  RANDOM_DIR="$OUT/smollm2_random"
  python3 - "$MODEL" "$RANDOM_DIR" <<'PY'
import sys, torch
from transformers import AutoConfig
from veomni.models.hf_io import load_tokenizer, save_model
from veomni.models.registry import build_model
src, dst = sys.argv[1:]
torch.manual_seed(0)
model = build_model(AutoConfig.from_pretrained(src))
model.init_weights()
save_model(model, dst, tokenizer=load_tokenizer(src))
print("random-initialised", dst)
PY
  MODEL="$RANDOM_DIR"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"

# 1. One MDM training step, ours vs HF + hand-written loss, bf16 autocast.
python3 scripts/bench_train.py --model_path "$MODEL" --device cuda --precision bf16 \
  --batch 8 --seq 2048 --steps 10 | tee "$OUT/bench_train_gpu.md"

# 2. The real trainer, bf16 FSDP2 on one GPU, packed 2048-token rows of Python stdlib code.
CORPUS=$(python3 -c "import os, sysconfig; print(os.path.join(sysconfig.get_paths()['stdlib'], 'email'))")
python3 tasks/train_torch.py configs/quickstart/smollm2_mdm.yaml --model.model_path="$MODEL" \
  --data.train_path="$CORPUS" --train.output_dir="$OUT/train" --data.max_seq_len=2048 \
  --train.micro_batch_size=8 --train.global_batch_size=8 --train.max_steps=40 --train.save_steps=0 \
  --train.mixed_precision=bf16 --train.data_parallel=fsdp2 --train.eval_steps=0 \
  --data.eval_split_ratio=0 --train.export_hf=false --train.progress_bar=false 2>&1 | tail -n 5
cp "$OUT/train/metrics.jsonl" "$OUT/train_metrics.jsonl"

# 3. Decoding: every cached / parallel row beside its own baseline, 256 new tokens, batch 1 and 8.
python3 scripts/bench_decode.py --model_path "$MODEL" --scorer_path "$MODEL" --device cuda --dtype bfloat16 \
  --new_tokens 256 --batch_sizes 1,8 --max_minutes 0 --out "$OUT/bench_decode_gpu.md" | tail -n 40

# 4. LM head + CE alone, the model.ops.linear_ce choices (bf16, fwd + bwd, peak memory above the
#    inputs and time): SmolLM2's head and Qwen2.5-0.5B's (V=151936, H=896), 16384 scored rows. Per-row
#    1/t weights for eager / triton (liger-kernel <0.8.5 cannot weight rows: its row is unweighted).
for SHAPE in "--vocab=49152 --hidden=576" "--vocab=151936 --hidden=896"; do
  python3 scripts/bench_loss_memory.py --device cuda --dtype bf16 --batch 8 --seq 2048 --chunk-size 4096 \
    $SHAPE --weighted --variants full,chunked,triton | tee -a "$OUT/bench_loss_memory_gpu.md"
  python3 scripts/bench_loss_memory.py --device cuda --dtype bf16 --batch 8 --seq 2048 --chunk-size 4096 \
    $SHAPE --variants chunked,triton,liger | tee -a "$OUT/bench_loss_memory_gpu.md"
done

# 5. Kernels and torch.compile (issue 13). Training at the Qwen2.5-0.5B shape (random weights,
#    SmolLM2's tokenizer), bf16, seq 4096, tok/s and MFU in one table: HF eager, HF + liger-kernel
#    (RMSNorm/RoPE/SwiGLU), ours, ours + train.compile, ours with the Triton ops (rms_norm, rope,
#    swiglu, linear_ce), and ours with the Triton ops + compile. A row that fails says why.
QWEN_DIR="$OUT/qwen2_5_0_5b_random"
python3 - "$MODEL" "$QWEN_DIR" <<'PY'
import sys, torch
from transformers import Qwen2Config
from veomni.models.hf_io import load_tokenizer, save_model
from veomni.models.registry import build_model
src, dst = sys.argv[1:]
tok = load_tokenizer(src)
cfg = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                  rope_theta=1000000.0, tie_word_embeddings=True, rms_norm_eps=1e-6,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
torch.manual_seed(0)
model = build_model(cfg)
model.init_weights()
save_model(model, dst, tokenizer=tok)
print("random-initialised Qwen2.5-0.5B shape", dst)
PY
python3 scripts/bench_train.py --model_path "$QWEN_DIR" --device cuda --precision bf16 \
  --batch 4 --seq 4096 --steps 10 --compile --kernels | tee "$OUT/bench_train_compile_qwen0_5b.md"

# 6. Decode ms per forward, eager vs compiled (CUDA graphs), batch 1 and 8, both model sizes.
for M in "$MODEL" "$QWEN_DIR"; do
  python3 scripts/bench_decode_compile.py --model_path "$M" --device cuda --dtype bfloat16 \
    --batch_sizes 1,8 --prompt 256 --new_tokens 256 --block_length 32 --warmup 3 --repeats 20 \
    | tee -a "$OUT/bench_decode_compile_gpu.md"
done
# The compiled-decoding test on the GPU (CUDA graphs + the preallocated cache; the layer tests stay on CPU).
VEOMNI_TEST_DEVICE=cuda python3 -m pytest -q tests/inference/test_sampling_compile.py \
  | tail -n 3 | tee "$OUT/compile_tests_gpu.txt"
