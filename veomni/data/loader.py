"""Dataset construction and the stateful, data-parallel-sharded loaders (docs/data.md).

In-memory / packed data (``StatefulLoader``). Order of rows in an epoch: ``permutation(num_rows)``
from ``np.random.default_rng([seed, epoch])`` (identity with shuffle=False; a ``MixtureDataset``
supplies its own ``epoch_order``). The order does not depend on dp_size, so a "global batch" is
simply the next ``micro_batch_size * dp_size`` rows of that order and rank r takes its contiguous
slice ``[r * micro_batch_size, (r + 1) * micro_batch_size)`` of it. The state is (epoch, position)
with position = rows of the order already consumed by all ranks together; resuming with another
dp_size, micro_batch_size or num_workers continues from the same row of the same order.
torchdata's StatefulDataLoader does the work: ``num_workers`` processes fetch and collate the
rows of the index batches this rank's sampler hands out. The position advances only when a batch
reaches the caller, so batches prefetched by the workers never count.

Streaming data (``StreamingLoader``, veomni/data/streaming.py): read, tokenized and packed by the
workers on the fly; see that module for its order and state.
"""
from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .mixture import MixtureDataset
from .packing import PackedDataset, collate, collate_stacked, unstack
from .readers import DEFAULT_TEXT_SUFFIXES, PathLike, ReaderOptions, resolve_files
from .sources import is_hf_spec, is_packed_dir
from .tokenization import tokenize_files

if TYPE_CHECKING:
    from .shards import PackedShardDataset

logger = logging.getLogger(__name__)


def build_dataset(
    paths: Union[PathLike, Sequence[PathLike]],
    tokenizer,
    data_type: str = "pretrain",
    max_seq_len: int = 2048,
    packing: bool = True,
    cache_dir: Optional[PathLike] = None,
    text_key: str = "text",
    skip_bad_lines: bool = False,
    *,
    prompt_key: str = "prompt",
    response_key: str = "response",
    messages_key: str = "messages",
    text_suffixes: Sequence[str] = DEFAULT_TEXT_SUFFIXES,
    use_chat_template: bool = True,
    pad_response_with_eos: bool = False,
) -> "PackedDataset | PackedShardDataset":
    """Read + tokenize (or load from ``cache_dir``) + lay out rows. See docs/data.md.

    Padding uses ``tokenizer.pad_token_id``, or ``eos_token_id`` when the tokenizer has no pad token.
    With several ranks, let one rank build the cache first (then barrier) to avoid tokenizing the
    corpus on every rank; concurrent builds are safe, only wasteful. A directory written by
    scripts/pack_data.py is opened as it is (``PackedShardDataset``), after checking that it was
    packed with this tokenizer, data_type, max_seq_len and packing.
    ``pad_response_with_eos``: SFT with packing=False only; each row's tail after its example is EOS
    that the loss scores (the response canvas, veomni/data/packing.py).
    """
    single = paths if isinstance(paths, (str, os.PathLike)) else (paths[0] if len(paths) == 1 else None)
    if pad_response_with_eos and single is not None and (is_packed_dir(single) or is_hf_spec(single)):
        raise ValueError(f"data.pad_response_with_eos applies to files tokenized here, not to {single!r} "
                         "(packed shards / hf: streams); point data.train_path at the .jsonl files")
    if single is not None and is_packed_dir(single):
        from .shards import PackedShardDataset

        ds = PackedShardDataset(single, max_seq_len=max_seq_len, tokenizer=tokenizer, data_type=data_type,
                                packing=packing)
        logger.info("%r", ds)
        return ds
    if is_hf_spec(single):
        raise ValueError(f"data source {single!r}: hf: datasets are read lazily, set data.streaming=true (or download "
                         "them with scripts/download_data.py and train on the files)")
    listed = [] if isinstance(paths, (str, os.PathLike)) else list(paths)
    odd = [p for p in listed if is_packed_dir(p) or is_hf_spec(p)]
    if len(listed) > 1 and odd:
        raise ValueError(f"{odd[0]} cannot be read together with other paths as one source; list each one in "
                         "data.sources (with data.mixture_weights) instead")
    opts = ReaderOptions(data_type=data_type, text_key=text_key, prompt_key=prompt_key,
                         response_key=response_key, messages_key=messages_key,
                         text_suffixes=tuple(text_suffixes), skip_bad_lines=skip_bad_lines)
    files = resolve_files(paths, opts.text_suffixes)
    store = tokenize_files(files, tokenizer, opts, cache_dir=cache_dir, use_chat_template=use_chat_template)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ds = PackedDataset(store, max_seq_len, packing=packing, pad_token_id=pad,
                       eos_fill=tokenizer.eos_token_id if pad_response_with_eos else None)
    if ds.dropped or ds.truncated:
        logger.warning("%d SFT example(s) truncated to max_seq_len=%d, %d dropped (prompt alone >= max_seq_len)",
                       ds.truncated, ds.max_seq_len, ds.dropped)
    logger.info("%r", ds)
    return ds


