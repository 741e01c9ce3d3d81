"""Video decoding and frame sampling for InternVL-style models (model_specs.md 2.3), with PyAV.

The model cards read a video with decord (`len(vr)` frames, `vr.get_avg_fps()`), pick `num_segments` frame
indices with `get_index` (the middle frame of each equal segment: `tiling.video_frame_indices`) and feed each
frame as one 448x448 tile (`dynamic_preprocess(max_num=1)`: no thumbnail).

How many frames (`frame_count`): the cards pass a fixed `num_segments` (128 for InternVideo2.5). We take
`min(max_frames, frames in the video)` rounded down to a multiple of `frame_multiple` (4 for HiCo, which merges
frames in groups of 4), and at least `frame_multiple`. For videos with at least `max_frames` frames this is
exactly the card's choice; a shorter video gets one sample per frame instead of repeated frames.
`num_frames_by_duration` is the InternVideo2.5 card's optional duration rule, kept for reference and tests.

Decoding: frames are decoded in order and converted to RGB (`frame.to_image()`, swscale's default YUV->RGB,
the same conversion decord uses; bit-equality with decord is not verified). Limits: the container must hold a
video stream; its duration must be known and within `max_duration_s`; its frame count (header, or a demux pass
when the header has none) within `max_total_frames`. An undecodable, truncated (a sampled frame that the
container declares cannot be decoded) or empty video raises `InvalidRequest` saying what was wrong. Decoding
stops at the last sampled frame, so damage after it goes unnoticed.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

from PIL import Image

from vlm_triton.errors import InvalidRequest
from vlm_triton.multimodal.tiling import video_frame_indices


@dataclass(frozen=True)
class VideoPolicy:
    """How many frames to sample and what videos to accept."""

    max_frames: int = 128
    frame_multiple: int = 1  # 4 for InternVideo2.5 (HiCo groups of 4 frames)
    max_duration_s: float = 3600.0
    max_total_frames: int = 250_000  # bounds the decoding work (about 2.3 h at 30 fps)

    def __post_init__(self) -> None:
        if self.frame_multiple < 1 or self.max_frames < self.frame_multiple:
            raise ValueError(f"need 1 <= frame_multiple <= max_frames, got {self.frame_multiple}, {self.max_frames}")


@dataclass(frozen=True)
class SampledVideo:
    frames: list[Image.Image]  # RGB, in time order
    indices: list[int]  # the decoded frame index of each sample
    total_frames: int
    fps: float
    duration_s: float


def frame_count(total_frames: int, policy: VideoPolicy) -> int:
    """Number of frames to sample from a video with `total_frames` frames (see the module docstring)."""
    if total_frames < 1:
        raise ValueError(f"a video needs at least one frame, got {total_frames}")
    m = policy.frame_multiple
    return max(m, min(policy.max_frames, total_frames) // m * m)


def num_frames_by_duration(duration_s: float, *, min_frames: int = 128, max_frames: int = 512) -> int:
    """InternVideo2.5 card `get_num_frames_by_duration`: 4 per 4 s of video, clamped to [min_frames, max_frames]."""
    n = int(duration_s // 4)
    frames = 4 if n == 0 else 4 * n
    return min(max(frames, min_frames), max_frames)


def load_pyav() -> Any:
    """The `av` module, or InvalidRequest when this deployment has no PyAV (video input unavailable)."""
    try:
        import av
    except ImportError as exc:  # pragma: no cover - a deployment without PyAV
        raise InvalidRequest("video input is not available on this server (PyAV is not installed)") from exc
    return av


def _probe(av: Any, data: bytes, source: str, policy: VideoPolicy) -> tuple[int, float, float]:
    """(total frames, fps, duration in seconds) from the container, or InvalidRequest."""
    with av.open(io.BytesIO(data), mode="r") as container:
        if not container.streams.video:
            raise InvalidRequest(f"{source} has no video stream")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        fps = float(rate) if rate else 0.0
        if stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration = container.duration / 1_000_000
        else:
            duration = -1.0
        if duration < 0 or fps <= 0:
            raise InvalidRequest(f"{source}: the video has no known duration or frame rate")
        if duration > policy.max_duration_s:
            raise InvalidRequest(f"{source} is {duration:.1f} s long; the limit is {policy.max_duration_s:g} s")
        total = int(stream.frames or 0)
        if total <= 0:
            total = sum(1 for packet in container.demux(stream) if packet.size)
    if total == 0 or duration == 0:
        raise InvalidRequest(f"{source} is empty (zero frames)")
    if total > policy.max_total_frames:
        raise InvalidRequest(f"{source} has {total} frames; the limit is {policy.max_total_frames}")
    return total, fps, duration


def _decode(av: Any, data: bytes, wanted: list[int], source: str) -> dict[int, Image.Image]:
    keep = set(wanted)
    last = max(wanted)
    out: dict[int, Image.Image] = {}
    with av.open(io.BytesIO(data), mode="r") as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for index, frame in enumerate(container.decode(stream)):
            if index in keep:
                out[index] = frame.to_image().convert("RGB")
            if index >= last:
                break
    return out


def sample_video(data: bytes, policy: VideoPolicy, *, source: str = "video") -> SampledVideo:
    """Decode `data` and return the sampled RGB frames (InvalidRequest on a bad or over-limit video)."""
    if not data:
        raise InvalidRequest(f"{source} is empty (zero bytes)")
    av = load_pyav()
    try:
        total, fps, duration = _probe(av, data, source, policy)
        indices = video_frame_indices(total, fps, frame_count(total, policy))
        frames = _decode(av, data, indices, source)
    except InvalidRequest:
        raise
    except (av.FFmpegError, OSError, ValueError, IndexError, EOFError) as exc:
        raise InvalidRequest(f"{source} cannot be decoded as a video ({type(exc).__name__}: {exc})") from None
    missing = [i for i in indices if i not in frames]
    if missing:
        raise InvalidRequest(
            f"{source} is truncated or corrupt: the container declares {total} frames but frame {missing[0]} "
            f"could not be decoded ({len(frames)} of the sampled frames were)"
        )
    return SampledVideo([frames[i] for i in indices], indices, total, fps, duration)
