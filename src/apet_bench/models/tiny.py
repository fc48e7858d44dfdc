"""Tiny random-weight models of the real HF classes, built offline in well under a second.

They exercise the whole pipeline (processor, vision tower, projector, surgery, hooks, KV cache, decode)
with the real geometry (336 px / 14 -> 576 visual tokens for LLaVA-1.5) but tiny widths and depths,
so tests and dry runs need neither the hub nor a GPU. Their answers are a pipeline check, never an
accuracy number. Recipe: docs/models.md (tokenizer, per-architecture configs,
processor, and the larger-std re-init so greedy outputs depend on the input).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, TypeVar

import torch
from torch import nn

__all__ = [
    "SPECIAL_TOKENS",
    "TINY_WORDS",
    "TinyLlavaConfig",
    "build_tiny_llava15",
    "build_tiny_tokenizer",
    "checked_config",
    "instantiate_tiny_model",
    "reinit_weights",
    "tiny_clip_vision_config",
    "tiny_llava_config_kwargs",
    "tiny_llama_text_config",
]

_C = TypeVar("_C")

#: Special tokens of the tiny tokenizer; the visual placeholders must be special tokens so a run
#: ``<image><image>...`` splits into single tokens (docs/models.md).
SPECIAL_TOKENS: tuple[str, ...] = ("<unk>", "<s>", "</s>", "<pad>", "<image>", "<video>")

#: Word-level vocabulary: the vicuna_v1 system prompt, the lmms-eval prompt suffixes, answer words
#: (yes/no, option letters, numbers, colours, COCO objects) and common English words, so decoded
#: answers are words. Anything else becomes ``<unk>``.
TINY_WORDS: tuple[str, ...] = tuple(
    dict.fromkeys(
        """
        . , : ; ? ! ' " ( ) - / %
        A B C D E F Yes No yes no The USER ASSISTANT Answer Please Question Options Hint Is Are What How
        Which Where Who Why When Does Do Can There This That It
        a an the chat between curious human and artificial intelligence assistant gives helpful detailed
        polite answers to human's s questions question answer using single word or phrase please with
        option's letter from given choices directly image picture photo shown in of on at by for is are
        was were be been it this that these those there here what which who whom whose where when why
        how many much more most less few some any all none no not yes true false correct wrong left right
        top bottom middle center front back above below near far inside outside under over behind next
        one two three four five six seven eight nine ten 0 1 2 3 4 5 6 7 8 9 10 11 12 20 100
        red green blue yellow black white gray grey brown orange pink purple color colors colour
        person people man woman men women boy girl child children baby player players
        bicycle car motorcycle airplane bus train truck boat traffic light fire hydrant stop sign
        parking meter bench bird cat dog horse sheep cow elephant bear zebra giraffe backpack umbrella
        handbag tie suitcase frisbee skis snowboard sports ball kite baseball bat glove skateboard
        surfboard tennis racket bottle wine glass cup fork knife spoon bowl banana apple sandwich
        orange broccoli carrot hot pizza donut cake chair couch potted plant bed dining table toilet
        tv laptop mouse remote keyboard phone microwave oven toaster sink refrigerator book clock vase
        scissors teddy hair drier toothbrush
        sky tree trees grass water road street building house window door wall floor room field sea
        beach snow mountain city food text sign number name time day night sun
        has have had do does did can could will would should may might must shall
        see look looks like shows holding sitting standing walking playing eating wearing riding
        big small large little long short tall old new young good bad same different other another
        only also very just too up down out off into onto about than then because so if as
        I you he she we they them his her its their our my your me us him
        describe description caption short brief sentence words object objects scene
        first second third last both each every between count total
        """.split()
    )
)


def checked_config(cls: type[_C], cfg: Mapping[str, Any] | None) -> _C:
    """``cls(**cfg)`` for a tiny-config dataclass, with the checks every tiny config shares.

    Rejects keys that are not fields of ``cls``, an ``init_std`` that is not a positive number and
    any other field that is not a positive integer. Family-specific consistency checks are left to
    the caller's ``from_mapping``.

    Parameters
    ----------
    cls : dataclass type
        E.g. :class:`TinyLlavaConfig`; every field but ``init_std`` is an integer size.
    cfg : mapping or None
        A (possibly partial) mapping; missing keys take the defaults.

    Returns
    -------
    instance of ``cls``

    Raises
    ------
    ValueError
        For an unknown key (listing the accepted ones) or a bad value (one line, naming it).
    """
    cfg = dict(cfg or {})
    names = [f.name for f in fields(cls)]
    unknown = sorted(set(cfg) - set(names))
    if unknown:
        raise ValueError(f"unknown tiny_config key(s) {', '.join(unknown)}; accepted: {', '.join(names)}")
    out = cls(**cfg)
    for f in fields(out):
        value = getattr(out, f.name)
        if f.name == "init_std":
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ValueError(f"tiny_config init_std {value!r} must be a positive number")
        elif isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"tiny_config {f.name} {value!r} must be a positive integer")
    return out


@dataclass(frozen=True)
class TinyLlavaConfig:
    """Sizes of the tiny LLaVA-1.5 (``tiny_config`` in ``configs/model/tiny_llava15.yaml``).

    Defaults follow docs/models.md (0.95 M parameters, ~20 ms per forward on 2 CPU
    cores) with the real LLaVA-1.5 geometry: 336 px images, 14 px patches -> 24 x 24 = 576 visual
    tokens, CLIP feature layer -2 with the CLS token dropped.

    Attributes
    ----------
    vision_hidden_size, vision_intermediate_size, vision_layers, vision_heads : int
        CLIP vision tower (``vision_layers >= 2``: LLaVA reads ``hidden_states[-2]``).
    text_hidden_size, text_intermediate_size, text_layers, heads, kv_heads : int
        Llama LLM (``text_hidden_size % heads == 0``, ``heads % kv_heads == 0``).
    image_size, patch_size : int
        Image side and patch side in pixels; ``(image_size / patch_size) ** 2`` visual tokens.
    max_position_embeddings : int
        LLM context length (tokens).
    init_std : float
        Std of the normal re-init of every weight matrix and embedding. The HF default (0.02) makes a
        random model emit the same token at every step; 0.2 makes greedy outputs depend on the image
        and the prompt (docs/models.md, "Test-data pitfalls").
    """

    vision_hidden_size: int = 64
    vision_intermediate_size: int = 128
    vision_layers: int = 2
    vision_heads: int = 4
    text_hidden_size: int = 128
    text_intermediate_size: int = 256
    text_layers: int = 4
    heads: int = 4
    kv_heads: int = 4
    image_size: int = 336
    patch_size: int = 14
    max_position_embeddings: int = 4096
    init_std: float = 0.2

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any] | None) -> TinyLlavaConfig:
        """Build from a (possibly partial) mapping; missing keys take the defaults.

        Raises
        ------
        ValueError
            For an unknown key, a non-positive size, or inconsistent sizes (one line, naming them).
        """
        out = checked_config(cls, cfg)
        if out.vision_layers < 2:
            raise ValueError(f"tiny_config vision_layers {out.vision_layers} must be >= 2 (LLaVA reads layer -2)")
        if out.image_size % out.patch_size:
            raise ValueError(f"tiny_config image_size {out.image_size} is not a multiple of patch_size {out.patch_size}")
        if out.text_hidden_size % out.heads or out.heads % out.kv_heads:
            raise ValueError(
                f"tiny_config text_hidden_size {out.text_hidden_size}, heads {out.heads}, kv_heads {out.kv_heads} are inconsistent"
            )
        if out.vision_hidden_size % out.vision_heads:
            raise ValueError(
                f"tiny_config vision_hidden_size {out.vision_hidden_size} is not a multiple of vision_heads {out.vision_heads}"
            )
        return out

    @property
    def num_visual_tokens(self) -> int:
        """Visual tokens per image: ``(image_size // patch_size) ** 2`` (CLS dropped)."""
        return (self.image_size // self.patch_size) ** 2

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the fields."""
        return asdict(self)


def build_tiny_tokenizer(extra_words: tuple[str, ...] = (), extra_special_tokens: tuple[str, ...] = ()) -> Any:
    """Word-level tokenizer of :data:`TINY_WORDS`, built offline (docs/models.md).

    A ``tokenizers`` ``WordLevel`` model (unknown -> ``<unk>``), whitespace/punctuation
    pre-tokenizer, ``<s>`` prepended as BOS (as the Llama tokenizer of llava-hf does), wrapped in
    ``transformers.TokenizersBackend`` with left padding; ``<image>`` and ``<video>`` are special
    tokens. Decoding joins words with spaces.

    Parameters
    ----------
    extra_words : tuple of str
        Words added after :data:`TINY_WORDS`.
    extra_special_tokens : tuple of str
        Special tokens added at the end of the vocabulary (after ``extra_words``), e.g. Qwen's
        ``<|vision_start|>``, ``<|image_pad|>``, ``<|im_start|>``; never split, like ``<image>``.

    Returns
    -------
    transformers.TokenizersBackend
        ``len(tokenizer)`` is the vocabulary size the tiny model must use.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import TokenizersBackend

    vocab: dict[str, int] = {}
    for word in (*SPECIAL_TOKENS, *TINY_WORDS, *extra_words, *extra_special_tokens):
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return TokenizersBackend(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens=list(dict.fromkeys(["<image>", "<video>", *extra_special_tokens])),
        padding_side="left",
    )


@torch.no_grad()
def reinit_weights(model: nn.Module, std: float, seed: int) -> None:
    """Re-initialise ``model`` in place: weight matrices and embeddings ~ N(0, std²), biases 0, norms 1/0.

    Draws from a CPU ``torch.Generator`` seeded with ``seed`` in ``named_parameters`` order, so the
    same seed gives bit-identical weights. Norm layers (``LayerNorm``, ``*RMSNorm``) get weight 1 and
    bias 0; every other parameter named ``bias`` gets 0; the rest are drawn.

    Parameters
    ----------
    model : torch.nn.Module
    std : float
        Standard deviation of the draws.
    seed : int
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    norm_params: set[int] = set()
    for module in model.modules():
        if isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("RMSNorm"):
            for name, p in module.named_parameters(recurse=False):
                (p.fill_(1.0) if name == "weight" else p.zero_())
                norm_params.add(id(p))
    for name, p in model.named_parameters():
        if id(p) in norm_params:
            continue
        if name.endswith("bias"):
            p.zero_()
        else:
            draw = torch.empty(p.shape, dtype=torch.float32).normal_(0.0, std, generator=gen)
            p.copy_(draw.to(p.dtype))


def tiny_clip_vision_config(tc: TinyLlavaConfig) -> Any:
    """The ``CLIPVisionConfig`` of a tiny LLaVA-style model (docs/models.md).

    Parameters
    ----------
    tc : TinyLlavaConfig
        Reads ``vision_hidden_size``, ``vision_intermediate_size``, ``vision_layers``,
        ``vision_heads``, ``image_size`` and ``patch_size``.

    Returns
    -------
    transformers.CLIPVisionConfig
    """
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=tc.vision_hidden_size,
        intermediate_size=tc.vision_intermediate_size,
        num_hidden_layers=tc.vision_layers,
        num_attention_heads=tc.vision_heads,
        image_size=tc.image_size,
        patch_size=tc.patch_size,
    )


def tiny_llama_text_config(tc: TinyLlavaConfig, tokenizer: Any) -> Any:
    """The ``LlamaConfig`` of a tiny LLaVA-style model, vocabulary and special ids from ``tokenizer``.

    Parameters
    ----------
    tc : TinyLlavaConfig
        Reads ``text_hidden_size``, ``text_intermediate_size``, ``text_layers``, ``heads``,
        ``kv_heads`` and ``max_position_embeddings``.
    tokenizer : transformers tokenizer
        From :func:`build_tiny_tokenizer`: ``vocab_size = len(tokenizer)``, pad / bos / eos ids.

    Returns
    -------
    transformers.LlamaConfig
        Untied input and output embeddings.
    """
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=tc.text_hidden_size,
        intermediate_size=tc.text_intermediate_size,
        num_hidden_layers=tc.text_layers,
        num_attention_heads=tc.heads,
        num_key_value_heads=tc.kv_heads,
        max_position_embeddings=tc.max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )


def tiny_llava_config_kwargs(tc: TinyLlavaConfig, tokenizer: Any) -> dict[str, Any]:
    """Keyword arguments shared by the tiny ``LlavaConfig`` / ``LlavaNextConfig`` / ``VideoLlavaConfig``.

    ``vision_config`` (:func:`tiny_clip_vision_config`), ``text_config`` (:func:`tiny_llama_text_config`),
    ``image_token_index`` (id of ``<image>``), ``vision_feature_layer=-2``,
    ``vision_feature_select_strategy="default"``, ``image_seq_length = tc.num_visual_tokens`` and the
    tokenizer's ``pad_token_id``; each family adds its own (pinpoints, video ids and lengths).

    Parameters
    ----------
    tc : TinyLlavaConfig
    tokenizer : transformers tokenizer
        From :func:`build_tiny_tokenizer`.

    Returns
    -------
    dict
    """
    return {
        "vision_config": tiny_clip_vision_config(tc),
        "text_config": tiny_llama_text_config(tc, tokenizer),
        "image_token_index": tokenizer.convert_tokens_to_ids("<image>"),
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "image_seq_length": tc.num_visual_tokens,
        "pad_token_id": tokenizer.pad_token_id,
    }


def instantiate_tiny_model(
    model_class: type, config: Any, tokenizer: Any, *, init_std: float, seed: int, attn_implementation: str
) -> Any:
    """Build ``model_class`` from ``config`` with seeded random weights, in eval mode.

    ``model_class._from_config(config, attn_implementation=...)`` under ``torch.random.fork_rng``
    (seeded with ``seed``; the global RNG is left as it was), then :func:`reinit_weights` with
    ``init_std`` and ``seed``; the generation config takes the pad / bos / eos ids of ``tokenizer``.

    Parameters
    ----------
    model_class : type
        E.g. ``transformers.LlavaForConditionalGeneration``.
    config : transformers.PretrainedConfig
    tokenizer : transformers tokenizer
    init_std : float
    seed : int
        Same seed -> identical ``state_dict``.
    attn_implementation : str

    Returns
    -------
    transformers.PreTrainedModel
        fp32, CPU, eval mode.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class._from_config(config, attn_implementation=attn_implementation)
    reinit_weights(model, init_std, seed)
    model.eval()
    gc = model.generation_config
    gc.pad_token_id = tokenizer.pad_token_id
    gc.bos_token_id = tokenizer.bos_token_id
    gc.eos_token_id = tokenizer.eos_token_id
    return model


def build_tiny_llava15(
    tiny_config: TinyLlavaConfig | Mapping[str, Any] | None = None,
    *,
    seed: int = 0,
    attn_implementation: str = "sdpa",
) -> tuple[Any, Any]:
    """A random-weight ``LlavaForConditionalGeneration`` and its ``LlavaProcessor``, built offline.

    Config: ``LlavaConfig(CLIPVisionConfig, LlamaConfig)``, ``vision_feature_layer=-2``,
    ``vision_feature_select_strategy="default"``, ``image_seq_length = (image_size/patch_size)²``;
    processor: ``LlavaProcessor(CLIPImageProcessorPil(336 shortest edge, 336 x 336 crop), tokenizer,
    patch_size, "default", num_additional_image_tokens=1)`` (docs/models.md). The LLM
    vocabulary equals ``len(tokenizer)``, so every generated id decodes to a word. Construction runs
    under ``torch.random.fork_rng`` (the global RNG is left as it was), then :func:`reinit_weights`.

    Parameters
    ----------
    tiny_config : TinyLlavaConfig or mapping, optional
        Sizes; defaults as :class:`TinyLlavaConfig`.
    seed : int
        Same seed -> identical ``state_dict``.
    attn_implementation : str
        ``eager``, ``sdpa`` or ``flash_attention_2``.

    Returns
    -------
    model : transformers.LlavaForConditionalGeneration
        fp32, CPU, eval mode.
    processor : transformers.LlavaProcessor
    """
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tc = tiny_config if isinstance(tiny_config, TinyLlavaConfig) else TinyLlavaConfig.from_mapping(tiny_config)
    tokenizer = build_tiny_tokenizer()
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": tc.image_size}, crop_size={"height": tc.image_size, "width": tc.image_size}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=tc.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    config = LlavaConfig(**tiny_llava_config_kwargs(tc, tokenizer))
    model = instantiate_tiny_model(
        LlavaForConditionalGeneration,
        config,
        tokenizer,
        init_std=tc.init_std,
        seed=seed,
        attn_implementation=attn_implementation,
    )
    return model, processor
