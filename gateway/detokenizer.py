"""Streaming token ids -> text, one chunk per step, without ever cutting a character in half.

A byte-level BPE token is a run of bytes, not characters: an emoji or a CJK character often spans 2-4 tokens, and
decoding a prefix that ends inside one gives U+FFFD. The detokenizer keeps two offsets into the recent ids (as
vLLM does): text up to `read_offset` has been emitted; `prefix_offset..read_offset` is the last emitted chunk,
decoded again as context so decoders that treat the start of a sequence specially (SentencePiece's leading space)
agree with a decode of the whole sequence. Each step decodes only that short window, never the whole sequence.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvrelay.tokenizer import Tokenizer

REPLACEMENT_CHAR = "\ufffd"
# Prompt ids kept as context for the first generated token (vLLM uses the same 5).
PROMPT_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Feed generated ids with add(); each call returns only the newly completed text, flush() the rest.

    The concatenation of every add() and the final flush() equals tokenizer.decode(all generated ids).
    Text that ends in an incomplete character is held back until a later token completes it; bytes that can
    never form a character (a model can emit them) come out as U+FFFD, exactly where decode() puts them.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = False) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        # Only the window from prefix_offset on is kept: older ids are never decoded again.
        self._ids: list[int] = list(prompt_ids[-PROMPT_CONTEXT_TOKENS:]) if prompt_ids else []
        self._prefix_offset = 0
        self._read_offset = len(self._ids)

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)

    def _advance(self, final: bool) -> str:
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        # Hold back while the window ends inside a character: its bytes decode to U+FFFD only for now.
        if len(new_text) <= len(prefix_text) or (new_text.endswith(REPLACEMENT_CHAR) and not final):
            return ""
        # The chunk just emitted becomes the next step's context; everything before it is dropped.
        del self._ids[: self._read_offset]
        self._prefix_offset, self._read_offset = 0, len(self._ids)
        return new_text[len(prefix_text) :]

    def add(self, token_ids: Sequence[int]) -> str:
        """Append generated ids; return the text they complete (possibly "")."""
        self._ids.extend(token_ids)
        return self._advance(final=False)

    def flush(self) -> str:
        """The text still held back at the end of generation (an unfinished character comes out as U+FFFD)."""
        return self._advance(final=True)
