"""Ulysses sequence parallelism (gloo, CPU fp32): SP=2 on 2 ranks == one process.

Each case trains 3 AdamW steps (with clipping) on packed rows of odd length (13: the sp ranks pad to
14), with the real objectives: masked diffusion under bidirectional and block_causal attention, the
AR loss under causal attention. The one-process reference runs the plain model on whole rows; the
SP ranks run the same corruption, then their slices (veomni/distributed/sequence_parallel.py).
Losses, gradient norms, the first step's full gradients and the final weights must match, for
  * a dense Llama with 4 query heads and ONE K/V head (P > H_kv: the K/V head is repeated),
  * a Qwen3-MoE (6/2 heads; router balance and z losses on: their statistics are pooled over sp),
  * a Qwen3.5 hybrid (gated DeltaNet layers split by heads, conv weight and non-zero reverse gates
    sliced per rank, and a gated-attention layer).
4-rank runs compose FSDP2 x SP (dp 2 x sp 2, activation checkpointing on), HSDP x SP and EP x SP
(experts over ep 2, sp 2) against one process with two micro-batches.
"""
import pytest
import torch

from tests.distributed._common import TIMEOUT, run_workers
from tests.models.tiny import VOCAB, tiny_config, tiny_moe_config, tiny_qwen3_5_config

pytestmark = pytest.mark.dist
ATOL = 1e-5
PARAM_ATOL = 5e-5  # weights after 3 Adam steps: see tests/distributed/test_expert_parallel.py
MASK_ID = VOCAB - 1
STEPS, ROWS, SEQ = 3, 2, 13
FAMILIES = ("dense", "moe", "qwen3_5")
MODES = (("bidirectional", None), ("block_causal", 4), ("causal", None))


def build(family: str, seed: int = 0):
    from veomni.models.registry import build_model

    if family == "dense":
        cfg = tiny_config("llama", num_attention_heads=4, num_key_value_heads=1, hidden_size=32)
    elif family == "moe":
        cfg = tiny_moe_config("qwen3_moe", router_aux_loss_coef=0.01)
    else:
        cfg = tiny_qwen3_5_config()
    torch.manual_seed(seed)
    model = build_model(cfg)
    model.init_weights()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("reverse_gate"):  # 0 at init: make the reverse scans count
                p.copy_(torch.linspace(-0.8, 0.9, p.numel()))
            elif family == "moe" and name.endswith("mlp.gate.weight"):
                p.mul_(20.0)  # peaked, token-dependent routing
    return model.train()


def batches(seed: int = 7):
    """STEPS packed batches [ROWS, SEQ]: several documents per row, a padded tail in one row."""
    g = torch.Generator().manual_seed(seed)
    out = []
    layouts = ([5, 8], [3, 6, 2])  # row 1 ends in 2 padding columns
    for _ in range(STEPS):
        ids = torch.randint(0, MASK_ID, (ROWS, SEQ), generator=g)
        seg = torch.zeros(ROWS, SEQ, dtype=torch.long)
        pos = torch.zeros(ROWS, SEQ, dtype=torch.long)
        for r, lens in enumerate(layouts):
            start = 0
            for d, n in enumerate(lens[:2] if r == 1 else lens):
                seg[r, start:start + n] = d + 1
                pos[r, start:start + n] = torch.arange(n)
                start += n
        valid = seg > 0
        out.append({"input_ids": ids, "segment_ids": seg, "position_ids": pos,
                    "attention_mask": valid.long(), "maskable": valid.clone()})
    return out


def objective_for(mode, block_size):
    from veomni.diffusion.objective import build_objective

    if mode == "causal":
        return build_objective("ar")
    return build_objective("mdm", mask_token_id=MASK_ID, attn_mode=mode, block_size=block_size)


def moe_terms(model, ps):
    from veomni.trainer.moe_terms import MoETerms, sparse_blocks

    if not sparse_blocks(model):
        return None
    cfg = model.config
    sp = {} if ps is None or ps.sp_size == 1 else dict(sp_group=ps.group("sp"), sp_size=ps.sp_size,
                                                         sp_rank=ps.sp_rank)
    return MoETerms(0.01, 0.001, cfg.num_experts, len(sparse_blocks(model)), cfg.num_experts_per_tok, **sp)


def _full(t):
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def _named(model, grads: bool):
    from veomni.distributed import unwrap_model

    out = {}
    for name, p in unwrap_model(model).named_parameters():
        t = p.grad if grads else p
        # No gradient (None) is a result too: the reverse gates do nothing in causal mode.
        out[name.replace("_checkpoint_wrapped_module.", "")] = None if t is None else _full(t)
    return out


