"""A request's images, fetched and decoded on the image pool while the caller builds the prompt.

An image's size comes from its header, before its pixels are decoded, and is all the prompt needs (tiles per
image). So with threads > 1 every image of a request is fetched and decoded on the shared image pool (Pillow
decodes without the GIL) from the moment `open_images` returns, while the caller renders and tokenizes the prompt;
`finish` (e.g. the RGB planes the vision encoder takes) runs on the pool too, right after the decode. With
threads <= 1 nothing runs ahead: an image is fetched when its size is first asked for and decoded when its pixels are.

Errors are the fetcher's (`InvalidRequest` for a bad URL, a refused one, a corrupt file) and surface in the order of
the images: asking for an image's size raises its fetch or header error, asking for its pixels any error.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

from PIL import Image

from vlm_triton.multimodal.media import MediaFetcher, load_rgb
from vlm_triton.multimodal.resample import image_pool


class PendingImage:
    def __init__(self, media: MediaFetcher, url: str, finish: Callable[[Image.Image], Any] | None = None) -> None:
        self._media, self._url, self._finish = media, url, finish
        self._header: Future[tuple[int, int]] = Future()
        self._opened: tuple[Image.Image, str] | None = None  # threads <= 1: the header read, pixels not yet
        self._done: Future[tuple[Image.Image, Any]] | None = None

    def start(self, threads: int) -> "PendingImage":
        if threads > 1:
            self._done = image_pool(threads).submit(self._load)
        return self

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) from the header; waits for the fetch (raises its error)."""
        if self._done is None and not self._header.done():
            self._opened = self._open()
        return self._header.result()

    def result(self) -> Image.Image:
        """The decoded RGB image (waits for it)."""
        return self._loaded()[0]

    def finished(self) -> Any:
        """What `finish` made of the decoded image (None without a `finish`)."""
        return self._loaded()[1]

    def _loaded(self) -> tuple[Image.Image, Any]:
        if self._done is None:  # threads <= 1: here, once
            done: Future[tuple[Image.Image, Any]] = Future()
            try:
                self.size  # noqa: B018 - fetches and reads the header, once
                assert self._opened is not None
                done.set_result(self._decode(*self._opened))
            except BaseException as exc:
                done.set_exception(exc)
            self._done, self._opened = done, None
        return self._done.result()

    def _open(self) -> tuple[Image.Image, str]:
        """Fetch and read the header; its size (or the error) is published at once."""
        try:
            opened = self._media.open_image(self._url)
        except BaseException as exc:
            self._header.set_exception(exc)
            raise
        self._header.set_result(opened[0].size)
        return opened

    def _load(self) -> tuple[Image.Image, Any]:
        """On the pool: fetch, header, decode, finish."""
        return self._decode(*self._open())

    def _decode(self, img: Image.Image, source: str) -> tuple[Image.Image, Any]:
        rgb = load_rgb(img, source)
        return rgb, None if self._finish is None else self._finish(rgb)


def open_images(media: MediaFetcher, urls: Sequence[str], *, threads: int = 1,
                finish: Callable[[Image.Image], Any] | None = None) -> list[PendingImage]:
    """One `PendingImage` per URL, in order; with threads > 1 all of them start loading on the image pool now."""
    return [PendingImage(media, url, finish).start(threads) for url in urls]
