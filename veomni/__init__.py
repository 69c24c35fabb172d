"""veomni-dllm: masked-diffusion language models, from AR checkpoint to evaluation.

Importing this package stays light on purpose: no optional dependency (flash-attn, deepspeed,
bitsandbytes, wandb, ...) and not even transformers is imported here. Submodules import what they
need when they are used.
"""

__version__ = "0.1.0"
