"""Video: frame sampling against the model-card formulas, PyAV decoding and its failures, HiCo merging against a
plain implementation of spec 3.4, and the video prompts of the InternVideo2.5 and InternVL families."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
import torch

from vlm_triton.checkpoints.tiny import make_tiny_checkpoint
from vlm_triton.errors import InvalidRequest
from vlm_triton.families import open_family
from vlm_triton.families.base import PreprocessLimits
from vlm_triton.models.hico import hico_merge, is_hico_config, merge_schedule
from vlm_triton.multimodal.media import MediaFetcher, MediaPolicy
from vlm_triton.multimodal.tiling import preprocess_image, video_frame_indices
from vlm_triton.multimodal.video import VideoPolicy, frame_count, num_frames_by_duration, sample_video
from vlm_triton.multimodal.warmup import write_grey_frames
from vlm_triton.prompt.messages import parse_messages


def make_video(frames: int, fps: int = 10, *, size: tuple[int, int] = (64, 48), faststart: bool = False) -> bytes:
    import tempfile

    import av

    with tempfile.TemporaryDirectory() as tmp:  # faststart rewrites the file, so it needs a real one
        path = Path(tmp) / "v.mp4"
        options = {"movflags": "faststart"} if faststart else {}
        with av.open(str(path), mode="w", format="mp4", options=options) as out:
            write_grey_frames(out, frames, fps, size, step=7)
        return path.read_bytes()


# --- sampling formulas -------------------------------------------------------------------------------------------
def _card_get_index(fps: float, max_frame: int, num_segments: int) -> list[int]:
    """The model cards' get_index(bound=None, fps, max_frame, first_idx=0, num_segments), restated."""
    start_idx = max(0, round(-100000 * fps))
    end_idx = min(round(100000 * fps), max_frame)
    seg_size = float(end_idx - start_idx) / num_segments
    return [int(start_idx + (seg_size / 2) + np.round(seg_size * idx)) for idx in range(num_segments)]


