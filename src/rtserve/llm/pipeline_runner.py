"""Pipeline parallelism for the native decoder: its layers split across stage worker processes,
each holding the weights and the KV cache of its own layers only. The scheduler, block manager and
sampler stay in the engine's process; a step's metadata (slots, block gathers, masks) goes to every
stage, the hidden states go from stage to stage, and the last stage returns the logits. Tensors
travel through the process executor's shared memory (``executors/process.py``).

Within a step, the scheduled sequences are cut into ``micro_batches`` contiguous groups of about
equal token counts (at least ``MIN_GROUP_TOKENS`` each), each prepared on its own, and the groups flow through the stages like a
pipeline: stage 2 runs group 1 while stage 1 runs group 2 (one thread per stage drives its
worker). Sequences' KV slots are disjoint, so the groups never touch each other's cache; the logits
come back in the step's order. Steps still follow one another (the next step needs this one's
tokens). Greedy outputs are identical to the unsplit engine's (tested).
"""
from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import numpy as np
import torch

from ..backends.base import Backend
from ..executors.base import InstanceSpec, make_instances
from .attention import AttentionGroup, AttentionMetadata, GatherSpace, cache_shape
from .engine_config import EngineConfig
from .dtypes import TORCH as DTYPES
from .dtypes import dtype_name, resolve_dtype
from .model_runner import ForwardInput, ModelRunner, native_attention_here
from .scheduler import SchedulerOutput

MIN_GROUP_TOKENS = 32  # a step is cut into groups of at least this many tokens
_GROUP_FIELDS = ("kv_blocks", "mask", "rows", "q_index", "q_valid", "out_rows", "context_lens")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.*)$")


def flatten(x: ForwardInput) -> dict[str, np.ndarray]:
    """A step's inputs as named arrays for the stage workers (``unflatten`` reverses it)."""
    out = {"ids": x.ids.numpy(), "positions": x.positions.numpy(), "slot_mapping": x.meta.slot_mapping.numpy(),
           "logits_index": x.logits_index.numpy()}
    for i, g in enumerate(x.meta.groups):
        for f in _GROUP_FIELDS:
            v = getattr(g, f)
            if v is not None:
                out[f"g{i}.{f}"] = v.numpy()
    return out


def unflatten(d: dict[str, np.ndarray]) -> ForwardInput:
    """The step's inputs back from ``flatten``'s arrays (``ids`` None where a stage got none)."""
    groups = []
    i = 0
    while f"g{i}.kv_blocks" in d:
        groups.append(AttentionGroup(**{f: torch.from_numpy(np.array(d[f"g{i}.{f}"])) if f"g{i}.{f}" in d else None
                                       for f in _GROUP_FIELDS}))
        i += 1
    meta = AttentionMetadata(slot_mapping=torch.from_numpy(np.array(d["slot_mapping"])), groups=groups)
    ids = torch.from_numpy(np.array(d["ids"])) if "ids" in d else None
    return ForwardInput(ids, torch.from_numpy(np.array(d["positions"])), meta,
                        torch.from_numpy(np.array(d["logits_index"])))


class StageBackend(Backend):
    """One pipeline stage in a worker: layers [first_layer, last_layer) of a Llama-family checkpoint
    (plus the embedding on the first stage, the final norm and LM head on the last) and their KV cache.
    ``path`` is the checkpoint's config.json; ``options``: layers, first, last, dtype, num_blocks, block_size."""

    name = "llm_stage"
    file_names = ("config.json",)

    def __init__(self, path: Path, device: str, options: dict, instances: int = 1, output_names=None) -> None:
        super().__init__(path, device, options, instances, output_names)
        from .config import DecoderConfig
        from .models.llama import LlamaForCausalLM
        from .weights import load_weights

        folder = Path(path).parent
        c = DecoderConfig.from_dir(folder)
        if c.family == "gpt2":
            raise ValueError("pipeline stages support the Llama family")
        a, b = options["layers"]
        self.first, self.last = bool(options["first"]), bool(options["last"])
        if device == "cpu" and options.get("threads"):
            torch.set_num_threads(int(options["threads"]))
        dtype, dev = DTYPES[options.get("dtype", "float32")], torch.device(device)
        with torch.device("meta"):
            m = LlamaForCausalLM(c, device=dev)
        m.model.layers = torch.nn.ModuleList(list(m.model.layers)[a:b])
        need_embed = self.first or (self.last and c.tie_word_embeddings)
        if not need_embed:
            m.model.embed_tokens = None
        if not self.last:
            m.model.norm = None
            m.lm_head = None

        def rename(name: str) -> str | None:
            hit = _LAYER.match(name)
            if hit:
                i = int(hit.group(1))
                return f"model.layers.{i - a}.{hit.group(2)}" if a <= i < b else None
            if name.startswith("model.embed_tokens."):
                return name if need_embed else None
            if name.startswith(("model.norm.", "lm_head.")):
                return name if self.last else None
            return name

        tied = m.tied_weights if (self.last and c.tie_word_embeddings) else None
        load_weights(m, folder, dtype, dev, tied, rename=rename)
        if self.last:
            m.tie_weights()
        for layer in m.model.layers:
            layer.self_attn.fuse()
            layer.mlp.fuse()
        self.head = None
        if self.last:
            from .frozen_linear import FrozenLinear

            w = m.lm_head.weight
            self.head = FrozenLinear(w) if w.device.type == "cpu" else m.lm_head
        self.m, self.c = m, c
        nb, bs = int(options["num_blocks"]), int(options["block_size"])
        self.kv = [torch.zeros(cache_shape(nb + 1, bs, c.num_kv_heads, c.head_dim), dtype=dtype, device=dev)
                   for _ in range(b - a)]
        self.gather_space = GatherSpace() if dev.type == "cpu" else None
        self.file_inputs, self.file_outputs = [], []

    @torch.inference_mode()
    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        step = unflatten(inputs)
        step.meta.workspace = self.gather_space
        if self.first:
            x = self.m.model.embed_tokens(step.ids)
        else:
            x = torch.from_numpy(np.array(inputs["hidden"]))
        rope = self.m.rotary.tables(step.positions, x.dtype)
        for layer, cache in zip(self.m.model.layers, self.kv):
            x = layer(x, rope, cache, step.meta)
        if not self.last:
            return {"hidden": x.numpy()}
        return {"logits": self.head(self.m.model.norm(x[step.logits_index])).float().numpy()}


