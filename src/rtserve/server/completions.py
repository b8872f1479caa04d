"""/v1/completions with several prompts: every prompt is checked before any is queued, all are
queued together (their steps batch), and their deltas come back as one stream whose choice
``index`` is prompt_index * n + i. ``Usage`` counts a request's tokens from its deltas."""
from __future__ import annotations

import asyncio
import dataclasses
from typing import AsyncIterator

from ..errors import InvalidInput


class Usage:
    """Prompt tokens once per prompt, generated tokens of every choice, prefix-cache hits (the most
    any choice of a prompt found). ``n``: the engine's choices per prompt."""

    def __init__(self, n: int) -> None:
        self.n, self.completion = n, 0
        self.prompt: dict[int, int] = {}
        self.cached: dict[int, int] = {}

    def add(self, d) -> None:
        p = d.index // self.n
        self.prompt[p] = d.num_prompt_tokens
        self.cached[p] = max(self.cached.get(p, 0), d.num_cached_tokens)
        self.completion += len(d.token_ids)

    @property
    def totals(self) -> tuple[int, int, int]:
        """(prompt tokens, completion tokens, cached prompt tokens)."""
        return sum(self.prompt.values()), self.completion, sum(self.cached.values())


async def open_prompts(model, req) -> tuple[AsyncIterator, list[list[int]]]:
    """Tokenize and check every prompt of ``req`` (a bad one is a 400 naming ``prompt`` and its
    index, nothing queued), then open them all; if one is refused (429, 400), the others are closed
    (their sequences aborted) and its error raised. Returns the merged deltas and the prompts' ids."""
    many = len(req.prompts) > 1
    ids = []
    for i, prompt in enumerate(req.prompts):
        try:
            ids.append(model.prompt_ids(prompt, None, req.params.max_tokens if req.max_tokens_given else None,
                                        req.params.stop_token_ids))
        except InvalidInput as e:
            if not many:
                raise
            raise InvalidInput(f"prompt[{i}]: {e.message}", param=e.param) from None
    opened = await asyncio.gather(*(model.open_stream(x, None, req.params, max_tokens_given=req.max_tokens_given)
                                    for x in ids), return_exceptions=True)
    failed = [r for r in opened if isinstance(r, BaseException)]
    if failed:
        for r in opened:
            if not isinstance(r, BaseException):
                await r.aclose()
        raise failed[0]
    return (opened[0] if not many else merge(opened, req.params.n)), ids


async def merge(streams: list, n: int) -> AsyncIterator:
    """The deltas of ``streams`` (prompt p's choice i renumbered p * n + i) as they come."""
    pending = {asyncio.ensure_future(anext(s, None)): p for p, s in enumerate(streams)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in sorted(done, key=pending.get):
                p = pending.pop(task)
                d = task.result()
                if d is None:
                    continue
                pending[asyncio.ensure_future(anext(streams[p], None))] = p
                yield dataclasses.replace(d, index=p * n + d.index)
    finally:
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)  # a generator cannot close while running
        for s in streams:
            await s.aclose()
