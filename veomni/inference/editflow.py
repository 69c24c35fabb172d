"""`tasks/infer.py --infer.alg=editflow`: sample an EditFlow model and show its edits live.

The live view (`--live`) shows the generated part of each row after every step that changed it, with the
step's edits marked: on a terminal insertions green, deletions red and struck through, substitutions
yellow (the new token); in plain output (a pipe, a log) as `[+new]`, `[-old]` and `[old->new]`. Masks
still waiting to be edited are `░`.
"""
from __future__ import annotations

from typing import List, Sequence

from veomni.inference.live import MASK_GLYPH, LiveView, _printable

_GREEN, _RED, _YELLOW, _STRIKE, _RESET = "\x1b[32m", "\x1b[31m", "\x1b[33m", "\x1b[9m", "\x1b[0m"


def render_events(tokenizer, events: Sequence[tuple], mask_id: int, tty: bool) -> str:
    """Text of one row's step: runs of the same kind decoded together (byte-level BPE splits characters)."""
    def text(ids: List[int]) -> str:
        parts, run = [], []
        for t in ids:
            if t == mask_id:
                if run:
                    parts.append(tokenizer.decode(run, skip_special_tokens=True))
                    run = []
                parts.append(MASK_GLYPH)
            else:
                run.append(t)
        if run:
            parts.append(tokenizer.decode(run, skip_special_tokens=True))
        return _printable("".join(parts))

    out, i = [], 0
    while i < len(events):
        kind = events[i][0]
        j = i
        while j < len(events) and events[j][0] == kind:
            j += 1
        group = events[i:j]
        if kind == "keep":
            out.append(text([e[1] for e in group]))
        elif kind == "ins":
            s = text([e[1] for e in group])
            out.append(f"{_GREEN}{s}{_RESET}" if tty else f"[+{s}]")
        elif kind == "del":
            s = text([e[1] for e in group])
            out.append(f"{_RED}{_STRIKE}{s}{_RESET}" if tty else f"[-{s}]")
        else:  # sub
            old, new = text([e[1] for e in group]), text([e[2] for e in group])
            out.append(f"{_YELLOW}{new}{_RESET}" if tty else f"[{old}->{new}]")
        i = j
    return "".join(out)


class EditLiveView(LiveView):
    """step_callback(step, rows, events) of the EditFlow sampler; redraws on a TTY like LiveView."""

    def __init__(self, tokenizer, prompt_lens: Sequence[int], mask_id: int, stream=None, tty=None,
                 total_steps=None):
        super().__init__(tokenizer, 0, mask_id, stream=stream, tty=tty, total_steps=total_steps)
        self.prompt_lens = list(prompt_lens)

    def __call__(self, step: int, rows, events) -> None:
        texts = [render_events(self.tok, ev[p:], self.mask_id, self.tty)
                 for ev, p in zip(events, self.prompt_lens)]
        if not self.tty:
            for b, text in enumerate(texts):
                tag = f"[step {step}]" + (f"[row {b}]" if len(texts) > 1 else "")
                self.stream.write(f"{tag} {text.replace(chr(10), '⏎')}\n")
            self.stream.flush()
            return
        self._pending = (step, texts)
        self._draw()

    def _draw(self) -> None:
        step, texts = self._pending
        self._pending = None
        self._draw_frame(step, texts)


def completion_text(tokenizer, row: Sequence[int], prompt_len: int, eos_ids: Sequence[int], stop_strings=()) -> str:
    gen = list(row[prompt_len:])
    for i, t in enumerate(gen):
        if t in eos_ids:
            gen = gen[:i]
            break
    text = tokenizer.decode(gen, skip_special_tokens=True)
    for s in stop_strings:
        if s in text:
            text = text[:text.index(s)]
    return text


def run_editflow(args, model, tokenizer, prompts: List[str], out) -> int:
    """The CLI's alg=editflow path: encode, sample (one forward per changed step), print the completions."""
    import math

    from veomni.diffusion.editflow.sampler import editflow_sample
    from veomni.inference.generate import chat_prompt_ids
    from veomni.models.editflow import editflow_forward

    if not prompts:
        raise ValueError("--infer.alg=editflow needs --prompt or --prompt_file (the interactive chat loop "
                         "drives the masked-diffusion samplers only)")
    if args.save_history:
        raise ValueError("--save_history replays masked-diffusion unmasking; with --infer.alg=editflow use --live")
    e, cfg = args.infer.editflow, model.config
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else getattr(cfg, "bos_token_id", None)
    if bos is None or getattr(cfg, "mask_token_id", None) is None:
        raise ValueError("an EditFlow model needs a BOS token and config.mask_token_id")
    rows = []
    for text in prompts:
        if args.chat:
            messages = ([{"role": "system", "content": args.system_prompt}] if args.system_prompt else [])
            rows.append(chat_prompt_ids(tokenizer, messages + [{"role": "user", "content": text}]))
        else:
            rows.append(tokenizer(text, add_special_tokens=False).input_ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else cfg.eos_token_id
    plens = [len(r) + (not r or r[0] != bos) for r in rows]
    view = (EditLiveView(tokenizer, plens, cfg.mask_token_id, stream=out, total_steps=math.ceil(1 / e.tau - 1e-9))
            if args.live else None)
    try:
        result = editflow_sample(lambda ids, mask: editflow_forward(model, ids, mask), rows, bos_id=bos,
                                 mask_id=cfg.mask_token_id, pad_id=pad,
                                 seeds=[args.infer.seed + b for b in range(len(rows))], tau=e.tau,
                                 init_masks=e.init_masks, schedule=e.schedule, max_w=e.max_w,
                                 max_length=e.max_length, time_eps=e.time_eps,
                                 temperature=args.infer.temperature, device=model.device, step_callback=view)
    finally:
        if view is not None:
            view.close()
    eos = cfg.eos_token_id
    eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    if args.stats:
        s = result.stats
        out.write(f"stats: nfe={s['nfe']} steps={s['steps']} new_tokens={s['new_tokens']} (batch {len(rows)})\n")
    for i, (prompt, row, p) in enumerate(zip(prompts, result.sequences, result.prompt_lens)):
        if len(prompts) > 1:
            short = prompt.replace("\n", " ")
            out.write(f"=== [{i}] {short[:60] + ('...' if len(short) > 60 else '')}\n")
        out.write(completion_text(tokenizer, row, p, eos_ids, args.infer.stop_strings) + "\n")
    out.flush()
    return 0


__all__ = ["EditLiveView", "render_events", "run_editflow", "completion_text"]
