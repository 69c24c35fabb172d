"""Small helpers shared by the distributed and checkpoint code."""
from __future__ import annotations

import socket

import torch.nn as nn


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's model under a DistributedDataParallel or DeepSpeedModel wrapper (FSDP2 does not
    wrap: same object)."""
    from torch.nn.parallel import DistributedDataParallel

    from .deepspeed_engine import DeepSpeedModel

    while isinstance(model, (DistributedDataParallel, DeepSpeedModel)):
        model = model.module
    return model


def local_shards(model: nn.Module):
    """The parameter tensors this rank holds: FSDP2 DTensor shards, ZeRO-3 partitions, or the
    parameters themselves (e.g. to check that no rank holds NaN/inf)."""
    from .deepspeed_engine import DeepSpeedModel

    if isinstance(model, DeepSpeedModel):
        yield from model.local_shards()
        return
    for p in model.parameters():
        yield p.to_local() if hasattr(p, "to_local") else p


def find_free_port() -> int:
    """A TCP port that was free a moment ago (for single-node launches in tests and scripts)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
