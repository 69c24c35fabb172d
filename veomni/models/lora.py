"""LoRA / QLoRA on our models: pick the layers by name, inject peft adapters, merge them back.

    spec = apply_lora(model, LoraSettings(rank=16, alpha=32, targets=["q_proj", "v_proj"]), base_path)

`apply_lora` works in place on one of our single-device models, after the weights and the mask
token are in and before `parallelize` wraps it:

  1. (quantize=nf4) every nn.Linear of the decoder blocks becomes an NF4 bitsandbytes Linear4bit
     (veomni/models/quant.py);
  2. the targets: each nn.Linear whose module name matches one of the regexes (re.search, as
     train.freeze). A pattern that matches no Linear is an error, and so is the LM head: the loss
     reads `lm_head.weight` directly (fused cross-entropy), which would bypass an adapter on it;
  3. every parameter is frozen, then peft's `inject_adapter_in_model` wraps each target in a LoRA
     layer (W x + B A dropout(x) * alpha / rank; B starts at 0, so the model starts as the base).
     Our model keeps its class and forward (its own keyword arguments: loss_fn, attn_mode, ...),
     which PeftModelForCausalLM would hide. The adapters are kept in fp32 whatever the base dtype;
  4. (mask_embedding) the mask token's *input* embedding gets a trainable fp32 vector
     `model.embed_tokens.lora_mask_delta`, added where input_ids == mask id. The mask row is new
     (veomni/models/mask_token.py starts it at the mean row) and every masked position reads it, so
     it is the one embedding row the diffusion objective most needs to move; the rest of the
     embedding stays frozen. The head's mask row (a tied head is the embedding) is untouched, so
     `merged_state_dict` unties such a head to export exactly the trained function;
  5. parameters matching `trainable` (regexes on parameter names, e.g. norm or embed_tokens) are
     trained in full, in place (no copies as peft's modules_to_save would make), and so are the
     model's dLLM-only parameters (Qwen3.5's reverse-scan gates: new, and at their start value the
     GDN layers stay causal).

The returned `LoraSpec` is also kept on the model (`lora_spec(model)`): the checkpoint code saves
adapter-only checkpoints for such a model (veomni/checkpoint/adapter.py) and the HF export merges.
"""
from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

logger = logging.getLogger("veomni")

ADAPTER = "default"  # peft's adapter name; one adapter per model here
MASK_DELTA = "lora_mask_delta"
SPEC_ATTR = "dllm_lora"
INSTALL = 'pip install -e ".[quant]"  (peft + bitsandbytes)'


@dataclass(frozen=True)
class LoraSettings:
    """What to adapt (from model.lora_* / model.quantize)."""

    rank: int
    alpha: float = 16.0
    dropout: float = 0.0
    targets: Sequence[str] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    trainable: Sequence[str] = ()
    mask_embedding: bool = True
    quantize: str = "none"

    @classmethod
    def from_args(cls, m) -> "LoraSettings":
        """From veomni's ModelArgs."""
        return cls(rank=m.lora_rank, alpha=m.lora_alpha, dropout=m.lora_dropout, targets=tuple(m.lora_target),
                   trainable=tuple(m.lora_trainable), mask_embedding=m.lora_mask_embedding, quantize=m.quantize)


@dataclass
class LoraSpec:
    """A model's adapters as applied: the settings, the resolved names, the base they sit on."""

    rank: int
    alpha: float
    dropout: float
    quantize: str
    modules: Tuple[str, ...]  # adapted Linear modules (full names)
    params: Tuple[str, ...]  # every trainable parameter name (adapters, mask delta, `trainable` matches)
    mask_token_id: Optional[int]  # set when the mask-embedding delta is on
    base_path: str = ""  # the checkpoint the frozen weights come from (re-loaded on resume)
    fingerprint: Optional[dict] = field(default=None, compare=False)  # of base_path (checkpoint/adapter.py)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def record(self) -> dict:
        """What a checkpoint records to refuse resuming with other adapters (JSON-serialisable)."""
        d = asdict(self)
        d.pop("fingerprint")
        d.pop("base_path")
        d["modules"], d["params"] = list(self.modules), list(self.params)
        return d


