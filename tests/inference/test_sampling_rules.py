"""Each strategy's commit rule, checked on hand-made logits from a scripted mock model."""
import math

import pytest
import torch

from tests.inference.helpers import MASK, VOCAB, ScriptedModel, dist_logits
from veomni.diffusion.sampling import diffusion_generate
from veomni.diffusion.sampling.dream import dream_step_count
from veomni.diffusion.sampling.parallel import factor_count, select_threshold
from veomni.diffusion.sampling.utils import spread_counts

P = 2  # prompt length of every mock test
PROMPT = torch.tensor([[1, 2]])


def table(rows):
    """rows: per batch row, per generated position (token, confidence) -> a script returning them
    at every call (prompt positions get an arbitrary confident prediction)."""
    def logits_for(x):
        out = torch.stack([torch.stack([dist_logits(3, 0.5)] * P + [dist_logits(t, c) for t, c in row])
                           for row in rows])
        return out[:, : x.shape[1]]
    return logits_for


def scripted(calls):
    """calls: list of table() scripts, one per model call (the last repeats)."""
    return lambda i, x: calls[min(i, len(calls) - 1)](x)


def committed(history, step, n_gen):
    return (history[step][:, -n_gen:] != MASK)


def test_threshold_commits_all_above_tau_and_one_per_row():
    first = table([[(10, .95), (11, .5), (12, .92), (13, .3)],
                   [(20, .5), (21, .6), (22, .4), (23, .2)]])  # row 1: nothing reaches tau
    rest = table([[(10, .99)] * 4, [(20, .99)] * 4])
    model = ScriptedModel(scripted([first, rest]))
    out = diffusion_generate(model, PROMPT.repeat(2, 1), alg="threshold", threshold=0.9, max_new_tokens=4,
                             block_length=4, output_history=True)
    h0 = out.history[0][:, P:]
    assert h0.tolist() == [[10, MASK, 12, MASK], [MASK, 21, MASK, MASK]]
    assert out.stats["nfe"] == 2 and not (out.sequences == MASK).any()
    # the rule itself, including a row with nothing eligible (it must select nothing)
    conf = torch.tensor([[0.95, 0.2, 0.91], [0.1, 0.3, 0.2], [-math.inf] * 3], dtype=torch.float64)
    assert select_threshold(conf, 0.9).tolist() == [[True, False, True], [False, True, False], [False] * 3]


def test_factor_rule():
    # f = 1: candidate n passes when c_n >= 1 - 1/(n+1) (0.67, 0.75, 0.8 for n = 2, 3, 4).
    conf = torch.tensor([[0.99, 0.9, 0.8, 0.5], [0.6, 0.55, 0.1, 0.1], [0.3, 0.2, 0.2, 0.1],
                         [0.99, 0.99, 0.99, 0.99]], dtype=torch.float64)
    # row 0: 0.9, 0.8 pass, 0.5 (the last) fails -> Fast-dLLM commits all 4, strict 3;
    # row 1: 0.55 fails at n = 2 (not the last) -> 1; row 2: the same -> 1
    assert factor_count(conf, 1.0).tolist() == [4, 1, 1, 4]
    assert factor_count(conf, 1.0, strict=True).tolist() == [3, 1, 1, 4]
    # f = 3 (thresholds 0, 0.25, 0.4): rows 1 and 2 fail at n = 3 of 4 -> 2
    assert factor_count(conf, 3.0).tolist() == [4, 2, 2, 4]
    # the example: f = 1, [0.9, 0.1] -> Fast-dLLM commits both, strict one
    two = torch.tensor([[0.9, 0.1]], dtype=torch.float64)
    assert factor_count(two, 1.0).tolist() == [2] and factor_count(two, 1.0, strict=True).tolist() == [1]
    # a row with nothing eligible commits nothing
    assert factor_count(torch.full((1, 3), -math.inf, dtype=torch.float64), 1.0).tolist() == [0]


@pytest.mark.parametrize("strict, row0", [(False, [10, 11, 12, 13]), (True, [10, MASK, 12, 13])])
def test_factor_rule_in_generation(strict, row0):
    first = table([[(10, .99), (11, .5), (12, .9), (13, .8)],
                   [(20, .6), (21, .55), (22, .1), (23, .1)]])
    rest = table([[(10, .99)] * 4, [(20, .99)] * 4])
    model = ScriptedModel(scripted([first, rest]))
    out = diffusion_generate(model, PROMPT.repeat(2, 1), alg="factor", factor=1.0, max_new_tokens=4,
                             block_length=4, output_history=True, factor_strict=strict)
    assert out.history[0][:, P:].tolist() == [row0, [20, MASK, MASK, MASK]]


def _random_script(seed):
    g = torch.Generator().manual_seed(seed)

    def script(i, x):
        torch.manual_seed(seed * 1000 + i)
        out = torch.randn(x.shape[0], x.shape[1], VOCAB, dtype=torch.float64, generator=g) * 3
        out[..., MASK] = -math.inf
        return out
    return script


