"""The packed prefill forward: the prompt spans of B requests as one row of tokens, with no padding between them.

Same interface and meaning as `prefill.PrefillForward` (positions [start, end) of each request's prompt, a row
ending at its own prompt, into each request's KV rows; the hidden state of each row's last position), for models
whose attention is the engine's `vlm_slot` (engine/attention.py). Every input of the forward lives in a static
device buffer sized for the largest step (`max_tokens` tokens, `max_rows` sequences), and the forward reads only
those buffers and a token-count bucket, so `PrefillGraphs` (engine/cuda_graphs.py) captures one CUDA graph per
bucket: a prefill step is then a few host-to-device copies, the embedding lookup and one replay, where the eager
forward makes hundreds of Python module calls (which held the llm stub's GIL under load: docs/benchmarks.md,
item 27).

Layout of a step with T real tokens in bucket Tb >= T: token i of sequence b sits at packed row cu_q[b] + i, has
position start_b + i and writes its K/V to cache row kv_start_b + start_b + i (kv_cache.py, mode "packed"); the
attention of sequence b reads its rows [kv_start_b, kv_start_b + end_b). Padding tokens [T, Tb) write to the
pool's trash row, which belongs to no request, and belong to no sequence, so their outputs are never read.

With a paged pool (kv_pool.PagePool) a request's rows are not one span, so the attention gathers them first
(`PackedRows.k_index`): for whole prompts (start 0) the rows the step itself writes, `rows[:Tb]` (a static buffer,
so this too is captured), with sequence b at offset cu_q[b]; for a chunk of a long prompt (start > 0), every row of
its positions [0, end), eagerly.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vlm_triton.engine.attention import PackedRows
from vlm_triton.engine.kv_cache import PooledKVCache
from vlm_triton.engine.types import ActiveRequest

MIN_TOKEN_BUCKET = 64
SPLIT_FROM = 512  # octaves from here on are split in SPLITS_PER_OCTAVE buckets
SPLITS_PER_OCTAVE = 4


def token_buckets(max_tokens: int, smallest: int = MIN_TOKEN_BUCKET,
                  per_octave: int = SPLITS_PER_OCTAVE) -> list[int]:
    """Packed lengths a prefill is padded to: powers of two from `smallest`, each octave from SPLIT_FROM on split in
    `per_octave` (quarters: 512, 640, 768, 896, 1024, 1280, ...; 1: powers of two only), then max_tokens. The GEMMs
    and pointwise kernels of a step run over its whole bucket, so quarters cap the padding at a quarter of the step
    where powers of two alone padded W1's 3.4k-token prompt to 4,096 and two of them to 8,192 (docs/benchmarks.md,
    item 46); the graphs share one memory pool, so more of them cost capture time, not memory."""
    out: list[int] = []
    for power in (smallest << i for i in range(32)):
        if power >= max_tokens:
            break
        splits = per_octave if power >= SPLIT_FROM else 1
        out += [b for b in (power + power * j // splits for j in range(splits)) if b < max_tokens]
    return [*out, max_tokens]


def _fields(buf: torch.Tensor, t: int, b: int) -> tuple[torch.Tensor, ...]:
    """The views of a step's buffer, in order: positions [t], cache rows [t], last rows [b], cu_q [b + 1],
    cu_k [b + 1], used_k [b] (t tokens, b sequences)."""
    return torch.split(buf, [t, t, b, b + 1, b + 1, b])


class PackedPrefill:
    def __init__(self, backbone: nn.Module, cache: PooledKVCache, *, vocab_size: int, dtype: torch.dtype,
                 max_tokens: int, max_rows: int, max_seq_len: int, paged: bool = False) -> None:
        self.backbone, self.cache, self.vocab_size, self.dtype = backbone, cache, vocab_size, dtype
        self.embed: nn.Module = backbone.get_input_embeddings()  # type: ignore[operator]
        self.device, self.seq_len = cache.device, max_seq_len
        self.buckets = token_buckets(max_tokens)
        self.max_tokens, self.max_rows = self.buckets[-1], max_rows
        self.trash_row, self.paged = cache.trash_row, paged
        self.chunk_index: torch.Tensor | None = None  # a paged chunk's rows of positions [0, end), of the last load
        hidden = int(self.embed.weight.shape[1])  # type: ignore[union-attr]
        t, b = self.max_tokens, max_rows
        self.embeds = torch.zeros(t, hidden, dtype=dtype, device=self.device)
        # one host -> device copy per step (`_fields`); cu_q, cu_k and used_k also as int32, the kernel's type
        self.host = torch.zeros(2 * t + 4 * b + 2, dtype=torch.long, pin_memory=self.device.type == "cuda")
        self.meta = torch.zeros_like(self.host, device=self.device)
        self.pos, self.rows, self.last, *_ = _fields(self.meta, t, b)
        self.lengths = torch.zeros(3 * b + 2, dtype=torch.int32, device=self.device)
        self.cu_q, self.cu_k, self.used_k = torch.split(self.lengths, [b + 1, b + 1, b])
        self.mask = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=self.device)  # unused by the packed attention
        self.graphs: Any = None  # PrefillGraphs, set by the engine after capture
        self.spans: list[tuple[int, int, int, int]] = []  # of the last load
        self._copied: torch.cuda.Event | None = None  # the last load's host -> device copy

    def __call__(self, seqs: list[ActiveRequest], *, start: int, end: int) -> torch.Tensor:
        """Positions [start, end) of each request's prompt (a row ends at its own prompt) into its KV rows; the
        hidden state of each row's last position in range, [B, hidden]."""
        spans = self.load(seqs, start=start, end=end)
        total = spans[-1][1]
        if self.graphs is not None and self.chunk_index is None:
            bucket = next(b for b in self.buckets if b >= total)
            return self.graphs.replay(bucket)[: len(seqs)]  # type: ignore[no-any-return]
        # max_q >= 2: FA2 treats a varlen batch of max_q 1 as one token per sequence (its decode layout)
        max_q = max(2, *(q1 - q0 for q0, q1, _, _ in spans))
        return self.forward(total, max_q, spans, self.chunk_index)[: len(seqs)]

    def load(self, seqs: list[ActiveRequest], *, start: int, end: int) -> list[tuple[int, int, int, int]]:
        """Fill the step's buffers; the spans (q0, q1, the request's first cache row, attended length) per
        sequence."""
        if len(seqs) > self.max_rows:
            raise RuntimeError(f"a packed prefill takes at most {self.max_rows} sequences, got {len(seqs)}")
        if self._copied is not None:  # the pinned host buffer is free again once the last copy ran (a chunk that
            self._copied.synchronize()  # is not its prompt's last samples nothing, so no other sync ends its step)
        t, b = self.max_tokens, self.max_rows
        pieces = [seq.ids[start : min(end, seq.prompt_len)] for seq in seqs]
        total = sum(int(p.shape[0]) for p in pieces)
        if total > t:
            raise RuntimeError(f"a packed prefill takes at most {t} tokens, got {total}")
        pos, rows, last, cu_q, cu_k, used_k = _fields(self.host, t, b)
        rows.fill_(self.trash_row)  # padding tokens (and every token of an empty load, for graph capture)
        last.zero_()
        cu_q.fill_(total)
        cu_k.zero_()
        used_k.zero_()
        spans = []
        q0 = 0
        self.chunk_index = None
        for k, piece in enumerate(pieces):
            n, seq = int(piece.shape[0]), seqs[k]
            q1 = q0 + n
            pos[q0:q1] = torch.arange(start, start + n)
            rows[q0:q1] = seq.rows_at(pos[q0:q1])
            # where the sequence's K/V start: its run's first row; paged, its offset in what the attention gathers
            row0 = (q0 if start == 0 else 0) if self.paged else seq.kv_start
            if self.paged and start > 0:  # one chunk of a long prompt (the only sequence): gather [0, end)
                self.chunk_index = seq.rows_at(torch.arange(start + n)).to(self.device, non_blocking=True)
            last[k], cu_q[k], cu_k[k], used_k[k] = q1 - 1, q0, row0, start + n
            spans.append((q0, q1, row0, start + n))
            q0 = q1
        self.meta.copy_(self.host, non_blocking=True)
        if self.device.type == "cuda":
            self._copied = torch.cuda.Event()
            self._copied.record()
        self.lengths.copy_(self.meta[2 * t + b :])  # cu_q, cu_k, used_k: the tail of the layout, as int32
        if pieces:
            self._embed(torch.cat(pieces), seqs, spans)
        self.spans = spans
        return spans

    def _embed(self, ids: torch.Tensor, seqs: list[ActiveRequest], spans: list[tuple[int, int, int, int]]) -> None:
        """Input embeddings of the packed ids into the static buffer; image slots from each request's table."""
        image = ids >= self.vocab_size
        n = int(ids.shape[0])
        self.embeds[:n] = self.embed(ids.masked_fill(image, 0).to(self.device, non_blocking=True))
        if not bool(image.any()):
            return
        for seq, (q0, q1, _, _) in zip(seqs, spans):
            mask = image[q0:q1]
            if seq.table is not None and bool(mask.any()):
                at = torch.nonzero(mask)[:, 0] + q0
                table_rows = ids[at] - self.vocab_size
                self.embeds[at.to(self.device)] = seq.table.to(self.device, self.dtype)[table_rows.to(self.device)]

    def forward(self, tokens: int, max_q: int, spans: list[tuple[int, int, int, int]] | None,
                k_index: torch.Tensor | None = None) -> torch.Tensor:
        """The forward over the first `tokens` packed rows of the buffers -> hidden states of every sequence's last
        token, [max_rows, hidden] (rows past the step's sequences hold row 0's). `spans` None: inside a graph.
        `k_index`: the cache rows a paged chunk attends to (default, paged: the rows this forward writes)."""
        if self.paged and k_index is None:
            k_index = self.rows[:tokens]
        packed = PackedRows(self.cu_q, self.cu_k, self.used_k, max_q, self.seq_len,
                            None if spans is None else tuple(spans), k_index)
        self.cache.set_mode("packed", self.rows[:tokens])
        try:
            out: Any = self.backbone(
                inputs_embeds=self.embeds[:tokens].unsqueeze(0),
                position_ids=self.pos[:tokens].unsqueeze(0),
                attention_mask=self.mask,
                past_key_values=self.cache,
                use_cache=True,
                packed_prefill=packed,
            )
        finally:
            self.cache.set_idle()
        hidden: torch.Tensor = out.last_hidden_state[0].index_select(0, self.last)
        return hidden
