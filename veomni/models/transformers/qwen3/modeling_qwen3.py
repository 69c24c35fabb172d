"""Qwen3 family: Llama-like, explicit head_dim (may differ from hidden/heads), per-head RMSNorm
on q and k before RoPE (q_norm/k_norm), bias on q/k/v/o per config.attention_bias."""
from transformers import Qwen3Config

from veomni.models.transformers.dense_decoder import CausalLMOutput, DecoderForCausalLM

__all__ = ["Qwen3Config", "Qwen3ForCausalLM", "CausalLMOutput"]


class Qwen3ForCausalLM(DecoderForCausalLM):
    config_class = Qwen3Config
    qkv_bias = None
    o_bias = None
    qk_norm = True
