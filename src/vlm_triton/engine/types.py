"""Request and event types of the torch LLM engine, and the tensorrt_llm `stop_words_list` parser.

A `GenerationRequest` carries what the `llm` Triton contract carries (see `vlm_triton.contracts.LLM`): prompt ids
in which ids >= vocab_size are image slots indexing `prompt_embedding_table`, the output length, `end_id`, stop
word sequences and the sampling options. The engine answers with one `TokenEvent` per request per step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Union

import numpy as np
import torch

from vlm_triton.engine.sampling import SamplingParams
from vlm_triton.errors import InvalidRequest

FinishReason = Literal["stop", "length", "cancelled", "error"]

TokenIds = Union[Sequence[int], "np.ndarray[Any, Any]", torch.Tensor]
EmbeddingTable = Union["np.ndarray[Any, Any]", torch.Tensor]


@dataclass
class GenerationRequest:
    """One generation request.

    input_ids: prompt token ids; an id `vocab_size + k` takes row k of `prompt_embedding_table` (TRT-LLM's fake
        prompt-tuning ids). Any id >= vocab_size requires the table.
    prompt_embedding_table: [rows, hidden] image embeddings, cast to the engine dtype.
    max_new_tokens: >= 1; clipped so that prompt + generated <= max_seq_len.
    end_id: EOS id, -1 for none. The EOS token is emitted as the last token (finish 'stop') unless ignore_eos.
    stop_words: token-id sequences; generation stops (finish 'stop') once the generated tokens end with one. The
        completing token is emitted. Matching looks at generated tokens only, never at the prompt.
    temperature: 0 means greedy. top_k: 0 disables, 1 means greedy. top_p: 1.0 (or 0.0) disables.
    repetition_penalty: HF semantics (1.0 = off), over prompt + generated ids, like `generate`.
    presence_penalty / frequency_penalty: OpenAI semantics (0.0 = off), over generated ids only.
    seed: seeds the request's own torch.Generator (same seed => same tokens); None draws a random seed.
    """

    request_id: str
    input_ids: TokenIds
    max_new_tokens: int
    prompt_embedding_table: EmbeddingTable | None = None
    end_id: int = -1
    stop_words: list[list[int]] = field(default_factory=list)
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    ignore_eos: bool = False


@dataclass(frozen=True)
class TokenEvent:
    """What one engine step produced for one request.

    token_id: the new token, or None for events that carry no token ('cancelled', 'error').
    finished: True on the request's last event; finish_reason is then set.
    index: 0-based position of token_id among the generated tokens (== number of tokens emitted before it).
    prompt_tokens: the prompt length, for usage accounting.
    error: the message when finish_reason == 'error' (a server fault while running this request).
    """

    request_id: str
    token_id: int | None
    finished: bool
    finish_reason: FinishReason | None
    index: int
    prompt_tokens: int
    error: str | None = None


def parse_stop_words_list(arr: np.ndarray[Any, Any] | torch.Tensor | None) -> list[list[int]]:
    """Parse tensorrt_llm's `stop_words_list` ([2, L], or [1, 2, L] with the batch dim) into token sequences.

    Row 0 holds the concatenated token ids (padded with 0), row 1 the cumulative end offset of each word (padded
    with -1), e.g. words [[5, 6], [7]] -> [[5, 6, 7], [2, 3, -1]].
    """
    if arr is None:
        return []
    a = arr.detach().cpu().numpy() if isinstance(arr, torch.Tensor) else np.asarray(arr)
    if a.ndim == 3:
        if a.shape[0] != 1:
            raise InvalidRequest(f"stop_words_list: expected one request, got batch of {a.shape[0]}")
        a = a[0]
    if a.ndim != 2 or a.shape[0] != 2:
        raise InvalidRequest(f"stop_words_list: expected shape [2, L], got {list(a.shape)}")
    ids, offsets = a[0].astype(np.int64), a[1].astype(np.int64)
    words: list[list[int]] = []
    start = 0
    for end in offsets.tolist():
        if end < 0:
            break
        if end < start or end > ids.shape[0]:
            raise InvalidRequest(f"stop_words_list: bad offset {end} (previous {start}, {ids.shape[0]} ids)")
        if end > start:
            words.append([int(t) for t in ids[start:end]])
        start = end
    return words


@dataclass
class ActiveRequest:
    """A validated request as the engine tracks it: `slot` (its decode batch row) is set while it runs, its KV rows
    from admission to its end: `kv_start` and `kv_rows` (one run of pool rows), or `kv_pages` of `kv_page` rows
    each (a paged pool, kv_pool.py)."""

    request_id: str
    ids: torch.Tensor  # int64 [L], CPU
    table: torch.Tensor | None
    max_new: int
    end_id: int
    ignore_eos: bool
    stop_words: list[list[int]]
    params: SamplingParams
    generator: torch.Generator
    slot: int = -1
    kv_start: int = -1
    kv_rows: int = 0
    kv_pages: list[int] | None = None
    kv_page: int = 0
    generated: list[int] = field(default_factory=list)

    @property
    def prompt_len(self) -> int:
        return int(self.ids.shape[0])

    @property
    def kv_need(self) -> int:
        """KV rows the request can reach: its prompt and every output token but the last (never fed back)."""
        return self.prompt_len + self.max_new - 1

    def rows_at(self, positions: torch.Tensor) -> torch.Tensor:
        """The KV-pool rows of these positions (int64, host) in the request's reservation."""
        if self.kv_pages is not None:
            pages = torch.tensor(self.kv_pages, dtype=torch.long)
            return pages[positions // self.kv_page] * self.kv_page + positions % self.kv_page
        return positions + self.kv_start

    def append(self, token: int) -> FinishReason | None:
        """Record a generated token; why the request ends with it, if it does (EOS / stop words, then length)."""
        self.generated.append(token)
        if (token == self.end_id and not self.ignore_eos) or any(
            self.generated[-len(w) :] == w for w in self.stop_words
        ):
            return "stop"
        return "length" if len(self.generated) >= self.max_new else None


def prepare_request(req: GenerationRequest, *, vocab_size: int, hidden_size: int, max_seq_len: int) -> ActiveRequest:
    """Validate `req` for an engine (raises InvalidRequest) and convert it to the engine's record."""
    raw = req.input_ids
    arr = raw.detach().cpu().numpy() if isinstance(raw, torch.Tensor) else np.asarray(raw)
    if arr.dtype.kind not in "iu" and arr.size:
        raise InvalidRequest(f"input_ids must be integers, got {arr.dtype}")
    ids = torch.from_numpy(arr.astype(np.int64).reshape(-1))
    n = int(ids.shape[0])
    if n < 1:
        raise InvalidRequest("input_ids is empty")
    if n > max_seq_len - 1:
        raise InvalidRequest(f"prompt has {n} tokens; at most {max_seq_len - 1} fit (max_seq_len)")
    if int(ids.min()) < 0:
        raise InvalidRequest("input_ids has negative ids")
    if req.max_new_tokens < 1:
        raise InvalidRequest(f"max_new_tokens must be >= 1, got {req.max_new_tokens}")
    table = None
    n_slots = int((ids >= vocab_size).sum())
    if req.prompt_embedding_table is not None or n_slots:
        if req.prompt_embedding_table is None:
            raise InvalidRequest(f"{n_slots} image slot ids (>= {vocab_size}) but no prompt_embedding_table")
        t = req.prompt_embedding_table
        table = t if isinstance(t, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(t))
        if table.ndim != 2 or table.shape[1] != hidden_size:
            raise InvalidRequest(f"prompt_embedding_table must be [rows, {hidden_size}], got {list(table.shape)}")
        if not table.is_floating_point():
            raise InvalidRequest(f"prompt_embedding_table must be floating point, got {table.dtype}")
        if n_slots and int(ids.max()) - vocab_size >= table.shape[0]:
            raise InvalidRequest(
                f"image slot id {int(ids.max())} needs row {int(ids.max()) - vocab_size}; the table has {table.shape[0]}"
            )
    params = SamplingParams(
        float(req.temperature), int(req.top_k), float(req.top_p), float(req.repetition_penalty),
        float(req.presence_penalty), float(req.frequency_penalty),
    )  # fmt: skip
    params.validate()
    stop_words = [list(map(int, w)) for w in req.stop_words if len(w)]
    generator = torch.Generator()
    if req.seed is not None:
        generator.manual_seed(int(req.seed))
    else:
        generator.seed()
    max_new = min(int(req.max_new_tokens), max_seq_len - n)
    return ActiveRequest(
        req.request_id, ids, table, max_new, int(req.end_id), bool(req.ignore_eos), stop_words, params, generator
    )
