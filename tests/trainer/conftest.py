"""A tiny random Llama with the real SmolLM2 tokenizer, saved as an HF dir, plus a small corpus."""
import json

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_dir):
    from transformers import LlamaConfig

    from veomni.models.hf_io import load_tokenizer, save_model
    from veomni.models.registry import build_model

    tok = load_tokenizer(str(smollm2_dir))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = build_model(cfg)
    model.init_weights()
    out = tmp_path_factory.mktemp("tiny_llama")
    save_model(model, out, tokenizer=tok)
    return out


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """~60 short documents of Python-ish text (JSONL with `text`)."""
    import random

    rng = random.Random(0)
    words = ["def", "return", "for", "in", "range", "if", "else", "print", "x", "y", "value", "(", ")",
             ":", "=", "+", "1", "2", "list", "dict", "import", "os", "while", "class", "self"]
    path = tmp_path_factory.mktemp("corpus") / "train.jsonl"
    with open(path, "w") as f:
        for _ in range(60):
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(20, 60)))}) + "\n")
    return path
