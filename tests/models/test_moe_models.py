"""Mixture-of-experts families (Qwen3-MoE, Qwen2-MoE) == transformers, and they keep every promise
the dense families make: attention modes on every backend, KV cache, packing. Plus the MoE parts:
the balance loss from our RouterStats == transformers' `load_balancing_loss_func`, padding is left
out of the router statistics, and the two expert implementations (loop | grouped) agree.

Tiny fp32 models (tests/models/tiny.py: build_moe_pair); router weights with std 0.5 so that
routing is peaked and token-dependent, which makes a wrong top-k or weight visible in the logits.
"""
import functools

import pytest
import torch

from tests.models.test_attention_modes import SLEN, _changed_positions, _ids, _left_pad_mask
from tests.models.tiny import VOCAB, build_moe_pair, set_experts_impl
from veomni.diffusion.router_loss import load_balancing_loss, z_loss
from veomni.models.transformers.moe import SparseMoeBlock

TOL = 1e-4
IMPLS = ["sdpa", "eager", "flex"]
EXPERT_IMPLS = ["grouped", "loop"]
FAMILIES = ["qwen3_moe", "qwen2_moe"]

# name -> (family, tied, config overrides, sparse layer indices)
CASES = {
    # every layer sparse, top-2 of 8, renormalised top-k, untied head, head_dim 12 != 48/6
    "qwen3_all_sparse": ("qwen3_moe", False, dict(norm_topk_prob=True), [0, 1, 2]),
    # decoder_sparse_step=2 over 4 layers: 1 and 3 sparse; raw top-k probabilities; tied head
    "qwen3_step2_tied": ("qwen3_moe", True, dict(norm_topk_prob=False, num_hidden_layers=4, decoder_sparse_step=2),
                         [1, 3]),
    # mlp_only_layers wins over the step; odd sizes: top-3 of 5 experts
    "qwen3_mlp_only_top3of5": ("qwen3_moe", False, dict(norm_topk_prob=False, mlp_only_layers=[0, 2], num_experts=5,
                                                        num_experts_per_tok=3), [1]),
    # shared expert with sigmoid gate, q/k/v bias, raw top-k probabilities (the Qwen2-MoE default)
    "qwen2_shared_bias": ("qwen2_moe", False, dict(norm_topk_prob=False), [0, 1, 2]),
    # step 2 + mlp_only_layers, no qkv bias, head_dim 12, renormalised top-k, tied head
    "qwen2_mixed_tied": ("qwen2_moe", True, dict(norm_topk_prob=True, num_hidden_layers=4, decoder_sparse_step=2,
                                                 mlp_only_layers=[3], qkv_bias=False, head_dim=12), [1]),
}


def _pair(case, attn_impl="sdpa", experts_impl="grouped", seed=0):
    family, tied, overrides, _ = CASES[case]
    return build_moe_pair(family, tied, seed=seed, attn_impl=attn_impl, experts_impl=experts_impl, **overrides)


def _batch(seed=1, bsz=3, slen=17):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (bsz, slen), generator=g)
    mask = torch.ones(bsz, slen, dtype=torch.long)
    mask[1, -5:] = 0  # right padding
    if bsz > 2:
        mask[2, -1:] = 0
    return ids, mask


def _sparse_layers(model):
    return [i for i, layer in enumerate(model.model.layers) if isinstance(layer.mlp, SparseMoeBlock)]


# ---- parity with transformers ------------------------------------------------------------------

@pytest.mark.parametrize("experts_impl", EXPERT_IMPLS)
@pytest.mark.parametrize("attn_impl", ["sdpa", "eager"])
@pytest.mark.parametrize("case", list(CASES))
def test_causal_logits_match_hf(case, attn_impl, experts_impl):
    hf, ours = _pair(case, attn_impl, experts_impl)
    assert _sparse_layers(ours) == CASES[case][3]
    ids, mask = _batch()
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
        out = ours(input_ids=ids, attention_mask=mask, attn_mode="causal")
    assert len(out.router_stats) == len(CASES[case][3])
    diff = (ref - out.logits).abs()[mask.bool()].max().item()
    assert diff <= TOL, f"{case} {attn_impl} {experts_impl}: max abs diff {diff}"


def _weighted_sum(logits, mask, seed=3):
    """A scalar with a different weight on every real logit, so no permuted gradient cancels."""
    w = torch.randn(logits.shape, generator=torch.Generator().manual_seed(seed))
    return (logits * w)[mask.bool()].sum()


