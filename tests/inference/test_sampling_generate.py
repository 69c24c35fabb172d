"""End-to-end sampling on a tiny random dLLM: determinism, batch == one-by-one, cache exactness,
NFE accounting, EOS trimming, infilling."""
import pytest
import torch

from tests.inference.helpers import MASK, prompts, tiny_dllm
from veomni.diffusion.sampling import decode_trimmed, diffusion_generate, infill, trim_after_eos
from veomni.diffusion.sampling.engine import DecodeState

N = 16
SEEDS = [11, 12, 13]
_MODELS = {}


def model_for(attn_mode="bidirectional", shift=True, std=0.3, family="llama"):
    key = (attn_mode, shift, std, family)
    if key not in _MODELS:
        _MODELS[key] = tiny_dllm(attn_mode, 4 if attn_mode == "block_causal" else None, shift=shift, std=std,
                                 family=family)
    return _MODELS[key]


def run(model, ids, mask, **kw):
    """diffusion_generate with a forward hook: NFE must equal the number of model calls."""
    calls = []
    handle = model.register_forward_hook(lambda mod, args, kwargs, out: calls.append(kwargs["position_ids"].shape[1]),
                                         with_kwargs=True)
    try:
        out = diffusion_generate(model, ids, attention_mask=mask, **{"max_new_tokens": N, **kw})
    finally:
        handle.remove()
    assert out.stats["nfe"] == len(calls) > 0
    out.stats["query_tokens"] = sum(calls)
    out.sequences = out.sequences.cpu()
    return out


MB = dict(alg="multi_block", block_length=4, entropy_threshold=3.0, block_add_threshold=0.25,
          decoded_token_threshold=0.5)
CASES = {
    "origin": ("bidirectional", dict(alg="origin")),
    "maskgit_plus": ("bidirectional", dict(alg="maskgit_plus")),
    "topk_margin": ("bidirectional", dict(alg="topk_margin", steps=8)),
    "entropy_exact": ("bidirectional", dict(alg="entropy", steps=8, exact_step_counts=True)),
    "alg_temp": ("bidirectional", dict(alg="maskgit_plus", steps=8, alg_temp=0.5)),
    "p2": ("bidirectional", dict(alg="p2", steps=8)),
    "low_confidence": ("bidirectional", dict(alg="low_confidence", block_length=4, steps=8)),
    "low_confidence_noshift": ("bidirectional/noshift", dict(alg="low_confidence", block_length=4, steps=8)),
    "random": ("bidirectional", dict(alg="random", block_length=8, steps=8)),
    "llada_cfg": ("bidirectional", dict(alg="low_confidence", block_length=8, steps=8, cfg_scale=1.5)),
    "threshold": ("bidirectional", dict(alg="threshold", threshold=0.3, block_length=4)),
    "factor": ("bidirectional", dict(alg="factor", factor=2.0, block_length=4)),
    "multi_block": ("bidirectional", MB),
    "sampled": ("bidirectional", dict(alg="maskgit_plus", steps=8, temperature=0.8, top_p=0.9, top_k=20)),
    # caches: approximate for bidirectional models, but a row's cache must not depend on its batch
    "threshold_prefix": ("bidirectional", dict(alg="threshold", threshold=0.3, block_length=4, use_cache="prefix")),
    "threshold_dual": ("bidirectional", dict(alg="threshold", threshold=0.3, block_length=4, use_cache="dual")),
    "factor_dual_sampled": ("bidirectional", dict(alg="factor", factor=2.0, block_length=4, use_cache="dual",
                                                  temperature=1.0)),
    "llada_dual_cfg": ("bidirectional", dict(alg="low_confidence", block_length=4, steps=8, use_cache="dual",
                                             cfg_scale=1.0)),
    "multi_block_prefix": ("bidirectional", dict(MB, use_cache="prefix")),
    "bc_maskgit": ("block_causal", dict(alg="maskgit_plus", steps=8)),
    "bc_threshold_block": ("block_causal", dict(alg="threshold", threshold=0.3, use_cache="block")),
    "bc_llada_block": ("block_causal", dict(alg="low_confidence", steps=8, use_cache="block")),
    "bc_multi_block_block": ("block_causal", dict(MB, use_cache="block")),
    "hybrid_maskgit": ("bidirectional/hybrid", dict(alg="maskgit_plus", steps=8)),
    "hybrid_dual": ("bidirectional/hybrid", dict(alg="threshold", threshold=0.3, block_length=4, use_cache="dual")),
    "hybrid_bc_block": ("block_causal/hybrid", dict(alg="threshold", threshold=0.3, use_cache="block")),
}


