"""Decoding benchmark: each fast strategy beside its own baseline, with quality columns.

    python scripts/bench_decode.py --quick                         # 32 new tokens, 1 prompt (smoke)
    python scripts/bench_decode.py --model_path outputs/quickstart/hf --new_tokens 64 --num_prompts 4
    python scripts/bench_decode.py --model_path DIR --device cuda --new_tokens 256 --batch_sizes 1,8

Every row names its baseline, and differs from it in one thing only, so the table separates what a
KV cache buys from what a schedule buys:
  cache rows     (`*_prefix`, `*_dual`): the same alg, steps, block length and settings with
                 use_cache='none'.
  schedule rows  (fewer steps, or a parallel rule: threshold / factor / multi_block): the same
                 sampler family at one token per forward without a cache - `llada_b<B>_s<N>` (LLaDA
                 low_confidence, block B, N steps) for the block samplers (threshold tau = 1 is
                 exactly that rule), `maskgit_plus_s<N>` / `p2_s<N>` for the whole-sequence ones.
  references     (no baseline): the one-token-per-forward rows above.

Prompts: the 48 tokens before the middle of each .py file of held-out code (--heldout_path, default
this interpreter's stdlib `json` package; the quickstart trains on `email`).
Columns: NFE = model calls per batch; tok/fwd = new tokens per call per row; tok/s = new tokens of
all rows / wall time; x base = the row's tok/s over its baseline's (same tokens, so the wall-time
ratio); held-out logp/tok = mean log p(true token) of the file's next N tokens when the strategy's
own schedule decodes them teacher-forced (see heldout_logp: what parallel commits and approximate
caches cost, immune to repetition); scorer logp/tok = mean log-probability per generated token of
the free generation under a fixed causal scorer (--scorer_path, default the base
SmolLM2-135M-Instruct), each row scored up to and including its first EOS; d = minus the baseline's;
distinct = distinct tokens / tokens of the free generation (low = repetition, which a likelihood
scorer rewards); = base = fraction of generated positions equal to the baseline's free output (a
diagnostic, not a quality measure).

EOS handling is off during generation (every row generates exactly --new_tokens tokens, so rows
and strategies do the same work). Before running, one full forward per batch size is timed and
the run's cost bounded (every strategy at its worst case, N full forwards); above --max_minutes
the script stops and says which flags scale it down.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import torch

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPT_TOKENS = 48  # context before each held-out continuation


def default_heldout() -> Path:
    """The stdlib `json` package of this interpreter: real Python code on every machine, and not
    the quickstart's training corpus (the stdlib `email` package)."""
    import sysconfig

    return Path(sysconfig.get_paths()["stdlib"]) / "json"


@dataclass
class Strategy:
    overrides: dict
    baseline: Optional[str] = None  # None: a reference row
    kind: str = "reference"  # reference | schedule | cache