def import_peft():
    try:
        import peft
    except ImportError as exc:
        raise ImportError(f"model.lora_rank > 0 needs peft ({exc}): {INSTALL}") from None
    return peft


def lora_spec(model) -> Optional[LoraSpec]:
    """The LoraSpec of a model (plain, DDP-wrapped or FSDP2), or None when it has no adapters."""
    from veomni.distributed.utils import unwrap_model

    return getattr(unwrap_model(model), SPEC_ATTR, None)


def _head_name(model) -> Optional[str]:
    head = model.get_output_embeddings()
    return next((n for n, m in model.named_modules() if m is head), None)


def select_targets(model, patterns: Sequence[str]) -> List[str]:
    """Full names of the nn.Linear modules LoRA adapts: those whose name matches any pattern."""
    head = _head_name(model)
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not patterns:
        raise ValueError("model.lora_target is empty: name the Linear layers to adapt, e.g. "
                         "[q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj] or ['.*proj']")
    chosen = []
    for pat in patterns:
        hits = [n for n, _ in linears if re.search(pat, n)]
        if head in hits:
            raise ValueError(
                f"model.lora_target pattern {pat!r} matches the LM head ({head}): the loss reads lm_head.weight "
                "directly (fused cross-entropy), so an adapter there would never be used. Train the head in "
                "full with model.lora_trainable=[lm_head] instead (a tied head is the embedding).")
        if not hits:
            others = sorted({type(m).__name__ for n, m in model.named_modules() if n and re.search(pat, n)})
            what = (f"only modules LoRA cannot adapt ({', '.join(others)}; LoRA adapts nn.Linear layers, "
                    "model.lora_trainable trains other parameters in full)" if others else "no module")
            example = linears[0][0] if linears else "model.layers.0.self_attn.q_proj"
            raise ValueError(f"model.lora_target pattern {pat!r} matches {what}. Patterns are regexes searched "
                             f"in module names such as {example}.")
        chosen += [n for n in hits if n not in chosen]
    return sorted(chosen, key=[n for n, _ in linears].index)


def _trainable_params(model, patterns: Sequence[str]) -> List[str]:
    names = [n for n, _ in model.named_parameters()]
    chosen = []
    for pat in patterns:
        hits = [n for n in names if re.search(pat, n)]
        if not hits:
            raise ValueError(f"model.lora_trainable pattern {pat!r} matches no parameter name (names look like "
                             f"{names[0]}, model.norm.weight)")
        chosen += [n for n in hits if n not in chosen]
    return chosen


def _mask_delta_hook(mask_id: int):
    def hook(module, args, output):
        ids = args[0] if args else None
        if ids is None:  # called with inputs_embeds upstream: nothing to add here
            return output
        delta = getattr(module, MASK_DELTA)
        # where(): positions other than the mask keep their embedding bit for bit.
        return torch.where((ids == mask_id).unsqueeze(-1), (output.float() + delta.float()).to(output.dtype), output)

    return hook


def add_mask_delta(model, mask_id: int) -> str:
    """A trainable fp32 vector added to the mask token's input embedding; returns its parameter name."""
    embed = model.get_input_embeddings()
    w = embed.weight
    if not 0 <= mask_id < w.shape[0]:
        raise ValueError(f"mask token id {mask_id} is outside the embedding ({w.shape[0]} rows)")
    embed.register_parameter(MASK_DELTA, nn.Parameter(torch.zeros(w.shape[1], dtype=torch.float32, device=w.device)))
    embed.register_forward_hook(_mask_delta_hook(mask_id))
    prefix = next(n for n, m in model.named_modules() if m is embed)
    return f"{prefix}.{MASK_DELTA}"


