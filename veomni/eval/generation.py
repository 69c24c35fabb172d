"""The generation side of evaluation: problems -> samples ({"task_id", "completion"} lines).

    from veomni.eval.generation import completion_samples, infill_samples, ar_generate
    samples = completion_samples(task.problems, model, tok, gen_config, mode="diffusion",
                                 stop_strings=HUMANEVAL_STOP)

Completion tasks condition on `problem.prompt` and cut each output at EOS and at the task's stop
strings. Infilling tasks decode prefix + N masks + suffix with `infill(...)` (diffusion only) and
the decoded middle is the completion. eval/generate.py follows Open-dLLM's infilling protocol by
default: oracle length, the same number of steps for every middle, SantaCoder-FIM conditioned on
prompt + newline. `mode="ar"` is the autoregressive baseline: a KV-cached causal decode loop on
the same model class (`ar_generate`).

Seeds: sample s of problem i gets seed `seed + SEED_STRIDE * s + i`, whatever the batch size, so a
run is reproducible and changing --batch_size does not change the samples.
"""
from __future__ import annotations

import math
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

# Codex paper / openai human-eval stop sequences: a new top-level statement ends the function body.
HUMANEVAL_STOP = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]
# evalplus' direct-completion stops for MBPP (its prompt is a docstring; the model writes the def).
MBPP_STOP = ['\n"""', "\nassert", "\nif __name__", "\nprint("]
STOP_STRINGS = {"humaneval": HUMANEVAL_STOP, "humaneval_plus": HUMANEVAL_STOP, "mbpp_plus": MBPP_STOP}
INFILL_TASKS = ("humaneval_infill_single", "humaneval_infill_multi", "humaneval_infill_span",
                "humaneval_infill_span_light", "santacoder_fim")
AVG_LENGTHS = (4, 8, 16, 32, 64)  # DreamOn's fixed lengths for the "avg" infilling protocol
SEED_STRIDE = 100_003  # prime > any benchmark size: (sample, problem) -> distinct seeds
MODES = ("diffusion", "ar")


def sample_seed(seed: int, problem_idx: int, sample_idx: int) -> int:
    return seed + SEED_STRIDE * sample_idx + problem_idx


def parse_infill_length(spec: str) -> List:
    """'fixed:N' -> [N]; 'oracle' -> ['oracle']; 'avg' -> [4, 8, 16, 32, 64] (one samples file each)."""
    if spec == "oracle":
        return ["oracle"]
    if spec == "avg":
        return list(AVG_LENGTHS)
    if spec.startswith("fixed:"):
        try:
            n = int(spec.split(":", 1)[1])
        except ValueError:
            n = 0
        if n >= 1:
            return [n]
    raise ValueError(f"--infill_length={spec!r}: use fixed:N (N >= 1), oracle or avg")


class Progress:
    """One stderr line per update: done/total, rate and ETA (no tqdm dependency)."""

    def __init__(self, total: int, label: str, stream=None):
        self.total, self.label, self.done = total, label, 0
        self.stream = stream or sys.stderr
        self.t0 = time.time()

    def update(self, n: int) -> None:
        self.done += n
        dt = time.time() - self.t0
        rate = self.done / dt if dt > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        pct = 100.0 * self.done / max(self.total, 1)
        print(f"[{self.label}] {self.done}/{self.total} ({pct:.0f}%) {dt:.0f}s elapsed, "
              f"{rate * 60:.1f} samples/min, ETA {eta:.0f}s", file=self.stream, flush=True)


# ---- autoregressive baseline --------------------------------------------------------------------
def _filter_logits(logits: torch.Tensor, top_p: Optional[float], top_k: Optional[int]) -> torch.Tensor:
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        # Drop a token when the mass *before* it already reaches top_p (the top token always stays).
        drop = (cum - torch.softmax(sorted_logits, dim=-1)) >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


