"""vlm_triton.timeline's marks and benchmarks.timeline's join: lines of several processes become one request's
first-token path. The marks on the real stack are checked by the e2e suite (test_openai_frontend)."""

from __future__ import annotations

import importlib
import os
import threading
from pathlib import Path

import pytest

from benchmarks import timeline as report


@pytest.fixture
def marks_to(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import vlm_triton.timeline as tl

    monkeypatch.setenv("VLM_TRITON_TIMELINE_DIR", str(tmp_path))
    module = importlib.reload(tl)
    yield module, tmp_path
    if module._fd is not None:
        os.close(module._fd)
    monkeypatch.delenv("VLM_TRITON_TIMELINE_DIR")
    importlib.reload(tl)


def test_unset_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import vlm_triton.timeline as tl

    monkeypatch.delenv("VLM_TRITON_TIMELINE_DIR", raising=False)
    tl = importlib.reload(tl)
    assert not tl.enabled()
    tl.bind("r")
    tl.mark("bls.execute")
    tl.mark("llm.execute", "x#0")
    assert tl._fd is None  # nothing was opened, so nothing was written anywhere


def test_marks_bind_per_context_and_threads_write_whole_lines(marks_to) -> None:
    tl, directory = marks_to
    tl.mark("bls.execute")  # nothing bound in this context: no line
    tl.bind("req-1")
    tl.mark("bls.execute")
    tl.mark("bls.llm_call", detail="llm-1")

    def many(k: int) -> None:
        for _ in range(200):
            tl.mark("llm.token", f"llm-{k}#0")

    threads = [threading.Thread(target=many, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines = (directory / f"{os.getpid()}.tl").read_text().splitlines()
    assert len(lines) == 2 + 800
    assert lines[0].split()[1:] == ["req-1", "bls.execute"]
    assert lines[1].split()[1:] == ["req-1", "bls.llm_call", "llm-1"]
    assert all(len(ln.split()) == 3 and ln.split()[0].isdigit() for ln in lines[2:])


def test_a_failed_write_turns_marking_off_instead_of_failing_the_caller(marks_to) -> None:
    tl, directory = marks_to
    (directory / "gone").write_text("a file where the folder should be")
    tl._DIR = str(directory / "gone" / "sub")  # os.makedirs fails: NotADirectoryError
    tl.mark("llm.token", "r#0")  # must not raise
    assert not tl.enabled()
    tl.mark("llm.token", "r#0")


def test_join_orders_hops_along_the_path(tmp_path: Path) -> None:
    ms = 1_000_000
    (tmp_path / "1.tl").write_text(  # the frontend
        f"{0 * ms} A frontend.receive\n{1 * ms} A frontend.send\n{40 * ms} A frontend.first\n{41 * ms} A frontend.sse\n"
        f"{100 * ms} B frontend.receive\n{102 * ms} B frontend.send\n"
    )
    (tmp_path / "2.tl").write_text(  # the bls
        f"{3 * ms} A bls.execute\n{5 * ms} A bls.preprocessed\n{6 * ms} A bls.llm_call u1\n{30 * ms} A bls.llm_first\n"
        f"{38 * ms} A bls.sent\ngarbage line\n{104 * ms} B bls.execute\n"
    )
    (tmp_path / "3.tl").write_text(  # the llm: engine ids are <llm id>#<n>
        f"{7 * ms} u1#0 llm.execute\n{10 * ms} u1#0 llm.prefill\n{20 * ms} u1#0 llm.token\n{25 * ms} u1#0 llm.send\n"
        f"{29 * ms} u1#0 llm.sent\n{11 * ms} orphan#3 llm.token\n"
    )
    requests = report.join(report.read_marks(tmp_path))
    assert set(requests) == {"A", "B"}
    assert len(requests["A"]) == 14 and "bls.encoded" not in requests["A"]
    hops = dict(report.hops(requests["A"]))
    assert hops["llm.execute -> llm.prefill"] == 3.0
    assert hops["llm.token -> llm.send"] == 5.0
    assert hops["bls.sent -> frontend.first"] == 2.0
    assert list(hops)[0] == "frontend.receive -> frontend.send" and list(hops)[-1] == "frontend.first -> frontend.sse"
    whole = report.table(requests)
    assert whole["requests"] == 2 and whole["total"]["n"] == 2
    only_a = report.table(requests, start_ns=0, end_ns=50 * ms)
    assert only_a["requests"] == 1 and only_a["total"]["p50"] == 41.0
    (tmp_path / "client-9.tl").write_text(f"{-2 * ms} A client.send\n{43 * ms} A client.first\n")
    with_client = report.join(report.read_marks(tmp_path))["A"]
    assert report.hops(with_client)[0] == ("client.send -> frontend.receive", 2.0)
    assert report.hops(with_client)[-1] == ("frontend.sse -> client.first", 2.0)
    assert report.table({"A": with_client})["total"]["p50"] == 45.0
    lines = report.format_table(only_a)
    assert lines[-1].startswith("| first mark -> last mark | 1 | 41.00 |")
    assert any(ln.startswith("| llm.token -> llm.send | 1 | 5.00 |") for ln in lines)


def test_client_processes_share_concurrency_and_requests() -> None:
    from benchmarks.loadgen import split

    assert split(64, 4) == [16, 16, 16, 16]
    assert split(10, 4) == [3, 3, 2, 2] and sum(split(193, 4)) == 193
