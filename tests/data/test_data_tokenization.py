"""Tokenization (EOS, SFT prompt/response split via the chat template) and the token cache."""
import os

import numpy as np
import pytest

from veomni.data import DataFormatError, build_dataset


def _doc(ds, i):
    s = ds.store
    return s.tokens[s.offsets[i]:s.offsets[i + 1]].tolist()


def test_pretrain_docs_end_with_eos(tmp_path, jsonl, qwen_tok):
    path = jsonl(tmp_path / "d.jsonl", [{"text": "hello world"}, {"text": "def f(x):\n    return x"}])
    txt = tmp_path / "code.py"
    txt.write_text("import os\nprint(os.sep)\n")
    ds = build_dataset([path, str(txt)], qwen_tok, max_seq_len=64)
    assert ds.num_docs == 3 and ds.store.prompt_lens is None
    eos = qwen_tok.eos_token_id
    for i, text in enumerate(["hello world", "def f(x):\n    return x", "import os\nprint(os.sep)\n"]):
        assert _doc(ds, i) == qwen_tok(text, add_special_tokens=False)["input_ids"] + [eos]


def test_sft_prompt_response_uses_chat_template(tmp_path, jsonl, qwen_tok):
    path = jsonl(tmp_path / "s.jsonl", [{"prompt": "What is 2+2?", "response": "4"}])
    ds = build_dataset(path, qwen_tok, data_type="sft", max_seq_len=128)
    ids, plen = _doc(ds, 0), int(ds.store.prompt_lens[0])
    msgs = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]
    prompt = qwen_tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
    full = qwen_tok.apply_chat_template(msgs, tokenize=False)
    assert ids[:plen] == qwen_tok(prompt, add_special_tokens=False)["input_ids"]
    assert qwen_tok.decode(ids[:plen]) == prompt
    # The template closes the turn with "<|im_end|>\n" and <|im_end|> is the EOS: the target ends
    # there, with one EOS (not "<|im_end|>\n<|im_end|>").
    assert full[len(prompt):].endswith(qwen_tok.eos_token + "\n")
    assert qwen_tok.decode(ids[plen:]) == full[len(prompt):-1]
    assert ids[-1] == qwen_tok.eos_token_id and ids[plen:].count(qwen_tok.eos_token_id) == 1


def test_sft_multiturn_only_last_assistant_is_response(tmp_path, jsonl, qwen_tok):
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "FIRST-ANSWER"},
        {"role": "user", "content": "second question"},
        {"role": "assistant", "content": "SECOND-ANSWER"},
    ]
    path = jsonl(tmp_path / "m.jsonl", [{"messages": msgs}])
    ds = build_dataset(path, qwen_tok, data_type="sft", max_seq_len=256)
    ids, plen = _doc(ds, 0), int(ds.store.prompt_lens[0])
    prompt_text, response_text = qwen_tok.decode(ids[:plen]), qwen_tok.decode(ids[plen:])
    # The prompt runs up to and including the generation prompt of the last assistant turn.
    assert prompt_text == qwen_tok.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
    assert "FIRST-ANSWER" in prompt_text and "second question" in prompt_text
    assert prompt_text.endswith("<|im_start|>assistant\n")
    assert "SECOND-ANSWER" in response_text and "FIRST-ANSWER" not in response_text
    assert response_text.endswith(qwen_tok.eos_token)
    # Maskable = response + EOS only.
    row = ds[0]
    assert row["maskable"][:plen].sum() == 0 and bool(row["maskable"][plen:len(ids)].all())


def test_sft_without_chat_template_option(tmp_path, jsonl, qwen_tok):
    path = jsonl(tmp_path / "s.jsonl", [{"prompt": "Q: hi\nA:", "response": " hello"}])
    ds = build_dataset(path, qwen_tok, data_type="sft", max_seq_len=64, use_chat_template=False)
    p = qwen_tok("Q: hi\nA:", add_special_tokens=False)["input_ids"]
    r = qwen_tok(" hello", add_special_tokens=False)["input_ids"]
    assert _doc(ds, 0) == p + r + [qwen_tok.eos_token_id] and ds.store.prompt_lens[0] == len(p)
    msg = jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "assistant", "content": "x"}]}])
    with pytest.raises(DataFormatError, match="need the chat template"):
        build_dataset(msg, qwen_tok, data_type="sft", max_seq_len=64, use_chat_template=False)


def test_tokenizer_requirements(tmp_path, jsonl, qwen_tok, counting):
    path = jsonl(tmp_path / "s.jsonl", [{"prompt": "p", "response": "r"}])
    no_eos = counting(qwen_tok)
    no_eos.eos_token_id = None
    with pytest.raises(ValueError, match="has no eos_token_id"):
        build_dataset(path, no_eos, data_type="sft")
    no_tmpl = counting(qwen_tok)
    no_tmpl.chat_template = None
    with pytest.raises(ValueError, match="has no chat_template"):
        build_dataset(path, no_tmpl, data_type="sft")

    class Inconsistent(type(no_tmpl)):  # renders history differently once the answer exists
        def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
            return "PROMPT:" if add_generation_prompt else "FULL:" + messages[-1]["content"]

    with pytest.raises(DataFormatError, match=f"{path}:1: the chat template does not render the prompt"):
        build_dataset(path, Inconsistent(qwen_tok), data_type="sft")


def test_cache_hit_skips_tokenizer_and_invalidates_on_change(tmp_path, jsonl, qwen_tok, counting):
    path = jsonl(tmp_path / "s.jsonl", [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(5)])
    cache = tmp_path / "cache"
    first = counting(qwen_tok)
    ds1 = build_dataset(path, first, data_type="sft", max_seq_len=64, cache_dir=cache)
    assert first.calls > 0 and not ds1.store.from_cache
    assert len([d for d in os.listdir(cache) if not d.startswith(".")]) == 1

    second = counting(qwen_tok)
    ds2 = build_dataset(path, second, data_type="sft", max_seq_len=32, cache_dir=cache)  # packing opts not in key
    assert second.calls == 0 and ds2.store.from_cache
    np.testing.assert_array_equal(ds1.store.tokens, ds2.store.tokens)
    np.testing.assert_array_equal(ds1.store.prompt_lens, ds2.store.prompt_lens)

    # Changed reader options, or a changed file, mean a new key and a fresh tokenization.
    third = counting(qwen_tok)
    build_dataset(path, third, data_type="sft", max_seq_len=64, cache_dir=cache, use_chat_template=False)
    assert third.calls > 0
    with open(path, "a") as f:
        f.write('{"prompt": "new", "response": "row"}\n')
    fourth = counting(qwen_tok)
    ds4 = build_dataset(path, fourth, data_type="sft", max_seq_len=64, cache_dir=cache)
    assert fourth.calls > 0 and ds4.num_docs == 6


def test_cache_keeps_skip_counts(tmp_path, jsonl, qwen_tok, counting):
    path = jsonl(tmp_path / "d.jsonl", [{"text": "a"}, "{bad", {"text": "b"}])
    build_dataset(path, qwen_tok, max_seq_len=8, cache_dir=tmp_path / "c", skip_bad_lines=True)
    tok = counting(qwen_tok)
    ds = build_dataset(path, tok, max_seq_len=8, cache_dir=tmp_path / "c", skip_bad_lines=True)
    assert tok.calls == 0 and ds.skipped == {path: 1}
    # skip_bad_lines is part of the key: a strict run must not reuse the lenient cache.
    with pytest.raises(DataFormatError, match=f"{path}:2"):
        build_dataset(path, qwen_tok, max_seq_len=8, cache_dir=tmp_path / "c")