@torch.no_grad()
def ar_generate(model, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                max_new_tokens: int = 128, temperature: float = 0.0, top_p: Optional[float] = None,
                top_k: Optional[int] = None, eos_token_id=None, seeds: Optional[Sequence[int]] = None,
                banned_ids: Sequence[int] = (), should_stop: Optional[Callable] = None,
                check_every: int = 8) -> torch.Tensor:
    """Causal left-to-right decoding with a KV cache. Returns [B, max_new_tokens] new tokens; after a
    row's first EOS (or once `should_stop(row_tokens)` is true) the row holds the EOS/pad id.

    input_ids are left-padded (attention_mask zeros on the left). temperature 0 = greedy; otherwise
    each row samples with its own generator seeded from `seeds`. `banned_ids` (e.g. a mask token)
    are never produced. `should_stop(list_of_ids) -> bool` is polled every `check_every` tokens so
    rows can end at code stop strings without decoding every step.
    """
    from veomni.models.kv_cache import KVCache

    bsz, plen = input_ids.shape
    dev = input_ids.device
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if bool((attention_mask[:, -1] == 0).any()):
        raise ValueError("ar_generate needs left padding (attention_mask ends in 1 on every row)")
    eos = [] if eos_token_id is None else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
    fill = eos[0] if eos else 0
    gens = None
    if temperature > 0:
        if seeds is None or len(seeds) != bsz:
            raise ValueError("ar_generate with temperature > 0 needs one seed per row")
        gens = [torch.Generator(device=dev).manual_seed(int(s)) for s in seeds]
    cache = KVCache()
    pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids, attention_mask=attention_mask, position_ids=pos, attn_mode="causal",
                past_key_values=cache, logits_to_keep=torch.tensor([plen - 1], device=dev))
    next_pos = pos[:, -1:] + 1
    new = torch.full((bsz, max_new_tokens), fill, dtype=torch.long, device=dev)
    done = torch.zeros(bsz, dtype=torch.bool, device=dev)
    for t in range(max_new_tokens):
        logits = out.logits[:, -1].float()
        for b_id in banned_ids:
            logits[:, b_id] = float("-inf")
        if temperature > 0:
            probs = torch.softmax(_filter_logits(logits / temperature, top_p, top_k), dim=-1)
            tok = torch.cat([torch.multinomial(probs[b], 1, generator=gens[b]) for b in range(bsz)])
        else:
            tok = logits.argmax(-1)
        tok = torch.where(done, torch.full_like(tok, fill), tok)
        new[:, t] = tok
        if eos:
            done |= torch.isin(tok, torch.tensor(eos, device=dev))
        if should_stop is not None and ((t + 1) % check_every == 0 or t == max_new_tokens - 1):
            for b in range(bsz):
                if not done[b] and should_stop(new[b, :t + 1].tolist()):
                    done[b] = True
        if bool(done.all()) or t == max_new_tokens - 1:
            break
        out = model(tok[:, None], attention_mask=torch.ones(bsz, 1, dtype=torch.long, device=dev),
                    position_ids=next_pos, attn_mode="causal", past_key_values=cache,
                    cache_position=torch.tensor([plen + t], device=dev))
        next_pos = next_pos + 1
    # Rows stopped by should_stop keep their tail tokens only up to where they were polled; the
    # caller cuts at the stop string anyway, so what follows is irrelevant.
    return new


def cut_completion(tokenizer, ids: Sequence[int], eos_ids: Sequence[int], stop_strings: Sequence[str]) -> str:
    """Decode up to the first EOS, then cut before the earliest stop string."""
    cut = next((i for i, t in enumerate(ids) if t in eos_ids), len(ids))
    text = tokenizer.decode(list(ids[:cut]), skip_special_tokens=True)
    hits = [text.find(s) for s in stop_strings if s in text]
    return text[:min(hits)] if hits else text


def _eos_ids(model, tokenizer) -> List[int]:
    eos = getattr(model.config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    return [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))


# ---- samples for a task -------------------------------------------------------------------------
def _work_items(n_problems: int, n_samples: int, batch_size: int):
    items = [(i, s) for s in range(n_samples) for i in range(n_problems)]
    return [items[k:k + batch_size] for k in range(0, len(items), batch_size)]


