"""Head to head: the routes from an AR checkpoint to a diffusion LM, trained on the same data for the
same number of tokens, scored on the same held-out set.

    python scripts/bench_convergence.py                      # all recipes, CPU defaults (~30-40 min)
    python scripts/bench_convergence.py --recipes mdm,bd3lm --steps 10 --eval_examples 8   # quicker

Start: SmolLM2-135M-Instruct (the embedded model). Corpus: code-completion SFT pairs cut from the
Python standard library on this machine (prompt: 4 lines of a module; response: the next 3 lines),
training pairs from some packages and held-out pairs from others (json, csv, ...), written to
<out>/corpus/. Every recipe runs tasks/train_torch.py on the same rows in the same order (same seed,
micro-batch, steps), so they see the same training tokens; what differs is the recipe:

  mdm     masked diffusion, random masking, bidirectional (the quickstart's recipe)
  align   mdm + Repr-Align (weight 10, every hidden state, live frozen teacher)
  d3llm   mdm on d3LLM pseudo-trajectories: the mdm run decodes every training response with the
          lowest-entropy rule one token per step (scripts/precompute_trajectories.py) and training
          masks the responses in that order, with d3LLM's curricula and complementary loss
  bd3lm   block diffusion: [x_t ; x_0] rows, block_causal, blocks of --block_size
  lora    mdm with LoRA adapters (rank 16 on every projection, embeddings trained for the mask row)

Reported per recipe (one table, printed and written to <out>/results.{json,md}):
  * held-out ELBO: negative ELBO in nats per response token on --eval_examples held-out pairs, the
    MC estimate of veomni.eval.likelihood (mc_elbo for whole-sequence diffusion models, block_elbo for
    block diffusion, --mc copies each), at the end of training; the trainer's own fixed-noise eval loss
    at step 0 and at the end (same held-out file) shows where each recipe started;
  * greedy samples on 3 held-out prompts (32 new tokens, one token per step, the model's own
    attention mode), and their mean log-probability per token under the base AR model (teacher-forced,
    causal): how plausible the continuation is as text, a proxy for "recognisable code";
  * training wall time (the same machine, one after another).
A reference row scores the base AR model: its exact NLL per response token and its own greedy samples.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
TRAIN = REPO / "tasks" / "train_torch.py"
CONFIG = REPO / "configs" / "quickstart" / "smollm2_mdm.yaml"
TRAIN_PKGS = ("email", "http", "logging", "concurrent", "asyncio", "unittest", "xml", "importlib")
HELDOUT_PKGS = ("json", "csv.py", "textwrap.py", "shlex.py", "fractions.py")

RECIPES = {
    "mdm": ("MDM, random masking (bidirectional)", []),
    "align": ("+ Repr-Align (weight 10, all hidden states)", ["--train.repr_align_weight=10"]),
    "d3llm": ("+ d3LLM trajectories (teacher: the mdm run)",
              ["--train.objective=d3llm", "--data.trajectory_path={traj}", "--train.d3llm.block_sizes=[32]"]),
    "bd3lm": ("block diffusion (bd3lm, blocks of {block_size})",
              ["--train.objective=bd3lm", "--model.attn_mode=block_causal", "--model.block_size={block_size}"]),
    "lora": ("LoRA MDM (rank 16, lr 4e-4)", ["--model.lora_rank=16", "--model.lora_alpha=32", "--train.lr=4e-4"]),
}


# ---------------------------------------------------------------------------- corpus
def _chunks(path: Path, prompt_lines: int, response_lines: int):
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (UnicodeDecodeError, OSError):
        return
    i, n = 0, prompt_lines + response_lines
    while i + n <= len(lines):
        window = lines[i:i + n]
        code = [ln for ln in window if ln.strip() and not ln.strip().startswith("#")]
        if len(code) == n and all(len(ln) < 100 for ln in window):
            yield "\n".join(window[:prompt_lines]), "\n".join(window[prompt_lines:])
            i += n
        else:
            i += 1


def build_corpus(out: Path, n_train: int, n_heldout: int, seed: int) -> dict:
    stdlib = Path(sysconfig.get_paths()["stdlib"])

    def pairs(names):
        found = []
        for name in names:
            root = stdlib / name
            files = sorted(root.rglob("*.py")) if root.is_dir() else [root]
            for f in files:
                if "test" in f.parts or "__pycache__" in f.parts:
                    continue
                found += [{"prompt": "Continue this Python code:\n" + p, "response": r} for p, r in _chunks(f, 4, 3)]
        random.Random(seed).shuffle(found)
        return found

    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, names, n in (("train", TRAIN_PKGS, n_train), ("heldout", HELDOUT_PKGS, n_heldout)):
        rows = pairs(names)[:n]
        if len(rows) < n:
            raise SystemExit(f"only {len(rows)} {split} pairs found in {stdlib}; lower the counts")
        paths[split] = out / f"{split}.jsonl"
        paths[split].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


# ---------------------------------------------------------------------------- training
def _reused_seconds(marker: Path, what: str, log):
    """A finished step of an earlier run into the same --out (its time was written as `marker`):
    the bench resumes after an interruption instead of retraining every recipe."""
    if marker.exists():
        secs = json.loads(marker.read_text())["seconds"]
        log(f"  {what}: reused from {marker.parent} (took {secs:.0f} s)")
        return secs
    return None


def _timed_run(cmd, log_path: Path, marker: Path, what: str, done: str, log) -> float:
    """Run one step of the bench in a subprocess (output to log_path), record its wall time in
    `marker` so that a rerun into the same --out reuses it, and return the seconds."""
    t0 = time.perf_counter()
    with open(log_path, "w") as f:
        proc = subprocess.run(cmd, env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed, see {log_path}")
    secs = time.perf_counter() - t0
    log(f"  {done} {secs:.0f} s")
    marker.write_text(json.dumps({"seconds": secs}))
    return secs


def train(name, overrides, corpus, out_dir, args, log):
    marker = out_dir / "train_seconds.json"
    if (out_dir / "hf").is_dir() and (secs := _reused_seconds(marker, name, log)) is not None:
        return secs
    cmd = [sys.executable, str(TRAIN), str(CONFIG), f"--model.model_path={args.model_path}",
           f"--data.train_path={corpus['train']}", f"--data.eval_path={corpus['heldout']}", "--data.eval_split_ratio=0",
           "--data.data_type=sft", f"--data.max_seq_len={args.max_seq_len}", "--data.packing=true",
           f"--data.cache_dir={out_dir.parent / 'data_cache'}", f"--train.output_dir={out_dir}",
           f"--train.max_steps={args.steps}", f"--train.eval_steps={args.steps}", "--train.eval_max_batches=8",
           "--train.save_steps=0", "--train.export_hf=true", "--train.progress_bar=false",
           f"--train.micro_batch_size={args.micro_batch}", f"--train.global_batch_size={args.micro_batch}",
           f"--train.seed={args.seed}", f"--train.warmup_steps={min(3, args.steps // 4)}", *overrides]
    return _timed_run(cmd, out_dir.parent / f"{name}.log", marker, f"{name}: training", f"{name}: trained in", log)


def precompute_trajectories(teacher: Path, corpus, out: Path, args, log) -> float:
    marker = out.parent / "trajectories_seconds.json"
    if (secs := _reused_seconds(marker, "trajectories", log)) is not None:
        return secs
    cmd = [sys.executable, str(REPO / "scripts" / "precompute_trajectories.py"), "--model", str(teacher),
           "--data", str(corpus["train"]), str(corpus["heldout"]), "--out", str(out),
           "--tokenizer", str(args.model_path), f"--max_seq_len={args.max_seq_len}", "--block_length=32",
           "--batch_size=16"]
    return _timed_run(cmd, out.parent / "trajectories.log", marker, "precompute_trajectories", "trajectories:", log)


# ---------------------------------------------------------------------------- evaluation
def heldout_examples(corpus, tokenizer, args):
    """(prompt ids, response ids) of the held-out pairs, tokenized exactly as training tokenizes them."""
    from veomni.data.loader import build_dataset

    ds = build_dataset(str(corpus["heldout"]), tokenizer, data_type="sft", max_seq_len=args.max_seq_len,
                       packing=False)
    out = []
    for i in range(min(len(ds), args.eval_examples)):
        row = ds[i]
        ids, seg, maskable = row["input_ids"], row["segment_ids"], row["maskable"]
        n = int((seg > 0).sum())
        start = int(maskable.nonzero()[0, 0])
        out.append((ids[:start], ids[start:n]))
    return out


def evaluate(model_dir, examples, scorer, tokenizer, args, block: bool):
    import torch

    from veomni.diffusion.sampling.api import diffusion_generate
    from veomni.eval.likelihood import block_elbo, mc_elbo
    from veomni.models.hf_io import load_model

    torch.manual_seed(0)
    model = load_model(model_dir).eval()
    g = torch.Generator().manual_seed(args.seed)
    nll, tokens = 0.0, 0
    for prompt, target in examples:
        fn = block_elbo if block else mc_elbo
        r = fn(model, prompt, target, mc_num=args.mc, batch_size=args.mc, generator=g)
        nll += r["nll"]
        tokens += r["n_tokens"]
    samples = []
    for prompt, _ in examples[:3]:
        out = diffusion_generate(model, prompt[None], max_new_tokens=32, steps=32, alg="low_confidence",
                                 block_length=model.config.dllm_block_size or 8, temperature=0.0)
        samples.append(out.sequences[0, prompt.numel():])
    return nll / tokens, samples


def score_samples(scorer, examples, samples, tokenizer):
    """Mean log p / token of each greedy continuation under the base AR model (EOS and after cut)."""
    from veomni.eval.likelihood import ar_loglik

    import torch

    lps, texts = [], []
    for (prompt, _), s in zip(examples, samples):
        eos = (s == tokenizer.eos_token_id).nonzero()
        s = s[: int(eos[0, 0])] if eos.numel() else s
        texts.append(tokenizer.decode(s, skip_special_tokens=True))
        if s.numel():
            lps.append(ar_loglik(scorer, torch.cat([prompt, s]), prompt.numel())["loglik"] / s.numel())
    return (sum(lps) / len(lps) if lps else float("nan")), texts


def ar_reference(scorer, examples, tokenizer):
    import torch

    from veomni.eval.likelihood import ar_loglik

    ll = sum(ar_loglik(scorer, torch.cat([p, t]), p.numel())["loglik"] for p, t in examples)
    n = sum(t.numel() for _, t in examples)
    samples = []
    for prompt, _ in examples[:3]:  # greedy AR decoding, causal
        ids = prompt.clone()
        with torch.no_grad():
            for _ in range(32):
                nxt = scorer(ids[None], attn_mode="causal").logits[0, -1].argmax()
                ids = torch.cat([ids, nxt[None]])
                if int(nxt) == tokenizer.eos_token_id:
                    break
        samples.append(ids[prompt.numel():])
    return -ll / n, samples


def _eval_loss(out_dir):
    rows = [json.loads(x) for x in (out_dir / "eval_metrics.jsonl").read_text().splitlines()]
    return rows[0]["eval_loss"], rows[-1]["eval_loss"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", default="mdm,align,d3llm,bd3lm,lora")
    p.add_argument("--out", default="outputs/bench_convergence")
    p.add_argument("--model_path", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--steps", type=int, default=40, help="optimizer steps per recipe (same rows for all)")
    p.add_argument("--micro_batch", type=int, default=4)
    p.add_argument("--max_seq_len", type=int, default=128)
    p.add_argument("--block_size", type=int, default=8, help="bd3lm block size")
    p.add_argument("--train_pairs", type=int, default=200)
    p.add_argument("--eval_examples", type=int, default=16)
    p.add_argument("--mc", type=int, default=16, help="MC copies per held-out example")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads here and in the training runs (default: all cores); 1 on a shared machine")
    args = p.parse_args(argv)
    recipes = [r for r in args.recipes.split(",") if r]
    unknown = sorted(set(recipes) - set(RECIPES))
    if unknown:
        raise SystemExit(f"unknown recipes {unknown}; known: {sorted(RECIPES)}")
    if "d3llm" in recipes and "mdm" not in recipes:
        raise SystemExit("the d3llm recipe's teacher is the mdm run: include mdm")
    import torch

    from veomni.models.hf_io import load_model, load_tokenizer
    from veomni.models.smollm2 import prepare_smollm2

    threads = args.threads or max(1, os.cpu_count() or 1)
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)  # the training / trajectory subprocesses inherit it
    args.model_path = args.model_path or str(prepare_smollm2())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log_lines = []

    def log(msg):
        print(msg, flush=True)
        log_lines.append(msg)

    corpus = build_corpus(out / "corpus", args.train_pairs, args.eval_examples, args.seed)
    tokenizer = load_tokenizer(args.model_path)
    if tokenizer.mask_token is None:
        tokenizer.add_special_tokens({"mask_token": "<|mask|>"})
    examples = heldout_examples(corpus, tokenizer, args)
    scorer = load_model(args.model_path).eval()
    t0 = time.perf_counter()
    log(f"corpus: {args.train_pairs} training pairs, {len(examples)} held-out pairs scored; "
        f"{args.steps} steps x {args.micro_batch} rows x {args.max_seq_len} tokens per recipe")
    results = []
    ar_nll, ar_samples = ar_reference(scorer, examples, tokenizer)
    ar_lp, ar_texts = score_samples(scorer, examples, ar_samples, tokenizer)
    results.append(dict(recipe="AR base (reference)", elbo=ar_nll, start=None, end=None, train_s=0.0,
                        sample_logp=ar_lp, samples=ar_texts))
    log(f"  AR reference: NLL {ar_nll:.3f} nats/token ({time.perf_counter() - t0:.0f} s)")
    for name in recipes:
        label, overrides = RECIPES[name]
        extra_s = 0.0
        if name == "d3llm":
            traj = out / "trajectories"
            extra_s = precompute_trajectories(out / "mdm" / "hf", corpus, traj, args, log)
            overrides = [o.format(traj=traj) for o in overrides]
        overrides = [o.format(block_size=args.block_size) for o in overrides]
        run_dir = out / name
        secs = train(name, overrides, corpus, run_dir, args, log) + extra_s
        elbo, samples = evaluate(run_dir / "hf", examples, scorer, tokenizer, args, block=name == "bd3lm")
        lp, texts = score_samples(scorer, examples, samples, tokenizer)
        start, end = _eval_loss(run_dir)
        results.append(dict(recipe=label.format(block_size=args.block_size), elbo=elbo, start=start, end=end,
                            train_s=secs, sample_logp=lp, samples=texts))
        log(f"  {name}: held-out -ELBO {elbo:.3f} nats/token, sample logp/tok {lp:.3f}")
    table = ["| recipe | held-out -ELBO (nats/tok) | eval loss step 0 -> end | train time (s) | samples: AR logp/tok |",
             "|---|---:|---:|---:|---:|"]
    for r in results:
        se = "–" if r["start"] is None else f"{r['start']:.3f} -> {r['end']:.3f}"
        table.append(f"| {r['recipe']} | {r['elbo']:.3f} | {se} | {r['train_s']:.0f} | {r['sample_logp']:.3f} |")
    print("\n".join(table))
    md = ["\n".join(table), "", "Greedy samples (first 3 held-out prompts, 32 new tokens):", ""]
    for r in results:
        md.append(f"**{r['recipe']}**")
        md += ["```", *[f"[{i}] {t!r}" for i, t in enumerate(r["samples"])], "```", ""]
    (out / "results.md").write_text("\n".join(md))
    (out / "results.json").write_text(json.dumps(dict(args=vars(args), results=results, log=log_lines), indent=1))
    print("\n".join(md[2:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
