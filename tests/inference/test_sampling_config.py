"""GenerationConfig: merging with the model's defaults and validation that names the fix."""
from types import SimpleNamespace

import pytest
import torch

from tests.inference.helpers import MASK, ScriptedModel, dist_logits, prompts
from veomni.diffusion.sampling import GenerationConfig, diffusion_generate, merge
from veomni.diffusion.sampling.config import resolve_for_model


def _model_cfg(**kw):
    base = dict(mask_token_id=MASK, eos_token_id=7, pad_token_id=0, dllm_attn_mode=None,
                dllm_block_size=None, dllm_logit_shift=None, vocab_size=97)
    base.update(kw)
    return SimpleNamespace(config=SimpleNamespace(**base))


def test_user_config_with_unset_fields_takes_model_values():
    # Open-dLLM's failure: a user config without mask_token_id raised "mask_token_id must be set".
    cfg = resolve_for_model(_model_cfg(), GenerationConfig(max_new_tokens=8, alg="entropy"))
    assert (cfg.mask_token_id, cfg.eos_token_id, cfg.pad_token_id) == (MASK, [7], 0)
    assert cfg.max_new_tokens == 8 and cfg.steps == 8 and cfg.alg == "entropy"
    assert cfg.attn_mode == "bidirectional" and cfg.logit_shift is True


def test_user_values_and_overrides_win():
    m = _model_cfg(dllm_attn_mode="block_causal", dllm_block_size=4, dllm_logit_shift=False)
    cfg = resolve_for_model(m, {"mask_token_id": 5, "alg": "threshold"}, {"threshold": 0.7})
    assert cfg.mask_token_id == 5 and cfg.threshold == 0.7
    assert (cfg.attn_mode, cfg.block_size, cfg.block_length, cfg.logit_shift) == ("block_causal", 4, 4, False)
    merged = merge(GenerationConfig(eos_token_id=3), GenerationConfig(eos_token_id=4))
    assert merged.eos_token_id == 4


def test_missing_mask_token_message():
    with pytest.raises(ValueError, match="run training/ensure_mask_token or pass mask_token_id"):
        resolve_for_model(_model_cfg(mask_token_id=None))


@pytest.mark.parametrize("overrides, match", [
    (dict(alg="maskgit"), "Did you mean 'maskgit_plus'"),
    (dict(alg="nope"), "Unknown alg"),
    (dict(alg="low_confidence", max_new_tokens=8, block_length=4, steps=3), "multiple of the number of blocks"),
    (dict(alg="low_confidence", threshold=0.8), "threshold=0.8 does not apply"),
    (dict(alg="threshold", steps=3, max_new_tokens=8), "Leave steps unset"),
    (dict(alg="maskgit_plus", block_length=4), "block_length=4 does not apply"),
    (dict(alg="maskgit_plus", use_cache="prefix"), "needs a block-based alg"),
    (dict(alg="threshold", use_cache="block"), "exact only for block_causal"),
    (dict(alg="multi_block", use_cache="dual"), "multi_block"),
    (dict(use_cache="fast"), "use_cache='fast'"),
    (dict(attn_mode="block_causal"), "needs block_size"),
    (dict(top_p=0.0), "top_p"),
    (dict(temprature=0.5), "Did you mean 'temperature'"),
    (dict(alg="origin", exact_step_counts=True), "exact_step_counts=True does not apply"),
])
def test_bad_options_raise(overrides, match):
    with pytest.raises(ValueError, match=match):
        resolve_for_model(_model_cfg(), None, overrides)


def test_default_valued_options_of_other_algs_are_accepted():
    # A CLI forwarding every default (eps, cfg_scale, steps == max_new_tokens) must not break.
    cfg = resolve_for_model(_model_cfg(), None, dict(alg="threshold", eps=1e-3, cfg_scale=0.0,
                                                     steps=16, max_new_tokens=16))
    assert cfg.eps is None and cfg.threshold == 0.9 and cfg.block_length == 32


def test_right_padding_is_rejected():
    model = ScriptedModel(lambda i, x: dist_logits(3, 0.9).expand(x.shape[0], x.shape[1], -1))
    ids, mask, _ = prompts()
    with pytest.raises(ValueError, match="left-padded"):
        diffusion_generate(model, ids, attention_mask=mask.flip(1), max_new_tokens=2)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        diffusion_generate(model, ids, attention_mask=mask, max_new_tokens=2, mask_token_id=500)


def test_return_dict_false_gives_sequences():
    model = ScriptedModel(lambda i, x: dist_logits(3, 0.9).expand(x.shape[0], x.shape[1], -1))
    out = diffusion_generate(model, torch.tensor([[1, 2]]), max_new_tokens=3, return_dict=False)
    assert isinstance(out, torch.Tensor) and out.tolist() == [[1, 2, 3, 3, 3]]
