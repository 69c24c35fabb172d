"""scripts/bench_decode.py: every cached / parallel row stands beside a like-for-like baseline, and the
quality column is the fixed scorer's log-likelihood. Structure only: no timing is asserted."""
from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import pytest
import torch

from tests.inference.test_dropin import make_model_dir

ROOT = Path(__file__).resolve().parents[2]


def _bench():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import bench_decode
    finally:
        sys.path.pop(0)
    return bench_decode


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    code = root / "heldout"
    code.mkdir()
    for i in range(3):  # held-out "code": the bench takes 48 tokens before each file's middle
        (code / f"m{i}.py").write_text("".join(f"def f_{i}_{k}(x):\n    return x + {k}\n" for k in range(40)))
    # the scorer: an AR model with the same tokenizer (no mask token), as SmolLM2 is for our dLLMs
    return (make_model_dir(root / "dllm", "llama"), make_model_dir(root / "ar", "llama", seed=3, mask=False),
            code)


def test_every_dependent_row_differs_from_its_baseline_in_one_thing():
    bench = _bench()
    table = bench.strategies(64, 32, 16)
    kinds = {s.kind for s in table.values()}
    assert kinds == {"reference", "schedule", "cache"}
    names = list(table)
    for name, s in table.items():
        if s.baseline is None:
            assert s.kind == "reference" and s.overrides.get("use_cache", "none") == "none"
            continue
        base = table[s.baseline]
        assert names.index(s.baseline) < names.index(name)  # baseline first
        if s.kind == "cache":
            assert s.overrides["use_cache"] != "none" and "use_cache" not in base.overrides
            assert {k: v for k, v in s.overrides.items() if k != "use_cache"} == base.overrides
        else:  # schedule: same block (or whole sequence), no cache, baseline at one token per forward
            assert "use_cache" not in s.overrides and "use_cache" not in base.overrides
            assert base.overrides.get("steps") == 64
            assert s.overrides.get("block_length") == base.overrides.get("block_length")
            if s.overrides["alg"] in ("maskgit_plus", "p2"):
                assert s.overrides["alg"] == base.overrides["alg"]
    # every cache mode and parallel rule of the sampler table is covered
    assert {s.overrides.get("use_cache") for s in table.values()} >= {"prefix", "dual"}
    assert {s.overrides["alg"] for s in table.values()} >= {"threshold", "factor", "multi_block", "p2"}
    # choosing a dependent row brings its baseline chain with it
    assert bench.with_baselines(table, ["threshold0.9_b32_dual"]) == [
        "llada_b32_s64", "threshold0.9_b32", "threshold0.9_b32_dual"]


def _rows(table_md):
    lines = [ln for ln in table_md.splitlines() if ln.startswith("| ") and not ln.startswith("| batch")]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]


def test_quick_table_structure_and_quality_column(dirs, tmp_path):
    bench = _bench()
    dllm, ar, code = dirs
    out = tmp_path / "bench.md"
    md = bench.main(["--model_path", str(dllm), "--scorer_path", str(ar), "--heldout_path", str(code), "--quick",
                     "--batch_sizes", "1,2", "--repeats", "2", "--device", "cpu", "--out", str(out)])
    assert out.read_text() == md
    rows = _rows(md)
    table = bench.strategies(32, 16, 8)
    assert [r[1] for r in rows] == list(table) * 2
    by = {(r[0], r[1]): r for r in rows}
    for (batch, name), r in by.items():
        s = table[name]
        assert r[3] == (s.baseline or "–")
        assert r[2] == bench.settings_text(s.overrides)
        nfe, tpf = float(r[4]), float(r[5])
        assert nfe >= 1 and math.isclose(tpf, 32 / nfe, rel_tol=0.01)  # 32 new tokens per row, EOS off
        held, logp, distinct = float(r[8]), float(r[10]), float(r[12])
        assert held <= 0 and logp <= 0 and 0 < distinct <= 1
        if s.baseline is None:
            assert r[7] == r[9] == r[11] == r[13] == "–"
        else:
            base = by[(batch, s.baseline)]
            assert float(r[7]) > 0
            assert math.isclose(float(r[9]), held - float(base[8]), abs_tol=2e-3)
            assert math.isclose(float(r[11]), logp - float(base[10]), abs_tol=2e-3)
            assert 0 <= float(r[13]) <= 1
    # The fixed-step rows are deterministic: N/4 steps commit 4 tokens per forward.
    assert by[("1", "llada_b16_s8")][4] == "8.0" and by[("1", "llada_b16_s32")][4] == "32.0"
    assert re.search(r"scorer: .*ar", md)


