"""`triton.bls_stall_timeout_s` through the real server: with a deadline no stage can meet (1 ms), every request
ends promptly with INTERNAL naming the stage and the wait, the bls stub's threads are dumped into the server log,
and the server keeps answering. (Which stall is caught where is unit-tested: test_orchestrator, test_bls_stall.)"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Iterator

import pytest
import tritonclient.grpc as grpcclient

from tests.e2e.bls_client import bls_generate
from tests.e2e.conftest import running_stack

pytestmark = pytest.mark.e2e

STALL = re.compile(r"(preprocess|vision_encoder|llm|postprocess) produced no response for 0\.001 s")


@pytest.fixture(scope="module")
def impatient_stack(tiny_internvl3: Path, media_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    with running_stack(tiny_internvl3, media_dir, tmp_path_factory.mktemp("stall"), "tiny-internvl3",
                       triton={"bls_stall_timeout_s": 0.001}) as s:
        yield s


def test_a_stage_over_the_deadline_fails_the_request_and_the_server_keeps_answering(impatient_stack) -> None:
    messages = [{"role": "user", "content": "Tell me about the sea."}]
    for _ in range(3):
        start = time.monotonic()
        result = bls_generate(impatient_stack.grpc_url, messages, timeout_s=60, max_tokens=4, stream=True)
        assert result.error is not None and time.monotonic() - start < 30
        assert result.error.status() == "StatusCode.INTERNAL" and STALL.search(result.error.message())
    log = impatient_stack.server.log_file.read_text(errors="replace")
    assert "threads of this stub follow" in log and "most recent call first" in log  # faulthandler's dump
    client = grpcclient.InferenceServerClient(impatient_stack.grpc_url)
    assert impatient_stack.server.is_running() and client.is_model_ready("bls") and client.is_model_ready("llm")
