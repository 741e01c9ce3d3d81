"""The engine's decode forward over static device buffers, so that each (batch bucket, KV bucket) is capturable.

`DecodeStep` owns the inputs of a decode step for batch rows [0, max_slots): token ids, positions, and each row's
first cache row in the KV pool (kv_cache.py), with the varlen attention's offsets (engine/attention.py), or with a
paged pool each row's page table (engine/paged_attention.py). `load()` fills them for the running requests: from
the host after the running set changed (admission, release, compaction), otherwise on the device (the last sampled
tokens become the ids, positions advance by one), so a steady step copies nothing from the host. Rows past the
running requests are padding: token 0 at position 0 of the trash row (of the trash page, paged).
`forward(bucket, kv_len)` reads only these buffers; shapes depend on (bucket, kv_len) alone, which is what
`cuda_graphs.DecodeGraphs` captures.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vlm_triton.engine.attention import DecodeRows, PagedRows, decode_reads_rows, model_mask
from vlm_triton.engine.kv_cache import PooledKVCache, span_rows
from vlm_triton.engine.paged_attention import page_rows, page_span_rows
from vlm_triton.engine.types import ActiveRequest

MIN_KV_BUCKET = 256


def kv_length_buckets(max_seq_len: int, smallest: int = MIN_KV_BUCKET) -> list[int]:
    """KV lengths a decode step attends over: powers of two from `smallest`, then max_seq_len."""
    buckets = [k for k in (smallest << i for i in range(32)) if k < max_seq_len]
    return [*buckets, max_seq_len]


class DecodeStep:
    def __init__(self, backbone: nn.Module, lm_head: nn.Module, cache: PooledKVCache, *, max_slots: int,
                 max_seq_len: int, bool_mask: bool, slot_attention: bool, head_dim: int, dtype: torch.dtype,
                 page: int = 0) -> None:
        """`slot_attention`: the model attends with the engine's `vlm_slot` function, which can read the cache's
        row pool directly (FA2 or paged decode); otherwise the cache gathers padded K/V for it. `page` > 0: the
        pool is paged, pages of `page` rows."""
        self.backbone, self.lm_head, self.cache = backbone, lm_head, cache
        self.embed: nn.Module = backbone.get_input_embeddings()  # type: ignore[operator]
        self.bool_mask, self.slot_attention, self.head_dim, self.dtype = bool_mask, slot_attention, head_dim, dtype
        slots, device = max_slots, cache.device
        self.ids = torch.zeros(slots, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(slots, dtype=torch.long, device=device)
        self.kv_range = torch.arange(max_seq_len, device=device)
        self.cu_q = torch.arange(slots + 1, dtype=torch.int32, device=device)  # the varlen kernel's offsets
        # each row's first cache row, int32 as the varlen kernel takes it (its offsets), also the rows' starts
        self.cu_k = torch.full((slots + 1,), cache.trash_row, dtype=torch.int32, device=device)
        pinned = device.type == "cuda"
        self.host = torch.zeros(2, slots, dtype=torch.long, pin_memory=pinned)  # ids, pos
        self.host_starts = torch.zeros(slots, dtype=torch.int32, pin_memory=pinned)
        self.page = page
        pages = -(-max_seq_len // page) if page else 1
        trash_page = cache.trash_row // page if page else 0  # the trash row is its page's first row
        self.table = torch.full((slots, pages), trash_page, dtype=torch.int32, device=device)
        self.host_table = torch.full((slots, pages), trash_page, dtype=torch.int32, pin_memory=pinned)
        self.changed = True  # the running set changed since the last load: rebuild from the host
        self.last_tokens: torch.Tensor | None = None
        self._copied: torch.cuda.Event | None = None  # the last host -> device copy of the pinned buffers

    def load(self, active: list[ActiveRequest], bucket: int) -> None:
        """Inputs of the next step for `active` (batch rows 0..n-1); rows [n:bucket] are padding."""
        n = len(active)
        if self.changed or self.last_tokens is None:
            if self._copied is not None:  # a step sampled after it normally, but one that failed may not have
                self._copied.synchronize()
            host = self.host[:, :bucket]
            host.zero_()
            host[0, :n] = torch.tensor([s.generated[-1] for s in active])
            host[1, :n] = torch.tensor([s.prompt_len + len(s.generated) - 1 for s in active])
            self.ids[:bucket, 0].copy_(host[0], non_blocking=True)
            self.pos[:bucket].copy_(host[1], non_blocking=True)
            if self.page:  # each row's page table (padding rows: the trash page)
                table = self.host_table[:bucket].numpy()
                table.fill(self.cache.trash_row // self.page)
                for k, seq in enumerate(active):
                    assert seq.kv_pages is not None
                    table[k, : len(seq.kv_pages)] = seq.kv_pages
                self.table[:bucket].copy_(self.host_table[:bucket], non_blocking=True)
            else:  # each row's first cache row (padding rows: the trash row)
                starts = self.host_starts[:bucket]
                starts.fill_(self.cache.trash_row)
                starts[:n] = torch.tensor([s.kv_start for s in active])
                self.cu_k[:bucket].copy_(starts, non_blocking=True)
            if self.host.is_pinned():
                self._copied = torch.cuda.Event()
                self._copied.record()
            self.changed = False
        else:  # the same requests in the same rows as the last step: advance them on the device
            self.ids[:n, 0].copy_(self.last_tokens)
            self.pos[:n].add_(1)

    def forward(self, bucket: int, kv_len: int) -> torch.Tensor:
        """Decode step over `ids[:bucket]`, `pos[:bucket]` -> logits [bucket, V]."""
        pos, starts = self.pos[:bucket], self.cu_k[:bucket]
        allowed = self.kv_range[:kv_len].view(1, 1, 1, -1) <= pos.view(-1, 1, 1, 1)
        rows: DecodeRows | PagedRows | None = None
        gather: torch.Tensor | None = None
        reads_rows = self.slot_attention and decode_reads_rows(starts.device, self.dtype, self.head_dim,
                                                               paged=self.page > 0)
        if self.page:
            table = self.table[:bucket]
            written = page_rows(table, pos.view(-1, 1), self.page).view(-1)
            if reads_rows:
                rows = PagedRows((pos + 1).to(torch.int32), table, self.page, kv_len)
            else:
                gather = page_span_rows(table, kv_len, pos, self.page)
        else:
            written = starts + pos
            if reads_rows:
                rows = DecodeRows((pos + 1).to(torch.int32), self.cu_k[: bucket + 1], self.cu_q[: bucket + 1], kv_len)
            else:
                gather = span_rows(starts, kv_len, pos)
        self.cache.set_mode("decode", written, gather, kv_len=kv_len)
        out: Any = self.backbone(
            inputs_embeds=self.embed(self.ids[:bucket]),
            position_ids=pos.view(-1, 1),
            attention_mask=model_mask(allowed, self.bool_mask, self.dtype),
            past_key_values=self.cache,
            use_cache=True,
            slot_decode=rows,  # reaches the attention function (engine/attention.py) through transformers' kwargs
        )
        logits: torch.Tensor = self.lm_head(out.last_hidden_state[:, -1])
        return logits
