"""Qwen3.5 / Qwen3.5-MoE hybrids: Gated DeltaNet (GDN) + gated attention layers, zero-centred norms.

  1. causal logits and gradients == transformers' own Qwen3_5[Moe]ForCausalLM (fp32);
  2. what each layer type sees in each mode: bidirectional GDN (reverse gates != 0) sees later
     tokens, block-causal sees its own block and earlier blocks only, causal never the future; with
     the reverse gates at 0 (a freshly loaded AR checkpoint) GDN is exactly causal in every mode;
     the GDN layer equals a per-token reference recurrence in all three modes on packed rows;
  3. packed rows == their documents run alone (the leak of transformers' torch GDN path);
  4. checkpoints: HF -> ours -> HF (reverse gates are extra keys), MoE experts per expert, the
     vision-language wrappers (text model only; vision tower and mtp.* skipped), check_parity.py;
  5. init_weights.
Tiny awkward shapes (tests/models/tiny.py): 2 q/k GDN heads of dim 6 for 4 value heads of dim 5,
head_dim != hidden/heads, GQA, partial RoPE 0.25 / 0.5 / 1.0, lengths off the GDN chunk size 64.
"""
import logging
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file, save_file

from tests.models.tiny import (
    FULL,
    LIN,
    VOCAB,
    build_qwen3_5_pair,
    randomize_qwen3_5,
    set_experts_impl,
    tiny_qwen3_5_config,
)
from veomni.models.hf_io import checkpoint_keys, load_model, save_model
from veomni.models.registry import build_model

REPO = Path(__file__).resolve().parents[2]
TOL = 1e-4
MODES = ("causal", "bidirectional", "block_causal")
BLOCK = 4

VARIANTS = {
    # Qwen3.5's own order (3 GDN : 1 attention), rotary on a quarter of head_dim as in the release.
    "qwen_order": dict(layer_types=(LIN, LIN, LIN, FULL), partial_rotary_factor=0.25, head_dim=8),
    # attention first, head_dim 12, half rotary, tied embeddings.
    "custom_order": dict(layer_types=(FULL, LIN, FULL, LIN), partial_rotary_factor=0.5, head_dim=12, tied=True),
    "full_rope": dict(layer_types=(LIN, FULL, LIN, LIN), partial_rotary_factor=1.0, head_dim=8),
    "all_linear": dict(layer_types=(LIN, LIN, LIN), partial_rotary_factor=0.25, head_dim=8),
}


# ---- helpers ------------------------------------------------------------------------------------

def _ids(seed=0, bsz=2, slen=12):
    return torch.randint(0, VOCAB, (bsz, slen), generator=torch.Generator().manual_seed(seed))


def _padded_batch(slen, seed=1):
    """3 rows: full, right-padded by 5, left-padded by 3."""
    ids = _ids(seed, 3, slen)
    mask = torch.ones(3, slen, dtype=torch.long)
    mask[1, -5:] = 0
    mask[2, :3] = 0
    return ids, mask


def _hf_batch(slen, seed=1):
    """The HF comparison batch: full row, right-padded row, and (up to one GDN chunk) a left-padded
    row. Longer left-padded rows are left out: transformers' torch chunked scan starts its 64-token
    chunks at the row start, and with the chunks shifted against the document its own fp32 error
    reaches 1e-4..5e-4 (HF left-padded vs HF unpadded; ours stays ~1e-5 either way)."""
    ids, mask = _padded_batch(slen, seed)
    return (ids, mask) if slen <= 64 else (ids[:2], mask[:2])


def _kw(mode):
    return dict(attn_mode=mode, block_size=BLOCK if mode == "block_causal" else None)


def _gdn(model):
    return [layer.linear_attn for layer in model.model.layers if hasattr(layer, "linear_attn")]


def _set_reverse_gates(model, value):
    with torch.no_grad():
        for mixer in _gdn(model):
            mixer.reverse_gate.copy_(torch.as_tensor(value, dtype=torch.float32).expand_as(mixer.reverse_gate))


