"""Teacher unmasking orders (d3LLM "pseudo-trajectories"): how they are computed and stored.

A teacher diffusion LM decodes the response positions of every SFT example with d3LLM's rule:
semi-autoregressive blocks of ``block_length``, and inside the current block one token per step,
the masked position of lowest predictive entropy (the sampler's ``low_entropy`` alg with
steps = generated length; d3LLM: ``alg='entropy_threshold'`` with threshold -inf). What is kept is
not the teacher's tokens but the ORDER: for each response position j, ``order[j]`` = the 0-based
teacher step at which position j was committed. Training masks the dataset's own response by that
order (veomni/diffusion/d3llm.py), exactly as d3LLM indexes its stored list of full sequences
(trajectory[k] = the sequence after step k, so position j is still masked there iff order[j] > k).

Store layout (a directory, written by scripts/precompute_trajectories.py):
  manifest.json          teacher, tokenizer, decoding settings, data, max_seq_len
  part-SSS-NNNNN.npz     keys [n, 2] uint64 (128 bits of sha256), offsets [n+1] int64,
                         orders (flat int16, or int32 when a step index does not fit), prompt_lens,
                         gen_lens [n] int32
An example's key is ``sha256`` of its token ids (prompt + response exactly as the training data
pipeline tokenizes and truncates them, as little-endian int32). The trainer finds each packed
document's order by hashing its tokens, so the data pipeline carries nothing extra. Parts are
written atomically (temp file + rename) as decoding goes; a re-run skips the keys already stored.
"""
from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import tempfile
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch

logger = logging.getLogger(__name__)

__all__ = ["STORE_FORMAT", "doc_key", "TrajectoryStore", "TrajectoryWriter", "teacher_orders", "gen_length_for"]

STORE_FORMAT = "veomni-trajectories"
STORE_VERSION = 1


def doc_key(ids) -> Tuple[int, int]:
    """The store key of one example: the first 128 bits of sha256(int32 little-endian ids)."""
    arr = np.ascontiguousarray(np.asarray(ids, dtype="<i4"))
    digest = hashlib.sha256(arr.tobytes()).digest()
    return int.from_bytes(digest[:8], "little"), int.from_bytes(digest[8:16], "little")


