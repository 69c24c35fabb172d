#!/usr/bin/env python
"""Generate samples for a code benchmark (score them with eval/score.py).

    python eval/generate.py --task humaneval --model_path outputs/run/hf --out samples.jsonl \
        --infer.alg=p2 --infer.max_new_tokens=128 --infer.steps=128 --infer.temperature=0.8
    python eval/generate.py --task humaneval_infill_single --model_path DIR --out s.jsonl   # Open-dLLM protocol
    python eval/generate.py --task mbpp_plus --model_path smollm2_dir --out s.jsonl --mode ar   # AR baseline

Every sampler option is an --infer.<field> flag (InferArgs, see `--help`). Infilling follows
Open-dLLM's protocol unless told otherwise: oracle middle length, 64 steps for every middle
(--infill_steps), SantaCoder-FIM conditioned on prompt + newline. With `--infill_length avg` one file
per length is written: <out stem>.len<N>.jsonl (N in 4..64).
The last stdout line is a JSON object naming the files written.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

# Run from a checkout without `pip install -e .`: make the repo's `veomni` importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from veomni.config.parser import ConfigError, cfg_field, parse_args, to_dict  # noqa: E402
from veomni.config.schema import InferArgs  # noqa: E402


@dataclass
class GenerateArgs:
    task: Optional[str] = cfg_field(None, help="Benchmark (veomni.eval.tasks.TASK_NAMES). Required.")
    model_path: Optional[str] = cfg_field(None, help="HF dir / checkpoint / run dir / .gguf. Required.")
    out: Optional[str] = cfg_field(None, help="Samples JSONL to write. Required.")
    data_dir: Optional[str] = cfg_field(None, help="Eval data dir (default $VEOMNI_EVAL_DATA, then "
                                                   "~/.cache/veomni/eval).")
    tokenizer_path: Optional[str] = cfg_field(None, help="Tokenizer dir; none = the model's.")
    mode: Literal["diffusion", "ar"] = cfg_field(
        "diffusion", help="diffusion: the --infer sampler; ar: KV-cached causal decoding (baseline, "
                          "completion tasks only; uses max_new_tokens/temperature/top_p/top_k/seed).")
    n_samples: int = cfg_field(1, help="Samples per problem (pass@k needs n >= k).")
    limit: Optional[int] = cfg_field(None, help="Only the first K problems.")
    batch_size: int = cfg_field(1, help="Rows per model call (left-padded prompts).")
    infill_length: str = cfg_field("oracle", help="Infilling tasks: oracle (tokens of the reference "
                                                  "middle, Open-dLLM's default), fixed:N or avg (one "
                                                  "file per length in 4,8,16,32,64).")
    infill_steps: str = cfg_field("64", help="Infilling tasks, step-based algs: N = the same N steps for "
                                             "every middle (Open-dLLM: 64); ratio = ceil(middle length "
                                             "* infer.steps / infer.max_new_tokens).")
    santacoder_prompt_newline: bool = cfg_field(
        True, help="santacoder_fim: condition on prompt + newline (Open-dLLM); false = the raw prompt.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = cfg_field("auto", help="Weights dtype.")
    device: str = cfg_field("auto", help="auto, cpu, cuda or cuda:N.")
    seed: int = cfg_field(0, help="Base seed: sample s of problem i uses seed + 100003*s + i.")
    threads: Optional[int] = cfg_field(None, help="torch CPU threads (none = torch's default).")
    infer: InferArgs = cfg_field(default_factory=InferArgs, help="Sampling.")

    def __post_init__(self) -> None:
        from veomni.eval.tasks import TASK_NAMES

        for name in ("task", "model_path", "out"):
            if getattr(self, name) is None:
                raise ConfigError(f"--{name} is required")
        if self.task not in TASK_NAMES:
            raise ConfigError(f"--task={self.task!r} is not one of {', '.join(TASK_NAMES)}")
        if self.n_samples < 1 or self.batch_size < 1 or (self.limit is not None and self.limit < 1):
            raise ConfigError("--n_samples, --batch_size and --limit must be >= 1")
        if self.infill_steps != "ratio" and not (self.infill_steps.isdigit() and int(self.infill_steps) >= 1):
            raise ConfigError(f"--infill_steps={self.infill_steps!r}: use a number of steps (>= 1) or ratio")


def load(args: GenerateArgs):
    """(model, tokenizer). AR mode loads any causal LM; diffusion mode needs a mask token."""
    if args.mode == "diffusion":
        from veomni.inference.loading import load_for_inference

        return load_for_inference(args.model_path, args.tokenizer_path, dtype=args.dtype, device=args.device)
    from veomni.inference.loading import model_source, resolve_device
    from veomni.models.hf_io import load_model, load_tokenizer, resolve_dtype

    kind, path = model_source(args.model_path)
    if kind == "dcp":
        raise ValueError(f"--mode ar reads HF dirs and .gguf files; export {path} first "
                         "(scripts/export_hf.py) or use its run's hf/ dir")
    model = load_model(path, dtype=None if args.dtype == "auto" else resolve_dtype(args.dtype),
                       device=resolve_device(args.device))
    gguf = {"gguf_file": path.name} if kind == "gguf" and args.tokenizer_path is None else {}
    tok = load_tokenizer(args.tokenizer_path or (path.parent if kind == "gguf" else path), **gguf)
    return model.eval(), tok


def main(argv=None) -> int:
    try:
        args = parse_args(GenerateArgs, argv)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    import torch

    from veomni.eval import generation as G
    from veomni.eval.tasks import get_task
    from veomni.inference.generate import generation_config_from_infer

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        is_infill = args.task in G.INFILL_TASKS
        if is_infill and args.mode == "ar":
            raise ValueError(f"--mode ar cannot infill ({args.task}): a causal model never sees the "
                             "suffix. Use --mode diffusion.")
        lengths = G.parse_infill_length(args.infill_length) if is_infill else [None]
        if is_infill and args.infill_steps != "ratio" and any(
                a == "--infer.steps" or a.startswith("--infer.steps=") for a in (argv or sys.argv[1:])):
            raise ValueError(f"--infer.steps does not apply to {args.task}: every middle gets --infill_steps "
                             f"steps (now {args.infill_steps}); pass --infill_steps N, or --infill_steps ratio "
                             "to scale --infer.steps by the middle length")
        options = {"prompt_newline": args.santacoder_prompt_newline} if args.task == "santacoder_fim" else {}
        task = get_task(args.task, args.data_dir, **options)
        problems = task.problems[: args.limit] if args.limit else task.problems
        model, tok = load(args)
        gen_cfg = generation_config_from_infer(args.infer)
    except (ValueError, FileNotFoundError, ImportError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    written = []
    t0 = time.time()
    for length in lengths:
        path = out if len(lengths) == 1 else out.with_name(f"{out.stem}.len{length}{out.suffix}")
        progress = G.Progress(len(problems) * args.n_samples, f"{args.task}" + (f" len={length}" if is_infill else ""))
        if is_infill:
            from veomni.diffusion.sampling.config import STEP_ALGS

            step_based, by_ratio = args.infer.alg in STEP_ALGS, args.infill_steps == "ratio"
            ratio = args.infer.steps / args.infer.max_new_tokens if step_based and by_ratio else None
            steps = int(args.infill_steps) if step_based and not by_ratio else None
            samples = G.infill_samples(problems, model, tok, gen_cfg, length=length, n_samples=args.n_samples,
                                       batch_size=args.batch_size, seed=args.seed, steps=steps,
                                       steps_per_token=ratio, prefix_of=task.generation_prefix,
                                       progress=progress)
        else:
            stops = G.STOP_STRINGS.get(args.task, G.HUMANEVAL_STOP) + list(args.infer.stop_strings)
            samples = G.completion_samples(problems, model, tok, gen_cfg, mode=args.mode, stop_strings=stops,
                                           n_samples=args.n_samples, batch_size=args.batch_size,
                                           seed=args.seed, progress=progress)
        with open(path, "w") as f:
            for s in samples:
                f.write(json.dumps(s) + "\n")
        written.append({"length": length, "samples": str(path), "n": len(samples)})
        print(f"[generate] wrote {len(samples)} samples to {path}", file=sys.stderr, flush=True)
    summary = dict(task=args.task, model_path=args.model_path, mode=args.mode, n_samples=args.n_samples,
                   n_problems=len(problems), infill_length=args.infill_length if is_infill else None,
                   infill_steps=args.infill_steps if is_infill else None,
                   files=written, wall_time_s=round(time.time() - t0, 1), infer=to_dict(args.infer))
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
