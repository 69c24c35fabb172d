"""Apply activation checkpointing and data parallelism to a single-device model, from outside.

The model code (veomni/models/transformers/dense_decoder.py) knows nothing about ranks. This file
wraps it in a fixed order, the one torchtitan's `parallelize_<model>` uses:

    1. expert parallelism        (ep_size > 1: experts split over the ep mesh, all-to-all dispatch;
                                  veomni/distributed/expert_parallel.py)
    2. sequence parallelism      (sp_size > 1: Ulysses hooks on the token mixers;
                                  veomni/distributed/sequence_parallel.py)
    3. activation checkpointing  (each decoder block, so the wrapper sits inside the FSDP unit)
    4. torch.compile             (train.compile: each block's forward, around its checkpoint wrapper;
                                  veomni/models/compile.py)
    5. data parallel             (FSDP2 over dp_shard x sp: each Experts module over ep_fsdp under
                                  EP, each block, then the root; or DDP around the whole model; or
                                  DeepSpeed ZeRO-2/3, veomni/distributed/deepspeed_engine.py)

Gradient contract: both FSDP2 and DDP AVERAGE gradients over the ranks they span (dp x sp). See
`loss_scale_for_grad_averaging` in parallel_state.py and docs/parallelism.md.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, fields
from typing import Any, Mapping, Optional, Union

import torch
import torch.nn as nn

from .parallel_state import DP_MODES, ParallelState
from .utils import unwrap_model

logger = logging.getLogger(__name__)

MIXED_PRECISION = ("fp32", "bf16")


@dataclass
class ParallelizeConfig:
    """What `parallelize` applies. dp_mode None = the parallel state's mode."""

    dp_mode: Optional[str] = None
    mixed_precision: str = "fp32"  # 'bf16': bf16 compute, fp32 master weights and grad reduction
    gradient_checkpointing: bool = False
    check_replicas: bool = True  # FSDP2: fail if ranks start from different weights (see below)
    deepspeed: Optional[Any] = None  # DeepSpeedOptions (zero stage, offload, ...) for dp_mode='deepspeed'
    compile: bool = False  # torch.compile each decoder block (veomni/models/compile.py)

    def __post_init__(self):
        if self.dp_mode is not None and self.dp_mode not in DP_MODES:
            raise ValueError(f"dp_mode={self.dp_mode!r} is not one of {DP_MODES}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision={self.mixed_precision!r} is not one of {MIXED_PRECISION}")
        if self.deepspeed is not None and self.dp_mode not in (None, "deepspeed"):
            raise ValueError(f"DeepSpeed options were given but dp_mode={self.dp_mode!r}; use dp_mode='deepspeed'.")
        if self.compile and (self.dp_mode == "deepspeed" or self.deepspeed is not None):
            # ZeRO-3 gathers parameters in module hooks that dynamo would trace; not tested here.
            raise ValueError("train.compile=true is not supported with train.data_parallel=deepspeed; use "
                             "fsdp2, ddp or none, or set train.compile=false.")

    @classmethod
    def from_args(cls, args) -> "ParallelizeConfig":
        """From veomni.arguments.Arguments: train.data_parallel, train.mixed_precision,
        model.gradient_checkpointing."""
        from .deepspeed_engine import deepspeed_options

        t = args.train
        ds = deepspeed_options(t, t.grad_accum_steps) if t.data_parallel == "deepspeed" else None  # after resolve_batch
        return cls(dp_mode=t.data_parallel, mixed_precision=t.mixed_precision,
                   gradient_checkpointing=args.model.gradient_checkpointing, deepspeed=ds, compile=t.compile)


def _as_config(cfg: Union[ParallelizeConfig, Mapping[str, Any], None]) -> ParallelizeConfig:
    if cfg is None:
        return ParallelizeConfig()
    if isinstance(cfg, ParallelizeConfig):
        return cfg
    if isinstance(cfg, Mapping):
        known = {f.name for f in fields(ParallelizeConfig)}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ValueError(f"unknown parallelize option(s) {unknown}; known: {sorted(known)}")
        return ParallelizeConfig(**cfg)
    raise TypeError(f"cfg must be a ParallelizeConfig or a dict, got {type(cfg).__name__}")


