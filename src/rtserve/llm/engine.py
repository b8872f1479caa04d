"""The offline engine: ``LLM(path).generate(prompts, SamplingParams(...))``, prompts as text or
token ids.

One step reads like its diagram: schedule -> run the model -> sample -> update, then constrained
sequences advance their grammar (structured outputs: their rows were masked before sampling) and
stop strings are checked on the new text. ``async_engine.AsyncLLM`` runs this loop on a thread for the server.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .block_manager import BlockManager
from .config import DecoderConfig
from .engine_config import EngineConfig
from .model_runner import ModelRunner
from .prompt_logprobs import accepts, fill_from_cache, prompt_spans, record
from .reductions import finite_rows
from .sampler import SampleRow, sample
from .sampling_params import SamplingParams
from .scheduler import Scheduler, SchedulerConfig
from .sequence import FinishReason, RequestFailure, Sequence
from .structured import GrammarCompiler, GrammarStage, StructuredSpec
from .output_text import TextStream
from .tokenizer import encode_prompt, load_tokenizer


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
    prompt_logprobs: list | None = None  # None, then a PromptLogprob per later prompt token (params.prompt_logprobs)
    num_cached_tokens: int = 0  # prompt tokens its first choice found in the prefix cache


def with_overrides(config: EngineConfig, overrides: dict) -> EngineConfig:
    """``config`` with some fields replaced (validated again); an unknown name is a TypeError, as
    for any keyword argument."""
    unknown = sorted(set(overrides) - set(EngineConfig.keys()))
    if unknown:
        raise TypeError(f"LLM() got an unexpected keyword argument '{unknown[0]}'; "
                        f"engine options: {', '.join(EngineConfig.keys())}")
    return dataclasses.replace(config, **overrides) if overrides else config


SCORES_CACHE_BYTES = 128 << 20  # vocabulary rows the prefix cache keeps for scored prompts (prompt_logprobs)


class StepFailed(Exception):
    """The forward pass of a step failed: its sequences (and only those) fail with it."""

    def __init__(self, seqs: list[Sequence], error: BaseException) -> None:
        super().__init__(f"{type(error).__name__}: {error}")
        self.seqs, self.error = seqs, error


def check_context(path: Path | str, config: EngineConfig) -> None:
    """Before any weight is read: ``max_model_len`` must not exceed the positions the checkpoint has
    (a longer context would run past its position embeddings or trained RoPE range). ValueError."""
    limit = DecoderConfig.from_dir(path).max_position_embeddings
    if config.max_model_len is not None and config.max_model_len > limit:
        raise ValueError(f"engine.max_model_len {config.max_model_len} is above the checkpoint's "
                         f"max_position_embeddings {limit} (config.json); set max_model_len <= {limit}")


class LLM:
    def __init__(self, path: Path | str, config: EngineConfig | None = None, *, device: str = "cpu",
                 detokenize: bool = True, **overrides) -> None:
        """``config`` (default ``EngineConfig()``) with ``overrides`` of its fields, e.g.
        ``LLM(path, num_blocks=64, dtype="bfloat16")``. ``pipeline_stages`` > 1 runs the layers in
        worker processes (``PipelineRunner``); otherwise one ``ModelRunner`` in this process.
        ``detokenize=False``: outputs are token ids only (no text, no stop strings), for an engine
        whose caller makes the text (``engine_core``: the API process)."""
        config = with_overrides(EngineConfig() if config is None else config, overrides)
        check_context(path, config)
        self.engine_config = config
        self.path = Path(path)
        self.detokenize = detokenize
        if config.pipeline_stages and config.pipeline_stages > 1:  # layers split over worker processes
            from .pipeline_runner import PipelineRunner

            self.runner = PipelineRunner(path, config, device)
        else:
            self.runner = ModelRunner(path, config, device)
        c = self.runner.config
        self.tokenizer, self.eos_token_ids = load_tokenizer(path, c.eos_token_ids)
        self._detok: dict[int, TextStream] = {}  # seq_id -> its text (when detokenize)
        tokenizer_json = Path(path) / "tokenizer.json"
        self.grammars = GrammarCompiler(tokenizer_json if self.tokenizer is not None else None, c.vocab_size,
                                        self.eos_token_ids)
        self.grammar_stage = GrammarStage(overlap=False)  # on: no gain measured on CPU (benchmarks/structured.py)
        self.scheduler = Scheduler(
            SchedulerConfig(max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
                            max_model_len=self.runner.max_model_len, max_waiting=config.waiting_limit,
                            max_waiting_tokens=config.waiting_tokens_limit),
            BlockManager(self.runner.num_blocks, config.block_size, config.enable_prefix_caching,
                         max_scored_blocks=SCORES_CACHE_BYTES // (4 * c.vocab_size)),
            score_accept=accepts)
        from .engine_front import EngineLimits

        self.limits = EngineLimits.of(self)
        self.speculator = None  # speculative decoding (engine.speculative): llm/speculative/
        if config.speculative is not None:
            from .speculative.speculator import Speculator

            self.speculator = Speculator.build(config.speculative, path, config, self.runner, self.scheduler, device)

    def make_sequences(self, prompt: list[int], params: SamplingParams) -> list[Sequence]:
        """One sequence per choice (``n``); they share the prompt's blocks through the prefix cache
        (unless the prompt is scored, ``prompt_logprobs``: then each choice computes it, so each
        has its prompt's logprobs by its first token, whatever the others did).
        A constrained request (``params.structured``) gets a matcher per choice (compiled through the
        cache: call ``compile_structured`` first to compile off the caller's thread)."""
        stops = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_token_ids)
        seqs = []
        for i in range(params.n):
            gen = None
            if params.seed is not None:
                gen = torch.Generator(device=self.runner.device).manual_seed(params.seed + i)
            seq = Sequence(list(prompt), params.max_tokens, stop_token_ids=stops, params=params, generator=gen,
                           arrival=time.monotonic(), priority=params.priority,
                           prompt_logprobs=params.prompt_logprobs)
            if params.structured is not None:
                seq.grammar = self.grammars.matcher(params.structured)
            if self.tokenizer is not None and self.detokenize:
                self._detok[seq.seq_id] = TextStream(self.tokenizer, params.stop, prompt)
            seqs.append(seq)
        return seqs

    def compile_structured(self, spec: StructuredSpec) -> None:
        """Check and cache a constraint before a request is queued, so the engine never compiles:
        StructuredOutputError (a ValueError naming ``spec.param``) when it is invalid or the model has
        no tokenizer. Thread-safe; may take a while for a large schema (run it off an event loop)."""
        self.grammars.compile(spec)

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
        return encode_prompt(self.tokenizer, prompt)

    def fail(self, seq: Sequence, status: int, message: str) -> None:
        """End ``seq`` with a failure its client is told about (finish reason ``abort``)."""
        if seq.failure is None:
            seq.failure = RequestFailure(status, message)
        self.scheduler.abort(seq, FinishReason.ABORT)

    def _check_stop_strings(self, seqs: list[Sequence], before: dict[int, int] | None = None) -> list[Sequence]:
        """Each sequence's text grows by its new tokens (``output_text.TextStream``); one whose stop
        string completed ends with ``stop`` (its tokens after the one that completed it dropped).
        ``before``: seq_id -> tokens generated before this step, for sequences that may have got
        several (speculation)."""
        stopped = []
        for s in seqs:
            text = self._detok.get(s.seq_id)
            if text is None or s.is_finished and s.failure is not None:
                continue
            new = s.num_generated - before.get(s.seq_id, s.num_generated - 1) if before else 1
            try:
                keep = text.update(s.generated_ids, new, s.is_finished)
            except Exception as e:  # noqa: BLE001 - this sequence fails, the step goes on
                self.fail(s, 500, f"detokenizing the output failed: {type(e).__name__}: {e}")
                continue
            if keep is None:
                continue
            del s.token_ids[s.num_prompt_tokens + keep:]
            if s.params.logprobs is not None:
                del s.output_logprobs[keep:]
            if s.is_finished:
                s.finish_reason = FinishReason.STOP
            else:
                self.scheduler.abort(s, FinishReason.STOP)
            stopped.append(s)
        return stopped

    def forget(self, seq: Sequence) -> None:
        self._detok.pop(seq.seq_id, None)
        if self.speculator is not None:
            self.speculator.forget(seq.seq_id)

    def text_of(self, seq: Sequence) -> str:
        detok = self._detok.get(seq.seq_id)
        return detok.text if detok is not None else ""

    def step(self) -> list[Sequence]:
        """schedule -> run -> sample -> update. Returns the sequences that got a token this step
        (those that finished have ``is_finished``; those that failed also have ``failure``).
        Raises StepFailed when the forward pass fails: only that step's sequences are affected."""
        out = self.scheduler.schedule()
        if not out.scheduled:
            return []
        self._scores_from_cache(out)
        drafts = None  # speculative proposals appended to the step (llm/speculative/speculator.py)
        try:
            drafts = self.speculator.propose(out) if self.speculator is not None else None
            spans = prompt_spans(out)  # prompt positions scored this step (before update moves the counters)
            logits = self.runner.run(out)
        except Exception as e:  # noqa: BLE001 - reported with the step's sequences
            if drafts is not None:
                self.speculator.rollback(drafts)
            raise StepFailed([s.seq for s in out.scheduled], e) from e
        to_sample = out.to_sample
        rows = len(to_sample) + (drafts.num_tokens if drafts is not None else 0)
        if spans:
            record(spans, logits[rows:], self.runner.block_size if self.scheduler.bm.enable_prefix_caching else None)
            logits = logits[:rows]
        plain, tokens, before = to_sample, {}, None
        if drafts is not None:
            plain, logits, tokens = self.speculator.verify(drafts, to_sample, logits, self.fail)
            before = {s.seq_id: s.num_generated for s in to_sample}  # the proposals are out again
        if plain:
            tokens.update(self._sample(plain, logits))
        self.scheduler.update(out, tokens)
        if drafts is not None:
            self.speculator.settle(drafts)
        generating = [s for s in to_sample if s.max_tokens]  # max_tokens 0: scored, no token
        self._advance_grammars(generating)
        self._check_stop_strings(generating, before)
        return to_sample

    def _scores_from_cache(self, out) -> None:
        """Scored prompts that start on cached blocks: their logprobs there, from the blocks' scores."""
        bm = self.scheduler.bm
        for s in out.scheduled:
            seq = s.seq
            if seq.prompt_logprobs is not None and seq.num_cached_tokens and not seq.prompt_lps:
                fill_from_cache(seq, [bm.blocks[i].scores for i in seq.block_table[:seq.num_cached_tokens // bm.block_size]])

    def _advance_grammars(self, seqs: list[Sequence]) -> None:
        """Constrained sequences consume their new token; one whose grammar is complete ends with
        ``stop`` (even at max_tokens: its answer is whole). With ``grammar_stage.overlap`` the next
        masks then start computing on a worker thread, during the next forward pass."""
        if not any(s.grammar is not None for s in seqs):
            return
        for fault in self.grammar_stage.advance(seqs):
            self.fail(fault.seq, 500, fault.message)
        for s in seqs:
            if s.grammar is None or s.failure is not None or not s.grammar.is_finished:
                continue
            if not s.is_finished:
                self.scheduler.abort(s, FinishReason.STOP)
            elif s.finish_reason is FinishReason.LENGTH:
                s.finish_reason = FinishReason.STOP
        self.grammar_stage.prefetch([s for s in seqs if not s.is_finished])

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> dict[int, int]:
        """seq_id -> sampled token. A row with NaN/inf logits, or whose sampling raises, fails
        its own sequence; the other rows are sampled as usual."""
        finite = finite_rows(logits) if len(seqs) else []  # one reduction pass
        keep = [i for i, ok in enumerate(finite) if ok]
        for i, ok in enumerate(finite):
            if not ok:
                self.fail(seqs[i], 500, "the model produced NaN or infinite logits for this sequence")
        masks, faults = self.grammar_stage.masks([seqs[i] for i in keep])
        for fault in faults:
            self.fail(fault.seq, 500, fault.message)
        rows = [self._row(seqs[i], m) for i, m in zip(keep, masks) if seqs[i].failure is None]
        keep = [i for i in keep if seqs[i].failure is None]
        if len(keep) != len(seqs):
            logits = logits[keep]
        try:
            result = sample(logits, rows)
            picked = list(zip(keep, result.token_ids, result.logprobs))
        except Exception:  # noqa: BLE001 - find the row at fault: sample one at a time
            picked = []
            for j, i in enumerate(keep):
                try:
                    r = sample(logits[j:j + 1], [rows[j]])
                    picked.append((i, r.token_ids[0], r.logprobs[0]))
                except Exception as e:  # noqa: BLE001
                    self.fail(seqs[i], 500, f"sampling failed: {type(e).__name__}: {e}")
        tokens = {}
        for i, tok, lp in picked:
            if lp is not None and seqs[i].max_tokens:
                seqs[i].output_logprobs.append(lp)
            tokens[seqs[i].seq_id] = tok
        return tokens

    @staticmethod
    def _row(s: Sequence, allowed: torch.Tensor | None = None) -> SampleRow:
        return SampleRow(s.params, s.token_ids[:s.num_prompt_tokens], s.generated_ids, s.generator, allowed)

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
            for i, s in enumerate(g)], [None, *g[0].prompt_lps] if params.prompt_logprobs is not None else None,
            g[0].num_cached_tokens) for p, tp, g in zip(prompts, token_prompts, groups)]
        for g in groups:
            for s in g:
                self.forget(s)
        return results

    def generate_greedy(self, prompts: list[list[int]], max_tokens: int = 16) -> list[list[int]]:
        out = self.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
        return [r.outputs[0].token_ids for r in out]


__all__ = ["LLM", "EngineConfig", "SamplingParams", "RequestOutput", "CompletionOutput", "FinishReason"]
