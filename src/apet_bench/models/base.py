"""Model adapters: one loaded HF vision-language model behind the interface the methods and the evaluator use.

An adapter knows one model family (where the visual tokens are, how positions work, where the decoder
layers are); it knows nothing about methods beyond :class:`~apet_bench.methods.TokenCompressor`'s
stage and its ``compress_visual`` / hooks (architecture.md, "Pieces"). :meth:`ModelAdapter.generate`
is shared by every family: processor -> [stage 1: projector-output surgery] -> LLM prefill
[stage-2 hooks] -> decode, with token accounting and wall times.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from apet_bench.methods.base import STAGE_ONE, STAGE_TWO, TokenCompressor, VisualSelection
from apet_bench.surgery import (
    ShrunkSequence,
    count_placeholders,
    select_visual_tokens,
    shrink_placeholder_runs,
)

if TYPE_CHECKING:  # pragma: no cover - typing only
    from PIL import Image

__all__ = [
    "ATTN_IMPLEMENTATIONS",
    "DEFAULT_MAX_NEW_TOKENS",
    "DTYPES",
    "GenerationOutput",
    "ModelAdapter",
    "ModelConfigError",
    "ModelSpec",
    "POSITION_ENCODINGS",
    "SEGMENT_KINDS",
    "VisualContext",
    "VisualSegment",
    "VisualSegments",
    "capture_module_input",
    "check_attn_implementation",
    "check_image_size",
    "config_processor_loader",
    "get_adapter_class",
    "hub_offline",
    "load_pretrained",
    "placeholder_prompt_body",
    "register_adapter",
    "resolve_device",
]

#: Accepted ``dtype`` values; ``auto`` keeps the checkpoint's dtype (float32 for tiny models).
DTYPES: dict[str, torch.dtype | None] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "auto": None,
}
#: Accepted ``attn_implementation`` values (transformers attention backends).
ATTN_IMPLEMENTATIONS: tuple[str, ...] = ("eager", "sdpa", "flash_attention_2")
#: ``max_new_tokens`` when the caller's ``generate_kwargs`` give none.
DEFAULT_MAX_NEW_TOKENS = 128


class ModelConfigError(ValueError):
    """A model config that cannot be loaded; the message is one line and names the bad value."""


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE`` is set to a true value (read at call time)."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in {"1", "true", "yes", "on"}:
            return True
    return False


@dataclass(frozen=True)
class ModelSpec:
    """A validated model config (``configs/model/*.yaml``).

    Attributes
    ----------
    name : str
        Config name recorded in results (``tiny_llava15``, ``llava15``).
    family : str
        Adapter family (``llava15``).
    tiny : bool
        Build a small random-weight model of the real class offline (``apet_bench.models.tiny``).
    hf_id, revision : str or None
        Hub checkpoint and pinned commit (``revision`` is used for hub ids only).
    local_path : str or None
        A local snapshot (``save_pretrained`` layout); wins over ``hf_id``.
    dtype : str
        One of :data:`DTYPES`.
    attn_implementation : str
        One of :data:`ATTN_IMPLEMENTATIONS`.
    device : str
        ``auto`` (cuda if available, else cpu), ``cpu``, ``cuda`` or ``cuda:N``.
    seed : int
        Seed of the random weights of tiny models.
    visual_tokens : int or None
        Visual tokens per image entering the LLM without compression (checked against the model).
    num_layers : int or None
        LLM decoder layers (checked against the model when given).
    tiny_config : dict
        Sizes of the tiny model (see ``apet_bench.models.tiny``).
    options : dict
        The config's other keys (family-specific, e.g. Qwen2.5-VL's ``min_pixels`` / ``max_pixels``);
        the adapter validates the ones it reads.
    """

    name: str
    family: str
    tiny: bool = False
    hf_id: str | None = None
    revision: str | None = None
    local_path: str | None = None
    dtype: str = "auto"
    attn_implementation: str = "sdpa"
    device: str = "auto"
    seed: int = 0
    visual_tokens: int | None = None
    num_layers: int | None = None
    tiny_config: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any]) -> ModelSpec:
        """Validate a plain mapping (or an OmegaConf ``DictConfig``) into a :class:`ModelSpec`.

        Keys that are not fields are ignored (configs may carry keys for other components).

        Raises
        ------
        ModelConfigError
            For a missing ``family``, an unknown ``dtype`` / ``attn_implementation`` / ``device``,
            ``flash_attention_2`` without ``flash_attn``, a ``local_path`` that does not exist, a real
            model with neither ``hf_id`` nor ``local_path``, or a bad ``seed`` / ``visual_tokens``.
        """
        if not isinstance(cfg, Mapping):
            raise ModelConfigError(f"model config must be a mapping, got {type(cfg).__name__}")
        family = cfg.get("family")
        if not family or not isinstance(family, str):
            raise ModelConfigError(f"model config needs a 'family' (e.g. llava15), got {family!r}")
        name = str(cfg.get("name") or family)
        tiny = bool(cfg.get("tiny", False))
        dtype = str(cfg.get("dtype") or "auto")
        if dtype not in DTYPES:
            raise ModelConfigError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
        attn = str(cfg.get("attn_implementation") or "sdpa")
        check_attn_implementation(attn)
        device = str(cfg.get("device") or "auto")
        resolve_device(device)  # validates
        local_path = cfg.get("local_path")
        if local_path is not None:
            local_path = str(local_path)
            if tiny:
                raise ModelConfigError(
                    f"local_path {local_path!r} is set with tiny: true; set tiny: false to load a saved model"
                )
            if not Path(local_path).expanduser().exists():
                raise ModelConfigError(f"local_path {local_path!r} does not exist")
            local_path = str(Path(local_path).expanduser().resolve())
        hf_id = cfg.get("hf_id")
        if not tiny and local_path is None and not hf_id:
            raise ModelConfigError(f"model {name!r} needs hf_id or local_path (or tiny: true)")
        seed = cfg.get("seed", 0)
        if seed is None:
            seed = 0
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ModelConfigError(f"seed {seed!r} is not an integer")
        visual_tokens = cfg.get("visual_tokens")
        num_layers = cfg.get("num_layers")
        for key, value in (("visual_tokens", visual_tokens), ("num_layers", num_layers)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ModelConfigError(f"{key} {value!r} is not a positive integer")
        tiny_config = cfg.get("tiny_config") or {}
        if not isinstance(tiny_config, Mapping):
            raise ModelConfigError(f"tiny_config must be a mapping, got {type(tiny_config).__name__}")
        revision = cfg.get("revision")
        return cls(
            name=name,
            family=family,
            tiny=tiny,
            hf_id=str(hf_id) if hf_id else None,
            revision=str(revision) if revision else None,
            local_path=local_path,
            dtype=dtype,
            attn_implementation=attn,
            device=device,
            seed=seed,
            visual_tokens=visual_tokens,
            num_layers=num_layers,
            tiny_config=dict(tiny_config),
            options={k: cfg[k] for k in cfg if k not in {f.name for f in fields(cls)}},
        )

    @property
    def torch_dtype(self) -> torch.dtype | None:
        """The ``torch.dtype`` of :attr:`dtype` (``None`` for ``auto``)."""
        return DTYPES[self.dtype]

    @property
    def torch_device(self) -> torch.device:
        """The resolved device (``auto`` -> cuda if available, else cpu)."""
        return resolve_device(self.device)


def check_image_size(image: Any, index: int, min_side: int) -> None:
    """Refuse an image with a side below ``min_side`` px (one vision patch), with a one-line message.

    Parameters
    ----------
    image : PIL.Image.Image or array
        A PIL image (``.size`` = (width, height)) or an ``(H, W, 3)`` array; anything else is left to
        the processor.
    index : int
        Index of the image in the sample (named in the message).
    min_side : int
        Smallest accepted side in pixels (the vision tower's ``patch_size``).

    Raises
    ------
    ValueError
        ``"image {index} is {w}x{h} px, smaller than one {p}x{p} px patch"``.
    """
    size = getattr(image, "size", None)
    if isinstance(size, tuple) and len(size) == 2:
        w, h = size
    elif getattr(image, "ndim", 0) == 3:
        h, w = int(image.shape[0]), int(image.shape[1])
    else:
        return
    if w < min_side or h < min_side:
        raise ValueError(f"image {index} is {w}x{h} px, smaller than one {min_side}x{min_side} px patch")


def placeholder_prompt_body(question: str, num_visuals: int, token: str, block: str, noun: str = "image") -> str:
    """The user turn's body: ``block`` once per visual before ``question``, or ``question`` as it is.

    A question that already holds ``token`` placeholders is used unchanged (as lmms-eval's HF models
    do), provided it holds exactly ``num_visuals`` of them.

    Parameters
    ----------
    question : str
    num_visuals : int
        Number of images (or videos) of the sample.
    token : str
        The placeholder counted in ``question``, e.g. ``"<image>"`` or ``"<|image_pad|>"``.
    block : str
        What one visual adds before the question, e.g. ``"<image>\n"``.
    noun : str
        The visual kind named in the error message.

    Returns
    -------
    str
        ``question`` or ``block * num_visuals + question``.

    Raises
    ------
    ValueError
        ``"question holds {n} {token} placeholder(s) for {num_visuals} {noun}(s)"`` when ``question``
        holds placeholders, but not ``num_visuals`` of them.
    """
    present = question.count(token)
    if present:
        if present != num_visuals:
            raise ValueError(f"question holds {present} {token} placeholder(s) for {num_visuals} {noun}(s)")
        return question
    return block * num_visuals + question


def check_attn_implementation(attn: str) -> str:
    """Validate an ``attn_implementation`` value.

    Raises
    ------
    ModelConfigError
        For an unknown value, or ``flash_attention_2`` when ``flash_attn`` cannot be imported.
    """
    if attn not in ATTN_IMPLEMENTATIONS:
        raise ModelConfigError(
            f"unknown attn_implementation {attn!r}; use one of {', '.join(ATTN_IMPLEMENTATIONS)}"
        )
    if attn == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ModelConfigError(
            "attn_implementation 'flash_attention_2' needs the flash_attn package: "
            "install the `flash` extra (pip install -e '.[flash]' --no-build-isolation) on a CUDA machine"
        )
    return attn


def resolve_device(device: str) -> torch.device:
    """``auto`` -> ``cuda`` if available else ``cpu``; otherwise ``torch.device(device)``.

    In a data-parallel run (``LOCAL_RANK`` set by ``torchrun`` / ``accelerate launch``) on a machine with
    several GPUs, ``auto`` is the process's own GPU, ``cuda:<LOCAL_RANK>`` (as lmms-eval's HF models bind
    ``cuda:{accelerator.local_process_index}``); ``LOCAL_RANK`` beyond the GPU count falls back to
    ``cuda`` (the current device, e.g. one GPU per process under ``CUDA_VISIBLE_DEVICES``).

    Raises
    ------
    ModelConfigError
        For a string torch cannot parse, a device type other than cpu/cuda, or cuda without a GPU.
    """
    if device == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        local_rank = os.environ.get("LOCAL_RANK", "")
        if local_rank.isdigit() and int(local_rank) < torch.cuda.device_count() and torch.cuda.device_count() > 1:
            return torch.device(f"cuda:{int(local_rank)}")
        return torch.device("cuda")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ModelConfigError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise ModelConfigError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelConfigError(f"device {device!r} requested but CUDA is not available")
    return dev


def within_budget(method: Any, visual_tokens: int) -> bool:
    """Whether a visual input of ``visual_tokens`` visual tokens (its span before compression: an image's,
    or a video's) fits ``method``'s absolute budget, so there is nothing to compress.

    True for a compressing method (stage other than ``none``) with an int budget >= ``visual_tokens`` > 0.
    A ratio budget always compresses. This arises with variable spans (LLaVA-NeXT's anyres span depends
    on the image's size and aspect ratio; an image on Video-LLaVA, whose largest span is a video's); the
    up-front check rejects only budgets above the model's largest span.
    """
    budget = getattr(method, "budget", None)
    if getattr(method, "stage", "none") == "none" or isinstance(budget, bool) or not isinstance(budget, int):
        return False
    return 0 < int(visual_tokens) <= budget


@dataclass
class GenerationOutput:
    """One sample's answer with its token accounting and wall times.

    Attributes
    ----------
    text : str
        Decoded new tokens only, special tokens skipped.
    output_ids : list of int
        The new token ids (prompt excluded).
    prompt_tokens : int
        Tokens entering the LLM at prefill (text + visual tokens, after stage 1).
    visual_tokens_in : int
        Visual tokens produced by the vision encoder + projector, summed over the sample's images,
        before compression.
    visual_tokens_llm : int
        Visual tokens entering the LLM, counted from the placeholder ids of the final ``input_ids``.
    layer_visual_tokens : list of int
        ``(num_layers,)``: visual tokens at the input of each decoder layer during prefill, measured
        with pre-hooks as ``visual_tokens_llm - (prompt_tokens - layer_seq_len)`` (stage-2 methods drop
        only visual tokens). For stage-1-only methods every entry equals ``visual_tokens_llm``.
    kept_indices : list of list of int or None
        Per image, indices into its original visual tokens of the kept tokens, when the method
        reports them.
    prefill_ms : float
        Wall time (ms) from the processed inputs on the device to the end of the prefill forward:
        vision encoder, projector, stage-1 compression and LLM prefill.
    total_ms : float
        Wall time (ms) from the same start to the end of decoding.
    preprocess_ms : float
        Wall time (ms) of prompt building, the processor and the host-to-device copy.
    kv_cache_tokens : list of int or None
        ``(num_layers,)``: tokens held in each layer's KV cache at the end of generation (they differ
        per layer under stage 2: ``[591, 591, 159, 159]``).
    planned_layer_visual_tokens : list of int or None
        ``(num_layers,)``: the method's plan (:meth:`~apet_bench.methods.TokenCompressor.plan`) for the
        visual tokens entering the LLM; equals ``layer_visual_tokens`` when the method keeps its plan.
    num_images : int
        Images in the sample.
    attention_backends : dict or None
        Which attention backend every decoder layer and vision-tower attention module used, and the
        attention the method computed itself (:func:`apet_bench.attention.attention_backends`).
    uncompressed : bool
        True when the sample's visual span was at or below the method's absolute (int) budget, so it
        kept all its visual tokens and the method was not applied (:func:`within_budget`).
    logits : tuple of torch.Tensor or None
        Per generated token, ``(batch_size, vocab_size)`` logits, when ``output_logits=True`` was in
        ``generate_kwargs``; left out of :meth:`to_dict`.
    """

    text: str
    output_ids: list[int]
    prompt_tokens: int
    visual_tokens_in: int
    visual_tokens_llm: int
    layer_visual_tokens: list[int]
    kept_indices: list[list[int]] | None
    prefill_ms: float
    total_ms: float
    preprocess_ms: float = 0.0
    kv_cache_tokens: list[int] | None = None
    planned_layer_visual_tokens: list[int] | None = None
    num_images: int = 1
    attention_backends: dict[str, Any] | None = None
    logits: tuple[torch.Tensor, ...] | None = field(default=None, repr=False)
    uncompressed: bool = False

    @property
    def mean_layer_visual_tokens(self) -> float:
        """Average visual tokens per decoder layer during prefill (the paper's budget convention)."""
        if not self.layer_visual_tokens:
            return float(self.visual_tokens_llm)
        return sum(self.layer_visual_tokens) / len(self.layer_visual_tokens)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable fields (``logits`` dropped, ``mean_layer_visual_tokens`` added)."""
        out = asdict(self)
        out.pop("logits", None)
        out["mean_layer_visual_tokens"] = self.mean_layer_visual_tokens
        return out


# ---------------------------------------------------------------------- visual-token structure
#: Values of :attr:`ModelAdapter.position_encoding`.
POSITION_ENCODINGS: tuple[str, ...] = ("rope-1d", "mrope-3d")
#: Values of :attr:`VisualSegment.kind`.
SEGMENT_KINDS: tuple[str, ...] = ("image", "base", "sub_image", "frame")


@dataclass(frozen=True, eq=False)
class VisualSegment:
    """One unit a method budgets separately: a whole image, a NeXT sub-image, or a video frame.

    Positions index the visual's tokens in stage-1 order (the rows of
    ``ModelAdapter.encode_images(inputs)[i]``, i.e. the order of its placeholder run), not columns of
    ``input_ids``: use :meth:`VisualSegments.sequence_positions` for those.

    Attributes
    ----------
    name : str
        ``"image"`` (LLaVA-1.5, Qwen2.5-VL, Video-LLaVA images), ``"base"`` / ``"sub_image {i}"``
        (LLaVA-NeXT anyres, ``i`` = 1 .. rows·cols in raster order of the crop grid) or ``"frame {f}"``
        (Video-LLaVA, ``f`` = 0 .. num_frames-1).
    kind : str
        One of :data:`SEGMENT_KINDS`: ``"image"``, ``"base"``, ``"sub_image"``, ``"frame"``.
    index : int
        0 for ``image`` / ``base``, ``i`` for ``sub_image``, ``f`` for ``frame``.
    positions : torch.Tensor
        ``(n,)`` long, CPU, increasing: the segment's tokens among the visual's tokens.
    grid : tuple of int or None
        ``(t, h, w)``: the segment's patch tokens (CLS excluded) form a full ``t x h x w`` grid in
        raster order (LLaVA-1.5 ``(1, 24, 24)``; NeXT base view ``(1, 24, 24)``; Video-LLaVA frame
        ``(1, 16, 16)``; Qwen2.5-VL ``(grid_t, grid_h / 2, grid_w / 2)`` after the 2×2 merge).
        ``None`` when they do not (NeXT grid crops after ``unpad_image``).
    patches : torch.Tensor or None
        ``(n,)`` long, CPU: for each position, its patch index in raster order within the source
        crop's / frame's ``n_side x n_side`` patch grid, ``-1`` for a CLS token. ``None`` for Qwen2.5-VL
        (one token covers 4 patches: see :meth:`ModelAdapter.feature_token_map`).
    cls_position : int or None
        Position of the segment's CLS token (Video-LLaVA frames: ``f · 257``), else ``None``.
    """

    name: str
    kind: str
    index: int
    positions: torch.Tensor
    grid: tuple[int, int, int] | None = None
    patches: torch.Tensor | None = None
    cls_position: int | None = None

    @property
    def num_tokens(self) -> int:
        """Tokens in the segment (``positions.numel()``)."""
        return int(self.positions.numel())

    @property
    def patch_positions(self) -> torch.Tensor:
        """``(n - has_cls,)`` long: :attr:`positions` without the CLS token."""
        if self.cls_position is None:
            return self.positions
        return self.positions[self.positions != self.cls_position]


@dataclass(frozen=True, eq=False)
class VisualSegments:
    """Structure of one image's (or video's) visual tokens: its segments and where its run starts.

    Returned per visual by :meth:`ModelAdapter.visual_segments`. The segments' positions plus
    :attr:`newline_positions` partition ``range(num_tokens)`` (tested for every adapter).

    Attributes
    ----------
    kind : str
        ``"image"`` or ``"video"``.
    index : int
        Index of the visual in the sample (the ``image_index`` ``compress_visual`` receives).
    num_tokens : int
        Visual tokens of the visual entering the LLM uncompressed (rows of ``encode_images(inputs)[index]``).
    segments : tuple of VisualSegment
        LLaVA-1.5 / Qwen2.5-VL / Video-LLaVA image: one ``"image"`` segment. LLaVA-NeXT: ``"base"`` then
        ``"sub_image 1"`` .. ``"sub_image {rows·cols}"`` (a crop fully removed by unpadding has 0
        tokens). Video-LLaVA video: ``"frame 0"`` .. ``"frame 7"`` of 257 tokens, CLS first.
    newline_positions : torch.Tensor
        ``(num_newlines,)`` long, CPU: LLaVA-NeXT ``image_newline`` tokens (one per feature-grid row,
        in no segment; ApET / VisionZip keep them, methods.md §1.3); empty for other families.
    start : int
        Column of the visual's first placeholder in ``input_ids[0]`` of the processed inputs (before
        stage 1); ``-1`` when the inputs had no ``input_ids``.
    """

    kind: str
    index: int
    num_tokens: int
    segments: tuple[VisualSegment, ...]
    newline_positions: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    start: int = -1

    def __len__(self) -> int:
        return len(self.segments)

    def __iter__(self):
        return iter(self.segments)

    def __getitem__(self, i: int) -> VisualSegment:
        return self.segments[i]

    def sequence_positions(self, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Columns of ``input_ids[0]`` (processed inputs, before stage 1) of visual-token ``positions``.

        Parameters
        ----------
        positions : torch.Tensor, optional
            ``(n,)`` long indices into this visual's tokens (e.g. ``segment.positions``); default all
            ``num_tokens``.

        Returns
        -------
        torch.Tensor
            ``(n,)`` long, ``start + positions``. For stage 2 (after a stage-1 shrink, or with padding)
            use ``ModelAdapter.visual_positions`` on the sequence the LLM really receives.

        Raises
        ------
        ValueError
            If :attr:`start` is unknown (``-1``).
        """
        if self.start < 0:
            raise ValueError(f"visual {self.index}: start column unknown (inputs had no input_ids)")
        if positions is None:
            positions = torch.arange(self.num_tokens)
        return positions.to(torch.long) + self.start


class VisualContext:
    """What the adapter knows about the sample being generated, for methods (one per ``generate`` call).

    Set as ``adapter.visual_context`` by :meth:`ModelAdapter.generate` right after the processor;
    methods read it as ``self.visual_context`` (:attr:`~apet_bench.methods.TokenCompressor.visual_context`)
    in ``compress_visual`` or their stage-2 hooks. Everything is computed lazily and at most once.

    Attributes
    ----------
    adapter : ModelAdapter
    inputs : mapping
        The processed inputs (:meth:`ModelAdapter.prepare_inputs`), before stage 1.
    visual_tokens : list of torch.Tensor or None
        Stage 1 only: the projector outputs the method is compressing (``encode_images``), set before
        the first ``compress_visual`` call.
    """

    def __init__(self, adapter: ModelAdapter, inputs: Mapping[str, Any]) -> None:
        self.adapter = adapter
        self.inputs = inputs
        self.visual_tokens: list[torch.Tensor] | None = None
        self._segments: list[VisualSegments] | None = None
        self._vision_features: list[torch.Tensor] | None = None
        self._feature_token_map: list[torch.Tensor] | None = None

    @property
    def segments(self) -> list[VisualSegments]:
        """``adapter.visual_segments(inputs)`` (cached)."""
        if self._segments is None:
            self._segments = self.adapter.visual_segments(self.inputs)
        return self._segments

    @property
    def vision_features(self) -> list[torch.Tensor]:
        """``adapter.vision_features(inputs)`` (cached). Already computed in the same vision-tower pass
        as the visual tokens when the method sets ``needs_vision_features``; otherwise the first access
        runs the vision tower a second time."""
        if self._vision_features is None:
            self._vision_features = self.adapter.vision_features(self.inputs)
        return self._vision_features

    @property
    def feature_token_map(self) -> list[torch.Tensor]:
        """``adapter.feature_token_map(inputs)`` (cached)."""
        if self._feature_token_map is None:
            self._feature_token_map = self.adapter.feature_token_map(self.inputs)
        return self._feature_token_map


@contextlib.contextmanager
def capture_module_input(module: nn.Module):
    """Context manager recording the first positional input of every forward of ``module``.

    Used to read pre-projector features (the input of ``multi_modal_projector`` / Qwen's ``merger``)
    in the same pass that computes the visual tokens; nothing about the forward changes.

    Yields
    ------
    list of torch.Tensor
        Appended to on each forward call.
    """
    captured: list[torch.Tensor] = []

    def hook(mod, args, kwargs):
        captured.append(args[0] if args else next(iter(kwargs.values())))

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield captured
    finally:
        handle.remove()


class _PrefillProbe:
    """Hooks that time the prefill forward and record each decoder layer's prefill sequence length.

    A forward hook on the top-level model stamps the end of its first call (the prefill; generate
    calls ``self(...)``, transformers ``generation/utils.py::_prefill``); forward pre-hooks on every
    decoder layer record ``hidden_states.shape[1]`` at their first call. Registered after the method's
    own hooks, so they see the sequence after any stage-2 drop.
    """

    def __init__(self, model: nn.Module, layers: Sequence[nn.Module], clock: Callable[[], float]):
        self._model = model
        self._layers = list(layers)
        self._clock = clock
        self.prefill_end: float | None = None
        self.layer_lengths: list[int | None] = [None] * len(self._layers)
        self._handles: list[Any] = []

    def __enter__(self) -> _PrefillProbe:
        def on_model(module, args, output):
            if self.prefill_end is None:
                self.prefill_end = self._clock()

        self._handles.append(self._model.register_forward_hook(on_model))
        for i, layer in enumerate(self._layers):
            self._handles.append(layer.register_forward_pre_hook(self._layer_hook(i), with_kwargs=True))
        return self

    def _layer_hook(self, i: int):
        def hook(module, args, kwargs):
            if self.layer_lengths[i] is None:
                hidden = args[0] if args else kwargs.get("hidden_states")
                if hidden is not None:
                    self.layer_lengths[i] = int(hidden.shape[1])

        return hook

    def __exit__(self, *exc: object) -> None:
        while self._handles:
            self._handles.pop().remove()


class ModelAdapter:
    """Base class of the model adapters (one per model family).

    Subclasses implement :meth:`from_spec`, :meth:`build_prompt`, :meth:`encode_images`,
    :attr:`decoder_layers`, :attr:`num_visual_tokens` and :attr:`visual_token_id`; :meth:`generate`,
    the token accounting and the stage-1 surgery are shared.

    What methods read (one interface for all four families; issue #3 deliverable 1):

    * :attr:`position_encoding`: ``"rope-1d"`` (LLaVA family) or ``"mrope-3d"`` (Qwen2.5-VL);
    * :meth:`visual_segments`: per visual, its tokens grouped per image / NeXT sub-image (+ newline
      positions) / video frame (CLS included), as indices into the stage-1 token order, with the
      run's ``start`` column;
    * :attr:`decoder_layers` / :attr:`num_layers` and :meth:`visual_positions` (stage 2);
    * :attr:`vision_tower`, :meth:`vision_features` (pre-projector), :meth:`feature_token_map` and
      :meth:`project_visual` (LLaVA-NeXT adds ``pack_visual``);
    * :attr:`visual_context` (a :class:`VisualContext`, also ``method.visual_context``): all of the
      above for the sample being generated, computed lazily once; a stage-1 method that sets
      ``needs_vision_features`` gets its vision features from the same tower pass as its tokens.

    Attributes
    ----------
    name, family : str
        Config name and family.
    model : transformers.PreTrainedModel
        The HF model, in eval mode.
    processor : transformers.ProcessorMixin
        Its processor (tokenizer + image processor).
    device : torch.device
        Where the model's parameters are.
    weights : str
        Provenance of the weights (``hf_id@revision``, ``local:/path``, or a random-init notice).
    is_random_weights : bool
        True for tiny random-init models: their outputs check the pipeline, never accuracy.
    spec : ModelSpec
        The validated config it was loaded from.
    """

    family: ClassVar[str] = ""
    #: How the LLM encodes positions: ``"rope-1d"`` (LLaVA-1.5 / NeXT / Video-LLaVA: Llama RoPE on
    #: 1-D ``position_ids``, the cumsum of the attention mask; a stage-1 shrink simply renumbers the
    #: kept tokens contiguously) or ``"mrope-3d"`` (Qwen2.5-VL: 3-D (t, h, w) mRoPE from
    #: ``get_rope_index``; the adapter keeps each kept visual token's original (t, h, w) position,
    #: methods.md §0.4, transformers-hooks.md §3.2 step 4). One of :data:`POSITION_ENCODINGS`.
    position_encoding: ClassVar[str] = "rope-1d"
    #: The :class:`VisualContext` of the sample being generated (set by :meth:`generate` after the
    #: processor; ``None`` before the first call).
    visual_context: VisualContext | None = None

    def __init__(
        self,
        *,
        spec: ModelSpec,
        model: nn.Module,
        processor: Any,
        weights: str,
        is_random_weights: bool,
    ) -> None:
        self.spec = spec
        self.name = spec.name
        self.model = model.eval()
        self.processor = processor
        self.weights = weights
        self.is_random_weights = is_random_weights
        self.device = next(model.parameters()).device
        if spec.visual_tokens is not None and spec.visual_tokens != self.num_visual_tokens:
            raise ModelConfigError(
                f"visual_tokens {spec.visual_tokens} does not match the model's {self.num_visual_tokens} visual tokens per image"
            )
        if spec.num_layers is not None and spec.num_layers != self.num_layers:
            raise ModelConfigError(
                f"num_layers {spec.num_layers} does not match the model's {self.num_layers} decoder layers"
            )

    # ------------------------------------------------------------------ to implement per family
    @classmethod
    def from_spec(cls, spec: ModelSpec) -> ModelAdapter:  # pragma: no cover - abstract
        """Load (or build, for ``tiny``) the model and processor described by ``spec``."""
        raise NotImplementedError

    @classmethod
    def _from_tiny(cls, spec: ModelSpec, model: nn.Module, processor: Any) -> ModelAdapter:
        """The adapter of a tiny random-weight ``model`` (the ``spec.tiny`` branch of :meth:`from_spec`).

        Moves ``model`` to ``spec.torch_device`` in ``spec.torch_dtype`` (fp32 when unset) and labels
        its weights ``"random-init tiny <ModelClass> (seed <seed>): a random-weight pipeline check, not
        an accuracy number"``, with ``is_random_weights=True``.

        Raises
        ------
        ModelConfigError
            When ``visual_tokens`` / ``num_layers`` of ``spec`` do not match the model.
        """
        dtype = spec.torch_dtype if spec.torch_dtype is not None else torch.float32
        model.to(device=spec.torch_device, dtype=dtype)
        weights = (
            f"random-init tiny {type(model).__name__} (seed {spec.seed}): "
            "a random-weight pipeline check, not an accuracy number"
        )
        return cls(spec=spec, model=model, processor=processor, weights=weights, is_random_weights=True)

    def build_prompt(self, question: str, num_images: int = 1) -> str:  # pragma: no cover - abstract
        """The model's prompt for ``question`` with ``num_images`` image placeholders."""
        raise NotImplementedError

    def encode_images(self, inputs: Mapping[str, Any]) -> list[torch.Tensor]:  # pragma: no cover - abstract
        """Visual tokens of each image after the vision encoder and projector.

        Returns
        -------
        list of torch.Tensor
            One ``(num_visual_tokens_i, hidden_size)`` tensor per image.
        """
        raise NotImplementedError

    @property
    def decoder_layers(self) -> nn.ModuleList:
        """The LLM's decoder layers (where stage-2 hooks go).

        Default: ``model.model.language_model.layers``, where every HF ``*ForConditionalGeneration``
        here keeps them (Llama decoder layers for the LLaVA families, Qwen2 ones for Qwen2.5-VL);
        override for another layout.
        """
        return self.model.model.language_model.layers

    @property
    def num_visual_tokens(self) -> int:  # pragma: no cover - abstract
        """Visual tokens per image entering the LLM without compression (576 for LLaVA-1.5)."""
        raise NotImplementedError

    @property
    def visual_token_id(self) -> int:  # pragma: no cover - abstract
        """Id of the visual placeholder token in ``input_ids``."""
        raise NotImplementedError

    def visual_positions(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """Positions of the visual tokens in each row of ``input_ids`` (where stage 2 may drop tokens).

        Families with several placeholder ids (Video-LLaVA's ``<image>`` and ``<video>``) or visual
        tokens that are not placeholders (e.g. ones the model inserts itself) override this; LLaVA-NeXT's
        ``image_newline`` tokens sit inside the ``<image>`` run, so the default covers them. The result
        must list, per row, every column stage 2 may drop, increasing, padding excluded.

        Parameters
        ----------
        input_ids : torch.Tensor
            ``(batch_size, seq_len)`` as the LLM receives them (after stage 1, if any).
        attention_mask : torch.Tensor, optional
            ``(batch_size, seq_len)``, 0 on padding.

        Returns
        -------
        list of torch.Tensor
            Per row, ``(num_visual_b,)`` long column indices on ``input_ids.device``. Default: the
            columns equal to :attr:`visual_token_id`.
        """
        hits = input_ids == self.visual_token_id
        if attention_mask is not None:
            hits = hits & attention_mask.bool()
        return [row.nonzero().flatten() for row in hits]

    # ------------------------------------------------------------------ visual-token structure for methods
    def visual_segments(self, inputs: Mapping[str, Any]) -> list[VisualSegments]:  # pragma: no cover - abstract
        """Per image (or video) of processed ``inputs``, where its visual tokens are and how they group.

        The interface ApET (methods.md §1.3-§1.6), VisionZip (§2.2-§2.5) and ToMe (§6.2) use to budget
        per image, per NeXT sub-image or per video frame. Positions index the visual's tokens in
        stage-1 order (rows of :meth:`encode_images`); :meth:`VisualSegments.sequence_positions`
        converts them to ``input_ids`` columns.

        Parameters
        ----------
        inputs : mapping
            :meth:`prepare_inputs` outputs (``input_ids`` optional; gives ``start``).

        Returns
        -------
        list of VisualSegments
            One per visual, in placeholder-run order; ``num_tokens`` equals the rows of
            ``encode_images(inputs)[i]``, and the segments plus ``newline_positions`` partition them.
        """
        raise NotImplementedError

    @property
    def vision_tower(self) -> nn.Module:  # pragma: no cover - abstract
        """The vision encoder whose hidden states :meth:`vision_features` returns (CLIP / ViT module)."""
        raise NotImplementedError

    def _vision_feature_module(self) -> nn.Module:  # pragma: no cover - abstract
        """The module whose input are the pre-projector features (projector / merger)."""
        raise NotImplementedError

    def _split_vision_features(
        self, captured: list[torch.Tensor], inputs: Mapping[str, Any]
    ) -> list[torch.Tensor]:  # pragma: no cover - abstract
        """Per-visual pre-projector features from the captured projector input(s)."""
        raise NotImplementedError

    def encode_with_vision_features(
        self, inputs: Mapping[str, Any]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """:meth:`encode_images` and :meth:`vision_features` from one vision-tower pass.

        The projector's (Qwen: the merger's) input is recorded with a forward pre-hook
        (:func:`capture_module_input`) while :meth:`encode_images` runs, so the visual tokens are
        bit-identical to :meth:`encode_images`'s and the tower runs once.

        Returns
        -------
        visual_tokens : list of torch.Tensor
            As :meth:`encode_images`.
        vision_features : list of torch.Tensor
            As :meth:`vision_features`.

        Raises
        ------
        RuntimeError
            If the projector did not run (no visuals in ``inputs``).
        """
        with capture_module_input(self._vision_feature_module()) as captured:
            tokens = self.encode_images(inputs)
        if not captured:
            raise RuntimeError(f"{self.family}: the projector did not run; inputs hold no visuals")
        return tokens, self._split_vision_features(captured, inputs)

    def vision_features(self, inputs: Mapping[str, Any]) -> list[torch.Tensor]:
        """The vision tower's features per visual, **before** the projector (what ApET / VisionZip /
        ToMe compress on the vision side, methods.md §1.3, §2.1, §6.2).

        Exactly the projector's input in the HF forward (``vision_feature_layer`` /
        ``vision_feature_select_strategy`` of the config), split per visual:

        * LLaVA-1.5: CLIP ``hidden_states[-2]`` without CLS, ``(576, D_v)`` (D_v = 1024 for 7B);
        * LLaVA-NeXT: per crop, ``(num_crops, 576, D_v)`` (base view first, then the grid crops);
        * Video-LLaVA: image ``(256, D_v)`` without CLS; video ``(num_frames, 257, D_v)`` CLS first;
        * Qwen2.5-VL: ViT output before the merger, ``(grid_t·grid_h·grid_w, D_v)`` (D_v = 1280), in
          merge-unit order: rows ``4j .. 4j+3`` are the 2×2 patches of visual token ``j``.

        :meth:`feature_token_map` maps rows to visual tokens; :meth:`project_visual` maps them to the
        LLM width.

        Returns
        -------
        list of torch.Tensor
            One per visual, model dtype and device.
        """
        return self.encode_with_vision_features(inputs)[1]

    def feature_token_map(self, inputs: Mapping[str, Any]) -> list[torch.Tensor]:  # pragma: no cover - abstract
        """Per visual, which visual token each row of :meth:`vision_features` becomes.

        Returns
        -------
        list of torch.Tensor
            Long, CPU, shaped ``vision_features(inputs)[i].shape[:-1]``: index into the visual's
            tokens (stage-1 order), or ``-1`` for a feature with no token (NeXT patches removed by
            ``unpad_image``). Qwen2.5-VL: ``row // 4`` (four patches per token).
        """
        raise NotImplementedError

    def project_visual(self, features: torch.Tensor) -> torch.Tensor:
        """Map pre-projector features (as :meth:`vision_features` returns, possibly modified or
        subset) to LLM-width visual tokens: ``multi_modal_projector`` on the last dimension.

        LLaVA-1.5: ``(576, D_v) -> (576, D)``, equal to :meth:`encode_images`'s rows; NeXT:
        ``(num_crops, 576, D_v) -> (num_crops, 576, D)`` per crop before packing (see
        ``LlavaNextAdapter.pack_visual``); Video-LLaVA: ``(8, 257, D_v) -> (8, 257, D)`` (flatten the
        frames for :meth:`encode_images`'s order). Qwen2.5-VL overrides (the 2×2 merger).

        Parameters
        ----------
        features : torch.Tensor
            ``(..., D_v)`` in the model's dtype and device.

        Returns
        -------
        torch.Tensor
            ``(..., hidden_size)``.
        """
        return self._vision_feature_module()(features)

    def _visual_context_for(self, inputs: Mapping[str, Any]) -> VisualContext:
        ctx = self.visual_context
        if ctx is None or ctx.inputs is not inputs:
            ctx = VisualContext(self, inputs)
            self.visual_context = ctx
        return ctx

    def stage_one_features(self, inputs: Mapping[str, Any], method: TokenCompressor) -> list[torch.Tensor]:
        """The visual tokens a stage-1 method compresses, recorded on :attr:`visual_context`.

        :meth:`encode_images`, or, when ``method.needs_vision_features``, :meth:`encode_with_vision_features`
        (same tokens, one tower pass) with the vision features stored on the context so
        ``method.visual_context.vision_features`` costs nothing. Called by every
        ``apply_visual_stage``.

        Returns
        -------
        list of torch.Tensor
            One ``(num_visual_tokens_i, hidden_size)`` tensor per visual.
        """
        ctx = self._visual_context_for(inputs)
        if getattr(method, "needs_vision_features", False):
            tokens, ctx._vision_features = self.encode_with_vision_features(inputs)
        else:
            tokens = self.encode_images(inputs)
        ctx.visual_tokens = tokens
        return tokens

    def _placeholder_starts(self, inputs: Mapping[str, Any], counts: Sequence[int]) -> list[int]:
        """Column of each visual's first placeholder in ``input_ids[0]`` (visual ``i`` owns the next
        ``counts[i]`` visual positions); ``-1`` without ``input_ids``."""
        ids = inputs.get("input_ids") if hasattr(inputs, "get") else None
        if ids is None:
            return [-1] * len(counts)
        row = ids[:1] if ids.dim() == 2 else ids.view(1, -1)
        vis = self.visual_positions(row)[0].to("cpu")
        starts, consumed = [], 0
        for n in counts:
            starts.append(int(vis[consumed]) if consumed < vis.numel() else -1)
            consumed += int(n)
        return starts

    # ------------------------------------------------------------------ shared properties
    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the model's parameters."""
        return next(self.model.parameters()).dtype

    @property
    def attn_implementation(self) -> str:
        """Attention backend really in use (read back from ``model.config._attn_implementation``)."""
        return str(self.model.config._attn_implementation)

    @property
    def num_layers(self) -> int:
        """Number of LLM decoder layers."""
        return len(self.decoder_layers)

    @property
    def tokenizer(self) -> Any:
        """The processor's tokenizer."""
        return self.processor.tokenizer

    @property
    def pad_token_id(self) -> int:
        """Padding id (tokenizer pad, else eos)."""
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        return int(pad)

    def describe(self) -> dict[str, Any]:
        """Provenance of the loaded model, for results files."""
        return {
            "name": self.name,
            "family": self.family,
            "weights": self.weights,
            "is_random_weights": self.is_random_weights,
            "dtype": str(self.dtype).replace("torch.", ""),
            "attn_implementation": self.attn_implementation,
            "device": str(self.device),
            "num_visual_tokens": self.num_visual_tokens,
            "num_layers": self.num_layers,
        }

    # ------------------------------------------------------------------ pipeline pieces
    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _clock(self) -> float:
        self._sync()
        return time.perf_counter()

    def prepare_inputs(self, images: Sequence[Image.Image], prompt: str) -> Any:
        """Run the processor and move its outputs to the model (floating tensors cast to its dtype).

        Returns
        -------
        transformers.BatchFeature
            ``input_ids`` ``(1, seq_len)``, ``attention_mask`` ``(1, seq_len)``, ``pixel_values``
            ``(num_images, 3, H, W)`` (family-specific extras possible).
        """
        if images:
            inputs = self.processor(images=list(images), text=prompt, return_tensors="pt")
        else:
            inputs = self.processor(text=prompt, return_tensors="pt")
        return inputs.to(self.device, dtype=self.dtype)

    def _select_and_shrink(
        self, inputs: Mapping[str, Any], method: TokenCompressor, placeholder_id: int | None = None
    ) -> tuple[list[VisualSelection], ShrunkSequence]:
        """The shared core of every :meth:`apply_visual_stage`: choose the kept tokens, shrink the runs.

        Features from :meth:`stage_one_features` (recorded on :attr:`visual_context`), the method's
        choice per visual (:func:`apet_bench.surgery.select_visual_tokens`), then each visual's
        placeholder run in ``input_ids`` shrunk to its kept count
        (:func:`apet_bench.surgery.shrink_placeholder_runs`, padding with :attr:`pad_token_id`).

        Parameters
        ----------
        inputs : mapping
            Processor outputs (``input_ids`` ``(1, seq_len)``, optional ``attention_mask``).
        method : TokenCompressor
        placeholder_id : int, optional
            The placeholder whose runs are shrunk; default :attr:`visual_token_id`.

        Returns
        -------
        selections : list of VisualSelection
            One per visual.
        shrunk : apet_bench.surgery.ShrunkSequence
        """
        features = self.stage_one_features(inputs, method)
        selections = select_visual_tokens(method, features)
        shrunk = shrink_placeholder_runs(
            inputs["input_ids"],
            inputs.get("attention_mask"),
            self.visual_token_id if placeholder_id is None else placeholder_id,
            [int(f.shape[0]) for f in features],
            selections,
            self.pad_token_id,
        )
        return selections, shrunk

    def apply_visual_stage(
        self, inputs: Mapping[str, Any], method: TokenCompressor
    ) -> tuple[dict[str, Any], list[VisualSelection]]:
        """Stage 1: compress the projector outputs and build the matching ``generate`` inputs.

        transformers-hooks.md §3.2: features from :meth:`encode_images` (via :meth:`stage_one_features`,
        which also records them on :attr:`visual_context`), the method's choice per image
        (:func:`apet_bench.surgery.select_visual_tokens`), placeholder runs shrunk
        (:func:`apet_bench.surgery.shrink_placeholder_runs`), and ``mm_encoder_outputs`` in place of
        ``pixel_values``. Families with position ids tied to the layout (Qwen2.5-VL) override this.

        Returns
        -------
        gen_inputs : dict
            ``input_ids`` / ``attention_mask`` ``(1, new_seq_len)`` and
            ``mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=[(k_i, D), ...])}``.
        selections : list of VisualSelection
            One per image.
        """
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        selections, shrunk = self._select_and_shrink(inputs, method)
        gen_inputs: dict[str, Any] = {
            k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "pixel_values", "image_sizes")
        }
        gen_inputs["input_ids"] = shrunk.input_ids
        gen_inputs["attention_mask"] = shrunk.attention_mask
        gen_inputs["mm_encoder_outputs"] = {
            "image": BaseModelOutputWithPooling(pooler_output=[s.features for s in selections])
        }
        return gen_inputs, selections

    def _generate_kwargs(self, generate_kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"max_new_tokens": DEFAULT_MAX_NEW_TOKENS, "do_sample": False, "num_beams": 1}
        kwargs.update(dict(generate_kwargs or {}))
        kwargs["return_dict_in_generate"] = True
        if getattr(self.model.generation_config, "pad_token_id", None) is None and "pad_token_id" not in kwargs:
            kwargs["pad_token_id"] = self.pad_token_id
        return kwargs

    # ------------------------------------------------------------------ generate
    def generate(
        self,
        images: Sequence[Image.Image],
        question: str,
        generate_kwargs: Mapping[str, Any] | None = None,
        method: TokenCompressor | None = None,
    ) -> GenerationOutput:
        """Answer ``question`` about ``images`` (batch size 1) under compression ``method``.

        Path: prompt (:meth:`build_prompt`) -> processor -> if ``method.stage`` is ``"none"`` or ``"llm"``,
        plain ``model.generate(**inputs)`` (the ``none`` output is exactly the HF model's); if it is
        ``"vision"`` or ``"both"``, :meth:`apply_visual_stage` then ``model.generate`` on the shrunk
        inputs with ``mm_encoder_outputs`` (transformers-hooks.md §3.2). For ``"llm"`` / ``"both"``
        methods with :meth:`~apet_bench.methods.TokenCompressor.llm_layers`, the stage-2 surgery
        (:class:`apet_bench.llm_surgery.LLMStageSurgery`) is active during ``generate``. Everything runs
        inside ``with method(self):`` (its hooks) and ``torch.inference_mode()``.

        Parameters
        ----------
        images : sequence of PIL.Image.Image
            The sample's images (one ``<image>`` placeholder each); may be empty.
        question : str
            The question, already formatted by the task (e.g. with "Answer the question using a single
            word or phrase.").
        generate_kwargs : mapping, optional
            HF ``generate`` kwargs (``max_new_tokens``, ``do_sample``, ``num_beams``, ``temperature``,
            ``top_p``, ``output_logits``, ...). Greedy and :data:`DEFAULT_MAX_NEW_TOKENS` by default.
            ``return_dict_in_generate`` is always set.
        method : TokenCompressor, optional
            Defaults to ``none``.

        Returns
        -------
        GenerationOutput

        Raises
        ------
        ValueError
            If a stage-1 method returns malformed tokens (see :func:`apet_bench.surgery.select_visual_tokens`).
        """
        if method is None:
            from apet_bench.methods.none import NoCompression

            method = NoCompression()
        if not isinstance(images, Sequence):  # a single PIL image
            images = [images]
        t_pre = time.perf_counter()
        prompt = self.build_prompt(question, num_images=len(images))
        inputs = self.prepare_inputs(images, prompt)
        self.visual_context = VisualContext(self, inputs)
        kwargs = self._generate_kwargs(generate_kwargs)
        visual_in = count_placeholders(inputs["input_ids"], self.visual_token_id, inputs.get("attention_mask"))
        kept: list[list[int]] | None = None
        # The budget is per visual input (image or video): the sample is left whole when its largest one fits.
        uncompressed = within_budget(method, visual_in)
        if not uncompressed and len(images) > 1 and within_budget(method, 1):
            uncompressed = within_budget(method, max(int(v.num_tokens) for v in self.visual_context.segments))
        suspend = contextlib.nullcontext()
        if uncompressed:  # the span fits the budget: all visual tokens kept, the method's hooks off for this sample
            from apet_bench.methods.none import NoCompression

            suspend, method = method.suspended(self), NoCompression()
        with torch.inference_mode(), suspend, method(self):
            t0 = self._clock()
            preprocess_ms = (t0 - t_pre) * 1e3
            with contextlib.ExitStack() as stack:
                surgery = None
                if method.stage in STAGE_TWO and method.llm_layers():
                    from apet_bench.llm_surgery import LLMStageSurgery

                    surgery = stack.enter_context(LLMStageSurgery(self, method))  # before the probe's hooks
                probe = stack.enter_context(_PrefillProbe(self.model, self.decoder_layers, self._clock))
                if method.stage in STAGE_ONE and len(images) > 0:
                    gen_inputs, selections = self.apply_visual_stage(inputs, method)
                    reports = [s.kept_indices if s.kept_indices is not None else s.reported_indices for s in selections]
                    if all(r is not None for r in reports):
                        kept = [r.tolist() for r in reports]  # type: ignore[union-attr]  (-1: no original token)
                else:
                    gen_inputs = dict(inputs)
                out = self.model.generate(**gen_inputs, **kwargs)
                t1 = self._clock()
                from apet_bench.attention import attention_backends

                backends = attention_backends(self, method)  # hooks and row captures still attached
                ctx = self.visual_context
                if ctx is not None:  # release per-sample tensors; segments and inputs stay readable
                    ctx.visual_tokens = None
                    ctx._vision_features = None
                if surgery is not None and surgery.kept_positions and len(images) == 1:
                    last = surgery.kept_positions[max(surgery.kept_positions)][0]
                    vis = self.visual_positions(gen_inputs["input_ids"][:1], gen_inputs.get("attention_mask"))[0]
                    in_run = torch.searchsorted(vis, last.to(vis.device))
                    if kept is not None:  # stage 1 then 2: indices into the original tokens
                        kept = [[kept[0][j] for j in in_run.tolist()]]
                    elif method.stage == "llm":
                        kept = [in_run.tolist()]
        if kept is not None:  # rows without an original token (reported as -1) have no index to record
            kept = [[int(i) for i in row if i >= 0] for row in kept]
        input_ids = gen_inputs["input_ids"]
        mask = gen_inputs.get("attention_mask")
        prompt_len = int(input_ids.shape[1])
        row_mask = mask[0] if mask is not None else None
        prompt_tokens = int(row_mask.sum()) if row_mask is not None else prompt_len
        visual_llm = count_placeholders(input_ids[0], self.visual_token_id, row_mask)
        layer_visual = [
            visual_llm - (prompt_tokens - n) if n is not None else visual_llm for n in probe.layer_lengths
        ]
        plan = [int(n) for n in method.plan(self, visual_llm)]
        new_ids = out.sequences[0, prompt_len:].tolist()
        text = self.tokenizer.decode(new_ids, skip_special_tokens=True).strip()
        kv = None
        cache = getattr(out, "past_key_values", None)
        if cache is not None and hasattr(cache, "layers"):
            try:
                kv = [int(layer.get_seq_length()) for layer in cache.layers]
            except Exception:  # noqa: BLE001 - accounting only; caches without per-layer lengths
                kv = None
        prefill_end = probe.prefill_end if probe.prefill_end is not None else t1
        return GenerationOutput(
            text=text,
            output_ids=new_ids,
            prompt_tokens=prompt_tokens,
            visual_tokens_in=visual_in,
            visual_tokens_llm=visual_llm,
            layer_visual_tokens=layer_visual,
            kept_indices=kept,
            prefill_ms=(prefill_end - t0) * 1e3,
            total_ms=(t1 - t0) * 1e3,
            preprocess_ms=preprocess_ms,
            kv_cache_tokens=kv,
            planned_layer_visual_tokens=plan,
            num_images=len(images),
            attention_backends=backends,
            logits=tuple(out.logits) if getattr(out, "logits", None) is not None else None,
            uncompressed=uncompressed,
        )


# ---------------------------------------------------------------------- adapter registry
_ADAPTERS: dict[str, type[ModelAdapter]] = {}


def register_adapter(family: str) -> Callable[[type[ModelAdapter]], type[ModelAdapter]]:
    """Class decorator registering a :class:`ModelAdapter` subclass for ``family`` (sets ``cls.family``)."""

    def decorator(cls: type[ModelAdapter]) -> type[ModelAdapter]:
        cls.family = family
        _ADAPTERS[family] = cls
        return cls

    return decorator


def get_adapter_class(family: str) -> type[ModelAdapter]:
    """The adapter class for ``family``.

    Raises
    ------
    ModelConfigError
        For an unknown family, listing the known ones.
    """
    try:
        return _ADAPTERS[family]
    except KeyError:
        raise ModelConfigError(f"unknown model family {family!r}; available: {', '.join(sorted(_ADAPTERS))}") from None



def load_pretrained(
    spec: ModelSpec,
    model_class: type,
    processor_loader: Callable[[str, Mapping[str, Any], nn.Module], Any] | None = None,
) -> tuple[nn.Module, Any, str]:
    """Load a real checkpoint and its processor as ``spec`` says (HF cache, pinned revision).

    ``model_class.from_pretrained(local_path or hf_id, revision=revision (hub ids only), dtype=...,
    attn_implementation=..., device_map=<device>)`` and ``AutoProcessor.from_pretrained(same)`` (or
    ``processor_loader``), with ``local_files_only=True`` for a ``local_path`` or when the hub is
    offline (:func:`hub_offline`). The one place checkpoints are loaded: adapters whose processor
    ``AutoProcessor`` cannot build (it would need torchvision) pass a ``processor_loader``.

    Parameters
    ----------
    spec : ModelSpec
        ``tiny`` must be false.
    model_class : type
        E.g. ``transformers.LlavaForConditionalGeneration``.
    processor_loader : callable, optional
        ``processor_loader(source, common_kwargs, model) -> processor``, called after the model is
        loaded: ``source`` is the local path or hub id, ``common_kwargs`` the ``revision`` /
        ``local_files_only`` keywords to pass on to every ``from_pretrained``, ``model`` the loaded
        model (for config values). An ``OSError`` it raises is reported like the model's. Default:
        ``AutoProcessor.from_pretrained(source, **common_kwargs)``.

    Returns
    -------
    model : transformers.PreTrainedModel
        In eval mode on ``spec.torch_device``.
    processor : transformers.ProcessorMixin
    weights : str
        ``"<hf_id>@<revision>"`` or ``"local:<path>"``.

    Raises
    ------
    ModelConfigError
        When the checkpoint cannot be found (e.g. offline and not in the HF cache), one line.
    """
    offline = hub_offline()
    common: dict[str, Any] = {}
    if spec.local_path is not None:
        source = spec.local_path
        weights = f"local:{source}"
        common["local_files_only"] = True
    else:
        source = str(spec.hf_id)
        weights = f"{source}@{spec.revision or 'main'}"
        if spec.revision:
            common["revision"] = spec.revision
        if offline:
            common["local_files_only"] = True
    if processor_loader is None:
        processor_loader = _auto_processor
    try:
        model = model_class.from_pretrained(
            source,
            dtype=spec.torch_dtype if spec.torch_dtype is not None else "auto",
            attn_implementation=spec.attn_implementation,
            device_map=str(spec.torch_device),
            **common,
        )
        processor = processor_loader(source, common, model)
    except OSError as e:
        where = "offline and not in the HF cache" if offline and spec.local_path is None else "not found"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelConfigError(
            f"cannot load {weights}: {where} ({first}); download it first or set local_path"
        ) from e
    return model.eval(), processor, weights


def _auto_processor(source: str, common: Mapping[str, Any], model: nn.Module) -> Any:
    """``AutoProcessor.from_pretrained(source, **common)`` (the default ``processor_loader``)."""
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(source, **common)


def _attach_checkpoint_sentencepiece(tokenizer: Any, source: str, common: Mapping[str, Any]) -> bool:
    """Attach the checkpoint's ``tokenizer.model`` (if any) so prompts are tokenized as the official slow
    tokenizer (:func:`apet_bench.models.inputs.tokenizer_image_token`); False when there is none."""
    from apet_bench.models.inputs import attach_sentencepiece

    path = Path(source) / "tokenizer.model"
    if not path.is_file():
        try:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(source, "tokenizer.model", revision=common.get("revision"),
                                        local_files_only=bool(common.get("local_files_only"))))
        except Exception:  # noqa: BLE001 - no tokenizer.model: the fast tokenizer's chunks are used
            return False
    return attach_sentencepiece(tokenizer, str(path))


def config_processor_loader(spec: ModelSpec) -> Callable[[str, Mapping[str, Any], nn.Module], Any] | None:
    """A ``processor_loader`` for :func:`load_pretrained` that builds the processor from ``spec``'s config.

    ``None`` (= the checkpoint's own processor, ``AutoProcessor``) when the config has no ``processor:``
    block, e.g. a ``save_pretrained`` directory given as a bare ``local_path`` config.

    The checkpoint's tokenizer (``AutoTokenizer.from_pretrained(source, revision / local_files_only)``)
    (with the checkpoint's ``tokenizer.model`` attached for the LLaVA family, see
    :func:`apet_bench.models.inputs.tokenizer_image_token`) and the image processor + processor
    parameters of the ``processor:`` block
    (:func:`apet_bench.models.processors.build_processor`), checked against the loaded model's config
    (:func:`apet_bench.models.processors.check_against_model`). The checkpoint's processor files are
    never read.

    Raises
    ------
    ModelConfigError
        A bad ``processor:`` block (before anything is loaded), or one that disagrees with the model.
    """
    from apet_bench.models.processors import build_processor, check_against_model, processor_options

    if spec.options.get("processor") is None:
        return None
    opts = processor_options(spec.family, spec.options)

    def loader(source: str, common: Mapping[str, Any], model: nn.Module) -> Any:
        from transformers import AutoTokenizer

        check_against_model(spec.family, opts, model.config, source)
        tokenizer = AutoTokenizer.from_pretrained(source, **common)
        if spec.family in ("llava15", "llava_next", "video_llava"):
            _attach_checkpoint_sentencepiece(tokenizer, source, common)
        return build_processor(spec.family, opts, tokenizer)

    return loader
