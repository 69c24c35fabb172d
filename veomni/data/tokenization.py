"""Tokenize every document once, cache the ids as numpy arrays, load them back on the next run.

(The module is not called ``tokenize.py``: running any file from this folder as a script would put
the folder on sys.path and shadow the stdlib ``tokenize`` that ``inspect``/``linecache`` import.)

Per document:
  pretrain  ids(text) + [eos]
  sft       ids(prompt) + ids(response), ending in exactly one EOS (the template's own end marker
            when it is the EOS, else an appended one), and prompt_len = len(ids(prompt))
No special tokens are added by the tokenizer call itself (``add_special_tokens=False``): SFT text
comes out of the chat template, which already holds whatever BOS/role tokens the model expects.
Special-token strings inside corpus text and message contents are tokenized as plain text
(veomni/data/special_tokens.py); only the chat template's own markers become special tokens.

SFT rendering with the chat template: for a conversation whose last turn is the assistant response,
  prompt   = template(turns before it, add_generation_prompt=True)
  full     = template(all turns)
  response = full[len(prompt):]     (full must start with prompt, else the template is unusable)
so earlier assistant turns belong to the prompt and only the last one is trained on.

Cache layout: ``<cache_dir>/<data_type>-<key>/{tokens.npy,offsets.npy,prompt_lens.npy,meta.json}``;
the key hashes the files (path, size, mtime), the tokenizer (class, full tokenizer.json or vocab,
eos id, chat template) and the reader options. Packing options are not in the key: rows are cut from
the cached documents at load time, so changing max_seq_len never re-tokenizes.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .readers import DataFormatError, ReaderOptions, iter_records
from .special_tokens import (Span, clip_spans, encode_literal, encode_mixed, end_with_one_eos,
                             has_special_string, render_chat)

logger = logging.getLogger(__name__)

# 2: special-token strings in text are no longer parsed as special tokens; SFT ends in one EOS.
CACHE_VERSION = 2
_CHUNK = 1000  # records per tokenizer call: batched calls are ~10x faster than one-by-one


@dataclass
class TokenStore:
    """All documents of a data source as one flat token array plus offsets."""

    tokens: np.ndarray  # int32 [total_tokens]
    offsets: np.ndarray  # int64 [num_docs + 1]; document i is tokens[offsets[i]:offsets[i+1]]
    prompt_lens: Optional[np.ndarray]  # int32 [num_docs] for SFT, None for pretraining
    data_type: str
    files: List[str]
    skipped: Dict[str, int] = field(default_factory=dict)  # bad records skipped, per file
    cache_path: Optional[str] = None
    from_cache: bool = False

    @property
    def num_docs(self) -> int:
        return len(self.offsets) - 1

    def doc_lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __getstate__(self):
        # A DataLoader worker started by spawn/forkserver receives the dataset pickled; a pickled
        # np.memmap is a full in-memory copy, i.e. the whole corpus once per worker. Send the cache
        # path instead and map the file again on arrival.
        state = dict(self.__dict__)
        if isinstance(self.tokens, np.memmap) and self.cache_path:
            state["tokens"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        if self.tokens is None:
            self.tokens = np.load(os.path.join(self.cache_path, "tokens.npy"), mmap_mode="r")


# --------------------------------------------------------------------------------------------
# cache key


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of everything about the tokenizer that changes the ids we store."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # fast tokenizer: tokenizer.json covers model type, vocab, merges, added tokens
        h.update(backend.to_str().encode())
    else:  # slow tokenizer: the class is the algorithm, the vocab its data
        h.update(type(tokenizer).__name__.encode())
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps([tokenizer.eos_token_id, getattr(tokenizer, "chat_template", None)], default=str).encode())
    return h.hexdigest()


def cache_key(files: Sequence[str], tokenizer, opts: ReaderOptions, use_chat_template: bool) -> str:
    stats = []
    for f in files:
        st = os.stat(f)
        stats.append([f, st.st_size, st.st_mtime_ns])
    payload = {
        "version": CACHE_VERSION,
        "files": stats,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "tokenizer_name": getattr(tokenizer, "name_or_path", ""),
        "options": asdict(opts),
        "use_chat_template": use_chat_template,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


# --------------------------------------------------------------------------------------------
# SFT rendering


@dataclass
class SFTText:
    """One rendered SFT record; the *_literal spans are tokenized with special tokens split."""

    prompt: str
    response: str
    prompt_literal: List[Span]
    response_literal: List[Span]


def render_sft(record: dict, tokenizer, use_chat_template: bool, where: str) -> SFTText:
    """Render one validated SFT record into prompt and response text (see SFTText)."""
    if not use_chat_template:
        if "messages" in record:
            raise DataFormatError(f"{where}: 'messages' records need the chat template (use_chat_template=True)")
        p, r = record["prompt"], record["response"]
        return SFTText(p, r, [(0, len(p))], [(0, len(r))])  # raw text: literal throughout
    if "messages" in record:
        messages = record["messages"]
    else:
        messages = [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["response"]}]
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    if has_special_string(tokenizer, [m["content"] for m in messages]):
        full, spans = render_chat(tokenizer, messages, False, where)
    else:  # nothing to protect: the template's rendering is tokenized as it is
        full, spans = tokenizer.apply_chat_template(messages, tokenize=False), []
    if not full.startswith(prompt):
        # Without this check a template that renders history differently once the answer exists
        # would silently misplace the prompt/response boundary (prompt tokens scored as response).
        raise DataFormatError(
            f"{where}: the chat template does not render the prompt (with generation prompt) as a prefix "
            f"of the full conversation, so the response cannot be located; prompt ends {prompt[-60:]!r}, "
            f"full text there is {full[len(prompt) - 60:len(prompt)]!r}. Fix the tokenizer's chat_template."
        )
    cut = len(prompt)
    return SFTText(prompt, full[cut:], clip_spans(spans, 0, cut), clip_spans(spans, cut, len(full)))


def check_tokenizer(tokenizer, data_type: str, use_chat_template: bool) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ValueError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', type(tokenizer).__name__)!r} has no eos_token_id; "
            "every document ends with EOS, so set tokenizer.eos_token before building the dataset"
        )
    if data_type == "sft" and use_chat_template and not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "SFT data is rendered with tokenizer.apply_chat_template but this tokenizer has no chat_template; "
            "set tokenizer.chat_template, or pass use_chat_template=False to tokenize prompt/response as raw text"
        )
    return int(eos)


# --------------------------------------------------------------------------------------------
# tokenize / cache


def _encode(tokenizer, texts: List[str], literals: List[List[Span]]) -> List[List[int]]:
    """Ids of each text; special-token strings inside its literal spans stay plain text.

    Texts with no literal span, or literal throughout, go through one batched tokenizer call each
    (batched calls are ~10x faster); only texts that mix both are cut into pieces.
    """
    out: List[Optional[List[int]]] = [None] * len(texts)
    plain = [i for i, lit in enumerate(literals) if not lit]
    whole = [i for i, lit in enumerate(literals) if lit == [(0, len(texts[i]))]]
    if plain:
        for i, ids in zip(plain, tokenizer([texts[i] for i in plain], add_special_tokens=False)["input_ids"]):
            out[i] = ids
    for i, ids in zip(whole, encode_literal(tokenizer, [texts[i] for i in whole])):
        out[i] = ids
    for i, lit in enumerate(literals):
        if out[i] is None:
            out[i] = encode_mixed(tokenizer, texts[i], lit)
    return out


def encode_records(records: Sequence[object], wheres: Sequence[str], tokenizer, data_type: str,
                   use_chat_template: bool, eos: int) -> List[Tuple[List[int], Optional[int]]]:
    """Token ids (and prompt length for SFT, else None) of validated records; one batched call.

    Shared by the token cache below and the streaming readers (veomni/data/streaming.py), so a
    document gets the same ids whichever path reads it.
    """
    if not records:
        return []
    if data_type == "pretrain":
        return [(ids + [eos], None) for ids in encode_literal(tokenizer, list(records))]
    rendered = [render_sft(r, tokenizer, use_chat_template, w) for r, w in zip(records, wheres)]
    p_ids = _encode(tokenizer, [x.prompt for x in rendered], [x.prompt_literal for x in rendered])
    r_ids = _encode(tokenizer, [x.response for x in rendered], [x.response_literal for x in rendered])
    return [(p + end_with_one_eos(r, eos, tokenizer), len(p)) for p, r in zip(p_ids, r_ids)]


def _tokenize_all(files, tokenizer, opts: ReaderOptions, use_chat_template: bool, eos: int):
    skipped: Dict[str, int] = {}
    pieces: List[np.ndarray] = []
    lengths: List[int] = []
    prompt_lens: List[int] = []
    batch: List[Tuple[str, int, object]] = []

    def flush():
        if not batch:
            return
        encoded = encode_records([r for _, _, r in batch], [f"{f}:{n}" for f, n, _ in batch], tokenizer,
                                 opts.data_type, use_chat_template, eos)
        for ids, plen in encoded:
            pieces.append(np.asarray(ids, dtype=np.int32))
            lengths.append(len(ids))
            if plen is not None:
                prompt_lens.append(plen)
        batch.clear()

    for item in iter_records(files, opts, skipped):
        batch.append(item)
        if len(batch) >= _CHUNK:
            flush()
    flush()
    if not lengths:
        raise ValueError(f"no documents found in {len(files)} file(s) {files[:3]}... (all empty or skipped?)")
    tokens = np.concatenate(pieces)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    plens = np.asarray(prompt_lens, dtype=np.int32) if opts.data_type == "sft" else None
    return tokens, offsets, plens, skipped


def _save(path: str, tokens, offsets, plens, meta: dict) -> None:
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    # Write into a private temp dir, then rename: several ranks may build the same cache at once
    # and a reader must never see a half-written tokens.npy.
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
    try:
        np.save(os.path.join(tmp, "tokens.npy"), tokens)
        np.save(os.path.join(tmp, "offsets.npy"), offsets)
        if plens is not None:
            np.save(os.path.join(tmp, "prompt_lens.npy"), plens)
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)
        try:
            os.rename(tmp, path)
        except OSError:
            if not os.path.isdir(path):  # lost a race if path exists: the other copy is identical
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def _load(path: str, key: str) -> Optional[TokenStore]:
    meta_path = os.path.join(path, "meta.json")
    if not os.path.isfile(meta_path):
        return None
    with open(meta_path) as f:
        meta = json.load(f)
    if meta.get("version") != CACHE_VERSION or meta.get("key") != key:
        raise RuntimeError(f"token cache {path} does not match its key; delete the folder to rebuild it")
    # mmap: ranks on one node share the page cache instead of each holding a copy of the corpus.
    tokens = np.load(os.path.join(path, "tokens.npy"), mmap_mode="r")
    offsets = np.load(os.path.join(path, "offsets.npy"))
    plens = np.load(os.path.join(path, "prompt_lens.npy")) if meta["data_type"] == "sft" else None
    return TokenStore(tokens, offsets, plens, meta["data_type"], meta["files"], meta["skipped"], path, True)


def tokenize_files(
    files: Sequence[str],
    tokenizer,
    opts: ReaderOptions,
    cache_dir: Optional[str] = None,
    use_chat_template: bool = True,
) -> TokenStore:
    """Tokenize ``files`` (already resolved), or load the cached result when the key matches."""
    eos = check_tokenizer(tokenizer, opts.data_type, use_chat_template)
    files = list(files)
    key = path = None
    if cache_dir is not None:
        key = cache_key(files, tokenizer, opts, use_chat_template)
        path = os.path.join(os.fspath(cache_dir), f"{opts.data_type}-{key}")
        store = _load(path, key)
        if store is not None:
            logger.info("token cache hit: %s (%d documents, %d tokens)", path, store.num_docs, len(store.tokens))
            _log_skipped(store.skipped)
            return store
    tokens, offsets, plens, skipped = _tokenize_all(files, tokenizer, opts, use_chat_template, eos)
    _log_skipped(skipped)
    store = TokenStore(tokens, offsets, plens, opts.data_type, files, skipped, path, False)
    if path is not None:
        meta = {"version": CACHE_VERSION, "key": key, "data_type": opts.data_type, "files": files,
                "skipped": skipped, "num_docs": store.num_docs, "num_tokens": int(len(tokens)),
                "tokenizer": getattr(tokenizer, "name_or_path", "")}
        _save(path, tokens, offsets, plens, meta)
        logger.info("token cache written: %s (%d documents, %d tokens)", path, store.num_docs, len(tokens))
    return store


def _log_skipped(skipped: Dict[str, int]) -> None:
    if skipped:
        detail = ", ".join(f"{f}: {n}" for f, n in skipped.items())
        logger.warning("skipped %d bad record(s) (skip_bad_lines=True): %s", sum(skipped.values()), detail)
