"""model_type -> our model class, its FLOPs function and its HF weight-name adapter.

To add a family: write veomni/models/transformers/<family>/modeling_<family>.py and add one
`ModelSpec` below (docs/models.md walks through it).
"""
from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from typing import Callable, Dict

logger = logging.getLogger("veomni")


def _identity_keys(state_dict: Dict) -> Dict:
    # Our parameter names equal HF's. HF checkpoints of some versions carry the non-persistent
    # RoPE buffer; it is recomputed from the config, so it is dropped rather than loaded.
    return {k: v for k, v in state_dict.items() if not k.endswith("rotary_emb.inv_freq")}


@dataclass(frozen=True)
class ModelSpec:
    model_type: str
    module: str  # import path of the modeling file
    class_name: str
    config_class_name: str  # HF config class name in transformers
    flops_fn: Callable = None  # (config, seq_lens, head_tokens, attn_mode, backward) -> FLOPs
    hf_to_ours: Callable[[Dict], Dict] = _identity_keys
    ours_to_hf: Callable[[Dict], Dict] = _identity_keys
    fused_experts: bool = False  # hub checkpoints store experts one by one (veomni/models/moe_weights.py)
    skip_prefixes: tuple = ()  # checkpoint weights we do not model (Qwen3.5: mtp.*), skipped with one log line
    text_model_type: str = ""  # a vision-language wrapper: load its text model (this model_type) only

    def hf_reader(self, config) -> "_Reader":
        """A converter for one checkpoint load: call it on each shard, then `.finish()`."""
        if self.fused_experts:
            from veomni.models.moe_weights import ExpertMerger

            return _Reader(self.hf_to_ours, ExpertMerger(config.num_experts), self.skip_prefixes)
        return _Reader(self.hf_to_ours, skip=self.skip_prefixes)

    def hf_writer(self, state_dict: Dict) -> Dict:
        """Our state dict -> the hub's names and layout."""
        if self.fused_experts:
            from veomni.models.moe_weights import split_experts

            state_dict = split_experts(state_dict)
        return self.ours_to_hf(state_dict)

    @property
    def model_class(self):
        return getattr(importlib.import_module(self.module), self.class_name)

    @property
    def config_class(self):
        import transformers

        return getattr(transformers, self.config_class_name)


class _Reader:
    def __init__(self, keys: Callable[[Dict], Dict], merger=None, skip: tuple = ()):
        self.keys, self.merger, self.skip = keys, merger, tuple(skip)
        self.skipped: Dict[str, int] = {}

    def __call__(self, state_dict: Dict) -> Dict:
        state_dict = self.keys(state_dict)
        if self.skip:
            for key in [k for k in state_dict if k.startswith(self.skip)]:
                prefix = next(p for p in self.skip if key.startswith(p))
                self.skipped[prefix] = self.skipped.get(prefix, 0) + 1
                del state_dict[key]
        return state_dict if self.merger is None else self.merger(state_dict)

    def finish(self) -> None:
        if self.merger is not None:
            self.merger.finish()
        if self.skipped:
            logger.info("skipped checkpoint weights this model does not use: %s",
                        ", ".join(f"{n} x {p}*" for p, n in sorted(self.skipped.items())))


def _language_model_keys(state_dict: Dict) -> Dict:
    """Qwen3.5 vision-language checkpoint -> its text model: model.language_model.* -> model.*;
    the vision tower (model.visual.*) and mtp.* are left for the reader to skip."""
    out = {}
    for k, v in state_dict.items():
        if k.startswith("model.language_model."):
            k = "model." + k[len("model.language_model."):]
        out[k] = v
    return _identity_keys(out)


def text_config(config):
    """The config our model is built from: the text config of a vision-language wrapper, else itself."""
    spec = get_spec(config.model_type)
    if not spec.text_model_type:
        return config
    text = config.text_config
    # The wrapper holds the tying flag of the whole model (HF ties lm_head to the text embeddings).
    text.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", text.tie_word_embeddings))
    return text


def _bert_keys(state_dict: Dict) -> Dict:
    """An HF BERT checkpoint -> our BertForMaskedLM names. A bare BertModel (sentence-transformers)
    stores its weights without the `bert.` prefix; TF-era files name LayerNorm weights gamma/beta.
    Dropped: the position_ids / token_type_ids buffers (recomputed), and the tied aliases
    cls.predictions.decoder.* (the word embeddings and cls.predictions.bias, stored once)."""
    from veomni.models.transformers.bert.modeling_bert import TIED_ALIASES

    out = {}
    for k, v in state_dict.items():
        if k.endswith(("embeddings.position_ids", "embeddings.token_type_ids")) or k in TIED_ALIASES:
            continue
        if not k.startswith(("bert.", "cls.")):
            k = "bert." + k
        k = k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        out[k] = v
    return out


