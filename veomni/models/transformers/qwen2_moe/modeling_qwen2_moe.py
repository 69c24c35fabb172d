"""Qwen2-MoE family: the Qwen2 attention (bias on q/k/v per `qkv_bias`, none on o) with sparse
MLPs that add a shared expert: a dense SwiGLU of `shared_expert_intermediate_size` on every
token, scaled by sigmoid(shared_expert_gate(x)). Sparse/dense layers follow transformers' rule
(`moe.is_sparse_layer`)."""
from transformers import Qwen2MoeConfig

from veomni.models.transformers.dense_decoder import MLP, CausalLMOutput, DecoderForCausalLM, activation
from veomni.models.transformers.moe import SparseMoeBlock, is_sparse_layer

__all__ = ["Qwen2MoeConfig", "Qwen2MoeForCausalLM", "CausalLMOutput"]


class Qwen2MoeForCausalLM(DecoderForCausalLM):
    config_class = Qwen2MoeConfig
    o_bias = False
    qk_norm = False

    def __init__(self, config, attn_impl: str = "sdpa"):
        self.qkv_bias = bool(getattr(config, "qkv_bias", True))
        super().__init__(config, attn_impl=attn_impl)

    def build_mlp(self, config, layer_idx: int):
        if is_sparse_layer(config, layer_idx):
            shared = MLP(config, intermediate_size=config.shared_expert_intermediate_size)
            return SparseMoeBlock(config, activation(config), shared_mlp=shared)
        return MLP(config)
