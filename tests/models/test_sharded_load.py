"""Meta-device loading (veomni/models/sharded_load.py) on one process == the eager path, bit for bit.

The eager path is what the trainer did before: load_model (or random init) + ensure_mask_token.
Here the model is built on the meta device, given the same mask-token plan, then `MetaLoad.load`
allocates and fills it (without sharding, each parameter is one chunk: the whole tensor). The
2-rank sharded version is tests/distributed/test_meta_init.py.
"""
from pathlib import Path

import pytest
import torch

from tests.models.tiny import tiny_config, tiny_moe_config
from veomni.models.hf_io import load_model, load_tokenizer, save_model
from veomni.models.mask_token import ensure_mask_token
from veomni.models.registry import build_model
from veomni.models.sharded_load import prepare_meta_model


@pytest.fixture
def ps():
    from veomni.distributed import init_parallel_state

    state = init_parallel_state(dp_mode="none")
    yield state
    state.destroy()


def _save(cfg, path, tok, std=None, shard="150KB", vocab_extra=0):
    cfg.vocab_size = len(tok) + vocab_extra
    torch.manual_seed(0)
    model = build_model(cfg)
    model.init_weights()
    if std:  # large weights so a wrong row / slice cannot hide in a tolerance
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, std)
    return save_model(model, path, max_shard_size=shard)


def assert_same(eager, meta):
    a, b = dict(eager.named_parameters()), dict(meta.named_parameters())
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    ba, bb = dict(eager.named_buffers()), dict(meta.named_buffers())
    assert ba.keys() == bb.keys()
    for k in ba:
        assert ba[k].dtype == bb[k].dtype and torch.equal(ba[k], bb[k]), k
    for attr in ("vocab_size", "mask_token_id", "dtype"):
        assert getattr(eager.config, attr) == getattr(meta.config, attr), attr
    tied = eager.lm_head.weight is eager.model.embed_tokens.weight
    assert (meta.lm_head.weight is meta.model.embed_tokens.weight) == tied


def _both(path, tok_dir, ps, dtype=torch.float32, from_scratch=False):
    def build_eager():
        return load_model(path, dtype=dtype)

    eager = build_eager()
    ensure_mask_token(eager, load_tokenizer(tok_dir))
    tok = load_tokenizer(tok_dir)
    meta, pending = prepare_meta_model(str(path), tok, "<|mask|>", dtype, "sdpa", ps, from_scratch, build_eager)
    assert all(p.is_meta for p in meta.parameters())
    pending.load(meta)
    assert tok.mask_token_id == eager.config.mask_token_id
    return eager, meta


CASES = {
    "llama_tied": lambda: tiny_config("llama", tied=True),
    "qwen3_untied": lambda: tiny_config("qwen3", tied=False),
    "qwen3_moe": lambda: tiny_moe_config(tied=False),  # saved with one tensor per expert (hub layout)
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_meta_load_equals_eager(tmp_path, smollm2_dir, ps, case, dtype):
    tok = load_tokenizer(smollm2_dir)
    path = _save(CASES[case](), tmp_path, tok, std=0.5)
    assert len(list(Path(path).glob("*.safetensors"))) > 1  # sharded checkpoint, weights cross files
    eager, meta = _both(path, smollm2_dir, ps, dtype)
    assert meta.config.vocab_size == len(tok) + 1  # the mask row was added, at the mean
    assert_same(eager, meta)


def test_spare_row_mask_and_untied_head(tmp_path, smollm2_dir, ps):
    """Qwen-style padded vocabulary: the mask id lands in a spare row, which gets the mean."""
    tok = load_tokenizer(smollm2_dir)
    path = _save(tiny_config("qwen3", tied=False), tmp_path, tok, std=0.5, vocab_extra=5)
    eager, meta = _both(path, smollm2_dir, ps)
    assert meta.config.vocab_size == len(tok) + 5 and meta.config.mask_token_id == len(tok)
    assert_same(eager, meta)


@pytest.mark.parametrize("moe", [False, True])
def test_qwen3_5_vision_language_checkpoint(tmp_path, smollm2_dir, ps, moe):
    """Renamed keys (model.language_model.*), skipped ones (vision tower, mtp.*), per-expert MoE
    weights, and reverse gates that the checkpoint lacks (initialised to 0)."""
    from tests.models.test_qwen3_5 import _vl_checkpoint

    _vl_checkpoint(tmp_path, moe, vocab_size=len(load_tokenizer(smollm2_dir)))
    eager, meta = _both(tmp_path, smollm2_dir, ps)
    assert any(n.endswith("reverse_gate") for n, _ in meta.named_parameters())
    assert_same(eager, meta)


def test_from_scratch_on_one_process_is_the_eager_model(tmp_path, smollm2_dir, ps):
    """init_from_scratch on one process: nothing to broadcast, the eager builder's model comes back
    (with its mask token) and there is nothing to load; the RNG is left as the eager path leaves it.
    The 2-rank broadcast is tests/distributed/test_meta_init.py."""
    from transformers import AutoConfig

    tok = load_tokenizer(smollm2_dir)
    path = _save(tiny_config("llama", tied=True), tmp_path, tok)

    def build_eager():
        model = build_model(AutoConfig.from_pretrained(path))
        model.init_weights()
        return model.to(torch.bfloat16)

    torch.manual_seed(7)
    eager = build_eager()
    ensure_mask_token(eager, load_tokenizer(smollm2_dir))
    after_eager = torch.get_rng_state()
    torch.manual_seed(7)
    model, pending = prepare_meta_model(str(path), load_tokenizer(smollm2_dir), "<|mask|>", torch.bfloat16, "sdpa",
                                        ps, True, build_eager)
    assert pending is None and not any(p.is_meta for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), after_eager)
    assert_same(eager, model)


def test_checkpoint_errors_name_the_key(tmp_path, smollm2_dir, ps):
    from safetensors.torch import load_file, save_file

    tok = load_tokenizer(smollm2_dir)
    path = _save(tiny_config("llama", tied=True), tmp_path, tok, shard="10GB")
    file = Path(path) / "model.safetensors"
    good = load_file(file)

    def attempt(sd):
        save_file(sd, file, metadata={"format": "pt"})
        prepare_meta_model(str(path), load_tokenizer(smollm2_dir), "<|mask|>", torch.float32, "sdpa", ps,
                           False, None)

    with pytest.raises(KeyError, match="does not know.*model.layers.0.extra.weight"):
        attempt({**good, "model.layers.0.extra.weight": torch.zeros(2)})
    with pytest.raises(KeyError, match="missing 1 weight.*model.norm.weight"):
        attempt({k: v for k, v in good.items() if k != "model.norm.weight"})
    with pytest.raises(ValueError, match="size mismatch for model.norm.weight"):
        attempt({**good, "model.norm.weight": torch.ones(3)})