def _bert_flops(*args, **kwargs):
    from veomni.models.transformers.bert.modeling_bert import bert_flops

    return bert_flops(*args, **kwargs)


def _dense_flops(*args, **kwargs):
    from veomni.models.flops import dense_decoder_flops

    return dense_decoder_flops(*args, **kwargs)


_BASE = "veomni.models.transformers"
_HYBRID_SKIP = ("mtp.", "model.visual.")
MODEL_REGISTRY: Dict[str, ModelSpec] = {
    "llama": ModelSpec("llama", f"{_BASE}.llama.modeling_llama", "LlamaForCausalLM", "LlamaConfig", _dense_flops),
    "qwen2": ModelSpec("qwen2", f"{_BASE}.qwen2.modeling_qwen2", "Qwen2ForCausalLM", "Qwen2Config", _dense_flops),
    "qwen3": ModelSpec("qwen3", f"{_BASE}.qwen3.modeling_qwen3", "Qwen3ForCausalLM", "Qwen3Config", _dense_flops),
    # MoE: the FLOPs count only active parameters (router + top-k experts), see flops.py.
    "qwen3_moe": ModelSpec("qwen3_moe", f"{_BASE}.qwen3_moe.modeling_qwen3_moe", "Qwen3MoeForCausalLM",
                           "Qwen3MoeConfig", _dense_flops, fused_experts=True),
    "qwen2_moe": ModelSpec("qwen2_moe", f"{_BASE}.qwen2_moe.modeling_qwen2_moe", "Qwen2MoeForCausalLM",
                           "Qwen2MoeConfig", _dense_flops, fused_experts=True),
    # Qwen3.5 hybrids (GDN + gated attention). Text models load directly; the vision-language
    # checkpoints (model_type qwen3_5 / qwen3_5_moe) give their text model (see text_config).
    "qwen3_5_text": ModelSpec("qwen3_5_text", f"{_BASE}.qwen3_5.modeling_qwen3_5", "Qwen3_5ForCausalLM",
                              "Qwen3_5TextConfig", _dense_flops, skip_prefixes=_HYBRID_SKIP),
    "qwen3_5_moe_text": ModelSpec("qwen3_5_moe_text", f"{_BASE}.qwen3_5_moe.modeling_qwen3_5_moe",
                                  "Qwen3_5MoeForCausalLM", "Qwen3_5MoeTextConfig", _dense_flops,
                                  fused_experts=True, skip_prefixes=_HYBRID_SKIP),
    "qwen3_5": ModelSpec("qwen3_5", f"{_BASE}.qwen3_5.modeling_qwen3_5", "Qwen3_5ForCausalLM", "Qwen3_5Config",
                         _dense_flops, hf_to_ours=_language_model_keys, skip_prefixes=_HYBRID_SKIP,
                         text_model_type="qwen3_5_text"),
    "qwen3_5_moe": ModelSpec("qwen3_5_moe", f"{_BASE}.qwen3_5_moe.modeling_qwen3_5_moe", "Qwen3_5MoeForCausalLM",
                             "Qwen3_5MoeConfig", _dense_flops, hf_to_ours=_language_model_keys, fused_experts=True,
                             skip_prefixes=_HYBRID_SKIP, text_model_type="qwen3_5_moe_text"),
    # Encoder family (BERT-chat): our BertForMaskedLM. The pooler and the next-sentence head
    # (BertForPreTraining checkpoints) are not part of the masked LM: skipped with one log line.
    "bert": ModelSpec("bert", f"{_BASE}.bert.modeling_bert", "BertForMaskedLM", "BertConfig", _bert_flops,
                      hf_to_ours=_bert_keys, skip_prefixes=("bert.pooler.", "cls.seq_relationship.")),
}


def get_spec(model_type: str) -> ModelSpec:
    if model_type not in MODEL_REGISTRY:
        raise KeyError(
            f"model_type={model_type!r} is not supported; supported: {sorted(MODEL_REGISTRY)}. "
            "See docs/models.md, 'Adding a family'."
        )
    return MODEL_REGISTRY[model_type]


def build_model(config, attn_impl: str = "sdpa"):
    """Instantiate our model for an HF config object (weights uninitialised: call init_weights or load)."""
    from veomni.models.editflow import attach_if_configured

    # An EditFlow checkpoint (config.dllm_editflow) carries its heads: build them too.
    return attach_if_configured(get_spec(config.model_type).model_class(config, attn_impl=attn_impl))
