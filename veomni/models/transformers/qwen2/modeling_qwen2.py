"""Qwen2 / Qwen2.5 family (Dream, Open-dCoder shape): like Llama plus a bias on q/k/v (never on o).

Sliding-window attention (config.use_sliding_window) is not implemented and is refused: every
released Qwen2.5 checkpoint ships with it switched off.
"""
from transformers import Qwen2Config

from veomni.models.transformers.dense_decoder import CausalLMOutput, DecoderForCausalLM

__all__ = ["Qwen2Config", "Qwen2ForCausalLM", "CausalLMOutput"]


class Qwen2ForCausalLM(DecoderForCausalLM):
    config_class = Qwen2Config
    qkv_bias = True
    o_bias = False
    qk_norm = False
