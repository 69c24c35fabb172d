"""Tiny random configs with awkward shapes, shared by the model tests."""
import torch
from transformers import LlamaConfig, Qwen2Config, Qwen3Config

VOCAB = 97  # prime: catches vocab-size assumptions


def tiny_config(family: str, tied: bool = False, **overrides):
    common = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                  num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=256,
                  tie_word_embeddings=tied, rms_norm_eps=1e-6)
    if family == "llama":
        cfg = LlamaConfig(**common, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    elif family == "llama3rope":
        cfg = LlamaConfig(**common, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    elif family == "qwen2":
        cfg = Qwen2Config(**common)
    elif family == "qwen3":
        # head_dim 12 != hidden/heads (48/6 = 8): Qwen3 allows it, catches reshape assumptions.
        cfg = Qwen3Config(**common, head_dim=12)
    else:
        raise ValueError(family)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def build_pair(family: str, tied: bool = False, seed: int = 0, attn_impl: str = "sdpa"):
    """(HF reference model, our model) with identical random weights, fp32, eval mode."""
    import transformers

    from veomni.models.registry import build_model

    cfg = tiny_config(family, tied)
    torch.manual_seed(seed)
    hf = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    # Non-trivial norm weights and biases so a missing or misplaced one shows up in the logits.
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    ours = build_model(cfg, attn_impl=attn_impl).eval()
    missing, unexpected = ours.load_state_dict(hf.state_dict(), strict=False)
    assert not [m for m in missing if not m.endswith("inv_freq")], missing
    assert not unexpected, unexpected
    ours.tie_weights()
    return hf, ours


def save_tiny_model(path, tokenizer, family: str = "llama", std: float = 0.3, seed: int = 0,
                    mask: bool = True, attn_mode: str = "bidirectional", **config_overrides):
    """Save a tiny random `family` model (+ tokenizer) as an HF directory; returns its path.

    std=0.3 on every non-norm weight gives peaked predictions, so confidence-based sampling rules
    have something to choose. mask=True adds a mask token and records attn_mode, making it a dLLM.
    """
    from pathlib import Path

    from veomni.models.hf_io import save_model
    from veomni.models.mask_token import ensure_mask_token
    from veomni.models.registry import build_model

    cfg = tiny_config(family, vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                      **config_overrides)
    torch.manual_seed(seed)
    model = build_model(cfg)
    model.init_weights()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, std)
    if mask:
        ensure_mask_token(model, tokenizer)
        model.config.dllm_attn_mode = attn_mode
    return save_model(model, Path(path), tokenizer=tokenizer)


# ---- mixture of experts ------------------------------------------------------------------------

def tiny_moe_config(family: str = "qwen3_moe", tied: bool = False, **overrides):
    """A tiny Qwen3-MoE / Qwen2-MoE config: 3 layers, top-2 of 8 experts, GQA 6/2 heads.

    moe_intermediate_size 20 is not a power of two but a multiple of 4: torch._grouped_mm (the
    grouped expert path) needs 16-byte row strides in fp32 (tests/ops/test_moe_experts.py).
    Overrides go to the constructor, so derived fields (Qwen2-MoE's layer_types) stay consistent.
    """
    from transformers import Qwen2MoeConfig, Qwen3MoeConfig

    kw = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=36, moe_intermediate_size=20,
              num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=256,
              tie_word_embeddings=tied, rms_norm_eps=1e-6, num_experts=8, num_experts_per_tok=2,
              norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[])
    if family == "qwen3_moe":
        kw["head_dim"] = 12  # != hidden/heads (8)
        kw.update(overrides)
        return Qwen3MoeConfig(**kw)
    if family == "qwen2_moe":
        kw.update(shared_expert_intermediate_size=28, qkv_bias=True)
        kw.update(overrides)
        return Qwen2MoeConfig(**kw)
    raise ValueError(family)


def set_experts_impl(model, impl: str) -> None:
    """Switch every `Experts` module of our model to `impl` ("grouped" | "loop")."""
    from veomni.models.transformers.moe import Experts

    for m in model.modules():
        if isinstance(m, Experts):
            m.impl = impl


