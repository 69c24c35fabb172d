"""Our p2 and factor samplers against small transcriptions of the reference projects' own loops.

The reference functions below are labelled transcriptions, kept as close to the original control
flow as the test allows, so that a comparison checks behaviour (tokens, forward counts, commit
sets), not our reading of the papers:
  * Open-dLLM (github.com/pengzhangzhi/Open-dLLM), veomni/models/transformers/qwen2/
    generation_utils.py, `_mdm_sample` branch `alg == "p2"` and `sample_tokens`;
  * Fast-dLLM (github.com/NVlabs/Fast-dLLM), llada/generate.py, `generate` (no cache) and
    `get_transfer_index_dynamic` (the `factor` rule).
Both run on a tiny random float64 model whose MASK logit is -inf: our samplers never propose MASK
(docs/inference.md), the references do, so the comparison is made where that cannot matter.
Left out of the Open-dLLM transcription: its attention mask `x != pad_token_id`, which also hides
generated tokens equal to the pad id (the EOS, for models whose pad is their EOS). That is how it
calls the model for every alg, not part of p2; our samplers attend to every generated token.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from tests.inference.helpers import MASK, tiny_dllm
from veomni.diffusion.sampling import diffusion_generate
from veomni.diffusion.sampling.p2 import p2_remask_count
from veomni.diffusion.sampling.parallel import factor_count, select_factor


class NoMaskModel(nn.Module):
    """A tiny dLLM whose MASK logit is -inf, counting its forwards."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.config, self.calls = inner, inner.config, 0

    def forward(self, input_ids, **kw):
        self.calls += 1
        out = self.inner(input_ids, **kw)
        out.logits[..., MASK] = -math.inf
        return out

    def full_logits(self, x):
        """The reference's call: the whole row, bidirectional, no padding."""
        return self(x, attn_mode="bidirectional").logits


def _prompt(bsz, plen, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, MASK - 1, (bsz, plen), generator=g)


# ---- Open-dLLM p2 (transcription) ---------------------------------------------------------------
def opendllm_sample_tokens(logits, temperature=0.0):
    """Open-dLLM `sample_tokens` for alg p2 without top_p/top_k: greedy branch."""
    assert temperature == 0
    probs = torch.softmax(logits.float(), dim=-1)
    _, x0 = probs.max(dim=-1)
    confidence = torch.gather(probs, -1, x0.unsqueeze(-1)).squeeze(-1)
    return confidence, x0


def opendllm_p2(model, x, steps, sample=opendllm_sample_tokens):
    """Open-dLLM `_mdm_sample`, alg == 'p2' (x = prompt + masks, no padding). Returns (x, forwards)."""
    x = x.clone()
    fix_mask = x != MASK
    forwards = 0
    for i in range(steps):
        mask_index = x == MASK
        if not mask_index.any():
            break
        logits = model.full_logits(x)
        forwards += 1
        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        kappa_t = (i + 1) / steps
        conf_full, x0_full = sample(logits)
        full_conf = conf_full.clone()
        full_conf[fix_mask] = float("inf")
        full_conf = torch.where(torch.isfinite(full_conf), full_conf, torch.full_like(full_conf, float("inf")))
        num_positions = (~fix_mask).sum(dim=1)
        num_to_mask = (num_positions.float() * (1.0 - kappa_t)).floor().to(torch.long)
        num_to_mask = torch.minimum(num_to_mask.clamp_min(0), num_positions)
        sorted_idx = torch.argsort(full_conf, dim=1, descending=False)
        to_mask = torch.zeros_like(x, dtype=torch.bool)
        max_k = int(num_to_mask.max().item())
        if max_k > 0:
            topk_idx = sorted_idx[:, :max_k]
            row_mask = torch.arange(max_k).unsqueeze(0) < num_to_mask.unsqueeze(1)
            batch_arange = torch.arange(x.size(0)).unsqueeze(1).expand_as(topk_idx)
            to_mask[batch_arange[row_mask], topk_idx[row_mask]] = True
        x[to_mask] = MASK
        keep_unmask = mask_index & (~to_mask)
        x[keep_unmask] = x0_full[keep_unmask]
    return x, forwards


def _tiny(seed=0):
    return NoMaskModel(tiny_dllm(seed=seed)).cpu()


@pytest.mark.parametrize("bsz, plen, n, steps", [
    (1, 5, 8, 4), (2, 5, 8, 8), (1, 3, 6, 16), (2, 7, 10, 3), (1, 4, 100, 100),
])
def test_p2_greedy_equals_opendllm(bsz, plen, n, steps):
    model = _tiny()
    prompt = _prompt(bsz, plen, seed=n + steps)
    x = torch.cat([prompt, torch.full((bsz, n), MASK)], dim=1)
    want, want_forwards = opendllm_p2(model, x, steps)
    model.calls = 0
    out = diffusion_generate(model, prompt, alg="p2", max_new_tokens=n, steps=steps, temperature=0.0)
    assert out.sequences.tolist() == want.tolist()
    assert out.stats["nfe"] == want_forwards == model.calls
    if steps > n:
        assert want_forwards < steps  # the reference stops once nothing is masked


