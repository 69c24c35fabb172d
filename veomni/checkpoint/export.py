"""Hugging Face export: a full (unsharded) state dict written by veomni.models.hf_io.save_model.

    export_hf(model, "out/hf", tokenizer, parallel_state)     # collective; the main rank writes
    python scripts/export_hf.py --checkpoint OUT/checkpoints/global_step_N --out DIR   # offline
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Dict, Optional, Union

import torch

from veomni.distributed.utils import unwrap_model

logger = logging.getLogger(__name__)


def gather_full_state_dict(model, parallel_state=None) -> Dict[str, torch.Tensor]:
    """Full fp32 CPU state dict on the main rank ({} on the others). Collective for FSDP2 and DeepSpeed."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from veomni.distributed.deepspeed_engine import is_deepspeed

    if is_deepspeed(model):  # fp32 master weights, ZeRO partitions gathered parameter by parameter
        return model.full_state_dict()
    if parallel_state is None or not parallel_state.distributed:
        return {k: v.detach().cpu() for k, v in unwrap_model(model).state_dict().items()}
    # full_state_dict + cpu_offload: shards are all-gathered one tensor at a time and only rank 0
    # keeps them (on CPU); other ranks get an empty dict.
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=opts)


def build_plain_model(config, state_dict: Dict[str, torch.Tensor], attn_impl: str = "sdpa"):
    """A single-device model of our registry holding `state_dict` (no random init, no copy)."""
    from veomni.models.registry import build_model
    from veomni.models.transformers.dense_decoder import RotaryEmbedding, rope_inv_freq

    with torch.device("meta"):
        model = build_model(config, attn_impl=attn_impl)
    sd = dict(state_dict)
    if getattr(config, "tie_word_embeddings", False) and hasattr(model, "lm_head"):  # decoders; BERT keeps its names
        sd.setdefault("lm_head.weight", sd.get("model.embed_tokens.weight"))
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    if missing or unexpected:
        raise KeyError(f"state dict does not match {type(model).__name__}: missing {missing[:10]}, "
                       f"unexpected {unexpected[:10]}")
    model.tie_weights()  # assign=True replaced the embedding Parameter: re-point the tied head
    for m in model.modules():
        if isinstance(m, RotaryEmbedding):  # non-persistent buffer: recomputed, not stored
            m.inv_freq = rope_inv_freq(config, m.inv_freq.numel() * 2)
    return model.eval()


def export_hf(model, out_dir: Union[str, os.PathLike], tokenizer=None, parallel_state=None,
              dtype: Optional[Union[str, torch.dtype]] = None,
              max_shard_size: Union[int, str] = "2GB", adapter_dir=None) -> Optional[Path]:
    """Write an HF directory (config.json, safetensors, tokenizer) from a plain/DDP/FSDP2/DeepSpeed model.

    Collective: every rank must call it. Returns the directory on the main rank, None elsewhere.
    dtype: save dtype (None = the master weights' dtype, fp32 in training).
    A LoRA model (veomni/models/lora.py) is exported merged (NF4 weights dequantised); adapter_dir,
    when given, also receives the bare adapter in peft's format.
    """
    from veomni.checkpoint.adapter import adapter_spec
    from veomni.models.hf_io import save_model

    inner = unwrap_model(model)
    is_main = parallel_state is None or parallel_state.is_main
    if adapter_spec(model) is not None:
        from veomni.models.lora import merged_model, save_peft_adapter

        plain = merged_model(model, parallel_state)
        if adapter_dir is not None:
            save_peft_adapter(model, adapter_dir, parallel_state)
    else:
        sd = gather_full_state_dict(model, parallel_state)
        plain = build_plain_model(inner.config, sd, attn_impl=getattr(inner, "attn_impl", "sdpa")) if is_main else None
    out = None
    if is_main:
        out = save_model(plain, out_dir, tokenizer=tokenizer, max_shard_size=max_shard_size, dtype=dtype)
        logger.info("exported HF model to %s", out)
    if parallel_state is not None:
        parallel_state.barrier()  # nobody reads the directory before it is complete
    return out
