"""Streaming training rows for corpora larger than memory: read, tokenize and pack on the fly.

Streams. Every data-parallel rank runs ``num_workers`` DataLoader workers (one stream in the main
process when it is 0), so there are ``S = dp_size * max(num_workers, 1)`` streams; stream
``dp_rank * W + worker`` feeds that rank. Each source (veomni/data/sources.py) is cut into units;
in epoch ``e`` of a source, stream s reads units ``perm[s::S]`` of the permutation drawn from
``(seed, source, e)`` (identity with shuffle off), one after another, and then goes on to epoch
e + 1 by itself: streams never run dry, so ranks never disagree on the number of steps. A training
run with streaming data therefore has no epoch length and needs ``train.max_steps``.

Rows. A stream tokenizes its documents (batched tokenizer calls) and packs them with
``pack_stream`` (veomni/data/packing.py); with several sources the source of each row is drawn
with the mixture weights from ``(seed, stream, row)``, and each source keeps its own packer.

State. After every row a stream knows, per source, where its next row starts: (epoch, index of
the unit in its list, position of the document in the unit, tokens of that document already
used). That small JSON dict is the stream's ``state_dict()``; torchdata's StatefulDataLoader
collects it from the workers with every batch (``snapshot_every_n_steps=1``), so the loader state
counts exactly the batches handed to the trainer, not the ones prefetched. Resuming re-reads from
those positions (a JSONL seek, a parquet row group, ``skip`` in a ``datasets`` shard): nothing is
replayed. The layout depends on S, so a resume needs the same dp size, num_workers and
micro-batch size (checked); packed shards (veomni/data/shards.py) have no such limit.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from .mixture import normalise_weights
from .packing import build_row, collate, collate_stacked, pack_stream, unstack
from .readers import ReaderOptions
from .tokenization import check_tokenizer, encode_records

logger = logging.getLogger(__name__)

_TOKENIZE_BATCH = 64  # records per tokenizer call in a stream
_PICK_BLOCK = 4096  # mixture picks drawn per RNG call


class StreamingRows(torch.utils.data.IterableDataset):
    """Rows (dicts of 1-D tensors, ``BATCH_KEYS``) of one stream; stateful, see the module doc."""

    def __init__(self, sources: Sequence, tokenizer, opts: ReaderOptions, max_seq_len: int, packing: bool = True,
                 pad_token_id: Optional[int] = None, weights: Optional[Sequence[float]] = None, seed: int = 0,
                 dp_rank: int = 0, dp_size: int = 1, num_workers: int = 0, shuffle: bool = True,
                 epochs: Optional[int] = None, use_chat_template: bool = True):
        super().__init__()
        if not sources:
            raise ValueError("StreamingRows needs at least one source")
        self.sources = list(sources)
        self.weights = normalise_weights(weights, len(self.sources))
        self.tokenizer = tokenizer
        self.opts = opts
        self.use_chat_template = bool(use_chat_template)
        self.eos = check_tokenizer(tokenizer, opts.data_type, use_chat_template)
        self.max_seq_len = int(max_seq_len)
        self.packing = bool(packing)
        self.pad_token_id = int(self.eos if pad_token_id is None else pad_token_id)
        self.seed, self.shuffle, self.epochs = int(seed), bool(shuffle), epochs
        self.dp_rank, self.dp_size, self.num_workers = int(dp_rank), int(dp_size), int(num_workers)
        self.num_streams = self.dp_size * max(self.num_workers, 1)
        self.units = [src.units(self.num_streams) for src in self.sources]
        for src, units in zip(self.sources, self.units):
            if len(units) < self.num_streams:
                raise ValueError(
                    f"data source {src.spec!r} has {len(units)} unit(s) (JSONL byte ranges, parquet row groups, "
                    f"text files or datasets shards) for {self.num_streams} streams (dp_size {self.dp_size} x "
                    f"num_workers {max(self.num_workers, 1)}): every stream needs one. Use fewer data.num_workers, "
                    "split the data into more files / row groups, or pack it (scripts/pack_data.py).")
        payload = [[s.fingerprint() for s in self.sources], self.units, self.weights, self.seed, self.shuffle,
                   self.max_seq_len, self.packing, opts.data_type, self.num_streams]
        self.fingerprint = hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:16]
        self._resume: Optional[dict] = None
        self._state: Optional[dict] = None
        self._picks = (-1, None)
        self.stats: Dict[str, int] = {}  # SFT examples dropped / truncated by the packer
        self.skipped: Dict[str, int] = {}  # bad records skipped per source file (skip_bad_lines)

    # ------------------------------------------------------------------ streams
    def stream_id(self) -> int:
        info = torch.utils.data.get_worker_info()
        if info is None:
            worker, workers = 0, 0
        else:
            worker, workers = info.id, info.num_workers
        if workers != self.num_workers:
            raise RuntimeError(f"StreamingRows was built for num_workers={self.num_workers} but runs in a DataLoader "
                               f"with {workers}; build it with the loader's num_workers")
        return self.dp_rank * max(self.num_workers, 1) + worker

    def stream_units(self, source: int, epoch: int, stream: int) -> list:
        units = self.units[source]
        order = (np.random.default_rng([self.seed, source, epoch, 0x756E6974]).permutation(len(units))
                 if self.shuffle else np.arange(len(units)))
        return [units[int(j)] for j in order[stream::self.num_streams]]

    def _pick(self, stream: int, row: int) -> int:
        if len(self.sources) == 1:
            return 0
        block = row // _PICK_BLOCK
        if self._picks[0] != block:
            rng = np.random.default_rng([self.seed, stream, block, 0x6D6978])
            self._picks = (block, rng.choice(len(self.sources), size=_PICK_BLOCK, p=self.weights))
        return int(self._picks[1][row % _PICK_BLOCK])

    # ------------------------------------------------------------------ state
    def initial_state(self, stream: int) -> dict:
        return {"stream": stream, "row": 0, "fingerprint": self.fingerprint,
                "sources": [{"epoch": 0, "unit": 0, "pos": None, "consumed": 0} for _ in self.sources]}

    def state_dict(self) -> dict:
        if self._state is not None:
            return json.loads(json.dumps(self._state))
        if self._resume is not None:
            return json.loads(json.dumps(self._resume))
        return self.initial_state(self.stream_id())

    def load_state_dict(self, state: dict) -> None:
        if state.get("fingerprint") != self.fingerprint:
            raise ValueError(
                "the streaming data state was saved for other data or settings (files, weights, seed, max_seq_len, "
                "packing, data_type or number of streams changed); resume with the same data and settings")
        self._resume, self._state = dict(state), None

    def reset(self) -> None:
        """Forget any loaded or live position: the next iteration starts at the beginning."""
        self._resume = self._state = None

    # ------------------------------------------------------------------ rows
    def __iter__(self):
        for pieces, prompt_lens in self.iter_pieces():
            yield build_row(pieces, prompt_lens, self.max_seq_len, self.pad_token_id)

    def iter_pieces(self):
        """``(pieces, prompt_lens)`` of each row (scripts/pack_data.py stores these as they are)."""
        stream = self.stream_id()
        state = self._resume if self._resume is not None else self.initial_state(stream)
        if state["stream"] != stream:
            raise ValueError(f"state of stream {state['stream']} loaded into stream {stream} (dp_rank or worker "
                             "assignment changed); resume with the same dp size and data.num_workers")
        state = json.loads(json.dumps(state))
        rows = [self._source_rows(k, stream, st) for k, st in enumerate(state["sources"])]
        while True:
            k = self._pick(stream, state["row"])
            try:
                pieces, prompt_lens, src_state = next(rows[k])
            except StopIteration:  # finite passes only (epochs set)
                return
            state["sources"][k] = src_state
            state["row"] += 1
            # Recorded before the yield: a state_dict() taken once this row is consumed must count it.
            self._state = state
            yield pieces, prompt_lens
            state = dict(state, sources=list(state["sources"]))

    def _source_rows(self, k: int, stream: int, st: dict):
        for pieces, prompt_lens, (key, consumed) in pack_stream(
                self._docs(k, stream, st), self.max_seq_len, self.opts.data_type, self.packing, self.stats,
                flush=self.epochs is not None):
            epoch, unit, pos = key
            yield pieces, prompt_lens, {"epoch": epoch, "unit": unit, "pos": pos, "consumed": consumed}

    def _docs(self, k: int, stream: int, st: dict):
        """``((epoch, unit, pos), ids, prompt_len, consumed)`` of source k's documents, from ``st`` on."""
        src = self.sources[k]
        epoch, unit, pos, consumed = st["epoch"], st["unit"], st["pos"], st["consumed"]
        skipped = self.skipped
        while self.epochs is None or epoch < self.epochs:
            units = self.stream_units(k, epoch, stream)
            whole_epoch, found = unit == 0 and pos is None, 0
            while unit < len(units):
                batch = []
                for p, record, where in src.read(units[unit], pos, skipped):
                    if consumed and pos is not None and p == pos and consumed == -1:
                        continue  # the document the saved state had used up entirely
                    batch.append(((epoch, unit, p), record, where))
                    if len(batch) >= _TOKENIZE_BATCH:
                        yield from self._encode(batch, pos, consumed)
                        found += len(batch)
                        batch = []
                if batch:
                    yield from self._encode(batch, pos, consumed)
                    found += len(batch)
                unit, pos, consumed = unit + 1, None, 0
            if whole_epoch and not found:
                raise ValueError(f"stream {stream} found no valid record in its {len(units)} unit(s) of data "
                                 f"source {src.spec!r} (epoch {epoch}): the source is too small for "
                                 f"{self.num_streams} streams, or all its records were skipped")
            epoch, unit = epoch + 1, 0

    def _encode(self, batch, resume_pos, consumed):
        encoded = encode_records([r for _, r, _ in batch], [w for _, _, w in batch], self.tokenizer,
                                 self.opts.data_type, self.use_chat_template, self.eos)
        for (key, _, _), (ids, plen) in zip(batch, encoded):
            base = consumed if (consumed > 0 and key[2] == resume_pos) else 0
            yield key, np.asarray(ids[base:], dtype=np.int64), plen, base


