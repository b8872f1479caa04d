"""Prompt logprobs (scoring): the logits of every prompt position of a sequence that asks for them.

A step's forward returns the rows of ``ModelRunner.prepare``'s ``logits_index``: first one row per
sequence that samples (``out.to_sample`` order), then the rows of ``prompt_spans(out)`` in order.
The logits at prompt position p score token p + 1, so a prompt of P tokens has P - 1 logprobs
(the first token has none). A chunked prefill adds a span per chunk; a recomputed sequence
(preempted) only adds the positions it has no logprob for yet. The values are the raw model's
(``log_softmax`` of its logits in float32: no logit_bias, penalties or temperature), as vLLM's.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .scheduler import SchedulerOutput
from .sequence import Sequence


class PromptLogprob(NamedTuple):
    """The logprob of one prompt token given the tokens before it."""
    token: int
    logprob: float
    rank: int                      # 1 = the most likely token (ties count as better)
    top: list[tuple[int, float]]   # the ``prompt_logprobs`` most likely (token id, logprob), best first


class PromptSpan(NamedTuple):
    """Positions ``first .. first + count - 1`` of ``seq``'s prompt, computed this step at flat rows
    ``row .. row + count - 1`` of the step's token batch."""
    seq: Sequence
    first: int
    count: int
    row: int


def prompt_spans(out: SchedulerOutput) -> list[PromptSpan]:
    """The prompt positions of this step whose logits are wanted, in scheduled order. Call before
    ``Scheduler.update`` (it reads ``num_computed_tokens`` as the step's start)."""
    spans, offset = [], 0
    for s in out.scheduled:
        seq, start = s.seq, s.seq.num_computed_tokens
        if seq.needs_prompt_logits:
            first = max(start, len(seq.prompt_lps))
            end = min(start + s.num_tokens, seq.num_prompt_tokens - 1)  # the last position samples
            if end > first:
                spans.append(PromptSpan(seq, first, end - first, offset + first - start))
        offset += s.num_tokens
    return spans


def span_rows(spans: list[PromptSpan]) -> list[int]:
    return [r for sp in spans for r in range(sp.row, sp.row + sp.count)]


@torch.inference_mode()
def record(spans: list[PromptSpan], logits: torch.Tensor) -> None:
    """Append each span's logprobs to its sequence's ``prompt_lps``. ``logits``: (sum of counts,
    vocab), the spans' rows in order."""
    at = 0
    for sp in spans:
        lp = torch.log_softmax(logits[at:at + sp.count].float(), dim=-1)  # (count, V)
        at += sp.count
        seq = sp.seq
        targets = torch.tensor(seq.token_ids[sp.first + 1:sp.first + 1 + sp.count], device=lp.device)
        chosen = lp.gather(1, targets[:, None])  # (count, 1)
        ranks = ((lp > chosen).sum(dim=1) + 1).tolist()
        k = seq.prompt_logprobs
        if k:
            top = torch.topk(lp, k, dim=1)
            alts = [list(zip(i, v)) for i, v in zip(top.indices.tolist(), top.values.tolist())]
        else:
            alts = [[] for _ in range(sp.count)]
        seq.prompt_lps.extend(PromptLogprob(t, c, r, a) for t, c, r, a in zip(
            targets.tolist(), chosen[:, 0].tolist(), ranks, alts))
