"""Generation side of evaluation: eval/generate.py, the AR decode loop, and run_eval.sh end to end.

The model is a tiny random Llama (2 layers, width 48) with the real SmolLM2 tokenizer plus a mask
token, saved as an HF dir: every benchmark prompt tokenises as in real runs, and a forward costs ~ms.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.eval.conftest import REPO_ROOT
from tests.models.tiny import save_tiny_model

sys.path.insert(0, str(REPO_ROOT / "eval"))


def make_tiny_dllm(path: Path, tokenizer_dir, seed: int = 0, std: float = 0.3) -> Path:
    from veomni.models.hf_io import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    return save_tiny_model(path, tok, "llama", std=std, seed=seed, max_position_embeddings=4096,
                           tie_word_embeddings=True, pad_token_id=tok.pad_token_id or tok.eos_token_id,
                           bos_token_id=tok.bos_token_id, dllm_logit_shift=True)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smollm2_dir):
    return make_tiny_dllm(tmp_path_factory.mktemp("tiny_dllm") / "hf", smollm2_dir)


def run_generate(argv):
    import generate as gen_cli  # eval/generate.py

    return gen_cli.main([str(a) for a in argv])


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


SMALL = ["--infer.max_new_tokens=8", "--infer.steps=4", "--infer.alg=p2", "--infer.temperature=0.8"]


def test_generate_completion_diffusion_deterministic(tiny_dir, data_dir, tmp_path):
    """The CLI's samples == the Python API's for the same seed; another seed gives other samples."""
    from veomni.eval.generation import HUMANEVAL_STOP, completion_samples
    from veomni.eval.tasks import get_task
    from veomni.inference.loading import load_for_inference

    out = tmp_path / "a.jsonl"
    assert run_generate(["--task", "humaneval", "--model_path", tiny_dir, "--data_dir", data_dir,
                         "--limit", 2, "--device", "cpu", "--out", out, *SMALL]) == 0
    rows = read_jsonl(out)
    problems = get_task("humaneval", data_dir).problems[:2]
    assert [r["task_id"] for r in rows] == [p.task_id for p in problems]
    assert all(set(r) == {"task_id", "completion"} and isinstance(r["completion"], str) for r in rows)
    model, tok = load_for_inference(tiny_dir, device="cpu")
    cfg = dict(max_new_tokens=8, steps=4, alg="p2", temperature=0.8)
    from veomni.diffusion.sampling import GenerationConfig

    again = completion_samples(problems, model, tok, GenerationConfig(**cfg), mode="diffusion",
                               stop_strings=HUMANEVAL_STOP, seed=0)
    other = completion_samples(problems, model, tok, GenerationConfig(**cfg), mode="diffusion",
                               stop_strings=HUMANEVAL_STOP, seed=1)
    assert again == rows  # same seed -> same samples
    assert other != rows  # another seed draws other tokens (T = 0.8)


def test_generate_ar_mode_n_samples(tiny_dir, data_dir, tmp_path):
    out = tmp_path / "ar.jsonl"
    assert run_generate(["--task", "mbpp_plus", "--model_path", tiny_dir, "--data_dir", data_dir,
                         "--limit", 2, "--n_samples", 2, "--batch_size", 3, "--mode", "ar", "--out", out,
                         "--infer.max_new_tokens=6", "--infer.temperature=0.8"]) == 0
    rows = read_jsonl(out)
    assert len(rows) == 4 and rows[0]["task_id"] == rows[1]["task_id"] != rows[2]["task_id"]
    assert rows[0]["completion"] != rows[1]["completion"]  # two samples of one problem differ (seeds)


def test_generate_infill_fixed_and_avg(tiny_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "inf.jsonl"
    base = ["--task", "humaneval_infill_single", "--model_path", tiny_dir, "--data_dir", data_dir,
            "--limit", 2, "--infill_steps", 1, *SMALL[2:]]
    assert run_generate(base + ["--out", out, "--infill_length", "fixed:4"]) == 0
    rows = read_jsonl(out)
    assert len(rows) == 2 and all(r["completion"] for r in rows)
    capsys.readouterr()
    assert run_generate(base + ["--out", out, "--infill_length", "avg"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [f["length"] for f in summary["files"]] == [4, 8, 16, 32, 64]
    assert all(len(read_jsonl(f["samples"])) == 2 for f in summary["files"])


def test_generate_refuses_bad_input(tiny_dir, data_dir, tmp_path):
    common = ["--model_path", tiny_dir, "--data_dir", data_dir, "--out", tmp_path / "x.jsonl"]
    assert run_generate(["--task", "humaneval_infill_single", "--mode", "ar", *common]) == 2
    assert run_generate(["--task", "humaneval_infill_single", "--infill_length", "fixed:0", *common]) == 2
    assert run_generate(["--task", "humaneval_infill_single", "--infill_steps", "0", *common]) == 2
    # Infilling takes its steps from --infill_steps: a lone --infer.steps would be silently unused.
    assert run_generate(["--task", "humaneval_infill_single", "--infer.steps=8", *common]) == 2
    assert run_generate(["--task", "nope", *common]) == 2
    assert run_generate(["--task", "humaneval", "--infer.nope=1", *common]) == 2


def test_cut_completion_stops_at_eos_and_stop_strings(smollm2_dir):
    from veomni.eval.generation import HUMANEVAL_STOP, cut_completion
    from veomni.models.hf_io import load_tokenizer

    tok = load_tokenizer(smollm2_dir)
    ids = tok("    return x\n\ndef g():\n    pass", add_special_tokens=False).input_ids
    assert cut_completion(tok, ids, [], HUMANEVAL_STOP) == "    return x\n"
    eos = tok.eos_token_id
    assert cut_completion(tok, ids[:3] + [eos] + ids[3:], [eos], []) == tok.decode(ids[:3])


def test_ar_generate_matches_uncached_greedy_batched(tiny_dir):
    """KV-cached, left-padded batch decoding == a plain full-forward greedy loop per row."""
    from veomni.eval.generation import ar_generate
    from veomni.inference.generate import left_pad
    from veomni.models.hf_io import load_model

    model = load_model(tiny_dir).eval()
    mask_id = model.config.mask_token_id
    rows = [[5, 17, 300, 42, 9], [77, 1000]]
    ids, attn = left_pad(rows, 0)
    got = ar_generate(model, ids, attn, max_new_tokens=6, eos_token_id=None, banned_ids=[mask_id])
    for b, row in enumerate(rows):
        x = torch.tensor([row])
        with torch.no_grad():
            for _ in range(6):
                logits = model(x, attn_mode="causal").logits[0, -1]
                logits[mask_id] = float("-inf")
                x = torch.cat([x, logits.argmax().view(1, 1)], 1)
        assert got[b].tolist() == x[0, len(row):].tolist()


def test_ar_generate_stops_rows_at_eos(tiny_dir):
    from veomni.eval.generation import ar_generate
    from veomni.models.hf_io import load_model

    model = load_model(tiny_dir).eval()
    ids = torch.tensor([[5, 17, 300]])
    free = ar_generate(model, ids, max_new_tokens=5)[0].tolist()
    eos = free[1]  # pretend the 2nd greedy token is EOS: everything after it becomes EOS/pad
    got = ar_generate(model, ids, max_new_tokens=5, eos_token_id=eos)[0].tolist()
    assert got[:2] == free[:2] and got[2:] == [eos] * 3


def _open_dllm_sequence(tok, prefix, suffix, middle_len):
    """Open-dLLM eval/eval_infill/eval_infill.py `infilling()`: the model input for one problem."""
    return (tok.encode(prefix, add_special_tokens=True) + [tok.mask_token_id] * middle_len
            + tok.encode(suffix, add_special_tokens=False))


def _spy_infill(monkeypatch, tok):
    """Record, per row of every infill() call, the sequence the model would see and the step count.
    The sampler itself is not run (other tests do): the middle comes back as one repeated token."""
    import veomni.diffusion.sampling as sampling

    seen = []

    def spy(model, pre, suf, n_middle, cfg, prefix_attention_mask=None, suffix_attention_mask=None, **kw):
        for b in range(pre.shape[0]):
            row_pre = pre[b][prefix_attention_mask[b].bool()].tolist()
            row_suf = suf[b][suffix_attention_mask[b].bool()].tolist()
            seen.append((tuple(row_pre + [tok.mask_token_id] * n_middle + row_suf), cfg.steps))
        middle = torch.full((pre.shape[0], n_middle), tok.encode("x", add_special_tokens=False)[0])
        return sampling.InfillOutput(middle=middle, sequences=torch.cat([pre, middle, suf], 1))

    monkeypatch.setattr(sampling, "infill", spy)
    return seen


def test_infill_defaults_follow_open_dllm(tiny_dir, data_dir, tmp_path, monkeypatch):
    """Issue 8, item 15: with no infilling options, generate.py builds exactly Open-dLLM's model
    inputs (prefix with special tokens + as many masks as the reference middle has tokens + suffix;
    SantaCoder-FIM's prefix is prompt + newline) and runs 64 steps for every middle."""
    from veomni.eval.tasks import get_task
    from veomni.models.hf_io import load_tokenizer

    tok = load_tokenizer(tiny_dir)
    fim_dir = tmp_path / "fim"
    (fim_dir / "santacoder_fim").mkdir(parents=True)
    rows = [{"name": "a", "language": "py", "prompt": "def f(x):", "suffix": "\n    return y\n",
             "canonical_solution": "    y = x + 1"},
            {"name": "b", "language": "py", "prompt": "import os\ndef g():", "suffix": "\n",
             "canonical_solution": "    return os.sep * 3"}]
    (fim_dir / "santacoder_fim" / "santacoder-fim-task.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cases = [("humaneval_infill_single", data_dir, lambda p: p.prompt),
             ("santacoder_fim", fim_dir, lambda p: p.prompt + "\n")]
    for task_name, task_dir, open_dllm_prefix in cases:
        seen = _spy_infill(monkeypatch, tok)
        assert run_generate(["--task", task_name, "--model_path", tiny_dir, "--data_dir", task_dir, "--limit", 3,
                             "--batch_size", 2, "--out", tmp_path / f"{task_name}.jsonl",
                             "--infer.alg=p2", "--infer.temperature=0.6", "--infer.top_p=0.95"]) == 0
        problems = get_task(task_name, task_dir).problems[:3]
        expected = sorted((tuple(_open_dllm_sequence(tok, open_dllm_prefix(p), p.suffix,
                                                     len(tok.encode(p.middle, add_special_tokens=False)))), 64)
                          for p in problems)
        assert sorted(seen) == expected, task_name


def test_infill_step_ratio_and_raw_prompt_are_options(tiny_dir, tmp_path, monkeypatch):
    from veomni.models.hf_io import load_tokenizer

    tok = load_tokenizer(tiny_dir)
    (tmp_path / "santacoder_fim").mkdir()
    row = {"name": "a", "language": "py", "prompt": "def f(x):", "suffix": "\n", "canonical_solution": "    pass"}
    (tmp_path / "santacoder_fim" / "santacoder-fim-task.jsonl").write_text(json.dumps(row) + "\n")
    seen = _spy_infill(monkeypatch, tok)
    assert run_generate(["--task", "santacoder_fim", "--model_path", tiny_dir, "--data_dir", tmp_path,
                         "--out", tmp_path / "s.jsonl", "--infill_length", "fixed:5", "--infill_steps", "ratio",
                         "--infer.steps=6", "--infer.max_new_tokens=4", "--santacoder_prompt_newline=false",
                         "--infer.alg=p2"]) == 0
    expected = _open_dllm_sequence(tok, "def f(x):", "\n", 5)  # raw prompt, 5 masks
    assert seen == [(tuple(expected), 8)]  # ceil(5 * 6 / 4)


def _run_script(script, model_dir, data_dir, out_dir, tasks, extra_env):
    env = dict(os.environ, LIMIT="2", MAX_NEW_TOKENS="8", STEPS="4", N_WORKERS="2", OUT_DIR=str(out_dir),
               DATA_DIR=str(data_dir), PYTHON=sys.executable, **extra_env)
    proc = subprocess.run(["bash", str(REPO_ROOT / script), str(model_dir), tasks], env=env,
                          capture_output=True, text=True, timeout=240, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, json.loads((out_dir / "summary.json").read_text())


def test_run_eval_completion_end_to_end(tiny_dir, data_dir, tmp_path):
    proc, summary = _run_script("eval/eval_completion/run_eval.sh", tiny_dir, data_dir, tmp_path / "c",
                                "humaneval", {"MODE": "diffusion"})
    (row,) = summary["results"]
    assert row["task"] == "humaneval" and row["n_problems"] == 2 and 0.0 <= row["pass@1"] <= 1.0
    assert summary["settings"]["alg"] == "p2" and summary["settings"]["limit"] == "2"
    assert "| humaneval | 2 |" in proc.stdout
    assert len(read_jsonl(tmp_path / "c" / "humaneval.results.jsonl")) == 2


def test_run_eval_infill_end_to_end(tiny_dir, data_dir, tmp_path):
    _, summary = _run_script("eval/eval_infill/run_eval.sh", tiny_dir, data_dir, tmp_path / "i",
                             "humaneval_infill_span_light", {"INFILL_LENGTH": "fixed:4"})
    (row,) = summary["results"]
    assert row["task"] == "humaneval_infill_span_light" and "pass@1" in row
    assert summary["settings"]["infill_length"] == "fixed:4"
    assert summary["settings"]["infill_steps"] == "4" and summary["settings"]["top_p"] == "0.95"
    generated = json.loads((tmp_path / "i" / "humaneval_infill_span_light.generate.json").read_text())
    assert generated["infill_steps"] == "4" and generated["infer"]["temperature"] == 0.6
