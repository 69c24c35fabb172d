"""Likelihood: the stratified MC ELBO is unbiased, never masks the prompt; ar_loglik is exact;
the elbo.py CLI and the lm-eval adapter run on a tiny model."""
from __future__ import annotations

import itertools
import json
import math
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from tests.eval.conftest import REPO_ROOT
from tests.eval.test_generation_scripts import make_tiny_dllm
from tests.models.tiny import VOCAB, tiny_config
from veomni.eval.likelihood import ar_loglik, block_elbo, mc_elbo, stratified_mask_counts

MASK = VOCAB - 1  # any id serves as the mask for these checks


@pytest.fixture(scope="module")
def tiny_model():
    from veomni.models.registry import build_model

    torch.manual_seed(0)
    model = build_model(tiny_config("llama")).eval()
    model.init_weights()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.2)
    return model


def exact_bound(model, prompt, target, logit_shift):
    """E_{m ~ U{1..T}} E_{|S| = m} [(T/m) sum_{i in S} CE_i], by enumerating every mask subset."""
    P, T = len(prompt), len(target)
    seq = torch.tensor(prompt + target)
    total = 0.0
    for m in range(1, T + 1):
        subsets = list(itertools.combinations(range(T), m))
        x = seq.repeat(len(subsets), 1)
        for r, S in enumerate(subsets):
            x[r, [P + i for i in S]] = MASK
        with torch.no_grad():
            logits = model(x, attn_mode="bidirectional").logits
        logits = logits[:, P - 1:-1] if logit_shift else logits[:, P:]
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), seq[P:].repeat(len(subsets)),
                             reduction="none").view(len(subsets), T)
        masked = torch.zeros(len(subsets), T)
        for r, S in enumerate(subsets):
            masked[r, list(S)] = 1
        total += float((ce * masked).sum(1).mean()) * T / m / T
    return total


@pytest.mark.parametrize("logit_shift", [True, False])
def test_mc_elbo_is_unbiased(tiny_model, logit_shift):
    prompt, target = [3, 14, 15], [92, 65, 35, 8]
    exact = exact_bound(tiny_model, prompt, target, logit_shift)
    r = mc_elbo(tiny_model, prompt, target, mc_num=2048, batch_size=512, mask_id=MASK,
                logit_shift=logit_shift, generator=torch.Generator().manual_seed(0), attn_mode="bidirectional")
    assert abs(r["nll"] - exact) < max(4 * r["stderr"], 0.02 * exact), (r, exact)
    assert r["elbo"] == -r["nll"] and r["n_tokens"] == 4
    assert math.isclose(r["ppl_bound"], math.exp(r["nll"] / 4))


