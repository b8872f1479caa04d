"""The engine's hooks for speculative decoding, around one step:

1. ``propose(out)``, after the scheduler: each decoding sequence that may speculate gets up to K
   proposals, within the step's token budget and free KV blocks (never a preemption). They are
   appended to its ``token_ids`` and to its scheduled tokens (``ScheduledSeq.num_spec``), so the
   runner computes them like any tokens and returns ``num_spec + 1`` logits rows for it.
2. ``verify(...)``, after the forward: ``verify.py`` picks the tokens each sequence keeps; the
   proposals are taken back out of ``token_ids`` and the scheduled count, and the kept tokens plus
   the next one go to ``Scheduler.update`` as a list (it counts the kept ones as computed, and only
   then registers full blocks in the prefix cache: a block holding a rejected token never is).
3. ``settle(...)``, after the update: blocks past the sequence's tokens go back (``BlockManager.trim``),
   the draft model's cache is cut back to what the target kept, statistics.

Which sequences speculate: decoding ones (prefill done) with room for at least 2 more tokens, and
not constrained (structured outputs: the grammar would have to advance through each proposal) nor
seeded and sampled (a seed promises the same tokens in any batch; the proposals a sequence gets
depend on the step's budget). Everything else the sampler applies -- temperature, top-k, top-p,
min-p, logit_bias, repetition/presence/frequency penalties, logprobs -- is applied under speculation
(``verify.py``), and stop tokens, stop strings, ``max_tokens`` and ``max_model_len`` cut the kept
tokens where plain decoding would have stopped. A sequence whose proposals keep being rejected
proposes less often (after 1, 3, 7, ... up to ``MAX_BACKOFF`` steps without) and then one token
only (a probe: 2 rows), until a proposal is accepted again.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..scheduler import ScheduledSeq, Scheduler, SchedulerOutput
from ..sequence import Sequence
from .config import SpeculativeConfig
from .ngram import NgramProposer
from .verify import Proposal, Verified, verify

log = logging.getLogger("rtserve.llm")
MAX_BACKOFF = 64
PRUNE_EVERY = 256  # steps


@dataclass
class SpecStats:
    """Counters (vLLM's ``spec_decode_num_drafts`` etc.): acceptance rate = accepted / draft
    tokens; tokens per verifying step = emitted / drafts."""

    num_drafts: int = 0            # sequence-steps that verified proposals
    num_draft_tokens: int = 0      # tokens proposed (and verified)
    num_accepted_tokens: int = 0   # of which kept
    num_emitted_tokens: int = 0    # tokens those sequence-steps output (kept + 1, less what a stop cut)
    accepted_per_pos: list[int] = field(default_factory=list)  # [j]: proposals at position j kept


@dataclass
class StepDrafts:
    """The step's verifying sequences, in scheduled order, and what each proposed."""

    scheduled: list[ScheduledSeq]
    proposals: list[Proposal]
    generated_before: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(len(p.tokens) for p in self.proposals)


@dataclass
class _Backoff:
    misses: int = 0  # verifications in a row that kept nothing
    skip: int = 0    # steps left without proposals


class Speculator:
    def __init__(self, config: SpeculativeConfig, scheduler: Scheduler, proposer) -> None:
        self.config, self.scheduler, self.proposer = config, scheduler, proposer
        self.stats = SpecStats(accepted_per_pos=[0] * config.num_tokens)
        self._backoff: dict[int, _Backoff] = {}
        self._steps = 0

    @classmethod
    def build(cls, config: SpeculativeConfig, path: Path, engine_config, runner, scheduler: Scheduler,
              device: str) -> "Speculator":
        if config.method == "ngram":
            return cls(config, scheduler, NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max))
        from .draft import DraftProposer

        draft = Path(config.draft)
        draft = draft if draft.is_absolute() else Path(path) / draft
        return cls(config, scheduler, DraftProposer(draft, Path(path), engine_config, runner, device))

    # -- 1. proposals ------------------------------------------------------------------------------
    def _budget(self, s: ScheduledSeq) -> int:
        """How many tokens ``s`` may propose this step (0: none)."""
        seq, sc = s.seq, self.scheduler.config
        p = seq.params
        if (s.num_tokens != 1 or not s.completes or p is None or seq.grammar is not None
                or (seq.generator is not None and not p.greedy)):
            return 0
        k = self.config.num_tokens
        b = self._backoff.get(seq.seq_id)
        if b is not None and b.misses:
            if b.skip:
                b.skip -= 1
                return 0
            k = 1  # a probe after misses: 2 rows, not K + 1
        return max(0, min(k, seq.max_tokens - seq.num_generated - 1, sc.max_model_len - seq.num_tokens - 1))

    def propose(self, out: SchedulerOutput) -> StepDrafts | None:
        self._steps += 1
        if self._steps % PRUNE_EVERY == 0:
            self._prune()
        budget = self.scheduler.config.max_num_batched_tokens - out.num_batched_tokens
        bm = self.scheduler.bm
        chosen: list[tuple[ScheduledSeq, int]] = []
        for s in out.scheduled:
            k = min(self._budget(s), budget)
            if k <= 0:
                continue
            if self.config.method == "draft" and not bm.allocate(s.seq, 1 + k):  # the draft writes there
                continue
            chosen.append((s, k))
            budget -= k
        if not chosen:
            return None
        if self.config.method == "draft":
            props = self.proposer.propose([s.seq for s, _ in chosen], [k for _, k in chosen])
        else:
            props = [Proposal(self.proposer.propose(s.seq, k)) for s, k in chosen]
        step = StepDrafts([], [])
        for (s, _), pr in zip(chosen, props):
            if not pr.tokens or not bm.allocate(s.seq, 1 + len(pr.tokens)):
                continue
            s.seq.token_ids.extend(pr.tokens)
            s.num_tokens += len(pr.tokens)
            s.num_spec = len(pr.tokens)
            step.scheduled.append(s)
            step.proposals.append(pr)
            step.generated_before.append(s.seq.num_generated - s.num_spec)
        return step if step.scheduled else None

    def rollback(self, step: StepDrafts) -> None:
        """Take the proposals back out of the sequences and the step (before update, or on failure)."""
        for s in step.scheduled:
            if s.num_spec:
                del s.seq.token_ids[-s.num_spec:]
                s.num_tokens -= s.num_spec
                s.num_spec = 0

    # -- 2. verification ---------------------------------------------------------------------------
    def verify(self, step: StepDrafts, to_sample: list[Sequence], logits: torch.Tensor,
               fail) -> tuple[list[Sequence], torch.Tensor, dict[int, list[int]]]:
        """Split the sampled rows: returns the sequences that sample as usual with their rows, and
        seq_id -> tokens of the verifying ones (their logprobs appended). ``fail(seq, status,
        message)`` ends a sequence whose rows are not finite. Rolls the proposals back."""
        spec = {s.seq.seq_id: j for j, s in enumerate(step.scheduled)}
        plain_rows, spec_rows, plain = [], [], []
        at = 0
        for seq in to_sample:
            j = spec.get(seq.seq_id)
            if j is None:
                plain_rows.append(at)
                plain.append(seq)
                at += 1
            else:
                n = 1 + len(step.proposals[j].tokens)
                spec_rows.extend(range(at, at + n))
                at += n
        dev = logits.device
        spec_logits = logits[torch.tensor(spec_rows, device=dev)]
        plain_logits = logits[torch.tensor(plain_rows, device=dev, dtype=torch.long)]
        self.rollback(step)
        finite = torch.isfinite(spec_logits.sum(dim=-1)).tolist()
        seqs, props, rows, at = [], [], [], 0
        for s, pr in zip(step.scheduled, step.proposals):
            n = len(pr.tokens) + 1
            if all(finite[at:at + n]):
                seqs.append(s.seq)
                props.append(pr)
                rows.extend(range(at, at + n))
            else:
                fail(s.seq, 500, "the model produced NaN or infinite logits for this sequence")
            at += n
        results = verify(spec_logits[rows] if len(rows) != at else spec_logits, seqs, props) if seqs else []
        tokens = {}
        for seq, pr, v in zip(seqs, props, results):
            tokens[seq.seq_id] = v.tokens
            if v.logprobs is not None:
                seq.output_logprobs.extend(v.logprobs)
            self._count(seq.seq_id, pr, v)
        return plain, plain_logits, tokens

    def _count(self, seq_id: int, pr: Proposal, v: Verified) -> None:
        st = self.stats
        st.num_drafts += 1
        st.num_draft_tokens += len(pr.tokens)
        st.num_accepted_tokens += v.num_accepted
        for j in range(v.num_accepted):
            st.accepted_per_pos[j] += 1
        b = self._backoff.setdefault(seq_id, _Backoff())
        if v.num_accepted:
            b.misses = b.skip = 0
        else:
            b.misses += 1
            b.skip = min(2 ** b.misses - 1, MAX_BACKOFF)

    # -- 3. after the update -----------------------------------------------------------------------
    def settle(self, step: StepDrafts) -> None:
        bm = self.scheduler.bm
        for s, before in zip(step.scheduled, step.generated_before):
            seq = s.seq
            self.stats.num_emitted_tokens += seq.num_generated - before
            if seq.params.logprobs is not None:  # a stop token cut the kept tokens
                del seq.output_logprobs[seq.num_generated:]
            if seq.is_finished:
                self.forget(seq.seq_id)
                continue
            bm.trim(seq, seq.num_tokens)
        if hasattr(self.proposer, "settle"):
            self.proposer.settle([s.seq for s in step.scheduled if not s.seq.is_finished])

    def forget(self, seq_id: int) -> None:
        self._backoff.pop(seq_id, None)
        self.proposer.forget(seq_id)

    def _prune(self) -> None:
        """Drop the state of sequences that ended without ``forget`` (a caller that never said)."""
        sc = self.scheduler
        live = {s.seq_id for s in sc.running} | {s.seq_id for s in sc.waiting}
        for i in [i for i in self._backoff if i not in live]:
            del self._backoff[i]
        self.proposer.prune(live)

