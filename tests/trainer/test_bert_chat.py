"""BERT-chat through the trainer: a tiny random BERT with the embedded MiniLM's tokenizer (chat
template, EOS = [SEP]) trained 2 steps of masked SFT. The prompt never carries loss; the EOS canvas
is scored with data.pad_response_with_eos and is padding without it; logit_shift is refused."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from veomni.config.parser import ConfigError, parse_args

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "configs" / "quickstart" / "bert_chat.yaml")
SEQ = 40


@pytest.fixture(scope="module")
def tiny_bert_dir(minilm_dir, tmp_path_factory):
    from transformers import BertConfig

    from veomni.models.hf_io import load_tokenizer, save_model
    from veomni.models.registry import build_model

    tok = load_tokenizer(str(minilm_dir))
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=64, pad_token_id=tok.pad_token_id,
                     eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    torch.manual_seed(0)
    model = build_model(cfg)
    model.init_weights()
    model.config.mask_token_id = tok.mask_token_id
    model.config.dllm_attn_mode, model.config.dllm_logit_shift = "bidirectional", False
    return save_model(model, tmp_path_factory.mktemp("tiny_bert"), tokenizer=tok)


def _argv(model_dir, out, *extra):
    return [CONFIG, f"--model.model_path={model_dir}", f"--train.output_dir={out}", f"--data.max_seq_len={SEQ}",
            "--train.micro_batch_size=4", "--train.global_batch_size=4", "--train.max_steps=2",
            "--train.warmup_steps=0", "--train.progress_bar=false", "--train.export_hf=false",
            "--train.peak_flops=1e12", f"--data.cache_dir={Path(out).parent / 'cache'}", *extra]


def _train_and_spy(argv, out):
    """Run the 2 steps; return every (batch, corruption) the objective saw."""
    from veomni.trainer.trainer import Trainer

    tr = Trainer(parse_args(argv=argv))
    seen = []
    prepare = tr.objective.prepare

    def spy(batch, generator):
        corr = prepare(batch, generator)
        seen.append((batch, corr))
        return corr

    tr.objective.prepare = spy
    try:
        tr.train()
        prompt_lens = tr.loader.dataset.store.prompt_lens
    finally:
        tr.close()
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return seen, rows, prompt_lens


@pytest.mark.parametrize("eos_canvas", [True, False])
def test_two_step_sft_prompt_never_scored(tiny_bert_dir, tmp_path, eos_canvas):
    from veomni.models.hf_io import load_tokenizer

    eos = load_tokenizer(str(tiny_bert_dir)).eos_token_id
    out = tmp_path / "run"
    switch = f"--data.pad_response_with_eos={str(eos_canvas).lower()}"
    seen, rows, prompt_lens = _train_and_spy(_argv(tiny_bert_dir, out, switch), out)
    assert [r["step"] for r in rows] == [1, 2] and all(0 < r["loss"] < 30 for r in rows)
    assert len(seen) == 2
    first_prompt = int(min(prompt_lens))
    for batch, corr in seen:
        ids, real = batch["input_ids"], batch["attention_mask"].bool()
        # Each row is one example: its prompt is where maskable is False before the first True.
        starts = batch["maskable"].int().argmax(1)
        assert bool((starts >= first_prompt).all())
        col = torch.arange(ids.shape[1])[None]
        prompt = col < starts[:, None]
        assert not bool((corr.masked & prompt).any()), "a prompt token was masked"
        assert not bool((corr.eligible & prompt).any()), "a prompt token was eligible for the loss"
        assert torch.equal(corr.noisy_ids[prompt], ids[prompt])
        assert bool((corr.target_positions[:, 1] >= starts[corr.target_positions[:, 0]]).all())
        # No logit shift: the hidden row that predicts a token is its own position.
        assert torch.equal(corr.loss_positions, corr.target_positions)
        n_eos_tail = int(((ids == eos) & real).sum()) - ids.shape[0]  # beyond each response's own EOS
        if eos_canvas:  # the whole row is the example: the EOS tail is real and scored
            assert bool(real.all()) and bool(batch["maskable"][~prompt].all())
            assert n_eos_tail > 0 and corr.n_maskable == int((~prompt).sum())
            assert bool((corr.targets == eos).any())
        else:  # the tail is padding: never attended, never scored
            assert not bool(real.all()) and n_eos_tail == 0
            assert corr.n_maskable == int((batch["maskable"]).sum()) == int((real & ~prompt).sum())


def test_logit_shift_with_an_encoder_is_an_error(tiny_bert_dir, tmp_path):
    from veomni.trainer.trainer import Trainer

    with pytest.raises(ValueError, match="logit_shift"):
        Trainer(parse_args(argv=_argv(tiny_bert_dir, tmp_path / "run", "--train.logit_shift=true"))).close()


def test_eos_canvas_config_errors():
    with pytest.raises(ConfigError, match="pad_response_with_eos"):
        parse_args(argv=[CONFIG, "--data.packing=true"])
    with pytest.raises(ConfigError, match="pad_response_with_eos"):
        parse_args(argv=[CONFIG, "--data.data_type=pretrain"])


@pytest.mark.dist
def test_bert_chat_two_ranks_equal_one(tiny_bert_dir, tmp_path):
    """The encoder under FSDP2 on 2 ranks (meta-device build, blocks found through model.blocks()) ==
    1 process with 2 accumulation steps (same rows, same noise keyed by the global micro-batch index,
    the EOS canvas scored on both): losses, grad norms, token counts of 3 steps, and the exported
    weights. (ddp is the same data path with whole replicas; it passed too, and the decoder tests
    keep it covered.)"""
    from safetensors.torch import load_file

    from tests.trainer.test_train_e2e import TRAIN, _env

    def run(out, nproc, *extra):
        argv = _argv(tiny_bert_dir, out, "--train.micro_batch_size=2", "--train.max_steps=3",
                     "--train.export_hf=true", *extra)
        launch = ([sys.executable] if nproc == 1 else
                  [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_port=0",
                   "--rdzv_backend=c10d", "--rdzv_endpoint=localhost:0"])
        proc = subprocess.run([*launch, TRAIN, *argv], env=_env(), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
        return rows, load_file(str(next((Path(out) / "hf").glob("*.safetensors"))))

    one, w_one = run(tmp_path / "one", 1, "--train.data_parallel=none")
    two, w_two = run(tmp_path / "two", 2, "--train.data_parallel=fsdp2")
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3]
    for a, b in zip(one, two):
        assert abs(a["loss"] - b["loss"]) < 1e-5 * max(1.0, abs(a["loss"])), (a, b)
        assert abs(a["grad_norm"] - b["grad_norm"]) < 1e-4 * max(1.0, a["grad_norm"]), (a, b)
        assert a["tokens_seen"] == b["tokens_seen"]
    assert w_one.keys() == w_two.keys()
    for name in w_one:
        torch.testing.assert_close(w_two[name], w_one[name], atol=5e-5, rtol=1e-4, msg=name)
