"""Sample from a masked-diffusion LM (docs/inference.md, "Command line").

    python tasks/infer.py --model_path outputs/quickstart/hf --prompt "def f(x):" --infer.max_new_tokens=64
    python tasks/infer.py CONFIG.yaml --prompt "a" --prompt "b" --infer.alg=threshold --infer.threshold=0.9
    python tasks/infer.py --model_path DIR --chat           # interactive; /reset, /exit
    python tasks/infer.py --help                            # every option

Options: --prompt (repeatable) | --prompt_file, --chat [--system_prompt], --live, --save_history
FILE.html, --stats, --dtype, --device, --attn_impl, --seed, --add_mask_token, --infer.<field>=VALUE.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from veomni.inference.cli import main, run  # noqa: E402,F401  (main(argv) for in-process use)

if __name__ == "__main__":
    run()
