"""Download a training corpus from the Hugging Face Hub (FineCode, FineWeb, any dataset repo).

    # the dataset repo's files as they are (parquet / jsonl shards), Open-dLLM's form:
    python scripts/download_data.py --repo_id fredzzp/fine_code --local_dir data/fine_code
    # a preset: FineWeb's 10B-token sample only (its sample/10BT/*.parquet files)
    python scripts/download_data.py --preset fineweb-10bt --local_dir data/fineweb
    # or through `datasets` (streamed), written as JSONL shards, optionally only the first N records:
    python scripts/download_data.py --repo_id HuggingFaceFW/fineweb --name sample-10BT --to_jsonl \
        --fields text --max_records 200000 --local_dir data/fineweb_200k

Then train on --local_dir (data.train_path), pack it first (scripts/pack_data.py), or skip the
download and stream it (data.streaming=true, data.train_path=hf:<repo_id>?name=...).

Files mode calls huggingface_hub.snapshot_download(repo_type="dataset"), which resumes partial
downloads and skips files already there. --to_jsonl writes <split>-XXXXX.jsonl shards and a
download_manifest.json after each one; re-running continues after the last complete shard, and a
finished download is left alone. --repo_id may also be a local dataset directory (a mirror on a
shared disk); files are then copied / read from there. Without access to the Hub this fails with
a message saying so (set HF_ENDPOINT for a mirror, or download elsewhere and copy --local_dir).
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shutil
import sys

PRESETS = {
    # Open-dLLM's (Open-dCoder) pretraining corpus
    "finecode": dict(repo_id="fredzzp/fine_code", include=[]),
    # FineWeb samples (https://huggingface.co/datasets/HuggingFaceFW/fineweb): parquet shards of text
    "fineweb-10bt": dict(repo_id="HuggingFaceFW/fineweb", include=["sample/10BT/*"], name="sample-10BT"),
    "fineweb-edu-10bt": dict(repo_id="HuggingFaceFW/fineweb-edu", include=["sample/10BT/*"], name="sample-10BT"),
}
MANIFEST = "download_manifest.json"


class HubUnreachable(RuntimeError):
    pass


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repo_id", help="dataset repo on the Hub (owner/name), or a local dataset directory")
    p.add_argument("--preset", choices=sorted(PRESETS), help="a known corpus (sets --repo_id, --include, --name)")
    p.add_argument("--local_dir", required=True, help="where the files go")
    p.add_argument("--include", nargs="*", default=None, help="glob patterns of repo files to fetch (files mode)")
    p.add_argument("--revision", default=None, help="branch, tag or commit")
    p.add_argument("--to_jsonl", action="store_true", help="read through `datasets` and write JSONL shards")
    p.add_argument("--name", default=None, help="dataset config name (--to_jsonl), e.g. sample-10BT")
    p.add_argument("--split", default="train", help="split to read (--to_jsonl)")
    p.add_argument("--fields", nargs="*", default=None, help="keep only these fields (--to_jsonl); default all")
    p.add_argument("--max_records", type=int, default=0, help="stop after this many records (--to_jsonl); 0 = all")
    p.add_argument("--records_per_shard", type=int, default=100_000, help="records per JSONL shard (--to_jsonl)")
    return p


def _resolve(args) -> None:
    if args.preset:
        preset = PRESETS[args.preset]
        if args.repo_id and args.repo_id != preset["repo_id"]:
            sys.exit(f"--preset {args.preset} is {preset['repo_id']}; drop --repo_id or the preset")
        args.repo_id = preset["repo_id"]
        if args.include is None:
            args.include = preset["include"]
        if args.name is None:
            args.name = preset.get("name")
    if not args.repo_id:
        sys.exit("give --repo_id (e.g. fredzzp/fine_code) or --preset (" + ", ".join(sorted(PRESETS)) + ")")
    if args.records_per_shard < 1 or args.max_records < 0:
        sys.exit("--records_per_shard must be >= 1 and --max_records >= 0")


def _hub_error(exc: Exception, repo_id: str) -> HubUnreachable:
    return HubUnreachable(
        f"could not download {repo_id!r} from the Hugging Face Hub: {type(exc).__name__}: {str(exc).splitlines()[0]}\n"
        "This machine cannot reach the Hub (offline, firewall, or HF_HUB_OFFLINE=1), or the repo id / patterns are "
        "wrong. Run this command on a machine with access and copy --local_dir over, set HF_ENDPOINT to a mirror, or "
        "point --repo_id at a local copy of the dataset.")


def download_files(args) -> str:
    """The repo's files (or those matching --include) under --local_dir."""
    os.makedirs(args.local_dir, exist_ok=True)
    if os.path.isdir(args.repo_id):  # a local mirror: same selection, copied
        n = 0
        for root, dirs, files in os.walk(args.repo_id):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for f in sorted(files):
                rel = os.path.relpath(os.path.join(root, f), args.repo_id)
                if f.startswith(".") or (args.include and not any(fnmatch.fnmatch(rel, pat) for pat in args.include)):
                    continue
                dst = os.path.join(args.local_dir, rel)
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                if not (os.path.exists(dst) and os.path.getsize(dst) == os.path.getsize(os.path.join(root, f))):
                    shutil.copy2(os.path.join(root, f), dst)
                n += 1
        if n == 0:
            raise FileNotFoundError(f"{args.repo_id} holds no file matching --include {args.include}")
        print(f"copied {n} file(s) from {args.repo_id} to {args.local_dir}")
        return args.local_dir
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id=args.repo_id, repo_type="dataset", local_dir=args.local_dir,
                                 allow_patterns=args.include or None, revision=args.revision)
    except (OSError, ConnectionError) as e:  # LocalEntryNotFoundError, HTTP and DNS failures are OSErrors
        raise _hub_error(e, args.repo_id) from e


