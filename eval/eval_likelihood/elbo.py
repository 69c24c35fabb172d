#!/usr/bin/env python
"""Likelihood of a text: Monte-Carlo ELBO under a masked-diffusion model, or exact AR log-likelihood.

    python eval/eval_likelihood/elbo.py --model_path outputs/run/hf --text_file doc.txt [--prompt_file p.txt]
    python eval/eval_likelihood/elbo.py --model_path ~/.cache/veomni/smollm2-135m-instruct --text_file doc.txt --mode ar

diffusion (default): LLaDA's stratified estimator (veomni/eval/likelihood.py); nll is an estimate of
an UPPER bound on -log p(text | prompt), so ppl_bound is an upper bound on perplexity. ar: exact
log-likelihood with causal attention (comparable only between AR models, or as the AR-order
reference for the same weights). Prints one JSON object (the last stdout line).
"""
import argparse
import json
import sys
import time
from pathlib import Path

# Run from a checkout without `pip install -e .`: make the repo's `veomni` importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--model_path", required=True)
    p.add_argument("--text_file", required=True, help="the text whose likelihood is measured")
    p.add_argument("--prompt_file", help="conditioning text (never masked, not scored)")
    p.add_argument("--mode", choices=("diffusion", "ar"), default="diffusion")
    p.add_argument("--mc_num", type=int, default=128, help="Monte-Carlo copies (diffusion)")
    p.add_argument("--batch_size", type=int, default=32, help="copies per forward; mc_num must be a multiple")
    p.add_argument("--max_len", type=int, default=None, help="keep only the first N text tokens")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=("auto", "float32", "bfloat16", "float16"))
    p.add_argument("--device", default="auto")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from veomni.eval.likelihood import ar_loglik, mc_elbo
    from veomni.inference.loading import model_source, resolve_device
    from veomni.models.hf_io import load_model, load_tokenizer, resolve_dtype

    try:
        kind, path = model_source(args.model_path)
        if kind == "dcp":
            raise ValueError(f"{path} is a training checkpoint: pass its run's hf/ dir (scripts/export_hf.py)")
        model = load_model(path, dtype=None if args.dtype == "auto" else resolve_dtype(args.dtype),
                           device=resolve_device(args.device)).eval()
        gguf = {"gguf_file": path.name} if kind == "gguf" else {}
        tok = load_tokenizer(path.parent if kind == "gguf" else path, **gguf)
        text = Path(args.text_file).read_text()
        prompt = Path(args.prompt_file).read_text() if args.prompt_file else ""
        target = tok(text, add_special_tokens=False).input_ids[: args.max_len]
        prompt_ids = tok(prompt, add_special_tokens=False).input_ids if prompt else []
        note = None
        shift = bool(getattr(model.config, "dllm_logit_shift", True))
        if not prompt_ids and (args.mode == "ar" or shift):
            # Both readers predict token i from position i-1: the first text token needs a token before it.
            start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
            if start is None:
                raise ValueError("no prompt and the tokenizer has neither BOS nor EOS: give --prompt_file")
            prompt_ids, note = [start], f"prepended start token id {start} (not scored)"
        if not target:
            raise ValueError(f"{args.text_file} encodes to zero tokens")
        t0 = time.time()
        if args.mode == "ar":
            r = ar_loglik(model, prompt_ids + target, len(prompt_ids))
            r["nll"] = -r["loglik"]
        else:
            gen = torch.Generator().manual_seed(args.seed)
            r = mc_elbo(model, prompt_ids, target, mc_num=args.mc_num, batch_size=args.batch_size,
                        generator=gen, logit_shift=shift)
    except (ValueError, FileNotFoundError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    r.update(mode=args.mode, model_path=args.model_path, prompt_tokens=len(prompt_ids),
             wall_time_s=round(time.time() - t0, 2))
    if note:
        r["note"] = note
    print(json.dumps(r), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
