"""Packed token shards: the output of scripts/pack_data.py, read by training with random access.

Layout of an output directory:

    manifest.json                  format, version, tokenizer (name + fingerprint), data_type,
                                   max_seq_len, packing, pad/eos ids, the input and its fingerprint,
                                   per-shard counts, totals, `complete`, and `resume` (where the
                                   input continues after the last written shard)
    shard-00000.tokens.npy         int32, the real tokens of the shard's rows back to back
    shard-00000.rows.npy           int64 [rows + 1, 2]: (token offset, piece offset) where each row starts
    shard-00000.pieces.npy         int32 [pieces, 2]: (length, prompt length) of each document piece

Rows are cut by ``pack_stream`` (veomni/data/packing.py) and expanded into the batch tensors by the
same ``build_row`` as every other path. A shard is written under a temporary name and renamed, and
the manifest is replaced after each shard, so an interrupted pack resumes after its last complete
shard and a finished one is left alone (idempotent). The dataset memory-maps the shards: a corpus
far larger than RAM costs only the page cache, and the loader's epoch order, dp sharding and resume
(across dp sizes too) apply unchanged.
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Dict, List, Optional

import numpy as np
import torch

from .packing import build_row
from .sources import MANIFEST
from .tokenization import tokenizer_fingerprint

logger = logging.getLogger(__name__)

FORMAT = "veomni-packed"
VERSION = 1


def shard_name(i: int) -> str:
    return f"shard-{i:05d}"


def read_manifest(path) -> dict:
    path = os.fspath(path)
    with open(os.path.join(path, MANIFEST)) as f:
        man = json.load(f)
    if man.get("format") != FORMAT or man.get("version") != VERSION:
        raise ValueError(f"{path}/{MANIFEST} is not a {FORMAT} v{VERSION} manifest (format={man.get('format')!r}, "
                         f"version={man.get('version')!r}); re-pack with this version's scripts/pack_data.py")
    return man


def _write_atomic_json(path: str, obj) -> None:
    tmp = path + ".partial"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class ShardWriter:
    """Accumulates rows and writes a shard every ``rows_per_shard`` rows (see the module doc)."""

    def __init__(self, out_dir: str, manifest: dict, rows_per_shard: int):
        if rows_per_shard < 1:
            raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
        self.out_dir, self.manifest, self.rows_per_shard = out_dir, manifest, int(rows_per_shard)
        self._tokens: List[np.ndarray] = []
        self._rows: List[tuple] = []
        self._pieces: List[tuple] = []
        self._ntok = 0
        self._resume = None
        self.stats: Dict[str, int] = {}
        self.skipped: Dict[str, int] = {}

    @property
    def pending_rows(self) -> int:
        return len(self._rows)

    @property
    def pending_tokens(self) -> int:
        return self._ntok

    def add(self, pieces, prompt_lens, resume) -> None:
        self._rows.append((self._ntok, len(self._pieces)))
        for j, p in enumerate(pieces):
            self._tokens.append(np.asarray(p, dtype=np.int32))
            self._pieces.append((len(p), 0 if prompt_lens is None else int(prompt_lens[j])))
            self._ntok += len(p)
        self._resume = resume
        if len(self._rows) >= self.rows_per_shard:
            self.flush()

    def flush(self) -> None:
        if not self._rows:
            return
        man = self.manifest
        name = shard_name(len(man["shards"]))
        rows = np.asarray(self._rows + [(self._ntok, len(self._pieces))], dtype=np.int64)
        tokens = np.concatenate(self._tokens) if self._tokens else np.zeros(0, np.int32)
        pieces = np.asarray(self._pieces, dtype=np.int32).reshape(-1, 2)
        for suffix, arr in (("tokens", tokens), ("rows", rows), ("pieces", pieces)):
            final = os.path.join(self.out_dir, f"{name}.{suffix}.npy")
            tmp = final + ".partial.npy"
            np.save(tmp, arr)
            os.replace(tmp, final)
        man["shards"].append({"name": name, "rows": len(self._rows), "tokens": int(self._ntok),
                              "pieces": len(self._pieces)})
        man["rows"] += len(self._rows)
        man["tokens"] += int(self._ntok)
        man["resume"] = self._resume
        man["stats"], man["skipped"] = dict(self.stats), dict(self.skipped)
        _write_atomic_json(os.path.join(self.out_dir, MANIFEST), man)
        self._tokens, self._rows, self._pieces, self._ntok = [], [], [], 0


def pack(source, tokenizer, out_dir, *, max_seq_len: int, packing: bool = True, rows_per_shard: int = 8192,
         overwrite: bool = False, use_chat_template: bool = True, progress: bool = True) -> dict:
    """Tokenize + pack one source (veomni/data/sources.py object) into ``out_dir``; returns the manifest.

    Resumable and idempotent: re-running the same command continues an interrupted pack or does
    nothing for a finished one; different inputs or options in an existing directory are an error
    unless ``overwrite``.
    """
    from .streaming import StreamingRows

    out_dir = os.fspath(out_dir)
    opts = source.opts
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows_ds = StreamingRows([source], tokenizer, opts, max_seq_len, packing=packing, pad_token_id=pad,
                            shuffle=False, epochs=1, use_chat_template=use_chat_template)
    settings = {"format": FORMAT, "version": VERSION, "data_type": opts.data_type, "max_seq_len": int(max_seq_len),
                "packing": bool(packing), "pad_token_id": int(pad), "eos_token_id": int(rows_ds.eos),
                "tokenizer": {"name": getattr(tokenizer, "name_or_path", ""),
                              "fingerprint": tokenizer_fingerprint(tokenizer)},
                "use_chat_template": bool(use_chat_template), "reader_options": dict(opts.__dict__),
                "input": str(source.spec), "input_fingerprint": source.fingerprint(),
                "rows_per_shard": int(rows_per_shard)}
    settings["reader_options"]["text_suffixes"] = list(opts.text_suffixes)
    os.makedirs(out_dir, exist_ok=True)
    man_path = os.path.join(out_dir, MANIFEST)
    man = None
    if os.path.isfile(man_path) and not overwrite:
        old = read_manifest(out_dir)
        differ = [k for k in settings if old.get(k) != settings[k]]
        if differ:
            raise ValueError(f"{out_dir} already holds shards packed with other {', '.join(differ)} (inputs "
                             "changed, or other options); use another output directory or --overwrite")
        man = old
    if man is None:  # a fresh pack: clear what an earlier one left
        for f in os.listdir(out_dir):
            if f.startswith("shard-") or f.startswith(MANIFEST):
                os.remove(os.path.join(out_dir, f))
        man = dict(settings, shards=[], rows=0, tokens=0, complete=False, resume=None, stats={}, skipped={})
        _write_atomic_json(man_path, man)
    if man["complete"]:
        logger.info("%s is already complete (%d rows, %d tokens): nothing to do", out_dir, man["rows"], man["tokens"])
        return man
    if man["resume"] is not None:
        rows_ds.load_state_dict(man["resume"])
        logger.info("resuming the pack of %s after shard %d (%d rows written)", out_dir, len(man["shards"]) - 1,
                    man["rows"])
    writer = ShardWriter(out_dir, man, rows_per_shard)
    rows_ds.stats.update(man.get("stats", {}))  # counts of the shards already written
    rows_ds.skipped.update(man.get("skipped", {}))
    writer.stats, writer.skipped = rows_ds.stats, rows_ds.skipped
    progress_of = _byte_progress(source, rows_ds)
    bar = None
    if progress:
        from tqdm import tqdm

        total = progress_of(None)[1]
        bar = tqdm(desc="pack", total=total, unit="B", unit_scale=True, dynamic_ncols=True,
                   initial=progress_of(man["resume"])[0] if total else 0)
    t0, n0 = time.perf_counter(), man["tokens"]
    for i, (pieces, prompt_lens) in enumerate(rows_ds.iter_pieces()):
        state = rows_ds.state_dict()
        writer.add(pieces, prompt_lens, state)
        if bar is not None and i % 256 == 0:
            done = progress_of(state)[0]
            if bar.total:
                bar.update(done - bar.n)
            rate = (man["tokens"] + writer.pending_tokens - n0) / max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix(tok_s=f"{rate:.0f}", rows=man["rows"] + writer.pending_rows)
    writer.flush()
    man["complete"] = True
    _write_atomic_json(man_path, man)
    if bar is not None:
        bar.close()
    dt = time.perf_counter() - t0
    logger.info("packed %s: %d rows, %d tokens in %d shards (%.0f tok/s)", out_dir, man["rows"], man["tokens"],
                len(man["shards"]), (man["tokens"] - n0) / max(dt, 1e-9))
    return man


def _byte_progress(source, rows_ds):
    """f(state) -> (input bytes before the state's position, total input bytes); (0, None) when the
    source cannot say (hf: streams)."""
    if not hasattr(source, "unit_bytes"):
        return lambda state: (0, None)
    units = rows_ds.stream_units(0, 0, 0)
    sizes = [source.unit_bytes(u)[0] for u in units]
    before = np.concatenate([[0], np.cumsum(sizes)]).tolist()

    def progress(state):
        if not state:
            return 0, before[-1]
        st = state["sources"][0]
        if st["epoch"] > 0 or st["unit"] >= len(units):
            return before[-1], before[-1]
        return before[st["unit"]] + source.unit_bytes(units[st["unit"]], st["pos"])[1], before[-1]

    return progress


class PackedShardDataset:
    """Map-style rows over a packed directory, memory-mapped and opened lazily in each process."""

    def __init__(self, path, max_seq_len: Optional[int] = None, tokenizer=None, data_type: Optional[str] = None,
                 packing: Optional[bool] = None):
        self.path = os.fspath(path)
        man = read_manifest(self.path)
        if not man.get("complete"):
            raise ValueError(f"{self.path}: packing did not finish (manifest complete=false); re-run the same "
                             "scripts/pack_data.py command to resume it")
        checks = [("max_seq_len", max_seq_len), ("data_type", data_type), ("packing", packing)]
        for key, want in checks:
            if want is not None and man[key] != want:
                raise ValueError(f"{self.path} was packed with {key}={man[key]!r} but training asks for {want!r}; "
                                 f"set data.{key}={man[key]!r} or re-pack with scripts/pack_data.py")
        if tokenizer is not None and tokenizer_fingerprint(tokenizer) != man["tokenizer"]["fingerprint"]:
            raise ValueError(f"{self.path} was tokenized with another tokenizer ({man['tokenizer']['name']!r}) than the "
                             f"model's ({getattr(tokenizer, 'name_or_path', '')!r}); re-pack it with the model's tokenizer")
        self.manifest = man
        self.max_seq_len = int(man["max_seq_len"])
        self.data_type = man["data_type"]
        self.packing = bool(man["packing"])
        self.pad_token_id = int(man["pad_token_id"])
        self.num_tokens = int(man["tokens"])
        self.shard_names = [s["name"] for s in man["shards"]]
        self._starts = np.zeros(len(man["shards"]) + 1, dtype=np.int64)
        np.cumsum([s["rows"] for s in man["shards"]], out=self._starts[1:])
        self._open: Dict[int, tuple] = {}
        stats = man.get("stats", {})
        self.dropped, self.truncated = stats.get("dropped", 0), stats.get("truncated", 0)
        self.skipped = dict(man.get("skipped", {}))
        if len(self) == 0:
            raise ValueError(f"{self.path} holds no row")

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getstate__(self):
        # Workers map the files themselves (a pickled memmap would copy the shard into each worker).
        return {k: ({} if k == "_open" else v) for k, v in self.__dict__.items()}

    def _shard(self, s: int):
        if s not in self._open:
            base = os.path.join(self.path, self.shard_names[s])
            self._open[s] = tuple(np.load(f"{base}.{x}.npy", mmap_mode="r") for x in ("tokens", "rows", "pieces"))
        return self._open[s]

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(f"row {i} out of range [0, {len(self)})")
        s = int(np.searchsorted(self._starts, i, side="right")) - 1
        tokens, rows, pieces = self._shard(s)
        j = i - int(self._starts[s])
        (t0, p0), (_, p1) = rows[j], rows[j + 1]
        lens = pieces[p0:p1, 0]
        out, at = [], int(t0)
        for n in lens.tolist():
            out.append(tokens[at:at + n])
            at += n
        prompt = None if self.data_type == "pretrain" else pieces[p0:p1, 1].tolist()
        return build_row(out, prompt, self.max_seq_len, self.pad_token_id)

    def pad_row(self) -> Dict[str, torch.Tensor]:
        return build_row([], None, self.max_seq_len, self.pad_token_id)

    def __repr__(self) -> str:
        return (f"PackedShardDataset({self.path}, {self.data_type}, rows={len(self)}, tokens={self.num_tokens}, "
                f"max_seq_len={self.max_seq_len}, shards={len(self.shard_names)})")