def _decoder_blocks(model: nn.Module) -> nn.ModuleList:
    # A family with another layout names its blocks itself (the BERT encoder: bert.encoder.layer).
    layers = model.blocks() if hasattr(model, "blocks") else getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"{type(model).__name__} has no `.model.layers` ModuleList of decoder blocks; "
                        "parallelize() expects the DecoderForCausalLM layout.")
    return layers


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Wrap each decoder block so its activations are recomputed in backward."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper, checkpoint_wrapper

    blocks = _decoder_blocks(model)
    for i, block in enumerate(blocks):
        # Idempotent: a block wrapped twice would run its forward three times per step.
        if not isinstance(block, CheckpointWrapper):
            # Non-reentrant checkpointing: works with FSDP2 hooks and non-tensor args (AttnMeta).
            blocks[i] = checkpoint_wrapper(block)


def apply_compile(model: nn.Module, ps: ParallelState) -> None:
    """torch.compile each decoder block (veomni/models/compile.py has why and how)."""
    from veomni.models.compile import compile_decoder_layers

    if ps.sp_size > 1 or ps.ep_size > 1:
        # Their all-to-all hooks would run inside the compiled block; no equivalence test covers that yet.
        raise ValueError(f"train.compile=true is not supported with sequence or expert parallelism yet "
                         f"(ulysses_parallel_size={ps.sp_size}, expert_parallel_size={ps.ep_size}); set "
                         "train.compile=false or both sizes to 1.")
    n = compile_decoder_layers(model)
    logger.info("torch.compile: %d decoder blocks compiled (compilation happens on the first steps)", n)


def _check_same_weights(model: nn.Module, ps: ParallelState) -> None:
    # FSDP2 does not broadcast: each rank keeps ITS slice of ITS OWN copy. Ranks that built the model
    # with different seeds would silently train a patchwork of several initialisations.
    with torch.no_grad():
        fp = torch.zeros(2, dtype=torch.float64)
        for p in model.parameters():
            fp[0] += p.detach().double().sum().cpu()
            fp[1] += p.detach().double().abs().sum().cpu()
    prints = ps.all_gather_object(fp.tolist())
    if any(p != prints[0] for p in prints):
        raise RuntimeError(
            "parallelize: ranks hold different initial weights (parameter fingerprints differ: "
            f"{prints}). Seed every rank identically before building the model, or load the same "
            "checkpoint on every rank; set check_replicas=False to skip this check.")


def apply_fsdp2(model: nn.Module, ps: ParallelState, mixed_precision: str) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if mixed_precision == "bf16":
        # Params stay fp32 (master weights, optimizer in fp32); FSDP casts the gathered copy to
        # bf16 for compute and reduces gradients in fp32 (bf16 reduce loses small gradients).
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        mp = MixedPrecisionPolicy()  # no casting
    mesh = ps.fsdp_mesh()
    for block in _decoder_blocks(model):
        if ps.ep_size > 1:
            from .expert_parallel import expert_modules

            for experts in expert_modules(block):
                # Experts are DTensors on the ep mesh; FSDP shards them further over ep_fsdp (a
                # dimension of the same parent mesh) and leaves them out of the block's unit.
                # Their gradient scale: expert_parallel.py, "Gradient scale".
                fully_shard(experts, mesh=ps.submesh("ep_fsdp"), mp_policy=mp)
        # One FSDP unit per block: one all-gather/reduce-scatter each, freed after forward.
        fully_shard(block, mesh=mesh, mp_policy=mp)
    # Root unit = everything left: embeddings, final norm, lm_head (a tied head is the same
    # Parameter as the embedding, so it must live in the same unit). reshard_after_forward=False:
    # the fused CE reads lm_head.weight inside forward (loss_fn hook) and again in backward; resharding
    # after forward would all-gather it a second time right away.
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=False)


def apply_ddp(model: nn.Module, ps: ParallelState) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [ps.device.index] if ps.device.type == "cuda" else None  # CPU: must be None
    # DDP broadcasts rank 0's parameters at construction, so ranks start identical.
    return DistributedDataParallel(model, device_ids=device_ids, process_group=ps.group("dp"))


