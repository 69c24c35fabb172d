"""tasks/infer.py end to end and its pieces (history page, live view, chat); bench_decode.py has
tests/inference/test_bench_decode.py.

One subprocess run checks the real entry point; everything else calls main(argv) in-process and
compares with the same generation done directly, so each check can fail on a wrong output.
"""
from __future__ import annotations

import html
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.inference.test_dropin import make_model_dir
from veomni.config.parser import ConfigError

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "def add(a, b):"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("cli") / "tiny", "llama")


@pytest.fixture(scope="module")
def loaded(model_dir):
    from veomni.inference.loading import load_for_inference

    return load_for_inference(model_dir, device="cpu")


def expected(loaded, prompts, chat=False, system_prompt=None, **overrides):
    """Completions of the same generation done directly (what the CLI must print)."""
    from veomni.diffusion.sampling import decode_trimmed
    from veomni.inference.generate import encode_prompts, generate

    model, tok = loaded
    ids, mask = encode_prompts(tok, prompts, chat=chat, system_prompt=system_prompt)
    return decode_trimmed(tok, generate(model, ids, attention_mask=mask, seed=0, **overrides))


def cli(argv, stdin=None):
    from veomni.inference.cli import main

    buf = io.StringIO()
    assert main(argv, stdin=stdin, stdout=buf) == 0
    return buf.getvalue()


def test_subprocess_end_to_end(model_dir, loaded):
    cmd = [sys.executable, str(ROOT / "tasks" / "infer.py"), "--model_path", str(model_dir), "--prompt", PROMPT,
           "--infer.max_new_tokens=12", "--device", "cpu", "--stats"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=str(ROOT))
    assert res.returncode == 0, res.stderr
    want = expected(loaded, [PROMPT], max_new_tokens=12)[0]
    assert want.strip()  # a non-trivial completion, so the comparison means something
    assert res.stdout.endswith(want + "\n")
    assert re.search(r"stats: nfe=12 steps=12 .*tokens/forward=[\d.]+ .*tok/s=", res.stdout)
    # Strictness, through the real entry point: unknown flag -> exit 2 with a suggestion.
    bad = subprocess.run(cmd[:4] + ["--prompt", "x", "--infer.max_new_token=3"], capture_output=True, text=True,
                         timeout=120, env=env, cwd=str(ROOT))
    assert bad.returncode == 2 and "did you mean 'infer.max_new_tokens'" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_strict_parsing_errors(model_dir, tmp_path):
    base = ["--model_path", str(model_dir), "--prompt", PROMPT]
    with pytest.raises(ConfigError, match="did you mean 'prompt_file'"):
        cli(base + ["--prompt_fil=x"])
    with pytest.raises(ConfigError, match="did you mean 'infer.threshold'"):
        cli(base + ["--infer.treshold=0.5"])
    with pytest.raises(ConfigError, match="not both"):
        cli(base + ["--prompt_file", str(tmp_path / "p.txt")])
    with pytest.raises(ConfigError, match="nothing to do"):
        cli(["--model_path", str(model_dir)])
    yaml_file = tmp_path / "bad.yaml"
    yaml_file.write_text("infer:\n  alg: threshold\n  treshold: 0.9\n")
    with pytest.raises(ConfigError, match="did you mean 'infer.threshold'"):
        cli([str(yaml_file)] + base)
    with pytest.raises(ValueError, match="does not apply"):  # the sampler's own strictness reaches the user
        cli(base + ["--infer.alg=threshold", "--infer.threshold=0.9", "--infer.steps=7"])


def test_yaml_config_and_several_prompts(model_dir, loaded, tmp_path):
    cfg = tmp_path / "infer.yaml"
    cfg.write_text(f"model_path: {model_dir}\ndevice: cpu\nprompt: ['unused']\n"
                   "infer:\n  alg: threshold\n  threshold: 0.5\n  block_length: 4\n  max_new_tokens: 8\n")
    prompts = ["Hello, how", "for i in range(10):\n    print(", "x"]  # different lengths: left padding
    argv = [str(cfg)] + [a for p in prompts for a in ("--prompt", p)] + ["--infer.use_cache=dual"]
    printed = cli(argv)
    want = expected(loaded, prompts, max_new_tokens=8, alg="threshold", threshold=0.5, block_length=4,
                    use_cache="dual")
    for i, text in enumerate(want):
        assert f"=== [{i}] " in printed and text + "\n" in printed
    assert printed.endswith(want[-1] + "\n") and "unused" not in printed


