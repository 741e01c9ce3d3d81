"""Decoupled stages send only the outputs a request asked for. Triton's Python stub (r24.10) drops the others inside
ResponseSender.send without the GIL, which crashed the llm stub on Python 3.12 when the BLS asked for output_ids
alone (the GPU-host hang of issue #8; benchmarks/probe_bls.py reproduces it with toy models)."""

from __future__ import annotations

import types
from typing import Any, Iterator

import numpy as np
import pytest

from tests.unit import fake_triton
from tests.unit.fake_triton import adapters_with, fake_pb_utils
from vlm_triton.pipeline.orchestrator import Chunk


class FakeTensor:
    built: list[str] = []  # names of every tensor constructed

    def __init__(self, name: str, value: Any) -> None:
        self._name, self.value = name, value
        FakeTensor.built.append(name)

    def name(self) -> str:
        return self._name


class FakeResponse:
    def __init__(self, output_tensors: list[FakeTensor] | None = None, error: Any = None) -> None:
        self.names = [t.name() for t in output_tensors or []]


class FakeRequest:
    def __init__(self, requested: list[str]) -> None:
        self._requested = requested

    def requested_output_names(self) -> list[str]:
        return self._requested


@pytest.fixture
def adapters(monkeypatch: pytest.MonkeyPatch) -> Iterator[types.SimpleNamespace]:
    """The llm and bls adapters imported against the fake pb_utils (and forgotten afterwards)."""
    modules = ("vlm_triton.triton.llm_model", "vlm_triton.triton.bls_model", "vlm_triton.triton.common")
    for llm, bls, common in adapters_with(monkeypatch, fake_pb_utils(Tensor=FakeTensor, InferenceResponse=FakeResponse), *modules):
        yield types.SimpleNamespace(llm=llm, bls=bls, common=common)


def llm_response_names(adapters: types.SimpleNamespace, requested: list[str]) -> list[str]:
    common, llm = adapters.common, adapters.llm
    active = llm._Active(None, None, "c", True, [], 5, common.requested_outputs(FakeRequest(requested)))
    return active.response([1, 2]).names


def test_llm_sends_only_requested_outputs(adapters: types.SimpleNamespace) -> None:
    FakeTensor.built.clear()
    assert llm_response_names(adapters, ["output_ids"]) == ["output_ids"]  # what the BLS asks for
    assert FakeTensor.built == ["output_ids"]  # the others are not even built (this runs per token)
    assert llm_response_names(adapters, ["output_ids", "num_input_tokens"]) == ["output_ids", "num_input_tokens"]


def test_llm_sends_every_output_when_none_is_named(adapters: types.SimpleNamespace) -> None:
    assert llm_response_names(adapters, []) == ["output_ids", "sequence_length", "num_input_tokens"]


def test_bls_sends_only_requested_outputs(adapters: types.SimpleNamespace) -> None:
    chunk = Chunk(text="hi", finish_reason=None, prompt_tokens=3, completion_tokens=1)
    requested = adapters.common.requested_outputs(FakeRequest(["text"]))
    assert adapters.bls._response(chunk, requested).names == ["text"]
    everything = adapters.bls._response(chunk, frozenset()).names
    assert everything == ["text", "finish_reason", "prompt_tokens", "completion_tokens"]


class FakeSender:
    def __init__(self, fail: bool = False) -> None:
        self.fail, self.sent = fail, []

    def send(self, response: Any = None, flags: int = 0) -> None:
        if self.fail and not flags:
            raise RuntimeError("stub IPC broke")
        self.sent.append((response, flags))


def test_a_failed_send_ends_only_that_request(adapters: types.SimpleNamespace) -> None:
    """One request's send raising (a broken response channel) ends that request only: it is cancelled in the engine
    and ends with an error, and the next delivery (another request's) goes on."""
    import threading

    from vlm_triton.engine.outbox import Delivery

    llm, common = adapters.llm, adapters.common
    model = object.__new__(llm.TritonPythonModel)
    cancelled: list[str] = []
    model.engine = types.SimpleNamespace(cancel=cancelled.append)
    model._lock, model._by_client = threading.Lock(), {"c": {"bad", "good"}}
    model._active_gauge = types.SimpleNamespace(set=lambda n: None)
    outputs = common.requested_outputs(FakeRequest(["output_ids"]))
    bad, good = FakeSender(fail=True), FakeSender()
    model._active = {
        "bad": llm._Active(None, bad, "c", True, [], 5, outputs),
        "good": llm._Active(types.SimpleNamespace(is_cancelled=lambda: False), good, "c", True, [], 5, outputs),
    }
    model._deliver(Delivery("bad", [1, 2]))
    model._deliver(Delivery("good", [3]))
    assert cancelled == ["bad"] and "bad" not in model._active and "good" in model._active
    assert [flags for _, flags in bad.sent] == [1]  # the final error response
    assert [r.names for r, _ in good.sent] == [["output_ids"]] and model._active["good"].tokens == [3]


