"""Block diffusion (train.objective=bd3lm): the two-stream mask, the noise, the loss, packing.

The mask is compared with a transcription of the reference (BD3-LM's `block_diff_mask`, the one
dllm's bd3lm trainer and Fast-dLLM v2 use) on every backend; packed two-stream rows must equal their
documents run one by one; the objective's loss equals a from-scratch full-logits computation.
"""
import pytest
import torch
import torch.nn.functional as F

from tests.diffusion.test_objective import MASK, V, make_batch
from veomni.diffusion.bd3lm import BD3LMObjective
from veomni.diffusion.noise import make_generator
from veomni.ops.attention import AttnMeta, allowed_mask, attention


def reference_block_diff_mask(q_idx, kv_idx, block_size, n):
    """BD3-LM's mask over [x_t ; x_0] of one unpacked row of length n, as its reference states it
    (kuleshov-group/bd3lm, dllm/core/trainers/bd3lm.py): block diagonal within each half, noisy
    queries to earlier clean blocks, clean queries block-causally to clean keys."""
    x0_q, x0_k = q_idx >= n, kv_idx >= n
    block_q = torch.where(x0_q, (q_idx - n) // block_size, q_idx // block_size)
    block_k = torch.where(x0_k, (kv_idx - n) // block_size, kv_idx // block_size)
    diagonal = (block_q == block_k) & (x0_q == x0_k)
    offset_causal = (block_q > block_k) & x0_k & ~x0_q
    causal = (block_q >= block_k) & x0_k & x0_q
    return diagonal | offset_causal | causal


def two_stream_meta(n, block_size, bsz=1, seg=None, valid=None):
    pos = torch.arange(n).repeat(2)[None].expand(bsz, -1)
    clean = torch.cat([torch.zeros(n, dtype=torch.bool), torch.ones(n, dtype=torch.bool)])[None].expand(bsz, -1)
    idx = torch.arange(2 * n)
    return AttnMeta(mode="block_causal", block_size=block_size, q_idx=idx, k_idx=idx, q_pos=pos, k_pos=pos,
                    k_valid=valid, q_seg=seg, k_seg=seg, q_clean=clean, k_clean=clean)


@pytest.mark.parametrize("n,block_size", [(8, 4), (10, 4), (7, 3), (6, 1), (5, 8)])
def test_mask_is_the_reference_pattern(n, block_size):
    ours = allowed_mask(two_stream_meta(n, block_size))[0, 0]
    idx = torch.arange(2 * n)
    ref = reference_block_diff_mask(idx[:, None], idx[None, :], block_size, n)
    assert torch.equal(ours, ref)
    # Spelled out on one case: noisy block 1 sees noisy block 1 and clean block 0, nothing else.
    if (n, block_size) == (8, 4):
        assert ours[5].tolist() == [False] * 4 + [True] * 4 + [True] * 4 + [False] * 4


def test_every_backend_computes_the_same_two_stream_attention():
    """Packed two-stream row (two documents and a pad column, blocks of 3) on eager, sdpa and flex."""
    torch.manual_seed(0)
    seg1 = [1] * 5 + [2] * 3 + [0]
    pos1 = list(range(5)) + list(range(3)) + [0]
    n = len(seg1)
    seg, pos = torch.tensor([seg1 * 2]), torch.tensor([pos1 * 2])
    clean = torch.tensor([[False] * n + [True] * n])
    idx = torch.arange(2 * n)
    meta = AttnMeta(mode="block_causal", block_size=3, q_idx=idx, k_idx=idx, q_pos=pos, k_pos=pos,
                    k_valid=seg > 0, q_seg=seg, k_seg=seg, q_clean=clean, k_clean=clean)
    q, k, v = torch.randn(1, 4, 2 * n, 8), torch.randn(1, 2, 2 * n, 8), torch.randn(1, 2, 2 * n, 8)
    outs = {impl: attention(q, k, v, meta, impl, 8 ** -0.5) for impl in ("eager", "sdpa", "flex")}
    real = (seg > 0)[0]  # padding queries are never read
    for impl in ("sdpa", "flex"):
        torch.testing.assert_close(outs[impl][:, :, real], outs["eager"][:, :, real], atol=1e-5, rtol=0)
    # and eager itself is the masked softmax of the stated pattern
    allowed = allowed_mask(meta)[0, 0]
    assert allowed[2, n + 1].item() is False  # noisy block 0 never sees clean block 0
    assert allowed[n + 6, n + 0].item() is False  # clean document 2 never sees clean document 1
    assert allowed[n + 6, n + 5].item() is True  # ...but its own clean block


def _objective(**kw):
    return BD3LMObjective(mask_token_id=MASK, block_size=kw.pop("block_size", 4), **kw)


def test_noise_is_per_block_and_complements_are_exact():
    batch = make_batch()
    corr = _objective(t_per_block=True).prepare(batch, make_generator(0, 0, 0, 0))
    blocks = batch["segment_ids"] * 100 + batch["position_ids"] // 4
    for b in range(blocks.shape[0]):
        for key in blocks[b].unique():
            assert corr.t[b][blocks[b] == key].unique().numel() == 1  # one t per (document, block)
    assert corr.t.unique().numel() > 4
    per_doc = _objective(t_per_block=False).prepare(batch, make_generator(0, 0, 0, 0))
    for b in range(blocks.shape[0]):
        for s in batch["segment_ids"][b].unique():
            assert per_doc.t[b][batch["segment_ids"][b] == s].unique().numel() == 1

    comp = _objective(complementary=True).prepare(batch, make_generator(0, 0, 0, 0))
    bsz = batch["input_ids"].shape[0]
    first, second = comp.masked[:bsz], comp.masked[bsz:]
    eligible = comp.eligible[:bsz]
    assert torch.equal(first | second, eligible) and not (first & second).any()
    assert not (comp.masked & ~batch["maskable"].repeat(2, 1)).any()  # prompts and padding never masked
    torch.testing.assert_close(comp.t[bsz:][second], (1 - comp.t[:bsz][second]).clamp(min=1e-3))


def test_model_inputs_are_two_streams():
    batch = make_batch()
    obj = _objective(complementary=True)
    corr = obj.prepare(batch, make_generator(0, 1, 0, 0))
    inputs = obj.model_inputs(batch, corr)
    bsz, slen = batch["input_ids"].shape
    assert inputs["input_ids"].shape == (2 * bsz, 2 * slen)
    assert torch.equal(inputs["input_ids"][:, :slen], corr.noisy_ids)
    assert torch.equal(inputs["input_ids"][:, slen:], batch["input_ids"].repeat(2, 1))
    assert torch.equal(inputs["position_ids"][:, slen:], inputs["position_ids"][:, :slen])
    assert inputs["clean_stream"][:, slen:].all() and not inputs["clean_stream"][:, :slen].any()
    rows = obj.scored_rows(corr)
    assert rows.shape == (2 * bsz, 2 * slen) and (rows.positions[:, 1] < slen).all()  # loss on x_t only


def _tiny_lm(block_size=4):
    from veomni.models.registry import build_model
    from tests.models.tiny import tiny_config

    torch.manual_seed(0)
    model = build_model(tiny_config("llama", vocab_size=V, num_attention_heads=4, num_key_value_heads=2,
                                    hidden_size=32))
    model.init_weights()
    return model.eval()


@pytest.mark.parametrize("weighting,normalization,shift,comp", [
    ("inv_t", "maskable", True, False), ("none", "masked", False, True), ("inv_t", "masked", True, True)])
def test_loss_equals_a_full_logits_reference(weighting, normalization, shift, comp):
    batch = make_batch(3)
    obj = _objective(weighting=weighting, normalization=normalization, logit_shift=shift, complementary=comp)
    corr = obj.prepare(batch, make_generator(0, 2, 0, 0))
    model = _tiny_lm()
    inputs = obj.model_inputs(batch, corr)
    denom = obj.num_loss_tokens(corr)
    loss = model(**inputs, loss_fn=obj.loss_fn(corr, denom)).loss

    # From scratch: logits of the noisy half, CE at every masked token from the row before it (or at it).
    logits = model(**inputs).logits[:, :batch["input_ids"].shape[1]].float()
    ids = batch["input_ids"].repeat(corr.masked.shape[0] // batch["input_ids"].shape[0], 1)
    total = torch.zeros(())
    for b, i in corr.masked.nonzero().tolist():
        j = i - 1 if shift else i
        w = 1.0 / float(corr.t[b, i]) if weighting == "inv_t" else 1.0
        total += w * F.cross_entropy(logits[b, j], ids[b, i])
    expected_denom = int(corr.masked.sum()) if normalization == "masked" else int(corr.eligible.sum())
    assert denom == expected_denom
    torch.testing.assert_close(loss, total / expected_denom, atol=1e-5, rtol=1e-5)


def test_packed_two_stream_rows_equal_their_documents_alone():
    """A packed row [x_t ; x_0] with two documents gives each document's hidden states exactly as the
    document's own two-stream row does (segments keep them apart in both halves)."""
    model = _tiny_lm()
    bs, lens = 3, (5, 4)
    g = torch.Generator().manual_seed(1)
    docs = [torch.randint(0, MASK, (n,), generator=g) for n in lens]
    noisy = [torch.where(torch.rand(n, generator=g) < 0.5, torch.full((n,), MASK), d) for d, n in zip(docs, lens)]

    def run(noisy_docs, clean_docs):
        n = sum(len(d) for d in clean_docs)
        seg = torch.cat([torch.full((len(d),), i + 1) for i, d in enumerate(clean_docs)])
        pos = torch.cat([torch.arange(len(d)) for d in clean_docs])
        ids = torch.cat([torch.cat(noisy_docs), torch.cat(clean_docs)])[None]
        clean = torch.cat([torch.zeros(n, dtype=torch.bool), torch.ones(n, dtype=torch.bool)])[None]
        with torch.no_grad():
            return model(input_ids=ids, position_ids=pos.repeat(2)[None], segment_ids=seg.repeat(2)[None],
                         attention_mask=torch.ones_like(ids), clean_stream=clean, attn_mode="block_causal",
                         block_size=bs).logits[0]

    packed = run(noisy, docs)
    n = sum(lens)
    offsets = [0, lens[0]]
    for d, (start, length) in enumerate(zip(offsets, lens)):
        alone = run([noisy[d]], [docs[d]])
        torch.testing.assert_close(packed[start:start + length], alone[:length], atol=1e-5, rtol=0)  # x_t
        torch.testing.assert_close(packed[n + start:n + start + length], alone[length:], atol=1e-5, rtol=0)  # x_0


def test_hybrid_gdn_models_refuse_two_stream_rows():
    from tests.models.tiny import tiny_qwen3_5_config
    from veomni.models.registry import build_model

    model = build_model(tiny_qwen3_5_config())
    ids = torch.zeros(1, 8, dtype=torch.long)
    clean = torch.tensor([[False] * 4 + [True] * 4])
    with pytest.raises(ValueError, match="cannot pass through gated DeltaNet"):
        model(input_ids=ids, position_ids=torch.arange(4).repeat(2)[None], clean_stream=clean,
              attn_mode="block_causal", block_size=2)
    with pytest.raises(ValueError, match="needs attn_mode='block_causal'"):
        _tiny_lm()(input_ids=ids, clean_stream=clean, attn_mode="bidirectional")
