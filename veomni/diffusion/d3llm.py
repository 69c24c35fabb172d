"""d3LLM trajectory distillation (train.objective=d3llm): mask each response by a teacher's order.

Port of hao-ai-lab/d3LLM ``distill_2_training/d3llm_dream_train.py`` (forward_process_with_trajectory,
select_trajectory_by_ratio, DLMTrainer's schedules), on this framework's packed batches and global
loss normalisation. Per packed SFT document (prompt + response of n tokens):

  1. its order (veomni/diffusion/trajectory.py) is found by hashing its token ids;
  2. a mask ratio r ~ U(r_cur, r_max) is drawn, with r_cur rising linearly from r_min to r_max over
     the run (d3LLM: 0 -> 0.8, progress = step / total_steps);
  3. a response block of the current block size B is drawn uniformly (blockwise=True; else the
     whole response is the block); B follows ``block_sizes``, one entry per epoch, interpolated
     linearly inside an epoch and truncated to int (d3LLM's progressive_block_sizes);
  4. inside the block, the positions the teacher had not yet decoded after step
     ``target = block_start + int((1 - r) * block_len)`` are masked: order[j] > target (d3LLM takes
     trajectory[target], the sequence after step target, i.e. target + 1 decoded tokens);
     everything before the block stays clean, every response token after it is [MASK] (unscored),
     the prompt is never masked;
  5. with ``complementary`` a second copy of the row is scored with the block's mask inverted
     (dParallel's complementary loss); both copies run in ONE forward, stacked on the batch axis.

Loss: plain cross-entropy (no 1/t weight; d3LLM has none) over every scored token of both copies,
divided by the global number of scored tokens over micro-batches and ranks (the framework's
contract, objective.py). With the complementary copy each block token is scored exactly once, so
the loss is the mean CE over all block tokens. d3LLM instead returns (CE + CE_rev + w (H + H_rev)) / 4
with per-micro-batch means; the entropy terms are not ported (docs/recipes.md says why and what
the factor means for clipping).

Deliberate differences, all documented in docs/recipes.md: one r and one block per DOCUMENT (d3LLM:
one r per micro-batch, one block per row; same marginals); the block is drawn among the blocks that
hold a response token (d3LLM's randint(0, n // B) can pick an empty block past the end when B
divides n, a row with no loss); the response is the real one (d3LLM pads it to 256 with scored EOS).

Randomness: ``prepare`` draws from the trainer's generator (seed, step, micro-batch), in this order:
[n_docs, 2] uniforms (r, block) for the documents in row-major order, then with ``random_mask`` one
uniform per position [B, S]. Progress comes from ``set_progress(step, ...)``, called by the trainer
each step from the step number, so a resumed run continues the curriculum exactly.
"""
from __future__ import annotations

import logging
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from veomni.diffusion.noise import Corruption, _check_batch, _positions, eligible_positions
from veomni.diffusion.objective import ScoredRows, _denominator, _HeadObjective
from veomni.ops.chunked_ce import DEFAULT_CHUNK_SIZE
from veomni.ops.chunked_entropy import chunked_linear_correct_entropy

logger = logging.getLogger(__name__)

__all__ = ["D3LLMObjective", "mask_ratio_floor", "block_size_at", "trajectory_block_mask", "draw_block",
           "documents", "d3llm_objective_kwargs"]

NAIVE_EPS = 1e-3  # d3LLM's eps of the random-mask baseline: p = (1 - eps) * r + eps


def mask_ratio_floor(step: int, total_steps: int, r_min: float, r_max: float) -> float:
    """r_cur: linear from r_min (step 0) to r_max (step total_steps); d3LLM's get_current_mask_ratio."""
    if total_steps <= 0:
        return r_min
    progress = min(step / total_steps, 1.0)
    return r_min + progress * (r_max - r_min)


def block_size_at(step: int, steps_per_epoch: Optional[float], sizes: Sequence[int]) -> int:
    """Block size at ``step``: ``sizes[e]`` at the start of epoch e, linear to ``sizes[e+1]`` across it,
    the last entry from then on, truncated to int (d3LLM's get_current_block_size)."""
    if len(sizes) == 1:
        return int(sizes[0])
    if not steps_per_epoch:
        raise ValueError(f"block_sizes={list(sizes)} changes per epoch, but this run has no epoch length "
                         "(streaming data): give one block size")
    epoch = step / steps_per_epoch
    idx = min(int(epoch), len(sizes) - 1)
    start = sizes[idx]
    if idx >= len(sizes) - 1:
        return int(start)
    return int(start + (epoch - idx) * (sizes[idx + 1] - start))


