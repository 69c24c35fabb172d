"""HSDP on a 2x2 mesh (4 gloo ranks: 2 replicas x 2 shards) == one process; its checkpoint
reshards onto one process exactly."""
import pytest
import torch

from tests.distributed._common import TIMEOUT, full_params, global_data, make_optim, run_workers, tiny_model, train

pytestmark = pytest.mark.dist
STEPS = 2


def _worker(out_dir):
    from veomni.checkpoint import save_checkpoint
    from veomni.distributed import init_parallel_state, parallelize

    ps = init_parallel_state("fsdp2", dp_replicate=2, timeout=TIMEOUT)
    model = parallelize(tiny_model(tied=True), ps, {})
    opt, sched = make_optim(model)
    ids, labels = global_data()
    losses, norms = train(model, opt, sched, ps, ids, labels, [slice(ps.dp_rank, ps.dp_rank + 1)], range(STEPS))
    params = full_params(model)
    save_checkpoint(out_dir, STEPS, model, opt, sched, {}, {}, ps)
    if ps.rank == 0:
        torch.save({"losses": losses, "norms": norms, "params": params, "layout": ps.layout,
                    "placements": [type(p).__name__ for p in model.lm_head.weight.placements]}, f"{out_dir}/r.pt")
    ps.destroy()


def test_hsdp_2x2_matches_one_process_and_reshards(tmp_path, monkeypatch):
    from veomni.checkpoint import load_checkpoint
    from veomni.distributed import init_parallel_state

    run_workers(_worker, 4, str(tmp_path), timeout=180)
    got = torch.load(tmp_path / "r.pt", weights_only=False)
    assert got["layout"] == {"dp_replicate": 2, "dp_shard": 2, "sp": 1}
    assert got["placements"] == ["Replicate", "Shard"]  # HSDP: replicate x shard

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    ps = init_parallel_state("none")
    try:
        ids, labels = global_data()
        ref = tiny_model(tied=True)
        opt, sched = make_optim(ref)
        losses, norms = train(ref, opt, sched, ps, ids, labels, [slice(0, 2), slice(2, 4)], range(STEPS))
        assert got["losses"] == pytest.approx(losses, abs=1e-5)
        assert got["norms"] == pytest.approx(norms, rel=1e-5)
        for k, v in full_params(ref).items():
            torch.testing.assert_close(got["params"][k], v, atol=1e-5, rtol=0)
        other = tiny_model(tied=True, seed=9)
        load_checkpoint(tmp_path / "checkpoints" / f"global_step_{STEPS}", other, *make_optim(other), ps)
        for k, v in got["params"].items():
            assert torch.equal(full_params(other)[k], v), k
    finally:
        ps.destroy()
