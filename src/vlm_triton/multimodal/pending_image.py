"""A request's images, fetched and decoded on the image pool while the caller builds the prompt.

An image's size comes from its header, before its pixels are decoded, and is all the prompt needs (tiles per
image). So with threads > 1 every image of a request is fetched and decoded on the shared image pool (Pillow
decodes without the GIL) from the moment `open_images` returns, while the caller renders and tokenizes the prompt;
`finish` (e.g. the RGB planes the vision encoder takes) runs on the pool too, right after the decode. With
threads <= 1 nothing runs ahead: an image is fetched when its size is first asked for and decoded when its pixels are.
With `decode=False` an image is only fetched ahead (with its header read): `data` is what the consumer decodes
instead (`multimodal.encoded_images`), and its pixels are decoded here only if asked for.

Errors are the fetcher's (`InvalidRequest` for a bad URL, a refused one, a corrupt file) and surface in the order of
the images: asking for an image's size raises its fetch or header error, asking for its pixels any error.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

from PIL import Image

from vlm_triton.multimodal.media import MediaFetcher, OpenedImage, load_rgb
from vlm_triton.multimodal.resample import image_pool


class PendingImage:
    def __init__(self, media: MediaFetcher, url: str, finish: Callable[[Image.Image], Any] | None = None,
                 *, decode: bool = True) -> None:
        self._media, self._url, self._finish, self._decode_ahead = media, url, finish, decode
        self._header: Future[OpenedImage] = Future()  # the fetched bytes, their header read (pixels not yet)
        self._started = False  # the fetch runs on the pool
        self._done: Future[tuple[Image.Image, Any]] | None = None

    def start(self, threads: int) -> "PendingImage":
        if threads > 1:
            self._started = True
            if self._decode_ahead:
                self._done = image_pool(threads).submit(self._load)
            else:
                image_pool(threads).submit(self._fetch)
        return self

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) from the header; waits for the fetch (raises its error)."""
        return self._opened().image.size

    @property
    def data(self) -> bytes:
        """The image's bytes as fetched (waits for the fetch; raises its error)."""
        return self._opened().data

    def result(self) -> Image.Image:
        """The decoded RGB image (waits for it)."""
        return self._loaded()[0]

    def finished(self) -> Any:
        """What `finish` made of the decoded image (None without a `finish`)."""
        return self._loaded()[1]

    def _opened(self) -> OpenedImage:
        if not self._started and not self._header.done():  # nothing ahead: fetched here, once
            self._fetch()
        return self._header.result()

    def _loaded(self) -> tuple[Image.Image, Any]:
        if self._done is None:  # not decoded ahead: here, once
            done: Future[tuple[Image.Image, Any]] = Future()
            try:
                opened = self._opened()
                done.set_result(self._decode(opened.image, opened.source))
            except BaseException as exc:
                done.set_exception(exc)
            self._done = done
        return self._done.result()

    def _open(self) -> OpenedImage:
        """Fetch and read the header; it (or the error) is published at once."""
        try:
            opened = self._media.open_image(self._url)
        except BaseException as exc:
            self._header.set_exception(exc)
            raise
        self._header.set_result(opened)
        return opened

    def _fetch(self) -> None:
        try:
            self._open()
        except BaseException:  # noqa: BLE001 - the header future holds it for whoever asks
            pass

    def _load(self) -> tuple[Image.Image, Any]:
        """On the pool: fetch, header, decode, finish."""
        opened = self._open()
        return self._decode(opened.image, opened.source)

    def _decode(self, img: Image.Image, source: str) -> tuple[Image.Image, Any]:
        rgb = load_rgb(img, source)
        return rgb, None if self._finish is None else self._finish(rgb)


def open_images(media: MediaFetcher, urls: Sequence[str], *, threads: int = 1,
                finish: Callable[[Image.Image], Any] | None = None, decode: bool = True) -> list[PendingImage]:
    """One `PendingImage` per URL, in order; with threads > 1 all of them start loading on the image pool now
    (fetched and decoded, or with `decode=False` only fetched)."""
    return [PendingImage(media, url, finish, decode=decode).start(threads) for url in urls]
