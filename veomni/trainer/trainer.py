"""The training loop: AR checkpoint -> masked-diffusion LM (or an AR baseline), on CPU or GPU.

One step, in order (each numbered comment below matches):
  1. draw grad_accum micro-batches from the stateful loader;
  2. corrupt each with noise from a generator seeded by (seed, step, global micro-batch index), so
     a resumed run draws exactly the noise the uninterrupted one would have, on any world size;
  3. count the loss tokens and the valid tokens of all micro-batches on all ranks (one all-reduce)
     -> global denominators;
  4. forward with the loss computed inside the model (head only at loss positions), plus for MoE
     models the router losses' share (veomni/trainer/moe_terms.py), backward `share * dp_size * sp_size`
     (DDP/FSDP average gradients over ranks; see docs/training.md). With Ulysses sequence
     parallelism every sp rank corrupts the same whole micro-batch and then keeps its slice of the
     sequence (veomni/distributed/sequence_parallel.py);
  5. clip and step; a step whose loss or gradient norm is not finite is skipped (the weights and
     the optimizer state stay as they were, the skip is logged and counted) and the run stops
     after train.max_consecutive_skips of them in a row; then the schedule;
  6. log, evaluate, checkpoint (never with non-finite weights).

The main rank holds an exclusive lock on output_dir for the whole run, and torchrun workers exit
when their launcher dies (veomni/trainer/run_guard.py).
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import re
import signal
import time
from pathlib import Path

import torch

from veomni.arguments import Arguments, save_yaml, to_dict
from veomni.trainer.loggers import RunLogger, eval_summary, plot_loss_curve, setup_console_logging
from veomni.trainer.metrics import Throughput, device_peak_flops, matmul_dtype, memory_stats, passes, step_flops
from veomni.trainer.schedule import build_scheduler

logger = logging.getLogger("veomni")


def checkout_path(path):
    """A relative path that does not exist from the working directory but does inside this checkout
    (the tiny model configs under configs/models/) is taken from there, so the shipped configs run
    from any directory. Anything else (absolute paths, hub ids, embedded names) is returned as is."""
    if not path or os.path.isabs(path) or os.path.exists(path):
        return path
    inside = Path(__file__).resolve().parents[2] / path
    return str(inside) if inside.exists() else path


class NonFiniteLossError(RuntimeError):
    """Too many consecutive non-finite steps, or non-finite weights about to be checkpointed."""


class Trainer:
    def __init__(self, args: Arguments):
        self.args = args
        self._lock = None
        try:
            self._setup()
        except BaseException:
            # A failed start must not keep output_dir locked, nor the process's parallel state
            # (in-process users could not build another Trainer).
            self._release_lock()
            if getattr(self, "ps", None) is not None:
                self.ps.destroy()
            raise

    # ------------------------------------------------------------------ setup
    def _setup(self) -> None:
        from veomni.distributed import init_parallel_state

        a = self.args
        self.ps = init_parallel_state(dp_mode=a.train.data_parallel, dp_replicate=a.train.dp_replicate,
                                      ep_size=a.train.expert_parallel_size, sp_size=a.train.ulysses_parallel_size)
        setup_console_logging(self.ps.rank)
        from veomni.trainer.run_guard import watch_launcher

        watch_launcher()
        self.out_dir = Path(a.train.output_dir)
        self._take_output_dir()  # before anything is written there (data cache, checkpoints, logs)
        self.grad_accum = a.train.resolve_batch(self.ps.dp_size)
        torch.manual_seed(a.train.seed)  # model init (from scratch) is identical on every rank

        self.tokenizer, self.model = self._build_model()
        from veomni.trainer.moe_terms import MoETerms

        self.moe = MoETerms.build(a.train, self.model, self.ps)  # None for dense models (refuses router coefs)
        from veomni.trainer.align_terms import AlignTerms

        self.align = AlignTerms.build(a, self.model, self.ps)  # None unless train.repr_align_weight > 0
        self.mask_token_id = self.model.config.mask_token_id
        self._build_data()
        self._build_objective()
        from veomni.models.flops import trainability

        self._trainability = trainability(self.model)  # frozen parts: no weight / input gradients
        self.compute_dtype = matmul_dtype(a.train.mixed_precision, self.model.dtype)
        self.peak_flops = device_peak_flops(self.ps.device, self.compute_dtype, a.train.peak_flops)
        if self.peak_flops:
            logger.info("MFU peak: %.1f TFLOP/s (%s matmuls)", self.peak_flops / 1e12, self.compute_dtype)

        from veomni.distributed import bind_optimizer, deepspeed_options, parallelize

        self._par_cfg = dict(dp_mode=a.train.data_parallel, mixed_precision=a.train.mixed_precision,
                             gradient_checkpointing=a.model.gradient_checkpointing,
                             deepspeed=deepspeed_options(a.train, self.grad_accum), compile=a.train.compile)
        # A meta model has no weights to compare across ranks; prepare_meta_model compared the checkpoint.
        self.model = parallelize(self.model, self.ps, {**self._par_cfg, "check_replicas": self._meta_load is None})
        if self._meta_load is not None:
            self._meta_load.load(self.model)  # allocate and fill this rank's shards
            self._meta_load = None
        self.optimizer = torch.optim.AdamW(self._param_groups(), lr=a.train.lr, betas=tuple(a.train.betas),
                                           eps=1e-8)
        self.total_steps = self._total_steps()
        self.scheduler = build_scheduler(self.optimizer, a.train.lr_scheduler, a.train.warmup_steps,
                                         self.total_steps, a.train.min_lr_ratio)
        self.optimizer = bind_optimizer(self.model, self.optimizer)  # DeepSpeed: its engine steps it
        self.step = 0
        self.tokens_seen = 0
        self.skipped_steps = 0  # steps skipped for a non-finite loss or gradient norm, in total
        self.consecutive_skips = 0
        self._iter = None
        self._resumed_step = None
        self._last_eval_step = None
        self._resume()
        if self.ps.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            save_yaml(a, self.out_dir / "resolved_config.yaml")
        self.run_logger = RunLogger(str(self.out_dir), enabled=self.ps.is_main, use_wandb=a.train.use_wandb,
                                    wandb_project=a.train.wandb_project, config_dict=to_dict(a),
                                    resume_step=self.step)

    def _take_output_dir(self) -> None:
        """Main rank: lock output_dir for this run; every rank raises the same error if it is busy."""
        from veomni.trainer.run_guard import OutputDirLock

        error = None
        if self.ps.is_main:
            lock = OutputDirLock(self.out_dir)
            try:
                lock.acquire()
                self._lock = lock
            except Exception as exc:  # busy, or a filesystem without flock: stop every rank alike
                error = f"{type(exc).__name__}: {exc}"
        error = self.ps.broadcast_object(error)
        if error:
            from veomni.trainer.run_guard import OutputDirBusyError

            raise OutputDirBusyError(error)

    def _param_groups(self) -> list:
        """AdamW groups: weight decay on matmul weights and embeddings, none on what matches
        train.weight_decay_exempt (biases and norms by default, as HF Trainer does)."""
        from veomni.distributed import unwrap_model

        t = self.args.train
        decay, exempt = [], []
        for name, p in unwrap_model(self.model).named_parameters():
            if p.requires_grad:
                (exempt if any(re.search(pat, name) for pat in t.weight_decay_exempt) else decay).append(p)
        if t.weight_decay:
            logger.info("weight decay %g on %.1fM parameters; %.2fM exempt (train.weight_decay_exempt=%s)",
                        t.weight_decay, sum(p.numel() for p in decay) / 1e6,
                        sum(p.numel() for p in exempt) / 1e6, t.weight_decay_exempt)
        groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": exempt, "weight_decay": 0.0}]
        return [g for g in groups if g["params"]]

    def _build_model(self):
        from veomni.models.embedded import resolve_model_path
        from veomni.models.hf_io import load_model, load_tokenizer
        from veomni.models.mask_token import ensure_mask_token

        a = self.args
        path = checkout_path(resolve_model_path(a.model.require_model_path()))  # AutoConfig needs a real path
        tokenizer = load_tokenizer(checkout_path(a.model.tokenizer_path) or path)  # resolves embedded names
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[a.model.dtype]

        def build_eager():  # the whole model on this rank
            if a.model.init_from_scratch:
                from transformers import AutoConfig

                from veomni.models.registry import build_model

                model = build_model(AutoConfig.from_pretrained(path), attn_impl=a.model.attn_impl)
                model.init_weights()
                return model.to(dtype)
            return load_model(path, dtype=dtype, attn_impl=a.model.attn_impl)

        self._meta_load = None
        if a.model.meta_init and a.train.data_parallel == "fsdp2":
            # Meta device now, this rank's shards only after parallelize (veomni/models/sharded_load.py).
            from veomni.models.sharded_load import prepare_meta_model

            model, self._meta_load = prepare_meta_model(path, tokenizer, a.model.mask_token, dtype, a.model.attn_impl,
                                                        self.ps, a.model.init_from_scratch, build_eager)
        else:
            model = build_eager()
            ensure_mask_token(model, tokenizer, a.model.mask_token)
        # Record how this model is meant to be run, so inference and exports need no guessing.
        model.config.dllm_attn_mode = a.model.attn_mode
        model.config.dllm_block_size = a.model.block_size
        model.config.dllm_logit_shift = a.train.logit_shift
        if a.train.objective == "editflow":  # sub / ins heads from the LM head, a rate head (veomni/models/editflow.py)
            from veomni.models.editflow import attach_editflow_heads

            attach_editflow_heads(model, a.train.logit_shift)
        if self._meta_load is None:
            model.to(self.ps.device)
        self._apply_freeze(model)
        if a.model.lora_rank:  # LoRA / QLoRA: adapters on the frozen (NF4) base, veomni/models/lora.py
            from veomni.models.lora import LoraSettings, apply_lora

            apply_lora(model, LoraSettings.from_args(a.model), base_path=path)
        from veomni.ops.registry import apply_ops

        apply_ops(model, a.model.ops)  # before parallelism wraps it; logs the implementations
        return tokenizer, model

    def _apply_freeze(self, model) -> None:
        patterns = self.args.train.freeze
        if not patterns:
            return
        frozen = 0
        for name, p in model.named_parameters():
            if any(re.search(pat, name) for pat in patterns):
                p.requires_grad_(False)
                frozen += p.numel()
        if frozen == 0:
            raise ValueError(f"train.freeze={patterns} matched no parameter name; check the regexes "
                             "(names look like model.layers.0.self_attn.q_proj.weight)")
        logger.info("froze %.1fM parameters matching %s", frozen / 1e6, patterns)

    def _build_data(self) -> None:
        from veomni.data.loader import build_dataloaders

        a = self.args
        if not (a.data.train_path or a.data.sources):
            raise ValueError("data.train_path is not set: point it at a .jsonl file, a text file or a directory "
                             "(or list data.sources with data.mixture_weights for a mixture).")
        if a.data.streaming and not a.train.max_steps:
            raise ValueError("data.streaming=true reads the corpus lazily and has no epoch length: set train.max_steps.")
        cache_dir = a.data.cache_dir or str(self.out_dir / "data_cache")
        # Rank 0 tokenizes and fills the cache first; the others then read it instead of all
        # ranks tokenizing the same corpus at once.
        kwargs = dict(micro_batch_size=a.train.micro_batch_size, data_type=a.data.data_type,
                      max_seq_len=a.data.max_seq_len, packing=a.data.packing, cache_dir=cache_dir,
                      text_key=a.data.text_key, skip_bad_lines=a.data.skip_bad_lines,
                      dp_rank=self.ps.dp_rank, dp_size=self.ps.dp_size, seed=a.train.seed,
                      eval_path=a.data.eval_path, eval_split_ratio=a.data.eval_split_ratio,
                      sources=a.data.sources, mixture_weights=a.data.mixture_weights, streaming=a.data.streaming,
                      num_workers=a.data.num_workers, prefetch_factor=a.data.prefetch_factor,
                      pad_response_with_eos=a.data.pad_response_with_eos,
                      # A streaming loader's state holds every dp rank's stream positions.
                      gather=self.ps.all_gather_object)
        if not self.ps.is_main:
            self.ps.barrier()
        self.loader, self.eval_loader = build_dataloaders(a.data.train_path or None, self.tokenizer, **kwargs)
        if self.ps.is_main:
            self.ps.barrier()
        if not self.loader.streaming and len(self.loader) == 0:
            raise ValueError(f"data.train_path={a.data.train_path} yields no full batch of "
                             f"{self.loader.global_batch_size} rows of {a.data.max_seq_len} tokens.")

    def _build_objective(self) -> None:
        from veomni.diffusion.objective import build_objective

        t = self.args.train
        if t.logit_shift and getattr(self.model, "predicts_in_place", False):
            raise ValueError(
                f"train.logit_shift=true reads token i from position i-1, the convention of AR-initialised decoders; "
                f"{type(self.model).__name__} is an encoder pretrained to predict each token at its own position "
                "(an MLM). Set train.logit_shift=false (configs/quickstart/bert_chat.yaml does).")
        kwargs = dict(logit_shift=t.logit_shift, chunk_size=t.ce_chunk_size)
        m = self.args.model
        if t.objective in ("mdm", "bd3lm"):
            kwargs.update(weighting=t.loss_weighting, normalization=t.loss_normalization, eps=t.noise_eps,
                          mask_token_id=self.mask_token_id, block_size=m.block_size)
        if t.objective == "mdm":
            kwargs.update(per_document=t.noise_per_document, attn_mode=m.attn_mode)
        elif t.objective == "bd3lm":
            kwargs.update(t_per_block=t.bd3lm_t_per_block, complementary=t.bd3lm_complementary)
        elif t.objective == "d3llm":  # teacher-trajectory masking; loads data.trajectory_path
            from veomni.diffusion.d3llm import d3llm_objective_kwargs

            kwargs = d3llm_objective_kwargs(self.args, self.mask_token_id)
        elif t.objective == "editflow":  # edits instead of masks; the heads are called inside the model's forward
            from veomni.diffusion.editflow.objective import editflow_objective_kwargs

            kwargs = editflow_objective_kwargs(self.args, self.model, self.tokenizer, self.mask_token_id)
        self.objective = build_objective(t.objective, **kwargs)
        from veomni.ops.linear_ce import check_linear_ce_objective

        # liger + 1/t weights needs a liger-kernel with per-row gradients: say so now, not at step 1.
        check_linear_ce_objective(m.ops["linear_ce"], getattr(self.objective, "weighting", "none"))

    def _set_progress(self, step: int) -> None:
        """Objectives with a curriculum (d3llm) take the training progress from the step number, so a
        resumed run continues it exactly; evaluation passes total_steps (the final, fixed state)."""
        hook = getattr(self.objective, "set_progress", None)
        if hook is not None:
            hook(step, self.total_steps, None if self.loader.streaming else len(self.loader) / self.grad_accum)

    def _total_steps(self) -> int:
        t = self.args.train
        if t.max_steps:
            return t.max_steps
        per_epoch = len(self.loader) // self.grad_accum
        return max(per_epoch * t.num_train_epochs, 1)

    # ------------------------------------------------------------------ checkpoints
    def _resume(self) -> None:
        if not self.args.train.resume:
            return
        from veomni.checkpoint import load_latest

        found = load_latest(str(self.out_dir), self.model, self.optimizer, self.scheduler, self.ps)
        if found is None:
            return
        loader_state, train_state, path = found
        self.loader.load_state_dict(loader_state)
        self.step = int(train_state["step"])
        self.tokens_seen = int(train_state["tokens_seen"])
        self.skipped_steps = int(train_state.get("skipped_steps", 0))
        self.consecutive_skips = int(train_state.get("consecutive_skips", 0))
        self._resumed_step = self.step
        logger.info("resumed from %s at step %d (%d tokens seen)", path, self.step, self.tokens_seen)

    def _weights_finite(self) -> bool:
        """True on every rank iff no rank's parameter shard holds a NaN or inf."""
        bad = 0
        with torch.no_grad():
            from veomni.distributed import local_shards

            for local in local_shards(self.model):  # FSDP2 / ZeRO-3: this rank's shard
                bad += int(not bool(torch.isfinite(local).all()))
        return self.ps.all_reduce_sum(torch.tensor(float(bad), device=self.ps.device), "world").item() == 0

    def save(self) -> None:
        from veomni.checkpoint import save_checkpoint

        if not self._weights_finite():
            raise NonFiniteLossError(
                f"the weights hold NaN/inf at step {self.step}; refusing to checkpoint them. The last good "
                f"checkpoint in {self.out_dir}/checkpoints is kept. Lower train.lr or enable clipping "
                "(train.max_grad_norm).")
        save_checkpoint(str(self.out_dir), self.step, self.model, self.optimizer, self.scheduler,
                        dataloader_state=self.loader.state_dict(),
                        train_state={"step": self.step, "tokens_seen": self.tokens_seen,
                                     "skipped_steps": self.skipped_steps,
                                     "consecutive_skips": self.consecutive_skips},
                        parallel_state=self.ps, keep_last=self.args.train.save_total_limit)
        if self.ps.is_main:
            save_yaml(self.args, self.out_dir / "resolved_config.yaml")

    # ------------------------------------------------------------------ the step
    def _autocast(self):
        # FSDP2 casts parameters itself (MixedPrecisionPolicy); DDP/single use autocast with fp32
        # master weights.
        from veomni.distributed import autocast_context

        return autocast_context(self.ps, self._par_cfg)

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.ps.device, non_blocking=True) for k, v in batch.items()}

    def _forward(self, mb: dict, corr, denom, hidden_states_out=None):
        """The model call of one micro-batch with its loss inside; under sequence parallelism on this
        rank's slice of the sequence (inputs and loss rows sliced alike, after the corruption).
        hidden_states_out: a list for the student's hidden states (Repr-Align)."""
        from veomni.distributed.sequence_parallel import sp_shard

        inputs, rows = sp_shard(self.objective.model_inputs(mb, corr), self.objective.scored_rows(corr), self.ps)
        extra = {} if hidden_states_out is None else {"hidden_states_out": hidden_states_out}
        return self.model(**inputs, loss_fn=self.objective.loss_fn(corr, denom, rows=rows), **extra)

    def _next_batch(self) -> dict:
        if self._iter is not None:
            batch = next(self._iter, None)
            if batch is not None:
                return batch
        # First call, or the epoch ended: the loader has advanced its own epoch counter and a new
        # iterator continues from its saved position (which is how resume lands mid-epoch).
        self._iter = iter(self.loader)
        return next(self._iter)

    def train_step(self) -> dict:
        from veomni.diffusion.noise import make_generator
        from veomni.distributed import backward

        a = self.args
        micro = [self._to_device(self._next_batch()) for _ in range(self.grad_accum)]  # 1.
        self._set_progress(self.step)
        # The noise of a micro-batch is keyed by its index in the global batch
        # (micro_step * dp_size + dp_rank: the loader hands rank r the r-th slice of each global
        # micro-batch). So 1 process x 2 accumulation steps draws exactly the noise of 2 processes,
        # and a resume on another world size keeps the noise of every sample. The sp ranks of a
        # group share dp_rank: they draw the same noise for the same rows.
        corrs = [self.objective.prepare(mb, make_generator(a.train.seed, self.step, 0,
                                                           i * self.ps.dp_size + self.ps.dp_rank))
                 for i, mb in enumerate(micro)]  # 2.
        tokens = int(sum(int(mb["attention_mask"].sum()) for mb in micro))  # valid (non-padding) tokens
        align = self.align
        pairs = 0 if align is None else align.start_step(micro, corrs, self.step)  # Repr-Align rows x layers
        # fp64: token counts of large global batches stay exact.
        local = torch.tensor([float(sum(self.objective.num_loss_tokens(c) for c in corrs)), float(tokens),
                              float(pairs)], dtype=torch.float64, device=self.ps.device)
        global_denom, global_tokens, global_pairs = self.ps.all_reduce_sum(local).tolist()  # 3. (over dp)
        moe = self.moe
        if moe is not None:  # the router losses are means over all valid tokens (of every copy of a row)
            # The router sees every computed copy of a token (bd3lm's two streams, complementary rows).
            moe.start_step(global_tokens * passes(self.objective, micro[0], corrs[0]))

        self.model.train()
        loss_sum = torch.zeros((), device=self.ps.device)
        for i, (mb, corr) in enumerate(zip(micro, corrs)):  # 4.
            sync = self.ps.no_sync(self.model) if i < len(micro) - 1 else contextlib.nullcontext()
            with sync, self._autocast():
                hidden = None if align is None else []
                out = self._forward(mb, corr, global_denom, hidden_states_out=hidden)
                total = out.loss
                if moe is not None:  # the router sees every valid token, masked and clean
                    term = moe.add(out.router_stats)
                    total = total if term is None else total + term
                if align is not None:  # hidden states kept near the frozen AR model's
                    total = total + align.add(i, hidden, global_pairs)
                backward(self.model, total * self.ps.grad_average_size)  # DeepSpeed: through its engine
            loss_sum += out.loss.detach()  # `loss` stays the diffusion / CE loss, comparable with dense runs
        # Every rank (dp x sp) holds a share of the loss: sum over all of them.
        extra = {}  # MoE router and Repr-Align metrics
        if moe is None:
            loss = self.ps.all_reduce_sum(loss_sum, "world").item()
        else:  # one all-reduce for the loss and the router sums
            sums = self.ps.all_reduce_sum(torch.cat([loss_sum.reshape(1).float(), moe.local_sums()]), "world")
            loss, extra = sums[0].item(), moe.metrics(sums[1:])
        if align is not None:
            extra.update(align.metrics(self.ps.all_reduce_sum(align.local_sum(), "world"), global_pairs))
        from veomni.distributed import clip_grad_norm_

        max_norm = a.train.max_grad_norm if a.train.max_grad_norm > 0 else float("inf")
        # A non-finite norm comes back without touching the gradients. Both numbers are global
        # (all-reduced), so every rank takes the same branch below.
        grad_norm = clip_grad_norm_(self.model, max_norm)
        lr = self.scheduler.get_last_lr()[0]
        skipped = not (math.isfinite(loss) and math.isfinite(grad_norm))  # 5.
        if skipped:
            # Stepping would write NaN/inf into the weights and the Adam moments (and from there
            # into the next checkpoint); skip the update, keep the step's data and schedule slot.
            self.skipped_steps += 1
            self.consecutive_skips += 1
            logger.warning("step %d skipped: loss %s, grad norm %s (%d in a row, %d in total)", self.step + 1,
                           loss, grad_norm, self.consecutive_skips, self.skipped_steps)
        else:
            self.optimizer.step()
            self.consecutive_skips = 0
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

        self.tokens_seen += int(global_tokens)
        # This rank's share of the work: the sp ranks of a group split every micro-batch.
        flops = step_flops(self._config, self.objective, micro, corrs, self._trainability) / self.ps.sp_size
        tokens = tokens / self.ps.sp_size
        return {"loss": loss, "lr": lr, "grad_norm": float(grad_norm), "tokens": tokens, "flops": flops,
                "skipped": int(skipped), "extra": extra}

    @property
    def _config(self):
        from veomni.distributed import unwrap_model

        return unwrap_model(self.model).config

    # ------------------------------------------------------------------ eval
    @torch.no_grad()
    def evaluate(self) -> dict | None:
        from veomni.diffusion.noise import make_generator

        if self.eval_loader is None:
            return None
        self.model.eval()
        self._last_eval_step = self.step
        total = torch.zeros(2, device=self.ps.device)  # [sum of weighted CE, loss tokens]
        limit = self.args.train.eval_max_batches
        # Every evaluation scores the same batches: restart the (unshuffled) eval loader at its first
        # row, and stop with islice, which never draws the batch after the limit. (Iterating the
        # stateful loader went on where the previous eval stopped, and the batch fetched to test
        # `i >= limit` was consumed unscored: each eval scored a different subset.)
        self.eval_loader.set_epoch(0)
        self._set_progress(self.total_steps)
        batches = iter(self.eval_loader)
        if limit:
            batches = itertools.islice(batches, limit)
        for i, batch in enumerate(batches):
            batch = self._to_device(batch)
            # Fixed noise for eval (seed, step=0, global micro-batch index as in training): every
            # evaluation scores the same corruption, so the curve measures the model, not the dice.
            corr = self.objective.prepare(batch, make_generator(self.args.train.seed + 1, 0, 0,
                                                                i * self.ps.dp_size + self.ps.dp_rank))
            # The token count once per sp group (its ranks hold the same rows), the loss from every rank.
            n = self.objective.num_loss_tokens(corr) if self.ps.sp_rank == 0 else 0
            with self._autocast():
                out = self._forward(batch, corr, 1.0)
            total += torch.tensor([float(out.loss), float(n)], device=self.ps.device)
        total = self.ps.all_reduce_sum(total, "world")
        return {"eval_loss": (total[0] / total[1].clamp(min=1)).item(), "eval_tokens": int(total[1])}

    # ------------------------------------------------------------------ loop
    def train(self) -> dict:
        a = self.args
        thr = Throughput(self.peak_flops, world_size=self.ps.world_size)
        bar = None
        if self.ps.is_main and a.train.progress_bar:
            from tqdm import tqdm

            bar = tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
        kill_at = int(os.environ.get("VEOMNI_DEBUG_KILL_AFTER_STEP", "0"))  # fault injection for resume tests
        last = {}
        if a.train.eval_steps and self.step == 0:
            # The starting point (an AR model scored as a diffusion LM) anchors the eval curve.
            ev = self.evaluate()
            if ev:
                self.run_logger.log(ev, 0, kind="eval")
                logger.info("step 0 eval_loss %.4f", ev["eval_loss"])
        t_start = time.perf_counter()
        while self.step < self.total_steps:
            m = self.train_step()
            self.step += 1
            thr.add(m["tokens"], m["flops"])
            if self.step % a.train.log_steps == 0 or self.step == self.total_steps or m["skipped"]:
                rate = thr.read()
                last = {"loss": m["loss"], "lr": m["lr"], "grad_norm": m["grad_norm"],
                        "tokens_per_s": rate["tokens_per_s"], "mfu": rate["mfu"],
                        "tokens_seen": self.tokens_seen, "epoch": self.loader.epoch,
                        "skipped": m["skipped"], "skipped_steps": self.skipped_steps,
                        **m["extra"], **getattr(self.objective, "progress_metrics", dict)(),
                        **memory_stats(self.ps.device)}
                self.run_logger.log(last, self.step)
                thr.reset()
                if bar is not None:
                    mfu = "n/a" if rate["mfu"] is None else f"{100 * rate['mfu']:.1f}%"
                    bar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{rate['tokens_per_s']:.0f}", mfu=mfu)
            if m["skipped"] and self.consecutive_skips >= a.train.max_consecutive_skips:
                raise NonFiniteLossError(
                    f"{self.consecutive_skips} consecutive steps had a non-finite loss or gradient norm (last: "
                    f"step {self.step}, loss {m['loss']}, grad norm {m['grad_norm']}); stopping. The last good "
                    f"checkpoint in {self.out_dir}/checkpoints is kept. Lower train.lr, enable clipping "
                    "(train.max_grad_norm) or check the data; train.max_consecutive_skips sets the limit.")
            if bar is not None:
                bar.update(1)
            if a.train.eval_steps and self.step % a.train.eval_steps == 0:
                ev = self.evaluate()
                if ev:
                    self.run_logger.log(ev, self.step, kind="eval")
                    logger.info("step %d eval_loss %.4f", self.step, ev["eval_loss"])
            if a.train.save_steps and self.step % a.train.save_steps == 0 and self.step < self.total_steps:
                self.save()
            if (a.train.eval_steps and self.step % a.train.eval_steps == 0) or (
                    a.train.save_steps and self.step % a.train.save_steps == 0):
                thr.reset()  # eval / checkpoint time is not training throughput
            if kill_at and self.step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
        if bar is not None:
            bar.close()
        trained = self.step != self._resumed_step  # re-running a finished run re-saves nothing
        if trained:
            self.save()
        # The final state is evaluated once: not again when the last step was an eval step, and not
        # when a finished run is re-run (its final eval is already in eval_metrics.jsonl).
        if a.train.eval_steps and trained and self._last_eval_step != self.step:
            ev = self.evaluate()
            if ev:
                self.run_logger.log(ev, self.step, kind="eval")
        if a.train.export_hf:
            from veomni.checkpoint import export_hf

            export_hf(self.model, str(self.out_dir / "hf"), self.tokenizer, self.ps,
                      adapter_dir=str(self.out_dir / "adapter"))  # LoRA: hf/ merged, adapter/ in peft's format
        if self.ps.is_main:
            png = plot_loss_curve(str(self.out_dir))
            logger.info("done: %d steps in %.1fs; loss curve %s", self.step, time.perf_counter() - t_start, png)
            if (summary := eval_summary(str(self.out_dir))) is not None:
                logger.info(summary)
        self.run_logger.close()
        return last

    def _release_lock(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def close(self) -> None:
        self._release_lock()
        self.ps.destroy()


def run(args: Arguments) -> dict:
    trainer = Trainer(args)
    try:
        return trainer.train()
    finally:
        trainer.close()
