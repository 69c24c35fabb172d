"""`tasks/infer.py`: sample from a masked-diffusion LM on the command line.

    python tasks/infer.py --model_path outputs/quickstart/hf --prompt "def f(x):" --infer.max_new_tokens=64
    python tasks/infer.py my_infer.yaml --prompt_file prompts.jsonl --infer.alg=threshold --infer.threshold=0.9
    python tasks/infer.py --model_path DIR --chat                 # interactive, /reset, /exit

Parsing is the project's strict config machinery (veomni/config/parser.py) on the root
`InferCLIArgs`: top-level options plus the `infer` sampler group; an optional YAML file first.
`--prompt` may be repeated (a batch, left-padded): its values are taken out of argv before
parsing, because the parser keeps only the last of a repeated flag and splits list values at
commas. In plain mode the last line printed is the completion (of the last prompt).
"""
from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Literal, Optional

from veomni.config.parser import ConfigError, cfg_field, parse_args
from veomni.config.schema import AttnImpl, InferArgs


@dataclass
class InferCLIArgs:
    model_path: Optional[str] = cfg_field(
        None, help="Model to sample from: an HF dir (<run>/hf), a training checkpoint "
                   "(<run>/checkpoints/global_step_N), a run dir holding hf/, or a .gguf file. Required.")
    tokenizer_path: Optional[str] = cfg_field(None, help="Tokenizer dir; none = the model's (or the run's).")
    prompt: list[str] = cfg_field([], help="Prompt text; repeat --prompt for a batch (left-padded).")
    prompt_file: Optional[str] = cfg_field(
        None, help="File of prompts: one per line (blank lines skipped), or .jsonl records with a "
                   "'prompt' key. Exclusive with --prompt.")
    chat: bool = cfg_field(False, help="Wrap prompts in the tokenizer's chat template; with no --prompt/"
                                       "--prompt_file, an interactive multi-turn chat on stdin.")
    system_prompt: Optional[str] = cfg_field(None, help="System message for --chat.")
    live: bool = cfg_field(False, help="Show the masks filling in, step by step (plain lines when stdout "
                                       "is not a terminal).")
    save_history: Optional[str] = cfg_field(
        None, help="Write an .html page replaying the unmasking order (tokens coloured by step).")
    stats: bool = cfg_field(False, help="Print NFE, tokens per forward and tok/s before the completions.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = cfg_field(
        "auto", help="Weights dtype; auto = as recorded in config.json (float32 if none).")
    device: str = cfg_field("auto", help="auto (cuda if available, else cpu), cpu, cuda or cuda:N.")
    attn_impl: AttnImpl = cfg_field("sdpa", help="Attention kernel.")
    seed: Optional[int] = cfg_field(None, help="Same as --infer.seed (also seeds torch).")
    add_mask_token: bool = cfg_field(
        False, help="Add an untrained mask token in memory to a model that has none (an AR model): for "
                    "trying the mechanics only.")
    infer: InferArgs = cfg_field(default_factory=InferArgs, help="Sampling.")

    def __post_init__(self) -> None:
        if self.prompt and self.prompt_file:
            raise ConfigError("give --prompt or --prompt_file, not both")
        if self.system_prompt is not None and not self.chat:
            raise ConfigError("--system_prompt needs --chat")
        if self.save_history is not None and Path(self.save_history).suffix.lower() not in (".html", ".htm"):
            raise ConfigError(f"--save_history={self.save_history!r} must name an .html file")
        if self.seed is not None:
            if self.infer.seed not in (0, self.seed):  # 0 is infer.seed's default
                raise ConfigError(f"--seed={self.seed} conflicts with --infer.seed={self.infer.seed}; give one")
            self.infer.seed = self.seed


def split_prompts(argv: List[str]):
    """(argv without --prompt flags, the prompt values in order)."""
    rest, prompts, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--prompt":
            if i + 1 >= len(argv):
                raise ConfigError("--prompt needs a value: --prompt 'text'")
            prompts.append(argv[i + 1])
            i += 2
            continue
        if arg.startswith("--prompt="):
            prompts.append(arg[len("--prompt="):])
        else:
            rest.append(arg)
        i += 1
    return rest, prompts


def parse_cli(argv: Optional[List[str]] = None) -> InferCLIArgs:
    argv = list(sys.argv[1:] if argv is None else argv)
    rest, prompts = split_prompts(argv)
    args = parse_args(InferCLIArgs, rest)
    if prompts:  # command-line prompts replace a YAML `prompt:` list (replace() re-runs the checks)
        args = dataclasses.replace(args, prompt=prompts)
    return args


