"""veomni-dllm: train, sample and evaluate masked-diffusion language models."""
from setuptools import find_packages, setup

# torch is deliberately not pinned here: install it first (`pip install torch==2.13.0` on CPU, or
# the CUDA build matching your driver); an unpinned `torch` requirement would pull a multi-GB CUDA
# wheel on a CPU machine.
install_requires = [
    "torch>=2.6",
    "transformers>=4.56,<6",  # tested on 5.23; a new major may change config/tokenizer APIs
    "safetensors",
    "tokenizers",
    "pyyaml",
    "numpy",
    "tqdm",
    "gguf",  # transformers reads the embedded SmolLM2 GGUF through it ...
    "accelerate",  # ... and refuses GGUF loading without accelerate
    "sentencepiece",
    "tensorboard",
    "matplotlib",
    "torchdata>=0.10",  # StatefulDataLoader: the training loaders (workers, exact mid-epoch resume)
]

extras_require = {
    "gpu": ["flash-attn", "liger-kernel", "triton"],
    # DeepSpeed ZeRO-2/3 (train.data_parallel=deepspeed). Install with DS_BUILD_OPS=0 (no C++/CUDA ops
    # are built; scripts/setup.sh does it). 0.18.0 mis-accumulated ZeRO-2 gradients with a caller-set
    # accumulation boundary (tests/distributed/test_deepspeed.py catches it); tested 0.19.0 and 0.19.8.
    "deepspeed": ["deepspeed>=0.19,<0.20"],
    # LoRA / QLoRA (model.lora_rank, model.quantize=nf4; docs/recipes.md): bitsandbytes for the NF4 base
    # (its CPU backend runs the tests), peft for the LoRA layers. Tested with 0.50.2 and 0.21.2.
    "quant": ["bitsandbytes>=0.50,<0.51", "peft>=0.21,<0.22"],
    "eval": ["lm-eval"],
    "wandb": ["wandb"],
    # Parquet files and hf: (datasets streaming) data sources, scripts/download_data.py --to_jsonl.
    "data": ["datasets>=2.19", "pyarrow"],
    "dev": ["pytest", "pytest-timeout", "ruff"],
    # Triton kernels and liger-kernel: the triton / liger choices of model.ops (docs/kernels.md). On a
    # CPU machine they run only under TRITON_INTERPRET=1 (what the tests do). liger-kernel 0.8.1 is
    # the newest that runs under the interpreter: 0.8.2-0.8.5 fail there ("'float' object has no
    # attribute 'to'"). Tested with triton 3.9.0; a CUDA torch wheel pins its own triton (3.3 for
    # torch 2.7 on), which this range accepts.
    "kernels": ["triton>=3.3,<3.10", "liger-kernel==0.8.1"],
}

setup(
    name="veomni-dllm",
    version="0.1.0",
    description="Full-stack framework for masked-diffusion language models",
    packages=find_packages(include=["veomni", "veomni.*"]),
    python_requires=">=3.10",
    install_requires=install_requires,
    extras_require=extras_require,
)