def stateful_dataloader(dataset, **kwargs):
    """torchdata's StatefulDataLoader (imported here: ``import veomni.data`` stays light)."""
    import warnings

    from torchdata.stateful_dataloader import StatefulDataLoader

    with warnings.catch_warnings():
        # torchdata 0.11 calls torch.set_vital, deprecated in recent torch: one warning per loader.
        warnings.filterwarnings("ignore", message=".*set_vital.*")
        return StatefulDataLoader(dataset, **kwargs)


class _Rows(torch.utils.data.Dataset):
    """What the DataLoader workers index: the dataset's rows, key -1 = an all-padding row."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int):
        return self.dataset.pad_row() if key < 0 else self.dataset[int(key)]


class _RankBatches:
    """Index batches of one rank for the rest of an epoch: the batch sampler of the DataLoader."""

    def __init__(self, order: np.ndarray, position: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                 drop_last: bool):
        self.order, self.position = order, position
        self.mbs, self.dp_rank, self.gbs, self.drop_last = micro_batch_size, dp_rank, micro_batch_size * dp_size, drop_last

    def __iter__(self) -> Iterator[List[int]]:
        n, pos = len(self.order), self.position
        while (pos + self.gbs <= n) if self.drop_last else (pos < n):
            start = pos + self.dp_rank * self.mbs
            idx = self.order[start:min(start + self.mbs, n)].tolist()
            yield idx + [-1] * (self.mbs - len(idx))
            pos += self.gbs

    def __len__(self) -> int:
        left = len(self.order) - self.position
        return left // self.gbs if self.drop_last else -(-left // self.gbs)


class StatefulLoader:
    """Yields this rank's micro-batches (dicts of [micro_batch_size, max_seq_len] tensors).

    ``for batch in loader`` runs to the end of the current epoch, then the epoch counter advances;
    breaking out and iterating again continues where it stopped (one live iterator at a time).
    ``len(loader)`` is micro-batches per rank per full epoch. ``state_dict()`` after receiving a
    batch, restored with ``load_state_dict()``, makes the next batch the one that would have come.

    drop_last=True drops the rows of the last incomplete global batch (they come back in later
    epochs under another shuffle); drop_last=False completes it with all-padding rows
    (``dataset.pad_row()``: nothing maskable, so no row is seen twice and losses stay exact).

    ``num_workers`` > 0: that many worker processes (torchdata StatefulDataLoader) build and
    collate the rows, ``prefetch_factor`` batches each ahead of the trainer. Neither changes which
    batches come, nor the state.
    """

    streaming = False

    def __init__(self, dataset, micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1,
                 seed: int = 0, shuffle: bool = True, drop_last: bool = True, *, num_workers: int = 0,
                 prefetch_factor: int = 2):
        if int(micro_batch_size) < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        if int(dp_size) < 1 or not 0 <= int(dp_rank) < int(dp_size):
            raise ValueError(f"need 0 <= dp_rank < dp_size, got dp_rank={dp_rank}, dp_size={dp_size}")
        if int(num_workers) < 0 or int(prefetch_factor) < 1:
            raise ValueError(f"need num_workers >= 0 and prefetch_factor >= 1, got {num_workers}, {prefetch_factor}")
        self.dataset = dataset
        self.micro_batch_size = int(micro_batch_size)
        self.dp_rank, self.dp_size = int(dp_rank), int(dp_size)
        self.seed, self.shuffle, self.drop_last = int(seed), bool(shuffle), bool(drop_last)
        self.num_workers, self.prefetch_factor = int(num_workers), int(prefetch_factor)
        self.num_rows = len(dataset)
        self._mixed = hasattr(dataset, "epoch_order")
        if self._mixed and not self.shuffle:
            raise ValueError("a mixture draws its order at random; it cannot be read with shuffle=False")
        if self.drop_last and self.num_rows < self.global_batch_size:
            raise ValueError(
                f"dataset has {self.num_rows} rows, fewer than one global micro-batch (micro_batch_size "
                f"{self.micro_batch_size} x dp_size {self.dp_size} = {self.global_batch_size}); use more data, "
                f"a smaller micro_batch_size, or drop_last=False"
            )
        self.epoch = 0
        self.position = 0  # rows of this epoch's order consumed by all ranks together
        self._order_cache: Tuple[int, Optional[np.ndarray]] = (-1, None)
        self._it = None  # live DataLoader iterator of the current epoch, from the current position

    @property
    def global_batch_size(self) -> int:
        """Rows per micro-step over all data-parallel ranks."""
        return self.micro_batch_size * self.dp_size

    def __len__(self) -> int:
        q, r = divmod(self.num_rows, self.global_batch_size)
        return q if (self.drop_last or r == 0) else q + 1

    def order(self, epoch: int) -> np.ndarray:
        """Row keys of ``epoch`` in order (same on every rank and for every dp_size)."""
        if self._order_cache[0] != epoch:
            if self._mixed:
                order = self.dataset.epoch_order(epoch, self.seed)
            elif self.shuffle:
                order = np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)
            else:
                order = np.arange(self.num_rows)
            self._order_cache = (epoch, order)
        return self._order_cache[1]

    def _has_next(self) -> bool:
        if self.drop_last:
            return self.position + self.global_batch_size <= self.num_rows
        return self.position < self.num_rows

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its first batch."""
        self.epoch, self.position = int(epoch), 0
        self._it = None

    def _build(self):
        batches = _RankBatches(self.order(self.epoch), self.position, self.micro_batch_size, self.dp_rank,
                               self.dp_size, self.drop_last)
        kwargs = dict(batch_sampler=batches, collate_fn=collate_stacked if self.num_workers else collate,
                      num_workers=self.num_workers,
                      # A private generator: the base seed drawn per iterator must not consume the
                      # global torch RNG, or a resumed run's RNG stream would differ from a straight one.
                      generator=torch.Generator().manual_seed(self.seed))
        if self.num_workers:
            kwargs["prefetch_factor"] = self.prefetch_factor
        return iter(stateful_dataloader(_Rows(self.dataset), **kwargs))

    def __iter__(self) -> Iterator[Dict[str, torch.Tensor]]:
        while True:
            if self._it is None:  # first batch of this iteration, or the state was (re)loaded
                if not self._has_next():  # state saved right after an epoch's last batch
                    self.set_epoch(self.epoch + 1)
                self._it = self._build()
            try:
                batch = next(self._it)
            except StopIteration:
                self.set_epoch(self.epoch + 1)
                return
            # Advance before yielding: a state_dict() taken while the caller holds this batch
            # must already count it, or a resume would replay it.
            self.position = min(self.position + self.global_batch_size, self.num_rows)
            yield unstack(batch) if self.num_workers else batch

    def state_dict(self) -> Dict[str, int]:
        state = {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                 "shuffle": int(self.shuffle), "num_rows": self.num_rows}
        if self._mixed:
            state["mixture"] = self.dataset.describe()
        return state

    def load_state_dict(self, state: Dict[str, int]) -> None:
        if state.get("kind") == "streaming":
            raise ValueError("the checkpoint's loader state is a streaming one (saved with data.streaming=true); "
                             "resume with the same data settings")
        for k in ("seed", "shuffle", "num_rows"):
            if int(state[k]) != int(getattr(self, k)):
                raise ValueError(
                    f"loader state has {k}={state[k]} but this loader has {k}={getattr(self, k)}: the checkpoint "
                    "was written for another dataset/seed; resume with the same data, max_seq_len, packing and seed"
                )
        mine = self.dataset.describe() if self._mixed else None
        if state.get("mixture") != mine:
            raise ValueError(f"loader state has mixture (rows, weight per source) {state.get('mixture')} but this "
                             f"loader has {mine}: resume with the same data.sources and data.mixture_weights")
        if not 0 <= int(state["position"]) <= self.num_rows:
            raise ValueError(f"loader state position {state['position']} outside [0, {self.num_rows}]")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._it = None


