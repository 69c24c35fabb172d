"""`diffusion_generate`: one entry point for every sampler, plus EOS / stop-string trimming."""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Union

import torch

from veomni.diffusion.sampling.config import (
    DREAM_ALGS, SEMI_AR_ALGS, GenerationConfig, eos_list, resolve_for_model,
)
from veomni.diffusion.sampling.dream import run_dream
from veomni.diffusion.sampling.engine import DecodeState, GenerationOutput
from veomni.diffusion.sampling.multi_block import run_multi_block
from veomni.diffusion.sampling.p2 import run_p2
from veomni.diffusion.sampling.semi_ar import run_semi_ar


def run_alg(state: DecodeState) -> None:
    alg = state.cfg.alg
    if alg in DREAM_ALGS:
        run_dream(state)
    elif alg == "p2":
        run_p2(state)
    elif alg in SEMI_AR_ALGS:
        run_semi_ar(state)
    elif alg == "multi_block":
        run_multi_block(state)
    else:  # resolve() already rejects unknown algs; this guards a new entry in ALGS without a runner
        raise ValueError(f"alg={alg!r} has no sampler")


@torch.no_grad()
def diffusion_generate(model, input_ids, config: Optional[Union[GenerationConfig, dict]] = None,
                       attention_mask: Optional[torch.Tensor] = None,
                       step_callback: Optional[Callable[[int, torch.Tensor], None]] = None, **overrides):
    """Generate `max_new_tokens` tokens after each prompt with a masked-diffusion LM.

    model: called as model(input_ids, attention_mask=, position_ids=, attn_mode=, block_size=,
        past_key_values=, cache_position=, logits_to_keep=) -> .logits (veomni dense decoders).
    input_ids [B, P] (or [P]); attention_mask [B, P] with zeros on the LEFT for shorter prompts.
    config: GenerationConfig or dict; unset fields take the model config's values (mask/eos/pad
        ids, dllm_attn_mode, dllm_block_size, dllm_logit_shift), then built-in defaults.
    step_callback(step, x): called after every step with the step number (1-based) and the live
        [B, P+N] tensor (masks included; read it, do not modify it) - for live views.
    overrides: any GenerationConfig field, applied over `config` (unknown names raise).
    Returns GenerationOutput(sequences [B, P+N], history, stats) or, with return_dict=False, the
    sequences tensor. Everything after the first EOS of a row is set to pad_token_id.
    """
    cfg = resolve_for_model(model, config, overrides)
    state = DecodeState(model, cfg, input_ids, attention_mask, cfg.max_new_tokens)
    state.step_callback = step_callback
    run_alg(state)
    out = state.finish()
    return out if cfg.return_dict else out.sequences


def trim_after_eos(tokens: torch.Tensor, eos_token_id: Union[int, Sequence[int]], pad_token_id: int) -> torch.Tensor:
    """Copy of tokens [B, N] with every position after each row's first EOS set to pad_token_id."""
    eos = torch.tensor(eos_list(eos_token_id), dtype=torch.long, device=tokens.device)
    if eos.numel() == 0:
        return tokens.clone()
    seen = torch.isin(tokens, eos).long().cumsum(1)
    after = (seen - torch.isin(tokens, eos).long()) > 0
    return tokens.masked_fill(after, pad_token_id)


def decode_trimmed(tokenizer, output: Union[GenerationOutput, torch.Tensor], prompt_len: Optional[int] = None,
                   stop_strings: Optional[Sequence[str]] = None,
                   eos_token_id: Optional[Union[int, Sequence[int]]] = None,
                   skip_special_tokens: bool = True) -> List[str]:
    """Decode each row's new tokens, cut before the first EOS and before the first stop string.

    prompt_len / stop_strings / eos_token_id default to those recorded in `output` (a
    GenerationOutput); pass them when `output` is a plain [B, P+N] tensor.
    """
    cfg = output.config if isinstance(output, GenerationOutput) else None
    seqs = output.sequences if isinstance(output, GenerationOutput) else output
    if prompt_len is None:
        if not isinstance(output, GenerationOutput):
            raise ValueError("decode_trimmed on a plain tensor needs prompt_len")
        prompt_len = output.prompt_len
    if stop_strings is None and cfg is not None:
        stop_strings = cfg.stop_strings
    eos = eos_list(eos_token_id if eos_token_id is not None else (cfg.eos_token_id if cfg else None))
    texts = []
    for row in seqs[:, prompt_len:].tolist():
        cut = next((i for i, t in enumerate(row) if t in eos), len(row))
        text = tokenizer.decode(row[:cut], skip_special_tokens=skip_special_tokens)
        for stop in stop_strings or ():
            at = text.find(stop)
            if at >= 0:
                text = text[:at]
        texts.append(text)
    return texts
