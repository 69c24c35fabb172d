"""Small helpers shared by the distributed and checkpoint code."""
from __future__ import annotations

import socket

import torch.nn as nn


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's model under a DistributedDataParallel wrapper (FSDP2 does not wrap: same object)."""
    from torch.nn.parallel import DistributedDataParallel

    while isinstance(model, DistributedDataParallel):
        model = model.module
    return model


def find_free_port() -> int:
    """A TCP port that was free a moment ago (for single-node launches in tests and scripts)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
