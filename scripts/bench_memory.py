"""Peak host memory (RSS) per rank while a model is loaded and sharded for FSDP2: eager vs meta init.

    python3 scripts/bench_memory.py                       # SmolLM2-135M + a ~450M synthetic Llama
    python3 scripts/bench_memory.py --models smollm2 --nprocs 1 2

For every model, path and process count, fresh ranks (gloo, CPU, fp32) do what the trainer does
before its first step and report the peak RSS above what each had before (imports and the process
group, measured with veomni/utils/peak_memory.py) and what it still holds afterwards:
  eager      every rank loads the whole model (load_model + ensure_mask_token), then parallelize
             (model.meta_init=false: the old path);
  meta       meta-device model, parallelize, each rank reads only its own slices of the safetensors
             (model.meta_init=true, the default);
  scratch-eager / scratch-meta   init_from_scratch: every rank draws the whole random model, vs rank 0
             draws it and broadcasts it into the shards (synthetic model only; on one process
             meta init builds eagerly, so the two rows are the same code there).
Each variant runs in its own processes, one variant at a time.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _worker(rank, world, port, model_dir, variant, out_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import torch

    torch.set_num_threads(1)
    from veomni.distributed import init_parallel_state, parallelize
    from veomni.models.hf_io import load_model, load_tokenizer
    from veomni.models.mask_token import ensure_mask_token
    from veomni.models.registry import build_model
    from veomni.models.sharded_load import prepare_meta_model
    from veomni.utils.peak_memory import peak_since_mib, reset_peak, status_kib

    ps = init_parallel_state("fsdp2")
    tok = load_tokenizer(model_dir)
    scratch = variant.startswith("scratch")
    ps.barrier()
    base = reset_peak()

    def build_eager():
        if scratch:
            from transformers import AutoConfig

            torch.manual_seed(0)
            model = build_model(AutoConfig.from_pretrained(model_dir))
            model.init_weights()
            return model
        return load_model(model_dir, dtype=torch.float32)

    if variant.endswith("eager"):
        model = build_eager()
        ensure_mask_token(model, tok)
        parallelize(model, ps, {})
    else:
        model, pending = prepare_meta_model(model_dir, tok, "<|mask|>", torch.float32, "sdpa", ps, scratch, build_eager)
        parallelize(model, ps, {"check_replicas": pending is None})  # None: built eagerly (one process)
        if pending is not None:
            pending.load(model)
    peak = peak_since_mib(base)
    held = (status_kib("VmRSS") - base) / 1024
    local = sum(p.to_local().numel() for p in model.parameters()) * 4 / 2**20
    (Path(out_dir) / f"{rank}.json").write_text(json.dumps({"peak": peak, "held": held, "shard": local}))
    ps.barrier()
    ps.destroy()


def run_variant(model_dir: str, variant: str, world: int) -> list:
    import torch.multiprocessing as mp

    from veomni.distributed.utils import find_free_port

    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_worker, args=(world, find_free_port(), model_dir, variant, out), nprocs=world,
                           start_method="spawn", join=True)
        return [json.loads((Path(out) / f"{r}.json").read_text()) for r in range(world)]


def synthetic_dir(root: Path, tok_dir: str) -> str:
    """A ~450M-parameter Llama (SmolLM2's tokenizer), random weights, as sharded safetensors."""
    import torch
    from transformers import LlamaConfig

    from veomni.models.hf_io import load_tokenizer, save_model
    from veomni.models.registry import build_model

    path = root / "llama_450m"
    if (path / "config.json").exists():
        return str(path)
    tok = load_tokenizer(tok_dir)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                      num_attention_heads=16, num_key_value_heads=8, tie_word_embeddings=True,
                      max_position_embeddings=2048)
    with torch.device("meta"):
        model = build_model(cfg)
    model.to_empty(device="cpu")
    model.tie_weights()
    model.init_weights()
    save_model(model, path, tokenizer=tok, max_shard_size="500MB")
    return str(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["smollm2", "synthetic"], choices=["smollm2", "synthetic"])
    ap.add_argument("--nprocs", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--variants", nargs="+", default=["eager", "meta", "scratch-eager", "scratch-meta"],
                    choices=["eager", "meta", "scratch-eager", "scratch-meta"])
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "veomni" / "bench_memory"),
                    help="where the synthetic checkpoint is written once")
    a = ap.parse_args()
    from veomni.models.smollm2 import prepare_smollm2

    smol = str(prepare_smollm2())
    Path(a.cache).mkdir(parents=True, exist_ok=True)
    rows = []
    for name in a.models:
        model_dir = smol if name == "smollm2" else synthetic_dir(Path(a.cache), smol)
        size = sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors")) / 2**20
        variants = [v for v in a.variants if name == "synthetic" or not v.startswith("scratch")]
        for variant in variants:
            for world in a.nprocs:
                for rank, r in enumerate(run_variant(model_dir, variant, world)):
                    rows.append((name, size, variant, world, rank, r))
                    print(f"{name} {variant} x{world} rank {rank}: peak {r['peak']:.0f} MiB", file=sys.stderr)
    print("| model | checkpoint MiB | path | processes | rank | peak RSS MiB | held after MiB | own shard MiB |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for name, size, variant, world, rank, r in rows:
        print(f"| {name} | {size:.0f} | {variant} | {world} | {rank} | {r['peak']:.0f} | {r['held']:.0f} | "
              f"{r['shard']:.0f} |")


if __name__ == "__main__":
    main()
