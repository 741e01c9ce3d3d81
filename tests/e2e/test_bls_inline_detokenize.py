"""`triton.bls_detokenize`: "inline" (the default) detokenizes in the BLS's own process; "postprocess" calls the
`postprocess` model per streamed chunk. Their streamed text, stop-string cuts, finish reasons and usage are equal on
the same requests (the default stack's output is itself checked against transformers in test_triton_pipeline)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from tests.e2e.bls_client import bls_generate
from tests.e2e.conftest import running_stack

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def postprocess_stack(tiny_internvl3: Path, media_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    with running_stack(tiny_internvl3, media_dir, tmp_path_factory.mktemp("postprocess"), "tiny-internvl3",
                       triton={"bls_detokenize": "postprocess"}) as s:
        yield s


def requests(media_dir: Path) -> list[dict]:
    text = [{"role": "user", "content": "Tell me about the sea."}]
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": (media_dir / "wide.png").as_uri()}},
                                          {"type": "text", "text": "What is this?"}]}]
    return [
        {"messages": text, "max_tokens": 24, "ignore_eos": True, "stream": True},
        {"messages": text, "max_tokens": 24, "ignore_eos": True, "stream": False},
        {"messages": image, "max_tokens": 12, "stream": True},
    ]


def test_inline_detokenization_equals_the_postprocess_model(stack, postprocess_stack) -> None:
    inline_stack, stack = stack, postprocess_stack
    assert inline_stack.deployment.triton.bls_detokenize == "inline"
    assert stack.deployment.triton.bls_detokenize == "postprocess"
    for request in requests(stack.media_dir):
        ref = bls_generate(stack.grpc_url, **request)
        got = bls_generate(inline_stack.grpc_url, **request)
        # chunk boundaries depend on timing (the llm coalesces tokens under load), the text must not
        assert ("".join(got.deltas), got.finish_reason, got.prompt_tokens, got.completion_tokens) == (
            "".join(ref.deltas), ref.finish_reason, ref.prompt_tokens, ref.completion_tokens), request
    # a stop string cut at the same place
    whole = bls_generate(stack.grpc_url, requests(stack.media_dir)[0]["messages"], max_tokens=24, ignore_eos=True)
    visible = whole.text.strip()
    stop = visible[len(visible) // 2: len(visible) // 2 + 2]
    kwargs = {"max_tokens": 24, "ignore_eos": True, "stop": [stop], "stream": True}
    ref = bls_generate(stack.grpc_url, requests(stack.media_dir)[0]["messages"], **kwargs)
    got = bls_generate(inline_stack.grpc_url, requests(stack.media_dir)[0]["messages"], **kwargs)
    assert got.finish_reason == ref.finish_reason == "stop" and "".join(got.deltas) == "".join(ref.deltas)
    assert "".join(got.deltas) == whole.text[: whole.text.find(stop)]
