"""Load a model + tokenizer for sampling from whatever the user points at.

Accepted `model_path`:
  - an HF directory (config.json): what training exports to <run>/hf, or any HF checkpoint;
  - a training checkpoint <run>/checkpoints/global_step_N (DCP): rebuilt with the loader of
    scripts/export_hf.py; the tokenizer comes from the run's resolved_config.yaml;
  - a run directory <run> that holds hf/ (the export of the finished run);
  - a .gguf file (an AR model: it has no mask token, see `add_mask_token`).

A model without `config.mask_token_id` was never trained for diffusion: loading raises unless
`add_mask_token=True`, which adds one in memory (mean-initialised row) and marks the model
bidirectional, for trying the mechanics on an AR checkpoint. Its outputs are not meaningful.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Optional, Tuple

import torch

NO_MASK_MSG = (
    "{path} has no mask token (config.mask_token_id is unset): it is an autoregressive model, not a "
    "masked-diffusion one. Train it first (python tasks/train_torch.py configs/quickstart/"
    "smollm2_mdm.yaml --model.model_path={path}) and sample from <run>/hf, or pass --add_mask_token "
    "to add an untrained mask token in memory (for trying the mechanics; outputs will be poor)."
)


def resolve_device(device: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; anything else must be a torch device string."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"device={device!r} is not a torch device ({exc}); use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but CUDA is not available here; use --device cpu")
    return dev


def model_source(path) -> Tuple[str, Path]:
    """('hf' | 'dcp' | 'gguf', path) for a model path, or FileNotFoundError saying what is expected."""
    from veomni.models.embedded import resolve_model_path

    p = Path(resolve_model_path(path)).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return "gguf", p
    if (p / "config.json").is_file():
        return "hf", p
    if (p / "model_config.json").is_file() or (p / ".metadata").is_file():
        return "dcp", p
    if (p / "hf" / "config.json").is_file():
        return "hf", p / "hf"
    hint = ""
    ckpts = sorted((p / "checkpoints").glob("global_step_*")) if (p / "checkpoints").is_dir() else []
    if ckpts:
        newest = max(ckpts, key=lambda c: int(c.name.rsplit("_", 1)[-1]) if c.name.rsplit("_", 1)[-1].isdigit() else -1)
        hint = f" This looks like a run directory without hf/: pass --model_path {newest}."
    if not p.exists():
        raise FileNotFoundError(f"model path {p} does not exist.{hint}")
    raise FileNotFoundError(f"{p} is not a model: expected an HF directory (config.json), a training "
                            f"checkpoint (global_step_N with model_config.json), a run directory holding "
                            f"hf/, or a .gguf file.{hint}")


def _export_script():
    """scripts/export_hf.py as a module: it holds the single-process DCP -> model loader."""
    script = Path(__file__).resolve().parents[2] / "scripts" / "export_hf.py"
    if not script.is_file():
        raise FileNotFoundError(f"{script} is missing (needed to read a training checkpoint); run from a "
                                "checkout, or export the checkpoint to an HF directory and load that.")
    spec = importlib.util.spec_from_file_location("veomni_export_hf_script", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_config(ckpt: Path) -> dict:
    import yaml

    for cand in (ckpt / "resolved_config.yaml", ckpt.parent.parent / "resolved_config.yaml"):
        if cand.is_file():
            return yaml.safe_load(cand.read_text()) or {}
    return {}


def _load_dcp(ckpt: Path, tokenizer_path: Optional[str], attn_impl: str):
    from veomni.models.hf_io import load_tokenizer

    model = _export_script().load_checkpoint_model(ckpt, attn_impl=attn_impl)
    model_cfg = _run_config(ckpt).get("model") or {}
    tok_path = tokenizer_path or model_cfg.get("tokenizer_path") or model_cfg.get("model_path")
    if not tok_path:
        raise FileNotFoundError(f"{ckpt}: no tokenizer (no resolved_config.yaml with model.tokenizer_path next "
                                "to the checkpoint); pass --tokenizer_path DIR")
    # The trainer added the mask token to this tokenizer in memory; add the same one again.
    mask = model_cfg.get("mask_token") if getattr(model.config, "mask_token_id", None) is not None else None
    return model, load_tokenizer(tok_path, mask_token=mask)


def load_for_inference(model_path, tokenizer_path: Optional[str] = None, dtype: str = "auto",
                       device: str = "auto", attn_impl: str = "sdpa", add_mask_token: bool = False,
                       mask_token: str = "<|mask|>", log=None):
    """(model in eval mode on `device`, tokenizer) ready for `generate`.

    dtype: 'auto' (the dtype recorded in config.json; fp32 for training checkpoints), 'float32',
    'bfloat16' or 'float16'. add_mask_token: see the module docstring; an error when the model
    already has one. `log(msg)` receives notes for the user (stderr in the CLI).
    """
    from veomni.models.hf_io import load_model, load_tokenizer, resolve_dtype

    log = log or (lambda msg: print(msg, file=sys.stderr))
    kind, path = model_source(model_path)
    dev = resolve_device(device)
    want = None if dtype == "auto" else resolve_dtype(dtype)
    if kind == "dcp":
        model, tokenizer = _load_dcp(path, tokenizer_path, attn_impl)
        model = model.to(device=dev, dtype=want or torch.float32)
    else:
        model = load_model(path, dtype=want, attn_impl=attn_impl, device=dev)
        tok_dir = tokenizer_path or (path.parent if kind == "gguf" else path)
        gguf = {"gguf_file": path.name} if kind == "gguf" and tokenizer_path is None else {}
        tokenizer = load_tokenizer(tok_dir, **gguf)
    has_mask = getattr(model.config, "mask_token_id", None) is not None
    if add_mask_token:
        if has_mask:
            raise ValueError(f"{model_path} already has a mask token (config.mask_token_id="
                             f"{model.config.mask_token_id}); drop --add_mask_token.")
        from veomni.models.mask_token import ensure_mask_token

        mask_id = ensure_mask_token(model, tokenizer, mask_token)
        if getattr(model.config, "dllm_attn_mode", None) is None:
            model.config.dllm_attn_mode = "bidirectional"
        log(f"note: added mask token {tokenizer.mask_token!r} (id {mask_id}) in memory and set "
            "bidirectional attention; this model was not trained for diffusion, so outputs only show "
            "the mechanics.")
    elif not has_mask:
        raise ValueError(NO_MASK_MSG.format(path=model_path))
    return model.eval(), tokenizer
