"""DeepSpeed ZeRO-2/3 behind `parallelize` (train.data_parallel=deepspeed).

    model = parallelize(model, ps, cfg)          # a DeepSpeedModel: the plain model, engine not built yet
    optimizer = torch.optim.AdamW(...)           # over unwrap_model(model)'s parameters, as for FSDP2
    scheduler = LambdaLR(optimizer, ...)         # ours; DeepSpeed never sees it
    optimizer = bind_optimizer(model, optimizer) # deepspeed.initialize(...); returns an EngineOptimizer

The trainer's step is the same for every mode (veomni/trainer/trainer.py); here is what each of its
calls does under DeepSpeed:

* ``no_grad_sync(model)``: marks the micro-batch as *not* an accumulation boundary
  (`engine.set_gradient_accumulation_boundary(False)`). ZeRO-2/3 reduce-scatter every micro-batch
  anyway; the flag tells DeepSpeed when the accumulated gradient is complete.
* ``backward(model, loss * dp_size)``: `engine.backward(..., scale_wrt_gas=False)`. ZeRO AVERAGES
  gradients over the dp ranks, like DDP/FSDP2, so the same `dp_size` factor turns our globally
  normalised loss back into the sum; `scale_wrt_gas=False` because our loss is already divided by
  the global token count of all micro-batches (DeepSpeed would divide by the accumulation steps
  again). Verified against FSDP2 and one process in tests/distributed/test_deepspeed*.py.
* ``clip_grad_norm_(model, max_norm)``: the global L2 norm of the accumulated gradient, computed
  from each rank's ZeRO partition before the step. The clipping itself happens inside
  `engine.step()` (DeepSpeed's `gradient_clipping` = train.max_grad_norm; same formula as torch's).
* ``optimizer.step()``: `engine.step()`: ZeRO runs our torch AdamW on the fp32 master partitions.
* ``optimizer.zero_grad()``: DeepSpeed clears gradients in its step. After a SKIPPED step (the
  trainer found a non-finite loss or norm and did not call step()) the accumulated gradient is
  discarded by running `engine.step()` with the torch optimizer's update suppressed: DeepSpeed's
  own step path frees every partition and offload buffer, and neither the weights nor the Adam
  moments change.

Checkpoints (veomni/checkpoint/dcp.py): DeepSpeed's `save_checkpoint` writes model + optimizer
shards into `global_step_N/ds/`; our scheduler, loader, RNG and COMPLETE manifest are written
around it as for DCP. HF export gathers the fp32 master weights (`safe_get_full_fp32_param`).
"""
from __future__ import annotations

import json
import logging
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import torch
import torch.nn as nn

logger = logging.getLogger(__name__)

ZERO_STAGES = (2, 3)
OFFLOAD_OPTIMIZER = ("none", "cpu")
DS_TAG = "ds"  # sub-directory of global_step_N holding DeepSpeed's files
INSTALL_HINT = ("DS_BUILD_OPS=0 pip install -e '.[deepspeed]' (DS_BUILD_OPS=0: no C++/CUDA ops are built; "
                "the torch optimizer and torch.distributed do the work)")

# Keys of the DeepSpeed config that encode the training contract (optimizer, schedule, precision,
# gradient scaling, accumulation): they come from our config and a user JSON may not set them.
_OWNED_EXTRA = ("optimizer", "scheduler", "fp16", "amp", "torch_autocast", "managed_gradient_accumulation",
                "prescale_gradients", "gradient_predivide_factor", "zero_optimization.offload_optimizer",
                "zero_force_ds_cpu_optimizer")


TESTED_VERSIONS = ((0, 19), (0, 20))  # [low, high): as setup.py's extra
_WARNED: list = []


def _dotted(version) -> str:
    return ".".join(map(str, version))


