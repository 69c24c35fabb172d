"""Lazy package exports: `import veomni.x` stays light, names load on first use."""
import importlib


def lazy_exports(package: str, exports: dict):
    """Return (__getattr__, __all__) for a package whose names live in submodules.

    exports maps a public name to the submodule (relative to `package`) that defines it.
    """

    def __getattr__(name):
        if name in exports:
            return getattr(importlib.import_module(f"{package}.{exports[name]}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__, sorted(exports)
