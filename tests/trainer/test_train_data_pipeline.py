"""The trainer on the new data paths, as users run it: streaming + mixture + workers, packed shards."""
import importlib.util
import json

from tests.trainer.test_train_e2e import REPO, _args, _metrics, _run


def _corpus(root, tag, n, seed):
    import random

    rng = random.Random(seed)
    root.mkdir(parents=True)
    for f in range(2):  # two files: with 2 workers every stream gets a unit
        with open(root / f"{tag}-{f}.jsonl", "w") as fh:
            for i in range(n):
                words = " ".join(rng.choice(["def", "x", "=", "return", "(", ")", tag]) for _ in range(rng.randint(8, 40)))
                fh.write(json.dumps({"text": f"{tag} {i} {words}"}) + "\n")
    return root


def test_streaming_mixture_with_workers_resumes_exactly_after_sigkill(tiny_model_dir, tmp_path):
    a = _corpus(tmp_path / "a", "alpha", 30, 0)
    b = _corpus(tmp_path / "b", "beta", 30, 1)
    data = ["--data.train_path=null", "--data.streaming=true", "--data.num_workers=2",
            f"--data.sources={a},{b}", "--data.mixture_weights=0.7,0.3"]

    def args(out):
        return [*_args(tiny_model_dir, "unused", out, "--train.max_steps=6", "--train.save_steps=3"), *data]

    straight = tmp_path / "straight"
    _run(args(straight))
    rows = _metrics(straight)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    state = json.loads((straight / "checkpoints" / "global_step_3" / "dataloader.json").read_text())
    assert state["kind"] == "streaming" and state["num_workers"] == 2 and list(state["ranks"]) == ["0"]

    killed = tmp_path / "killed"
    proc = _run(args(killed), env={"VEOMNI_DEBUG_KILL_AFTER_STEP": "3"}, check=False)
    assert proc.returncode == -9, proc.stderr[-2000:]
    _run(args(killed))
    resumed = _metrics(killed)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    for x, y in zip(rows, resumed):  # bitwise: the same batches and noise after the resume
        assert x["loss"] == y["loss"] and x["grad_norm"] == y["grad_norm"] and x["tokens_seen"] == y["tokens_seen"]


def test_packed_shards_from_pack_data_train_with_workers(tiny_model_dir, tmp_path):
    a = _corpus(tmp_path / "a", "alpha", 30, 0)
    packed = tmp_path / "packed"
    spec = importlib.util.spec_from_file_location("pack_data", REPO / "scripts" / "pack_data.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    # The tokenizer as the trainer loads it (mask token added by the script as by training).
    assert script.main(["--input", str(a), "--output", str(packed), "--tokenizer", str(tiny_model_dir),
                        "--max_seq_len", "32", "--rows_per_shard", "16", "--no_progress"]) == 0
    out = tmp_path / "run"
    proc = _run([*_args(tiny_model_dir, str(packed), out, "--train.max_steps=2"), "--data.num_workers=2"])
    assert [r["step"] for r in _metrics(out)] == [1, 2]
    assert "PackedShardDataset" in proc.stderr + proc.stdout