def completion_samples(problems, model, tokenizer, gen_config, *, mode: str, stop_strings: Sequence[str],
                       n_samples: int = 1, batch_size: int = 1, seed: int = 0,
                       progress: Optional[Progress] = None) -> List[Dict]:
    """{"task_id", "completion"} per (problem, sample); `gen_config` is a sampling GenerationConfig."""
    from veomni.inference.generate import encode_prompts, generate

    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: use one of {MODES}")
    eos = _eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    mask_id = getattr(model.config, "mask_token_id", None)
    samples = []
    for batch in _work_items(len(problems), n_samples, batch_size):
        prompts = [problems[i].prompt for i, _ in batch]
        seeds = [sample_seed(seed, i, s) for i, s in batch]
        ids, attn = encode_prompts(tokenizer, prompts, device=model.device, pad_token_id=pad)
        if mode == "ar":
            stop = (lambda row: any(s in tokenizer.decode(row, skip_special_tokens=True) for s in stop_strings))
            new = ar_generate(model, ids, attn, max_new_tokens=gen_config.max_new_tokens,
                              temperature=gen_config.temperature or 0.0, top_p=gen_config.top_p,
                              top_k=gen_config.top_k, eos_token_id=eos, seeds=seeds,
                              banned_ids=[mask_id] if mask_id is not None else [], should_stop=stop)
            rows = new.tolist()
        else:
            out = generate(model, ids, gen_config, attention_mask=attn, seed=seeds)
            rows = out.sequences[:, out.prompt_len:].tolist()
        for (i, s), row in zip(batch, rows):
            text = cut_completion(tokenizer, row, eos, stop_strings)
            samples.append({"task_id": problems[i].task_id, "completion": text})
        if progress:
            progress.update(len(batch))
    return _in_problem_order(samples, problems)


OPEN_DLLM_INFILL_STEPS = 64  # Open-dLLM eval_infill: --steps 64 for every middle, whatever its length


def infill_samples(problems, model, tokenizer, gen_config, *, length, n_samples: int = 1,
                   batch_size: int = 1, seed: int = 0, steps: Optional[int] = None,
                   steps_per_token: Optional[float] = None, prefix_of: Optional[Callable] = None,
                   progress: Optional[Progress] = None) -> List[Dict]:
    """Middles decoded by `infill`; `length` is an int (fixed) or 'oracle' (tokens of the true middle).

    Step-based algs need exactly one of: `steps`, the same number for every middle (Open-dLLM's
    protocol), or `steps_per_token`, max(1, ceil(n_middle * steps_per_token)) steps. Dynamic algs
    take neither. `prefix_of(problem)` is the text the model is conditioned on before the middle
    (default `problem.prefix`; `Task.generation_prefix` is the protocol's choice, e.g. SantaCoder-FIM's
    prompt + newline). As in Open-dLLM, the prefix is tokenized with special tokens, the suffix and
    the oracle middle without.
    """
    import dataclasses

    from veomni.diffusion.sampling import infill
    from veomni.inference.generate import left_pad

    if steps is not None and steps_per_token is not None:
        raise ValueError("infill_samples: give steps (fixed per middle) or steps_per_token, not both")
    if steps is not None and steps < 1:
        raise ValueError(f"infill_samples: steps must be >= 1, got {steps}")
    prefix_of = prefix_of or (lambda problem: problem.prefix)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    samples = []
    for batch in _work_items(len(problems), n_samples, batch_size):
        # One infill call per distinct middle length (oracle lengths differ between problems).
        groups: Dict[int, list] = {}
        for i, s in batch:
            p = problems[i]
            n = len(tokenizer(p.middle, add_special_tokens=False).input_ids) if length == "oracle" else int(length)
            groups.setdefault(max(n, 1), []).append((i, s))
        for n_mid, group in groups.items():
            pre_rows = [tokenizer(prefix_of(problems[i])).input_ids for i, _ in group]
            pre, pre_mask = left_pad(pre_rows, pad, model.device)
            suf_rows = [tokenizer(problems[i].suffix, add_special_tokens=False).input_ids for i, _ in group]
            suf, suf_mask = _right_pad(suf_rows, pad, model.device)
            n_steps = steps if steps_per_token is None else max(1, math.ceil(n_mid * steps_per_token))
            cfg = dataclasses.replace(gen_config, max_new_tokens=None, steps=n_steps)
            out = infill(model, pre, suf, n_mid, cfg, prefix_attention_mask=pre_mask,
                         suffix_attention_mask=suf_mask, seed=[sample_seed(seed, i, s) for i, s in group])
            for (i, s), row in zip(group, out.middle.tolist()):
                samples.append({"task_id": problems[i].task_id,
                                "completion": tokenizer.decode(row, skip_special_tokens=True)})
        if progress:
            progress.update(len(batch))
    return _in_problem_order(samples, problems)


def _right_pad(rows, pad_id, device):
    """[B, S] suffix ids padded on the right (an empty suffix is allowed: S may be 0)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, :len(row)] = torch.tensor(row, dtype=torch.long)
        mask[b, :len(row)] = 1
    return ids.to(device), mask.to(device)


def _in_problem_order(samples, problems):
    order = {p.task_id: k for k, p in enumerate(problems)}
    return sorted(samples, key=lambda r: order[r["task_id"]])  # stable: sample order kept per task