def apply_lora(model, settings: LoraSettings, base_path: str = "") -> LoraSpec:
    """Quantise (nf4), inject LoRA adapters, freeze the rest; in place. See the module docstring."""
    peft = import_peft()
    if getattr(model, SPEC_ATTR, None) is not None:
        raise ValueError("apply_lora: this model already has LoRA adapters")
    if settings.rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {settings.rank}")
    full = _trainable_params(model, settings.trainable)
    # Our dLLM-only parameters (Qwen3.5's reverse-scan gates) are new, like the mask row, and start at
    # the AR function: frozen, a hybrid model's GDN layers would stay causal. They train.
    extras = sorted(getattr(model, "dllm_extra_parameters", dict)())
    full += [n for n in extras if n not in full]
    n_base = sum(p.numel() for p in model.parameters())  # before NF4 packs two weights per byte
    modules = select_targets(model, settings.targets)  # before quantising: errors name the plain layers
    mask_id = None
    if settings.mask_embedding:
        mask_id = getattr(model.config, "mask_token_id", None)
        if mask_id is None:
            raise ValueError("model.lora_mask_embedding=true needs a model with a mask token (config.mask_token_id)")
        if f"{_embed_name(model)}.weight" in full:
            raise ValueError("model.lora_mask_embedding=true adds a trainable mask row, but model.lora_trainable "
                             "already trains the whole embedding: set model.lora_mask_embedding=false")
        mask_id = int(mask_id)
    if settings.quantize == "nf4":
        from veomni.models.quant import quantize_nf4

        quantize_nf4(model, compute_dtype=model.get_input_embeddings().weight.dtype)
    elif settings.quantize != "none":
        raise ValueError(f"quantize={settings.quantize!r} is not one of none, nf4")
    for p in model.parameters():
        p.requires_grad_(False)
    config = peft.LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                             target_modules=list(modules), bias="none", init_lora_weights=True)
    # peft picks its bitsandbytes LoRA layer (which casts around the 4-bit matmul) by this flag.
    model.is_loaded_in_4bit = settings.quantize == "nf4"
    try:
        peft.inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    finally:
        del model.is_loaded_in_4bit
    for name, module in model.named_modules():
        if name.endswith((f"lora_A.{ADAPTER}", f"lora_B.{ADAPTER}")):
            module.float()  # fp32 adapters (and their Adam moments) on a bf16 or NF4 base
    if mask_id is not None:
        add_mask_delta(model, mask_id)
    lookup = dict(model.named_parameters())
    for name in full:
        p = lookup[_after_injection(name, lookup)]
        if not p.is_floating_point():
            raise ValueError(f"model.lora_trainable matches {name}, which model.quantize=nf4 stored in 4 bits; "
                             "quantised weights cannot be trained: narrow the pattern")
        p.requires_grad_(True)
    params = tuple(n for n, p in model.named_parameters() if p.requires_grad)
    spec = LoraSpec(rank=settings.rank, alpha=float(settings.alpha), dropout=float(settings.dropout),
                    quantize=settings.quantize, modules=tuple(modules), params=params,
                    mask_token_id=mask_id, base_path=str(base_path))
    setattr(model, SPEC_ATTR, spec)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("LoRA rank %d (alpha %g) on %d Linear layers%s; %s trainable parameters (%.2f%% of the base's "
                "%s)%s%s", spec.rank, spec.alpha, len(modules), " (NF4 base)" if spec.quantize == "nf4" else "",
                f"{n_train:,}", 100 * n_train / n_base, f"{n_base:,}",
                ", incl. the mask-token embedding row" if mask_id is not None else "",
                f", {len(full)} base parameter(s) in full" if full else "")
    return spec


def _embed_name(model) -> str:
    embed = model.get_input_embeddings()
    return next(n for n, m in model.named_modules() if m is embed)


