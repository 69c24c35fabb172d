#!/usr/bin/env bash
# Download the code-evaluation data (needs internet) into the layout veomni.eval expects:
#
#   DIR/humaneval/HumanEval.jsonl.gz                 openai/human-eval (MIT)
#   DIR/evalplus/HumanEvalPlus.jsonl.gz              evalplus release v0.1.10 (Apache-2.0)
#   DIR/evalplus/MbppPlus.jsonl.gz                   evalplus release v0.2.0 (Apache-2.0)
#   DIR/humaneval_infilling/HumanEval-*Infilling*.jsonl.gz   openai/human-eval-infilling (MIT)
#   DIR/santacoder_fim/santacoder-fim-task.parquet   only with --santacoder (HF hub, OpenRAIL)
#
# Usage: bash scripts/download_eval_data.sh [DIR] [--santacoder] [--force]
#   DIR defaults to $VEOMNI_EVAL_DATA, then ~/.cache/veomni/eval (the loaders' default order).
# Existing files are kept unless --force. Each file is checked (gzip integrity, row count) after
# download; a failed download leaves no partial file behind.
set -euo pipefail

DIR=""
SANTACODER=0
FORCE=0
for arg in "$@"; do
  case "$arg" in
    --santacoder) SANTACODER=1 ;;
    --force) FORCE=1 ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    -*) echo "unknown option: $arg (see --help)" >&2; exit 2 ;;
    *)
      if [[ -n "$DIR" ]]; then echo "only one DIR may be given (got '$DIR' and '$arg')" >&2; exit 2; fi
      DIR="$arg" ;;
  esac
done
DIR="${DIR:-${VEOMNI_EVAL_DATA:-$HOME/.cache/veomni/eval}}"

command -v curl >/dev/null || { echo "curl is required" >&2; exit 1; }
PYTHON="${PYTHON:-python3}"
command -v "$PYTHON" >/dev/null || { echo "$PYTHON is required (set PYTHON=...)" >&2; exit 1; }

HUMANEVAL_URL="https://github.com/openai/human-eval/raw/master/data/HumanEval.jsonl.gz"
HUMANEVAL_LICENSE="https://raw.githubusercontent.com/openai/human-eval/master/LICENSE"
HEPLUS_URL="https://github.com/evalplus/humanevalplus_release/releases/download/v0.1.10/HumanEvalPlus.jsonl.gz"
MBPPPLUS_URL="https://github.com/evalplus/mbppplus_release/releases/download/v0.2.0/MbppPlus.jsonl.gz"
EVALPLUS_LICENSE="https://raw.githubusercontent.com/evalplus/evalplus/master/LICENSE"
INFILL_BASE="https://github.com/openai/human-eval-infilling/raw/master/data"
INFILL_LICENSE="https://raw.githubusercontent.com/openai/human-eval-infilling/master/LICENSE"
# Pinned to the commit that uploaded the data file.
SANTACODER_URL="https://huggingface.co/datasets/bigcode/santacoder-fim-task/resolve/2b77de826452a5b610ab72072d74a139c41e1591/data/train-00000-of-00001-b6ec1fdd66018baa.parquet"

# fetch URL DEST: download to a temporary name, then move into place.
fetch() {
  local url="$1" dest="$2"
  if [[ -f "$dest" && "$FORCE" -eq 0 ]]; then
    echo "keep     $dest"
    return 0
  fi
  mkdir -p "$(dirname "$dest")"
  echo "download $url"
  if ! curl -fL --retry 3 --connect-timeout 30 -o "$dest.part" "$url"; then
    rm -f "$dest.part"
    echo "failed to download $url" >&2
    exit 1
  fi
  mv "$dest.part" "$dest"
}

# check_rows FILE EXPECTED: the gzip is intact and holds EXPECTED JSON lines with a task_id.
check_rows() {
  "$PYTHON" - "$1" "$2" <<'PY'
import gzip, json, sys
path, expected = sys.argv[1], int(sys.argv[2])
with gzip.open(path, "rt", encoding="utf-8") as f:
    rows = [json.loads(line) for line in f if line.strip()]
if len(rows) != expected or not all("task_id" in r for r in rows):
    sys.exit(f"{path}: expected {expected} rows with a task_id, found {len(rows)}")
print(f"ok       {path} ({len(rows)} rows)")
PY
}

fetch "$HUMANEVAL_URL" "$DIR/humaneval/HumanEval.jsonl.gz"
fetch "$HUMANEVAL_LICENSE" "$DIR/humaneval/LICENSE"
fetch "$HEPLUS_URL" "$DIR/evalplus/HumanEvalPlus.jsonl.gz"
fetch "$MBPPPLUS_URL" "$DIR/evalplus/MbppPlus.jsonl.gz"
fetch "$EVALPLUS_LICENSE" "$DIR/evalplus/LICENSE"
for name in SingleLineInfilling MultiLineInfilling RandomSpanInfilling RandomSpanInfillingLight; do
  fetch "$INFILL_BASE/HumanEval-$name.jsonl.gz" "$DIR/humaneval_infilling/HumanEval-$name.jsonl.gz"
done
fetch "$INFILL_LICENSE" "$DIR/humaneval_infilling/LICENSE"

check_rows "$DIR/humaneval/HumanEval.jsonl.gz" 164
check_rows "$DIR/evalplus/HumanEvalPlus.jsonl.gz" 164
check_rows "$DIR/evalplus/MbppPlus.jsonl.gz" 378
check_rows "$DIR/humaneval_infilling/HumanEval-SingleLineInfilling.jsonl.gz" 1033
check_rows "$DIR/humaneval_infilling/HumanEval-MultiLineInfilling.jsonl.gz" 5815
check_rows "$DIR/humaneval_infilling/HumanEval-RandomSpanInfilling.jsonl.gz" 1640
check_rows "$DIR/humaneval_infilling/HumanEval-RandomSpanInfillingLight.jsonl.gz" 164

if [[ "$SANTACODER" -eq 1 ]]; then
  fetch "$SANTACODER_URL" "$DIR/santacoder_fim/santacoder-fim-task.parquet"
  echo "note     reading the .parquet needs pyarrow (pip install pyarrow), or convert it to"
  echo "         $DIR/santacoder_fim/santacoder-fim-task.jsonl yourself"
else
  echo "skip     santacoder_fim (HF hub only; rerun with --santacoder)"
fi

echo "sha256 of what is in $DIR:"
(cd "$DIR" && find . -type f -name '*.gz' -o -type f -name '*.parquet' | sort | xargs -r sha256sum)
echo "done: export VEOMNI_EVAL_DATA=$DIR   (or pass --data_dir $DIR to eval/score.py)"
