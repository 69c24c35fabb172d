"""LoRA / QLoRA (veomni/models/lora.py, veomni/checkpoint/adapter.py): target selection, what trains,
exact merge, adapter-only checkpoints with exact resume after SIGKILL, the merged HF export in plain
transformers, the peft-format adapter, and the refusals."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.trainer.test_train_e2e import EVAL, _args, _eval_metrics, _metrics, _run
from veomni.config.parser import ConfigError, parse_args

pytest.importorskip("peft", reason="the quant extra: pip install -e '.[quant]'")
pytest.importorskip("bitsandbytes", reason="the quant extra: pip install -e '.[quant]'")

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "configs" / "quickstart" / "smollm2_mdm.yaml")
# QLoRA with dropout (its RNG is part of what a resume must restore) and the final norm trained in full.
QLORA = ("--model.lora_rank=4", "--model.lora_alpha=8", "--model.lora_dropout=0.1", "--model.quantize=nf4",
         "--model.lora_trainable=model.norm")


def _tiny(tied=True, mask_id=96):
    from tests.models.tiny import tiny_config
    from veomni.models.registry import build_model

    torch.manual_seed(0)
    model = build_model(tiny_config("llama", tied=tied))
    model.init_weights()
    model.config.mask_token_id = mask_id
    return model


# ------------------------------------------------------------------ selection and what trains
def test_targets_by_pattern_and_the_errors():
    from veomni.models.lora import select_targets

    model = _tiny()
    assert select_targets(model, ["q_proj", "v_proj"]) == [
        f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    assert len(select_targets(model, [".*proj"])) == 14  # 4 attention + 3 MLP Linears x 2 layers
    assert select_targets(model, [r"layers\.1\.mlp"]) == [f"model.layers.1.mlp.{p}" for p in
                                                          ("gate_proj", "up_proj", "down_proj")]
    with pytest.raises(ValueError, match="'qproj' matches no module"):
        select_targets(model, ["q_proj", "qproj"])
    with pytest.raises(ValueError, match="LM head"):
        select_targets(model, ["lm_head"])
    with pytest.raises(ValueError, match="only modules LoRA cannot adapt.*RMSNorm.*lora_trainable"):
        select_targets(model, ["input_layernorm"])


@pytest.mark.parametrize("quantize", ["none", "nf4"])
@pytest.mark.parametrize("tied", [True, False])
def test_only_adapters_train_and_the_merge_is_the_trained_function(quantize, tied):
    from veomni.models.lora import LoraSettings, apply_lora, lora_spec, merged_model

    model = _tiny(tied)
    spec = apply_lora(model, LoraSettings(rank=4, alpha=8, targets=("q_proj", "down_proj"), trainable=("model.norm",),
                                          quantize=quantize))
    assert lora_spec(model) is spec
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(spec.params)
    assert trainable == {"model.embed_tokens.lora_mask_delta", "model.norm.weight"} | {
        f"model.layers.{i}.{m}.lora_{ab}.default.weight" for i in range(2)
        for m in ("self_attn.q_proj", "mlp.down_proj") for ab in "AB"}
    if quantize == "nf4":
        assert type(model.model.layers[0].self_attn.k_proj).__name__ == "Linear4bit"
    from veomni.models.flops import trainability

    # MFU's frozen matmul count: every base weight of a layer, an NF4 one by its unpacked size.
    per_layer = 48 * 48 * 2 + 48 * 16 * 2 + 48 * 80 * 3  # q, o; k, v; gate, up, down
    assert trainability(model).layer_frozen_matmul == (per_layer, per_layer)
    ids = torch.randint(0, 96, (2, 12))
    ids[:, ::3] = 96  # mask tokens: the mask-row delta is read
    model.train()
    model(ids, attn_mode="bidirectional").logits.square().mean().backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == trainable
    with torch.no_grad():  # move every trainable tensor off its initial value (B starts at 0)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    model.eval()
    with torch.no_grad():
        adapted = model(ids, attn_mode="bidirectional").logits
        merged = merged_model(model)
        assert not any(".lora_" in n or "base_layer" in n for n, _ in merged.named_parameters())
        assert merged.config.tie_word_embeddings is False  # tied: split, the head keeps its mask row
        out = merged(ids, attn_mode="bidirectional").logits
    torch.testing.assert_close(out, adapted, atol=1e-5, rtol=1e-5)


def test_qwen3_5_reverse_gates_train_with_the_adapters():
    """New dLLM parameters start at the AR function (reverse-scan gates at 0): frozen, the GDN layers of
    a hybrid would stay causal under LoRA."""
    from transformers import AutoConfig

    from veomni.models.lora import LoraSettings, apply_lora
    from veomni.models.registry import build_model

    torch.manual_seed(0)
    model = build_model(AutoConfig.from_pretrained(REPO / "configs" / "models" / "qwen3_5_tiny"))
    model.init_weights()
    model.config.mask_token_id = 5
    spec = apply_lora(model, LoraSettings(rank=2, targets=(".*proj",)))
    gates = [n for n, _ in model.named_parameters() if n.endswith("reverse_gate")]
    assert gates and set(gates) <= set(spec.params)
    assert any("linear_attn.in_proj_qkv" in m for m in spec.modules)  # GDN projections are Linear targets too


def test_config_refusals():
    def parse(*extra):
        return parse_args(argv=[CONFIG, *extra])

    lora = "--model.lora_rank=8"
    for extra, message in [
        ((lora, "--train.data_parallel=deepspeed", "--train.zero_stage=2"), "deepspeed"),
        ((lora, "--train.expert_parallel_size=2"), "expert_parallel_size"),
        ((lora, "--train.data_parallel=fsdp2", "--train.ulysses_parallel_size=2"), "ulysses_parallel_size"),
        ((lora, "--train.data_parallel=fsdp2"), "meta_init=false"),
        ((lora, "--train.freeze=embed_tokens"), "lora_trainable"),
        ((lora, "--model.init_from_scratch=true"), "random weights"),
        (("--model.quantize=nf4",), "needs LoRA"),
        (("--model.lora_alpha=32",), "needs LoRA"),
        ((lora, "--model.lora_target=q_proj("), "not a valid regex"),
    ]:
        with pytest.raises(ConfigError, match=message):
            parse(*extra)
    ok = parse(lora, "--model.quantize=nf4", "--train.data_parallel=fsdp2", "--model.meta_init=false")
    assert ok.model.lora_target == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ------------------------------------------------------------------ through the trainer
_OPEN = []


@pytest.fixture(autouse=True)
def _close_trainers():
    yield
    while _OPEN:
        _OPEN.pop().close()


def _trainer(model_dir, corpus, out, *extra):
    from veomni.trainer.trainer import Trainer

    while _OPEN:
        _OPEN.pop().close()
    argv = [CONFIG, f"--model.model_path={model_dir}", f"--data.train_path={corpus}", f"--train.output_dir={out}",
            "--data.max_seq_len=32", "--train.micro_batch_size=2", "--train.global_batch_size=2",
            "--train.progress_bar=false", "--train.export_hf=false", "--train.warmup_steps=0",
            "--data.eval_split_ratio=0", "--train.eval_steps=0", "--train.lr=1e-2", "--train.data_parallel=none",
            "--train.max_steps=2", f"--data.cache_dir={Path(out).parent / 'cache'}", *extra]
    trainer = Trainer(parse_args(argv=argv))
    _OPEN.append(trainer)
    return trainer


def test_optimizer_holds_only_adapters_and_resume_refuses_other_adapters_or_base(tiny_model_dir, tiny_corpus,
                                                                                  tmp_path):
    out = tmp_path / "run"
    t = _trainer(tiny_model_dir, tiny_corpus, out, *QLORA)
    from veomni.models.lora import lora_spec

    spec = lora_spec(t.model)
    names = {id(p): n for n, p in t.model.named_parameters()}
    assert {names[id(p)] for g in t.optimizer.param_groups for p in g["params"]} == set(spec.params)
    frozen = {n: p.detach().clone() for n, p in t.model.named_parameters() if not p.requires_grad}
    t.train()
    assert all(torch.equal(frozen[n], p) for n, p in t.model.named_parameters() if n in frozen)
    assert {names[id(p)] for p in t.optimizer.state} == set(spec.params)
    manifest = json.loads((out / "checkpoints" / "global_step_2" / "COMPLETE").read_text())
    assert manifest["engine"] == "lora" and manifest["lora"]["params"] == list(spec.params)
    assert manifest["base"]["path"] == str(tiny_model_dir) and len(manifest["base"]["sha256"]) == 64

    base_args = [a for a in QLORA if "lora_rank" not in a]
    with pytest.raises(ValueError, match="other adapters.*rank"):  # the same output_dir, rank 8
        _trainer(tiny_model_dir, tiny_corpus, out, "--model.lora_rank=8", *base_args)
    with pytest.raises(ValueError, match="adapter-only .LoRA. checkpoint"):
        _trainer(tiny_model_dir, tiny_corpus, out)
    other = tmp_path / "other_base"  # the same model with one weight nudged
    shutil.copytree(tiny_model_dir, other)
    from safetensors.torch import load_file, save_file

    sd = load_file(other / "model.safetensors")
    sd["model.norm.weight"] = sd["model.norm.weight"] + 1e-3
    save_file(sd, other / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="holds other weights"):
        _trainer(other, tiny_corpus, out, *QLORA)
    _trainer(tiny_model_dir, tiny_corpus, tmp_path / "full", "--train.max_steps=1").train()
    with pytest.raises(ValueError, match="full-model checkpoint"):
        _trainer(tiny_model_dir, tiny_corpus, tmp_path / "full", *QLORA)


def test_qlora_resume_after_sigkill_is_exact_and_the_merged_export_loads_in_transformers(
        tiny_model_dir, tiny_corpus, tmp_path):
    run = ("--train.max_steps=6", "--train.save_steps=3", "--train.export_hf=true", *EVAL, *QLORA)
    straight = tmp_path / "straight"
    _run(_args(tiny_model_dir, tiny_corpus, straight, *run))
    killed = tmp_path / "killed"
    proc = _run(_args(tiny_model_dir, tiny_corpus, killed, *run), env={"VEOMNI_DEBUG_KILL_AFTER_STEP": "3"},
                check=False)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert [r["step"] for r in _metrics(killed)] == [1, 2, 3]
    proc = _run(_args(tiny_model_dir, tiny_corpus, killed, *run))
    assert "resumed from" in proc.stderr
    rows, resumed = _metrics(straight), _metrics(killed)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(rows, resumed):  # bitwise: CPU fp32, same noise, data order, dropout RNG, NF4 base
        assert (a["loss"], a["grad_norm"], a["lr"], a["tokens_seen"]) == (b["loss"], b["grad_norm"], b["lr"],
                                                                           b["tokens_seen"]), (a, b)
    assert _eval_metrics(killed) == _eval_metrics(straight)
    from safetensors.torch import load_file

    for name in ("adapter/adapter_model.safetensors", "adapter/veomni_extra.safetensors", "hf/model.safetensors"):
        a, b = load_file(straight / name), load_file(killed / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    exported = load_file(straight / "hf" / "model.safetensors")
    assert not any("lora" in k or "base_layer" in k or "absmax" in k for k in exported)  # a plain model
    ckpt = straight / "checkpoints" / "global_step_6"
    assert json.loads((ckpt / "COMPLETE").read_text())["engine"] == "lora"

    # The merged export in plain transformers == our merged model == the NF4 + LoRA model it came from.
    import transformers

    from veomni.checkpoint.adapter import load_adapted_model
    from veomni.models.hf_io import load_model
    from veomni.models.lora import merged_model

    hf = transformers.AutoModelForCausalLM.from_pretrained(straight / "hf", dtype=torch.float32).eval()
    ours = load_model(straight / "hf")
    adapted, tokenizer = load_adapted_model(ckpt)  # rebuilt offline: base re-loaded, checked, NF4, adapters
    ids = torch.tensor([tokenizer("def f(x): return x + 1").input_ids + [tokenizer.mask_token_id] * 3])
    with torch.no_grad():
        ref = hf(ids).logits
        torch.testing.assert_close(ours(ids, attn_mode="causal").logits, ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(merged_model(adapted)(ids, attn_mode="causal").logits, ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(adapted(ids, attn_mode="causal").logits, ref, atol=1e-4, rtol=1e-4)

    # The bare adapter in peft's format, on the HF base loaded in NF4 by transformers (as the run
    # quantised it) with the mask row added as training added it.
    import peft

    from veomni.models.mask_token import mean_row

    nf4 = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                          bnb_4bit_compute_dtype=torch.float32)
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32,
                                                             quantization_config=nf4, device_map="cpu")
    mask = tokenizer.mask_token_id
    assert json.loads((straight / "adapter" / "veomni_adapter.json").read_text())["quantize"] == "nf4"
    base.resize_token_embeddings(mask + 1, mean_resizing=False)
    base.lm_head.weight = torch.nn.Parameter(base.lm_head.weight.detach().clone())  # untie, as the export does
    base.config.tie_word_embeddings = False
    extra = load_file(straight / "adapter" / "veomni_extra.safetensors")
    with torch.no_grad():
        for w in (base.model.embed_tokens.weight, base.lm_head.weight):
            w[mask] = mean_row(w, mask)
        base.model.embed_tokens.weight[mask] += extra.pop("model.embed_tokens.lora_mask_delta")
        base.model.norm.weight.copy_(extra.pop("model.norm.weight"))
    assert not extra
    with_adapter = peft.PeftModel.from_pretrained(base, straight / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(with_adapter(ids).logits, ref, atol=1e-4, rtol=1e-4)


_DIST = ("--train.max_steps=3", "--train.export_hf=true", "--model.lora_rank=4", "--model.quantize=nf4",
         "--model.meta_init=false")


@pytest.fixture(scope="module")
def qlora_one_process(tiny_model_dir, tiny_corpus, tmp_path_factory):
    one = tmp_path_factory.mktemp("qlora") / "one"
    _run(_args(tiny_model_dir, tiny_corpus, one, *_DIST, "--train.data_parallel=none"))
    return one


@pytest.mark.dist
@pytest.mark.parametrize("mode", ["fsdp2", "ddp"])
def test_two_processes_equal_one_process(tiny_model_dir, tiny_corpus, tmp_path, qlora_one_process, mode):
    """QLoRA on 2 ranks == 1 rank x 2 accumulated micro-batches, for the adapters and the merged export
    (FSDP2 shards the packed NF4 bytes like any parameter; each Linear4bit keeps its scales). With
    activation checkpointing, whose wrapper names the export must see through."""
    one, two = qlora_one_process, tmp_path / "two"
    _run(_args(tiny_model_dir, tiny_corpus, two, *_DIST, f"--train.data_parallel={mode}",
               "--model.gradient_checkpointing=true"), nproc=2)
    for a, b in zip(_metrics(one), _metrics(two), strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-5 and abs(a["grad_norm"] - b["grad_norm"]) < 1e-4, (a, b)
    from safetensors.torch import load_file

    for name in ("hf/model.safetensors", "adapter/adapter_model.safetensors", "adapter/veomni_extra.safetensors"):
        a, b = load_file(one / name), load_file(two / name)
        assert a.keys() == b.keys(), name
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
