"""Open-dLLM-compatible generation for the qwen3_moe family: the import path Open-dLLM users know.

    from veomni.models.transformers.qwen3_moe.modeling_qwen3_moe import Qwen3MoeForCausalLM
    from veomni.models.transformers.qwen3_moe.generation_utils import MDMGenerationConfig
    model = Qwen3MoeForCausalLM.from_pretrained(path, torch_dtype=torch.bfloat16).eval()
    out = model.diffusion_generate(inputs=input_ids, generation_config=MDMGenerationConfig(max_new_tokens=128, steps=200))

The implementation is shared by all families (veomni/inference/dropin.py, where the differences
from Open-dLLM are listed); docs/inference.md, "Python API / Open-dLLM drop-in".
"""
from veomni.inference.dropin import MDMGenerationConfig, MDMGenerationMixin, MDMModelOutput, mdm_diffusion_generate

__all__ = ["MDMGenerationConfig", "MDMGenerationMixin", "MDMModelOutput", "mdm_diffusion_generate"]
