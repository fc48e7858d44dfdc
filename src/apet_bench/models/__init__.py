"""Model adapters: :func:`load_model` turns a model config into a loaded :class:`ModelAdapter`.

Families: ``llava15`` (:class:`Llava15Adapter`). LLaVA-NeXT, Qwen2.5-VL and Video-LLaVA adapters
register themselves with :func:`register_adapter` in their own modules.

Examples
--------
>>> from apet_bench.models import load_model
>>> adapter = load_model({"name": "tiny_llava15", "family": "llava15", "tiny": True, "device": "cpu"})
>>> adapter.weights.startswith("random-init")
True
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from apet_bench.models.base import (
    ATTN_IMPLEMENTATIONS,
    DTYPES,
    GenerationOutput,
    ModelAdapter,
    ModelConfigError,
    ModelSpec,
    get_adapter_class,
    register_adapter,
)
from apet_bench.models.llava15 import Llava15Adapter
from apet_bench.models.llava_next import LlavaNextAdapter  # noqa: F401  (registers family llava_next)
from apet_bench.models.qwen25vl import Qwen25VLAdapter  # noqa: F401  (registers family qwen25vl)
from apet_bench.models.video_llava import VideoLlavaAdapter  # noqa: F401  (registers video_llava)

__all__ = [
    "ATTN_IMPLEMENTATIONS",
    "DTYPES",
    "GenerationOutput",
    "Llava15Adapter",
    "ModelAdapter",
    "ModelConfigError",
    "ModelSpec",
    "config_facts",
    "get_adapter_class",
    "load_model",
    "register_adapter",
]


def load_model(model_cfg: Mapping[str, Any]) -> ModelAdapter:
    """Load the model a config describes and wrap it in its family's adapter.

    Parameters
    ----------
    model_cfg : mapping
        ``configs/model/*.yaml`` as a dict or ``DictConfig``: ``name``, ``family``, ``tiny``, ``hf_id``,
        ``revision``, ``local_path``, ``dtype``, ``attn_implementation``, ``device``, ``seed``,
        ``visual_tokens``, ``tiny_config`` (see :class:`ModelSpec`).

    Returns
    -------
    ModelAdapter
        In eval mode on the resolved device.

    Raises
    ------
    ModelConfigError
        (a ``ValueError``, one line naming the bad value) for an unknown family / dtype /
        attn_implementation / device, ``flash_attention_2`` without ``flash_attn``, a missing
        ``local_path``, a checkpoint that cannot be loaded, or ``visual_tokens`` that do not match.
    ValueError
        For a bad ``tiny_config``.
    """
    spec = ModelSpec.from_mapping(model_cfg)
    return get_adapter_class(spec.family).from_spec(spec)


def config_facts(model_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """A model config with the facts methods check before loading added.

    Added keys: ``vision_tower`` (the family's :meth:`ModelAdapter.vision_tower_config`: ``num_layers``,
    ``feature_layer``, ``patches``, or ``None``), ``has_cls_token``, ``packs_crops``, ``visual_kinds``
    and ``num_frames`` (the adapter's capabilities). The runner passes this to
    ``TokenCompressor.check_model_config``, so methods learn a model's geometry and capabilities without
    importing models or naming a family.

    Raises
    ------
    ModelConfigError
        For an unknown family.
    """
    out = dict(model_cfg)
    cls = get_adapter_class(str(model_cfg.get("family")))
    out["vision_tower"] = cls.vision_tower_config(model_cfg)
    out["has_cls_token"] = bool(cls.has_cls_token)
    out["packs_crops"] = bool(cls.packs_crops)
    out["visual_kinds"] = list(cls.visual_kinds)
    out["num_frames"] = cls.config_num_frames(model_cfg)
    return out
