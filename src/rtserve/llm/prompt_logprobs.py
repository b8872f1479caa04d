"""Prompt logprobs (scoring): the logits of every prompt position of a sequence that asks for them.

A step's forward returns the rows of ``ModelRunner.prepare``'s ``logits_index``: first one row per
sequence that samples (``out.to_sample`` order), then the rows of ``prompt_spans(out)`` in order.
The logits at prompt position p score token p + 1, so a prompt of P tokens has P - 1 logprobs
(the first token has none). A chunked prefill adds a span per chunk; a recomputed sequence
(preempted) only adds the positions it has no logprob for yet. The values are the raw model's
(``log_softmax`` of its logits in float32: no logit_bias, penalties or temperature), as vLLM's.

A cached prefix has no logits, so a scored prompt used to compute its whole prompt. Now a full block
a scored prompt computes keeps ``BlockScores`` in the prefix cache: its tokens' logprobs and the
log-probabilities at its last position (one vocabulary row: they score whatever token comes next).
A later scored prompt with that prefix takes the blocks (``accepts``) and gets those logprobs
(``fill_from_cache``) -- lm-eval's four choices of a question share the question's blocks.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .reductions import max_rows
from .scheduler import SchedulerOutput
from .sequence import Sequence


class PromptLogprob(NamedTuple):
    """The logprob of one prompt token given the tokens before it."""
    token: int
    logprob: float
    rank: int | None               # 1 = the most likely token (ties count as better); None: not asked for
    top: list[tuple[int, float]]   # the ``prompt_logprobs`` most likely (token id, logprob), best first


class BlockScores(NamedTuple):
    """What a cached full block keeps for scored prompts (``BlockManager`` holds it opaquely)."""
    entries: tuple           # PromptLogprob of the block's tokens (block 0: from its second token)
    last: torch.Tensor       # (V,) log-probabilities at the block's last position
    k: int                   # alternatives kept per entry
    ranks: bool              # entries carry ranks


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
def record(spans: list[PromptSpan], logits: torch.Tensor, block_size: int | None = None) -> None:
    """Append each span's logprobs to its sequence's ``prompt_lps``. ``logits``: (sum of counts,
    vocab), the spans' rows in order. One batched pass for all spans (a step scoring 16 prompts of
    28 tokens has 432 rows of 32k logits): one ``log_softmax`` (fused; faster here than
    ``logsumexp``, which is composite), one gather, one top-k, and the rank pass -- as costly as the
    others together -- only for the sequences that asked for ranks (``SamplingParams.prompt_ranks``)."""
    if not spans:
        return
    targets = [t for sp in spans for t in sp.seq.token_ids[sp.first + 1:sp.first + 1 + sp.count]]
    lp = torch.log_softmax(logits.float(), dim=-1)  # (R, V)
    chosen_t = lp.gather(1, torch.tensor(targets, device=lp.device)[:, None])  # (R, 1)
    chosen = chosen_t[:, 0].tolist()
    ranks = None
    if any(_wants_ranks(sp.seq) for sp in spans):  # ties count as better
        ranks = ((lp > chosen_t).sum(dim=1, dtype=torch.int32) + 1).tolist()
    k_max = max(sp.seq.prompt_logprobs or 0 for sp in spans)
    if k_max == 1:  # lm-eval's logprobs=1: a max is cheaper than a top-k
        values, indices = max_rows(lp)
        top_ids, top_lps = indices[:, None].tolist(), values[:, None].tolist()
    elif k_max:
        top = torch.topk(lp, k_max, dim=1)
        top_ids, top_lps = top.indices.tolist(), top.values.tolist()
    at = 0
    for sp in spans:
        k = sp.seq.prompt_logprobs or 0
        rank = ranks if ranks is not None and _wants_ranks(sp.seq) else None
        sp.seq.prompt_lps.extend(
            PromptLogprob(targets[r], chosen[r], rank[r] if rank else None,
                          list(zip(top_ids[r][:k], top_lps[r][:k])) if k else [])
            for r in range(at, at + sp.count))
        if block_size:
            _keep_block_scores(sp, lp[at:at + sp.count], block_size, rank is not None)
        at += sp.count


def _keep_block_scores(sp: PromptSpan, lp: torch.Tensor, bs: int, ranks: bool) -> None:
    """For each block whose last position is in the span: its ``BlockScores``, for the prefix cache."""
    seq = sp.seq
    for pos in range(sp.first + (-(sp.first + 1)) % bs, sp.first + sp.count, bs):  # (pos + 1) % bs == 0
        n = pos // bs
        entries = tuple(seq.prompt_lps[max(0, n * bs - 1):n * bs + bs - 1])
        seq.block_scores[n] = BlockScores(entries, lp[pos - sp.first].clone(), seq.prompt_logprobs or 0, ranks)


def accepts(seq: Sequence, scores: BlockScores | None) -> bool:
    """Whether a cached block's scores serve ``seq``'s scored prompt (enough alternatives; ranks)."""
    return scores is not None and scores.k >= (seq.prompt_logprobs or 0) and (scores.ranks or not _wants_ranks(seq))


@torch.inference_mode()
def fill_from_cache(seq: Sequence, blocks: list[BlockScores]) -> None:
    """The logprobs of the first ``num_cached_tokens`` prompt tokens and the next one, from the
    scores of the cached blocks it took (the scheduler took only blocks ``accepts`` passed)."""
    k = seq.prompt_logprobs or 0
    for b in blocks:
        seq.prompt_lps.extend(e._replace(top=e.top[:k]) for e in b.entries)
    row, t = blocks[-1].last, seq.token_ids[len(seq.prompt_lps) + 1]
    v = row[t]
    rank = int((row > v).sum()) + 1 if _wants_ranks(seq) else None
    top = torch.topk(row, k) if k else None
    seq.prompt_lps.append(PromptLogprob(t, float(v), rank, list(zip(top.indices.tolist(), top.values.tolist()))
                                        if k else []))


def _wants_ranks(seq: Sequence) -> bool:
    return getattr(seq.params, "prompt_ranks", True)
