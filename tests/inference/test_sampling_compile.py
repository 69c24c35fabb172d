"""infer.compile: decoding with the compiled forward (veomni/inference/compiled.py) gives exactly
the tokens of eager decoding (tiny float64 dLLM, greedy, so rounding-level differences of the fused
kernels cannot flip a choice), with the dual KV cache and without a cache."""
import copy

import pytest
import torch

from tests.inference.helpers import prompts, tiny_dllm
from veomni.inference.compiled import compile_for_decoding
from veomni.inference.generate import generate

CASES = {
    # dual cache: a full-row refresh per block, then one block per step (two query shapes); with
    # classifier-free guidance, two caches alive at once
    "threshold_dual_cfg": dict(alg="threshold", threshold=0.3, block_length=4, use_cache="dual", cfg_scale=1.0),
    # no cache: the whole fixed-length canvas every step (one shape)
    "low_confidence_nocache": dict(alg="low_confidence", block_length=4, steps=12),
}


@pytest.mark.parametrize("case", list(CASES))
def test_compiled_decoding_gives_the_same_tokens(case):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager = tiny_dllm()
    compiled = compile_for_decoding(copy.deepcopy(eager))
    ids, mask, _ = prompts(lens=(7, 5))
    kw = dict(attention_mask=mask, max_new_tokens=12, **CASES[case])
    ref = generate(eager, ids, **kw)
    pooled = []
    for _ in range(3):  # later calls reuse the compiled graphs (with a fresh cache each)
        out = generate(compiled, ids, **kw)
        assert torch.equal(out.sequences, ref.sequences)
        assert out.stats["nfe"] == ref.stats["nfe"]
        pooled.append(len(compiled._veomni_decode_pool.entries))
    assert counters["stats"]["unique_graphs"] >= 1, "nothing was compiled"
    if CASES[case].get("use_cache"):
        # Cache storage is reused across calls (steady state: no new storage per call; the first
        # call's cache may outlive it until the garbage collector runs, dynamo's compile keeps it).
        assert 2 <= pooled[1] == pooled[2] <= 4, pooled
    assert not counters["graph_break"], dict(counters["graph_break"])



def test_compiled_decoding_raises_the_recompile_limit(monkeypatch):
    """A decoding session that mixes batch 1 and 4, with and without a cache, needs ~9 graphs of the
    forward (seen in scripts/bench_decode_compile.py --batch_sizes 1,4); past dynamo's default limit
    of 8 it would decode eagerly with only a log warning. compile_for_decoding raises the limit and
    never lowers one a user raised further. (Checked here as a setting: the mixed-shape session
    itself costs ~2 min of compilation on CPU.)"""
    import torch._dynamo.config as dynamo_config

    from veomni.inference.compiled import DECODE_RECOMPILE_LIMIT

    monkeypatch.setattr(dynamo_config, "recompile_limit", 8)
    compile_for_decoding(tiny_dllm())
    assert dynamo_config.recompile_limit == DECODE_RECOMPILE_LIMIT >= 16
    monkeypatch.setattr(dynamo_config, "recompile_limit", 1000)
    compile_for_decoding(tiny_dllm())
    assert dynamo_config.recompile_limit == 1000
