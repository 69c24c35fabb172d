"""Training a mixture-of-experts model: router losses in the backward loss, their metrics, the op
switch, refusals, the quickstart MoE config and exact resume. In-process Trainer on a tiny random
Qwen3-MoE (3 layers, the middle one dense; 6 experts, top-2) with the real SmolLM2 tokenizer."""
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from veomni.config.parser import ConfigError, parse_args
from veomni.ops.registry import default_ops

REPO = Path(__file__).resolve().parents[2]
MOE_CONFIG = REPO / "configs" / "quickstart" / "qwen3_moe_tiny_mdm.yaml"
E, K = 6, 2
CONFIG_AUX = 0.02  # the model config's router_aux_loss_coef (used when train.router_aux_loss_coef is none)

_OPEN = []


@pytest.fixture(autouse=True)
def _close_trainers():
    yield
    while _OPEN:
        _OPEN.pop().close()


@pytest.fixture(scope="module")
def tiny_moe_dir(tmp_path_factory, smollm2_dir):
    """A config-only directory (init_from_scratch), vocab = the tokenizer's; the mask token grows it."""
    from transformers import Qwen3MoeConfig

    from veomni.models.hf_io import load_tokenizer

    tok = load_tokenizer(str(smollm2_dir))
    cfg = Qwen3MoeConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                         num_hidden_layers=3, mlp_only_layers=[1], num_attention_heads=4, num_key_value_heads=2,
                         head_dim=8, num_experts=E, num_experts_per_tok=K, norm_topk_prob=True,
                         router_aux_loss_coef=CONFIG_AUX, max_position_embeddings=512, tie_word_embeddings=True,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    out = tmp_path_factory.mktemp("tiny_qwen3_moe")
    cfg.save_pretrained(out)
    return out


def _trainer(model_dir, tok_dir, corpus, out, *extra):
    from veomni.trainer.trainer import Trainer

    while _OPEN:
        _OPEN.pop().close()
    argv = [str(MOE_CONFIG), f"--model.model_path={model_dir}", f"--model.tokenizer_path={tok_dir}",
            f"--data.train_path={corpus}", f"--train.output_dir={out}", "--data.max_seq_len=32",
            "--train.micro_batch_size=2", "--train.global_batch_size=4", "--train.progress_bar=false",
            "--train.export_hf=false", "--train.warmup_steps=0", "--data.eval_split_ratio=0", "--train.eval_steps=0",
            "--train.lr=1e-3", "--train.data_parallel=none", "--train.save_steps=0", "--train.peak_flops=1e12",
            "--train.max_grad_norm=0", "--train.router_aux_loss_coef=none", "--train.router_z_loss_coef=0",
            f"--data.cache_dir={Path(out).parent / 'cache'}", *extra]
    trainer = Trainer(parse_args(argv=argv))
    _OPEN.append(trainer)
    return trainer