@pytest.mark.parametrize("exact, expected", [
    (False, [0, 1, 1, 1, 1, 1, 1, 2]),  # Dream's int() floor: nothing at the first step
    (True, [1] * 8),
])
def test_dream_counts_floor_vs_exact(exact, expected):
    model = ScriptedModel(_random_script(0))
    out = diffusion_generate(model, PROMPT, alg="maskgit_plus", max_new_tokens=8, steps=8,
                             exact_step_counts=exact, output_history=True)
    n = [int(committed(out.history, i, 8).sum()) for i in range(8)]
    assert [n[0]] + [b - a for a, b in zip(n, n[1:])] == expected
    grid = torch.linspace(1, 1e-3, 9)
    assert int(dream_step_count(torch.tensor(8), grid[0], grid[1], False)) == 0
    assert spread_counts(10, 4) == [3, 3, 2, 2]


@pytest.mark.parametrize("alg", ["maskgit_plus", "topk_margin", "entropy"])
def test_dream_confidence_algs_commit_most_confident(alg):
    rows = [[(10 + j, c) for j, c in enumerate([0.3, 0.9, 0.5, 0.7])]]
    model = ScriptedModel(scripted([table(rows)]))
    out = diffusion_generate(model, PROMPT, alg=alg, max_new_tokens=4, steps=4, exact_step_counts=True,
                             output_history=True)
    order = [int((committed(out.history, i, 4)[0] & ~(committed(out.history, i - 1, 4)[0] if i else False)).nonzero())
             for i in range(4)]
    assert order == [1, 3, 2, 0]
    assert out.sequences[0, P:].tolist() == [10, 11, 12, 13]


def test_p2_keeps_decoded_tokens_and_writes_only_masked_positions():
    # call 0: position 0 is very confident with token 10; call 1: position 0 now predicts 40, still
    # the most confident, so it is not re-masked. Open-dLLM writes only positions that were masked
    # at the start of the step: token 10 stays (the old sampler rewrote it to 40).
    first = table([[(10, .99), (11, .2), (12, .3), (13, .4), (14, .5), (15, .6), (16, .7), (17, .8)]])
    second = table([[(40, .99), (41, .2), (42, .3), (43, .4), (44, .5), (45, .6), (46, .7), (47, .8)]])
    model = ScriptedModel(scripted([first, second]))
    out = diffusion_generate(model, PROMPT, alg="p2", max_new_tokens=8, steps=4, output_history=True)
    masks_left = [int((h[:, P:] == MASK).sum()) for h in out.history]
    assert masks_left == [6, 4, 2, 0]  # floor((1 - (i+1)/4) * 8)
    assert out.history[0][0, P:].tolist() == [10] + [MASK] * 6 + [17]  # the 2 most confident kept
    assert out.history[1][0, P:].tolist() == [10] + [MASK] * 4 + [45, 46, 17]
    assert out.sequences[0, P:].tolist() == [10, 41, 42, 43, 44, 45, 46, 17]


def test_p2_remasks_a_decoded_token_and_redecodes_it():
    # call 0 decodes position 0 (token 10, conf .99) and 7; at call 1 position 0 is the least
    # confident of all, so it is re-masked and decoded again later with the new prediction.
    first = table([[(10, .99), (11, .2), (12, .3), (13, .4), (14, .5), (15, .6), (16, .7), (17, .8)]])
    second = table([[(40, .05), (41, .9), (42, .9), (43, .9), (44, .9), (45, .9), (46, .9), (47, .9)]])
    model = ScriptedModel(scripted([first, second]))
    out = diffusion_generate(model, PROMPT, alg="p2", max_new_tokens=8, steps=4, output_history=True)
    assert out.history[0][0, P].item() == 10
    assert out.history[1][0, P].item() == MASK  # a decoded token went back to MASK
    assert out.sequences[0, P].item() == 40


def test_p2_stops_when_nothing_is_masked():
    # 4 tokens, 8 steps: masks left floor(4 * (1 - (i+1)/8)) = 3,3,2,2,1,1,0 -> the 8th step has
    # nothing masked and runs no forward (the old sampler spent all 8).
    model = ScriptedModel(_random_script(2))
    out = diffusion_generate(model, PROMPT, alg="p2", max_new_tokens=4, steps=8, output_history=True)
    assert [int((h[:, P:] == MASK).sum()) for h in out.history] == [3, 3, 2, 2, 1, 1, 0]
    assert out.stats["nfe"] == 7 == len(model.calls)


def test_llada_commits_inside_current_block_only():
    # The second block is far more confident, but must wait for the first block to finish.
    rows = [[(10, .2), (11, .5), (12, .3), (13, .4), (20, .99), (21, .99), (22, .99), (23, .99)]]
    model = ScriptedModel(scripted([table(rows)]))
    out = diffusion_generate(model, PROMPT, alg="low_confidence", max_new_tokens=8, block_length=4, steps=8,
                             output_history=True)
    for i in range(4):
        assert not committed(out.history, i, 8)[0, 4:].any()
        assert int(committed(out.history, i, 8)[0, :4].sum()) == i + 1
    assert out.history[1][0, P:P + 4].tolist() == [MASK, 11, MASK, 13]  # most confident first
    assert out.stats["nfe"] == 8


