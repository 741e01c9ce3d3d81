"""The bls adapter under a stalled llm: the request is cancelled whether the stall is before the first response
(`async_exec` itself waits for it) or between responses, the cancellation never waits on the llm, and the client
gets an error naming the stage while the stub's threads go to the log. Runs on a small fake of
`triton_python_backend_utils`; the deadline logic itself is tested in test_orchestrator.py."""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import types
from collections.abc import AsyncIterator, Iterator
from typing import Any

import numpy as np
import pytest

from tests.unit.fake_triton import (
    FakeResponse,
    FakeTensor,
    FakeTritonError,
    adapters_with,
    fake_pb_utils,
)
from vlm_triton.errors import StageStalled
from vlm_triton.pipeline.deadline import within
from vlm_triton.pipeline.orchestrator import Chunk, Prepared, RequestOptions

FINAL = 1
FOREVER = 3600.0


class FakeLLM:
    """Answers `first` responses, then hangs until a cancellation (stop=True, same id) arrives, like a wedged llm
    that still takes requests. `first=0`: even `async_exec` never returns (it waits for the first response).
    `cancel_hangs`: the cancellation request gets no answer either."""

    def __init__(self, first: int, cancel_hangs: bool = False) -> None:
        self.first, self.cancel_hangs = first, cancel_hangs
        self.requests: list[FakeRequest] = []
        self.cancelled = threading.Event()

    async def exec(self, request: FakeRequest) -> Any:
        self.requests.append(request)
        if "stop" in request.inputs:
            if self.cancel_hangs:
                await asyncio.sleep(FOREVER)
            self.cancelled.set()
            return iter([])
        if self.first == 0:
            await asyncio.sleep(FOREVER)
        return self.responses()

    def responses(self) -> Iterator[FakeResponse]:  # pulled with next() on a worker thread, as the real iterator
        for token in range(self.first):
            yield FakeResponse([FakeTensor("output_ids", [[[100 + token]]])])
        self.cancelled.wait(10)  # the real llm ends the stream with an empty final response once cancelled


class FakeRequest:
    llm: FakeLLM

    def __init__(self, model_name: str, requested_output_names: list[str], inputs: list[FakeTensor],
                 request_id: str = "") -> None:
        self.model_name, self.request_id = model_name, request_id
        self.inputs = {t.name(): t for t in inputs}

    async def async_exec(self, decoupled: bool = False) -> Any:
        assert self.model_name == "llm" and decoupled
        return await self.llm.exec(self)


@pytest.fixture
def bls(monkeypatch: pytest.MonkeyPatch) -> Iterator[types.ModuleType]:
    for (module,) in adapters_with(monkeypatch, fake_pb_utils(InferenceRequest=FakeRequest),
                                    "vlm_triton.triton.bls_model"):
        yield module


PREPARED = Prepared(
    input_ids=np.arange(5, dtype=np.int32), pixel_values=None, num_tiles=0, end_id=2, pad_id=0,
    stop_words_list=np.array([[9], [1]], dtype=np.int32), prompt_vocab_size=0,
)


def llm_requests_after_a_stall(bls: types.ModuleType, llm: FakeLLM, responses_before: int) -> list[FakeRequest]:
    FakeRequest.llm = llm

    async def drive() -> None:
        generation = bls.TritonStages().generate(PREPARED, None, RequestOptions(max_tokens=8))
        got: list[int] = []
        while len(got) < responses_before:  # responses that arrive together come as one batch
            got += await within(anext(generation), "llm", 5.0)
        assert got == [100 + token for token in range(responses_before)]
        with pytest.raises(StageStalled, match="llm produced no response for 0.05 s"):
            await within(anext(generation), "llm", 0.05)
        await asyncio.wait_for(asyncio.gather(*bls._CANCELS), 5)

    asyncio.run(drive())
    return llm.requests


@pytest.mark.parametrize("responses_before", [0, 2])
def test_a_stalled_llm_request_is_cancelled(bls: types.ModuleType, responses_before: int) -> None:
    """0: the stall of item 1 in docs/benchmarks.md (async_exec never returned); 2: item 7's (no next response)."""
    generate, cancel = llm_requests_after_a_stall(bls, FakeLLM(first=responses_before), responses_before)
    assert "stop" not in generate.inputs and bool(cancel.inputs["stop"].as_numpy().reshape(-1)[0])
    assert cancel.request_id == generate.request_id != ""


def test_closing_early_does_not_wait_for_the_cancellation(bls: types.ModuleType) -> None:
    """A stop string closes the stream; the llm's answer to the cancellation is not awaited (it may never come)."""
    FakeRequest.llm = llm = FakeLLM(first=3, cancel_hangs=True)

    async def drive() -> None:
        generation = bls.TritonStages().generate(PREPARED, None, RequestOptions(max_tokens=8))
        assert (await anext(generation))[0] == 100
        await asyncio.wait_for(generation.aclose(), 1.0)
        await asyncio.sleep(0.01)
        assert [("stop" in r.inputs) for r in llm.requests] == [False, True]  # sent, still unanswered
        llm.cancelled.set()  # lets the worker thread blocked in the stream go

    asyncio.run(drive())


