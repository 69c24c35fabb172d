"""Expert parallelism through the real trainer (torchrun, gloo, CPU fp32, packing on).

EP=2 on 2 processes (one micro-batch each) must equal one process with 2 accumulation steps:
the same losses, balance/z losses and gradient norms at every step, and the same exported weights.
A checkpoint taken at EP=2 then resumes in one process at EP=1 and continues like the
uninterrupted one-process run.
"""
import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.trainer.conftest import tiny_corpus  # noqa: F401  (a fixture, used by name)
from tests.trainer.test_train_e2e import _args, _run

pytestmark = pytest.mark.dist
ATOL = 1e-5


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory, smollm2_dir):
    from transformers import Qwen3MoeConfig

    from veomni.models.hf_io import load_tokenizer, save_model
    from veomni.models.registry import build_model

    tok = load_tokenizer(str(smollm2_dir))
    cfg = Qwen3MoeConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                         num_experts=4, num_experts_per_tok=2, norm_topk_prob=True, max_position_embeddings=128,
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, router_aux_loss_coef=0.01)
    torch.manual_seed(0)
    model = build_model(cfg)
    model.init_weights()
    out = tmp_path_factory.mktemp("tiny_moe")
    save_model(model, out, tokenizer=tok)
    return out


def _metrics(out):
    return [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def _moe_args(moe_dir, corpus, out, *extra):
    return _args(moe_dir, corpus, out, "--train.max_steps=5", "--train.save_steps=3", "--train.export_hf=true",
                 "--train.router_z_loss_coef=0.001", "--data.packing=true", "--train.max_grad_norm=0.5", *extra)


@pytest.fixture(scope="module")
def runs(moe_dir, tiny_corpus, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("ep_train")
    corpus = tiny_corpus
    one, ep2 = root / "one", root / "ep2"
    _run(_moe_args(moe_dir, corpus, one))  # 1 process, global batch 4 = 2 micro-batches of 2
    _run(_moe_args(moe_dir, corpus, ep2, "--train.expert_parallel_size=2", "--train.data_parallel=fsdp2"), nproc=2)
    # Resume EP=2's step-3 checkpoint in one process (EP=1): a copy, so ep2's own files stay intact.
    resumed = root / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(ep2 / "checkpoints" / "global_step_3", resumed / "checkpoints" / "global_step_3")
    _run(_moe_args(moe_dir, corpus, resumed))
    return one, ep2, resumed


KEYS = ("loss", "grad_norm", "moe_aux_loss", "moe_z_loss")


def _close(a, b, key):
    return abs(a[key] - b[key]) <= ATOL * max(1.0, abs(a[key]))


def test_ep2_training_equals_one_process(runs):
    one, ep2, _ = runs
    a, b = _metrics(one), _metrics(ep2)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4, 5]
    for ra, rb in zip(a, b):
        for key in KEYS:
            assert _close(ra, rb, key), (key, ra, rb)
    assert a[0]["moe_aux_loss"] > 0 and a[0]["moe_z_loss"] > 0
    assert abs(a[-1]["loss"] - a[0]["loss"]) > 1e-3  # it trained

    from veomni.models.hf_io import load_model

    wa = dict(load_model(one / "hf").named_parameters())
    wb = dict(load_model(ep2 / "hf").named_parameters())
    assert set(wa) == set(wb)
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], atol=ATOL, rtol=0, msg=lambda m: f"{name}: {m}")


def test_ep2_checkpoint_resumes_at_ep1(runs):
    one, _, resumed = runs
    a = {r["step"]: r for r in _metrics(one)}
    r = _metrics(resumed)
    assert [x["step"] for x in r] == [4, 5]
    for row in r:
        for key in KEYS:
            assert _close(a[row["step"]], row, key), (key, a[row["step"]], row)
