"""Verification: which proposed tokens a sequence keeps, and the token after them.

A sequence that proposed k tokens d_1..d_k has k + 1 rows of target logits: row j scores the token
after ``prefix + d_1..d_j``. Each row is first processed as the sampler processes a row (logit_bias
and penalties, with the row's own output so far: ``generated + d_1..d_j``), so the target
distributions p_j are exactly those plain decoding would draw from.

- Greedy rows keep d_j while it is the argmax of row j - 1; the first mismatch is replaced by the
  argmax, and when all k are kept row k gives one more (the "bonus"). Tokens identical to plain
  decoding's.
- Random rows: standard speculative rejection sampling (Leviathan et al. 2023; Chen et al. 2023).
  d_j is kept with probability min(1, p_j(d_j) / q_j(d_j)); at the first rejection the token is drawn
  from max(0, p_j - q_j) renormalized, and after k acceptances from p_k. q is the proposer's
  distribution: the draft model's, or a point mass on d_j for n-gram proposals (then d_j is kept with
  probability p_j(d_j) and a rejection draws from p_j without d_j). Every output token is then
  distributed exactly as plain sampling's.
- logprobs: each emitted token's logprob and top alternatives come from its row, as the sampler's.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..reductions import argmax_rows
from ..sampler import SampleRow, filtered_probs, penalize
from ..sequence import Sequence


@dataclass
class Proposal:
    """k proposed tokens of one sequence; ``q``: (k, V) the proposer's probabilities of a random row
    (a draft model sampling); None: point masses (n-gram proposals, or any greedy row)."""

    tokens: list[int]
    q: torch.Tensor | None = None


@dataclass
class Verified:
    tokens: list[int]           # the kept proposals, then the target's token: 1 .. k + 1 tokens
    logprobs: list | None       # one (chosen logprob, top alternatives) per token, when asked
    num_accepted: int


def target_rows(seq: Sequence, proposal: Proposal) -> list[SampleRow]:
    """The k + 1 sampler rows of a verifying sequence (its proposals are not in ``token_ids``)."""
    prompt, out = seq.token_ids[:seq.num_prompt_tokens], seq.generated_ids
    d = proposal.tokens
    return [SampleRow(seq.params, prompt, out + d[:j], seq.generator) for j in range(len(d) + 1)]


def _logprobs(logp: torch.Tensor, tokens: list[int], k: int) -> list:
    dev = logp.device
    chosen = logp[torch.arange(len(tokens), device=dev), torch.tensor(tokens, device=dev)].tolist()
    if not k:
        return [(c, []) for c in chosen]
    top = torch.topk(logp[:len(tokens)], k, dim=1)
    return [(c, list(zip(i, v))) for c, i, v in zip(chosen, top.indices.tolist(), top.values.tolist())]


def _accept_random(p: torch.Tensor, proposal: Proposal, gen: torch.Generator | None) -> tuple[int, int]:
    """(kept proposals a, the token after them) for a random row; ``p``: (k + 1, V) normalized."""
    d = proposal.tokens
    k = len(d)
    dev = p.device
    rows = torch.arange(k, device=dev)
    d_t = torch.tensor(d, device=dev)
    pd = p[rows, d_t]
    qd = proposal.q[rows, d_t] if proposal.q is not None else torch.ones(k, device=dev)
    u = torch.rand(k, generator=gen, device=dev)
    # keep d_j with probability min(1, p/q): u < p/q, written without a division (q > 0: d_j was drawn from q)
    rejected = (u * qd >= pd).nonzero()
    a = int(rejected[0]) if len(rejected) else k
    if a == k:
        return a, int(torch.multinomial(p[k], 1, generator=gen))
    if proposal.q is not None:
        residual = (p[a] - proposal.q[a]).clamp_(min=0.0)
    else:
        residual = p[a].clone()
        residual[d[a]] = 0.0
    if not float(residual.sum()) > 0.0:  # p == q within rounding: rejection had probability ~0
        residual = p[a]
    return a, int(torch.multinomial(residual, 1, generator=gen))


@torch.inference_mode()
def verify(logits: torch.Tensor, seqs: list[Sequence], proposals: list[Proposal]) -> list[Verified]:
    """``logits``: (sum of k_i + 1, V) the target's rows of each sequence, in order."""
    rows = [r for s, pr in zip(seqs, proposals) for r in target_rows(s, pr)]
    logits = penalize(logits.float().clone(), rows)
    want_lp = any(s.params.logprobs is not None for s in seqs)
    logp = torch.log_softmax(logits, dim=-1) if want_lp else None
    greedy_best = argmax_rows(logits).tolist()
    random = [i for i, r in enumerate(rows) if not r.params.greedy]
    probs = None
    if random:
        probs = torch.zeros_like(logits)
        sub = filtered_probs(logits[random], [rows[i].params for i in random])
        probs[random] = sub / sub.sum(dim=-1, keepdim=True)
    out, at = [], 0
    for s, pr in zip(seqs, proposals):
        k = len(pr.tokens)
        if s.params.greedy:
            best = greedy_best[at:at + k + 1]
            a = next((j for j in range(k) if pr.tokens[j] != best[j]), k)
            tok = best[a]
        else:
            a, tok = _accept_random(probs[at:at + k + 1], pr, s.generator)
        emitted = pr.tokens[:a] + [tok]
        lps = _logprobs(logp[at:at + a + 1], emitted, s.params.logprobs) if s.params.logprobs is not None else None
        out.append(Verified(emitted, lps, a))
        at += k + 1
    return out