def test_prompt_file_text_and_jsonl(model_dir, loaded, tmp_path):
    prompts = ["The quick brown", "import numpy as np, json"]  # a comma stays inside a prompt
    txt, jsonl = tmp_path / "p.txt", tmp_path / "p.jsonl"
    txt.write_text(prompts[0] + "\n\n" + prompts[1] + "\n")
    jsonl.write_text("\n".join(json.dumps({"prompt": p, "id": i}) for i, p in enumerate(prompts)) + "\n")
    want = expected(loaded, prompts, max_new_tokens=6)
    for f in (txt, jsonl):
        printed = cli(["--model_path", str(model_dir), "--prompt_file", str(f), "--infer.max_new_tokens=6",
                       "--device", "cpu"])
        assert printed.count("=== [") == 2 and printed.endswith(want[1] + "\n") and want[0] + "\n" in printed
    (tmp_path / "bad.jsonl").write_text('{"text": "no prompt key"}\n')
    with pytest.raises(ConfigError, match="bad.jsonl:1 needs a string field 'prompt'"):
        cli(["--model_path", str(model_dir), "--prompt_file", str(tmp_path / "bad.jsonl")])


def test_chat_non_interactive_and_interactive(model_dir, loaded):
    base = ["--model_path", str(model_dir), "--chat", "--infer.max_new_tokens=6", "--device", "cpu"]
    printed = cli(base + ["--prompt", "hi there", "--system_prompt", "Be brief."])
    want = expected(loaded, ["hi there"], chat=True, system_prompt="Be brief.", max_new_tokens=6)[0]
    assert printed.endswith(want + "\n")
    # Interactive: two turns, /reset, a turn that must equal a fresh conversation, /exit stops reading.
    stdin = io.StringIO("hello\nand more\n/reset\nhi there\n/exit\nnever read\n")
    lines = cli(base, stdin=stdin)
    fresh = expected(loaded, ["hi there"], chat=True, max_new_tokens=6)[0]
    assert "(history cleared)\n" in lines and lines.endswith(fresh + "\n")


def test_chat_session_keeps_history(loaded):
    from veomni.inference.chat import ChatSession
    from veomni.inference.generate import chat_prompt_ids

    model, tok = loaded
    session = ChatSession(model, tok, dict(max_new_tokens=5, seed=0))
    first = session.reply("hello")
    session.reply("and more")
    assert [m["role"] for m in session.messages] == ["user", "assistant", "user", "assistant"]
    assert session.messages[1]["content"] == first
    # The second turn's prompt held the first exchange.
    turn2 = chat_prompt_ids(tok, session.messages[:3])
    assert session.last_output.prompt_len == len(turn2)


def test_save_history_page(model_dir, loaded, tmp_path):
    from veomni.inference.generate import encode_prompts, generate
    from veomni.inference.history_html import write_history_html
    from veomni.inference.live import _printable

    page = tmp_path / "h.html"
    cli(["--model_path", str(model_dir), "--prompt", PROMPT, "--infer.max_new_tokens=10", "--infer.steps=5",
         "--save_history", str(page), "--device", "cpu"])
    text = page.read_text()
    assert text.startswith("<!doctype html>") and "<script>" in text and "http" not in text  # self-contained
    steps = [int(s) for s in re.findall(r"data-step='(\d+)'", text)]
    assert len(steps) == 10 and all(1 <= s <= 5 for s in steps)
    # Direct check: each token's step is the step at which the history first shows it.
    model, tok = loaded
    ids, mask = encode_prompts(tok, [PROMPT])
    out = generate(model, ids, attention_mask=mask, max_new_tokens=10, steps=5, output_history=True, eos_token_id=[])
    write_history_html(page, tok, out, [PROMPT])
    spans = re.findall(r"<span class='tok' data-step='(\d+)'[^>]*>(.*?)</span>", page.read_text(), re.S)
    p = ids.shape[1]
    for pos, (step, shown) in enumerate(spans):
        first = next(s for s, h in enumerate(out.history, 1) if h[0, p + pos] != model.config.mask_token_id)
        assert int(step) == first
        token = tok.decode([int(out.sequences[0, p + pos])], skip_special_tokens=False)
        assert html.unescape(shown) == _printable(token)
    assert len(spans) == 10