def import_deepspeed():
    """`deepspeed`, set up for torch optimizers and torch.distributed collectives; ImportError with
    the install line when it is missing."""
    try:
        import deepspeed
        import deepspeed.ops
    except ImportError as exc:
        raise ImportError(f"train.data_parallel=deepspeed needs the deepspeed package: {INSTALL_HINT}. "
                          f"({type(exc).__name__}: {exc})") from exc
    version = tuple(int(x) for x in deepspeed.__version__.split(".")[:2] if x.isdigit())
    if version < TESTED_VERSIONS[0]:
        # 0.18.0 summed ZeRO-2 gradients wrongly under a caller-set accumulation boundary: the run
        # would train, on wrong gradients.
        raise ImportError(f"deepspeed {deepspeed.__version__} is older than {_dotted(TESTED_VERSIONS[0])}, which "
                          f"veomni needs (ZeRO-2 gradient accumulation); upgrade: {INSTALL_HINT}")
    if version >= TESTED_VERSIONS[1] and not _WARNED:
        _WARNED.append(True)
        logger.warning("deepspeed %s is newer than the versions veomni was tested with (< %s): run "
                       "tests/distributed/test_deepspeed*.py before trusting it", deepspeed.__version__,
                       _dotted(TESTED_VERSIONS[1]))
    # DeepSpeed's comm layer JIT-compiles a shared-memory all-reduce (C++ via ninja) the first time
    # it starts on CPU; without a compiler set up for it that hangs or fails the launch. gloo does
    # the collectives instead.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    # DeepSpeed logs its whole config and per-step timers at INFO, drowning the progress bar.
    ds_logger = logging.getLogger("DeepSpeed")
    ds_logger.setLevel(logging.WARNING)
    if not any(isinstance(f, _KnownOutputFilter) for f in ds_logger.filters):
        ds_logger.addFilter(_KnownOutputFilter())
    # DeepSpeed calls torch's old collective names; torch warns on every call.
    warnings.filterwarnings(
        "ignore", category=FutureWarning,
        message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated")
    return deepspeed


class _KnownOutputFilter(logging.Filter):
    """Drop ZeRO-3's warning that it cannot see the tensors inside our CausalLMOutput.

    ZeRO-3 hooks a module's outputs to re-gather that module's parameters before its backward. The
    only module returning a CausalLMOutput is the root, whose one parameter is the (external)
    lm_head weight, and the fused loss (veomni/ops/chunked_ce.py) computes both of its gradients
    during forward: its backward never reads the weight. Verified: ZeRO-3 == FSDP2 in
    tests/distributed/test_deepspeed*.py with every parameter partitioned.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not ("unknown inputs or outputs type" in msg and "CausalLMOutput" in msg)


# ---------------------------------------------------------------------------- configuration
@dataclass
class DeepSpeedOptions:
    """What the engine needs from our config (built by `deepspeed_options`)."""

    zero_stage: int
    offload_optimizer: str = "none"
    micro_batch_size: int = 1
    grad_accum: int = 1
    max_grad_norm: float = 0.0  # 0 = no clipping
    config_file: Optional[str] = None  # extra DeepSpeed keys (JSON), e.g. bucket sizes

    def __post_init__(self):
        if self.zero_stage not in ZERO_STAGES:
            raise ValueError(f"train.zero_stage={self.zero_stage!r} is not supported: use 2 (optimizer state and "
                             "gradients sharded) or 3 (parameters too).")
        if self.offload_optimizer not in OFFLOAD_OPTIMIZER:
            raise ValueError(f"train.offload_optimizer={self.offload_optimizer!r}: expected one of {OFFLOAD_OPTIMIZER}")
        if self.max_grad_norm < 0:
            raise ValueError(f"max_grad_norm must be >= 0 (0 = no clipping), got {self.max_grad_norm}")


def deepspeed_options(train_args, grad_accum: int) -> Optional[DeepSpeedOptions]:
    """DeepSpeedOptions from veomni's TrainArgs (None unless train.data_parallel=deepspeed)."""
    if train_args.data_parallel != "deepspeed":
        return None
    return DeepSpeedOptions(zero_stage=train_args.zero_stage, offload_optimizer=train_args.offload_optimizer,
                            micro_batch_size=train_args.micro_batch_size, grad_accum=grad_accum,
                            max_grad_norm=train_args.max_grad_norm, config_file=train_args.deepspeed_config)


def _leaves(d: Dict[str, Any], prefix: str = ""):
    for k, v in d.items():
        path = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            yield from _leaves(v, path + ".")
        else:
            yield path


def _merge(base: Dict[str, Any], extra: Dict[str, Any]) -> None:
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = v


def build_ds_config(opts: DeepSpeedOptions, mixed_precision: str, world_size: int) -> Dict[str, Any]:
    """The DeepSpeed config dict, from our options plus the optional user JSON (conflicts refused)."""
    zero: Dict[str, Any] = {"stage": opts.zero_stage}
    if opts.offload_optimizer == "cpu":
        # pin_memory: page-locked host buffers for the GPU<->CPU gradient/weight copies.
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    cfg: Dict[str, Any] = {
        "train_micro_batch_size_per_gpu": opts.micro_batch_size,
        "gradient_accumulation_steps": opts.grad_accum,
        "train_batch_size": opts.micro_batch_size * opts.grad_accum * world_size,
        "gradient_clipping": float(opts.max_grad_norm),
        "zero_optimization": zero,
        # bf16: bf16 weights for compute, fp32 master partitions in the ZeRO optimizer, gradients
        # reduced in fp32 (as FSDP2's reduce_dtype) so small gradients survive the reduction.
        "bf16": {"enabled": mixed_precision == "bf16"},
        "fp16": {"enabled": False},
        # Our torch AdamW runs on the offloaded partitions too (DeepSpeed would insist on its C++
        # DeepSpeedCPUAdam, which DS_BUILD_OPS=0 does not build).
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2 ** 31 - 1,
        "wall_clock_breakdown": False,
    }
    if mixed_precision == "bf16":
        cfg["communication_data_type"] = "fp32"
    if opts.config_file:
        path = Path(opts.config_file)
        try:
            extra = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"train.deepspeed_config={opts.config_file}: cannot read it as JSON "
                             f"({type(exc).__name__}: {exc})") from None
        if not isinstance(extra, dict):
            raise ValueError(f"train.deepspeed_config={opts.config_file} must hold a JSON object")
        ours = set(_leaves(cfg)) | set(_OWNED_EXTRA)
        clash = sorted(p for p in _leaves(extra)
                       if any(p == o or p.startswith(o + ".") or o.startswith(p + ".") for o in ours))
        if clash:
            raise ValueError(
                f"train.deepspeed_config={opts.config_file} sets {clash}, which veomni derives from its own "
                "config (train.zero_stage, train.offload_optimizer, train.mixed_precision, train.max_grad_norm, "
                "batch sizes; optimizer and schedule are train.lr/betas/lr_scheduler). Remove them from the JSON.")
        _merge(cfg, extra)
    return cfg