class PipelineRunner(ModelRunner):
    """A ``ModelRunner`` whose model lives in ``config.pipeline_stages`` worker processes (layers
    split evenly), each step cut into ``config.pipeline_micro_batches`` groups (None: one per stage)."""

    def __init__(self, path: Path | str, config: EngineConfig, device: str = "cpu") -> None:
        from .config import DecoderConfig

        stages = config.pipeline_stages
        c = DecoderConfig.from_dir(path)
        if stages is None or not 2 <= stages <= c.num_layers:
            raise ValueError(f"pipeline_stages {stages}: must be between 2 and the model's {c.num_layers} layers")
        self.engine_config = config
        self.config, self.device, self.dtype = c, torch.device("cpu"), resolve_dtype(config.dtype, device)
        self._plan_cache(c, config, torch.device(device))
        self.decode_kernel, self.graphs = "gather", None
        self.native_attention = native_attention_here(torch.device(device), self.dtype)  # in the stages too
        bounds = np.linspace(0, c.num_layers, stages + 1).round().astype(int)
        self.stages = []
        try:
            for k in range(stages):
                opts = {"layers": [int(bounds[k]), int(bounds[k + 1])], "first": k == 0, "last": k == stages - 1,
                        "dtype": dtype_name(self.dtype), "num_blocks": self.num_blocks, "block_size": self.block_size,
                        "threads": max(1, (os.cpu_count() or 1) // stages)}  # the stages share the cores
                spec = InstanceSpec(f"{__name__}:StageBackend", str(Path(path) / "config.json"), device, opts)
                self.stages.append(make_instances("process", spec)[0])
        except BaseException:
            self.close()
            raise
        self.layer_bounds = [(int(bounds[k]), int(bounds[k + 1])) for k in range(stages)]
        self.micro_batches = stages if config.pipeline_micro_batches is None else config.pipeline_micro_batches
        self.min_group_tokens = MIN_GROUP_TOKENS
        self._drivers = [ThreadPoolExecutor(1, thread_name_prefix=f"rtserve-llm-stage{k}") for k in range(stages)]

    def split(self, out: SchedulerOutput) -> list[SchedulerOutput]:
        """Contiguous groups of the scheduled sequences, of about equal token counts."""
        # decode on a CPU reads every weight once per group: small groups cost more than overlap gains
        # (benchmarks/llm_pipeline.py: 16 decoding sequences in 2 groups -17%, 64 in 2 groups +19%)
        n = min(self.micro_batches, len(out.scheduled), out.num_batched_tokens // self.min_group_tokens)
        if n <= 1 or any(s.seq.needs_prompt_logits for s in out.scheduled):  # prompt rows: one group
            return [out]
        tokens = np.cumsum([s.num_tokens for s in out.scheduled])
        cuts = np.searchsorted(tokens, tokens[-1] * np.arange(1, n) / n, side="left") + 1
        bounds = sorted({0, *[int(min(c, len(out.scheduled) - 1)) for c in cuts], len(out.scheduled)})
        return [SchedulerOutput(out.scheduled[a:b]) for a, b in zip(bounds, bounds[1:])]

    def _stage(self, k: int, feeds: dict, prev):
        if prev is None:
            return self.stages[k].run(feeds)
        return self.stages[k].run({**feeds, "hidden": prev.result()["hidden"]})

    def run(self, out: SchedulerOutput) -> torch.Tensor:
        parts = self.split(out)
        if len(parts) == 1:  # nothing to overlap: no thread hand-offs
            feeds = flatten(self.prepare(out))
            res = self.stages[0].run(feeds)
            for k in range(1, len(self.stages)):
                res = self.stages[k].run({**feeds, "hidden": res["hidden"]})
            return torch.from_numpy(res["logits"])
        finals = []
        for part in parts:  # group i enters stage k once stage k-1 has passed it on
            feeds, prev = flatten(self.prepare(part)), None
            for k, driver in enumerate(self._drivers):
                prev = driver.submit(self._stage, k, feeds, prev)
            finals.append(prev)
        wait(finals)  # every group finished (or failed) before the step returns
        return torch.cat([torch.from_numpy(f.result()["logits"]) for f in finals])

    def close(self) -> None:
        for s in self.stages:
            s.close()
        for d in getattr(self, "_drivers", []):
            d.shutdown(wait=False)