def parallelize(model: nn.Module, parallel_state: ParallelState,
                cfg: Union[ParallelizeConfig, Mapping[str, Any], None] = None) -> nn.Module:
    """Apply AC + data parallelism to `model` in place; returns the model to train.

    fsdp2: the same object (now an FSDPModule, parameters are DTensor shards of fp32 master weights).
    ddp: a DistributedDataParallel wrapper (use veomni.distributed.unwrap_model for `.config` etc.).
    deepspeed: a DeepSpeedModel; its engine is built by `bind_optimizer(model, optimizer)`.
    none: the model, moved to the device.
    bf16 with ddp/none: wrap forward in `autocast_context(...)`; FSDP2 casts by its policy.
    """
    cfg = _as_config(cfg)
    mode = cfg.dp_mode or parallel_state.dp_mode
    if mode != parallel_state.dp_mode:
        raise ValueError(f"parallelize cfg.dp_mode={mode!r} but the parallel state was built for "
                         f"dp_mode={parallel_state.dp_mode!r}; build both from the same setting.")
    if isinstance(model, nn.parallel.DistributedDataParallel) or hasattr(model, "unshard") or _is_ds(model):
        raise ValueError("parallelize() got a model that is already wrapped (DDP/FSDP); call it once.")
    # 1. expert parallelism (before FSDP: it shards the EP-local experts).
    if parallel_state.ep_size > 1:
        from .expert_parallel import apply_expert_parallel

        if cfg.check_replicas and parallel_state.world_size > 1:
            _check_same_weights(model, parallel_state)  # before each rank drops the others' experts
        apply_expert_parallel(model, parallel_state)
    # 2. sequence parallelism (on the bare mixers, before the checkpoint wrappers hide them).
    if parallel_state.sp_size > 1:
        from .sequence_parallel import apply_sequence_parallel

        apply_sequence_parallel(model, parallel_state)
    # 3. activation checkpointing, innermost so each FSDP unit contains one checkpointed block.
    if cfg.gradient_checkpointing:
        apply_activation_checkpointing(model)
    # 4. torch.compile of each block (its checkpoint wrapper included), before FSDP2 wraps it, so
    # FSDP's all-gather hooks stay eager around the compiled graph.
    if cfg.compile:
        apply_compile(model, parallel_state)
    # 5. data parallelism.
    if mode == "fsdp2":
        if cfg.check_replicas and parallel_state.world_size > 1 and parallel_state.ep_size == 1:
            _check_same_weights(model, parallel_state)
        apply_fsdp2(model, parallel_state, cfg.mixed_precision)  # moves shards to ps.device
        return model
    model.to(parallel_state.device)
    if mode == "ddp":
        return apply_ddp(model, parallel_state)
    if mode == "deepspeed":
        return apply_deepspeed(model, parallel_state, cfg)
    return model


# ---------------------------------------------------------------------------- DeepSpeed hooks
# The step calls below work for every mode; only DeepSpeed needs them (its engine owns backward and
# the optimizer step). veomni/distributed/deepspeed_engine.py has the details.
def _is_ds(model) -> bool:
    from .deepspeed_engine import is_deepspeed

    return is_deepspeed(model)


def apply_deepspeed(model: nn.Module, ps: ParallelState, cfg: ParallelizeConfig) -> nn.Module:
    from .deepspeed_engine import DeepSpeedModel, import_deepspeed

    if cfg.deepspeed is None:
        raise ValueError("dp_mode='deepspeed' needs ParallelizeConfig.deepspeed (DeepSpeedOptions: zero stage, "
                         "offload, batch sizes); the trainer builds it from train.zero_stage etc.")
    import_deepspeed()  # fail here, with the install line, rather than after the optimizer is built
    if cfg.check_replicas and ps.world_size > 1:
        _check_same_weights(model, ps)  # ZeRO-3 keeps each rank's slice of its OWN copy, as FSDP2
    return DeepSpeedModel(model, ps, cfg.deepspeed, cfg.mixed_precision)


