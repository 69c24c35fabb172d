"""Gated DeltaNet (reference torch path) vs an attention layer: CPU cost per layer, side by side.

    python scripts/bench_gdn.py                           # CPU fp32, S=2048, the token mixers
    python scripts/bench_gdn.py --seq_lens 512,2048,4096  # scaling: GDN linear, attention quadratic
    python scripts/bench_gdn.py --scope layer --iters 5   # whole decoder layers (norms + mixer + MLP)
    python scripts/bench_gdn.py --no_hf                   # skip the HF transformers baseline row

Two 1-layer Qwen3.5 text models (veomni/models/transformers/qwen3_5/modeling_qwen3_5.py) are built
from one realistic-width `Qwen3_5TextConfig` through veomni.models.registry.build_model: one with
layer_types ["linear_attention"] (our `GatedDeltaNet`, `model.ops.gdn=torch`), one with
["full_attention"] (`GatedAttention`, attn_impl=sdpa). The `LayerContext` is the one
`DecoderModel.forward` builds (captured by a forward pre-hook on `model.model.layers[0]` during one
call of the model in that mode), so RoPE, `AttnMeta` and the GDN segments are exactly the model's.
Then only the layer is timed (embeddings, final norm and LM head are not), on a fixed random input
x ~ N(0, 1) of shape [B, S, hidden]:
  --scope mixer (default)  the token mixer alone, mixer(x, ctx): where the two layer types differ;
  --scope layer            the whole DecoderLayer (input norm + mixer + post norm + the same MLP).
`forward ms` is a no-grad call; `fwd+bwd ms` is a forward with grad plus backward of sum(out^2)
(gradients of x and of every parameter). Medians of --iters timed iterations after one warm-up.
tok/s = B*S / fwd+bwd time; `vs attn` = this row's time / the attention row's time in the same mode
and sequence length (forward and fwd+bwd). The GDN segment boundaries are recomputed every
iteration (ctx.memo cleared), as a 1-layer forward would.

Modes: causal = the forward scan only (the AR model); bidirectional = forward scan + reverse scan of
the flipped sequence (the diffusion mode; reverse_gate is set to 0.5 so the reverse branch counts).
The baseline row is transformers' own `Qwen3_5GatedDeltaNet` (its torch fallback, i.e. no fla /
causal-conv1d installed; it warns about that) with the same weights, causal only (HF has no
bidirectional GDN); its `max abs diff` against our causal output is printed on stderr.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODES = ("causal", "bidirectional")


def make_config(args, layer_type: str):
    from transformers import Qwen3_5TextConfig

    return Qwen3_5TextConfig(
        vocab_size=1024, hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=1,
        layer_types=[layer_type], num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim, linear_num_key_heads=args.gdn_k_heads, linear_num_value_heads=args.gdn_v_heads,
        linear_key_head_dim=args.gdn_dim, linear_value_head_dim=args.gdn_dim, linear_conv_kernel_dim=4,
        hidden_act="silu", rms_norm_eps=1e-6, max_position_embeddings=max(8192, max(args.seq_lens)),
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
    )


def build(config, seed: int):
    from veomni.models.registry import build_model

    torch.manual_seed(seed)
    model = build_model(config, attn_impl="sdpa")
    model.init_weights()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("reverse_gate"):
                p.fill_(0.5)  # let the reverse branch contribute (it starts at 0 for AR checkpoints)
    return model.float().eval()


def capture_ctx(model, bsz: int, slen: int, mode: str):
    """The LayerContext that DecoderModel.forward hands to layer 0 for this shape and mode."""
    got = {}
    layer = model.model.layers[0]
    handle = layer.register_forward_pre_hook(lambda mod, args: got.update(ctx=args[1]))
    try:
        with torch.no_grad():
            ids = torch.zeros(bsz, slen, dtype=torch.long)
            model(ids, attn_mode=mode, logits_to_keep=torch.tensor([0]))
    finally:
        handle.remove()
    return got["ctx"]


def timed(fn, iters: int) -> float:
    fn()  # warm-up (allocator, first-call paths)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench(module, call, x, iters: int) -> tuple[float, float, torch.Tensor]:
    """(forward s, forward+backward s, forward output) of call(module, x)."""
    def fwd():
        with torch.no_grad():
            return call(module, x)

    def fwd_bwd():
        module.zero_grad(set_to_none=True)
        xi = x.detach().requires_grad_()
        call(module, xi).float().pow(2).sum().backward()

    out = fwd()
    return timed(fwd, iters), timed(fwd_bwd, iters), out


def run(args) -> list[dict]:
    gdn_model = build(make_config(args, "linear_attention"), seed=0)
    attn_model = build(make_config(args, "full_attention"), seed=1)
    hf_gdn = None
    if not args.no_hf:
        from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5GatedDeltaNet

        hf_gdn = Qwen3_5GatedDeltaNet(make_config(args, "linear_attention"), 0)
        missing, unexpected = hf_gdn.load_state_dict(gdn_model.model.layers[0].linear_attn.state_dict(),
                                                     strict=False)
        assert not missing and unexpected == ["reverse_gate"], (missing, unexpected)
        hf_gdn = hf_gdn.float().eval()

    rows = []
    for slen in args.seq_lens:
        g = torch.Generator().manual_seed(slen)
        x = torch.randn(args.batch, slen, args.hidden, generator=g)
        tokens = args.batch * slen
        for mode in MODES:
            results = {}
            for name, model in (("GDN (ours, torch)", gdn_model), ("attention (sdpa)", attn_model)):
                ctx = capture_ctx(model, args.batch, slen, mode)
                layer = model.model.layers[0]
                target = layer.mixer if args.scope == "mixer" else layer

                def call(mod, inp, ctx=ctx):
                    ctx.memo.clear()
                    out = mod(inp, ctx)
                    return out if args.scope == "mixer" else out[0]

                results[name] = bench(target, call, x, args.iters)
                print(f"  S={slen} {mode} {name}: fwd {results[name][0] * 1e3:.1f} ms, "
                      f"fwd+bwd {results[name][1] * 1e3:.1f} ms", file=sys.stderr)
            if hf_gdn is not None and mode == "causal":
                if args.scope == "mixer":
                    results["GDN (HF torch fallback)"] = bench(hf_gdn, lambda mod, inp: mod(inp), x, args.iters)
                else:  # the same layer with HF's mixer swapped in
                    layer = gdn_model.model.layers[0]
                    ctx = capture_ctx(gdn_model, args.batch, slen, mode)
                    ours = layer.linear_attn
                    layer.linear_attn = _HFMixer(hf_gdn)
                    try:
                        results["GDN (HF torch fallback)"] = bench(layer, lambda mod, inp: mod(inp, ctx)[0], x,
                                                                   args.iters)
                    finally:
                        layer.linear_attn = ours
                t_hf = results["GDN (HF torch fallback)"]
                diff = float((t_hf[2] - results["GDN (ours, torch)"][2]).abs().max())
                print(f"  S={slen} causal GDN (HF torch fallback): fwd {t_hf[0] * 1e3:.1f} ms, fwd+bwd "
                      f"{t_hf[1] * 1e3:.1f} ms; max abs diff vs ours {diff:.1e}", file=sys.stderr)
            ref_f, ref_fb, _ = results["attention (sdpa)"]
            for name, (t_f, t_fb, _) in results.items():
                rows.append({
                    "S": slen, "layer": name, "mode": mode,
                    "forward ms": t_f * 1e3, "fwd+bwd ms": t_fb * 1e3, "fwd+bwd tok/s": tokens / t_fb,
                    "fwd vs attn": t_f / ref_f, "fwd+bwd vs attn": t_fb / ref_fb,
                })
    return rows


class _HFMixer(torch.nn.Module):
    """HF's GDN under our mixer(x, ctx) signature (for --scope layer)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x, ctx):
        return self.inner(x)


