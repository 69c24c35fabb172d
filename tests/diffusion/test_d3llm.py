"""d3LLM trajectory masking (veomni/diffusion/d3llm.py) and its store (veomni/diffusion/trajectory.py).

The reference functions below are labelled transcriptions of hao-ai-lab/d3LLM,
d3llm/d3llm_DREAM/distill_2_training/d3llm_dream_train.py (select_trajectory_by_ratio,
forward_process_with_trajectory with use_blockwise and use_complementary_loss, DLMTrainer's
get_current_mask_ratio / get_current_block_size), kept close to the original control flow so that
the comparison checks behaviour on the same inputs. Its `random.randint` block draw is replaced by
the block our objective drew, and a row is one unpadded example (d3LLM pads responses to 256 EOS).
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from veomni.diffusion.d3llm import (D3LLMObjective, block_size_at, documents, draw_block, mask_ratio_floor,
                                    trajectory_block_mask)
from veomni.diffusion.noise import make_generator
from veomni.diffusion.trajectory import TrajectoryStore, TrajectoryWriter, doc_key

V, H, MASK = 40, 8, 39
SETTINGS = {"teacher": "test", "block_length": 8}


# ---- d3LLM (transcription) ----------------------------------------------------------------------
def d3llm_select_trajectory_by_ratio(trajectories, mask_ratio, block_start, block_end):
    block_length = block_end - block_start
    num_unmasked = int((1 - mask_ratio) * block_length)
    target_idx = block_start + num_unmasked
    target_idx = min(target_idx, len(trajectories) - 1)
    return trajectories[target_idx]


def d3llm_forward_process(input_ids, prompt_lengths, trajectory_batch, block_size, mask_ratio, num_blocks_drawn):
    """forward_process_with_trajectory(use_blockwise=True, use_complementary_loss=True); the block
    index of row i is num_blocks_drawn[i] instead of random.randint(0, max_blocks)."""
    b, l = input_ids.shape  # noqa: E741 (d3LLM's names)
    noisy_batch = input_ids.clone()
    noisy_batch_rev = input_ids.clone()
    masked_indices = torch.zeros_like(input_ids, dtype=torch.bool)
    masked_indices_rev = torch.zeros_like(input_ids, dtype=torch.bool)
    for i in range(b):
        prompt_len = prompt_lengths[i].item()
        response_len = l - prompt_len
        max_blocks = response_len // block_size
        num_blocks = num_blocks_drawn[i]
        assert 0 <= num_blocks <= max_blocks
        mask_start = prompt_len + num_blocks * block_size
        mask_end = mask_start + block_size if num_blocks < max_blocks else l
        traj_step = d3llm_select_trajectory_by_ratio(trajectory_batch[i], mask_ratio, mask_start - prompt_len,
                                                     mask_end - prompt_len)
        traj_tensor = torch.tensor(traj_step, dtype=torch.long)
        seg_mask = traj_tensor[mask_start:mask_end] == MASK
        masked_indices[i, mask_start:mask_end] = seg_mask
        masked_indices_rev[i, mask_start:mask_end] = ~seg_mask
        noisy_batch[i, mask_start:mask_end] = torch.where(masked_indices[i, mask_start:mask_end], MASK,
                                                          input_ids[i, mask_start:mask_end])
        noisy_batch_rev[i, mask_start:mask_end] = torch.where(masked_indices_rev[i, mask_start:mask_end], MASK,
                                                              input_ids[i, mask_start:mask_end])
        noisy_batch[i, mask_end:l] = MASK
        noisy_batch_rev[i, mask_end:l] = MASK
    return noisy_batch, noisy_batch_rev, masked_indices, masked_indices_rev


def d3llm_mask_ratio(global_step, max_steps, min_mask_ratio, max_mask_ratio):
    if max_steps > 0:
        progress = min(global_step / max_steps, 1.0)
        return min_mask_ratio + progress * (max_mask_ratio - min_mask_ratio)
    return min_mask_ratio


def d3llm_block_size(epoch, progressive_block_sizes):
    epoch_idx = int(epoch)
    epoch_idx = min(epoch_idx, len(progressive_block_sizes) - 1)
    start_block_size = progressive_block_sizes[epoch_idx]
    if epoch_idx >= len(progressive_block_sizes) - 1:
        return int(start_block_size)
    end_block_size = progressive_block_sizes[epoch_idx + 1]
    epoch_progress = epoch - epoch_idx
    return int(start_block_size + epoch_progress * (end_block_size - start_block_size))


# ---- helpers --------------------------------------------------------------------------------------
def teacher_like_order(n_gen, block, rng):
    """A block-by-block order: a random permutation inside each teacher block."""
    return np.concatenate([b * block + rng.permutation(block) for b in range(n_gen // block)])


def sft_batch(docs, length):
    """docs: list of rows, each a list of (ids, prompt_len). Returns the [B, S] batch dict."""
    B = len(docs)
    out = {k: torch.zeros(B, length, dtype=torch.long) for k in ("input_ids", "position_ids", "segment_ids")}
    maskable = torch.zeros(B, length, dtype=torch.bool)
    for b, row in enumerate(docs):
        cur = 0
        for s, (ids, p) in enumerate(row, start=1):
            n = len(ids)
            out["input_ids"][b, cur:cur + n] = torch.as_tensor(ids)
            out["position_ids"][b, cur:cur + n] = torch.arange(n)
            out["segment_ids"][b, cur:cur + n] = s
            maskable[b, cur + p:cur + n] = True
            cur += n
    out["attention_mask"] = (out["segment_ids"] > 0).long()
    out["maskable"] = maskable
    return out


def make_store(tmp_path, examples, block=8, name="store"):
    """Write (ids, prompt_len, order) examples into a real store and open it."""
    w = TrajectoryWriter(tmp_path / name, SETTINGS, flush_every=2)
    for ids, p, order in examples:
        w.add(doc_key(ids), order, p, len(order))
    w.flush()
    return TrajectoryStore(tmp_path / name)


def random_examples(rng, count, prompt_range=(1, 5), resp_range=(3, 21), block=8, vocab=MASK):
    out = []
    for _ in range(count):
        p = int(rng.integers(*prompt_range))
        n = int(rng.integers(*resp_range))
        ids = rng.integers(0, vocab, p + n)
        gen = -(-n // block) * block
        out.append((ids, p, teacher_like_order(gen, block, rng)[:n]))
    return out


def objective(store, **kw):
    kw.setdefault("block_sizes", [4])
    return D3LLMObjective(mask_token_id=MASK, store=store, **kw)


# ---- tests ----------------------------------------------------------------------------------------
def test_mask_follows_the_recorded_order_at_a_given_ratio(tmp_path):
    ids, p = np.arange(11) + 1, 3
    order = np.array([2, 0, 5, 1, 7, 3, 6, 4])  # response positions 0..7, one teacher block of 8
    store = make_store(tmp_path, [(ids, p, order)])
    batch = sft_batch([[(ids, p)]], 12)
    for r, want in ((0.5, [2, 4, 6]), (0.8, [0, 2, 4, 5, 6, 7]), (0.0, [])):
        # r fixed: min = max; one block of 8 = the whole response. target = int((1 - r) * 8).
        obj = objective(store, min_mask_ratio=r, max_mask_ratio=r, block_sizes=[8])
        corr = obj.prepare(batch, torch.Generator().manual_seed(0))
        got = corr.masked[0].nonzero().flatten().tolist()
        assert got == [p + j for j in want], (r, got)
        rev = corr.masked[1].nonzero().flatten().tolist()
        assert rev == [p + j for j in range(8) if j not in want]
        assert torch.equal(corr.noisy_ids[0, :p], batch["input_ids"][0, :p])  # prompt never masked
        assert int(corr.noisy_ids[0, -1]) == 0  # padding untouched
        assert corr.n_masked == 8 and obj.num_loss_tokens(corr) == 8  # each block token scored once


def test_matches_d3llm_reference_masking(tmp_path):
    rng = np.random.default_rng(0)
    examples = random_examples(rng, 12)
    store = make_store(tmp_path, examples)
    checked = 0
    for (ids, p, order), B, lo in itertools.product(examples, (3, 4, 8), (0.0, 0.5)):
        obj = objective(store, min_mask_ratio=lo, block_sizes=[B])
        for seed in range(4):
            batch = sft_batch([[(ids, p)]], len(ids))
            gen = make_generator(7, seed, 0, 0)
            corr = obj.prepare(batch, gen)
            # The same draws as the objective made: r and the block of the one document.
            u = torch.rand(1, 2, generator=make_generator(7, seed, 0, 0), dtype=torch.float64)[0].tolist()
            r = lo + u[0] * (0.8 - lo)
            n = len(ids) - p
            s0, s1 = draw_block(u[1], n, B)
            # d3LLM's trajectory: trajectory[k] is the full sequence after teacher step k.
            gen_len = -(-n // 8) * 8
            full_order = np.concatenate([order, np.arange(n, gen_len) + 10_000])  # positions past the response
            tokens = np.concatenate([ids[p:], np.ones(gen_len - n, dtype=ids.dtype)])
            traj = [list(ids[:p]) + [int(t) if o <= k else MASK for t, o in zip(tokens, full_order)]
                    for k in range(gen_len)]
            ref = d3llm_forward_process(torch.as_tensor(ids)[None], torch.tensor([p]), [traj], B, r, [s0 // B])
            noisy, noisy_rev, m, m_rev = ref
            assert torch.equal(corr.masked[0], m[0]) and torch.equal(corr.masked[1], m_rev[0]), (p, n, B, r, s0)
            assert torch.equal(corr.noisy_ids[0], noisy[0]) and torch.equal(corr.noisy_ids[1], noisy_rev[0])
            checked += 1
    assert checked == 12 * 3 * 2 * 4


def test_curriculum_matches_d3llm_schedules():
    sizes = [16, 24, 32]
    for total, spe in ((300, 100.0), (7, 2.5)):
        for step in range(total + 2):
            assert mask_ratio_floor(step, total, 0.0, 0.8) == d3llm_mask_ratio(step, total, 0.0, 0.8)
            assert block_size_at(step, spe, sizes) == d3llm_block_size(step / spe, sizes)
    assert [block_size_at(s, 100, sizes) for s in (0, 50, 99, 100, 150, 200, 350)] == [16, 20, 23, 24, 28, 32, 32]
    assert mask_ratio_floor(150, 300, 0.0, 0.8) == pytest.approx(0.4)
    assert block_size_at(5, None, [32]) == 32
    with pytest.raises(ValueError, match="no epoch length"):
        block_size_at(5, None, sizes)


def test_block_draw_is_uniform_over_blocks_holding_a_response_token():
    # n = 8, B = 4: d3LLM's randint(0, 2) could also pick the empty block past the end; we do not.
    assert sorted({draw_block(u, 8, 4) for u in np.linspace(0, 0.999, 50)}) == [(0, 4), (4, 8)]
    assert sorted({draw_block(u, 9, 4) for u in np.linspace(0, 0.999, 50)}) == [(0, 4), (4, 8), (8, 9)]
    assert trajectory_block_mask(np.array([3, 1, 0, 2]), 0, 4, 0.5).tolist() == [True, False, False, False]


def test_packed_rows_invariants_over_seeds(tmp_path):
    """Several documents per row: each gets one block, earlier response clean, later response masked
    and unscored, the two copies' masks exact complements inside the block, the prompt untouched."""
    rng = np.random.default_rng(1)
    examples = random_examples(rng, 6)
    store = make_store(tmp_path, examples)
    rows = [[(e[0], e[1]) for e in examples[:3]], [(e[0], e[1]) for e in examples[3:]]]
    S = max(sum(len(i) for i, _ in row) for row in rows) + 2
    batch = sft_batch(rows, S)
    orders = {doc_key(ids): order for ids, _, order in examples}
    obj = objective(store, block_sizes=[4])
    obj.set_progress(3, 10, 5.0)
    docs = documents(batch["segment_ids"].numpy(), batch["maskable"].numpy())
    assert len(docs) == 6
    for seed in range(20):
        corr = obj.prepare(batch, make_generator(0, seed, 0, 0))
        again = obj.prepare(batch, make_generator(0, seed, 0, 0))
        assert torch.equal(corr.noisy_ids, again.noisy_ids)  # keyed noise: reproducible
        m1, m2 = corr.masked[:2], corr.masked[2:]
        assert not bool((m1 & m2).any())
        for b, a, p, e in docs:
            order = orders[doc_key(batch["input_ids"][b, a:e].numpy())]
            r = float(corr.t[b, a])
            assert obj.r_floor <= r <= 0.8
            block = (m1 | m2)[b, p:e].nonzero().flatten()
            s0, s1 = int(block.min()), int(block.max()) + 1
            assert s0 % 4 == 0 and s1 == min(s0 + 4, e - p) and len(block) == s1 - s0  # one whole block
            assert m1[b, p + s0:p + s1].numpy().tolist() == trajectory_block_mask(order, s0, s1, r).tolist()
            for copy in (0, 2):
                noisy = corr.noisy_ids[copy + b]
                assert torch.equal(noisy[a:p + s0], batch["input_ids"][b, a:p + s0])  # prompt + earlier clean
                assert bool((noisy[p + s1:e] == MASK).all())  # later response masked
            assert not bool(corr.masked[:, :][[b, b + 2]][:, p + s1:e].any())  # ...and not scored
        inputs = obj.model_inputs(batch, corr)
        assert inputs["input_ids"].shape == (4, S)
        assert torch.equal(inputs["segment_ids"], batch["segment_ids"].repeat(2, 1))


