"""Incremental detokenization that never emits a broken UTF-8 character.

Stateless per call: the caller threads (window, prefix_offset, read_offset) through, where `window` holds only the
tokens from prefix_offset on, so every call costs O(new tokens) and nothing grows with the text already sent.
A byte-level BPE token can end inside a multi-byte character; its decode then ends in U+FFFD and we wait for the
next token before emitting anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

REPLACEMENT = "\ufffd"


def decode_delta(
    tokenizer: Any, window: Sequence[int], prefix_offset: int, read_offset: int, *, final: bool = False
) -> tuple[str, int, int]:
    """Text that `window[read_offset:]` adds after `window[prefix_offset:read_offset]`.

    Returns (delta, new_prefix_offset, new_read_offset); offsets index `window`. Decoding a little context
    (prefix..read) keeps tokenizers' leading-space and merge rules right for the delta.

    Unread tokens are taken one at a time, so the text never depends on how the tokens were grouped into calls
    (how many an llm response carried). That matters for byte-fallback tokenizers: <0x37><0x87> decodes as "7"
    then U+FFFD one token at a time, but as two U+FFFD at once, since the decoder replaces every byte of an
    invalid run. vLLM's incremental detokenizer steps token by token for the same reason.
    """
    ids = list(window)
    deltas: list[str] = []
    for end in range(read_offset + 1, len(ids) + 1):
        delta, prefix_offset, read_offset = _step(
            tokenizer, ids[:end], prefix_offset, read_offset, final=final and end == len(ids)
        )
        deltas.append(delta)
    return "".join(deltas), prefix_offset, read_offset


def _step(tokenizer: Any, ids: list[int], prefix_offset: int, read_offset: int, *, final: bool) -> tuple[str, int, int]:
    """One token's worth: emit the new text unless it ends inside a character (then wait for the next token)."""
    prefix_text = tokenizer.decode(ids[prefix_offset:read_offset], skip_special_tokens=True)
    full_text = tokenizer.decode(ids[prefix_offset:], skip_special_tokens=True)
    if len(full_text) > len(prefix_text) and (final or not full_text.endswith(REPLACEMENT)):
        return full_text[len(prefix_text):], read_offset, len(ids)
    return "", prefix_offset, read_offset


@dataclass
class DetokenizerState:
    """The caller's side of `decode_delta`: keeps a short window and rebases the offsets after each call."""

    window: list[int] = field(default_factory=list)
    prefix_offset: int = 0
    read_offset: int = 0

    def push(self, tokenizer: Any, new_ids: Sequence[int], *, final: bool = False) -> str:
        self.window.extend(int(i) for i in new_ids)
        delta, prefix, read = decode_delta(
            tokenizer, self.window, self.prefix_offset, self.read_offset, final=final
        )
        self.advance(prefix, read)
        return delta

    def advance(self, prefix_offset: int, read_offset: int) -> None:
        """Adopt offsets returned for the current window, dropping tokens before prefix_offset."""
        del self.window[:prefix_offset]
        self.read_offset = read_offset - prefix_offset
        self.prefix_offset = 0