def _slow_decay(model, A=0.05):
    """Long GDN memory (decay exp(-A softplus(.)) per token close to 1), so that a token's influence
    on positions ~10 tokens away stays far above the 1e-6 threshold of the visibility tests."""
    with torch.no_grad():
        for mixer in _gdn(model):
            mixer.A_log.fill_(math.log(A))


def _ours(variant, moe=False, reverse_gate=0.0, attn_impl="sdpa", seed=0, slow=False):
    _, model = build_qwen3_5_pair(moe=moe, seed=seed, attn_impl=attn_impl, **VARIANTS[variant])
    _set_reverse_gates(model, reverse_gate)
    if slow:
        _slow_decay(model)
    return model


class _Capture:
    """Forward hooks keeping the output (and the inputs) of some modules, by key."""

    def __init__(self, modules: dict):
        self.out, self.args = {}, {}
        self._handles = [m.register_forward_hook(self._hook(k)) for k, m in modules.items()]

    def _hook(self, key):
        def hook(module, args, output):
            self.args[key] = args
            self.out[key] = output

        return hook

    def close(self):
        for h in self._handles:
            h.remove()


def _run(model, ids, capture_module=None, **kw):
    """Logits, or the output of `capture_module` when given."""
    cap = _Capture({"m": capture_module}) if capture_module is not None else None
    try:
        with torch.no_grad():
            logits = model(input_ids=ids, **kw).logits
    finally:
        if cap is not None:
            cap.close()
    return logits if cap is None else cap.out["m"]


def _changed(model, ids, j, capture_module=None, **kw):
    """[B, S]: which positions' outputs change when the token at j changes."""
    alt = ids.clone()
    alt[:, j] = (alt[:, j] + 1) % VOCAB
    a = _run(model, ids, capture_module, **kw)
    b = _run(model, alt, capture_module, **kw)
    return (a - b).abs().flatten(2).amax(-1) > 1e-6


