"""Data resolution, SantaCoder-FIM exact match on a synthetic file, and the score.py CLI end to end."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from veomni.eval.data import resolve_data_dir
from veomni.eval.scoring import ScoreConfig
from veomni.eval.tasks import first_nonempty_line, get_task, task_files

SCORE_PY = Path(__file__).resolve().parents[2] / "eval" / "score.py"


def test_resolution_order(tmp_path, monkeypatch):
    env_dir = tmp_path / "env"
    env_dir.mkdir()
    monkeypatch.setenv("VEOMNI_EVAL_DATA", str(env_dir))
    assert resolve_data_dir(None) == env_dir
    assert resolve_data_dir(tmp_path) == tmp_path  # the argument wins over the environment
    monkeypatch.delenv("VEOMNI_EVAL_DATA")
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"\.cache/veomni/eval"):
        resolve_data_dir(None)


def test_missing_file_error_names_expected_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="evalplus/MbppPlus.jsonl.gz"):
        get_task("mbpp_plus", tmp_path)
    with pytest.raises(FileNotFoundError, match="santacoder_fim/santacoder-fim-task.jsonl"):
        get_task("santacoder_fim", tmp_path)
    with pytest.raises(ValueError, match="Did you mean 'humaneval_plus'"):
        get_task("humaneval_plsu", tmp_path)


def test_layout_matches_shared_data(data_dir):
    # Every task's first expected file exists in the reference layout (santacoder is HF-hub only).
    for name in ("humaneval_plus", "mbpp_plus", "humaneval_infill_single", "humaneval_infill_multi",
                 "humaneval_infill_span", "humaneval_infill_span_light"):
        assert (data_dir / task_files(name)[0]).is_file(), name
    assert any((data_dir / f).is_file() for f in task_files("humaneval"))


def test_a_single_file_can_be_given_instead_of_a_dir(data_dir):
    task = get_task("humaneval_infill_span_light", data_dir / task_files("humaneval_infill_span_light")[0])
    assert len(task.problems) == 164


@pytest.fixture
def santacoder_dir(tmp_path):
    rows = [
        {"name": "a", "language": "py", "prompt": "def f(x):\n", "suffix": "\n    return y\n",
         "canonical_solution": "    y = x + 1", "tests": ""},
        {"name": "b", "language": "py", "prompt": "def g():\n", "suffix": "\n",
         "canonical_solution": "    return 3", "tests": ""},
        {"name": "c", "language": "js", "prompt": "function h() {\n", "suffix": "\n}",
         "canonical_solution": "  return 1;", "tests": ""},
    ]
    (tmp_path / "santacoder_fim").mkdir()
    with open(tmp_path / "santacoder_fim" / "santacoder-fim-task.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return tmp_path


def test_santacoder_exact_match(santacoder_dir):
    task = get_task("santacoder_fim", santacoder_dir)
    assert [p.task_id for p in task.problems] == ["SantaCoderFIM/0", "SantaCoderFIM/1"]  # py only
    assert len(get_task("santacoder_fim", santacoder_dir, language=None).problems) == 3
    assert task.score(task.canonical_samples(), ScoreConfig(n_workers=1))["pass@1"] == 1.0
    samples = [
        {"task_id": "SantaCoderFIM/0", "completion": "\n  y = x + 1  \n    z = 0\n"},  # one leading newline
        {"task_id": "SantaCoderFIM/1", "completion": "    return 4\n"},
    ]
    assert task.score(samples, ScoreConfig(n_workers=1))["pass@1"] == 0.5
    with pytest.raises(ValueError, match="accepts"):
        task.score([{"task_id": "SantaCoderFIM/0", "solution": "x"}], ScoreConfig(n_workers=1), allow_partial=True)
    assert first_nonempty_line(" \n\t\n  a b \n c") == "a b"


def _open_dllm_exact_match(completion, ground_truth):
    """Open-dLLM eval/eval_infill/compute_em_santa.py, one row (the reference being ported)."""
    if completion.startswith("\n"):
        response = completion.split("\n")[1]
    elif completion.startswith(" \n"):
        response = completion.split("\n")[1]
    else:
        response = completion.split("\n")[0]
    return response.strip() == ground_truth.strip()


FIM_COMPLETIONS = ["    y = x + 1", "    y = x + 1  \n    z = 0\n", "\n    y = x + 1\n", " \n  y = x + 1",
                   "\n\n    y = x + 1", "  \n    y = x + 1", "\t\n    y = x + 1", "\r\n    y = x + 1", "",
                   "\n", "y = x + 1\r\nz", "    y = x + 2", "\n    y = x + 1\ny = 2"]


def test_santacoder_scoring_matches_open_dllm(santacoder_dir):
    """Issue 8, item 15: the default scores what Open-dLLM scores (at most one leading newline
    skipped); `match='first_nonempty'` keeps the first non-blank line rule as an option."""
    task = get_task("santacoder_fim", santacoder_dir)
    reference = task.get_problem("SantaCoderFIM/0").canonical
    samples = [{"task_id": "SantaCoderFIM/0", "completion": c} for c in FIM_COMPLETIONS]
    rows = task.evaluate([task.get_problem("SantaCoderFIM/0")],
                         [(task.get_problem("SantaCoderFIM/0"), i, s) for i, s in enumerate(samples)],
                         ScoreConfig(n_workers=1), None)[0]
    assert [r["passed"] for r in rows] == [_open_dllm_exact_match(c, reference) for c in FIM_COMPLETIONS]
    assert sum(r["passed"] for r in rows) == 6  # the tricky ones really differ from first_nonempty
    loose = get_task("santacoder_fim", santacoder_dir, match="first_nonempty")
    rows = loose.evaluate(loose.problems[:1], [(loose.problems[0], i, s) for i, s in enumerate(samples)],
                          ScoreConfig(n_workers=1), None)[0]
    assert [r["passed"] for r in rows] == [first_nonempty_line(c) == reference.strip() for c in FIM_COMPLETIONS]
    assert sum(r["passed"] for r in rows) == 10
    with pytest.raises(ValueError, match="match="):
        get_task("santacoder_fim", santacoder_dir, match="exact")


def test_santacoder_generation_prefix_is_prompt_plus_newline(santacoder_dir):
    task = get_task("santacoder_fim", santacoder_dir)
    p = task.problems[0]
    assert task.generation_prefix(p) == p.prompt + "\n"  # Open-dLLM: d["prompt"] + '\n'
    raw = get_task("santacoder_fim", santacoder_dir, prompt_newline=False)
    assert raw.generation_prefix(raw.problems[0]) == p.prompt


def _run_cli(*args):
    proc = subprocess.run([sys.executable, str(SCORE_PY), *args], capture_output=True, text=True, timeout=300)
    return proc


def test_cli_end_to_end(data_dir, tmp_path):
    task = get_task("humaneval", data_dir)
    p0, p1 = task.problems[0], task.problems[1]
    samples = tmp_path / "samples.jsonl"
    samples.write_text("\n".join(json.dumps(s) for s in [
        {"task_id": p0.task_id, "completion": p0.canonical},
        {"task_id": p1.task_id, "completion": "    return []\n"},
    ]) + "\n")
    proc = _run_cli("--task", "humaneval", "--samples", str(samples), "--data_dir", str(data_dir),
                    "--limit", "2", "--n_workers", "2")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) > 1  # progress first
    summary = json.loads(lines[-1])
    assert summary["task"] == "humaneval" and summary["n_problems"] == 2 and summary["n_samples"] == 2
    assert summary["pass@1"] == 0.5 and "pass@10" not in summary
    results = tmp_path / "samples.results.jsonl"
    assert summary["results_file"] == str(results)
    assert [json.loads(line)["passed"] for line in results.read_text().splitlines()] == [True, False]


def test_cli_canonical_plus(data_dir, tmp_path):
    out = tmp_path / "canon.jsonl"
    proc = _run_cli("--task", "mbpp_plus", "--canonical", "--data_dir", str(data_dir), "--limit", "3",
                    "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["pass@1"] == summary["base_pass@1"] == summary["plus_pass@1"] == 1.0
    assert summary["n_problems"] == 3 and out.is_file()


def test_cli_errors_are_clear(tmp_path):
    proc = _run_cli("--task", "humaneval", "--canonical", "--data_dir", str(tmp_path / "nope"))
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    proc = _run_cli("--task", "humaneval")
    assert proc.returncode == 2 and "--samples FILE or --canonical" in proc.stderr
