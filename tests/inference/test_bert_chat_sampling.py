"""The LLaDA sampler, the chat loop, the ELBO and the lm-eval adapter on the BERT encoder (no KV
cache, no logit shift): the prompt is never changed, batches equal one-by-one runs."""
import io

import pytest
import torch

from tests.models.test_bert import VOCAB, build_bert_pair

MASK = VOCAB - 1
EOS = VOCAB - 2


@pytest.fixture(scope="module")
def encoder():
    _, model = build_bert_pair(seed=3)
    with torch.no_grad():  # peaked predictions, so the confidence ranking has something to rank
        for name, p in model.named_parameters():
            if "LayerNorm" not in name:
                p.normal_(0.0, 0.3)
    model.config.mask_token_id, model.config.eos_token_id = MASK, EOS
    model.config.dllm_attn_mode, model.config.dllm_logit_shift = "bidirectional", False
    return model.eval()


def test_llada_blocks_keep_the_prompt_and_match_one_by_one(encoder):
    from veomni.inference.generate import generate

    prompts = [[5, 6, 7, 8, 9], [11, 12, 13]]
    ids = torch.tensor([prompts[0], [0, 0] + prompts[1]])
    mask = torch.tensor([[1] * 5, [0, 0, 1, 1, 1]])
    cfg = dict(alg="low_confidence", max_new_tokens=12, steps=12, block_length=4, stop_at_eos=False)
    out = generate(encoder, ids, cfg, attention_mask=mask)
    assert out.config.logit_shift is False and out.stats["nfe"] == 12
    assert torch.equal(out.sequences[:, :5], ids), "the sampler changed prompt tokens"
    assert not bool((out.sequences == MASK).any())
    for b, p in enumerate(prompts):
        alone = generate(encoder, torch.tensor([p]), cfg).sequences[0, len(p):]
        assert torch.equal(alone, out.sequences[b, 5:])


def test_encoder_refuses_a_kv_cache(encoder):
    from veomni.inference.generate import generate

    with pytest.raises(ValueError, match="no KV cache"):
        generate(encoder, torch.tensor([[5, 6, 7]]), dict(alg="low_confidence", max_new_tokens=8, block_length=4,
                                                          use_cache="prefix"))


def test_mc_elbo_on_the_encoder(encoder):
    from veomni.eval.likelihood import mc_elbo

    g = torch.Generator().manual_seed(0)
    r = mc_elbo(encoder, [5, 6, 7], [8, 9, 10, 11], mc_num=8, batch_size=4, generator=g)
    assert r["nll"] > 0 and r["n_tokens"] == 4
    # One target token, one copy: the bound is exact, the CE of the masked position read in place.
    one = mc_elbo(encoder, [5, 6, 7], [8], mc_num=1, batch_size=1)
    with torch.no_grad():
        logits = encoder(torch.tensor([[5, 6, 7, MASK]])).logits[0, 3]
    assert one["nll"] == pytest.approx(float(-torch.log_softmax(logits, -1)[8]), rel=1e-5)


def test_chat_loop_and_lm_eval_adapter_with_the_minilm_tokenizer(minilm_dir):
    """A tiny random BERT with the embedded MiniLM tokenizer: the BERT chat template drives
    --chat's loop; the lm-eval adapter's loglikelihood runs the ELBO in place (no shift)."""
    from transformers import BertConfig

    from veomni.eval.lm_eval_adapter import DLLMEvalModel
    from veomni.inference.chat import ChatSession, interactive_loop
    from veomni.models.hf_io import load_tokenizer
    from veomni.models.registry import build_model

    tok = load_tokenizer(str(minilm_dir))
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                     num_attention_heads=4, max_position_embeddings=128, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = build_model(cfg)
    model.init_weights()
    model.config.mask_token_id, model.config.dllm_logit_shift = tok.mask_token_id, False
    model.eval()
    session = ChatSession(model, tok, dict(alg="low_confidence", max_new_tokens=8, block_length=4))
    out = io.StringIO()
    assert interactive_loop(session, stdin=io.StringIO("hello there\nand again\n"), stdout=out) == 2
    first_prompt = session.last_output.sequences[0, :session.last_output.prompt_len].tolist()
    assert tok.convert_ids_to_tokens(first_prompt[:3]) == ["[CLS]", "user", ":"]
    assert [m["role"] for m in session.messages] == ["user", "assistant", "user", "assistant"]

    class Req:
        def __init__(self, *args):
            self.args = args

    ev = DLLMEvalModel(model, tok, mc_num=4, mc_batch_size=2)
    assert ev.logit_shift is False
    (ll, greedy), = ev.loglikelihood([Req("the capital of france is", " paris")])
    assert ll < 0 and isinstance(greedy, bool)
