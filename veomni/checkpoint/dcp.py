"""Exact, atomic training checkpoints with torch.distributed.checkpoint (DCP).

Layout (docs/parallelism.md has the full rules):

    <output_dir>/checkpoints/global_step_<N>/
        .metadata, __<r>_0.distcp      DCP: model + optimizer, sharded by the saving ranks
        ds/                             instead of the DCP files under data_parallel=deepspeed:
                                        DeepSpeed's model + ZeRO optimizer shards
                                        (LoRA runs: the DCP files hold only the trainable
                                        parameters and their optimizer state; veomni/checkpoint/adapter.py)
        scheduler.pt                    lr scheduler state_dict (main rank)
        dataloader.json                 loader state of the main rank (global-sample based)
        train_state.json                step, tokens_seen, epoch, ... (main rank)
        rng_rank<r>.pt                  every RNG stream of rank r
        model_config.json               the model's HF config (to rebuild it for export)
        resolved_config.yaml            copy of <output_dir>/resolved_config.yaml when present
        COMPLETE                        JSON manifest; written last

Atomicity: everything is written into `global_step_<N>.tmp-<id>/`; after all ranks are done the
main rank writes COMPLETE (size + crc32 of every file) and renames the directory. A directory
named `global_step_<N>` without COMPLETE, a `.tmp-` leftover, or a file whose size/crc differs
from the manifest is reported and skipped; `load_latest` then falls back to the previous one.

`global_step_<N>` is the state after N completed optimizer steps, with the loader state taken
after the last batch of step N: resuming runs step N+1 on the next batch.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import uuid
import warnings
import zlib
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch

from veomni.checkpoint.rng import derive_rng_state, get_rng_state, set_rng_state
from veomni.distributed.utils import unwrap_model

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
CHECKPOINTS = "checkpoints"
MARKER = "COMPLETE"
FORMAT_VERSION = 1
_FINAL = re.compile(r"^global_step_(\d+)$")
_LEFTOVER = re.compile(r"^global_step_(\d+)\.(tmp|old)-")  # interrupted save / replace


class CheckpointError(RuntimeError):
    """A checkpoint is incomplete, corrupt or cannot be loaded (the message says which and why)."""


# ---------------------------------------------------------------------------- small helpers
class _Solo:
    """Collectives of a single process without a ParallelState."""

    rank, world_size, is_main = 0, 1, True

    def all_gather_object(self, obj):
        return [obj]

    def broadcast_object(self, obj, src=0):
        return obj


def _ps(parallel_state):
    if parallel_state is not None:
        return parallel_state
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        raise ValueError("a multi-rank process group exists but parallel_state is None: pass the "
                         "ParallelState so ranks coordinate (otherwise every rank writes the same files).")
    return _Solo()


def _agree(ps, error: Optional[str], what: str) -> None:
    """Raise the same CheckpointError on every rank if any rank failed (keeps ranks in lockstep:
    a rank raising alone would leave the others blocked in the next collective)."""
    errors = [e for e in ps.all_gather_object(error) if e]
    if errors:
        raise CheckpointError(f"{what}: " + "; ".join(errors))


def run_dcp(fn, state: Dict[str, Any], **kwargs):
    """dcp.save / dcp.load; without a process group (dp_mode='none') in single-process mode."""
    import torch.distributed as dist

    if dist.is_initialized():
        return fn(state, **kwargs)
    with warnings.catch_warnings():
        # DCP warns on every no_dist call ("torch.distributed is disabled ..."), even when asked.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        return fn(state, no_dist=True, **kwargs)


def checkpoint_dir(output_dir: PathLike, step: int) -> Path:
    return Path(output_dir) / CHECKPOINTS / f"global_step_{int(step)}"


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 23):
            crc = zlib.crc32(chunk, crc)
    return crc


def _list_files(root: Path) -> List[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.name != MARKER)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some filesystems do not allow opening directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _json_default(obj):
    # numpy / torch scalars (a loader or the loop may hand them in): store the Python number.
    item = getattr(obj, "item", None)
    if callable(item):
        try:
            return item()
        except (ValueError, RuntimeError):  # more than one element
            pass
    raise TypeError(f"{type(obj).__name__} is not JSON-serialisable; convert it to int/float/str/list/dict")


def _dump_json(obj: Dict, name: str) -> str:
    if not isinstance(obj, dict):
        raise TypeError(f"{name} must be a dict, got {type(obj).__name__}")
    try:
        return json.dumps(obj, indent=2, sort_keys=True, default=_json_default)
    except TypeError as exc:
        raise TypeError(f"{name} cannot be stored as JSON: {exc}") from None


def _deepspeed(model) -> bool:
    from veomni.distributed.deepspeed_engine import is_deepspeed

    return is_deepspeed(model)


def _adapter(model) -> bool:
    from veomni.checkpoint.adapter import adapter_spec

    return adapter_spec(model) is not None


def _check_engine(path: Path, manifest: Dict[str, Any], model, ps) -> None:
    """A DeepSpeed checkpoint resumes only under DeepSpeed with the same stage and world size, a DCP
    one only without DeepSpeed, an adapter-only one only with the same adapters on the same base: a
    ValueError (a setting to fix, not damage to fall back from)."""
    from veomni.checkpoint.adapter import check_engine

    check_engine(path, manifest, model, ps)
    saved_ds = manifest.get("engine") == "deepspeed"
    export = f"python scripts/export_hf.py --checkpoint {path} --out DIR"
    if saved_ds and not _deepspeed(model):
        raise ValueError(
            f"{path} was saved by DeepSpeed ZeRO-{manifest.get('zero_stage')} on {manifest['world_size']} "
            f"process(es); resume it with train.data_parallel=deepspeed, train.zero_stage="
            f"{manifest.get('zero_stage')} on as many processes, or export it ({export}) and start from "
            "the HF directory.")
    if not saved_ds and _deepspeed(model):
        raise ValueError(
            f"{path} is a DCP checkpoint (data_parallel={manifest.get('dp_mode')}); DeepSpeed cannot load it. "
            f"Resume with that data_parallel mode, or export it ({export}) and start from the HF directory.")
    if saved_ds and (manifest["world_size"] != ps.world_size or manifest.get("zero_stage") != model.zero_stage):
        raise ValueError(
            f"{path} holds DeepSpeed ZeRO-{manifest.get('zero_stage')} shards of {manifest['world_size']} "
            f"process(es); this run is ZeRO-{model.zero_stage} on {ps.world_size}. DeepSpeed checkpoints resume "
            f"on the same stage and number of processes; otherwise export it ({export}) and start from the "
            "HF directory.")


def _state_dicts(model, optimizer, options=None) -> Dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if _adapter(model):  # LoRA: the trainable parameters only (an NF4 base is not serialisable)
        from veomni.checkpoint.adapter import state_dicts

        return state_dicts(model, optimizer)
    if optimizer is None:
        return {"model": get_model_state_dict(model, options=options)}
    msd, osd = get_state_dict(model, optimizer, options=options)
    return {"model": msd, "optimizer": osd}


# ---------------------------------------------------------------------------- save
def save_checkpoint(output_dir: PathLike, step: int, model, optimizer=None, scheduler=None,
                    dataloader_state: Optional[Dict] = None, train_state: Optional[Dict] = None,
                    parallel_state=None, keep_last: Optional[int] = None) -> Path:
    """Save everything needed to resume exactly; collective (every rank calls it). Returns the
    final directory `<output_dir>/checkpoints/global_step_<step>`.

    model: plain, DDP-wrapped or FSDP2 model. dataloader_state/train_state: JSON-serialisable dicts;
    the main rank's are stored. train_state["step"] is set to `step` (it must match if given).
    keep_last: keep the newest K complete checkpoints by step (None/0 = keep all).
    """
    import torch.distributed.checkpoint as dcp

    ps = _ps(parallel_state)
    step = int(step)
    if keep_last is not None and keep_last < 0:
        raise ValueError(f"keep_last must be >= 0 (0/None = keep all), got {keep_last}")
    train_state = dict(train_state or {})
    if train_state.setdefault("step", step) != step:
        raise ValueError(f"train_state['step']={train_state['step']} but step={step}: the checkpoint "
                         "must describe the state after `step` optimizer steps.")
    dl_text = _dump_json(dict(dataloader_state or {}), "dataloader_state")
    ts_text = _dump_json(train_state, "train_state")
    final = checkpoint_dir(output_dir, step)
    tmp = final.with_name(f"{final.name}.tmp-{ps.broadcast_object(uuid.uuid4().hex[:12])}")
    tmp.mkdir(parents=True, exist_ok=True)

    # Model + optimizer: every rank writes its shards (DCP coordinates and propagates errors).
    if _deepspeed(model):
        model.save_shards(tmp)  # DeepSpeed's own format, under tmp/ds/
    else:
        run_dcp(dcp.save, _state_dicts(model, optimizer), checkpoint_id=str(tmp))

    error = None
    try:
        written = {f"rng_rank{ps.rank}.pt": get_rng_state()}
        if ps.is_main:
            if scheduler is not None:
                written["scheduler.pt"] = scheduler.state_dict()
            written["dataloader.json"] = dl_text
            written["train_state.json"] = ts_text
            config = getattr(unwrap_model(model), "config", None)
            if hasattr(config, "to_json_string"):
                written["model_config.json"] = config.to_json_string(use_diff=False)
            resolved = Path(output_dir) / "resolved_config.yaml"
            if resolved.is_file():
                written["resolved_config.yaml"] = resolved.read_text()
        for name, obj in written.items():
            if isinstance(obj, str):
                (tmp / name).write_text(obj)
            else:
                torch.save(obj, tmp / name)
            _fsync_file(tmp / name)  # DCP fsyncs its files; ours must be on disk before COMPLETE is
    except Exception as exc:  # noqa: BLE001 - re-raised on every rank by _agree
        error = f"rank {ps.rank}: {type(exc).__name__}: {exc}"
    _agree(ps, error, f"saving {tmp}")

    # Checksums, spread over ranks; the gather doubles as the barrier "all ranks finished writing".
    names = ps.broadcast_object(_list_files(tmp) if ps.is_main else None)
    mine = {n: {"size": (tmp / n).stat().st_size, "crc32": _crc32(tmp / n)}
            for n in names[ps.rank::ps.world_size]}
    files = {k: v for part in ps.all_gather_object(mine) for k, v in part.items()}

    error = None
    if ps.is_main:
        try:
            manifest = {
                "format": FORMAT_VERSION, "step": step, "world_size": ps.world_size,
                "dp_mode": getattr(ps, "dp_mode", "none"), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "unix_time": time.time(), "has_optimizer": optimizer is not None,
                "has_scheduler": scheduler is not None, "files": files,
            }
            if _deepspeed(model):
                manifest.update(model.manifest_fields())  # engine: deepspeed, zero_stage
            if _adapter(model):
                from veomni.checkpoint.adapter import manifest_fields

                manifest.update(manifest_fields(model))  # engine: lora, the adapters, the base's sha256
            _write_text_atomic(tmp / MARKER, json.dumps(manifest, indent=2, sort_keys=True))
            _fsync_dir(tmp)
            _publish(tmp, final)
            _prune(final.parent, keep_last)
        except Exception as exc:  # noqa: BLE001
            error = f"{type(exc).__name__}: {exc}"
    error = ps.broadcast_object(error)
    if error:
        raise CheckpointError(f"finalising {final}: {error}")
    if ps.is_main:
        logger.info("saved checkpoint %s (%d files)", final, len(files))
    return final


def _publish(tmp: Path, final: Path) -> None:
    if final.exists():
        # Same step saved again (e.g. a re-run). rename() cannot replace a non-empty directory: move
        # the old copy aside, put the new one in place, delete the old one. A crash in between leaves
        # both under leftover names, which resume skips (it falls back to the previous step).
        logger.warning("checkpoint %s already exists: replacing it", final)
        aside = final.with_name(f"{final.name}.old-{uuid.uuid4().hex[:12]}")
        os.rename(final, aside)
        os.rename(tmp, final)
        shutil.rmtree(aside)
    else:
        os.rename(tmp, final)
    _fsync_dir(final.parent)


def _prune(root: Path, keep_last: Optional[int]) -> None:
    for p in sorted(root.iterdir()):
        if p.is_dir() and _LEFTOVER.match(p.name):
            logger.warning("removing %s: leftover of an interrupted save", p)
            shutil.rmtree(p, ignore_errors=True)
    if not keep_last:
        return
    complete = sorted(((int(m.group(1)), p) for p in root.iterdir()
                       if p.is_dir() and (m := _FINAL.match(p.name)) and (p / MARKER).is_file()),
                      reverse=True)
    for _, p in complete[keep_last:]:
        logger.info("removing old checkpoint %s (keep_last=%d)", p, keep_last)
        shutil.rmtree(p)


# ---------------------------------------------------------------------------- verify / find
def _manifest_or_reason(path: Path) -> Tuple[Optional[Dict[str, Any]], Optional[str]]:
    marker = path / MARKER
    if not marker.is_file():
        return None, f"no {MARKER} marker (the save did not finish)"
    try:
        manifest = json.loads(marker.read_text())
        manifest["files"].items()
    except (ValueError, KeyError, AttributeError, TypeError) as exc:
        return None, f"{MARKER} is not a valid manifest ({type(exc).__name__}: {exc})"
    if manifest.get("engine") == "deepspeed":
        if not any(name.startswith("ds/") for name in manifest["files"]):
            return None, "the manifest lists no DeepSpeed files (ds/)"
    elif ".metadata" not in manifest["files"]:
        return None, "the manifest lists no DCP .metadata file"
    return manifest, None


def read_manifest(path: PathLike) -> Dict[str, Any]:
    """The COMPLETE manifest of a checkpoint; CheckpointError if it is missing or unreadable."""
    manifest, reason = _manifest_or_reason(Path(path))
    if reason:
        raise CheckpointError(f"{path}: {reason}")
    return manifest


def _verify_local(path: Path, checksums: bool, rank: int = 0, world_size: int = 1) -> Optional[str]:
    """Sizes of all files; crc32 of this rank's slice of them when `checksums`. No collectives."""
    manifest, reason = _manifest_or_reason(path)
    if reason:
        return reason
    files = manifest["files"]
    names = sorted(files)
    for name in names:
        p = path / name
        if not p.is_file():
            return f"{name} is listed in the manifest but missing"
        size = p.stat().st_size
        if size != files[name]["size"]:
            return f"{name} has {size} bytes, the manifest says {files[name]['size']} (truncated or overwritten)"
    if checksums:
        for name in names[rank::world_size]:
            if _crc32(path / name) != files[name]["crc32"]:
                return f"{name} fails its crc32 check (content corrupted)"
    return None


