"""Models: registry, loading/saving. Light on import; heavy pieces load on first use."""


def __getattr__(name):
    if name in ("get_spec", "build_model", "MODEL_REGISTRY"):
        from veomni.models import registry

        return getattr(registry, name)
    if name in ("load_model", "save_model", "load_tokenizer"):
        from veomni.models import hf_io

        return getattr(hf_io, name)
    raise AttributeError(name)