# ---------------------------------------------------------------------------- the wrapped model
class DeepSpeedModel(nn.Module):
    """The model under DeepSpeed ZeRO: forward/train/eval as a module, plus what the step needs.

    Built by `parallelize`; the engine itself is created by `bind(optimizer)` (DeepSpeed needs the
    optimizer to partition its state). `.module` is the user's single-device model.
    """

    def __init__(self, module: nn.Module, parallel_state, options: DeepSpeedOptions, mixed_precision: str):
        super().__init__()
        self.module = module
        self.options = options
        self.ps = parallel_state
        self.ds_config = build_ds_config(options, mixed_precision, parallel_state.dp_size)
        # Kept out of nn.Module's registry: the engine wraps `module`, registering it would list
        # every parameter twice in state_dict().
        self.__dict__["engine"] = None
        self.__dict__["base_optimizer"] = None
        self._pending = False  # a backward ran since the last optimizer step

    @property
    def zero_stage(self) -> int:
        return self.options.zero_stage

    def _engine(self):
        if self.engine is None:
            raise RuntimeError("the DeepSpeed engine is not built yet: create the optimizer over "
                               "unwrap_model(model).parameters() and call bind_optimizer(model, optimizer).")
        return self.engine

    # ---- construction ------------------------------------------------------------------------
    def bind(self, optimizer: torch.optim.Optimizer) -> "EngineOptimizer":
        if self.engine is not None:
            raise RuntimeError("bind_optimizer was already called for this model")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"DeepSpeed needs a torch optimizer, got {type(optimizer).__name__}")
        ds = import_deepspeed()
        if self.zero_stage == 3:
            head = getattr(self.module, "get_output_embeddings", lambda: None)()
            if head is not None:
                # The fused loss reads lm_head.weight inside the ROOT module's forward, never calling
                # lm_head itself; ZeRO-3 only gathers a parameter for its own module's forward, so the
                # loss would see an empty partition ("size mismatch"/0-element weight).
                ds.zero.register_external_parameter(self.module, head.weight)
        # DeepSpeed asserts LOCAL_RANK is set (torchrun sets it; a plain one-process run does not).
        os.environ.setdefault("LOCAL_RANK", str(self.ps.local_rank))
        engine, _, _, _ = ds.initialize(model=self.module, optimizer=optimizer, config=self.ds_config,
                                        dist_init_required=False)
        engine.set_gradient_accumulation_boundary(True)
        self.__dict__["engine"] = engine
        self.__dict__["base_optimizer"] = optimizer
        return EngineOptimizer(self)

    # ---- forward / backward -------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        return self._engine()(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        # scale_wrt_gas=False: our loss is globally normalised already (module docstring).
        self._engine().backward(loss, scale_wrt_gas=False)
        self._pending = True

    @contextmanager
    def no_sync(self):
        engine = self._engine()
        engine.set_gradient_accumulation_boundary(False)
        try:
            yield
        finally:
            engine.set_gradient_accumulation_boundary(True)

    # ---- gradient norm, step, skip ----------------------------------------------------------------
    def _local_grads(self):
        """This rank's part of the reduced, accumulated gradient (each element on exactly one rank)."""
        out = []
        if self.zero_stage == 3:
            from deepspeed.utils import safe_get_local_grad

            for p in self.module.parameters():
                if p.requires_grad and hasattr(p, "ds_id"):
                    g = safe_get_local_grad(p)
                    if g is not None:
                        out.append(g)
            return out
        for p in self.module.parameters():
            # ZeRO-2: each parameter's slice owned by this rank (`_hp_mapping` is None when the
            # rank owns none of it), the same fragment `safe_get_full_grad` all-reduces.
            mapping = getattr(p, "_hp_mapping", None)
            if mapping is None:
                continue
            g = mapping.get_lp_grad_fragment(p._index_in_param_group).reshape(-1)
            addr = mapping.lp_fragment_address
            if g.numel() != addr.numel:  # bf16 keeps a full-size accumulation buffer per parameter
                g = g.narrow(0, addr.start, addr.numel)
            out.append(g)
        return out

    def grad_norm(self) -> float:
        """Global L2 norm of the accumulated gradient over all ranks (collective; before the step)."""
        grads = self._local_grads()
        sq = torch.zeros((), dtype=torch.float32, device=self.ps.device)
        if grads:
            norms = torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32).to(sq.device) for g in grads])
            sq = norms.pow(2).sum()
        return float(self.ps.all_reduce_sum(sq.reshape(1)).sqrt())

    def check_max_norm(self, max_norm: Optional[float]) -> None:
        want = 0.0 if max_norm is None or max_norm == float("inf") else float(max_norm)
        if want != self.ds_config["gradient_clipping"]:
            raise ValueError(f"clip_grad_norm_(max_norm={max_norm}) but the DeepSpeed engine clips at "
                             f"gradient_clipping={self.ds_config['gradient_clipping']} (train.max_grad_norm); "
                             "DeepSpeed clips inside its step, so both must be the same.")

    def step(self) -> None:
        engine = self._engine()
        engine.step()
        self._pending = False
        if not engine.was_step_applied():
            # Our pre-step norm was finite (or the trainer would have skipped) but DeepSpeed found
            # an overflow: the two disagree, and the weights did not move.
            raise RuntimeError("DeepSpeed skipped the optimizer step (gradient overflow) although the "
                               "gradient norm computed before it was finite; please report this.")

    def discard_gradients(self) -> None:
        """Drop the accumulated gradient without changing weights or optimizer state (skipped step)."""
        if not self._pending:
            return
        base = self.base_optimizer
        own = base.__dict__.get("step")  # a scheduler may have wrapped step() on the instance
        base.step = lambda *a, **k: None  # DeepSpeed calls the torch optimizer's step(): make it a no-op
        try:
            self._engine().step()
        finally:
            if own is None:
                del base.step
            else:
                base.step = own
        self._pending = False

    # ---- weights ----------------------------------------------------------------------------------
    def local_shards(self):
        """Every parameter tensor this rank holds (ZeRO-3: its partition)."""
        for p in self.module.parameters():
            yield p.ds_tensor if hasattr(p, "ds_tensor") else p

    def full_state_dict(self) -> Dict[str, torch.Tensor]:
        """Full fp32 CPU state dict (master weights) on the main rank, {} elsewhere. Collective."""
        from deepspeed.utils import safe_get_full_fp32_param

        self._engine()
        clean = strip_wrapper_names
        main = self.ps.is_main
        out: Dict[str, torch.Tensor] = {}
        seen: Dict[int, str] = {}
        for name, p in self.module.named_parameters(remove_duplicate=False):
            if id(p) in seen:  # tied weights: one gather, both names
                if main:
                    out[name] = out[seen[id(p)]]
                continue
            seen[id(p)] = name
            if p.requires_grad:
                full = safe_get_full_fp32_param(p)  # every rank: all-gather of the partitions
            else:  # frozen: not in the optimizer; gather the (ZeRO-3 partitioned) module weight
                full = _gather_frozen(p)
            if main:
                out[name] = full.detach().float().cpu().clone()
        for mod_name, mod in self.module.named_modules():
            for name, buf in mod.named_buffers(recurse=False):
                if name not in mod._non_persistent_buffers_set and main:
                    out[f"{mod_name}.{name}" if mod_name else name] = buf.detach().cpu().clone()
        return {clean(k): v for k, v in out.items()}

    # ---- checkpoints ------------------------------------------------------------------------------
    def save_shards(self, directory: Path) -> None:
        """DeepSpeed's model + optimizer files under `directory/ds`, fsynced. Collective."""
        engine = self._engine()
        engine.save_checkpoint(str(directory), tag=DS_TAG, client_state={}, save_latest=False)
        # DeepSpeed does not fsync; our COMPLETE marker must only be written once the files are on
        # disk. Each rank syncs what it wrote: its zero_pp_rank_<r>_* files, rank 0 the rest.
        mine = f"zero_pp_rank_{self.ps.rank}_"
        for path in sorted(Path(directory).rglob("*")):
            if path.is_file() and (mine in path.name or (self.ps.is_main and "zero_pp_rank_" not in path.name)):
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)

    def load_shards(self, directory: Path) -> None:
        """Restore model + optimizer from `directory/ds` (same world size and stage). Collective."""
        engine = self._engine()
        load_path, _ = engine.load_checkpoint(str(directory), tag=DS_TAG, load_module_strict=True,
                                              load_optimizer_states=True, load_lr_scheduler_states=False)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed found no loadable checkpoint in {Path(directory) / DS_TAG}")
        self._pending = False

    def manifest_fields(self) -> Dict[str, Any]:
        return {"engine": "deepspeed", "zero_stage": self.zero_stage}


