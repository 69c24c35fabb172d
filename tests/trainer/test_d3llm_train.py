"""d3LLM trajectories end to end: scripts/precompute_trajectories.py on a tiny teacher, then
train.objective=d3llm through the Trainer (curriculum logged, exact resume mid-curriculum)."""
import importlib.util
import json
from pathlib import Path

import pytest

from veomni.config.parser import ConfigError, parse_args
from veomni.diffusion.d3llm import block_size_at, mask_ratio_floor

REPO = Path(__file__).resolve().parents[2]
SCRIPT = str(REPO / "scripts" / "precompute_trajectories.py")
CONFIG = str(REPO / "configs" / "quickstart" / "smollm2_mdm.yaml")
SEQ = 64


@pytest.fixture(scope="module")
def sft_corpus(tmp_path_factory):
    import random

    rng = random.Random(0)
    words = ["sum", "the", "list", "of", "numbers", "and", "print", "it", "twice", "then", "return", "value"]
    path = tmp_path_factory.mktemp("sft") / "sft.jsonl"
    with open(path, "w") as f:
        for _ in range(16):
            prompt = " ".join(rng.choice(words) for _ in range(rng.randint(2, 5)))
            response = " ".join(rng.choice(words) for _ in range(rng.randint(4, 14)))
            f.write(json.dumps({"prompt": prompt, "response": response}) + "\n")
    return path


