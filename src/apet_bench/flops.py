"""Prefill TFLOPs of any model × method × budget, counted on full-size models built without weights.

``python -m apet_bench.flops model=llava15 method=apet budget=64 [visual_tokens=576] [text_tokens=62]``
prints a human-readable breakdown and, on its last line, one JSON object with ``vision_tflops``,
``llm_tflops``, ``method_tflops``, ``total_tflops``, the token counts used (visual tokens in, the
per-layer visual-token plan, text tokens), where the plan came from, and the convention.

How a number is obtained:

1. **Per-layer token counts from the method's own code.** The method (any class in the registry,
   ``apet_bench.methods.build_method``) runs once, through the adapter's real ``generate`` path, on a
   *shape proxy*: the model's tiny random-weight variant (``models/tiny.py``) given the full-size
   model's depths (32 / 28 decoder layers, 24 CLIP layers) and its visual-token geometry (LLaVA-1.5: a
   336 px image -> 576 tokens; Qwen2.5-VL: an image of ``28h × 28w`` px -> ``h·w`` tokens; LLaVA-NeXT:
   a 672 × 672 image -> base view + 2×2 crops -> 2928 packed tokens; Video-LLaVA: a 224 px image -> 256),
   with the smallest widths the classes allow (token counts do not depend on widths). The per-layer
   visual tokens are the method's own plan (``TokenCompressor.plan``, recorded by ``generate`` as
   ``GenerationOutput.planned_layer_visual_tokens``), checked against the counts the adapter measured
   at the input of every decoder layer; we also record the tokens entering every vision-encoder layer
   (methods that merge inside the ViT).
2. **FLOPs of the full-size model on the ``meta`` device.** The HF model class is built from its
   published configuration (:func:`full_size_config`; the hub is unreachable, so the hyper-parameters
   are written here from each checkpoint's ``config.json``) under ``torch.device("meta")``: no weights,
   no memory. Each vision-encoder layer and each decoder layer is then called on meta tensors of its
   own prefill length under :class:`torch.utils.flop_counter.FlopCounterMode`, with the real number of
   text tokens (LLaVA-1.5 POPE prompt: 62 Llama-2 tokens, see :data:`POPE_TEXT_TOKENS`).
3. **The method's own overhead**, from the formula the method defines next to its code
   (``TokenCompressor.flops_overhead``, given an :class:`~apet_bench.methods.records.OverheadContext`
   built by :func:`overhead_context`), reported as its own line. This module knows no method by name;
   a method without a formula is an error naming it, never 0.

Convention (:data:`CONVENTION`, the paper's Table 7 and docs/efficiency.md): one multiply-add
= 2 FLOPs (matmuls, convolutions, attention); element-wise ops (norms, activations, softmax, RoPE) and
embedding look-ups are not counted; attention at full ``n²`` (no causal halving); the ``lm_head`` on the
last prompt token only (``logits_to_keep=1`` as ``generate`` does); prefill only (no decode steps);
vision encoder + projector, LLM and method overhead reported separately; total = their sum.
Method overhead formulas count their element-wise terms too (documented per method).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from apet_bench.config import ConfigError
from apet_bench.methods.records import OverheadContext
from apet_bench.pipeline import generate

__all__ = [
    "CONVENTION",
    "FAMILY_OF_MODEL",
    "POPE_TEXT_TOKENS",
    "FlopsReport",
    "TokenPlan",
    "count_flops",
    "count_llm_flops",
    "count_vision_flops",
    "full_size_config",
    "llm_flops_formula",
    "main",
    "meta_model",
    "method_overhead",
    "overhead_context",
    "pope_text_tokens",
    "token_plan",
]

TERA = 1e12

#: The counting convention, printed with every number.
CONVENTION: dict[str, str] = {
    "flop": "1 multiply-add = 2 FLOPs (torch.utils.flop_counter on matmul/conv/sdpa); element-wise ops, norms, "
    "softmax, RoPE and embedding look-ups not counted",
    "attention": "full n^2 (QK^T and AV over all prompt tokens, no causal halving)",
    "lm_head": "last prompt token only (logits_to_keep=1, as generate)",
    "phase": "prefill only (vision encoder + projector + LLM prefill; no decode steps)",
    "weights": "none: full-size HF model classes built on the meta device from the published configs",
    "method": "method overhead from the method's own formula (TokenCompressor.flops_overhead), its own line",
}

#: Text tokens of the LLaVA-1.5 POPE prompt (vicuna_v1 system prompt + "USER: <image>\\n{question}\\n
#: Answer the question using a single word or phrase. ASSISTANT:"), BOS included, the ``<image>``
#: placeholder excluded, tokenized with the real Llama-2 tokenizer
#: (../shared/benchmarks/tokenizers/llama2/tokenizer.model, sentencepiece, each side of the placeholder
#: tokenized separately as LLaVA's ``tokenizer_image_token``) over the 3000 questions of
#: ``coco_pope_random.json``: min 61, max 64, mean 61.8, median 62. The default for the LLaVA family.
POPE_TEXT_TOKENS: int = 62
def pope_text_tokens(tokenizer_model: str | os.PathLike, questions: str | os.PathLike,
                     suffix: str = "\nAnswer the question using a single word or phrase.") -> dict[str, float]:
    """Text tokens of the LLaVA-1.5 POPE prompts under a real Llama tokenizer (how :data:`POPE_TEXT_TOKENS` was made).

    Each question becomes the vicuna_v1 prompt (``apet_bench.models.llava15.vicuna_v1_prompt``) with the
    POPE suffix; the text on each side of ``<image>`` is tokenized separately (as LLaVA's
    ``tokenizer_image_token``: sentencepiece with its dummy prefix), plus one BOS; the placeholder is not
    counted (576 visual tokens replace it).

    Parameters
    ----------
    tokenizer_model : path
        A sentencepiece ``tokenizer.model`` (``../shared/benchmarks/tokenizers/llama2/tokenizer.model``).
    questions : path
        A POPE question file, one JSON object per line with ``text`` (``coco_pope_random.json``).
    suffix : str
        Appended to each question.

    Returns
    -------
    dict
        ``{"n", "min", "max", "mean", "median"}`` text tokens per prompt.

    Raises
    ------
    ConfigError
        If a file is missing.
    """
    import statistics

    import sentencepiece as spm

    from apet_bench.models.llava15 import vicuna_v1_prompt

    for path in (tokenizer_model, questions):
        if not os.path.isfile(path):
            raise ConfigError(f"flops: {str(path)!r} does not exist")
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_model))
    lengths = []
    with open(questions) as f:
        for line in f:
            if line.strip():
                q = json.loads(line)["text"]
                before, after = vicuna_v1_prompt(q + suffix, 1, "<image>").split("<image>")
                lengths.append(1 + len(sp.encode(before)) + len(sp.encode(after)))
    if not lengths:
        raise ConfigError(f"flops: no questions in {str(questions)!r}")
    return {"n": len(lengths), "min": min(lengths), "max": max(lengths), "mean": statistics.mean(lengths),
            "median": statistics.median(lengths)}


#: Default text tokens for Qwen2.5-VL: no Qwen tokenizer is available offline; 60 is the count with
#: which the paper's 14.52 is reproduced at 729 visual tokens (docs/efficiency.md). The chat
#: template's POPE prompt is about 40 Qwen2 BPE tokens by hand count; each text token adds ~0.015 TFLOPs.
QWEN_DEFAULT_TEXT_TOKENS: int = 60

#: Model config name -> family, for the full-size models this module counts (tiny variants included:
#: ``model=tiny_llava15`` counts the *full-size* LLaVA-1.5-7B; the tiny model itself is not counted).
FAMILY_OF_MODEL: dict[str, str] = {
    "llava15": "llava15",
    "llava_next": "llava_next",
    "qwen25vl": "qwen25vl",
    "video_llava": "video_llava",
}

#: Human-readable name of each full-size model.
MODEL_TITLE: dict[str, str] = {
    "llava15": "LLaVA-1.5-7B (llava-hf/llava-1.5-7b-hf)",
    "llava_next": "LLaVA-NeXT-7B (llava-hf/llava-v1.6-vicuna-7b-hf)",
    "qwen25vl": "Qwen2.5-VL-7B (Qwen/Qwen2.5-VL-7B-Instruct)",
    "video_llava": "Video-LLaVA-7B (LanguageBind/Video-LLaVA-7B-hf), image input",
}


# ---------------------------------------------------------------------- full-size configurations
def _vicuna7b_text(vocab_size: int = 32064) -> Any:
    from transformers import LlamaConfig

    # lmsys/vicuna-7b-v1.5 as shipped inside llava-hf/*-7b-hf config.json (vocab 32064 with the added
    # <image>/<pad> tokens; 32000 in the original LLaVA repository: 0.002 % of the total, last token only).
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )


def _clip_l14(image_size: int) -> Any:
    from transformers import CLIPVisionConfig

    # openai/clip-vit-large-patch14(-336): 24 layers, 1024 hidden, 4096 MLP, 16 heads, 14 px patches.
    return CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=image_size,
        patch_size=14,
        projection_dim=768,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )


def full_size_config(family: str) -> tuple[type, Any]:
    """The HF model class and configuration of the full-size checkpoint of ``family``, built offline.

    Hyper-parameters from each pinned checkpoint's ``config.json`` (configs/model/*.yaml): LLaVA-1.5-7B
    = CLIP ViT-L/14-336 (24 layers, 1024 wide) + 2-layer GELU MLP projector + Vicuna-7B (32 layers,
    4096 wide, 11008 MLP, 32 heads); LLaVA-NeXT-7B = the same with anyres pinpoints; Video-LLaVA-7B =
    two CLIP ViT-L/14-224 towers + Vicuna-7B; Qwen2.5-VL-7B = window-attention ViT (depth 32, 1280 wide,
    3420 MLP, 16 heads, window 112 px, full attention in blocks 7/15/23/31) + 2×2 merger + Qwen2.5-7B
    (28 layers, 3584 wide, 18944 MLP, 28 heads / 4 KV heads, mRoPE sections [16, 24, 24]).

    Parameters
    ----------
    family : str
        ``llava15``, ``llava_next``, ``qwen25vl`` or ``video_llava``.

    Returns
    -------
    (model_class, config)

    Raises
    ------
    ConfigError
        For an unknown family.
    """
    import transformers as tf

    if family == "llava15":
        cfg = tf.LlavaConfig(
            vision_config=_clip_l14(336), text_config=_vicuna7b_text(), image_token_index=32000,
            projector_hidden_act="gelu", vision_feature_layer=-2, vision_feature_select_strategy="default",
            image_seq_length=576,
        )
        return tf.LlavaForConditionalGeneration, cfg
    if family == "llava_next":
        cfg = tf.LlavaNextConfig(
            vision_config=_clip_l14(336), text_config=_vicuna7b_text(), image_token_index=32000,
            projector_hidden_act="gelu", vision_feature_layer=-2, vision_feature_select_strategy="default",
            image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
            image_seq_length=576,
        )
        return tf.LlavaNextForConditionalGeneration, cfg
    if family == "video_llava":
        cfg = tf.VideoLlavaConfig(
            vision_config=_clip_l14(224), text_config=_vicuna7b_text(32064), image_token_index=32000,
            video_token_index=32001, projector_hidden_act="gelu", vision_feature_layer=-2,
            vision_feature_select_strategy="default", image_seq_length=256, video_seq_length=2056,
        )
        return tf.VideoLlavaForConditionalGeneration, cfg
    if family == "qwen25vl":
        cfg = tf.Qwen2_5_VLConfig(
            text_config={
                "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                "num_attention_heads": 28, "num_key_value_heads": 4, "max_position_embeddings": 128000,
                "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
                "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
            },
            vision_config={
                "depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "in_channels": 3,
                "out_hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
                "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31], "hidden_act": "silu",
            },
            image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
        )
        return tf.Qwen2_5_VLForConditionalGeneration, cfg
    raise ConfigError(f"flops: unknown model family {family!r}; known: {', '.join(sorted(set(FAMILY_OF_MODEL.values())))}")


@functools.lru_cache(maxsize=4)
def meta_model(family: str, attn_implementation: str = "sdpa") -> Any:
    """The full-size model of ``family`` on the ``meta`` device (no weights, ~0.1 s, ~0 bytes of parameters).

    Parameters
    ----------
    family : str
    attn_implementation : str
        ``sdpa`` (default) or ``eager``; both give identical counts (docs/efficiency.md).

    Returns
    -------
    transformers.PreTrainedModel
        On ``meta``, eval mode, bf16 parameters (dtype does not change the count).
    """
    cls, cfg = full_size_config(family)
    with torch.device("meta"):
        model = cls._from_config(cfg, attn_implementation=attn_implementation, dtype=torch.bfloat16)
    return model.eval()


def _flops(fn: Callable[[], Any]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return int(counter.get_total_flops())


def _text_model(model: Any) -> Any:
    return model.model.language_model


def _clip_tower(model: Any) -> Any:
    """The CLIP image tower: ``vision_tower`` (LLaVA-1.5 / NeXT) or ``image_tower`` (Video-LLaVA images)."""
    inner = model.model
    return inner.vision_tower if hasattr(inner, "vision_tower") else inner.image_tower


# ---------------------------------------------------------------------- vision encoder
def count_vision_flops(
    family: str,
    visual_tokens_in: int,
    *,
    vision_layer_tokens: Sequence[int] | None = None,
    grid_hw: tuple[int, int] | None = None,
    crops: int = 1,
) -> dict[str, int]:
    """FLOPs of the full-size vision encoder + projector for one input, on meta.

    Parameters
    ----------
    family : str
    visual_tokens_in : int
        Visual tokens the encoder + projector produce (576 for LLaVA-1.5; ``h·w`` for Qwen2.5-VL).
    vision_layer_tokens : sequence of int, optional
        LLaVA family: tokens (CLS included) entering each CLIP layer; default all ``patches + 1`` in all
        24 layers (HF runs every layer, though LLaVA reads layer -2). ToMe-like methods change them.
    grid_hw : (int, int), optional
        Qwen2.5-VL: the merged-token grid ``(h, w)`` with ``h·w = visual_tokens_in`` (patch grid
        ``2h × 2w``); default the most square factorisation.
    crops : int
        LLaVA family: images through CLIP (LLaVA-NeXT anyres: base view + grid crops, 5 for 672×672).

    Returns
    -------
    dict
        ``{"encoder": int, "projector": int}`` FLOPs (LLaVA family; Qwen: ``encoder`` = ViT blocks and
        patch embedding, ``projector`` = the 2×2 merger MLP).
    """
    model = meta_model(family)
    if family == "qwen25vl":
        return _qwen_vision_flops(model, visual_tokens_in, grid_hw)
    vt = _clip_tower(model)
    vcfg = vt.config
    side = vcfg.image_size // vcfg.patch_size
    n_tokens = side * side + 1
    vm = getattr(vt, "vision_model", vt)  # transformers 5: CLIPVisionModel holds the transformer itself
    layers = vm.encoder.layers
    lengths = list(vision_layer_tokens) if vision_layer_tokens is not None else [n_tokens] * len(layers)
    if len(lengths) != len(layers):
        raise ValueError(f"flops: {len(lengths)} vision layer token counts for {len(layers)} CLIP layers")
    pix = torch.empty(1, 3, vcfg.image_size, vcfg.image_size, device="meta", dtype=torch.bfloat16)
    enc = crops * _flops(lambda: vm.embeddings(pix))
    for n in lengths:
        enc += crops * _clip_layer_flops(family, int(n))
    # the projector sees CLIP's layer -2 output (CLS dropped): fewer tokens when a method merged inside CLIP;
    # LLaVA-NeXT projects every crop's 576 tokens before packing (unpad + newline tokens)
    if vision_layer_tokens is not None:
        n_proj = crops * (int(lengths[-1]) - 1)
    elif family == "llava_next":
        n_proj = crops * (n_tokens - 1)
    else:
        n_proj = int(visual_tokens_in)
    feat = torch.empty(1, n_proj, vcfg.hidden_size, device="meta", dtype=torch.bfloat16)
    proj = _flops(lambda: model.model.multi_modal_projector(feat))
    return {"encoder": enc, "projector": proj}


@functools.lru_cache(maxsize=256)
def _clip_layer_flops(family: str, n: int) -> int:
    """One CLIP encoder layer at ``n`` tokens on meta (identical layers share the count)."""
    vt = _clip_tower(meta_model(family))
    layer = getattr(vt, "vision_model", vt).encoder.layers[0]
    h = torch.empty(1, n, vt.config.hidden_size, device="meta", dtype=torch.bfloat16)
    return _flops(lambda: layer(h, None))


def _square_grid(n: int) -> tuple[int, int]:
    h = int(math.isqrt(n))
    while n % h:
        h -= 1
    return h, n // h


def _qwen_vision_flops(model: Any, visual_tokens_in: int, grid_hw: tuple[int, int] | None) -> dict[str, int]:
    """Qwen2.5-VL ViT (window attention) + merger on meta (docs/efficiency.md gotcha 3), cached."""
    return dict(_qwen_vision_flops_cached(int(visual_tokens_in), grid_hw))


@functools.lru_cache(maxsize=64)
def _qwen_vision_flops_cached(visual_tokens_in: int, grid_hw: tuple[int, int] | None) -> tuple[tuple[str, int], ...]:
    model = meta_model("qwen25vl")
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as mq

    visual = model.model.visual
    vcfg = visual.config
    h, w = grid_hw if grid_hw is not None else _square_grid(int(visual_tokens_in))
    if h * w != visual_tokens_in:
        raise ValueError(f"flops: grid {h}x{w} does not hold {visual_tokens_in} visual tokens")
    m = vcfg.spatial_merge_size
    grid = torch.tensor([[1, h * m, w * m]])
    n_patches = h * w * m * m
    patch_dim = vcfg.in_channels * vcfg.temporal_patch_size * vcfg.patch_size**2
    pix = torch.empty(n_patches, patch_dim, device="meta", dtype=torch.bfloat16)
    ns = vars(mq)
    pos = ns["get_vision_position_ids"](grid, m)
    cu, _ = ns["get_vision_attention_seqlens"](grid, vcfg)
    widx, cuw = ns["get_vision_window_index"](grid, spatial_merge_size=m, window_size=vcfg.window_size, patch_size=vcfg.patch_size)
    merger = visual.merger
    feat = torch.empty(n_patches, vcfg.hidden_size, device="meta", dtype=torch.bfloat16)
    proj = _flops(lambda: merger(feat))
    total = _flops(
        lambda: visual(pix, grid_thw=grid, position_ids=pos.to("meta"), cu_seqlens=cu, window_index=widx.to("meta"),
                       cu_window_seqlens=cuw)
    )
    return (("encoder", total - proj), ("projector", proj))


# ---------------------------------------------------------------------- LLM
def count_llm_flops(family: str, layer_lengths: Sequence[int]) -> dict[str, int]:
    """FLOPs of the full-size LLM prefill, each decoder layer at its own sequence length, on meta.

    Parameters
    ----------
    family : str
    layer_lengths : sequence of int
        ``(num_layers,)`` tokens at the input of each decoder layer (text + visual tokens there).

    Returns
    -------
    dict
        ``{"decoder": int, "lm_head": int}`` FLOPs; ``lm_head`` on the last token only.

    Raises
    ------
    ValueError
        If the number of lengths differs from the decoder depth, or a length is not positive.
    """
    model = meta_model(family)
    text = _text_model(model)
    layers = text.layers
    if len(layer_lengths) != len(layers):
        raise ValueError(f"flops: {len(layer_lengths)} layer lengths for {len(layers)} decoder layers")
    d = text.config.hidden_size
    per_len: dict[int, int] = {}
    total = 0
    for n in layer_lengths:
        n = int(n)
        if n < 1:
            raise ValueError(f"flops: decoder layer length {n} is not positive")
        if n not in per_len:
            per_len[n] = _decoder_layer_flops_cached(family, n)
        total += per_len[n]
    last = torch.empty(1, 1, d, device="meta", dtype=torch.bfloat16)
    head = _flops(lambda: model.lm_head(last))
    return {"decoder": total, "lm_head": head}


@functools.lru_cache(maxsize=512)
def _decoder_layer_flops_cached(family: str, n: int) -> int:
    text = _text_model(meta_model(family))
    return _decoder_layer_flops(family, text, n, text.config.hidden_size)


def _decoder_layer_flops(family: str, text: Any, n: int, d: int) -> int:
    h = torch.empty(1, n, d, device="meta", dtype=torch.bfloat16)
    if family == "qwen25vl":
        pos = torch.zeros(3, 1, n, dtype=torch.long, device="meta")
    else:
        pos = torch.zeros(1, n, dtype=torch.long, device="meta")
    cos_sin = text.rotary_emb(h, pos)
    return _flops(lambda: text.layers[0](h, attention_mask=None, position_ids=None, position_embeddings=cos_sin))


def llm_flops_formula(
    n: int, *, hidden: int, kv_hidden: int, intermediate: int, qkv_bias: bool = False
) -> int:
    """Analytic FLOPs of one decoder layer at ``n`` tokens (the counter's formula, for tests / docs).

    ``2n(2d² + 2d·d_kv + 3d·m) + 4n²d`` (q, o: d×d; k, v: d×d_kv; SwiGLU: 3 matrices d×m; QKᵀ and AV at
    full n², 2 FLOPs per multiply-add; docs/efficiency.md). Biases (Qwen's q/k/v) are element-wise.
    """
    del qkv_bias
    return 2 * n * (2 * hidden * hidden + 2 * hidden * kv_hidden + 3 * hidden * intermediate) + 4 * n * n * hidden


# ---------------------------------------------------------------------- token plans
@dataclass
class TokenPlan:
    """How many visual tokens are where during prefill, for one model × method × budget.

    Attributes
    ----------
    visual_tokens_in : int
        Visual tokens from the vision encoder + projector, before compression.
    visual_tokens_llm : int
        Visual tokens entering the LLM (after stage 1).
    layer_visual_tokens : list of int
        ``(num_layers,)`` visual tokens at the input of each decoder layer.
    vision_layer_tokens : list of int or None
        LLaVA family: tokens entering each CLIP layer (CLS included), when a method changes them.
    source : str
        Where the plan came from (the method's ``plan()`` on the shape proxy, and whether the measured
        counts agree).
    variant : str
        The method variant and plan it counts (e.g. ApET ``official``/``paper`` and its stage layout).
    crops : int
        Images through the CLIP tower (LLaVA-NeXT: base view + grid crops).
    """

    visual_tokens_in: int
    visual_tokens_llm: int
    layer_visual_tokens: list[int]
    vision_layer_tokens: list[int] | None = None
    source: str = ""
    variant: str = ""
    crops: int = 1

    @property
    def mean_layer_visual_tokens(self) -> float:
        """The paper's budget convention: visual tokens averaged over decoder layers (docs/methods/index.md)."""
        return sum(self.layer_visual_tokens) / max(1, len(self.layer_visual_tokens))


#: Widths of the shape proxy: as small as the architectures allow (token counts do not depend on them).
_PROXY_WIDTHS: dict[str, int] = {"vision_hidden_size": 32, "vision_intermediate_size": 64, "vision_heads": 2,
                                 "text_hidden_size": 32, "text_intermediate_size": 64, "heads": 2, "kv_heads": 2}


def _proxy_model_cfg(family: str, num_layers: int, visual_tokens: int) -> tuple[dict[str, Any], tuple[int, int]]:
    """Tiny-model config (real classes, real depths and visual geometry, tiny widths) and the image size."""
    if family == "llava15":
        tc = {"text_layers": num_layers, "vision_layers": 24, "max_position_embeddings": 8192, **_PROXY_WIDTHS}
        return {"name": "flops_proxy_llava15", "family": family, "tiny": True, "device": "cpu", "dtype": "float32",
                "num_layers": num_layers, "visual_tokens": 576, "tiny_config": tc}, (336, 336)
    if family == "qwen25vl":
        h, w = _square_grid(visual_tokens)
        tc = {"text_layers": num_layers, "min_pixels": 256 * 28 * 28, "max_pixels": 2048 * 28 * 28, **_PROXY_WIDTHS,
              "kv_heads": 1, "vision_depth": 2}
        return {"name": "flops_proxy_qwen25vl", "family": family, "tiny": True, "device": "cpu", "dtype": "float32",
                "num_layers": num_layers, "visual_tokens": 2048, "tiny_config": tc}, (28 * w, 28 * h)
    if family == "llava_next":  # real 336 px crops; a 672 x 672 image -> base + 2x2 grid -> 2928 packed tokens
        tc = {"text_layers": num_layers, "vision_layers": 24, "image_size": 336, "max_position_embeddings": 8192,
              **_PROXY_WIDTHS}
        return {"name": "flops_proxy_llava_next", "family": family, "tiny": True, "device": "cpu", "dtype": "float32",
                "num_layers": num_layers, "visual_tokens": 2928, "tiny_config": tc}, (672, 672)
    if family == "video_llava":  # image input, 224 px -> 256 tokens
        tc = {"text_layers": num_layers, "vision_layers": 24, "image_size": 224, "max_position_embeddings": 8192,
              **_PROXY_WIDTHS}
        return {"name": "flops_proxy_video_llava", "family": family, "tiny": True, "device": "cpu", "dtype": "float32",
                "num_layers": num_layers, "visual_tokens": 256, "max_visual_tokens": 2056, "tiny_config": tc}, (224, 224)
    raise ConfigError(f"flops: no shape proxy for family {family!r}")


@functools.lru_cache(maxsize=4)
def _proxy_adapter(family: str, num_layers: int, visual_tokens: int) -> Any:
    from apet_bench.models import load_model

    cfg, _ = _proxy_model_cfg(family, num_layers, visual_tokens)
    with _quiet():
        return load_model(cfg)


@contextlib.contextmanager
def _quiet():
    import logging
    import warnings

    prev = logging.getLogger("transformers").level
    logging.getLogger("transformers").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            logging.getLogger("transformers").setLevel(prev)


def _proxy_plan(family: str, num_layers: int, visual_tokens: int, method: Any) -> TokenPlan:
    """Run ``method`` once on the shape proxy; read the per-layer visual tokens the adapter measured."""
    from PIL import Image

    adapter = _proxy_adapter(family, num_layers, visual_tokens)
    _, size = _proxy_model_cfg(family, num_layers, visual_tokens)
    rng = torch.Generator().manual_seed(0)
    pixels = (torch.rand(size[1], size[0], 3, generator=rng) * 255).to(torch.uint8).numpy()
    image = Image.fromarray(pixels, "RGB")
    vision_lengths: list[int | None] = []
    batch: list[int] = []
    handles = []
    if family != "qwen25vl":
        vt = adapter.vision_tower
        clip_layers = list(getattr(vt, "vision_model", vt).encoder.layers)
        vision_lengths = [None] * len(clip_layers)

        def make(i: int) -> Callable[..., None]:
            def hook(module: Any, args: tuple, kwargs: dict) -> None:
                hs = args[0] if args else kwargs.get("hidden_states")
                if vision_lengths[i] is None and hs is not None:
                    vision_lengths[i] = int(hs.shape[-2])
                    if i == 0:
                        batch.append(int(hs.shape[0]) if hs.dim() == 3 else 1)
            return hook

        handles = [layer.register_forward_pre_hook(make(i), with_kwargs=True) for i, layer in enumerate(clip_layers)]
    try:
        with _quiet():
            out = generate(adapter, [image], "Is there a bus in the image?", {"max_new_tokens": 1}, method)
    finally:
        for hd in handles:
            hd.remove()
    if out.visual_tokens_in != visual_tokens:
        raise RuntimeError(f"flops: proxy produced {out.visual_tokens_in} visual tokens, expected {visual_tokens}")
    planned = out.planned_layer_visual_tokens
    measured = [int(v) for v in out.layer_visual_tokens]
    layers = [int(v) for v in planned] if planned is not None else measured
    full = vision_lengths[0] if vision_lengths else None
    vis = [int(v) for v in vision_lengths] if vision_lengths and any(v != full for v in vision_lengths) else None
    src = (
        f"plan() of method {method.name!r} after a run through the adapter's generate on a tiny random-weight "
        f"{family} shape proxy ({num_layers} decoder layers, {visual_tokens} visual tokens); measured counts "
        f"{'agree' if layers == measured else 'differ: ' + str(measured)}"
    )
    return TokenPlan(out.visual_tokens_in, out.visual_tokens_llm, layers, vis, src,
                     _variant_label(method, layers), crops=batch[0] if batch else 1)


def _variant_label(method: Any, layers: Sequence[int]) -> str:
    if method.stage == "none":
        return "no compression"
    runs = []
    start = 0
    for i in range(1, len(layers) + 1):
        if i == len(layers) or layers[i] != layers[start]:
            runs.append(f"{layers[start]} in L{start}-{i - 1}" if i - 1 > start else f"{layers[start]} in L{start}")
            start = i
    layout = ", ".join(runs)
    variant = getattr(method, "variant", None)
    skip = {"name", "stage", "needs_attention_weights", "budget", "seed", "variant", "numerics"}
    params = {k: v for k, v in method.config_dict().items() if k not in skip and v is not None}
    shown = f" [{', '.join(f'{k}={v}' for k, v in params.items())}]" if params else ""
    return (f"variant={variant}: " if variant else "") + f"plan {layout}{shown}"


def token_plan(
    model: str,
    method: str,
    budget: int | float | None,
    *,
    visual_tokens: int | None = None,
    params: Mapping[str, Any] | None = None,
) -> TokenPlan:
    """The per-layer visual-token plan of ``method`` on the full-size ``model``.

    Parameters
    ----------
    model : str
        Model config name (``llava15``, ``qwen25vl``, ...).
    method : str
        Registry name; the method runs on the shape proxy (module docstring, step 1).
    budget : int or float or None
        Visual-token budget (``apet_bench.budget``); ignored by a method of stage ``"none"``.
    visual_tokens : int, optional
        Visual tokens of the input (LLaVA-1.5: 576, fixed; Qwen2.5-VL: 256..2048, default 729).
    params : mapping, optional
        Method hyper-parameters (default: ``configs/method/<method>.yaml`` ``params``).

    Returns
    -------
    TokenPlan

    Raises
    ------
    ConfigError
        Unknown model, bad visual-token count.
    apet_bench.methods.UnknownMethodError
        An unregistered method (a ``ValueError``).
    """
    family = _family(model)
    num_layers = _text_model(meta_model(family)).config.num_hidden_layers
    n = _default_visual_tokens(family, visual_tokens)
    kwargs = dict(_method_params(method) if params is None else params)
    key = (family, method, budget, n, json.dumps(kwargs, sort_keys=True, default=str))
    if key not in _PLAN_CACHE:
        _PLAN_CACHE[key] = _token_plan(family, method, budget, n, num_layers, kwargs)
    return dataclasses.replace(_PLAN_CACHE[key])


#: Plans already computed in this process (deterministic: the methods are seeded, the proxy fixed).
_PLAN_CACHE: dict[tuple, TokenPlan] = {}


def _build_method(method: str, budget: Any, kwargs: Mapping[str, Any]) -> Any:
    from apet_bench.methods import build_method, get_method_class

    if get_method_class(method).stage == "none":
        budget = None
    return build_method(method, budget=budget, **kwargs) if budget is not None else build_method(method, **kwargs)


def _token_plan(family: str, method: str, budget: Any, n: int, num_layers: int, kwargs: dict[str, Any]) -> TokenPlan:
    m = _build_method(method, budget, kwargs)
    if m.stage == "none" and family in ("llava15", "qwen25vl", "video_llava"):
        return TokenPlan(n, n, [n] * num_layers, None, "no compression", "no compression")
    plan = _proxy_plan(family, num_layers, n, m)
    if m.stage == "none":
        plan.source, plan.variant = "no compression (token counts measured on the shape proxy)", "no compression"
    return plan


def _method_params(method: str) -> dict[str, Any]:
    """Default ``params`` of the method's config (Hydra-composed ``configs/method/<method>.yaml``; empty
    when there is no such config)."""
    from apet_bench.config import group_options, load_group

    if method not in group_options("method"):
        return {}
    return dict(load_group("method", method).get("params") or {})


def _family(model: str) -> str:
    name = model[5:] if model.startswith("tiny_") else model
    if name not in FAMILY_OF_MODEL:
        raise ConfigError(f"flops: unknown model {model!r}; known: {', '.join(FAMILY_OF_MODEL)}")
    return FAMILY_OF_MODEL[name]


def _default_visual_tokens(family: str, visual_tokens: int | None) -> int:
    fixed = {"llava15": 576, "video_llava": 256}
    if visual_tokens is not None and (isinstance(visual_tokens, bool) or not isinstance(visual_tokens, int) or visual_tokens < 1):
        raise ConfigError(f"flops: visual_tokens {visual_tokens!r} is not a positive integer")
    if family in fixed:
        if visual_tokens is not None and visual_tokens != fixed[family]:
            raise ConfigError(f"flops: visual_tokens {visual_tokens} is not possible for {family} (always {fixed[family]} per image)")
        return fixed[family]
    if family == "qwen25vl":
        n = 729 if visual_tokens is None else visual_tokens
        if not 256 <= n <= 2048:
            raise ConfigError(f"flops: visual_tokens {n} is outside Qwen2.5-VL's 256..2048 (min/max_pixels of the paper)")
        return n
    if family == "llava_next":
        if visual_tokens is not None and visual_tokens != 2928:
            raise ConfigError(
                f"flops: visual_tokens {visual_tokens} is not counted for llava_next: it counts a 672x672 image "
                "(base view + 2x2 crops, unpadded, newline tokens: 2928 visual tokens)"
            )
        return 2928
    raise ConfigError(f"flops: unknown family {family!r}")


# ---------------------------------------------------------------------- method overhead
#: Text tokens before the visual span (LLaVA vicuna_v1: system prompt + "USER: " = 35 with BOS;
#: Qwen2.5-VL chat template up to ``<|vision_start|>``: about 15). Methods whose raters / query rows are
#: the tokens after the image read ``OverheadContext.text_tokens_after_image``.
TEXT_BEFORE_IMAGE: dict[str, int] = {"llava15": 35, "llava_next": 35, "video_llava": 35, "qwen25vl": 15}


def overhead_context(family: str, plan: TokenPlan, text_tokens: int) -> OverheadContext:
    """What a method's overhead formula reads: the full-size ``family`` model's dimensions, from its
    published configuration (:func:`full_size_config`), and ``plan``'s token counts.

    Parameters
    ----------
    family : str
        ``llava15``, ``llava_next``, ``qwen25vl`` or ``video_llava``.
    plan : TokenPlan
        The method's per-layer plan (:func:`token_plan`).
    text_tokens : int
        Text tokens of the prompt.

    Returns
    -------
    apet_bench.methods.records.OverheadContext
    """
    model = meta_model(family)
    tc = _text_model(model).config
    d = tc.hidden_size
    head_dim = getattr(tc, "head_dim", None) or d // tc.num_attention_heads
    d_kv = (getattr(tc, "num_key_value_heads", None) or tc.num_attention_heads) * head_dim
    if family == "qwen25vl":
        vcfg = model.model.visual.config
        vision = {"vision_hidden_size": vcfg.hidden_size, "vision_heads": vcfg.num_heads, "vision_has_cls": False,
                  "patches_per_token": vcfg.spatial_merge_size ** 2, "vision_feature_size": d,
                  "projector_flops_per_token": None}
    else:
        vc = _clip_tower(model).config
        vision = {"vision_hidden_size": vc.hidden_size, "vision_heads": vc.num_attention_heads, "vision_has_cls": True,
                  "patches_per_token": 1, "vision_feature_size": vc.hidden_size,
                  "projector_flops_per_token": 2 * (vc.hidden_size * d + d * d)}
    return OverheadContext(
        hidden_size=d, kv_hidden_size=d_kv, num_layers=tc.num_hidden_layers, **vision,
        text_tokens=int(text_tokens), text_tokens_before_image=TEXT_BEFORE_IMAGE.get(family, 0),
        visual_tokens_in=plan.visual_tokens_in, visual_tokens_llm=plan.visual_tokens_llm,
        layer_visual_tokens=tuple(int(v) for v in plan.layer_visual_tokens),
        vision_layer_tokens=None if plan.vision_layer_tokens is None else tuple(plan.vision_layer_tokens),
    )


def method_overhead(method: Any, ctx: OverheadContext) -> dict[str, int]:
    """``method.flops_overhead(ctx)``: FLOPs per term of the method's own computation.

    Raises
    ------
    ConfigError
        One line naming the method, when its class defines no overhead formula.
    """
    try:
        return {str(k): int(v) for k, v in method.flops_overhead(ctx).items()}
    except NotImplementedError as exc:
        raise ConfigError(f"flops: {exc}") from None


# ---------------------------------------------------------------------- the report
@dataclass
class FlopsReport:
    """Prefill TFLOPs of one model × method × budget (see the module docstring for how)."""

    model: str
    model_title: str
    method: str
    budget: int | float | None
    variant: str
    plan_source: str
    visual_tokens_in: int
    visual_tokens_llm: int
    layer_visual_tokens: list[int]
    mean_layer_visual_tokens: float
    text_tokens: int
    text_tokens_source: str
    vision_tflops: float
    llm_tflops: float
    method_tflops: float
    total_tflops: float
    vision_breakdown: dict[str, float]
    llm_breakdown: dict[str, float]
    method_breakdown: dict[str, float]
    vision_layer_tokens: list[int] | None = None
    convention: dict[str, str] = field(default_factory=lambda: dict(CONVENTION))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (every field)."""
        return dataclasses.asdict(self)


def count_flops(
    model: str,
    method: str = "none",
    budget: int | float | None = None,
    *,
    visual_tokens: int | None = None,
    text_tokens: int | None = None,
    params: Mapping[str, Any] | None = None,
) -> FlopsReport:
    """Prefill TFLOPs of ``model`` under ``method`` at ``budget``: vision, LLM, method overhead, total.

    Parameters
    ----------
    model : str
        ``llava15`` (576 visual tokens), ``qwen25vl`` (256..2048, default 729), ``llava_next`` (a 672×672 image,
        2928), ``video_llava`` (an image, 256); any registered method. A
        ``tiny_`` prefix is accepted and counts the full-size model.
    method : str
        Registry name (any registered method).
    budget : int or float or None
        Tokens (int, the paper's average over decoder layers) or a retention ratio (float).
    visual_tokens : int, optional
        Visual tokens of the input (Qwen2.5-VL default 729, the count that reproduces Table 7).
    text_tokens : int, optional
        Text tokens of the prompt; default :data:`POPE_TEXT_TOKENS` (LLaVA family) or
        :data:`QWEN_DEFAULT_TEXT_TOKENS`.
    params : mapping, optional
        Method hyper-parameters (default: its config file's ``params``).

    Returns
    -------
    FlopsReport
        ``total_tflops == vision_tflops + llm_tflops + method_tflops`` (rounding aside, 1e-9).

    Raises
    ------
    ConfigError
        One line naming the bad model / method / budget / token count, or a method without an overhead
        formula.
    apet_bench.methods.UnknownMethodError
        An unregistered method (a ``ValueError``).
    """
    from apet_bench.methods import get_method_class

    family = _family(model)
    compresses = get_method_class(method).stage != "none"
    if compresses:
        from apet_bench.budget import validate_budget

        if budget is None:
            raise ConfigError(f"flops: method {method!r} needs budget=<int tokens | ratio in (0, 1]>")
        budget = validate_budget(budget)
    if text_tokens is not None and (isinstance(text_tokens, bool) or not isinstance(text_tokens, int) or text_tokens < 1):
        raise ConfigError(f"flops: text_tokens {text_tokens!r} is not a positive integer")
    if text_tokens is None:
        if family == "qwen25vl":
            text_tokens, tsrc = QWEN_DEFAULT_TEXT_TOKENS, "default for Qwen2.5-VL (reproduces the paper's 14.52 at 729 visual tokens; no Qwen tokenizer offline)"
        else:
            text_tokens, tsrc = POPE_TEXT_TOKENS, "LLaVA-1.5 POPE prompt, real Llama-2 tokenizer, median over coco_pope_random (61..64)"
    else:
        tsrc = "given"
    mparams = dict(_method_params(method) if params is None else params)
    n_in = _default_visual_tokens(family, visual_tokens)
    if isinstance(budget, int) and compresses and budget > n_in:
        raise ConfigError(f"flops: budget {budget} is above the {n_in} visual tokens of {model}")
    plan = token_plan(model, method, budget if compresses else None, visual_tokens=visual_tokens, params=mparams)
    if isinstance(budget, int) and compresses and budget > plan.visual_tokens_in:
        raise ConfigError(f"flops: budget {budget} is above the {plan.visual_tokens_in} visual tokens of {model}")
    with _quiet():
        vision = count_vision_flops(family, plan.visual_tokens_in, vision_layer_tokens=plan.vision_layer_tokens,
                                    crops=plan.crops)
        llm = count_llm_flops(family, [text_tokens + v for v in plan.layer_visual_tokens])
    overhead = method_overhead(_build_method(method, budget, mparams), overhead_context(family, plan, text_tokens))
    v_t = sum(vision.values()) / TERA
    l_t = sum(llm.values()) / TERA
    m_t = sum(overhead.values()) / TERA
    return FlopsReport(
        model=model,
        model_title=MODEL_TITLE[family],
        method=method,
        budget=budget if compresses else None,
        variant=plan.variant,
        plan_source=plan.source,
        visual_tokens_in=plan.visual_tokens_in,
        visual_tokens_llm=plan.visual_tokens_llm,
        layer_visual_tokens=plan.layer_visual_tokens,
        mean_layer_visual_tokens=round(plan.mean_layer_visual_tokens, 3),
        text_tokens=text_tokens,
        text_tokens_source=tsrc,
        vision_tflops=v_t,
        llm_tflops=l_t,
        method_tflops=m_t,
        total_tflops=v_t + l_t + m_t,
        vision_breakdown={k: v / TERA for k, v in vision.items()},
        llm_breakdown={k: v / TERA for k, v in llm.items()},
        method_breakdown={k: v / TERA for k, v in overhead.items()},
        vision_layer_tokens=plan.vision_layer_tokens,
    )


# ---------------------------------------------------------------------- CLI
def _command() -> Any:
    from apet_bench.cli import REQUIRED, Command, Key

    return Command(
        "python -m apet_bench.flops",
        "Prefill FLOPs of one model + method + budget, counted on the meta device (no weights); prints the "
        "breakdown, then one JSON line.",
        (
            Key("model", REQUIRED, help="llava15, qwen25vl, llava_next or video_llava (tiny_* count as their full-size model)",
                metavar="name"),
            Key("method", "none", help="a registered method (configs/method/)"),
            Key("budget", None, "any", help="visual tokens kept (int) or retention ratio (float in (0, 1]); ignored by none"),
            Key("visual_tokens", None, "any", help="visual tokens per image (Qwen2.5-VL: 256..2048; fixed for the others)"),
            Key("text_tokens", None, "any", help="text tokens of the prompt (default: the benchmark's measured mean)"),
            Key("method.params.", kind="any", help="a method parameter over its config's default"),
        ),
    )


def format_report(r: FlopsReport) -> str:
    """Human-readable lines of a report (the JSON line follows them in :func:`main`)."""
    budget = "full" if r.budget is None else r.budget
    lines = [
        f"{r.model_title} + {r.method} @ {budget}: {r.total_tflops:.3f} TFLOPs prefill "
        f"(meta device, no weights; {r.variant})",
        f"  visual tokens: {r.visual_tokens_in} in, {r.visual_tokens_llm} enter the LLM, "
        f"{r.mean_layer_visual_tokens:g} per decoder layer on average; text tokens {r.text_tokens} ({r.text_tokens_source})",
        f"  vision encoder + projector {r.vision_tflops:.4f} | LLM {r.llm_tflops:.4f} | method overhead {r.method_tflops:.6f}",
        f"  plan: {r.plan_source}",
        "  convention: " + "; ".join(f"{k}: {v}" for k, v in r.convention.items()),
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry: print the breakdown, then one JSON line; bad input -> one line on stderr, exit 2."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    def body(args: dict[str, Any]) -> int:
        params = args["method.params"]
        report = count_flops(
            args["model"], args["method"], args["budget"], visual_tokens=args["visual_tokens"],
            text_tokens=args["text_tokens"], params={**_method_params(args["method"]), **params} if params else None,
        )
        print(format_report(report))
        print(json.dumps(report.to_dict()))
        return 0

    return _command().run(argv, body, (ConfigError, ValueError, KeyError))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
