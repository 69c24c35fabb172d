"""Meta-device init + sharded loading on 2 ranks (gloo) == the eager path, bit for bit.

Each rank builds the model on the meta device, `parallelize` shards it (FSDP2; EP 2 for the MoE
case), and `MetaLoad.load` fills only the local shards. The gathered parameters (full_tensor) must
equal what the eager path (load_model + ensure_mask_token, the whole model on the rank) holds, for:
a tied model whose new mask row lands on rank 1 (with activation checkpointing's wrappers), an
untied one with the mask in a spare row, per-expert hub weights split over EP ranks, a Qwen3.5
vision-language MoE checkpoint (renamed and skipped keys, reverse gates not in the file), and
init_from_scratch (rank 0 builds, broadcast). Ranks seeing different checkpoint files are refused.
Then the trainer: 2-process FSDP2 training with meta_init equals the eager path (same losses,
gradient norms and exported weights).
"""
import json
from pathlib import Path

import pytest
import torch

from tests.distributed._common import TIMEOUT, run_workers
from tests.trainer.conftest import tiny_corpus, tiny_model_dir  # noqa: F401  (fixtures, used by name)
from tests.models.tiny import tiny_config, tiny_moe_config

pytestmark = pytest.mark.dist


def _save(cfg, path, tok, vocab_extra=0):
    from veomni.models.hf_io import save_model
    from veomni.models.registry import build_model

    cfg.vocab_size = len(tok) + vocab_extra
    torch.manual_seed(0)
    model = build_model(cfg)
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    return str(save_model(model, path, max_shard_size="150KB"))


def _case(path, tok_dir, from_scratch=False, ep=1, checkpointing=False, expect_error=None):
    """One rank: eager model vs meta + parallelize + load; returns after comparing."""
    from veomni.distributed import init_parallel_state, parallelize
    from veomni.models.hf_io import load_model, load_tokenizer
    from veomni.models.mask_token import ensure_mask_token
    from veomni.models.sharded_load import prepare_meta_model

    ps = init_parallel_state("fsdp2", ep_size=ep, timeout=TIMEOUT)
    try:
        def build_eager():
            if from_scratch:
                from transformers import AutoConfig

                from veomni.models.registry import build_model

                torch.manual_seed(3)
                model = build_model(AutoConfig.from_pretrained(path))
                model.init_weights()
                return model
            return load_model(path)

        if expect_error:
            with pytest.raises(RuntimeError, match=expect_error):
                prepare_meta_model(path, load_tokenizer(tok_dir), "<|mask|>", torch.float32, "sdpa", ps,
                                   from_scratch, build_eager)
            return
        eager = build_eager()
        ensure_mask_token(eager, load_tokenizer(tok_dir))
        meta, pending = prepare_meta_model(path, load_tokenizer(tok_dir), "<|mask|>", torch.float32, "sdpa", ps,
                                           from_scratch, build_eager)
        parallelize(meta, ps, dict(check_replicas=False, gradient_checkpointing=checkpointing))
        pending.load(meta)
        want = dict(eager.named_parameters())
        got = {n.replace("_checkpoint_wrapped_module.", ""): p for n, p in meta.named_parameters()}
        assert want.keys() == got.keys()
        sharded = 0
        for name, p in got.items():
            local = p.to_local()
            sharded += local.numel() < p.numel()
            assert torch.equal(p.full_tensor(), want[name]), (ps.rank, name)
        assert sharded >= len(got) // 2  # the ranks hold slices, not copies
        bufs = {n.replace("_checkpoint_wrapped_module.", ""): b for n, b in meta.named_buffers()}
        for name, b in eager.named_buffers():
            assert torch.equal(bufs[name], b), name
        assert meta.config.vocab_size == eager.config.vocab_size
        assert meta.config.mask_token_id == eager.config.mask_token_id
    finally:
        ps.destroy()


def _all_cases(cases, tok_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=TIMEOUT)  # kept across the cases (each builds its own state)
    for kwargs in cases:
        if kwargs.get("expect_error"):
            kwargs = dict(kwargs, path=kwargs["path"][dist.get_rank()])
        _case(tok_dir=tok_dir, **kwargs)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, smollm2_dir):
    from tests.models.test_qwen3_5 import _vl_checkpoint
    from veomni.models.hf_io import load_tokenizer

    tok = load_tokenizer(smollm2_dir)
    root = tmp_path_factory.mktemp("meta_init")
    vl = root / "vl_moe"
    vl.mkdir()
    _vl_checkpoint(vl, moe=True, vocab_size=len(tok))
    other = root / "tied_other"
    _save(tiny_config("llama", tied=True, num_hidden_layers=3), other, tok)
    return {
        "tied": _save(tiny_config("llama", tied=True), root / "tied", tok),
        "spare": _save(tiny_config("qwen3", tied=False), root / "spare", tok, vocab_extra=5),
        "moe": _save(tiny_moe_config(tied=False), root / "moe", tok),
        "vl_moe": str(vl),
        "other": str(other),
    }


def test_sharded_loading_equals_eager(checkpoints, smollm2_dir):
    c = checkpoints
    cases = [
        dict(path=c["tied"], checkpointing=True),
        dict(path=c["spare"]),
        dict(path=c["moe"], ep=2),
        dict(path=c["vl_moe"]),
        dict(path=c["tied"], from_scratch=True),
        dict(path=[c["tied"], c["other"]], expect_error="different checkpoint"),
    ]
    run_workers(_all_cases, 2, cases, str(smollm2_dir), timeout=300)


# ---------------------------------------------------------------------------- the trainer
def _metrics(out):
    return [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_trainer_meta_init_equals_eager(tiny_model_dir, tiny_corpus, tmp_path):  # noqa: F811
    """Through tasks/train_torch.py: the same run with model.meta_init false (the eager path) and
    true (sharded safetensors reads). init_from_scratch's broadcast path is compared at the
    parallelize level above, which keeps this file's time down."""
    from tests.trainer.test_train_e2e import _args, _run
    from veomni.models.hf_io import load_model

    runs = {}
    for meta in (False, True):
        out = tmp_path / f"meta_{meta}"
        proc = _run(_args(tiny_model_dir, tiny_corpus, out, "--train.max_steps=3", "--train.data_parallel=fsdp2",
                          "--train.export_hf=true", f"--model.meta_init={str(meta).lower()}"), nproc=2)
        assert ("meta-device init" in proc.stderr) == meta
        runs[meta] = out
    a, b = _metrics(runs[False]), _metrics(runs[True])
    assert len(a) == len(b) == 3
    for ra, rb in zip(a, b):
        assert (ra["loss"], ra["grad_norm"]) == (rb["loss"], rb["grad_norm"]), (ra, rb)
    wa = dict(load_model(runs[False] / "hf").named_parameters())
    wb = dict(load_model(runs[True] / "hf").named_parameters())
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name
