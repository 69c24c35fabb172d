"""Block diffusion through the trainer: it trains, records block_causal in the export, resumes exactly,
and the exported model decodes block by block with the exact block KV cache (cached == uncached)."""
import json
from pathlib import Path

import pytest
import torch

from tests.trainer.test_train_e2e import _args, _run


def _bd3(model_dir, corpus, out, *extra):
    return _args(model_dir, corpus, out, "--train.objective=bd3lm", "--model.attn_mode=block_causal",
                 "--model.block_size=4", "--train.bd3lm_complementary=true", "--train.max_steps=4",
                 "--train.save_steps=2", "--train.export_hf=true", *extra)


def _metrics(out):
    return [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_bd3lm_trains_resumes_exactly_and_decodes_with_the_block_cache(tiny_model_dir, tiny_corpus, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    _run(_bd3(tiny_model_dir, tiny_corpus, straight))
    proc = _run(_bd3(tiny_model_dir, tiny_corpus, killed), env={"VEOMNI_DEBUG_KILL_AFTER_STEP": "3"}, check=False)
    assert proc.returncode != 0
    _run(_bd3(tiny_model_dir, tiny_corpus, killed))
    a, b = _metrics(straight), _metrics(killed)
    assert [r["step"] for r in a] == [1, 2, 3, 4]
    by_step = {r["step"]: r for r in b}
    for r in a:
        assert r["loss"] == by_step[r["step"]]["loss"] and r["grad_norm"] == by_step[r["step"]]["grad_norm"]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in a) and a[-1]["loss"] != a[0]["loss"]

    from veomni.diffusion.sampling.api import diffusion_generate
    from veomni.models.hf_io import load_model

    model = load_model(straight / "hf").eval()
    assert (model.config.dllm_attn_mode, model.config.dllm_block_size) == ("block_causal", 4)
    prompt = torch.tensor([[5, 17, 23, 42, 9, 11]])
    kw = dict(max_new_tokens=8, alg="threshold", threshold=0.5)
    ref = diffusion_generate(model, prompt, **kw)
    cached = diffusion_generate(model, prompt, use_cache="block", **kw)
    assert torch.equal(ref.sequences, cached.sequences)
    assert not (ref.sequences == model.config.mask_token_id).any()


@pytest.mark.parametrize("extra,match", [
    (["--train.objective=bd3lm"], "needs model.attn_mode='block_causal' and model.block_size"),
    (["--train.bd3lm_complementary=true"], "only apply to train.objective='bd3lm'"),
])
def test_bd3lm_settings_are_checked(extra, match):
    from veomni.arguments import parse_args
    from veomni.config.parser import ConfigError

    with pytest.raises(ConfigError, match=match):
        parse_args(argv=["--model.model_path=/m", *extra])