def _assert_grad_close(a, b, name, atol=1e-4, rtol=1e-3):
    """fp32 rounding in a gradient scales with the tensor: the embedding gradient here reaches
    ~600 (RMSNorm of 0.02-std embeddings amplifies it) and HF's own sdpa and eager paths differ by
    ~2e-3 on it. So atol is relative to the tensor's largest entry (at least 1)."""
    scale = max(1.0, b.abs().max().item())
    torch.testing.assert_close(a, b, atol=atol * scale, rtol=rtol, msg=lambda m: f"{name} (scale {scale:.3g}): {m}")


@pytest.mark.parametrize("experts_impl", EXPERT_IMPLS)
@pytest.mark.parametrize("case", ["qwen3_all_sparse", "qwen3_step2_tied", "qwen2_shared_bias"])
def test_gradients_match_hf(case, experts_impl):
    hf, ours = _pair(case, experts_impl=experts_impl)
    ids, mask = _batch(bsz=2)
    hf.train(), ours.train()
    _weighted_sum(hf(input_ids=ids, attention_mask=mask).logits, mask).backward()
    _weighted_sum(ours(input_ids=ids, attention_mask=mask, attn_mode="causal").logits, mask).backward()
    ref = dict(hf.named_parameters())
    names = [n for n, _ in ours.named_parameters()]
    assert sorted(names) == sorted(ref)
    for name, p in ours.named_parameters():
        assert p.grad is not None and ref[name].grad is not None, name
        _assert_grad_close(p.grad, ref[name].grad, name)
    # The router gets a real gradient (through the top-k weights), not an all-zero one.
    for i in CASES[case][3]:
        assert ours.model.layers[i].mlp.gate.weight.grad.abs().max() > 1e-3


# ---- router statistics and the balance loss ------------------------------------------------------

@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("case", ["qwen3_all_sparse", "qwen3_step2_tied", "qwen3_mlp_only_top3of5",
                                  "qwen2_shared_bias"])
def test_balance_loss_matches_hf(case, padded):
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    hf, ours = _pair(case)
    cfg = ours.config
    e, k = cfg.num_experts, cfg.num_experts_per_tok
    ids, mask = _batch()
    am = mask if padded else None
    hf.train(), ours.train()
    ref_out = hf(input_ids=ids, attention_mask=am, output_router_logits=True)
    out = ours(input_ids=ids, attention_mask=am, attn_mode="causal")
    stats = out.router_stats
    n_valid = int(mask.sum()) if padded else ids.numel()
    assert len(stats) == len(ref_out.router_logits) == len(CASES[case][3])
    for s in stats:
        assert int(s.n_tokens) == n_valid
        assert int(s.counts.sum()) == k * n_valid

    ref = load_balancing_loss_func(ref_out.router_logits, e, k, am)
    ours_aux = load_balancing_loss(stats, e)
    assert ours_aux.item() > 1.0 + 1e-3  # routing is not perfectly balanced: the loss has content
    torch.testing.assert_close(ours_aux, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours_aux, ref_out.aux_loss, atol=1e-5, rtol=1e-5)

    # z-loss: mean over layers and valid tokens of logsumexp(router logits)^2.
    w = mask.reshape(-1).float() if padded else torch.ones(ids.numel())
    ref_z = sum((torch.logsumexp(lg, -1).pow(2) * w).sum() for lg in ref_out.router_logits) / (w.sum() * len(stats))
    torch.testing.assert_close(z_loss(stats), ref_z, atol=1e-5, rtol=1e-5)

    # The balance loss's gradient reaches the same parameters with the same values.
    ref.backward()
    ours_aux.backward()
    hf_params = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        g_ref = hf_params[name].grad
        if g_ref is None or not g_ref.abs().any():
            assert p.grad is None or not p.grad.abs().any(), name
            continue
        _assert_grad_close(p.grad, g_ref, name, atol=1e-5)
    assert ours.model.layers[CASES[case][3][0]].mlp.gate.weight.grad.abs().max() > 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_padding_is_routed_but_left_out_of_router_stats(family):
    """Bidirectional (MDM) forward with right padding: changing the padded tokens changes neither
    the real positions' logits nor the router statistics; changing a real token changes both."""
    _, model = build_moe_pair(family)
    ids, mask = _batch()
    kw = dict(attention_mask=mask, attn_mode="bidirectional")
    alt = ids.clone()
    alt[~mask.bool()] = (alt[~mask.bool()] + 7) % VOCAB
    real = ids.clone()
    real[0, 3] = (real[0, 3] + 1) % VOCAB
    with torch.no_grad():
        a, b, c = (model(input_ids=x, **kw) for x in (ids, alt, real))
    assert (a.logits - b.logits)[mask.bool()].abs().max() < 1e-5
    for sa, sb in zip(a.router_stats, b.router_stats):
        assert torch.equal(sa.counts, sb.counts) and torch.equal(sa.n_tokens, sb.n_tokens)
        torch.testing.assert_close(sa.prob_sum, sb.prob_sum, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sa.z_sum, sb.z_sum, atol=1e-4, rtol=1e-5)
    assert any((sa.prob_sum - sc.prob_sum).abs().max() > 1e-4 for sa, sc in zip(a.router_stats, c.router_stats))


