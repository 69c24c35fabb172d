"""MoE FLOPs count active parameters: the router, the top-k experts and the shared expert."""
import pytest
import torch.nn as nn
from transformers import Qwen2MoeConfig, Qwen3MoeConfig

from veomni.models.flops import dense_decoder_dims, dense_decoder_flops
from veomni.models.registry import build_model
from veomni.models.transformers.moe import Experts


def test_qwen3_30b_a3b_has_3_3b_active_parameters():
    # The published config of Qwen/Qwen3-30B-A3B ("30.5B total, 3.3B activated").
    cfg = Qwen3MoeConfig(vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                         num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                         num_experts=128, num_experts_per_tok=8, tie_word_embeddings=False)
    d = dense_decoder_dims(cfg)
    active = d["body_params"] + 2 * d["head_params"]  # + the embedding, which is a lookup
    assert active == pytest.approx(3.3e9, rel=0.03)
    # ~6N per token (attention over one token is negligible): the MFU numerator of a training step.
    per_token = dense_decoder_flops(cfg, [1], attn_mode="causal")
    assert per_token == pytest.approx(6 * (d["body_params"] + d["head_params"]), rel=1e-3)


@pytest.mark.parametrize("cfg", [
    Qwen3MoeConfig(vocab_size=97, hidden_size=32, intermediate_size=40, moe_intermediate_size=24, head_dim=8,
                   num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, num_experts=6,
                   num_experts_per_tok=2, mlp_only_layers=[1]),
    Qwen2MoeConfig(vocab_size=97, hidden_size=32, intermediate_size=40, moe_intermediate_size=24,
                   shared_expert_intermediate_size=20, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, num_experts=6, num_experts_per_tok=3, decoder_sparse_step=2),
], ids=["qwen3_moe", "qwen2_moe"])
def test_layer_params_equal_a_count_of_the_built_model(cfg):
    model = build_model(cfg)
    expected = []
    for layer in model.model.layers:
        n = sum(m.weight.numel() for m in layer.modules() if isinstance(m, nn.Linear))
        for m in layer.modules():
            if isinstance(m, Experts):  # a token visits top_k of the num_experts experts
                n += (m.gate_up_proj.numel() + m.down_proj.numel()) * m.top_k // m.num_experts
        n += sum(p.numel() for name, p in layer.named_parameters() if name == "mlp.gate.weight")  # the router
        expected.append(n)
    assert dense_decoder_dims(cfg)["layer_params"] == expected
    assert len(set(expected)) == 2  # dense and sparse layers differ: the count is per layer