def _rows(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def _capture_step(trainer, monkeypatch):
    """Run one train_step; return (its metrics, the model before it, each micro-batch's forward
    kwargs, the gradients it stepped with)."""
    import veomni.distributed as dist_mod

    before = copy.deepcopy(trainer.model)
    calls, grads = [], {}
    hook = trainer.model.register_forward_pre_hook(lambda m, a, kw: calls.append(dict(kw)), with_kwargs=True)
    clip = dist_mod.clip_grad_norm_

    def recording_clip(model, max_norm):
        grads.update({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})
        return clip(model, max_norm)

    monkeypatch.setattr(dist_mod, "clip_grad_norm_", recording_clip)
    try:
        metrics = trainer.train_step()
    finally:
        hook.remove()
        monkeypatch.setattr(dist_mod, "clip_grad_norm_", clip)  # a later capture must not chain this one
    return metrics, before, calls, grads


def _by_hand(model, calls, aux_coef, z_coef):
    """Each micro-batch again, with the router losses written from transformers' reference
    (load_balancing_loss_func) and logsumexp^2; returns the summed loss pieces (with graph)."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    from veomni.models.transformers.moe import TopKRouter

    logits = []
    hooks = [m.register_forward_hook(lambda m, i, o: logits.append(o[0]))
             for m in model.modules() if isinstance(m, TopKRouter)]
    model.train()
    n_all = sum(float(kw["attention_mask"].sum()) for kw in calls)
    ce = aux_w = z_w = 0.0
    counts = torch.zeros(len(hooks), E)
    for kw in calls:
        logits.clear()
        out = model(**kw)
        mask = kw["attention_mask"].reshape(-1).float()
        n = float(mask.sum())
        aux = load_balancing_loss_func(tuple(logits), E, K, kw["attention_mask"])
        lse2 = torch.stack([torch.logsumexp(lg.float(), -1).pow(2) for lg in logits])  # [layers, tokens]
        z = (lse2 * mask).sum() / (mask.sum() * len(logits))
        ce = ce + out.loss
        aux_w = aux_w + aux * n / n_all
        z_w = z_w + z * n / n_all
        for i, lg in enumerate(logits):
            top = lg.softmax(-1).topk(K, -1).indices[mask.bool()]
            counts[i] += torch.bincount(top.reshape(-1), minlength=E).float()
    for h in hooks:
        h.remove()
    return ce, aux_w, z_w, counts


# ------------------------------------------------------------------ the loss and its gradient
def test_backward_loss_is_ce_plus_router_terms_over_accumulated_micro_batches(
        tiny_moe_dir, smollm2_dir, tiny_corpus, tmp_path, monkeypatch):
    """grad_accum 2: the gradient the optimizer gets is that of  sum over micro-batches of
    CE share + aux_coef * aux_mb * n_mb/N + z_coef * z_mb * n_mb/N  (N: valid tokens of the step),
    with aux from transformers' load_balancing_loss_func; the logged loss is the CE alone and the
    logged router losses are the token-weighted means."""
    aux_coef, z_coef = 0.05, 0.01
    # Unpacked rows padded to 64: the two micro-batches hold different numbers of valid tokens, so
    # a plain mean over micro-batches (or counting padding) would not match.
    tr = _trainer(tiny_moe_dir, smollm2_dir, tiny_corpus, tmp_path / "run", f"--train.router_aux_loss_coef={aux_coef}",
                  f"--train.router_z_loss_coef={z_coef}", "--data.packing=false", "--data.max_seq_len=64")
    assert tr.grad_accum == 2
    m, before, calls, grads = _capture_step(tr, monkeypatch)
    valid = [int(kw["attention_mask"].sum()) for kw in calls]
    assert len(calls) == 2 and valid[0] != valid[1] and max(valid) < 2 * 64, valid
    ce, aux, z, counts = _by_hand(before, calls, aux_coef, z_coef)
    assert m["loss"] == pytest.approx(ce.item(), rel=1e-6)  # the CE alone, comparable with dense runs
    assert m["extra"]["moe_aux_loss"] == pytest.approx(aux.item(), rel=1e-5)
    assert m["extra"]["moe_z_loss"] == pytest.approx(z.item(), rel=1e-5)
    ratio = (counts.max(1).values / counts.mean(1)).tolist()
    assert m["extra"]["expert_load"] == pytest.approx(ratio, abs=1e-4)
    assert m["extra"]["expert_load_max"] == pytest.approx(max(ratio), abs=1e-4)

    (ce + aux_coef * aux + z_coef * z).backward()
    expected = {n: p.grad for n, p in before.named_parameters()}
    assert set(grads) == set(expected)
    for name, g in expected.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-7, msg=name)

    # The CE alone gives another router gradient: the router terms really are in the loss.
    before.zero_grad(set_to_none=True)
    ce_only = _by_hand(before, calls, 0.0, 0.0)[0]
    ce_only.backward()
    router = "model.layers.0.mlp.gate.weight"
    diff = (grads[router] - before.get_parameter(router).grad).norm() / grads[router].norm()
    assert diff > 0.1, diff


def test_aux_coef_changes_the_router_gradient_and_not_the_head(tiny_moe_dir, smollm2_dir, tiny_corpus, tmp_path,
                                                               monkeypatch):
    runs = {}
    for coef in (0.0, 0.1):
        tr = _trainer(tiny_moe_dir, smollm2_dir, tiny_corpus, tmp_path / f"c{coef}",
                      f"--train.router_aux_loss_coef={coef}", "--train.global_batch_size=2")
        assert tr.moe.loss.aux_coef == coef
        runs[coef] = _capture_step(tr, monkeypatch)
    (m0, _, _, g0), (m1, _, _, g1) = runs[0.0], runs[0.1]
    assert m0["loss"] == m1["loss"]  # same data, noise and weights: the CE is the same
    for layer in (0, 2):  # the sparse layers (layer 1 is dense)
        name = f"model.layers.{layer}.mlp.gate.weight"
        assert not torch.allclose(g0[name], g1[name], rtol=1e-3, atol=0), name
    # The balance loss does not depend on the final norm (the head is tied to the embeddings,
    # which feed the routers): its gradient is bit-identical.
    assert torch.equal(g0["model.norm.weight"], g1["model.norm.weight"])


# ------------------------------------------------------------------ metrics, config, ops, eval
def test_metrics_resolved_config_ops_and_eval(tiny_moe_dir, smollm2_dir, tiny_corpus, tmp_path):
    from veomni.models.transformers.moe import Experts

    out = tmp_path / "run"
    tr = _trainer(tiny_moe_dir, smollm2_dir, tiny_corpus, out, "--train.max_steps=2", "--model.ops.moe_experts=loop",
                  "--train.router_z_loss_coef=0.001", "--data.eval_split_ratio=0.2", "--train.eval_steps=1",
                  "--train.eval_max_batches=1")
    assert tr.moe.loss.aux_coef == CONFIG_AUX  # none = the model config's router_aux_loss_coef
    experts = [m for m in tr.model.modules() if isinstance(m, Experts)]
    assert len(experts) == 2 and all(m.impl == "loop" for m in experts)
    tr.train()
    rows = _rows(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["moe_aux_loss"] > 0 and r["moe_z_loss"] > 0
        assert len(r["expert_load"]) == 2  # one entry per sparse layer
        assert all(1.0 <= x <= E / K for x in r["expert_load"])
        assert r["expert_load_max"] == max(r["expert_load"])
        assert r["expert_load_mean"] == pytest.approx(sum(r["expert_load"]) / 2, abs=1e-4)
        assert r["mfu"] is not None and 0 < r["mfu"]
    assert [r["step"] for r in _rows(out / "eval_metrics.jsonl")] == [0, 1, 2]  # eval runs on MoE
    resolved = yaml.safe_load((out / "resolved_config.yaml").read_text())
    assert resolved["model"]["ops"] == {**default_ops(), "moe_experts": "loop"}
    assert resolved["train"]["router_z_loss_coef"] == 0.001 and resolved["train"]["expert_parallel_size"] == 1


def test_dense_model_refuses_router_coefs_and_logs_no_moe_keys(tiny_model_dir, tiny_corpus, tmp_path):
    for flag in ("--train.router_z_loss_coef=0.01", "--train.router_aux_loss_coef=0.001"):
        with pytest.raises(ValueError, match="no mixture-of-experts layer"):
            _trainer(tiny_model_dir, tiny_model_dir, tiny_corpus, tmp_path / "d", flag)
    tr = _trainer(tiny_model_dir, tiny_model_dir, tiny_corpus, tmp_path / "d", "--train.max_steps=1")
    assert tr.moe is None
    tr.train()
    row = _rows(tmp_path / "d" / "metrics.jsonl")[0]
    assert not any(k.startswith(("moe_", "expert_load")) for k in row)


def test_unknown_op_choice_is_refused(tiny_moe_dir, smollm2_dir, tiny_corpus, tmp_path):
    with pytest.raises(ConfigError, match=r"model.ops.moe_experts='fast' is not one of 'grouped'"):
        _trainer(tiny_moe_dir, smollm2_dir, tiny_corpus, tmp_path / "x", "--model.ops.moe_experts=fast")
    with pytest.raises(ConfigError, match=r"known ops: moe_experts"):
        _trainer(tiny_moe_dir, smollm2_dir, tiny_corpus, tmp_path / "x", "--model.ops.geglu=fused")


# ------------------------------------------------------------------ resume
def test_moe_resume_is_bit_exact(tiny_moe_dir, smollm2_dir, tiny_corpus, tmp_path):
    """4 steps straight == 2 steps, checkpoint, a new Trainer resuming for steps 3-4 (constant lr,
    so the shorter first run has the same schedule)."""
    common = ("--train.lr_scheduler=constant", "--train.router_aux_loss_coef=0.05", "--train.router_z_loss_coef=0.01")
    _trainer(tiny_moe_dir, smollm2_dir, tiny_corpus, tmp_path / "straight", "--train.max_steps=4", *common).train()
    _trainer(tiny_moe_dir, smollm2_dir, tiny_corpus, tmp_path / "resumed", "--train.max_steps=2", *common).train()
    tr = _trainer(tiny_moe_dir, smollm2_dir, tiny_corpus, tmp_path / "resumed", "--train.max_steps=4", *common)
    assert tr.step == 2
    tr.train()
    a, b = _rows(tmp_path / "straight" / "metrics.jsonl"), _rows(tmp_path / "resumed" / "metrics.jsonl")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    keys = ("loss", "grad_norm", "lr", "tokens_seen", "moe_aux_loss", "moe_z_loss", "expert_load")
    for x, y in zip(a, b):
        assert all(x[k] == y[k] for k in keys), (x, y)


# ------------------------------------------------------------------ the shipped quickstart MoE config
def test_quickstart_moe_config_runs_from_another_directory(smollm2_dir, tiny_corpus, tmp_path):
    """The config as shipped, only data, length and outputs overridden, started outside the repo:
    the relative model_path (configs/models/qwen3_moe_tiny) is found in the checkout."""
    out = tmp_path / "out"
    cmd = [sys.executable, str(REPO / "tasks" / "train_torch.py"), str(MOE_CONFIG), f"--data.train_path={tiny_corpus}",
           f"--train.output_dir={out}", "--train.max_steps=3", "--train.save_steps=0", "--train.eval_steps=2",
           "--train.eval_max_batches=1", "--data.eval_split_ratio=0.1", "--train.progress_bar=false"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="2"), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ops: moe_experts=grouped (2 modules)" in proc.stderr
    rows = _rows(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3] and all("moe_aux_loss" in r for r in rows)
    assert [r["step"] for r in _rows(out / "eval_metrics.jsonl")] == [0, 2, 3]
    cfg = json.loads((out / "hf" / "config.json").read_text())
    assert cfg["model_type"] == "qwen3_moe" and isinstance(cfg["mask_token_id"], int)
