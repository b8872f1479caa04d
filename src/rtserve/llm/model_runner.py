"""Runs one scheduler step on the model: pack the step into flat ragged tensors, build the paged
attention metadata, forward, return the logits of the sequences that sample."""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from . import triton_attention
from .attention import AttentionGroup, AttentionMetadata, GatherSpace, cache_shape
from .quant_linear import check_head_spec, read_quantized
from .cache_size import plan_cache
from .config import DecoderConfig
from .dtypes import resolve_dtype
from .engine_config import EngineConfig
from .models import model_class
from .prompt_logprobs import prompt_spans, span_rows
from .scheduler import SchedulerOutput
from .weights import load_weights


class ForwardInput(NamedTuple):
    """One step packed for the model's forward: T tokens of S sequences, flat and ragged."""
    ids: torch.Tensor           # (T,) int64 token ids
    positions: torch.Tensor     # (T,) int64 position of each token in its sequence
    meta: AttentionMetadata     # slots to write, and how each query reads the paged cache
    logits_index: torch.Tensor  # (N + M,) int64 rows of the tokens that sample (``out.to_sample`` order;
    #                             1 + num_spec rows for a sequence verifying proposals), then the M
    #                             prompt rows of ``prompt_logprobs.prompt_spans(out)``


class DecodeInputs(NamedTuple):
    """Host tensors of a decode-only step (one token for each of S sequences), kernel path."""
    ids: torch.Tensor           # (S,) int64
    positions: torch.Tensor     # (S,) int64
    slot_mapping: torch.Tensor  # (S,) int64 cache slot each new K/V is written to
    block_tables: torch.Tensor  # (S, max_blocks_per_seq) int32
    context_lens: torch.Tensor  # (S,) int32, the new token included


