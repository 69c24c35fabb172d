"""Training data: readers, tokenization cache, packing, streaming, packed shards, mixtures and the
stateful loaders (docs/data.md).

Names are resolved lazily so `import veomni.data` pulls in neither torch nor numpy until used.
"""
_EXPORTS = {
    "build_dataset": "loader",
    "build_dataloaders": "loader",
    "StatefulLoader": "loader",
    "StreamingLoader": "streaming",
    "StreamingRows": "streaming",
    "MixtureDataset": "mixture",
    "PackedShardDataset": "shards",
    "pack": "shards",
    "PackedDataset": "packing",
    "collate": "packing",
    "BATCH_KEYS": "packing",
    "DataFormatError": "readers",
    "resolve_files": "readers",
    "TokenStore": "tokenization",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'veomni.data' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
