"""LLaVA-1.5 adapter (``llava-hf/llava-1.5-7b-hf`` and the tiny random-weight variant).

Sequence layout: the ``vicuna_v1`` conversation (``llava/conversation.py``, system prompt "... a curious
user ... the user's questions."), ``USER: <image>\\n{question} ASSISTANT:``, tokenized as the official
``tokenizer_image_token`` (:mod:`apet_bench.models.inputs`); each ``<image>`` becomes 576 placeholder
tokens, which ``LlavaModel.forward`` overwrites with the projector output (``masked_scatter``). Pixels:
padded to a square with the CLIP mean colour, then CLIP's 336 px resize (``processor.pad_to_square``). Visual tokens come from CLIP ViT-L/14-336
``hidden_states[-2]`` without CLS, through the 2-layer MLP projector (docs/models.md,
``models/llava/modeling_llava.py``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from apet_bench.models.base import (
    ModelAdapter,
    ModelSpec,
    VisualSegment,
    VisualSegments,
    check_image_size,
    placeholder_prompt_body,
    register_adapter,
)
from apet_bench.models.inputs import VICUNA_V1_SYSTEM, conversation_prompt, with_official_ids
from apet_bench.models.loading import config_processor_loader, load_pretrained
from apet_bench.models.tiny import TinyLlavaConfig, build_tiny_llava15

__all__ = ["VICUNA_V1_SYSTEM", "Llava15Adapter", "vicuna_v1_prompt"]

def vicuna_v1_prompt(question: str, num_images: int = 1, image_token: str = "<image>") -> str:
    """``"{system} USER: <image>\\n{question} ASSISTANT:"``, the vicuna_v1 prompt of LLaVA-1.5 / 1.6.

    One ``<image>\\n`` per image before the question; a question that already holds ``image_token``
    placeholders is used as it is (:func:`~apet_bench.models.base.placeholder_prompt_body`).

    Parameters
    ----------
    question : str
    num_images : int
        Number of ``image_token`` placeholders.
    image_token : str
        The processor's image placeholder.

    Returns
    -------
    str

    Raises
    ------
    ValueError
        If ``question`` holds placeholders, but not ``num_images`` of them.
    """
    body = placeholder_prompt_body(question, num_images, image_token, image_token + "\n")
    return conversation_prompt(VICUNA_V1_SYSTEM, body)


@register_adapter("llava15")
class Llava15Adapter(ModelAdapter):
    """LLaVA-1.5 (CLIP ViT-L/14-336 + MLP projector + Vicuna) on ``LlavaForConditionalGeneration``.

    576 visual tokens per image ((336 / 14)² patches, CLS dropped); 32 decoder layers for the 7B
    model (``tiny_config.text_layers`` for the tiny one). Load with :func:`apet_bench.models.load_model`.

    Examples
    --------
    >>> from apet_bench.models import load_model
    >>> adapter = load_model({"name": "tiny_llava15", "family": "llava15", "tiny": True})
    >>> adapter.num_visual_tokens, adapter.num_layers
    (576, 4)
    """

    #: CLIP ViT-L/14-336 of llava-1.5-7b-hf (its published config).
    reference_vision_tower = {"num_layers": 24, "feature_layer": -2, "patches": 576}

    @classmethod
    def tiny_vision_geometry(cls, tiny_config: Mapping[str, Any]) -> tuple[int, int, int]:
        """See :meth:`ModelAdapter.tiny_vision_geometry`."""
        tc = TinyLlavaConfig.from_mapping(tiny_config)
        return tc.vision_layers, tc.image_size, tc.patch_size

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> Llava15Adapter:
        """Build the tiny model (``spec.tiny``) or load the checkpoint (``local_path`` or ``hf_id@revision``).

        Raises
        ------
        ModelConfigError
            When the checkpoint cannot be loaded or ``visual_tokens`` does not match the model.
        ValueError
            For a bad ``tiny_config``.
        """
        if spec.tiny:
            model, processor = build_tiny_llava15(
                spec.tiny_config, seed=spec.seed, attn_implementation=spec.attn_implementation
            )
            return cls._from_tiny(spec, model, processor)
        from transformers import LlavaForConditionalGeneration

        model, processor, weights = load_pretrained(spec, LlavaForConditionalGeneration, config_processor_loader(spec))
        return cls(spec=spec, model=model, processor=processor, weights=weights, is_random_weights=False)

    # ------------------------------------------------------------------ family specifics
    @property
    def num_visual_tokens(self) -> int:
        """``(image_size // patch_size)²``, plus 1 with ``vision_feature_select_strategy="full"`` (CLS kept)."""
        vc = self.model.config.vision_config
        n = (vc.image_size // vc.patch_size) ** 2
        if self.model.config.vision_feature_select_strategy == "full":
            n += 1
        return int(n)

    @property
    def visual_token_id(self) -> int:
        """``config.image_token_id`` (the ``<image>`` placeholder)."""
        return int(self.model.config.image_token_id)

    def build_prompt(self, question: str, num_images: int = 1) -> str:
        """vicuna_v1 prompt as the official LLaVA-1.5 evaluation builds it.

        ``"{system} USER: <image>\\n{question} ASSISTANT:"`` (one ``<image>\\n`` per image, before the
        question: ``llava/eval/model_vqa_loader.py`` with ``conv_mode=vicuna_v1``). A question that
        already holds ``<image>`` placeholders is used as it is (as lmms-eval's ``llava_hf`` model does).

        Parameters
        ----------
        question : str
        num_images : int
            Number of ``<image>`` placeholders.

        Returns
        -------
        str

        Raises
        ------
        ValueError
            If ``question`` holds placeholders, but not ``num_images`` of them.
        """
        return vicuna_v1_prompt(question, num_images, getattr(self.processor, "image_token", "<image>"))

    def prepare_inputs(self, images: Sequence[Any], prompt: str) -> Any:
        """Refuse images smaller than one patch, run the processor, then the official token ids.

        Pixels from the processor (``pixel_values`` ``(num_images, 3, 336, 336)``); ``input_ids`` rebuilt
        as LLaVA's ``tokenizer_image_token`` with each image index expanded to its placeholder run
        (:func:`apet_bench.models.inputs.with_official_ids`).

        Raises
        ------
        ValueError
            (one line) For an image with a side below ``patch_size`` (14) px, naming its size.
        """
        patch = int(self.model.config.vision_config.patch_size)
        for i, image in enumerate(images):
            check_image_size(image, i, patch)
        inputs = super().prepare_inputs(images, prompt)
        token = getattr(self.processor, "image_token", "<image>")
        return with_official_ids(inputs, prompt, self.tokenizer, self.visual_token_id, token, self.processor).to(self.device)

    def encode_images(self, inputs: Mapping[str, Any]) -> list[torch.Tensor]:
        """Projector outputs per image: ``model.model.get_image_features(...).pooler_output``.

        Parameters
        ----------
        inputs : mapping
            Processor outputs with ``pixel_values`` ``(num_images, 3, 336, 336)``.

        Returns
        -------
        list of torch.Tensor
            One ``(576, hidden_size)`` tensor per image (config's feature layer and select strategy).
        """
        extra = {"image_sizes": inputs["image_sizes"]} if inputs.get("image_sizes") is not None else {}
        out = self.model.model.get_image_features(pixel_values=inputs["pixel_values"], return_dict=True, **extra)
        return list(out.pooler_output)

    # ------------------------------------------------------------------ structure for methods
    @property
    def vision_tower(self) -> nn.Module:
        """``model.model.vision_tower`` (``CLIPVisionModel``, ViT-L/14-336 for 7B)."""
        return self.model.model.vision_tower

    @property
    def vision_projector(self) -> nn.Module:
        return self.model.model.multi_modal_projector

    def _split_vision_features(self, captured: list[torch.Tensor], inputs: Mapping[str, Any]) -> list[torch.Tensor]:
        return list(captured[0])  # (num_images, 576, D_v)

    def visual_segments(self, inputs: Mapping[str, Any]) -> list[VisualSegments]:
        """One ``"image"`` segment of 576 tokens per image (24 x 24 grid in raster order).

        See :meth:`ModelAdapter.visual_segments`. With ``vision_feature_select_strategy="full"`` the
        CLS is token 0 (``cls_position=0``) and the grid covers tokens 1..576.

        Parameters
        ----------
        inputs : mapping
            Processor outputs with ``pixel_values`` ``(num_images, 3, 336, 336)``.

        Returns
        -------
        list of VisualSegments
        """
        n = self.num_visual_tokens
        side = int(self.model.config.vision_config.image_size // self.model.config.vision_config.patch_size)
        full = self.model.config.vision_feature_select_strategy == "full"
        patches = torch.arange(side * side)
        if full:
            patches = torch.cat([torch.tensor([-1]), patches])
        num_images = int(inputs["pixel_values"].shape[0])
        starts = self._placeholder_starts(inputs, [n] * num_images)
        return [
            VisualSegments(
                kind="image",
                index=i,
                num_tokens=n,
                segments=(
                    VisualSegment(
                        "image", "image", 0, torch.arange(n), (1, side, side), patches, 0 if full else None
                    ),
                ),
                start=starts[i],
            )
            for i in range(num_images)
        ]

    def feature_token_map(self, inputs: Mapping[str, Any]) -> list[torch.Tensor]:
        """``arange(576)`` per image: feature row ``j`` is visual token ``j`` (see :meth:`ModelAdapter.feature_token_map`)."""
        return [torch.arange(self.num_visual_tokens) for _ in range(int(inputs["pixel_values"].shape[0]))]