def _expected(mode, j, slen, bidirectional_gdn=True):
    """Positions that must see token j (and no others) in a single-document row."""
    i = torch.arange(slen)
    if mode == "causal" or not bidirectional_gdn:
        return i >= j
    if mode == "bidirectional":
        return torch.ones(slen, dtype=torch.bool)
    return i >= (j // BLOCK) * BLOCK  # block_causal: own block (also earlier positions) and later blocks


def _packed(lens_per_row, pad_per_row, seed=0):
    """Packed rows: documents back to back (position ids restarting), then a padding tail (segment 0)."""
    rows_ids, rows_pos, rows_seg, docs = [], [], [], []
    for r, (lens, pad) in enumerate(zip(lens_per_row, pad_per_row)):
        parts = [_ids(seed=100 * r + d, bsz=1, slen=n)[0] for d, n in enumerate(lens)]
        docs.append(parts)
        rows_ids.append(torch.cat(parts + [torch.zeros(pad, dtype=torch.long)]))
        rows_pos.append(torch.cat([torch.arange(n) for n in lens] + [torch.arange(pad)]))
        seg = [torch.full((n,), d + 1) for d, n in enumerate(lens)]
        rows_seg.append(torch.cat(seg + [torch.zeros(pad, dtype=torch.long)]))
    return torch.stack(rows_ids), torch.stack(rows_pos), torch.stack(rows_seg), docs


# ---- 1. parity with transformers ----------------------------------------------------------------

@pytest.mark.parametrize("moe,variant,slen", [
    (False, "qwen_order", 13), (False, "custom_order", 13), (False, "full_rope", 150),  # 150: 3 GDN chunks
    (True, "qwen_order", 70), (True, "custom_order", 13)])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_causal_logits_match_hf(moe, variant, slen, impl):
    hf, ours = build_qwen3_5_pair(moe=moe, attn_impl=impl, **VARIANTS[variant])
    ids, mask = _hf_batch(slen)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
        out = ours(input_ids=ids, attention_mask=mask, attn_mode="causal").logits
    real = mask.bool()
    assert ref[real].std() > 0.5, "logits too flat to compare"
    diff = (ref - out).abs()[real].max().item()
    assert diff <= TOL, f"moe={moe} {variant} slen={slen} {impl}: max abs diff {diff}"


@pytest.mark.parametrize("moe", [False, True])
def test_gradients_match_hf(moe):
    hf, ours = build_qwen3_5_pair(moe=moe, **VARIANTS["qwen_order"])
    ids, mask = _hf_batch(70)  # > one GDN chunk
    hf.train(), ours.train()
    real = mask.bool()
    hf(input_ids=ids, attention_mask=mask).logits[real].logsumexp(-1).sum().backward()
    ours(input_ids=ids, attention_mask=mask, attn_mode="causal").logits[real].logsumexp(-1).sum().backward()
    ref = dict(hf.named_parameters())
    checked = 0
    for name, p in ours.named_parameters():
        if name.endswith("reverse_gate"):  # the reverse scan does not run in causal mode
            assert p.grad is None or not p.grad.any(), name
            continue
        assert p.grad is not None and ref[name].grad is not None, name
        torch.testing.assert_close(p.grad, ref[name].grad, atol=1e-4, rtol=1e-3, msg=name)
        checked += 1
    assert checked == len(ref)


def test_reverse_gate_gets_gradient_from_zero():
    """At reverse_gate = 0 (the AR function) the bidirectional loss still has a gradient in the gate,
    so training can open the right context; every other parameter's gradient is the causal one."""
    model = _ours("all_linear").train()
    ids = _ids(slen=20)
    grads = {}
    for mode in ("causal", "bidirectional"):
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, attn_mode=mode).logits.logsumexp(-1).sum().backward()
        grads[mode] = {n: p.grad for n, p in model.named_parameters()}
    for name, g in grads["bidirectional"].items():
        if name.endswith("reverse_gate"):
            assert g is not None and (g.abs() > 1e-6).all(), (name, g)
        else:
            torch.testing.assert_close(g, grads["causal"][name], atol=1e-6, rtol=1e-5, msg=name)


# ---- 2. what each layer type sees -----------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ["linear", "full"])
def test_first_layer_visibility(kind, mode):
    """The layer-0 mixer (its input differs only at the changed token): GDN with reverse gates 0.5
    and gated attention each see exactly what the mode allows."""
    model = _ours("qwen_order" if kind == "linear" else "custom_order", reverse_gate=0.5, slow=True)
    layer0 = model.model.layers[0]
    mixer = layer0.linear_attn if kind == "linear" else layer0.self_attn
    slen, j = 12, 5  # block 1 = positions 4..7
    changed = _changed(model, _ids(slen=slen), j, capture_module=mixer, **_kw(mode))
    expected = _expected(mode, j, slen)
    assert (changed == expected).all(), f"{kind} {mode}: changed {changed.int().tolist()}"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("variant", ["qwen_order", "custom_order", "all_linear"])
def test_model_visibility(variant, mode):
    model = _ours(variant, reverse_gate=0.5, slow=True)
    slen = 12
    for j in (5, 10):  # block 1, block 2
        changed = _changed(model, _ids(slen=slen), j, **_kw(mode))
        assert (changed == _expected(mode, j, slen)).all(), f"{variant} {mode} j={j}: {changed.int().tolist()}"


@pytest.mark.parametrize("mode", MODES)
def test_gdn_with_zero_reverse_gate_is_causal(mode):
    """reverse_gate = 0: every GDN layer sees only the past, in every mode (numerically the causal output)."""
    model = _ours("all_linear", reverse_gate=0.0, slow=True)
    slen, j = 12, 5
    ids = _ids(slen=slen)
    for mixer in _gdn(model):
        changed = _changed(model, ids, j, capture_module=mixer, **_kw(mode))
        assert (changed == _expected(mode, j, slen, bidirectional_gdn=False)).all(), changed.int().tolist()
        assert torch.equal(_run(model, ids, mixer, **_kw(mode)), _run(model, ids, mixer, attn_mode="causal"))


