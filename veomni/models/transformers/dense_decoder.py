"""The dense decoder shared by the Llama, Qwen2 and Qwen3 families (single device, plain torch).

The three families differ in three switches only, so the block is written once and each
`modeling_<family>.py` states its switches:
  - `qkv_bias`: bias on q/k/v projections (Qwen2 always; Llama/Qwen3 via `attention_bias`);
  - `o_bias`: bias on the output projection (Llama/Qwen3 via `attention_bias`; Qwen2 never);
  - `qk_norm`: per-head RMSNorm on q and k before RoPE (Qwen3).
Module and parameter names match Hugging Face transformers exactly, so HF checkpoints load with an
identity key mapping. No HF modeling code is imported; HF *config* classes are used as the config.

Attention mode is an explicit argument of `forward` (see veomni/ops/attention.py). A model may
carry a recorded default (`config.dllm_attn_mode`, written when a diffusion checkpoint is saved);
if the call passes none and the config records none, the call raises instead of guessing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from veomni.models.kv_cache import KVCache
from veomni.ops.attention import AttnMeta, attention, check_attention
from veomni.ops.rms_norm import rms_norm
from veomni.ops.rope import _rotate_half, apply_rope  # noqa: F401  (re-exported: the RoPE lives in veomni/ops/rope.py)
from veomni.ops.swiglu import gated_act
from veomni.ops.linear_ce import use_linear_ce


def count_parameters(model: nn.Module, skip: Optional[str] = None) -> int:
    """Parameters of `model`, each tied tensor once; `skip`: leave out those whose name contains it."""
    seen, total = set(), 0
    for name, p in model.named_parameters():
        if id(p) in seen or (skip is not None and skip in name):
            continue
        seen.add(id(p))
        total += p.numel()
    return total


@dataclass
class CausalLMOutput:
    logits: Optional[torch.Tensor] = None
    loss: Optional[torch.Tensor] = None
    hidden_states: Optional[torch.Tensor] = None
    past_key_values: Optional[KVCache] = None
    router_stats: Optional[list] = None  # MoE families: one RouterStats per sparse layer

    def __getitem__(self, key):  # HF-style `out["logits"]`
        return getattr(self, key)


class RMSNorm(nn.Module):
    # model.ops.rms_norm, set per instance by veomni/ops/registry.py. The eager path normalises in
    # fp32 and casts back before the weight: the order HF uses, kept for parity.
    impl: str = "eager"

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.variance_epsilon, self.impl)


def _rope_params(config) -> dict:
    """RoPE settings from a v5 (`rope_parameters`) or v4 (`rope_theta`/`rope_scaling`) config."""
    params = getattr(config, "rope_parameters", None)
    if params:
        params = dict(params)
    else:
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params.setdefault("rope_type", params.pop("type", "default"))
    return params


def rope_inv_freq(config, head_dim: int) -> torch.Tensor:
    p = _rope_params(config)
    rope_type = p["rope_type"]
    base = float(p["rope_theta"])
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / float(p["factor"])
    if rope_type == "llama3":
        # Llama 3.x frequency-dependent scaling: long wavelengths divided by `factor`, short ones
        # kept, a smooth ramp in between.
        factor, low, high = float(p["factor"]), float(p["low_freq_factor"]), float(p["high_freq_factor"])
        old_len = float(p["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        low_wl, high_wl = old_len / low, old_len / high
        scaled = torch.where(wavelen > low_wl, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        is_mid = (wavelen >= high_wl) & (wavelen <= low_wl)
        return torch.where(is_mid, mid, scaled)
    raise NotImplementedError(
        f"rope_type={rope_type!r} is not implemented (supported: default, linear, llama3). "
        "Add it to veomni/models/transformers/dense_decoder.py:rope_inv_freq."
    )


class RotaryEmbedding(nn.Module):
    def __init__(self, config, head_dim: int):
        super().__init__()
        self.register_buffer("inv_freq", rope_inv_freq(config, head_dim), persistent=False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor):
        # The angles must be computed in fp32 even inside a bf16 autocast region (DDP / single-
        # process bf16 training): autocast would run this matmul in bf16, whose 8-bit mantissa
        # puts cos/sin off by up to 0.5 below position 256 and makes them noise past ~1000, so
        # training would see corrupted positions while fp32 inference sees the right ones.
        with torch.autocast(device_type=x.device.type, enabled=False):
            freqs = self.inv_freq[None, :, None].float() @ position_ids[:, None, :].float()
            emb = torch.cat((freqs, freqs), dim=1).transpose(1, 2)
            return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


@dataclass
class LayerContext:
    """What every mixer of one forward call may need, built once by DecoderModel.

    valid: [B, S] bool of the query tokens (None = all real). memo: per-call values a mixer family
    derives once and its other layers reuse (the GDN document boundaries, for instance)."""

    cos: torch.Tensor
    sin: torch.Tensor
    meta: AttnMeta
    impl: str
    cache: Optional[KVCache]
    cache_position: torch.Tensor
    valid: Optional[torch.Tensor]
    memo: Dict[str, Any] = field(default_factory=dict)

    def remember(self, key: str, fn: Callable[[], Any]) -> Any:
        if key not in self.memo:
            self.memo[key] = fn()
        return self.memo[key]


_ACTS = {"silu": F.silu, "gelu": F.gelu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


def activation(config) -> Callable:
    if config.hidden_act not in _ACTS:
        raise NotImplementedError(f"hidden_act={config.hidden_act!r} not supported: {sorted(_ACTS)}")
    return _ACTS[config.hidden_act]


class MLP(nn.Module):
    impl: str = "eager"  # model.ops.swiglu, set per instance by veomni/ops/registry.py

    def __init__(self, config, bias: bool = False, intermediate_size: Optional[int] = None):
        super().__init__()
        h, i = config.hidden_size, intermediate_size or config.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=bias)
        self.up_proj = nn.Linear(h, i, bias=bias)
        self.down_proj = nn.Linear(i, h, bias=bias)
        self.act = activation(config)
        self.hidden_act = config.hidden_act  # named by the registry when a fused choice needs silu

    def forward(self, x):
        return self.down_proj(gated_act(self.gate_proj(x), self.up_proj(x), self.act, self.impl))


class Attention(nn.Module):
    # Set from outside by Ulysses sequence parallelism (veomni/distributed/sequence_parallel.py):
    # called as sequence_parallel(self, q, k, v, ctx) on this rank's slice of the sequence; it runs
    # self.attend over the whole sequence on a block of the heads.
    sequence_parallel = None
    rope_impl: str = "eager"  # model.ops.rope, set per instance by veomni/ops/registry.py

    def __init__(self, config, layer_idx: int, qkv_bias: bool, o_bias: bool, qk_norm: bool):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.scaling = self.head_dim**-0.5
        h = config.hidden_size
        self.q_proj = nn.Linear(h, self.num_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, h, bias=o_bias)
        if qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.qk_norm = qk_norm

    def project_q(self, x: torch.Tensor):
        """[B, S, H, D] queries and an output gate (None here; Qwen3.5's gated attention has one)."""
        return self.q_proj(x).view(*x.shape[:2], self.num_heads, self.head_dim), None

    def attend(self, q, k, v, ctx: LayerContext) -> torch.Tensor:
        """The token mixing: q [B, H, S, D], k/v [B, Hkv, S, D] -> [B, H, S, D] under ctx's mask."""
        return attention(q, k, v, ctx.meta, ctx.impl, self.scaling)

    def forward(self, x, ctx: LayerContext):
        bsz, slen, _ = x.shape
        q, gate = self.project_q(x)
        k = self.k_proj(x).view(bsz, slen, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(bsz, slen, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = apply_rope(q, k, ctx.cos, ctx.sin, self.rope_impl)
        if ctx.cache is not None:
            k, v = ctx.cache.update(self.layer_idx, k, v, ctx.cache_position)
        if self.sequence_parallel is None:
            out = self.attend(q, k, v, ctx)
        else:
            out = self.sequence_parallel(self, q, k, v, ctx)
        out = out.transpose(1, 2).reshape(bsz, slen, -1)
        if gate is not None:
            out = out * torch.sigmoid(gate)
        return self.o_proj(out)


class DecoderLayer(nn.Module):
    """Pre-norm block: x + mixer(norm(x)), then x + mlp(norm(x)).

    The mixer is attention (`self_attn`) or, in hybrids, a linear-attention mixer under its HF
    name (Qwen3.5: `linear_attn`); every mixer is called as mixer(x, ctx). The MLP is dense (`MLP`)
    or sparse (`moe.SparseMoeBlock`, which also returns its RouterStats). `norm` builds the two
    block norms (RMSNorm; Qwen3.5 uses the zero-centred one)."""

    def __init__(self, config, mixer: nn.Module, mlp: nn.Module, mixer_name: str = "self_attn",
                 norm: Callable[[int, float], nn.Module] = RMSNorm):
        super().__init__()
        self.mixer_name = mixer_name
        setattr(self, mixer_name, mixer)
        self.mlp = mlp
        self.sparse = hasattr(mlp, "gate") and hasattr(mlp, "experts")
        self.input_layernorm = norm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = norm(config.hidden_size, config.rms_norm_eps)

    @property
    def mixer(self) -> nn.Module:
        return getattr(self, self.mixer_name)

    def forward(self, x, ctx: LayerContext):
        """Returns (x, RouterStats or None)."""
        x = x + self.mixer(self.input_layernorm(x), ctx)
        if self.sparse:
            h, stats = self.mlp(self.post_attention_layernorm(x), ctx.valid)
            return x + h, stats
        return x + self.mlp(self.post_attention_layernorm(x)), None


class DecoderModel(nn.Module):
    """Embeddings -> N decoder layers -> final norm. Returns normed hidden states [B, S, H]."""

    def __init__(self, config, build_layer: Callable[[object, int], DecoderLayer],
                 norm: Callable[[int, float], nn.Module] = RMSNorm, rotary_dim: Optional[int] = None):
        super().__init__()
        self.config = config
        self.padding_idx = getattr(config, "pad_token_id", None)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(build_layer(config, i) for i in range(config.num_hidden_layers))
        self.norm = norm(config.hidden_size, config.rms_norm_eps)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.rotary_emb = RotaryEmbedding(config, rotary_dim or head_dim)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, segment_ids=None,
                attn_mode="causal", block_size=None, attn_impl="sdpa", past_key_values=None,
                cache_position=None, inputs_embeds=None, router_stats: Optional[list] = None,
                clean_stream=None, hidden_states_out: Optional[list] = None):
        """router_stats: a list that MoE layers append their RouterStats to (None = discard).
        clean_stream: [B, S] bool, the x_0 half of two-stream block-diffusion rows (see
        veomni/ops/attention.py); block_causal only, no cache.
        hidden_states_out: a list that receives num_layers + 1 hidden states as HF's
        output_hidden_states does: the embedding output, the outputs of layers 1..L-1, and the last
        layer's output after the final norm (for representation alignment)."""
        check_attention(attn_mode, attn_impl, block_size)
        if clean_stream is not None:
            if attn_mode != "block_causal":
                raise ValueError(f"clean_stream (two-stream block-diffusion rows) needs attn_mode='block_causal', "
                                 f"got {attn_mode!r}")
            if past_key_values is not None:
                raise ValueError("clean_stream is a training layout; it cannot be combined with a KV cache "
                                 "(block-diffusion models decode one stream, block by block).")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        bsz, slen = x.shape[:2]
        dev = x.device
        if cache_position is None:
            start = past_key_values.get_seq_length() if past_key_values is not None else 0
            cache_position = torch.arange(start, start + slen, device=dev)
        if position_ids is None:
            position_ids = cache_position[None, :].expand(bsz, slen)
        if segment_ids is not None and past_key_values is not None:
            raise ValueError("segment_ids (packed rows) cannot be combined with a KV cache.")

        valid = None if attention_mask is None else attention_mask.to(torch.bool)
        token_valid = valid if valid is None or valid.shape[1] == slen else valid[:, cache_position]
        if segment_ids is not None:  # packed rows: segment 0 is padding
            token_valid = segment_ids > 0 if token_valid is None else token_valid & (segment_ids > 0)
        if past_key_values is not None:
            # attention_mask covers either the new tokens only ([B, Sq]) or the whole row ([B, L]).
            if valid is None:
                q_valid = torch.ones(bsz, slen, dtype=torch.bool, device=dev)
            elif valid.shape[1] == slen:
                q_valid = valid
            else:
                q_valid = valid[:, cache_position]
            k_pos, k_valid = past_key_values.update_meta(position_ids, q_valid, cache_position)
            # bool(tensor) would break a compiled decode forward (veomni/inference/compiled.py) into
            # two graphs; compiled, the mask stays applied (an all-True mask is the same attention).
            if not torch.compiler.is_compiling() and bool(k_valid.all()):
                k_valid = None
            k_idx = torch.arange(k_pos.shape[1], device=dev)
        else:
            k_pos, k_valid, k_idx = position_ids, valid, cache_position
        meta = AttnMeta(
            mode=attn_mode, block_size=block_size, q_idx=cache_position, k_idx=k_idx,
            q_pos=position_ids, k_pos=k_pos, k_valid=k_valid, q_seg=segment_ids, k_seg=segment_ids,
            q_clean=clean_stream, k_clean=clean_stream,
        )
        cos, sin = self.rotary_emb(x, position_ids)
        ctx = LayerContext(cos, sin, meta, attn_impl, past_key_values, cache_position, token_valid)
        if hidden_states_out is not None:
            hidden_states_out.append(x)
        for layer in self.layers:
            x, stats = layer(x, ctx)
            if stats is not None and router_stats is not None:
                router_stats.append(stats)
            if hidden_states_out is not None:
                hidden_states_out.append(x)
        x = self.norm(x)
        if hidden_states_out is not None:
            hidden_states_out[-1] = x  # HF's convention: the last entry is after the final norm
        return x


class DecoderForCausalLM(nn.Module):
    """Backbone + LM head. Subclasses set the family switches and `config_class`."""

    config_class = None
    qkv_bias: Optional[bool] = None  # None -> config.attention_bias
    o_bias: Optional[bool] = None
    qk_norm: bool = False
    linear_ce_impl: str = "eager"  # model.ops.linear_ce; apply_ops sets it per instance

    def __init__(self, config, attn_impl: str = "sdpa"):
        super().__init__()
        if getattr(config, "use_sliding_window", False):
            raise NotImplementedError(
                f"{type(self).__name__}: sliding-window attention is not implemented; set "
                "use_sliding_window=false (as released Qwen2.5/Qwen3 configs do)."
            )
        self.config = config
        self.model = self.build_backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.attn_impl = attn_impl
        check_attention("causal", attn_impl)
        self.tie_weights()

    def build_backbone(self, config) -> DecoderModel:
        return DecoderModel(config, self.build_layer)

    def build_layer(self, config, layer_idx: int) -> DecoderLayer:
        return DecoderLayer(config, self.build_mixer(config, layer_idx), self.build_mlp(config, layer_idx))

    def build_mixer(self, config, layer_idx: int) -> nn.Module:
        """The token mixer of layer `layer_idx`: attention with the family's switches."""
        bias = bool(getattr(config, "attention_bias", False))
        qkv_bias = bias if self.qkv_bias is None else self.qkv_bias
        o_bias = bias if self.o_bias is None else self.o_bias
        return Attention(config, layer_idx, qkv_bias, o_bias, self.qk_norm)

    def build_mlp(self, config, layer_idx: int) -> nn.Module:
        """The MLP of layer `layer_idx`: dense here; MoE families return a SparseMoeBlock."""
        return MLP(config, bias=getattr(config, "mlp_bias", False))

    # ---- HF-like conveniences -------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def tie_weights(self) -> None:
        if getattr(self.config, "tie_word_embeddings", False):
            self.lm_head.weight = self.model.embed_tokens.weight

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_attn_impl(self, attn_impl: str) -> None:
        check_attention("causal", attn_impl)
        self.attn_impl = attn_impl

    def gradient_checkpointing_enable(self) -> None:
        """HF-style switch. Activation checkpointing is applied from outside the model (one place,
        veomni.distributed.parallelism): each decoder block gets wrapped to recompute in backward."""
        from veomni.distributed.parallelism import apply_activation_checkpointing

        apply_activation_checkpointing(self)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Random init (normal(0, initializer_range), norms to 1): for from-scratch training/tests."""
        std = getattr(self.config, "initializer_range", 0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                m.weight.normal_(0.0, std)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.Embedding):
                m.weight.normal_(0.0, std)
            elif isinstance(m, RMSNorm):
                m.weight.fill_(1.0)
            elif hasattr(m, "reset_dllm_parameters"):  # modules with their own init (Qwen3.5's norms, GDN)
                m.reset_dllm_parameters()
                continue
            for name, p in m.named_parameters(recurse=False):  # fused experts, router weights
                if p.dim() >= 2 and not isinstance(m, (nn.Linear, nn.Embedding)):
                    p.normal_(0.0, std)
        self.model.rotary_emb.inv_freq.copy_(rope_inv_freq(self.config, self.model.rotary_emb.inv_freq.numel() * 2))

    def resolve_attn_mode(self, attn_mode: Optional[str], block_size: Optional[int]):
        if attn_mode is None:
            attn_mode = getattr(self.config, "dllm_attn_mode", None)
            if block_size is None:
                block_size = getattr(self.config, "dllm_block_size", None)
        if attn_mode is None:
            raise ValueError(
                "attn_mode was not given and the config records none (config.dllm_attn_mode). "
                "Pass attn_mode='causal' (AR), 'bidirectional' (diffusion) or 'block_causal' "
                "with block_size."
            )
        return attn_mode, block_size

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, segment_ids=None,
                attn_mode: Optional[str] = None, block_size: Optional[int] = None,
                past_key_values: Optional[KVCache] = None, cache_position=None, inputs_embeds=None,
                loss_fn: Optional[Callable] = None, use_cache: bool = False, return_dict: bool = True,
                logits_to_keep: Optional[torch.Tensor] = None, clean_stream: Optional[torch.Tensor] = None,
                hidden_states_out: Optional[list] = None) -> CausalLMOutput:
        """Run the model.

        attn_mode: 'causal' | 'bidirectional' | 'block_causal' (needs block_size); falls back only
            to config.dllm_attn_mode, never to a guess.
        attention_mask: [B, S] 1 = real token, 0 = padding (keys that are padding are never seen).
        segment_ids: [B, S] packed-document ids (0 = padding); tokens only see their own document.
        past_key_values/cache_position: see veomni/models/kv_cache.py. use_cache creates a cache.
        loss_fn: called as loss_fn(hidden_states, lm_head.weight) inside forward (so FSDP has the
            head unsharded); its result is returned as `loss` and no logits are computed.
        logits_to_keep: optional index tensor of positions to compute logits for (saves the head).
        clean_stream: [B, S] bool marking the clean half of block-diffusion training rows [x_t ; x_0]
            (block_causal only; veomni/ops/attention.py has the mask).
        hidden_states_out: a list to receive the L + 1 hidden states (HF's output_hidden_states).
        """
        attn_mode, block_size = self.resolve_attn_mode(attn_mode, block_size)
        if use_cache and past_key_values is None:
            past_key_values = KVCache()
        stats = []
        hidden = self.model(
            input_ids, attention_mask=attention_mask, position_ids=position_ids,
            segment_ids=segment_ids, attn_mode=attn_mode, block_size=block_size,
            attn_impl=self.attn_impl, past_key_values=past_key_values,
            cache_position=cache_position, inputs_embeds=inputs_embeds, router_stats=stats,
            clean_stream=clean_stream, hidden_states_out=hidden_states_out,
        )
        stats = stats or None
        if loss_fn is not None:
            with use_linear_ce(self.linear_ce_impl):  # model.ops.linear_ce for the objective's head + CE
                loss = loss_fn(hidden, self.lm_head.weight)
            return CausalLMOutput(loss=loss, hidden_states=hidden,
                                  past_key_values=past_key_values, router_stats=stats)
        h = hidden if logits_to_keep is None else hidden[:, logits_to_keep]
        return CausalLMOutput(logits=self.lm_head(h), hidden_states=hidden, past_key_values=past_key_values,
                              router_stats=stats)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        return count_parameters(self, "embed_tokens" if exclude_embeddings else None)

    # ---- checkpoint IO (implemented in veomni/models/hf_io.py) ------------------------------
    @classmethod
    def from_pretrained(cls, path, dtype=None, torch_dtype=None, attn_impl: str = "sdpa",
                        device="cpu", **kwargs):
        """Load an HF directory (safetensors, sharded or not) or `path` + gguf_file=... into this class."""
        from veomni.models.hf_io import load_model

        model = load_model(path, dtype=dtype or torch_dtype, attn_impl=attn_impl, device=device, **kwargs)
        if not isinstance(model, cls):
            raise TypeError(
                f"{path} holds model_type={model.config.model_type!r} ({type(model).__name__}), "
                f"not {cls.__name__}. Use veomni.models.load_model(path) to pick the class by config."
            )
        return model

    def save_pretrained(self, path, tokenizer=None, **kwargs) -> None:
        from veomni.models.hf_io import save_model

        save_model(self, path, tokenizer=tokenizer, **kwargs)

    # ---- masked-diffusion generation (implemented in veomni/inference/dropin.py) --------------
    def diffusion_generate(self, inputs=None, generation_config=None, **kwargs):
        """Open-dLLM's API: diffusion_generate(inputs=ids, generation_config=MDMGenerationConfig(...),
        attention_mask=..., **overrides) -> GenerationOutput(.sequences, .history, .stats)."""
        from veomni.inference.dropin import mdm_diffusion_generate

        return mdm_diffusion_generate(self, inputs, generation_config, **kwargs)