def build_moe_pair(family: str = "qwen3_moe", tied: bool = False, seed: int = 0, attn_impl: str = "sdpa",
                   experts_impl: str = "grouped", router_std: float = 0.5, expert_std: float = 0.1,
                   **overrides):
    """(HF reference, ours) MoE models with identical random weights, fp32, eval mode.

    HF runs eager attention and its eager (per-expert loop) experts. The router weights get
    std `router_std` so that routing is peaked and depends on the token (HF's 0.02 init gives
    near-uniform probabilities, under which a wrong top-k would hardly show in the logits), the
    experts `expert_std` so that they matter next to the residual stream.
    """
    import transformers

    from veomni.models.registry import build_model

    cfg = tiny_moe_config(family, tied, **overrides)
    torch.manual_seed(seed)
    hf = transformers.AutoModelForCausalLM.from_config(
        cfg, attn_implementation="eager", experts_implementation="eager").eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
            elif name.endswith("mlp.gate.weight"):
                p.normal_(0.0, router_std)
            elif "mlp.experts." in name:
                p.normal_(0.0, expert_std)
    ours = build_model(cfg, attn_impl=attn_impl).eval()
    missing, unexpected = ours.load_state_dict(hf.state_dict(), strict=False)
    assert not [m for m in missing if not m.endswith("inv_freq")], missing
    assert not unexpected, unexpected
    ours.tie_weights()
    set_experts_impl(ours, experts_impl)
    return hf, ours


# ---- Qwen3.5 hybrids (Gated DeltaNet + gated attention) -----------------------------------------

LIN, FULL = "linear_attention", "full_attention"


def tiny_qwen3_5_config(moe: bool = False, layer_types=(LIN, LIN, LIN, FULL), partial_rotary_factor: float = 0.25,
                        head_dim: int = 8, tied: bool = False, **overrides):
    """A tiny Qwen3.5 (or Qwen3.5-MoE) text config with awkward GDN shapes: 2 q/k heads of dim 6
    serving 4 value heads of dim 5 (odd), GQA 4/2 attention heads of `head_dim` (!= hidden/heads
    = 10), partial RoPE via rope_parameters. MoE: 6 experts, top-2, plus a shared expert."""
    from transformers import Qwen3_5MoeTextConfig, Qwen3_5TextConfig

    kw = dict(vocab_size=VOCAB, hidden_size=40, num_hidden_layers=len(layer_types), num_attention_heads=4,
              num_key_value_heads=2, head_dim=head_dim, layer_types=list(layer_types), linear_num_key_heads=2,
              linear_num_value_heads=4, linear_key_head_dim=6, linear_value_head_dim=5, linear_conv_kernel_dim=4,
              rms_norm_eps=1e-6, max_position_embeddings=256, tie_word_embeddings=tied,
              rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                               "partial_rotary_factor": partial_rotary_factor})
    if moe:
        kw.update(moe_intermediate_size=20, shared_expert_intermediate_size=28, num_experts=6, num_experts_per_tok=2)
        kw.update(overrides)
        return Qwen3_5MoeTextConfig(**kw)
    kw.update(intermediate_size=56)
    kw.update(overrides)
    return Qwen3_5TextConfig(**kw)


def randomize_qwen3_5(model, seed: int = 0, std: float = 0.25) -> None:
    """Large random weights (HF's std 0.02 init hides mistakes), in place, on HF's or our model (the
    names are the same): normal(0, std) on every matrix, +-0.1 noise on the norms (zero-centred
    ones become ~+-0.1, GDN's gated norm ~1 +- 0.1), A = exp(A_log) ~ U(0.5, 4) so the decay is
    neither ~1 nor ~0, dt_bias noise. Our reverse_gate is left alone."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("reverse_gate"):
                continue
            if name.endswith("A_log"):
                p.copy_(torch.empty(p.shape).uniform_(0.5, 4.0, generator=g).log())
            elif name.endswith("dt_bias"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            elif "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))


def build_qwen3_5_pair(moe: bool = False, seed: int = 0, attn_impl: str = "sdpa", **config_kw):
    """(HF Qwen3_5[Moe]ForCausalLM, ours) with identical large random weights, fp32, eval mode.
    HF runs eager attention (and eager experts); ours gets HF's state dict (its reverse gates stay 0)."""
    import transformers

    from veomni.models.registry import build_model

    cfg = tiny_qwen3_5_config(moe=moe, **config_kw)
    torch.manual_seed(seed)
    extra = {"experts_implementation": "eager"} if moe else {}
    hf = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", **extra).eval()
    randomize_qwen3_5(hf, seed)
    ours = build_model(cfg, attn_impl=attn_impl).eval()
    missing, unexpected = ours.load_state_dict(hf.state_dict(), strict=False)
    assert all(m.endswith("linear_attn.reverse_gate") for m in missing), missing
    assert not unexpected, unexpected
    ours.tie_weights()
    return hf, ours