def read_prompt_file(path: str) -> List[str]:
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--prompt_file {path} does not exist")
    lines = file.read_text(encoding="utf-8").splitlines()
    if file.suffix.lower() != ".jsonl":
        prompts = [line for line in lines if line.strip()]
    else:
        prompts = []
        for n, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{path}:{n} is not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise ConfigError(f"{path}:{n} needs a string field 'prompt' (got {str(record)[:80]})")
            prompts.append(record["prompt"])
    if not prompts:
        raise ConfigError(f"--prompt_file {path} holds no prompts")
    return prompts


def format_stats(stats: dict, batch: int) -> str:
    wall = max(stats["wall_time_s"], 1e-9)
    return (f"stats: nfe={stats['nfe']} steps={stats['steps']} new_tokens={stats['new_tokens']} "
            f"tokens/forward={stats['tokens_per_forward']:.2f} (batch {batch}) "
            f"tok/s={stats['new_tokens'] / wall:.1f} wall={wall:.2f}s")


def main(argv: Optional[List[str]] = None, stdin=None, stdout=None) -> int:
    args = parse_cli(argv)
    out = stdout if stdout is not None else sys.stdout
    if not args.model_path:
        raise ConfigError("--model_path is required (an HF dir, a training checkpoint or a .gguf file)")
    prompts = read_prompt_file(args.prompt_file) if args.prompt_file else list(args.prompt)
    if not prompts and not args.chat:
        raise ConfigError("nothing to do: give --prompt TEXT, --prompt_file FILE, or --chat for a conversation")

    import torch

    from veomni.diffusion.sampling import decode_trimmed
    from veomni.inference.chat import ChatSession, interactive_loop
    from veomni.inference.generate import encode_prompts, generate, generation_config_from_infer
    from veomni.inference.history_html import write_history_html
    from veomni.inference.live import LiveView
    from veomni.inference.loading import load_for_inference

    torch.manual_seed(args.infer.seed)
    model, tokenizer = load_for_inference(args.model_path, args.tokenizer_path, dtype=args.dtype,
                                          device=args.device, attn_impl=args.attn_impl,
                                          add_mask_token=args.add_mask_token)
    if args.infer.alg == "editflow":  # edits, not masks: its own sampler and live view
        if args.infer.compile:
            raise SystemExit("--infer.compile compiles the masked-diffusion samplers' fixed-shape forwards; the "
                             "editflow sampler's canvas changes length every step, so it runs eager: drop "
                             "--infer.compile")
        from veomni.inference.editflow import run_editflow

        return run_editflow(args, model, tokenizer, prompts, out)
    if args.infer.compile:
        from veomni.inference.compiled import compile_for_decoding

        compile_for_decoding(model)
    gen_cfg = generation_config_from_infer(args.infer)
    gen_cfg.output_history = bool(args.save_history)
    eos = model.config.eos_token_id
    eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))

    def live_factory(prompt_len):
        if not args.live:
            return None
        return LiveView(tokenizer, prompt_len, model.config.mask_token_id, eos_ids,
                        n_new=args.infer.max_new_tokens, stream=out)

    def save(output, shown_prompts):
        if args.save_history:
            path = write_history_html(args.save_history, tokenizer, output, shown_prompts)
            print(f"wrote {path}", file=sys.stderr)

    if args.chat and not prompts:
        session = ChatSession(model, tokenizer, gen_cfg, args.system_prompt, live_factory)

        def after_reply(s):
            if args.stats:
                out.write(format_stats(s.last_output.stats, 1) + "\n")
            save(s.last_output, [s.messages[-2]["content"]])

        interactive_loop(session, stdin=stdin, stdout=out, on_reply=after_reply)
        return 0

    ids, mask = encode_prompts(tokenizer, prompts, device=model.device, chat=args.chat,
                               system_prompt=args.system_prompt)
    view = live_factory(ids.shape[1])
    try:
        output = generate(model, ids, gen_cfg, attention_mask=mask, step_callback=view)
    finally:
        if view is not None:
            view.close()
    completions = decode_trimmed(tokenizer, output)
    save(output, prompts)
    if args.stats:
        out.write(format_stats(output.stats, len(prompts)) + "\n")
    for i, (prompt, text) in enumerate(zip(prompts, completions)):
        if len(prompts) > 1:
            short = prompt.replace("\n", " ")
            out.write(f"=== [{i}] {short[:60] + ('...' if len(short) > 60 else '')}\n")
        out.write(text + "\n")
    out.flush()
    return 0


def run(argv: Optional[List[str]] = None) -> None:
    """Entry point: bad input exits with status 2 and the message on stderr, not a traceback."""
    try:
        code = main(argv)
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:  # Ctrl-C in a chat or a long generation: no traceback
        print("", file=sys.stderr)
        raise SystemExit(130) from None
    raise SystemExit(code)