def verify_checkpoint(path: PathLike, checksums: bool = True, parallel_state=None) -> Optional[str]:
    """None if `path` is a complete, intact checkpoint, else the reason it is not.

    Sizes are always checked; checksums=True also reads every file (crc32), spread over the ranks
    when a parallel_state is given (collective then; every rank gets the same answer).
    """
    ps = _ps(parallel_state)
    reason = _verify_local(Path(path), checksums, ps.rank, ps.world_size)
    reasons = [r for r in ps.all_gather_object(reason) if r]
    return reasons[0] if reasons else None


def _candidates(output_dir: PathLike) -> List[Tuple[int, Path, Optional[str]]]:
    """(step, path, reason-to-skip or None) for every global_step_* entry, newest first."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        if not p.is_dir():
            continue
        if m := _LEFTOVER.match(p.name):
            out.append((int(m.group(1)), p, "leftover of an interrupted save (never renamed)"))
        elif m := _FINAL.match(p.name):
            out.append((int(m.group(1)), p, _verify_local(p, checksums=False)))
    return sorted(out, key=lambda t: (t[0], t[2] is None), reverse=True)


def find_latest_checkpoint(output_dir: PathLike, checksums: bool = True) -> Optional[Path]:
    """Newest complete, intact checkpoint under `<output_dir>/checkpoints`, or None.

    Skipped entries (leftover `.tmp-` dirs, no COMPLETE marker, missing/truncated/corrupt files)
    are logged as warnings naming the directory and the reason. checksums=False checks sizes only
    (fast; `load_latest` checks checksums itself while loading). Single-process function.
    """
    for _, path, reason in _candidates(output_dir):
        if reason is None and checksums:
            reason = _verify_local(path, checksums=True)
        if reason is None:
            return path
        logger.warning("skipping checkpoint %s: %s", path, reason)
    return None


# ---------------------------------------------------------------------------- load
def load_checkpoint(path: PathLike, model, optimizer=None, scheduler=None, parallel_state=None,
                    verify: bool = True) -> Tuple[Dict, Dict]:
    """Restore model, optimizer, scheduler and RNG from `path`; return (dataloader_state, train_state).

    Collective. Works across world sizes and dp modes (DCP reshards). RNG: same world size -> each
    rank gets its own saved streams back; another world size -> streams are re-seeded from
    (saved state, step, rank) and a warning says continuity is not bitwise. verify: crc32 every file
    first (spread over ranks). Raises CheckpointError on an incomplete/corrupt checkpoint.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    ps = _ps(parallel_state)
    path = Path(path)
    reason = verify_checkpoint(path, checksums=verify, parallel_state=parallel_state)
    if reason:
        raise CheckpointError(f"{path}: {reason}")
    manifest = read_manifest(path)
    if optimizer is not None and not manifest.get("has_optimizer"):
        raise ValueError(f"{path} was saved without an optimizer state; pass optimizer=None to load the model only.")
    if scheduler is not None and not manifest.get("has_scheduler"):
        raise ValueError(f"{path} was saved without a scheduler state; pass scheduler=None.")
    _check_engine(path, manifest, model, ps)

    from torch.distributed.checkpoint.api import CheckpointException

    if _deepspeed(model):
        error = None
        try:
            model.load_shards(path)  # model + optimizer, DeepSpeed's format
        except Exception as exc:  # noqa: BLE001 - the same CheckpointError on every rank below
            error = f"rank {ps.rank}: DeepSpeed could not load model/optimizer: {type(exc).__name__}: {exc}"
        _agree(ps, error, str(path))
    else:
        state = _state_dicts(model, optimizer)
        try:
            run_dcp(dcp.load, state, checkpoint_id=str(path))
        # DCP raises the same CheckpointException on every rank; it derives from BaseException, so an
        # `except Exception` alone would let it through and skip the fallback.
        except (Exception, CheckpointException) as exc:  # noqa: BLE001
            raise CheckpointError(f"{path}: DCP could not load model/optimizer: {exc}") from exc
        if _adapter(model):
            from veomni.checkpoint.adapter import set_state

            set_state(model, optimizer, state)
        elif optimizer is None:
            set_model_state_dict(model, state["model"])
        else:
            set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])

    error, loader_state, train_state = None, None, None
    try:
        if scheduler is not None:
            scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
        loader_state = json.loads((path / "dataloader.json").read_text())
        train_state = json.loads((path / "train_state.json").read_text())
        if manifest["world_size"] == ps.world_size:
            set_rng_state(torch.load(path / f"rng_rank{ps.rank}.pt", weights_only=True))
        else:
            derive_rng_state(torch.load(path / "rng_rank0.pt", weights_only=True), manifest["step"], ps.rank)
            if ps.is_main:
                logger.warning(
                    "resuming %s saved by %d rank(s) on %d: RNG streams re-seeded from (saved state, "
                    "step, rank); the run is reproducible but not bitwise-continuous with the "
                    "original one.", path, manifest["world_size"], ps.world_size)
    except Exception as exc:  # noqa: BLE001
        error = f"rank {ps.rank}: {type(exc).__name__}: {exc}"
    _agree(ps, error, f"{path}: restoring scheduler/loader/RNG state")
    if ps.is_main:
        logger.info("resumed from %s (step %s)", path, train_state.get("step"))
    return loader_state, train_state