def train(model, data, objective, ps=None, micro_of_rank=lambda step: [(step, 0, slice(None))]):
    """3 steps; each step's micro-batches are (step, global micro index, row slice) of data[step].
    ps None: one process, no sharding. Returns losses, norms, first-step grads, final weights."""
    from veomni.diffusion.noise import make_generator
    from veomni.distributed import clip_grad_norm_, loss_scale_for_grad_averaging
    from veomni.distributed.sequence_parallel import sp_shard

    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    moe = moe_terms(model, ps)
    scale = loss_scale_for_grad_averaging(ps)
    losses, norms, grads0 = [], [], None
    for step in range(STEPS):
        micro = [(data[s] if rows is None else {k: v[rows] for k, v in data[s].items()}, idx)
                 for s, idx, rows in micro_of_rank(step)]
        corrs = [objective.prepare(mb, make_generator(0, step, 0, idx)) for mb, idx in micro]
        local = torch.tensor([float(sum(objective.num_loss_tokens(c) for c in corrs)),
                              float(sum(int(mb["attention_mask"].sum()) for mb, _ in micro))], dtype=torch.float64)
        denom, tokens = (local if ps is None else ps.all_reduce_sum(local)).tolist()
        if moe is not None:
            moe.start_step(tokens)
        total = torch.zeros(())
        for (mb, _), corr in zip(micro, corrs):
            rows = objective.scored_rows(corr)
            inputs = objective.model_inputs(mb, corr)
            if ps is not None:
                inputs, rows = sp_shard(inputs, rows, ps)
            out = model(**inputs, loss_fn=objective.loss_fn(corr, denom, rows=rows))
            term = out.loss if moe is None else out.loss + moe.add(out.router_stats)
            (term * scale).backward()
            total += out.loss.detach()
        losses.append(float(total if ps is None else ps.all_reduce_sum(total, "world")))
        if step == 0:
            grads0 = _named(model, grads=True)
        norms.append(clip_grad_norm_(model, 1.0))
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {"losses": losses, "norms": norms, "grads0": grads0, "params": _named(model, grads=False)}


def reference(family, mode, block_size, micro_of_rank=None):
    data = batches()
    kw = {} if micro_of_rank is None else {"micro_of_rank": micro_of_rank}
    return train(build(family), data, objective_for(mode, block_size), **kw)


def _sp_worker(out_path, cases, ps_kwargs, micro_kind, gradient_checkpointing):
    from veomni.distributed import init_parallel_state, parallelize

    ps = init_parallel_state(timeout=TIMEOUT, **ps_kwargs)
    results = {}
    for family, mode, block_size in cases:
        model = parallelize(build(family), ps, {"gradient_checkpointing": gradient_checkpointing})
        micro = (lambda step: [(step, 0, slice(None))]) if micro_kind == "whole" else (
            lambda step: [(step, ps.dp_rank, slice(ps.dp_rank, ps.dp_rank + 1))])
        res = train(model, batches(), objective_for(mode, block_size), ps, micro)
        results[(family, mode)] = res
    if ps.rank == 0:
        torch.save(results, out_path)
    ps.destroy()


def _compare(got, ref, what):
    for key in ("losses", "norms"):
        for a, b in zip(got[key], ref[key]):
            assert abs(a - b) <= ATOL * max(1.0, abs(b)), (what, key, got[key], ref[key])
    assert ref["losses"][0] != ref["losses"][-1], "the reference did not train"
    for key, tol in (("grads0", ATOL), ("params", PARAM_ATOL)):
        assert set(got[key]) == set(ref[key])
        for name in ref[key]:
            assert (got[key][name] is None) == (ref[key][name] is None), (what, key, name)
            if ref[key][name] is None:
                continue
            torch.testing.assert_close(got[key][name], ref[key][name], atol=tol, rtol=0,
                                       msg=lambda m: f"{what} {key} {name}: {m}")


CASES = [(f, m, b) for f in FAMILIES for m, b in MODES]


def test_sp2_equals_one_process(tmp_path):
    out = tmp_path / "sp2.pt"
    run_workers(_sp_worker, 2, str(out), CASES, {"dp_mode": "fsdp2", "sp_size": 2}, "whole", False, timeout=600)
    got = torch.load(out, weights_only=False)
    for family, mode, block_size in CASES:
        _compare(got[(family, mode)], reference(family, mode, block_size), f"{family}/{mode}")


def _two_micro(step):
    return [(step, 0, slice(0, 1)), (step, 1, slice(1, 2))]


FOUR_RANK_RUNS = (  # (name, parallel state, cases, activation checkpointing)
    ("dp2_sp2", {"sp_size": 2}, [("dense", "bidirectional", None)], True),
    ("hsdp2_sp2", {"sp_size": 2, "dp_replicate": 2}, [("qwen3_5", "block_causal", 4)], False),
    ("ep2_sp2", {"sp_size": 2, "ep_size": 2}, [("moe", "bidirectional", None)], False),
)


@pytest.mark.parametrize("name,layout,cases,ac", FOUR_RANK_RUNS, ids=[r[0] for r in FOUR_RANK_RUNS])
def test_sp_composes_on_4_ranks(tmp_path, name, layout, cases, ac):
    """FSDP2 over dp 2 x sp 2 (activation checkpointing on), HSDP (2 replicas of sp 2) and EP 2 x SP 2
    (experts over ep, the rest FSDP over all 4 ranks) against one process with the two rows as two
    micro-batches (noise keyed by the global micro-batch index, as the trainer does)."""
    out = tmp_path / f"{name}.pt"
    run_workers(_sp_worker, 4, str(out), cases, {"dp_mode": "fsdp2", **layout}, "dp_rows", ac, timeout=600)
    got = torch.load(out, weights_only=False)
    for family, mode, block_size in cases:
        _compare(got[(family, mode)], reference(family, mode, block_size, _two_micro), f"{family}/{mode} {name}")