def exact_block_bound(model, prompt, target, block_size, logit_shift):
    """The block-diffusion bound by enumeration: every block draws m ~ U{1..T_b} and a uniform subset
    of that size, independently; the expectation of sum_b (T_b/m_b) sum_{i in S_b} CE_i over all
    joint draws, each scored on the two-stream row [x_t ; x_0]."""
    P, T = len(prompt), len(target)
    seq = torch.tensor(prompt + target)
    n = P + T
    blocks = {}
    for i in range(T):
        blocks.setdefault((P + i) // block_size, []).append(i)
    choices = []  # per block: (probability, subset, weight)
    for idx in blocks.values():
        tb = len(idx)
        opts = []
        for m in range(1, tb + 1):
            subsets = list(itertools.combinations(idx, m))
            opts += [(1.0 / tb / len(subsets), S, tb / m) for S in subsets]
        choices.append(opts)
    total = 0.0
    pos = torch.arange(n).repeat(2)[None]
    clean = torch.cat([torch.zeros(n, dtype=torch.bool), torch.ones(n, dtype=torch.bool)])[None]
    for combo in itertools.product(*choices):
        prob = math.prod(c[0] for c in combo)
        noisy = seq.clone()
        for _, S, _ in combo:
            noisy[[P + i for i in S]] = MASK
        with torch.no_grad():
            logits = model(torch.cat([noisy, seq])[None], position_ids=pos, clean_stream=clean,
                           attn_mode="block_causal", block_size=block_size).logits[0, :n]
        est = 0.0
        for _, S, w in combo:
            for i in S:
                row = P + i - 1 if logit_shift else P + i
                est += w * float(F.cross_entropy(logits[row][None], seq[P + i][None]))
        total += prob * est
    return total


@pytest.mark.parametrize("logit_shift", [True, False])
def test_block_elbo_is_unbiased(tiny_model, logit_shift):
    prompt, target = [3, 14, 15], [92, 65, 35, 8, 2]  # blocks of 2: the first target token shares the prompt's
    exact = exact_block_bound(tiny_model, prompt, target, 2, logit_shift)
    r = block_elbo(tiny_model, prompt, target, block_size=2, mc_num=2048, batch_size=512, mask_id=MASK,
                   logit_shift=logit_shift, generator=torch.Generator().manual_seed(0))
    assert abs(r["nll"] - exact) < max(4 * r["stderr"], 0.02 * exact), (r, exact)


def test_stratified_counts_are_uniform_per_copy():
    T, b = 5, 7
    for j in range(b):
        seen = sorted(stratified_mask_counts(k, T, b)[j] for k in range(1, T + 1))
        assert seen == list(range(1, T + 1))  # over k ~ U{1..T}, copy j's count is uniform on 1..T
    assert stratified_mask_counts(1, 8, 4) == [1, 3, 5, 7]  # evenly spread across the copies


def test_mc_elbo_never_masks_the_prompt(tiny_model):
    calls = []

    class Spy(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.config = inner, SimpleNamespace(mask_token_id=MASK, dllm_logit_shift=True)

        def forward(self, x, **kw):
            calls.append(x.clone())
            return self.inner(x, **kw)

    prompt, target = [3, 14, 15, 9], [92, 65, 35]
    mc_elbo(Spy(tiny_model), prompt, target, mc_num=64, batch_size=16, attn_mode="bidirectional",
            generator=torch.Generator().manual_seed(1))
    x = torch.cat(calls)
    assert x.shape[0] == 64
    assert (x[:, :4] == torch.tensor(prompt)).all()
    n_masked = (x[:, 4:] == MASK).sum(1)
    assert n_masked.min() >= 1 and n_masked.max() <= 3
    unmasked = x[:, 4:] != MASK
    assert (x[:, 4:][unmasked] == torch.tensor(target).repeat(64, 1)[unmasked]).all()


def test_mc_elbo_refuses_bad_input(tiny_model):
    with pytest.raises(ValueError, match="multiple"):
        mc_elbo(tiny_model, [1], [2, 3], mc_num=10, batch_size=4, mask_id=MASK)
    with pytest.raises(ValueError, match="prompt token"):
        mc_elbo(tiny_model, [], [2, 3], mc_num=4, batch_size=4, mask_id=MASK, logit_shift=True)
    with pytest.raises(ValueError, match="mask"):
        mc_elbo(tiny_model, [1], [2, 3], mc_num=4, batch_size=4)


def test_ar_loglik_matches_token_by_token(tiny_model):
    ids = [5, 17, 60, 42, 9, 33]
    expected = 0.0
    with torch.no_grad():
        for t in range(2, len(ids)):  # score ids[2:], each from a forward of its own prefix only
            logits = tiny_model(torch.tensor([ids[:t]]), attn_mode="causal").logits[0, -1]
            expected += float(torch.log_softmax(logits, -1)[ids[t]])
    r = ar_loglik(tiny_model, ids, prompt_len=2)
    assert r["n_tokens"] == 4 and math.isclose(r["loglik"], expected, rel_tol=1e-5)
    assert math.isclose(r["ppl"], math.exp(-expected / 4), rel_tol=1e-5)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smollm2_dir):
    return make_tiny_dllm(tmp_path_factory.mktemp("tiny_elbo") / "hf", smollm2_dir)


def test_elbo_cli_both_modes(tiny_dir, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("def add(a, b):\n    return a + b\n")
    sys.path.insert(0, str(REPO_ROOT / "eval" / "eval_likelihood"))
    import elbo as elbo_cli  # eval/eval_likelihood/elbo.py, run in-process (no interpreter start-up)

    outs = {}
    for mode in ("diffusion", "ar"):
        assert elbo_cli.main(["--model_path", str(tiny_dir), "--text_file", str(text), "--mc_num", "8",
                              "--batch_size", "4", "--mode", mode, "--device", "cpu"]) == 0
        outs[mode] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert outs["diffusion"]["nll_per_token"] > 0 and outs["diffusion"]["prompt_tokens"] == 1
    assert outs["ar"]["n_tokens"] == outs["diffusion"]["n_tokens"] > 5
    assert math.isclose(outs["ar"]["ppl"], math.exp(outs["ar"]["nll_per_token"]))


# ---- lm-eval adapter ----------------------------------------------------------------------------
def _req(*args):
    return SimpleNamespace(args=args)


def test_adapter_methods_duck_typed(tiny_dir):
    from veomni.eval.lm_eval_adapter import DLLMEvalModel

    lm = DLLMEvalModel.from_pretrained(str(tiny_dir), device="cpu", mc_num=8, mc_batch_size=4,
                                       alg="p2", temperature=0.0)
    # A one-token continuation is exact: log p(token | context, token masked).
    ctx, cont = lm._split("def f(x):", " return")
    assert len(cont) == 1
    (ll, greedy), = lm.loglikelihood([_req("def f(x):", " return")])
    x = torch.tensor([ctx + [lm.mask_id]])
    with torch.no_grad():
        logp = torch.log_softmax(lm.model(x).logits[0, -2].float(), -1)  # logit shift: read at i-1
    assert math.isclose(ll, float(logp[cont[0]]), rel_tol=1e-4)
    assert greedy == (int(logp.argmax()) == cont[0])
    (roll,) = lm.loglikelihood_rolling([_req("import os\nprint(os.sep)\n")])
    assert roll < 0
    texts = lm.generate_until([_req("def f(x):", {"until": ["\n"], "max_gen_toks": 6, "do_sample": False})])
    assert len(texts) == 1 and "\n" not in texts[0]


def test_adapter_registers_with_lm_eval(tiny_dir):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.api.registry import get_model

    from veomni.eval.lm_eval_adapter import register_lm_eval

    cls = register_lm_eval()
    assert get_model("veomni_dllm") is cls
    lm = cls.create_from_arg_string(f"pretrained={tiny_dir},device=cpu,mc_num=4,mc_batch_size=2,alg=p2")
    reqs = [Instance("loglikelihood", doc={}, arguments=("x = ", "1 + 2"), idx=0),
            Instance("loglikelihood", doc={}, arguments=("x = ", "3"), idx=1)]
    out = lm.loglikelihood(reqs)
    assert len(out) == 2 and all(isinstance(v, float) and isinstance(g, bool) for v, g in out)
    gen = lm.generate_until([Instance("generate_until", doc={}, arguments=("y =", {"until": ["\n"],
                             "max_gen_toks": 4}), idx=0)])
    assert isinstance(gen[0], str)
