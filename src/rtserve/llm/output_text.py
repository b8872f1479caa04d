"""A choice's output text: incremental detokenization and stop strings, in one object per choice.

Where text is made depends on where the engine runs: the offline ``LLM`` and the engine thread
(``AsyncLLM``) detokenize in the engine (``LLM._check_stop_strings``); with the engine in its own
process (``engine_core``) the engine sends token ids only and the API process makes the text
(``ChoiceText``, on the reader thread), so the engine process never decodes. Both use
:class:`TextStream`, so a stop string ends a choice at the same token either way:

- the text grows one token at a time (so it depends on the tokens only, not on how many came in a
  step); a token that ends inside a multi-byte character adds nothing until the character is complete;
- a stop string ends the choice at the token that completed it: the text is cut before it, and the
  tokens after that one are dropped (several new tokens in a step: speculation; on the API side,
  the steps the engine process ran before it heard of the stop are dropped too);
- the choice's last token is checked too, so a stop string completed by it ends the choice with
  ``stop`` rather than ``length`` (as vLLM does).
"""
from __future__ import annotations

import dataclasses

from .tokenizer import IncrementalDetokenizer, find_stop


class TextStream:
    """One choice's text and its stop strings; ``prompt``: its first token is decoded after the
    prompt's last tokens (``IncrementalDetokenizer``'s context)."""

    def __init__(self, tokenizer, stops: tuple[str, ...] = (), prompt: list[int] = ()) -> None:
        self.stops = tuple(stops)
        self.detok = IncrementalDetokenizer(tokenizer, prompt)
        self.stopped = False  # a stop string ended the text: it no longer grows

    @property
    def text(self) -> str:
        return self.detok.text

    def update(self, ids: list[int], new: int, finished: bool) -> int | None:
        """``ids``: every token of the choice so far, the last ``new`` of them new; ``finished``: the
        engine ended the choice. Returns None, or how many tokens to keep when a stop string completed
        in the new tokens (the text is then cut before it). The text grows one token at a time, so it
        depends on the tokens only, never on how many came at once. Raises what the tokenizer raises."""
        if self.stopped:
            return None
        for m in range(len(ids) - new + 1, len(ids) + 1):
            if self._stops_at(self.detok.update(ids[:m])):
                return m
        if finished and self._stops_at(self.detok.finish(ids)):  # the text held back for a partial character
            return len(ids)
        return None

    def _stops_at(self, delta: str) -> bool:
        """Whether ``delta``, just added, completed a stop string; if so the text is cut before it."""
        if not delta or not self.stops:
            return False
        i = find_stop(self.text, self.stops, len(delta))
        if i < 0:
            return False
        self.detok.text = self.text[:i]
        self.stopped = True
        return True


class ChoiceText:
    """The API side of one choice whose engine sends token ids only (the engine process): each of its
    ``StreamDelta``s gets its text here, held back by ``hold`` characters while a stop string may be
    forming, and a stop string ends the choice (``stopped``: the caller tells the engine)."""

    def __init__(self, tokenizer, stops: tuple[str, ...], prompt: list[int] = ()) -> None:
        self.stream = TextStream(tokenizer, stops, prompt) if tokenizer is not None else None
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.ids: list[int] = []
        self.sent_chars = 0
        self.stopped = False

    def apply(self, d):
        """``d`` (a ``StreamDelta`` from the engine, text empty) with its text, cut at a stop string:
        then its tokens end at the one that completed it and its finish reason is ``stop``."""
        self.ids += d.token_ids
        if self.stream is None:
            return d
        done = d.finish_reason is not None
        if d.failure is None:
            keep = self.stream.update(self.ids, len(d.token_ids), done)
            if keep is not None:
                cut = len(d.token_ids) - (len(self.ids) - keep)
                del self.ids[keep:]
                lps = d.logprobs[:cut] if d.logprobs is not None else None
                d = dataclasses.replace(d, token_ids=d.token_ids[:cut], logprobs=lps, finish_reason="stop",
                                        num_generated=keep)
                self.stopped = done = True
        text = self.stream.text
        upto = len(text) if done else max(self.sent_chars, len(text) - self.hold)
        d.text = text[self.sent_chars:upto]
        self.sent_chars = upto
        return d
