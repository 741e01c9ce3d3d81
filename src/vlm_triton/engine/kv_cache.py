"""The engine's KV cache: one pool of rows per layer, plugged into transformers' attention layers.

Per layer K and V are [capacity + 1, kv_heads, head_dim]: row r holds one position's K (V) for every KV head.
Each request owns its rows from admission to completion (kv_pool.py reserves them): a contiguous run, its position
p at row `kv_start + p`, or pages, p at row `pages[p // page] * page + p % page` (`ActiveRequest.rows_at`); the
last row (`trash_row`, the first row of the page past the last of a paged pool) belongs to nobody and takes the
writes of padding tokens. The
pool is allocated once; a finished request's rows are reused by the next one, and a request reserves only what its
prompt and output can reach, not `max_seq_len`.

transformers' attention modules call `past_key_values.update(key_states, value_states, layer_idx)` with
[B, kv_heads, q_len, head_dim] states and attend over whatever it returns. Every forward of the engine sets a mode
first (`set_mode`): `rows`, the cache row of each of the B * q_len new states in order (a device tensor, so that
the write is one indexed copy with no host sync and can be captured in a CUDA graph), and what to return:
- `gather` None and kind "prefill" (a padded prefill from position 0): the new states themselves;
- `gather` None otherwise: the whole pool as [rows, kv_heads, head_dim] tensors, for the engine's attention
  (engine/attention.py), which reads each sequence's span of rows from its offset (packed prefill, FA2 decode) or
  through its page table (paged decode; a paged packed prefill gathers its rows first);
- `gather` [B, L] row indices: K/V[gather] as [B, kv_heads, L, head_dim] (a copy), for the attention paths that take
  padded batches (masked SDPA decode, eager-attention models; `span_rows`). Positions past a sequence's end repeat
  its last row and are masked by the caller.

The engine passes explicit 4D masks, which `masking_utils.create_causal_mask` returns as-is (its early exit for 4D
masks), so transformers' own mask sizing (`get_mask_sizes`/`get_seq_length`) is not relied on; both still answer
for the active mode.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


@dataclass
class _Mode:
    """The forward the cache is serving now (set by the engine, read by every layer)."""

    kind: str = "idle"  # "prefill" | "packed" | "decode" | "idle"
    start: int = 0  # prefill: the first position of the queries
    kv_len: int = 0  # decode: the KV length the step attends over
    rows: torch.Tensor | None = None  # the cache row of each new state, [B * q_len] (int64)
    gather: torch.Tensor | None = None  # [B, L] rows to return as padded K/V, or None


class PoolLayer(CacheLayerMixin):  # type: ignore[no-untyped-call]
    """One layer's preallocated K/V rows."""

    is_compileable = False  # only consulted by generate(), which never sees this cache
    is_sliding = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, mode: _Mode) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.keys = keys
        self.values = values
        self.mode = mode
        self.dtype, self.device = keys.dtype, keys.device
        self.max_cache_len = keys.shape[0]
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        return None  # allocated up front

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values, mode = self.keys, self.values, self.mode
        assert keys is not None and values is not None
        if mode.kind == "idle" or mode.rows is None:
            raise RuntimeError("PooledKVCache used outside an engine forward (mode not set)")
        b, heads, n, dim = key_states.shape
        if b * n != mode.rows.shape[0]:
            raise RuntimeError(f"{mode.kind} expects {mode.rows.shape[0]} new states, got {list(key_states.shape)}")
        keys.index_copy_(0, mode.rows, key_states.transpose(1, 2).reshape(b * n, heads, dim))
        values.index_copy_(0, mode.rows, value_states.transpose(1, 2).reshape(b * n, heads, dim))
        if mode.gather is None:
            if mode.kind == "prefill":  # from position 0: the prefix is exactly these states
                return key_states, value_states
            return keys, values
        return keys[mode.gather].transpose(1, 2), values[mode.gather].transpose(1, 2)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if self.mode.kind == "decode":
            return self.mode.kv_len, 0
        return self.mode.start + query_length, 0

    def get_seq_length(self) -> int:
        return self.mode.start if self.mode.kind == "prefill" else 0

    def get_max_length(self) -> int:
        return self.max_cache_len

    def reset(self) -> None:
        assert self.keys is not None and self.values is not None
        self.keys.zero_()
        self.values.zero_()


class PooledKVCache(Cache):
    """The `past_key_values` object handed to `model.model(...)`: one `PoolLayer` per decoder layer, each
    `capacity` rows plus the trash row."""

    def __init__(
        self,
        *,
        num_layers: int,
        capacity: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.mode = _Mode()
        shape = (capacity + 1, kv_heads, head_dim)
        self.pool_layers = [
            PoolLayer(
                torch.zeros(shape, dtype=dtype, device=device),
                torch.zeros(shape, dtype=dtype, device=device),
                self.mode,
            )
            for _ in range(num_layers)
        ]
        super().__init__(layers=list(self.pool_layers))
        self.capacity = capacity
        self.trash_row = capacity
        self.device = device

    def set_mode(self, kind: str, rows: torch.Tensor, gather: torch.Tensor | None = None, *, start: int = 0,
                 kv_len: int = 0) -> None:
        """The next forward (`kind` "prefill", "packed" or "decode") writes its new states to `rows` and returns
        K/V as `gather` says (module docstring)."""
        mode = self.mode
        mode.kind, mode.rows, mode.gather, mode.start, mode.kv_len = kind, rows, gather, start, kv_len

    def set_idle(self) -> None:
        self.mode.kind, self.mode.rows, self.mode.gather = "idle", None, None

    def keys_at(self, layer_idx: int, start: int, length: int) -> torch.Tensor:
        """Keys of one request's rows [start, start + length), [kv_heads, length, head_dim] (tests, debugging)."""
        keys = self.pool_layers[layer_idx].keys
        assert keys is not None
        return keys[start : start + length].transpose(0, 1)

    def nbytes(self) -> int:
        return sum(
            2 * layer.keys.numel() * layer.keys.element_size() for layer in self.pool_layers if layer.keys is not None
        )


def span_rows(starts: torch.Tensor, length: int, last: torch.Tensor | int) -> torch.Tensor:
    """[B, length] row indices starts[b] + min(i, last[b]): each request's rows as a padded view, positions past its
    last written one repeating that one (the caller masks them), so a request never reads rows it does not own."""
    return starts.view(-1, 1) + torch.arange(length, device=starts.device).clamp(max=torch.as_tensor(last).view(-1, 1))
