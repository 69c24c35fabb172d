"""Dataset construction and the stateful, data-parallel-sharded loader.

Order of rows in an epoch: ``permutation(num_rows)`` from ``np.random.default_rng([seed, epoch])``
(identity with shuffle=False). The order does not depend on dp_size, so a "global batch" is simply
the next ``micro_batch_size * dp_size`` rows of that order and rank r takes its contiguous slice
``[r * micro_batch_size, (r + 1) * micro_batch_size)`` of it. The state is (epoch, position) with
position = rows of the order already consumed by all ranks together; resuming with another dp_size
or micro_batch_size continues from the same row of the same order.
"""
from __future__ import annotations

import logging
from typing import Dict, Iterator, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .packing import PackedDataset, collate
from .readers import DEFAULT_TEXT_SUFFIXES, PathLike, ReaderOptions, resolve_files
from .tokenization import tokenize_files

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
) -> PackedDataset:
    """Read + tokenize (or load from ``cache_dir``) + lay out rows. See docs/data.md.

    Padding uses ``tokenizer.pad_token_id``, or ``eos_token_id`` when the tokenizer has no pad token.
    With several ranks, let one rank build the cache first (then barrier) to avoid tokenizing the
    corpus on every rank; concurrent builds are safe, only wasteful.
    """
    opts = ReaderOptions(data_type=data_type, text_key=text_key, prompt_key=prompt_key,
                         response_key=response_key, messages_key=messages_key,
                         text_suffixes=tuple(text_suffixes), skip_bad_lines=skip_bad_lines)
    files = resolve_files(paths, opts.text_suffixes)
    store = tokenize_files(files, tokenizer, opts, cache_dir=cache_dir, use_chat_template=use_chat_template)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ds = PackedDataset(store, max_seq_len, packing=packing, pad_token_id=pad)
    if ds.dropped or ds.truncated:
        logger.warning("%d SFT example(s) truncated to max_seq_len=%d, %d dropped (prompt alone >= max_seq_len)",
                       ds.truncated, ds.max_seq_len, ds.dropped)
    logger.info("%r", ds)
    return ds


