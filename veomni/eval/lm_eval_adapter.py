"""lm-evaluation-harness adapter: our dLLMs as lm-eval model type "veomni_dllm".

    python -m veomni.eval.lm_eval_adapter --model veomni_dllm \
        --model_args pretrained=outputs/run/hf,mc_num=128,alg=p2,steps=128 --tasks hellaswag
    # or in Python:
    from veomni.eval.lm_eval_adapter import register_lm_eval
    cls = register_lm_eval()          # imports lm_eval (optional dependency: pip install lm-eval)

- `generate_until`: our diffusion samplers (`veomni.inference.generate`); any GenerationConfig field
  is a model arg (alg, steps, threshold, use_cache, ...). max_gen_toks / temperature / do_sample /
  until come from the request as lm-eval sends them.
- `loglikelihood`: the Monte-Carlo ELBO (`veomni.eval.likelihood.mc_elbo`, LLaDA's estimator), so
  the "log-likelihood" is a stochastic lower bound; a 1-token continuation is exact with one copy.
  `is_greedy` is a one-forward check: with every continuation token masked, is the argmax at each
  position the continuation token? (LLaDA decodes iteratively for this; ours is cheaper and coarser.)
- `loglikelihood_rolling`: the ELBO of the whole text after a BOS/EOS start token.

`DLLMEvalModel` holds the logic and needs no lm_eval, so it can be used (and tested) without it.
"""
from __future__ import annotations

import sys
from typing import List, Tuple

import torch

_REGISTERED = {}


class DLLMEvalModel:
    """Request handlers. Requests are anything with `.args` (lm-eval's Instance has it)."""

    def __init__(self, model, tokenizer, mc_num: int = 128, mc_batch_size: int = 32, seed: int = 0,
                 max_gen_toks: int = 256, **gen_kwargs):
        from veomni.diffusion.sampling import GenerationConfig

        self.model, self.tokenizer = model, tokenizer
        self.mc_num, self.mc_batch_size, self.seed = int(mc_num), int(mc_batch_size), int(seed)
        if self.mc_num % self.mc_batch_size:
            raise ValueError(f"mc_num ({mc_num}) must be a multiple of mc_batch_size ({mc_batch_size})")
        self.max_gen_toks = int(max_gen_toks)
        self.gen_config = GenerationConfig(**gen_kwargs)  # unknown names raise with the closest one
        cfg = model.config
        self.mask_id = getattr(cfg, "mask_token_id", None)
        if self.mask_id is None:
            raise ValueError("veomni_dllm needs a masked-diffusion model (config.mask_token_id is unset)")
        self.logit_shift = bool(getattr(cfg, "dllm_logit_shift", True))
        self._gen = torch.Generator().manual_seed(self.seed)

    @classmethod
    def from_pretrained(cls, pretrained: str, dtype: str = "auto", device: str = "auto", **kwargs):
        from veomni.inference.loading import load_for_inference

        model, tok = load_for_inference(pretrained, dtype=dtype, device=device)
        return cls(model, tok, **kwargs)

    # ---- helpers ---------------------------------------------------------------------------------
    def _start_ids(self) -> List[int]:
        tok = self.tokenizer
        start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        if start is None:
            raise ValueError("the tokenizer has no BOS/EOS token to start an unconditioned text with")
        return [start]

    def _split(self, context: str, continuation: str) -> Tuple[List[int], List[int]]:
        """lm-eval's convention: trailing spaces of the context move to the continuation, and the
        continuation's ids are those of (context + continuation) past the context's ids."""
        n_space = len(context) - len(context.rstrip())
        if n_space:
            context, continuation = context[:-n_space], context[-n_space:] + continuation
        enc = lambda s: self.tokenizer(s, add_special_tokens=False).input_ids  # noqa: E731
        whole, ctx = enc(context + continuation), enc(context)
        return ctx, whole[len(ctx):]

    def _elbo(self, prompt_ids: List[int], target_ids: List[int]) -> float:
        from veomni.eval.likelihood import mc_elbo

        if not prompt_ids and self.logit_shift:
            prompt_ids = self._start_ids()
        single = len(target_ids) == 1  # one masked token: every copy is the same, one is exact
        r = mc_elbo(self.model, prompt_ids, target_ids, mc_num=1 if single else self.mc_num,
                    batch_size=1 if single else self.mc_batch_size, mask_id=self.mask_id,
                    logit_shift=self.logit_shift, generator=self._gen)
        return r["elbo"]

    @torch.no_grad()
    def _all_masked_greedy(self, prompt_ids: List[int], target_ids: List[int]) -> bool:
        if not prompt_ids and self.logit_shift:
            prompt_ids = self._start_ids()
        P, T = len(prompt_ids), len(target_ids)
        x = torch.tensor([prompt_ids + [self.mask_id] * T], device=self.model.device)
        logits = self.model(x).logits[0]
        logits = logits[P - 1:-1] if self.logit_shift else logits[P:]
        return logits.argmax(-1).tolist() == list(target_ids)

    # ---- lm-eval request types -------------------------------------------------------------------
    def loglikelihood(self, requests) -> List[Tuple[float, bool]]:
        out = []
        for req in requests:
            context, continuation = req.args[0], req.args[1]
            ctx, cont = self._split(context, continuation)
            if not cont:
                raise ValueError(f"empty continuation for context {context[-40:]!r}")
            out.append((self._elbo(ctx, cont), self._all_masked_greedy(ctx, cont)))
        return out

    def loglikelihood_rolling(self, requests) -> List[float]:
        out = []
        for req in requests:
            ids = self.tokenizer(req.args[0], add_special_tokens=False).input_ids
            if not ids:
                raise ValueError("loglikelihood_rolling: empty text")
            out.append(self._elbo(self._start_ids(), ids))
        return out

    def generate_until(self, requests) -> List[str]:
        from veomni.eval.generation import cut_completion
        from veomni.inference.generate import encode_prompts, generate

        eos = getattr(self.model.config, "eos_token_id", None)
        eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        out = []
        for k, req in enumerate(requests):
            context, gen_kwargs = req.args[0], dict(req.args[1] if len(req.args) > 1 else {})
            until = gen_kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            n_new = int(gen_kwargs.pop("max_gen_toks", self.max_gen_toks))
            do_sample = gen_kwargs.pop("do_sample", None)
            temperature = gen_kwargs.pop("temperature", None)
            if do_sample is False:
                temperature = 0.0
            overrides = dict(max_new_tokens=n_new, seed=self.seed + k)
            if temperature is not None:
                overrides["temperature"] = float(temperature)
            overrides.update(gen_kwargs)  # anything else lm-eval passes must be a sampler option
            ids, attn = encode_prompts(self.tokenizer, [context], device=self.model.device)
            res = generate(self.model, ids, self.gen_config, attention_mask=attn, **overrides)
            row = res.sequences[0, res.prompt_len:].tolist()
            out.append(cut_completion(self.tokenizer, row, eos, until))
        return out


