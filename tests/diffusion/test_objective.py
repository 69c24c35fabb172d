"""Masked-diffusion noise + objective vs a from-scratch full-logits reference."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from veomni.diffusion.noise import corrupt, make_generator
from veomni.diffusion.objective import ARObjective, MDMObjective, build_objective

V, H, MASK = 23, 8, 22
# blake2b-64 of struct.pack('<4Q', 0, 0, 0, 0), top bit cleared
PINNED_SEED_0000 = 2396389485220859333


def _row(segments, prompt_lens, length):
    """One packed row: `segments` = document lengths, `prompt_lens` = non-maskable prefix per doc."""
    seg, pos, maskable = [], [], []
    for doc, (n, p) in enumerate(zip(segments, prompt_lens), start=1):
        seg += [doc] * n
        pos += list(range(n))
        maskable += [False] * p + [True] * (n - p)
    pad = length - len(seg)
    return seg + [0] * pad, pos + [0] * pad, maskable + [False] * pad


def make_batch(seed=0):
    """3 rows x 14: packed pretraining docs with padding, an SFT row, docs with prompts."""
    rows = [_row([5, 6], [0, 0], 14), _row([14], [5], 14), _row([3, 4, 7], [0, 2, 3], 14)]
    seg, pos, maskable = (torch.tensor([r[k] for r in rows]) for k in range(3))
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, MASK, seg.shape, generator=g)  # never the mask id
    input_ids[seg == 0] = 0
    return {
        "input_ids": input_ids,
        "position_ids": pos,
        "segment_ids": seg,
        "attention_mask": (seg > 0).long(),
        "maskable": maskable.bool(),
    }


def tiny_model(noisy_ids, seed=1):
    """A tiny random 'model': embedding -> tanh(linear). Returns (hidden leaf, head weight leaf)."""
    g = torch.Generator().manual_seed(seed)
    emb, proj = torch.randn(V, H, generator=g), torch.randn(H, H, generator=g)
    hidden = torch.tanh(emb[noisy_ids] @ proj).requires_grad_()
    head = torch.randn(V, H, generator=g).requires_grad_()
    return hidden, head


def naive_loss(hidden, head, batch, scored, t, weighting, normalization, shift):
    """From scratch: full logits, explicit loops, denominators recounted from the batch."""
    logits = hidden @ head.t()  # [B, S, V]
    ids, seg, maskable = batch["input_ids"], batch["segment_ids"], batch["maskable"]
    total = hidden.sum() * 0.0
    n_eligible = 0
    for b, i in itertools.product(range(ids.shape[0]), range(ids.shape[1])):
        first_of_doc = i == 0 or seg[b, i] != seg[b, i - 1]
        if maskable[b, i] and not (shift and first_of_doc):
            n_eligible += 1
        if scored[b, i]:
            src = i - 1 if shift else i
            w = 1.0 / t[b, i] if weighting == "inv_t" else 1.0
            total = total + w * F.cross_entropy(logits[b, src][None], ids[b, i][None])
    den = int(scored.sum()) if normalization == "masked" else n_eligible
    return total / den


def _grads(loss, *leaves):
    return torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("weighting", ["inv_t", "none"])
@pytest.mark.parametrize("normalization", ["masked", "maskable"])
@pytest.mark.parametrize("shift", [True, False])
@pytest.mark.parametrize("chunk_size", [4, 1024])
def test_mdm_loss_matches_naive_reference(weighting, normalization, shift, chunk_size):
    batch = make_batch()
    obj = MDMObjective(
        mask_token_id=MASK, weighting=weighting, normalization=normalization, logit_shift=shift,
        eps=0.05, chunk_size=chunk_size,
    )
    for micro in range(3):
        corr = obj.prepare(batch, make_generator(7, 3, 0, micro))
        assert corr.n_masked > 0
        hidden, head = tiny_model(corr.noisy_ids)
        loss = obj.loss_fn(corr, obj.num_loss_tokens(corr))(hidden, head)
        ref = naive_loss(hidden, head, batch, corr.masked, corr.t, weighting, normalization, shift)
        torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
        for g, r in zip(_grads(loss, hidden, head), _grads(ref, hidden, head)):
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


def test_ar_loss_matches_naive_causal_ce():
    batch = make_batch()
    obj = ARObjective(chunk_size=5)
    assert obj.attn_mode == "causal" and MDMObjective(mask_token_id=MASK).attn_mode == "bidirectional"
    corr = obj.prepare(batch)
    assert torch.equal(corr.noisy_ids, batch["input_ids"]) and not corr.masked.any()
    hidden, head = tiny_model(batch["input_ids"])
    loss = obj.loss_fn(corr, obj.num_loss_tokens(corr))(hidden, head)
    ref = naive_loss(hidden, head, batch, corr.eligible, corr.t, "none", "maskable", True)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(_grads(loss, hidden, head), _grads(ref, hidden, head)):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("normalization", ["masked", "maskable"])
def test_micro_batch_shares_sum_to_full_batch_loss(normalization):
    batch = make_batch()
    obj = MDMObjective(mask_token_id=MASK, normalization=normalization, eps=0.05)
    halves = [{k: v[sl] for k, v in batch.items()} for sl in (slice(0, 2), slice(2, 3))]
    corrs = [obj.prepare(mb, make_generator(1, 0, 0, m)) for m, mb in enumerate(halves)]
    global_den = sum(obj.num_loss_tokens(c) for c in corrs)
    hidden, head = tiny_model(torch.cat([c.noisy_ids for c in corrs]))
    shares = [
        obj.loss_fn(c, global_den)(hidden[rows], head) for c, rows in zip(corrs, (slice(0, 2), slice(2, 3)))
    ]
    total = shares[0] + shares[1]
    masked = torch.cat([c.masked for c in corrs])
    t = torch.cat([c.t for c in corrs])
    ref = naive_loss(hidden, head, batch, masked, t, "inv_t", normalization, True)
    torch.testing.assert_close(total, ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(_grads(total, hidden, head), _grads(ref, hidden, head)):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


def test_micro_batch_without_loss_tokens_gives_zero_and_zero_grads():
    batch = make_batch()
    batch["maskable"][:] = False
    obj = MDMObjective(mask_token_id=MASK)
    corr = obj.prepare(batch, make_generator(0, 0, 0, 0))
    assert corr.n_masked == 0 and obj.num_loss_tokens(corr) == 0
    hidden, head = tiny_model(corr.noisy_ids)
    loss = obj.loss_fn(corr, 17)(hidden, head)  # other micro-batches carry the denominator
    assert loss.item() == 0.0
    gh, gw = _grads(loss, hidden, head)
    assert torch.count_nonzero(gh) == 0 and torch.count_nonzero(gw) == 0


def test_eligibility_over_many_seeds():
    batch = make_batch()
    pads = batch["segment_ids"] == 0
    prompts = ~batch["maskable"] & ~pads
    seg = batch["segment_ids"]
    doc_start = torch.ones_like(pads)
    doc_start[:, 1:] = seg[:, 1:] != seg[:, :-1]
    first_maskable_start = doc_start & batch["maskable"]
    assert first_maskable_start.any()  # the batch must exercise the shift rule
    ever_masked = {True: torch.zeros_like(pads), False: torch.zeros_like(pads)}
    for shift in (True, False):
        for step in range(300):
            c = corrupt(batch, MASK, eps=0.3, per_document=True, generator=make_generator(5, step, 0, 0), logit_shift=shift)
            assert not (c.masked & (prompts | pads)).any()
            assert torch.equal(c.noisy_ids[c.masked], torch.full((c.n_masked,), MASK))
            assert torch.equal(c.noisy_ids[~c.masked], batch["input_ids"][~c.masked])
            ever_masked[shift] |= c.masked
    assert not (ever_masked[True] & doc_start).any()
    # Without the shift the first token of a document is an ordinary maskable token.
    assert ever_masked[False][first_maskable_start].all()
    assert torch.equal(ever_masked[False], batch["maskable"])


def test_generator_determinism_and_stream_separation():
    batch = make_batch()

    def noisy(*key):
        return corrupt(batch, MASK, 1e-3, True, make_generator(*key), True)

    a, b = noisy(3, 10, 2, 1), noisy(3, 10, 2, 1)
    assert torch.equal(a.noisy_ids, b.noisy_ids) and torch.equal(a.t, b.t)
    seeds = {make_generator(*k).initial_seed() for k in [(3, 10, 2, 1), (3, 11, 2, 1), (3, 10, 3, 1), (3, 10, 2, 2), (4, 10, 2, 1), (3, 1, 10, 2)]}
    assert len(seeds) == 6
    for other in [(3, 11, 2, 1), (3, 10, 3, 1), (3, 10, 2, 2)]:
        assert not torch.equal(noisy(*other).t, a.t)
    # Pinned: a resumed run must regenerate the same noise, so the hash must never change.
    assert make_generator(0, 0, 0, 0).initial_seed() == PINNED_SEED_0000
    assert 0 <= make_generator(2**40, 123456, 7, 3).initial_seed() < 2**63
    with pytest.raises(ValueError, match="step"):
        make_generator(0, -1, 0, 0)


def test_t_range_and_per_document_constancy():
    batch = make_batch()
    seg = batch["segment_ids"]
    for eps in (1e-3, 0.5):
        for step in range(50):
            c = corrupt(batch, MASK, eps, True, make_generator(0, step, 0, 0), True)
            assert (c.t >= eps).all() and (c.t <= 1.0).all()
            for b in range(seg.shape[0]):
                for doc in seg[b].unique().tolist():
                    vals = c.t[b][seg[b] == doc]
                    assert torch.all(vals == vals[0])
            assert c.t[2, 0] != c.t[2, 3]  # different documents draw different t
    c = corrupt(batch, MASK, 1e-3, False, make_generator(0, 0, 0, 0), True)
    assert torch.all(c.t == c.t[:, :1])  # per_document=False: one t per row


def test_masked_fraction_tracks_t():
    S, B = 256, 64
    batch = {
        "input_ids": torch.ones(B, S, dtype=torch.long),
        "position_ids": torch.arange(S).expand(B, S),
        "segment_ids": torch.ones(B, S, dtype=torch.long),
        "attention_mask": torch.ones(B, S, dtype=torch.long),
        "maskable": torch.ones(B, S, dtype=torch.bool),
    }
    c = corrupt(batch, MASK, 1e-3, False, make_generator(9, 0, 0, 0), False)
    frac = c.masked.float().mean(1)
    t = c.t[:, 0]
    assert (frac - t).abs().mean() < 0.05
    assert torch.corrcoef(torch.stack([frac, t]))[0, 1] > 0.95
    assert t.min() < 0.2 and t.max() > 0.8  # t really is spread over (eps, 1)


def test_bad_options_and_inputs_raise():
    with pytest.raises(ValueError, match="weighting"):
        MDMObjective(mask_token_id=MASK, weighting="min_snr")
    with pytest.raises(ValueError, match="normalization"):
        MDMObjective(mask_token_id=MASK, normalization="sequence")
    with pytest.raises(ValueError, match="logit_shift"):
        ARObjective(logit_shift=False)
    with pytest.raises(ValueError, match="unknown objective"):
        build_objective("dpo")
    batch = make_batch()
    obj = MDMObjective(mask_token_id=MASK)
    bad = dict(batch, input_ids=batch["input_ids"].clone())
    bad["input_ids"][0, 2] = MASK
    with pytest.raises(ValueError, match="mask token"):
        obj.prepare(bad, make_generator(0, 0, 0, 0))
    bad = dict(batch, maskable=batch["maskable"].clone())
    bad["maskable"][0, -1] = True  # a pad
    with pytest.raises(ValueError, match="padding"):
        obj.prepare(bad, make_generator(0, 0, 0, 0))
    with pytest.raises(KeyError, match="segment_ids"):
        obj.prepare({k: v for k, v in batch.items() if k != "segment_ids"}, make_generator(0, 0, 0, 0))
    corr = obj.prepare(batch, make_generator(0, 0, 0, 0))
    with pytest.raises(ValueError, match="global_denominator"):
        obj.loss_fn(corr, 0)
    hidden, head = tiny_model(corr.noisy_ids)
    with pytest.raises(ValueError, match="hidden_states"):
        obj.loss_fn(corr, 10)(hidden[:, :5], head)


def test_model_inputs():
    batch = make_batch()
    obj = MDMObjective(mask_token_id=MASK)
    corr = obj.prepare(batch, make_generator(0, 0, 0, 0))
    kw = obj.model_inputs(batch, corr)
    assert kw["attn_mode"] == "bidirectional" and kw["input_ids"] is corr.noisy_ids
    assert kw["position_ids"] is batch["position_ids"] and kw["segment_ids"] is batch["segment_ids"]
    assert build_objective("ar").model_inputs(batch, corr)["attn_mode"] == "causal"

