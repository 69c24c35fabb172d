"""Cut tokenized documents into fixed-length rows and build the batch tensors.

Every row has exactly ``max_seq_len`` positions (fixed shapes: no recompiles, no ragged batches).
Row layouts:
  pretrain, packing=True   documents concatenated in order and cut every max_seq_len tokens. A
                           document cut by a row boundary continues in the next row with position
                           ids restarting at 0 (the piece is a fresh segment there); only the last
                           row can be short (padded).
  sft, packing=True        whole examples placed first-fit, in order, into rows; an example is never
                           split, so a response always shares its row with its prompt.
  packing=False            one document per row, truncated to max_seq_len, right-padded.
SFT examples longer than max_seq_len are truncated at the end (the EOS is lost) and counted in
``truncated``; an example whose prompt alone fills max_seq_len has no response left and is dropped,
counted in ``dropped``.
EOS-padded response canvas (``eos_fill``, data.pad_response_with_eos; SFT with packing=False): the
row's tail after the example is filled with EOS tokens that belong to the example: same segment,
attended to, positions continuing, maskable. The diffusion loss then scores them, so the model
learns to fill the part of a canvas it does not need with EOS, i.e. where to stop (dllm's BERT-chat
does this by scoring the EOS padding with no attention mask).

Row tensors (all length max_seq_len; see docs/data.md for the batch contract):
  input_ids      token ids, pad_token_id on padding
  position_ids   0.. within each document piece; the padding tail counts 0..k-1 as one run
  segment_ids    1..n numbering the document pieces of the row, 0 on padding
  attention_mask 1 on real tokens, 0 on padding
  maskable       True where the diffusion objective may corrupt/score: every real token in
                 pretraining; response + EOS in SFT; False on prompts and padding
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .tokenization import TokenStore

BATCH_KEYS = ("input_ids", "position_ids", "segment_ids", "attention_mask", "maskable")


def first_fit(lengths: Sequence[int], capacity: int) -> List[int]:
    """Bin index for each item: the lowest-numbered bin with room, items taken in order.

    A max-segment-tree over bin capacities finds that bin in O(log n); unopened bins hold the full
    capacity, so "no open bin fits" naturally lands on the next fresh bin.
    """
    n = len(lengths)
    size = 1
    while size < max(n, 1):
        size *= 2
    tree = [capacity] * (2 * size)
    out = []
    for length in lengths:
        if length > capacity:
            raise ValueError(f"item of length {length} exceeds bin capacity {capacity}")
        node = 1
        while node < size:
            node = 2 * node if tree[2 * node] >= length else 2 * node + 1
        out.append(node - size)
        tree[node] -= length
        node //= 2
        while node:
            tree[node] = max(tree[2 * node], tree[2 * node + 1])
            node //= 2
    return out


class PackedDataset:
    """Map-style dataset of fixed-length rows over a ``TokenStore`` (optionally a document subset).

    ``ds[i]`` is a dict of 1-D tensors (``BATCH_KEYS``); ``collate`` stacks rows into a batch.
    Attributes: ``num_docs``, ``num_tokens`` (real tokens over all rows), ``skipped`` (bad records
    per file, from reading), ``dropped`` / ``truncated`` (SFT examples that did not fit).
    """

    def __init__(self, store: TokenStore, max_seq_len: int, packing: bool = True,
                 pad_token_id: Optional[int] = None, doc_ids: Optional[np.ndarray] = None,
                 eos_fill: Optional[int] = None):
        if max_seq_len is None or int(max_seq_len) < 2:
            raise ValueError(f"max_seq_len must be an integer >= 2, got {max_seq_len!r}")
        if pad_token_id is None:
            raise ValueError("pad_token_id is required (build_dataset picks tokenizer.pad_token_id or eos)")
        self.store = store
        self.max_seq_len = int(max_seq_len)
        self.packing = bool(packing)
        self.pad_token_id = int(pad_token_id)
        self.data_type = store.data_type
        if eos_fill is not None and (self.data_type != "sft" or self.packing):
            raise ValueError("the EOS-padded response canvas (data.pad_response_with_eos) needs data_type=sft and "
                             f"packing=false: each row is one example and its tail (got data_type={self.data_type}, "
                             f"packing={self.packing})")
        self.eos_fill = None if eos_fill is None else int(eos_fill)
        self.doc_ids = np.arange(store.num_docs) if doc_ids is None else np.asarray(doc_ids, dtype=np.int64)
        self.skipped = dict(store.skipped)
        self.dropped = 0
        self.truncated = 0
        lengths = store.doc_lengths()[self.doc_ids]
        self._stream = self.packing and self.data_type == "pretrain"
        if self._stream:
            # Virtual concatenation of the selected documents: row i covers [i*L, (i+1)*L).
            self._vstarts = np.zeros(len(self.doc_ids) + 1, dtype=np.int64)
            np.cumsum(lengths, out=self._vstarts[1:])
            self.num_tokens = int(self._vstarts[-1])
            self._num_rows = math.ceil(self.num_tokens / self.max_seq_len)
        else:
            self._build_row_table(lengths)
        if self._num_rows == 0:
            raise ValueError(
                f"no row could be built: all {len(self.doc_ids)} documents were dropped "
                f"(SFT prompts longer than max_seq_len={self.max_seq_len}?)"
            )

    # ---------------------------------------------------------------- layout
    def _build_row_table(self, lengths: np.ndarray) -> None:
        L = self.max_seq_len
        keep, take = [], []
        plens = self.store.prompt_lens
        for k, n in enumerate(lengths.tolist()):
            if plens is not None and plens[self.doc_ids[k]] >= L:
                self.dropped += 1  # not even one response token would fit
                continue
            if n > L:
                self.truncated += 1
            keep.append(k)
            take.append(min(n, L))
        if self.packing:  # SFT: whole examples, first-fit in order
            bins = first_fit(take, L)
            order = sorted(range(len(keep)), key=lambda j: (bins[j], j))
            counts = np.bincount(np.asarray(bins, dtype=np.int64)) if bins else np.zeros(0, np.int64)
        else:
            order = list(range(len(keep)))
            counts = np.ones(len(keep), dtype=np.int64)
        self._row_doc = np.asarray([keep[j] for j in order], dtype=np.int64)  # index into self.doc_ids
        self._row_take = np.asarray([take[j] for j in order], dtype=np.int64)
        self._row_ptr = np.zeros(len(counts) + 1, dtype=np.int64)
        np.cumsum(counts, out=self._row_ptr[1:])
        self._num_rows = len(counts)
        self.num_tokens = int(self._row_take.sum())

    def _pieces(self, i: int) -> List[Tuple[int, int, int]]:
        """(store doc id, start, end) token ranges, in row order."""
        if self._stream:
            L, vs = self.max_seq_len, self._vstarts
            lo, hi = i * L, min((i + 1) * L, self.num_tokens)
            k = int(np.searchsorted(vs, lo, side="right")) - 1
            out = []
            while k < len(self.doc_ids) and vs[k] < hi:
                a, b = max(lo, vs[k]) - vs[k], min(hi, vs[k + 1]) - vs[k]
                out.append((int(self.doc_ids[k]), int(a), int(b)))
                k += 1
            return out
        a, b = self._row_ptr[i], self._row_ptr[i + 1]
        return [(int(self.doc_ids[k]), 0, int(t)) for k, t in zip(self._row_doc[a:b], self._row_take[a:b])]

    # ---------------------------------------------------------------- rows
    def __len__(self) -> int:
        return self._num_rows

    @property
    def num_docs(self) -> int:
        return len(self.doc_ids)

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        if not 0 <= i < self._num_rows:
            raise IndexError(f"row {i} out of range [0, {self._num_rows})")
        tokens, offsets, plens = self.store.tokens, self.store.offsets, self.store.prompt_lens
        pieces = self._pieces(i)
        ids = [tokens[offsets[d] + a: offsets[d] + b] for d, a, b in pieces]
        # SFT pieces always start at 0 (examples are never split), so the prompt length applies as is.
        prompt = None if plens is None else [int(plens[d]) for d, _, _ in pieces]
        return build_row(ids, prompt, self.max_seq_len, self.pad_token_id, eos_fill=self.eos_fill)

    def pad_row(self) -> Dict[str, torch.Tensor]:
        """An all-padding row (no real token, nothing maskable): fills a short last global batch."""
        return build_row([], None, self.max_seq_len, self.pad_token_id)

    # ---------------------------------------------------------------- eval split
    def split(self, eval_ratio: float, seed: int) -> Tuple["PackedDataset", "PackedDataset"]:
        """Split by document (deterministic in ``seed``) into (train, eval) datasets.

        Splitting documents, not rows, keeps a document from landing on both sides of a row cut.
        """
        if not 0.0 < eval_ratio < 1.0:
            raise ValueError(f"eval_split_ratio must be in (0, 1), got {eval_ratio}")
        n = len(self.doc_ids)
        n_eval = max(1, int(round(n * eval_ratio)))
        if n_eval >= n:
            raise ValueError(f"eval_split_ratio={eval_ratio} leaves no training document out of {n}")
        perm = np.random.default_rng(seed).permutation(n)
        eval_sel, train_sel = np.sort(perm[:n_eval]), np.sort(perm[n_eval:])
        make = lambda sel: PackedDataset(self.store, self.max_seq_len, self.packing, self.pad_token_id,  # noqa: E731
                                         self.doc_ids[sel], eos_fill=self.eos_fill)
        return make(train_sel), make(eval_sel)

    def __repr__(self) -> str:
        return (f"PackedDataset({self.data_type}, rows={len(self)}, docs={self.num_docs}, tokens={self.num_tokens}, "
                f"max_seq_len={self.max_seq_len}, packing={self.packing}, dropped={self.dropped}, "
                f"truncated={self.truncated}, skipped={sum(self.skipped.values())})")


def build_row(pieces: Sequence[np.ndarray], prompt_lens: Optional[Sequence[int]], max_seq_len: int,
              pad_token_id: int, eos_fill: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """One row dict (``BATCH_KEYS``) from its document pieces, laid out left to right.

    ``pieces``: token arrays (total length <= max_seq_len). ``prompt_lens``: None when every real
    token is maskable (pretraining), else one prompt length per piece (SFT; clipped to the piece).
    Shared by the in-memory rows, the packed shards and the streaming packer, so every path
    produces the same tensors for the same pieces.
    ``eos_fill``: an EOS id that fills the tail after the last piece as part of that piece (real,
    maskable, positions continuing): the EOS-padded response canvas of SFT (module docstring).
    """
    L = max_seq_len
    ids = np.full(L, pad_token_id, dtype=np.int64)
    pos = np.zeros(L, dtype=np.int64)
    seg = np.zeros(L, dtype=np.int64)
    maskable = np.zeros(L, dtype=bool)
    cur = 0
    for s, piece in enumerate(pieces, start=1):
        n = len(piece)
        if cur + n > L:
            raise ValueError(f"row pieces hold {cur + n}+ tokens, more than max_seq_len={L}")
        ids[cur:cur + n] = piece
        pos[cur:cur + n] = np.arange(n)
        seg[cur:cur + n] = s
        if prompt_lens is None:
            maskable[cur:cur + n] = True
        else:
            maskable[cur + min(int(prompt_lens[s - 1]), n): cur + n] = True
        cur += n
    if eos_fill is not None and pieces and cur < L:
        last = len(pieces)
        ids[cur:] = eos_fill
        pos[cur:] = pos[cur - 1] + 1 + np.arange(L - cur)
        seg[cur:] = last
        maskable[cur:] = True
        cur = L
    # Padding tail: one position run 0..k-1, so position-id based varlen (cu_seqlens) sees a
    # single extra sequence instead of k length-1 ones.
    pos[cur:] = np.arange(L - cur)
    return {
        "input_ids": torch.from_numpy(ids),
        "position_ids": torch.from_numpy(pos),
        "segment_ids": torch.from_numpy(seg),
        "attention_mask": torch.from_numpy((seg > 0).astype(np.int64)),
        "maskable": torch.from_numpy(maskable),
    }


def collate(rows: Sequence[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """Stack row dicts into the [B, S] batch dict (the batch contract of docs/data.md)."""
    if not rows:
        raise ValueError("collate needs at least one row")
    return {k: torch.stack([r[k] for r in rows]) for k in BATCH_KEYS}


def collate_stacked(rows: Sequence[Dict[str, torch.Tensor]]) -> torch.Tensor:
    """The batch as one int64 tensor [len(BATCH_KEYS), B, S], for DataLoader workers.

    A worker hands each tensor of a batch over in its own shared-memory segment; one tensor
    instead of five took the hand-over from ~107 to ~243 batches/s at 8 x 2048 (2 workers, 2 CPU
    cores). ``unstack`` gives the dict back in the training process.
    """
    if not rows:
        raise ValueError("collate needs at least one row")
    return torch.stack([torch.stack([r[k].long() for r in rows]) for k in BATCH_KEYS])


def unstack(batch: torch.Tensor) -> Dict[str, torch.Tensor]:
    out = {k: batch[i] for i, k in enumerate(BATCH_KEYS)}
    out["maskable"] = out["maskable"].bool()
    return out


# A row produced by the streaming packer: (pieces, prompt_lens or None, resume). ``resume`` is
# ``(key, consumed)``: the next row starts in document ``key`` after its first ``consumed`` tokens;
# ``consumed == -1`` means document ``key`` is used up and the next row starts after it.
StreamRow = Tuple[List[np.ndarray], Optional[List[int]], Tuple[object, int]]


def pack_stream(docs, max_seq_len: int, data_type: str, packing: bool, stats: Optional[dict] = None,
                flush: bool = False):
    """Lay out documents arriving one by one into rows, yielding a ``StreamRow`` per full row.

    ``docs`` yields ``(key, ids, prompt_len, consumed)``: ``ids`` are the document's tokens from
    ``consumed`` on (``consumed`` > 0 only for the first document after a resume), ``prompt_len``
    None for pretraining. The layouts match ``PackedDataset``'s except SFT packing:
      pretrain, packing   concatenate and cut every max_seq_len tokens (a cut document continues in
                          the next row as a new piece, positions from 0): identical rows.
      sft, packing        next-fit (an example that does not fit closes the row): first-fit would
                          need every example up front; rows are a little less full.
      packing=False       one document per row, truncated.
    SFT examples are truncated / dropped as in PackedDataset, counted in ``stats``. With ``flush``
    the last, partial row is yielded when ``docs`` ends (a finite pass, e.g. scripts/pack_data.py).
    """
    L = int(max_seq_len)
    sft = data_type == "sft"
    stats = {} if stats is None else stats
    pieces: List[np.ndarray] = []
    plens: List[int] = []
    fill = 0
    last_key = None
    for key, ids, plen, base in docs:
        last_key = key
        if sft:
            if plen >= L:
                stats["dropped"] = stats.get("dropped", 0) + 1
                continue
            if len(ids) > L:
                stats["truncated"] = stats.get("truncated", 0) + 1
                ids = ids[:L]
            if packing and fill + len(ids) <= L:
                pieces.append(ids), plens.append(plen)
                fill += len(ids)
                continue
            if pieces:  # this example opens the next row: resume at it
                yield pieces, plens, (key, 0)
            pieces, plens, fill = [ids], [plen], len(ids)
            if not packing:
                yield pieces, plens, (key, -1)
                pieces, plens, fill = [], [], 0
            continue
        if not packing:
            yield [ids[:L]], None, (key, -1)
            continue
        t = 0
        while t < len(ids):
            take = min(L - fill, len(ids) - t)
            pieces.append(ids[t:t + take])
            fill += take
            t += take
            if fill == L:
                yield pieces, None, (key, base + t if t < len(ids) else -1)
                pieces, fill = [], 0
    if flush and pieces:
        yield pieces, (plens if sft else None), (last_key, -1)
