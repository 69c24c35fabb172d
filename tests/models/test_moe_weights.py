"""MoE weights: per-expert hub checkpoints <-> our fused [E, ...] tensors, both ways.

HF directory (sharded, experts split across shards) -> ours -> HF directory, and plain
transformers loads the result with the same logits; scripts/check_parity.py accepts MoE dirs.
"""
import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2MoeConfig, Qwen3MoeConfig

from veomni.models.hf_io import checkpoint_keys, load_model, save_model
from veomni.models.moe_weights import ExpertMerger, split_experts

REPO = Path(__file__).resolve().parents[2]


def _config(kind: str):
    common = dict(vocab_size=97, hidden_size=32, intermediate_size=40, moe_intermediate_size=24,
                  num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, num_experts=6,
                  num_experts_per_tok=2, mlp_only_layers=[1], tie_word_embeddings=False,
                  max_position_embeddings=128)
    if kind == "qwen3_moe":
        return Qwen3MoeConfig(**common, head_dim=12, norm_topk_prob=True)
    return Qwen2MoeConfig(**common, shared_expert_intermediate_size=20, norm_topk_prob=False)


def _hf_dir(tmp_path, kind: str, shard: str = "40KB"):
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(_config(kind)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.normal_(0.0, 0.5 if name.endswith("gate.weight") else 0.1)  # routing far from uniform
    path = tmp_path / f"hf_{kind}"
    hf.save_pretrained(path, max_shard_size=shard)
    return hf, path


def _ids():
    return torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(3))


def _split_layers(path: Path) -> bool:
    """True when some layer's experts sit in more than one shard (what the merger must handle)."""
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    files = {}
    for key, f in index.items():
        if ".experts." in key:
            files.setdefault(key.split(".mlp.")[0], set()).add(f)
    return any(len(v) > 1 for v in files.values())


@pytest.mark.parametrize("kind", ["qwen3_moe", "qwen2_moe"])
def test_hub_checkpoint_round_trip(tmp_path, kind):
    hf, path = _hf_dir(tmp_path, kind)
    assert _split_layers(path), "the test needs a layer whose experts span shards"
    ours = load_model(path)
    ids = _ids()
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        torch.testing.assert_close(ours(input_ids=ids, attn_mode="causal").logits, ref, atol=1e-5, rtol=1e-5)

    out = save_model(ours, tmp_path / "ours", max_shard_size="40KB")
    # The hub layout, key for key: what transformers itself wrote.
    assert checkpoint_keys(out) == checkpoint_keys(path)
    assert not any(k.endswith(("gate_up_proj", "experts.down_proj")) for k in checkpoint_keys(out))
    back = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, ref, atol=1e-5, rtol=1e-5)
    # ... and ours loads its own save.
    again = load_model(out)
    for (name, a), (_, b) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name


def test_merger_fuses_across_shards_in_any_order():
    e, i, h = 3, 4, 5
    g = torch.Generator().manual_seed(0)
    parts = {f"l.experts.{j}.{n}.weight": torch.randn((h, i) if n == "down_proj" else (i, h), generator=g)
             for j in range(e) for n in ("gate_proj", "up_proj", "down_proj")}
    keys = list(parts)[::-1]  # reversed: the last expert arrives first
    merger = ExpertMerger(e)
    first = merger({k: parts[k] for k in keys[:4]} | {"other": torch.ones(1)})
    assert set(first) == {"other"}  # nothing fused until the layer is complete
    fused = merger({k: parts[k] for k in keys[4:]})
    merger.finish()
    assert fused["l.experts.gate_up_proj"].shape == (e, 2 * i, h)
    for j in range(e):
        assert torch.equal(fused["l.experts.gate_up_proj"][j, :i], parts[f"l.experts.{j}.gate_proj.weight"])
        assert torch.equal(fused["l.experts.gate_up_proj"][j, i:], parts[f"l.experts.{j}.up_proj.weight"])
        assert torch.equal(fused["l.experts.down_proj"][j], parts[f"l.experts.{j}.down_proj.weight"])
    back = split_experts(fused)
    assert set(back) == set(parts) and all(torch.equal(back[k], parts[k]) for k in parts)


def test_merger_errors_name_the_problem():
    w = torch.zeros(2, 2)
    merger = ExpertMerger(2)
    merger({"l.experts.0.gate_proj.weight": w, "l.experts.0.up_proj.weight": w})
    with pytest.raises(KeyError, match=r"missing e\.g\. \['l\.experts\.0\.down_proj\.weight'"):
        merger.finish()
    with pytest.raises(KeyError, match="expert 5 but config.num_experts=2"):
        ExpertMerger(2)({"l.experts.5.gate_proj.weight": w})
    with pytest.raises(KeyError, match="appears twice"):
        m = ExpertMerger(2)
        m({"l.experts.0.gate_proj.weight": w})
        m({"l.experts.0.gate_proj.weight": w})


def test_checkpoint_with_a_missing_expert_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    _, path = _hf_dir(tmp_path, "qwen3_moe", shard="10GB")
    sd = load_file(str(path / "model.safetensors"))
    del sd["model.layers.2.mlp.experts.4.up_proj.weight"]
    save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(KeyError, match="experts.4.up_proj"):
        load_model(path)


def test_check_parity_script_accepts_moe_dirs(tmp_path, capsys):
    _, path = _hf_dir(tmp_path, "qwen3_moe")
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import check_parity
    finally:
        sys.path.pop(0)
    assert check_parity.main(["--model_path", str(path), "--seq_len", "16"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("max_abs_diff=") and float(last.split("=")[1]) <= 1e-4
