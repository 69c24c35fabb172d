"""Representation alignment ("Don't Retrain, Align", Open-dLLM): keep the diffusion student's hidden
states close to the frozen AR model it started from.

    align = ReprAlign(weight=10.0, layers=[], num_hidden_states=L + 1, teacher=frozen_ar_model)
    plan  = align.plan(batch, corr, generator)          # which rows and layers, and their targets
    count = align.num_pairs(plan)                       # all-reduced like the CE denominator
    out   = model(..., hidden_states_out=hs)            # the student's L + 1 hidden states
    term  = align.loss(hs, plan, global_pairs)          # weight * sum (1 - cos) / global pairs

What the reference does (pengzhangzhi/Open-dLLM, modeling_qwen2/3.py, read for this port):
  * the teacher is a frozen copy of the initial AR model, run causally on the CLEAN input with the
    same position ids; the student runs its diffusion forward;
  * every hidden state is aligned (HF's output_hidden_states: the embedding output, the layer
    outputs and the final normed output), at the positions whose NEXT token is masked (the token
    shift: h[:, :-1] where labels[:, 1:] are scored), i.e. the rows the MDM loss reads;
  * L_align = 1 - mean cosine over (positions x layers), added as lambda * L_align (10 in the paper).
Here the positions are exactly the objective's loss rows (corr.loss_positions: with logit shift the
row before each masked token), and the mean runs over the (position, layer) pairs of the whole step
on all ranks, like every other loss term. Options from castlehill's extension: a subset of layers
(`layers`), token subsampling (`token_fraction`) and layer subsampling (`layer_fraction`) drawn per
micro-batch from a (seed, step, micro-batch) generator.

The teacher never enters the student: it is held here, not as a submodule, so it is not in the
student's state dict, optimizer or checkpoints, and it runs under no_grad with frozen parameters.
An anchor cache (scripts/precompute_anchors.py, `AnchorCache`) replaces the teacher forward by
hidden states stored once per training row, keyed by sha256 of the row's ids; the loss is the same.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = ["AlignPlan", "ReprAlign", "AnchorCache", "row_key", "teacher_hidden_states", "resolve_layers"]


def resolve_layers(layers: Sequence[int], num_hidden_states: int) -> List[int]:
    """Hidden-state indices (0 = embedding output, L = final normed output; negatives count from the
    end); [] = all of them. Out of range or repeated indices are errors."""
    if not layers:
        return list(range(num_hidden_states))
    out = []
    for i in layers:
        j = i + num_hidden_states if i < 0 else i
        if not 0 <= j < num_hidden_states:
            raise ValueError(f"train.align_layers: {i} is outside the {num_hidden_states} hidden states "
                             f"(0 = embeddings .. {num_hidden_states - 1} = final normed output)")
        if j in out:
            raise ValueError(f"train.align_layers: layer {i} is listed twice")
        out.append(j)
    return sorted(out)


def row_key(input_ids: torch.Tensor, segment_ids: torch.Tensor) -> str:
    """sha256 of one training row (its ids and document layout): the anchor cache's key."""
    h = hashlib.sha256()
    h.update(input_ids.detach().to("cpu", torch.int64).numpy().tobytes())
    h.update(segment_ids.detach().to("cpu", torch.int64).numpy().tobytes())
    return h.hexdigest()


@torch.no_grad()
def teacher_hidden_states(teacher, batch: dict) -> List[torch.Tensor]:
    """The frozen AR model's L + 1 hidden states on the clean rows: causal, same position ids,
    documents kept apart by the segment ids."""
    hs: List[torch.Tensor] = []
    teacher(input_ids=batch["input_ids"], position_ids=batch["position_ids"], segment_ids=batch["segment_ids"],
            attention_mask=batch["attention_mask"], attn_mode="causal", hidden_states_out=hs,
            loss_fn=lambda h, w: h.new_zeros(()))  # no head, no logits
    return hs


@dataclass
class AlignPlan:
    """positions [K, 2]: student hidden rows (b, j); teacher_rows [K]: the data row each comes from;
    layers: hidden-state indices; targets: per layer, the teacher's hidden states [K, H] (no grad)."""

    positions: torch.Tensor
    layers: List[int]
    targets: List[torch.Tensor]


