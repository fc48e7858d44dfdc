"""Video decoding: an mp4 / GIF file -> ``num_frames`` uniformly sampled RGB frames (PyAV).

Frame sampling follows Video-LLaVA's official loader
(``videollava/model/multimodal_encoder/languagebind/video/processing_video.py::load_and_transform_video``,
decord branch: ``np.linspace(0, duration - 1, num_frames, dtype=int)``) and lmms-eval 0.7.3
``lmms_eval/models/model_utils/load_video.py::load_video_decord`` (same ``np.linspace``): for a video of
``T`` decoded frames, frame ``i`` of the clip is source frame ``floor(i * (T - 1) / (num_frames - 1))``,
so the first and the last frame are always included. ``T = 243`` and 8 frames give indices
``[0, 34, 69, 103, 138, 172, 207, 242]``. A video shorter than ``num_frames`` repeats frames (``T = 3``
-> ``[0, 0, 0, 0, 1, 1, 1, 2]``), so the clip always has exactly ``num_frames`` frames, as the model
expects (Video-LLaVA's video tower is built for 8 frames).

``T`` is the number of frames the decoder really yields (the container's ``frames`` field is only a
hint: it is 0 for some GIFs and can be off by a few for mp4), so decoding is one pass when the hint is
right and two passes otherwise. Decoding uses PyAV (``av``, FFmpeg bindings), the backend lmms-eval uses
by default; frames are converted with ``VideoFrame.to_ndarray(format="rgb24")`` (GIF frames come out of
FFmpeg already composited, alpha dropped).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

__all__ = [
    "DEFAULT_NUM_FRAMES",
    "VIDEO_EXTENSIONS",
    "VideoDecodeError",
    "is_video_path",
    "load_video",
    "load_video_frames",
    "uniform_frame_indices",
]

#: Frames per clip of Video-LLaVA (``config.video_seq_length = 8 * 257`` in the HF port).
DEFAULT_NUM_FRAMES = 8
#: File name endings treated as videos by :func:`is_video_path` (lower case).
VIDEO_EXTENSIONS: tuple[str, ...] = (".mp4", ".gif", ".webm", ".mkv", ".avi", ".mov", ".m4v")


class VideoDecodeError(ValueError):
    """A video that cannot be decoded; the message is one line and names the path."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


def is_video_path(value: object) -> bool:
    """Whether ``value`` is a ``str`` / ``os.PathLike`` whose name ends in one of :data:`VIDEO_EXTENSIONS`."""
    if not isinstance(value, (str, os.PathLike)):
        return False
    return str(value).lower().endswith(VIDEO_EXTENSIONS)


def uniform_frame_indices(total_frames: int, num_frames: int = DEFAULT_NUM_FRAMES) -> np.ndarray:
    """Indices of ``num_frames`` uniformly spaced frames of a ``total_frames``-frame video.

    ``np.linspace(0, total_frames - 1, num_frames, dtype=int)`` (Video-LLaVA's official sampler and
    lmms-eval's ``load_video_decord``): first and last frame included, repeats when
    ``total_frames < num_frames``.

    Parameters
    ----------
    total_frames : int
        Decoded frames in the video (``>= 1``).
    num_frames : int
        Frames to sample (``>= 1``).

    Returns
    -------
    numpy.ndarray
        ``(num_frames,)`` int64, non-decreasing, in ``[0, total_frames)``.

    Raises
    ------
    ValueError
        If ``total_frames`` or ``num_frames`` is < 1.
    """
    if total_frames < 1:
        raise ValueError(f"total_frames {total_frames} must be >= 1")
    if num_frames < 1:
        raise ValueError(f"num_frames {num_frames} must be >= 1")
    return np.linspace(0, total_frames - 1, num_frames, dtype=np.int64)


def _decode_pass(path: str, wanted: np.ndarray | None) -> tuple[int, dict[int, np.ndarray]]:
    """Decode every frame of ``path``; return the frame count and the rgb24 arrays of ``wanted``."""
    import av

    keep = set(int(i) for i in wanted) if wanted is not None else set()
    frames: dict[int, np.ndarray] = {}
    count = 0
    with av.open(path) as container:
        if not container.streams.video:
            raise VideoDecodeError(f"no video stream in {path}")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for frame in container.decode(stream):
            if count in keep:
                frames[count] = frame.to_ndarray(format="rgb24")
            count += 1
    return count, frames


