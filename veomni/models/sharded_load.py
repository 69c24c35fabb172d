"""Load a model for FSDP2 without materialising it on every rank.

The eager path (every rank: load_model -> ensure_mask_token -> parallelize) holds the whole model on
every rank until FSDP2 shards it, so a node with 8 ranks needs 8 copies of the model in host memory.
Here the model is built without data and each rank only ever fills its own shards:

    model, meta_load = prepare_meta_model(path, tokenizer, mask_token, dtype, attn_impl, ps, ...)
    ...record config, freeze, apply_ops (they read no weights)...
    parallelize(model, ps, {..., "check_replicas": False})   # EP + FSDP2 shards of meta tensors
    meta_load.load(model)                                   # allocate and fill this rank's shards

1. The model is built on the meta device (shapes only) in the load dtype; the mask-token plan
   (veomni/models/mask_token.py, the same decisions as ensure_mask_token) grows its embedding.
2. `parallelize` shards it as it would a real model (expert parallelism, then FSDP2).
3. `load`: `to_empty` allocates this rank's shards only, then each parameter's local chunk (its
   global offsets and sizes, `DTensor.__create_chunk_list__`, what DCP loads by) is filled from
   one of two sources:
   - safetensors (any HF directory, and the embedded SmolLM2): every rank reads only its slices
     (positioned reads of their byte ranges, headers first). Per-expert hub weights are stacked for the rank's
     experts only; mask rows get the mean of the trained rows; dLLM-only parameters (Qwen3.5's
     reverse gates) their constant; RoPE's inv_freq (a non-persistent buffer) is recomputed.
     No rank ever holds the whole model.
   - rank-0 broadcast (init_from_scratch, a GGUF file, pytorch_model.bin): rank 0 builds the model
     the eager way (same code, same seed, so the same random weights) and broadcasts one tensor at a
     time; each rank keeps its chunk. Only rank 0 holds the whole model (with its shards: on one
     process that would be two copies, so one process builds eagerly instead).
Both give the eager path's weights bit for bit (tests/distributed/test_meta_init.py). DDP and a
single process without FSDP need the whole model on each rank anyway and keep the eager path.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
from contextlib import ExitStack
from pathlib import Path
from typing import Callable, Dict, NamedTuple, Optional, Tuple

import torch
import torch.nn as nn

from veomni.models.hf_io import (HEAD_KEY, _expected_keys, _is_tied, _split_gguf, _strip_quantization,
                                 _weight_files, missing_weights_error)
from veomni.models.mask_token import MaskPlan, apply_mask_plan, mean_row, plan_mask_token
from veomni.models.registry import build_model, get_spec, text_config

logger = logging.getLogger("veomni")

_WRAPPER = "_checkpoint_wrapped_module."  # activation checkpointing's module prefix (not in checkpoints)


def _clean(name: str) -> str:
    return name.replace(_WRAPPER, "")


def _local_chunk(t: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, ...], Tuple[int, ...]]:
    """(this rank's local tensor, its global offsets, its sizes); a plain tensor is its own chunk."""
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        chunks = t.__create_chunk_list__()
        if len(chunks) != 1:
            raise NotImplementedError(f"a shard made of {len(chunks)} chunks cannot be loaded slice-wise")
        return t.to_local(), tuple(chunks[0].offsets), tuple(chunks[0].sizes)
    return t, (0,) * t.dim(), tuple(t.shape)


def _index(offsets, sizes) -> tuple:
    return tuple(slice(o, o + s) for o, s in zip(offsets, sizes))


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # As hf_io._assign_shard: floating tensors are cast to the load dtype, others kept.
    return t.to(dtype) if t.is_floating_point() else t


# ---------------------------------------------------------------------------------------------
# safetensors headers
# ---------------------------------------------------------------------------------------------
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


class _Entry(NamedTuple):
    shape: Tuple[int, ...]
    dtype: Optional[torch.dtype]  # None: a dtype read through safetensors itself (fp8, ...)
    itemsize: int
    start: int  # absolute byte offset of the tensor in the file


def _read_header(path: Path) -> Dict[str, _Entry]:
    """The safetensors header (8-byte little-endian length, JSON): key -> shape, dtype, byte offset."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    out = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        dtype = _ST_DTYPES.get(info["dtype"])
        begin, end = info["data_offsets"]
        numel = 1
        for d in info["shape"]:
            numel *= d
        itemsize = (end - begin) // numel if numel else (torch.empty((), dtype=dtype).element_size() if dtype else 1)
        out[key] = _Entry(tuple(info["shape"]), dtype, itemsize, 8 + n + begin)
    return out


# ---------------------------------------------------------------------------------------------
# sources
# ---------------------------------------------------------------------------------------------
class SafetensorsSource:
    """Our parameter names -> slices of an HF safetensors checkpoint, read on demand.

    Built from the headers alone, with the eager loader's checks (hf_io.load_model): unknown
    weights, missing weights, incomplete experts and shape mismatches are errors naming the key."""

    def __init__(self, root: Path, files, file_spec, config, model: nn.Module, dtype: torch.dtype):
        from veomni.models.moe_weights import _NAMES, _PART

        self.root, self.dtype = root, dtype
        self.where: Dict[str, Path] = {}  # hub key -> file
        self.entries: Dict[str, _Entry] = {}  # hub key -> where its bytes are
        shapes: Dict[str, Tuple[int, ...]] = {}
        for f in files:
            for k, entry in _read_header(f).items():
                if k in self.where:
                    raise KeyError(f"{root}: weight {k} is stored twice ({self.where[k].name} and {f.name})")
                self.where[k], self.entries[k], shapes[k] = f, entry, entry.shape
        # hf_to_ours only renames and drops keys (values pass through), so applied to {name: name}
        # it maps our names to the hub's without reading a tensor.
        names = file_spec.hf_to_ours({k: k for k in self.where})
        skipped: Dict[str, int] = {}
        for key in [k for k in names if file_spec.skip_prefixes and k.startswith(file_spec.skip_prefixes)]:
            prefix = next(p for p in file_spec.skip_prefixes if key.startswith(p))
            skipped[prefix] = skipped.get(prefix, 0) + 1
            del names[key]
        if skipped:
            logger.info("skipped checkpoint weights this model does not use: %s",
                        ", ".join(f"{n} x {p}*" for p, n in sorted(skipped.items())))
        self.plain: Dict[str, str] = {}  # our key -> hub key
        self.experts: Dict[str, Tuple[str, str]] = {}  # our fused key -> (layer prefix, gate_up | down_proj)
        self.parts: Dict[str, Dict[Tuple[str, int], str]] = {}  # prefix -> {(part, expert): hub key}
        num_experts = getattr(config, "num_experts", 0) if file_spec.fused_experts else 0
        for ours, hub in names.items():
            m = _PART.match(ours) if num_experts else None
            if m is None:
                self.plain[ours] = hub
                continue
            if int(m["j"]) >= num_experts:
                raise KeyError(f"{hub}: expert {m['j']} but config.num_experts={num_experts}")
            self.parts.setdefault(m["prefix"], {})[(m["name"], int(m["j"]))] = hub
        for prefix, got in self.parts.items():
            if len(got) != 3 * num_experts:
                missing = [f"{prefix}.{j}.{n}.weight" for j in range(num_experts) for n in _NAMES
                           if (n, j) not in got]
                raise KeyError(f"checkpoint has only some experts of MoE layer {prefix}; missing e.g. "
                               f"{missing[:6]}{' ...' if len(missing) > 6 else ''}")
            self.experts[f"{prefix}.gate_up_proj"] = (prefix, "gate_up_proj")
            self.experts[f"{prefix}.down_proj"] = (prefix, "down_proj")
        if _is_tied(config):
            self.plain.pop(HEAD_KEY, None)  # some exporters write the tied head too (hf_io does the same)
        self._check(model, shapes, num_experts)
        self.means: Dict[str, MaskPlan] = {}  # embedding / untied head key -> the mask plan
        self._mean_cache: Dict[str, torch.Tensor] = {}
        self._stack: Optional[ExitStack] = None
        self._files: Dict[Path, object] = {}

    def _check(self, model, shapes, num_experts) -> None:
        expected = _expected_keys(model)
        ours = set(self.plain) | set(self.experts)
        unexpected = sorted(ours - expected)
        if unexpected:
            raise KeyError(
                f"{self.root}: checkpoint has {len(unexpected)} weight(s) our {type(model).__name__} does not "
                f"know: {unexpected[:20]}{' ...' if len(unexpected) > 20 else ''}. Wrong model_type, or an "
                "unsupported option in config.json?")
        extras = model.dllm_extra_parameters() if hasattr(model, "dllm_extra_parameters") else {}
        missing = sorted(expected - ours)
        self.constants = {k: extras[k] for k in missing if k in extras}
        missing = [k for k in missing if k not in extras]
        if missing:
            raise missing_weights_error(self.root, model, missing)
        if self.constants:
            first = next(iter(self.constants))
            logger.info("%s: %d dLLM parameter(s) not in the checkpoint, initialised (e.g. %s = %g)",
                        self.root, len(self.constants), first, self.constants[first])
        params = dict(model.named_parameters(remove_duplicate=False))
        for key, hub in self.plain.items():
            if shapes[hub] != tuple(params[key].shape):
                raise ValueError(f"{self.root}: size mismatch for {key}: the checkpoint's {hub} is "
                                 f"{list(shapes[hub])}, the model's is {list(params[key].shape)}")
        for key, (prefix, which) in self.experts.items():
            parts = self.parts[prefix]
            if which == "gate_up_proj":
                g, u = shapes[parts[("gate_proj", 0)]], shapes[parts[("up_proj", 0)]]
                stored = (num_experts, g[0] + u[0]) + g[1:]
            else:
                stored = (num_experts,) + shapes[parts[("down_proj", 0)]]
            names = ("gate_proj", "up_proj") if which == "gate_up_proj" else ("down_proj",)
            per_expert = {shapes[h] for (n, _), h in parts.items() if n in names}  # one shape for all
            if stored != tuple(params[key].shape) or len(per_expert) != 1:
                raise ValueError(f"{self.root}: size mismatch for {key}: the checkpoint's experts give "
                                 f"{list(stored)} (per-expert shapes {sorted(per_expert)}), the model's is "
                                 f"{list(params[key].shape)}")

    # ---- the mask rows ----------------------------------------------------------------------
    def set_mask_plan(self, model, plan: MaskPlan) -> None:
        """Before the plan grows `model` (meta): remember which keys get mean rows."""
        names = {id(p): n for n, p in model.named_parameters()}
        self.means[names[id(model.get_input_embeddings().weight)]] = plan
        head = model.get_output_embeddings()
        if head is not None and head.weight is not model.get_input_embeddings().weight:
            self.means[names[id(head.weight)]] = plan

    def prefetch(self, key: str, offsets, sizes) -> None:
        """Called for every chunk before any shard is allocated: a chunk holding a mask row needs
        the mean over the whole trained vocabulary, read now so it does not add to the peak."""
        plan = self.means.get(key)
        if plan is None or not sizes or sizes[0] == 0:
            return
        rows = range(offsets[0], offsets[0] + sizes[0])
        if key not in self._mean_cache and any(r in rows for r in plan.mean_rows):
            hub = self.plain[key]
            with self:
                # Cast first, as the eager path holds the weight in the load dtype when it takes the mean.
                full = _cast(self._slice(hub, (), ()), self.dtype)
            self._mean_cache[key] = mean_row(full, plan.trained_rows)
            del full

    # ---- reading ------------------------------------------------------------------------------
    def __enter__(self):
        self._stack = ExitStack()
        return self

    def __exit__(self, *exc) -> None:
        self._files.clear()
        self._stack.close()
        self._stack = None

    def _file(self, path: Path):
        if path not in self._files:
            self._files[path] = self._stack.enter_context(open(path, "rb", buffering=0))
        return self._files[path]

    def _slice(self, hub: str, offsets, sizes) -> torch.Tensor:
        """Rows [offsets[0], +sizes[0]) of `hub` (all of it for empty offsets/sizes), as stored.

        A block of whole rows is one byte range of the file: it is read with a positioned read
        into fresh memory. (safetensors' get_slice reads through mmap, and every file page it
        touches counts in the process's resident memory until the file is closed: ~2x the
        shard at the peak.) Other chunks (a split inside a row) go through safetensors."""
        e = self.entries[hub]
        offsets, sizes = (tuple(offsets) or (0,) * len(e.shape)), (tuple(sizes) or e.shape)
        whole_rows = len(e.shape) == 0 or (all(o == 0 for o in offsets[1:]) and tuple(sizes[1:]) == e.shape[1:])
        if e.dtype is None or not whole_rows:
            from safetensors import safe_open

            with safe_open(str(self.where[hub]), framework="pt") as h:
                return h.get_slice(hub)[_index(offsets, sizes)] if e.shape else h.get_tensor(hub)
        row = e.itemsize
        for n in e.shape[1:]:
            row *= n
        buf = bytearray(row * (sizes[0] if e.shape else 1))
        f = self._file(self.where[hub])
        f.seek(e.start + (offsets[0] * row if e.shape else 0))
        view, done = memoryview(buf), 0
        while done < len(buf):
            n = f.readinto(view[done:])
            if not n:
                raise OSError(f"{self.where[hub]}: file ends inside {hub} (truncated checkpoint?)")
            done += n
        t = torch.frombuffer(buf, dtype=e.dtype) if buf else torch.empty(0, dtype=e.dtype)
        return t.reshape(tuple(sizes) if e.shape else ())

    def read(self, key: str, shape, offsets, sizes, dtype: torch.dtype) -> torch.Tensor:
        """The chunk (global offsets, sizes) of our parameter `key` (global `shape`), in the load dtype."""
        if any(s == 0 for s in sizes):
            return torch.empty(sizes, dtype=dtype)
        if key in self.constants:
            return torch.full(sizes, self.constants[key], dtype=dtype)
        if key in self.experts:
            return self._read_experts(key, offsets, sizes)
        plan = self.means.get(key)
        if plan is None:
            return _cast(self._slice(self.plain[key], offsets, sizes), self.dtype)
        # Embedding / untied head of a model that got a mask token: rows past the checkpoint's and
        # the spare row take the mean; the other rows come from the file.
        out = torch.empty(sizes, dtype=dtype)
        lo, hi = offsets[0], offsets[0] + sizes[0]
        stored_hi = min(hi, plan.old_rows)
        if stored_hi > lo:
            part = self._slice(self.plain[key], (lo,) + tuple(offsets[1:]), (stored_hi - lo,) + tuple(sizes[1:]))
            out[: stored_hi - lo] = _cast(part, self.dtype)
        for r in plan.mean_rows:
            if lo <= r < hi:
                out[r - lo] = self._mean_cache[key][_index(offsets[1:], sizes[1:])]
        return out

    def _read_experts(self, key: str, offsets, sizes) -> torch.Tensor:
        prefix, which = self.experts[key]
        parts = self.parts[prefix]
        rows = []
        for j in range(offsets[0], offsets[0] + sizes[0]):  # this rank's experts only
            if which == "gate_up_proj":  # row block [0, I) = gate_proj, [I, 2I) = up_proj
                full = torch.cat([self._slice(parts[("gate_proj", j)], (), ()),
                                  self._slice(parts[("up_proj", j)], (), ())], dim=0)
            else:
                full = self._slice(parts[("down_proj", j)], (), ())
            rows.append(full[_index(offsets[1:], sizes[1:])])
        return _cast(torch.stack(rows), self.dtype)

    def fill_buffers(self, model: nn.Module, device) -> None:
        """Non-persistent buffers are in no checkpoint: recompute them (as hf_io._finish_load)."""
        from veomni.models.transformers.dense_decoder import RotaryEmbedding, rope_inv_freq

        done = set()
        for module in model.modules():
            if isinstance(module, RotaryEmbedding):
                module.inv_freq = rope_inv_freq(model.config, module.inv_freq.numel() * 2).to(device)
                done.add(id(module.inv_freq))
        unknown = [n for n, b in model.named_buffers() if id(b) not in done]
        if unknown:
            raise NotImplementedError(f"buffers {unknown} have no known initial value; teach "
                                      "veomni/models/sharded_load.py to compute them, or set model.meta_init=false")

    def fingerprint(self) -> str:
        """Same files on every rank? Names, sizes, headers and the first/last MiB of the data."""
        digest = hashlib.sha256()
        for f in sorted(set(self.where.values())):
            size = f.stat().st_size
            digest.update(f"{f.name}:{size}".encode())
            with open(f, "rb") as fh:
                head = fh.read(8)
                n = int.from_bytes(head, "little")
                digest.update(fh.read(n + (1 << 20)))
                fh.seek(max(0, size - (1 << 20)))
                digest.update(fh.read())
        return digest.hexdigest()


class BroadcastSource:
    """Rank 0 holds the eagerly built model; every tensor is broadcast from it, one at a time, and
    each rank keeps its own chunk."""

    def __init__(self, eager: Optional[nn.Module], ps):
        self.ps = ps
        self.tensors = {} if eager is None else {
            **{n: t for n, t in eager.named_parameters()}, **{n: t for n, t in eager.named_buffers()}}

    def check(self, names_shapes: Dict[str, Tuple[Tuple[int, ...], torch.dtype]]) -> None:
        """Rank 0 compares names, shapes and dtypes with the sharded model before any broadcast;
        every rank raises the same error (a mismatch would otherwise hang the others)."""
        error = None
        if self.ps.is_main:
            bad = [f"{n}: {tuple(self.tensors[n].shape) if n in self.tensors else 'missing'}"
                   f" {self.tensors[n].dtype if n in self.tensors else ''} vs {s} {d}"
                   for n, (s, d) in names_shapes.items()
                   if n not in self.tensors or tuple(self.tensors[n].shape) != s or self.tensors[n].dtype != d]
            if bad:
                error = f"rank 0's eager model does not match the sharded one: {bad[:10]}"
        error = self.ps.broadcast_object(error)
        if error:
            raise RuntimeError(error)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.tensors.clear()  # rank 0 drops its full copy

    def prefetch(self, key, offsets, sizes) -> None:
        pass

    def read(self, key: str, shape, offsets, sizes, dtype: torch.dtype) -> torch.Tensor:
        """The whole tensor goes out from rank 0 (which then lets go of it); each rank keeps its chunk."""
        import torch.distributed as dist

        if self.ps.is_main:
            full = self.tensors.pop(key).detach().to(self.ps.device).contiguous()
        else:
            full = torch.empty(shape, dtype=dtype, device=self.ps.device)
        if self.ps.world_size > 1:
            dist.broadcast(full, src=0)
        return full[_index(offsets, sizes)]

    def fill_buffers(self, model: nn.Module, device) -> None:
        # Small (RoPE frequencies): sent as objects, so each keeps rank 0's dtype exactly.
        wanted = {_clean(n) for n, _ in model.named_buffers()}
        bufs = ({n: t.detach().cpu() for n, t in self.tensors.items() if n in wanted}
                if self.ps.is_main else None)
        bufs = self.ps.broadcast_object(bufs)
        for name, _ in list(model.named_buffers()):
            owner, _, leaf = name.rpartition(".")
            key = _clean(name)
            if key not in bufs:
                raise KeyError(f"buffer {key} is not in rank 0's eager model")
            setattr(model.get_submodule(owner) if owner else model, leaf, bufs[key].to(device))


# ---------------------------------------------------------------------------------------------
# the two steps
# ---------------------------------------------------------------------------------------------
class MetaLoad:
    """What `load(model)` needs after `parallelize`: where the weights come from."""

    def __init__(self, source, ps, config_dtype: Optional[torch.dtype]):
        self.source, self.ps, self.config_dtype = source, ps, config_dtype

    @torch.no_grad()
    def load(self, model: nn.Module) -> nn.Module:
        """Allocate this rank's shards (`to_empty`) and fill them; returns the model (in place)."""
        from veomni.distributed.utils import unwrap_model

        inner = unwrap_model(model)
        device = self.ps.device
        metas = [(_clean(n), p) for n, p in model.named_parameters()]
        not_meta = [n for n, p in metas if not p.is_meta]
        if not_meta:
            raise RuntimeError(f"MetaLoad.load expects a model on the meta device; {not_meta[:5]} are not")
        if isinstance(self.source, BroadcastSource):
            self.source.check({n: (tuple(p.shape), p.dtype) for n, p in metas})
        for name, p in metas:
            self.source.prefetch(name, *_local_chunk(p)[1:])
        tied = _is_tied(inner.config)
        model.to_empty(device=device)
        if tied and inner.get_output_embeddings().weight is not inner.get_input_embeddings().weight:
            # A plain module's to_empty makes a new Parameter per name, which unties the head (FSDP2
            # keeps the shared one): point it at the embedding again.
            inner.tie_weights()
        with self.source:
            for name, p in model.named_parameters():
                name = _clean(name)
                local, offsets, sizes = _local_chunk(p)
                local.copy_(self.source.read(name, tuple(p.shape), offsets, sizes, p.dtype))
            self.source.fill_buffers(model, device)
        if self.config_dtype is not None:
            inner.config.dtype = self.config_dtype  # as hf_io._finish_load records it
        return model


def _meta_build(config, attn_impl: str, dtype: torch.dtype) -> nn.Module:
    with torch.device("meta"):
        model = build_model(config, attn_impl=attn_impl)
    return model.to(dtype)


def prepare_meta_model(path, tokenizer, mask_token: str, dtype: torch.dtype, attn_impl: str, ps,
                       from_scratch: bool, build_eager: Callable[[], nn.Module]):
    """(model on the meta device, MetaLoad) for `path`; the tokenizer gets its mask token.

    build_eager: the eager path's model builder (load or random init); rank 0 calls it when the
    weights cannot be read slice-wise (init_from_scratch, GGUF, pytorch_model.bin). On one process
    that case returns (the eager model with its mask token, None): nothing to load afterwards."""
    from transformers import AutoConfig

    root, gguf_file = _split_gguf(path, None)
    root = Path(root)
    kind = None
    if not from_scratch and gguf_file is None:
        kind, files = _weight_files(root)
    if kind == "safetensors":
        config = _strip_quantization(AutoConfig.from_pretrained(str(root)))
        file_spec = get_spec(config.model_type)
        config = text_config(config)
        model = _meta_build(config, attn_impl, dtype)
        source = SafetensorsSource(root, files, file_spec, config, model, dtype)
        plan = plan_mask_token(model.get_input_embeddings().weight.shape[0], tokenizer, mask_token)
        source.set_mask_plan(model, plan)
        apply_mask_plan(model, plan)
        _check_same_checkpoint(source, ps)
        logger.info("meta-device init: each rank reads its own shards of %s", root)
        return model, MetaLoad(source, ps, config_dtype=dtype)
    why = "init_from_scratch" if from_scratch else ("GGUF" if gguf_file else "pytorch_model.bin")
    if ps.world_size == 1:
        # Rank 0 would hold the eager model and its shard (= the whole model) at once: 2x for nothing.
        model = build_eager()
        apply_mask_plan(model, plan_mask_token(model.get_input_embeddings().weight.shape[0], tokenizer, mask_token))
        logger.info("one process, %s: the model is built eagerly (a broadcast would only add a copy)", why)
        return model, None
    # Rank 0 builds the model the eager way; the others only learn its config.
    eager = build_eager() if ps.is_main else None
    config = ps.broadcast_object(copy.deepcopy(eager.config) if ps.is_main else None)
    if from_scratch and ps.world_size > 1:
        # The eager path drew the random init on every rank from the same seed, leaving every
        # rank's generator in rank 0's state; keep it that way for whatever draws next.
        torch.set_rng_state(ps.broadcast_object(torch.get_rng_state() if ps.is_main else None))
    model = _meta_build(config, attn_impl, dtype)
    plan = plan_mask_token(model.get_input_embeddings().weight.shape[0], tokenizer, mask_token)
    apply_mask_plan(model, plan)
    if eager is not None:
        apply_mask_plan(eager, plan)  # = ensure_mask_token on the eager model, with the same plan
    logger.info("meta-device init (%s): rank 0 builds the model and broadcasts it into the shards", why)
    return model, MetaLoad(BroadcastSource(eager, ps), ps, config_dtype=None)


def _check_same_checkpoint(source: SafetensorsSource, ps) -> None:
    # Replaces parallelize's weight fingerprint (there are no weights yet): ranks reading different
    # files (another version on some node's disk) would train a patchwork of two models.
    if ps.world_size == 1:
        return
    prints = ps.all_gather_object(source.fingerprint())
    if any(p != prints[0] for p in prints):
        bad = [r for r, p in enumerate(prints) if p != prints[0]]
        raise RuntimeError(f"ranks {bad} see a different checkpoint in {source.root} than rank 0 (file names, "
                           "sizes, headers or data differ); give every node the same files.")


__all__ = ["prepare_meta_model", "MetaLoad", "SafetensorsSource", "BroadcastSource"]
