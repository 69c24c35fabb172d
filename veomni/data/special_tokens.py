"""Encode corpus text so that special-token strings inside it stay plain text.

Code corpora contain strings such as ``<|mask|>`` or ``<|im_end|>`` (tokenizer sources, chat
templates, docs). A plain ``tokenizer(text)`` turns them into the special tokens themselves, with two
silent failures: a literal ``<|mask|>`` makes `corrupt()` raise every time that row is drawn (after
every resume too), and a literal ``<|im_end|>`` becomes an EOS in the middle of a document.

  * Corpus text (pretraining documents, prompt/response without a chat template) is encoded with
    ``split_special_tokens=True``: every special-token string is tokenized as ordinary text.
  * Chat-templated SFT text mixes both kinds: the template's own role markers must stay special,
    the message contents must not. `render_chat` renders the conversation and returns the
    character spans of the contents (found through sentinel contents, then checked against the
    real rendering); `encode_mixed` cuts the text at the template's special tokens (the tokenizer
    itself splits there before BPE, so this is exact) and encodes every piece with specials split.

Only tokens marked special are split (HF's rule); non-special added tokens (Qwen's ``<think>``,
FIM markers) are text-level vocabulary and keep their ids, as in any HF tokenization.
"""
from __future__ import annotations

import re
from typing import Dict, List, Sequence, Tuple

Span = Tuple[int, int]


def special_strings(tokenizer) -> List[str]:
    """Strings the tokenizer parses as special tokens, longest first."""
    found = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(tok, "special", False):
            found.add(str(tok))
    return sorted((s for s in found if s), key=len, reverse=True)


def _added_by_content(tokenizer) -> Dict[str, object]:
    return {str(t): t for t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values()}


def _special_ids(tokenizer) -> set:
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for tid, tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(tok, "special", False):
            ids.add(int(tid))
    ids.discard(getattr(tokenizer, "unk_token_id", None))  # unknown characters legitimately map to unk
    return ids


def encode_literal(tokenizer, texts: List[str]) -> List[List[int]]:
    """Token ids of `texts` with every special-token string tokenized as plain text."""
    if not texts:
        return []
    out = tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    specials = _special_ids(tokenizer)
    for text, ids in zip(texts, out):
        hit = specials.intersection(ids)
        if hit:
            # Only a tokenizer that ignores split_special_tokens gets here; training on its output
            # would reintroduce the mid-document EOS / mask token this module exists to prevent.
            raise ValueError(
                f"tokenizer {type(tokenizer).__name__} produced special token ids {sorted(hit)} from plain text "
                f"{text[:60]!r}... although split_special_tokens=True was passed; use a fast (tokenizers-backed) "
                "tokenizer, which supports it")
    return out


def _overlaps(start: int, end: int, spans: Sequence[Span]) -> bool:
    return any(start < b and a < end for a, b in spans)


def encode_mixed(tokenizer, text: str, literal: Sequence[Span]) -> List[int]:
    """Ids of `text`: special-token strings are special tokens, except inside the `literal` spans."""
    specials = special_strings(tokenizer)
    if not specials:
        return encode_literal(tokenizer, [text])[0]
    added = _added_by_content(tokenizer)
    pattern = re.compile("|".join(re.escape(s) for s in specials))
    pieces: List[str] = []
    markers: List[int] = []
    pos = 0
    for m in pattern.finditer(text):
        if _overlaps(m.start(), m.end(), literal):
            continue
        left = text[pos:m.start()]
        tok = added.get(m.group())
        if tok is not None and getattr(tok, "lstrip", False):  # the tokenizer eats whitespace there too
            left = left.rstrip()
        pieces.append(left)
        markers.append(tokenizer.convert_tokens_to_ids(m.group()))
        pos = m.end()
        if tok is not None and getattr(tok, "rstrip", False):
            while pos < len(text) and text[pos].isspace():
                pos += 1
    pieces.append(text[pos:])
    encoded = encode_literal(tokenizer, [p for p in pieces if p])
    it = iter(encoded)
    ids: List[int] = []
    for i, piece in enumerate(pieces):
        if piece:
            ids.extend(next(it))
        if i < len(markers):
            ids.append(markers[i])
    return ids


def has_special_string(tokenizer, texts: Sequence[str]) -> bool:
    specials = special_strings(tokenizer)
    return any(s in t for t in texts for s in specials)


def _sentinel(i: int) -> str:
    # Private-use characters: no template branches on them and no corpus contains this pattern.
    return f"\ue000{i}\ue001"


_SENTINEL = re.compile("\ue000(\\d+)\ue001")


def render_chat(tokenizer, messages: List[dict], add_generation_prompt: bool,
                where: str) -> Tuple[str, List[Span]]:
    """(rendered text, character spans of the message contents in it).

    The spans come from rendering the same conversation with sentinel contents; the real text is
    then rebuilt from that rendering and must match the template's own output exactly (with the
    contents as given, or stripped, for templates that trim). A template that transforms contents
    any other way raises instead of guessing where they are.
    """
    from veomni.data.readers import DataFormatError

    real = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    marked = [{**m, "content": _sentinel(i)} for i, m in enumerate(messages)]
    skeleton = tokenizer.apply_chat_template(marked, tokenize=False, add_generation_prompt=add_generation_prompt)
    for transform in (lambda c: c, str.strip):
        parts, spans, pos, length = [], [], 0, 0
        for m in _SENTINEL.finditer(skeleton):
            idx = int(m.group(1))
            if idx >= len(messages):
                break
            head = skeleton[pos:m.start()]
            content = transform(messages[idx]["content"])
            parts += [head, content]
            length += len(head)
            spans.append((length, length + len(content)))
            length += len(content)
            pos = m.end()
        parts.append(skeleton[pos:])
        if "".join(parts) == real:
            return real, spans
    raise DataFormatError(
        f"{where}: a message contains a special-token string, and the chat template transforms message "
        "contents in a way that hides where they sit in its output, so they cannot be tokenized as plain "
        "text. Remove the special-token strings from the record or simplify the template.")


def clip_spans(spans: Sequence[Span], start: int, end: int) -> List[Span]:
    """`spans` intersected with [start, end), shifted to start at 0."""
    out = []
    for a, b in spans:
        a, b = max(a, start), min(b, end)
        if a < b:
            out.append((a - start, b - start))
    return out


def end_with_one_eos(ids: List[int], eos: int, tokenizer) -> List[int]:
    """`ids` ending in exactly one EOS.

    Chat templates close the assistant turn with their own end marker, which is often the EOS
    itself (``<|im_end|>`` followed by a newline). Appending another EOS made SFT targets end
    ``<|im_end|>\\n<|im_end|>``: when the last EOS is followed by whitespace only, cut there.
    """
    if eos in ids:
        last = len(ids) - 1 - ids[::-1].index(eos)
        tail = ids[last + 1:]
        if not tail or not tokenizer.decode(tail).strip():
            return ids[:last + 1]
    return ids + [eos]


__all__ = ["special_strings", "encode_literal", "encode_mixed", "render_chat", "clip_spans",
           "end_with_one_eos", "has_special_string"]
