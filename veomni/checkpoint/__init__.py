"""Training checkpoints (DCP, atomic, every RNG stream) and HF export. See docs/parallelism.md.

Names are loaded on first use so `import veomni.checkpoint` stays light.
"""

from veomni.utils.lazy import lazy_exports

_EXPORTS = {
    "CheckpointError": "dcp",
    "checkpoint_dir": "dcp",
    "save_checkpoint": "dcp",
    "load_checkpoint": "dcp",
    "load_latest": "dcp",
    "find_latest_checkpoint": "dcp",
    "verify_checkpoint": "dcp",
    "read_manifest": "dcp",
    "get_rng_state": "rng",
    "set_rng_state": "rng",
    "export_hf": "export",
    "gather_full_state_dict": "export",
}


__getattr__, __all__ = lazy_exports(__name__, _EXPORTS)