def test_responses_that_arrive_while_the_loop_is_busy_come_as_one_batch_in_order(bls: types.ModuleType) -> None:
    """Under load the event loop falls behind the llm: what piled up costs one detokenize and one chunk."""
    arrived = threading.Event()

    def stream() -> Iterator[FakeResponse]:
        for token in range(6):
            yield FakeResponse([FakeTensor("output_ids", [[[token, 50 + token]]])])
        arrived.set()

    async def drive() -> list[list[int]]:
        batches = []
        async for batch in bls._response_batches(stream()):
            await asyncio.to_thread(arrived.wait, 5)  # busy elsewhere until the whole stream is in
            batches.append([int(i) for r in batch for i in r.outputs["output_ids"].as_numpy().reshape(-1)])
        return batches

    batches = asyncio.run(drive())
    assert [i for b in batches for i in b] == [i for t in range(6) for i in (t, 50 + t)]
    assert len(batches) <= 2  # the first response may be taken alone before the rest arrive


def test_an_error_from_the_response_stream_reaches_the_reader(bls: types.ModuleType) -> None:
    def stream() -> Iterator[FakeResponse]:
        yield FakeResponse([FakeTensor("output_ids", [[[1]]])])
        raise RuntimeError("stub gone")

    async def drive() -> None:
        async for _ in bls._response_batches(stream()):
            pass

    with pytest.raises(RuntimeError, match="stub gone"):
        asyncio.run(drive())


class TrackedStream:
    """A response stream whose liveness a test can watch (weakref), like the stub's ResponseIterator, which its own
    C++ thread must never be the one to free (bls_model.RETAIN_S)."""

    def __init__(self, n: int) -> None:
        self.left = n

    def __iter__(self) -> TrackedStream:
        return self

    def __next__(self) -> FakeResponse:
        if not self.left:
            raise StopIteration
        self.left -= 1
        return FakeResponse([FakeTensor("output_ids", [[[self.left]]])])


def test_a_finished_stream_outlives_its_reader_by_the_retention_time(bls: types.ModuleType) -> None:
    import gc
    import weakref

    stream = TrackedStream(3)
    alive = weakref.ref(stream)

    async def drive() -> int:
        n = 0
        async for batch in bls._response_batches(stream):
            n += len(batch)
        return n

    assert asyncio.run(drive()) == 3
    del stream
    gc.collect()
    assert alive() is not None  # the reader is done with it; the bls still holds it
    later = bls.time.monotonic() + bls.RETAIN_S + 1
    bls._retain(object(), now=later)  # the next stream that ends after RETAIN_S lets it go
    gc.collect()
    assert alive() is None


class FakeSender:
    def __init__(self) -> None:
        self.sent: list[tuple[FakeResponse, int]] = []

    def send(self, response: FakeResponse, flags: int = 0) -> None:
        self.sent.append((response, flags))


class FakeBlsRequest:
    def __init__(self) -> None:
        self.sender = FakeSender()
        self.tensors = [FakeTensor("messages", np.array([b"[]"], dtype=np.object_))]

    def inputs(self) -> list[FakeTensor]:
        return self.tensors

    def get_response_sender(self) -> FakeSender:
        return self.sender

    def request_id(self) -> str:
        return "req-7"

    def is_cancelled(self) -> bool:
        return False

    def requested_output_names(self) -> list[str]:
        return ["text"]


def serve_a_stalling_request(bls: types.ModuleType, monkeypatch: pytest.MonkeyPatch) -> FakeSender:
    async def stalls_after_one_chunk(stages: Any, messages: str, options: RequestOptions, *,
                                     stall_timeout_s: float) -> AsyncIterator[Chunk]:
        assert stall_timeout_s == 0.05  # the deployment's value reaches the orchestrator
        yield Chunk("he", None, 5, 1)
        raise StageStalled("llm", stall_timeout_s, " after 1 response")

    monkeypatch.setattr(bls, "run_pipeline", stalls_after_one_chunk)
    model = bls.TritonPythonModel()
    model.stages, model.default_max_tokens, model.stall_timeout_s = None, 8, 0.05
    request = FakeBlsRequest()
    asyncio.run(model.execute([request]))
    return request.sender


def test_a_stall_reaches_the_client_as_an_error_and_the_log_gets_the_threads(
    bls: types.ModuleType, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    common = sys.modules["vlm_triton.triton.common"]  # as imported by the fixture
    monkeypatch.setattr(common, "_last_stall_dump", None)
    with caplog.at_level(logging.ERROR, logger="vlm_triton"):
        sent = serve_a_stalling_request(bls, monkeypatch).sent
    (chunk, flags), (error, final) = sent
    assert chunk.outputs["text"].as_numpy()[0] == b"he" and flags == 0
    assert final == FINAL and error.has_error()
    assert error.error().message() == "llm produced no response for 0.05 s after 1 response"
    assert error.error().code() == FakeTritonError.INTERNAL
    assert "request 'req-7' failed: llm produced no response for 0.05 s" in caplog.text
    assert "threads of this stub follow" in caplog.text
    assert "most recent call first" in capfd.readouterr().err  # faulthandler's dump of every thread

    caplog.clear()  # a second stall within the minute: logged, but no second dump
    with caplog.at_level(logging.ERROR, logger="vlm_triton"):
        serve_a_stalling_request(bls, monkeypatch)
    assert "request 'req-7' failed" in caplog.text and "threads" not in caplog.text
    assert "most recent call first" not in capfd.readouterr().err


def test_finalize_lets_the_retained_streams_go_while_the_stub_is_whole(bls: types.ModuleType) -> None:
    import gc
    import weakref

    stream = TrackedStream(2)
    alive = weakref.ref(stream)

    async def drive() -> None:
        async for _ in bls._response_batches(stream):
            pass

    asyncio.run(drive())
    del stream
    gc.collect()
    assert alive() is not None
    object.__new__(bls.TritonPythonModel).finalize()
    gc.collect()
    assert alive() is None
