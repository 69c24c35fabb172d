"""DeepSpeed ZeRO-2/3 on 2 ranks (gloo, CPU fp32) == 1 process, through veomni.distributed's step API.

One spawn trains ZeRO-2, ZeRO-2 + CPU optimizer offload, ZeRO-3 and ZeRO-3 + CPU offload + activation
checkpointing (every ZeRO-3 parameter really partitioned: stage3_param_persistence_threshold=0) with
gradient accumulation x2 and active clipping, on the same loop as tests/distributed/test_equivalence.py.
Then, on the trained ZeRO-3 engine: skipped steps (finite and NaN gradients) leave weights and Adam
state untouched and do not leak into the next step; a checkpoint is saved (DeepSpeed shards inside
our layout), exported offline by scripts/export_hf.py, and refused by an engine of another ZeRO
stage.
"""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from tests.distributed._common import (
    GLOBAL_ROWS, STEPS, TIMEOUT, full_params, global_data, make_optim, run_workers, tiny_model, train,
)

pytest.importorskip("deepspeed", reason="deepspeed is not installed (DS_BUILD_OPS=0 pip install -e '.[deepspeed]')")
pytestmark = pytest.mark.dist
ATOL = 1e-5
RUNS = {"zero2": (2, "none"), "zero2_offload": (2, "cpu"), "zero3": (3, "none"), "zero3_offload": (3, "cpu")}


def _full(model, ps):
    from veomni.checkpoint import gather_full_state_dict

    return gather_full_state_dict(model, ps)  # main rank only


def _adam_steps(opt):
    return sorted(int(s["step"]) for s in opt.base.state.values())


def _skip_checks(model, opt, sched, ps, ids, labels, rows):
    """Skipped steps keep everything; then one more real step on batch 0."""
    from veomni.distributed import backward, clip_grad_norm_, no_grad_sync

    before, adam = _full(model, ps), _adam_steps(opt)
    for poison in (1.0, float("nan")):  # finite gradient (e.g. a non-finite loss elsewhere), NaN gradient
        for i, r in enumerate(rows):
            with no_grad_sync(model, skip=i < len(rows) - 1):
                out = model(input_ids=ids[1, r], attn_mode="bidirectional",
                            loss_fn=lambda h, w: (h @ w.t()).float().logsumexp(-1).sum() * poison)
                backward(model, out.loss)
        norm = clip_grad_norm_(model, 0.5)
        assert (norm == norm) == (poison == 1.0), norm
        opt.zero_grad()  # the trainer's skip: no step(), then zero_grad()
    skipped_ok = (_adam_steps(opt) == adam) and all(torch.equal(v, before[k]) for k, v in _full(model, ps).items())
    losses, norms = train(model, opt, sched, ps, ids, labels, rows, [0], sync_last_only=True)
    return skipped_ok, losses, norms


def _worker(out_dir):
    import torch.distributed as dist

    from veomni.checkpoint import load_checkpoint, save_checkpoint
    from veomni.distributed import bind_optimizer, init_parallel_state, parallelize
    from veomni.distributed.deepspeed_engine import DeepSpeedOptions

    dist.init_process_group("gloo", timeout=TIMEOUT)
    out_dir = Path(out_dir)
    extra = out_dir / "ds_extra.json"
    if dist.get_rank() == 0:
        extra.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0}}))
    dist.barrier()
    ids, labels = global_data()
    half = GLOBAL_ROWS // 2
    results, engines = {}, {}
    ps = init_parallel_state(dp_mode="deepspeed")  # reuses the group; shared by the engines below
    for name, (stage, offload) in RUNS.items():
        rows = [slice(ps.dp_rank * half + i, ps.dp_rank * half + i + 1) for i in range(half)]  # accumulation x2
        opts = DeepSpeedOptions(zero_stage=stage, offload_optimizer=offload, micro_batch_size=1, grad_accum=len(rows),
                                max_grad_norm=0.5, config_file=str(extra))
        ac = name == "zero3_offload"  # activation checkpointing rides along: same numbers expected
        model = parallelize(tiny_model(tied=stage == 3), ps, {"deepspeed": opts, "gradient_checkpointing": ac})
        opt, sched = make_optim(model)
        opt = bind_optimizer(model, opt)
        inner = model.module
        res = {"partitioned": all(p.numel() == 0 and 0 < p.ds_tensor.numel() < p.ds_numel for p in inner.parameters())
               if stage == 3 else None}
        res["losses"], res["norms"] = train(model, opt, sched, ps, ids, labels, rows, range(STEPS), sync_last_only=True)
        res["params"] = _full(model, ps)
        if name == "zero3":
            save_checkpoint(out_dir / "run", STEPS, model, opt, sched, {"epoch": 0}, {}, ps)
            res["skipped_ok"], res["after_skip_losses"], _ = _skip_checks(model, opt, sched, ps, ids, labels, rows)
            res["after_skip_params"] = _full(model, ps)
        results[name] = res
        engines[name] = (model, opt, sched)
    # A ZeRO-3 checkpoint offered to a ZeRO-2 engine: a clear setting error, nothing loaded.
    model, opt, sched = engines["zero2"]
    try:
        load_checkpoint(out_dir / "run" / "checkpoints" / f"global_step_{STEPS}", model, opt, sched, ps)
        results["stage_mismatch"] = None
    except ValueError as exc:
        results["stage_mismatch"] = str(exc)
    if dist.get_rank() == 0:
        torch.save(results, out_dir / "results.pt")
    dist.barrier()
    ps.destroy()


