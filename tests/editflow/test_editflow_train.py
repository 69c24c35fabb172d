"""train.objective=editflow end to end through tasks/train_torch.py: metrics, the exported EditFlow model
reloads and samples via tasks/infer.py, and a SIGKILLed run resumes bit for bit."""
import json

import pytest

from tests.trainer.test_train_e2e import _args, _metrics, _run

EF = ("--train.objective=editflow", "--data.packing=false", "--train.editflow.x0_sampler=masks:8",
      "--data.eval_split_ratio=0.2", "--train.eval_steps=2", "--train.eval_max_batches=2")


def test_editflow_train_export_infer_and_exact_resume(tiny_model_dir, tiny_corpus, tmp_path, capsys):
    straight = tmp_path / "straight"
    _run(_args(tiny_model_dir, tiny_corpus, straight, "--train.max_steps=4", "--train.save_steps=2",
               "--train.export_hf=true", *EF))
    rows = _metrics(straight)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(r["loss"] > 0 and r["grad_norm"] > 0 for r in rows)
    cfg = json.loads((straight / "hf" / "config.json").read_text())
    assert cfg["dllm_editflow"] is True and cfg["dllm_logit_shift"] is True

    # the exported model reloads with its trained heads and samples through the CLI (live view on a pipe)
    from veomni.inference.cli import main

    assert main(["--model_path", str(straight / "hf"), "--prompt", "def f", "--prompt", "x = 1", "--live", "--stats",
                 "--infer.alg=editflow", "--infer.editflow.tau=0.25", "--infer.editflow.init_masks=4",
                 "--infer.editflow.max_length=32"]) == 0
    out = capsys.readouterr().out
    assert "stats: nfe=" in out and "=== [0] def f" in out and "=== [1] x = 1" in out, out

    killed = tmp_path / "killed"
    args = _args(tiny_model_dir, tiny_corpus, killed, "--train.max_steps=4", "--train.save_steps=2", *EF)
    proc = _run(args, env={"VEOMNI_DEBUG_KILL_AFTER_STEP": "2"}, check=False)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert [r["step"] for r in _metrics(killed)] == [1, 2]
    _run(args)
    resumed = _metrics(killed)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(rows, resumed):  # bitwise: CPU fp32, same alignment draws, data order, RNG
        assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"], (a, b)
    ev_a = [json.loads(x) for x in (straight / "eval_metrics.jsonl").read_text().splitlines()]
    ev_b = [json.loads(x) for x in (killed / "eval_metrics.jsonl").read_text().splitlines()]
    assert [e["eval_loss"] for e in ev_a] == [e["eval_loss"] for e in ev_b]


def test_editflow_config_refusals():
    from veomni.config.parser import ConfigError, parse_args
    from veomni.config.schema import Arguments

    base = ["--model.model_path=x", "--train.objective=editflow", "--train.data_parallel=none"]
    with pytest.raises(ConfigError, match="data.packing=false"):
        parse_args(Arguments, base)
    with pytest.raises(ConfigError, match="bidirectional"):
        parse_args(Arguments, base + ["--data.packing=false", "--model.attn_mode=causal"])
    with pytest.raises(ConfigError, match="meta_init"):
        parse_args(Arguments, base[:2] + ["--data.packing=false", "--train.data_parallel=fsdp2"])
    with pytest.raises(ConfigError, match="deepspeed"):
        parse_args(Arguments, base[:2] + ["--data.packing=false", "--train.data_parallel=deepspeed",
                                          "--train.zero_stage=2"])
    with pytest.raises(ConfigError, match="train.objective=editflow only"):
        parse_args(Arguments, ["--model.model_path=x", "--train.editflow.x0_sampler=empty"])


@pytest.mark.dist
@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_editflow_two_ranks_equal_one(tiny_model_dir, tiny_corpus, tmp_path, mode):
    """2 data-parallel ranks == 1 process with 2 accumulation steps: same rows, same (t, u) draws (keyed by
    the global micro-batch index), the global denominator counts the sequences of both ranks."""
    ef = ("--train.objective=editflow", "--data.packing=false", "--train.editflow.x0_sampler=masks:8",
          "--model.meta_init=false")
    one = tmp_path / "one"
    _run(_args(tiny_model_dir, tiny_corpus, one, "--train.max_steps=3", "--train.data_parallel=none", *ef))
    two = tmp_path / "two"
    _run(_args(tiny_model_dir, tiny_corpus, two, "--train.max_steps=3", f"--train.data_parallel={mode}", *ef), nproc=2)
    assert len(_metrics(one)) == len(_metrics(two)) == 3
    for a, b in zip(_metrics(one), _metrics(two)):
        assert abs(a["loss"] - b["loss"]) < 1e-5 * max(1.0, abs(a["loss"])), (a, b)
        assert abs(a["grad_norm"] - b["grad_norm"]) < 1e-4 * max(1.0, a["grad_norm"]), (a, b)
        assert a["tokens_seen"] == b["tokens_seen"]
