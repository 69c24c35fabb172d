"""A chat template for BERT tokenizers, which ship none (BERT-chat; docs/recipes.md).

    [CLS]user: <text>
    assistant: <text>[SEP]
    user: <text>
    assistant:

Plain role words, not new special tokens, because the pretrained encoder knows them as words
(dllm's BERT-chat uses bracketed tags the same way). [CLS] opens the conversation as in BERT's
pretraining, and every assistant turn ends with [SEP], the tokenizer's EOS here: the SFT pipeline
ends each response with it and the samplers stop there. The prompt with the generation prompt
("... assistant:") is a prefix of the whole conversation, which the SFT pipeline requires.
"""
from __future__ import annotations

BERT_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}assistant: {{ message['content'] | trim }}{{ eos_token }}\n"
    "{% else %}{{ message['role'] }}: {{ message['content'] | trim }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def add_bert_chat_template(tokenizer):
    """Give a BERT tokenizer EOS = [SEP], BOS = [CLS] and the chat template above (in place)."""
    for need in ("sep_token", "cls_token", "mask_token"):
        if getattr(tokenizer, need, None) is None:
            raise ValueError(f"{type(tokenizer).__name__} has no {need}: the BERT chat template needs a BERT "
                             "tokenizer ([CLS], [SEP], [MASK])")
    tokenizer.eos_token = tokenizer.sep_token
    tokenizer.bos_token = tokenizer.cls_token
    tokenizer.chat_template = BERT_CHAT_TEMPLATE
    return tokenizer


__all__ = ["BERT_CHAT_TEMPLATE", "add_bert_chat_template"]
