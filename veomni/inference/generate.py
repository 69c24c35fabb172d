"""The glue between user input and the samplers: config merging and prompt encoding."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from veomni.diffusion.sampling import GenerationConfig, diffusion_generate, merge
from veomni.diffusion.sampling.config import STEP_ALGS


def resolve_config(model, config: Optional[Union[GenerationConfig, Dict[str, Any]]] = None,
                   overrides: Optional[Dict[str, Any]] = None) -> GenerationConfig:
    """model config defaults <- config <- overrides, validated."""
    return merge(GenerationConfig.from_model_config(getattr(model, "config", None)), config,
                 **(overrides or {})).resolve()


@torch.no_grad()
def generate(model, input_ids, config: Optional[Union[GenerationConfig, Dict[str, Any]]] = None,
             attention_mask: Optional[torch.Tensor] = None, step_callback=None, **overrides):
    """`diffusion_generate` with the model's config merged under the user's (see resolve_config)."""
    cfg = resolve_config(model, config, overrides)
    return diffusion_generate(model, input_ids, cfg, attention_mask=attention_mask, step_callback=step_callback)


def generation_config_from_infer(infer) -> GenerationConfig:
    """The sampler config for an `InferArgs` group (veomni/config/schema.py).

    infer.threshold is the confidence threshold of alg=threshold and the entropy threshold of
    alg=multi_block (the schema documents both). infer.steps is derived as max_new_tokens when
    unset; the dynamic algs (threshold/factor/multi_block) take no steps, so that derived value is
    dropped for them and any other value is left for the sampler to reject.
    """
    values = dict(
        max_new_tokens=infer.max_new_tokens, steps=infer.steps, alg=infer.alg,
        temperature=infer.temperature, top_p=infer.top_p, top_k=infer.top_k, eps=infer.eps,
        alg_temp=infer.alg_temp, block_length=infer.block_length, factor=infer.factor,
        factor_strict=infer.factor_strict,
        cfg_scale=infer.cfg_scale, use_cache=infer.use_cache, seed=infer.seed,
        exact_step_counts=infer.exact_step_counts, block_add_threshold=infer.block_add_threshold,
        decoded_token_threshold=infer.decoded_token_threshold,
        stop_strings=list(infer.stop_strings) or None,
    )
    if infer.alg == "multi_block":
        values["entropy_threshold"] = infer.threshold
    else:
        values["threshold"] = infer.threshold
    if infer.alg not in STEP_ALGS and infer.steps == infer.max_new_tokens:
        values["steps"] = None
    return GenerationConfig(**values)


# ---- prompts ------------------------------------------------------------------------------------
def chat_prompt_ids(tokenizer, messages: Sequence[Dict[str, str]]) -> List[int]:
    """Token ids of a conversation rendered by the tokenizer's chat template, ready for the
    assistant's reply (the template writes the special tokens itself: none are added again)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("--chat needs a tokenizer with a chat template (tokenizer_config.json "
                         "'chat_template' or chat_template.jinja); this one has none. Drop --chat to "
                         "complete raw text.")
    text = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False).input_ids


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """[B, P] ids and attention mask, shorter rows padded on the left (what the samplers need)."""
    if not rows:
        raise ValueError("no prompts to encode")
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, row in enumerate(rows):
        if len(row) == 0:
            raise ValueError(f"prompt {b} encodes to zero tokens; give it some text")
        ids[b, width - len(row):] = torch.tensor(list(row), dtype=torch.long)
        mask[b, width - len(row):] = 1
    return ids.to(device), mask.to(device)


def encode_prompts(tokenizer, prompts: Sequence[str], device=None, chat: bool = False,
                   system_prompt: Optional[str] = None,
                   pad_token_id: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Left-padded (input_ids, attention_mask) for a batch of prompts.

    chat=True wraps each prompt as one user turn (after `system_prompt` when given) with the
    tokenizer's chat template; otherwise the text is tokenized as is (tokenizer(prompt)).
    """
    rows = []
    for text in prompts:
        if chat:
            messages = ([{"role": "system", "content": system_prompt}] if system_prompt else [])
            rows.append(chat_prompt_ids(tokenizer, messages + [{"role": "user", "content": text}]))
        else:
            if system_prompt:
                raise ValueError("system_prompt needs chat=True (--chat): raw completion has no system turn")
            rows.append(tokenizer(text).input_ids)
    if pad_token_id is None:
        pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return left_pad(rows, pad_token_id, device)