def test_reverse_gate_is_per_value_head():
    """Only the value heads with a non-zero reverse gate see later tokens; o = o_fwd + gate[h] * o_rev."""
    model = _ours("qwen_order", slow=True)
    gate = torch.tensor([0.5, 0.0, 0.0, -0.3])  # 4 value heads
    norm = model.model.layers[0].linear_attn.norm  # its input is the mixed GDN output [B, S, Hv, Dv]
    slen, j = 12, 8

    def core(ids, g):
        _set_reverse_gates(model, g)
        cap = _Capture({"n": norm})
        try:
            with torch.no_grad():
                model(input_ids=ids, attn_mode="bidirectional")
        finally:
            cap.close()
        return cap.args["n"][0]

    ids = _ids(slen=slen)
    alt = ids.clone()
    alt[:, j] = (alt[:, j] + 1) % VOCAB
    seen = (core(ids, gate) - core(alt, gate)).abs().amax(-1) > 1e-6  # [B, S, Hv]
    assert seen[:, :j, 0].all() and seen[:, :j, 3].all()
    assert not seen[:, :j, 1:3].any()
    # Linear in the gate, head by head: o(g) - o(0) = g * o_rev.
    base, unit = core(ids, 0.0), core(ids, 1.0)
    torch.testing.assert_close(core(ids, gate) - base, gate[:, None] * (unit - base), atol=1e-5, rtol=1e-4)


