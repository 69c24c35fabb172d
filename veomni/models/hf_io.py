"""Load and save Hugging Face checkpoints with our model classes (no HF modeling code at run time).

Load path (`load_model`):
  config.json --AutoConfig--> HF config object --registry[model_type]--> our class, built on the
  meta device (no memory, no random init) --> each weight file opened in turn with
  `safetensors.safe_open`, keys mapped by `spec.hf_reader(config)`, every tensor cast to `dtype` and
  *assigned* as the parameter (`load_state_dict(assign=True)`). Only one shard is in memory besides
  the parameters already placed, so a model never sits twice in memory. MoE families: per-expert
  hub weights are stacked into our fused [E, ...] tensors as each layer's experts complete (they may
  span shards; veomni/models/moe_weights.py), and saving splits them back.
  Afterwards: tied heads are re-tied (assign replaces Parameter objects, which silently unties
  `lm_head.weight` from `embed_tokens.weight`), and the non-persistent RoPE buffer is recomputed
  (a meta buffer has no data and no checkpoint carries it).

Save path (`save_model`): config.json (+ architectures, dtype, dLLM extras such as mask_token_id),
  safetensors shards with an index when larger than `max_shard_size`, generation_config.json and the
  tokenizer. The result loads with plain `transformers.AutoModelForCausalLM.from_pretrained`.

GGUF: transformers' GGUF reader is the only place HF *modeling* code runs here: it builds the HF
  model to dequantize the file; its state dict is then moved into our class and the HF model dropped.
"""
from __future__ import annotations

import copy
import json
import logging
import re
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple, Union

import torch

from veomni.models.registry import get_spec, text_config

logger = logging.getLogger("veomni")

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_SINGLE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
HEAD_KEY = "lm_head.weight"
# Attributes a diffusion checkpoint adds to the HF config; config_overrides may set them even when
# the config does not have them yet.
DLLM_CONFIG_KEYS = ("mask_token_id", "dllm_attn_mode", "dllm_block_size")

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def resolve_dtype(dtype, config=None) -> torch.dtype:
    """torch.dtype from a dtype, a name ('bf16', 'float32', ...), or None/'auto' (the config's
    recorded dtype, float32 when it records none: the HF v5 'auto' behaviour)."""
    if dtype is None or dtype == "auto":
        recorded = getattr(config, "dtype", None) if config is not None else None
        return resolve_dtype(recorded) if recorded not in (None, "auto") else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).replace("torch.", "")
    if name not in _DTYPES:
        raise ValueError(f"dtype={dtype!r} is not understood; use one of {sorted(_DTYPES)} or a torch.dtype.")
    return _DTYPES[name]


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------
def _split_gguf(path, gguf_file) -> Tuple[str, Optional[str]]:
    """Accept load_model('dir', gguf_file='x.gguf') and load_model('dir/x.gguf')."""
    p = Path(path)
    if gguf_file is None and p.suffix == ".gguf":
        return str(p.parent), p.name
    if gguf_file is not None and Path(gguf_file).is_absolute():
        return str(Path(gguf_file).parent), Path(gguf_file).name
    return str(p), gguf_file


def _weight_files(path: Path) -> Tuple[str, List[Path]]:
    """('safetensors' | 'bin', shard paths) for an HF checkpoint directory."""
    for kind, single, index in (("safetensors", SAFE_SINGLE, SAFE_INDEX), ("bin", BIN_SINGLE, BIN_INDEX)):
        if (path / index).is_file():
            weight_map = json.loads((path / index).read_text())["weight_map"]
            shards = sorted(set(weight_map.values()))
            missing = [s for s in shards if not (path / s).is_file()]
            if missing:
                raise FileNotFoundError(f"{path / index} lists shard files that do not exist: {missing}")
            return kind, [path / s for s in shards]
        if (path / single).is_file():
            return kind, [path / single]
    present = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    raise FileNotFoundError(
        f"No weights in {path}: expected {SAFE_SINGLE}, {SAFE_INDEX}, {BIN_SINGLE} or {BIN_INDEX} "
        f"(found {present}). For a GGUF file pass gguf_file=..."
    )


