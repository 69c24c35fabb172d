"""Block-diffusion training (BD3-LM; dllm's "A2D bd3lm"; Fast-dLLM v2): `train.objective=bd3lm`.

A block-causal diffusion LM generates block by block: each block is denoised from the CLEAN blocks
before it. Training a single noisy row under the plain block-causal mask would instead condition
every block on noisy earlier blocks, which the sampler never shows it. So each training row is fed
twice, as [x_t ; x_0] (2S tokens, the same position ids twice), under the two-stream mask of
veomni/ops/attention.py:

    noisy block b  -> itself (bidirectional) and clean blocks < b
    clean block b  -> clean blocks <= b (block-causal: the history the noisy blocks read)

and the loss is taken on the noisy half only. Blocks follow position ids (position // block_size),
so they restart with every packed document; segment ids keep documents apart in both halves.

Noise (choices of the references, all options here):
  * t per block (BD3-LM, Fast-dLLM v2; `t_per_block=True`, the default) or per document;
    t ~ U(eps, 1) and each eligible token is masked with probability t.
  * complementary masks (Fast-dLLM v2, `complementary=True`): every row is added a second time with
    the eligible tokens it did not mask masked and the masked ones clean, on the batch axis, so each
    eligible token is scored exactly once per row pair. The copy's masking rate is 1 - t (clamped at
    eps for the 1/t weight).
  * logit shift (AR-initialised models, kept as in MDM): token i is scored from the noisy-stream
    hidden state at i - 1, as Fast-dLLM v2's shifted causal-LM loss does; the first token of a
    document is never eligible. Without the shift token i is scored at i (LLaDA style).
  * weighting `inv_t` (the ELBO: each block's masked tokens weighted by 1/t of their block; BD3-LM)
    or `none` (Fast-dLLM v2's plain CE); normalisation by masked or maskable tokens, as MDM.
SFT prompts are never masked (maskable is False there) and sit clean in both halves.

At inference a model trained this way is a block_causal model: the samplers decode it block by block
over one stream, with the exact block KV cache (docs/inference.md).
"""
from __future__ import annotations

import torch

from veomni.diffusion.noise import Corruption, _check_batch, eligible_positions
from veomni.diffusion.objective import NORMALIZATIONS, WEIGHTINGS, ScoredRows, _check_choice, _DiffusionWeighting
from veomni.ops.chunked_ce import DEFAULT_CHUNK_SIZE

__all__ = ["BD3LMObjective", "block_noise_levels"]


def block_noise_levels(batch: dict, block_size: int, eps: float, per_block: bool,
                       generator: torch.Generator) -> torch.Tensor:
    """[B, S] t of every token: one draw per (row, document, block) or per (row, document).

    Draw order (fixed, for reproducibility): one uniform per slot of [B, n_slots], slot =
    segment * (max block + 1) + block (block 0 everywhere without per_block); slot 0 is padding."""
    seg = batch["segment_ids"].long()
    block = torch.div(batch["position_ids"].long(), block_size, rounding_mode="floor").clamp(min=0)
    if not per_block:
        block = torch.zeros_like(block)
    span = int(block.max()) + 1 if block.numel() else 1
    slot = seg * span + block
    n_slots = int(slot.max()) + 1 if slot.numel() else 1
    u = torch.rand(seg.shape[0], n_slots, generator=generator, device=generator.device).to(seg.device)
    return eps + (1.0 - eps) * u.gather(1, slot)


