"""Qwen3-MoE family: the Qwen3 attention (q/k norms, explicit head_dim) with sparse MLPs.

Layer i is sparse unless it is in `mlp_only_layers`, and only every `decoder_sparse_step`-th
layer is (transformers' rule, `moe.is_sparse_layer`); the others keep a dense SwiGLU of
`intermediate_size`. Experts are fused [E, ...] tensors (veomni/models/transformers/moe.py).
"""
from transformers import Qwen3MoeConfig

from veomni.models.transformers.dense_decoder import MLP, CausalLMOutput, DecoderForCausalLM, activation
from veomni.models.transformers.moe import SparseMoeBlock, is_sparse_layer

__all__ = ["Qwen3MoeConfig", "Qwen3MoeForCausalLM", "CausalLMOutput"]


class Qwen3MoeForCausalLM(DecoderForCausalLM):
    config_class = Qwen3MoeConfig
    qkv_bias = None
    o_bias = None
    qk_norm = True

    def build_mlp(self, config, layer_idx: int):
        if is_sparse_layer(config, layer_idx):
            return SparseMoeBlock(config, activation(config))
        return MLP(config)