@pytest.mark.parametrize("entropy_weight", [0.0, 0.7])
def test_loss_is_the_mean_ce_over_scored_tokens_of_both_copies(tmp_path, entropy_weight):
    """Global normalisation: the micro-batch shares add up to (sum of CE [+ w * H on correct
    predictions] over every scored token of both copies) / the scored-token count."""
    rng = np.random.default_rng(2)
    examples = random_examples(rng, 4, vocab=3)  # targets in {0, 1, 2}: the head below gets some right
    store = make_store(tmp_path, examples)
    batch = sft_batch([[(e[0], e[1]) for e in examples[:2]], [(e[0], e[1]) for e in examples[2:]]], 40)
    obj = objective(store, entropy_weight=entropy_weight, entropy_temperature=0.5)
    corrs = [obj.prepare(batch, make_generator(0, 0, 0, m)) for m in range(2)]
    denom = sum(obj.num_loss_tokens(c) for c in corrs)
    g = torch.Generator().manual_seed(3)
    emb, head = torch.randn(V, H, generator=g), torch.randn(V, H, generator=g)
    head[:3] *= 5
    total, ce, ent, n_correct = 0.0, 0.0, 0.0, 0
    for c in corrs:
        hidden = torch.tanh(emb[c.noisy_ids])  # [2B, S, H]
        total += obj.loss_fn(c, denom)(hidden, head).item()
        logits = hidden @ head.t()
        for b, i in c.masked.nonzero().tolist():  # logit shift: token i from position i - 1
            z, target = logits[b, i - 1], int(batch["input_ids"][b % 2, i])
            ce += F.cross_entropy(z[None], torch.tensor([target])).item()
            if int(z.argmax()) == target:
                q = torch.softmax(z / 0.5, -1)
                ent += -(q * torch.log(q + 1e-12)).sum().item()
                n_correct += 1
    assert n_correct >= 3 and ent > 0.01 * ce  # the entropy term is exercised and not negligible
    assert total == pytest.approx((ce + entropy_weight * ent) / denom, rel=1e-6)


