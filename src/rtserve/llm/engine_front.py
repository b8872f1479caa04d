"""The server side's stand-in for an ``LLM`` whose engine runs in another process
(``engine_core.ProcessAsyncLLM``): what ``LLMModel`` reads from it, without weights."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from .config import DecoderConfig
from .engine_config import EngineConfig
from .structured import GrammarCompiler
from .tokenizer import encode_prompt, load_tokenizer


class EngineFront:
    """The server side's view of a model whose engine runs in another process, in the attributes
    ``LLMModel`` reads from an ``LLM``: the tokenizer (prompts are encoded and checked here), the
    checkpoint's config, the limits the engine reported, and a grammar compiler (an invalid
    constraint is a 400 before anything is queued). No weights."""

    def __init__(self, path: str | Path, engine: dict, max_model_len: int, num_blocks: int, block_size: int) -> None:
        self.path = Path(path)
        self.engine_config = EngineConfig.from_dict(engine)
        c = DecoderConfig.from_dir(path)
        self.tokenizer, eos = load_tokenizer(path, c.eos_token_ids)
        self.grammars = GrammarCompiler(self.path / "tokenizer.json" if self.tokenizer is not None else None,
                                        c.vocab_size, eos)
        e = self.engine_config
        self.runner = SimpleNamespace(config=c)
        self.scheduler = SimpleNamespace(
            config=SimpleNamespace(max_model_len=max_model_len, max_num_seqs=e.max_num_seqs,
                                   max_num_batched_tokens=e.max_num_batched_tokens, max_waiting=e.waiting_limit,
                                   max_waiting_tokens=e.waiting_tokens_limit),
            bm=SimpleNamespace(num_blocks=num_blocks, block_size=block_size))
        self.speculator = None

    def encode(self, prompt: str | list[int]) -> list[int]:
        return encode_prompt(self.tokenizer, prompt)

    def compile_structured(self, spec) -> None:
        self.grammars.compile(spec)