def load_decoder(path: Path, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    config = DecoderConfig.from_dir(path)
    cls = model_class(config)
    with torch.device("meta"):
        model = cls(config, device=device)
    tied = cls.tied_weights if config.tie_word_embeddings else None
    recipe, qtensors = read_quantized(path, device)
    rename = getattr(cls, "checkpoint_name", None)
    extra = None
    if recipe is not None:
        if config.family == "gpt2":
            raise ValueError(f"{path}: weight-only quantized GPT-2 checkpoints are not supported")
        base = rename

        def rename(name):  # the .qweight/.scales pairs are read by read_quantized
            if name.endswith((".qweight", ".scales")):
                return None
            return base(name) if base is not None else name

        # stand-ins that take no memory: the fused quantized layers replace them in prepare_for_inference
        extra = {name: torch.zeros((), dtype=dtype, device=device).expand(q.shape) for name, (q, _) in qtensors.items()}
    load_weights(model, path, dtype, device, tied, rename=rename, extra=extra)
    model.tie_weights()
    head = (recipe or {}).get("lm_head")
    if head is not None:
        try:
            check_head_spec(head)
        except ValueError as e:
            raise ValueError(f"{path}/quantization.json: {e}") from None
    if head is not None and config.family == "gpt2":
        raise ValueError(f"{path}: a quantized or float16 LM head is not supported for GPT-2")
    kw = {"head": head} if head is not None else {}
    model.prepare_for_inference(quantized=(recipe["bits"], qtensors) if recipe is not None else None, **kw)
    return model.eval()


def native_attention_here(device: torch.device, dtype: torch.dtype) -> bool:
    """Decode groups attend with the native kernel (``attention.AttentionGroup.context_lens``): CPU,
    float32, the kernels built, and not turned off with ``RTSERVE_NATIVE_ATTENTION=0``."""
    import os

    from .native import ops
    return (device.type == "cpu" and dtype == torch.float32 and os.environ.get("RTSERVE_NATIVE_ATTENTION", "1") != "0"
            and ops() is not None)


#: with the native decode attention, a sequence with at most this many queries in a step (a
#: speculative verification, a short prefill chunk) attends as that many one-query rows, each with
#: its own context length (causal), reading the cache in place instead of a padded gather and mask
NATIVE_QUERY_ROWS = 8
MAX_DECODE_GROUPS = 4
SPLIT_MIN_SAVED_BLOCKS = 32  # a group costs two gathers and an SDPA a layer: ~10-20 blocks' worth on CPU


def decode_buckets(members: list, block_size: int) -> list[list]:
    """The decoding sequences (i, row, 1, context) cut into groups of similar context length, since
    a group pads every context to its longest: longest first, a new group starts at a context
    needing at most half the current group's blocks when that saves SPLIT_MIN_SAVED_BLOCKS blocks of
    padding or more (one long sequence among short ones would otherwise pad them all to its length);
    at most MAX_DECODE_GROUPS groups."""
    order = sorted(members, key=lambda m: -m[3])
    blocks = [-(-m[3] // block_size) for m in order]
    groups, width = [[order[0]]], blocks[0]
    for k in range(1, len(order)):
        b = blocks[k]
        if (len(groups) < MAX_DECODE_GROUPS and 2 * b <= width
                and (width - b) * (len(order) - k) >= SPLIT_MIN_SAVED_BLOCKS):
            groups.append([])
            width = b
        groups[-1].append(order[k])
    return [sorted(g, key=lambda m: m[1]) for g in groups]  # step order within a group (one group: rows None)


class ModelRunner:
    """Owns the weights and the KV cache, sized and shaped by an ``EngineConfig``. Its
    ``decode_kernel``: "gather" (portable: gather the context into a padded batch for SDPA) or
    "triton" (CUDA default: the paged decode kernel reads the cache through block tables).
    ``cuda_graphs``: replay captured decode steps on CUDA (needs "triton")."""

    gather_space: GatherSpace | None = None  # set on CPU (the pipeline's stages keep their own)

    def __init__(self, path: Path | str, config: EngineConfig, device: str = "cpu") -> None:
        self.engine_config = config
        self.device = torch.device(device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.model = load_decoder(Path(path), self.dtype, self.device)
        c = self.config = self.model.config
        self._plan_cache(c, config, self.device)  # after the weights: on CUDA the cache gets what they leave
        cuda = self.device.type == "cuda"
        decode_kernel = config.decode_kernel
        if decode_kernel is None:
            decode_kernel = "triton" if cuda and triton_attention.available() else "gather"
        if decode_kernel == "triton" and not triton_attention.available():
            raise ValueError("decode_kernel 'triton' needs the triton package")
        self.decode_kernel = decode_kernel
        # one (2, blocks + 1, Hkv, block_size, D) tensor per layer: K and V (``attention.cache_shape``). The
        # extra last block is scratch that padded rows of a captured CUDA graph write to; the block
        # manager never hands it out.
        shape = cache_shape(self.num_blocks + 1, self.block_size, c.num_kv_heads, c.head_dim)
        self.kv_caches = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(c.num_layers)]
        self.gather_space = GatherSpace() if self.device.type == "cpu" else None  # CUDA: its allocator caches
        self.native_attention = native_attention_here(self.device, self.dtype)
        self.graphs = None
        cuda_graphs = config.cuda_graphs
        if cuda_graphs is None:
            cuda_graphs = cuda and decode_kernel == "triton"
        if cuda_graphs:
            if not cuda or decode_kernel != "triton":
                raise ValueError("cuda_graphs needs device cuda and the triton decode kernel")
            from .cuda_graphs import DecodeGraphs

            self.graphs = DecodeGraphs(self, config.max_num_seqs)

    def _plan_cache(self, c: DecoderConfig, config: EngineConfig, device: torch.device) -> None:
        """The KV cache's geometry (shared with ``PipelineRunner``): block size, context cap, block count."""
        self.block_size = config.block_size
        self.max_model_len = config.max_model_len or c.max_position_embeddings
        self.cache = plan_cache(c, block_size=config.block_size, dtype=self.dtype, device=device,
                                num_blocks=config.num_blocks, memory_fraction=config.kv_cache_memory_fraction,
                                max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
                                max_model_len=self.max_model_len)
        self.num_blocks = self.scratch_block = self.cache.num_blocks
        self.max_blocks_per_seq = -(-self.max_model_len // config.block_size)

    def prepare_decode(self, out: SchedulerOutput) -> DecodeInputs:
        """Host tensors for a decode-only step on the kernel path."""
        bs, n = self.block_size, len(out.scheduled)
        ids = np.empty(n, np.int64)
        pos = np.empty(n, np.int64)
        tables = np.zeros((n, self.max_blocks_per_seq), np.int32)
        for i, s in enumerate(out.scheduled):
            seq = s.seq
            p = seq.num_computed_tokens
            ids[i] = seq.token_ids[p]
            pos[i] = p
            tables[i, :len(seq.block_table)] = seq.block_table
        slots = tables[np.arange(n), pos // bs].astype(np.int64) * bs + pos % bs
        return DecodeInputs(torch.from_numpy(ids), torch.from_numpy(pos), torch.from_numpy(slots),
                            torch.from_numpy(tables), torch.from_numpy((pos + 1).astype(np.int32)))

    def prepare(self, out: SchedulerOutput) -> ForwardInput:
        """The step's tensors on the runner's device, and its attention metadata."""
        bs = self.block_size
        dev = self.device
        if self.decode_kernel == "triton" and all(s.num_tokens == 1 for s in out.scheduled):
            d = DecodeInputs(*(t.to(dev, non_blocking=True) for t in self.prepare_decode(out)))
            meta = AttentionMetadata(slot_mapping=d.slot_mapping, block_tables=d.block_tables,
                                     context_lens=d.context_lens)
            logits_index = [i for i, s in enumerate(out.scheduled) if s.completes] + span_rows(prompt_spans(out))
            return ForwardInput(d.ids, d.positions, meta, torch.tensor(logits_index, dtype=torch.long, device=dev))
        native = getattr(getattr(self, "model", None), "_native", None)  # (a pipeline's stages: none)
        if native is not None and sum(s.num_tokens for s in out.scheduled) <= native.max_rows:
            return self._prepare_native(out)
        ids, pos, slots, tables, logits_index = [], [], [], [], []
        decode, prefill = [], []  # (sequence i, first step row, queries, context)
        offset = 0
        for i, s in enumerate(out.scheduled):  # plain ints: numpy on a few elements costs more than it saves
            seq, start, n = s.seq, s.seq.num_computed_tokens, s.num_tokens
            table = seq.block_table
            p = range(start, start + n)
            ids.extend(seq.token_ids[start:start + n])
            pos.extend(p)
            slots.extend([table[j // bs] * bs + j % bs for j in p])
            tables.append(table)
            if n == 1:
                decode.append((i, offset, 1, start + 1))
            elif self.native_attention and n <= NATIVE_QUERY_ROWS:  # each query a row of its own, causal
                decode.extend((i, offset + j, 1, start + j + 1) for j in range(n))
            else:
                prefill.append((i, offset, n, start + n))
            offset += n
            if s.completes:  # and a row per speculative token verified (the step's last num_spec)
                logits_index.extend(range(offset - 1 - s.num_spec, offset))
        logits_index += span_rows(prompt_spans(out))
        buckets = decode_buckets(decode, bs) if decode else []
        single = len(buckets) + bool(prefill) == 1
        groups = [self._decode_group(b, tables, rows=not single) for b in buckets]
        if prefill:
            groups.append(self._prefill_group(prefill, tables, out_rows=not single))
        meta = AttentionMetadata(slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev), groups=groups,
                                 workspace=self.gather_space)
        return ForwardInput(torch.tensor(ids, dtype=torch.long, device=dev),
                            torch.tensor(pos, dtype=torch.long, device=dev), meta,
                            torch.tensor(logits_index, dtype=torch.long, device=dev))

    def _prepare_native(self, out: SchedulerOutput) -> ForwardInput:
        """A step of a few tokens for ``native_decode``: a row per token, each with its sequence's
        block table and its own context length (its position + 1: causal within the step, as a
        speculative verification or a short prefill chunk needs); no gather groups."""
        bs = self.block_size
        width = max(len(s.seq.block_table) for s in out.scheduled)
        ids, pos, slots, rows, logits_index = [], [], [], [], []
        for k, s in enumerate(out.scheduled):
            seq, start, n = s.seq, s.seq.num_computed_tokens, s.num_tokens
            table = seq.block_table
            ids.extend(seq.token_ids[start:start + n])
            pos.extend(range(start, start + n))
            slots.extend(table[j // bs] * bs + j % bs for j in range(start, start + n))
            rows.extend([k] * n)
            if s.completes:  # and a row per speculative token verified (the step's last num_spec)
                logits_index.extend(range(len(ids) - 1 - s.num_spec, len(ids)))
        logits_index += span_rows(prompt_spans(out))
        tables = np.zeros((len(out.scheduled), width), np.int64)
        for k, s in enumerate(out.scheduled):
            tables[k, :len(s.seq.block_table)] = s.seq.block_table
        blocks = torch.from_numpy(tables[rows] if len(rows) > len(out.scheduled) else tables)
        positions = torch.tensor(pos, dtype=torch.long)
        meta = AttentionMetadata(slot_mapping=torch.tensor(slots, dtype=torch.long), native=(blocks, positions + 1))
        return ForwardInput(torch.tensor(ids, dtype=torch.long), positions, meta,
                            torch.tensor(logits_index, dtype=torch.long))

    def _kv_blocks(self, members, tables) -> tuple[np.ndarray, np.ndarray]:
        """(S, B) cache blocks of each member's context (padding 0) and the (S,) context lengths."""
        ctx = np.array([m[3] for m in members])
        nb = -(-int(ctx.max()) // self.block_size)
        t = np.zeros((len(members), nb), np.int64)
        for j, m in enumerate(members):
            row = tables[m[0]][:nb]
            t[j, :len(row)] = row
        return t, ctx

    def _decode_group(self, members, tables, rows: bool) -> AttentionGroup:
        """One query per sequence; a mask unless every context fills all B blocks."""
        dev = self.device
        blocks, ctx = self._kv_blocks(members, tables)
        c = blocks.shape[1] * self.block_size
        mask = None
        if ctx.min() != c:
            mask = torch.from_numpy(np.arange(c)[None, None, None, :] < ctx[:, None, None, None]).to(dev)
        lens = None
        if self.native_attention:
            mask, lens = None, torch.from_numpy(ctx.astype(np.int64))
        return AttentionGroup(kv_blocks=torch.from_numpy(blocks).to(dev), mask=mask, context_lens=lens,
                              rows=torch.tensor([m[1] for m in members], device=dev) if rows else None)

    def _prefill_group(self, members, tables, out_rows: bool) -> AttentionGroup:
        """Queries padded to the longest chunk; causal within each sequence's context."""
        dev = self.device
        blocks, _ = self._kv_blocks(members, tables)
        q_max, c_max = max(m[2] for m in members), blocks.shape[1] * self.block_size
        q_index = np.zeros((len(members), q_max), np.int64)
        q_valid = np.zeros((len(members), q_max), bool)
        mask = np.zeros((len(members), 1, q_max, c_max), bool)
        for j, (_, first, n, c) in enumerate(members):
            q_index[j, :n] = np.arange(first, first + n)
            q_valid[j, :n] = True
            mask[j, 0, :n, :c] = np.arange(c)[None, :] <= (c - n + np.arange(n))[:, None]  # causal
            mask[j, 0, n:, 0] = True  # padded query rows attend somewhere (no NaN); dropped later
        return AttentionGroup(
            kv_blocks=torch.from_numpy(blocks).to(dev), mask=torch.from_numpy(mask).to(dev),
            q_index=torch.from_numpy(q_index).to(dev), q_valid=torch.from_numpy(q_valid).to(dev),
            out_rows=torch.from_numpy(q_index[q_valid]).to(dev) if out_rows else None)

    @torch.inference_mode()
    def run(self, out: SchedulerOutput) -> torch.Tensor:
        """Logits (N + M, vocab): ``out.to_sample`` in that order, then the rows of the step's prompt
        spans (``prompt_logprobs``; M is 0 unless a sequence scores its prompt)."""
        if self.graphs is not None and self.graphs.can_run(out):
            return self.graphs.run(out)
        x = self.prepare(out)
        return self.model(x.ids, x.positions, self.kv_caches, x.meta, x.logits_index)