def _reference(extra_step: bool):
    from veomni.distributed import init_parallel_state

    ps = init_parallel_state(dp_mode="none")
    try:
        ids, labels = global_data()
        out = {}
        for tied in (False, True):
            model = tiny_model(tied=tied)
            opt, sched = make_optim(model)
            rows = [slice(i, i + 1) for i in range(GLOBAL_ROWS)]
            losses, norms = train(model, opt, sched, ps, ids, labels, rows, range(STEPS))
            out[tied] = {"losses": losses, "norms": norms, "params": full_params(model)}
            if extra_step:  # the step after the skipped ones: batch 0 again
                out[tied]["after_skip_losses"], _ = train(model, opt, sched, ps, ids, labels, rows, [0])
                out[tied]["after_skip_params"] = full_params(model)
        return out
    finally:
        ps.destroy()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("deepspeed")
    run_workers(_worker, 2, str(out), timeout=300)
    res = torch.load(out / "results.pt", weights_only=False)
    res["dir"] = out
    return res


@pytest.fixture(scope="module")
def reference():
    return _reference(extra_step=True)


def _assert_params(got, want):
    assert set(got) == set(want) | ({"lm_head.weight"} & set(got))
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=ATOL, rtol=0, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("name", list(RUNS))
def test_zero_equals_one_process(results, reference, name):
    res, ref = results[name], reference[RUNS[name][0] == 3]
    if RUNS[name][0] == 3:
        assert res["partitioned"]  # the comparison is about sharded parameters, not replicas
    assert res["losses"] == pytest.approx(ref["losses"], abs=ATOL)
    assert res["norms"] == pytest.approx(ref["norms"], rel=ATOL)
    assert min(ref["norms"]) > 0.5  # clipping was active at every step
    _assert_params(res["params"], ref["params"])


def test_skipped_steps_drop_gradients_and_keep_state(results, reference):
    res, ref = results["zero3"], reference[True]
    assert res["skipped_ok"]  # weights bit-identical, Adam step counts unchanged
    # The next real step sees only its own gradient (a leaked skipped gradient would change it).
    assert res["after_skip_losses"] == pytest.approx(ref["after_skip_losses"], abs=ATOL)
    _assert_params(res["after_skip_params"], ref["after_skip_params"])


def test_checkpoint_layout_offline_export_and_stage_mismatch(results):
    from veomni.checkpoint import read_manifest

    ckpt = results["dir"] / "run" / "checkpoints" / f"global_step_{STEPS}"
    manifest = read_manifest(ckpt)
    assert manifest["engine"] == "deepspeed" and manifest["zero_stage"] == 3 and manifest["world_size"] == 2
    assert {"ds/zero_pp_rank_0_mp_rank_00_optim_states.pt", "ds/zero_pp_rank_1_mp_rank_00_optim_states.pt",
            "scheduler.pt", "rng_rank0.pt", "rng_rank1.pt", "dataloader.json"} <= set(manifest["files"])
    assert "ZeRO-3 shards of 2 process(es); this run is ZeRO-2 on 2" in results["stage_mismatch"]

    spec = importlib.util.spec_from_file_location(
        "export_hf_script", Path(__file__).resolve().parents[2] / "scripts" / "export_hf.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    model = script.load_checkpoint_model(ckpt)  # one process, no DeepSpeed engine: zero_to_fp32
    got = {k: v for k, v in model.state_dict().items() if not k.endswith("inv_freq")}
    saved = results["zero3"]["params"]  # gathered live from the engine when the checkpoint was taken
    assert set(got) == set(saved)
    for name, value in saved.items():
        assert torch.equal(got[name], value), name