def _read_shard(file: Path, kind: str) -> Dict[str, torch.Tensor]:
    if kind == "safetensors":
        from safetensors import safe_open

        with safe_open(str(file), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    # weights_only: a pickle from the internet must not be able to run code.
    return torch.load(str(file), map_location="cpu", weights_only=True)


def apply_config_overrides(config, overrides: Optional[dict]):
    """Set config attributes; a key the config does not have (and that is not a dLLM extra) is an
    error, so a typo cannot be silently ignored."""
    for key, value in (overrides or {}).items():
        if not hasattr(config, key) and key not in DLLM_CONFIG_KEYS:
            raise KeyError(
                f"config_overrides key {key!r} is not an attribute of {type(config).__name__} "
                f"(nor one of the dLLM extras {DLLM_CONFIG_KEYS}). Check the spelling."
            )
        setattr(config, key, value)
    return config


def _strip_quantization(config):
    # A GGUF-loaded config carries quantization_config={'quant_method': 'gguf', ...}; our tensors are
    # dequantized floats, and a saved config.json that still says 'gguf' makes transformers refuse
    # to load the directory.
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    return config


def _meta_model(config, attn_impl: str):
    spec = get_spec(config.model_type)
    from veomni.models.editflow import attach_if_configured

    with torch.device("meta"):
        model = attach_if_configured(spec.model_class(config, attn_impl=attn_impl))  # EditFlow heads
    return spec, model


def _is_tied(config) -> bool:
    return bool(getattr(config, "tie_word_embeddings", False))


def missing_weights_error(source, model, missing) -> KeyError:
    """The error for a checkpoint that lacks weights the model needs (eager and sharded loading)."""
    return KeyError(
        f"{source}: checkpoint is missing {len(missing)} weight(s) our "
        f"{type(model).__name__} needs: {missing[:20]}{' ...' if len(missing) > 20 else ''}"
        + (" (an untied head needs lm_head.weight; is tie_word_embeddings right in config.json?)"
           if HEAD_KEY in missing else ""))


def tied_aliases(model) -> tuple:
    """State-dict names that are another parameter under a second name, stored once under the other
    one: a tied lm_head (HF saves it as the embedding), and what a family declares in
    `tied_aliases` (BERT's cls.predictions.decoder.weight / .bias)."""
    return tuple(getattr(model, "tied_aliases", ())) + ((HEAD_KEY,) if _is_tied(model.config) else ())


def _expected_keys(model) -> set:
    keys = set(model.state_dict().keys())  # non-persistent buffers (rotary inv_freq) are excluded
    return keys - set(tied_aliases(model))


def _finish_load(model, device, dtype: torch.dtype, loaded: set, source) -> torch.nn.Module:
    """Re-tie, check completeness, recompute the RoPE buffers, record the dtype."""
    missing = sorted(_expected_keys(model) - loaded)
    extras = model.dllm_extra_parameters() if hasattr(model, "dllm_extra_parameters") else {}
    fresh = [k for k in missing if k in extras]
    if fresh:
        # Our dLLM-only parameters (Qwen3.5's reverse GDN gates): an AR checkpoint lacks them, and
        # their fresh value keeps the model's function equal to the checkpoint's.
        for key in fresh:
            module_name, _, leaf = key.rpartition(".")
            module = model.get_submodule(module_name)
            shape = getattr(module, leaf).shape
            setattr(module, leaf, torch.nn.Parameter(torch.full(shape, extras[key], dtype=dtype, device=device)))
        logger.info("%s: %d dLLM parameter(s) not in the checkpoint, initialised (e.g. %s = %g)",
                    source, len(fresh), fresh[0], extras[fresh[0]])
        missing = [k for k in missing if k not in extras]
    if missing:
        raise missing_weights_error(source, model, missing)
    # assign=True put a new Parameter into embed_tokens; without this lm_head would still point at
    # the meta tensor and forward would fail with "Tensor on device meta".
    model.tie_weights()
    from veomni.models.transformers.dense_decoder import RotaryEmbedding, rope_inv_freq

    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            head_dim = module.inv_freq.numel() * 2
            module.inv_freq = rope_inv_freq(model.config, head_dim).to(device)  # stays fp32 on purpose
    leftovers = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftovers:
        raise RuntimeError(f"{source}: tensors left on the meta device after loading: {leftovers}")
    model.config.dtype = dtype
    return model.eval()  # like HF from_pretrained; call .train() to train


def _assign_shard(model, sd: Dict[str, torch.Tensor], expected: set, device, dtype, source, loaded: set):
    for alias in tied_aliases(model):
        # Some exporters write the tied head too; it is the same tensor, and HF ignores it as well.
        sd.pop(alias, None)
    unexpected = sorted(set(sd) - expected)
    if unexpected:
        raise KeyError(
            f"{source}: checkpoint has {len(unexpected)} weight(s) our {type(model).__name__} does not "
            f"know: {unexpected[:20]}{' ...' if len(unexpected) > 20 else ''}. Wrong model_type, or an "
            "unsupported option in config.json?"
        )
    for key in list(sd):
        t = sd[key]
        # Cast one tensor at a time (the shard's original is released as we go).
        sd[key] = t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device)
    model.load_state_dict(sd, strict=False, assign=True)
    loaded.update(sd)


