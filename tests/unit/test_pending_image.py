"""multimodal.pending_image: a request's images fetched and decoded on the image pool, sizes before pixels, each
image's own error in order, with one thread (nothing ahead) and with several."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from vlm_triton.errors import InvalidRequest
from vlm_triton.multimodal.media import MediaFetcher, MediaPolicy
from vlm_triton.multimodal.pending_image import open_images


def _png(width: int, height: int, color=(200, 30, 60)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("threads", [1, 2, 8])
def test_open_images_in_order_first_failure_in_order(tmp_path: Path, threads: int) -> None:
    allowed = tmp_path
    (allowed / "sub").mkdir()
    for k, color in enumerate([(1, 2, 3), (4, 5, 6), (7, 8, 9)]):
        (allowed / f"{k}.png").write_bytes(_png(8 + k, 4, color=color))
    (allowed / "cut.png").write_bytes(_png(12, 4)[:-30])  # a header that reads, pixels that do not
    fetcher = MediaFetcher(MediaPolicy(allowed_local_dirs=(allowed,)))
    urls = [f"file://{allowed}/{k}.png" for k in (2, 0, 1, 2, 0)]
    pending = open_images(fetcher, urls, threads=threads, finish=lambda img: img.getpixel((0, 0)))
    assert [p.size for p in pending] == [(10, 4), (8, 4), (9, 4), (10, 4), (8, 4)]
    images = [p.result() for p in pending]
    assert all(img.mode == "RGB" for img in images) and images[2].getpixel((0, 0)) == (4, 5, 6)
    assert [p.finished() for p in pending] == [(7, 8, 9), (1, 2, 3), (4, 5, 6), (7, 8, 9), (1, 2, 3)]
    bad = open_images(fetcher, [urls[0], f"file://{allowed}/cut.png", f"file://{allowed}/missing.png",
                                f"file://{allowed}/sub"], threads=threads)
    assert bad[0].result().size == (10, 4)  # images before the failing ones are delivered
    assert bad[1].size == (12, 4)  # its size is known from the header before its pixels fail
    with pytest.raises(InvalidRequest, match="truncated or corrupt"):
        bad[1].result()
    with pytest.raises(InvalidRequest, match="does not exist"):  # each its own error, the size asked first
        bad[2].size
    with pytest.raises(InvalidRequest, match="not a regular"):
        bad[3].result()
    assert open_images(fetcher, [], threads=threads) == []


@pytest.mark.parametrize("threads", [1, 2])
def test_images_load_on_the_pool_only_with_threads(tmp_path: Path, threads: int) -> None:
    """threads > 1: decode and `finish` run on the image pool, started by open_images (the caller builds the prompt
    meanwhile); threads = 1: in the caller's thread, when the pixels are asked for."""
    import threading

    (tmp_path / "a.png").write_bytes(_png(16, 8))
    fetcher = MediaFetcher(MediaPolicy(allowed_local_dirs=(tmp_path,)))
    where: list[str] = []
    done = threading.Event()

    def finish(img: Image.Image) -> tuple[int, int]:
        where.append(threading.current_thread().name)
        done.set()
        return img.size

    (pending,) = open_images(fetcher, [f"file://{tmp_path}/a.png"], threads=threads, finish=finish)
    assert done.wait(10 if threads > 1 else 0.2) == (threads > 1)  # one thread: nothing runs before it is asked
    assert pending.finished() == (16, 8) and pending.size == (16, 8)
    assert len(where) == 1 and where[0].startswith("vlm-image") == (threads > 1)