class StreamingLoader:
    """This rank's micro-batches from ``StreamingRows`` through torchdata's StatefulDataLoader.

    Same interface as the in-memory ``StatefulLoader`` (iterate, break, iterate again to continue;
    ``state_dict`` / ``load_state_dict``; ``global_batch_size``), except that it is endless and has
    no ``len``. ``state_dict()`` holds every rank's stream states, gathered with ``gather`` (e.g.
    ``ParallelState.all_gather_object``), so with several ranks it is a collective call: every rank
    must call it (the trainer does, in save()).
    """

    streaming = True

    def __init__(self, dataset: StreamingRows, micro_batch_size: int, num_workers: int = 0,
                 prefetch_factor: int = 2, gather=None):
        if int(micro_batch_size) < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        if dataset.epochs is not None:
            raise ValueError("StreamingLoader needs endless streams (epochs=None)")
        self.dataset = dataset
        self.micro_batch_size = int(micro_batch_size)
        self.num_workers = int(num_workers)
        if self.num_workers != dataset.num_workers:
            raise ValueError(f"loader num_workers={num_workers} but the dataset was built for {dataset.num_workers}")
        self.prefetch_factor = int(prefetch_factor)
        self.dp_rank, self.dp_size, self.seed = dataset.dp_rank, dataset.dp_size, dataset.seed
        self.gather = gather
        self._sdl = None
        self._it = None
        self._pending: dict = {}
        if self.num_workers:
            # Workers tokenize; a tokenizer that already ran threads in the parent prints a warning
            # in every forked worker and turns its own parallelism off anyway.
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.dp_size

    def __len__(self) -> int:
        raise TypeError("a streaming loader has no length (it reads until train.max_steps); set train.max_steps")

    def _build(self):
        from .loader import stateful_dataloader

        kwargs = dict(batch_size=self.micro_batch_size, collate_fn=collate_stacked if self.num_workers else collate,
                      num_workers=self.num_workers,
                      snapshot_every_n_steps=1,
                      # A private generator: the base seed drawn per iterator must not consume the
                      # global torch RNG, or a resumed run's RNG stream would differ from a straight one.
                      generator=torch.Generator().manual_seed(self.seed))
        if self.num_workers:
            kwargs["prefetch_factor"] = self.prefetch_factor
        return stateful_dataloader(self.dataset, **kwargs)

    def __iter__(self):
        if self._it is None:
            # The dataset object (iterated here with 0 workers, copied into forked workers) must not
            # carry the position of an earlier iterator: StatefulDataLoader only calls
            # load_state_dict when there is a state to load.
            self.dataset.reset()
            self._sdl = self._build()
            if self._pending:
                self._sdl.load_state_dict(self._pending)
            self._it = iter(self._sdl)
        while True:
            batch = next(self._it)
            yield unstack(batch) if self.num_workers else batch

    def _local_state(self) -> dict:
        return self._sdl.state_dict() if self._it is not None else self._pending

    @property
    def epoch(self) -> int:
        """Smallest epoch any of this rank's streams is in (for logs)."""
        states = _dataset_states(self._local_state())
        epochs = [s["epoch"] for st in states for s in st["sources"]]
        return min(epochs) if epochs else 0

    def state_dict(self) -> dict:
        mine = {"dp_rank": self.dp_rank, "loader": self._local_state()}
        ranks: Dict[str, dict] = {}
        for item in (self.gather(mine) if self.gather is not None else [mine]):
            key = str(item["dp_rank"])
            # Sequence-parallel peers share a dp rank and read the same rows: keep one copy.
            ranks.setdefault(key, item["loader"])
        if len(ranks) != self.dp_size:
            raise RuntimeError(f"gathered loader states of dp ranks {sorted(ranks)} but dp_size is {self.dp_size}")
        return {"kind": "streaming", "dp_size": self.dp_size, "num_workers": self.num_workers,
                "micro_batch_size": self.micro_batch_size, "seed": self.seed,
                "fingerprint": self.dataset.fingerprint, "ranks": ranks}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "streaming":
            raise ValueError("the checkpoint's loader state is not a streaming one (it was saved with "
                             "data.streaming=false); resume with the same data settings")
        for k in ("dp_size", "num_workers", "micro_batch_size", "seed"):
            if int(state[k]) != int(getattr(self, k)):
                raise ValueError(
                    f"streaming loader state has {k}={state[k]} but this run has {k}={getattr(self, k)}: streaming "
                    "data resumes exactly only with the same dp size, data.num_workers, micro_batch_size and seed "
                    "(packed shards from scripts/pack_data.py resume on any)")
        if state["fingerprint"] != self.dataset.fingerprint:
            raise ValueError("the streaming loader state was saved for other data or settings (files, weights, "
                             "max_seq_len, packing or data_type changed); resume with the same data and settings")
        self._pending = state["ranks"][str(self.dp_rank)]
        self._sdl = self._it = None

    def set_epoch(self, epoch: int) -> None:
        """Only ``set_epoch(0)``: back to the very beginning of every stream."""
        if int(epoch) != 0:
            raise ValueError("a streaming loader can only restart from the beginning (set_epoch(0))")
        self._pending, self._sdl, self._it = {}, None, None


def _dataset_states(sdl_state: dict) -> List[dict]:
    """Our per-stream states inside a StatefulDataLoader state (single- or multi-process layout)."""
    if not sdl_state:
        return []
    if "_snapshot" in sdl_state:
        workers = sdl_state["_snapshot"].get("_worker_snapshots", {})
        return [w["dataset_state"] for w in workers.values() if w and w.get("dataset_state")]
    return [sdl_state["dataset_state"]] if sdl_state.get("dataset_state") else []