def test_p2_count_uses_opendllm_float32_rounding():
    # The exact floor(100 * 60 / 100) is 60 at i = 39; at i = 40 it is 59, Open-dLLM's float32 58.
    ref = lambda i, steps, n: int((torch.tensor([n]).float() * (1.0 - (i + 1) / steps)).floor())  # noqa: E731
    assert p2_remask_count(40, 100, 100) == 58 == ref(40, 100, 100)
    for steps, n in ((100, 100), (40, 200), (25, 300), (7, 13), (128, 128), (8, 64)):
        assert [p2_remask_count(i, steps, n) for i in range(steps)] == [ref(i, steps, n) for i in range(steps)]


def _gumbel_sampler(bsz, g0, temperature, seed):
    """A stand-in for Open-dLLM's Categorical draw (global RNG) that is equal in law and uses the
    same per-row noise stream as our sampler (one generator per row, seeded seed + row, one
    float64 Gumbel [n, V] draw per step over the generated positions), so both loops see the same
    sample and any difference comes from what the loop does with it."""
    gens = [torch.Generator().manual_seed(seed + b) for b in range(bsz)]

    def sample(logits):
        z = logits[:, g0:].double() / temperature
        noise = []
        for b in range(bsz):
            u = torch.rand(z.shape[1:], generator=gens[b], dtype=torch.float64)
            noise.append(-torch.log(-torch.log(u.clamp_min(1e-300))))
        x0 = (z + torch.stack(noise)).argmax(-1)
        conf = torch.softmax(z, -1).gather(-1, x0[..., None])[..., 0]
        pad = lambda t, v: torch.cat([torch.full((bsz, g0), v, dtype=t.dtype), t], 1)  # noqa: E731
        return pad(conf, 1.0), pad(x0, MASK)
    return sample


@pytest.mark.parametrize("bsz, plen, n, steps, temperature", [(1, 5, 8, 4, 0.8), (2, 4, 12, 6, 1.5)])
def test_p2_sampled_equals_opendllm_with_the_same_draws(bsz, plen, n, steps, temperature):
    model = _tiny(seed=1)
    prompt = _prompt(bsz, plen, seed=3)
    x = torch.cat([prompt, torch.full((bsz, n), MASK)], dim=1)
    want, want_forwards = opendllm_p2(model, x, steps, _gumbel_sampler(bsz, plen, temperature, seed=11))
    out = diffusion_generate(model, prompt, alg="p2", max_new_tokens=n, steps=steps, temperature=temperature,
                             seed=11)
    assert out.sequences.tolist() == want.tolist()
    assert out.stats["nfe"] == want_forwards


# ---- Fast-dLLM factor (transcription) -----------------------------------------------------------
def fastdllm_factor_select(confidence, mask_index, factor):
    """The selection part of Fast-dLLM `get_transfer_index_dynamic` -> transfer_index [B, L]."""
    transfer_index = torch.zeros_like(confidence, dtype=torch.bool)
    num_transfer_tokens = mask_index.sum(dim=1, keepdim=True)
    for j in range(confidence.shape[0]):
        ns = list(range(1, num_transfer_tokens[j] + 1))
        es = [factor / (n + 1) for n in ns]
        threshs = [1 - e for e in es]
        threshs[0] = -1
        sorted_conf = torch.sort(confidence[j][mask_index[j]], dim=-1, descending=True)[0]
        assert len(sorted_conf) == len(threshs)
        for top_i in range(len(threshs)):
            if sorted_conf[top_i] < threshs[top_i]:
                break
        if top_i == 0 or top_i == len(threshs) - 1:
            top_i += 1
        _, select_index = torch.topk(confidence[j], k=top_i)
        transfer_index[j, select_index] = True
    return transfer_index


def strict_factor_count(confidence, mask_index, factor):
    """The strict reading: only the leading candidates with c_n >= 1 - f / (n + 1), at least one."""
    counts = []
    for j in range(confidence.shape[0]):
        c = torch.sort(confidence[j][mask_index[j]], descending=True)[0].tolist()
        k = next((i for i in range(1, len(c)) if c[i] < 1 - factor / (i + 2)), len(c))
        counts.append(max(1, k))
    return counts


def _random_confidences(seed, rows=64, width=12):
    """Confidence rows like the sampler's: -inf where not masked, values in (0, 1) drawn from a mix
    of flat and peaked laws, and some entries placed exactly on a factor threshold."""
    g = torch.Generator().manual_seed(seed)
    conf = torch.rand(rows, width, generator=g, dtype=torch.float64)
    peaked = torch.rand(rows, 1, generator=g) < 0.5
    conf = torch.where(peaked, 1 - conf.pow(4) * 0.5, conf)
    mask = torch.rand(rows, width, generator=g) < torch.rand(rows, 1, generator=g).clamp_min(0.1)
    mask[torch.arange(rows), torch.randint(0, width, (rows,), generator=g)] = True  # >= 1 masked
    return conf, mask


