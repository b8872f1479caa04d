"""The offline engine: ``LLM(path).generate(prompt_token_ids, max_tokens)``. Greedy decoding for
now; sampling parameters, text prompts, streaming and the async engine are still to come."""
from __future__ import annotations

from pathlib import Path

from .block_manager import BlockManager
from .model_runner import ModelRunner
from .scheduler import Scheduler, SchedulerConfig
from .sequence import Sequence


class LLM:
    def __init__(self, path: Path | str, *, dtype: str = "float32", device: str = "cpu", num_blocks: int = 256,
                 block_size: int = 16, max_num_seqs: int = 64, max_num_batched_tokens: int = 2048,
                 max_model_len: int | None = None, enable_prefix_caching: bool = True) -> None:
        self.runner = ModelRunner(path, num_blocks, block_size, dtype, device)
        c = self.runner.config
        self.scheduler = Scheduler(
            SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                            max_model_len=max_model_len or c.max_position_embeddings),
            BlockManager(num_blocks, block_size, enable_prefix_caching))

    def step(self) -> list[Sequence]:
        """schedule -> run -> update. Returns the sequences finished in this step."""
        out = self.scheduler.schedule()
        if not out.scheduled:
            return []
        logits = self.runner.run(out)
        tokens = logits.argmax(-1).tolist()
        return self.scheduler.update(out, {s.seq_id: t for s, t in zip(out.to_sample, tokens)})

    def generate(self, prompts: list[list[int]], max_tokens: int = 16, ignore_eos: bool = True) -> list[list[int]]:
        eos = frozenset(self.runner.config.eos_token_ids)
        seqs = [Sequence(list(p), max_tokens, stop_token_ids=eos, ignore_eos=ignore_eos) for p in prompts]
        for s in seqs:
            self.scheduler.add(s)
        while self.scheduler.has_work:
            self.step()
        return [s.generated_ids for s in seqs]
