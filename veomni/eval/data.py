"""Locate and read the evaluation data files.

Layout under a data directory (what ``scripts/download_eval_data.sh DIR`` produces)::

    DIR/humaneval/HumanEval.jsonl.gz                         optional: original HumanEval
    DIR/evalplus/HumanEvalPlus.jsonl.gz                      HumanEval+ v0.1.10
    DIR/evalplus/MbppPlus.jsonl.gz                           MBPP+ v0.2.0
    DIR/humaneval_infilling/HumanEval-SingleLineInfilling.jsonl.gz
    DIR/humaneval_infilling/HumanEval-MultiLineInfilling.jsonl.gz
    DIR/humaneval_infilling/HumanEval-RandomSpanInfilling.jsonl.gz
    DIR/humaneval_infilling/HumanEval-RandomSpanInfillingLight.jsonl.gz
    DIR/santacoder_fim/santacoder-fim-task.jsonl             or .jsonl.gz / .parquet (HF hub only)

The directory is, in order: the ``data_dir`` argument, ``$VEOMNI_EVAL_DATA``, ``~/.cache/veomni/eval``.
Every ``.jsonl.gz`` name is also accepted uncompressed (``.jsonl``).
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import Sequence, Union

ENV_VAR = "VEOMNI_EVAL_DATA"
DEFAULT_DATA_DIR = "~/.cache/veomni/eval"
DOWNLOAD_HINT = "Fetch the files with `bash scripts/download_eval_data.sh DIR` (needs internet)."


def resolve_data_dir(data_dir: Union[str, os.PathLike, None] = None) -> Path:
    """The data directory (or single file) to read: argument, then $VEOMNI_EVAL_DATA, then cache."""
    if data_dir is not None:
        source, path = "data_dir argument", Path(data_dir)
    elif os.environ.get(ENV_VAR):
        source, path = f"${ENV_VAR}", Path(os.environ[ENV_VAR])
    else:
        source, path = "default location", Path(DEFAULT_DATA_DIR)
    path = path.expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"Evaluation data not found: {path} (from the {source}) does not exist. "
            f"Pass --data_dir, set ${ENV_VAR}, or populate {DEFAULT_DATA_DIR}. {DOWNLOAD_HINT}"
        )
    return path


def find_data_file(data: Path, candidates: Sequence[str], task: str) -> Path:
    """First existing candidate (relative to the data dir); `data` may also be the file itself."""
    if data.is_file():
        return data
    tried = []
    for rel in candidates:
        names = [rel, rel[: -len(".gz")]] if rel.endswith(".jsonl.gz") else [rel]
        for name in names:
            path = data / name
            tried.append(str(path))
            if path.is_file():
                return path
    raise FileNotFoundError(
        f"Task {task!r} needs one of these files, none exists:\n  " + "\n  ".join(tried) + f"\n{DOWNLOAD_HINT}"
    )


def read_rows(path: Path) -> list:
    """Rows of a .jsonl, .jsonl.gz or .parquet file, as dicts."""
    name = path.name
    if name.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise ImportError(
                f"Reading {path} needs pyarrow (`pip install pyarrow`), or convert it to JSONL first."
            ) from exc
        return pq.read_table(path).to_pylist()
    if name.endswith(".jsonl.gz") or name.endswith(".json.gz"):
        opener = gzip.open
    elif name.endswith(".jsonl") or name.endswith(".json"):
        opener = open
    else:
        raise ValueError(f"Unsupported data file type: {path} (expected .jsonl, .jsonl.gz or .parquet)")
    rows = []
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except ValueError as exc:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({exc})") from exc
    return rows


def require_fields(rows: list, fields: Sequence[str], path: Path) -> None:
    for i, row in enumerate(rows):
        missing = [f for f in fields if f not in row]
        if missing:
            raise ValueError(
                f"{path}: row {i} ({row.get('task_id', '?')}) lacks field(s) {missing}; "
                f"is this the right file for the task? Expected fields: {list(fields)}"
            )


# ----------------------------------------------------------------------------------------------
# MBPP+ stores tuples, sets and complex numbers as JSON lists/strings; evalplus restores the Python
# types per task before calling any function (evalplus/data/mbpp.py, `mbpp_deserialize_inputs`).
# Without this the references receive lists where they expect tuples and produce wrong oracles.
# The task-id table below is that fact table, re-implemented.
# ----------------------------------------------------------------------------------------------
_TUPLE_EACH_ARG = {2, 116, 132, 143, 222, 261, 273, 394, 399, 421, 424, 429, 470, 560, 579, 596,
                   616, 630, 726, 740, 744, 809}
_TUPLE_EACH_NESTED = {63, 64, 70, 94, 120, 237, 272, 299, 400, 409, 417, 438, 473, 614, 780}
_TUPLE_NESTED_IN_FIRST = {75, 413, 444, 753}
_TUPLE_SECOND_ARG = {106, 750}
_TUPLE_FIRST_ARG = {250, 405, 446, 617, 720, 763, 808}
_TUPLE_NESTED_THEN_ARGS = {259, 401, 445}
_ALL_LISTS_TO_TUPLES = {580, 615, 791}


def _deep_tuple(x):
    return tuple(_deep_tuple(i) for i in x) if isinstance(x, list) else x


def _one_input(num: int, inp: list):
    if num in _TUPLE_EACH_ARG:
        return [tuple(a) for a in inp]
    if num in _TUPLE_EACH_NESTED:
        return [[tuple(x) for x in a] for a in inp]
    if num in _TUPLE_NESTED_IN_FIRST:
        return [[tuple(x) for x in inp[0]], inp[1]]
    if num in _TUPLE_SECOND_ARG:
        return [inp[0], tuple(inp[1])]
    if num == 115:
        # evalplus turns an empty member into `{}` (an empty *dict*); kept so oracles match theirs.
        return [[set(x) if isinstance(x, list) and x else {} for x in inp[0]]]
    if num == 124:
        return (float(inp[0]), complex(inp[1]))
    if num in _TUPLE_FIRST_ARG:
        return [tuple(inp[0]), inp[1]]
    if num in _TUPLE_NESTED_THEN_ARGS:
        return [tuple(tuple(x) for x in a) for a in inp]
    if num == 278:
        return [tuple(tuple(x) if isinstance(x, list) else x for x in inp[0])]
    if num == 307:
        return [tuple(inp[0]), inp[1], inp[2]]
    if num == 722:
        return [{k: tuple(v) for k, v in inp[0].items()}] + list(inp[1:])
    if num == 252:
        return [complex(inp[0])]
    if num in _ALL_LISTS_TO_TUPLES:
        return _deep_tuple(inp)
    return inp


def mbpp_deserialize_inputs(task_id: str, inputs: list) -> list:
    """Restore the Python argument types of MBPP+ inputs (see the comment above)."""
    num = int(task_id.split("/")[-1])
    return [_one_input(num, inp) for inp in inputs]
