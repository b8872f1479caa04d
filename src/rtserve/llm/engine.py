"""The offline engine: ``LLM(path).generate(prompts, SamplingParams(...))``, prompts as text or
token ids.

One step reads like its diagram: schedule -> run the model -> sample -> update, then stop strings
are checked on the new text. ``async_engine.AsyncLLM`` runs this loop on a thread for the server.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .block_manager import BlockManager
from .engine_config import EngineConfig
from .model_runner import ModelRunner
from .sampler import SampleRow, sample
from .sampling_params import SamplingParams
from .scheduler import Scheduler, SchedulerConfig
from .sequence import FinishReason, Sequence
from .tokenizer import IncrementalDetokenizer, Tokenizer, find_stop


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list | None


@dataclass
class RequestOutput:
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]


def with_overrides(config: EngineConfig, overrides: dict) -> EngineConfig:
    """``config`` with some fields replaced (validated again); an unknown name is a TypeError, as
    for any keyword argument."""
    unknown = sorted(set(overrides) - set(EngineConfig.keys()))
    if unknown:
        raise TypeError(f"LLM() got an unexpected keyword argument '{unknown[0]}'; "
                        f"engine options: {', '.join(EngineConfig.keys())}")
    return dataclasses.replace(config, **overrides) if overrides else config


class LLM:
    def __init__(self, path: Path | str, config: EngineConfig | None = None, *, device: str = "cpu",
                 **overrides) -> None:
        """``config`` (default ``EngineConfig()``) with ``overrides`` of its fields, e.g.
        ``LLM(path, num_blocks=64, dtype="bfloat16")``. ``pipeline_stages`` > 1 runs the layers in
        worker processes (``PipelineRunner``); otherwise one ``ModelRunner`` in this process."""
        config = with_overrides(EngineConfig() if config is None else config, overrides)
        self.engine_config = config
        if config.pipeline_stages and config.pipeline_stages > 1:  # layers split over worker processes
            from .pipeline_runner import PipelineRunner

            self.runner = PipelineRunner(path, config, device)
        else:
            self.runner = ModelRunner(path, config, device)
        c = self.runner.config
        self.tokenizer = Tokenizer(path) if (Path(path) / "tokenizer.json").is_file() else None
        eos = set(c.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(eos)
        self._detok: dict[int, IncrementalDetokenizer] = {}
        self.scheduler = Scheduler(
            SchedulerConfig(max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
                            max_model_len=self.runner.max_model_len, max_waiting=config.waiting_limit,
                            max_waiting_tokens=config.waiting_tokens_limit),
            BlockManager(self.runner.num_blocks, config.block_size, config.enable_prefix_caching))

    def make_sequences(self, prompt: list[int], params: SamplingParams) -> list[Sequence]:
        """One sequence per choice (``n``); they share the prompt's blocks through the prefix cache."""
        stops = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_token_ids)
        seqs = []
        for i in range(params.n):
            gen = None
            if params.seed is not None:
                gen = torch.Generator(device=self.runner.device).manual_seed(params.seed + i)
            seq = Sequence(list(prompt), params.max_tokens, stop_token_ids=stops, params=params, generator=gen,
                           arrival=time.monotonic(), priority=params.priority)
            if self.tokenizer is not None:
                self._detok[seq.seq_id] = IncrementalDetokenizer(self.tokenizer)
            seqs.append(seq)
        return seqs

    def admit(self, seqs: list[Sequence]) -> None:
        """Front end, before posting a request's sequences to the engine: raise RequestTooLarge
        (never fits) or Overloaded (queue at a limit, ``Scheduler.admit``); a refused request's
        sequences are forgotten. Thread-safe."""
        try:
            for s in seqs:
                self.scheduler.check(s)
            self.scheduler.admit(seqs)
        except Exception:
            for s in seqs:
                self.forget(s)
            raise

    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer.json: give prompts as token ids")
            return self.tokenizer.encode(prompt)
        return list(prompt)

    def _check_stop_strings(self, seqs: list[Sequence]) -> list[Sequence]:
        stopped = []
        for s in seqs:
            detok = self._detok.get(s.seq_id)
            if detok is None:
                continue
            delta = detok.update(s.generated_ids)
            if not s.params.stop or s.is_finished or not delta:
                continue
            i = find_stop(detok.text, s.params.stop, len(delta))
            if i >= 0:
                detok.text = detok.text[:i]  # the stop string is not part of the output
                self.scheduler.abort(s, FinishReason.STOP)
                stopped.append(s)
        return stopped

    def forget(self, seq: Sequence) -> None:
        self._detok.pop(seq.seq_id, None)

    def text_of(self, seq: Sequence) -> str:
        detok = self._detok.get(seq.seq_id)
        return detok.text if detok is not None else ""

    def step(self) -> list[Sequence]:
        """schedule -> run -> sample -> update. Returns the sequences that got a token this step
        (those that finished have ``is_finished``)."""
        out = self.scheduler.schedule()
        if not out.scheduled:
            return []
        logits = self.runner.run(out)
        to_sample = out.to_sample
        rows = [SampleRow(s.params, s.token_ids[:s.num_prompt_tokens], s.generated_ids, s.generator) for s in to_sample]
        result = sample(logits, rows)
        for s, lp in zip(to_sample, result.logprobs):
            if lp is not None:
                s.output_logprobs.append(lp)
        self.scheduler.update(out, dict(zip((s.seq_id for s in to_sample), result.token_ids)))
        self._check_stop_strings(to_sample)
        return to_sample

    def generate(self, prompts: list[str] | list[list[int]], params: SamplingParams | None = None) -> list[RequestOutput]:
        params = params or SamplingParams()
        token_prompts = [self.encode(p) for p in prompts]
        groups = [self.make_sequences(p, params) for p in token_prompts]
        for g in groups:
            for s in g:
                self.scheduler.add(s)
        while self.scheduler.has_work:
            self.step()
        results = [RequestOutput(p if isinstance(p, str) else None, tp, [
            CompletionOutput(i, self.text_of(s), s.generated_ids, s.finish_reason.value if s.finish_reason else None,
                             s.output_logprobs if params.logprobs is not None else None)
            for i, s in enumerate(g)]) for p, tp, g in zip(prompts, token_prompts, groups)]
        for g in groups:
            for s in g:
                self._detok.pop(s.seq_id, None)
        return results

    def generate_greedy(self, prompts: list[list[int]], max_tokens: int = 16) -> list[list[int]]:
        out = self.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
        return [r.outputs[0].token_ids for r in out]


__all__ = ["LLM", "EngineConfig", "SamplingParams", "RequestOutput", "CompletionOutput", "FinishReason"]