@pytest.mark.parametrize("duration", [0.3, 3.0, 10.0, 61.7, 600.0])
@pytest.mark.parametrize("fps", [10.0, 24.0, 29.97, 60.0])
def test_indices_and_token_counts_follow_the_card(duration: float, fps: float) -> None:
    total = max(1, round(duration * fps))
    policy = VideoPolicy(max_frames=128, frame_multiple=4)
    n = frame_count(total, policy)
    assert n % 4 == 0 and 4 <= n <= 128
    assert n == (128 if total >= 128 else max(4, total // 4 * 4))
    indices = video_frame_indices(total, fps, n)
    assert indices == _card_get_index(fps, total - 1, n)
    assert all(0 <= i < total for i in indices) and indices == sorted(indices)
    assert n * 16 == len(indices) * 16  # HiCo: 16 LLM tokens per frame


def test_card_examples() -> None:
    assert video_frame_indices(300, 30.0, 8) == [18, 55, 93, 130, 168, 205, 242, 280]
    assert [num_frames_by_duration(d) for d in (0, 3.9, 4, 100, 300, 511.9, 512, 5000)] == \
        [128, 128, 128, 128, 300, 508, 512, 512]
    assert frame_count(3, VideoPolicy(max_frames=8)) == 3 and frame_count(300, VideoPolicy(max_frames=8)) == 8


# --- decoding ----------------------------------------------------------------------------------------------------
def test_sample_video_decodes_the_chosen_frames() -> None:
    video = sample_video(make_video(30, fps=10), VideoPolicy(max_frames=8))
    assert (video.total_frames, video.fps, video.duration_s) == (30, 10.0, 3.0)
    assert video.indices == video_frame_indices(30, 10.0, 8) == [1, 5, 8, 12, 15, 19, 23, 26]
    grey = [int(np.asarray(f)[10:20, 10:20].mean()) for f in video.frames]
    assert all(abs(g - (i * 7) % 256) <= 4 for g, i in zip(grey, video.indices))
    assert all(f.mode == "RGB" and f.size == (64, 48) for f in video.frames)


@pytest.mark.parametrize("name,data,message", [
    ("garbage", b"this is not a video at all" * 20, "cannot be decoded"),
    ("empty", b"", "empty"),
    ("truncated", make_video(40, faststart=True)[:1500], "truncated|cannot be decoded"),
    ("truncated_tail", make_video(40)[:-300], "cannot be decoded|truncated"),
    ("image_not_video", base64.b64decode(
        "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="),
     "cannot be decoded|no video stream|duration"),
])
def test_bad_videos_are_invalid_requests(name: str, data: bytes, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        sample_video(data, VideoPolicy(max_frames=8), source="video")


def test_zero_frame_video_is_refused() -> None:
    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="matroska") as out:
        stream = out.add_stream("mpeg4", rate=10)
        stream.width, stream.height = 64, 48
    with pytest.raises(InvalidRequest, match="empty|duration|cannot be decoded"):
        sample_video(buf.getvalue(), VideoPolicy())


def test_duration_and_byte_limits() -> None:
    data = make_video(30, fps=10)
    with pytest.raises(InvalidRequest, match=r"3.0 s long; the limit is 2 s"):
        sample_video(data, VideoPolicy(max_duration_s=2.0))
    with pytest.raises(InvalidRequest, match="30 frames; the limit is 20"):
        sample_video(data, VideoPolicy(max_total_frames=20))
    url = "data:video/mp4;base64," + base64.b64encode(data).decode()
    with pytest.raises(InvalidRequest, match="byte limit|the limit is"):
        MediaFetcher(MediaPolicy(max_bytes=len(data) - 1)).fetch_bytes(url)


# --- HiCo ------------------------------------------------------------------------------------------------------
def _plain_tome(x: torch.Tensor, target: int, heads: int) -> torch.Tensor:
    """Spec 3.4 restated with Python loops over the batch and the sources."""
    out = []
    for seq in x:
        tokens, sizes = [t.clone() for t in seq], [1.0] * seq.shape[0]
        while len(tokens) > target:
            p = len(tokens)
            r = min(p - target if p - target <= p // 2 else p // 2, p // 2)
            mat = torch.stack(tokens)
            metric = mat.reshape(p, heads, -1).mean(1)
            metric = metric / metric.norm(dim=-1, keepdim=True)
            a_idx, b_idx = list(range(0, p, 2)), list(range(1, p, 2))
            scores = metric[a_idx] @ metric[b_idx].T
            best, match = scores.max(-1)
            order = best.argsort(descending=True).tolist()
            b_tokens = [tokens[j] * sizes[j] for j in b_idx]
            b_sizes = [sizes[j] for j in b_idx]
            for a in order[:r]:
                dst = int(match[a])
                b_tokens[dst] = b_tokens[dst] + tokens[a_idx[a]] * sizes[a_idx[a]]
                b_sizes[dst] += sizes[a_idx[a]]
            kept = [tokens[a_idx[a]] for a in order[r:]]
            kept_sizes = [sizes[a_idx[a]] for a in order[r:]]
            tokens = kept + [t / s for t, s in zip(b_tokens, b_sizes)]
            sizes = kept_sizes + b_sizes
        out.append(torch.stack(tokens))
    return torch.stack(out)


def test_merge_schedule() -> None:
    assert merge_schedule(1024, 64) == [512, 256, 128, 64]
    assert merge_schedule(100, 64) == [36]
    assert merge_schedule(200, 64) == [100, 36]


@pytest.mark.parametrize("tokens,target,heads", [(1024, 64, 4), (256, 64, 2), (150, 64, 8)])
def test_hico_merge_equals_plain_implementation(tokens: int, target: int, heads: int) -> None:
    x = torch.randn(3, tokens, 32, generator=torch.Generator().manual_seed(tokens), dtype=torch.float64)
    got = hico_merge(x, target=target, heads=heads)
    assert got.shape == (3, target, 32)
    torch.testing.assert_close(got, _plain_tome(x, target, heads))


# --- families ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def video_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("videos")
    (root / "clip.mp4").write_bytes(make_video(10, fps=5))
    (root / "long.mp4").write_bytes(make_video(40, fps=10))
    return root


def _video_message(url: str, text: str = "What happens?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},
                                         {"type": "text", "text": text}]}]


def test_internvideo_prepares_16_tokens_per_frame(tmp_path: Path, video_dir: Path) -> None:
    fam = open_family(make_tiny_checkpoint("internvideo2_5", tmp_path / "iv"))
    assert fam.name == "internvideo" and is_hico_config(fam.config)
    media = MediaFetcher(MediaPolicy(allowed_local_dirs=(video_dir,)))
    prepared = fam.prepare(parse_messages(_video_message(f"file://{video_dir}/clip.mp4")), media, PreprocessLimits())
    frames = "".join(f"Frame{k}: <image>\n" for k in range(1, 9))  # 10 frames -> 8 (a multiple of 4)
    assert f"<|im_start|>user\n{frames}What happens?<|im_end|>" in prepared.prompt_text
    assert prepared.pixel_values.shape == (8, 3, 448, 448) and prepared.num_image_tokens == 8 * 16
    encoder = fam.build_vision_encoder(torch.float32, torch.device("cpu"))
    with torch.no_grad():
        assert encoder(torch.from_numpy(fam.float_pixels(prepared))).shape == (8, 16, 64)
        with pytest.raises(ValueError, match="groups of 4"):
            encoder(torch.zeros(6, 3, 448, 448))
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file:///x.png"}}]}]
    with pytest.raises(InvalidRequest, match="video_url parts, not image_url"):
        fam.prepare(parse_messages(image), media, PreprocessLimits())


@pytest.mark.parametrize("image_threads", [1, 4])
def test_internvideo_frame_bytes_normalise_to_the_reference_floats(tmp_path: Path, video_dir: Path,
                                                                   image_threads: int) -> None:
    fam = open_family(make_tiny_checkpoint("internvideo2_5", tmp_path / "iv"))
    media = MediaFetcher(MediaPolicy(allowed_local_dirs=(video_dir,)))
    prepared = fam.prepare(parse_messages(_video_message(f"file://{video_dir}/clip.mp4")), media,
                           PreprocessLimits(image_threads=image_threads))
    policy = fam.video_policy_for(PreprocessLimits())
    assert policy is not None
    frames = sample_video((video_dir / "clip.mp4").read_bytes(), policy).frames
    reference = np.concatenate([preprocess_image(f, max_num=1, use_thumbnail=False) for f in frames])
    assert prepared.pixel_values.dtype == np.uint8 and prepared.pixel_values.shape == reference.shape
    assert np.array_equal(fam.float_pixels(prepared), reference)


def test_internvl_takes_video_as_256_token_frames(tmp_path: Path, video_dir: Path) -> None:
    fam = open_family(make_tiny_checkpoint("internvl2_5_internlm2", tmp_path / "ivl"))
    media = MediaFetcher(MediaPolicy(allowed_local_dirs=(video_dir,)))
    prepared = fam.prepare(parse_messages(_video_message(f"file://{video_dir}/long.mp4")), media, PreprocessLimits())
    assert prepared.pixel_values.shape[0] == 8 and prepared.num_image_tokens == 8 * 256
    assert "Frame8: <image>\nWhat happens?" in prepared.prompt_text


def test_family_without_video_support_refuses_video(tmp_path: Path, video_dir: Path) -> None:
    from vlm_triton.families.internvl import InternVLFamily

    class ImagesOnly(InternVLFamily):
        video_policy = None

    fam = ImagesOnly(open_family(make_tiny_checkpoint("internvl_chat_v1_5", tmp_path / "v")).checkpoint)
    with pytest.raises(InvalidRequest, match="not video_url"):
        fam.prepare(parse_messages(_video_message(f"file://{video_dir}/clip.mp4")), MediaFetcher(), PreprocessLimits())