def markdown(rows: list[dict]) -> str:
    header = list(rows[0])
    numeric = {"S", "forward ms", "fwd+bwd ms", "fwd+bwd tok/s", "fwd vs attn", "fwd+bwd vs attn"}
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---:" if h in numeric else "---" for h in header) + "|"]
    for r in rows:
        cells = []
        for h in header:
            v = r[h]
            if h.endswith("vs attn"):
                cells.append(f"**{v:.2f}x**" if h == "fwd+bwd vs attn" else f"{v:.2f}x")
            elif h.endswith("ms"):
                cells.append(f"{v:,.1f}")
            elif isinstance(v, float):
                cells.append(f"{v:,.0f}")
            else:
                cells.append(str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq_lens", default="2048", help="comma-separated sequence lengths, e.g. 512,2048,4096")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--iters", type=int, default=3, help="timed iterations per row and pass (median)")
    ap.add_argument("--scope", default="mixer", choices=["mixer", "layer"],
                    help="time the token mixer alone, or the whole decoder layer (adds norms + MLP)")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816, help="MLP width (only timed with --scope layer)")
    ap.add_argument("--heads", type=int, default=8, help="attention query heads")
    ap.add_argument("--kv_heads", type=int, default=2)
    ap.add_argument("--head_dim", type=int, default=128, help="attention head dim (partial RoPE 0.25)")
    ap.add_argument("--gdn_k_heads", type=int, default=4, help="GDN q/k heads")
    ap.add_argument("--gdn_v_heads", type=int, default=8, help="GDN value heads")
    ap.add_argument("--gdn_dim", type=int, default=128, help="GDN key and value head dim")
    ap.add_argument("--no_hf", action="store_true", help="skip transformers' Qwen3_5GatedDeltaNet baseline")
    args = ap.parse_args()
    args.seq_lens = [int(s) for s in args.seq_lens.split(",")]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, fp32, B={args.batch}, "
          f"scope={args.scope}", file=sys.stderr)
    rows = run(args)
    print(markdown(rows))


if __name__ == "__main__":
    main()
