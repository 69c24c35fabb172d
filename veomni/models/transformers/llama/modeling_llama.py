"""Llama family (SmolLM2, Llama 2/3, LLaDA shape): RMSNorm, RoPE, SwiGLU, GQA.

Bias on q/k/v/o follows `config.attention_bias` (False for every released Llama); the MLP bias
follows `config.mlp_bias`. All code lives in the shared dense decoder; this file states the family.
"""
from transformers import LlamaConfig

from veomni.models.transformers.dense_decoder import CausalLMOutput, DecoderForCausalLM

__all__ = ["LlamaConfig", "LlamaForCausalLM", "CausalLMOutput"]


class LlamaForCausalLM(DecoderForCausalLM):
    config_class = LlamaConfig
    qkv_bias = None  # from config.attention_bias
    o_bias = None
    qk_norm = False