class BD3LMObjective(_DiffusionWeighting):
    """Same interface as MDMObjective (prepare, num_loss_tokens, model_inputs, scored_rows, loss_fn);
    the model inputs are the two-stream rows and the loss rows lie in the noisy half."""

    attn_mode = "block_causal"
    streams = 2  # each data token is computed twice (FLOPs)

    def __init__(self, *, mask_token_id: int, block_size: int, weighting: str = "inv_t",
                 normalization: str = "maskable", logit_shift: bool = True, eps: float = 1e-3,
                 t_per_block: bool = True, complementary: bool = False, chunk_size: int = DEFAULT_CHUNK_SIZE):
        _check_choice("weighting", weighting, WEIGHTINGS)
        _check_choice("normalization", normalization, NORMALIZATIONS)
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"bd3lm needs a positive int block_size (model.block_size), got {block_size!r}")
        if not 0.0 < eps < 1.0:
            raise ValueError(f"eps must be in (0, 1), got {eps}")
        if isinstance(mask_token_id, bool) or not isinstance(mask_token_id, int) or mask_token_id < 0:
            raise ValueError(f"mask_token_id must be a non-negative int, got {mask_token_id!r}")
        if not isinstance(chunk_size, int) or chunk_size <= 0:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        self.mask_token_id, self.block_size = mask_token_id, block_size
        self.weighting, self.normalization = weighting, normalization
        self.logit_shift, self.eps = bool(logit_shift), float(eps)
        self.t_per_block, self.complementary = bool(t_per_block), bool(complementary)
        self.chunk_size = chunk_size

    # ---- noise --------------------------------------------------------------------------------
    def prepare(self, batch: dict, generator: torch.Generator) -> Corruption:
        """Draw order: the block noise levels, then one uniform per position [B, S]."""
        if not isinstance(generator, torch.Generator):
            raise TypeError("BD3LMObjective.prepare needs a torch.Generator (veomni.diffusion.noise.make_generator)")
        _check_batch(batch)
        ids = batch["input_ids"]
        if bool(((ids == self.mask_token_id) & (batch["attention_mask"] != 0)).any()):
            raise ValueError(f"the mask token id {self.mask_token_id} already occurs in input_ids: add a dedicated "
                             "mask token to the tokenizer (and resize embeddings).")
        t = block_noise_levels(batch, self.block_size, self.eps, self.t_per_block, generator)
        r = torch.rand(ids.shape, generator=generator, device=generator.device).to(ids.device)
        eligible = eligible_positions(batch, self.logit_shift)
        masked = eligible & (r < t)
        if self.complementary:
            # The second copy masks exactly what the first left clean; its rate is 1 - t.
            masked = torch.cat([masked, eligible & ~masked])
            t = torch.cat([t, (1.0 - t).clamp(min=self.eps)])
            eligible = torch.cat([eligible, eligible])
            ids = torch.cat([ids, ids])
        noisy = torch.where(masked, torch.full_like(ids, self.mask_token_id), ids)
        target = masked.nonzero()
        loss = target.clone()
        if self.logit_shift:
            loss[:, 1] -= 1  # the noisy-stream row before it (same document: starts are not eligible)
        return Corruption(noisy_ids=noisy, masked=masked, t=t, eligible=eligible, target_positions=target,
                          loss_positions=loss, targets=ids[target[:, 0], target[:, 1]],
                          n_masked=int(masked.sum()), n_maskable=int(eligible.sum()))

    # ---- the two-stream rows ------------------------------------------------------------------
    def model_inputs(self, batch: dict, corr: Corruption) -> dict:
        """[x_t ; x_0] rows: 2S tokens, position/segment ids and padding repeated, clean_stream on
        the second half (rows repeated when complementary copies doubled the batch)."""
        if "position_ids" not in batch:
            raise KeyError("batch is missing 'position_ids' (restarting at 0 for each packed document)")
        reps = corr.noisy_ids.shape[0] // batch["input_ids"].shape[0]

        def rows(x):
            return x.repeat(reps, 1) if reps > 1 else x

        clean_ids = rows(batch["input_ids"])
        twice = {k: torch.cat([rows(batch[k])] * 2, dim=1) for k in ("position_ids", "segment_ids", "attention_mask")}
        clean = torch.zeros_like(clean_ids, dtype=torch.bool)
        return {"input_ids": torch.cat([corr.noisy_ids, clean_ids], dim=1), **twice,
                "clean_stream": torch.cat([clean, ~clean], dim=1),
                "attn_mode": self.attn_mode, "block_size": self.block_size}

    def scored_rows(self, corr: Corruption) -> ScoredRows:
        bsz, slen = corr.masked.shape
        return ScoredRows(corr.loss_positions, corr.targets, self._token_weights(corr), (bsz, 2 * slen))
