"""Completions' prompts (a string, token ids, or a list of either) and their logprobs: OpenAI's
legacy shape, with the prompt's tokens first when echoed, and vLLM's ``prompt_logprobs``. No HTTP,
no engine.

``text_offset`` is each token's character offset into the returned text: the running sum of the
lengths of the tokens' decoded strings (vLLM's rule), from 0 at the start of a choice's text (the
prompt's first token with echo), carried across a stream's chunks.
"""
from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple


MAX_PROMPTS = 2048  # prompts per completions request


def parse_prompts(prompt) -> list:
    """Completions' ``prompt``: a string, token ids, or a list of either (one choice group per
    prompt). Raises OpenAIError (400, ``param`` "prompt", naming the index of a bad item)."""
    from .openai import OpenAIError  # here: openai.py imports this module

    shape = "'prompt' must be a string, a list of token ids, or a list of strings or of lists of token ids"
    if isinstance(prompt, str) or isinstance(prompt, list) and prompt and all(_is_id(t) for t in prompt):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise OpenAIError(shape, param="prompt")
    for i, p in enumerate(prompt):
        if isinstance(p, str):
            if not p:
                raise OpenAIError(f"prompt[{i}] is an empty string", param="prompt")
        elif not isinstance(p, list) or not p or not all(_is_id(t) for t in p):
            raise OpenAIError(f"prompt[{i}] must be a non-empty string or a non-empty list of token ids "
                              "(integers >= 0)", param="prompt")
    if len(prompt) > MAX_PROMPTS:
        raise OpenAIError(f"'prompt' has {len(prompt)} prompts; at most {MAX_PROMPTS} per request", param="prompt")
    return prompt


def _is_id(t) -> bool:
    return isinstance(t, int) and not isinstance(t, bool) and t >= 0


class Entry(NamedTuple):
    """One token of a choice's ``logprobs``."""
    token: str
    logprob: float | None  # None: the prompt's first token (nothing before it to score it)
    top: dict | None


def decoder(tokenizer):
    """Token id -> its text (special tokens kept: they are part of what is scored), cached."""
    if tokenizer is None:
        return str

    @lru_cache(maxsize=65536)
    def decode(t: int) -> str:
        return tokenizer.decode([t], skip_special_tokens=False)

    return decode


def _top(decode, alts: list[tuple[int, float]]) -> dict:
    """Alternatives by their text, best first; tokens with the same text (a partial UTF-8 byte is
    "\ufffd") keep the best value, so the top value is always the most likely token's."""
    out: dict[str, float] = {}
    for a, v in alts:
        out.setdefault(decode(a), v)
    return out


def generated_entries(decode, token_ids: list[int], lps: list) -> list[Entry]:
    """``lps``: the engine's (chosen logprob, [(token id, logprob), ...]) per generated token."""
    return [Entry(decode(t), lp[0], _top(decode, lp[1])) for t, lp in zip(token_ids, lps)]


def prompt_entries(decode, ids: list[int], plps: list, k: int) -> list[Entry]:
    """``plps``: None, then a ``PromptLogprob`` per later prompt token; ``k`` alternatives each."""
    first = [Entry(decode(ids[0]), None, None)]
    return first + [Entry(decode(t), e.logprob, _top(decode, e.top[:k]))
                    for t, e in zip(ids[1:], plps[1:])]


def legacy(entries: list[Entry], offset: int = 0) -> dict:
    """OpenAI's completions ``logprobs`` object; ``offset``: the first token's ``text_offset``."""
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e.token)
    return {"tokens": [e.token for e in entries], "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [e.top for e in entries], "text_offset": offsets}


def vllm_prompt_logprobs(decode, plps: list, k: int) -> list:
    """vLLM's ``prompt_logprobs``: None, then per prompt token {token id: {logprob, rank,
    decoded_token}} for the token itself and its ``k`` most likely alternatives."""
    out: list = [None]
    for e in plps[1:]:
        t = e.token
        d = {str(t): {"logprob": e.logprob, "rank": e.rank, "decoded_token": decode(t)}}
        for r, (a, v) in enumerate(e.top[:k], start=1):
            d.setdefault(str(a), {"logprob": v, "rank": r, "decoded_token": decode(a)})
        out.append(d)
    return out