def draw_block(u: float, n: int, block_size: int) -> Tuple[int, int]:
    """[start, end) of the response block picked by uniform ``u``: one of the ceil(n / B) blocks that
    hold a response token (the last one may be shorter)."""
    n_blocks = -(-n // block_size)
    k = min(int(u * n_blocks), n_blocks - 1)
    return k * block_size, min((k + 1) * block_size, n)


def trajectory_block_mask(order: np.ndarray, start: int, end: int, r: float) -> np.ndarray:
    """[end - start] bool: block positions the teacher had not decoded after step
    ``start + int((1 - r) * (end - start))`` (d3LLM's select_trajectory_by_ratio + ``== mask``)."""
    target = start + int((1.0 - r) * (end - start))
    return np.asarray(order[start:end]) > target


def documents(segment_ids: np.ndarray, maskable: np.ndarray) -> List[Tuple[int, int, int, int]]:
    """(row, doc start, response start, doc end) of every packed document with a response, row-major.

    The response is the maskable tail of the document (SFT rows: prompt False, response True); a
    maskable pattern that is not one tail is an error (not SFT data)."""
    out = []
    for b in range(segment_ids.shape[0]):
        seg = segment_ids[b]
        edges = np.flatnonzero(np.diff(seg) != 0) + 1
        bounds = np.concatenate([[0], edges, [len(seg)]])
        for a, e in zip(bounds[:-1], bounds[1:]):
            if seg[a] == 0:
                continue  # padding
            m = maskable[b, a:e]
            resp = np.flatnonzero(m)
            if resp.size == 0:
                continue
            p = int(resp[0])
            if not bool(m[p:].all()):
                raise ValueError(f"row {b}, tokens {a}..{e}: the maskable tokens are not one response tail; "
                                 "train.objective=d3llm needs SFT data (data.data_type=sft)")
            out.append((b, int(a), int(a) + p, int(e)))
    return out


class D3LLMObjective(_HeadObjective):
    """Trajectory-masked block loss (see the module docstring). Same interface as MDMObjective, plus
    ``set_progress(step, total_steps, steps_per_epoch)`` and ``progress_metrics()``.

    store:            a TrajectoryStore (None only with random_mask=True)
    min/max_mask_ratio: r_cur runs from min to max over the run; r ~ U(r_cur, max)  (d3LLM 0.0, 0.8)
    block_sizes:      block size per epoch, interpolated (d3LLM Dream [16, 24, 32])
    blockwise:        one block per document (True, d3LLM's use_blockwise_loss) or the whole response
    complementary:    also score the inverted block mask (a second copy of each row, same forward)
    random_mask:      d3LLM's naive baseline: the block is masked at random with p = (1-1e-3) r + 1e-3
                      instead of by the order (no store needed)
    """

    def __init__(self, *, mask_token_id: int, store=None, attn_mode: str = "bidirectional",
                 block_size: Optional[int] = None, logit_shift: bool = True, min_mask_ratio: float = 0.0,
                 max_mask_ratio: float = 0.8, block_sizes: Sequence[int] = (32,), blockwise: bool = True,
                 complementary: bool = True, random_mask: bool = False, entropy_weight: float = 0.0,
                 entropy_temperature: float = 0.5, chunk_size: int = DEFAULT_CHUNK_SIZE):
        if attn_mode != "bidirectional" or block_size is not None:
            raise ValueError(f"train.objective=d3llm trains a bidirectional model (d3LLM's Dream/LLaDA); got "
                             f"attn_mode={attn_mode!r}, block_size={block_size!r}. Set model.attn_mode=bidirectional")
        if isinstance(mask_token_id, bool) or not isinstance(mask_token_id, int) or mask_token_id < 0:
            raise ValueError(f"mask_token_id must be a non-negative int, got {mask_token_id!r}")
        if not 0.0 <= min_mask_ratio <= max_mask_ratio <= 1.0:
            raise ValueError(f"need 0 <= min_mask_ratio <= max_mask_ratio <= 1, got {min_mask_ratio}, {max_mask_ratio}")
        sizes = list(block_sizes)
        if not sizes or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sizes):
            raise ValueError(f"block_sizes must be a non-empty list of positive ints, got {block_sizes!r}")
        if store is None and not random_mask:
            raise ValueError("D3LLMObjective needs a trajectory store (data.trajectory_path), or random_mask=True")
        if not isinstance(chunk_size, int) or chunk_size <= 0:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        if entropy_weight < 0 or not entropy_temperature > 0:
            raise ValueError(f"need entropy_weight >= 0 and entropy_temperature > 0, got {entropy_weight}, "
                             f"{entropy_temperature}")
        self.entropy_weight, self.entropy_temperature = float(entropy_weight), float(entropy_temperature)
        self.attn_mode, self.block_size = attn_mode, None
        self.mask_token_id = mask_token_id
        self.store = store
        self.logit_shift = bool(logit_shift)
        self.min_mask_ratio, self.max_mask_ratio = float(min_mask_ratio), float(max_mask_ratio)
        self.block_sizes = sizes
        self.blockwise = bool(blockwise)
        self.complementary = bool(complementary)
        self.random_mask = bool(random_mask)
        self.chunk_size = chunk_size
        # Copies of each row in the forward: the trainer scales FLOPs (and MoE token counts) by it.
        self.passes = 2 if self.complementary else 1
        # The state of step 0 until the trainer calls set_progress.
        self.r_floor = self.min_mask_ratio
        self.current_block_size = sizes[0] if self.blockwise else None

    # ------------------------------------------------------------------ curriculum
    def set_progress(self, step: int, total_steps: int, steps_per_epoch: Optional[float]) -> None:
        """Curriculum state for the next ``prepare`` calls, derived from the step number alone."""
        self.r_floor = mask_ratio_floor(step, total_steps, self.min_mask_ratio, self.max_mask_ratio)
        self.current_block_size = (block_size_at(step, steps_per_epoch, self.block_sizes)
                                   if self.blockwise else None)

    def progress_metrics(self) -> dict:
        out = {"mask_ratio_floor": self.r_floor}
        if self.current_block_size is not None:
            out["block_size"] = self.current_block_size
        return out

    # ------------------------------------------------------------------ noising
    def _order(self, ids: np.ndarray, n: int, where: str) -> np.ndarray:
        order = self.store.lookup(ids)
        if order is None:
            raise KeyError(
                f"no trajectory for the training document at {where} ({len(ids)} tokens, {n} in the response, "
                f"first ids {ids[:8].tolist()}) in {self.store.describe()}. Run scripts/precompute_trajectories.py "
                "on this data (train and eval files) with the training tokenizer and the same --max_seq_len as "
                "data.max_seq_len, into data.trajectory_path.")
        if len(order) != n:
            raise ValueError(f"trajectory for the document at {where} covers {len(order)} response tokens, the "
                             f"document has {n}: the store was computed for other data; recompute it")
        return order

    def prepare(self, batch: dict, generator: torch.Generator) -> Corruption:
        if not isinstance(generator, torch.Generator):
            raise TypeError("D3LLMObjective.prepare needs a torch.Generator: "
                            "use veomni.diffusion.noise.make_generator(seed, step, rank, micro_step)")
        _check_batch(batch)
        input_ids = batch["input_ids"]
        real = batch["attention_mask"] != 0
        if bool(((input_ids == self.mask_token_id) & real).any()):
            raise ValueError(f"the mask token id {self.mask_token_id} already occurs in input_ids: add a dedicated "
                             "mask token to the tokenizer (and resize embeddings)")
        dev = input_ids.device
        ids_np = input_ids.cpu().numpy()
        docs = documents(batch["segment_ids"].cpu().numpy(), batch["maskable"].cpu().numpy())
        u = torch.rand(len(docs), 2, generator=generator, device=generator.device, dtype=torch.float64).cpu().numpy()
        noise = None
        if self.random_mask:
            noise = torch.rand(input_ids.shape, generator=generator, device=generator.device).cpu().numpy()
        shape = tuple(input_ids.shape)
        traj = np.zeros(shape, dtype=bool)  # block positions masked in the first copy
        block = np.zeros(shape, dtype=bool)
        future = np.zeros(shape, dtype=bool)
        ratio = np.ones(shape, dtype=np.float32)
        r_lo, r_hi = self.r_floor, self.max_mask_ratio
        for d, (b, a, p, e) in enumerate(docs):
            n = e - p
            r = r_lo + float(u[d, 0]) * (r_hi - r_lo)
            s0, s1 = draw_block(float(u[d, 1]), n, self.current_block_size) if self.blockwise else (0, n)
            if self.random_mask:
                seg = noise[b, p + s0:p + s1] < (1 - NAIVE_EPS) * r + NAIVE_EPS
            else:
                seg = trajectory_block_mask(self._order(ids_np[b, a:e], n, f"row {b}, tokens {a}..{e}"), s0, s1, r)
            traj[b, p + s0:p + s1] = seg
            block[b, p + s0:p + s1] = True
            future[b, p + s1:e] = True
            ratio[b, a:e] = r
        eligible = eligible_positions(batch, self.logit_shift)
        block_t, traj_t = torch.from_numpy(block).to(dev), torch.from_numpy(traj).to(dev)
        future_t = torch.from_numpy(future).to(dev)
        copies = [block_t & traj_t & eligible]
        if self.complementary:
            copies.append(block_t & ~traj_t & eligible)
        masked = torch.cat(copies)
        ids = input_ids.repeat(self.passes, 1)
        hidden = masked | future_t.repeat(self.passes, 1)
        noisy = torch.where(hidden, torch.full_like(ids, self.mask_token_id), ids)
        target_positions, loss_positions, targets = _positions(masked, ids, self.logit_shift)
        # t holds each document's mask ratio r (1 elsewhere); nothing here weights by it.
        return Corruption(noisy_ids=noisy, masked=masked, t=torch.from_numpy(ratio).to(dev).repeat(self.passes, 1),
                          eligible=eligible.repeat(self.passes, 1), target_positions=target_positions,
                          loss_positions=loss_positions, targets=targets, n_masked=int(masked.sum()),
                          n_maskable=int(eligible.sum()) * self.passes)

    def model_inputs(self, batch: dict, corr: Corruption) -> dict:
        inputs = super().model_inputs(batch, corr)
        if self.passes > 1:  # the complementary copy shares the rows' positions and segments
            for key in ("position_ids", "segment_ids", "attention_mask"):
                inputs[key] = inputs[key].repeat(self.passes, 1)
        return inputs

    def num_loss_tokens(self, corr: Corruption) -> int:
        return corr.n_masked

    def _token_weights(self, corr: Corruption) -> torch.Tensor:
        return torch.ones(corr.targets.numel(), dtype=torch.float32, device=corr.targets.device)

    def loss_fn(self, corr: Corruption, global_denominator, rows: Optional[ScoredRows] = None):
        """CE share as every objective's, plus with entropy_weight > 0 the certainty term:
        entropy_weight * sum over scored tokens predicted correctly (argmax) of the entropy of
        softmax(logits / entropy_temperature), over the same global denominator."""
        ce = super().loss_fn(corr, global_denominator, rows=rows)
        if not self.entropy_weight:
            return ce
        rows = self.scored_rows(corr) if rows is None else rows
        denom = _denominator(global_denominator, rows.targets.numel())
        weights = rows.weights * (self.entropy_weight / denom if denom > 0 else 0.0)
        positions, targets = rows.positions, rows.targets
        temperature, chunk_size = self.entropy_temperature, self.chunk_size

        def fn(hidden: torch.Tensor, head_weight: torch.Tensor) -> torch.Tensor:
            loss = ce(hidden, head_weight)  # checks the hidden shape
            pos = positions.to(hidden.device)
            return loss + chunked_linear_correct_entropy(hidden[pos[:, 0], pos[:, 1]], head_weight,
                                                         targets.to(hidden.device), weights.to(hidden.device),
                                                         temperature, chunk_size)

        return fn


