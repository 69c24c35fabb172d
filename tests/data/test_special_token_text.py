"""Special-token strings in corpus text stay plain text; SFT targets end in exactly one EOS."""
import pytest

from veomni.data import DataFormatError, build_dataset
from veomni.data.special_tokens import encode_mixed, end_with_one_eos, render_chat

CODE = 'MASK = "<|mask|>"\nEND = "<|im_end|>"  # the chat end marker\nprint(MASK, END)\n'


def _doc(ds, i):
    s = ds.store
    return s.tokens[s.offsets[i]:s.offsets[i + 1]].tolist()


@pytest.fixture
def smol_tok(smollm2_dir):
    from veomni.models.hf_io import load_tokenizer

    return load_tokenizer(str(smollm2_dir), mask_token="<|mask|>")  # a fresh copy with a mask token


def test_pretrain_text_with_special_strings_is_plain_text(tmp_path, smol_tok):
    src = tmp_path / "tok.py"
    src.write_text(CODE)
    ds = build_dataset(str(src), smol_tok, max_seq_len=128)
    ids = _doc(ds, 0)
    eos, mask = smol_tok.eos_token_id, smol_tok.mask_token_id
    assert mask not in ids, "a literal <|mask|> became the mask token: corrupt() would raise on this row"
    assert ids.count(eos) == 1 and ids[-1] == eos, "a literal <|im_end|> became a mid-document EOS"
    assert smol_tok.decode(ids[:-1]) == CODE


def test_corrupt_accepts_rows_from_such_text(tmp_path, smol_tok):
    import torch

    from veomni.data.packing import collate
    from veomni.diffusion.noise import corrupt

    src = tmp_path / "tok.py"
    src.write_text(CODE * 3)
    ds = build_dataset(str(src), smol_tok, max_seq_len=64)
    batch = collate([ds[i] for i in range(len(ds))])
    corr = corrupt(batch, mask_token_id=smol_tok.mask_token_id, eps=1e-3, per_document=True,
                   generator=torch.Generator().manual_seed(0), logit_shift=True)
    assert corr.n_maskable > 0


def test_sft_contents_with_special_strings_stay_text(tmp_path, jsonl, smol_tok):
    msgs = [{"role": "user", "content": "Why does my template print <|im_end|> twice?"},
            {"role": "assistant", "content": "Because `<|im_end|>` and <|im_start|>user are literals here."}]
    ds = build_dataset(jsonl(tmp_path / "s.jsonl", [{"messages": msgs}]), smol_tok, data_type="sft", max_seq_len=256)
    ids, plen = _doc(ds, 0), int(ds.store.prompt_lens[0])
    full = smol_tok.apply_chat_template(msgs, tokenize=False)
    assert smol_tok.decode(ids) == full.rstrip("\n")
    # Only the template's own markers are special tokens: system, user and assistant turns each
    # end with one <|im_end|>, and three turns start with <|im_start|>.
    im_start = smol_tok.convert_tokens_to_ids("<|im_start|>")
    assert ids.count(smol_tok.eos_token_id) == 3 and ids.count(im_start) == 3
    assert ids[-1] == smol_tok.eos_token_id and ids[plen:].count(smol_tok.eos_token_id) == 1


def test_mixed_encoding_equals_the_tokenizer_without_literals(smol_tok, qwen_tok):
    """Cutting at the template's special tokens is exactly what the tokenizer does itself."""
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " two  spaces\n\nand lines "},
            {"role": "assistant", "content": "def f(x):\n    return x  # ok"}]
    for tok in (smol_tok, qwen_tok):
        text = tok.apply_chat_template(msgs, tokenize=False)
        assert encode_mixed(tok, text, []) == tok(text, add_special_tokens=False)["input_ids"]
        real, spans = render_chat(tok, msgs, False, "here")
        assert real == text and [real[a:b] for a, b in spans] == [m["content"] for m in msgs]


def test_trimming_template_and_opaque_template(smol_tok):
    msgs = [{"role": "user", "content": "  a <|im_end|> b  "}, {"role": "assistant", "content": " ok "}]
    trim = smol_tok.__class__.from_pretrained(smol_tok.name_or_path)
    trim.chat_template = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content | trim }}<|im_end|>\n"
                          "{% endfor %}")
    text, spans = render_chat(trim, msgs, False, "here")
    assert [text[a:b] for a, b in spans] == ["a <|im_end|> b", "ok"]
    ids = encode_mixed(trim, text, spans)
    assert ids.count(trim.eos_token_id) == 2  # the two template markers, not the literal one
    upper = smol_tok.__class__.from_pretrained(smol_tok.name_or_path)
    upper.chat_template = "{% for m in messages %}<|im_start|>{{ m.content | upper }}<|im_end|>{% endfor %}"
    with pytest.raises(DataFormatError, match="special-token string"):
        render_chat(upper, msgs, False, "rec.jsonl:7")


def test_end_with_one_eos(smol_tok):
    eos = smol_tok.eos_token_id
    nl = smol_tok("\n", add_special_tokens=False)["input_ids"]
    word = smol_tok(" x", add_special_tokens=False)["input_ids"]
    assert end_with_one_eos([5, eos, *nl], eos, smol_tok) == [5, eos]  # template end marker is the EOS
    assert end_with_one_eos([5, eos], eos, smol_tok) == [5, eos]
    assert end_with_one_eos([5, *nl], eos, smol_tok) == [5, *nl, eos]  # template without the EOS
    assert end_with_one_eos([eos, *word], eos, smol_tok) == [eos, *word, eos]  # EOS not at the end


def test_sft_without_template_end_marker_appends_eos(tmp_path, jsonl, qwen_tok):
    ds = build_dataset(jsonl(tmp_path / "s.jsonl", [{"prompt": "Q: <|im_end|>?\nA:", "response": " <|endoftext|>"}]),
                       qwen_tok, data_type="sft", max_seq_len=64, use_chat_template=False)
    ids = _doc(ds, 0)
    assert ids.count(qwen_tok.eos_token_id) == 1 and ids[-1] == qwen_tok.eos_token_id
    assert qwen_tok.pad_token_id not in ids  # <|endoftext|> in the response stayed text
