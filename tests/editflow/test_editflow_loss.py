"""EditFlow: alignment, the probability path (z_t, x_t, edits) and the loss against a slow reference."""
import random

import pytest
import torch

from veomni.diffusion.editflow.align import BLANK, align, align_reference, alignment_cost, edit_distance, strip_blanks
from veomni.diffusion.editflow.flow import KappaSchedule, X0Sampler, remaining_edits, sample_zt, strip_rows
from veomni.diffusion.editflow.objective import EditFlowObjective, pad_rows
from veomni.diffusion.editflow.reference import reference_edits, reference_loss
from veomni.diffusion.noise import make_generator


# ---------------------------------------------------------------------------------------------- alignment
@pytest.mark.parametrize("seed", range(4))
def test_alignment_is_optimal_and_strips_back(seed):
    rng = random.Random(seed)
    for _ in range(60):
        vocab = rng.choice([2, 3, 8])
        x0 = [rng.randrange(vocab) for _ in range(rng.randint(0, 14))]
        x1 = [rng.randrange(vocab) for _ in range(rng.randint(0, 14))]
        z0, z1 = align(x0, x1)
        assert len(z0) == len(z1)
        assert strip_blanks(z0) == x0 and strip_blanks(z1) == x1
        assert alignment_cost(z0, z1) == edit_distance(x0, x1)
        assert (z0, z1) == align_reference(x0, x1)  # fast == slow, tie-breaking included


def test_alignment_hand_cases():
    assert edit_distance("kitten", "sitting") == 3
    z0, z1 = align([1, 2, 3], [1, 3])
    assert (z0, z1) == ([1, 2, 3], [1, BLANK, 3])
    z0, z1 = align([], [4, 5])
    assert (z0, z1) == ([BLANK, BLANK], [4, 5])
    # masks against text: substitutions at the end, insertions in front (the reference's tie-break)
    z0, z1 = align([9, 9], [1, 2, 3])
    assert (z0, z1) == ([BLANK, 9, 9], [1, 2, 3])
    with pytest.raises(ValueError, match="negative"):
        align([-1], [1])


def test_alignment_long_pair_matches_reference():
    rng = random.Random(0)
    x1 = [rng.randrange(50) for _ in range(120)]
    x0 = [x if rng.random() < 0.7 else rng.randrange(50) for x in x1[:100]] + [7] * 10
    assert align(x0, x1) == align_reference(x0, x1)


# ---------------------------------------------------------------------------------------------- path
def test_kappa_schedules():
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    cubic = KappaSchedule("cubic")
    assert torch.allclose(cubic.kappa(t), 2 * t**3 - 3 * t**2 + 2 * t)
    assert cubic.kappa(torch.tensor([1.0])).item() == 1.0
    # w = kappa' / (1 - kappa), clamped
    w = cubic.weight(torch.tensor([0.5]))
    assert torch.allclose(w, torch.tensor([0.5 / 0.5]))
    assert KappaSchedule("linear", max_w=5.0).weight(torch.tensor([0.99])).item() == 5.0
    with pytest.raises(ValueError, match="kappa schedule"):
        KappaSchedule("quartic")
    with pytest.raises(ValueError, match="masks:N"):
        X0Sampler("mask:3", 0)
    assert X0Sampler("masks:3", 7)([1, 2]) == [7, 7, 7] and X0Sampler("empty", 7)([1]) == []


def test_zt_xt_and_edits_hand_built():
    # BOS=0. z0 = [0, 5, _, 6, 7], z1 = [0, 1, 2, _, 7]; choose columns 1 and 3 from z1.
    z0 = torch.tensor([[0, 5, BLANK, 6, 7]])
    z1 = torch.tensor([[0, 1, 2, BLANK, 7]])
    u = torch.tensor([[0.9, 0.1, 0.9, 0.1, 0.9]])
    zt = sample_zt(z0, z1, torch.tensor([0.5]), u)
    assert zt.tolist() == [[0, 1, BLANK, BLANK, 7]]
    xt, lengths, nb = strip_rows(zt, torch.ones_like(zt, dtype=torch.bool), pad_id=99)
    assert xt.tolist() == [[0, 1, 7]] and lengths.tolist() == [3]
    e = remaining_edits(zt, z1, torch.ones_like(zt, dtype=torch.bool), nb)
    assert e.ins.tolist() == [[0, 1, 2]]  # insert 2 after x_t[1]
    assert e.sub.tolist() == [] and e.dele.tolist() == []
    assert reference_edits(zt[0].tolist(), z1[0].tolist()) == [("INS", 1, 2)]
    # all from z0: substitute at 1, insert after 1, delete at 2
    zt = sample_zt(z0, z1, torch.tensor([0.0]), u)
    xt, _, nb = strip_rows(zt, torch.ones_like(zt, dtype=torch.bool), pad_id=99)
    assert xt.tolist() == [[0, 5, 6, 7]]
    e = remaining_edits(zt, z1, torch.ones_like(zt, dtype=torch.bool), nb)
    assert e.sub.tolist() == [[0, 1, 1]] and e.ins.tolist() == [[0, 1, 2]] and e.dele.tolist() == [[0, 2]]
    assert sorted(reference_edits(zt[0].tolist(), z1[0].tolist())) == [("DEL", 2, -1), ("INS", 1, 2), ("SUB", 1, 1)]