def build_dataloaders(
    train_path: Union[None, PathLike, Sequence[PathLike]],
    tokenizer,
    *,
    micro_batch_size: int,
    data_type: str = "pretrain",
    max_seq_len: int = 2048,
    packing: bool = True,
    cache_dir: Optional[PathLike] = None,
    text_key: str = "text",
    skip_bad_lines: bool = False,
    dp_rank: int = 0,
    dp_size: int = 1,
    seed: int = 0,
    eval_path: Union[None, PathLike, Sequence[PathLike]] = None,
    eval_split_ratio: float = 0.0,
    eval_micro_batch_size: Optional[int] = None,
    use_chat_template: bool = True,
    sources: Optional[Sequence[str]] = None,
    mixture_weights: Optional[Sequence[float]] = None,
    streaming: bool = False,
    num_workers: int = 0,
    prefetch_factor: int = 2,
    gather=None,
    pad_response_with_eos: bool = False,
):
    """(train_loader, eval_loader or None).

    Training data is ``train_path`` (one source), or ``sources`` with ``mixture_weights`` (a
    weighted mixture). Each source is files / a directory / a glob, a packed directory
    (scripts/pack_data.py), or with ``streaming`` an ``hf:`` dataset (veomni/data/sources.py).
    ``streaming=False``: every source is tokenized once (cached in ``cache_dir``) or memory-mapped
    (packed), and read by ``StatefulLoader``; ``streaming=True``: read lazily by
    ``StreamingLoader`` (no length: the trainer needs max_steps; ``gather`` collects the ranks'
    stream states for the checkpoint). Eval data comes from ``eval_path`` or from a held-out
    ``eval_split_ratio`` of the training documents (one in-memory source only; deterministic in
    ``seed``), never both. The eval loader does not shuffle and keeps every row (drop_last=False,
    padding rows complete the last batch).
    """
    if eval_path is not None and eval_split_ratio:
        raise ValueError("set either eval_path or eval_split_ratio, not both")
    if train_path is not None and sources:
        raise ValueError("set either data.train_path or data.sources (a mixture), not both")
    if not sources:
        if train_path is None:
            raise ValueError("no training data: set data.train_path, or data.sources for a mixture")
        if mixture_weights:
            raise ValueError("data.mixture_weights needs data.sources (one weight per source)")
        sources = [train_path]
    from .mixture import normalise_weights

    weights = normalise_weights(mixture_weights, len(sources))
    common = dict(tokenizer=tokenizer, data_type=data_type, max_seq_len=max_seq_len, packing=packing,
                  cache_dir=cache_dir, text_key=text_key, skip_bad_lines=skip_bad_lines,
                  use_chat_template=use_chat_template, pad_response_with_eos=pad_response_with_eos)
    loader_kw = dict(num_workers=num_workers, prefetch_factor=prefetch_factor)
    evald = None
    if streaming:
        from .sources import open_source

        if pad_response_with_eos:
            raise ValueError("data.pad_response_with_eos is not supported with data.streaming=true (rows are packed "
                             "on the fly there); use in-memory data")
        from .streaming import StreamingLoader, StreamingRows

        if eval_split_ratio:
            raise ValueError("data.eval_split_ratio holds out documents of an in-memory corpus; with "
                             "data.streaming=true give a separate data.eval_path")
        opts = ReaderOptions(data_type=data_type, text_key=text_key, skip_bad_lines=skip_bad_lines)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        rows = StreamingRows([open_source(s, opts) for s in sources], tokenizer, opts, max_seq_len, packing=packing,
                             pad_token_id=pad, weights=weights, seed=seed, dp_rank=dp_rank, dp_size=dp_size,
                             num_workers=num_workers, use_chat_template=use_chat_template)
        train_loader = StreamingLoader(rows, micro_batch_size, gather=gather, **loader_kw)
    else:
        parts = [build_dataset(s, **common) for s in sources]
        if eval_split_ratio:
            if len(parts) > 1 or not isinstance(parts[0], PackedDataset):
                raise ValueError("data.eval_split_ratio holds out documents of one in-memory source; for a "
                                 "mixture or packed shards give a separate data.eval_path")
            parts[0], evald = parts[0].split(eval_split_ratio, seed)
        train = parts[0] if len(parts) == 1 else MixtureDataset(parts, weights, names=[str(s) for s in sources])
        if len(parts) > 1:
            logger.info("%r", train)
        train_loader = StatefulLoader(train, micro_batch_size, dp_rank, dp_size, seed, shuffle=True, drop_last=True,
                                      **loader_kw)
    if eval_path is not None:
        evald = build_dataset(eval_path, **common)
    eval_loader = None
    if evald is not None:
        eval_loader = StatefulLoader(evald, eval_micro_batch_size or micro_batch_size, dp_rank, dp_size, seed,
                                     shuffle=False, drop_last=False, **loader_kw)
    return train_loader, eval_loader
