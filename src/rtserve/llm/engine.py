"""The offline engine: ``LLM(path).generate(prompts, SamplingParams(...))``, prompts as text or
token ids.

One step reads like its diagram: schedule -> run the model -> sample -> update, then stop strings
are checked on the new text. ``async_engine.AsyncLLM`` runs this loop on a thread for the server.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .block_manager import BlockManager
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


class LLM:
    def __init__(self, path: Path | str, *, dtype: str = "float32", device: str = "cpu",
                 num_blocks: int | None = None, kv_cache_memory_fraction: float | None = None,
                 block_size: int = 16, max_num_seqs: int = 64, max_num_batched_tokens: int = 2048,
                 max_model_len: int | None = None, enable_prefix_caching: bool = True,
                 decode_kernel: str | None = None, cuda_graphs: bool | None = None,
                 pipeline_stages: int | None = None, pipeline_micro_batches: int | None = None) -> None:
        """``num_blocks`` sizes the KV cache directly; without it ``kv_cache_memory_fraction`` does
        (see ``cache_size.py``; defaults 0.9 of a GPU, 0.1 of available CPU memory).
        ``decode_kernel`` and ``cuda_graphs``: see ``ModelRunner`` (both default on for CUDA).
        ``pipeline_stages`` > 1: the layers run in that many worker processes (``PipelineRunner``),
        each step cut into ``pipeline_micro_batches`` groups (default: one per stage) that overlap."""
        if pipeline_stages and pipeline_stages > 1:  # layers split over worker processes
            from .pipeline_runner import PipelineRunner

            self.runner = PipelineRunner(path, num_blocks, block_size, dtype, device, stages=pipeline_stages,
                                         micro_batches=pipeline_micro_batches,
                                         memory_fraction=kv_cache_memory_fraction, max_num_seqs=max_num_seqs,
                                         max_num_batched_tokens=max_num_batched_tokens, max_model_len=max_model_len)
        else:
            self.runner = ModelRunner(path, num_blocks, block_size, dtype, device,
                                      memory_fraction=kv_cache_memory_fraction, max_num_seqs=max_num_seqs,
                                      max_num_batched_tokens=max_num_batched_tokens, max_model_len=max_model_len,
                                      decode_kernel=decode_kernel, cuda_graphs=cuda_graphs)
        num_blocks = self.runner.num_blocks
        c = self.runner.config
        self.tokenizer = Tokenizer(path) if (Path(path) / "tokenizer.json").is_file() else None
        eos = set(c.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(eos)
        self._detok: dict[int, IncrementalDetokenizer] = {}
        self.scheduler = Scheduler(
            SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                            max_model_len=max_model_len or c.max_position_embeddings),
            BlockManager(num_blocks, block_size, enable_prefix_caching))

    def make_sequences(self, prompt: list[int], params: SamplingParams) -> list[Sequence]:
        """One sequence per choice (``n``); they share the prompt's blocks through the prefix cache."""
        stops = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_token_ids)
        seqs = []
        for i in range(params.n):
            gen = None
            if params.seed is not None:
                gen = torch.Generator(device=self.runner.device).manual_seed(params.seed + i)
            seq = Sequence(list(prompt), params.max_tokens, stop_token_ids=stops, params=params, generator=gen,
                           arrival=time.monotonic())
            if self.tokenizer is not None:
                self._detok[seq.seq_id] = IncrementalDetokenizer(self.tokenizer)
            seqs.append(seq)
        return seqs

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


__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "FinishReason"]
