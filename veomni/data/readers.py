"""Find the input files and read their records, validating each one.

Formats (see docs/data.md):
  * ``*.jsonl`` pretraining: one JSON object per line with a string field ``text_key`` (default "text").
  * ``*.parquet``: one record per table row, with the same fields as a JSONL record (pyarrow needed).
  * ``*.jsonl`` SFT: one JSON object per line with either ``prompt``/``response`` strings or
    ``messages``: a list of ``{"role": str, "content": str}`` ending with an assistant turn.
  * plain-text files (suffix in ``text_suffixes``): the whole file is one pretraining document.

Paths may be files, directories (walked recursively, sorted, hidden entries skipped), globs, or a
list of any of these. A malformed record raises ``DataFormatError`` naming file and line; with
``skip_bad_lines=True`` it is counted per file instead (the counts end up on the dataset).
No torch / transformers import here.
"""
from __future__ import annotations

import glob
import json
import logging
import os
from dataclasses import dataclass
from typing import Dict, Iterator, List, Sequence, Tuple, Union

DATA_TYPES = ("pretrain", "sft")
DEFAULT_TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py")
JSONL_SUFFIX = ".jsonl"
PARQUET_SUFFIX = ".parquet"
RECORD_SUFFIXES = (JSONL_SUFFIX, PARQUET_SUFFIX)  # files of records (not whole-file documents)

PathLike = Union[str, os.PathLike]
logger = logging.getLogger(__name__)


class DataFormatError(ValueError):
    """A record (or file) that cannot be turned into a training document; names file and line."""


@dataclass(frozen=True)
class ReaderOptions:
    """How records are read; every field is part of the tokenization cache key."""

    data_type: str = "pretrain"
    text_key: str = "text"
    prompt_key: str = "prompt"
    response_key: str = "response"
    messages_key: str = "messages"
    text_suffixes: Tuple[str, ...] = DEFAULT_TEXT_SUFFIXES
    skip_bad_lines: bool = False

    def __post_init__(self):
        if self.data_type not in DATA_TYPES:
            raise ValueError(f"data_type={self.data_type!r} is not one of {DATA_TYPES}")
        bad = [s for s in self.text_suffixes if not s.startswith(".")]
        if bad:
            raise ValueError(f"text_suffixes must start with '.', got {bad} (e.g. '.txt')")
        clash = [s for s in self.text_suffixes if s in RECORD_SUFFIXES]
        if clash:
            raise ValueError(f"{clash} cannot be text suffixes: JSONL / parquet files hold records, not one document")


# --------------------------------------------------------------------------------------------
# path resolution


def _has_glob(s: str) -> bool:
    return any(c in s for c in "*?[")


