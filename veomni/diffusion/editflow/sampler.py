"""tau-leaping sampler of an EditFlow model (Edit Flows, arXiv 2506.09018, section 3.3; dllm's EditFlowSampler).

Start from x = prompt + `init_masks` mask tokens (BOS is put in front of a prompt that does not start
with it, as in training) and t = 0. Each step of length tau, with w = kappa'(t) / (1 - kappa(t)):

  * at every position i past the frozen prompt, delete-or-substitute fires with probability
    (lambda_del + lambda_sub)(i) * w * tau, and is a deletion with probability lambda_del / (lambda_del +
    lambda_sub), else a substitution by a token from the substitute head;
  * independently, an insertion after position i (i >= prompt length - 1) fires with probability
    lambda_ins(i) * w * tau, its token drawn from the insert head;
  * all fired edits are applied at once (positions refer to the x of this step).

Tokens are the argmax (temperature 0) or drawn from softmax(logits / temperature).

Batches: rows of different lengths are right-padded into one forward; every random draw of row b comes
from its own generator (seeded by seeds[b]) in a fixed order over that row's positions only, so a row
decodes exactly as it would alone with the same seed (tested). The prompt's rates are zeroed, so it
never changes. max_length caps a row: insertions that would pass it are skipped in that step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from veomni.diffusion.editflow.flow import KappaSchedule

__all__ = ["editflow_sample", "EditFlowSample", "apply_step"]

# One row's change in one step: ("keep", tok) | ("sub", old, new) | ("del", old) | ("ins", new)
Event = Tuple


@dataclass
class EditFlowSample:
    sequences: List[List[int]]  # prompt (with BOS) + generated, per row
    prompt_lens: List[int]
    history: List[List[List[int]]] = field(default_factory=list)  # rows after each step that changed something
    stats: dict = field(default_factory=dict)


def _token(logits: torch.Tensor, temperature: float, gen: torch.Generator) -> int:
    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=gen))


def apply_step(x: List[int], prompt_len: int, rates: torch.Tensor, sub_logits: torch.Tensor,
               ins_logits: torch.Tensor, w: float, tau: float, temperature: float, gen: torch.Generator,
               max_length: int) -> Tuple[List[int], List[Event], bool]:
    """One tau-leap of one row. rates/logits: this row's [T, 3] / [T, V] (T = len(x)).
    Returns (new x, events for the live view, whether anything changed)."""
    T = len(x)
    lam = rates[:T].float().cpu() * (w * tau)
    pos = torch.arange(T)
    frozen_sd = pos < prompt_len
    lam_sub = lam[:, 0].masked_fill(frozen_sd, 0.0)
    lam_del = lam[:, 1].masked_fill(frozen_sd, 0.0)
    lam_ins = lam[:, 2].masked_fill(pos < prompt_len - 1, 0.0)
    comb = lam_sub + lam_del
    # Draw order is fixed (three uniform vectors over this row's positions): batch == one-by-one.
    u_fire = torch.rand(T, generator=gen)
    u_kind = torch.rand(T, generator=gen)
    u_ins = torch.rand(T, generator=gen)
    fire = u_fire < comb.clamp(max=1 - 1e-6)
    is_del = fire & (u_kind * comb < lam_del)
    is_sub = fire & ~is_del
    ins = u_ins < lam_ins.clamp(max=1 - 1e-6)
    out: List[int] = []
    events: List[Event] = []
    n_ins_room = max_length - (T - int(is_del.sum()))
    changed = False
    for i in range(T):
        if is_del[i]:
            events.append(("del", x[i]))
            changed = True
        elif is_sub[i]:
            new = _token(sub_logits[i], temperature, gen)
            events.append(("sub", x[i], new) if new != x[i] else ("keep", x[i]))
            changed |= new != x[i]
            out.append(new)
        else:
            events.append(("keep", x[i]))
            out.append(x[i])
        if ins[i] and n_ins_room > 0:
            new = _token(ins_logits[i], temperature, gen)
            events.append(("ins", new))
            out.append(new)
            n_ins_room -= 1
            changed = True
    return out, events, changed


def _pad(rows: Sequence[Sequence[int]], pad_id: int, device):
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, :len(r)] = torch.tensor(list(r), dtype=torch.long)
        mask[b, :len(r)] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def editflow_sample(forward: Callable, prompts: Sequence[Sequence[int]], *, bos_id: int, mask_id: int, pad_id: int,
                    seeds: Sequence[int], tau: float = 0.01, init_masks: int = 64, schedule: str = "linear",
                    max_w: float = 20.0, max_length: int = 512, time_eps: float = 1e-3, temperature: float = 0.0,
                    device="cpu", step_callback: Optional[Callable] = None,
                    output_history: bool = False) -> EditFlowSample:
    """Sample a batch. ``forward(input_ids [B, L], attention_mask [B, L]) -> EditFlowOutput`` (rates,
    sub_logits, ins_logits; veomni.models.editflow.editflow_forward(model, ...) for a model).
    ``step_callback(step, rows, events)`` is called after each step that changed a row."""
    if len(seeds) != len(prompts):
        raise ValueError(f"one seed per prompt: got {len(seeds)} seeds for {len(prompts)} prompts")
    rows, plens = [], []
    for p in prompts:
        p = [int(t) for t in p]
        if not p or p[0] != bos_id:
            p = [bos_id] + p
        if len(p) + init_masks > max_length:
            raise ValueError(f"prompt ({len(p)} tokens) + init_masks ({init_masks}) exceeds max_length={max_length}")
        plens.append(len(p))
        rows.append(p + [mask_id] * init_masks)
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    sched = KappaSchedule(schedule, max_w)
    steps = math.ceil(1.0 / tau - 1e-9)
    history = [[list(r) for r in rows]] if output_history else []
    nfe, t, last = 0, 0.0, None
    for step in range(steps):
        if last is None:  # the heads see x only (no t): unchanged rows need no new forward
            ids, mask = _pad(rows, pad_id, device)
            last = forward(ids, mask)
            nfe += 1
        w = float(sched.weight(torch.tensor([t], dtype=torch.float64))[0])
        new_rows, all_events, any_change = [], [], False
        for b, x in enumerate(rows):
            nx, events, changed = apply_step(x, plens[b], last.rates[b], last.sub_logits[b], last.ins_logits[b], w,
                                             tau, temperature, gens[b], max_length)
            new_rows.append(nx)
            all_events.append(events)
            any_change |= changed
        rows = new_rows
        if any_change:
            last = None
            if output_history:
                history.append([list(r) for r in rows])
            if step_callback is not None:
                step_callback(step + 1, rows, all_events)
        t = min(1.0, t + tau)
        if t >= 1.0 - time_eps:
            break
    stats = {"nfe": nfe, "steps": step + 1, "new_tokens": sum(len(r) - p for r, p in zip(rows, plens))}
    return EditFlowSample(sequences=rows, prompt_lens=plens, history=history, stats=stats)
