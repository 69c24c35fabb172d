"""Train a masked-diffusion LM (or an AR baseline).

    torchrun --nproc_per_node=N tasks/train_torch.py CONFIG.yaml --train.max_steps=100 ...
    python tasks/train_torch.py CONFIG.yaml ...          # one process

Every option: python tasks/train_torch.py --help. Re-running the same command resumes from the
newest valid checkpoint in train.output_dir.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from veomni.arguments import parse_args  # noqa: E402


def main(argv=None):
    args = parse_args(argv=argv)
    from veomni.trainer.trainer import run

    run(args)


if __name__ == "__main__":
    main()
