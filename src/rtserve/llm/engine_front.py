"""The server side's stand-in for an ``LLM`` whose engine runs in another process
(``engine_core.ProcessAsyncLLM``): what ``LLMModel`` reads from it, without weights."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .config import DecoderConfig
from .engine_config import EngineConfig
from .structured import GrammarCompiler
from .tokenizer import encode_prompt, load_tokenizer


@dataclass(frozen=True)
class EngineLimits:
    """What the server checks requests against and reports (``/v2/models/{m}/config``), the same for
    an ``LLM`` in the server process (``LLM.limits``) and one in an engine process (its ``Ready``)."""
    vocab_size: int
    max_model_len: int
    num_blocks: int
    block_size: int
    max_num_seqs: int
    max_num_batched_tokens: int
    max_waiting: int
    max_waiting_tokens: int

    @classmethod
    def of(cls, llm) -> "EngineLimits":
        sc, bm = llm.scheduler.config, llm.scheduler.bm
        return cls(llm.runner.config.vocab_size, sc.max_model_len, bm.num_blocks, bm.block_size, sc.max_num_seqs,
                   sc.max_num_batched_tokens, sc.max_waiting, sc.max_waiting_tokens)


class EngineFront:
    """The server side's view of a model whose engine runs in another process, in the attributes
    ``LLMModel`` reads from an ``LLM``: the tokenizer (prompts are encoded and checked here), the
    engine's configuration and the limits it reported, and a grammar compiler (an invalid
    constraint is a 400 before anything is queued). No weights."""

    def __init__(self, path: str | Path, engine: dict, limits: EngineLimits) -> None:
        self.path = Path(path)
        self.engine_config = EngineConfig.from_dict(engine)
        c = DecoderConfig.from_dir(path)
        self.tokenizer, eos = load_tokenizer(path, c.eos_token_ids)
        self.grammars = GrammarCompiler(self.path / "tokenizer.json" if self.tokenizer is not None else None,
                                        c.vocab_size, eos)
        self.limits = limits

    def encode(self, prompt: str | list[int]) -> list[int]:
        return encode_prompt(self.tokenizer, prompt)

    def compile_structured(self, spec) -> None:
        self.grammars.compile(spec)
