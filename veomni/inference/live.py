"""A live terminal view of the masks filling in (`--live`), used as the samplers' step_callback.

On a TTY each step redraws the current text in place, masks shown as `░` (dimmed). When stdout is
not a terminal (a pipe, a log file, a test) nothing is redrawn: each step prints one plain line
`[step k] text` (row index added for batches), newlines shown as `⏎`.
"""
from __future__ import annotations

import shutil
import sys
import time
import unicodedata
from typing import List, Optional, Sequence

MASK_GLYPH = "░"
_DIM, _RESET = "\x1b[2m", "\x1b[0m"


def render_generated(tokenizer, tokens: Sequence[int], mask_id: int, eos_ids: Sequence[int] = (),
                     glyph: str = MASK_GLYPH, style_masks: bool = False) -> str:
    """Text of one row's generated tokens with every mask as `glyph` (control characters shown as
    U+FFFD).

    Runs of decoded tokens are decoded together (a byte-level BPE splits characters over tokens, so
    token-by-token decoding garbles them). The row is cut at its first EOS: with every alg except
    p2 a committed token is final, and everything after the first EOS is trimmed at the end.
    """
    parts: List[str] = []
    run: List[int] = []
    eos = set(eos_ids)

    def flush():
        if run:
            parts.append(_printable(tokenizer.decode(run, skip_special_tokens=True)))
            run.clear()

    masks = 0
    for tok in tokens:
        if tok == mask_id:
            flush()
            masks += 1
            continue
        if masks:
            parts.append((_DIM + glyph * masks + _RESET) if style_masks else glyph * masks)
            masks = 0
        if tok in eos:
            break
        run.append(tok)
    flush()
    if masks:
        parts.append((_DIM + glyph * masks + _RESET) if style_masks else glyph * masks)
    return "".join(parts)


def _printable(text: str) -> str:
    # Control characters other than newline/tab (an untrained model emits BEL, ESC, ...) would ring
    # the bell or inject terminal escapes into the redraw: show them as U+FFFD.
    return "".join(c if c in "\n\t" or unicodedata.category(c) != "Cc" else "\ufffd" for c in text)


def _width(text: str) -> int:
    """Terminal columns of `text` (wide East Asian characters take two; escapes none)."""
    cols, i = 0, 0
    while i < len(text):
        if text[i] == "\x1b":  # skip an SGR escape
            j = text.find("m", i)
            i = j + 1 if j >= 0 else len(text)
            continue
        cols += 2 if unicodedata.east_asian_width(text[i]) in ("W", "F") else 1
        i += 1
    return cols


class LiveView:
    """step_callback(step, x) that shows the generated part of every row as it is decoded.

    prompt_len: the (padded) prompt width; the view shows x[:, prompt_len:prompt_len+n_new].
    tty: None = stream.isatty(). max_fps caps redraws (the last frame is always drawn by close()).
    """

    def __init__(self, tokenizer, prompt_len: int, mask_id: int, eos_ids: Sequence[int] = (),
                 n_new: Optional[int] = None, stream=None, tty: Optional[bool] = None,
                 max_fps: float = 20.0, total_steps: Optional[int] = None):
        self.tok, self.p, self.mask_id = tokenizer, prompt_len, mask_id
        self.eos, self.n_new = list(eos_ids), n_new
        self.stream = stream if stream is not None else sys.stdout
        self.tty = self.stream.isatty() if tty is None else tty
        self.min_gap = 1.0 / max_fps if max_fps > 0 else 0.0
        self.total = total_steps
        self._drawn_rows = 0
        self._last_draw = 0.0
        self._pending = None

    def __call__(self, step: int, x) -> None:
        rows = x[:, self.p:self.p + self.n_new if self.n_new else None].tolist()
        if not self.tty:
            for b, row in enumerate(rows):
                text = render_generated(self.tok, row, self.mask_id, self.eos).replace("\n", "⏎")
                tag = f"[step {step}]" + (f"[row {b}]" if len(rows) > 1 else "")
                self.stream.write(f"{tag} {text}\n")
            self.stream.flush()
            return
        self._pending = (step, rows)
        now = time.perf_counter()
        if now - self._last_draw >= self.min_gap:
            self._draw()
            self._last_draw = now

    def _draw(self) -> None:
        step, rows = self._pending
        self._pending = None
        self._draw_frame(step, [render_generated(self.tok, row, self.mask_id, self.eos, style_masks=True)
                                for row in rows])

    def _draw_frame(self, step: int, texts) -> None:
        """Replace the previous frame with a step header and one rendered text per row."""
        cols, height = shutil.get_terminal_size((100, 30))
        header = f"step {step}" + (f"/{self.total}" if self.total else "")
        lines = [_DIM + header + _RESET]
        for b, text in enumerate(texts):
            if len(texts) > 1:
                lines.append(_DIM + f"[{b}]" + _RESET)
            lines.extend(text.split("\n"))
        # Terminal rows the frame occupies after wrapping; keep it within the screen, since the
        # cursor cannot move above the top line to erase an older, taller frame.
        used = [max(1, -(-_width(line) // cols)) for line in lines]
        while len(lines) > 1 and sum(used) > height - 1:
            lines.pop(1)
            used.pop(1)
        self._erase()
        self.stream.write("\n".join(lines))
        self.stream.flush()
        self._drawn_rows = sum(used)

    def _erase(self) -> None:
        if self._drawn_rows:
            # To the start of the frame's first line (\x1b[nF = n lines up, column 0), clear below.
            up = self._drawn_rows - 1
            self.stream.write((f"\x1b[{up}F" if up else "\r") + "\x1b[J")
            self._drawn_rows = 0

    def close(self) -> None:
        """Draw a pending frame so the final state was seen, then erase the frame (TTY): the
        caller prints the final completion as plain text below whatever preceded the view."""
        if not self.tty:
            return
        if self._pending is not None:
            self._draw()
            time.sleep(0.05)
        self._erase()
        self.stream.flush()