def _ref_scan(m, qkv, g, beta):
    """Per-token GDN over one segment given in scan order (fp64): causal conv (kernel K, zero
    history) + SiLU, L2-normalised q (x Dk^-1/2) and k, each q/k head serving Hv/Hk consecutive
    value heads, S <- exp(g) S; S <- S + k (beta (v - S^T k))^T; o = S^T q."""
    K = m.conv_kernel_size
    w = m.conv1d.weight.double()[:, 0, :]  # [C, K]; w[:, K-1] multiplies the current token
    L = qkv.shape[0]
    conv = torch.zeros_like(qkv)
    for t in range(L):
        for i in range(K):
            s = t - (K - 1) + i
            if s >= 0:
                conv[t] += w[:, i] * qkv[s]
    conv = F.silu(conv)
    hk, hv, dk, dv = m.num_k_heads, m.num_v_heads, m.head_k_dim, m.head_v_dim
    q, k, v = conv.split([hk * dk, hk * dk, hv * dv], dim=-1)
    q, k, v = q.view(L, hk, dk), k.view(L, hk, dk), v.view(L, hv, dv)
    q = q * torch.rsqrt((q * q).sum(-1, keepdim=True) + 1e-6) * dk ** -0.5
    k = k * torch.rsqrt((k * k).sum(-1, keepdim=True) + 1e-6)
    q, k = q.repeat_interleave(hv // hk, dim=1), k.repeat_interleave(hv // hk, dim=1)
    state = torch.zeros(hv, dk, dv, dtype=torch.float64)
    out = []
    for t in range(L):
        state = state * g[t].exp()[:, None, None]
        pred = torch.einsum("hkv,hk->hv", state, k[t])
        state = state + torch.einsum("hk,hv->hkv", k[t], beta[t][:, None] * (v[t] - pred))
        out.append(torch.einsum("hkv,hk->hv", state, q[t]))
    return torch.stack(out)


def _ref_gdn(m, x, docs, pos, mode):
    """Reference GDN mixer on one row x [S, H] (fp64); docs: [(start, end)] of the real documents."""
    x = x.double()
    W = {n: getattr(m, n).weight.double() for n in ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj")}
    qkv, z = x @ W["in_proj_qkv"].T, x @ W["in_proj_z"].T
    beta = (x @ W["in_proj_b"].T).sigmoid()
    g = -m.A_log.double().exp() * F.softplus(x @ W["in_proj_a"].T + m.dt_bias.double())
    o = torch.zeros(x.shape[0], m.num_v_heads, m.head_v_dim, dtype=torch.float64)
    gate = m.reverse_gate.double()[:, None]
    for s, e in docs:
        fwd = torch.arange(s, e)
        o[fwd] += _ref_scan(m, qkv[fwd], g[fwd], beta[fwd])
        if mode == "causal":
            continue
        if mode == "bidirectional":
            spans = [fwd]
        else:  # reverse scan inside each block of the document (block = position id // block size)
            blocks = pos[fwd] // BLOCK
            spans = [fwd[blocks == b] for b in blocks.unique()]
        for span in spans:
            rev = span.flip(0)
            o[rev] += gate * _ref_scan(m, qkv[rev], g[rev], beta[rev])
    zz = z.view(-1, m.num_v_heads, m.head_v_dim)
    h = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + m.norm.variance_epsilon) * m.norm.weight.double()
    h = h * F.silu(zz)
    return h.reshape(x.shape[0], -1) @ W["out_proj"].T


@pytest.mark.parametrize("mode", MODES)
def test_gdn_layer_matches_reference_recurrence(mode):
    """Every GDN layer of a packed batch (one document longer than a chunk, padding tails) equals the
    per-token recurrence: forward scan per document + reverse_gate[h] x reverse scan per document
    (bidirectional) or per block of a document (block_causal)."""
    model = _ours("qwen_order")
    with torch.no_grad():
        for i, mixer in enumerate(_gdn(model)):
            mixer.reverse_gate.copy_(torch.tensor([0.5, -0.7, 0.3, 1.1]) * (1 + i))
    lens, pads = [[40, 30], [70, 3]], [5, 2]
    ids, pos, seg, _ = _packed(lens, pads)
    mixers = _gdn(model)
    cap = _Capture({i: m for i, m in enumerate(mixers)})
    try:
        with torch.no_grad():
            model(input_ids=ids, position_ids=pos, segment_ids=seg, **_kw(mode))
    finally:
        cap.close()
    worst = 0.0
    for i, m in enumerate(mixers):
        x, out = cap.args[i][0], cap.out[i]
        for r, row_lens in enumerate(lens):
            starts = [sum(row_lens[:d]) for d in range(len(row_lens))]
            docs = [(s, s + n) for s, n in zip(starts, row_lens)]
            ref = _ref_gdn(m, x[r], docs, pos[r], mode)
            real = slice(0, sum(row_lens))
            assert ref[real].abs().max() > 0.1
            worst = max(worst, (out[r, real].double() - ref[real]).abs().max().item())
    assert worst <= TOL, f"{mode}: max abs diff {worst}"


def test_freshly_loaded_checkpoint_is_the_ar_model_in_every_mode(tmp_path):
    """The 'initial function': an HF checkpoint has no reverse gates, load_model sets them to 0, and a
    model of GDN layers only then gives identical logits in all modes, equal to HF's."""
    hf, _ = build_qwen3_5_pair(**VARIANTS["all_linear"])
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    assert ours.dllm_extra_parameters() and set(ours.dllm_extra_parameters().values()) == {0.0}
    gates = [m.reverse_gate for m in _gdn(ours)]
    assert len(gates) == 3 and all(g.requires_grad and not g.any() for g in gates)
    ids, mask = _padded_batch(20)
    real = mask.bool()
    with torch.no_grad():
        # use_cache=False: transformers' cache cannot build a mask for a model without attention layers.
        ref = hf(input_ids=ids, attention_mask=mask, use_cache=False).logits
        logits = {mode: ours(input_ids=ids, attention_mask=mask, **_kw(mode)).logits for mode in MODES}
    assert (logits["causal"] - ref).abs()[real].max() <= TOL
    assert torch.equal(logits["bidirectional"][real], logits["causal"][real])
    assert torch.equal(logits["block_causal"][real], logits["causal"][real])


def test_hybrid_gdn_layers_are_causal_at_load_while_attention_is_not():
    """Qwen's order, gates at 0: the three GDN layers before the attention layer give the same outputs
    in causal and bidirectional mode, the attention layer (and so the logits) do not."""
    model = _ours("qwen_order", reverse_gate=0.0)
    ids = _ids(slen=15)
    outs = {}
    for mode in ("causal", "bidirectional"):
        mods = {i: layer.linear_attn if hasattr(layer, "linear_attn") else layer.self_attn
                for i, layer in enumerate(model.model.layers)}
        cap = _Capture(mods)
        try:
            with torch.no_grad():
                outs[mode] = (model(input_ids=ids, attn_mode=mode).logits, cap.out)
        finally:
            cap.close()
    for i in range(3):
        assert torch.equal(outs["causal"][1][i], outs["bidirectional"][1][i]), i
    assert (outs["causal"][1][3] - outs["bidirectional"][1][3]).abs().max() > 1e-3
    assert (outs["causal"][0] - outs["bidirectional"][0]).abs().max() > 1e-3


# ---- 3. packing and padding -----------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("moe", [False, True])
def test_packed_rows_equal_documents_run_separately(mode, moe):
    """In float64: in fp32 the packed/alone difference is reduction-order noise amplified to ~1e-4 by
    the large random weights, too close to any fp32 tolerance; in fp64 it is <= ~1e-6 (the norms
    compute in fp32, as HF's do), while a leak between documents shows at ~1e-1."""
    model = _ours("custom_order", moe=moe, reverse_gate=0.5).double()
    set_experts_impl(model, "loop")  # torch._grouped_mm has no float64
    lens, pads = [[70, 9], [20, 30, 29]], [4, 4]  # 70: a document across a GDN chunk boundary
    ids, pos, seg, docs = _packed(lens, pads)
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=pos, segment_ids=seg, **_kw(mode)).logits
        worst = 0.0
        for r, row_docs in enumerate(docs):
            start = 0
            for d in row_docs:
                alone = model(input_ids=d[None], **_kw(mode)).logits[0]
                worst = max(worst, (packed[r, start:start + len(d)] - alone).abs().max().item())
                start += len(d)
    assert worst <= 1e-5, f"{mode}: max abs diff {worst}"


