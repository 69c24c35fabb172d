"""Multi-turn chat with a masked-diffusion model (`tasks/infer.py --chat`).

Every turn re-encodes the whole conversation with the tokenizer's chat template and generates the
assistant reply as `max_new_tokens` masks after it; the reply (cut at EOS and stop strings) joins
the history. Diffusion models have no incremental decoding across turns, so each turn pays for
the full conversation.
"""
from __future__ import annotations

import sys
from typing import Callable, Dict, List, Optional

import torch

from veomni.diffusion.sampling import decode_trimmed
from veomni.inference.generate import chat_prompt_ids, generate, left_pad

RESET, EXIT = "/reset", "/exit"


class ChatSession:
    """A conversation: `reply(text)` returns the assistant's answer and keeps both in `messages`.

    config: GenerationConfig (or dict) for every turn. callback_factory(prompt_len) -> a
    step_callback (e.g. a LiveView) or None, made fresh for each turn.
    """

    def __init__(self, model, tokenizer, config=None, system_prompt: Optional[str] = None,
                 callback_factory: Optional[Callable[[int], Optional[Callable]]] = None):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.system_prompt = system_prompt
        self.callback_factory = callback_factory
        self.messages: List[Dict[str, str]] = []
        self.last_output = None
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []

    def reply(self, text: str) -> str:
        turn = self.messages + [{"role": "user", "content": text}]
        ids, mask = left_pad([chat_prompt_ids(self.tokenizer, turn)], 0, device=self.model.device)
        callback = self.callback_factory(ids.shape[1]) if self.callback_factory else None
        try:
            out = generate(self.model, ids, self.config, attention_mask=mask, step_callback=callback)
        finally:
            if callback is not None and hasattr(callback, "close"):
                callback.close()
        answer = decode_trimmed(self.tokenizer, out)[0]
        self.messages = turn + [{"role": "assistant", "content": answer}]
        self.last_output = out
        return answer


def interactive_loop(session: ChatSession, stdin=None, stdout=None, on_reply=None) -> int:
    """Read user turns line by line until /exit or end of input; `/reset` forgets the history.
    Prompts ("you> ") are shown only when stdin is a terminal. Returns the number of replies."""
    stdin = stdin if stdin is not None else sys.stdin
    stdout = stdout if stdout is not None else sys.stdout
    interactive = stdin.isatty()
    if interactive:
        stdout.write(f"chat: type a message; {RESET} clears the history, {EXIT} (or Ctrl-D) quits\n")
    replies = 0
    while True:
        if interactive:
            stdout.write("you> ")
            stdout.flush()
        line = stdin.readline()
        if not line:
            break
        text = line.rstrip("\n")
        if not text.strip():
            continue
        if text.strip() == EXIT:
            break
        if text.strip() == RESET:
            session.reset()
            stdout.write("(history cleared)\n")
            continue
        with torch.no_grad():
            answer = session.reply(text)
        stdout.write(("bot> " if interactive else "") + answer + "\n")
        stdout.flush()
        replies += 1
        if on_reply is not None:
            on_reply(session)
    return replies
