"""CUDA graphs for decode steps: a decode step of a small model is a few hundred short kernels,
and launching them one by one from Python costs more than running them. Each batch-size bucket's
forward is captured once into a graph over static input buffers; a step copies its inputs into the
buffers and replays the graph of the smallest bucket that holds it.

Padded rows (bucket size above the step's sequences) decode a dummy token at position 0 into the
runner's scratch block, which the block manager never hands out, so they touch no sequence's cache.
Only decode-only steps whose every sequence samples are replayed; anything else runs eagerly.
"""
from __future__ import annotations

import torch

from .attention import AttentionMetadata
from .scheduler import SchedulerOutput


def buckets(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then steps of 8 up to 64, then steps of 32: padding stays under ~12% past 8."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_num_seqs]
    b = 16
    while b < max_num_seqs:
        sizes.append(b)
        b += 8 if b < 64 else 32
    return sizes + [max_num_seqs]


class DecodeGraphs:
    def __init__(self, runner, max_num_seqs: int) -> None:
        self.runner = runner
        self.sizes = buckets(max_num_seqs)
        n, dev = self.sizes[-1], runner.device
        self.ids = torch.zeros(n, dtype=torch.long, device=dev)
        self.pos = torch.zeros(n, dtype=torch.long, device=dev)
        self.slots = torch.full((n,), runner.scratch_block * runner.block_size, dtype=torch.long, device=dev)
        self.tables = torch.full((n, runner.max_blocks_per_seq), runner.scratch_block, dtype=torch.int32, device=dev)
        self.lens = torch.ones(n, dtype=torch.int32, device=dev)
        self.logits_index = torch.arange(n, dtype=torch.long, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self._capture()

    def _forward(self, b: int) -> torch.Tensor:
        meta = AttentionMetadata(slot_mapping=self.slots[:b], block_tables=self.tables[:b],
                                 context_lens=self.lens[:b])
        return self.runner.model(self.ids[:b], self.pos[:b], self.runner.kv_caches, meta, self.logits_index[:b])

    @torch.inference_mode()
    def _capture(self) -> None:
        pool = None
        stream = torch.cuda.Stream(self.runner.device)
        stream.wait_stream(torch.cuda.current_stream(self.runner.device))
        with torch.cuda.stream(stream):
            for b in reversed(self.sizes):  # largest first: the pool it sizes serves the rest
                for _ in range(2):  # warm up: triton compiles, cuBLAS picks algorithms, outside capture
                    self._forward(b)
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=pool, stream=stream):
                    self.outputs[b] = self._forward(b)
                pool = g.pool()
                self.graphs[b] = g
        torch.cuda.current_stream(self.runner.device).wait_stream(stream)
        torch.cuda.synchronize(self.runner.device)

    def can_run(self, out: SchedulerOutput) -> bool:
        return (0 < len(out.scheduled) <= self.sizes[-1]
                and all(s.num_tokens == 1 and s.completes for s in out.scheduled))

    def run(self, out: SchedulerOutput) -> torch.Tensor:
        n = len(out.scheduled)
        b = next(s for s in self.sizes if s >= n)
        d = self.runner.prepare_decode(out)
        self.ids[:n].copy_(d.ids, non_blocking=True)
        self.pos[:n].copy_(d.positions, non_blocking=True)
        self.slots[:n].copy_(d.slot_mapping, non_blocking=True)
        self.tables[:n].copy_(d.block_tables, non_blocking=True)
        self.lens[:n].copy_(d.context_lens, non_blocking=True)
        # rows n..b-1 are padding: back to the scratch block
        self.slots[n:b].fill_(self.runner.scratch_block * self.runner.block_size)
        self.tables[n:b].fill_(self.runner.scratch_block)
        self.lens[n:b].fill_(1)
        self.ids[n:b].zero_()
        self.pos[n:b].zero_()
        self.graphs[b].replay()
        return self.outputs[b][:n]
