"""FLOPs of a decoder (dense or mixture-of-experts), for MFU.

Matmul FLOPs per token: forward 2 x (parameters touched by matmuls); backward 2 x for the gradient
of the input and 2 x for the gradient of the weight, so 6 x for a fully trained model. Attention
scores and the weighted sum add 4 (forward) + 8 (backward) x pairs x head_dim x heads per layer,
where `pairs` is the number of (query, key) pairs the mode computes:
  bidirectional  len^2
  causal         len^2 / 2 (a causal kernel skips the upper triangle; PaLM's appendix counts the
                 full square for both, we count what the kernel does)
  block_causal   sum over blocks of block_len x keys visible to it (the block and all before it)
Hybrids (Qwen3.5): a "linear_attention" layer counts its projections as matmul parameters and
its delta-rule scan as 6 x d_k x d_v per token and value head forward (read S^T k, write
k (x) beta(v - m), read S^T q; the decays and the chunked form's intra-chunk products are not
counted, as flash-attention's softmax is not), x 2 backward, x 2 again in the modes that add the
reverse scan (bidirectional, block_causal). Attention pairs are counted on full-attention layers only.
The LM head is counted only for the positions that have a loss (the diffusion loss computes the
head at masked positions only), which is what makes the figure a *true* MFU.

Frozen parameters (train.freeze) get no weight gradient, and a frozen stretch at the bottom of the
network needs no input gradient either (nothing below it trains). `trainability(model)` records
this per decoder layer, and `dense_decoder_flops(..., trainable=...)` drops the FLOPs that
backward does not run. Without it a frozen model read 3x its real MFU.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Tuple


def _mlp_active_params(config, layer_idx: int) -> int:
    """Matmul weights one token passes through in the MLP of layer `layer_idx`.

    Dense: gate, up, down. Sparse (MoE): the router (h x E), its top-k experts' SwiGLUs, and the
    shared expert with its gate when the family has one (Qwen2-MoE): the *active* parameters,
    which is what a token costs; counting all E experts would put MoE MFU up to E/k times too high.
    """
    h = config.hidden_size
    if getattr(config, "num_experts", 0):
        from veomni.models.transformers.moe import is_sparse_layer

        if is_sparse_layer(config, layer_idx):
            active = h * config.num_experts + config.num_experts_per_tok * 3 * h * config.moe_intermediate_size
            shared = getattr(config, "shared_expert_intermediate_size", 0) or 0
            return active + (3 * h * shared + h if shared else 0)
    return 3 * h * config.intermediate_size


def _gdn_params(config) -> int:
    h = config.hidden_size
    key, value = config.linear_num_key_heads * config.linear_key_head_dim, config.linear_num_value_heads * config.linear_value_head_dim
    return h * (2 * key + value) + h * value + 2 * h * config.linear_num_value_heads + value * h


def dense_decoder_dims(config) -> dict:
    """Sizes for the FLOPs count; `layer_params[l]` = matmul weights a token passes in layer l,
    `layer_types[l]` = full_attention | linear_attention (GDN)."""
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    h, layers = config.hidden_size, config.num_hidden_layers
    gated = str(config.model_type).startswith("qwen3_5")  # q_proj also produces the output gate
    attn = (2 if gated else 1) * h * heads * head_dim + 2 * h * kv * head_dim + heads * head_dim * h
    types = list(getattr(config, "layer_types", None) or ["full_attention"] * layers)
    types = ["linear_attention" if t == "linear_attention" else "full_attention" for t in types]
    layer_params = [(_gdn_params(config) if types[i] == "linear_attention" else attn) + _mlp_active_params(config, i)
                    for i in range(layers)]
    scan = (6 * config.linear_key_head_dim * config.linear_value_head_dim * config.linear_num_value_heads
            if "linear_attention" in types else 0)
    return dict(layers=layers, heads=heads, head_dim=head_dim, body_params=sum(layer_params),
                layer_params=layer_params, head_params=h * config.vocab_size, layer_types=types,
                gdn_scan_per_token=scan)


@dataclass(frozen=True)
class Trainability:
    """What backward computes, per decoder layer (see `trainability`).

    layer_frozen_matmul[l]: matmul weight elements of layer l without a weight gradient.
    layer_input_grad[l]:    backward runs through layer l (something at or below it trains).
    head_trainable:         the LM head weight gets a gradient.
    head_input_grad:        backward runs below the head (anything under it trains).
    """

    layer_frozen_matmul: Tuple[int, ...]
    layer_input_grad: Tuple[bool, ...]
    head_trainable: bool
    head_input_grad: bool


def trainability(model) -> Optional[Trainability]:
    """Trainability of a DecoderForCausalLM-layout model; None when every parameter trains.

    Layer granularity: a layer that holds any trainable parameter counts its input gradients in
    full (the exact frontier inside a layer would save little and tie this to the block's wiring).
    """
    import torch.nn as nn

    if all(p.requires_grad for p in model.parameters()):
        return None
    backbone = getattr(model, "model", None)
    if backbone is None:  # another layout (the BERT encoder): its FLOPs count every parameter as trained
        return None
    from veomni.models.transformers.moe import Experts

    below = any(p.requires_grad for p in backbone.embed_tokens.parameters())
    from veomni.models.quant import linear_numel  # an NF4 weight packs two elements per byte

    frozen, input_grad = [], []
    for layer in backbone.layers:
        below = below or any(p.requires_grad for p in layer.parameters())
        n = sum(linear_numel(m) for m in layer.modules() if isinstance(m, nn.Linear) and not m.weight.requires_grad)
        for m in layer.modules():  # fused experts: a token touches top_k of num_experts of them
            if isinstance(m, Experts):
                n += sum(p.numel() for p in (m.gate_up_proj, m.down_proj)
                         if not p.requires_grad) * m.top_k // m.num_experts
        frozen.append(n)
        input_grad.append(below)
    below = below or any(p.requires_grad for p in backbone.norm.parameters())
    return Trainability(tuple(frozen), tuple(input_grad), bool(model.lm_head.weight.requires_grad), below)


def attention_pairs(n: int, attn_mode: str, block_size: Optional[int] = None) -> float:
    """(query, key) pairs the attention of one document of length n computes under attn_mode."""
    if attn_mode == "bidirectional":
        return float(n * n)
    if attn_mode == "causal":
        return 0.5 * n * n
    if attn_mode == "block_causal":
        if not block_size or block_size < 1:
            raise ValueError(f"attn_mode='block_causal' needs a positive block_size, got {block_size!r}")
        pairs, start = 0, 0
        while start < n:  # blocks follow position ids, which restart at 0 in every document
            end = min(start + block_size, n)
            pairs += (end - start) * end
            start = end
        return float(pairs)
    raise ValueError(f"unknown attn_mode {attn_mode!r}")


def dense_decoder_flops(config, seq_lens: Iterable[int], head_tokens: int | None = None,
                        attn_mode: str = "bidirectional", backward: bool = True,
                        block_size: Optional[int] = None, trainable: Optional[Trainability] = None) -> float:
    """FLOPs of one forward (+backward) over documents of lengths `seq_lens`.

    head_tokens: positions where the LM head runs (default: every token).
    trainable: from `trainability(model)`; None = every parameter trains.
    """
    d = dense_decoder_dims(config)
    seq_lens = list(seq_lens)
    tokens = sum(seq_lens)
    head_tokens = tokens if head_tokens is None else head_tokens
    layers = d["layers"]
    if trainable is not None and len(trainable.layer_input_grad) != layers:
        raise ValueError(f"trainable describes {len(trainable.layer_input_grad)} layers, the config {layers}")
    pairs = sum(attention_pairs(n, attn_mode, block_size) for n in seq_lens)
    attn_unit = pairs * d["head_dim"] * d["heads"]  # one multiply-add pass over the pairs = 2 units

    if trainable is None:  # everything trains: every input and weight gradient is computed
        trainable = Trainability((0,) * layers, (True,) * layers, head_trainable=True, head_input_grad=True)

    is_attn = [t == "full_attention" for t in d["layer_types"]]
    scans = 1 if attn_mode == "causal" else 2  # the reverse scan of bidirectional / block_causal GDN
    scan = d["gdn_scan_per_token"] * scans * tokens  # one GDN layer's scans, forward
    body = 2 * d["body_params"]  # forward, per token
    attn = sum(4 * attn_unit if a else scan for a in is_attn)
    head = 2 * d["head_params"]
    if backward:
        for per_layer, frozen, grad_in, a in zip(d["layer_params"], trainable.layer_frozen_matmul,
                                                 trainable.layer_input_grad, is_attn):
            body += 2 * per_layer * grad_in + 2 * (per_layer - frozen)
            attn += (8 * attn_unit if a else 2 * scan) * grad_in
        head += 2 * d["head_params"] * (trainable.head_input_grad + trainable.head_trainable)
    return float(body * tokens + head * head_tokens + attn)