def load_model(path, dtype=None, attn_impl: str = "sdpa", device="cpu", gguf_file=None,
               config_overrides: Optional[dict] = None):
    """Load an HF checkpoint directory (safetensors single/sharded, or pytorch_model.bin) into our
    model class for its `model_type`. dtype: torch dtype or name; None = dtype in config.json
    (float32 if none). gguf_file: name of a .gguf inside `path` (or pass the .gguf path itself).
    config_overrides: {attr: value} applied to the config before the model is built.
    Returns the model in eval mode on `device`, with config.dtype set to the loaded dtype.
    `path` may also name a model shipped with the project (``embedded:smollm2-135m-instruct``)."""
    from veomni.models.embedded import resolve_model_path

    path, gguf_file = _split_gguf(resolve_model_path(path), gguf_file)
    if gguf_file is not None:
        return _load_gguf(path, gguf_file, dtype, attn_impl, device, config_overrides)
    from transformers import AutoConfig

    root = Path(path)
    if not (root / "config.json").is_file():
        raise FileNotFoundError(f"{root / 'config.json'} not found: `path` must be an HF model directory.")
    config = _strip_quantization(AutoConfig.from_pretrained(str(root)))
    file_spec = get_spec(config.model_type)  # a vision-language wrapper maps its text model's keys
    config = text_config(config)
    apply_config_overrides(config, config_overrides)
    dtype = resolve_dtype(dtype, config)
    device = torch.device(device)
    kind, files = _weight_files(root)
    spec, model = _meta_model(config, attn_impl)
    expected, loaded = _expected_keys(model), set()
    reader = file_spec.hf_reader(config)  # per-expert hub weights are fused as their shards arrive
    for file in files:
        sd = reader(_read_shard(file, kind))
        _assign_shard(model, sd, expected, device, dtype, file, loaded)
        del sd
    reader.finish()
    return _finish_load(model, device, dtype, loaded, root)


def _load_gguf(path, gguf_file, dtype, attn_impl, device, config_overrides):
    # transformers dequantizes GGUF only by building its own model; we take the weights out of it.
    from transformers import AutoModelForCausalLM

    if not (Path(path) / gguf_file).is_file():
        raise FileNotFoundError(f"GGUF file {Path(path) / gguf_file} does not exist.")
    hf_model = AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf_file, dtype=torch.float32)
    config = _strip_quantization(copy.deepcopy(hf_model.config))
    apply_config_overrides(config, config_overrides)
    dtype = resolve_dtype(dtype if dtype is not None else "float32")
    device = torch.device(device)
    spec, model = _meta_model(config, attn_impl)
    expected, loaded = _expected_keys(model), set()
    reader = spec.hf_reader(config)
    sd = reader(dict(hf_model.state_dict()))
    reader.finish()
    del hf_model
    _assign_shard(model, sd, expected, device, dtype, Path(path) / gguf_file, loaded)
    return _finish_load(model, device, dtype, loaded, Path(path) / gguf_file)


def load_tokenizer(path, mask_token: Optional[str] = None, gguf_file=None):
    """AutoTokenizer for an HF directory (or a GGUF file inside it).

    mask_token: when given, the tokenizer is made to have exactly this mask token: added as a special
    token if it has none (then call veomni.models.mask_token.ensure_mask_token(model, tok) so the
    embedding covers it); an error if it already has a *different* one."""
    from transformers import AutoTokenizer

    from veomni.models.embedded import resolve_model_path

    path, gguf_file = _split_gguf(resolve_model_path(path), gguf_file)
    kwargs = {"gguf_file": gguf_file} if gguf_file is not None else {}
    tok = AutoTokenizer.from_pretrained(path, **kwargs)
    if mask_token is not None:
        if tok.mask_token is None:
            tok.add_special_tokens({"mask_token": mask_token})
        elif tok.mask_token != mask_token:
            raise ValueError(
                f"The tokenizer in {path} already has mask token {tok.mask_token!r} "
                f"(id {tok.mask_token_id}); asked for {mask_token!r}. Use the existing one "
                "(mask_token=None) or another tokenizer."
            )
    return tok


