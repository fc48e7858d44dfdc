"""Video-LLaVA adapter (``LanguageBind/Video-LLaVA-7B-hf`` and the tiny random-weight variant).

Sequence layout (docs/methods/index.md, transformers ``models/video_llava/modeling_video_llava.py``):

* image: ``USER: <image>\\n{question} ASSISTANT:``; ``<image>`` expands to 256 placeholders
  ((224 / 14)² patches of ``image_tower`` ``hidden_states[-2]``, CLS dropped);
* video: ``USER: <video>\\n{question} ASSISTANT:``; ``<video>`` expands to 8 × 257 = 2056 placeholders
  (``video_tower`` ``hidden_states[-2]`` of each of the 8 frames, **CLS kept** per frame, as HF's
  ``get_video_features`` does). Frame ``f``'s tokens are positions ``f·257 … f·257 + 256`` of the video's
  visual tokens, its CLS first (:meth:`VideoLlavaAdapter.frame_token_ranges`).

Upstream Video-LLaVA drops the CLS of video frames too (8 × 256 = 2048 visual tokens); ApET's fork keeps
it (its ``feature_select`` strip is commented out), as the HF port does, so 2056 is what the paper's
Video-LLaVA rows compress. Both go through the same 2-layer MLP projector (4096-d for the 7B model).

The prompt is the official one (MaQianKun0/ApET @ 70cc01b): a video is the ``llava_v1`` conversation with
its system prompt and one ``<image>`` per frame before the question
(``videollava/eval/video/run_inference_video_qa.py``), an image the ``vicuna_v1`` conversation; ids as
``tokenizer_image_token`` (:mod:`apet_bench.models.inputs`), each frame's image index expanded to 257
``<video>`` placeholders (contiguous, as the HF model expects one ``<video>`` run).

Frames (:mod:`apet_bench.data.video`) go through Video-LLaVA's evaluation transform (normalise ->
bilinear resize of the short side -> centre crop, ``processor.video_transform: official``) or the HF
image processor per frame (``hf``); the official random horizontal flip is an option
(``processor.video_flip: <seed>``, default off).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from apet_bench.core import ShrunkSequence, VisualSelection
from apet_bench.data.video import DEFAULT_NUM_FRAMES, is_video_path, load_video
from apet_bench.models.base import (
    ModelAdapter,
    ModelSpec,
    VisualSegment,
    VisualSegments,
    check_image_size,
    placeholder_prompt_body,
    register_adapter,
)
from apet_bench.models.inputs import (
    LLAVA_V1_SYSTEM,
    VICUNA_V1_SYSTEM,
    conversation_prompt,
    official_input_ids,
    video_llava_video_transform,
    with_official_ids,
)
from apet_bench.models.loading import config_processor_loader, load_pretrained
from apet_bench.models.tiny import (
    TinyLlavaConfig,
    build_tiny_tokenizer,
    instantiate_tiny_model,
    tiny_llava_config_kwargs,
)

__all__ = [
    "VideoClip",
    "video_clip_pixels",
    "video_llava_prompt",
    "VideoLlavaAdapter",
    "build_tiny_video_llava",
    "make_video_llava_processor",
]

#: Tiny defaults that differ from :class:`TinyLlavaConfig`'s: Video-LLaVA's CLIP ViT-L/14 at 224 px.
TINY_VIDEO_LLAVA_DEFAULTS: dict[str, Any] = {"image_size": 224}


class VideoClip:
    """Decoded frames of one video, as :meth:`VideoLlavaAdapter.prepare_visuals` takes them.

    Parameters
    ----------
    frames : numpy.ndarray or sequence of PIL.Image.Image
        ``(num_frames, height, width, 3)`` uint8 RGB, or one RGB image per frame.
    source : str, optional
        Where the frames came from (a path), for messages.
    """

    def __init__(self, frames: Any, source: str | None = None) -> None:
        if isinstance(frames, np.ndarray):
            if frames.ndim != 4 or frames.shape[-1] != 3:
                raise ValueError(f"video frames must be (num_frames, height, width, 3), got {frames.shape}")
            self.frames = list(frames)
        else:
            self.frames = list(frames)
        if not self.frames:
            raise ValueError(f"video {source or ''} has no frames".replace("  ", " "))
        self.source = source

    def __len__(self) -> int:
        return len(self.frames)


def video_llava_prompt(question: str, num_visuals: int = 1, kind: str = "video", num_frames: int = 8,
                       image_token: str = "<image>") -> str:
    """The official Video-LLaVA prompt (see :meth:`VideoLlavaAdapter.build_prompt`), without a model.

    Raises
    ------
    ValueError
        An unknown ``kind``, or a question holding placeholders but not ``num_visuals`` (images) /
        ``num_visuals * num_frames`` (videos) of them.
    """
    if kind not in ("image", "video"):
        raise ValueError(f"unknown visual kind {kind!r}; use image or video")
    if kind == "image":
        return conversation_prompt(
            VICUNA_V1_SYSTEM, placeholder_prompt_body(question, num_visuals, image_token, image_token + "\n")
        )
    if question.count(image_token):
        body = placeholder_prompt_body(question, num_visuals * num_frames, image_token, image_token, noun="frame")
    else:
        body = (image_token * num_frames + "\n") * num_visuals + question
    return conversation_prompt(LLAVA_V1_SYSTEM, body)


def video_clip_pixels(frames: Sequence[Any], image_processor: Any, video_transform: str = "official",
                      video_flip: Any = False, source: str | None = None) -> torch.Tensor:
    """``(num_frames, 3, S, S)`` float32 pixels of one clip's sampled frames.

    ``video_transform="official"`` -> :func:`apet_bench.models.inputs.video_llava_video_transform`
    (x/255 -> normalise -> bilinear short side S -> centre crop, S = the image processor's crop size, its
    mean / std); with ``video_flip=<seed>`` the official random horizontal flip, drawn from a generator
    seeded with the seed and the clip's path (``source``), so a rerun flips the same clips.
    ``"hf"`` -> ``image_processor`` per frame (bicubic resize -> crop -> normalise).

    Parameters
    ----------
    frames : sequence of (H, W, 3) uint8 arrays or PIL images
    image_processor : transformers.VideoLlavaImageProcessor
    video_transform : {"official", "hf"}
    video_flip : False, None or int
    source : str, optional

    Returns
    -------
    torch.Tensor

    Raises
    ------
    ValueError
        For an unknown ``video_transform``.
    """
    if video_transform == "hf":
        out = image_processor(images=list(frames), return_tensors="pt", return_legacy_image_output=False)
        return out["pixel_values"]
    if video_transform != "official":
        raise ValueError(f"video_transform {video_transform!r}: use official or hf")
    import zlib

    crop = image_processor.crop_size
    size = int(crop["height"]) if isinstance(crop, dict) else int(crop.height)
    gen = None
    if video_flip is not False and video_flip is not None:
        gen = torch.Generator().manual_seed(int(video_flip) * 1000003 + zlib.crc32(str(source or "").encode()))
    arr = np.stack([np.asarray(f.convert("RGB") if hasattr(f, "convert") else f, dtype=np.uint8) for f in frames])
    return video_llava_video_transform(
        arr, size=size, mean=image_processor.image_mean, std=image_processor.image_std, flip_generator=gen
    )


def make_video_llava_processor(image_processor: Any, tokenizer: Any, **kwargs: Any) -> Any:
    """A ``VideoLlavaProcessor`` without a video processor (none can be built without torchvision).

    ``ProcessorMixin.check_argument_for_proper_class`` rejects ``video_processor=None`` with
    ``AttributeError: type object 'VIDEO_PROCESSOR_MAPPING' has no attribute '_extra_content'``; the
    subclass skips the check for ``None`` (docs/models.md, "Processor workaround").

    Parameters
    ----------
    image_processor : transformers.VideoLlavaImageProcessor
    tokenizer : transformers tokenizer
    **kwargs
        ``patch_size``, ``vision_feature_select_strategy``, ``num_additional_image_tokens``, ...

    Returns
    -------
    transformers.VideoLlavaProcessor
    """
    from transformers import VideoLlavaProcessor

    class _VideoLlavaProcessorNoVideo(VideoLlavaProcessor):
        def check_argument_for_proper_class(self, argument_name, argument):  # noqa: D401
            if argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    return _VideoLlavaProcessorNoVideo(
        image_processor=image_processor, video_processor=None, tokenizer=tokenizer, **kwargs
    )


def build_tiny_video_llava(
    tiny_config: Mapping[str, Any] | None = None,
    *,
    seed: int = 0,
    attn_implementation: str = "sdpa",
) -> tuple[Any, Any]:
    """A random-weight ``VideoLlavaForConditionalGeneration`` and its processor, built offline.

    ``VideoLlavaConfig(CLIPVisionConfig(224 px, 14 px patches), LlamaConfig, image_token_index=id("<image>"),
    video_token_index=id("<video>"), image_seq_length=256, video_seq_length=num_frames·257,
    vision_feature_layer=-2, vision_feature_select_strategy="default")`` with separate ``image_tower`` and
    ``video_tower`` (docs/models.md); processor: :func:`make_video_llava_processor` with a
    ``VideoLlavaImageProcessor`` (224 shortest edge, 224 × 224 crop). Construction runs under
    ``torch.random.fork_rng``; weights are then re-drawn by :func:`~apet_bench.models.tiny.reinit_weights`.

    Parameters
    ----------
    tiny_config : mapping, optional
        :class:`~apet_bench.models.tiny.TinyLlavaConfig` keys (``image_size`` defaults to 224 here)
        plus ``num_frames`` (default 8).
    seed : int
        Same seed -> identical ``state_dict``.
    attn_implementation : str

    Returns
    -------
    model : transformers.VideoLlavaForConditionalGeneration
        fp32, CPU, eval mode.
    processor : transformers.VideoLlavaProcessor

    Raises
    ------
    ValueError
        For an unknown / non-positive ``tiny_config`` value.
    """
    from transformers import VideoLlavaConfig, VideoLlavaForConditionalGeneration, VideoLlavaImageProcessor

    cfg = {**TINY_VIDEO_LLAVA_DEFAULTS, **dict(tiny_config or {})}
    num_frames = cfg.pop("num_frames", DEFAULT_NUM_FRAMES)
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"tiny_config num_frames {num_frames!r} must be a positive integer")
    tc = TinyLlavaConfig.from_mapping(cfg)
    tokenizer = build_tiny_tokenizer()
    image_processor = VideoLlavaImageProcessor(
        size={"shortest_edge": tc.image_size}, crop_size={"height": tc.image_size, "width": tc.image_size}
    )
    processor = make_video_llava_processor(
        image_processor,
        tokenizer,
        patch_size=tc.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    config = VideoLlavaConfig(
        **tiny_llava_config_kwargs(tc, tokenizer),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        video_seq_length=num_frames * (tc.num_visual_tokens + 1),
    )
    model = instantiate_tiny_model(
        VideoLlavaForConditionalGeneration,
        config,
        tokenizer,
        init_std=tc.init_std,
        seed=seed,
        attn_implementation=attn_implementation,
    )
    return model, processor


@register_adapter("video_llava")
class VideoLlavaAdapter(ModelAdapter):
    """Video-LLaVA (LanguageBind image / video towers + MLP projector + Vicuna) on ``VideoLlavaForConditionalGeneration``.

    A sample is either images (256 visual tokens each) or videos (``num_frames × 257`` = 2056 visual
    tokens each, one ``<video>`` run per video); mixing both in one sample is refused. During
    :meth:`generate` :attr:`visual_token_id` is the placeholder of the sample's kind (``<video>`` for a
    video), so the shared token accounting, :func:`~apet_bench.surgery.shrink_placeholder_runs` and
    position-finding hooks see the right runs. A stage-1 method sees one ``(2056, hidden_size)`` tensor
    per video (frame-major: reshape to ``(num_frames, 257, hidden_size)``, CLS first in each frame).

    Examples
    --------
    >>> from apet_bench.models import load_model
    >>> adapter = load_model({"name": "tiny_video_llava", "family": "video_llava", "tiny": True})
    >>> adapter.num_visual_tokens, adapter.num_video_tokens, adapter.num_layers
    (256, 2056, 4)
    """

    visual_kinds = ("image", "video")

    @classmethod
    def config_num_frames(cls, model_cfg: Mapping[str, Any]) -> int | None:
        """``tiny_config.num_frames`` of a tiny model, else :data:`~apet_bench.data.video.DEFAULT_NUM_FRAMES` (8)."""
        return int((model_cfg.get("tiny_config") or {}).get("num_frames", DEFAULT_NUM_FRAMES))

    #: LanguageBind ViT-L/14-224 of Video-LLaVA-7B-hf (its published config); patches per image / frame.
    reference_vision_tower = {"num_layers": 24, "feature_layer": -2, "patches": 256}

    @classmethod
    def tiny_vision_geometry(cls, tiny_config: Mapping[str, Any]) -> tuple[int, int, int]:
        """See :meth:`ModelAdapter.tiny_vision_geometry`."""
        tc = {**TINY_VIDEO_LLAVA_DEFAULTS, **tiny_config}
        tc.pop("num_frames", None)
        cfg = TinyLlavaConfig.from_mapping(tc)
        return cfg.vision_layers, cfg.image_size, cfg.patch_size

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> VideoLlavaAdapter:
        """Build the tiny model (``spec.tiny``) or load the checkpoint (``local_path`` or ``hf_id@revision``).

        Raises
        ------
        ModelConfigError
            When the checkpoint cannot be loaded or ``visual_tokens`` / ``num_layers`` do not match.
        ValueError
            For a bad ``tiny_config``.
        """
        if spec.tiny:
            model, processor = build_tiny_video_llava(
                spec.tiny_config, seed=spec.seed, attn_implementation=spec.attn_implementation
            )
            return cls._from_tiny(spec, model, processor)
        model, processor, weights = _load_pretrained(spec)
        return cls(spec=spec, model=model, processor=processor, weights=weights, is_random_weights=False)

    # ------------------------------------------------------------------ geometry
    @property
    def _patches_per_frame(self) -> int:
        vc = self.model.config.vision_config
        return int((vc.image_size // vc.patch_size) ** 2)

    @property
    def num_visual_tokens(self) -> int:
        """Visual tokens per **image**: ``(image_size // patch_size)²`` = 256 (CLS dropped; +1 with ``"full"``)."""
        n = self._patches_per_frame
        if self.model.config.vision_feature_select_strategy == "full":
            n += 1
        return n

    @property
    def tokens_per_frame(self) -> int:
        """Visual tokens per video frame: patches + CLS = 257 (HF ``get_video_features`` keeps the CLS)."""
        return self._patches_per_frame + 1

    @property
    def num_frames(self) -> int:
        """Frames per video: ``config.video_seq_length // tokens_per_frame`` (8)."""
        return int(self.model.config.video_seq_length) // self.tokens_per_frame

    @property
    def num_video_tokens(self) -> int:
        """Visual tokens per video: ``num_frames × tokens_per_frame`` = 2056."""
        return self.num_frames * self.tokens_per_frame

    @property
    def image_token_id(self) -> int:
        """``config.image_token_id`` (the ``<image>`` placeholder)."""
        return int(self.model.config.image_token_id)

    @property
    def video_token_id(self) -> int:
        """``config.video_token_id`` (the ``<video>`` placeholder)."""
        return int(self.model.config.video_token_id)

    @property
    def visual_token_id(self) -> int:
        """Placeholder id of the current sample's kind: :attr:`video_token_id` while a video is generated, else :attr:`image_token_id`."""
        return self.video_token_id if self.visual_kind == "video" else self.image_token_id

    def visual_positions(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """Columns holding an ``<image>`` **or** ``<video>`` placeholder, per row (where stage 2 may drop).

        Parameters
        ----------
        input_ids : torch.Tensor
            ``(batch_size, seq_len)`` as the LLM receives them (after stage 1, if any).
        attention_mask : torch.Tensor, optional
            ``(batch_size, seq_len)``, 0 on padding.

        Returns
        -------
        list of torch.Tensor
            Per row, ``(num_visual_b,)`` increasing long column indices (2056 for an uncompressed video;
            frame ``f`` of a video at columns ``start + f·257 …`` before any drop).
        """
        hits = (input_ids == self.image_token_id) | (input_ids == self.video_token_id)
        if attention_mask is not None:
            hits = hits & attention_mask.bool()
        return [row.nonzero().flatten() for row in hits]

    def frame_token_ranges(self) -> list[range]:
        """Per frame, its positions among one video's visual tokens.

        Returns
        -------
        list of range
            ``num_frames`` ranges; frame ``f`` owns ``range(f·257, (f+1)·257)``, its CLS token at
            ``f·257`` (the order of HF ``get_video_features``: frames, then CLS + 16 × 16 patches
            row-major).
        """
        t = self.tokens_per_frame
        return [range(f * t, (f + 1) * t) for f in range(self.num_frames)]

    def describe(self) -> dict[str, Any]:
        """Provenance (base fields) plus ``num_video_tokens``, ``num_frames`` and ``tokens_per_frame``."""
        out = super().describe()
        out.update(
            num_video_tokens=self.num_video_tokens, num_frames=self.num_frames, tokens_per_frame=self.tokens_per_frame
        )
        return out

    # ------------------------------------------------------------------ structure for methods
    @property
    def vision_tower(self) -> nn.Module:
        """The tower of the current sample's kind: ``model.model.video_tower`` while a video is generated,
        else ``model.model.image_tower`` (LanguageBind ViT-L/14-224; both feed the same projector)."""
        return self.model.model.video_tower if self.visual_kind == "video" else self.model.model.image_tower

    @property
    def vision_towers(self) -> list[tuple[str, nn.Module]]:
        """``[("image", image_tower), ("video", video_tower)]``."""
        return [("image", self.model.model.image_tower), ("video", self.model.model.video_tower)]

    @property
    def vision_projector(self) -> nn.Module:
        return self.model.model.multi_modal_projector

    def _split_vision_features(self, captured: list[torch.Tensor], inputs: Mapping[str, Any]) -> list[torch.Tensor]:
        feats = captured[0]
        pv = inputs.get("pixel_values_videos")
        if pv is not None:  # (num_videos * num_frames, 257, D_v)
            return list(feats.reshape(pv.shape[0], pv.shape[1], feats.shape[-2], feats.shape[-1]))
        return list(feats)  # (num_images, 256, D_v)

    def visual_segments(self, inputs: Mapping[str, Any]) -> list[VisualSegments]:
        """Per video: ``"frame 0"`` .. ``"frame 7"`` (257 tokens each, CLS first); per image: one ``"image"`` segment.

        Frame ``f`` covers positions ``f·257 .. f·257 + 256`` (:meth:`frame_token_ranges`), its CLS at
        ``cls_position = f·257``, its 256 patches a ``(1, 16, 16)`` raster grid. See
        :meth:`ModelAdapter.visual_segments`.

        Parameters
        ----------
        inputs : mapping
            :meth:`prepare_inputs` outputs (``pixel_values_videos`` or ``pixel_values``).

        Returns
        -------
        list of VisualSegments
        """
        side = int(self.model.config.vision_config.image_size // self.model.config.vision_config.patch_size)
        grid = (1, side, side)
        if inputs.get("pixel_values_videos") is not None:
            num, kind, t = int(inputs["pixel_values_videos"].shape[0]), "video", self.tokens_per_frame
            n = self.num_video_tokens
            patches = torch.cat([torch.tensor([-1]), torch.arange(t - 1)])
            segs = tuple(
                VisualSegment(f"frame {f}", "frame", f, torch.arange(f * t, (f + 1) * t), grid, patches, f * t)
                for f in range(self.num_frames)
            )
        else:
            num, kind, n = int(inputs["pixel_values"].shape[0]), "image", self.num_visual_tokens
            full = self.model.config.vision_feature_select_strategy == "full"
            patches = torch.arange(side * side)
            if full:
                patches = torch.cat([torch.tensor([-1]), patches])
            segs = (VisualSegment("image", "image", 0, torch.arange(n), grid, patches, 0 if full else None),)
        starts = self._placeholder_starts(inputs, [n] * num)
        return [VisualSegments(kind=kind, index=i, num_tokens=n, segments=segs, start=starts[i]) for i in range(num)]

    def feature_token_map(self, inputs: Mapping[str, Any]) -> list[torch.Tensor]:
        """Video: ``arange(2056).view(8, 257)``; image: ``arange(256)`` (see :meth:`ModelAdapter.feature_token_map`)."""
        if inputs.get("pixel_values_videos") is not None:
            num = int(inputs["pixel_values_videos"].shape[0])
            return [torch.arange(self.num_video_tokens).view(self.num_frames, self.tokens_per_frame) for _ in range(num)]
        return [torch.arange(self.num_visual_tokens) for _ in range(int(inputs["pixel_values"].shape[0]))]

    # ------------------------------------------------------------------ inputs
    def _to_visual(self, item: Any) -> Any:
        """A PIL image, or a :class:`VideoClip` (a video path is decoded; an image path is opened)."""
        from PIL import Image

        if isinstance(item, (VideoClip, Image.Image)):
            return item
        if isinstance(item, np.ndarray) and item.ndim == 4:
            return VideoClip(item)
        if isinstance(item, (str, os.PathLike)):
            if is_video_path(item):
                return VideoClip(load_video(item, self.num_frames), source=str(item))
            with Image.open(item) as im:
                return im.convert("RGB")
        raise TypeError(f"unsupported visual {type(item).__name__}: pass a PIL image, a video path or a VideoClip")

    def build_prompt(self, question: str, num_images: int = 1, kind: str | None = None) -> str:
        """The official Video-LLaVA prompt: ``vicuna_v1`` for images, ``llava_v1`` with frame tokens for videos.

        * image: ``"{vicuna_v1 system} USER: <image>\\n{question} ASSISTANT:"`` (the image eval scripts run
          ``--conv-mode vicuna_v1``, ``scripts/v1_5/eval/eval_image_*.sh``);
        * video: ``"{llava_v1 system} USER: <image>×num_frames\\n{question} ASSISTANT:"``, one ``<image>``
          per frame before the question and no answer-format instruction
          (``videollava/eval/video/run_inference_video_qa.py::get_model_output``, ``conv_mode = "llava_v1"``,
          MaQianKun0/ApET @ 70cc01b).

        A question that already holds the placeholders is used as it is.

        Parameters
        ----------
        question : str
        num_images : int
            Number of visuals (images or videos) in the sample.
        kind : {"image", "video"}, optional
            Visual kind; defaults to the kind of the sample being generated (``"image"`` outside
            :meth:`generate`).

        Raises
        ------
        ValueError
            If ``question`` holds placeholders, but not ``num_images`` of them (``num_images × num_frames``
            for videos), or for an unknown kind.
        """
        kind = kind or self.visual_kind
        return video_llava_prompt(question, num_images, kind, self.num_frames, getattr(self.processor, "image_token", "<image>"))

    @property
    def processor_options(self) -> dict[str, Any]:
        """``video_transform`` (``official`` | ``hf``) and ``video_flip`` (``False`` or a seed) of the config's
        ``processor:`` block (defaults: official, no flip)."""
        block = dict(self.spec.options.get("processor") or {})
        return {"video_transform": block.get("video_transform", "official"), "video_flip": block.get("video_flip", False)}

    def video_pixels(self, frames: Sequence[Any], source: str | None = None) -> torch.Tensor:
        """``(num_frames, 3, S, S)`` float32 pixels of one clip (:func:`video_clip_pixels` with the config's options)."""
        opts = self.processor_options
        return video_clip_pixels(frames, self.processor.image_processor, opts["video_transform"], opts["video_flip"], source)

    def prepare_inputs(self, images: Sequence[Any], prompt: str) -> Any:
        """Processor outputs on the model's device: images through the processor, videos by hand.

        Images: ``processor(images=..., text=prompt)`` -> ``pixel_values`` ``(num_images, 3, 224, 224)``.
        Videos: :meth:`video_pixels` per clip -> ``pixel_values_videos`` ``(num_videos, num_frames, 3, 224,
        224)``. ``input_ids`` are the official ``tokenizer_image_token`` ids with each image index (one
        per image; one per frame for a video) expanded to its placeholder run: 256 ``<image>`` per image,
        257 ``<video>`` per frame (:mod:`apet_bench.models.inputs`).

        Returns
        -------
        transformers.BatchFeature
            ``input_ids`` / ``attention_mask`` ``(1, seq_len)`` plus the pixel tensor.

        Raises
        ------
        ValueError
            If a video does not have :attr:`num_frames` frames, or an image / frame has a side below
            ``patch_size`` (14) px (one line, naming its size).
        """
        from transformers import BatchFeature

        if not images:
            return super().prepare_inputs([], prompt)
        patch = int(self.model.config.vision_config.patch_size)
        for i, item in enumerate(images):
            for frame in item.frames if isinstance(item, VideoClip) else [item]:
                check_image_size(frame, i, patch)
        if not isinstance(images[0], VideoClip):
            # ``return_legacy_image_output=False``: ``pixel_values``, not the deprecated ``pixel_values_images``.
            inputs = self.processor(
                images=list(images), text=prompt, return_tensors="pt", return_legacy_image_output=False
            )
            token = getattr(self.processor, "image_token", "<image>")
            inputs = with_official_ids(inputs, prompt, self.tokenizer, self.image_token_id, token, self.processor)
            return inputs.to(self.device, dtype=self.dtype)
        clips = []
        for clip in images:
            if len(clip) != self.num_frames:
                raise ValueError(
                    f"video {clip.source or ''} has {len(clip)} frames; Video-LLaVA takes {self.num_frames}"
                )
            clips.append(self.video_pixels(clip.frames, clip.source))
        token = getattr(self.processor, "image_token", "<image>")
        n = prompt.count(token)
        ids = official_input_ids(prompt, self.tokenizer, [self.tokens_per_frame] * n, self.video_token_id, token)
        data = {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "pixel_values_videos": torch.stack(clips),
        }
        return BatchFeature(data).to(self.device, dtype=self.dtype)

    # ------------------------------------------------------------------ stage 1
    def encode_images(self, inputs: Mapping[str, Any]) -> list[torch.Tensor]:
        """Projector outputs per visual of the sample.

        Parameters
        ----------
        inputs : mapping
            :meth:`prepare_inputs` outputs: ``pixel_values`` ``(num_images, 3, 224, 224)`` or
            ``pixel_values_videos`` ``(num_videos, num_frames, 3, 224, 224)``.

        Returns
        -------
        list of torch.Tensor
            Per image ``(256, hidden_size)`` (``get_image_features``), or per video
            ``(num_frames·257, hidden_size)`` (``get_video_features``, frames concatenated, CLS kept).
        """
        if inputs.get("pixel_values_videos") is not None:
            pv = inputs["pixel_values_videos"]
            out = self.model.model.get_video_features(pixel_values_videos=pv, return_dict=True)
            feats = out.pooler_output  # (num_videos * num_frames, 257, D)
            return list(feats.reshape(pv.shape[0], -1, feats.shape[-1]))
        out = self.model.model.get_image_features(pixel_values=inputs["pixel_values"], return_dict=True)
        return list(out.pooler_output)

    def stage_one_placeholder_id(self, inputs: Mapping[str, Any]) -> int:
        """``<video>`` for a video sample (``pixel_values_videos`` present), else ``<image>``."""
        return self.video_token_id if inputs.get("pixel_values_videos") is not None else self.image_token_id

    def stage_one_inputs(
        self, inputs: Mapping[str, Any], selections: Sequence[VisualSelection], shrunk: ShrunkSequence
    ) -> dict[str, Any]:
        """Stage one's ``generate`` inputs for images or videos, with a tensor ``pooler_output``.

        As :meth:`ModelAdapter.stage_one_inputs`, except that ``VideoLlavaModel.forward`` calls
        ``pooler_output.to(...)`` (a tensor, not a list), so the kept tokens of all visuals are
        concatenated into one ``(1, sum_i k_i, hidden_size)`` tensor (3-D: ``get_placeholder_mask``
        flattens dims 0-1), under ``mm_encoder_outputs["video"]`` for videos and ``["image"]`` for images.

        Returns
        -------
        dict
            ``input_ids`` / ``attention_mask`` ``(1, new_seq_len)`` and ``mm_encoder_outputs``.
        """
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        is_video = inputs.get("pixel_values_videos") is not None
        drop = ("input_ids", "attention_mask", "pixel_values", "pixel_values_videos", "pixel_values_images")
        gen_inputs: dict[str, Any] = {k: v for k, v in inputs.items() if k not in drop}
        gen_inputs["input_ids"] = shrunk.input_ids
        gen_inputs["attention_mask"] = shrunk.attention_mask
        # (1, sum_i k_i, D): get_placeholder_mask flattens dims 0-1 and formats shape[1] in its check.
        kept = torch.cat([s.features for s in selections], dim=0).unsqueeze(0)
        gen_inputs["mm_encoder_outputs"] = {
            "video" if is_video else "image": BaseModelOutputWithPooling(pooler_output=kept)
        }
        return gen_inputs

    # ------------------------------------------------------------------ the generate loop's visuals
    def prepare_visuals(self, images: Any) -> tuple[list[Any], str]:
        """The sample's visuals (PIL images or :class:`VideoClip` objects) and their kind.

        Parameters
        ----------
        images : PIL image, video path, VideoClip, ``(T, H, W, 3)`` array, or a sequence of them
            lmms-eval video tasks pass ``[<path>]`` (``doc_to_visual``): a ``str`` / ``PathLike`` ending
            in a video extension (:data:`apet_bench.data.video.VIDEO_EXTENSIONS`) is decoded to
            :attr:`num_frames` uniformly sampled frames; another path is opened as an image.

        Returns
        -------
        visuals : list
        kind : {"image", "video"}
            ``visual_tokens_in`` is then 2056 per video, 256 per image.

        Raises
        ------
        ValueError
            Mixing images and videos in one sample; a video that cannot be decoded
            (:class:`~apet_bench.data.video.VideoDecodeError`, naming the path).
        TypeError
            For an unsupported visual.
        """
        from PIL import Image

        single = (str, os.PathLike, Image.Image, VideoClip, np.ndarray)
        items = [images] if isinstance(images, single) or images is None else list(images)
        visuals = [self._to_visual(v) for v in items if v is not None]
        kinds = {"video" if isinstance(v, VideoClip) else "image" for v in visuals}
        if len(kinds) > 1:
            raise ValueError("a Video-LLaVA sample holds either images or videos, not both")
        return visuals, (kinds.pop() if kinds else "image")


def _load_pretrained(spec: ModelSpec) -> tuple[nn.Module, Any, str]:
    """Load ``VideoLlavaForConditionalGeneration``; the processor is built from the config's ``processor:`` block.

    :func:`apet_bench.models.base.load_pretrained` (``hf_id@revision`` or ``local_path``,
    ``local_files_only`` when offline) with :func:`apet_bench.models.base.config_processor_loader`: the
    checkpoint's tokenizer, ``VideoLlavaImageProcessor`` and :func:`make_video_llava_processor` with the
    config's ``patch_size`` / ``vision_feature_select_strategy`` / ``num_additional_image_tokens`` (no
    video processor: none can be built without torchvision, and videos use the official transform).

    Raises
    ------
    ModelConfigError
        When the checkpoint cannot be found (one line) or the processor block disagrees with the model.
    """
    from transformers import VideoLlavaForConditionalGeneration

    return load_pretrained(spec, VideoLlavaForConditionalGeneration, config_processor_loader(spec))