def bind_optimizer(model: nn.Module, optimizer):
    """The optimizer the step should call: `optimizer` itself, or under DeepSpeed an EngineOptimizer
    after `deepspeed.initialize` built the engine around it. Call it after building the LR scheduler
    on `optimizer` (the schedule stays ours; DeepSpeed reads the lr from its param_groups)."""
    return model.bind(optimizer) if _is_ds(model) else optimizer


def backward(model: nn.Module, loss: torch.Tensor) -> None:
    """loss.backward(), or the DeepSpeed engine's backward (ZeRO's gradient hooks and buckets)."""
    if _is_ds(model):
        model.backward(loss)
    else:
        loss.backward()


def autocast_context(parallel_state: ParallelState, cfg: Union[ParallelizeConfig, Mapping[str, Any], None]):
    """Context for forward+loss: bf16 autocast for ddp/none in bf16; a no-op otherwise (FSDP2 bf16
    is handled by its MixedPrecisionPolicy, fp32 needs nothing)."""
    cfg = _as_config(cfg)
    mode = cfg.dp_mode or parallel_state.dp_mode
    if cfg.mixed_precision == "bf16" and mode not in ("fsdp2", "deepspeed"):  # both cast the weights
        return torch.autocast(device_type=parallel_state.device.type, dtype=torch.bfloat16)
    return nullcontext()


@contextmanager
def no_grad_sync(model: nn.Module, skip: bool = True):
    """Skip the gradient all-reduce / reduce-scatter for the forward+backward run inside.

    For gradient accumulation: wrap every micro-batch except the last in `no_grad_sync(model)`; the
    last one (outside, or skip=False) communicates the accumulated gradient once. Results are the
    same either way; this only saves communication (FSDP2 keeps unsharded grads meanwhile: more memory).
    """
    if not skip:
        yield
    elif _is_ds(model):  # not an accumulation boundary (ZeRO-2/3 still reduce-scatter each micro-batch)
        with model.no_sync():
            yield
    elif isinstance(model, nn.parallel.DistributedDataParallel):
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2 root
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield  # plain model: nothing to synchronise


def clip_grad_norm_(model: nn.Module, max_norm: Optional[float], norm_type: float = 2.0) -> float:
    """Global gradient norm over all ranks and shards; scale grads down to `max_norm` if larger.

    Works for plain, DDP (grads are identical on every rank) and FSDP2 (DTensor grad shards: the
    per-shard norms are combined over the mesh by DTensor, `full_tensor()` materialises the total).
    max_norm None or 0: only measure. A non-finite norm is returned without touching the gradients,
    so the caller can skip the step (scaling by nan/inf would poison every parameter).
    """
    if max_norm is not None and max_norm < 0:
        raise ValueError(f"max_norm must be >= 0 (0 = no clipping), got {max_norm}")
    if _is_ds(model):  # the norm before the step; DeepSpeed clips inside engine.step()
        model.check_max_norm(max_norm)
        return model.grad_norm()
    params = [p for p in unwrap_model(model).parameters() if p.grad is not None]
    if not params:
        return 0.0
    # DTensor norms only combine within one mesh: under expert parallelism the experts live on the
    # ("ep_fsdp", "ep") mesh and the rest on the dp mesh ("All operands ... must have the same
    # mesh"). Take each mesh's norm, then combine the plain numbers.
    by_mesh = {}
    for p in params:
        by_mesh.setdefault(id(getattr(p.grad, "device_mesh", None)), []).append(p)
    norms = []
    for group in by_mesh.values():
        n = torch.nn.utils.get_total_norm([p.grad for p in group], norm_type=norm_type)
        if hasattr(n, "full_tensor"):  # DTensor (FSDP2): a Partial norm until materialised
            n = n.full_tensor()
        norms.append(n.float())
    if len(norms) == 1:
        total = norms[0]
    else:
        norms = torch.stack([n.to(norms[0].device) for n in norms])
        total = norms.max() if norm_type == float("inf") else norms.pow(norm_type).sum().pow(1.0 / norm_type)
    value = float(total)
    if max_norm and value == value and value != float("inf"):
        for group in by_mesh.values():
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return value
