"""Save with 2 FSDP2 ranks, resume on the same 2 ranks and on 1 process; export HF from FSDP2.

One spawn does the 2-rank part: train steps 0-1, save global_step_2, draw random numbers, train
step 2, export HF, then reload global_step_2 on the same ranks. The test process then resumes
global_step_2 alone and must reproduce step 2 of the 2-rank run.
"""
import logging
import random

import numpy as np
import pytest
import torch

from tests.distributed._common import (
    GLOBAL_ROWS, TIMEOUT, full_params, global_data, make_optim, run_workers, tiny_model, train,
)

pytestmark = pytest.mark.dist
LOG = "veomni.checkpoint.dcp"


def _draw():
    return [random.random(), float(np.random.rand())] + torch.rand(2).tolist()


def _worker(out_dir):
    from pathlib import Path

    from veomni.checkpoint import export_hf, load_checkpoint, save_checkpoint
    from veomni.distributed import init_parallel_state, parallelize

    ps = init_parallel_state(dp_mode="fsdp2", timeout=TIMEOUT)
    ids, labels = global_data()
    half = GLOBAL_ROWS // ps.dp_size
    rows = [slice(ps.dp_rank * half, (ps.dp_rank + 1) * half)]
    model = parallelize(tiny_model(tied=True), ps, {})
    opt, sched = make_optim(model)
    train(model, opt, sched, ps, ids, labels, rows, range(2))
    random.seed(100 + ps.rank), np.random.seed(200 + ps.rank), torch.manual_seed(300 + ps.rank)
    path = save_checkpoint(out_dir, 2, model, opt, sched, {"epoch": 0, "position": 8},
                           {"tokens_seen": 77}, ps, keep_last=2)
    res = {"draw_after_save": _draw(), "params_at_save": full_params(model)}
    res["losses_step3"], _ = train(model, opt, sched, ps, ids, labels, rows, [2])
    res["params_step3"] = full_params(model)
    export_hf(model, Path(out_dir) / "hf", tokenizer=None, parallel_state=ps)
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    load_checkpoint(path, model, opt, sched, ps)  # same world size: each rank gets its own streams
    res["draw_after_load"] = _draw()
    res["params_reloaded"] = full_params(model)
    torch.save(res, Path(out_dir) / f"rank{ps.rank}.pt")
    ps.destroy()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("resume")
    run_workers(_worker, 2, str(out))
    return out, [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.fixture
def ps(monkeypatch):
    from veomni.distributed import init_parallel_state

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    state = init_parallel_state("none")
    yield state
    state.destroy()


def test_checkpoint_layout_has_every_rank(run):
    out, _ = run
    names = {p.name for p in (out / "checkpoints" / "global_step_2").iterdir()}
    assert {"COMPLETE", ".metadata", "__0_0.distcp", "__1_0.distcp", "rng_rank0.pt", "rng_rank1.pt",
            "scheduler.pt", "dataloader.json", "train_state.json", "model_config.json"} <= names
    assert not [p for p in (out / "checkpoints").iterdir() if ".tmp-" in p.name]


def test_same_world_size_restores_params_and_each_ranks_rng(run):
    _, (r0, r1) = run
    for r in (r0, r1):
        assert r["draw_after_load"] == r["draw_after_save"]
        for k, v in r["params_at_save"].items():
            assert torch.equal(r["params_reloaded"][k], v), k
    assert r0["draw_after_save"] != r1["draw_after_save"]  # streams really are per rank


def test_resume_on_one_process_continues_the_two_rank_run(run, ps, caplog):
    from veomni.checkpoint import load_latest

    out, (r0, _) = run
    model = tiny_model(tied=True, seed=42)
    opt, sched = make_optim(model)
    with caplog.at_level(logging.WARNING, logger=LOG):
        loader_state, train_state, path = load_latest(out, model, opt, sched, ps)
    assert path.name == "global_step_2" and "not bitwise-continuous" in caplog.text
    assert loader_state == {"epoch": 0, "position": 8} and train_state == {"step": 2, "tokens_seen": 77}
    got = dict(model.named_parameters())
    for k, v in r0["params_at_save"].items():
        assert torch.equal(got[k].detach(), v), k
    # Step 3 on one process (grad accumulation x2) == step 3 of the 2-rank run: the optimizer moments
    # and the lr schedule were resharded and restored too.
    ids, labels = global_data()
    losses, _ = train(model, opt, sched, ps, ids, labels, [slice(0, 2), slice(2, 4)], [2])
    assert losses == pytest.approx(r0["losses_step3"], abs=1e-5)
    for k, v in r0["params_step3"].items():
        torch.testing.assert_close(got[k].detach(), v, atol=1e-5, rtol=0)


def test_export_from_fsdp2(run):
    from veomni.models.hf_io import load_model

    out, (r0, _) = run
    exported = dict(load_model(out / "hf").named_parameters())
    assert set(exported) == set(r0["params_step3"])
    for k, v in r0["params_step3"].items():
        assert torch.equal(exported[k].detach(), v), k
