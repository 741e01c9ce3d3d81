"""Start-up warm-up: a stage pays its first image request's one-time costs before it reports ready.

A fresh process's first `prepare` of an image request imports Pillow's format plugins (`Image.init`, ~40 ms),
compiles regexes and faults in the heap its buffers will reuse (triton/malloc.py keeps it): W1's first `prepare`
took 65-90 ms against 15-40 ms for the next ones (CPU machine, tiny tokenizer), and every preprocess instance paid it
on its own first request (the H100 harness, run 24: 4 preprocess instances, W1 c=1 preprocess 78 ms per request in
its 4 requests). A vision encoder's first forward loads its CUDA kernels (the llm's inline vision thread: 83-99 ms
against 26 ms). A first video request imports PyAV and opens its decoders: families that take video also prepare a
small synthetic video. The warm-up request is one synthetic image large enough for the largest tile grid (2048 x 2048
unless the deployment's pixel limit is lower), sent as a data: URL through the deployment's own media policy, so it
takes the path a client's image takes and reads no file and no URL.
"""

from __future__ import annotations

import base64
import io
import json
import math
from typing import Any

import numpy as np
from PIL import Image

from vlm_triton.errors import InvalidRequest
from vlm_triton.families.base import PreparedPrompt, PreprocessLimits
from vlm_triton.multimodal.media import MediaFetcher, MediaPolicy
from vlm_triton.multimodal.video import load_pyav
from vlm_triton.prompt.messages import parse_messages

WARM_UP_SIDE = 2048  # pixels: a square this large gets the most tiles InternVL cuts (12 + thumbnail)
SMALL_SIDE = 448  # one tile, for deployments whose limits refuse the large image


def warm_up_image_url(policy: MediaPolicy, side: int = WARM_UP_SIDE) -> str:
    """A data: URL of a side x side image (smaller when policy.max_image_pixels is): a smooth gradient, JPEG when
    the policy allows it, else the first allowed format Pillow can write."""
    side = max(1, min(side, math.isqrt(policy.max_image_pixels)))
    ramp = np.linspace(0, 255, side, dtype=np.float32)
    pixels = np.stack([np.add.outer(ramp, ramp) / 2, np.tile(ramp, (side, 1)), np.tile(ramp[:, None], (1, side))], -1)
    image = Image.fromarray(pixels.astype(np.uint8), "RGB")
    allowed = [f.upper() for f in policy.image_formats]
    fmt = "JPEG" if "JPEG" in allowed else next((f for f in allowed if f in ("PNG", "WEBP", "BMP")), "PNG")
    buf = io.BytesIO()
    image.save(buf, fmt)
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buf.getvalue()).decode()}"


def write_grey_frames(out: Any, frames: int, fps: int, size: tuple[int, int], step: int = 29) -> None:
    """Encode `frames` flat grey frames (frame k at grey level k * step mod 256) as MPEG-4 into the open PyAV
    container `out`, flushing the encoder."""
    import av

    stream = out.add_stream("mpeg4", rate=fps)
    stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
    for k in range(frames):
        frame = np.full((size[1], size[0], 3), (k * step) % 256, np.uint8)
        for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
            out.mux(packet)
    for packet in stream.encode():
        out.mux(packet)


def warm_up_video_url(frames: int = 8, fps: int = 4, size: tuple[int, int] = (64, 48)) -> str:
    """A data: URL of a small MPEG-4 video of changing grey, made with PyAV in memory (InvalidRequest without PyAV:
    the deployment takes no video, so there is nothing to warm up)."""
    av = load_pyav()

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as out:
        write_grey_frames(out, frames, fps, size)
    return f"data:video/mp4;base64,{base64.b64encode(buf.getvalue()).decode()}"


def _prepare(family: Any, part: dict[str, Any], media: MediaFetcher, limits: PreprocessLimits) -> PreparedPrompt:
    messages = parse_messages(json.dumps([{"role": "user", "content": [
        part, {"type": "text", "text": "Describe this."},
    ]}]))
    return family.prepare(messages, media, limits)


def _image_prompt(family: Any, limits: PreprocessLimits, media: MediaFetcher) -> PreparedPrompt | None:
    """The warm-up image prepared (a one-tile image when the limits refuse the large one); None without images."""
    if not getattr(family, "accepts_images", True):
        return None
    for side in (WARM_UP_SIDE, SMALL_SIDE):
        part = {"type": "image_url", "image_url": {"url": warm_up_image_url(media.policy, side)}}
        try:
            return _prepare(family, part, media, limits)
        except InvalidRequest:
            if side == SMALL_SIDE:
                raise
    return None


def _video_prompt(family: Any, limits: PreprocessLimits, media: MediaFetcher) -> PreparedPrompt | None:
    """The warm-up video prepared; None for a family without video, or when the limits refuse its frames (they were
    decoded before the refusal, which is what the warm-up is for), or when this deployment has no PyAV."""
    policy = getattr(family, "video_policy_for", None)
    if policy is None or policy(limits) is None:
        return None
    try:
        return _prepare(family, {"type": "video_url", "video_url": {"url": warm_up_video_url()}}, media, limits)
    except InvalidRequest:
        return None


def warm_up_prompt(family: Any, limits: PreprocessLimits, media: MediaFetcher | None = None) -> PreparedPrompt | None:
    """`family.prepare` of one user turn with the warm-up image and a question, under `limits` and through `media`
    (default: a fetcher with the default policy), and of one with a small video when the family takes video (PyAV's
    import and decoders: the first video request's costs). A deployment whose limits refuse the large image (a short
    prompt limit) gets a one-tile image instead. Returns the image request's prepared prompt, else the video's;
    None for a family that takes neither."""
    media = media or MediaFetcher(MediaPolicy())
    image = _image_prompt(family, limits, media)
    video = _video_prompt(family, limits, media)
    return image or video


def warm_up_vision(runner: Any, family: Any, limits: PreprocessLimits) -> None:
    """One forward of the warm-up request's units through `runner` (a `VisionRunner`), cut on its device when
    `limits.device_tiles` says the preprocess sends decoded images, synchronised."""
    import torch

    media = MediaFetcher(MediaPolicy())  # only the image's units (a video family's frames when it takes no images)
    prepared = _image_prompt(family, limits, media) or _video_prompt(family, limits, media)
    if prepared is None or prepared.pixel_values.shape[0] == 0:
        return
    grids = None if prepared.image_grids is None else torch.from_numpy(prepared.image_grids)
    tgt_sizes = None if prepared.tgt_sizes is None else torch.from_numpy(prepared.tgt_sizes)
    with torch.inference_mode():
        runner.encode([runner.tiles(torch.from_numpy(prepared.pixel_values), grids)], [tgt_sizes])
    if runner.device.type == "cuda":
        torch.cuda.synchronize(runner.device)
