"""Repr-Align: the hidden states it reads, its loss against a from-scratch reference, and the teacher
staying frozen and outside the student."""
import pytest
import torch
import torch.nn.functional as F

from tests.diffusion.test_objective import MASK, V, make_batch
from tests.models.tiny import build_pair, tiny_config
from veomni.diffusion.noise import make_generator
from veomni.diffusion.objective import MDMObjective
from veomni.diffusion.repr_align import ReprAlign, resolve_layers, row_key


def test_hidden_states_are_hf_output_hidden_states():
    hf, ours = build_pair("qwen3")
    ids = torch.randint(0, 90, (2, 11))
    with torch.no_grad():
        ref = hf(ids, output_hidden_states=True).hidden_states
        got = []
        ours(input_ids=ids, attn_mode="causal", hidden_states_out=got)
    assert len(got) == len(ref) == ours.config.num_hidden_layers + 1
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_layer_indices():
    assert resolve_layers([], 5) == [0, 1, 2, 3, 4]
    assert resolve_layers([-1, 1], 5) == [1, 4]
    with pytest.raises(ValueError, match="outside the 5 hidden states"):
        resolve_layers([5], 5)
    with pytest.raises(ValueError, match="listed twice"):
        resolve_layers([4, -1], 5)


def _pair(seed=0):
    from veomni.models.registry import build_model

    cfg = tiny_config("llama", vocab_size=V, hidden_size=32, num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(seed)
    student = build_model(cfg)
    student.init_weights()
    teacher = build_model(cfg)
    teacher.load_state_dict(student.state_dict())
    with torch.no_grad():  # the student has drifted from its teacher
        for p in student.parameters():
            p.add_(0.002 * torch.randn_like(p))
    return student.train(), teacher


@pytest.mark.parametrize("layers,token_fraction", [([], 1.0), ([1, -1], 0.5)])
def test_loss_equals_reference_and_no_gradient_reaches_the_teacher(layers, token_fraction):
    student, teacher = _pair()
    batch = make_batch(1)
    obj = MDMObjective(mask_token_id=MASK)
    corr = obj.prepare(batch, make_generator(0, 0, 0, 0))
    n_states = student.config.num_hidden_layers + 1
    align = ReprAlign(weight=10.0, layers=layers, num_hidden_states=n_states, token_fraction=token_fraction,
                      teacher=teacher)
    plan = align.plan(batch, corr, make_generator(0, 0, 1, 0))
    k = corr.loss_positions.shape[0]
    assert plan.positions.shape[0] == (k if token_fraction == 1.0 else -(-k // 2))
    pairs = align.num_pairs(plan)
    hs = []
    student(**obj.model_inputs(batch, corr), hidden_states_out=hs)
    term, raw = align.loss(hs, plan, float(pairs))

    # From scratch: the teacher's causal clean forward, cosine at the planned rows ("next token masked").
    with torch.no_grad():
        ths = []
        teacher(input_ids=batch["input_ids"], position_ids=batch["position_ids"], segment_ids=batch["segment_ids"],
                attention_mask=batch["attention_mask"], attn_mode="causal", hidden_states_out=ths)
    pos = plan.positions
    assert torch.equal(corr.masked[pos[:, 0], pos[:, 1] + 1], torch.ones(len(pos), dtype=torch.bool))
    ref = sum((1 - F.cosine_similarity(hs[i][pos[:, 0], pos[:, 1]], ths[i][pos[:, 0], pos[:, 1]], dim=-1)).sum()
              for i in resolve_layers(layers, n_states))
    torch.testing.assert_close(term, 10.0 * ref / pairs, atol=1e-6, rtol=1e-5)
    assert float(raw) > 0 and abs(float(raw) / pairs * 10.0 - float(term)) < 1e-5

    term.backward()
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert not any(n.startswith("teacher") for n in student.state_dict())


def test_row_key_depends_on_ids_and_layout():
    ids, seg = torch.arange(6), torch.tensor([1, 1, 1, 2, 2, 2])
    assert row_key(ids, seg) == row_key(ids.clone(), seg.clone())
    assert row_key(ids, seg) != row_key(ids, torch.tensor([1, 1, 2, 2, 2, 2]))
    assert row_key(ids, seg) != row_key(ids.flip(0), seg)


def test_refusals():
    student, teacher = _pair()
    with pytest.raises(ValueError, match="exactly one source"):
        ReprAlign(weight=1.0, layers=[], num_hidden_states=3)
    with pytest.raises(ValueError, match="must be > 0"):
        ReprAlign(weight=0.0, layers=[], num_hidden_states=3, teacher=teacher)
    with pytest.raises(ValueError, match="align_token_fraction must be in"):
        ReprAlign(weight=1.0, layers=[], num_hidden_states=3, token_fraction=0.0, teacher=teacher)
