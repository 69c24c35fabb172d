"""One MDM training step, ours vs Hugging Face transformers + a hand-written MDM loss, side by side.

    python scripts/bench_train.py                         # SmolLM2-135M, batch 4 x 512, 3 timed steps
    python scripts/bench_train.py --batch 2 --seq 256 --steps 2 --skip_loss   # quicker
    python scripts/bench_train.py --device cuda --precision bf16 --batch 8 --seq 2048 --steps 10
    python scripts/bench_train.py --compile                # adds the ours + train.compile row

All variants load the same SmolLM2-135M-Instruct weights (scripts/prepare_smollm2.py), get the same
corrupted batch (our noise, one seed) and run forward + backward + AdamW (fp32 weights; with
--precision bf16 under bf16 autocast, fp32 master weights) on the chosen device:
  ours  veomni model, bidirectional sdpa, loss computed inside forward: LM head only at masked
        positions, chunked cross-entropy, 1/t weighting, normalised by maskable tokens.
  hf    transformers LlamaForCausalLM (sdpa) with an all-True 4D mask (bidirectional), full
        logits [B, S, V], the same loss written the obvious way (shift, gather masked, CE / t).
  ours_compile (--compile)  ours with each decoder layer torch.compile'd, as train.compile=true
        does (veomni/models/compile.py); compilation happens in the untimed warm-up step.
  hf_liger, ours_kernels[_compile] (--kernels; CUDA)  HF with liger-kernel's RMSNorm / RoPE /
        SwiGLU patched in (its fused linear CE replaces HF's causal loss, not this MDM loss, so it
        stays off); ours with model.ops rms_norm, rope, swiglu and linear_ce = triton (+ compile).
        A variant that fails is reported as such; hf and ours must run.
On CPU the variants are loaded together and take turns, step by step (--sequential: one after the
other), so a shared machine whose speed drifts slows them alike; the tok/s ratio is the median of
the per-round ratios. Each variant runs in its own process (peak memory = VmHWM over the steps on CPU, Linux;
max_memory_allocated on CUDA). MFU uses the same useful model FLOPs for both (veomni.models.flops,
head at loss positions) over the device peak: this CPU's matmul peak measured in the parent (before
each round when interleaved: the median over rounds of FLOPs / step time / that round's peak),
or the exact dense table entry of the GPU. Then the loss alone (head + CE,
SmolLM2 vocabulary, 8 x 2048 tokens) through scripts/bench_loss_memory.py.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

KERNEL_OPS = ("rms_norm", "rope", "swiglu", "linear_ce")  # the ops --kernels switches to our Triton kernels
REQUIRED = ("hf", "ours")  # every run needs these two; the other variants may fail and are reported


def _batch(args, vocab, mask_id, device):
    import torch

    from veomni.diffusion.noise import make_generator
    from veomni.diffusion.objective import MDMObjective

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, mask_id, (args.batch, args.seq), generator=g)
    batch = {"input_ids": ids,
             "position_ids": torch.arange(args.seq).expand(args.batch, -1).contiguous(),
             "segment_ids": torch.ones_like(ids), "attention_mask": torch.ones_like(ids),
             "maskable": torch.ones_like(ids, dtype=torch.bool)}
    obj = MDMObjective(mask_token_id=mask_id, weighting="inv_t", normalization="maskable", logit_shift=True)
    batch = {k: v.to(device) for k, v in batch.items()}
    corr = obj.prepare(batch, make_generator(0, 0, 0, 0, device=device))
    return obj, batch, corr


def _load(args, variant):
    import torch

    from veomni.models.hf_io import load_tokenizer
    from veomni.models.mask_token import ensure_mask_token

    tok = load_tokenizer(args.model_path)
    if variant.startswith("ours"):
        from veomni.models.hf_io import load_model

        model = load_model(args.model_path, dtype=torch.float32, attn_impl="sdpa")
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.model_path, dtype=torch.float32, attn_implementation="sdpa")
    mask_id = ensure_mask_token(model, tok)
    if variant == "hf_liger":
        # liger's RMSNorm, RoPE and SwiGLU patched into the HF modules, as users apply it. Its fused
        # linear CE is left off: it replaces HF's own causal loss, not the MDM loss written here.
        from liger_kernel.transformers.monkey_patch import _apply_liger_kernel_to_instance

        from veomni.ops.liger import _rms_norm_function

        _rms_norm_function()  # under TRITON_INTERPRET=1 only: the interpreter shim of liger's RMSNorm
        _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                        fused_linear_cross_entropy=False)
    if variant.startswith("ours_kernels"):
        from veomni.ops.registry import apply_ops

        apply_ops(model, {op: "triton" for op in KERNEL_OPS})
    if variant.endswith("compile"):
        from veomni.models.compile import compile_decoder_layers

        compile_decoder_layers(model)
    return model.train(), mask_id


def run_child(args) -> None:
    import torch
    import torch.nn.functional as F

    from veomni.utils.peak_memory import peak_since_mib, reset_peak

    import contextlib

    torch.manual_seed(0)
    device = torch.device(args.device)
    model, mask_id = _load(args, args.child)
    model.to(device)
    obj, batch, corr = _batch(args, model.config.vocab_size, mask_id, device)
    denom = obj.num_loss_tokens(corr)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    full_mask = torch.ones(args.batch, 1, args.seq, args.seq, dtype=torch.bool, device=device)
    cuda = device.type == "cuda"
    amp = (torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16"
           else contextlib.nullcontext())

    def step():
        with amp:
            loss = _loss()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        return loss.item()

    def _loss():
        if args.child.startswith("ours"):
            return model(**obj.model_inputs(batch, corr), loss_fn=obj.loss_fn(corr, denom)).loss
        else:
            logits = model(input_ids=corr.noisy_ids, attention_mask=full_mask).logits
            logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)  # shift: i predicted at i-1
            m = corr.masked
            ce = F.cross_entropy(logits[m].float(), batch["input_ids"][m], reduction="none")
            loss = (ce / corr.t[m]).sum() / denom
        return loss

    losses = [step()]  # warm-up (allocator, thread pool, kernels, compilation); not timed
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    else:
        baseline = reset_peak()

    def timed_step():
        t0 = time.perf_counter()
        losses.append(step())
        return time.perf_counter() - t0

    times = []
    if args.lockstep:
        # The parent says when to step (one line "step" on stdin), so the variants take turns and a
        # machine whose speed drifts during the run (a shared VM) slows each of them alike.
        print(json.dumps({"ready": True}), flush=True)
        for line in sys.stdin:
            if line.strip() != "step":
                break
            times.append(timed_step())
            print(json.dumps({"step_s": times[-1]}), flush=True)
    else:
        times = [timed_step() for _ in range(args.steps)]
    peak_mib = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else peak_since_mib(baseline)
    print(json.dumps({"variant": args.child, "step_s": statistics.median(times), "peak_mib": peak_mib,
                      "first_loss": losses[0], "head_tokens": int(corr.targets.numel()), "denom": denom}))


def _child_cmd(args, variant, lockstep=False):
    return [sys.executable, os.path.abspath(__file__), f"--child={variant}", f"--model_path={args.model_path}",
            f"--batch={args.batch}", f"--seq={args.seq}", f"--steps={args.steps}",
            f"--device={args.device}", f"--precision={args.precision}"] + (["--lockstep"] if lockstep else [])


def _child(args, variant):
    """The variant's result, or {"failed": reason} for an optional variant (a kernels or compile row
    that cannot run must not cost the baseline rows of a GPU run); hf and ours must succeed."""
    proc = subprocess.run(_child_cmd(args, variant), capture_output=True, text=True)
    if proc.returncode != 0:
        if variant in REQUIRED:
            raise SystemExit(f"{variant} failed:\n{proc.stderr[-4000:]}")
        print(f"{variant} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
        return {"failed": _last_line(proc.stderr or f"exit {proc.returncode}")}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _interleaved(args, variants, measure_peak):
    """All variants loaded at once, each in its own process, stepping in turns (round r: every
    variant's r-th timed step, one after the other; the order rotates each round). Returns the
    children's results plus `ratio_vs_hf`: the median over rounds of hf's step time / the variant's
    in the same round, which cancels a drift of the machine's speed between rounds, and `peaks`:
    the matmul peak measured before each round (MFU is taken against the round's own peak). An
    optional variant that fails to start is reported as {"failed": reason}."""
    import tempfile

    procs, logs, res = {}, {}, {}
    try:
        for v in variants:  # one at a time: loading and warm-up (compilation) are not timed
            # stderr to a file, not a pipe: a long-lived child that logs more than a pipe holds would block.
            logs[v] = tempfile.TemporaryFile(mode="w+")
            procs[v] = subprocess.Popen(_child_cmd(args, v, lockstep=True), stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=logs[v], text=True)
            try:
                _expect(procs[v], v, "ready", logs[v])
            except SystemExit as exc:
                if v in REQUIRED:
                    raise
                print(exc, file=sys.stderr)
                res[v] = {"failed": _last_line(str(exc))}
                procs.pop(v).wait()
        live = [v for v in variants if v in procs]
        times = {v: [] for v in live}
        peaks = []
        for r in range(args.steps):
            peaks.append(measure_peak())
            for v in live[r % len(live):] + live[:r % len(live)]:
                procs[v].stdin.write("step\n")
                procs[v].stdin.flush()
                times[v].append(_expect(procs[v], v, "step_s", logs[v]))
        for v in live:
            procs[v].stdin.write("done\n")
            procs[v].stdin.close()
            res[v] = json.loads(procs[v].stdout.read().strip().splitlines()[-1])
            procs[v].wait()
            res[v]["step_s"] = statistics.median(times[v])
            res[v]["ratio_vs_hf"] = statistics.median(h / t for h, t in zip(times["hf"], times[v]))
            res[v]["times"] = times[v]
        return res, peaks
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
        for f in logs.values():
            f.close()


def _last_line(text: str) -> str:
    """A failure's last line, one table cell long (exception reprs carry literal \\n)."""
    last = (text.strip().splitlines() or ["failed"])[-1]
    return last.split("\\n")[0].replace("|", "/")[:120]


def _expect(proc, variant, key, log):
    line = proc.stdout.readline()
    if not line:
        proc.wait()
        log.seek(0)
        raise SystemExit(f"{variant} failed:\n{log.read()[-4000:]}")
    return json.loads(line)[key]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", default=None, help="HF dir (default: the prepared SmolLM2-135M)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant (median reported)")
    p.add_argument("--skip_loss", action="store_true", help="skip the loss-alone memory table")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                   help="bf16 = autocast with fp32 master weights (fp32 on CPU: no bf16 hardware here)")
    p.add_argument("--compile", action="store_true", help="add the ours_compile row (train.compile=true)")
    p.add_argument("--kernels", action="store_true",
                   help="add hf_liger (HF + liger-kernel's RMSNorm/RoPE/SwiGLU) and ours_kernels (model.ops "
                        "rms_norm/rope/swiglu/linear_ce=triton; with --compile also ours_kernels_compile). "
                        "Needs a CUDA GPU (under TRITON_INTERPRET=1 on CPU it runs, but only as a smoke test)")
    p.add_argument("--sequential", action="store_true",
                   help="time the variants one after the other (default on CUDA, where three models at "
                        "once may not fit) instead of in turns, step by step (default on CPU)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--lockstep", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.model_path is None:
        from veomni.models.smollm2 import prepare_smollm2

        args.model_path = str(prepare_smollm2())
    if args.child:
        run_child(args)
        return

    import torch
    from transformers import AutoConfig

    from veomni.models.flops import dense_decoder_flops
    from veomni.trainer.metrics import measure_matmul_peak

    from veomni.trainer.metrics import gpu_peak_flops

    if args.device.startswith("cuda"):
        gpu = torch.cuda.get_device_name(torch.device(args.device))
        peak = gpu_peak_flops(gpu, args.precision)
        if peak is None:
            raise SystemExit(f"no peak FLOP/s known for {gpu!r}; add it to veomni/trainer/metrics.py")
        where = f"{gpu}, dense {args.precision} peak {peak / 1e12:.0f} TFLOP/s"
    variants = ["hf", "ours"] + (["ours_compile"] if args.compile else [])
    if args.kernels:
        if not args.device.startswith("cuda") and os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("--kernels runs Triton kernels: use --device cuda (on CPU they run only under "
                             "TRITON_INTERPRET=1, as a smoke test whose timings mean nothing)")
        variants += ["hf_liger", "ours_kernels"] + (["ours_kernels_compile"] if args.compile else [])
    interleave = not (args.sequential or args.device.startswith("cuda"))

    def cpu_peak():
        return measure_matmul_peak(torch.float32, size=1024, repeats=10)

    if interleave:
        res, peaks = _interleaved(args, list(variants), cpu_peak)
        where = (f"{torch.get_num_threads()} CPU threads, fp32 matmul peak measured before each round "
                 f"{min(peaks) / 1e9:.1f}-{max(peaks) / 1e9:.1f} GFLOP/s")
    else:
        if not args.device.startswith("cuda"):
            peak = cpu_peak()
            where = f"{torch.get_num_threads()} CPU threads, fp32 matmul peak measured here {peak / 1e9:.1f} GFLOP/s"
        res = {v: _child(args, v) for v in variants}
        for v in variants:
            if "failed" not in res[v]:
                res[v]["ratio_vs_hf"] = res["hf"]["step_s"] / res[v]["step_s"]
    tol = 1e-3 if args.precision == "fp32" else 3e-2
    for v in variants:  # every variant computes the same loss on the same batch
        if "failed" not in res[v]:
            assert abs(res["hf"]["first_loss"] - res[v]["first_loss"]) < tol * abs(res["hf"]["first_loss"]), \
                f"{v} and hf disagree on the loss: {res}"
    cfg = AutoConfig.from_pretrained(args.model_path)
    tokens = args.batch * args.seq
    flops = dense_decoder_flops(cfg, [args.seq] * args.batch, head_tokens=res["ours"]["head_tokens"],
                                attn_mode="bidirectional")
    print(f"MDM training step (fwd+bwd+AdamW), SmolLM2-135M, {args.precision}, batch {args.batch} x "
          f"{args.seq} = {tokens} tokens; {where}; MFU = useful model FLOPs "
          f"({flops / 1e12:.3f} TFLOP/step) / time / peak")
    print(f"Timing: {args.steps} steps per variant after one untimed warm-up, "
          + ("in turns (one step of each variant per round); speed-up = median over rounds of hf / variant"
             if interleave else "one variant after the other; speed-up = median hf / median variant")
          + "; step s = median.")
    print("| variant | step s | tok/s | MFU | peak MiB | loss (step 0) |")
    print("|---|---:|---:|---:|---:|---:|")
    for v in variants:
        r = res[v]
        if "failed" in r:
            print(f"| {v} | failed: {r['failed']} | | | | |")
            continue
        mfu = (statistics.median(flops / t / p for t, p in zip(r["times"], peaks)) if interleave
               else flops / r["step_s"] / peak)
        print(f"| {v} | {r['step_s']:.2f} | {tokens / r['step_s']:.0f} | {mfu:.1%} | "
              f"{r['peak_mib']:.0f} | {r['first_loss']:.4f} |")
    for v in variants[1:]:
        r = res[v]
        if "failed" not in r:
            print(f"| {v} / hf | {r['step_s'] / res['hf']['step_s']:.2f}x | {r['ratio_vs_hf']:.2f}x | | "
                  f"{r['peak_mib'] / res['hf']['peak_mib']:.2f}x | |")
    if not args.skip_loss and not args.device.startswith("cuda"):
        print()
        sys.stdout.flush()
        subprocess.run([sys.executable, os.path.join(REPO, "scripts", "bench_loss_memory.py")], check=True)


if __name__ == "__main__":
    main()
