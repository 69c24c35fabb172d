"""Every RNG stream of one process: python `random`, numpy's global RNG, torch CPU, torch CUDA.

States are per rank (each rank draws its own noise), so each rank saves its own file. The saved
dict holds only tensors, ints, floats, tuples and strings so `torch.load(weights_only=True)` can
read it (no pickle of arbitrary objects when resuming).
"""
from __future__ import annotations

import hashlib
import logging
import random
from typing import Any, Dict

import numpy as np
import torch

logger = logging.getLogger(__name__)


def get_rng_state() -> Dict[str, Any]:
    kind, key, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    state = {
        "python": random.getstate(),
        # numpy's MT19937 key is a uint32 array: stored as int64 tensor for weights_only loading.
        "numpy": (kind, torch.from_numpy(key.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
        "torch_cpu": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["torch_cuda"] = torch.cuda.get_rng_state_all()  # one state per visible device
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(_as_tuple(state["python"]))
    kind, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, key.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch_cpu"])
    saved_cuda = state.get("torch_cuda")
    if torch.cuda.is_available():
        if saved_cuda is None:
            logger.warning("checkpoint has no CUDA RNG state (saved without CUDA): CUDA RNG not restored")
        else:
            n = torch.cuda.device_count()
            if len(saved_cuda) != n:
                logger.warning("checkpoint holds %d CUDA RNG state(s), %d device(s) visible: restoring "
                               "the first %d", len(saved_cuda), n, min(n, len(saved_cuda)))
            for i, s in enumerate(saved_cuda[:n]):
                torch.cuda.set_rng_state(s, device=i)
    elif saved_cuda is not None:
        logger.warning("checkpoint holds CUDA RNG states but CUDA is not available: not restored")


def _as_tuple(x):
    # python's state must be nested tuples; a serialiser may hand lists back.
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def derive_rng_state(reference: Dict[str, Any], step: int, rank: int) -> None:
    """Seed every stream from (a saved reference state, step, rank): deterministic, not continuous.

    Used when resuming on a different world size, where rank r has no saved state of its own.
    """
    h = hashlib.sha256()
    h.update(reference["torch_cpu"].numpy().tobytes())
    h.update(f"step={step};rank={rank}".encode())
    seed = int.from_bytes(h.digest()[:8], "little") & ((1 << 63) - 1)
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)  # also seeds every CUDA device
