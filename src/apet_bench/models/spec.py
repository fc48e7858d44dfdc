"""A model configuration, validated before anything loads: :class:`ModelSpec` and its checks.

``configs/model/<name>.yaml`` becomes a :class:`ModelSpec` (:meth:`ModelSpec.from_mapping`); a bad value
raises :class:`ModelConfigError` in one line naming it. Also the checks the adapters share on their inputs
(image size, attention backend, device) and the prompt body with visual placeholders.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "ATTN_IMPLEMENTATIONS",
    "DTYPES",
    "ModelConfigError",
    "ModelSpec",
    "check_attn_implementation",
    "check_image_size",
    "hub_offline",
    "placeholder_prompt_body",
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


