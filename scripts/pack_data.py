"""Tokenize and pack a corpus offline into token shards that training reads directly.

    python scripts/pack_data.py --input data/fine_code --output data/fine_code_packed \
        --tokenizer Qwen/Qwen2.5-Coder-0.5B --max_seq_len 2048
    # then train on it:  --data.train_path=data/fine_code_packed --data.max_seq_len=2048

--input is anything a data source accepts (docs/data.md): .jsonl / .parquet / text files, a
directory or glob of them, or hf:<dataset> (streamed through `datasets`). The output directory gets
shard-XXXXX.{tokens,rows,pieces}.npy files and manifest.json (tokenizer, max_seq_len, data_type,
row / token / shard counts). Rows are packed exactly as streaming training packs them
(veomni/data/packing.py pack_stream) and memory-mapped at training time, so the corpus does not
have to fit in memory and the loader keeps its global shuffle and resume on any number of ranks.

Resumable and idempotent: re-running the same command continues after the last complete shard,
or does nothing when the pack is finished; a directory packed from other inputs or with other
options is an error (use another --output, or --overwrite). Pack with the tokenizer and mask token
the training config uses (model.tokenizer_path / model_path, model.mask_token): training checks
the tokenizer fingerprint in the manifest.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, nargs="+",
                   help="files / directories / globs (read in the order given), or one hf:<dataset> source")
    p.add_argument("--output", required=True, help="output directory (created)")
    p.add_argument("--tokenizer", required=True,
                   help="tokenizer directory, hub id or embedded name (as model.tokenizer_path / model_path)")
    p.add_argument("--mask_token", default="<|mask|>",
                   help="added to the tokenizer when it has no mask token, as training does (model.mask_token)")
    p.add_argument("--max_seq_len", type=int, required=True, help="tokens per row (data.max_seq_len)")
    p.add_argument("--data_type", choices=["pretrain", "sft"], default="pretrain")
    p.add_argument("--text_key", default="text", help="field holding the text of a pretrain record")
    p.add_argument("--no_packing", action="store_true", help="one document per row (data.packing=false)")
    p.add_argument("--no_chat_template", action="store_true", help="SFT: tokenize prompt/response as raw text")
    p.add_argument("--skip_bad_lines", action="store_true", help="count and skip malformed records")
    p.add_argument("--rows_per_shard", type=int, default=8192, help="rows per shard file (default 8192)")
    p.add_argument("--overwrite", action="store_true", help="discard what --output holds and pack again")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from veomni.data.readers import ReaderOptions
    from veomni.data.shards import pack
    from veomni.data.sources import is_hf_spec, open_source
    from veomni.models.hf_io import load_tokenizer

    if any(is_hf_spec(s) for s in args.input) and len(args.input) > 1:
        sys.exit("pack_data.py: an hf: source must be the only --input (pack several sources into several "
                 "directories and mix them with data.sources)")
    tok = load_tokenizer(args.tokenizer)
    if tok.mask_token is None:  # what ensure_mask_token does at training time; keeps the fingerprint equal
        tok.add_special_tokens({"mask_token": args.mask_token})
    opts = ReaderOptions(data_type=args.data_type, text_key=args.text_key, skip_bad_lines=args.skip_bad_lines)
    spec = args.input[0] if len(args.input) == 1 else list(args.input)
    source = open_source(spec, opts)
    man = pack(source, tok, args.output, max_seq_len=args.max_seq_len, packing=not args.no_packing,
               rows_per_shard=args.rows_per_shard, overwrite=args.overwrite,
               use_chat_template=not args.no_chat_template, progress=not args.no_progress)
    summary = {k: man[k] for k in ("rows", "tokens", "max_seq_len", "data_type")}
    summary["shards"] = len(man["shards"])
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
