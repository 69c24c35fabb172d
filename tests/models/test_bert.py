"""The BERT encoder family == HF transformers' BertForMaskedLM (fp32), and its HF load / save."""
import pytest
import torch

VOCAB = 97
TOL = 1e-4


def tiny_bert_config(**overrides):
    from transformers import BertConfig

    kw = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
              max_position_embeddings=64, type_vocab_size=2, hidden_act="gelu", layer_norm_eps=1e-12,
              pad_token_id=0)
    kw.update(overrides)
    return BertConfig(**kw)


def build_bert_pair(seed=0, attn_impl="sdpa", **overrides):
    """(HF BertForMaskedLM, ours) with identical random weights, eval mode."""
    import transformers

    from veomni.models.registry import build_model

    cfg = tiny_bert_config(**overrides)
    torch.manual_seed(seed)
    hf = transformers.BertForMaskedLM(cfg).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a misplaced one shows in the logits
        for name, p in hf.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
            if "token_type" in name:
                p.normal_(0.0, 0.5)
    ours = build_model(cfg, attn_impl=attn_impl).eval()
    missing, unexpected = ours.load_state_dict(hf.state_dict(), strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    ours.tie_weights()
    return hf, ours


def _batch(bsz=3, slen=13, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (bsz, slen), generator=g)
    mask = torch.ones(bsz, slen, dtype=torch.long)
    mask[1, -4:] = 0
    return ids, mask


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_mlm_logits_match_hf(impl):
    hf, ours = build_bert_pair(attn_impl=impl)
    ids, mask = _batch()
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
        out = ours(input_ids=ids, attention_mask=mask).logits
    diff = (ref - out).abs()[mask.bool()].max().item()
    assert diff <= TOL, diff


def test_packed_rows_equal_separate_rows():
    """segment_ids: two documents in one row are computed as two rows (positions restart)."""
    _, ours = build_bert_pair()
    a, b = torch.randint(1, VOCAB, (1, 5)), torch.randint(1, VOCAB, (1, 7))
    row = torch.cat([a, b], 1)
    seg = torch.tensor([[1] * 5 + [2] * 7])
    pos = torch.tensor([list(range(5)) + list(range(7))])
    with torch.no_grad():
        packed = ours(row, position_ids=pos, segment_ids=seg).logits
        sep = torch.cat([ours(a).logits, ours(b).logits], 1)
    assert torch.allclose(packed, sep, atol=1e-5)


def test_loss_fn_path_equals_logits():
    """The head + CE path (transform + bias column, no [B, S, V] logits) == CE of the logits."""
    from veomni.ops.linear_ce import linear_cross_entropy

    _, ours = build_bert_pair()
    ids, mask = _batch()
    pos = torch.tensor([[0, 2], [1, 5], [2, 12]])
    tgt = torch.tensor([3, 4, 5])
    with torch.no_grad():
        logits = ours(ids, attention_mask=mask).logits
        ref = torch.nn.functional.cross_entropy(logits[pos[:, 0], pos[:, 1]], tgt, reduction="sum")
        fn = lambda h, w: linear_cross_entropy(h[pos[:, 0], pos[:, 1]], w, tgt)  # noqa: E731
        got = ours(ids, attention_mask=mask, loss_fn=fn).loss
    assert torch.allclose(ref, got, atol=1e-4), (ref, got)


def test_gradients_match_hf():
    hf, ours = build_bert_pair()
    ids, mask = _batch(bsz=2)
    hf.train()  # dropout 0.1 in the config: compare without it
    for m in hf.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    ours.train()
    hf(input_ids=ids, attention_mask=mask).logits[mask.bool()].logsumexp(-1).sum().backward()
    ours(ids, attention_mask=mask).logits[mask.bool()].logsumexp(-1).sum().backward()
    ref = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        assert torch.allclose(p.grad, ref[name].grad, atol=1e-4, rtol=1e-3), name


def test_refusals():
    _, ours = build_bert_pair()
    ids, _ = _batch()
    with pytest.raises(ValueError, match="bidirectional encoder"):
        ours(ids, attn_mode="causal")
    with pytest.raises(ValueError, match="no KV cache"):
        ours(ids, use_cache=True)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        ours(torch.randint(1, VOCAB, (1, 70)))


def test_hf_load_and_save_round_trip(tmp_path):
    """An HF save loads into our class (logits equal); our save loads in transformers and again in
    ours, with each tied tensor stored once."""
    import transformers

    from veomni.models.hf_io import checkpoint_keys, load_model, save_model

    hf, _ = build_bert_pair()
    hf.save_pretrained(tmp_path / "hf")
    ours = load_model(tmp_path / "hf", dtype="float32")
    ids, mask = _batch()
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
        assert (ours(ids, attention_mask=mask).logits - ref).abs()[mask.bool()].max() <= TOL
    assert ours.cls.predictions.decoder.weight is ours.bert.embeddings.word_embeddings.weight
    assert ours.cls.predictions.decoder.bias is ours.cls.predictions.bias

    save_model(ours, tmp_path / "ours")
    keys = checkpoint_keys(tmp_path / "ours")
    assert "cls.predictions.bias" in keys and "cls.predictions.decoder.weight" not in keys
    back = transformers.BertForMaskedLM.from_pretrained(tmp_path / "ours").eval()
    again = load_model(tmp_path / "ours")
    with torch.no_grad():
        assert (back(input_ids=ids, attention_mask=mask).logits - ref).abs()[mask.bool()].max() <= TOL
        assert torch.equal(again(ids, attention_mask=mask).logits, ours(ids, attention_mask=mask).logits)


def test_bare_bert_model_checkpoint_needs_a_head(tmp_path):
    """A sentence-transformers style BertModel (no `bert.` prefix, a pooler, no MLM head): the
    encoder keys map, the pooler is skipped, and the missing head is a clear error."""
    import transformers

    from veomni.models.hf_io import load_model

    bare = transformers.BertModel(tiny_bert_config())
    bare.save_pretrained(tmp_path / "bare")
    with pytest.raises(KeyError, match="cls.predictions"):
        load_model(tmp_path / "bare")


def test_mask_token_growth_grows_the_bias():
    """A tokenizer without [MASK]: the embedding, the tied decoder and the MLM bias all grow."""
    from veomni.models.mask_token import MaskPlan, apply_mask_plan

    _, ours = build_bert_pair()
    apply_mask_plan(ours, MaskPlan(mask_id=VOCAB, old_rows=VOCAB, new_rows=VOCAB + 3, trained_rows=VOCAB,
                                   spare_row=None))
    head = ours.cls.predictions
    assert head.decoder.weight is ours.bert.embeddings.word_embeddings.weight
    assert head.bias.shape == (VOCAB + 3,) and head.decoder.bias is head.bias
    assert ours(torch.tensor([[1, VOCAB]])).logits.shape[-1] == VOCAB + 3
