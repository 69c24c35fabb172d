"""Qwen3.5 (dense) hybrid: Gated DeltaNet and gated-attention layers, as `config.layer_types` says.

Differences from the dense decoder, each in its own small module:
  - every RMSNorm (block norms, final norm, q/k norms) is zero-centred: x_hat * (1 + w), w starts at 0;
  - attention is gated: q_proj gives [query | gate] per head, the output is attn * sigmoid(gate);
    q/k norms, partial RoPE (`partial_rotary_factor` of head_dim; text positions make Qwen3.5's
    mRoPE sections plain 1-D RoPE), GQA;
  - "linear_attention" layers use the GDN mixer (veomni/models/transformers/gated_deltanet.py).
Parameter names equal HF's text model (`Qwen3_5ForCausalLM`, model_type qwen3_5_text). The
vision-language checkpoints (`Qwen3_5ForConditionalGeneration`, model_type qwen3_5) load through
the registry: the text config is taken out, `model.language_model.*` becomes `model.*`, the vision
tower and the `mtp.*` (multi-token prediction) weights are skipped with one log line.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from transformers import Qwen3_5TextConfig

from veomni.models.transformers.dense_decoder import (MLP, Attention, CausalLMOutput, DecoderForCausalLM,
                                                       DecoderLayer, DecoderModel)
from veomni.models.transformers.gated_deltanet import GatedDeltaNet
from veomni.ops.rms_norm import rms_norm

__all__ = ["Qwen3_5TextConfig", "Qwen3_5ForCausalLM", "CausalLMOutput", "ZeroCenteredRMSNorm", "GatedAttention"]

LAYER_TYPES = ("full_attention", "linear_attention")


class ZeroCenteredRMSNorm(nn.Module):
    """RMSNorm with weight 1 + w (w initialised at 0), the product taken in fp32 before the cast."""

    impl: str = "eager"  # model.ops.rms_norm, set per instance by veomni/ops/registry.py

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, self.impl, zero_centred=True)

    @torch.no_grad()
    def reset_dllm_parameters(self) -> None:
        self.weight.zero_()


class GatedAttention(Attention):
    """Qwen3.5's full-attention layer: the dense Attention with a sigmoid output gate per channel."""

    def __init__(self, config, layer_idx: int):
        bias = bool(getattr(config, "attention_bias", False))
        super().__init__(config, layer_idx, qkv_bias=bias, o_bias=bias, qk_norm=True)
        self.q_proj = nn.Linear(config.hidden_size, 2 * self.num_heads * self.head_dim, bias=bias)
        self.q_norm = ZeroCenteredRMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = ZeroCenteredRMSNorm(self.head_dim, config.rms_norm_eps)

    def project_q(self, x):
        bsz, slen, _ = x.shape
        # Per head the projection holds [query (head_dim) | gate (head_dim)], not [all q | all gates].
        q, gate = self.q_proj(x).view(bsz, slen, self.num_heads, 2 * self.head_dim).chunk(2, dim=-1)
        return q, gate.reshape(bsz, slen, self.num_heads * self.head_dim)


def rotary_dim(config) -> int:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    params = getattr(config, "rope_parameters", None) or {}
    factor = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
    return int(head_dim * factor)


def check_layer_types(config) -> list:
    types = list(config.layer_types)
    if len(types) != config.num_hidden_layers or not set(types) <= set(LAYER_TYPES):
        raise ValueError(f"config.layer_types={types} must list {config.num_hidden_layers} entries from "
                         f"{LAYER_TYPES}")
    return types


class HybridForCausalLM(DecoderForCausalLM):
    """Shared by Qwen3.5 and Qwen3.5-MoE: the mixer by layer type, zero-centred norms, partial RoPE."""

    def build_backbone(self, config) -> DecoderModel:
        check_layer_types(config)
        return DecoderModel(config, self.build_layer, norm=ZeroCenteredRMSNorm, rotary_dim=rotary_dim(config))

    def build_layer(self, config, layer_idx: int) -> DecoderLayer:
        linear = config.layer_types[layer_idx] == "linear_attention"
        mixer = GatedDeltaNet(config, layer_idx) if linear else GatedAttention(config, layer_idx)
        return DecoderLayer(config, mixer, self.build_mlp(config, layer_idx),
                            mixer_name="linear_attn" if linear else "self_attn", norm=ZeroCenteredRMSNorm)

    def build_mlp(self, config, layer_idx: int) -> nn.Module:
        return MLP(config)

    def dllm_extra_parameters(self) -> dict:
        """Parameters of ours that HF checkpoints lack, with the value a fresh load gives them:
        the reverse-scan gates of bidirectional GDN, at 0 (the AR function)."""
        return {name: 0.0 for name, _ in self.named_parameters() if name.endswith("linear_attn.reverse_gate")}


class Qwen3_5ForCausalLM(HybridForCausalLM):
    config_class = Qwen3_5TextConfig