# ---------------------------------------------------------------------------- the pure parts
def test_shard_model_inputs_pads_and_slices_every_token_tensor():
    from veomni.distributed.sequence_parallel import local_span, shard_model_inputs

    ids = torch.arange(10).reshape(2, 5)
    inputs = {"input_ids": ids, "position_ids": ids + 100, "segment_ids": torch.ones_like(ids),
              "attention_mask": torch.ones_like(ids), "attn_mode": "bidirectional", "block_size": None}
    parts = [shard_model_inputs(inputs, 2, r) for r in range(2)]
    assert [local_span(5, 2, r) for r in range(2)] == [(0, 3), (3, 6)]
    for key in ("input_ids", "position_ids", "segment_ids", "attention_mask"):
        whole = torch.cat([p[key] for p in parts], dim=1)
        assert whole.shape == (2, 6)
        assert torch.equal(whole[:, :5], inputs[key])
    assert parts[1]["attention_mask"][:, -1].tolist() == [0, 0]  # the padding is invisible
    assert parts[1]["segment_ids"][:, -1].tolist() == [0, 0]
    assert parts[0]["attn_mode"] == "bidirectional" and parts[0]["block_size"] is None
    # Without an attention mask, padding gets one; a tensor without a rule is refused.
    bare = shard_model_inputs({"input_ids": ids}, 2, 1)
    assert bare["attention_mask"].tolist() == [[1, 1, 0], [1, 1, 0]]
    with pytest.raises(KeyError, match="no sequence-parallel rule for model input 'labels'"):
        shard_model_inputs({"input_ids": ids, "labels": ids}, 2, 0)


def test_shard_scored_rows_partitions_the_loss_rows():
    from veomni.diffusion.objective import ScoredRows
    from veomni.distributed.sequence_parallel import shard_scored_rows

    pos = torch.tensor([[0, 0], [0, 2], [0, 3], [1, 1], [1, 4], [1, 6]])
    rows = ScoredRows(pos, torch.arange(6) + 10, torch.arange(6).float(), (2, 7))
    parts = [shard_scored_rows(rows, 7, 3, r) for r in range(3)]  # slices [0,3) [3,6) [6,9)
    assert [p.shape for p in parts] == [(2, 3)] * 3
    assert [p.targets.tolist() for p in parts] == [[10, 11, 13], [12, 14], [15]]
    assert parts[1].positions.tolist() == [[0, 0], [1, 1]]  # local columns
    for p in parts:  # targets and weights stay paired with their rows
        assert torch.equal(p.weights, (p.targets - 10).float())


@pytest.mark.parametrize("args,match", [
    (("ddp", 2, 1, 2), "needs train.data_parallel=fsdp2"),
    (("none", 1, 1, 2), "needs train.data_parallel=fsdp2"),
    (("fsdp2", 4, 1, 3), "not divisible by dp_replicate \\* ulysses_parallel_size"),
    (("fsdp2", 4, 2, 4), "not divisible"),
    (("fsdp2", 4, 1, 0), "ulysses_parallel_size must be an int >= 1"),
])
def test_bad_sp_layouts_are_refused(args, match):
    from veomni.distributed.parallel_state import mesh_layout

    with pytest.raises(ValueError, match=match):
        mesh_layout(*args)


def test_sp_layouts():
    from veomni.distributed.parallel_state import mesh_layout

    assert mesh_layout("fsdp2", 8, 2, 2) == {"dp_replicate": 2, "dp_shard": 2, "sp": 2}
    assert mesh_layout("fsdp2", 4, 1, 4) == {"dp_replicate": 1, "dp_shard": 1, "sp": 4}


def test_head_counts_that_do_not_split_are_refused():
    from types import SimpleNamespace

    from veomni.distributed.sequence_parallel import UlyssesAttention, UlyssesGDN, apply_sequence_parallel

    with pytest.raises(ValueError, match="num_attention_heads=6 is not divisible"):
        UlyssesAttention(None, 4, 6, 2)
    with pytest.raises(ValueError, match="num_key_value_heads=3 .* one must divide the other"):
        UlyssesAttention(None, 2, 6, 3)
    assert UlyssesAttention(None, 4, 8, 2).kv_repeat == 2
    with pytest.raises(ValueError, match="num_k_heads=2 is not divisible"):
        UlyssesGDN(None, 4, 0, SimpleNamespace(num_k_heads=2, num_v_heads=4))
    model = build("dense")
    model.model.layers[0].self_attn = torch.nn.Identity()  # a mixer without a Ulysses rule
    ps = SimpleNamespace(group=lambda name: None, sp_size=2, sp_rank=0)
    with pytest.raises(NotImplementedError, match="layer 0 .* no Ulysses implementation"):
        apply_sequence_parallel(model, ps)