def _frame_count_hint(path: str) -> int:
    import av

    with av.open(path) as container:
        if not container.streams.video:
            raise VideoDecodeError(f"no video stream in {path}")
        return int(container.streams.video[0].frames or 0)


def _truncation(path: str, decoded: int, declared: int) -> str | None:
    """Why a video is cut short, or None: fewer frames decode than the container declares (more than one
    frame short; the count is only a hint), or a GIF lacks its trailer byte ``0x3B`` (GIF89a spec,
    section 27: every GIF data stream ends with it; FFmpeg's GIF demuxer counts the frames it can read,
    so a GIF cut in half declares only its decodable frames)."""
    if declared > 0 and decoded < declared - 1:
        return f"{decoded} of its {declared} declared frames decode"
    with open(path, "rb") as fh:
        if fh.read(4) == b"GIF8":
            fh.seek(max(0, os.path.getsize(path) - 64))
            tail = fh.read().rstrip(b"\x00")
            if not tail.endswith(b"\x3b"):
                return f"the GIF ends without its trailer byte (file cut short; {decoded} frame(s) decode)"
    return None


def load_video(path: str | os.PathLike, num_frames: int = DEFAULT_NUM_FRAMES) -> np.ndarray:
    """Decode ``num_frames`` uniformly sampled RGB frames of an mp4 / GIF (any FFmpeg-readable video).

    Parameters
    ----------
    path : str or os.PathLike
        The video file (read in place).
    num_frames : int
        Frames to sample (Video-LLaVA: 8); see :func:`uniform_frame_indices`.

    Returns
    -------
    numpy.ndarray
        ``(num_frames, height, width, 3)`` uint8 RGB.

    Raises
    ------
    VideoDecodeError
        (a ``ValueError``) one line naming ``path``: a missing file, a file FFmpeg cannot open or
        decode, no video stream, zero decodable frames, or a truncated file (fewer decodable frames than
        declared, or a GIF without its trailer byte).
    ValueError
        If ``num_frames`` < 1.

    Examples
    --------
    >>> clip = load_video("/work/shared/benchmarks/tgif_qa/4.gif")  # doctest: +SKIP
    >>> clip.shape, clip.dtype  # doctest: +SKIP
    ((8, 225, 225, 3), dtype('uint8'))
    """
    if num_frames < 1:
        raise ValueError(f"num_frames {num_frames} must be >= 1")
    p = str(Path(os.fspath(path)).expanduser())
    if not os.path.isfile(p):
        raise VideoDecodeError(f"video file {p} does not exist")
    import av

    try:
        hint = _frame_count_hint(p)
        wanted = uniform_frame_indices(hint, num_frames) if hint > 0 else None
        total, frames = _decode_pass(p, wanted)
        if total < 1:
            raise VideoDecodeError(f"no decodable frame in video {p}")
        short = _truncation(p, total, hint)
        if short:
            raise VideoDecodeError(f"video {p} is truncated: {short}")
        if wanted is None or total != hint:  # the container's frame count was missing or wrong
            wanted = uniform_frame_indices(total, num_frames)
            _, frames = _decode_pass(p, wanted)
    except VideoDecodeError:
        raise
    except (av.FFmpegError, OSError, ValueError, RuntimeError) as exc:  # av.FFmpegError: open/demux/decode failures
        first = " ".join(str(exc).split()) or type(exc).__name__
        raise VideoDecodeError(f"cannot decode video {p}: {type(exc).__name__}: {first}") from None
    missing = [int(i) for i in wanted if int(i) not in frames]
    if missing:
        raise VideoDecodeError(f"cannot decode video {p}: frame(s) {missing} missing on the second pass")
    return np.stack([frames[int(i)] for i in wanted])


def load_video_frames(path: str | os.PathLike, num_frames: int = DEFAULT_NUM_FRAMES) -> list:
    """:func:`load_video` as a list of ``num_frames`` RGB ``PIL.Image.Image`` (same sampling and errors)."""
    from PIL import Image

    return [Image.fromarray(frame) for frame in load_video(path, num_frames)]
