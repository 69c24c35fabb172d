"""BERT encoder + MLM head (single device, plain torch): the encoder family for BERT-chat.

A masked LM is already a masked-diffusion denoiser: an absorbing-state diffusion model IS an MLM
run at every mask ratio, which is what dllm's BERT-chat trains (docs/recipes.md, "BERT-chat").

Module and parameter names match Hugging Face's `BertForMaskedLM` exactly (`bert.embeddings.*`,
`bert.encoder.layer.N.*`, `cls.predictions.*`), so HF checkpoints load with the identity map and
our saves load in `transformers.BertForMaskedLM.from_pretrained`. As in HF, the decoder weight is
the word-embedding Parameter and the decoder bias is `cls.predictions.bias` (two names, one tensor;
the checkpoint stores each once, see `TIED_ALIASES`).

Differences from HF, on purpose:
  - the forward has the decoder families' signature (veomni/models/transformers/dense_decoder.py):
    attn_mode, packed `segment_ids` (tokens see their own document only), `loss_fn` (the objective's
    head + CE, run on the scored rows only), `logits_to_keep`; attention goes through
    veomni/ops/attention.py, so every kernel and mask mode of the decoders applies;
  - no dropout (the decoders have none either): hidden_dropout_prob / attention_probs_dropout_prob
    in the config are not applied, training is deterministic given the noise;
  - token type ids are always 0 (one segment type; BERT-chat has no sentence pairs);
  - there is no KV cache: every position can change every step, an encoder recomputes the canvas.
Position embeddings are absolute and learned: position ids must stay below
max_position_embeddings (512 for BERT-base / MiniLM), so data.max_seq_len <= 512.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import BertConfig

from veomni.models.transformers.dense_decoder import CausalLMOutput, count_parameters
from veomni.ops.attention import AttnMeta, attention, check_attention
from veomni.ops.linear_ce import use_linear_ce

__all__ = ["BertConfig", "BertForMaskedLM", "MaskedLMOutput", "TIED_ALIASES", "bert_flops"]

MaskedLMOutput = CausalLMOutput  # same fields; the samplers and the trainer read .logits / .loss

# Names that point at another parameter (HF's _tied_weights_keys): never stored in a checkpoint.
TIED_ALIASES = ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias")

_ACTS: dict = {
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


def _activation(config) -> Callable:
    if config.hidden_act not in _ACTS:
        raise NotImplementedError(f"BERT hidden_act={config.hidden_act!r} is not supported: {sorted(_ACTS)}")
    return _ACTS[config.hidden_act]


def _check_config(config) -> None:
    kind = getattr(config, "position_embedding_type", "absolute") or "absolute"
    if kind != "absolute":
        raise NotImplementedError(f"BERT position_embedding_type={kind!r} is not supported (only 'absolute').")
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        raise NotImplementedError("BERT as a decoder / with cross-attention is not supported: this family is the "
                                  "bidirectional encoder (set is_decoder=false, add_cross_attention=false).")
    if not getattr(config, "tie_word_embeddings", True):
        raise NotImplementedError("BERT with an untied MLM decoder (tie_word_embeddings=false) is not supported: "
                                  "every released BERT ties it to the word embeddings.")


class BertEmbeddings(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids, position_ids, inputs_embeds=None):
        x = self.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        # Token type 0 everywhere: its row is a constant offset. Summed in HF's order (type, then
        # position) so fp32 results match bit for bit more often.
        x = x + self.token_type_embeddings.weight[0]
        x = x + self.position_embeddings(position_ids)
        return self.LayerNorm(x)


class BertSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(f"hidden_size {config.hidden_size} is not a multiple of num_attention_heads "
                             f"{config.num_attention_heads}")
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // self.num_heads
        self.scaling = self.head_dim**-0.5
        h = config.hidden_size
        self.query = nn.Linear(h, h)
        self.key = nn.Linear(h, h)
        self.value = nn.Linear(h, h)

    def forward(self, x, meta: AttnMeta, impl: str):
        bsz, slen, _ = x.shape
        split = lambda t: t.view(bsz, slen, self.num_heads, self.head_dim).transpose(1, 2)  # noqa: E731
        out = attention(split(self.query(x)), split(self.key(x)), split(self.value(x)), meta, impl, self.scaling)
        return out.transpose(1, 2).reshape(bsz, slen, -1)


class BertSelfOutput(nn.Module):
    """dense -> LayerNorm(. + residual): BERT is post-norm."""

    def __init__(self, config, in_features: int):
        super().__init__()
        self.dense = nn.Linear(in_features, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x, residual):
        return self.LayerNorm(self.dense(x) + residual)


class BertAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertSelfOutput(config, config.hidden_size)

    def forward(self, x, meta: AttnMeta, impl: str):
        return self.output(self.self(x, meta, impl), x)


class BertIntermediate(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = _activation(config)

    def forward(self, x):
        return self.act(self.dense(x))


class BertLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertSelfOutput(config, config.intermediate_size)  # HF's BertOutput: same shape of code

    def forward(self, x, meta: AttnMeta, impl: str):
        x = self.attention(x, meta, impl)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))


class BertModel(nn.Module):
    """Embeddings -> N post-norm layers. No pooler (the MLM does not use it; checkpoints that carry
    one have it skipped at load, see registry.py)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, segment_ids=None,
                attn_mode="bidirectional", block_size=None, attn_impl="sdpa", inputs_embeds=None,
                hidden_states_out: Optional[list] = None):
        ref = input_ids if inputs_embeds is None else inputs_embeds
        bsz, slen = ref.shape[:2]
        dev = ref.device
        idx = torch.arange(slen, device=dev)
        if position_ids is None:
            position_ids = idx[None, :].expand(bsz, slen)
        limit = self.config.max_position_embeddings
        # Position ids of our batches are always < S, so only a long row needs the (syncing) check.
        if slen > limit and int(position_ids.max()) >= limit:
            raise ValueError(f"position id {int(position_ids.max())} >= max_position_embeddings={limit}: BERT's "
                             f"positions are learned up to {limit}; use data.max_seq_len <= {limit} "
                             "(and prompt + max_new_tokens <= it when sampling).")
        valid = None if attention_mask is None else attention_mask.to(torch.bool)
        meta = AttnMeta(mode=attn_mode, block_size=block_size, q_idx=idx, k_idx=idx, q_pos=position_ids,
                        k_pos=position_ids, k_valid=valid, q_seg=segment_ids, k_seg=segment_ids)
        x = self.embeddings(input_ids, position_ids, inputs_embeds)
        if hidden_states_out is not None:
            hidden_states_out.append(x)
        for layer in self.encoder.layer:
            x = layer(x, meta, attn_impl)
            if hidden_states_out is not None:
                hidden_states_out.append(x)
        return x


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.act = _activation(config)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x):
        return self.LayerNorm(self.act(self.dense(x)))


