"""Our modeling code == HF transformers' own implementation (causal, fp32)."""
import pytest
import torch

from tests.models.tiny import VOCAB, build_pair

FAMILIES = ["llama", "llama3rope", "qwen2", "qwen3"]
TOL = 1e-4


def _batch(seed=1, bsz=3, slen=17):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (bsz, slen), generator=g)
    mask = torch.ones(bsz, slen, dtype=torch.long)
    mask[1, -5:] = 0  # right padding
    if bsz > 2:
        mask[2, -1:] = 0
    return ids, mask


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_causal_logits_match_hf(family, tied, impl):
    hf, ours = build_pair(family, tied, attn_impl=impl)
    ids, mask = _batch()
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
        out = ours(input_ids=ids, attention_mask=mask, attn_mode="causal").logits
    real = mask.bool()
    diff = (ref - out).abs()[real].max().item()
    assert diff <= TOL, f"{family} tied={tied} {impl}: max abs diff {diff}"


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_causal_flex_matches_hf(family):
    hf, ours = build_pair(family, attn_impl="flex")
    ids, mask = _batch(bsz=2, slen=16)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
        out = ours(input_ids=ids, attention_mask=mask, attn_mode="causal").logits
    diff = (ref - out).abs()[mask.bool()].max().item()
    assert diff <= TOL, diff


def test_gradients_match_hf():
    hf, ours = build_pair("qwen2")
    ids, mask = _batch(bsz=2)
    hf.train(), ours.train()
    hf(input_ids=ids, attention_mask=mask).logits[mask.bool()].logsumexp(-1).sum().backward()
    ours(input_ids=ids, attention_mask=mask, attn_mode="causal").logits[mask.bool()].logsumexp(-1).sum().backward()
    ref = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        assert torch.allclose(p.grad, ref[name].grad, atol=1e-4, rtol=1e-3), name


def test_attn_mode_is_required():
    _, ours = build_pair("llama")
    ids, _ = _batch()
    with pytest.raises(ValueError, match="attn_mode"):
        ours(input_ids=ids)
    ours.config.dllm_attn_mode = "bidirectional"  # a recorded default is honoured
    ours(input_ids=ids)


def test_bad_mode_and_backend_combinations_raise():
    from veomni.ops.attention import AttentionConfigError, check_attention

    with pytest.raises(AttentionConfigError, match="block_size"):
        check_attention("block_causal", "sdpa", None)
    with pytest.raises(AttentionConfigError, match="flash"):
        check_attention("block_causal", "flash_attention_2", 4)
    with pytest.raises(AttentionConfigError, match="attn_mode"):
        check_attention("full", "sdpa")
    with pytest.raises(AttentionConfigError, match="attn_impl"):
        check_attention("causal", "xformers")


def test_flash_attention_missing_is_a_clear_error():
    pytest.importorskip("torch")
    try:
        import flash_attn  # noqa: F401
        pytest.skip("flash-attn is installed here")
    except ImportError:
        pass
    from veomni.ops.attention import AttentionConfigError, check_attention

    with pytest.raises(AttentionConfigError, match="pip install"):
        check_attention("causal", "flash_attention_2")


def test_sliding_window_is_refused():
    from tests.models.tiny import tiny_config
    from veomni.models.registry import build_model

    cfg = tiny_config("qwen2")
    cfg.use_sliding_window = True
    with pytest.raises(NotImplementedError, match="sliding-window"):
        build_model(cfg)