def _walk_dir(root: str, suffixes: Tuple[str, ...]) -> List[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Sorting in place makes os.walk descend in a fixed order: same files, same document order,
        # same cache key on every machine. Hidden entries (.git, .ipynb_checkpoints) are not data.
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            if name.endswith(RECORD_SUFFIXES) or name.endswith(suffixes):
                out.append(os.path.join(dirpath, name))
    return out


def resolve_files(paths: Union[PathLike, Sequence[PathLike]], text_suffixes=DEFAULT_TEXT_SUFFIXES) -> List[str]:
    """Expand files / directories / globs into an ordered list of absolute file paths.

    Order is the order given, directories and globs expanded sorted. A file listed twice is read
    twice (a way to upsample); a path that matches nothing is an error.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not paths:
        raise ValueError("no data paths given")
    suffixes = tuple(text_suffixes)
    files: List[str] = []
    for p in paths:
        p = os.fspath(p)
        if _has_glob(p):
            matches = sorted(glob.glob(p, recursive=True))
            if not matches:
                raise FileNotFoundError(f"glob {p!r} matched no file")
            for m in matches:
                files.extend(_walk_dir(m, suffixes) if os.path.isdir(m) else [m])
        elif os.path.isdir(p):
            found = _walk_dir(p, suffixes)
            if not found:
                raise FileNotFoundError(
                    f"directory {p!r} holds no {RECORD_SUFFIXES} file nor one with a suffix in "
                    f"text_suffixes={suffixes}; add the suffix your files use to text_suffixes"
                )
            files.extend(found)
        elif os.path.isfile(p):
            files.append(p)
        else:
            raise FileNotFoundError(f"data path {p!r} does not exist")
    for f in files:
        if not (f.endswith(RECORD_SUFFIXES) or f.endswith(suffixes)):
            raise ValueError(
                f"{f!r}: unsupported file type; use {RECORD_SUFFIXES} or a plain-text suffix listed in "
                f"text_suffixes={suffixes} (extend the list for other text files)"
            )
    return [os.path.abspath(f) for f in files]


# --------------------------------------------------------------------------------------------
# record validation


def _nonempty_str(value, what: str) -> str:
    if not isinstance(value, str):
        raise DataFormatError(f"{what} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DataFormatError(f"{what} is empty")
    return value


def _check_messages(messages, key: str) -> List[Dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise DataFormatError(f"'{key}' must be a non-empty list of {{role, content}} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataFormatError(f"'{key}'[{i}] must be an object with string 'role' and 'content'")
        out.append({"role": m["role"], "content": m["content"]})
    # Only the last assistant turn is the response; anything after it would be neither prompt nor
    # response, so a conversation must end with the assistant turn to be trained on.
    if out[-1]["role"] != "assistant":
        raise DataFormatError(
            f"'{key}' must end with an assistant turn (the response), last role is {out[-1]['role']!r}"
        )
    _nonempty_str(out[-1]["content"], f"'{key}'[-1] (assistant) content")
    return out


def parse_record(obj, opts: ReaderOptions):
    """Validate one decoded JSON value; returns a str (pretrain) or a dict (sft)."""
    if not isinstance(obj, dict):
        raise DataFormatError(f"expected a JSON object, got {type(obj).__name__}")
    if opts.data_type == "pretrain":
        if opts.text_key not in obj:
            raise DataFormatError(f"missing key {opts.text_key!r} (set text_key to the field holding the text)")
        return _nonempty_str(obj[opts.text_key], f"{opts.text_key!r}")
    has_messages = opts.messages_key in obj
    has_pair = opts.prompt_key in obj or opts.response_key in obj
    if has_messages and has_pair:
        raise DataFormatError(
            f"record has both {opts.messages_key!r} and {opts.prompt_key!r}/{opts.response_key!r}; keep one"
        )
    if has_messages:
        return {"messages": _check_messages(obj[opts.messages_key], opts.messages_key)}
    for k in (opts.prompt_key, opts.response_key):
        if k not in obj:
            raise DataFormatError(
                f"missing key {k!r}: an SFT record needs {opts.prompt_key!r} and {opts.response_key!r} "
                f"strings, or a {opts.messages_key!r} list"
            )
    prompt = obj[opts.prompt_key]
    if not isinstance(prompt, str):
        raise DataFormatError(f"{opts.prompt_key!r} must be a string, got {type(prompt).__name__}")
    return {"prompt": prompt, "response": _nonempty_str(obj[opts.response_key], f"{opts.response_key!r}")}


# --------------------------------------------------------------------------------------------
# iteration


def iter_records(files: Sequence[str], opts: ReaderOptions, skipped: Dict[str, int]) -> Iterator[Tuple[str, int, object]]:
    """Yield ``(file, line_no, record)``; bad records raise or are counted in ``skipped[file]``.

    ``line_no`` is 1-based (the line of a JSONL file, the row of a parquet file) and 0 for a whole
    plain-text file.
    """
    for path in files:
        if path.endswith(JSONL_SUFFIX):
            yield from _iter_jsonl(path, opts, skipped)
        elif path.endswith(PARQUET_SUFFIX):
            pf = open_parquet(path)
            for rg in range(pf.num_row_groups):
                for row_no, obj in iter_parquet_rows(pf, rg, opts, path=path):
                    try:
                        record = parse_record(obj, opts)
                    except DataFormatError as e:
                        _bad(path, row_no + 1, e, opts, skipped)
                        continue
                    yield path, row_no + 1, record
        else:
            if opts.data_type != "pretrain":
                raise DataFormatError(
                    f"{path}: plain-text files are pretraining documents; SFT data must be JSONL with "
                    f"{opts.prompt_key!r}/{opts.response_key!r} or {opts.messages_key!r}"
                )
            with open(path, "rb") as f:
                raw = f.read()
            try:
                text = _nonempty_str(raw.decode("utf-8"), "file content")
            except (UnicodeDecodeError, DataFormatError) as e:
                _bad(path, 0, e, opts, skipped)
                continue
            yield path, 0, text


def _iter_jsonl(path: str, opts: ReaderOptions, skipped: Dict[str, int]):
    # Binary mode + per-line decode: one undecodable line is one bad line, not a crash of the file.
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue  # blank lines (often a trailing one) carry no record; not an error
            try:
                obj = json.loads(raw.decode("utf-8"))
                record = parse_record(obj, opts)
            except (UnicodeDecodeError, json.JSONDecodeError, DataFormatError) as e:
                _bad(path, line_no, e, opts, skipped)
                continue
            yield path, line_no, record


def open_parquet(path: str):
    """A ``pyarrow.parquet.ParquetFile``; pyarrow is imported here only (an optional dependency)."""
    try:
        import pyarrow.parquet as pq
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"{path}: reading parquet needs pyarrow: pip install 'veomni-dllm[data]'") from e
    return pq.ParquetFile(path)


def parquet_columns(pf, opts: ReaderOptions, path: str = "parquet file") -> List[str]:
    """Only the columns a record can use: a FineWeb shard also holds url, dump, date, ... ."""
    names = pf.schema_arrow.names
    wanted = ([opts.text_key] if opts.data_type == "pretrain"
              else [opts.prompt_key, opts.response_key, opts.messages_key])
    cols = [c for c in wanted if c in names]
    if not cols:
        raise DataFormatError(f"{path}: none of the columns {wanted} is in the parquet schema {names}; "
                              "set text_key (pretrain) or the SFT keys to the column names of the file")
    return cols


def iter_parquet_rows(pf, row_group: int, opts: ReaderOptions, start: int = 0,
                      path: str = "parquet file") -> Iterator[Tuple[int, dict]]:
    """``(row number in the file, row dict)`` of one row group, from its ``start``-th row on."""
    first = sum(pf.metadata.row_group(i).num_rows for i in range(row_group))
    table = pf.read_row_group(row_group, columns=parquet_columns(pf, opts, path))
    for k, obj in enumerate(table.slice(start).to_pylist(), start=start):
        yield first + k, obj


def _bad(path: str, line_no: int, err: Exception, opts: ReaderOptions, skipped: Dict[str, int]) -> None:
    where = f"{path}:{line_no}" if line_no else path
    if not opts.skip_bad_lines:
        raise DataFormatError(
            f"{where}: {type(err).__name__}: {err} (fix the record, or pass skip_bad_lines=True to count and skip it)"
        ) from err
    skipped[path] = skipped.get(path, 0) + 1
    if skipped[path] <= 3:  # a few examples per file; the totals are logged once at the end
        logger.warning("skipping bad record %s: %s: %s", where, type(err).__name__, err)
