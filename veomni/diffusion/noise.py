"""Forward (noising) process of the masked-diffusion objective.

t ~ U(eps, 1) is drawn per packed document (or per row) and each eligible token is replaced by
the mask token independently with probability t (the linear schedule alpha_t = 1 - t).

All randomness comes from a ``torch.Generator`` that the trainer builds with
``make_generator(seed, step, rank, micro_step)``: a run is reproducible, resumable from any step
without saving generator state, and every rank / micro-batch sees different noise.

Which tokens are eligible (may be masked, may be scored):
  * ``maskable`` is True: the data loader sets it False on padding and on SFT prompts, so prompts
    are never corrupted (Open-dLLM corrupts them although they carry no loss) and padding is
    never scored.
  * with ``logit_shift`` (token i is predicted from the hidden state at i-1, as AR-initialised
    models were trained), the FIRST token of each packed document is not eligible: its
    predecessor belongs to the previous document (or does not exist), so there is no position
    inside its own document that may predict it. It is never masked and never scored. Without
    the shift (LLaDA style, token i predicted from position i) every maskable token is eligible.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

import torch

__all__ = ["Corruption", "make_generator", "corrupt", "eligible_positions", "document_starts", "score_all"]

REQUIRED_KEYS = ("input_ids", "segment_ids", "attention_mask", "maskable")


def make_generator(
    seed: int, step: int, rank: int, micro_step: int, device: str | torch.device = "cpu"
) -> torch.Generator:
    """A torch.Generator seeded from (seed, step, rank, micro_step) through a stable 63-bit hash.

    blake2b is used instead of Python's ``hash()`` (randomised per process for str, and equal to
    the int itself for small ints, so nearby tuples would collide in structure) and instead of
    ``seed + step`` arithmetic (step 1 of rank 0 would equal step 0 of rank 1).
    """
    values = (seed, step, rank, micro_step)
    names = ("seed", "step", "rank", "micro_step")
    for name, value in zip(names, values):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"make_generator: {name} must be a non-negative int, got {value!r}")
        if value >= 2**64:
            raise ValueError(f"make_generator: {name}={value} does not fit in 64 bits")
    digest = hashlib.blake2b(struct.pack("<4Q", *values), digest_size=8).digest()
    generator = torch.Generator(device=device)
    generator.manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))
    return generator


@dataclass
class Corruption:
    """Result of the noising step for one micro-batch. All tensors live on the batch's device.

    noisy_ids        [B, S] long   model input: input_ids with masked positions = mask token
    masked           [B, S] bool   positions replaced by the mask token
    t                [B, S] float  noise level of each token's document (or row); in [eps, 1]
                                   everywhere, including on padding where it has no meaning
    eligible         [B, S] bool   positions that may be masked/scored (see module docstring)
    target_positions [K, 2] long   (b, i) of every scored token, row-major order
    loss_positions   [K, 2] long   (b, j) of the hidden state that predicts it: j = i - 1 with
                                   logit shift, j = i without
    targets          [K]    long   input_ids[b, i] of the scored tokens
    n_masked         int           masked.sum()
    n_maskable       int           eligible.sum() (the "maskable" denominator)
    """

    noisy_ids: torch.Tensor
    masked: torch.Tensor
    t: torch.Tensor
    eligible: torch.Tensor
    target_positions: torch.Tensor
    loss_positions: torch.Tensor
    targets: torch.Tensor
    n_masked: int
    n_maskable: int

    @property
    def loss_t(self) -> torch.Tensor:
        """t of each scored token, [K]."""
        return self.t[self.target_positions[:, 0], self.target_positions[:, 1]]


def _check_batch(batch: dict) -> None:
    missing = [k for k in REQUIRED_KEYS if k not in batch]
    if missing:
        raise KeyError(f"batch is missing {missing}; the objective needs {list(REQUIRED_KEYS)} (all [B, S])")
    shape = batch["input_ids"].shape
    if len(shape) != 2:
        raise ValueError(f"input_ids must be [B, S], got shape {tuple(shape)}")
    for key in REQUIRED_KEYS:
        if batch[key].shape != shape:
            raise ValueError(f"batch[{key!r}] has shape {tuple(batch[key].shape)}, expected {tuple(shape)}")
    if batch["maskable"].dtype != torch.bool:
        raise ValueError(f"batch['maskable'] must be a bool tensor, got {batch['maskable'].dtype}")
    pad_but_maskable = batch["maskable"] & ((batch["attention_mask"] == 0) | (batch["segment_ids"] == 0))
    if bool(pad_but_maskable.any()):
        raise ValueError(
            "batch['maskable'] is True on padding (attention_mask == 0 or segment_ids == 0); "
            "the data loader must set maskable=False on pads so they are never scored"
        )


def document_starts(segment_ids: torch.Tensor) -> torch.Tensor:
    """[B, S] bool: True at the first token of each packed document (and at column 0)."""
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    return starts


def eligible_positions(batch: dict, logit_shift: bool) -> torch.Tensor:
    """[B, S] bool: tokens that may be corrupted and scored (see module docstring)."""
    eligible = batch["maskable"].clone()
    if logit_shift:
        eligible &= ~document_starts(batch["segment_ids"])
    return eligible


def _positions(scored: torch.Tensor, input_ids: torch.Tensor, logit_shift: bool):
    target_positions = scored.nonzero()  # [K, 2], row-major
    loss_positions = target_positions.clone()
    if logit_shift:
        # Never reaches column -1: column 0 is a document start and therefore never eligible.
        loss_positions[:, 1] -= 1
    targets = input_ids[target_positions[:, 0], target_positions[:, 1]]
    return target_positions, loss_positions, targets


def _draw_t(batch: dict, eps: float, per_document: bool, generator: torch.Generator) -> torch.Tensor:
    segment_ids = batch["segment_ids"]
    bsz = segment_ids.shape[0]
    if per_document:
        # One draw per (row, segment id); column 0 serves padding (segment 0) and is unused.
        n_slots = int(segment_ids.max()) + 1 if segment_ids.numel() else 1
        u = torch.rand(bsz, n_slots, generator=generator, device=generator.device)
        u = u.to(segment_ids.device)
        u = u.gather(1, segment_ids)
    else:
        u = torch.rand(bsz, 1, generator=generator, device=generator.device).to(segment_ids.device)
        u = u.expand_as(segment_ids)
    return eps + (1.0 - eps) * u


def corrupt(
    batch: dict,
    mask_token_id: int,
    eps: float,
    per_document: bool,
    generator: torch.Generator,
    logit_shift: bool,
) -> Corruption:
    """Noise one micro-batch: draw t, then mask each eligible token with probability t.

    Draw order from ``generator`` (fixed, so results are reproducible): first the t values
    ([B, n_docs + 1] or [B, 1]), then one uniform per position [B, S].
    """
    _check_batch(batch)
    if not 0.0 < eps < 1.0:
        raise ValueError(f"eps must be in (0, 1), got {eps}")
    if isinstance(mask_token_id, bool) or not isinstance(mask_token_id, int) or mask_token_id < 0:
        raise ValueError(f"mask_token_id must be a non-negative int, got {mask_token_id!r}")
    input_ids = batch["input_ids"]
    real = batch["attention_mask"] != 0
    if bool(((input_ids == mask_token_id) & real).any()):
        raise ValueError(
            f"the mask token id {mask_token_id} already occurs in input_ids: the model could not tell "
            "real tokens from noise. Add a dedicated mask token to the tokenizer (and resize embeddings)."
        )
    if (batch["segment_ids"] < 0).any():
        raise ValueError("segment_ids must be >= 0 (0 = padding, documents numbered 1..n)")

    t = _draw_t(batch, eps, per_document, generator)
    r = torch.rand(input_ids.shape, generator=generator, device=generator.device).to(input_ids.device)
    eligible = eligible_positions(batch, logit_shift)
    masked = eligible & (r < t)
    noisy_ids = torch.where(masked, torch.full_like(input_ids, mask_token_id), input_ids)
    target_positions, loss_positions, targets = _positions(masked, input_ids, logit_shift)
    return Corruption(
        noisy_ids=noisy_ids,
        masked=masked,
        t=t,
        eligible=eligible,
        target_positions=target_positions,
        loss_positions=loss_positions,
        targets=targets,
        n_masked=int(masked.sum()),
        n_maskable=int(eligible.sum()),
    )


def score_all(batch: dict, logit_shift: bool = True) -> Corruption:
    """No corruption: every eligible token is scored (the autoregressive baseline's 'noise')."""
    _check_batch(batch)
    input_ids = batch["input_ids"]
    eligible = eligible_positions(batch, logit_shift)
    target_positions, loss_positions, targets = _positions(eligible, input_ids, logit_shift)
    n = int(eligible.sum())
    return Corruption(
        noisy_ids=input_ids,
        masked=torch.zeros_like(eligible),
        t=torch.ones(input_ids.shape, dtype=torch.float32, device=input_ids.device),
        eligible=eligible,
        target_positions=target_positions,
        loss_positions=loss_positions,
        targets=targets,
        n_masked=0,
        n_maskable=n,
    )