def _model(kind):
    mode, _, flag = kind.partition("/")
    if flag == "hybrid":  # Qwen3.5: GDN layers with a recurrent-state cache
        return model_for(mode, family="qwen3_5")
    return model_for(mode, shift=flag != "noshift")


@pytest.mark.parametrize("case", sorted(CASES))
def test_batched_equals_one_by_one(case):
    kind, kw = CASES[case]
    model = _model(kind)
    ids, mask, rows = prompts()
    p = ids.shape[1]
    batched = run(model, ids, mask, seed=SEEDS, **kw)
    again = run(model, ids, mask, seed=SEEDS, **kw)
    assert torch.equal(batched.sequences, again.sequences), "not deterministic"
    assert torch.equal(batched.sequences[:, :p], ids), "prompt changed"
    assert not (batched.sequences == MASK).any(), "a mask remains"
    assert batched.sequences.shape == (3, p + N)
    for b, row in enumerate(rows):
        single = run(model, row, None, seed=[SEEDS[b]], **kw)
        assert single.sequences[0, len(row):].tolist() == batched.sequences[b, p:].tolist(), f"row {b}"


EXACT = [  # (attn_mode, case kwargs, cache): the cache cannot change any logit for these models
    *[("block_causal", dict(alg=a, **k), c)
      for a, k in (("threshold", dict(threshold=0.3)), ("factor", dict(factor=2.0)),
                   ("low_confidence", dict(steps=8)), ("random", dict(steps=8)))
      for c in ("prefix", "dual", "block")],
    ("block_causal", dict(MB), "block"), ("block_causal", dict(MB), "prefix"),
    ("block_causal", dict(alg="threshold", threshold=0.3, cfg_scale=1.0), "block"),
    ("block_causal/noshift", dict(alg="threshold", threshold=0.3), "block"),
    ("block_causal", dict(alg="threshold", threshold=0.3, block_length=2), "block"),  # sub-blocks
    *[("causal", dict(alg=a, block_length=4, **k), c)
      for a, k in (("threshold", dict(threshold=0.3)), ("low_confidence", dict(steps=8))) for c in ("prefix", "dual")],
    ("causal", dict(MB), "prefix"),
    # Qwen3.5 hybrid: GDN layers cache their inputs and recurrent-state snapshots.
    ("block_causal/hybrid", dict(alg="threshold", threshold=0.3), "block"),
    ("block_causal/hybrid", dict(alg="low_confidence", steps=8), "prefix"),
    ("block_causal/hybrid", dict(MB), "block"),
    ("causal/hybrid", dict(alg="threshold", threshold=0.3, block_length=4), "dual"),
]


@pytest.mark.parametrize("kind, kw, cache", EXACT,
                         ids=[f"{k}-{kw['alg']}-{c}-{i}" for i, (k, kw, c) in enumerate(EXACT)])
