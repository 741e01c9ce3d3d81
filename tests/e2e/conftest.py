"""The real stack for e2e tests: tritonserver with the rendered repository, and the OpenAI frontend.

One stack per test session (loading five Python-backend models takes a minute or two on 2 cores). Images are
written into an allow-listed folder and also served by a real local HTTP server.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from PIL import Image

from vlm_triton.deploy.config import DeploymentConfig
from vlm_triton.deploy.render import render_repository
from vlm_triton.errors import SetupError
from vlm_triton.server import frontend_process
from vlm_triton.server.triton_process import TritonPorts, TritonServer, free_port

SERVED_NAME = "tiny-internvl3"
IMAGE_SIZES = {"wide.png": (800, 600), "tall.png": (300, 900), "small.png": (64, 48), "square.jpg": (448, 448)}


@dataclass(frozen=True)
class Stack:
    server: TritonServer
    checkpoint: Path
    media_dir: Path
    deployment: DeploymentConfig

    @property
    def grpc_url(self) -> str:
        return self.server.grpc_url


def _random_image(path: Path, size: tuple[int, int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    w, h = size
    base = rng.integers(0, 255, size=(max(h // 8, 1), max(w // 8, 1), 3), dtype=np.uint8)
    Image.fromarray(base).resize((w, h), Image.Resampling.BILINEAR).save(path)


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("media")
    for seed, (name, size) in enumerate(IMAGE_SIZES.items()):
        _random_image(root / name, size, seed)
    (root / "not-an-image.png").write_bytes(b"this is text, not a PNG")
    return root


@pytest.fixture(scope="session")
def http_media(media_dir: Path) -> Iterator[str]:
    """A real HTTP server on 127.0.0.1 serving `media_dir`; yields its base URL."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(media_dir))
    handler.log_message = lambda *a, **k: None  # type: ignore[method-assign]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@contextlib.contextmanager
def running_stack(checkpoint: Path, media_dir: Path, work: Path, served_name: str, **sections: dict) -> Iterator[Stack]:
    """Render a repository for `checkpoint` and run tritonserver on free ports until the block ends.

    `sections` override deployment sections, e.g. engine={"max_slots": 4}. Families' e2e modules use this
    with their own tiny checkpoint (module scope), sharing `media_dir`.
    """
    data = {
        "model": {"checkpoint": str(checkpoint), "served_name": served_name},
        "engine": {"max_slots": 8, "max_seq_len": 8192},
        # The test HTTP media server listens on loopback, which deployments refuse by default.
        "limits": {"allowed_local_media_dirs": [str(media_dir)], "allow_private_networks": True,
                   "max_images": 4, "default_max_tokens": 16, "media_timeout_s": 3.0},
        # 8 < 13 tiles: a 13-tile image from a host-tiling stack goes as chunked vision requests (8 + 5); the
        # session stack cuts tiles on the device, where this allows one image per request (8 // 13 -> 1).
        "triton": {"preprocess_instances": 1, "postprocess_instances": 1, "vision_max_batch_size": 8},
    }
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    cfg = DeploymentConfig.from_dict(data)
    repo = render_repository(cfg, work / "model_repository")
    server = TritonServer(repo, ports=TritonPorts.any_free(), log_file=work / "triton.log")
    server.start()
    try:
        server.wait_ready(900)
        yield Stack(server, checkpoint, media_dir, cfg)
    finally:
        server.stop()
        print(f"--- tritonserver log tail ({server.log_file}) ---\n{server.log_tail(40)}")


@pytest.fixture(scope="session")
def timeline_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session stack and its frontend mark each request's first-token path here (vlm_triton.timeline)."""
    return tmp_path_factory.mktemp("timeline")


@pytest.fixture(scope="session")
def stack(tiny_internvl3: Path, media_dir: Path, timeline_dir: Path, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[Stack]:
    with contextlib.ExitStack() as scope:
        with pytest.MonkeyPatch.context() as env:  # the processes started here keep it; later ones do not get it
            env.setenv("VLM_TRITON_TIMELINE_DIR", str(timeline_dir))
            # the vision encoder cuts the tiles here (image_resize = device; the other stacks cut them in
            # preprocess), so every image request of the session checks the device path against the reference
            running = scope.enter_context(running_stack(tiny_internvl3, media_dir, tmp_path_factory.mktemp("stack"),
                                                        SERVED_NAME, preprocess={"image_resize": "device"}))
        yield running


@contextlib.contextmanager
def running_frontend(stack: Stack, served_name: str, work: Path, workers: int = 1) -> Iterator[str]:
    """The OpenAI frontend on a free port, talking to `stack`; yields its base URL (…/v1)."""
    log = work / "frontend.log"
    try:
        with frontend_process.running_frontend(stack.grpc_url, served_name, port=free_port(), log_file=log,
                                               extra_args=("--max-inflight", "64", "--workers", str(workers))) as url:
            yield url
    except SetupError as exc:
        raise RuntimeError(f"{exc}\n{log.read_text() if log.exists() else ''}") from None


@pytest.fixture(scope="session")
def frontend(stack: Stack, timeline_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with contextlib.ExitStack() as scope:
        with pytest.MonkeyPatch.context() as env:
            env.setenv("VLM_TRITON_TIMELINE_DIR", str(timeline_dir))
            # two processes on one port (--workers), as GPU deployments run it: every OpenAI e2e test goes through them
            url = scope.enter_context(running_frontend(stack, SERVED_NAME, tmp_path_factory.mktemp("frontend"),
                                                       workers=2))
        yield url
