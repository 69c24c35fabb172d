"""Diffusion samplers behind one API (docs/inference.md).

    from veomni.diffusion.sampling import diffusion_generate, GenerationConfig
    out = diffusion_generate(model, input_ids, GenerationConfig(alg="threshold", use_cache="dual"),
                             attention_mask=mask, max_new_tokens=256)
    out.sequences, out.history, out.stats
"""
from veomni.diffusion.sampling.api import decode_trimmed, diffusion_generate, trim_after_eos
from veomni.diffusion.sampling.config import ALGS, CACHE_MODES, GenerationConfig, merge
from veomni.diffusion.sampling.engine import GenerationOutput
from veomni.diffusion.sampling.infill import InfillOutput, infill

__all__ = [
    "ALGS", "CACHE_MODES", "GenerationConfig", "GenerationOutput", "InfillOutput", "decode_trimmed",
    "diffusion_generate", "infill", "merge", "trim_after_eos",
]
