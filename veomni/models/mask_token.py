"""Give a model + tokenizer pair a [MASK] token for masked-diffusion training.

AR checkpoints (SmolLM2, Llama, Qwen) have no mask token. Open-dLLM gets away without adding one
because Qwen's embedding has spare rows past the tokenizer; a Llama-family model has none, so the
general recipe is: add the token to the tokenizer, grow the embedding (and an untied head) to cover
it, and start the new row at the mean of the trained rows.

Why the mean: a random row gives the mask an arbitrary identity, and because the head is usually tied
its logit starts arbitrarily high or low; a zero row is an input unlike any real token (the first
RMSNorm leaves it at zero). The mean row is the centroid of the vocabulary: the "could be any
token" input the diffusion objective wants the model to learn from, close to the distribution of
real inputs, with an average (not extreme) logit when tied.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn as nn

DEFAULT_MASK_TOKEN = "<|mask|>"


def _grow(weight: torch.Tensor, new_rows: int, mean_of: int, init_from: int) -> nn.Parameter:
    """A Parameter with `new_rows` rows: old rows copied; rows >= init_from set to the mean of rows
    [0, mean_of) (mean computed in fp32 so bf16 weights do not lose the small average)."""
    old = weight.shape[0]
    out = torch.empty(new_rows, weight.shape[1], dtype=weight.dtype, device=weight.device)
    out[: min(old, new_rows)] = weight[: min(old, new_rows)]
    out[init_from:] = mean_row(weight, mean_of)
    return nn.Parameter(out, requires_grad=weight.requires_grad)


@dataclass(frozen=True)
class MaskPlan:
    """What `ensure_mask_token` does to the embedding, decided from the tokenizer and the row count
    alone (no weights): the meta-device loader (veomni/models/sharded_load.py) applies it to a model
    without data and fills the mean rows itself."""

    mask_id: int
    old_rows: int  # embedding rows before
    new_rows: int  # embedding rows after (== old_rows when nothing grows)
    trained_rows: int  # the mean of rows [0, trained_rows) initialises every row in `mean_rows`
    spare_row: Optional[int]  # a row < old_rows that gets the mean (a spare row past the old tokenizer)

    @property
    def mean_rows(self) -> Tuple[int, ...]:
        """Rows that start at the mean: the new rows, and the spare row if any."""
        spare = () if self.spare_row is None else (self.spare_row,)
        return spare + tuple(range(self.old_rows, self.new_rows))


def mean_row(weight: torch.Tensor, trained_rows: int) -> torch.Tensor:
    """The initial value of a mask row: the mean of the trained rows, in fp32, cast back (one
    place, so the eager and the sharded loaders compute it bit for bit alike)."""
    return weight[:trained_rows].float().mean(dim=0).to(weight.dtype)


def plan_mask_token(vocab: int, tokenizer, mask_token: str = DEFAULT_MASK_TOKEN,
                    pad_to_multiple_of: Optional[int] = None) -> MaskPlan:
    """Give `tokenizer` its mask token (added if it has none) and plan the embedding of a model with
    `vocab` rows; see `ensure_mask_token` for the rules and errors."""
    old_len = len(tokenizer)
    added = tokenizer.mask_token is None
    if added:
        tokenizer.add_special_tokens({"mask_token": mask_token})
    mask_id = tokenizer.mask_token_id
    if mask_id is None:
        raise ValueError(f"Tokenizer reports mask token {tokenizer.mask_token!r} but no id for it.")
    new_len = len(tokenizer)

    # Ids the embedding does not cover must all be the mask token (just added, or added by
    # load_tokenizer(mask_token=...)); anything else means a tokenizer for another model.
    uncovered = max(new_len, mask_id + 1) - vocab
    if uncovered > (1 if mask_id >= vocab else 0):
        raise ValueError(
            f"Tokenizer has {new_len} tokens (mask id {mask_id}) but the model's embedding has only "
            f"{vocab} rows: {uncovered} token id(s) would have no embedding, more than the mask token "
            "alone. Is this the tokenizer of this model?"
        )

    # Rows belonging to tokens that existed before this call: the trained part of the vocabulary.
    trained_rows = min(old_len if added else min(old_len, mask_id), vocab)
    if trained_rows <= 0:
        raise ValueError("Cannot initialise the mask row: the tokenizer has no other tokens.")
    needed = max(vocab, new_len, mask_id + 1)
    if needed > vocab and pad_to_multiple_of:
        needed = -(-needed // pad_to_multiple_of) * pad_to_multiple_of
    # The new id landed in a spare row past the old tokenizer (Qwen pads its vocabulary): that row
    # was never trained for any token, so it gets the same mean initialisation as a new row.
    # (An id < old_len means the text already was a regular token: its trained row is kept.)
    spare = mask_id if added and old_len <= mask_id < vocab else None
    return MaskPlan(int(mask_id), vocab, needed, trained_rows, spare)


@torch.no_grad()
def apply_mask_plan(model, plan: MaskPlan) -> int:
    """Resize / initialise the embedding (and an untied head) of `model` as `plan` says; update
    config.vocab_size and config.mask_token_id. On a meta model only the shapes change."""
    embed = model.get_input_embeddings()
    head = model.get_output_embeddings()
    vocab = embed.weight.shape[0]
    if vocab != plan.old_rows:
        raise ValueError(f"mask-token plan made for {plan.old_rows} embedding rows, the model has {vocab}")
    tied = head is not None and head.weight is embed.weight
    if plan.new_rows > vocab:
        # Every new row (mask and any padding rows) starts at the mean.
        embed.weight = _grow(embed.weight, plan.new_rows, plan.trained_rows, vocab)
        embed.num_embeddings = plan.new_rows
        if head is not None:
            if tied:
                head.weight = embed.weight
            else:
                head.weight = _grow(head.weight, plan.new_rows, plan.trained_rows, vocab)
            head.out_features = plan.new_rows
    if plan.spare_row is not None:
        embed.weight[plan.spare_row] = mean_row(embed.weight, plan.trained_rows)
        if head is not None and not tied:
            head.weight[plan.spare_row] = mean_row(head.weight, plan.trained_rows)
    bias = getattr(head, "bias", None) if head is not None else None
    if bias is not None and (plan.new_rows > bias.shape[0] or plan.spare_row is not None):
        # An output bias (BERT's MLM head) grows with the vocabulary, its new rows at the mean too.
        # The model places it (set_output_bias), as it may be one Parameter under two names.
        grown = _grow(bias[:, None], plan.new_rows, plan.trained_rows, bias.shape[0])[:, 0]
        if plan.spare_row is not None:
            grown[plan.spare_row] = mean_row(bias[:, None], plan.trained_rows)[0]
        grown = nn.Parameter(grown.detach().clone(), requires_grad=bias.requires_grad)
        setter = getattr(model, "set_output_bias", None)
        setter(grown) if setter is not None else setattr(head, "bias", grown)

    if tied and hasattr(model, "tie_weights"):
        model.tie_weights()
    model.config.vocab_size = embed.weight.shape[0]
    model.config.mask_token_id = plan.mask_id
    return plan.mask_id


@torch.no_grad()
def ensure_mask_token(model, tokenizer, mask_token: str = DEFAULT_MASK_TOKEN,
                      pad_to_multiple_of: Optional[int] = None) -> int:
    """Make sure `tokenizer` has a mask token that `model` can embed; return its id.

    - tokenizer already has a mask token (tokenizer.mask_token): it is used as is (`mask_token` is
      ignored) and, if its row exists, its embedding is left untouched (it may be trained, e.g. Dream).
    - otherwise `mask_token` is added as a special token. Its embedding row (a new row, or a spare
      row past the old tokenizer, which was never trained) and, for an untied head, its head row are
      set to the mean of the rows of the tokens the tokenizer had.
    - the embedding grows to len(tokenizer) exactly, or up to a multiple of `pad_to_multiple_of`
      (as in HF's resize_token_embeddings: a multiple of 64 maps the head matmul onto tensor cores
      better; the padding rows also get the mean). A tied head stays tied.
    - config.vocab_size and config.mask_token_id are updated.

    Raises ValueError when the tokenizer has more tokens than the embedding beyond the mask token
    itself: then this tokenizer does not belong to this model.
    """
    vocab = model.get_input_embeddings().weight.shape[0]
    return apply_mask_plan(model, plan_mask_token(vocab, tokenizer, mask_token, pad_to_multiple_of))


__all__ = ["ensure_mask_token", "plan_mask_token", "apply_mask_plan", "MaskPlan", "mean_row",
           "DEFAULT_MASK_TOKEN"]
