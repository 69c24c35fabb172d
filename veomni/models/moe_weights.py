"""Expert weights: fused in memory, per expert on the hub.

In memory (ours, and transformers v5's modules) each sparse layer holds two fused tensors:

    mlp.experts.gate_up_proj   [E, 2I, H]   row block [0, I) = gate_proj, [I, 2I) = up_proj
    mlp.experts.down_proj      [E, H, I]

Hub checkpoints (Qwen/Qwen3-30B-A3B, Qwen1.5-MoE-A2.7B, and what `save_pretrained` of
transformers v5 writes) store each expert separately:

    mlp.experts.{j}.gate_proj.weight  [I, H]
    mlp.experts.{j}.up_proj.weight    [I, H]
    mlp.experts.{j}.down_proj.weight  [H, I]

`ExpertMerger` converts hub -> ours while a sharded checkpoint streams in: the parts of one layer
may sit in different shards, so they wait until all 3E have arrived and are then stacked into the
fused tensors (the parts are released at once). Anything it does not recognise passes through.
A checkpoint that is already fused passes through unchanged too. `split_experts` converts
ours -> hub for saving, with views (no copy of the expert weights is made).
"""
from __future__ import annotations

import re
from typing import Dict, Tuple

import torch

_PART = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<j>\d+)\.(?P<name>gate_proj|up_proj|down_proj)\.weight$")
_FUSED = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<name>gate_up_proj|down_proj)$")
_NAMES = ("gate_proj", "up_proj", "down_proj")


class ExpertMerger:
    """Streaming hub -> fused converter for one checkpoint load. Call it on each shard's state
    dict (returns the keys that are complete), then `finish()` (raises if an expert is missing)."""

    def __init__(self, num_experts: int):
        if num_experts < 1:
            raise ValueError(f"num_experts={num_experts}: an MoE checkpoint needs at least one expert")
        self.num_experts = num_experts
        self._pending: Dict[str, Dict[Tuple[str, int], torch.Tensor]] = {}

    def __call__(self, sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        out = {}
        touched = set()
        for key, t in sd.items():
            m = _PART.match(key)
            if m is None:
                out[key] = t
                continue
            j = int(m["j"])
            if j >= self.num_experts:
                raise KeyError(f"{key}: expert {j} but config.num_experts={self.num_experts}")
            parts = self._pending.setdefault(m["prefix"], {})
            if (m["name"], j) in parts:
                raise KeyError(f"{key} appears twice in the checkpoint")
            parts[(m["name"], j)] = t
            touched.add(m["prefix"])
        for prefix in touched:
            parts = self._pending[prefix]
            if len(parts) == 3 * self.num_experts:
                out.update(self._fuse(prefix, self._pending.pop(prefix)))
        return out

    def _fuse(self, prefix: str, parts) -> Dict[str, torch.Tensor]:
        e = range(self.num_experts)
        gate_up = torch.stack([torch.cat([parts[("gate_proj", j)], parts[("up_proj", j)]], dim=0) for j in e])
        down = torch.stack([parts[("down_proj", j)] for j in e])
        return {f"{prefix}.gate_up_proj": gate_up, f"{prefix}.down_proj": down}

    def finish(self) -> None:
        if self._pending:
            prefix, parts = next(iter(self._pending.items()))
            missing = [f"{prefix}.{j}.{n}.weight" for j in range(self.num_experts) for n in _NAMES
                       if (n, j) not in parts]
            raise KeyError(f"checkpoint has only some experts of {len(self._pending)} MoE layer(s); "
                           f"missing e.g. {missing[:6]}{' ...' if len(missing) > 6 else ''}")


def split_experts(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """ours -> hub: every fused expert tensor becomes E per-expert weights (views), in key order."""
    out: Dict[str, torch.Tensor] = {}
    for key, t in sd.items():
        m = _FUSED.match(key)
        if m is None:
            out[key] = t
        elif m["name"] == "gate_up_proj":
            inter = t.shape[1] // 2
            for j in range(t.shape[0]):
                out[f"{m['prefix']}.{j}.gate_proj.weight"] = t[j, :inter]
                out[f"{m['prefix']}.{j}.up_proj.weight"] = t[j, inter:]
        else:
            for j in range(t.shape[0]):
                out[f"{m['prefix']}.{j}.down_proj.weight"] = t[j]
    return out

