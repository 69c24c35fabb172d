"""Training checkpoints (DCP, atomic, every RNG stream) and HF export. See docs/parallelism.md.

Names are loaded on first use so `import veomni.checkpoint` stays light.
"""

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


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