def test_hf_torch_path_leaks_across_packed_documents():
    """Why the GDN kernels take document boundaries: transformers' torch GDN path scans a packed row
    straight through, so its second document reads the first. Ours does not."""
    hf, ours = build_qwen3_5_pair(**VARIANTS["qwen_order"])
    ids, pos, seg, docs = _packed([[9, 8]], [0])
    with torch.no_grad():
        hf_packed = hf(input_ids=ids, position_ids=pos).logits[0, 9:]
        hf_alone = hf(input_ids=docs[0][1][None]).logits[0]
        ours_packed = ours(input_ids=ids, position_ids=pos, segment_ids=seg, attn_mode="causal").logits[0, 9:]
    assert (ours_packed - hf_alone).abs().max() <= TOL
    # If this fails, transformers now resets the scan at document starts: drop this assertion.
    assert (hf_packed - hf_alone).abs().max() > 1e-2


@pytest.mark.parametrize("mode", MODES)
def test_padding_is_invisible(mode):
    """Changing a padded token (left or right padding) changes no real position, in every mode;
    the reverse scan in particular must not start in the right padding."""
    model = _ours("qwen_order", reverse_gate=0.5, slow=True)
    ids, mask = _padded_batch(14)
    for j in (0, 13):  # left padding of row 2, right padding of row 1
        changed = _changed(model, ids, j, attention_mask=mask, **_kw(mode))
        real = mask.bool()
        row = 2 if j == 0 else 1
        assert not changed[row][real[row]].any(), (mode, j)


