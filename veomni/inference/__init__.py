"""User-facing inference on top of `veomni.diffusion.sampling` (docs/inference.md).

    from veomni.inference import load_for_inference, encode_prompts, generate
    model, tok = load_for_inference("outputs/run/hf")
    ids, mask = encode_prompts(tok, ["def f(x):"], device=model.device)
    out = generate(model, ids, attention_mask=mask, max_new_tokens=64, alg="threshold", threshold=0.9)

Modules: `generate` (steps > max_new_tokens, prompt encoding, InferArgs -> GenerationConfig),
`loading` (HF dir / training checkpoint / GGUF), `live` (terminal view), `history_html` (replay
page), `chat` (multi-turn session), `dropin` (Open-dLLM's MDMGenerationConfig API), `cli`
(tasks/infer.py). Names load on first use so `import veomni.inference` stays light.
"""

from veomni.utils.lazy import lazy_exports

_EXPORTS = {
    "generate": "generate",
    "encode_prompts": "generate",
    "generation_config_from_infer": "generate",
    "load_for_inference": "loading",
    "LiveView": "live",
    "render_generated": "live",
    "write_history_html": "history_html",
    "ChatSession": "chat",
    "MDMGenerationConfig": "dropin",
    "mdm_diffusion_generate": "dropin",
}


__getattr__, __all__ = lazy_exports(__name__, _EXPORTS)