def test_random_mask_baseline_and_no_complementary():
    ids = np.arange(20) + 1
    batch = sft_batch([[(ids, 4)]], 20)
    obj = D3LLMObjective(mask_token_id=MASK, random_mask=True, complementary=False, blockwise=False,
                         min_mask_ratio=0.5)
    fracs = []
    for seed in range(200):
        corr = obj.prepare(batch, make_generator(0, seed, 0, 0))
        assert corr.noisy_ids.shape == (1, 20) and not bool(corr.masked[0, :4].any())
        fracs.append(float(corr.masked[0, 4:].float().mean()) / float(corr.t[0, 0]))
    assert np.mean(fracs) == pytest.approx(1.0, abs=0.1)  # p = (1 - 1e-3) r + 1e-3 per token


def test_missing_trajectory_and_bad_options_raise(tmp_path):
    rng = np.random.default_rng(3)
    store = make_store(tmp_path, random_examples(rng, 2))
    other = np.arange(12) + 2
    with pytest.raises(KeyError, match="precompute_trajectories.py"):
        objective(store).prepare(sft_batch([[(other, 3)]], 12), torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="bidirectional"):
        objective(store, attn_mode="block_causal", block_size=4)
    with pytest.raises(ValueError, match="min_mask_ratio"):
        objective(store, min_mask_ratio=0.9, max_mask_ratio=0.8)
    with pytest.raises(ValueError, match="trajectory store"):
        D3LLMObjective(mask_token_id=MASK)
    with pytest.raises(ValueError, match="SFT"):  # a pretraining row: the maskable tokens are not one tail
        bad = sft_batch([[(other, 0)]], 12)
        bad["maskable"][0, 5] = False
        objective(store).prepare(bad, torch.Generator().manual_seed(0))