class AnchorCache:
    """Teacher hidden states stored once per training row: <dir>/<key[:2]>/<key>.pt holds
    {layer: [S, H] tensor}; <dir>/manifest.json says which model, layers, row length and dtype."""

    def __init__(self, root):
        self.root = Path(root)
        path = self.root / "manifest.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: build the anchor cache with scripts/precompute_anchors.py")
        self.manifest = json.loads(path.read_text())
        self.layers = list(self.manifest["layers"])

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.pt"

    def check(self, teacher_path: str, layers: Sequence[int], max_seq_len: int, num_hidden_states: int) -> None:
        m = self.manifest
        problems = []
        if m["num_hidden_states"] != num_hidden_states:
            problems.append(f"it has {m['num_hidden_states']} hidden states per row, the model {num_hidden_states}")
        if m["max_seq_len"] != max_seq_len:
            problems.append(f"rows of {m['max_seq_len']} tokens, training uses data.max_seq_len={max_seq_len}")
        missing = sorted(set(layers) - set(self.layers))
        if missing:
            problems.append(f"layers {missing} were not stored (it holds {self.layers})")
        if m["model_fingerprint"] != model_fingerprint(teacher_path):
            problems.append(f"it was computed with {m['model']}, not with the teacher {teacher_path}")
        if problems:
            raise ValueError(f"anchor cache {self.root} does not fit this run: " + "; ".join(problems)
                             + ". Rebuild it with scripts/precompute_anchors.py.")

    def rows(self, batch: dict, layers: Sequence[int], device) -> List[torch.Tensor]:
        """Per layer, the stored hidden states of the batch's rows [B, S, H]."""
        per_layer: Dict[int, list] = {i: [] for i in layers}
        for b in range(batch["input_ids"].shape[0]):
            key = row_key(batch["input_ids"][b], batch["segment_ids"][b])
            path = self.path(key)
            if not path.is_file():
                raise KeyError(f"anchor cache {self.root} has no entry for a training row (key {key[:16]}...): "
                               "was it built from the same data, tokenizer, max_seq_len and packing? Rebuild it "
                               "with scripts/precompute_anchors.py.")
            stored = torch.load(path, map_location="cpu", weights_only=True)
            for i in layers:
                per_layer[i].append(stored[i])
        return [torch.stack(per_layer[i]).to(device) for i in layers]

    @staticmethod
    def write(root, key: str, states: Dict[int, torch.Tensor]) -> None:
        """Atomically store one row (a crash leaves no half-written entry; re-runs skip done keys)."""
        path = Path(root) / key[:2] / f"{key}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save({i: t.detach().cpu().contiguous() for i, t in states.items()}, tmp)
        os.replace(tmp, path)


def model_fingerprint(path) -> str:
    """Which teacher a cache belongs to: its config and the names and sizes of its weight files."""
    from veomni.models.embedded import resolve_model_path

    root = Path(resolve_model_path(str(path)))
    h = hashlib.sha256()
    if root.is_dir():
        for f in sorted(root.iterdir()):
            if f.name == "config.json" or f.suffix in (".safetensors", ".bin", ".gguf"):
                h.update(f"{f.name}:{f.stat().st_size}".encode())
                if f.name == "config.json":
                    h.update(f.read_bytes())
    else:
        h.update(f"{root.name}:{root.stat().st_size}".encode())
    return h.hexdigest()


class ReprAlign:
    def __init__(self, weight: float, layers: Sequence[int], num_hidden_states: int, token_fraction: float = 1.0,
                 layer_fraction: float = 1.0, teacher=None, cache: Optional[AnchorCache] = None):
        if (teacher is None) == (cache is None):
            raise ValueError("ReprAlign needs exactly one source of teacher states: a teacher model or an anchor cache")
        if not weight > 0:
            raise ValueError(f"train.repr_align_weight must be > 0 to align, got {weight}")
        for name, f in (("align_token_fraction", token_fraction), ("align_layer_fraction", layer_fraction)):
            if not 0.0 < f <= 1.0:
                raise ValueError(f"train.{name} must be in (0, 1], got {f}")
        self.weight = float(weight)
        self.layers = resolve_layers(layers, num_hidden_states)
        self.num_hidden_states = num_hidden_states
        self.token_fraction, self.layer_fraction = float(token_fraction), float(layer_fraction)
        self.teacher, self.cache = teacher, cache
        if teacher is not None:
            teacher.eval()
            for p in teacher.parameters():
                p.requires_grad_(False)

    def plan(self, batch: dict, corr, generator: torch.Generator) -> AlignPlan:
        """The rows to align (the objective's loss rows, token-subsampled), the layers (layer-
        subsampled) and the teacher's states there. Draw order: tokens, then layers."""
        positions = corr.loss_positions
        if self.token_fraction < 1.0 and positions.shape[0]:
            keep = math.ceil(self.token_fraction * positions.shape[0])
            pick = torch.randperm(positions.shape[0], generator=generator)[:keep].sort().values
            positions = positions[pick.to(positions.device)]
        layers = self.layers
        if self.layer_fraction < 1.0:
            keep = math.ceil(self.layer_fraction * len(layers))
            layers = [layers[i] for i in sorted(torch.randperm(len(layers), generator=generator)[:keep].tolist())]
        device = batch["input_ids"].device
        if self.cache is not None:
            states = self.cache.rows(batch, layers, device)
        else:
            hs = teacher_hidden_states(self.teacher, batch)
            states = [hs[i] for i in layers]
        # Complementary bd3lm copies repeat the data rows on the batch axis: row b reads data row b % B.
        rows = positions[:, 0] % batch["input_ids"].shape[0]
        targets = [s[rows, positions[:, 1]].detach() for s in states]
        return AlignPlan(positions, layers, targets)

    def num_pairs(self, plan: AlignPlan) -> int:
        return plan.positions.shape[0] * len(plan.layers)

    def loss(self, student: List[torch.Tensor], plan: AlignPlan, global_pairs: float) -> torch.Tensor:
        """weight * sum over this micro-batch's (row, layer) pairs of (1 - cos) / global_pairs, and
        the unweighted sum of (1 - cos) for the metrics."""
        if len(student) != self.num_hidden_states:
            raise RuntimeError(f"the model returned {len(student)} hidden states, expected {self.num_hidden_states}")
        p = plan.positions
        anchor = student[-1]  # a term that depends on the hidden states even with no pair (0 * h)
        total = anchor.sum() * 0.0
        for i, target in zip(plan.layers, plan.targets):
            h = student[i][p[:, 0], p[:, 1]]
            total = total + (1.0 - F.cosine_similarity(h.float(), target.float(), dim=-1)).sum()
        raw = total.detach()
        scale = self.weight / global_pairs if global_pairs > 0 else 0.0
        return total * scale, raw
