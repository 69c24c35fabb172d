"""Shared pieces of the distributed/checkpoint tests: spawning ranks, a tiny model, a training loop.

Every rank of a spawned test runs the SAME loop as the single-process reference, on its own rows
of the same global batch, so results must match within fp32 tolerance.
"""
from __future__ import annotations

import datetime
import os
import time

import torch
import torch.nn.functional as F

from tests.models.tiny import VOCAB, tiny_config

STEPS, GLOBAL_ROWS, SEQ = 3, 4, 12
TIMEOUT = datetime.timedelta(seconds=60)


# ---------------------------------------------------------------------------- spawning
def _entry(rank, fn, world_size, port, args):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # 2 cores, 2 ranks: oversubscription makes gloo tests crawl
    fn(*args)
    import torch.distributed as dist

    if dist.is_initialized():
        # Leave together and tear gloo down before the interpreter exits: a rank exiting while
        # gloo's threads still run aborted once under load ("terminate called without an active
        # exception", SIGABRT in a 4-rank HSDP test).
        dist.barrier()
        dist.destroy_process_group()


def run_workers(fn, world_size: int, *args, timeout: float = 120.0) -> None:
    """Run fn(*args) on `world_size` spawned ranks (gloo via env://); re-raise a rank's exception."""
    import torch.multiprocessing as mp

    from veomni.distributed.utils import find_free_port

    ctx = mp.start_processes(_entry, args=(fn, world_size, find_free_port(), args), nprocs=world_size,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:  # only the processes this helper started
                if p.is_alive():
                    p.kill()
            raise TimeoutError(f"{fn.__name__} ranks did not finish within {timeout}s (deadlock?)")


# ---------------------------------------------------------------------------- model and data
def tiny_model(tied: bool = False, seed: int = 0):
    from veomni.models.registry import build_model

    torch.manual_seed(seed)
    model = build_model(tiny_config("llama", tied=tied))
    model.init_weights()
    return model.train()


def global_data(seed: int = 123):
    """ids, labels [STEPS, GLOBAL_ROWS, SEQ]; rows 0-1 have more ignored labels than rows 2-3, so
    the two ranks' token counts differ and only global normalisation gives the reference loss."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (STEPS, GLOBAL_ROWS, SEQ), generator=g)
    labels = torch.randint(0, VOCAB, (STEPS, GLOBAL_ROWS, SEQ), generator=g)
    drop = torch.rand(STEPS, GLOBAL_ROWS, SEQ, generator=g) < torch.tensor([0.6, 0.6, 0.1, 0.1])[:, None]
    labels[drop] = -100
    return ids, labels


def make_optim(model, lr: float = 1e-3):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    return opt, sched


def train(model, opt, sched, ps, ids, labels, rows, steps, max_norm: float = 0.5, sync_last_only=False):
    """`steps` optimizer steps over (ids, labels)[step]; this rank takes `rows` (a list of row
    slices = its micro-batches). sync_last_only: gradient communication only on the last
    micro-batch (no_grad_sync). Returns (global losses, grad norms)."""
    from veomni.distributed import backward, clip_grad_norm_, loss_scale_for_grad_averaging

    scale = loss_scale_for_grad_averaging(ps)
    losses, norms = [], []
    for s in steps:
        count = sum((labels[s, r] != -100).sum() for r in rows).double()
        n_global = ps.all_reduce_sum(count)  # tokens of all micro-batches on all ranks
        total = torch.zeros((), dtype=torch.float64)
        for i, r in enumerate(rows):
            lab = labels[s, r]

            def loss_fn(h, w, lab=lab):
                logits = (h @ w.t()).float()
                return F.cross_entropy(logits.flatten(0, 1), lab.flatten(), ignore_index=-100,
                                       reduction="sum") / n_global

            with ps.no_sync(model, skip=sync_last_only and i < len(rows) - 1):
                out = model(input_ids=ids[s, r], attn_mode="bidirectional", loss_fn=loss_fn)
                backward(model, out.loss * scale)  # DDP/FSDP/ZeRO average over ranks; scale makes it the sum
            total += out.loss.detach().double()
        losses.append(float(ps.all_reduce_sum(total)))
        norms.append(clip_grad_norm_(model, max_norm))
        opt.step()
        sched.step()
        opt.zero_grad()
    return losses, norms


def full_params(model):
    """name -> full fp32 tensor (collective under FSDP2: every rank must call it)."""
    from veomni.distributed import unwrap_model

    out = {}
    for name, p in unwrap_model(model).named_parameters():
        t = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[name.replace("_checkpoint_wrapped_module.", "")] = t.detach().clone()
    return out
