"""The state every sampler shares: the row being decoded, model calls (cache, CFG, shift), history.

A row is laid out as [prompt (left-padded) | n_gen generated positions | optional suffix (infill,
right-padded)]. Positions follow the padding: position = cumsum(attention_mask) - 1, clamped at 0,
so a left-padded row is computed exactly as the same row without padding.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from veomni.diffusion.sampling.cache import WindowedKVCache, attention_block_end, attention_block_start
from veomni.diffusion.sampling.config import GenerationConfig
from veomni.diffusion.sampling.utils import make_generators, propose


@dataclass
class GenerationOutput:
    """sequences [B, P+N] (prompt as given + generated tokens, everything after the first EOS set
    to pad_token_id); history: x after each step ([B, P+N] CPU tensors, masks included, before EOS
    trimming) or None; stats: nfe, tokens_per_forward, wall_time_s, new_tokens, steps."""

    sequences: torch.Tensor
    history: Optional[List[torch.Tensor]] = None
    stats: Dict[str, float] = field(default_factory=dict)
    prompt_len: int = 0
    config: Optional[GenerationConfig] = None

    def __getitem__(self, key):  # HF-style `out["sequences"]`
        return getattr(self, key)


def _model_device(model) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


class DecodeState:
    def __init__(self, model, cfg: GenerationConfig, prompt_ids: torch.Tensor,
                 prompt_mask: Optional[torch.Tensor], n_gen: int, suffix_ids: Optional[torch.Tensor] = None,
                 suffix_mask: Optional[torch.Tensor] = None, handle_eos: bool = True):
        self.model, self.cfg = model, cfg
        self.t_start = time.perf_counter()
        dev = _model_device(model)
        prompt_ids = _as_2d(prompt_ids, "input_ids").to(dev)
        bsz, plen = prompt_ids.shape
        prompt_mask = _check_mask(prompt_mask, prompt_ids, "attention_mask")
        if cfg.logit_shift and plen == 0:
            raise ValueError("logit_shift=True reads the first new token from the last prompt position: "
                             "the prompt must hold at least one token.")
        if plen and not bool(prompt_mask[:, -1].all()):
            raise ValueError("attention_mask must be left-padded (zeros on the left): a row ends with "
                             "padding, which would sit between its prompt and the generated tokens.")
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        if vocab is not None and cfg.mask_token_id >= vocab:
            raise ValueError(f"mask_token_id={cfg.mask_token_id} is outside the vocabulary ({vocab}).")
        self.mask_id = cfg.mask_token_id
        parts = [prompt_ids, torch.full((bsz, n_gen), self.mask_id, dtype=torch.long, device=dev)]
        valid = [prompt_mask, torch.ones(bsz, n_gen, dtype=torch.bool, device=dev)]
        if suffix_ids is not None:
            suffix_ids = _as_2d(suffix_ids, "suffix_ids").to(dev)
            suffix_mask = _check_mask(suffix_mask, suffix_ids, "suffix_attention_mask")
            if suffix_ids.shape[1] and not bool(suffix_mask[:, 0].all()):
                raise ValueError("suffix_attention_mask must be right-padded (zeros on the right).")
            parts.append(suffix_ids)
            valid.append(suffix_mask)
        self.x = torch.cat(parts, dim=1)
        self.valid = torch.cat(valid, dim=1)
        self.bsz, self.T = self.x.shape
        self.g0, self.g1 = plen, plen + n_gen
        self.device = dev
        self.idx = torch.arange(self.T, device=dev)
        self.pos = (self.valid.long().cumsum(1) - 1).clamp_min(0)
        self.is_gen = (self.idx >= self.g0) & (self.idx < self.g1)
        self.condition = self.valid & ~self.is_gen  # what CFG's unconditional pass masks out
        self.shift = 1 if cfg.logit_shift else 0
        self.eos = torch.tensor(cfg.eos_token_id if handle_eos else [], dtype=torch.long, device=dev)
        self.stop_at_eos = bool(cfg.stop_at_eos) and handle_eos and self.eos.numel() > 0
        self.done = torch.zeros(self.bsz, dtype=torch.bool, device=dev)
        self._generators = None  # made on first use: greedy runs never touch torch's global RNG
        self.step_callback = None
        self.nfe, self.steps = 0, 0
        self.history: Optional[List[torch.Tensor]] = [] if cfg.output_history else None
        self.cache = self.uncond_cache = None
        if cfg.use_cache != "none":
            self.cache = WindowedKVCache(self.T)
            if cfg.cfg_scale > 0:
                self.uncond_cache = WindowedKVCache(self.T)

    @property
    def generators(self):
        if self._generators is None:
            self._generators = make_generators(self.cfg.seed, self.bsz, self.device)
        return self._generators

    # ---- views ------------------------------------------------------------------------------
    def masked(self) -> torch.Tensor:
        """[B, T] bool: generated positions still masked, in rows that have not stopped."""
        return (self.x == self.mask_id) & self.is_gen & ~self.done[:, None]

    def block_ids(self, block_length: int) -> torch.Tensor:
        """[B, T] decode-block id of each generated position (-1 elsewhere). Blocks count from the
        first generated token, except for block_causal models, where they follow the model's own
        position blocks (first and last block may be partial) so that a finished block is a finished
        attention block — what makes the block cache exact."""
        if self.cfg.attn_mode == "block_causal":
            first = self.pos[:, self.g0:self.g0 + 1]
            blocks = lambda p: torch.div(p, block_length, rounding_mode="floor")  # noqa: E731
            rel = blocks(self.pos) - blocks(first)
        else:
            rel = torch.div(self.idx - self.g0, block_length, rounding_mode="floor").expand(self.bsz, -1)
        return torch.where(self.is_gen, rel, torch.full_like(rel, -1))

    def cache_boundary(self, first_masked: torch.Tensor, block_start: torch.Tensor) -> torch.Tensor:
        """Index from which a row's cached keys are not final: the attention block holding its first
        masked position (block_causal), else the decode block holding it."""
        if self.cfg.attn_mode == "block_causal":
            p = self.pos.gather(1, first_masked.clamp(0, self.T - 1)[:, None])[:, 0]
            return attention_block_start(first_masked, p, self.cfg.block_size)
        return block_start

    def attention_block_end(self, index: torch.Tensor) -> torch.Tensor:
        p = self.pos.gather(1, index.clamp(0, self.T - 1)[:, None])[:, 0]
        return attention_block_end(index, p, self.cfg.block_size, self.T)

    # ---- the model call -----------------------------------------------------------------------
    def logits(self, start: int, end: int, lo: Optional[torch.Tensor] = None, hi: Optional[torch.Tensor] = None,
               present: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits [B, end-start, V] for row positions [start, end) (shift and CFG applied).

        lo/hi [B]: the cache write window of each row (ignored without a cache; an empty window
        lo >= hi writes nothing). present [B, T]: positions that exist yet (multi_block appends
        blocks); absent ones are hidden from attention as padding.
        """
        s = self.shift
        valid = self.valid if present is None else self.valid & present
        if self.cache is None:
            q0 = 0
            q1 = self.T if present is None else int((self.idx + 1).masked_fill(~present, 0).max())
            q1 = max(q1, end - s)
            amask = valid[:, :q1]
            kw = dict(attention_mask=None if bool(amask.all()) else amask)
        else:
            active = lo < hi
            q0, q1 = start - s, end - s
            if bool(active.any()):
                q0, q1 = min(q0, int(lo[active].min())), max(q1, int(hi[active].max()))
            kw = dict(attention_mask=valid, cache_position=torch.arange(q0, q1, device=self.device))
        keep = torch.arange(start - s, end - s, device=self.device) - q0
        for cache in (self.cache, self.uncond_cache):
            if cache is not None:
                cache.begin(q0, q1, lo, hi)
        out = self._call(self.x, q0, q1, keep, kw, self.cache)
        if self.cfg.cfg_scale > 0:
            un_x = self.x.masked_fill(self.condition, self.mask_id)
            un = self._call(un_x, q0, q1, keep, kw, self.uncond_cache)
            out = un + (self.cfg.cfg_scale + 1) * (out - un)
        if out.shape[-1] <= self.mask_id:
            raise ValueError(f"mask_token_id={self.mask_id} is outside the model's logits ({out.shape[-1]}).")
        return out

    def _call(self, x, q0, q1, keep, kw, cache):
        out = self.model(
            x[:, q0:q1], position_ids=self.pos[:, q0:q1], attn_mode=self.cfg.attn_mode,
            block_size=self.cfg.block_size, past_key_values=cache, logits_to_keep=keep, **kw,
        )
        self.nfe += 1
        logits = out["logits"] if isinstance(out, dict) else out.logits
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        return logits

    # ---- sampling & bookkeeping ----------------------------------------------------------------
    def propose(self, logits, eligible, measure="prob"):
        c = self.cfg
        return propose(logits, eligible, temperature=c.temperature, top_p=c.top_p, top_k=c.top_k,
                       measure=measure, generators=lambda: self.generators, banned_token=self.mask_id)

    def commit(self, select: torch.Tensor, x0: torch.Tensor, start: int) -> None:
        """Write x0 where `select` ([B, R] for positions [start, start+R)); generated positions only."""
        r = select.shape[1]
        select = select & self.is_gen[start:start + r]
        window = self.x[:, start:start + r]
        self.x[:, start:start + r] = torch.where(select, x0, window)

    def end_step(self, check_eos: bool = True) -> None:
        self.steps += 1
        if self.history is not None:
            self.history.append(self.x.detach().clone().cpu())
        if self.step_callback is not None:
            self.step_callback(self.steps, self.x)
        if check_eos and self.stop_at_eos:
            self.done |= self.eos_finished()

    def first_eos(self) -> torch.Tensor:
        """[B] index of the first EOS among generated positions (T when none)."""
        is_eos = torch.isin(self.x, self.eos) & self.is_gen
        return torch.where(is_eos, self.idx, torch.full_like(self.idx, self.T)).min(1).values

    def eos_finished(self) -> torch.Tensor:
        """Rows with an EOS committed and every generated position before it decoded."""
        first = self.first_eos()
        masked_before = ((self.x == self.mask_id) & self.is_gen & (self.idx < first[:, None])).any(1)
        return (first < self.T) & ~masked_before

    def finish(self, trim_eos: bool = True) -> GenerationOutput:
        gen = self.x[:, self.g0:self.g1]
        n_gen = self.g1 - self.g0
        first = self.first_eos() - self.g0 if self.eos.numel() else torch.full((self.bsz,), n_gen, device=self.device)
        after = torch.arange(gen.shape[1], device=self.device)[None] > first[:, None]
        left = (gen == self.mask_id) & ~after
        if bool(left.any()):
            raise RuntimeError(f"internal: {int(left.sum())} generated positions are still masked "
                               f"after alg={self.cfg.alg!r}; please report this with the config.")
        if trim_eos and self.eos.numel():
            self.x[:, self.g0:self.g1] = gen.masked_fill(after, self.cfg.pad_token_id)
        new_tokens = int((~after).sum())
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        stats = dict(nfe=self.nfe, steps=self.steps, new_tokens=new_tokens,
                     tokens_per_forward=new_tokens / max(self.nfe, 1),
                     wall_time_s=time.perf_counter() - self.t_start)
        return GenerationOutput(sequences=self.x, history=self.history, stats=stats,
                                prompt_len=self.g0, config=self.cfg)


def _as_2d(ids, name) -> torch.Tensor:
    ids = torch.as_tensor(ids)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.dtype not in (torch.long, torch.int, torch.int32, torch.int64):
        raise ValueError(f"{name} must be an integer tensor [B, L] (got {tuple(ids.shape)}, {ids.dtype})")
    return ids.long()


def _check_mask(mask, ids, name) -> torch.Tensor:
    if mask is None:
        return torch.ones_like(ids, dtype=torch.bool)
    mask = torch.as_tensor(mask).to(ids.device)
    if mask.dim() == 1:
        mask = mask[None]
    if mask.shape != ids.shape:
        raise ValueError(f"{name} shape {tuple(mask.shape)} != ids shape {tuple(ids.shape)}")
    return mask.bool()