def strategies(n: int, block: int, fast_steps: int) -> Dict[str, Strategy]:
    """name -> Strategy, each dependent row right after its baseline. LLaDA's steps must be a
    multiple of its block count, so its step counts are rounded down to one."""
    n_blocks = math.ceil(n / block)
    full = n_blocks * max(1, n // n_blocks)
    fast = n_blocks * max(1, fast_steps // n_blocks)
    ref = f"llada_b{block}_s{full}"
    out: Dict[str, Strategy] = {ref: Strategy(dict(alg="low_confidence", block_length=block, steps=full))}

    def family(name, overrides, baseline, caches):
        out[name] = Strategy(overrides, baseline, "schedule")
        for cache in caches:
            out[f"{name}_{cache}"] = Strategy(dict(overrides, use_cache=cache), name, "cache")

    family(f"llada_b{block}_s{fast}", dict(alg="low_confidence", block_length=block, steps=fast), ref,
           ("prefix", "dual"))
    family(f"threshold0.9_b{block}", dict(alg="threshold", threshold=0.9, block_length=block), ref,
           ("prefix", "dual"))
    family(f"factor1.0_b{block}", dict(alg="factor", factor=1.0, block_length=block), ref, ("dual",))
    family(f"multi_block_b{block}", dict(alg="multi_block", block_length=block), ref, ("prefix",))
    for alg in ("maskgit_plus", "p2"):
        out[f"{alg}_s{n}"] = Strategy(dict(alg=alg, steps=n))
        family(f"{alg}_s{fast_steps}", dict(alg=alg, steps=fast_steps), f"{alg}_s{n}", ())
    return out


def with_baselines(table: Dict[str, Strategy], names: List[str]) -> List[str]:
    """`names` plus every baseline they need (transitively), in the table's order."""
    need = set(names)
    for name in names:
        while table[name].baseline is not None:
            name = table[name].baseline
            need.add(name)
    return [name for name in table if name in need]


def worst_case_forwards(overrides: dict, n: int) -> int:
    return overrides.get("steps", n)  # dynamic algs commit >= 1 token per row per forward


# ---- models -------------------------------------------------------------------------------------
def load(args):
    from veomni.inference.loading import load_for_inference, model_source
    from veomni.models.hf_io import load_model, load_tokenizer

    if args.model_path:
        try:
            model, tok = load_for_inference(args.model_path, dtype=args.dtype, device=args.device)
            note = f"model: {args.model_path}"
        except ValueError as exc:
            if "has no mask token" not in str(exc):
                raise
            model, tok = load_for_inference(args.model_path, dtype=args.dtype, device=args.device,
                                            add_mask_token=True, log=lambda m: None)
            note = f"model: {args.model_path} (AR: mask token added in memory; mechanics only)"
        return model, tok, note
    from veomni.inference.loading import resolve_device
    from veomni.models.mask_token import ensure_mask_token
    from veomni.models.smollm2 import prepare_smollm2

    _, path = model_source(prepare_smollm2())
    dtype = None if args.dtype == "auto" else args.dtype
    model = load_model(path, dtype=dtype, device=resolve_device(args.device))
    tok = load_tokenizer(path)
    ensure_mask_token(model, tok)
    model.config.dllm_attn_mode = "bidirectional"
    note = ("model: SmolLM2-135M-Instruct, a raw AR model (mask token added in memory, bidirectional "
            "attention), not a trained dLLM: mechanics only. Pass --model_path of a trained model.")
    return model.eval(), tok, note


def load_scorer(path: Optional[str], model_tok, device):
    """The fixed causal LM that scores every strategy's output; it must share the model's tokens."""
    from veomni.inference.loading import model_source
    from veomni.models.hf_io import load_model, load_tokenizer
    from veomni.models.smollm2 import prepare_smollm2

    _, path = model_source(path or prepare_smollm2())
    scorer_tok = load_tokenizer(path)
    mine = model_tok.get_vocab()
    if any(mine.get(t) != i for t, i in scorer_tok.get_vocab().items()):
        raise SystemExit(f"--scorer_path {path}: its tokenizer differs from the model's; the scorer reads "
                         "the generated token ids directly, so it needs the same vocabulary.")
    scorer = load_model(path, dtype=torch.float32, device=device).eval()
    return scorer, f"scorer: {path} (causal, fp32)"


@torch.no_grad()
def score_rows(scorer, prompts: List[torch.Tensor], gens: torch.Tensor, eos: List[int]):
    """Per row: (mean log-prob per token of the generation up to its first EOS, distinct fraction)."""
    out = []
    for prompt, gen in zip(prompts, gens.tolist()):
        cut = next((i + 1 for i, t in enumerate(gen) if t in eos), len(gen))
        gen = gen[:cut]
        ids = torch.tensor([prompt.tolist() + gen], device=prompt.device)
        if int(ids.max()) >= scorer.config.vocab_size:
            raise SystemExit("a generated token is outside the scorer's vocabulary")
        logits = scorer(ids, attn_mode="causal").logits[0, len(prompt) - 1:-1].float()
        logp = torch.log_softmax(logits, -1).gather(-1, ids[0, len(prompt):, None])[:, 0]
        out.append((float(logp.mean()), len(set(gen)) / len(gen)))
    return out


def heldout_windows(tok, path: Path, count: int, n: int) -> List[tuple]:
    """`count` (prompt ids, true continuation ids) pairs: from each .py file under `path` (sorted)
    with enough tokens, the PROMPT_TOKENS tokens before the middle and the n tokens after it."""
    files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
    windows = []
    for f in files:
        ids = tok(f.read_text(encoding="utf-8", errors="replace"), add_special_tokens=False).input_ids
        mid = len(ids) // 2
        if mid >= PROMPT_TOKENS and len(ids) - mid >= n:
            windows.append((ids[mid - PROMPT_TOKENS:mid], ids[mid:mid + n]))
        if len(windows) == count:
            return windows
    raise SystemExit(f"--heldout_path {path}: only {len(windows)} .py file(s) hold {PROMPT_TOKENS} + {n} "
                     f"tokens; --num_prompts {count} needs {count}. Lower --num_prompts/--new_tokens or "
                     "point --heldout_path at a bigger directory.")


def batches_of(windows: List[tuple], batch: int, device):
    """(ids, attention mask, true continuation) batches; every prompt has PROMPT_TOKENS tokens, so no
    padding. batch > len(windows) repeats windows to fill one batch."""
    k = len(windows)
    if batch >= k:
        groups = [[windows[i % k] for i in range(batch)]]
    elif k % batch:
        raise SystemExit(f"--num_prompts {k} must be a multiple of batch size {batch}")
    else:
        groups = [windows[s:s + batch] for s in range(0, k, batch)]
    out = []
    for g in groups:
        ids = torch.tensor([w[0] for w in g], device=device)
        out.append((ids, torch.ones_like(ids), torch.tensor([w[1] for w in g], device=device)))
    return out


class LogitTap(torch.nn.Module):
    """The model, recording which row positions its last call predicted and their logits."""

    def __init__(self, model, shift: int):
        super().__init__()
        self.model, self.config, self.shift, self.last = model, model.config, shift, None

    def forward(self, input_ids, **kw):
        out = self.model(input_ids, **kw)
        keep = kw.get("logits_to_keep")
        if keep is None:
            raise RuntimeError("LogitTap expects the samplers' logits_to_keep calls")
        q0 = int(kw["cache_position"][0]) if kw.get("cache_position") is not None else 0
        first = q0 + int(keep[0]) + self.shift  # row position the first kept logit predicts
        if keep.numel() != int(keep[-1] - keep[0]) + 1:
            raise RuntimeError("LogitTap expects a contiguous logits_to_keep")
        self.last = (first, out.logits)
        return out


@torch.no_grad()
def heldout_logp(model, generate, ids, truth, overrides: dict) -> List[float]:
    """Per row: mean log p(true token) under the strategy's own schedule (teacher-forced decoding).

    The strategy runs as usual, choosing which positions to commit and when from the model's
    confidences, but every committed position receives the TRUE token, scored by the model's
    probability for it at that step (MASK excluded, as the samplers never propose it). A position
    re-masked and committed again (p2) keeps its last score. So parallel commits are scored without
    seeing each other, and an approximate cache with its approximate logits: the loss each
    strategy's shortcuts cost, on text the model was not trained on.
    """
    shift = 1 if getattr(model.config, "dllm_logit_shift", True) is not False else 0
    tap = LogitTap(model, shift)
    mask_id = model.config.mask_token_id
    p, n = ids.shape[1], truth.shape[1]
    committed = torch.zeros_like(truth, dtype=torch.bool)
    scores = torch.zeros(truth.shape, dtype=torch.float64, device=truth.device)

    def force(step, x):
        nonlocal committed
        now = x[:, p:p + n] != mask_id
        new = now & ~committed
        first, logits = tap.last
        rows, cols = new.nonzero(as_tuple=True)
        if rows.numel():
            z = logits[rows, cols + p - first].double()
            z[:, mask_id] = -math.inf
            scores[rows, cols] = torch.log_softmax(z, -1).gather(-1, truth[rows, cols, None])[:, 0]
            x[:, p:p + n] = torch.where(new, truth, x[:, p:p + n])  # the live row: teacher forcing
        committed = now
    generate(tap, ids, max_new_tokens=n, temperature=0.0, eos_token_id=[], step_callback=force, **overrides)
    if not bool(committed.all()):
        raise RuntimeError("internal: teacher-forced decoding left positions uncommitted")
    return scores.mean(1).tolist()


def time_full_forward(model, ids, mask, n: int) -> float:
    """Seconds of one full forward over prompt + n positions (after one warm-up call)."""
    x = torch.cat([ids, torch.full((ids.shape[0], n), model.config.mask_token_id, device=ids.device)], 1)
    m = torch.cat([mask, torch.ones_like(x[:, ids.shape[1]:])], 1)
    keep = torch.arange(ids.shape[1] - 1, x.shape[1] - 1, device=ids.device)
    with torch.no_grad():
        for i in range(2):
            if i == 1:
                if ids.is_cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
            model(x, attention_mask=m, attn_mode=getattr(model.config, "dllm_attn_mode", None) or "bidirectional",
                  block_size=getattr(model.config, "dllm_block_size", None), logits_to_keep=keep)
        if ids.is_cuda:
            torch.cuda.synchronize()
    return time.perf_counter() - t0


# ---- the run ------------------------------------------------------------------------------------
def run_bench(model, tok, scorer, n: int, batch_sizes: List[int], windows: List[tuple], block: int,
              fast_steps: int, names: Optional[List[str]], max_minutes: float, log,
              show_text: bool = False, repeats: int = 1, heldout: bool = True) -> List[dict]:
    from veomni.diffusion.sampling.config import eos_list
    from veomni.inference.generate import generate

    table = strategies(n, block, fast_steps)
    unknown = [s for s in names or () if s not in table]
    if unknown:
        raise SystemExit(f"unknown strategies {unknown}; choose from {list(table)}")
    chosen = with_baselines(table, names or list(table))
    batches = {b: batches_of(windows, b, model.device) for b in batch_sizes}
    estimate = 0.0
    for b, chunks in batches.items():
        t_full = time_full_forward(model, *chunks[0][:2], n)
        runs_each = repeats + (1 if heldout else 0)
        forwards = sum(worst_case_forwards(table[s].overrides, n) for s in chosen) * len(chunks) * runs_each
        estimate += t_full * forwards
        log(f"batch {b}: {len(chunks)} batch(es); one full forward {t_full * 1e3:.0f} ms; at most {forwards} forwards")
    log(f"estimated upper bound: {estimate / 60:.1f} min")
    if max_minutes > 0 and estimate / 60 > max_minutes:
        raise SystemExit(
            f"estimated up to {estimate / 60:.0f} min > --max_minutes {max_minutes:g} on {model.device}. Scale "
            "down: --quick, --new_tokens 32, --num_prompts 1, --batch_sizes 1, --strategies a,b, --no_heldout; "
            "or raise --max_minutes (0 = no limit).")
    eos = eos_list(getattr(model.config, "eos_token_id", None))
    rows = []
    for b, chunks in batches.items():
        warm_up(generate, model, *chunks[0][:2], [table[s].overrides for s in chosen])
        # Prompts outer, strategies inner, so a change in the machine's load during the run spreads
        # over every strategy instead of landing on a few (the CPU box is shared). Wall time per
        # (strategy, prompt batch) is the minimum over --repeats runs; greedy outputs do not change.
        wall = {name: [math.inf] * len(chunks) for name in chosen}
        runs: Dict[str, list] = {name: [None] * len(chunks) for name in chosen}
        for rep in range(repeats):
            for c, (ids, mask, truth) in enumerate(chunks):
                for name in chosen:
                    o = table[name].overrides
                    out = generate(model, ids, attention_mask=mask, max_new_tokens=n, temperature=0.0, seed=0,
                                   eos_token_id=[], **o)
                    wall[name][c] = min(wall[name][c], max(out.stats["wall_time_s"], 1e-9))
                    if rep == 0:
                        gen = out.sequences[:, ids.shape[1]:]
                        q = score_rows(scorer, list(ids), gen, eos) if scorer is not None else []
                        h = heldout_logp(model, generate, ids, truth, o) if heldout else []
                        runs[name][c] = (gen, out.stats, q, h)
                log(f"batch {b}: prompt batch {c + 1}/{len(chunks)} of pass {rep + 1}/{repeats} done")
        by_name: Dict[str, dict] = {}
        outputs: Dict[str, torch.Tensor] = {}
        for name in chosen:
            gens, stats, quality, held = zip(*runs[name])
            quality = [q for qs in quality for q in qs]
            held = [h for hs in held for h in hs]
            outputs[name] = torch.cat(gens)
            nfe, new = sum(st["nfe"] for st in stats), sum(st["new_tokens"] for st in stats)
            mean = lambda v: sum(v) / len(v) if v else None  # noqa: E731
            row = dict(batch=b, strategy=name, baseline=table[name].baseline, kind=table[name].kind,
                       settings=settings_text(table[name].overrides), nfe=nfe / len(chunks),
                       tpf=new / nfe / b, tok_s=new / sum(wall[name]), heldout=mean(held),
                       logp=mean([q[0] for q in quality]), distinct=mean([q[1] for q in quality]))
            base = by_name.get(row["baseline"])
            if base is not None:
                row["speedup"] = row["tok_s"] / base["tok_s"]
                row["same"] = float((outputs[name] == outputs[row["baseline"]]).float().mean())
                for key in ("heldout", "logp"):
                    if row[key] is not None:
                        row["d_" + key] = row[key] - base[key]
            by_name[name] = row
            rows.append(row)
            log(f"  batch {b} {name}: nfe={row['nfe']:.1f} wall={sum(wall[name]):.1f}s"
                + (f" held-out logp/tok={row['heldout']:.3f}" if row["heldout"] is not None else "")
                + (f" scorer logp/tok={row['logp']:.3f}" if row["logp"] is not None else ""))
            if show_text:
                log(f"    first row: {tok.decode(outputs[name][0].tolist())!r}")
    return rows


def warm_up(generate, model, ids, mask, overrides: List[dict]) -> None:
    """One 2-token generation per (alg, cache) pair, so no row pays for first-call costs (lazy
    allocations, kernel selection; measured: the first row of a tiny-model run took 10x per forward)."""
    seen = set()
    for o in overrides:
        key = (o["alg"], o.get("use_cache", "none"))
        if key in seen:
            continue
        seen.add(key)
        small = {k: v for k, v in o.items() if k not in ("steps", "block_length")}
        if "steps" in o:
            small["steps"] = 2
        if "block_length" in o:
            small["block_length"] = 2
        generate(model, ids, attention_mask=mask, max_new_tokens=2, eos_token_id=[], **small)


def settings_text(o: dict) -> str:
    parts = [o["alg"]]
    for key, fmt in (("threshold", "tau={}"), ("factor", "f={}"), ("block_length", "block {}"), ("steps", "{} steps")):
        if key in o:
            parts.append(fmt.format(o[key]))
    parts.append(f"cache {o.get('use_cache', 'none')}")
    return ", ".join(parts)


def markdown(rows: List[dict], header: List[str]) -> str:
    f = lambda v, spec: "–" if v is None else format(v, spec)  # noqa: E731
    lines = [f"> {h}" for h in header] + [
        "",
        "| batch | strategy | settings | baseline | NFE | tok/fwd | tok/s | x base | held-out logp/tok | d | "
        "scorer logp/tok | d | distinct | = base |",
        "|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['batch']} | {r['strategy']} | {r['settings']} | {r['baseline'] or '–'} | {r['nfe']:.1f} | "
            f"{r['tpf']:.2f} | {r['tok_s']:.2f} | {f(r.get('speedup'), '.2f')} | {f(r['heldout'], '.3f')} | "
            f"{f(r.get('d_heldout'), '+.3f')} | {f(r['logp'], '.3f')} | {f(r.get('d_logp'), '+.3f')} | "
            f"{f(r['distinct'], '.2f')} | {f(r.get('same'), '.3f')} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model_path", default=None, help="HF dir / checkpoint (default: SmolLM2-135M + mask)")
    ap.add_argument("--scorer_path", default=None,
                    help="causal LM scoring the outputs, same tokenizer (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--no_score", action="store_true", help="skip the scorer column")
    ap.add_argument("--heldout_path", default=None,
                    help="dir (or .py file) of held-out code for the prompts and the teacher-forced "
                         "likelihood (default: this Python's stdlib json package)")
    ap.add_argument("--no_heldout", action="store_true", help="skip the teacher-forced likelihood column")
    ap.add_argument("--new_tokens", type=int, default=None, help="tokens generated per row (default 64)")
    ap.add_argument("--num_prompts", type=int, default=None, help="prompts per strategy (default 4)")
    ap.add_argument("--batch_sizes", default=None, help="comma list (default 1)")
    ap.add_argument("--block_length", type=int, default=None, help="block of the semi-AR strategies (32)")
    ap.add_argument("--fast_steps", type=int, default=None, help="steps of the fewer-step rows (N/4)")
    ap.add_argument("--strategies", default=None, help="comma list of strategy names (their baselines are added)")
    ap.add_argument("--quick", action="store_true", help="smoke test: 32 new tokens, 1 prompt, block 16")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--max_minutes", type=float, default=30.0, help="refuse runs estimated longer (0 = no limit)")
    ap.add_argument("--out", default=None, help="also write the markdown table here")
    ap.add_argument("--repeats", type=int, default=1, help="time every run this often, keep the fastest")
    ap.add_argument("--show_text", action="store_true", help="log each strategy's first completion (stderr)")
    args = ap.parse_args(argv)
    if args.quick and (args.new_tokens or args.num_prompts or args.block_length):
        ap.error("--quick sets --new_tokens 32 --num_prompts 1 --block_length 16; drop one or the other")
    n = 32 if args.quick else (args.new_tokens or 64)
    num_prompts = 1 if args.quick else (args.num_prompts or 4)
    block = 16 if args.quick else (args.block_length or 32)
    batch_sizes = [int(b) for b in (args.batch_sizes or "1").split(",")]
    fast_steps = args.fast_steps or max(1, n // 4)
    if n < 1 or not 1 <= fast_steps <= n or min(batch_sizes) < 1 or block < 1 or num_prompts < 1 or args.repeats < 1:
        ap.error("need new_tokens >= 1, 1 <= fast_steps <= new_tokens, batch sizes, block_length, "
                 "num_prompts, repeats >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    model, tok, note = load(args)
    scorer, scorer_note = (None, "no scorer (--no_score)") if args.no_score else \
        load_scorer(args.scorer_path, tok, model.device)
    names = args.strategies.split(",") if args.strategies else None
    heldout = Path(args.heldout_path) if args.heldout_path else default_heldout()
    windows = heldout_windows(tok, heldout, num_prompts, n)
    load_avg = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    rows = run_bench(model, tok, scorer, n, batch_sizes, windows, block, fast_steps, names,
                     args.max_minutes, log, args.show_text, args.repeats, not args.no_heldout)
    dev = model.device
    hw = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    header = [note, scorer_note,
              f"prompts: {PROMPT_TOKENS} tokens before the middle of {num_prompts} .py file(s) of {heldout} "
              f"(Python {sys.version.split()[0]}); held-out logp/tok: the next {n} tokens, teacher-forced",
              f"{n} new tokens, {num_prompts} prompt(s), greedy, EOS off while generating, dtype {model.dtype}, "
              f"{hw}, wall time = fastest of {args.repeats}, load average {load_avg:.1f} at the start"]
    table = markdown(rows, header)
    print(table)
    if args.out:
        Path(args.out).write_text(table)
        log(f"wrote {args.out}")
    return table


if __name__ == "__main__":
    main()