def test_store_resumes_skips_done_keys_and_refuses_other_settings(tmp_path):
    path = tmp_path / "s"
    w = TrajectoryWriter(path, SETTINGS, flush_every=3)
    examples = [(np.arange(5) + i, 2, np.arange(3)) for i in range(5)]
    for ids, p, order in examples[:4]:
        w.add(doc_key(ids), order, p, 8)
    # 3 flushed, 1 pending and lost (a crash): the next writer sees the 3 and takes a new part name.
    w2 = TrajectoryWriter(path, SETTINGS, flush_every=3)
    assert w2.done == {doc_key(ids) for ids, _, _ in examples[:3]}
    for ids, p, order in examples:
        w2.add(doc_key(ids), order + 40000 if p == 2 and ids[0] == 4 else order, p, 8)  # int32 part
    w2.flush()
    store = TrajectoryStore(path)
    assert len(store) == 5
    assert store.lookup(examples[0][0]).tolist() == [0, 1, 2]
    assert store.lookup(examples[4][0]).tolist() == [40000, 40001, 40002]
    assert store.lookup(np.arange(5) + 100) is None
    with pytest.raises(ValueError, match="other settings"):
        TrajectoryWriter(path, {**SETTINGS, "block_length": 32})
    with pytest.raises(FileNotFoundError, match="precompute_trajectories"):
        TrajectoryStore(tmp_path / "nothing")
