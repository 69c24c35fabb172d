"""2 ranks (FSDP2 and DDP, gloo, CPU fp32) == 1 process with gradient accumulation x2.

One spawn runs both modes (ranks share one process group, each mode gets its own ParallelState);
the single-process reference runs in the test process. 3 AdamW steps, loss normalised by the global
token count, gradient clipping active.
"""
import pytest
import torch

from tests.distributed._common import (
    GLOBAL_ROWS, STEPS, TIMEOUT, full_params, global_data, make_optim, run_workers, tiny_model, train,
)

pytestmark = pytest.mark.dist
ATOL = 1e-5


def _worker(out_path):
    import torch.distributed as dist

    from veomni.distributed import init_parallel_state, parallelize

    dist.init_process_group("gloo", timeout=TIMEOUT)  # owned here; both states below reuse it
    ids, labels = global_data()
    results = {}
    runs = (("fsdp2", "fsdp2", True, True, 1), ("ddp", "ddp", False, False, 1),
            # Accumulation x2 per rank, gradients communicated on the last micro-batch only.
            ("fsdp2_accum", "fsdp2", True, False, 2), ("ddp_accum", "ddp", False, False, 2))
    for name, mode, tied, ac, n_micro in runs:
        ps = init_parallel_state(dp_mode=mode)
        half = GLOBAL_ROWS // ps.dp_size
        start = ps.dp_rank * half
        rows = [slice(start + i * half // n_micro, start + (i + 1) * half // n_micro) for i in range(n_micro)]
        model = parallelize(tiny_model(tied=tied), ps, {"gradient_checkpointing": ac})
        opt, sched = make_optim(model)
        losses, norms = train(model, opt, sched, ps, ids, labels, rows, range(STEPS), sync_last_only=n_micro > 1)
        results[name] = {"losses": losses, "norms": norms, "params": full_params(model),
                         "dp_rank": ps.dp_rank, "dp_size": ps.dp_size}
        ps.destroy()
    # FSDP2 does not broadcast rank 0's weights: differently seeded ranks must be refused.
    ps = init_parallel_state(dp_mode="fsdp2")
    try:
        parallelize(tiny_model(seed=dist.get_rank()), ps)
        results["mismatch_error"] = None
    except RuntimeError as exc:
        results["mismatch_error"] = str(exc)
    ps.destroy()
    if dist.get_rank() == 0:
        torch.save(results, out_path)
    dist.barrier()
    dist.destroy_process_group()


def _train_reference(tied):
    from veomni.distributed import init_parallel_state

    ps = init_parallel_state(dp_mode="none")
    try:
        ids, labels = global_data()
        model = tiny_model(tied=tied)
        opt, sched = make_optim(model)
        half = GLOBAL_ROWS // 2
        # Gradient accumulation x2: the two ranks' halves as two micro-batches of one process.
        losses, norms = train(model, opt, sched, ps, ids, labels, [slice(0, half), slice(half, None)],
                              range(STEPS))
        return {"losses": losses, "norms": norms, "params": full_params(model)}
    finally:
        ps.destroy()


@pytest.fixture(scope="module")
def reference():
    return {tied: _train_reference(tied) for tied in (False, True)}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("equiv") / "results.pt"
    run_workers(_worker, 2, str(out))
    return torch.load(out, weights_only=False)


@pytest.mark.parametrize("mode,tied", [("fsdp2", True), ("ddp", False), ("fsdp2_accum", True),
                                       ("ddp_accum", False)])
def test_two_ranks_match_one_process(results, reference, mode, tied):
    ref, got = reference[tied], results[mode]
    assert got["dp_size"] == 2
    assert got["losses"] == pytest.approx(ref["losses"], abs=ATOL)
    # The losses moved, so a no-op optimizer would not pass.
    assert abs(ref["losses"][-1] - ref["losses"][0]) > 1e-3
    assert set(got["params"]) == set(ref["params"])
    for name, p in ref["params"].items():
        torch.testing.assert_close(got["params"][name], p, atol=ATOL, rtol=0, msg=lambda m: f"{mode} {name}: {m}")


@pytest.mark.parametrize("mode,tied", [("fsdp2", True), ("ddp", False)])
def test_clip_grad_norm_is_global(results, reference, mode, tied):
    ref = reference[tied]
    assert results[mode]["norms"] == pytest.approx(ref["norms"], rel=1e-5)
    assert max(ref["norms"]) > 0.5  # clipping (max_norm=0.5) was active, so its effect is tested too


def test_params_differ_from_init(results):
    init = dict(tiny_model(tied=True).named_parameters())
    moved = max((results["fsdp2"]["params"][k] - p).abs().max().item() for k, p in init.items())
    assert moved > 1e-4


def test_fsdp2_refuses_ranks_with_different_weights(results):
    assert "ranks hold different initial weights" in (results["mismatch_error"] or "")
