"""A repository model served by the LLM engine (``backend: llm``): a version folder is a Hugging
Face checkpoint folder; requests arrive through the OpenAI-compatible API."""
from __future__ import annotations

import asyncio
from pathlib import Path

from .config import ModelConfig, torch_device
from .errors import ConfigError

ENGINE_OPTIONS = {"num_blocks", "block_size", "max_num_seqs", "max_num_batched_tokens", "max_model_len", "dtype",
                  "enable_prefix_caching", "kv_cache_memory_fraction", "decode_kernel", "cuda_graphs",
                  "pipeline_stages", "pipeline_micro_batches"}


class LLMModel:
    kind = "llm"

    def __init__(self, config: ModelConfig, model_dir: Path, version: int) -> None:
        from .llm.engine import LLM

        unknown = sorted(set(config.engine) - ENGINE_OPTIONS)
        if unknown:
            raise ConfigError(f"engine: unknown key '{unknown[0]}'; allowed: {', '.join(sorted(ENGINE_OPTIONS))}")
        self.config, self.name, self.version = config, config.name, version
        self.path = model_dir / str(version)
        self.device = device = torch_device(config.device)
        try:
            self.llm = LLM(self.path, device=device, **config.engine)
        except (ValueError, OSError) as e:
            raise ConfigError(f"{self.path}: {e}") from None
        self.engine = None

    def start(self) -> None:
        from .llm.async_engine import AsyncLLM

        self.engine = AsyncLLM(self.llm)

    async def close(self, drain_timeout_s: float = 10.0) -> None:
        if self.engine is not None:
            await asyncio.to_thread(self.engine.shutdown)

    def _close_instances(self) -> None:
        pass

    @property
    def max_model_len(self) -> int:
        return self.llm.scheduler.config.max_model_len

    def metadata(self) -> dict:
        return {"name": self.name, "versions": [str(self.version)], "platform": "rtserve_llm",
                "inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1]}],
                "outputs": [{"name": "text_output", "datatype": "BYTES", "shape": [1]}]}

    def config_json(self) -> dict:
        sc = self.llm.scheduler.config
        return {"name": self.name, "backend": "llm", "platform": "rtserve_llm", "device": self.device,
                "engine": {"num_blocks": self.llm.scheduler.bm.num_blocks, "block_size": self.llm.scheduler.bm.block_size,
                           "max_num_seqs": sc.max_num_seqs, "max_num_batched_tokens": sc.max_num_batched_tokens,
                           "max_model_len": sc.max_model_len}}
