"""Turn a training checkpoint (DCP directory) into a Hugging Face model directory, on one process.

    python scripts/export_hf.py --checkpoint OUT/checkpoints/global_step_N --out DIR \
        [--config OUT/resolved_config.yaml] [--tokenizer PATH] [--dtype bfloat16]

The model is rebuilt from the checkpoint's model_config.json (written by save_checkpoint, so an
added mask token / resized vocabulary is already in it) and only the model part of the checkpoint
is read: no GPU, no process group, any number of ranks may have saved it (a data_parallel=deepspeed
checkpoint is merged from its ZeRO shards by DeepSpeed's zero_to_fp32; an adapter-only LoRA
checkpoint re-loads the base it records, checks its sha256, and is exported merged). The tokenizer comes from
--tokenizer, else from model.tokenizer_path of the resolved config (--config, else the copy inside
the checkpoint, else <run>/resolved_config.yaml).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

import torch

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _resolved_config(ckpt: Path, explicit: Optional[str]) -> Optional[dict]:
    import yaml

    if explicit is not None:
        if not Path(explicit).is_file():
            raise FileNotFoundError(f"--config {explicit} does not exist")
        path = Path(explicit)
    else:
        found = [p for p in (ckpt / "resolved_config.yaml", ckpt.parent.parent / "resolved_config.yaml")
                 if p.is_file()]
        if not found:
            return None
        path = found[0]
    data = yaml.safe_load(path.read_text()) or {}
    print(f"using run config {path}")
    return data


def _deepspeed_state_dict(ckpt: Path):
    """fp32 master weights of a data_parallel=deepspeed checkpoint (its ds/ folder), one process, CPU."""
    from veomni.distributed.deepspeed_engine import DS_TAG, import_deepspeed, strip_wrapper_names

    import_deepspeed()  # ImportError with the install line when missing
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=DS_TAG)
    return {strip_wrapper_names(k): v.float() for k, v in sd.items()}  # saved under activation checkpointing


def load_checkpoint_model(ckpt: Path, attn_impl: str = "sdpa"):
    """Our model with the weights stored in a DCP checkpoint directory (CPU, fp32 master weights)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    from veomni.checkpoint.dcp import CheckpointError, read_manifest, run_dcp, verify_checkpoint
    from veomni.checkpoint.export import build_plain_model
    from veomni.models.registry import build_model, get_spec

    reason = verify_checkpoint(ckpt, checksums=True)
    if reason:
        raise CheckpointError(f"{ckpt}: {reason}")
    cfg_file = ckpt / "model_config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file} is missing: this checkpoint was saved from a model without an "
                                "HF config, so its architecture cannot be rebuilt here.")
    model_type = json.loads(cfg_file.read_text())["model_type"]
    config = get_spec(model_type).config_class.from_json_file(str(cfg_file))
    engine = read_manifest(ckpt).get("engine")
    if engine == "deepspeed":
        return build_plain_model(config, _deepspeed_state_dict(ckpt), attn_impl=attn_impl)
    if engine == "lora":  # adapters only: re-load the recorded base, add them, merge
        from veomni.checkpoint.adapter import load_merged_model

        return load_merged_model(ckpt, attn_impl=attn_impl)[0]
    with torch.device("meta"):
        shapes = build_model(config, attn_impl=attn_impl).state_dict()
    meta = FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    sd = {}
    for key, t in shapes.items():
        stored = meta.get(f"model.{key}")
        if stored is None:
            raise KeyError(f"{ckpt} has no tensor 'model.{key}' (is model_config.json the right model?)")
        sd[key] = torch.empty(tuple(stored.size), dtype=stored.properties.dtype)
    # Keys under "model" only: the optimizer state in the same checkpoint is never read.
    run_dcp(dcp.load, {"model": sd}, storage_reader=FileSystemReader(str(ckpt)))
    return build_plain_model(config, sd, attn_impl=attn_impl)


def main(argv: Optional[List[str]] = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="a .../checkpoints/global_step_N directory")
    ap.add_argument("--out", required=True, help="HF output directory")
    ap.add_argument("--config", default=None, help="resolved_config.yaml of the run (tokenizer path)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer directory (overrides the config's)")
    ap.add_argument("--dtype", default=None, help="save dtype, e.g. bfloat16 (default: as stored, fp32)")
    ap.add_argument("--max-shard-size", default="2GB")
    args = ap.parse_args(argv)

    from veomni.models.hf_io import load_tokenizer, save_model

    ckpt = Path(args.checkpoint)
    if not ckpt.is_dir():
        raise FileNotFoundError(f"--checkpoint {ckpt} is not a directory")
    run_cfg = _resolved_config(ckpt, args.config) or {}
    model_cfg = run_cfg.get("model") or {}
    model = load_checkpoint_model(ckpt, attn_impl=model_cfg.get("attn_impl", "sdpa"))
    tok_path = args.tokenizer or model_cfg.get("tokenizer_path") or model_cfg.get("model_path")
    tokenizer = None
    if tok_path:
        tokenizer = load_tokenizer(tok_path, mask_token=model_cfg.get("mask_token"))
    else:
        print("note: no tokenizer given (--tokenizer or model.tokenizer_path in --config); "
              "exporting weights and config only")
    out = save_model(model, args.out, tokenizer=tokenizer, max_shard_size=args.max_shard_size, dtype=args.dtype)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