def _lm_eval():
    try:
        import lm_eval  # noqa: F401
        from lm_eval.api.model import LM
        from lm_eval.api.registry import register_model
    except ImportError as exc:
        raise ImportError("the lm-eval adapter needs lm-evaluation-harness: pip install lm-eval "
                          f"(import failed: {exc})") from None
    return LM, register_model


def register_lm_eval():
    """Import lm_eval, register model type "veomni_dllm" once, return the class."""
    if "cls" in _REGISTERED:
        return _REGISTERED["cls"]
    LM, register_model = _lm_eval()

    class VeomniDLLM(DLLMEvalModel, LM):
        """lm-eval model args: pretrained=DIR, dtype, device, mc_num, mc_batch_size, seed,
        max_gen_toks, and any GenerationConfig field (alg=p2, steps=128, ...)."""

        def __init__(self, pretrained: str, dtype: str = "auto", device: str = "auto", batch_size=None,
                     max_batch_size=None, **kwargs):
            from veomni.inference.loading import load_for_inference

            LM.__init__(self)
            model, tok = load_for_inference(pretrained, dtype=dtype, device=device)
            # lm-eval's own --batch_size is about request batching; we evaluate one request at a time.
            DLLMEvalModel.__init__(self, model, tok, **kwargs)

    register_model("veomni_dllm")(VeomniDLLM)
    _REGISTERED["cls"] = VeomniDLLM
    return VeomniDLLM


def __getattr__(name):
    if name == "VeomniDLLM":
        return register_lm_eval()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main() -> None:
    """`python -m veomni.eval.lm_eval_adapter <lm_eval CLI args>`: lm_eval's CLI with our model registered."""
    register_lm_eval()
    from lm_eval.__main__ import cli_evaluate

    sys.exit(cli_evaluate())


if __name__ == "__main__":
    main()
