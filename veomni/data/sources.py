"""Where records come from when the corpus is read lazily (streaming) or packed offline.

A data source string (``data.train_path`` or one entry of ``data.sources``) is one of
  * local files: a file, a directory or a glob of ``.jsonl`` / ``.parquet`` / plain-text files
    (resolved as in readers.py);
  * ``hf:<path>[?name=..&split=..&data_files=..&data_dir=..&revision=..]``: a Hugging Face
    ``datasets`` dataset opened with ``load_dataset(path, ..., streaming=True)``; ``path`` is a hub
    repo id (``hf:HuggingFaceFW/fineweb?name=sample-10BT``), a local dataset directory, or a packaged
    builder with ``data_files`` (``hf:json?data_files=/data/*.jsonl``); split defaults to train;
  * a directory written by scripts/pack_data.py (it holds ``manifest.json``): token rows, read by
    veomni/data/shards.py, not here.

A source is cut into *units*, the pieces handed to the reading streams (one stream per
data-parallel rank and DataLoader worker): a byte range of a JSONL file (lines that *start* in the
range), a row group of a parquet file, a whole text file, a shard of a ``datasets`` dataset. Inside
a unit a record has a *position* to resume from: the byte offset of its line, its row in the row
group, its example index in the shard. No torch import here.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from typing import Iterator, List, Optional, Tuple
from urllib.parse import parse_qsl

from .readers import (JSONL_SUFFIX, PARQUET_SUFFIX, DataFormatError, ReaderOptions, _nonempty_str,
                      iter_parquet_rows, open_parquet, parse_record, resolve_files)

logger = logging.getLogger(__name__)

HF_PREFIX = "hf:"
HF_KEYS = ("name", "split", "data_files", "data_dir", "revision")
MANIFEST = "manifest.json"
# Bounds on a JSONL unit: big enough that seeking is rare, small enough that every stream gets a
# few units of a modest corpus (a stream with no unit would have nothing to read).
MIN_UNIT_BYTES, MAX_UNIT_BYTES, UNITS_PER_STREAM = 4096, 128 << 20, 4

Unit = Tuple  # JSON-able tuple, first item the kind: ("jsonl", file, start, end), ("parquet", file, row_group),
#               ("text", file), ("hf", shard)


def is_packed_dir(spec) -> bool:
    """True for a directory written by scripts/pack_data.py."""
    return isinstance(spec, (str, os.PathLike)) and os.path.isfile(os.path.join(os.fspath(spec), MANIFEST))


def is_hf_spec(spec) -> bool:
    return isinstance(spec, str) and spec.startswith(HF_PREFIX)


@dataclass(frozen=True)
class HFSpec:
    path: str
    name: Optional[str] = None
    split: str = "train"
    data_files: Optional[str] = None
    data_dir: Optional[str] = None
    revision: Optional[str] = None


def parse_hf_spec(spec: str) -> HFSpec:
    """``hf:path?key=value&...`` -> HFSpec; an unknown key is an error that lists the known ones."""
    body = spec[len(HF_PREFIX):]
    path, _, query = body.partition("?")
    if not path:
        raise ValueError(f"data source {spec!r}: give a dataset after 'hf:', e.g. hf:HuggingFaceFW/fineweb?name=sample-10BT")
    kwargs = {}
    for key, value in parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)):
        if key not in HF_KEYS:
            raise ValueError(f"data source {spec!r}: unknown option {key!r}; known: {', '.join(HF_KEYS)}")
        kwargs[key] = value
    return HFSpec(path=path, **kwargs)


class FileSource:
    """Local JSONL / parquet / plain-text files, read lazily unit by unit."""

    def __init__(self, spec, opts: ReaderOptions):
        self.spec = spec
        self.opts = opts
        self.files = resolve_files(spec, opts.text_suffixes)

    def fingerprint(self) -> str:
        """Changes when a file is added, removed or edited: a saved position would then be wrong."""
        stats = [[f, os.stat(f).st_size, os.stat(f).st_mtime_ns] for f in self.files]
        return hashlib.sha256(json.dumps(stats).encode()).hexdigest()[:16]

    def units(self, num_streams: int) -> List[Unit]:
        jsonl_bytes = sum(os.path.getsize(f) for f in self.files if f.endswith(JSONL_SUFFIX))
        step = max(MIN_UNIT_BYTES, min(MAX_UNIT_BYTES, -(-jsonl_bytes // (UNITS_PER_STREAM * max(1, num_streams)))))
        out: List[Unit] = []
        for i, f in enumerate(self.files):
            if f.endswith(JSONL_SUFFIX):
                size = os.path.getsize(f)
                out.extend(("jsonl", i, a, min(a + step, size)) for a in range(0, size, step))
            elif f.endswith(PARQUET_SUFFIX):
                out.extend(("parquet", i, rg) for rg in range(open_parquet(f).num_row_groups))
            else:
                out.append(("text", i))
        return out

    def unit_bytes(self, unit: Unit, pos=None) -> Tuple[int, int]:
        """(bytes of the unit, bytes of it before position ``pos``): progress bars and their ETA."""
        path = self.files[unit[1]]
        if unit[0] == "jsonl":
            return unit[3] - unit[2], (0 if pos is None else max(0, pos - unit[2]))
        if unit[0] == "parquet":
            pf = open_parquet(path)
            size = os.path.getsize(path) // max(1, pf.num_row_groups)
            rows = pf.metadata.row_group(unit[2]).num_rows
            return size, (0 if pos is None else size * pos // max(1, rows))
        return os.path.getsize(path), 0

    def read(self, unit: Unit, start=None, skipped=None) -> Iterator[Tuple[object, object, str]]:
        """``(position, record, where)`` of the unit's valid records, from position ``start`` on."""
        kind, path = unit[0], self.files[unit[1]]
        if kind == "jsonl":
            yield from self._read_jsonl(path, unit[2], unit[3], start, skipped)
        elif kind == "parquet":
            pf = open_parquet(path)
            first = _rg_first(pf, unit[2])
            for row, obj in iter_parquet_rows(pf, unit[2], self.opts, start or 0, path=path):
                where = f"{path} (row {row + 1})"
                record = self._parse(obj, where, path, skipped)
                if record is not None:
                    yield row - first, record, where  # position: row inside the row group
        else:
            if self.opts.data_type != "pretrain":
                raise DataFormatError(f"{path}: plain-text files are pretraining documents; SFT data must be JSONL or parquet")
            with open(path, "rb") as f:
                raw = f.read()
            try:
                yield 0, _nonempty_str(raw.decode("utf-8"), "file content"), path
            except (UnicodeDecodeError, DataFormatError) as e:
                self._bad(path, path, e, skipped)

    def _read_jsonl(self, path, a, b, start, skipped):
        with open(path, "rb") as f:
            if start is not None:
                f.seek(start)
            elif a > 0:
                # A unit owns the lines that start inside [a, b): skip the tail of the line that
                # began in the previous unit (reading from a-1 keeps a line starting exactly at a).
                f.seek(a - 1)
                f.readline()
            while True:
                pos = f.tell()
                if pos >= b:
                    return
                raw = f.readline()
                if not raw:
                    return
                if not raw.strip():
                    continue
                where = f"{path} (byte {pos})"
                try:
                    obj = json.loads(raw.decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError) as e:
                    self._bad(where, path, e, skipped)
                    continue
                record = self._parse(obj, where, path, skipped)
                if record is not None:
                    yield pos, record, where

    def _parse(self, obj, where, path, skipped):
        try:
            return parse_record(obj, self.opts)
        except DataFormatError as e:
            self._bad(where, path, e, skipped)
            return None

    def _bad(self, where, path, err, skipped):
        if not self.opts.skip_bad_lines:
            raise DataFormatError(f"{where}: {type(err).__name__}: {err} (fix the record, or set "
                                  "skip_bad_lines to count and skip it)") from err
        if skipped is not None:
            skipped[path] = skipped.get(path, 0) + 1
            if skipped[path] <= 3:
                logger.warning("skipping bad record %s: %s: %s", where, type(err).__name__, err)