class BertLMPredictionHead(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=True)
        self.bias = self.decoder.bias  # one Parameter, HF's two names

    def forward(self, x):
        return self.decoder(self.transform(x))


class BertOnlyMLMHead(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.predictions = BertLMPredictionHead(config)


class BertForMaskedLM(nn.Module):
    """BERT + MLM head with the decoder families' interface (forward, loading, saving, sampling)."""

    config_class = BertConfig
    # The encoder predicts token i at position i: it was never trained to read i from i-1, so the
    # objective's logit shift (meant for AR-initialised decoders) is refused with it (trainer.py).
    predicts_in_place = True
    tied_aliases = TIED_ALIASES  # hf_io stores each tied tensor once (under HF's names)
    linear_ce_impl: str = "eager"  # model.ops.linear_ce; apply_ops sets it per instance

    def __init__(self, config, attn_impl: str = "sdpa"):
        super().__init__()
        _check_config(config)
        self.config = config
        self.bert = BertModel(config)
        self.cls = BertOnlyMLMHead(config)
        check_attention("bidirectional", attn_impl)
        self.attn_impl = attn_impl
        self.tie_weights()

    # ---- HF-like conveniences -------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.cls.predictions.bias.device

    @property
    def dtype(self) -> torch.dtype:
        return self.cls.predictions.bias.dtype

    def tie_weights(self) -> None:
        head = self.cls.predictions
        head.decoder.weight = self.bert.embeddings.word_embeddings.weight
        head.decoder.bias = head.bias

    def set_output_bias(self, bias: nn.Parameter) -> None:
        """Replace the MLM bias (both of its names); used when the vocabulary grows (mask_token.py)."""
        self.cls.predictions.bias = bias
        self.tie_weights()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.bert.embeddings.word_embeddings

    def get_output_embeddings(self) -> nn.Linear:
        return self.cls.predictions.decoder

    def blocks(self) -> nn.ModuleList:
        """The transformer blocks, for parallelize() (activation checkpointing, FSDP2 units)."""
        return self.bert.encoder.layer

    def set_attn_impl(self, attn_impl: str) -> None:
        check_attention("bidirectional", attn_impl)
        self.attn_impl = attn_impl

    def gradient_checkpointing_enable(self) -> None:
        from veomni.distributed.parallelism import apply_activation_checkpointing

        apply_activation_checkpointing(self)

    @torch.no_grad()
    def init_weights(self) -> None:
        """BERT's init: Linear/Embedding ~ normal(0, initializer_range), biases 0, LayerNorm (1, 0)."""
        std = getattr(self.config, "initializer_range", 0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                if m is self.cls.predictions.decoder:
                    continue  # the word embeddings (set below) and the MLM bias
                m.weight.normal_(0.0, std)
                m.bias.zero_()
            elif isinstance(m, nn.Embedding):
                m.weight.normal_(0.0, std)
            elif isinstance(m, nn.LayerNorm):
                m.weight.fill_(1.0)
                m.bias.zero_()
        self.cls.predictions.bias.zero_()

    def resolve_attn_mode(self, attn_mode: Optional[str], block_size: Optional[int]):
        if attn_mode is None:
            attn_mode = getattr(self.config, "dllm_attn_mode", None) or "bidirectional"
            if block_size is None:
                block_size = getattr(self.config, "dllm_block_size", None)
        if attn_mode == "causal":
            raise ValueError("BERT is a bidirectional encoder: attn_mode='causal' would run it on inputs unlike any "
                             "it was trained on. Use 'bidirectional' (or 'block_causal' with block_size).")
        return attn_mode, block_size

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, segment_ids=None,
                attn_mode: Optional[str] = None, block_size: Optional[int] = None, past_key_values=None,
                cache_position=None, inputs_embeds=None, loss_fn: Optional[Callable] = None,
                use_cache: bool = False, return_dict: bool = True, logits_to_keep: Optional[torch.Tensor] = None,
                clean_stream: Optional[torch.Tensor] = None, hidden_states_out: Optional[list] = None):
        """Same contract as DecoderForCausalLM.forward (dense_decoder.py), minus the KV cache.

        attn_mode: 'bidirectional' (default, as pretrained) or 'block_causal'; 'causal' is refused.
        loss_fn(hidden, weight): the objective's head + CE. The MLM head is transform -> decoder with a
            bias; the transform runs here and the bias rides along as one more input column
            ([h, 1] . [W, b]^T = h W^T + b), so the objective's bias-free head + CE computes exactly
            the MLM logits without materialising them.
        """
        if past_key_values is not None or use_cache or cache_position is not None:
            raise ValueError("BERT has no KV cache: every position may change at every denoising step, so the "
                             "encoder recomputes the whole canvas. Use use_cache='none' (infer.use_cache=none).")
        if clean_stream is not None:
            raise ValueError("clean_stream (two-stream block-diffusion rows, train.objective=bd3lm) is not supported "
                             "by the BERT encoder; use train.objective=mdm.")
        attn_mode, block_size = self.resolve_attn_mode(attn_mode, block_size)
        check_attention(attn_mode, self.attn_impl, block_size)
        hidden = self.bert(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                           segment_ids=segment_ids, attn_mode=attn_mode, block_size=block_size,
                           attn_impl=self.attn_impl, inputs_embeds=inputs_embeds, hidden_states_out=hidden_states_out)
        head = self.cls.predictions
        if loss_fn is not None:
            h = head.transform(hidden)
            ones = torch.ones(*h.shape[:-1], 1, dtype=h.dtype, device=h.device)
            weight = torch.cat([head.decoder.weight, head.bias[:, None].to(head.decoder.weight.dtype)], dim=1)
            with use_linear_ce(self.linear_ce_impl):
                loss = loss_fn(torch.cat([h, ones], dim=-1), weight)
            return MaskedLMOutput(loss=loss, hidden_states=hidden)
        h = hidden if logits_to_keep is None else hidden[:, logits_to_keep]
        return MaskedLMOutput(logits=head(h), hidden_states=hidden)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        return count_parameters(self, "embeddings" if exclude_embeddings else None)

    # ---- checkpoint IO (veomni/models/hf_io.py) ---------------------------------------------
    @classmethod
    def from_pretrained(cls, path, dtype=None, torch_dtype=None, attn_impl: str = "sdpa", device="cpu", **kwargs):
        from veomni.models.hf_io import load_model

        model = load_model(path, dtype=dtype or torch_dtype, attn_impl=attn_impl, device=device, **kwargs)
        if not isinstance(model, cls):
            raise TypeError(f"{path} holds model_type={model.config.model_type!r} ({type(model).__name__}), "
                            f"not {cls.__name__}. Use veomni.models.load_model(path).")
        return model

    def save_pretrained(self, path, tokenizer=None, **kwargs) -> None:
        from veomni.models.hf_io import save_model

        save_model(self, path, tokenizer=tokenizer, **kwargs)

    def diffusion_generate(self, inputs=None, generation_config=None, **kwargs):
        """Open-dLLM's API (veomni/inference/dropin.py); logit_shift is off for this model."""
        from veomni.inference.dropin import mdm_diffusion_generate

        return mdm_diffusion_generate(self, inputs, generation_config, **kwargs)


def bert_flops(config, seq_lens, head_tokens: Optional[int] = None, attn_mode: str = "bidirectional",
               backward: bool = True, block_size: Optional[int] = None, trainable=None) -> float:
    """FLOPs of one forward (+ backward: x3) over documents of lengths `seq_lens`: 2 x matmul
    parameters per token in the layers, the head transform on every token (the loss path runs it
    everywhere), the decoder on `head_tokens`, plus attention scores and values. Frozen parameters
    are counted as trained (an upper bound)."""
    from veomni.models.flops import attention_pairs

    seq_lens = list(seq_lens)
    tokens = sum(seq_lens)
    head_tokens = tokens if head_tokens is None else head_tokens
    h, i, n = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    body = n * (4 * h * h + 2 * h * i) + h * h  # q, k, v, o + MLP per layer; head transform
    pairs = sum(attention_pairs(s, attn_mode, block_size) for s in seq_lens)
    fwd = 2 * body * tokens + 2 * h * config.vocab_size * head_tokens + 4 * pairs * h * n
    return float(fwd * (3 if backward else 1))