def test_llada_step_counts_spread():
    model = ScriptedModel(_random_script(1))
    out = diffusion_generate(model, PROMPT, alg="low_confidence", max_new_tokens=8, block_length=8, steps=3,
                             output_history=True)
    n = [int(committed(out.history, i, 8).sum()) for i in range(3)]
    assert n == [3, 6, 8]


def test_cfg_formula_and_unconditional_pass():
    a, b = 5, 6

    def script(i, x):
        uncond = bool((x[:, :P] == MASK).all())
        out = torch.zeros(x.shape[0], x.shape[1], VOCAB, dtype=torch.float64)
        out[..., a] = 2.0
        out[..., b] = 0.0 if uncond else 1.9
        out[..., MASK] = -math.inf
        return out
    for scale, want in ((1.0, b), (0.01, a)):
        # scale 1: a -> 2 + 2*(2-2) = 2, b -> 0 + 2*(1.9-0) = 3.8; scale .01: b -> 1.919 < 2
        model = ScriptedModel(script)
        out = diffusion_generate(model, PROMPT, alg="low_confidence", max_new_tokens=1, cfg_scale=scale)
        assert out.sequences[0, P].item() == want
        assert out.stats["nfe"] == 2 and len(model.calls) == 2
        assert model.calls[0]["input_ids"][0, :P].tolist() == [1, 2]
        assert model.calls[1]["input_ids"][0, :P].tolist() == [MASK, MASK]


def test_logit_shift_reads_previous_position():
    def script(i, x):  # the prediction at query position q is token 10 + q
        out = torch.stack([dist_logits(10 + q, 0.9) for q in range(x.shape[1])])
        return out[None].expand(x.shape[0], -1, -1)
    for shift, first_token in ((True, 10 + P - 1), (False, 10 + P)):
        out = diffusion_generate(ScriptedModel(script, shift=shift), PROMPT, max_new_tokens=3)
        assert out.sequences[0, P].item() == first_token


LOW, HIGH = 0.999, 0.3  # entropy ~0.02 nats vs ~3.8 nats


def test_multi_block_add_activate_and_entropy_rule():
    n = 12

    def rows(spec):  # spec: per generated position 'L' (low entropy), 'H' (high), or a float conf
        return table([[(30 + j, LOW if s == "L" else HIGH if s == "H" else s) for j, s in enumerate(spec)]])
    calls = [
        rows("LLHH" + "HHHH" + "HHHH"),      # 0: only block 0 exists -> commits 0, 1 (frac .5)
        rows(["L", "L", .35, .3] + list("HHHHHHHH")),  # 1: block 1 added (semi-active: nothing);
                                             #    block 0 fully active, nothing passes -> forced pos 2
        rows("LLLH" + "LLHH" + "HHHH"),      # 2: block 0 forced pos 3; block 1 commits 4, 5 (no add: 0 < .5)
        rows("LLLL" + "LLHH" + "HHHH"),      # 3: block 2 added (block 1 at .5); block 1 fully active -> forced;
                                             #    block 2 semi-active (block 1 < 1.0 decoded) -> nothing
        rows("L" * 12),
    ]
    model = ScriptedModel(scripted(calls))
    out = diffusion_generate(model, PROMPT, alg="multi_block", max_new_tokens=n, block_length=4,
                             block_add_threshold=0.5, decoded_token_threshold=1.0, entropy_threshold=0.5,
                             output_history=True)
    dec = [committed(out.history, i, n)[0].long().tolist() for i in range(4)]
    assert dec[0] == [1, 1, 0, 0] + [0] * 8
    assert dec[1] == [1, 1, 1, 0] + [0] * 8
    assert dec[2] == [1, 1, 1, 1] + [1, 1, 0, 0] + [0] * 4
    assert dec[3] == [1] * 4 + [1, 1, 1, 0] + [0] * 4
    # blocks not yet appended are absent: the forward stops at the last appended block
    assert [c["input_ids"].shape[1] for c in model.calls[:4]] == [P + 4, P + 8, P + 8, P + 12]
    assert not (out.sequences == MASK).any()


def test_multi_block_eos_early_stop():
    eos = 50
    calls = [table([[(1, LOW), (2, LOW), (eos, LOW), (3, LOW)] + [(4, HIGH)] * 8])]
    model = ScriptedModel(scripted(calls), eos=eos)
    out = diffusion_generate(model, PROMPT, alg="multi_block", max_new_tokens=12, block_length=4)
    assert out.stats["nfe"] == 1
    assert out.sequences[0, P:].tolist() == [1, 2, eos] + [0] * 9  # pad_token_id fills after EOS
    assert out.stats["new_tokens"] == 3
