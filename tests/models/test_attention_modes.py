"""Attention modes are real on every backend: bidirectional sees the future, causal does not,
block-causal sees its own block and earlier blocks only, packed documents never see each other."""
import pytest
import torch

from tests.models.tiny import VOCAB, build_pair

IMPLS = ["sdpa", "eager", "flex"]
SLEN = 16


def _model(impl, family="llama"):
    return build_pair(family, attn_impl=impl)[1]


def _ids(seed=0, bsz=2, slen=SLEN):
    return torch.randint(0, VOCAB, (bsz, slen), generator=torch.Generator().manual_seed(seed))


def _changed_positions(model, ids, j, **kw):
    """Which positions' logits change when the token at j changes."""
    alt = ids.clone()
    alt[:, j] = (alt[:, j] + 1) % VOCAB
    with torch.no_grad():
        a = model(input_ids=ids, **kw).logits
        b = model(input_ids=alt, **kw).logits
    return (a - b).abs().amax(-1) > 1e-6  # [B, S]


def _left_pad_mask(bsz=2, slen=SLEN, pad=3):
    mask = torch.ones(bsz, slen, dtype=torch.long)
    mask[1, :pad] = 0
    return mask


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("padded", [False, True])
def test_bidirectional_sees_later_tokens(impl, padded):
    model = _model(impl)
    ids = _ids()
    kw = dict(attn_mode="bidirectional")
    if padded:
        kw["attention_mask"] = _left_pad_mask()
    j = SLEN - 2
    changed = _changed_positions(model, ids, j, **kw)
    first_real = 3 if padded else 0
    assert changed[0, :j].all()
    assert changed[1, first_real:j].all(), "earlier real positions must see the later token"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("padded", [False, True])
def test_causal_never_sees_later_tokens(impl, padded):
    model = _model(impl)
    ids = _ids()
    kw = dict(attn_mode="causal")
    if padded:
        kw["attention_mask"] = _left_pad_mask()
    j = 9
    changed = _changed_positions(model, ids, j, **kw)
    first_real = 3 if padded else 0  # padded query rows have no defined output; skip them
    assert not changed[0, :j].any() and not changed[1, first_real:j].any()
    assert changed[:, j:].all()


@pytest.mark.parametrize("impl", IMPLS)
def test_padding_keys_are_invisible(impl):
    """Changing a padded token changes no real position's output, in every mode."""
    model = _model(impl)
    ids = _ids()
    mask = _left_pad_mask(pad=3)
    for mode in ("bidirectional", "causal"):
        changed = _changed_positions(model, ids, 1, attn_mode=mode, attention_mask=mask)
        assert not changed[1, 3:].any(), mode


@pytest.mark.parametrize("impl", IMPLS)
def test_block_causal(impl):
    model = _model(impl)
    ids = _ids()
    bs = 4
    kw = dict(attn_mode="block_causal", block_size=bs)
    j = 9  # block 2 = positions 8..11
    changed = _changed_positions(model, ids, j, **kw)
    assert not changed[:, :8].any(), "earlier blocks must not see a later block"
    assert changed[:, 8:12].all(), "a block attends fully within itself (also to later positions)"
    assert changed[:, 12:].all(), "later blocks see earlier ones"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["bidirectional", "causal", "block_causal"])
def test_packed_row_equals_documents_run_separately(impl, mode):
    model = _model(impl, family="qwen3")
    lens = [5, 7, 4]
    docs = [_ids(seed=i, bsz=1, slen=n) for i, n in enumerate(lens)]
    packed = torch.cat(docs, dim=1)
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    seg = torch.cat([torch.full((n,), i + 1) for i, n in enumerate(lens)])[None]
    kw = dict(attn_mode=mode, block_size=3 if mode == "block_causal" else None)
    with torch.no_grad():
        out = model(input_ids=packed, position_ids=pos, segment_ids=seg, **kw).logits
        sep = torch.cat([model(input_ids=d, **kw).logits for d in docs], dim=1)
    assert (out - sep).abs().max() < 1e-5


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_backends_agree_with_eager_reference(impl):
    """sdpa (and eager itself) under each mode with padding + packing equals the eager reference."""
    ref_model = _model("eager")
    model = _model(impl)
    ids = _ids()
    mask = _left_pad_mask()
    for mode, bs in (("bidirectional", None), ("causal", None), ("block_causal", 4)):
        with torch.no_grad():
            a = ref_model(input_ids=ids, attention_mask=mask, attn_mode=mode, block_size=bs).logits
            b = model(input_ids=ids, attention_mask=mask, attn_mode=mode, block_size=bs).logits
        assert (a - b)[mask.bool()].abs().max() < 1e-5, mode


@pytest.mark.parametrize("mode", ["causal", "block_causal"])
def test_kv_cache_matches_full_forward_where_exact(mode):
    """Causal and block-causal models: a cached prefix + the rest == one full forward."""
    from veomni.models.kv_cache import KVCache

    model = _model("sdpa")
    ids = _ids()
    kw = dict(attn_mode=mode, block_size=4 if mode == "block_causal" else None)
    with torch.no_grad():
        full = model(input_ids=ids, **kw).logits
        cache = KVCache()
        a = model(input_ids=ids[:, :8], past_key_values=cache, **kw).logits
        b = model(input_ids=ids[:, 8:12], past_key_values=cache, **kw).logits
        c = model(input_ids=ids[:, 12:], past_key_values=cache, **kw).logits
    assert (torch.cat([a, b, c], 1) - full).abs().max() < 1e-5


def test_bidirectional_dual_cache_reforward_of_block_is_exact_when_rest_unchanged():
    """Writing a block again at its row indices (dual cache) reproduces the full forward when the
    cached prefix/suffix were computed from the same tokens."""
    from veomni.models.kv_cache import KVCache

    model = _model("sdpa")
    ids = _ids()
    kw = dict(attn_mode="bidirectional")
    with torch.no_grad():
        full = model(input_ids=ids, **kw).logits
        cache = KVCache()
        model(input_ids=ids, past_key_values=cache, **kw)
        blk = torch.arange(4, 8)
        part = model(input_ids=ids[:, 4:8], past_key_values=cache, cache_position=blk, **kw).logits
    assert (part - full[:, 4:8]).abs().max() < 1e-5
