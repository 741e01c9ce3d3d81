"""Preallocated, slot-indexed KV cache that plugs into transformers' attention layers.

Per layer K and V are [max_slots, max_seq_len, kv_heads, head_dim] ("rows" layout: one row per slot and
position, so that FlashAttention's varlen decode can read every slot as a run of rows), allocated once. A request
owns one slot from admission to completion. transformers' attention modules call
`past_key_values.update(key_states, value_states, layer_idx)` with [B, kv_heads, q_len, head_dim] states and attend
over whatever it returns, which is in that same [B, kv_heads, length, head_dim] form (a transposed view of the
rows). This cache answers according to the mode the engine set before the forward:

- prefill(slot, start): the batch is B requests in the consecutive slots [slot, slot + B), their prompts right-padded
  to one length q_len; the keys are written at positions [start, start + q_len) of each slot and the slots'
  [0, start + q_len) prefixes are returned. Positions past a row's own prompt hold padding keys, which the decode
  lengths and masks hide and later tokens overwrite.
- packed(rows): the batch is one row of T packed tokens of several requests (engine/packed.py); token t's K/V go
  to cache row `rows[t]` (slot * max_seq_len + position, an indexed write of a device tensor) and the whole cache is
  returned, as [slots, kv_heads, max_seq_len, head_dim] views, for the packed attention (engine/attention.py).
- decode(bucket, positions, kv_len): the batch is slots [0, bucket), one query token each; row b's key goes to
  `positions[b]` (an indexed write, no host sync) and K/V[:bucket, :kv_len] is returned. The caller supplies a
  4D attention mask that hides the positions beyond each row's length (and, for the flash path of
  engine/attention.py, the lengths themselves). `positions` may be a static buffer so that the decode step can be
  captured in a CUDA graph.

The engine passes an explicit 4D mask, which `masking_utils.create_causal_mask` returns as-is (its early exit for
4D masks), so transformers' own mask sizing (`get_mask_sizes`/`get_seq_length`) is not relied on; those methods
are still implemented for the active mode.
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
    slot: int = 0
    start: int = 0
    bucket: int = 0
    kv_len: int = 0
    positions: torch.Tensor | None = None
    batch_index: torch.Tensor | None = None  # arange(max_slots) on the device, for the decode writes
    rows: torch.Tensor | None = None  # packed: each token's cache row


class SlotLayer(CacheLayerMixin):  # type: ignore[no-untyped-call]
    """One layer's preallocated K/V for all slots."""

    is_compileable = False  # only consulted by generate(), which never sees this cache
    is_sliding = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, mode: _Mode) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.keys = keys
        self.values = values
        self.mode = mode
        self.dtype, self.device = keys.dtype, keys.device
        self.max_cache_len = keys.shape[1]
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        return None  # allocated up front

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values, mode = self.keys, self.values, self.mode
        assert keys is not None and values is not None
        if mode.kind == "prefill":
            rows = slice(mode.slot, mode.slot + key_states.shape[0])
            end = mode.start + key_states.shape[2]
            keys[rows, mode.start : end] = key_states.transpose(1, 2)
            values[rows, mode.start : end] = value_states.transpose(1, 2)
            if mode.start == 0:  # the prefix is exactly these states (contiguous, as the attention kernels like)
                return key_states, value_states
            return keys[rows, :end].transpose(1, 2), values[rows, :end].transpose(1, 2)
        if mode.kind == "packed":
            assert mode.rows is not None
            if key_states.shape[0] != 1 or key_states.shape[2] != mode.rows.shape[0]:
                raise RuntimeError(f"packed prefill expects [1, heads, {mode.rows.shape[0]}, dim] states, "
                                   f"got {list(key_states.shape)}")
            heads, dim = keys.shape[2], keys.shape[3]
            keys.view(-1, heads, dim).index_copy_(0, mode.rows, key_states[0].transpose(0, 1))
            values.view(-1, heads, dim).index_copy_(0, mode.rows, value_states[0].transpose(0, 1))
            return keys.transpose(1, 2), values.transpose(1, 2)
        if mode.kind == "decode":
            assert mode.positions is not None and mode.batch_index is not None
            b = mode.bucket
            if key_states.shape[0] != b or key_states.shape[2] != 1:
                raise RuntimeError(f"decode expects [{b}, heads, 1, dim] states, got {list(key_states.shape)}")
            index = (mode.batch_index[:b], mode.positions[:b])
            keys.index_put_(index, key_states[:, :, 0])
            values.index_put_(index, value_states[:, :, 0])
            return keys[:b, : mode.kv_len].transpose(1, 2), values[:b, : mode.kv_len].transpose(1, 2)
        raise RuntimeError("SlotKVCache used outside an engine forward (mode not set)")

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


class SlotKVCache(Cache):
    """The `past_key_values` object handed to `model.model(...)`: one `SlotLayer` per decoder layer."""

    def __init__(
        self,
        *,
        num_layers: int,
        max_slots: int,
        kv_heads: int,
        max_seq_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.mode = _Mode(batch_index=torch.arange(max_slots, device=device))
        shape = (max_slots, max_seq_len, kv_heads, head_dim)
        self.slot_layers = [
            SlotLayer(
                torch.zeros(shape, dtype=dtype, device=device),
                torch.zeros(shape, dtype=dtype, device=device),
                self.mode,
            )
            for _ in range(num_layers)
        ]
        super().__init__(layers=list(self.slot_layers))
        self.max_slots = max_slots
        self.max_seq_len = max_seq_len
        self.device = device

    # --- modes, set by the engine around each forward -------------------------------------------------------------
    def set_prefill(self, slot: int, start: int = 0) -> None:
        """The next forward prefills slots [slot, slot + batch) from position `start`."""
        self.mode.kind, self.mode.slot, self.mode.start = "prefill", slot, start

    def set_packed(self, rows: torch.Tensor) -> None:
        """The next forward is a packed prefill whose token t goes to cache row rows[t]."""
        self.mode.kind, self.mode.rows = "packed", rows

    def set_decode(self, bucket: int, positions: torch.Tensor, kv_len: int) -> None:
        self.mode.kind, self.mode.bucket, self.mode.positions, self.mode.kv_len = "decode", bucket, positions, kv_len

    def set_idle(self) -> None:
        self.mode.kind, self.mode.positions, self.mode.rows = "idle", None, None

    # --- slot management -----------------------------------------------------------------------------------------
    def move_slot(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` positions of slot `src` into slot `dst` (compaction after a request leaves)."""
        if src == dst or length <= 0:
            return
        for layer in self.slot_layers:
            assert layer.keys is not None and layer.values is not None
            layer.keys[dst, :length] = layer.keys[src, :length]
            layer.values[dst, :length] = layer.values[src, :length]

    def slot_keys(self, layer_idx: int, slot: int, length: int) -> torch.Tensor:
        """Keys of one slot, [kv_heads, length, head_dim] (for tests and debugging)."""
        keys = self.slot_layers[layer_idx].keys
        assert keys is not None
        return keys[slot, :length].transpose(0, 1)

    def nbytes(self) -> int:
        return sum(
            2 * layer.keys.numel() * layer.keys.element_size() for layer in self.slot_layers if layer.keys is not None
        )
