"""model_type -> our model class, its FLOPs function and its HF weight-name adapter.

To add a family: write veomni/models/transformers/<family>/modeling_<family>.py and add one
`ModelSpec` below (docs/models.md walks through it).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Dict


def _identity_keys(state_dict: Dict) -> Dict:
    # Our parameter names equal HF's. HF checkpoints of some versions carry the non-persistent
    # RoPE buffer; it is recomputed from the config, so it is dropped rather than loaded.
    return {k: v for k, v in state_dict.items() if not k.endswith("rotary_emb.inv_freq")}


@dataclass(frozen=True)
class ModelSpec:
    model_type: str
    module: str  # import path of the modeling file
    class_name: str
    config_class_name: str  # HF config class name in transformers
    flops_fn: Callable = None  # (config, seq_lens, head_tokens, attn_mode, backward) -> FLOPs
    hf_to_ours: Callable[[Dict], Dict] = _identity_keys
    ours_to_hf: Callable[[Dict], Dict] = _identity_keys
    fused_experts: bool = False  # hub checkpoints store experts one by one (veomni/models/moe_weights.py)

    def hf_reader(self, config) -> "_Reader":
        """A converter for one checkpoint load: call it on each shard, then `.finish()`."""
        if self.fused_experts:
            from veomni.models.moe_weights import ExpertMerger

            return _Reader(self.hf_to_ours, ExpertMerger(config.num_experts))
        return _Reader(self.hf_to_ours)

    def hf_writer(self, state_dict: Dict) -> Dict:
        """Our state dict -> the hub's names and layout."""
        if self.fused_experts:
            from veomni.models.moe_weights import split_experts

            state_dict = split_experts(state_dict)
        return self.ours_to_hf(state_dict)

    @property
    def model_class(self):
        return getattr(importlib.import_module(self.module), self.class_name)

    @property
    def config_class(self):
        import transformers

        return getattr(transformers, self.config_class_name)


class _Reader:
    def __init__(self, keys: Callable[[Dict], Dict], merger=None):
        self.keys, self.merger = keys, merger

    def __call__(self, state_dict: Dict) -> Dict:
        state_dict = self.keys(state_dict)
        return state_dict if self.merger is None else self.merger(state_dict)

    def finish(self) -> None:
        if self.merger is not None:
            self.merger.finish()


def _dense_flops(*args, **kwargs):
    from veomni.models.flops import dense_decoder_flops

    return dense_decoder_flops(*args, **kwargs)


_BASE = "veomni.models.transformers"
MODEL_REGISTRY: Dict[str, ModelSpec] = {
    "llama": ModelSpec("llama", f"{_BASE}.llama.modeling_llama", "LlamaForCausalLM", "LlamaConfig", _dense_flops),
    "qwen2": ModelSpec("qwen2", f"{_BASE}.qwen2.modeling_qwen2", "Qwen2ForCausalLM", "Qwen2Config", _dense_flops),
    "qwen3": ModelSpec("qwen3", f"{_BASE}.qwen3.modeling_qwen3", "Qwen3ForCausalLM", "Qwen3Config", _dense_flops),
    # MoE: the FLOPs count only active parameters (router + top-k experts), see flops.py.
    "qwen3_moe": ModelSpec("qwen3_moe", f"{_BASE}.qwen3_moe.modeling_qwen3_moe", "Qwen3MoeForCausalLM",
                           "Qwen3MoeConfig", _dense_flops, fused_experts=True),
    "qwen2_moe": ModelSpec("qwen2_moe", f"{_BASE}.qwen2_moe.modeling_qwen2_moe", "Qwen2MoeForCausalLM",
                           "Qwen2MoeConfig", _dense_flops, fused_experts=True),
}


def get_spec(model_type: str) -> ModelSpec:
    if model_type not in MODEL_REGISTRY:
        raise KeyError(
            f"model_type={model_type!r} is not supported; supported: {sorted(MODEL_REGISTRY)}. "
            "See docs/models.md, 'Adding a family'."
        )
    return MODEL_REGISTRY[model_type]


def build_model(config, attn_impl: str = "sdpa"):
    """Instantiate our model for an HF config object (weights uninitialised: call init_weights or load)."""
    return get_spec(config.model_type).model_class(config, attn_impl=attn_impl)