def strip_wrapper_names(name: str) -> str:
    """A parameter name without activation checkpointing's wrapper level (HF/DCP keys never have it)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import _CHECKPOINT_PREFIX

    return name.replace(_CHECKPOINT_PREFIX, "")


def _gather_frozen(p: torch.nn.Parameter) -> torch.Tensor:
    if not hasattr(p, "ds_id"):
        return p.data
    from deepspeed import zero

    with zero.GatheredParameters([p], modifier_rank=None):
        return p.data.clone()


class EngineOptimizer:
    """The trainer's `optimizer` under DeepSpeed: the torch optimizer, stepped through the engine.

    `param_groups` are the torch optimizer's (the LR scheduler writes `lr` there and DeepSpeed's
    ZeRO optimizer reads it). State is saved with the engine's checkpoint, never through here.
    """

    def __init__(self, owner: DeepSpeedModel):
        self.owner = owner

    @property
    def param_groups(self):
        return self.owner.base_optimizer.param_groups

    @property
    def base(self) -> torch.optim.Optimizer:
        return self.owner.base_optimizer

    def step(self) -> None:
        self.owner.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        # After step() DeepSpeed has already cleared the gradients; after a skipped step they are
        # still accumulated inside ZeRO and must be dropped.
        self.owner.discard_gradients()

    def state_dict(self):
        raise TypeError("under DeepSpeed the optimizer state is sharded inside the engine: save it with "
                        "veomni.checkpoint.save_checkpoint(model, optimizer, ...) (DeepSpeed's format).")

    def load_state_dict(self, state):
        self.state_dict()


def is_deepspeed(model) -> bool:
    return isinstance(model, DeepSpeedModel)
