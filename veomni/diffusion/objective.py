"""Training objectives: masked diffusion (MDM) and the autoregressive baseline (AR).

Both share one interface, used by the trainer for every micro-batch:

    corr  = objective.prepare(batch, generator)        # before the forward
    local = objective.num_loss_tokens(corr)             # int
    # trainer: global_den = all_reduce(SUM over ranks of SUM over the step's micro-batches of local)
    fn    = objective.loss_fn(corr, global_den)
    out   = model(**objective.model_inputs(batch, corr), loss_fn=fn)
    share = out.loss                                    # sum(weight * CE) / global_den

Summing ``share`` over the micro-batches of a step and over the ranks gives the global mean;
dividing by the number of micro-batches instead is the classic bug (NOTES §3) and is what the
global denominator replaces. See ``loss_fn`` for the DDP/FSDP gradient scaling.

The model calls ``fn(hidden_states, head_weight)`` inside its own forward, so under FSDP the head
weight is unsharded there. ``fn`` gathers the hidden rows that predict a scored token and runs
the head + CE (model.ops.linear_ce, veomni/ops/linear_ce.py) on those rows only: the [B, S, V] logits
never exist.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch

from veomni.diffusion.noise import Corruption, corrupt, score_all
from veomni.ops.chunked_ce import DEFAULT_CHUNK_SIZE
from veomni.ops.linear_ce import linear_cross_entropy

__all__ = ["MDMObjective", "ARObjective", "ScoredRows", "build_objective", "check_mdm_attention", "WEIGHTINGS",
           "NORMALIZATIONS", "MDM_ATTN_MODES"]

WEIGHTINGS = ("inv_t", "none")
NORMALIZATIONS = ("masked", "maskable")
# Causal attention is not offered for MDM: a masked position could only use the tokens to its left,
# so the model would learn an AR model with holes in its context, and every diffusion sampler
# (which reveals positions in any order and relies on right context) would run it off-distribution.
# Use objective="ar" for a causal model.
MDM_ATTN_MODES = ("bidirectional", "block_causal")

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name}={value!r}; choose one of {list(choices)}")


def check_mdm_attention(attn_mode: str, block_size):
    """(attn_mode, block_size) for MDM training, or a ValueError that says what to change."""
    if attn_mode not in MDM_ATTN_MODES:
        raise ValueError(
            f"masked-diffusion training does not support attn_mode={attn_mode!r}: choose one of "
            f"{list(MDM_ATTN_MODES)} (model.attn_mode), or train.objective='ar' for a causal model")
    if attn_mode == "block_causal":
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"attn_mode='block_causal' needs a positive int block_size, got {block_size!r}")
    elif block_size is not None:
        raise ValueError(f"block_size={block_size} only applies to attn_mode='block_causal' (got {attn_mode!r})")
    return attn_mode, block_size


def _denominator(global_denominator, n_local_scored: int) -> float:
    if isinstance(global_denominator, torch.Tensor):
        if global_denominator.numel() != 1:
            raise ValueError(f"global_denominator must be a scalar, got shape {tuple(global_denominator.shape)}")
        global_denominator = global_denominator.item()
    denom = float(global_denominator)
    if denom < 0 or (denom == 0 and n_local_scored > 0):
        raise ValueError(
            f"global_denominator={denom} but this micro-batch scores {n_local_scored} tokens: pass the SUM of "
            "num_loss_tokens() over all micro-batches of the step and all ranks (all_reduce SUM)"
        )
    return denom


@dataclass
class ScoredRows:
    """What the loss reads from the hidden states, one entry per scored token: the hidden row
    positions[k] = (b, j) of the [B, S] = `shape` hidden states predicts targets[k] with weight
    weights[k] (before the global normalisation). Sequence parallelism keeps the entries whose row
    lies in its slice (veomni/distributed/sequence_parallel.py: shard_scored_rows)."""

    positions: torch.Tensor  # [K, 2] long
    targets: torch.Tensor  # [K] long
    weights: torch.Tensor  # [K] fp32
    shape: Tuple[int, int]


class _HeadObjective:
    """Shared plumbing: model inputs, the gather of scored rows, and the chunked head + CE."""

    attn_mode: str
    block_size: int | None = None
    logit_shift: bool
    chunk_size: int

    def model_inputs(self, batch: dict, corr: Corruption) -> dict:
        """Keyword arguments for the model call (add ``loss_fn=`` yourself)."""
        if "position_ids" not in batch:
            raise KeyError("batch is missing 'position_ids' (restarting at 0 for each packed document)")
        return {
            "input_ids": corr.noisy_ids,
            "position_ids": batch["position_ids"],
            "segment_ids": batch["segment_ids"],
            "attention_mask": batch["attention_mask"],
            "attn_mode": self.attn_mode,
            "block_size": self.block_size,
        }

    def _token_weights(self, corr: Corruption) -> torch.Tensor:
        raise NotImplementedError

    def num_loss_tokens(self, corr: Corruption) -> int:
        raise NotImplementedError

    def scored_rows(self, corr: Corruption) -> ScoredRows:
        """The loss rows of this micro-batch: hidden positions, targets and per-token weights."""
        return ScoredRows(corr.loss_positions, corr.targets, self._token_weights(corr), tuple(corr.masked.shape))

    def loss_fn(self, corr: Corruption, global_denominator, rows: Optional[ScoredRows] = None) -> LossFn:
        """A callable ``(hidden [B, S, H], head_weight [V, H]) -> 0-d loss`` for this micro-batch.

        ``rows``: the loss rows to score (default ``scored_rows(corr)``; sequence parallelism passes
        the rows of its slice, and hidden is then that slice).

        It returns sum over this micro-batch's scored tokens of weight * CE, divided by
        ``global_denominator`` (the all-reduced sum of ``num_loss_tokens`` over every micro-batch
        of the step on every rank). The shares of all micro-batches and ranks add up to the
        global mean loss.

        Gradient scaling: DDP and FSDP AVERAGE gradients over the data-parallel ranks (they divide
        the summed gradient by the dp world size). The gradient of the global mean is the SUM of
        the ranks' share-gradients, so the trainer must backward ``share * dp_world_size`` (and
        must not divide by the number of micro-batches). Log the unscaled share sum.
        """
        rows = self.scored_rows(corr) if rows is None else rows
        denom = _denominator(global_denominator, rows.targets.numel())
        # Folding 1/denom into the per-token weights keeps the CE kernel a plain weighted sum.
        weights = rows.weights * (1.0 / denom if denom > 0 else 0.0)
        loss_positions, targets, batch_shape = rows.positions, rows.targets, tuple(rows.shape)
        chunk_size = self.chunk_size

        def fn(hidden: torch.Tensor, head_weight: torch.Tensor) -> torch.Tensor:
            if hidden.dim() != 3 or tuple(hidden.shape[:2]) != batch_shape:
                raise ValueError(
                    f"loss_fn expects hidden_states [B, S, H] with [B, S] = {list(batch_shape)}, got "
                    f"{tuple(hidden.shape)} (with sequence parallelism, pass the rows of this rank's slice: "
                    "loss_fn(corr, denom, rows=shard_scored_rows(...)))"
                )
            pos = loss_positions.to(hidden.device)
            rows = hidden[pos[:, 0], pos[:, 1]]  # [K, H]: the head runs only where there is a loss
            # The implementation is the model's (model.ops.linear_ce, made current by its forward).
            return linear_cross_entropy(
                rows,
                head_weight,
                targets.to(hidden.device),
                weights.to(hidden.device),
                chunk_size=chunk_size,
            )

        return fn


class _DiffusionWeighting(_HeadObjective):
    """The masked-diffusion rule for the scored tokens, shared by mdm and bd3lm: weight 1/t
    (`weighting='inv_t'`, the ELBO) or 1, over the masked or the maskable tokens."""

    weighting: str
    normalization: str

    def num_loss_tokens(self, corr: Corruption) -> int:
        return corr.n_masked if self.normalization == "masked" else corr.n_maskable

    def _token_weights(self, corr: Corruption) -> torch.Tensor:
        if self.weighting == "inv_t":
            return 1.0 / corr.loss_t.float()
        return torch.ones(corr.targets.numel(), dtype=torch.float32, device=corr.targets.device)


class MDMObjective(_DiffusionWeighting):
    """Masked-diffusion loss (the ELBO of a linear-schedule absorbing-state diffusion).

    weighting:     "inv_t" multiplies each masked token's CE by 1/t (the ELBO weight, as in
                   dllm and LLaDA); "none" is a plain mean over masked tokens (Open-dLLM's main term).
    normalization: "maskable" divides by the number of eligible tokens, masked or not (dllm);
                   "masked" divides by the number of masked tokens.
    logit_shift:   True: token i is predicted from the hidden state at i-1 (Dream / Open-dCoder,
                   the right choice for AR-initialised models); False: from position i (LLaDA).
    eps:           t ~ U(eps, 1); keeps 1/t bounded by 1/eps.
    per_document:  one t per packed document (True) or per row (False).
    attn_mode:     "bidirectional" (default) or "block_causal" with ``block_size`` (full attention
                   inside blocks of position ids, causal across). The model is trained under exactly
                   this mode; the trainer records the same mode in the exported config, so the
                   samplers decode the way the model was trained. "causal" is refused (see MDM_ATTN_MODES).
    """

    def __init__(
        self,
        *,
        mask_token_id: int,
        attn_mode: str = "bidirectional",
        block_size: int | None = None,
        weighting: str = "inv_t",
        normalization: str = "maskable",
        logit_shift: bool = True,
        eps: float = 1e-3,
        per_document: bool = True,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ):
        _check_choice("weighting", weighting, WEIGHTINGS)
        _check_choice("normalization", normalization, NORMALIZATIONS)
        if not 0.0 < eps < 1.0:
            raise ValueError(f"eps must be in (0, 1), got {eps}")
        if isinstance(mask_token_id, bool) or not isinstance(mask_token_id, int) or mask_token_id < 0:
            raise ValueError(f"mask_token_id must be a non-negative int, got {mask_token_id!r}")
        if not isinstance(chunk_size, int) or chunk_size <= 0:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        self.attn_mode, self.block_size = check_mdm_attention(attn_mode, block_size)
        self.mask_token_id = mask_token_id
        self.weighting = weighting
        self.normalization = normalization
        self.logit_shift = bool(logit_shift)
        self.eps = float(eps)
        self.per_document = bool(per_document)
        self.chunk_size = chunk_size

    def prepare(self, batch: dict, generator: torch.Generator) -> Corruption:
        if not isinstance(generator, torch.Generator):
            raise TypeError(
                "MDMObjective.prepare needs a torch.Generator: "
                "use veomni.diffusion.noise.make_generator(seed, step, rank, micro_step)"
            )
        return corrupt(
            batch,
            mask_token_id=self.mask_token_id,
            eps=self.eps,
            per_document=self.per_document,
            generator=generator,
            logit_shift=self.logit_shift,
        )


class ARObjective(_HeadObjective):
    """Causal next-token CE on every eligible token (baseline). Same interface as MDMObjective.

    Always shifted (token i from position i-1); the first token of each packed document is not
    scored, exactly as in the MDM objective, so both report losses over comparable token sets.
    Normalised by the global number of scored tokens.
    """

    attn_mode = "causal"

    def __init__(self, *, logit_shift: bool = True, chunk_size: int = DEFAULT_CHUNK_SIZE):
        if not logit_shift:
            raise ValueError(
                "ARObjective requires logit_shift=True: under causal attention an unshifted head "
                "would predict the token it already sees"
            )
        if not isinstance(chunk_size, int) or chunk_size <= 0:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        self.logit_shift = True
        self.chunk_size = chunk_size

    def prepare(self, batch: dict, generator: torch.Generator | None = None) -> Corruption:
        # generator is accepted for a uniform trainer call and unused: nothing is random here.
        return score_all(batch, logit_shift=True)

    def num_loss_tokens(self, corr: Corruption) -> int:
        return corr.n_maskable

    def _token_weights(self, corr: Corruption) -> torch.Tensor:
        return torch.ones(corr.targets.numel(), dtype=torch.float32, device=corr.targets.device)


def build_objective(name: str, **kwargs) -> _HeadObjective:
    """'mdm' -> MDMObjective, 'bd3lm' -> BD3LMObjective (veomni/diffusion/bd3lm.py), 'd3llm' ->
    D3LLMObjective (veomni/diffusion/d3llm.py), 'ar' -> ARObjective."""
    if name == "mdm":
        return MDMObjective(**kwargs)
    if name == "bd3lm":
        from veomni.diffusion.bd3lm import BD3LMObjective

        return BD3LMObjective(**kwargs)
    if name == "ar":
        return ARObjective(**kwargs)
    if name == "d3llm":  # teacher-trajectory masking (veomni/diffusion/d3llm.py)
        from veomni.diffusion.d3llm import D3LLMObjective

        return D3LLMObjective(**kwargs)
    if name == "editflow":  # insert / delete / substitute edits (veomni/diffusion/editflow/objective.py)
        from veomni.diffusion.editflow.objective import EditFlowObjective

        return EditFlowObjective(**kwargs)
    raise ValueError(f"unknown objective {name!r}; choose 'mdm' (masked diffusion), 'bd3lm' (block diffusion), "
                     "'d3llm' (teacher trajectories) or 'ar' (causal baseline)")