def d3llm_objective_kwargs(args, mask_token_id: int) -> dict:
    """D3LLMObjective keyword arguments from the run config (the store is loaded here)."""
    d = args.train.d3llm
    store = None
    if not d.random_mask:
        from veomni.diffusion.trajectory import TrajectoryStore

        store = TrajectoryStore(args.data.trajectory_path)
        man = store.manifest
        logger.info("d3llm: %s", store.describe())
        if man.get("max_seq_len") not in (None, args.data.max_seq_len):
            logger.warning("d3llm: the trajectories were computed with max_seq_len=%s, training uses "
                           "data.max_seq_len=%d: examples truncated differently will have no trajectory",
                           man.get("max_seq_len"), args.data.max_seq_len)
    return dict(mask_token_id=mask_token_id, store=store, attn_mode=args.model.attn_mode,
                block_size=args.model.block_size, logit_shift=args.train.logit_shift,
                min_mask_ratio=d.min_mask_ratio, max_mask_ratio=d.max_mask_ratio, block_sizes=list(d.block_sizes),
                blockwise=d.blockwise, complementary=d.complementary, random_mask=d.random_mask,
                entropy_weight=d.entropy_weight, entropy_temperature=d.entropy_temperature,
                chunk_size=args.train.ce_chunk_size)
