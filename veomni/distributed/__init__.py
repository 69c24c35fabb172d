"""Parallel state (one DeviceMesh), FSDP2/DDP/DeepSpeed wrapping, gradient clipping. See docs/parallelism.md.

Names are loaded on first use so `import veomni.distributed` does not import torch.distributed.
"""

from veomni.utils.lazy import lazy_exports

_EXPORTS = {
    "ParallelState": "parallel_state",
    "init_parallel_state": "parallel_state",
    "get_parallel_state": "parallel_state",
    "loss_scale_for_grad_averaging": "parallel_state",
    "mesh_layout": "parallel_state",
    "ParallelizeConfig": "parallelism",
    "parallelize": "parallelism",
    "autocast_context": "parallelism",
    "clip_grad_norm_": "parallelism",
    "no_grad_sync": "parallelism",
    "backward": "parallelism",
    "bind_optimizer": "parallelism",
    "unwrap_model": "utils",
    "local_shards": "utils",
    "DeepSpeedOptions": "deepspeed_engine",
    "deepspeed_options": "deepspeed_engine",
}


__getattr__, __all__ = lazy_exports(__name__, _EXPORTS)
