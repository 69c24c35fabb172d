"""One DeviceMesh for the whole job, and the few collectives the trainer needs.

    ps = init_parallel_state(dp_mode="fsdp2")      # reads RANK / WORLD_SIZE / LOCAL_RANK (torchrun)
    ps.dp_rank, ps.dp_size, ps.device, ps.is_main
    ps.all_reduce_sum(num_tokens)                  # over the data-parallel ranks
    ...
    ps.destroy()

Mesh layout (docs/parallelism.md): dims ``("dp_replicate", "dp_shard", "sp")``, sizes
``(dp_replicate, world_size // (dp_replicate * sp), sp)``; the flattened ``"dp"`` submesh spans the
two data dims and is what data loading and token counts use (the ``sp`` ranks of one group read the
same rows and split each row's sequence: Ulysses sequence parallelism, veomni/distributed/
sequence_parallel.py). FSDP2 shards over ``dp_shard`` x ``sp`` (the flattened ``"dp_shard_sp"``;
HSDP when ``dp_replicate > 1``); DDP replicates over all ranks, laid out as ``(world_size, 1, 1)``;
DeepSpeed ZeRO uses the same layout (every rank is a data replica; ZeRO partitions over the whole
world group itself). Nothing else should build meshes or process groups.

Expert parallelism (``ep_size > 1``, FSDP2 only) adds a second mesh over the same ranks,
``("ep_fsdp", "ep")`` with sizes ``(world_size // ep_size, ep_size)`` (VeOmni's shape): experts
are split over ``ep`` (consecutive ranks, so an EP group stays inside a node) and FSDP-sharded
over ``ep_fsdp``; everything else is still sharded over all ranks. Data parallelism is unchanged:
every rank reads its own rows.

Single process without torchrun (no WORLD_SIZE in the environment): world size 1.
``dp_mode="none"`` creates no process group at all (collectives are the identity).
``dp_mode="fsdp2"|"ddp"`` creates a one-rank group over an in-process ``HashStore`` (no port is
opened), so the sharded/wrapped code paths run unchanged on one process, e.g. to debug them.
"""
from __future__ import annotations

import datetime
import logging
import os
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

DP_MODES = ("fsdp2", "ddp", "none", "deepspeed")
BACKENDS = ("gloo", "nccl")

_STATE: Optional["ParallelState"] = None


def _env_int(name: str) -> Optional[int]:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def _launch_env() -> Dict[str, int]:
    """rank / world_size / local_rank from torchrun's environment, or a one-process default."""
    rank, world, local = _env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK")
    if world is None:
        if rank not in (None, 0):
            raise ValueError(f"RANK={rank} is set but WORLD_SIZE is not: launch with torchrun, "
                             "or unset RANK to run one process.")
        return {"rank": 0, "world_size": 1, "local_rank": local or 0}
    if world < 1 or rank is None or not 0 <= rank < world:
        raise ValueError(f"inconsistent launch environment RANK={rank}, WORLD_SIZE={world}: "
                         "expected 0 <= RANK < WORLD_SIZE (torchrun sets both).")
    return {"rank": rank, "world_size": world, "local_rank": rank if local is None else local}


