"""`GenerationConfig`: every knob of every diffusion sampler, with model defaults and validation.

Every field defaults to None, meaning "unset". `merge(model_defaults, user_config)` lets unset user
fields take the model's own values (mask/eos/pad ids, attention mode, logit shift); `resolve()` then
fills the remaining built-in defaults and validates the combination. Open-dLLM raises
"mask_token_id must be set" when a user passes their own config because it never merges with the
model's; here a user config only overrides what it sets.

Options that do not apply to the chosen `alg` raise when set to anything other than their built-in
default, so `threshold=0.8` with `alg='low_confidence'` is an error instead of being ignored, while
a CLI that forwards every default (eps=1e-3, cfg_scale=0) still works.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, fields
from typing import Any, Dict, List, Optional, Sequence, Union

DREAM_ALGS = ("origin", "maskgit_plus", "topk_margin", "entropy")
WHOLE_SEQUENCE_ALGS = DREAM_ALGS + ("p2",)
LLADA_ALGS = ("low_confidence", "random", "low_entropy")
PARALLEL_ALGS = ("threshold", "factor")
SEMI_AR_ALGS = LLADA_ALGS + PARALLEL_ALGS
ALGS = WHOLE_SEQUENCE_ALGS + SEMI_AR_ALGS + ("multi_block",)
STEP_ALGS = WHOLE_SEQUENCE_ALGS + LLADA_ALGS  # a fixed number of steps
BLOCK_ALGS = SEMI_AR_ALGS + ("multi_block",)
CACHE_MODES = ("none", "prefix", "dual", "block")
ATTN_MODES = ("bidirectional", "block_causal", "causal")

MISSING_MASK_MSG = (
    "the model config has no mask_token_id; run training/ensure_mask_token or pass mask_token_id "
    "(e.g. diffusion_generate(..., mask_token_id=<id>))"
)

# Built-in defaults, applied by resolve() to fields still unset after merging with the model.
_DEFAULTS: Dict[str, Any] = dict(
    max_new_tokens=128, alg="maskgit_plus", temperature=0.0, eps=1e-3, exact_step_counts=False,
    threshold=0.9, factor=1.0, factor_strict=False, cfg_scale=0.0, use_cache="none",
    block_add_threshold=0.1, decoded_token_threshold=0.95, entropy_threshold=0.5,
    stop_at_eos=True, output_history=False, return_dict=True, logit_shift=True,
)
# Options that only some algs read: field -> algs.
_ONLY_FOR = dict(
    eps=DREAM_ALGS, alg_temp=DREAM_ALGS[1:], exact_step_counts=DREAM_ALGS[1:] + LLADA_ALGS,
    block_length=BLOCK_ALGS, threshold=("threshold",), factor=("factor",), factor_strict=("factor",),
    block_add_threshold=("multi_block",), decoded_token_threshold=("multi_block",),
    entropy_threshold=("multi_block",),
)


@dataclass
class GenerationConfig:
    """All sampler options. None = unset (takes the model's value, then the built-in default).

    max_new_tokens: tokens generated after the prompt (default 128).
    steps: denoising steps for step-based algs (Dream algs, p2, low_confidence, random, low_entropy); default
        max_new_tokens. threshold/factor/multi_block are dynamic and take no steps.
    alg: one of ALGS (default 'maskgit_plus'); docs/inference.md describes each.
    temperature/top_p/top_k: token sampling; temperature 0 = greedy (argmax). Filters apply at
        temperature 0 too (Dream does so), which changes confidences, not the argmax.
    eps: Dream's final time, t-grid = linspace(1, eps, steps+1) (default 1e-3).
    alg_temp: Dream confidence algs: sample positions from softmax(conf/alg_temp) instead of top-k.
    exact_step_counts: Dream confidence algs commit int(#mask*(1-s/t)) per step, which floors
        (with steps == tokens the first step commits nothing and the last several); True spreads
        the tokens exactly over the steps like LLaDA (default False = Dream's behaviour).
    block_length: semi-autoregressive block (low_confidence/random/low_entropy: max_new_tokens, i.e. one
        block; threshold/factor/multi_block: 32; block_causal models: block_size).
    threshold: alg='threshold' confidence tau (default 0.9). factor: alg='factor' f (default 1.0).
    factor_strict: alg='factor': False (default) = Fast-dLLM's count, which also commits the last
        candidate when it is the only one failing; True = only the candidates that pass (parallel.py).
    cfg_scale: classifier-free guidance (0 = off); the unconditional pass masks the prompt.
    use_cache: 'none' | 'prefix' | 'dual' | 'block' (see docs/inference.md for exactness).
    attn_mode/block_size: default from model.config.dllm_attn_mode/dllm_block_size, else
        'bidirectional'.
    block_add_threshold/decoded_token_threshold/entropy_threshold: alg='multi_block' (0.1, 0.95,
        0.5 nats).
    eos_token_id: int or list (default model.config.eos_token_id); [] disables EOS handling.
    pad_token_id: fills everything after the first EOS (default model pad id, else the EOS id).
    mask_token_id: default model.config.mask_token_id (required).
    stop_strings: kept for `decode_trimmed` (string-level trimming needs the tokenizer).
    stop_at_eos: a row stops once an EOS is committed with everything before it decoded (output
        unchanged, fewer forwards; never for p2, which can revise tokens). Default True.
    output_history: keep x after every step. return_dict: False returns only `sequences`.
    seed: int (row b uses seed + b) or one seed per row; None draws one from torch's global RNG.
    logit_shift: True = token i read from position i-1 (AR-initialised dLLMs, Dream convention);
        default model.config.dllm_logit_shift, True when absent.
    """

    max_new_tokens: Optional[int] = None
    steps: Optional[int] = None
    alg: Optional[str] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    eps: Optional[float] = None
    alg_temp: Optional[float] = None
    exact_step_counts: Optional[bool] = None
    block_length: Optional[int] = None
    threshold: Optional[float] = None
    factor: Optional[float] = None
    factor_strict: Optional[bool] = None
    cfg_scale: Optional[float] = None
    use_cache: Optional[str] = None
    attn_mode: Optional[str] = None
    block_size: Optional[int] = None
    block_add_threshold: Optional[float] = None
    decoded_token_threshold: Optional[float] = None
    entropy_threshold: Optional[float] = None
    eos_token_id: Optional[Union[int, List[int]]] = None
    pad_token_id: Optional[int] = None
    mask_token_id: Optional[int] = None
    stop_strings: Optional[List[str]] = None
    stop_at_eos: Optional[bool] = None
    output_history: Optional[bool] = None
    return_dict: Optional[bool] = None
    seed: Optional[Union[int, List[int]]] = None
    logit_shift: Optional[bool] = None

    # ---- construction helpers ---------------------------------------------------------------
    @classmethod
    def field_names(cls) -> List[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "GenerationConfig":
        check_field_names(values)
        return cls(**values)

    @classmethod
    def from_model_config(cls, model_config) -> "GenerationConfig":
        """The generation defaults a model carries in its config (ids, attention, logit shift)."""
        if model_config is None:
            return cls()
        get = lambda name: getattr(model_config, name, None)  # noqa: E731
        return cls(
            mask_token_id=get("mask_token_id"), eos_token_id=get("eos_token_id"),
            pad_token_id=get("pad_token_id"), attn_mode=get("dllm_attn_mode"),
            block_size=get("dllm_block_size"), logit_shift=get("dllm_logit_shift"),
        )

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    # ---- resolution ---------------------------------------------------------------------------
    def resolve(self) -> "GenerationConfig":
        """A copy with every default filled in; raises ValueError on a bad value or combination."""
        c = dataclasses.replace(self)
        _check_non_applicable(c)  # before defaults, which are alg-specific
        if c.alg is None:
            c.alg = _DEFAULTS["alg"]
        for name, algs in _ONLY_FOR.items():
            if c.alg not in algs:  # a default-valued option of another alg: drop it
                setattr(c, name, None)
        for name, value in _DEFAULTS.items():
            if getattr(c, name) is None and (name not in _ONLY_FOR or c.alg in _ONLY_FOR[name]):
                setattr(c, name, value)
        if c.attn_mode is None:
            c.attn_mode = "bidirectional"
        if c.mask_token_id is None:
            raise ValueError(MISSING_MASK_MSG)
        c.eos_token_id = eos_list(c.eos_token_id)
        if c.pad_token_id is None and c.eos_token_id:
            c.pad_token_id = c.eos_token_id[0]
        _check_values(c)
        _fill_steps_and_blocks(c)
        _check_combinations(c)
        return c


def eos_list(eos: Optional[Union[int, Sequence[int]]]) -> List[int]:
    if eos is None:
        return []
    if isinstance(eos, int):
        return [eos]
    return [int(e) for e in eos]


def check_field_names(values: Dict[str, Any]) -> None:
    names = GenerationConfig.field_names()
    for key in values:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"Unknown generation option {key!r}.{hint} Valid options: {names}")


def merge(model_config_defaults: Optional[GenerationConfig],
          user_config: Optional[Union[GenerationConfig, Dict[str, Any]]] = None,
          **overrides) -> GenerationConfig:
    """Fields set in `user_config` (then `overrides`) win; unset ones keep the model's values."""
    base = model_config_defaults or GenerationConfig()
    if isinstance(user_config, dict):
        user_config = GenerationConfig.from_dict(user_config)
    check_field_names(overrides)
    merged = dataclasses.replace(base)
    for layer in (user_config, GenerationConfig(**overrides)):
        if layer is None:
            continue
        for f in fields(GenerationConfig):
            value = getattr(layer, f.name)
            if value is not None:
                setattr(merged, f.name, value)
    return merged


def resolve_for_model(model, config=None, overrides: Optional[Dict[str, Any]] = None) -> GenerationConfig:
    """model config defaults <- user config <- keyword overrides, resolved and validated."""
    model_defaults = GenerationConfig.from_model_config(getattr(model, "config", None))
    return merge(model_defaults, config, **(overrides or {})).resolve()


# ---- validation helpers -------------------------------------------------------------------------
def _check_non_applicable(c: GenerationConfig) -> None:
    if c.alg is not None and c.alg not in ALGS:
        close = difflib.get_close_matches(str(c.alg), ALGS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"Unknown alg={c.alg!r}.{hint} Choose one of {ALGS}.")
    alg = c.alg or _DEFAULTS["alg"]
    for name, algs in _ONLY_FOR.items():
        value = getattr(c, name)
        if value is None or alg in algs or value == _DEFAULTS.get(name):
            continue
        if name in ("exact_step_counts", "factor_strict") and value is False:
            continue
        raise ValueError(f"{name}={value!r} does not apply to alg={alg!r} (it is read by {algs} "
                         "only); remove it or pick one of those algs.")


def _check_values(c: GenerationConfig) -> None:
    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ValueError(msg)

    need(isinstance(c.max_new_tokens, int) and c.max_new_tokens >= 1,
         f"max_new_tokens must be an int >= 1 (got {c.max_new_tokens!r})")
    need(c.temperature >= 0, f"temperature must be >= 0 (got {c.temperature})")
    need(c.top_p is None or 0 < c.top_p <= 1, f"top_p must be in (0, 1] (got {c.top_p})")
    need(c.top_k is None or (isinstance(c.top_k, int) and c.top_k >= 1), f"top_k must be an int >= 1 (got {c.top_k})")
    need(c.eps is None or 0 < c.eps < 1, f"eps must be in (0, 1) (got {c.eps})")
    need(c.alg_temp is None or c.alg_temp >= 0, f"alg_temp must be >= 0 (got {c.alg_temp})")
    need(c.threshold is None or 0 < c.threshold <= 1, f"threshold must be in (0, 1] (got {c.threshold})")
    need(c.factor is None or c.factor > 0, f"factor must be > 0 (got {c.factor})")
    need(c.cfg_scale >= 0, f"cfg_scale must be >= 0 (got {c.cfg_scale})")
    for name in ("block_add_threshold", "decoded_token_threshold"):
        v = getattr(c, name)
        need(v is None or 0 <= v <= 1, f"{name} must be in [0, 1] (got {v})")
    need(c.entropy_threshold is None or c.entropy_threshold > 0,
         f"entropy_threshold must be > 0 nats (got {c.entropy_threshold})")
    need(c.use_cache in CACHE_MODES, f"use_cache={c.use_cache!r} is not one of {CACHE_MODES}")
    need(c.attn_mode in ATTN_MODES, f"attn_mode={c.attn_mode!r} is not one of {ATTN_MODES}")
    if c.attn_mode == "block_causal":
        need(isinstance(c.block_size, int) and c.block_size >= 1,
             "attn_mode='block_causal' needs block_size (set config.dllm_block_size or pass block_size)")
    need(isinstance(c.mask_token_id, int) and c.mask_token_id >= 0,
         f"mask_token_id must be an int >= 0 (got {c.mask_token_id!r})")
    need(c.mask_token_id not in c.eos_token_id, "mask_token_id must differ from eos_token_id")
    if c.stop_strings is not None:
        need(isinstance(c.stop_strings, (list, tuple)) and all(isinstance(s, str) and s for s in c.stop_strings),
             "stop_strings must be a list of non-empty strings")


def _fill_steps_and_blocks(c: GenerationConfig) -> None:
    n = c.max_new_tokens
    if c.alg in STEP_ALGS:
        if c.steps is None:
            c.steps = n
        if not isinstance(c.steps, int) or c.steps < 1:
            raise ValueError(f"steps must be an int >= 1 (got {c.steps!r})")
        # steps > max_new_tokens is allowed (Dream and Open-dLLM's README run 200 steps for 128
        # tokens): the schedule then has steps that commit nothing, each still costing a forward.
    elif c.steps is not None and c.steps != n:
        raise ValueError(f"steps={c.steps} does not apply to alg={c.alg!r}: it runs until every token "
                         f"is committed (at most max_new_tokens={n} iterations). Leave steps unset.")
    if c.alg in BLOCK_ALGS and c.block_length is None:
        if c.attn_mode == "block_causal":
            c.block_length = c.block_size
        else:
            c.block_length = n if c.alg in LLADA_ALGS else 32
    if c.block_length is not None and (not isinstance(c.block_length, int) or c.block_length < 1):
        raise ValueError(f"block_length must be an int >= 1 (got {c.block_length!r})")
    if c.alg in LLADA_ALGS:
        n_blocks = math.ceil(n / c.block_length)
        if c.steps % n_blocks:
            raise ValueError(f"steps={c.steps} must be a multiple of the number of blocks "
                             f"ceil(max_new_tokens / block_length) = {n_blocks} (LLaDA gives each "
                             "block steps/num_blocks steps).")


def _check_combinations(c: GenerationConfig) -> None:
    if c.alg in WHOLE_SEQUENCE_ALGS and c.use_cache != "none":
        raise ValueError(f"use_cache={c.use_cache!r} needs a block-based alg {BLOCK_ALGS}; alg={c.alg!r} "
                         "re-reads the whole sequence every step. Use use_cache='none'.")
    if c.use_cache == "block" and c.attn_mode != "block_causal":
        raise ValueError("use_cache='block' is exact only for block_causal models (attn_mode="
                         f"{c.attn_mode!r}); use 'prefix' or 'dual' (approximate) for this model.")
    if c.alg == "multi_block" and c.use_cache == "dual":
        raise ValueError("alg='multi_block' supports use_cache 'none', 'prefix' or 'block' (blocks are "
                         "appended, so there is no fixed suffix to cache).")
    if c.seed is not None and not isinstance(c.seed, int):
        if not (isinstance(c.seed, (list, tuple)) and all(isinstance(s, int) for s in c.seed)):
            raise ValueError(f"seed must be an int or a list of ints (got {c.seed!r})")
