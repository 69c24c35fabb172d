"""Qwen3.5-MoE hybrid: the Qwen3.5 layers (GDN | gated attention, zero-centred norms) with a sparse
MLP in every layer: top-k experts (renormalised) plus a shared expert scaled by
sigmoid(shared_expert_gate(x)), the MoE block of veomni/models/transformers/moe.py."""
from __future__ import annotations

from transformers import Qwen3_5MoeTextConfig

from veomni.models.transformers.dense_decoder import MLP, CausalLMOutput, activation
from veomni.models.transformers.moe import SparseMoeBlock
from veomni.models.transformers.qwen3_5.modeling_qwen3_5 import HybridForCausalLM

__all__ = ["Qwen3_5MoeTextConfig", "Qwen3_5MoeForCausalLM", "CausalLMOutput"]


class Qwen3_5MoeForCausalLM(HybridForCausalLM):
    config_class = Qwen3_5MoeTextConfig

    def build_mlp(self, config, layer_idx: int):
        shared = MLP(config, intermediate_size=config.shared_expert_intermediate_size)
        return SparseMoeBlock(config, activation(config), shared_mlp=shared)