def test_quality_is_the_scorers_log_likelihood(dirs):
    """score_rows = mean log p(token | prompt, earlier tokens) under the causal scorer, cut after EOS."""
    from veomni.models.hf_io import load_model

    bench = _bench()
    _, ar, _ = dirs
    scorer = load_model(ar, dtype=torch.float32)
    prompt = torch.tensor([5, 6, 7])
    gen = torch.tensor([[8, 9, 2, 11, 12]])  # EOS = 2 at index 2: 3 tokens scored
    [(logp, distinct)] = bench.score_rows(scorer, [prompt], gen, eos=[2])
    ids = torch.tensor([[5, 6, 7, 8, 9, 2]])
    with torch.no_grad():
        lp = torch.log_softmax(scorer(ids, attn_mode="causal").logits[0].float(), -1)
    want = (lp[2, 8] + lp[3, 9] + lp[4, 2]) / 3
    assert math.isclose(logp, float(want), rel_tol=1e-5) and distinct == 1.0


def test_scorer_with_another_tokenizer_is_refused(dirs, tmp_path):
    from transformers import AutoTokenizer

    bench = _bench()
    dllm, ar, _ = dirs
    tok = AutoTokenizer.from_pretrained(dllm)
    vocab = dict(tok.get_vocab())
    other = AutoTokenizer.from_pretrained(ar)
    other.add_tokens(["<an_extra_token>"])  # one id the model's tokenizer does not have
    assert "<an_extra_token>" not in vocab
    odir = tmp_path / "other"
    import shutil
    shutil.copytree(ar, odir)
    other.save_pretrained(odir)
    with pytest.raises(SystemExit, match="tokenizer differs"):
        bench.load_scorer(str(odir), tok, torch.device("cpu"))


def test_heldout_logp_is_left_to_right_teacher_forcing_for_blocks_of_one():
    """LLaDA with block 1 and one step per token commits left to right, so the teacher-forced score
    of position j must be log p(truth_j | prompt, truth_<j, masks after), computed here directly."""
    from tests.inference.helpers import MASK, tiny_dllm
    from veomni.inference.generate import generate

    bench = _bench()
    model = tiny_dllm(seed=4)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, MASK - 1, (2, 5), generator=g)
    truth = torch.randint(1, MASK - 1, (2, 6), generator=g)
    got = bench.heldout_logp(model, generate, ids, truth, dict(alg="low_confidence", block_length=1, steps=6))
    want = []
    for b in range(2):
        total = 0.0
        for j in range(6):
            x = torch.cat([ids[b], truth[b, :j], torch.full((6 - j,), MASK)])[None]
            with torch.no_grad():
                z = model(x, attn_mode="bidirectional").logits[0, 5 + j - 1].double()  # logit shift
            z[MASK] = -math.inf
            total += float(torch.log_softmax(z, -1)[truth[b, j]])
        want.append(total / 6)
    assert got == pytest.approx(want, abs=1e-9)
    # one step for the block: the 6 tokens are scored without seeing each other, so the score differs
    par = bench.heldout_logp(model, generate, ids, truth, dict(alg="low_confidence", block_length=6, steps=1))
    assert par != pytest.approx(want, abs=1e-6)


def test_heldout_logp_reads_the_right_logits_through_a_cache():
    """On a causal model the prefix and dual caches are exact, so the teacher-forced score must not
    change with the cache: this checks that cached calls' logits are mapped to the right positions."""
    from tests.inference.helpers import MASK, tiny_dllm
    from veomni.inference.generate import generate

    bench = _bench()
    model = tiny_dllm(attn_mode="causal", seed=5)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, MASK - 1, (2, 4), generator=g)
    truth = torch.randint(1, MASK - 1, (2, 12), generator=g)
    base = dict(alg="threshold", threshold=0.5, block_length=4)
    want = bench.heldout_logp(model, generate, ids, truth, base)
    for cache in ("prefix", "dual"):
        got = bench.heldout_logp(model, generate, ids, truth, dict(base, use_cache=cache))
        assert got == pytest.approx(want, abs=1e-9)
    # and the score is not a constant: another truth scores differently
    assert bench.heldout_logp(model, generate, ids, truth.flip(1), base) != pytest.approx(want, abs=1e-6)
