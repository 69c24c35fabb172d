import json
import math

import torch

import pytest
from transformers import LlamaConfig

from veomni.models.flops import dense_decoder_dims, dense_decoder_flops
from veomni.trainer.metrics import gpu_peak_flops, measure_matmul_peak
from veomni.trainer.schedule import lr_factor


@pytest.mark.parametrize("name,dtype,expected", [
    ("NVIDIA H200", "bf16", 989.4e12),
    ("NVIDIA H20", "bf16", 148e12),  # not the H200 entry: substring matching got this wrong
    ("NVIDIA H100 80GB HBM3", "bf16", 989.4e12),
    ("NVIDIA H100 PCIe", "bf16", 756e12),
    ("NVIDIA A100-SXM4-80GB", "bf16", 312e12),
    ("NVIDIA A100-SXM4-80GB", "fp32", 19.5e12),
    ("Some Future GPU", "bf16", None),
])
def test_gpu_peak_table(name, dtype, expected):
    assert gpu_peak_flops(name, dtype) == expected


def test_cpu_matmul_peak_is_measured():
    peak = measure_matmul_peak(size=256, repeats=2)
    assert 1e8 < peak < 1e14


def test_flops_formula_by_hand():
    cfg = LlamaConfig(vocab_size=100, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1)
    d = dense_decoder_dims(cfg)
    # per layer: q 8*8 + k,v 2*8*4 + o 8*8 = 192; mlp 3*8*16 = 384
    assert d["body_params"] == 2 * (192 + 384)
    f = dense_decoder_flops(cfg, [3, 5], head_tokens=4, attn_mode="bidirectional")
    expected = 6 * 1152 * 8 + 6 * 800 * 4 + 12 * (9 + 25) * 4 * 2 * 2
    assert f == expected
    assert dense_decoder_flops(cfg, [3, 5], head_tokens=4, attn_mode="causal") == expected - 6 * (9 + 25) * 4 * 2 * 2


def test_lr_schedules():
    assert lr_factor(0, 10, 100, "cosine", 0.0) == pytest.approx(0.1)
    assert lr_factor(9, 10, 100, "cosine", 0.0) == pytest.approx(1.0)
    assert lr_factor(10, 10, 100, "cosine", 0.0) == pytest.approx(1.0)
    assert lr_factor(55, 10, 100, "cosine", 0.0) == pytest.approx(0.5)
    assert lr_factor(100, 10, 100, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_factor(55, 10, 100, "linear", 0.0) == pytest.approx(0.5)
    assert lr_factor(77, 10, 100, "constant", 0.0) == 1.0
    with pytest.raises(ValueError, match="lr_scheduler"):
        lr_factor(50, 0, 100, "step", 0.0)
    assert not math.isnan(lr_factor(0, 0, 0, "cosine", 0.0))


def test_block_causal_attention_pairs_and_flops():
    from veomni.models.flops import attention_pairs

    # n = 10, blocks of 4: [0..3] sees 4 keys, [4..7] sees 8, [8, 9] see 10.
    assert attention_pairs(10, "block_causal", 4) == 4 * 4 + 4 * 8 + 2 * 10
    assert attention_pairs(10, "block_causal", 10) == attention_pairs(10, "bidirectional") == 100
    assert attention_pairs(10, "block_causal", 1) == sum(range(1, 11))
    with pytest.raises(ValueError, match="block_size"):
        attention_pairs(10, "block_causal")
    cfg = LlamaConfig(vocab_size=100, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1)
    bi = dense_decoder_flops(cfg, [10], head_tokens=4, attn_mode="bidirectional")
    bc = dense_decoder_flops(cfg, [10], head_tokens=4, attn_mode="block_causal", block_size=4)
    assert bi - bc == 12 * (100 - 68) * 4 * 2 * 2


def test_frozen_flops_by_hand():
    from veomni.models.flops import Trainability

    cfg = LlamaConfig(vocab_size=100, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1)
    per_layer, head, attn = 576, 800, (9 + 25) * 4 * 2  # matmul params per layer, h*V, pairs*d*heads
    full = dense_decoder_flops(cfg, [3, 5], head_tokens=4)
    assert full == 6 * 2 * per_layer * 8 + 6 * head * 4 + 12 * attn * 2
    # Everything but the head frozen: the body runs forward only, the head forward + weight grad.
    only_head = Trainability((per_layer, per_layer), (False, False), head_trainable=True, head_input_grad=False)
    assert dense_decoder_flops(cfg, [3, 5], head_tokens=4, trainable=only_head) == \
        2 * 2 * per_layer * 8 + 4 * head * 4 + 4 * attn * 2
    # Layer 0 and the (tied) embedding/head frozen: layer 0 forward only, layer 1 in full, the head
    # forward + input grad (layer 1 below it trains).
    bottom = Trainability((per_layer, 0), (False, True), head_trainable=False, head_input_grad=True)
    assert dense_decoder_flops(cfg, [3, 5], head_tokens=4, trainable=bottom) == \
        (2 + 6) * per_layer * 8 + 4 * head * 4 + (4 + 12) * attn


def test_trainability_from_a_model():
    from tests.models.tiny import tiny_config
    from veomni.models.flops import trainability
    from veomni.models.registry import build_model

    model = build_model(tiny_config("llama"))
    assert trainability(model) is None
    per_layer = sum(m.weight.numel() for m in model.model.layers[0].modules() if isinstance(m, torch.nn.Linear))
    model.model.embed_tokens.weight.requires_grad_(False)
    for p in model.model.layers[0].parameters():
        p.requires_grad_(False)
    t = trainability(model)
    assert t.layer_frozen_matmul == (per_layer, 0) and t.layer_input_grad == (False, True)
    assert t.head_trainable and t.head_input_grad  # untied head


def test_eval_summary_compares_first_and_last_eval(tmp_path):
    from veomni.trainer.loggers import eval_summary

    assert eval_summary(str(tmp_path)) is None  # no evaluations yet
    rows = [{"step": 0, "eval_loss": 8.0, "eval_tokens": 10}, {"step": 5, "eval_loss": 7.0, "eval_tokens": 10},
            {"step": 10, "eval_loss": 6.0, "eval_tokens": 10}]
    (tmp_path / "eval_metrics.jsonl").write_text(json.dumps(rows[0]) + "\n")
    assert eval_summary(str(tmp_path)) is None  # one evaluation: nothing to compare
    (tmp_path / "eval_metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert eval_summary(str(tmp_path)) == \
        "held-out eval loss (nats/token): 8.000 at step 0 -> 6.000 at step 10 (-25%)"
