"""Images that travel as the bytes their URL held, decoded next to the vision encoder.

With the vision encoder cutting the tiles (`preprocess.image_resize = "device"`), preprocess would send each image
decoded, as uint8 RGB planes: 7.2 MB for W1's 1792x1344 JPEG, against its 450 KB file; 2.4 MB for W3's four 448x448
images, against 150 KB. Between processes those bytes are copied at every hop (preprocess -> bls -> llm), and the
decode sits on preprocess's path while the prompt is built. When its caller asks for it (the bls, with
`engine.vision_in_llm`), preprocess fetches each image and reads only its header (the size is all the prompt
needs), and sends the fetched bytes (`image_data`) with the image grids; the llm decodes them on the image pool
while earlier requests' images are being encoded, with the same Pillow call preprocess would have made
(`media.decode_image`), so the planes, and the tiles cut from them, are byte for byte the same.

A body that fails to decode after its header read (a truncated or corrupt file) fails its request with the same
`InvalidRequest` preprocess would have raised, from the llm instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future

import numpy as np
import torch

from vlm_triton.errors import InvalidRequest
from vlm_triton.multimodal.media import MediaPolicy, decode_image
from vlm_triton.multimodal.pixels import pack_planes, plane_array
from vlm_triton.multimodal.resample import image_pool


def decoded_planes(data: bytes, size: tuple[int, int], policy: MediaPolicy, source: str) -> np.ndarray:
    """uint8 [3, H, W] planes of one image's bytes, whose header gave `size` (width, height) in preprocess."""
    img = decode_image(data, policy=policy, source=source)
    if img.size != tuple(size):
        raise InvalidRequest(f"{source}: decoded as {img.size[0]}x{img.size[1]}, its header said {size[0]}x{size[1]}")
    return plane_array(img)


class PendingPlanes:
    """A request's images being decoded (on the image pool with threads > 1, else on the first `result()`)."""

    def __init__(self, data: Sequence[bytes], grids: np.ndarray, policy: MediaPolicy, *, threads: int = 1) -> None:
        rows = np.asarray(grids).reshape(-1, 5)
        if len(data) != rows.shape[0]:
            raise InvalidRequest(f"{len(data)} encoded images but {rows.shape[0]} image grids")
        self._jobs = [(bytes(d), (int(r[0]), int(r[1])), f"image {k + 1} of the request")
                      for k, (d, r) in enumerate(zip(data, rows))]
        self._policy = policy
        self._futures: list[Future[np.ndarray]] | None = None
        if threads > 1:
            pool = image_pool(threads)
            self._futures = [pool.submit(decoded_planes, d, size, policy, source) for d, size, source in self._jobs]

    def result(self) -> torch.Tensor:
        """uint8 [N, 3, Hmax, Wmax] (`pixels.pack_planes`); raises the first image's error, in order."""
        if self._futures is None:
            planes = [decoded_planes(d, size, self._policy, source) for d, size, source in self._jobs]
        else:
            planes = [f.result() for f in self._futures]
        return torch.from_numpy(pack_planes(planes))