def _after_injection(name: str, lookup: Dict[str, torch.Tensor]) -> str:
    """A parameter name after peft put its module under `.base_layer`."""
    if name in lookup:
        return name
    module, _, leaf = name.rpartition(".")
    moved = f"{module}.base_layer.{leaf}"
    if moved in lookup:
        return moved
    raise KeyError(f"parameter {name} disappeared while injecting LoRA")


# ---------------------------------------------------------------------------------------- merge
def _clean(name: str) -> str:
    # Activation checkpointing wraps each block (veomni/distributed/parallelism.py); state-dict names omit it.
    return name.replace("_checkpoint_wrapped_module.", "")


def _full_state_dict(model, parallel_state) -> Dict[str, torch.Tensor]:
    """Every parameter and persistent buffer of the adapted model on the main rank, on CPU, NF4
    weights dequantised ({} on the other ranks under FSDP2)."""
    from veomni.distributed.utils import unwrap_model
    from veomni.models.quant import dequantize, dequantize_packed, is_nf4

    inner = unwrap_model(model)
    if parallel_state is not None and parallel_state.distributed and parallel_state.dp_mode == "fsdp2":
        from veomni.checkpoint.export import gather_full_state_dict

        # The packed NF4 bytes are sharded like any parameter and gathered here; the quantisation
        # state (scales) lives on each Linear4bit module, whole on every rank.
        sd = gather_full_state_dict(model, parallel_state)
        if not parallel_state.is_main:
            return {}
        for mname, module in inner.named_modules():
            if is_nf4(module):
                key = f"{_clean(mname)}.weight"
                sd = {k: v for k, v in sd.items() if not k.startswith(f"{key}.")}  # quant-state entries
                sd[key] = dequantize_packed(sd[key], module.quant_state, module.compute_dtype or torch.float32)
        return sd
    if parallel_state is not None and not parallel_state.is_main:
        return {}  # every rank holds the whole model: only the main rank builds a copy (host memory)
    sd = {}
    for mname, module in inner.named_modules():
        persistent = [(n, b) for n, b in module.named_buffers(recurse=False)
                      if n not in module._non_persistent_buffers_set]
        for pname, p in list(module.named_parameters(recurse=False)) + persistent:
            key = _clean(f"{mname}.{pname}" if mname else pname)
            if pname == "weight" and is_nf4(module):  # the weight the matmul used: in its compute dtype
                p = dequantize(module, module.compute_dtype or torch.float32)
            sd[key] = p.detach().cpu()  # one tensor at a time: no second model on the device
    return sd


def _trainable_state_dict(model, parallel_state) -> Dict[str, torch.Tensor]:
    """The trainable tensors only (spec.params), whole, on CPU, on the main rank ({} elsewhere)."""
    from veomni.distributed.utils import unwrap_model

    spec = lora_spec(model)
    if parallel_state is not None and parallel_state.distributed and parallel_state.dp_mode == "fsdp2":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        sd = get_model_state_dict(model, options=opts)  # collective: gathers the adapters' shards
    else:
        sd = {_clean(n): p.detach().cpu() for n, p in unwrap_model(model).named_parameters() if p.requires_grad}
    if parallel_state is not None and not parallel_state.is_main:
        return {}
    return {k: sd[k] for k in spec.params}


