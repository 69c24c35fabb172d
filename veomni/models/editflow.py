"""EditFlow heads on any of our decoder backbones (Edit Flows, arXiv 2506.09018; dllm's EditFlow models).

An EditFlow model reads the final hidden states h [B, L, H] of a bidirectional backbone through
three heads, held in one submodule ``model.editflow`` so every part of the engine (parallelism,
checkpoints, exact resume, HF export) handles them as ordinary parameters of the model:

  sub_head   Linear(H, V)         token distribution of a substitution at position i
  ins_head   Linear(H, V)         token distribution of an insertion after position i
  rate_head  Linear(H, 3)+Softplus  normalised rates (lambda_sub, lambda_del, lambda_ins) at i

Both token heads start as copies of the LM head (the AR model's next-token distribution is the
best available guess for either); the rate head starts at a small random weight and zero bias.
The true CTMC intensities are w(t) * lambda with w = kappa'(t) / (1 - kappa(t)).

Time conditioning: our decoder families take no time input, so the heads see x_t only and the
rates are time-independent; the sampler supplies w(t). dllm's EditFlow models over AR-adapted
backbones (Qwen2/Qwen3, "TODO: time embedding") and ModernBERT do the same.

Logit shift (AR-initialised backbones, ``config.dllm_logit_shift``): the substitute distribution
for position i is read at hidden row i - 1 (what the AR head predicts for position i), the insert
distribution after i at row i (the next token after i); rates are read at row i. Position 0 (BOS
or the prompt) is never substituted, so row i - 1 always exists.

Saved checkpoints carry ``config.dllm_editflow = true`` and the ``editflow.*`` weights;
``veomni.models.load_model`` rebuilds the heads from that flag (see ``attach_if_configured``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["EditFlowHeads", "EditFlowOutput", "attach_editflow_heads", "attach_if_configured", "editflow_forward",
           "has_editflow_heads"]


@dataclass
class EditFlowOutput:
    rates: torch.Tensor  # [B, L, 3] fp32: lambda_sub, lambda_del, lambda_ins (no w(t) factor)
    sub_logits: torch.Tensor  # [B, L, V]: row i = substitute distribution for position i
    ins_logits: torch.Tensor  # [B, L, V]: row i = insert distribution after position i


class EditFlowHeads(nn.Module):
    def __init__(self, hidden_size: int, vocab_size: int, logit_shift: bool):
        super().__init__()
        self.sub_head = nn.Linear(hidden_size, vocab_size, bias=False)
        self.ins_head = nn.Linear(hidden_size, vocab_size, bias=False)
        self.rate_head = nn.Linear(hidden_size, 3)
        self.logit_shift = bool(logit_shift)

    def rates(self, hidden: torch.Tensor) -> torch.Tensor:
        # fp32: the loss takes log(rate), and a bf16 softplus near 0 rounds to exactly 0.
        return F.softplus(self.rate_head(hidden).float())

    def sub_rows(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden rows that predict the substitute token of each position (shifted by one with logit shift;
        row 0 gets row 0, it is never substituted)."""
        if not self.logit_shift:
            return hidden
        return torch.cat([hidden[:, :1], hidden[:, :-1]], dim=1)

    def forward(self, hidden: torch.Tensor) -> EditFlowOutput:
        return EditFlowOutput(self.rates(hidden), self.sub_head(self.sub_rows(hidden)), self.ins_head(hidden))

    @torch.no_grad()
    def init_from_lm_head(self, lm_head_weight: torch.Tensor, std: float) -> None:
        self.sub_head.weight.copy_(lm_head_weight)
        self.ins_head.weight.copy_(lm_head_weight)
        self.rate_head.weight.normal_(0.0, std)
        self.rate_head.bias.zero_()


def has_editflow_heads(model) -> bool:
    return isinstance(getattr(model, "editflow", None), EditFlowHeads)


def _new_heads(model) -> EditFlowHeads:
    cfg = model.config
    head = model.get_output_embeddings().weight
    heads = EditFlowHeads(cfg.hidden_size, head.shape[0], bool(getattr(cfg, "dllm_logit_shift", True)))
    return heads.to(device=head.device, dtype=head.dtype)


def attach_if_configured(model):
    """Give a freshly built model (meta or not) its EditFlow heads when its config says it has them, so
    loading an EditFlow checkpoint finds a place for every ``editflow.*`` weight. Returns the model."""
    if getattr(model.config, "dllm_editflow", False) and not has_editflow_heads(model):
        model.editflow = _new_heads(model)
    return model


def attach_editflow_heads(model, logit_shift: bool):
    """Turn a loaded model into an EditFlow model: heads initialised from the LM head (an AR or MDM
    checkpoint), or kept when the checkpoint already has trained heads. Sets config.dllm_editflow."""
    model.config.dllm_logit_shift = bool(logit_shift)
    if has_editflow_heads(model):
        if model.editflow.logit_shift != bool(logit_shift):
            raise ValueError(f"this EditFlow checkpoint was trained with logit_shift={model.editflow.logit_shift}; "
                             f"set train.logit_shift={model.editflow.logit_shift}")
        return model
    heads = _new_heads(model)
    heads.logit_shift = bool(logit_shift)
    heads.init_from_lm_head(model.get_output_embeddings().weight, getattr(model.config, "initializer_range", 0.02))
    model.editflow = heads
    model.config.dllm_editflow = True
    return model


def editflow_forward(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> EditFlowOutput:
    """Inference: rates and both token distributions of every position of right-padded rows."""
    if not has_editflow_heads(model):
        raise ValueError(f"{type(model).__name__} has no EditFlow heads (config.dllm_editflow is not set): "
                         "train one with train.objective=editflow")
    pos = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    # loss_fn hands back the final hidden states without running the LM head over [B, L, V].
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos, attn_mode="bidirectional",
                loss_fn=lambda hidden, _w: hidden)
    return model.editflow(out.loss)
