"""train.compile=true trains like train.compile=false: same losses over two steps (tiny Llama,
in-process Trainer, fp32). The compiled run differs only in summation order inside fused kernels,
so the losses agree to ~1e-6 relative; rtol 1e-4 leaves room and still catches a wrong layer."""
import json
from pathlib import Path

import pytest
import torch

from tests.trainer.test_trainer_correctness import _OPEN, _close_trainers, _trainer  # noqa: F401


def _losses(out):
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_compiled_training_matches_eager(tiny_model_dir, tiny_corpus, tmp_path):
    # With activation checkpointing on both sides: the compiled run then also shows that compile
    # composes with the checkpoint wrapper inside the trainer (tests/models/test_compile.py has the
    # layer-level parity with and without it).
    extra = ["--model.gradient_checkpointing=true"]
    runs = {}
    for flag in ("false", "true"):
        torch._dynamo.reset()
        t = _trainer(tiny_model_dir, tiny_corpus, tmp_path / flag, "--train.max_steps=2", f"--train.compile={flag}",
                     *extra)
        if flag == "true":
            assert all(getattr(b, "_veomni_compiled", False) for b in t.model.model.layers)
        t.train()
        runs[flag] = _losses(tmp_path / flag)
    assert len(runs["true"]) == len(runs["false"]) == 2, runs
    torch.testing.assert_close(torch.tensor(runs["true"]), torch.tensor(runs["false"]), rtol=1e-4, atol=0)


@pytest.mark.dist
def test_compiled_fsdp2_two_processes_equal_eager_one_process(tiny_model_dir, tiny_corpus, tmp_path):
    """FSDP2 over 2 ranks with compiled, checkpointed blocks == 1 eager rank with 2 accumulated
    micro-batches (the equivalence test of tests/trainer/test_train_e2e.py, with train.compile)."""
    from tests.trainer.test_train_e2e import _args, _metrics, _run

    one, two = tmp_path / "one", tmp_path / "two"
    _run(_args(tiny_model_dir, tiny_corpus, one, "--train.max_steps=2", "--train.data_parallel=none"))
    _run(_args(tiny_model_dir, tiny_corpus, two, "--train.max_steps=2", "--train.data_parallel=fsdp2",
               "--train.compile=true", "--model.gradient_checkpointing=true"), nproc=2)
    a, b = _metrics(one), _metrics(two)
    assert len(a) == len(b) == 2
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) < 1e-5 and abs(x["grad_norm"] - y["grad_norm"]) < 1e-4, (x, y)