def test_live_view_plain_fallback_and_tty(model_dir, loaded):
    from veomni.inference.live import MASK_GLYPH, LiveView

    printed = cli(["--model_path", str(model_dir), "--prompt", PROMPT, "--infer.max_new_tokens=6", "--live",
                   "--device", "cpu"])
    lines = printed.splitlines()
    assert lines[0].startswith("[step 1] ") and MASK_GLYPH in lines[0]  # not a TTY: one plain line per step
    assert sum(line.startswith("[step ") for line in lines) == 6
    assert printed.endswith(expected(loaded, [PROMPT], max_new_tokens=6)[0] + "\n")
    model, tok = loaded
    stream = io.StringIO()
    view = LiveView(tok, 1, model.config.mask_token_id, stream=stream, tty=True, max_fps=0)
    mask = model.config.mask_token_id
    view(1, torch.tensor([[5, mask, mask]]))
    view(2, torch.tensor([[5, 7, mask]]))
    view.close()
    assert stream.getvalue().count("\x1b[J") == 2 and MASK_GLYPH in stream.getvalue()  # redraw + final erase


def test_mask_token_required_unless_added(tmp_path):
    raw = make_model_dir(tmp_path / "raw", "qwen2", mask=False)
    base = ["--model_path", str(raw), "--prompt", PROMPT, "--infer.max_new_tokens=4", "--device", "cpu"]
    with pytest.raises(ValueError, match="has no mask token.*--add_mask_token"):
        cli(base)
    assert cli(base + ["--add_mask_token"]).endswith("\n")


def test_training_checkpoint_and_run_dir(model_dir, loaded, tmp_path):
    """<run>/checkpoints/global_step_N (DCP) loads with the run's tokenizer; <run> with hf/ loads hf/."""
    import shutil

    import yaml

    from veomni.checkpoint import save_checkpoint

    model, _ = loaded
    run = tmp_path / "run"
    run.mkdir()
    (run / "resolved_config.yaml").write_text(yaml.safe_dump(
        {"model": {"model_path": str(model_dir), "tokenizer_path": str(model_dir), "mask_token": "<|mask|>"}}))
    ckpt = save_checkpoint(run, 3, model)
    want = expected(loaded, [PROMPT], max_new_tokens=6)[0]
    argv = ["--prompt", PROMPT, "--infer.max_new_tokens=6", "--device", "cpu"]
    assert cli(["--model_path", str(ckpt)] + argv).endswith(want + "\n")
    shutil.copytree(model_dir, run / "hf")
    assert cli(["--model_path", str(run)] + argv).endswith(want + "\n")


def test_infer_args_map_to_sampler_config():
    from veomni.config.schema import InferArgs
    from veomni.inference.generate import generation_config_from_infer

    mb = generation_config_from_infer(InferArgs(alg="multi_block", threshold=0.3, block_add_threshold=0.2))
    assert mb.entropy_threshold == 0.3 and mb.threshold is None and mb.steps is None
    assert mb.block_add_threshold == 0.2
    th = generation_config_from_infer(InferArgs(alg="threshold", threshold=0.8, stop_strings=["\n\n"]))
    assert th.threshold == 0.8 and th.steps is None and th.stop_strings == ["\n\n"]
    dream = generation_config_from_infer(InferArgs(max_new_tokens=16, steps=24, exact_step_counts=True))
    assert dream.steps == 24 and dream.exact_step_counts and dream.seed == 0
    fac = generation_config_from_infer(InferArgs(alg="factor", factor=1.0, factor_strict=True))
    assert fac.factor_strict and not generation_config_from_infer(InferArgs(alg="factor", factor=1.0)).factor_strict