def _rg_first(pf, row_group: int) -> int:
    return sum(pf.metadata.row_group(i).num_rows for i in range(row_group))


class HFSource:
    """A ``datasets`` dataset opened in streaming mode; its shards are the units."""

    def __init__(self, spec: str, opts: ReaderOptions):
        self.spec = spec
        self.opts = opts
        self.hf = parse_hf_spec(spec)
        self._ds = None
        ds = self.dataset()
        self.num_shards = int(getattr(ds, "num_shards", None) or ds.n_shards)  # n_shards before datasets 3

    def dataset(self):
        if self._ds is None:
            try:
                import datasets
            except ImportError as e:
                raise ImportError(f"data source {self.spec!r} needs the `datasets` package: "
                                  "pip install 'veomni-dllm[data]'") from e
            h = self.hf
            try:
                self._ds = datasets.load_dataset(h.path, name=h.name, split=h.split, data_files=h.data_files,
                                                 data_dir=h.data_dir, revision=h.revision, streaming=True)
            except (ConnectionError, OSError) as e:
                raise ConnectionError(
                    f"data source {self.spec!r}: could not open {h.path!r} with datasets.load_dataset ({e}). "
                    "Without access to the Hugging Face Hub, download it where there is access "
                    "(python scripts/download_data.py --repo_id ... --local_dir DIR) and train on DIR, or "
                    "point hf: at a local directory / data_files.") from e
            if not hasattr(self._ds, "shard"):
                raise ValueError(f"data source {self.spec!r}: expected one split (got {type(self._ds).__name__}); "
                                 "add ?split=train")
        return self._ds

    def __getstate__(self):
        # The opened dataset pickles fine, but is cheap to reopen and may hold file handles.
        return {k: (None if k == "_ds" else v) for k, v in self.__dict__.items()}

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps([self.spec, self.num_shards]).encode()).hexdigest()[:16]

    def units(self, num_streams: int) -> List[Unit]:
        return [("hf", i) for i in range(self.num_shards)]

    def read(self, unit: Unit, start=None, skipped=None):
        shard = self.dataset().shard(num_shards=self.num_shards, index=unit[1], contiguous=True)
        first = int(start or 0)
        if first:
            shard = shard.skip(first)  # datasets reads past them without handing them over
        # iter(batch_size) rather than `for obj in shard`: inside a DataLoader worker, datasets'
        # __iter__ splits the dataset again by worker id, so worker 1 of a one-shard unit got
        # nothing (we already hand each stream its own shards).
        rows = (dict(zip(b, vals)) for b in shard.iter(batch_size=64) for vals in zip(*b.values()))
        for k, obj in enumerate(rows, start=first):
            where = f"{self.spec} (shard {unit[1]}, example {k})"
            try:
                record = parse_record(obj, self.opts)
            except DataFormatError as e:
                if not self.opts.skip_bad_lines:
                    raise DataFormatError(f"{where}: {e} (fix the record, or set skip_bad_lines)") from e
                if skipped is not None:
                    skipped[self.spec] = skipped.get(self.spec, 0) + 1
                continue
            yield k, record, where


def open_source(spec, opts: ReaderOptions):
    """FileSource or HFSource for a data source string (packed dirs are not record sources)."""
    if is_packed_dir(spec):
        raise ValueError(f"{spec} holds packed token shards (manifest.json): they are read with random access, "
                         "so use them with data.streaming=false")
    if is_hf_spec(spec):
        return HFSource(spec, opts)
    return FileSource(spec, opts)

