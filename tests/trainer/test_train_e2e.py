"""The training entry point end to end, as users run it (subprocesses of tasks/train_torch.py)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TRAIN = str(REPO / "tasks" / "train_torch.py")
CONFIG = str(REPO / "configs" / "quickstart" / "smollm2_mdm.yaml")


def _env(extra=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.update(extra or {})
    return env


def _args(model_dir, corpus, out, *extra):
    return [f"--model.model_path={model_dir}", f"--data.train_path={corpus}", f"--train.output_dir={out}",
            "--data.max_seq_len=32", "--train.micro_batch_size=2", "--train.global_batch_size=4",
            "--train.progress_bar=false", "--train.export_hf=false", "--train.warmup_steps=1",
            "--data.eval_split_ratio=0", "--train.eval_steps=0", "--train.lr=1e-3",
            f"--data.cache_dir={Path(out).parent / 'cache'}", *extra]


def _run(args, env=None, nproc=1, check=True):
    if nproc == 1:
        cmd = [sys.executable, TRAIN, CONFIG, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               "--master_port=0", "--rdzv_backend=c10d", "--rdzv_endpoint=localhost:0", TRAIN, CONFIG, *args]
    proc = subprocess.run(cmd, env=_env(env), capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def _metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def _eval_metrics(out):
    return [json.loads(line) for line in (Path(out) / "eval_metrics.jsonl").read_text().splitlines()]


# Held-out eval every 2 steps on a fixed subset of 2 batches: part of the state a resume must reproduce.
EVAL = ("--data.eval_split_ratio=0.2", "--train.eval_steps=2", "--train.eval_max_batches=2")


def test_run_outputs_and_exact_resume_after_sigkill(tiny_model_dir, tiny_corpus, tmp_path):
    straight = tmp_path / "straight"
    _run(_args(tiny_model_dir, tiny_corpus, straight, "--train.max_steps=6", "--train.save_steps=3",
               "--train.export_hf=true", *EVAL))
    rows = _metrics(straight)
    evals = _eval_metrics(straight)
    assert [r["step"] for r in evals] == [0, 2, 4, 6]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for key in ("step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "tokens_seen"):
        assert key in rows[0], key
    assert rows[0]["mfu"] is not None and 0 < rows[0]["mfu"] < 1
    assert (straight / "resolved_config.yaml").exists() and (straight / "loss_curve.png").exists()
    assert sorted(p.name for p in (straight / "checkpoints").iterdir()) == ["global_step_3", "global_step_6"]
    assert (straight / "hf" / "config.json").exists()
    cfg = json.loads((straight / "hf" / "config.json").read_text())
    assert cfg["dllm_attn_mode"] == "bidirectional" and isinstance(cfg["mask_token_id"], int)

    # Same command, killed with SIGKILL right after the step-3 checkpoint, then re-run unchanged.
    killed = tmp_path / "killed"
    args = _args(tiny_model_dir, tiny_corpus, killed, "--train.max_steps=6", "--train.save_steps=3", *EVAL)
    proc = _run(args, env={"VEOMNI_DEBUG_KILL_AFTER_STEP": "3"}, check=False)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert [r["step"] for r in _metrics(killed)] == [1, 2, 3]
    _run(args)
    resumed = _metrics(killed)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(rows, resumed):  # bitwise: CPU fp32, same noise, same data order, same RNG
        assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"] and a["lr"] == b["lr"], (a, b)
        assert a["tokens_seen"] == b["tokens_seen"]
    assert _eval_metrics(killed) == evals  # the same eval batches and noise, bit for bit

    # A corrupted newest checkpoint is reported and skipped: the run resumes from step 3 and
    # reproduces steps 4-6 exactly.
    victim = next((straight / "checkpoints" / "global_step_6").rglob("*.distcp"))
    victim.write_bytes(b"\0" * victim.stat().st_size)
    proc = _run(_args(tiny_model_dir, tiny_corpus, straight, "--train.max_steps=6", "--train.save_steps=3", *EVAL))
    assert "global_step_6" in proc.stderr + proc.stdout
    again = _metrics(straight)
    assert [r["loss"] for r in again] == [r["loss"] for r in rows]


@pytest.mark.dist
@pytest.mark.parametrize("mode", ["fsdp2", "ddp"])
def test_two_processes_equal_one_process_with_accumulation(tiny_model_dir, tiny_corpus, tmp_path, mode):
    """2 ranks x 1 micro-batch == 1 rank x 2 accumulated micro-batches (same data, same noise)."""
    one = tmp_path / "one"
    _run(_args(tiny_model_dir, tiny_corpus, one, "--train.max_steps=3", "--train.data_parallel=none"))
    two = tmp_path / "two"
    _run(_args(tiny_model_dir, tiny_corpus, two, "--train.max_steps=3", f"--train.data_parallel={mode}"), nproc=2)
    for a, b in zip(_metrics(one), _metrics(two)):
        assert abs(a["loss"] - b["loss"]) < 1e-5 and abs(a["grad_norm"] - b["grad_norm"]) < 1e-4, (a, b)
        assert a["tokens_seen"] == b["tokens_seen"]


@pytest.mark.dist
def test_resume_on_a_different_world_size(tiny_model_dir, tiny_corpus, tmp_path):
    out = tmp_path / "ws"
    base = _args(tiny_model_dir, tiny_corpus, out, "--train.save_steps=2", "--train.data_parallel=fsdp2")
    _run([*base, "--train.max_steps=2"], nproc=2)
    proc = _run([*base, "--train.max_steps=4"])  # one process picks up the 2-rank checkpoint
    assert "resumed from" in proc.stderr + proc.stdout
    assert [r["step"] for r in _metrics(out)] == [1, 2, 3, 4]


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tiny_model_dir, tiny_corpus, tmp_path):
    out = tmp_path / "nan"
    proc = _run(_args(tiny_model_dir, tiny_corpus, out, "--train.max_steps=8", "--train.save_steps=1",
                      "--train.lr=1e30", "--train.max_grad_norm=0", "--train.warmup_steps=0",
                      "--train.lr_scheduler=constant", "--train.max_consecutive_skips=3"), check=False)
    assert proc.returncode != 0
    assert "NonFiniteLossError" in proc.stderr and "last good checkpoint" in proc.stderr
    assert "3 consecutive steps" in proc.stderr
    rows = _metrics(out)
    assert [r["skipped"] for r in rows][-3:] == [1, 1, 1] and rows[-1]["skipped_steps"] >= 3
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts and all(c.startswith("global_step_") and ".tmp" not in c for c in ckpts)
    # Whatever was saved holds finite weights (skipped steps never touch them; save() checks).
    import torch

    from veomni.inference.loading import load_for_inference

    newest = max(ckpts, key=lambda c: int(c.rsplit("_", 1)[1]))
    model, _ = load_for_inference(str(out / "checkpoints" / newest), device="cpu")
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_unknown_key_is_an_error(tiny_model_dir, tiny_corpus, tmp_path):
    proc = _run(_args(tiny_model_dir, tiny_corpus, tmp_path / "x", "--train.max_step=3"), check=False)
    assert proc.returncode != 0 and "train.max_steps" in proc.stderr
