"""Open-dLLM's generation API on our models: `MDMGenerationConfig` + `model.diffusion_generate`.

Open-dLLM (and Dream before it) call

    gen_cfg = MDMGenerationConfig(max_new_tokens=128, steps=200, temperature=0.7, ...)
    out = model.diffusion_generate(inputs=input_ids, generation_config=gen_cfg)
    out.sequences, out.history

The same code runs here (veomni/models/transformers/<family>/generation_utils.py re-exports this
module). Differences from Open-dLLM, all on purpose:
  - the config *merges* with the model's: mask/eos/pad ids, attention mode and logit shift come
    from model.config unless given (Open-dLLM raises "mask_token_id must be set" instead);
  - the result is a GenerationOutput (sequences, history, stats) unless return_dict_in_generate=False
    is passed (then the tensor, as Open-dLLM does by default);
  - everything after a row's first EOS is set to the pad id (Open-dLLM keeps decoding past it);
  - attention_mask is honoured (left padding) instead of being dropped;
  - unset `steps` = max_new_tokens (Open-dLLM: 512); unset `alg` = 'entropy' (Open-dLLM's default);
  - our own options (alg='threshold', use_cache='dual', block_length, ...) are accepted too;
  - an unknown option raises and names the closest valid one.
"""
from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Dict, Optional, Tuple

import torch

from veomni.diffusion.sampling import GenerationConfig, GenerationOutput
from veomni.inference.generate import generate

MDMModelOutput = GenerationOutput  # Open-dLLM's name for the result (.sequences, .history)

_RENAMED = {"return_dict_in_generate": "return_dict"}  # Open-dLLM / HF name -> ours
# HF GenerationConfig names Open-dLLM code passes that are handled here, not by the sampler.
_HANDLED_HERE = ("max_length", "num_return_sequences", "do_sample", "bos_token_id")
NAMES = tuple(sorted(set(GenerationConfig.field_names()) | set(_RENAMED) | set(_HANDLED_HERE)))
_READ_DEFAULTS = {"alg": "entropy", "num_return_sequences": 1}  # what an unset field reads as


def _check_name(name: str) -> None:
    if name not in NAMES:
        close = difflib.get_close_matches(name, NAMES, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"MDMGenerationConfig has no option {name!r}.{hint} Valid options: {list(NAMES)}")


class MDMGenerationConfig:
    """Open-dLLM/Dream generation options (plus all of veomni's GenerationConfig fields).

    Only the options you set are recorded; the rest come from the model config, then the sampler
    defaults, when generating. Accepted names: max_new_tokens, max_length (prompt + new, used when
    max_new_tokens is unset), steps, temperature, top_p, top_k (0 = off), alg, alg_temp (0 = off),
    eps, mask_token_id, pad_token_id, eos_token_id, output_history, return_dict_in_generate,
    num_return_sequences (rows repeated), do_sample (temperature decides, as in Open-dLLM;
    do_sample=False with temperature > 0 is a contradiction and raises), bos_token_id (unused:
    the prompt is given), and every veomni.diffusion.sampling.GenerationConfig field.
    """

    def __init__(self, **kwargs):
        object.__setattr__(self, "_values", {})
        self.update(**kwargs)

    def update(self, **kwargs) -> "MDMGenerationConfig":
        for name, value in kwargs.items():
            setattr(self, name, value)
        return self

    def __setattr__(self, name: str, value: Any) -> None:
        _check_name(name)
        self._values[name] = value

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        _check_name(name)
        return self._values.get(name, _READ_DEFAULTS.get(name))

    def to_dict(self) -> Dict[str, Any]:
        return dict(self._values)

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "MDMGenerationConfig":
        return cls(**values)

    def copy(self) -> "MDMGenerationConfig":
        return MDMGenerationConfig(**self._values)

    def __repr__(self) -> str:
        return f"MDMGenerationConfig({', '.join(f'{k}={v!r}' for k, v in self._values.items())})"

    def __eq__(self, other) -> bool:
        return isinstance(other, MDMGenerationConfig) and other._values == self._values

    def to_generation_config(self, prompt_len: int) -> Tuple[GenerationConfig, int]:
        """(our GenerationConfig with only the set fields, num_return_sequences)."""
        vals = dict(self._values)
        n, max_length = vals.pop("max_new_tokens", None), vals.pop("max_length", None)
        if n is None and max_length is not None:  # HF rule: max_new_tokens wins when both are set
            n = max_length - prompt_len
            if n < 1:
                raise ValueError(f"max_length={max_length} leaves no room after the {prompt_len}-token "
                                 "prompt; set max_new_tokens instead")
        repeats = vals.pop("num_return_sequences", None) or 1
        if not isinstance(repeats, int) or repeats < 1:
            raise ValueError(f"num_return_sequences must be an int >= 1 (got {repeats!r})")
        do_sample = vals.pop("do_sample", None)
        if do_sample is False and (vals.get("temperature") or 0) > 0:
            raise ValueError(f"do_sample=False contradicts temperature={vals['temperature']}: the diffusion "
                             "samplers sample exactly when temperature > 0; drop one of them")
        vals.pop("bos_token_id", None)
        for old, new in _RENAMED.items():
            if old in vals:
                value = vals.pop(old)
                if vals.get(new) is not None and vals[new] != value:
                    raise ValueError(f"{old}={value!r} conflicts with {new}={vals[new]!r}")
                vals[new] = value
        for name in ("alg_temp", "top_k"):  # Open-dLLM writes 0 for "off"
            if vals.get(name) == 0:
                vals[name] = None
        vals.setdefault("alg", _READ_DEFAULTS["alg"])
        vals = {k: v for k, v in vals.items() if v is not None}
        return GenerationConfig(max_new_tokens=n, **vals), repeats