def _precompute(model_dir, corpus, out):
    """The script in this process (a subprocess would re-import torch for seconds)."""
    spec = importlib.util.spec_from_file_location("precompute_trajectories", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script.run(script.build_parser().parse_args([
        "--model", str(model_dir), "--add_mask_token", "--data", str(corpus), "--out", str(out),
        "--max_seq_len", str(SEQ), "--block_length", "8", "--batch_size", "4", "--device", "cpu",
        "--no_progress", "--flush_every", "5"]))


@pytest.fixture(scope="module")
def store(tiny_model_dir, sft_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("traj") / "store"
    first = _precompute(tiny_model_dir, sft_corpus, out)
    assert first["examples"] == 16 and first["decoded"] == 16 and first["stored"] == 16
    assert len(list(out.glob("part-*.npz"))) == 4  # flushed every 5 examples
    again = _precompute(tiny_model_dir, sft_corpus, out)  # resumable: nothing left to do
    assert again["decoded"] == 0 and again["stored"] == 16
    return out


def _argv(model_dir, corpus, store, out, *extra):
    return [CONFIG, f"--model.model_path={model_dir}", f"--data.train_path={corpus}", f"--train.output_dir={out}",
            f"--data.max_seq_len={SEQ}", "--data.data_type=sft", "--data.skip_bad_lines=false",
            "--train.micro_batch_size=2", "--train.global_batch_size=4", "--train.progress_bar=false",
            "--train.export_hf=false", "--train.warmup_steps=0", "--data.eval_split_ratio=0", "--train.eval_steps=0",
            "--train.lr=1e-3", "--train.data_parallel=none", "--train.max_steps=4", "--train.save_steps=2",
            "--train.peak_flops=1e12", f"--data.cache_dir={Path(out).parent / 'cache'}",
            "--train.objective=d3llm", f"--data.trajectory_path={store}", "--train.d3llm.block_sizes=[4,8]",
            "--train.d3llm.entropy_weight=1.0", *extra]


def _rows(out, name="metrics.jsonl"):
    return [json.loads(line) for line in (Path(out) / name).read_text().splitlines()]


def test_precompute_then_train_with_curriculum_and_exact_resume(tiny_model_dir, sft_corpus, store, tmp_path):
    from veomni.trainer.trainer import Trainer

    # Held-out eval every 2 steps: it masks by the orders too, at the curriculum's final state.
    evals = ("--data.eval_split_ratio=0.25", "--train.eval_steps=2", "--train.eval_max_batches=1")
    straight = tmp_path / "straight"
    tr = Trainer(parse_args(argv=_argv(tiny_model_dir, sft_corpus, store, straight, *evals)))
    try:
        spe = len(tr.loader) / tr.grad_accum
        tr.train()
    finally:
        tr.close()
    rows = _rows(straight)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:  # the curriculum of each step, from the step number
        assert r["block_size"] == block_size_at(r["step"] - 1, spe, [4, 8])
        assert r["mask_ratio_floor"] == pytest.approx(mask_ratio_floor(r["step"] - 1, 4, 0.0, 0.8))
        assert 0 < r["loss"] < 20 and r["grad_norm"] > 0

    # Stop after the step-2 checkpoint, then resume: steps 3-4 are bit-identical.
    split = tmp_path / "split"
    tr = Trainer(parse_args(argv=_argv(tiny_model_dir, sft_corpus, store, split, *evals)))
    try:
        for _ in range(2):
            tr.train_step()
            tr.step += 1
        tr.save()
    finally:
        tr.close()
    tr = Trainer(parse_args(argv=_argv(tiny_model_dir, sft_corpus, store, split, *evals)))
    try:
        assert tr.step == 2
        tr.train()
    finally:
        tr.close()
    resumed = _rows(split)
    assert [r["step"] for r in resumed] == [3, 4]
    for a, b in zip(rows[2:], resumed):
        assert (a["loss"], a["grad_norm"], a["block_size"]) == (b["loss"], b["grad_norm"], b["block_size"])
    ev = _rows(straight, "eval_metrics.jsonl")
    assert [r["step"] for r in ev] == [0, 2, 4] and all(0 < r["eval_loss"] < 20 and r["eval_tokens"] > 0 for r in ev)
    assert _rows(split, "eval_metrics.jsonl")[-1] == ev[-1]


@pytest.mark.dist
def test_two_processes_equal_one_process_with_accumulation(tiny_model_dir, sft_corpus, store, tmp_path):
    """The trajectory noise is keyed by the global micro-batch index: 2 DDP ranks x 1 micro-batch
    draw what 1 rank x 2 accumulated micro-batches draw, and the global normalisation makes the
    losses equal."""
    from tests.trainer.test_train_e2e import _metrics, _run

    one, two = tmp_path / "one", tmp_path / "two"
    _run(_argv(tiny_model_dir, sft_corpus, store, one, "--train.max_steps=2")[1:])
    _run(_argv(tiny_model_dir, sft_corpus, store, two, "--train.max_steps=2", "--train.data_parallel=ddp")[1:],
         nproc=2)
    for a, b in zip(_metrics(one), _metrics(two)):
        assert abs(a["loss"] - b["loss"]) < 1e-5 and abs(a["grad_norm"] - b["grad_norm"]) < 1e-4, (a, b)


def test_d3llm_config_errors():
    base = ["--train.objective=d3llm", "--data.data_type=sft"]
    with pytest.raises(ConfigError, match="data.trajectory_path"):
        parse_args(argv=base)
    with pytest.raises(ConfigError, match="data.data_type=sft"):
        parse_args(argv=["--train.objective=d3llm", "--data.trajectory_path=x"])
    with pytest.raises(ConfigError, match="bidirectional"):
        parse_args(argv=[*base, "--data.trajectory_path=x", "--model.attn_mode=block_causal", "--model.block_size=4"])
    with pytest.raises(ConfigError, match="objective=d3llm only"):
        parse_args(argv=["--train.d3llm.complementary=false"])
    with pytest.raises(ConfigError, match="objective=d3llm only"):
        parse_args(argv=["--data.trajectory_path=x"])
    with pytest.raises(ConfigError, match="no epochs"):
        parse_args(argv=[*base, "--data.trajectory_path=x", "--data.streaming=true", "--train.max_steps=3",
                         "--train.d3llm.block_sizes=[16,32]"])
    with pytest.raises(ConfigError, match="record a decoding order for the response tokens only"):
        parse_args(argv=[*base, "--data.trajectory_path=x", "--data.packing=false", "--data.pad_response_with_eos=true"])
    args = parse_args(argv=[*base, "--train.d3llm.random_mask=true"])
    assert args.train.d3llm.random_mask and args.train.d3llm.block_sizes == [32]
    assert parse_args(argv=[*base, "--train.d3llm.random_mask=true", "--data.packing=false",
                            "--data.pad_response_with_eos=true"])
