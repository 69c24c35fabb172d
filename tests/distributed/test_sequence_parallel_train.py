"""Ulysses sequence parallelism through the real trainer (torchrun, gloo, CPU fp32, packing on).

SP=2 on 2 processes (both ranks read the same rows and split each row's 31 tokens, padded to 32)
must equal one process: the same losses, gradient norms and held-out losses at every step and the
same exported weights. A checkpoint taken at SP=2 resumes in one process and continues like the
uninterrupted run.
"""
import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.trainer.conftest import tiny_corpus, tiny_model_dir  # noqa: F401  (fixtures, used by name)
from tests.trainer.test_train_e2e import _args, _run

pytestmark = pytest.mark.dist
ATOL = 1e-5


def _rows(out, name="metrics.jsonl"):
    return [json.loads(x) for x in (Path(out) / name).read_text().splitlines()]


def _sp_args(model_dir, corpus, out, *extra):
    return _args(model_dir, corpus, out, "--train.max_steps=4", "--train.save_steps=2", "--train.export_hf=true",
                 "--data.max_seq_len=31", "--data.packing=true", "--train.max_grad_norm=0.5",
                 "--data.eval_split_ratio=0.2", "--train.eval_steps=2", "--train.eval_max_batches=2", *extra)


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tiny_corpus, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("sp_train")
    one, sp2 = root / "one", root / "sp2"
    _run(_sp_args(tiny_model_dir, tiny_corpus, one))  # 1 process: 2 micro-batches of 2 rows
    _run(_sp_args(tiny_model_dir, tiny_corpus, sp2, "--train.ulysses_parallel_size=2",
                 "--train.data_parallel=fsdp2"), nproc=2)
    resumed = root / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(sp2 / "checkpoints" / "global_step_2", resumed / "checkpoints" / "global_step_2")
    _run(_sp_args(tiny_model_dir, tiny_corpus, resumed))
    return one, sp2, resumed


def _close(a, b, key):
    return abs(a[key] - b[key]) <= ATOL * max(1.0, abs(a[key]))


def test_sp2_training_equals_one_process(runs):
    one, sp2, _ = runs
    a, b = _rows(one), _rows(sp2)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        for key in ("loss", "grad_norm"):
            assert _close(ra, rb, key), (key, ra, rb)
        assert ra["tokens_seen"] == rb["tokens_seen"]
    assert abs(a[-1]["loss"] - a[0]["loss"]) > 1e-3  # it trained
    ea, eb = _rows(one, "eval_metrics.jsonl"), _rows(sp2, "eval_metrics.jsonl")
    assert [r["step"] for r in ea] == [r["step"] for r in eb] == [0, 2, 4]
    for ra, rb in zip(ea, eb):
        assert _close(ra, rb, "eval_loss") and ra["eval_tokens"] == rb["eval_tokens"], (ra, rb)

    from veomni.models.hf_io import load_model

    wa = dict(load_model(one / "hf").named_parameters())
    wb = dict(load_model(sp2 / "hf").named_parameters())
    assert set(wa) == set(wb)
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], atol=5e-5, rtol=0, msg=lambda m: f"{name}: {m}")


def test_sp2_checkpoint_resumes_in_one_process(runs):
    one, _, resumed = runs
    a = {r["step"]: r for r in _rows(one)}
    r = _rows(resumed)
    assert [x["step"] for x in r] == [3, 4]
    for row in r:
        for key in ("loss", "grad_norm"):
            assert _close(a[row["step"]], row, key), (key, a[row["step"]], row)