def _as_mdm_config(config) -> MDMGenerationConfig:
    if config is None:
        return MDMGenerationConfig()
    if isinstance(config, MDMGenerationConfig):
        return config.copy()
    if isinstance(config, GenerationConfig):
        return MDMGenerationConfig(**{k: v for k, v in dataclasses.asdict(config).items() if v is not None})
    if isinstance(config, dict):
        return MDMGenerationConfig(**config)
    raise TypeError(f"generation_config must be an MDMGenerationConfig, a veomni GenerationConfig or a dict "
                    f"(got {type(config).__name__}); a transformers GenerationConfig carries AR defaults "
                    "(top_k=50, max_length=20, ...) that would silently change sampling")


@torch.no_grad()
def mdm_diffusion_generate(model, inputs: Optional[torch.Tensor] = None, generation_config=None, *,
                           input_ids: Optional[torch.Tensor] = None,
                           attention_mask: Optional[torch.Tensor] = None, step_callback=None, **kwargs):
    """Open-dLLM's `model.diffusion_generate(inputs, generation_config, **kwargs)` on our samplers.

    inputs (or input_ids=): [B, P] or [P] prompt ids; attention_mask: [B, P], left-padded.
    generation_config: MDMGenerationConfig, GenerationConfig or dict; kwargs override it (same names).
    Returns GenerationOutput(sequences [B*num_return_sequences, P+N], history, stats, ...) or the
    sequences tensor with return_dict_in_generate=False.
    """
    if inputs is not None and input_ids is not None:
        raise ValueError("pass the prompt once: inputs= or input_ids=, not both")
    ids = inputs if inputs is not None else input_ids
    if ids is None:
        raise ValueError("diffusion_generate needs the prompt ids (inputs=... or input_ids=...)")
    ids = torch.as_tensor(ids)
    if ids.dim() == 1:
        ids = ids[None]
    cfg = _as_mdm_config(generation_config).update(**kwargs)
    gen_cfg, repeats = cfg.to_generation_config(ids.shape[-1])
    if repeats > 1:
        ids = ids.repeat_interleave(repeats, dim=0)
        if attention_mask is not None:
            attention_mask = torch.as_tensor(attention_mask)
            attention_mask = (attention_mask[None] if attention_mask.dim() == 1 else attention_mask)
            attention_mask = attention_mask.repeat_interleave(repeats, dim=0)
    return generate(model, ids, gen_cfg, attention_mask=attention_mask, step_callback=step_callback)


class MDMGenerationMixin:
    """Gives a model class Open-dLLM's `diffusion_generate` method (our DecoderForCausalLM has it)."""

    def diffusion_generate(self, inputs: Optional[torch.Tensor] = None, generation_config=None, **kwargs):
        return mdm_diffusion_generate(self, inputs, generation_config, **kwargs)


__all__ = ["MDMGenerationConfig", "MDMGenerationMixin", "MDMModelOutput", "mdm_diffusion_generate"]
