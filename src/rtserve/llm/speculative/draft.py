"""Draft-model proposals: a smaller checkpoint with the target's vocabulary runs K forwards a step
on its own ``ModelRunner`` and KV cache, on the same device.

Its cache has the target's geometry (block size, block count), so the draft reads and writes
through the target's block tables: no second block manager. What it computed is tracked per
sequence (``_computed``) and cut back to the target's ``num_computed_tokens`` after each
verification (rejected proposals) and to 0 after a preemption (new blocks) or for a new sequence
(a prefix-cache hit gives the target's KV, not the draft's: the draft recomputes the prompt once;
it writes the same values into shared blocks, so nothing another sequence reads changes). Only the
proposals' quality depends on the draft's cache: the target verifies every token.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from ..config import DecoderConfig
from ..engine_config import EngineConfig
from ..reductions import argmax_rows
from ..sampler import filtered_probs
from ..scheduler import ScheduledSeq, SchedulerOutput
from ..sequence import Sequence
from .verify import Proposal


def _vocab(path: Path) -> dict | None:
    tj = path / "tokenizer.json"
    if not tj.is_file():
        return None
    return json.loads(tj.read_text()).get("model", {}).get("vocab")


def check_draft(draft: Path, target: Path) -> None:
    """ValueError unless ``draft`` is a checkpoint folder with the target's vocabulary."""
    if not (draft / "config.json").is_file():
        raise ValueError(f"engine.speculative.draft: {draft} is not a checkpoint folder (no config.json)")
    dv, tv = DecoderConfig.from_dir(draft).vocab_size, DecoderConfig.from_dir(target).vocab_size
    if dv != tv:
        raise ValueError(f"engine.speculative.draft: the draft's vocab_size {dv} differs from the model's {tv}")
    a, b = _vocab(draft), _vocab(target)
    if a is not None and b is not None and a != b:
        raise ValueError("engine.speculative.draft: the draft's tokenizer.json has another vocabulary than the model's")


class DraftProposer:
    def __init__(self, path: Path, target_path: Path, config: EngineConfig, target_runner, device: str) -> None:
        from ..model_runner import ModelRunner

        check_draft(path, target_path)
        cfg = dataclasses.replace(config, num_blocks=target_runner.num_blocks, speculative=None,
                                  max_model_len=target_runner.max_model_len, kv_cache_memory_fraction=None)
        limit = DecoderConfig.from_dir(path).max_position_embeddings
        if limit < cfg.max_model_len:
            raise ValueError(f"engine.speculative.draft: the draft's max_position_embeddings {limit} is below the "
                             f"model's context {cfg.max_model_len}; set engine.max_model_len <= {limit}")
        self.runner = ModelRunner(path, cfg, device)
        self._computed: dict[int, tuple[int, int]] = {}  # seq_id -> (num_preemptions, tokens in the draft's cache)

    def _start(self, seq: Sequence) -> int:
        pre, n = self._computed.get(seq.seq_id, (-1, 0))
        return min(n, seq.num_computed_tokens) if pre == seq.num_preemptions else 0

    @torch.inference_mode()
    def propose(self, seqs: list[Sequence], ks: list[int]) -> list[Proposal]:
        """``ks[i]`` tokens for ``seqs[i]``: the draft first catches up on the sequence's tokens it
        has not computed (the last sampled one at least), then runs one token at a time. The
        blocks for the proposals' positions are allocated already (by the speculator)."""
        views = [Sequence(list(s.token_ids), 0, seq_id=s.seq_id, num_prompt_tokens=s.num_prompt_tokens,
                          num_computed_tokens=self._start(s), block_table=s.block_table) for s in seqs]
        tokens: list[list[int]] = [[] for _ in seqs]
        qs: list[list[torch.Tensor]] = [[] for _ in seqs]
        live = list(range(len(seqs)))
        while live:
            step = SchedulerOutput([ScheduledSeq(views[i], views[i].num_uncomputed) for i in live])
            logits = self.runner.run(step).float()
            self._choose(logits, [seqs[i] for i in live], [tokens[i] for i in live], [qs[i] for i in live])
            for i in live:
                v = views[i]
                v.num_computed_tokens = v.num_tokens
                v.append_token(tokens[i][-1])
            live = [i for i in live if len(tokens[i]) < ks[i]]
        for s, v in zip(seqs, views):
            self._computed[s.seq_id] = (s.num_preemptions, v.num_computed_tokens)
        return [Proposal(t, torch.stack(q) if q else None) for t, q in zip(tokens, qs)]

    @staticmethod
    def _choose(logits: torch.Tensor, seqs: list[Sequence], tokens: list[list[int]], qs: list[list]) -> None:
        """Greedy rows: the draft's argmax; random rows: a draw from the draft's distribution under
        the row's temperature / top-k / top-p / min-p, kept as q for the rejection test."""
        best = argmax_rows(logits).tolist()
        random = [j for j, s in enumerate(seqs) if not s.params.greedy]
        if random:
            probs = filtered_probs(logits[random], [seqs[j].params for j in random])
            probs = probs / probs.sum(dim=-1, keepdim=True)
            for r, j in enumerate(random):
                best[j] = int(torch.multinomial(probs[r], 1, generator=seqs[j].generator))
                qs[j].append(probs[r])
        for j, t in enumerate(best):
            tokens[j].append(t)

    def settle(self, seqs: list[Sequence]) -> None:
        """After verification: the draft's cache holds no more than the target kept."""
        for s in seqs:
            pre, n = self._computed.get(s.seq_id, (-1, 0))
            if pre == s.num_preemptions and n > s.num_computed_tokens:
                self._computed[s.seq_id] = (pre, s.num_computed_tokens)

    def forget(self, seq_id: int) -> None:
        self._computed.pop(seq_id, None)

    def prune(self, live: set[int]) -> None:
        for i in [i for i in self._computed if i not in live]:
            del self._computed[i]