# ---- loop == grouped on the whole model --------------------------------------------------------

@pytest.mark.parametrize("mode", ["bidirectional", "causal"])
@pytest.mark.parametrize("case", ["qwen3_all_sparse", "qwen2_mixed_tied"])
def test_loop_and_grouped_experts_agree_on_the_model(case, mode):
    _, model = _pair(case)
    model.train()
    ids, mask = _batch()
    runs = []
    for impl in EXPERT_IMPLS:
        set_experts_impl(model, impl)
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids, attention_mask=mask, attn_mode=mode)
        (_weighted_sum(out.logits, mask) + load_balancing_loss(out.router_stats, model.config.num_experts)).backward()
        runs.append((out.logits.detach(), out.router_stats, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (la, sa, ga), (lb, sb, gb) = runs
    torch.testing.assert_close(la[mask.bool()], lb[mask.bool()], atol=1e-5, rtol=1e-5)
    for x, y in zip(sa, sb):
        assert torch.equal(x.counts, y.counts)
    for name in ga:
        _assert_grad_close(ga[name], gb[name], name, atol=1e-5, rtol=1e-4)
    assert ga["model.layers.1.mlp.experts.gate_up_proj"].abs().max() > 1e-3


def test_unknown_experts_impl_is_refused():
    _, model = build_moe_pair("qwen3_moe")
    set_experts_impl(model, "fast")
    with pytest.raises(ValueError, match="moe_experts"):
        model(input_ids=_ids(), attn_mode="causal")


# ---- attention modes on every backend (as tests/models/test_attention_modes.py for dense) ------

@functools.lru_cache(maxsize=None)
def _model(impl, family):
    """Read-only (eval, no_grad) models, built once per backend and family."""
    return build_moe_pair(family, attn_impl=impl)[1]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("padded", [False, True])
def test_bidirectional_sees_later_tokens(impl, family, padded):
    model = _model(impl, family)
    kw = dict(attn_mode="bidirectional")
    if padded:
        kw["attention_mask"] = _left_pad_mask()
    j = SLEN - 2
    changed = _changed_positions(model, _ids(), j, **kw)
    first_real = 3 if padded else 0
    assert changed[0, :j].all()
    assert changed[1, first_real:j].all(), "earlier real positions must see the later token"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("padded", [False, True])
def test_causal_never_sees_later_tokens(impl, family, padded):
    model = _model(impl, family)
    kw = dict(attn_mode="causal")
    if padded:
        kw["attention_mask"] = _left_pad_mask()
    j = 9
    changed = _changed_positions(model, _ids(), j, **kw)
    first_real = 3 if padded else 0  # padded query rows have no defined output; skip them
    assert not changed[0, :j].any() and not changed[1, first_real:j].any()
    assert changed[:, j:].all()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("impl", IMPLS)
def test_block_causal(impl, family):
    model = _model(impl, family)
    j = 9  # block 2 = positions 8..11
    changed = _changed_positions(model, _ids(), j, attn_mode="block_causal", block_size=4)
    assert not changed[:, :8].any(), "earlier blocks must not see a later block"
    assert changed[:, 8:12].all(), "a block attends fully within itself (also to later positions)"
    assert changed[:, 12:].all(), "later blocks see earlier ones"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_padding_keys_are_invisible(impl, family):
    model = _model(impl, family)
    mask = _left_pad_mask(pad=3)
    for mode in ("bidirectional", "causal"):
        changed = _changed_positions(model, _ids(), 1, attn_mode=mode, attention_mask=mask)
        assert not changed[1, 3:].any(), mode


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["bidirectional", "block_causal"])
def test_packed_row_equals_documents_run_separately(family, mode):
    """Packing with a padding tail (segment 0): documents do not interact, and the router
    statistics count the documents' tokens only."""
    model = _model("sdpa", family)
    lens = [5, 7, 4]
    docs = [_ids(seed=i, bsz=1, slen=n) for i, n in enumerate(lens)]
    packed = torch.cat(docs + [torch.zeros(1, 3, dtype=torch.long)], dim=1)
    pos = torch.cat([torch.arange(n) for n in lens] + [torch.zeros(3, dtype=torch.long)])[None]
    seg = torch.cat([torch.full((n,), i + 1) for i, n in enumerate(lens)] + [torch.zeros(3, dtype=torch.long)])[None]
    kw = dict(attn_mode=mode, block_size=3 if mode == "block_causal" else None)
    with torch.no_grad():
        out = model(input_ids=packed, position_ids=pos, segment_ids=seg, **kw)
        sep = [model(input_ids=d, **kw) for d in docs]
    n = sum(lens)
    assert (out.logits[:, :n] - torch.cat([s.logits for s in sep], dim=1)).abs().max() < 1e-5
    for layer, s in enumerate(out.router_stats):
        assert int(s.n_tokens) == n
        assert torch.equal(s.counts, sum(d.router_stats[layer].counts for d in sep))


# ---- KV cache (as test_attention_modes.py for dense) ------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["causal", "block_causal"])
def test_kv_cache_matches_full_forward_where_exact(family, mode):
    """A cached prefix + the rest == one full forward; the chunks route as the full row does."""
    from veomni.models.kv_cache import KVCache

    model = _model("sdpa", family)
    ids = _ids()
    kw = dict(attn_mode=mode, block_size=4 if mode == "block_causal" else None)
    with torch.no_grad():
        full = model(input_ids=ids, **kw)
        cache = KVCache()
        parts = [model(input_ids=ids[:, a:b], past_key_values=cache, **kw) for a, b in ((0, 8), (8, 12), (12, SLEN))]
    assert (torch.cat([p.logits for p in parts], 1) - full.logits).abs().max() < 1e-5
    for layer, s in enumerate(full.router_stats):
        assert torch.equal(s.counts, sum(p.router_stats[layer].counts for p in parts))


@pytest.mark.parametrize("family", FAMILIES)
def test_kv_cache_with_full_row_padding_mask(family):
    """Left-padded causal decoding, the [B, L] attention_mask passed with every chunk: real
    positions equal the full forward and only real tokens enter the router statistics."""
    from veomni.models.kv_cache import KVCache

    model = _model("sdpa", family)
    ids, mask = _ids(), _left_pad_mask(pad=3)
    kw = dict(attn_mode="causal", attention_mask=mask)
    with torch.no_grad():
        full = model(input_ids=ids, **kw)
        cache = KVCache()
        parts = [model(input_ids=ids[:, a:b], past_key_values=cache, **kw) for a, b in ((0, 6), (6, 11), (11, SLEN))]
    real = mask.bool()
    assert (torch.cat([p.logits for p in parts], 1) - full.logits)[real].abs().max() < 1e-5
    for layer, s in enumerate(full.router_stats):
        assert int(s.n_tokens) == int(mask.sum()) == int(sum(p.router_stats[layer].n_tokens for p in parts))
        assert torch.equal(s.counts, sum(p.router_stats[layer].counts for p in parts))


@pytest.mark.parametrize("family", FAMILIES)
def test_bidirectional_dual_cache_reforward_of_block_is_exact_when_rest_unchanged(family):
    from veomni.models.kv_cache import KVCache

    model = _model("sdpa", family)
    ids = _ids()
    kw = dict(attn_mode="bidirectional")
    with torch.no_grad():
        full = model(input_ids=ids, **kw).logits
        cache = KVCache()
        model(input_ids=ids, past_key_values=cache, **kw)
        part = model(input_ids=ids[:, 4:8], past_key_values=cache, cache_position=torch.arange(4, 8), **kw).logits
    assert (part - full[:, 4:8]).abs().max() < 1e-5
