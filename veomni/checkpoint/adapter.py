"""Adapter-only checkpoints for LoRA / QLoRA runs (the `lora` engine of veomni/checkpoint/dcp.py).

A LoRA run trains a few million parameters on a frozen base of billions, and DCP cannot serialise
an NF4 base anyway (bitsandbytes' Params4bit carries its quantisation state outside the tensor).
So such a run checkpoints only what trains, in the usual atomic `global_step_<N>` layout:

    .metadata, __<r>_0.distcp   DCP: the trainable parameters (LoRA A/B, the mask-row delta, any
                                model.lora_trainable parameters) and their optimizer state
    scheduler.pt, dataloader.json, train_state.json, rng_rank<r>.pt, model_config.json, ...
    COMPLETE                    the manifest, with engine "lora", the adapter record (rank, alpha,
                                adapted modules, trainable names, quantize) and the base checkpoint:
                                its path and a sha256 over its config.json and weight files

On resume the trainer rebuilds the model exactly as at the start (base re-loaded from
model.model_path, mask token, NF4, fresh adapters) and this module loads the saved tensors over the
adapters. A checkpoint whose base fingerprint or adapter record differs from the run is refused
with a ValueError (a setting to fix, not damage to fall back from), and so is a full-model
checkpoint in a LoRA run or the other way round.

`load_merged_model(ckpt)` rebuilds the merged single-device model offline (scripts/export_hf.py,
sampling from a checkpoint).
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Any, Dict, Optional

import torch

logger = logging.getLogger(__name__)

ENGINE = "lora"


def adapter_spec(model):
    """The model's LoraSpec, or None (without importing peft for a model that has none)."""
    from veomni.distributed.utils import unwrap_model
    from veomni.models.lora import SPEC_ATTR

    return getattr(unwrap_model(model), SPEC_ATTR, None)


# ---------------------------------------------------------------------------- the base checkpoint
def base_files(path) -> list:
    """The files that define a base checkpoint's weights: config.json and the weight files of an HF
    directory, or a .gguf file."""
    from veomni.models.hf_io import _weight_files

    p = Path(path)
    if p.is_file():
        return [p]
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"base checkpoint {p} is neither an HF directory (config.json) nor a file")
    return [p / "config.json", *_weight_files(p)[1]]


def base_fingerprint(path) -> Dict[str, Any]:
    """sha256 over the names and bytes of the base checkpoint's files (~1 GB/s on one core)."""
    h, total, names = hashlib.sha256(), 0, []
    for f in base_files(path):
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 23):
                h.update(chunk)
                total += len(chunk)
        names.append(f.name)
    return {"sha256": h.hexdigest(), "bytes": total, "files": names}


def _fingerprint(spec) -> Dict[str, Any]:
    if spec.fingerprint is None:  # once per process: the base does not change under a run
        spec.fingerprint = base_fingerprint(spec.base_path)
    return spec.fingerprint


# ---------------------------------------------------------------------------- save / load parts
def manifest_fields(model) -> Dict[str, Any]:
    """The manifest entries of an adapter checkpoint (main rank; hashes the base on first use)."""
    spec = adapter_spec(model)
    return {"engine": ENGINE, "lora": spec.record(), "base": {"path": spec.base_path, **_fingerprint(spec)}}