@pytest.mark.parametrize("factor", [0.5, 1.0, 2.0, 3.0])
def test_factor_equals_fastdllm_on_random_confidences(factor):
    for seed in range(8):
        conf, mask = _random_confidences(seed)
        # Put some entries exactly on a threshold 1 - f/(n+1) as Python computes it, or one ulp
        # either side: the comparison (>=) and the threshold's rounding must both be Fast-dLLM's.
        g = torch.Generator().manual_seed(100 + seed)
        on = torch.rand(conf.shape, generator=g) < 0.3
        n = torch.randint(1, 8, conf.shape, generator=g)
        thresh = torch.tensor([0.0] + [1 - factor / (k + 1) for k in range(1, 8)], dtype=torch.float64)[n]
        ulp = torch.randint(-1, 2, conf.shape, generator=g)
        thresh = torch.where(ulp > 0, torch.nextafter(thresh, torch.ones_like(thresh)), thresh)
        thresh = torch.where(ulp < 0, torch.nextafter(thresh, torch.zeros_like(thresh)), thresh)
        conf = torch.where(on & (thresh > 0), thresh, conf)
        scores = conf.masked_fill(~mask, -math.inf)
        want = fastdllm_factor_select(scores, mask, factor)
        got = select_factor(scores, factor)
        assert factor_count(scores, factor).tolist() == want.sum(1).tolist()
        distinct = [len(set(r[m].tolist())) == int(m.sum()) for r, m in zip(conf, mask)]
        for j in range(conf.shape[0]):
            if distinct[j]:  # with ties at the boundary either position is a valid top-k
                assert got[j].tolist() == want[j].tolist()
        assert factor_count(scores, factor, strict=True).tolist() == strict_factor_count(scores, mask, factor)


def test_factor_differs_from_strict_only_when_only_the_last_fails():
    conf, mask = _random_confidences(99, rows=256)
    scores = conf.masked_fill(~mask, -math.inf)
    loose, strict = factor_count(scores, 1.0), factor_count(scores, 1.0, strict=True)
    differ = loose != strict
    assert differ.any() and (loose[differ] == mask.sum(1)[differ]).all()
    assert (strict[differ] == loose[differ] - 1).all()


def fastdllm_generate_factor(model, prompt, gen_length, block_length, factor):
    """Fast-dLLM `generate` (no cache, greedy, remasking='low_confidence') with `factor`."""
    x = torch.full((prompt.shape[0], prompt.shape[1] + gen_length), MASK, dtype=torch.long)
    x[:, : prompt.shape[1]] = prompt.clone()
    assert gen_length % block_length == 0
    nfe = 0
    for num_block in range(gen_length // block_length):
        start = prompt.shape[1] + num_block * block_length
        end = start + block_length
        while True:
            nfe += 1
            mask_index = x == MASK
            logits = model.full_logits(x)
            mask_index[:, end:] = 0
            x0 = torch.argmax(logits, dim=-1)
            p = torch.softmax(logits.to(torch.float64), dim=-1)
            x0_p = torch.squeeze(torch.gather(p, dim=-1, index=torch.unsqueeze(x0, -1)), -1)
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, -math.inf)
            transfer_index = fastdllm_factor_select(confidence, mask_index, factor)
            x[transfer_index] = x0[transfer_index]
            if (x[:, start:end] == MASK).sum() == 0:
                break
    return x, nfe


@pytest.mark.parametrize("factor, n, block", [(1.0, 16, 8), (3.0, 16, 4), (6.0, 12, 12)])
def test_factor_generation_equals_fastdllm(factor, n, block):
    model = NoMaskModel(tiny_dllm(seed=2, shift=False)).cpu()
    prompt = _prompt(1, 6, seed=5)
    want, want_nfe = fastdllm_generate_factor(model, prompt, n, block, factor)
    out = diffusion_generate(model, prompt, alg="factor", factor=factor, max_new_tokens=n, block_length=block,
                             logit_shift=False)
    assert out.sequences.tolist() == want.tolist()
    assert out.stats["nfe"] == want_nfe
    assert out.stats["nfe"] < n  # the rule committed several tokens in some step


def test_factor_strict_is_a_config_field():
    from veomni.diffusion.sampling import GenerationConfig

    assert GenerationConfig(alg="factor", mask_token_id=MASK).resolve().factor_strict is False
    assert GenerationConfig(alg="threshold", mask_token_id=MASK, factor_strict=False).resolve().factor_strict is None
    with pytest.raises(ValueError, match="factor_strict"):
        GenerationConfig(alg="threshold", mask_token_id=MASK, factor_strict=True).resolve()