# ---- 4. checkpoints -------------------------------------------------------------------------------

def _reverse_gate_keys(model):
    return {n for n, _ in model.named_parameters() if n.endswith("linear_attn.reverse_gate")}


@pytest.mark.parametrize("moe", [False, True])
def test_checkpoint_round_trip(tmp_path, moe):
    """HF save_pretrained -> load_model (== HF) -> save_model (reverse gates set) -> plain transformers
    loads it (the gates are its only unexpected keys) with the same causal logits -> load_model of our
    save restores every tensor, the gates included."""
    hf, _ = build_qwen3_5_pair(moe=moe, **VARIANTS["qwen_order"])
    hf.save_pretrained(tmp_path / "hf")
    ours = load_model(tmp_path / "hf")
    ids, mask = _padded_batch(17)
    real = mask.bool()
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
        assert (ours(input_ids=ids, attention_mask=mask, attn_mode="causal").logits - ref).abs()[real].max() <= TOL

    with torch.no_grad():
        for i, mixer in enumerate(_gdn(ours)):
            mixer.reverse_gate.copy_(torch.tensor([0.25, -0.5, 0.75, 1.0]) + i)
    out = save_model(ours, tmp_path / "ours")
    extra = _reverse_gate_keys(ours)
    assert len(extra) == 3
    keys = set(checkpoint_keys(out))
    assert keys == set(checkpoint_keys(tmp_path / "hf")) | extra
    if moe:  # the hub layout: one tensor per expert, not our fused [E, ...] ones
        assert "model.layers.0.mlp.experts.5.gate_proj.weight" in keys
        assert not any(k.endswith(("experts.gate_up_proj", "experts.down_proj")) for k in keys)

    back, info = transformers.AutoModelForCausalLM.from_pretrained(
        out, attn_implementation="eager", output_loading_info=True)
    assert type(back) is type(hf)
    assert set(info["unexpected_keys"]) == extra and not info["missing_keys"] and not info["mismatched_keys"]
    with torch.no_grad():
        assert (back.eval()(input_ids=ids, attention_mask=mask).logits - ref).abs()[real].max() <= TOL

    again = load_model(out)
    a, b = ours.state_dict(), again.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert again.model.layers[2].linear_attn.reverse_gate.tolist() == [2.25, 1.5, 2.75, 3.0]


def _vl_checkpoint(path, moe, **text_overrides):
    """A tiny transformers Qwen3_5[Moe]ForConditionalGeneration (1-block vision tower) saved to
    `path`, plus fake multi-token-prediction weights (mtp.*) in its safetensors, as the hub has."""
    text = tiny_qwen3_5_config(moe=moe, **VARIANTS["custom_order"], **text_overrides).to_dict()
    vision = dict(depth=1, hidden_size=16, intermediate_size=24, num_heads=2, out_hidden_size=text["hidden_size"],
                  patch_size=4, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16)
    name = "Qwen3_5Moe" if moe else "Qwen3_5"
    cfg = getattr(transformers, f"{name}Config")(text_config=text, vision_config=vision, tie_word_embeddings=False)
    torch.manual_seed(0)
    extra = {"experts_implementation": "eager"} if moe else {}
    vl = getattr(transformers, f"{name}ForConditionalGeneration")._from_config(
        cfg, attn_implementation="eager", **extra).eval()
    randomize_qwen3_5(vl, seed=4)
    vl.save_pretrained(path)
    file = path / "model.safetensors"
    sd = load_file(file)
    sd["mtp.fc.weight"] = torch.randn(8, 8)
    sd["mtp.norm.weight"] = torch.randn(8)
    save_file(sd, file, metadata={"format": "pt"})
    return vl


