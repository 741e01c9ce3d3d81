"""The README's examples run as documented against the real stack: the two CLI scripts and the curl call."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]


def run(*args: str) -> str:
    proc = subprocess.run(list(args), capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_openai_cli_streams_and_reports_usage(frontend, stack) -> None:
    image = f"file://{stack.media_dir}/wide.png"
    out = run(sys.executable, "examples/openai_cli.py", "--base-url", frontend, "--image-url", image,
              "--max-tokens", "8", "Describe this image.")
    assert "[usage: " in out and "completion tokens]" in out
    out = run(sys.executable, "examples/openai_cli.py", "--base-url", frontend, "--no-stream", "--max-tokens", "4", "Hi")
    assert "; usage: " in out


def test_base64_img_cli(frontend) -> None:
    out = run(sys.executable, "examples/base64_img_cli.py", "--base-url", frontend, "--max-tokens", "6",
              "examples/house.png", "What is in this picture?")
    assert "prompt tokens]" in out


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_readme_curl_example(frontend, stack) -> None:
    """The README's curl call, with the image path adapted to the test's allow-listed folder."""
    readme = (ROOT / "README.md").read_text()
    assert "curl -s http://localhost:9997/v1/chat/completions" in readme
    body = {
        "model": "tiny-internvl3",
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": f"file://{stack.media_dir}/square.jpg"}},
            {"type": "text", "text": "Describe this image."}]}],
        "max_tokens": 64,
    }
    out = run("curl", "-s", f"{frontend}/chat/completions", "-H", "Content-Type: application/json",
              "-d", json.dumps(body))
    response = json.loads(out)
    assert response["object"] == "chat.completion" and response["usage"]["prompt_tokens"] > 256
