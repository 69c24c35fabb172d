"""`train.objective=editflow`: the Edit Flows training loss (arXiv 2506.09018; dllm's EditFlowTrainer).

Same interface as the masked-diffusion objective (veomni/diffusion/objective.py), so the trainer's
step, global denominators, metrics, checkpoints and exact resume are shared:

    corr  = objective.prepare(batch, generator)   # x1 -> x0, alignment, t, z_t, x_t, edits
    share = model(**objective.model_inputs(batch, corr), loss_fn=objective.loss_fn(corr, denom)).loss

Per sequence b (x1 = BOS + text, or prompt + response; the prefix P is frozen):
  1. x0 = x1[:P] + sampler(x1[P:]) with sampler `masks:N` or `empty`;
  2. (z0, z1) = Needleman-Wunsch alignment of the tails, prefix columns as matches;
  3. t ~ U[0, 1 - eps), each column of z_t taken from z1 with probability kappa(t), x_t = z_t minus blanks;
  4. loss_b = w(t) * [ sum of the rates the sampler can fire at x_t
                       - sum over the remaining edits e of (log lambda_e + log Q_e(token)) ] / |x1_b|
     with w = kappa'(t) / (1 - kappa(t)) clamped at max_w; the batch loss is the mean over sequences
     (the trainer's global denominator counts sequences, over micro-batches and ranks).

Choices, and how they differ from dllm:
  * The rates "the sampler can fire" exclude the frozen prefix: no substitute/delete rate at
    positions < P and no insert rate before position P - 1 (the sampler zeroes them). dllm also sums
    those, which only pushes them towards zero.
  * The constant w * log w of log(w * lambda) is dropped, as dllm does (no gradient).
  * Token log-probabilities come from the chunked head + CE kernel on the edit rows only: the
    [B, L, V] logits never exist.
  * Padded variable-length rows, one document per row (data.packing=false): a packed row would need
    per-document alignment and x_t re-packing, and is refused.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

import torch

from veomni.diffusion.editflow.align import BLANK, align
from veomni.diffusion.editflow.flow import Edits, KappaSchedule, X0Sampler, remaining_edits, sample_zt, strip_rows
from veomni.ops.chunked_ce import DEFAULT_CHUNK_SIZE, chunked_linear_cross_entropy

__all__ = ["EditFlowObjective", "EditFlowBatch", "split_rows", "pad_rows"]


@dataclass
class EditFlowBatch:
    """One prepared micro-batch: the model input x_t, the edits and the per-sequence weights."""

    input_ids: torch.Tensor  # [B, Lx] x_t, right-padded
    attention_mask: torch.Tensor  # [B, Lx]
    prompt_len: torch.Tensor  # [B] frozen prefix length P (>= 1)
    coef: torch.Tensor  # [B] fp32 w(t) / |x1|, 0 on empty rows
    edits: Edits
    t: torch.Tensor  # [B]
    u: torch.Tensor  # [B, Lz] the column draws
    x0: List[List[int]]
    x1: List[List[int]]
    n_seqs: int

    @property
    def masked(self) -> torch.Tensor:  # the trainer reads the row count of the model input from here
        return self.attention_mask.bool()

    @property
    def segment_ids(self) -> torch.Tensor:  # one document per row (FLOPs count the x_t lengths)
        return self.attention_mask.long()

    @property
    def targets(self) -> torch.Tensor:  # tokens scored through a [V, H] head (FLOPs)
        return torch.cat([self.edits.sub[:, 2], self.edits.ins[:, 2]])

    def editable(self):
        """[B, Lx] bool masks of the substitute/delete and the insert rates the sampler can fire."""
        pos = torch.arange(self.input_ids.shape[1], device=self.input_ids.device)[None]
        real = self.attention_mask.bool()
        p = self.prompt_len[:, None]
        return real & (pos >= p), real & (pos >= p - 1)


def split_rows(batch: dict, bos_id: int):
    """(x1 rows, frozen prefix lengths) of a right-padded, one-document-per-row batch. Pretraining rows
    (no prompt) get BOS in front unless they start with it; SFT rows keep their prompt as the prefix."""
    for key in ("input_ids", "attention_mask", "maskable", "segment_ids"):
        if key not in batch:
            raise KeyError(f"editflow batch is missing {key!r}")
    if int(batch["segment_ids"].max()) > 1:
        raise ValueError("train.objective=editflow needs one document per row: set data.packing=false "
                         "(a packed row would mix documents in one alignment)")
    x1s, plens = [], []
    for ids, mask, maskable in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist(),
                                   batch["maskable"].tolist()):
        n = sum(mask)
        if any(mask[n:]) or not all(mask[:n]):
            raise ValueError("editflow rows must be right-padded (attention_mask 1...1 0...0)")
        ids, maskable = ids[:n], maskable[:n]
        if n == 0:
            x1s.append([])
            plens.append(0)
            continue
        p = next((i for i, m in enumerate(maskable) if m), n)
        if p == n:
            raise ValueError("an editflow row has no maskable (response) token; SFT examples need a response")
        if p == 0 and ids[0] != bos_id:
            ids, p = [bos_id] + ids, 1
        x1s.append(ids)
        plens.append(max(p, 1))
    return x1s, plens


def pad_rows(rows: List[List[int]], pad: int, device=None):
    width = max([len(r) for r in rows] + [1])
    out = torch.full((len(rows), width), pad, dtype=torch.long)
    for b, r in enumerate(rows):
        out[b, :len(r)] = torch.tensor(r, dtype=torch.long)
    return out.to(device)


class EditFlowObjective:
    attn_mode = "bidirectional"
    block_size = None

    def __init__(self, *, heads, mask_token_id: int, bos_token_id: int, pad_token_id: int, x0_sampler: str = "masks:64",
                 schedule: str = "cubic", max_w: float = 20.0, eps: float = 1e-3, chunk_size: int = DEFAULT_CHUNK_SIZE):
        if not 0.0 < eps < 1.0:
            raise ValueError(f"eps must be in (0, 1), got {eps}")
        if bos_token_id is None:
            raise ValueError("EditFlow needs a BOS anchor: the tokenizer has no bos_token_id (set tokenizer.bos_token)")
        self.heads = heads  # model.editflow (veomni/models/editflow.py), called inside the model's forward
        self.x0_sampler = X0Sampler(x0_sampler, mask_token_id)
        self.schedule = KappaSchedule(schedule, max_w)
        self.bos_id, self.pad_id = int(bos_token_id), int(pad_token_id)
        self.eps, self.chunk_size = float(eps), int(chunk_size)

    # ---- noise ---------------------------------------------------------------------------------------
    def prepare(self, batch: dict, generator: torch.Generator) -> EditFlowBatch:
        if not isinstance(generator, torch.Generator):
            raise TypeError("EditFlowObjective.prepare needs a torch.Generator (veomni.diffusion.noise.make_generator)")
        device = batch["input_ids"].device
        x1s, plens = split_rows(batch, self.bos_id)
        z0s, z1s, x0s = [], [], []
        for x1, p in zip(x1s, plens):
            if not x1:
                x0s.append([])
                z0s.append([self.bos_id])  # an empty row runs as a lone BOS with zero weight
                z1s.append([self.bos_id])
                continue
            x0_tail = self.x0_sampler(x1[p:])
            a, b = align(x0_tail, x1[p:])
            x0s.append(x1[:p] + x0_tail)
            z0s.append(x1[:p] + a)
            z1s.append(x1[:p] + b)
        B = len(x1s)
        t = torch.rand(B, generator=generator, device=generator.device) * (1.0 - self.eps)
        width = max(len(z) for z in z0s)
        u = torch.rand(B, width, generator=generator, device=generator.device)
        z0, z1 = pad_rows(z0s, BLANK), pad_rows(z1s, BLANK)
        valid = pad_rows([[1] * len(z) for z in z0s], 0).bool()
        zt = sample_zt(z0, z1, self.schedule.kappa(t), u)
        xt, lengths, nb = strip_rows(zt, valid, self.pad_id)
        edits = remaining_edits(zt, z1, valid, nb)
        n_x1 = torch.tensor([len(x) for x in x1s], dtype=torch.float32)
        coef = torch.where(n_x1 > 0, self.schedule.weight(t) / n_x1.clamp_min(1.0), torch.zeros_like(t))
        mask = (torch.arange(xt.shape[1])[None] < lengths[:, None]).long()
        return EditFlowBatch(
            input_ids=xt.to(device), attention_mask=mask.to(device),
            prompt_len=torch.tensor([max(p, 1) for p in plens], device=device), coef=coef.to(device),
            edits=Edits(edits.sub.to(device), edits.ins.to(device), edits.dele.to(device)),
            t=t, u=u, x0=x0s, x1=x1s, n_seqs=sum(1 for x in x1s if x))

    def num_loss_tokens(self, corr: EditFlowBatch) -> int:
        """The normaliser's unit: sequences (each one's loss is already divided by its |x1|)."""
        return corr.n_seqs

    def model_inputs(self, batch: dict, corr: EditFlowBatch) -> dict:
        pos = torch.arange(corr.input_ids.shape[1], device=corr.input_ids.device).expand_as(corr.input_ids)
        return {"input_ids": corr.input_ids, "position_ids": pos, "segment_ids": corr.attention_mask,
                "attention_mask": corr.attention_mask, "attn_mode": self.attn_mode, "block_size": None}

    def scored_rows(self, corr: EditFlowBatch):
        return None  # sequence parallelism is refused for editflow (veomni/config/schema.py)

    # ---- loss ----------------------------------------------------------------------------------------
    def loss_fn(self, corr: EditFlowBatch, global_denominator, rows=None):
        """``(hidden [B, Lx, H], head_weight) -> sum over this micro-batch's sequences of loss_b / denom``."""
        if rows is not None:
            raise ValueError("editflow has no sequence-parallel loss rows")
        denom = float(global_denominator.item() if isinstance(global_denominator, torch.Tensor) else global_denominator)
        if denom < 0 or (denom == 0 and corr.n_seqs > 0):
            raise ValueError(f"global_denominator={denom} but this micro-batch holds {corr.n_seqs} sequences")
        scale = corr.coef * (1.0 / denom if denom > 0 else 0.0)  # [B]
        sd_mask, ins_mask = corr.editable()
        e, heads, chunk = corr.edits, self.heads, self.chunk_size

        def fn(hidden: torch.Tensor, head_weight: torch.Tensor) -> torch.Tensor:
            if tuple(hidden.shape[:2]) != tuple(corr.input_ids.shape):
                raise ValueError(f"editflow loss expects hidden [B, Lx, H] with [B, Lx] = "
                                 f"{list(corr.input_ids.shape)}, got {tuple(hidden.shape)}")
            rates = heads.rates(hidden)  # [B, Lx, 3] fp32
            s = scale.to(hidden.device)
            survival = (rates[..., 0] + rates[..., 1]) * sd_mask + rates[..., 2] * ins_mask
            loss = (survival.sum(1) * s).sum()
            for kind, idx in ((0, e.sub), (1, e.dele), (2, e.ins)):
                lam = rates[idx[:, 0], idx[:, 1], kind].clamp_min(1e-12)
                loss = loss - (torch.log(lam) * s[idx[:, 0]]).sum()
            # -log Q(token) = CE of the head at the edit row; the kernel sums weight * CE.
            sub_hidden = heads.sub_rows(hidden)
            for head, idx, src in ((heads.sub_head, e.sub, sub_hidden), (heads.ins_head, e.ins, hidden)):
                loss = loss + chunked_linear_cross_entropy(src[idx[:, 0], idx[:, 1]], head.weight, idx[:, 2],
                                                           s[idx[:, 0]].float(), chunk_size=chunk)
            # The LM head is unused by EditFlow; a zero-weight touch keeps DDP/ZeRO from waiting for its gradient.
            return loss + head_weight.sum() * 0.0

        return fn


def editflow_objective_kwargs(args, model, tokenizer, mask_token_id: int) -> dict:
    """EditFlowObjective's arguments from the config and the (not yet parallelised) model."""
    e = args.train.editflow
    bos = tokenizer.bos_token_id
    if bos is None:
        raise ValueError(f"train.objective=editflow anchors insertions on a BOS token, and tokenizer "
                         f"{getattr(tokenizer, 'name_or_path', '')!r} has none: set its bos_token")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return dict(heads=model.editflow, mask_token_id=mask_token_id, bos_token_id=bos, pad_token_id=pad,
                x0_sampler=e.x0_sampler, schedule=e.schedule, max_w=e.max_w, eps=e.time_eps,
                chunk_size=args.train.ce_chunk_size)