@pytest.mark.parametrize("moe", [False, True])
def test_vision_language_checkpoint_loads_its_text_model(tmp_path, moe, caplog):
    vl = _vl_checkpoint(tmp_path, moe)
    with caplog.at_level(logging.INFO, logger="veomni"):
        ours = load_model(tmp_path)
    assert type(ours).__name__ == ("Qwen3_5MoeForCausalLM" if moe else "Qwen3_5ForCausalLM")
    assert ours.config.model_type == ("qwen3_5_moe_text" if moe else "qwen3_5_text")
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(skipped) == 1 and "mtp." in skipped[0] and "model.visual." in skipped[0], skipped
    n_visual = sum(1 for k in load_file(tmp_path / "model.safetensors") if k.startswith("model.visual."))
    assert f"{n_visual} x model.visual.*" in skipped[0] and "2 x mtp.*" in skipped[0], skipped[0]

    ids = _ids(seed=2, bsz=2, slen=13)
    mask = torch.ones_like(ids)
    mask[1, -4:] = 0
    real = mask.bool()
    with torch.no_grad():
        ref = vl(input_ids=ids, attention_mask=mask).logits  # text only, no images
        out = ours(input_ids=ids, attention_mask=mask, attn_mode="causal").logits
    assert ref[real].std() > 0.5
    assert (ref - out).abs()[real].max() <= TOL


def _check_parity():
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import check_parity
    finally:
        sys.path.pop(0)
    return check_parity


@pytest.mark.parametrize("kind", ["text", "vision_language"])
def test_check_parity_script(tmp_path, capsys, kind):
    if kind == "text":
        hf, _ = build_qwen3_5_pair(**VARIANTS["custom_order"])
        hf.save_pretrained(tmp_path)
    else:
        _vl_checkpoint(tmp_path, moe=False)
    assert _check_parity().main(["--model_path", str(tmp_path), "--seq_len", "20"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("max_abs_diff=") and float(last.split("=")[1]) <= TOL


# ---- 5. init --------------------------------------------------------------------------------------

@pytest.mark.parametrize("moe", [False, True])
def test_init_weights(moe):
    from veomni.models.transformers.gated_deltanet import GatedDeltaNet, GatedRMSNorm
    from veomni.models.transformers.qwen3_5.modeling_qwen3_5 import ZeroCenteredRMSNorm

    cfg = tiny_qwen3_5_config(moe=moe, **VARIANTS["custom_order"])
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(7.0)  # nothing may keep a stale value
    torch.manual_seed(0)
    model.init_weights()
    zc = [m for m in model.modules() if isinstance(m, ZeroCenteredRMSNorm)]
    # 2 per layer + final norm + q/k norms of the 2 attention layers
    assert len(zc) == 2 * 4 + 1 + 2 * 2 and all(not m.weight.any() for m in zc)
    gated = [m for m in model.modules() if isinstance(m, GatedRMSNorm)]
    assert len(gated) == 2 and all((m.weight == 1).all() for m in gated)
    gdn = [m for m in model.modules() if isinstance(m, GatedDeltaNet)]
    assert len(gdn) == 2
    for m in gdn:
        assert not m.reverse_gate.any()
        assert (m.dt_bias == 1).all()
        assert (m.A_log >= math.log(0.01) - 1e-6).all() and (m.A_log <= math.log(16) + 1e-6).all()
        assert m.A_log.unique().numel() == m.A_log.numel()  # random, not a constant
        assert (m.conv1d.weight != 7).all()
    std = cfg.initializer_range
    for name, p in model.named_parameters():
        if p.dim() >= 2:  # every matrix (projections, conv, embeddings, router, fused experts) ~ N(0, 0.02)
            assert p.abs().max() < 10 * std and 0.5 * std < p.std() < 1.5 * std, name
    assert model.model.norm.weight.abs().sum() == 0
    ids = _ids(slen=10)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids, attn_mode="bidirectional").logits).all()