def load_latest(output_dir: PathLike, model, optimizer=None, scheduler=None, parallel_state=None,
                verify: bool = True) -> Optional[Tuple[Dict, Dict, Path]]:
    """Load the newest loadable checkpoint, falling back to older ones with a warning each.

    Returns (dataloader_state, train_state, path), or None when no checkpoint exists at all.
    Raises CheckpointError when checkpoints exist but none loads (never silently starts fresh).
    """
    ps = _ps(parallel_state)
    # One rank scans the directory so every rank walks the same list in the same order.
    candidates = ps.broadcast_object(_candidates(output_dir) if ps.is_main else None)
    if not candidates:
        if ps.is_main:
            logger.info("no checkpoint under %s: starting from scratch", Path(output_dir) / CHECKPOINTS)
        return None
    failures = []
    for _, path, reason in candidates:
        if reason is None:
            try:
                loader_state, train_state = load_checkpoint(path, model, optimizer, scheduler,
                                                            parallel_state, verify=verify)
                return loader_state, train_state, path
            except CheckpointError as exc:
                reason = str(exc)
        failures.append(f"{path.name}: {reason}")
        if ps.is_main:
            logger.warning("skipping checkpoint %s: %s; trying the previous one", path, reason)
    raise CheckpointError(f"no loadable checkpoint under {Path(output_dir) / CHECKPOINTS}: " + " | ".join(failures))