class StatefulLoader:
    """Yields this rank's micro-batches (dicts of [micro_batch_size, max_seq_len] tensors).

    ``for batch in loader`` runs to the end of the current epoch, then the epoch counter advances;
    breaking out and iterating again continues where it stopped (one live iterator at a time).
    ``len(loader)`` is micro-batches per rank per full epoch. ``state_dict()`` after receiving a
    batch, restored with ``load_state_dict()``, makes the next batch the one that would have come.

    drop_last=True drops the rows of the last incomplete global batch (they come back in later
    epochs under another shuffle); drop_last=False completes it with all-padding rows
    (``dataset.pad_row()``: nothing maskable, so no row is seen twice and losses stay exact).
    """

    def __init__(self, dataset: PackedDataset, micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1,
                 seed: int = 0, shuffle: bool = True, drop_last: bool = True):
        if int(micro_batch_size) < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        if int(dp_size) < 1 or not 0 <= int(dp_rank) < int(dp_size):
            raise ValueError(f"need 0 <= dp_rank < dp_size, got dp_rank={dp_rank}, dp_size={dp_size}")
        self.dataset = dataset
        self.micro_batch_size = int(micro_batch_size)
        self.dp_rank, self.dp_size = int(dp_rank), int(dp_size)
        self.seed, self.shuffle, self.drop_last = int(seed), bool(shuffle), bool(drop_last)
        self.num_rows = len(dataset)
        if self.drop_last and self.num_rows < self.global_batch_size:
            raise ValueError(
                f"dataset has {self.num_rows} rows, fewer than one global micro-batch (micro_batch_size "
                f"{self.micro_batch_size} x dp_size {self.dp_size} = {self.global_batch_size}); use more data, "
                f"a smaller micro_batch_size, or drop_last=False"
            )
        self.epoch = 0
        self.position = 0  # rows of this epoch's order consumed by all ranks together
        self._order_cache: Tuple[int, Optional[np.ndarray]] = (-1, None)

    @property
    def global_batch_size(self) -> int:
        """Rows per micro-step over all data-parallel ranks."""
        return self.micro_batch_size * self.dp_size

    def __len__(self) -> int:
        q, r = divmod(self.num_rows, self.global_batch_size)
        return q if (self.drop_last or r == 0) else q + 1

    def order(self, epoch: int) -> np.ndarray:
        """Row order of ``epoch`` (same on every rank and for every dp_size)."""
        if self._order_cache[0] != epoch:
            order = (np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)
                     if self.shuffle else np.arange(self.num_rows))
            self._order_cache = (epoch, order)
        return self._order_cache[1]

    def _has_next(self) -> bool:
        if self.drop_last:
            return self.position + self.global_batch_size <= self.num_rows
        return self.position < self.num_rows

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its first batch."""
        self.epoch, self.position = int(epoch), 0

    def __iter__(self) -> Iterator[Dict[str, torch.Tensor]]:
        if not self._has_next():  # state saved right after an epoch's last batch
            self.set_epoch(self.epoch + 1)
        mbs = self.micro_batch_size
        while self._has_next():
            # Looked up per batch (cached), so a load_state_dict() on a live iterator is honoured.
            order = self.order(self.epoch)
            start = self.position + self.dp_rank * mbs
            idx = order[start:min(start + mbs, self.num_rows)]
            rows = [self.dataset[int(i)] for i in idx]
            rows += [self.dataset.pad_row() for _ in range(mbs - len(rows))]
            # Advance before yielding: a state_dict() taken while the caller holds this batch
            # must already count it, or a resume would replay it.
            self.position = min(self.position + self.global_batch_size, self.num_rows)
            yield collate(rows)
        self.set_epoch(self.epoch + 1)

    def state_dict(self) -> Dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "shuffle": int(self.shuffle), "num_rows": self.num_rows}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        for k in ("seed", "shuffle", "num_rows"):
            if int(state[k]) != int(getattr(self, k)):
                raise ValueError(
                    f"loader state has {k}={state[k]} but this loader has {k}={getattr(self, k)}: the checkpoint "
                    "was written for another dataset/seed; resume with the same data, max_seq_len, packing and seed"
                )
        if not 0 <= int(state["position"]) <= self.num_rows:
            raise ValueError(f"loader state position {state['position']} outside [0, {self.num_rows}]")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def build_dataloaders(
    train_path: Union[PathLike, Sequence[PathLike]],
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
) -> Tuple[StatefulLoader, Optional[StatefulLoader]]:
    """(train_loader, eval_loader or None).

    Eval data comes from ``eval_path`` or from a held-out ``eval_split_ratio`` of the training
    documents (deterministic in ``seed``), never both. The eval loader does not shuffle and keeps
    every row (drop_last=False, padding rows complete the last batch).
    """
    if eval_path is not None and eval_split_ratio:
        raise ValueError("set either eval_path or eval_split_ratio, not both")
    common = dict(tokenizer=tokenizer, data_type=data_type, max_seq_len=max_seq_len, packing=packing,
                  cache_dir=cache_dir, text_key=text_key, skip_bad_lines=skip_bad_lines,
                  use_chat_template=use_chat_template)
    train = build_dataset(train_path, **common)
    evald = None
    if eval_split_ratio:
        train, evald = train.split(eval_split_ratio, seed)
    elif eval_path is not None:
        evald = build_dataset(eval_path, **common)
    train_loader = StatefulLoader(train, micro_batch_size, dp_rank, dp_size, seed, shuffle=True, drop_last=True)
    eval_loader = None
    if evald is not None:
        eval_loader = StatefulLoader(evald, eval_micro_batch_size or micro_batch_size, dp_rank, dp_size, seed,
                                     shuffle=False, drop_last=False)
    return train_loader, eval_loader
