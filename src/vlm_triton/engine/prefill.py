"""The padded prefill forward (models on eager attention): prompt positions [start, end) of B requests, rows
right-padded to one length, written into each request's KV rows.

One function serves both prefills of the engine: a batch of whole prompts (start 0) and one chunk of a long prompt
(B = 1, `start` = the tokens already cached). Query i of a row sits at position start + i and sees the positions
0 .. start + i, so a chunk attends to the chunks before it (the cache returns each request's rows from position 0,
padded to `end`). Padding tokens past a row's own prompt write the pool's trash row. Image slot ids
(>= vocab_size) take rows of the request's prompt table (id - vocab_size indexes the table, so any slice of a
prompt embeds as the whole does).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vlm_triton.engine.attention import model_mask
from vlm_triton.engine.kv_cache import PooledKVCache
from vlm_triton.engine.types import ActiveRequest


class PrefillForward:
    def __init__(self, backbone: nn.Module, cache: PooledKVCache, *, vocab_size: int, bool_mask: bool,
                 dtype: torch.dtype) -> None:
        self.backbone, self.cache, self.vocab_size = backbone, cache, vocab_size
        self.embed: nn.Module = backbone.get_input_embeddings()  # type: ignore[operator]
        self.bool_mask, self.dtype, self.device = bool_mask, dtype, cache.device

    def __call__(self, seqs: list[ActiveRequest], *, start: int, end: int) -> torch.Tensor:
        """Positions [start, end) of each request's prompt (a row ends at its own prompt) into its KV rows; the
        hidden state of each row's last position in range, [B, hidden]."""
        n = end - start
        ids = torch.zeros(len(seqs), n, dtype=torch.long)
        rows = torch.full((len(seqs), n), self.cache.trash_row, dtype=torch.long)
        last = []
        for k, seq in enumerate(seqs):
            row = seq.ids[start : min(end, seq.prompt_len)]
            ids[k, : row.shape[0]] = row
            rows[k, : row.shape[0]] = seq.rows_at(torch.arange(start, start + row.shape[0]))
            last.append(row.shape[0] - 1)
        causal = torch.ones(n, end, dtype=torch.bool, device=self.device).tril(start).view(1, 1, n, end)
        gather = None
        if start > 0:  # each row's positions [0, end) (a chunk: one request, whose prompt reaches end)
            gather = torch.stack([seq.rows_at(torch.arange(end)) for seq in seqs]).to(self.device)
        self.cache.set_mode("prefill", rows.view(-1).to(self.device), gather, start=start)
        try:
            out: Any = self.backbone(
                inputs_embeds=self.embed_ids(ids, seqs),
                position_ids=torch.arange(start, end, device=self.device).expand(len(seqs), n),
                attention_mask=model_mask(causal, self.bool_mask, self.dtype),
                past_key_values=self.cache,
                use_cache=True,
            )
        finally:
            self.cache.set_idle()
        index = torch.arange(len(seqs), device=self.device)
        hidden: torch.Tensor = out.last_hidden_state[index, torch.tensor(last, device=self.device)]
        return hidden

    def embed_ids(self, ids: torch.Tensor, seqs: list[ActiveRequest]) -> torch.Tensor:
        """Input embeddings of host ids [B, n] (row k from seqs[k]), image slots from that request's table."""
        image = ids >= self.vocab_size
        embeds: torch.Tensor = self.embed(ids.masked_fill(image, 0).to(self.device))
        for k, seq in enumerate(seqs):
            if seq.table is not None and bool(image[k].any()):
                rows = ids[k, image[k]] - self.vocab_size
                embeds[k, image[k].to(self.device)] = seq.table.to(self.device, self.dtype)[rows.to(self.device)]
        return embeds