def state_dicts(model, optimizer) -> Dict[str, Any]:
    """{"model": the trainable parameters, "optimizer": their state}, keyed by plain names; DTensor
    shards under FSDP2 (DCP saves and reshards them like the full-model case)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

    spec = adapter_spec(model)
    opts = StateDictOptions(ignore_frozen_params=True)
    if optimizer is None:
        msd = get_model_state_dict(model, options=opts)
        state = {}
    else:
        msd, osd = get_state_dict(model, optimizer, options=opts)
        state = {"optimizer": osd}
    # ignore_frozen_params keeps bitsandbytes' quant-state entries (they are not parameters): drop them.
    msd = {k: v for k, v in msd.items() if k in set(spec.params)}
    missing = sorted(set(spec.params) - set(msd))
    if missing:
        raise RuntimeError(f"adapter checkpoint: trainable parameters missing from the state dict: {missing[:5]}")
    return {"model": msd, **state}


def set_state(model, optimizer, state: Dict[str, Any]) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_state_dict

    opts = StateDictOptions(strict=False)  # the frozen base is not in the checkpoint, by design
    if optimizer is None:
        set_model_state_dict(model, state["model"], options=opts)
    else:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                       options=opts)


def check_engine(path: Path, manifest: Dict[str, Any], model, ps) -> None:
    """Refuse (ValueError, on every rank alike) a checkpoint of the other kind, other adapters, or
    another base."""
    spec = adapter_spec(model)
    saved = manifest.get("engine") == ENGINE
    export = f"python scripts/export_hf.py --checkpoint {path} --out DIR"
    if saved and spec is None:
        raise ValueError(
            f"{path} is an adapter-only (LoRA) checkpoint; this run has no adapters (model.lora_rank=0). Resume it "
            f"with the run's model.lora_* settings, or merge it into an HF directory ({export}) and start from that.")
    if not saved and spec is not None:
        raise ValueError(
            f"{path} is a full-model checkpoint (engine {manifest.get('engine', 'dcp')}); a LoRA run resumes only "
            "from its own adapter checkpoints. Use another train.output_dir, or export that checkpoint to HF and "
            "set model.model_path to it.")
    if spec is None:
        return
    record = manifest.get("lora", {})
    if record != spec.record():
        diff = sorted(k for k in set(record) | set(spec.record()) if record.get(k) != spec.record().get(k))
        raise ValueError(f"{path} holds other adapters than this run builds (differing: {diff}; saved "
                         f"{ {k: record.get(k) for k in diff if k not in ('modules', 'params')} }). Resume with "
                         "the same model.lora_* / model.quantize settings and the same base model.")
    error = None
    if ps.is_main:
        saved_base, now = manifest.get("base", {}), _fingerprint(spec)
        if saved_base.get("sha256") != now["sha256"]:
            error = (f"{path} was trained on the base checkpoint {saved_base.get('path')} (sha256 "
                     f"{str(saved_base.get('sha256'))[:16]}..., {saved_base.get('bytes')} bytes); model.model_path="
                     f"{spec.base_path} holds other weights (sha256 {now['sha256'][:16]}..., {now['bytes']} bytes). "
                     "Adapters only make sense on the weights they were trained on: point model.model_path at "
                     "that checkpoint.")
    error = ps.broadcast_object(error)
    if error:
        raise ValueError(error)


# ---------------------------------------------------------------------------- offline merge
def _run_config(ckpt: Path) -> dict:
    import yaml

    for cand in (ckpt / "resolved_config.yaml", ckpt.parent.parent / "resolved_config.yaml"):
        if cand.is_file():
            return yaml.safe_load(cand.read_text()) or {}
    raise FileNotFoundError(f"{ckpt}: no resolved_config.yaml (in the checkpoint or its run directory); it names "
                            "the tokenizer and mask token the adapters were trained with")


def load_merged_model(ckpt, attn_impl: str = "sdpa", base_path: Optional[str] = None):
    """(merged single-device model, tokenizer) of an adapter checkpoint: `load_adapted_model`, merged."""
    from veomni.models.lora import merged_model

    model, tokenizer = load_adapted_model(ckpt, attn_impl, base_path)
    return merged_model(model), tokenizer


def load_adapted_model(ckpt, attn_impl: str = "sdpa", base_path: Optional[str] = None):
    """(model with its adapters, tokenizer) of an adapter checkpoint, rebuilt as training built it: the
    base re-loaded (from the path the manifest records, or `base_path`) and checked against the
    recorded fingerprint, the mask token added, NF4 applied, the saved adapters loaded."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    from veomni.checkpoint.dcp import read_manifest, run_dcp
    from veomni.models.hf_io import load_model, load_tokenizer
    from veomni.models.lora import LoraSettings, apply_lora
    from veomni.models.mask_token import ensure_mask_token

    ckpt = Path(ckpt)
    manifest = read_manifest(ckpt)
    record, base = manifest["lora"], manifest["base"]
    base_path = base_path or base["path"]
    now = base_fingerprint(base_path)
    if now["sha256"] != base["sha256"]:
        raise ValueError(f"{ckpt} was trained on {base['path']} (sha256 {base['sha256'][:16]}...); {base_path} holds "
                         "other weights. Pass the original base checkpoint.")
    m = _run_config(ckpt).get("model") or {}
    saved_cfg = json.loads((ckpt / "model_config.json").read_text())
    model = load_model(base_path, dtype=m.get("dtype", "float32"), attn_impl=attn_impl)
    tokenizer = load_tokenizer(m.get("tokenizer_path") or base_path)
    ensure_mask_token(model, tokenizer, m.get("mask_token", "<|mask|>"))
    if (model.config.vocab_size, model.config.mask_token_id) != (saved_cfg["vocab_size"], saved_cfg["mask_token_id"]):
        raise ValueError(f"{ckpt}: the tokenizer gives vocab {model.config.vocab_size} / mask id "
                         f"{model.config.mask_token_id}, training had {saved_cfg['vocab_size']} / "
                         f"{saved_cfg['mask_token_id']}: is model.tokenizer_path in its resolved_config.yaml right?")
    for key in ("dllm_attn_mode", "dllm_block_size", "dllm_logit_shift"):
        if key in saved_cfg:
            setattr(model.config, key, saved_cfg[key])
    exact = [f"^{re.escape(n)}$" for n in record["params"] if ".lora_" not in n]
    settings = LoraSettings(rank=record["rank"], alpha=record["alpha"], dropout=record["dropout"],
                            targets=tuple(f"^{re.escape(n)}$" for n in record["modules"]),
                            trainable=tuple(p.replace(r"\.base_layer", "") for p in exact),
                            mask_embedding=record["mask_token_id"] is not None, quantize=record["quantize"])
    spec = apply_lora(model, settings, base_path=base_path)
    if list(spec.params) != list(record["params"]):
        raise ValueError(f"{ckpt}: rebuilding the adapters gave other parameters than the checkpoint records")
    params = dict(model.named_parameters())
    sd = {name: torch.empty_like(params[name]) for name in spec.params}
    run_dcp(dcp.load, {"model": sd}, storage_reader=FileSystemReader(str(ckpt)))
    with torch.no_grad():
        for name, t in sd.items():
            params[name].copy_(t)
    return model.eval(), tokenizer