def merge_state_dict(sd: Dict[str, torch.Tensor], spec: LoraSpec, config) -> Tuple[Dict[str, torch.Tensor], bool]:
    """Fold the adapters into a full state dict of the adapted model (plain names, NF4 dequantised):
    W = W_base + alpha/rank * B @ A in fp32, cast back to W_base's dtype; the mask delta goes into
    the mask row of the embedding. Returns (state dict of the plain model, untied): untied is True
    when a tied head had to be split from the embedding to keep the head's mask row as trained."""
    out = {}
    for key, t in sd.items():
        if ".lora_" in key and not key.endswith(MASK_DELTA):
            continue  # folded below
        out[key.replace(".base_layer.", ".")] = t
    for module in spec.modules:
        a = sd[f"{module}.lora_A.{ADAPTER}.weight"].float()
        b = sd[f"{module}.lora_B.{ADAPTER}.weight"].float()
        base = sd[f"{module}.base_layer.weight"]
        out[f"{module}.weight"] = (base.float() + spec.scaling * (b @ a)).to(base.dtype)
    untied = False
    delta_keys = [k for k in out if k.endswith(MASK_DELTA)]
    for key in delta_keys:
        delta = out.pop(key)
        emb_key = key[: -len(MASK_DELTA)] + "weight"
        emb = out[emb_key]
        if getattr(config, "tie_word_embeddings", False):
            out["lm_head.weight"] = emb.clone()  # the head keeps the row it was trained with
            untied = True
        emb = emb.clone()
        row = spec.mask_token_id
        emb[row] = (emb[row].float() + delta.float()).to(emb.dtype)
        out[emb_key] = emb
    return out, untied


def merged_model(model, parallel_state=None):
    """A plain single-device model of our registry with the adapters merged (main rank; None on the
    others). Collective under FSDP2. The training model is not modified."""
    import copy

    from veomni.checkpoint.export import build_plain_model
    from veomni.distributed.utils import unwrap_model

    spec = lora_spec(model)
    if spec is None:
        raise ValueError("merged_model: the model has no LoRA adapters")
    inner = unwrap_model(model)
    sd = _full_state_dict(model, parallel_state)
    if parallel_state is not None and not parallel_state.is_main:
        return None
    config = copy.deepcopy(inner.config)
    merged, untied = merge_state_dict(sd, spec, config)
    if untied:
        logger.info("merge: the tied LM head is exported untied (tie_word_embeddings=false): the trained mask "
                    "embedding row differs from the head's mask row, which training left as it was")
        config.tie_word_embeddings = False
    return build_plain_model(config, merged, attn_impl=getattr(inner, "attn_impl", "sdpa"))


def save_peft_adapter(model, out_dir, parallel_state=None) -> Optional[str]:
    """The bare adapter in peft's format (adapter_config.json + adapter_model.safetensors), for
    `PeftModel.from_pretrained(base, out_dir)` on a base whose embedding holds the mask token
    (resize it to config.vocab_size first). The mask-row delta and the parameters trained in full
    are not LoRA weights: they go to veomni_extra.safetensors next to it (the merged HF export
    holds everything). Main rank writes; collective under FSDP2."""
    from pathlib import Path

    from safetensors.torch import save_file

    from veomni.distributed.utils import unwrap_model

    peft = import_peft()
    spec = lora_spec(model)
    sd = _trainable_state_dict(model, parallel_state)
    if parallel_state is not None and not parallel_state.is_main:
        return None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lora, extra = {}, {}
    for name in spec.params:
        t = sd[name].float().contiguous()
        if f".lora_A.{ADAPTER}." in name or f".lora_B.{ADAPTER}." in name:
            lora["base_model.model." + name.replace(f".{ADAPTER}.", ".")] = t
        else:
            extra[name.replace(".base_layer.", ".")] = t
    save_file(lora, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    if extra:
        save_file(extra, str(out / "veomni_extra.safetensors"), metadata={"format": "pt"})
    # What the adapter needs from its base, for whoever loads it with peft (docs/recipes.md).
    import json

    config = unwrap_model(model).config
    note = {"quantize": spec.quantize, "compute_dtype": str(unwrap_model(model).get_input_embeddings().weight.dtype),
            "vocab_size": config.vocab_size, "mask_token_id": getattr(config, "mask_token_id", None),
            "mask_delta_row": spec.mask_token_id, "extra": sorted(extra), "base_path": spec.base_path}
    (out / "veomni_adapter.json").write_text(json.dumps(note, indent=2) + "\n")
    cfg = peft.LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                          target_modules=list(spec.modules), bias="none", base_model_name_or_path=spec.base_path)
    cfg.save_pretrained(str(out))
    return str(out)