def ep_layout(dp_mode: str, world_size: int, ep_size: int, dp_replicate: int = 1) -> Dict[str, int]:
    """Sizes of the expert-parallel mesh ("ep_fsdp", "ep"), or a ValueError naming what to change."""
    if not isinstance(ep_size, int) or ep_size < 1:
        raise ValueError(f"train.expert_parallel_size must be an int >= 1, got {ep_size!r}")
    if ep_size == 1:
        return {"ep_fsdp": world_size, "ep": 1}
    if dp_mode != "fsdp2":
        raise ValueError(f"train.expert_parallel_size={ep_size} needs train.data_parallel=fsdp2 (experts are "
                         f"FSDP-sharded over the ep_fsdp mesh); data_parallel is {dp_mode!r}.")
    if dp_replicate != 1:
        raise ValueError(f"train.expert_parallel_size={ep_size} with train.dp_replicate={dp_replicate} (HSDP) "
                         "is not supported; use dp_replicate=1.")
    if world_size % ep_size != 0:
        raise ValueError(f"train.expert_parallel_size={ep_size} does not divide the world size {world_size}; "
                         "choose an EP size that divides the number of processes.")
    return {"ep_fsdp": world_size // ep_size, "ep": ep_size}


def mesh_layout(dp_mode: str, world_size: int, dp_replicate: int = 1, sp_size: int = 1) -> Dict[str, int]:
    """Mesh dim sizes for a data-parallel mode, or a ValueError naming the impossible part."""
    if dp_mode not in DP_MODES:
        raise ValueError(f"dp_mode={dp_mode!r} is not one of {DP_MODES}")
    if not isinstance(dp_replicate, int) or dp_replicate < 1:
        raise ValueError(f"dp_replicate must be an int >= 1, got {dp_replicate!r}")
    if not isinstance(sp_size, int) or sp_size < 1:
        raise ValueError(f"train.ulysses_parallel_size must be an int >= 1, got {sp_size!r}")
    if sp_size > 1:
        if dp_mode != "fsdp2":
            raise ValueError(f"train.ulysses_parallel_size={sp_size} needs train.data_parallel=fsdp2 (the "
                             f"sequence-parallel ranks also shard the parameters); data_parallel is {dp_mode!r}.")
        if world_size % (dp_replicate * sp_size):
            raise ValueError(f"world size {world_size} is not divisible by dp_replicate * ulysses_parallel_size "
                             f"= {dp_replicate} * {sp_size}; change the number of processes or the sizes.")
        return {"dp_replicate": dp_replicate, "dp_shard": world_size // (dp_replicate * sp_size), "sp": sp_size}
    return {**_dp_layout(dp_mode, world_size, dp_replicate), "sp": 1}


def _dp_layout(dp_mode: str, world_size: int, dp_replicate: int) -> Dict[str, int]:
    if dp_mode == "none":
        if world_size != 1:
            raise ValueError(
                f"dp_mode='none' trains on one process but WORLD_SIZE={world_size}: use "
                "dp_mode='fsdp2' or 'ddp' for several processes, or launch a single one.")
        if dp_replicate != 1:
            raise ValueError(f"dp_replicate={dp_replicate} needs dp_mode='fsdp2' (HSDP); dp_mode is 'none'.")
        return {"dp_replicate": 1, "dp_shard": 1}
    if dp_mode == "ddp":
        # DDP only replicates: every rank is a replica, nothing is sharded.
        if dp_replicate not in (1, world_size):
            raise ValueError(
                f"dp_mode='ddp' replicates over all {world_size} ranks; dp_replicate={dp_replicate} "
                "would ask for sharding inside replicas. Use dp_mode='fsdp2' for HSDP, or leave "
                "dp_replicate=1.")
        return {"dp_replicate": world_size, "dp_shard": 1}
    if dp_mode == "deepspeed":
        return _deepspeed_layout(world_size, dp_replicate)
    if world_size % dp_replicate != 0:
        raise ValueError(
            f"world size {world_size} is not divisible by dp_replicate={dp_replicate}: HSDP needs "
            "world_size = dp_replicate * dp_shard. Change dp_replicate or the number of processes.")
    return {"dp_replicate": dp_replicate, "dp_shard": world_size // dp_replicate}


def _deepspeed_layout(world_size: int, dp_replicate: int) -> Dict[str, int]:
    # DeepSpeed ZeRO partitions over the default (world) group: every rank reads its own rows, as
    # with DDP. Its hierarchical variants (ZeRO++ hpZ/MiCS) are not wired to our mesh.
    if dp_replicate != 1:
        raise ValueError(f"train.dp_replicate={dp_replicate} is an FSDP2 (HSDP) setting; DeepSpeed ZeRO "
                         "shards over all ranks. Use dp_replicate=1 with data_parallel=deepspeed.")
    return {"dp_replicate": world_size, "dp_shard": 1}


def _pick_device(device_type: Optional[str], local_rank: int) -> torch.device:
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if device_type == "cpu":
        return torch.device("cpu")
    if device_type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device_type='cuda' but torch.cuda.is_available() is False; "
                               "pass device_type='cpu' or run on a GPU machine.")
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA "
                               "device(s) are visible: start at most that many processes per node.")
        return torch.device("cuda", local_rank)
    raise ValueError(f"device_type={device_type!r} is not supported (cpu or cuda).")


def _pick_backend(backend: Optional[str], device: torch.device) -> str:
    if backend is None:
        return "nccl" if device.type == "cuda" else "gloo"
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not supported: one of {BACKENDS} (or None to "
                         "choose by device: nccl on CUDA, gloo on CPU).")
    if backend == "nccl" and device.type != "cuda":
        raise ValueError("backend='nccl' needs CUDA devices but the device is "
                         f"{device}; use backend='gloo' (or None) on CPU.")
    return backend


class ParallelState:
    """The job's ranks, device and mesh. Build it with `init_parallel_state`, not directly."""

    def __init__(self, dp_mode: str, rank: int, world_size: int, local_rank: int, device: torch.device,
                 backend: Optional[str], layout: Dict[str, int], mesh, owns_group: bool,
                 ep_mesh=None):
        self.dp_mode = dp_mode
        self.rank = rank
        self.world_size = world_size
        self.local_rank = local_rank
        self.device = device
        self.backend = backend
        self.layout = dict(layout)
        self.mesh = mesh  # DeviceMesh over ("dp_replicate", "dp_shard", "sp"); None for dp_mode='none'
        self._owns_group = owns_group
        self.ep_mesh = ep_mesh  # DeviceMesh over ("ep_fsdp", "ep"); None without expert parallelism
        self._submeshes: Dict[str, Any] = {}
        if ep_mesh is not None:
            self._submeshes.update(ep=ep_mesh["ep"], ep_fsdp=ep_mesh["ep_fsdp"])
        if mesh is not None:
            # Keep the flattened mesh ourselves: slicing a flattened dim from the root mesh is
            # deprecated in torch (UserWarning "Slicing a flattened dim ... will be deprecated").
            self._submeshes.update({
                "dp_replicate": mesh["dp_replicate"],
                "dp_shard": mesh["dp_shard"],
                "sp": mesh["sp"],
                "dp": mesh["dp_replicate", "dp_shard"]._flatten("dp"),
            })
            if self.sp_size > 1:
                # FSDP's dimension: the sequence-parallel ranks shard the parameters too.
                self._submeshes["dp_shard_sp"] = mesh["dp_shard", "sp"]._flatten("dp_shard_sp")
                if self.layout["dp_replicate"] > 1:
                    # HSDP x SP: FSDP2 wants one 2-D mesh (replicate, shard). torch warns that slicing
                    # a flattened dim from the root will be deprecated, but still offers no public
                    # way to pair a flattened dim with another one; the result is checked by
                    # tests/distributed/test_sequence_parallel.py.
                    import warnings

                    with warnings.catch_warnings():
                        warnings.filterwarnings("ignore", message="Slicing a flattened dim")
                        self._submeshes["hsdp"] = mesh["dp_replicate", "dp_shard_sp"]

    def __repr__(self) -> str:
        ep = f", ep_size={self.ep_size}" if self.ep_mesh is not None else ""
        ep += f", sp_size={self.sp_size}" if self.sp_size > 1 else ""
        return (f"ParallelState(dp_mode={self.dp_mode!r}, rank={self.rank}, world_size={self.world_size}, "
                f"layout={self.layout}{ep}, device={self.device}, backend={self.backend})")

    # ---- sizes ------------------------------------------------------------------------------
    @property
    def dp_size(self) -> int:
        return self.layout["dp_replicate"] * self.layout["dp_shard"]

    @property
    def dp_rank(self) -> int:
        return 0 if self.mesh is None else self._submeshes["dp"].get_local_rank()

    @property
    def sp_size(self) -> int:
        """Ulysses sequence-parallel size: ranks that split each row's sequence (1 = off)."""
        return self.layout["sp"]

    @property
    def sp_rank(self) -> int:
        return 0 if self.mesh is None else self._submeshes["sp"].get_local_rank()

    @property
    def ep_size(self) -> int:
        return 1 if self.ep_mesh is None else self.ep_mesh["ep"].size()

    @property
    def ep_rank(self) -> int:
        return 0 if self.ep_mesh is None else self.ep_mesh["ep"].get_local_rank()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when a process group exists (even a one-rank one)."""
        return self.mesh is not None

    def submesh(self, name: str):
        """The named 1-D (or flattened) submesh: 'dp', 'dp_shard', 'dp_replicate', 'sp'; with
        sequence parallelism also 'dp_shard_sp'; with expert parallelism also 'ep' and 'ep_fsdp'."""
        if self.mesh is None:
            raise RuntimeError(f"dp_mode='none' has no device mesh (asked for submesh {name!r}).")
        if name not in self._submeshes:
            raise KeyError(f"unknown submesh {name!r}; known: {sorted(self._submeshes)}")
        return self._submeshes[name]

    def fsdp_mesh(self):
        """The mesh fully_shard uses: 1-D dp_shard (dp_shard x sp with sequence parallelism), or
        2-D (dp_replicate, that) for HSDP."""
        if self.sp_size > 1:
            return self.submesh("hsdp" if self.layout["dp_replicate"] > 1 else "dp_shard_sp")
        if self.layout["dp_replicate"] > 1:
            return self.mesh["dp_replicate", "dp_shard"]
        return self.submesh("dp_shard")

    @property
    def grad_average_size(self) -> int:
        """Ranks over which DDP/FSDP average gradients: every rank (dp x sp)."""
        return self.dp_size * self.sp_size

    def group(self, name: str = "dp"):
        """The process group of a submesh; 'world' is every rank (None = the default group)."""
        if self.mesh is None or name == "world":
            return None
        return self.submesh(name).get_group()

    def _group_size(self, name: str) -> int:
        if self.mesh is None:
            return 1
        return self.world_size if name == "world" else self.submesh(name).size()

    # ---- collectives (identity on one process without a group) ------------------------------
    def all_reduce_sum(self, tensor: torch.Tensor, group: str = "dp") -> torch.Tensor:
        """In-place sum over the named group's ranks ('world': all ranks); returns the tensor."""
        if self._group_size(group) > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group(group))
        return tensor

    def all_reduce_mean(self, tensor: torch.Tensor, group: str = "dp") -> torch.Tensor:
        # SUM then divide: gloo has no ReduceOp.AVG.
        return self.all_reduce_sum(tensor, group).div_(self._group_size(group))

    def all_reduce_max(self, tensor: torch.Tensor, group: str = "dp") -> torch.Tensor:
        if self._group_size(group) > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.group(group))
        return tensor

    def barrier(self) -> None:
        if self.mesh is not None and self.world_size > 1:
            dist.barrier()

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """`obj` from global rank `src` on every rank (picklable objects)."""
        if self.mesh is None or self.world_size == 1:
            return obj
        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def all_gather_object(self, obj: Any) -> List[Any]:
        """[obj of rank 0, obj of rank 1, ...] on every rank."""
        if self.mesh is None or self.world_size == 1:
            return [obj]
        out: List[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def no_sync(self, model, skip: bool = True):
        """Context: no gradient communication in the forward+backward inside (see
        veomni.distributed.parallelism.no_grad_sync); for all but the last micro-batch."""
        from .parallelism import no_grad_sync

        return no_grad_sync(model, skip)

    def destroy(self) -> None:
        """Tear down the process group if this state created it (safe to call twice)."""
        global _STATE
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()
        self._owns_group = False
        self.mesh = None
        self.ep_mesh = None
        self._submeshes = {}
        if _STATE is self:
            _STATE = None


def init_parallel_state(dp_mode: str = "fsdp2", dp_replicate: int = 1, backend: Optional[str] = None,
                        device_type: Optional[str] = None,
                        timeout: Optional[datetime.timedelta] = None, ep_size: int = 1,
                        sp_size: int = 1) -> ParallelState:
    """Create the process group (when needed), the device mesh and the global ParallelState.

    dp_mode: 'fsdp2' (shard params/grads/optimizer over dp_shard; HSDP with dp_replicate > 1),
        'ddp' (replicate over all ranks), 'none' (one process, no wrapping).
    backend: None chooses by device (nccl on CUDA, gloo on CPU) and logs the choice.
    device_type: None chooses cuda when available, else cpu.
    timeout: collective timeout (None = torch's default); tests pass a short one to fail fast.
    ep_size: expert-parallel size (train.expert_parallel_size); > 1 builds the ("ep_fsdp", "ep") mesh.
    sp_size: Ulysses sequence-parallel size (train.ulysses_parallel_size); the "sp" mesh dimension.
    An already-initialised default process group is reused (and left alone by `destroy`).
    """
    global _STATE
    if _STATE is not None:
        raise RuntimeError("init_parallel_state was already called in this process; call "
                           "get_parallel_state() to reuse it, or .destroy() it first.")
    env = _launch_env()
    layout = mesh_layout(dp_mode, env["world_size"], dp_replicate, sp_size)
    ep = ep_layout(dp_mode, env["world_size"], ep_size, dp_replicate)
    device = _pick_device(device_type, env["local_rank"])
    if device.type == "cuda":
        torch.cuda.set_device(device)
    mesh, owns, chosen, ep_mesh = None, False, None, None
    if dp_mode != "none":
        chosen = _pick_backend(backend, device)
        kwargs = {} if timeout is None else {"timeout": timeout}
        if dist.is_initialized():
            if dist.get_world_size() != env["world_size"]:
                raise RuntimeError(f"a process group of size {dist.get_world_size()} already exists "
                                   f"but WORLD_SIZE={env['world_size']}.")
        elif env["world_size"] == 1 and "MASTER_ADDR" not in os.environ:
            # One process without torchrun: an in-process store, no TCP port to pick or collide on.
            dist.init_process_group(chosen, store=dist.HashStore(), rank=0, world_size=1, **kwargs)
            owns = True
        else:
            dist.init_process_group(chosen, rank=env["rank"], world_size=env["world_size"], **kwargs)
            owns = True
        from torch.distributed.device_mesh import init_device_mesh

        # sp innermost: the ranks of one sequence-parallel group are consecutive, so on GPUs its
        # all-to-alls stay inside a node.
        mesh = init_device_mesh(device.type, (layout["dp_replicate"], layout["dp_shard"], layout["sp"]),
                                mesh_dim_names=("dp_replicate", "dp_shard", "sp"))
        if ep["ep"] > 1:
            # Its own root mesh: FSDP2 needs the experts' EP mesh (their DTensor placement) and the
            # ep_fsdp mesh it shards them over to share one parent.
            ep_mesh = init_device_mesh(device.type, (ep["ep_fsdp"], ep["ep"]), mesh_dim_names=("ep_fsdp", "ep"))
    elif backend is not None:
        raise ValueError(f"backend={backend!r} was given but dp_mode='none' creates no process group.")
    state = ParallelState(dp_mode, env["rank"], env["world_size"], env["local_rank"], device, chosen,
                          layout, mesh, owns, ep_mesh=ep_mesh)
    if state.is_main:
        how = "given" if backend is not None else f"chosen for device type {device.type!r}"
        logger.info("parallel state: %r (backend %s)", state, how if chosen else "none: no process group")
    _STATE = state
    return state


def get_parallel_state() -> ParallelState:
    if _STATE is None:
        raise RuntimeError("no ParallelState: call veomni.distributed.init_parallel_state(...) first.")
    return _STATE


def loss_scale_for_grad_averaging(parallel_state: Optional[ParallelState]) -> float:
    """Factor to multiply a globally-normalised micro-batch loss by before `backward()`.

    DDP and FSDP2 AVERAGE gradients over the ranks they span (dp_size ranks, times sp_size with
    sequence parallelism). The trainer divides each rank's summed token loss by the GLOBAL token
    count (all ranks, all micro-batches), whose gradient is the SUM over ranks; multiplying by the
    number of averaged ranks before backward turns the averaging back into that sum. Log the
    unscaled loss.
    """
    return 1.0 if parallel_state is None else float(parallel_state.grad_average_size)
