"""The engine's decode forward over static device buffers, so that each (batch bucket, KV bucket) is capturable.

`DecodeStep` owns the inputs of a decode step: token ids and positions of slots [0, max_slots), the KV index
range for the masks and the row offsets of the varlen attention (engine/attention.py). `load()` fills them for the
running requests: from the host after the running set changed (admission, release, compaction), otherwise on the
device (the last sampled tokens become the ids, positions advance by one), so a steady step copies nothing from
the host. `forward(bucket, kv_len)` reads only these buffers; shapes depend on (bucket, kv_len) alone, which is
what `cuda_graphs.DecodeGraphs` captures.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vlm_triton.engine.attention import DecodeRows, model_mask
from vlm_triton.engine.kv_cache import SlotKVCache
from vlm_triton.engine.types import ActiveRequest

MIN_KV_BUCKET = 256


def kv_length_buckets(max_seq_len: int, smallest: int = MIN_KV_BUCKET) -> list[int]:
    """KV lengths a decode step attends over: powers of two from `smallest`, then max_seq_len."""
    buckets = [k for k in (smallest << i for i in range(32)) if k < max_seq_len]
    return [*buckets, max_seq_len]


class DecodeStep:
    def __init__(self, backbone: nn.Module, lm_head: nn.Module, cache: SlotKVCache, *, bool_mask: bool,
                 dtype: torch.dtype) -> None:
        self.backbone, self.lm_head, self.cache = backbone, lm_head, cache
        self.embed: nn.Module = backbone.get_input_embeddings()  # type: ignore[operator]
        self.bool_mask, self.dtype = bool_mask, dtype
        slots, length, device = cache.max_slots, cache.max_seq_len, cache.device
        self.ids = torch.zeros(slots, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(slots, dtype=torch.long, device=device)
        self.kv_range = torch.arange(length, device=device)
        rows = torch.arange(slots + 1, dtype=torch.int32, device=device)
        self.cu_q, self.cu_k = rows, rows * length  # the varlen decode kernel's row offsets
        self.host = torch.zeros(2, slots, dtype=torch.long, pin_memory=device.type == "cuda")  # ids, positions
        self.changed = True  # the running set changed since the last load: rebuild from the host
        self.last_tokens: torch.Tensor | None = None

    def load(self, active: list[ActiveRequest], bucket: int) -> None:
        """Inputs of the next step for `active` (slots 0..n-1); free rows [n:bucket] get token 0 at position 0."""
        n = len(active)
        if self.changed or self.last_tokens is None:
            host = self.host[:, :bucket]
            host.zero_()
            host[0, :n] = torch.tensor([s.generated[-1] for s in active])
            host[1, :n] = torch.tensor([s.prompt_len + len(s.generated) - 1 for s in active])
            self.ids[:bucket, 0].copy_(host[0], non_blocking=True)
            self.pos[:bucket].copy_(host[1], non_blocking=True)
            self.changed = False
        else:  # the same requests in the same slots as the last step: advance them on the device
            self.ids[:n, 0].copy_(self.last_tokens)
            self.pos[:n].add_(1)

    def forward(self, bucket: int, kv_len: int) -> torch.Tensor:
        """Decode step over `ids[:bucket]`, `pos[:bucket]` -> logits [bucket, V]."""
        pos = self.pos[:bucket]
        allowed = self.kv_range[:kv_len].view(1, 1, 1, -1) <= pos.view(-1, 1, 1, 1)
        rows = DecodeRows((pos + 1).to(torch.int32), self.cu_k[: bucket + 1], self.cu_q[: bucket + 1])
        self.cache.set_decode(bucket, self.pos, kv_len)
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