# ---------------------------------------------------------------------------------------------
# saving
# ---------------------------------------------------------------------------------------------
def parse_size(size: Union[int, str]) -> int:
    """'2GB' -> 2e9 bytes, '500MiB' -> 500*2**20, 123 -> 123 (same units as HF's max_shard_size)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(size), flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"max_shard_size={size!r} is not a size like '2GB', '500MiB' or an int of bytes.")
    unit = (m.group(2) or "B").upper()
    power = " KMGT".index(unit[0]) if unit != "B" else 0
    base = 1024 if "I" in unit else 1000
    return int(float(m.group(1)) * base**power)


def _shard_groups(tensors: Dict[str, torch.Tensor], limit: int, dtype) -> List[List[str]]:
    """Greedy split of keys (in order) into groups of at most `limit` bytes; a single tensor larger
    than the limit gets a shard of its own (as HF does)."""
    groups, current, size = [], [], 0
    for key, t in tensors.items():
        nbytes = t.numel() * (torch.empty((), dtype=dtype).element_size() if t.is_floating_point()
                              else t.element_size())
        if current and size + nbytes > limit:
            groups.append(current)
            current, size = [], 0
        current.append(key)
        size += nbytes
    if current:
        groups.append(current)
    return groups


def _state_dict_for_save(model) -> Dict[str, torch.Tensor]:
    sd = model.state_dict()
    tied = _is_tied(model.config)
    head, emb = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    if tied and head is not emb:
        raise ValueError(
            "config.tie_word_embeddings is True but lm_head.weight is not embed_tokens.weight "
            "(call model.tie_weights(), or set tie_word_embeddings=False to save both)."
        )
    if not tied and head is emb:
        raise ValueError("lm_head.weight is embed_tokens.weight but config.tie_word_embeddings is False.")
    for alias in tied_aliases(model):
        sd.pop(alias, None)  # HF convention: a tied head is stored once, as the embedding
    for key, t in sd.items():
        if t.is_meta:
            raise ValueError(f"Cannot save {key}: it is on the meta device (model not loaded/initialised).")
        if type(t) is not torch.Tensor and type(t).__name__ == "DTensor":
            raise ValueError(
                f"Cannot save {key}: it is a sharded DTensor. Gather a full state dict first "
                "(veomni.checkpoint's HF export does this)."
            )
    return sd


def _remove_stale_weights(root: Path) -> None:
    # A directory that held a sharded save and now gets a single file (or the other way round) would
    # otherwise keep both, and loaders prefer the index -> stale weights. HF cleans up the same way.
    pattern = re.compile(r"^(model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json|"
                         r"pytorch_model(-\d{5}-of-\d{5})?\.bin|pytorch_model\.bin\.index\.json)$")
    for p in root.iterdir():
        if p.is_file() and pattern.match(p.name):
            p.unlink()


def save_model(model, path, tokenizer=None, max_shard_size: Union[int, str] = "2GB", dtype=None,
               generation_config: bool = True) -> Path:
    """Write an HF-compatible directory: config.json, model.safetensors (or shards + index),
    generation_config.json, and the tokenizer when given. dtype: save dtype (None = the model's).
    Returns the directory."""
    from safetensors.torch import save_file

    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    spec = get_spec(model.config.model_type)
    dtype = resolve_dtype(dtype) if dtype is not None else model.get_input_embeddings().weight.dtype
    config = _strip_quantization(copy.deepcopy(model.config))
    import transformers

    if not hasattr(transformers, spec.class_name):
        raise ValueError(f"architectures: transformers has no class {spec.class_name!r} to record.")
    config.architectures = [spec.class_name]
    config.dtype = dtype
    if tokenizer is not None and getattr(config, "mask_token_id", None) is not None:
        if tokenizer.mask_token_id != config.mask_token_id:
            raise ValueError(
                f"config.mask_token_id={config.mask_token_id} but the tokenizer's mask id is "
                f"{tokenizer.mask_token_id}: run ensure_mask_token(model, tokenizer) before saving."
            )

    sd = spec.hf_writer(_state_dict_for_save(model))  # MoE: fused experts -> one weight per expert
    groups = _shard_groups(sd, parse_size(max_shard_size), dtype)
    _remove_stale_weights(root)
    names = ([SAFE_SINGLE] if len(groups) == 1
             else [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))])
    weight_map, total = {}, 0
    for name, keys in zip(names, groups):
        # One shard converted at a time: a full-model copy in the save dtype never exists.
        shard = {}
        for k in keys:
            t = sd[k].detach()
            t = t.to(dtype) if t.is_floating_point() else t
            shard[k] = t.to("cpu").contiguous()
            total += shard[k].numel() * shard[k].element_size()
            weight_map[k] = name
        save_file(shard, str(root / name), metadata={"format": "pt"})  # "pt": transformers checks it
        del shard
    if len(groups) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (root / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")

    config.save_pretrained(str(root))
    if generation_config:
        from transformers import GenerationConfig

        GenerationConfig.from_model_config(config).save_pretrained(str(root))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(root))
    return root


def checkpoint_keys(path) -> List[str]:
    """All weight names stored in an HF directory (headers only for safetensors)."""
    root = Path(path)
    kind, files = _weight_files(root)
    if kind == "safetensors":
        from safetensors import safe_open

        keys: List[str] = []
        for f in files:
            with safe_open(str(f), framework="pt") as h:
                keys.extend(h.keys())
        return sorted(keys)
    return sorted(k for f in files for k in _read_shard(f, kind))


__all__: Iterable[str] = [
    "load_model", "save_model", "load_tokenizer", "resolve_dtype", "parse_size", "checkpoint_keys",
    "apply_config_overrides",
]