def gen_length_for(n_response: int, block_length: int, gen_length: Optional[int] = None) -> int:
    """Positions the teacher decodes for a response of ``n_response`` tokens: the response rounded
    up to whole blocks (``gen_length=None``), or a fixed length (d3LLM: 256) that must hold it."""
    if n_response < 1:
        raise ValueError(f"an example needs at least one response token, got {n_response}")
    if gen_length is None:
        return -(-n_response // block_length) * block_length
    if gen_length < n_response:
        raise ValueError(f"a response of {n_response} tokens does not fit gen_length={gen_length}; raise "
                         "--gen_length or leave it unset (each response rounded up to whole blocks)")
    if gen_length % block_length:
        raise ValueError(f"gen_length={gen_length} must be a multiple of block_length={block_length}")
    return gen_length


# ----------------------------------------------------------------------------- the teacher
@torch.no_grad()
def teacher_orders(model, prompts: Sequence[Sequence[int]], gen_length: int, block_length: int,
                   mask_token_id: Optional[int] = None) -> np.ndarray:
    """[B, gen_length] int64: the step (0-based) at which the teacher commits each generated position.

    The prompts (token id lists, any lengths) are decoded together, left-padded, ``gen_length``
    positions each, greedily, one token per step inside blocks of ``block_length`` (lowest entropy
    first). A step that does not commit exactly one position of every row is an error (it would
    make the order ambiguous).
    """
    from veomni.diffusion.sampling.api import diffusion_generate

    if gen_length % block_length:
        raise ValueError(f"gen_length={gen_length} must be a multiple of block_length={block_length}")
    bsz = len(prompts)
    width = max(len(p) for p in prompts)
    ids = torch.zeros(bsz, width, dtype=torch.long)
    attn = torch.zeros(bsz, width, dtype=torch.long)
    for b, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError("teacher_orders: an empty prompt (the logit shift reads the first token from the "
                             "last prompt position)")
        ids[b, width - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
        attn[b, width - len(p):] = 1
    order = torch.full((bsz, gen_length), -1, dtype=torch.long)
    state = {"masked": torch.ones(bsz, gen_length, dtype=torch.bool), "count": 0}
    mask_id = mask_token_id if mask_token_id is not None else getattr(model.config, "mask_token_id", None)
    if mask_id is None:
        raise ValueError("the teacher has no mask token (config.mask_token_id); pass mask_token_id")

    def record(step: int, x: torch.Tensor) -> None:
        masked = (x[:, width:width + gen_length] == mask_id).cpu()
        new = state["masked"] & ~masked
        per_row = new.sum(1)
        if bool((per_row != 1).any()):
            raise RuntimeError(f"teacher step {step} committed {per_row.tolist()} positions per row; the order "
                               "needs exactly one per step (steps = gen_length, alg low_entropy)")
        order[new] = state["count"]
        state["count"] += 1
        state["masked"] = masked

    diffusion_generate(model, ids, attention_mask=attn, alg="low_entropy", max_new_tokens=gen_length,
                       steps=gen_length, block_length=block_length, temperature=0.0, stop_at_eos=False,
                       step_callback=record, mask_token_id=mask_id)
    if bool((order < 0).any()):
        raise RuntimeError("internal: the teacher left positions undecoded")
    return order.numpy()


# ----------------------------------------------------------------------------- the store
def _atomic_savez(path: str, **arrays) -> None:
    folder = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=folder)
    os.close(fd)
    try:
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _atomic_json(path: str, obj) -> None:
    folder = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=folder)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def _read_manifest(path: str) -> dict:
    man_path = os.path.join(path, "manifest.json")
    if not os.path.isfile(man_path):
        raise FileNotFoundError(f"{path} is not a trajectory store (no manifest.json); write one with "
                                "scripts/precompute_trajectories.py --out DIR")
    with open(man_path) as f:
        man = json.load(f)
    if man.get("format") != STORE_FORMAT or man.get("version") != STORE_VERSION:
        raise ValueError(f"{man_path}: format {man.get('format')!r} version {man.get('version')!r}, expected "
                         f"{STORE_FORMAT!r} version {STORE_VERSION}; recompute it with "
                         "scripts/precompute_trajectories.py")
    return man


def _read_parts(path: str) -> List[Dict[str, np.ndarray]]:
    parts = []
    for name in sorted(glob.glob(os.path.join(path, "part-*.npz"))):
        with np.load(name) as z:
            parts.append({k: z[k] for k in ("keys", "offsets", "orders", "prompt_lens", "gen_lens")})
    return parts


class TrajectoryWriter:
    """Appends (key, order) records to a store as part files; ``done`` holds every key already there.

    ``settings`` go into manifest.json; reopening a store made with other settings is an error
    (its orders would mix two teachers or two rules). Each writer process uses its own ``shard``
    number, so several processes can fill one store (disjoint examples) without clashing.
    """

    def __init__(self, path: str, settings: dict, shard: int = 0, flush_every: int = 256):
        self.path = os.fspath(path)
        os.makedirs(self.path, exist_ok=True)
        man_path = os.path.join(self.path, "manifest.json")
        manifest = {"format": STORE_FORMAT, "version": STORE_VERSION, **settings}
        if os.path.isfile(man_path):
            old = _read_manifest(self.path)
            diff = sorted(k for k in set(old) | set(manifest) if old.get(k) != manifest.get(k))
            if diff:
                raise ValueError(f"{self.path} was written with other settings ({', '.join(diff)}: "
                                 f"{[old.get(k) for k in diff]} there, {[manifest.get(k) for k in diff]} now); use "
                                 "another --out directory or the same settings")
        else:
            _atomic_json(man_path, manifest)
        self.shard = int(shard)
        self.flush_every = int(flush_every)
        self.done = set()
        self._seq = 0
        for part in _read_parts(self.path):
            self.done.update(map(tuple, part["keys"].tolist()))
        prefix = os.path.join(self.path, f"part-{self.shard:03d}-")
        taken = [int(p[len(prefix):-4]) for p in glob.glob(prefix + "*.npz")]
        self._seq = max(taken) + 1 if taken else 0
        self._pending: List[Tuple[Tuple[int, int], np.ndarray, int, int]] = []

    def add(self, key: Tuple[int, int], order: np.ndarray, prompt_len: int, gen_len: int) -> None:
        if key in self.done:
            return
        self.done.add(key)
        self._pending.append((key, np.asarray(order), int(prompt_len), int(gen_len)))
        if len(self._pending) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        keys = np.asarray([k for k, _, _, _ in self._pending], dtype=np.uint64).reshape(-1, 2)
        lens = [len(o) for _, o, _, _ in self._pending]
        offsets = np.zeros(len(lens) + 1, dtype=np.int64)
        np.cumsum(lens, out=offsets[1:])
        flat = np.concatenate([o for _, o, _, _ in self._pending])
        dtype = np.int16 if flat.size == 0 or int(flat.max()) < 2**15 else np.int32
        name = os.path.join(self.path, f"part-{self.shard:03d}-{self._seq:05d}.npz")
        _atomic_savez(name, keys=keys, offsets=offsets, orders=flat.astype(dtype),
                      prompt_lens=np.asarray([p for _, _, p, _ in self._pending], dtype=np.int32),
                      gen_lens=np.asarray([g for _, _, _, g in self._pending], dtype=np.int32))
        self._seq += 1
        self._pending.clear()


