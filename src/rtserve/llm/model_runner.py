"""Runs one scheduler step on the model: pack the step into flat ragged tensors, build the paged
attention metadata, forward, return the logits of the sequences that sample."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .attention import AttentionMetadata
from .cache_size import plan_cache
from .config import DecoderConfig
from .models.gpt2 import GPT2LMHeadModel
from .models.llama import LlamaForCausalLM
from .scheduler import SchedulerOutput
from .weights import load_weights

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def model_class(config: DecoderConfig) -> type[torch.nn.Module]:
    return GPT2LMHeadModel if config.family == "gpt2" else LlamaForCausalLM


def load_decoder(path: Path, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    config = DecoderConfig.from_dir(path)
    cls = model_class(config)
    with torch.device("meta"):
        model = cls(config, device=device)
    tied = cls.tied_weights if config.tie_word_embeddings else None
    load_weights(model, path, dtype, device, tied, rename=getattr(cls, "checkpoint_name", None))
    model.tie_weights()
    model.prepare_for_inference()
    return model.eval()


class ModelRunner:
    def __init__(self, path: Path | str, num_blocks: int | None, block_size: int, dtype: str = "float32",
                 device: str = "cpu", *, memory_fraction: float | None = None, max_num_seqs: int = 64,
                 max_num_batched_tokens: int = 2048, max_model_len: int | None = None) -> None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype '{dtype}' is not one of {', '.join(DTYPES)}")
        self.device = torch.device(device)
        self.dtype = DTYPES[dtype]
        self.model = load_decoder(Path(path), self.dtype, self.device)
        c = self.model.config
        self.config = c
        self.block_size = block_size
        self.cache = plan_cache(c, block_size=block_size, dtype=self.dtype, device=self.device,
                                num_blocks=num_blocks, memory_fraction=memory_fraction, max_num_seqs=max_num_seqs,
                                max_num_batched_tokens=max_num_batched_tokens,
                                max_model_len=max_model_len or c.max_position_embeddings)
        num_blocks = self.num_blocks = self.cache.num_blocks
        # one (2, blocks, block_size, Hkv, D) tensor per layer: K and V
        self.kv_caches = [torch.zeros(2, num_blocks, block_size, c.num_kv_heads, c.head_dim, dtype=self.dtype,
                                      device=self.device) for _ in range(c.num_layers)]

    def prepare(self, out: SchedulerOutput):
        bs = self.block_size
        ids, pos, slots, q_lens, starts, tables = [], [], [], [], [], []
        for s in out.scheduled:
            seq, start, n = s.seq, s.seq.num_computed_tokens, s.num_tokens
            table = np.asarray(seq.block_table, dtype=np.int64)
            p = np.arange(start, start + n)
            ids.extend(seq.token_ids[start:start + n])
            pos.append(p)
            slots.append(table[p // bs] * bs + p % bs)
            q_lens.append(n)
            starts.append(start)
            tables.append(table)
        num_seqs, q_max = len(q_lens), max(q_lens)
        ctx = [st + n for st, n in zip(starts, q_lens)]
        c_max = max(ctx)
        dev = self.device
        kv_slots = np.zeros((num_seqs, c_max), np.int64)
        for i, (c, table) in enumerate(zip(ctx, tables)):
            cp = np.arange(c)
            kv_slots[i, :c] = table[cp // bs] * bs + cp % bs
        if q_max == 1:  # decode only: queries are the step's rows; mask only ragged contexts
            mask = None
            if min(ctx) != c_max:
                mask = torch.from_numpy(np.arange(c_max)[None, None, None, :] <
                                        np.asarray(ctx)[:, None, None, None]).to(dev)
            meta = AttentionMetadata(slot_mapping=torch.from_numpy(np.concatenate(slots)).to(dev),
                                     q_index=None, q_valid=None, kv_slots=torch.from_numpy(kv_slots).to(dev),
                                     mask=mask, decode_only=True)
            logits_index = [i for i, s in enumerate(out.scheduled) if s.completes]
        else:
            q_index = np.zeros((num_seqs, q_max), np.int64)
            q_valid = np.zeros((num_seqs, q_max), bool)
            mask = np.zeros((num_seqs, 1, q_max, c_max), bool)
            logits_index, offset = [], 0
            for i, (n, st, c) in enumerate(zip(q_lens, starts, ctx)):
                q_index[i, :n] = np.arange(offset, offset + n)
                q_valid[i, :n] = True
                cp = np.arange(c)
                mask[i, 0, :n, :c] = cp[None, :] <= (st + np.arange(n))[:, None]  # causal
                mask[i, 0, n:, 0] = True  # padded query rows attend somewhere (no NaN); dropped later
                offset += n
                if out.scheduled[i].completes:
                    logits_index.append(offset - 1)
            meta = AttentionMetadata(
                slot_mapping=torch.from_numpy(np.concatenate(slots)).to(dev),
                q_index=torch.from_numpy(q_index).to(dev), q_valid=torch.from_numpy(q_valid).to(dev),
                kv_slots=torch.from_numpy(kv_slots).to(dev), mask=torch.from_numpy(mask).to(dev))
        return (torch.tensor(ids, dtype=torch.long, device=dev), torch.from_numpy(np.concatenate(pos)).to(dev),
                meta, torch.tensor(logits_index, dtype=torch.long, device=dev))

    @torch.inference_mode()
    def run(self, out: SchedulerOutput) -> torch.Tensor:
        """Logits (N, vocab) for ``out.to_sample``, in that order."""
        ids, pos, meta, logits_index = self.prepare(out)
        return self.model(ids, pos, self.kv_caches, meta, logits_index)