def test_the_stream_interval_holds_tokens_for_the_next_response_and_the_final_one_takes_the_rest(
        adapters: types.SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    from vlm_triton.engine.outbox import Delivery
    from vlm_triton.engine.types import TokenEvent

    llm, common = adapters.llm, adapters.common
    clock = [100.0]
    monkeypatch.setattr(llm.time, "monotonic", lambda: clock[0])
    model = object.__new__(llm.TritonPythonModel)
    model.stream_interval_s = 0.010
    model.engine = types.SimpleNamespace(cancel=lambda rid: None)
    model._lock, model._by_client = threading.Lock(), {"c": {"r"}}
    model._active_gauge = types.SimpleNamespace(set=lambda n: None)
    sender = FakeSender()
    request = types.SimpleNamespace(is_cancelled=lambda: False)
    model._active = {"r": llm._Active(request, sender, "c", True, [], 5, common.requested_outputs(FakeRequest([])))}
    FakeTensor.built.clear()
    sent_ids: list[list[int]] = []
    monkeypatch.setattr(llm._Active, "response", lambda self, ids: sent_ids.append(list(ids)) or FakeResponse())

    for token, dt in ((1, 0.0), (2, 0.004), (3, 0.004), (4, 0.004), (5, 0.001)):
        clock[0] += dt
        model._deliver(Delivery("r", [token]))
    final = TokenEvent(request_id="r", token_id=6, finished=True, finish_reason="length", index=5, prompt_tokens=5)
    model._deliver(Delivery("r", [6], final))
    assert sent_ids == [[1], [2, 3, 4], [5, 6]]  # the first at once, then >= 10 ms apart, the rest with the final
    assert [flags for _, flags in sender.sent] == [0, 0, 1]


def test_finalize_drops_the_metrics_after_stopping_the_engine_and_outbox(adapters: types.SimpleNamespace) -> None:
    calls: list[str] = []
    model = object.__new__(adapters.llm.TritonPythonModel)
    model.engine = types.SimpleNamespace(shutdown=lambda: calls.append("engine"))
    model.outbox = types.SimpleNamespace(close=lambda: calls.append("outbox"))
    model._active_gauge, model._metric_family = object(), object()
    model.finalize()
    assert calls == ["engine", "outbox"]
    assert model._active_gauge is None and model._metric_family is None


class ListingRequest:
    """A request as the Python backend has it: `inputs()` lists (and wraps) every input tensor on each call."""

    def __init__(self, tensors: list[Any]) -> None:
        self.tensors, self.listed = tensors, 0

    def inputs(self) -> list[Any]:
        self.listed += 1
        return list(self.tensors)


def test_inputs_are_listed_once_per_request_and_read_as_from_the_request(adapters: types.SimpleNamespace) -> None:
    common = adapters.common
    request = ListingRequest([fake_triton.FakeTensor("max_tokens", np.array([[7]], np.int32)),
                              fake_triton.FakeTensor("stop", np.array([b"a", b"b"], dtype=np.object_)),
                              fake_triton.FakeTensor("messages", np.array([b"[1]"], dtype=np.object_))])
    inputs = common.input_tensors(request)
    assert request.listed == 1 and set(inputs) == {"max_tokens", "stop", "messages"}
    assert common.get_scalar(inputs, "max_tokens", 0) == 7 and common.get_scalar(inputs, "seed", None) is None
    assert common.get_texts(inputs, "stop") == ["a", "b"] and common.get_text(inputs, "messages") == "[1]"
    assert common.get_torch(inputs, "max_tokens").tolist() == [[7]] and common.get_array(inputs, "top_p") is None
    options = adapters.bls.read_options(inputs, default_max_tokens=512)
    assert (options.max_tokens, options.stop, options.temperature) == (7, ("a", "b"), 0.0)
    assert request.listed == 1  # every read above used the one listing