def test_cache_is_exact_for_causal_and_block_causal(kind, kw, cache):
    model = _model(kind)
    ids, mask, _ = prompts()
    ref = run(model, ids, mask, seed=SEEDS, **kw)
    got = run(model, ids, mask, seed=SEEDS, use_cache=cache, **kw)
    assert torch.equal(ref.sequences, got.sequences)
    assert got.stats["nfe"] == ref.stats["nfe"]
    # The cache skips work. (In a batch, rows refresh on their own schedule, so the forwarded
    # union can be the whole row: compare on one row.)
    _, _, rows = prompts()
    one = [run(model, rows[0], None, seed=SEEDS[:1], use_cache=c, **kw).stats["query_tokens"] for c in ("none", cache)]
    assert one[1] < one[0]


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_bidirectional_cache_error_is_bounded(cache, monkeypatch):
    """Bidirectional prefix/dual caches are approximate. Stated bound, on a smooth tiny model
    (weights std 0.05): refresh steps (first step of a block) are exact, and every other step's
    probabilities differ from an uncached forward of the same state by at most 1e-2."""
    model = model_for("bidirectional", std=0.05)
    errors = []
    original = DecodeState.logits

    def checked(self, start, end, lo=None, hi=None, present=None):
        out = original(self, start, end, lo, hi, present)
        cache_obj, nfe = self.cache, self.nfe
        self.cache = None
        ref = original(self, start, end, None, None, present)
        self.cache, self.nfe = cache_obj, nfe
        errors.append(float((out.softmax(-1) - ref.softmax(-1)).abs().max()))
        return out
    monkeypatch.setattr(DecodeState, "logits", checked)
    _, _, rows = prompts()
    out = diffusion_generate(model, rows[0], alg="threshold", threshold=0.3, block_length=4, max_new_tokens=N,
                             use_cache=cache, output_history=True)
    p = len(rows[0])
    states = [torch.cat([rows[0], torch.full((N,), MASK)])[None]] + out.history[:-1]
    blocks = [int((h[0, p:] == MASK).nonzero()[0]) // 4 for h in states]
    refresh = [i == 0 or blocks[i] != blocks[i - 1] for i in range(len(blocks))]
    assert sum(refresh) == N // 4 and len(errors) == len(refresh)
    assert all(e < 1e-12 for e, r in zip(errors, refresh) if r)
    assert max(errors) < 1e-2 and max(errors) > 0  # > 0: the cache really was used


EOS_CASES = ["maskgit_plus", "entropy_exact", "p2", "low_confidence", "threshold_dual", "factor",
             "bc_multi_block_block", "origin"]


@pytest.mark.parametrize("case", EOS_CASES)
def test_eos_trimming_and_early_stop(case):
    kind, kw = CASES[case]
    model = _model(kind)
    ids, mask, _ = prompts()
    p = ids.shape[1]
    free = run(model, ids, mask, seed=SEEDS, **kw)
    eos = int(free.sequences[0, p + 5])
    stopped = run(model, ids, mask, seed=SEEDS, eos_token_id=eos, **kw)
    expected = trim_after_eos(free.sequences[:, p:], eos, pad_token_id=0)
    assert torch.equal(stopped.sequences[:, p:], expected)
    first = int((expected[0] == eos).nonzero()[0])
    assert (stopped.sequences[0, p + first + 1:] == 0).all() and first <= 5
    assert stopped.stats["nfe"] <= free.stats["nfe"]
    assert stopped.stats["new_tokens"] == sum(
        int((r == eos).nonzero()[0]) + 1 if (r == eos).any() else N for r in expected)


class _Tok:
    def decode(self, ids, skip_special_tokens=True):
        return " ".join(f"t{i}" for i in ids)


def test_decode_trimmed_cuts_eos_and_stop_strings():
    seq = torch.tensor([[1, 2, 5, 6, 7, 9, 8], [1, 2, 5, 9, 0, 0, 0]])
    out = decode_trimmed(_Tok(), seq, prompt_len=2, eos_token_id=9)
    assert out == ["t5 t6 t7", "t5"]
    assert decode_trimmed(_Tok(), seq, prompt_len=2, eos_token_id=9, stop_strings=[" t7", "t6"]) == ["t5 ", "t5"]
    model = model_for()
    gen = diffusion_generate(model, torch.tensor([[3, 4, 5]]), max_new_tokens=4, steps=4, stop_strings=["t"])
    assert decode_trimmed(_Tok(), gen) == [""]  # stop strings recorded in the output's config


@pytest.mark.parametrize("kw", [dict(alg="entropy", steps=6), dict(alg="threshold", threshold=0.3, block_length=3,
                                                                      use_cache="dual"),
                                dict(MB, block_length=3)])
def test_infill_batched_and_uses_suffix(kw):
    model = model_for()
    pre, pre_mask, pre_rows = prompts(seed=2, lens=(5, 3))
    suf, suf_mask, _ = prompts(seed=3, lens=(4, 2))
    suf, suf_mask = suf.flip(1), suf_mask.flip(1)  # right-padded suffixes
    out = infill(model, pre, suf, 6, prefix_attention_mask=pre_mask, suffix_attention_mask=suf_mask, **kw)
    out.middle, out.sequences = out.middle.cpu(), out.sequences.cpu()
    assert out.middle.shape == (2, 6) and not (out.middle == MASK).any()
    assert torch.equal(out.sequences[:, :5], pre) and torch.equal(out.sequences[:, 11:], suf)
    for b in range(2):
        suf_b = suf[b][suf_mask[b].bool()]
        single = infill(model, pre_rows[b], suf_b, 6, **kw)
        assert torch.equal(single.middle[0].cpu(), out.middle[b])
    other = infill(model, pre_rows[0], (suf[0][:4] + 7) % 90, 6, **kw)
    assert not torch.equal(other.middle[0].cpu(), out.middle[0])  # the suffix is seen


def test_step_callback_matches_history_and_greedy_leaves_global_rng():
    model = model_for()
    ids, mask, _ = prompts()
    seen = []
    rng = torch.get_rng_state()
    out = diffusion_generate(model, ids, attention_mask=mask, max_new_tokens=8, steps=4, alg="entropy",
                             output_history=True, step_callback=lambda i, x: seen.append((i, x.cpu().clone())))
    assert torch.equal(torch.get_rng_state(), rng)  # greedy draws nothing
    assert [i for i, _ in seen] == [1, 2, 3, 4] == [i + 1 for i in range(len(out.history))]
    assert all(torch.equal(x, h) for (_, x), h in zip(seen, out.history))
    assert int((out.history[0] == MASK).sum()) > int((out.history[-1] == MASK).sum()) == 0
