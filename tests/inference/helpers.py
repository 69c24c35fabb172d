"""Tiny models for the sampler tests: a random dense decoder (float64, so batched and one-by-one
runs cannot differ by rounding-level ties) and a scripted mock whose logits the test chooses."""
from __future__ import annotations

import math
import os
from types import SimpleNamespace

import torch
import torch.nn as nn

from tests.models.tiny import VOCAB, tiny_config

MASK = VOCAB - 1  # 96
# VEOMNI_TEST_DEVICE=cuda runs the tiny-model tests on a GPU (results are compared on the CPU).
DEVICE = os.environ.get("VEOMNI_TEST_DEVICE", "cpu")


def tiny_dllm(attn_mode="bidirectional", block_size=None, shift=True, seed=0, std=0.3, family="llama"):
    """Random 2-layer Llama-shaped dLLM. std=0.3 (not 0.02) makes predictions peaked, so confidences
    spread over (0, 1) and threshold/entropy rules have something to choose between.
    family="qwen3_5": a 4-layer Qwen3.5 hybrid (GDN, GDN, attention, GDN), reverse gates non-zero."""
    from veomni.models.registry import build_model

    extra = dict(mask_token_id=MASK, dllm_attn_mode=attn_mode, dllm_block_size=block_size,
                 dllm_logit_shift=shift, eos_token_id=None, pad_token_id=0)
    if family == "qwen3_5":
        from transformers import Qwen3_5TextConfig

        cfg = Qwen3_5TextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                                num_attention_heads=4, num_key_value_heads=2, head_dim=8, linear_num_key_heads=2,
                                linear_num_value_heads=4, linear_key_head_dim=6, linear_value_head_dim=5,
                                layer_types=["linear_attention", "linear_attention", "full_attention",
                                             "linear_attention"], **extra)
    else:
        cfg = tiny_config(family, **extra)
    torch.manual_seed(seed)
    model = build_model(cfg).double().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, std)
    return model.to(DEVICE)


def prompts(seed=1, lens=(7, 5, 3)):
    """Left-padded prompt batch (ids, mask) and the unpadded rows."""
    g = torch.Generator().manual_seed(seed)
    p = max(lens)
    ids = torch.randint(1, MASK - 1, (len(lens), p), generator=g)
    mask = torch.zeros(len(lens), p, dtype=torch.long)
    rows = []
    for b, n in enumerate(lens):
        mask[b, p - n:] = 1
        ids[b, : p - n] = 0
        rows.append(ids[b, p - n:].clone())
    return ids, mask, rows


def dist_logits(tok: int, conf: float, vocab: int = VOCAB, mask_id: int = MASK) -> torch.Tensor:
    """Logits whose softmax gives p(tok) = conf, the rest spread evenly, the mask token impossible."""
    rest = (1 - conf) / (vocab - 2)
    p = torch.full((vocab,), rest, dtype=torch.float64)
    p[tok] = conf
    out = p.log()
    out[mask_id] = -math.inf
    return out


class ScriptedModel(nn.Module):
    """Returns logits chosen by `script(call_index, input_ids) -> [B, S, V]` for the full row.

    Used without a KV cache (input = row positions [0, S)); records every call's kwargs.
    """

    def __init__(self, script, vocab=VOCAB, mask_id=MASK, shift=False, eos=None):
        super().__init__()
        self.config = SimpleNamespace(mask_token_id=mask_id, vocab_size=vocab, dllm_logit_shift=shift,
                                      dllm_attn_mode="bidirectional", eos_token_id=eos, pad_token_id=0)
        self.script, self.calls = script, []

    def forward(self, input_ids, attention_mask=None, position_ids=None, attn_mode=None, block_size=None,
                past_key_values=None, cache_position=None, logits_to_keep=None):
        assert past_key_values is None
        self.calls.append(dict(input_ids=input_ids.clone(), attention_mask=attention_mask,
                               logits_to_keep=logits_to_keep))
        logits = self.script(len(self.calls) - 1, input_ids)
        if logits_to_keep is not None:
            logits = logits[:, logits_to_keep]
        return SimpleNamespace(logits=logits)