def _apply_edits(xt, edits):
    """Apply a full edit list (positions of xt) at once: the result must be x1."""
    subs = {p: tok for k, p, tok in edits if k == "SUB"}
    dels = {p for k, p, _ in edits if k == "DEL"}
    ins = {}
    for k, p, tok in edits:
        if k == "INS":
            ins.setdefault(p, []).append(tok)
    out = []
    for i, x in enumerate(xt):
        if i not in dels:
            out.append(subs.get(i, x))
        out.extend(ins.get(i, []))
    return out


def test_remaining_edits_lead_to_x1_random():
    rng = random.Random(1)
    for _ in range(100):
        x1 = [0] + [rng.randrange(1, 6) for _ in range(rng.randint(0, 10))]
        x0 = [0] + [rng.randrange(1, 6) for _ in range(rng.randint(0, 10))]
        a, b = align(x0[1:], x1[1:])
        z0, z1 = [0] + a, [0] + b
        k = rng.random()
        zt = [y if rng.random() < k else x for x, y in zip(z0, z1)]
        edits = reference_edits(zt, z1)
        assert _apply_edits(strip_blanks(zt), edits) == x1
        # the vectorised edit list equals the reference one
        zt_t, z1_t = torch.tensor([zt]), torch.tensor([z1])
        valid = torch.ones_like(zt_t, dtype=torch.bool)
        _, _, nb = strip_rows(zt_t, valid, 99)
        e = remaining_edits(zt_t, z1_t, valid, nb)
        vec = ([("SUB", p, t) for _, p, t in e.sub.tolist()] + [("INS", p, t) for _, p, t in e.ins.tolist()]
               + [("DEL", p, -1) for _, p in e.dele.tolist()])
        assert sorted(vec) == sorted(edits)


# ---------------------------------------------------------------------------------------------- loss
def _tiny_editflow(logit_shift=True, seed=0):
    from tests.models.tiny import tiny_config
    from veomni.models.editflow import attach_editflow_heads
    from veomni.models.registry import build_model

    torch.manual_seed(seed)
    model = build_model(tiny_config("llama"))
    model.init_weights()
    attach_editflow_heads(model, logit_shift=logit_shift)
    with torch.no_grad():  # rates away from their init so the test sees varied values
        model.editflow.rate_head.weight.normal_(0, 0.3)
        model.editflow.ins_head.weight.add_(torch.randn_like(model.editflow.ins_head.weight) * 0.1)
    return model.float().eval()


def _batch(rows, prompt_lens, pad=96):
    ids = pad_rows(rows, pad)
    mask = pad_rows([[1] * len(r) for r in rows], 0)
    maskable = torch.zeros_like(mask, dtype=torch.bool)
    for b, p in enumerate(prompt_lens):
        maskable[b, p:len(rows[b])] = True
    return {"input_ids": ids, "attention_mask": mask, "maskable": maskable, "segment_ids": mask.clone(),
            "position_ids": torch.arange(ids.shape[1]).expand_as(ids)}


@pytest.mark.parametrize("logit_shift", [True, False])
@pytest.mark.parametrize("sampler", ["masks:6", "empty"])
def test_loss_equals_slow_reference(logit_shift, sampler):
    from veomni.models.editflow import editflow_forward

    model = _tiny_editflow(logit_shift)
    # pretraining rows (BOS prepended), an SFT row with a 3-token prompt, and an empty (padding) row
    rows = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [3, 4, 20, 21, 22, 23, 24, 25, 26], []]
    batch = _batch(rows, [0, 0, 3, 0])
    obj = EditFlowObjective(heads=model.editflow, mask_token_id=95, bos_token_id=1, pad_token_id=96,
                            x0_sampler=sampler, schedule="cubic")
    for step in range(3):
        corr = obj.prepare(batch, make_generator(0, step, 0, 0))
        assert corr.n_seqs == 3
        assert corr.x1[0][0] == 1 and corr.x1[2][:3] == [3, 4, 20]
        out = model(**obj.model_inputs(batch, corr), loss_fn=obj.loss_fn(corr, corr.n_seqs))
        sched = KappaSchedule("cubic")

        @torch.no_grad()
        def run(xt):
            o = editflow_forward(model, torch.tensor([xt]), torch.ones(1, len(xt), dtype=torch.long))
            return o.rates[0], o.sub_logits[0], o.ins_logits[0]

        ref = reference_loss(corr.x0, corr.x1, corr.prompt_len.tolist(), corr.t, corr.u, sched, run)
        assert torch.allclose(out.loss.double(), ref, rtol=1e-5, atol=1e-6), (out.loss, ref)
        out.loss.backward()  # every head gets a gradient
        for name, p in model.editflow.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        model.zero_grad()


def test_loss_refuses_packed_rows_and_bad_denominator():
    model = _tiny_editflow()
    obj = EditFlowObjective(heads=model.editflow, mask_token_id=95, bos_token_id=1, pad_token_id=96)
    batch = _batch([[5, 6, 7, 8]], [0])
    batch["segment_ids"] = torch.tensor([[1, 1, 2, 2]])
    with pytest.raises(ValueError, match="packing=false"):
        obj.prepare(batch, make_generator(0, 0, 0, 0))
    corr = obj.prepare(_batch([[5, 6]], [0]), make_generator(0, 0, 0, 0))
    with pytest.raises(ValueError, match="global_denominator"):
        obj.loss_fn(corr, 0)