class TrajectoryStore:
    """Read side: ``lookup(ids)`` -> the order of the example with those token ids, or None.

    All parts are loaded into three flat arrays (16 bytes of key + 2 bytes per response token per
    example) and searched by binary search; nothing per example lives in Python objects.
    """

    def __init__(self, path: str):
        self.path = os.fspath(path)
        self.manifest = _read_manifest(self.path)
        parts = _read_parts(self.path)
        if not parts:
            raise ValueError(f"trajectory store {self.path} holds no part-*.npz: the precompute wrote nothing "
                             "yet (run scripts/precompute_trajectories.py to the end)")
        keys = np.concatenate([p["keys"] for p in parts]).reshape(-1, 2)
        lens = np.concatenate([np.diff(p["offsets"]) for p in parts])
        self.orders = np.concatenate([p["orders"].astype(np.int32) for p in parts])
        starts = np.zeros(len(lens), dtype=np.int64)
        np.cumsum(lens[:-1], out=starts[1:])
        self.prompt_lens = np.concatenate([p["prompt_lens"] for p in parts])
        # Sort by (k0, k1); a key stored twice (two writers) keeps its first copy.
        idx = np.lexsort((keys[:, 1], keys[:, 0]))
        keys, starts, lens, self.prompt_lens = keys[idx], starts[idx], lens[idx], self.prompt_lens[idx]
        first = np.ones(len(keys), dtype=bool)
        first[1:] = (keys[1:] != keys[:-1]).any(1)
        self._k0, self._k1 = keys[first, 0], keys[first, 1]
        self._starts, self._lens, self.prompt_lens = starts[first], lens[first], self.prompt_lens[first]

    def __len__(self) -> int:
        return len(self._k0)

    def lookup(self, ids) -> Optional[np.ndarray]:
        """The stored order (int32, one entry per response token) of the example ``ids``, or None."""
        k0, k1 = doc_key(ids)
        i = int(np.searchsorted(self._k0, np.uint64(k0), side="left"))
        while i < len(self._k0) and int(self._k0[i]) == k0:
            if int(self._k1[i]) == k1:
                s = int(self._starts[i])
                return self.orders[s:s + int(self._lens[i])]
            i += 1
        return None

    def describe(self) -> str:
        m = self.manifest
        return (f"{self.path}: {len(self)} examples, teacher {m.get('teacher')!r}, block_length "
                f"{m.get('block_length')}, max_seq_len {m.get('max_seq_len')}")


def iter_sft_docs(dataset) -> Iterable[Tuple[np.ndarray, int]]:
    """(token ids, prompt length) of every SFT example of a row dataset, as training lays them out
    (truncated to max_seq_len; examples never split across rows in SFT)."""
    for i in range(len(dataset)):
        row = dataset[i]
        seg = row["segment_ids"].numpy()
        ids = row["input_ids"].numpy()
        maskable = row["maskable"].numpy()
        for s in np.unique(seg[seg > 0]):
            cols = np.nonzero(seg == s)[0]
            a, e = int(cols[0]), int(cols[-1]) + 1
            resp = np.nonzero(maskable[a:e])[0]
            if resp.size == 0:
                continue
            yield ids[a:e].astype(np.int64), int(resp[0])