def download_jsonl(args) -> dict:
    """Stream the split through `datasets` into JSONL shards (resumable, see the module doc)."""
    import datasets
    from tqdm import tqdm

    os.makedirs(args.local_dir, exist_ok=True)
    settings = {"repo_id": args.repo_id, "name": args.name, "split": args.split, "revision": args.revision,
                "fields": args.fields, "max_records": args.max_records, "records_per_shard": args.records_per_shard}
    man_path = os.path.join(args.local_dir, MANIFEST)
    man = dict(settings, shards=[], records=0, complete=False)
    if os.path.isfile(man_path):
        with open(man_path) as f:
            old = json.load(f)
        differ = [k for k in settings if old.get(k) != settings[k]]
        if differ:
            raise ValueError(f"{args.local_dir} holds a download with other {', '.join(differ)}; use another --local_dir")
        man = old
    if man["complete"]:
        print(f"{args.local_dir} is complete ({man['records']} records in {len(man['shards'])} shards)")
        return man
    try:
        ds = datasets.load_dataset(args.repo_id, name=args.name, split=args.split, revision=args.revision,
                                   streaming=True)
    except (OSError, ConnectionError) as e:
        raise _hub_error(e, args.repo_id) from e
    if man["records"]:
        ds = ds.skip(man["records"])  # the records of the shards already written
    bar = tqdm(desc="download", unit="rec", initial=man["records"], total=args.max_records or None, dynamic_ncols=True)
    buf = []

    def flush():
        name = f"{args.split}-{len(man['shards']):05d}.jsonl"
        path = os.path.join(args.local_dir, name)
        with open(path + ".partial", "w", encoding="utf-8") as f:
            for rec in buf:
                f.write(json.dumps(rec, ensure_ascii=False, default=str) + "\n")
        os.replace(path + ".partial", path)
        man["shards"].append({"name": name, "records": len(buf)})
        man["records"] += len(buf)
        with open(man_path + ".partial", "w") as f:
            json.dump(man, f, indent=1)
        os.replace(man_path + ".partial", man_path)
        buf.clear()

    try:
        for rec in ds:
            if args.max_records and man["records"] + len(buf) >= args.max_records:
                break
            if args.fields:
                missing = [k for k in args.fields if k not in rec]
                if missing:
                    raise KeyError(f"record has no field(s) {missing}; it has {sorted(rec)} (fix --fields)")
                rec = {k: rec[k] for k in args.fields}
            buf.append(rec)
            bar.update(1)
            if len(buf) >= args.records_per_shard:
                flush()
    except (OSError, ConnectionError) as e:
        raise _hub_error(e, args.repo_id) from e
    if buf:
        flush()
    bar.close()
    man["complete"] = True
    with open(man_path, "w") as f:
        json.dump(man, f, indent=1)
    print(f"wrote {man['records']} records in {len(man['shards'])} JSONL shard(s) to {args.local_dir}")
    return man


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    _resolve(args)
    try:
        if args.to_jsonl:
            download_jsonl(args)
        else:
            path = download_files(args)
            print(f"dataset files in {path}")
    except HubUnreachable as e:
        print(f"download_data.py: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
