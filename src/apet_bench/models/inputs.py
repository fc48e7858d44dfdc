"""What a model receives, built as the official evaluation builds it: chat templates, token ids, pixels.

The official ApET evaluation (MaQianKun0/ApET @ 70cc01b, a fork of haotian-liu/LLaVA, LLaVA-NeXT,
Qwen2.5-VL and Video-LLaVA with their eval scripts) builds the LLaVA-family prompt with a conversation
template and tokenizes it with ``tokenizer_image_token`` (``llava/mm_utils.py``): the prompt is split
at ``<image>``, every chunk is tokenized on its own (BOS kept only on the first) and the image index
``IMAGE_TOKEN_INDEX = -200`` goes between the chunks. Because every chunk is tokenized from its own
start, the chunk after an image begins with SentencePiece's word-start piece ``▁`` (id 29871) before
``\\n`` (13). A HF tokenizer that tokenizes the whole prompt with ``<image>`` as a special token gives
``▁`` or not depending on its ``legacy`` flag; the functions here always give the official ids.

The HF models want one placeholder id per visual token instead of one ``-200`` per image:
:func:`expand_image_index` replaces each ``-200`` by its run of placeholders, and
:func:`collapse_placeholder_runs` goes back (what ``python -m apet_bench.inspect`` prints as
``input_ids_collapsed``).

Pixels: LLaVA-1.5 pads each image to a square with the CLIP mean colour (``expand2square``,
``image_aspect_ratio=pad``) before CLIP's 336 px resize; transformers' ``LlavaImageProcessorPil`` with
``do_pad=True`` does exactly that (bit-identical, ``tests/test_model_inputs.py``). Qwen2.5-VL's loader
(``qwen_vl_utils.fetch_image``) resizes once with ``smart_resize`` under its own pixel bounds before
the processor resizes again (:func:`qwen_fetch_image`). Video-LLaVA's video transform normalises,
then resizes and crops (:func:`video_llava_video_transform`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "IMAGE_TOKEN_INDEX",
    "LLAVA_V1_SYSTEM",
    "QWEN_FETCH_MAX_PIXELS",
    "QWEN_FETCH_MIN_PIXELS",
    "SENTENCEPIECE_ATTR",
    "attach_sentencepiece",
    "VICUNA_V1_SYSTEM",
    "collapse_placeholder_runs",
    "conversation_prompt",
    "expand_image_index",
    "llama_tokenizer_from_sentencepiece",
    "placeholder_runs",
    "qwen_fetch_image",
    "tokenizer_image_token",
    "video_llava_video_transform",
]

#: The image index the official LLaVA code puts in ``input_ids`` where an image goes (``llava/constants.py``).
IMAGE_TOKEN_INDEX = -200
#: ``conv_vicuna_v1`` system prompt (``llava/conversation.py``): the official LLaVA-1.5 / 1.6 eval scripts
#: run ``--conv-mode vicuna_v1``.
VICUNA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
#: ``conv_llava_v1`` system prompt (``videollava/conversation.py``): Video-LLaVA's video QA
#: (``run_inference_video_qa.py``, ``conv_mode = "llava_v1"``).
LLAVA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
#: Attribute of a HF tokenizer holding the ``sentencepiece.SentencePieceProcessor`` of its ``tokenizer.model``.
SENTENCEPIECE_ATTR = "apet_sentencepiece"
#: OpenAI CLIP normalisation (``OPENAI_DATASET_MEAN`` / ``STD``), the LLaVA family's image mean and std.
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
#: ``qwen_vl_utils.fetch_image`` pixel bounds when the message gives none (4 and 16384 tokens of 28 x 28 px).
QWEN_FETCH_MIN_PIXELS = 4 * 28 * 28
QWEN_FETCH_MAX_PIXELS = 16384 * 28 * 28


def conversation_prompt(system: str, body: str) -> str:
    """``"{system} USER: {body} ASSISTANT:"``: one user turn of the ``vicuna_v1`` / ``llava_v1`` templates.

    Both templates use ``SeparatorStyle.TWO`` with ``sep=" "``; ``get_prompt()`` after
    ``append_message(USER, body)`` and ``append_message(ASSISTANT, None)`` gives this string
    (``llava/conversation.py``).

    Parameters
    ----------
    system : str
        :data:`VICUNA_V1_SYSTEM` or :data:`LLAVA_V1_SYSTEM`.
    body : str
        The user message, e.g. ``"<image>\\n{question}"``.

    Returns
    -------
    str
    """
    return f"{system} USER: {body} ASSISTANT:"


def tokenizer_image_token(prompt: str, tokenizer: Any, image_token: str = "<image>") -> list[int]:
    """Token ids of ``prompt`` with :data:`IMAGE_TOKEN_INDEX` per ``image_token``, as LLaVA's ``tokenizer_image_token``.

    The prompt is split at ``image_token``; each chunk is tokenized on its own with
    ``tokenizer(chunk).input_ids`` (BOS included when the tokenizer adds one); the first chunk's BOS is
    kept, the other chunks' BOS dropped, and ``-200`` goes between consecutive chunks
    (``llava/mm_utils.py::tokenizer_image_token``, haotian-liu/LLaVA and MaQianKun0/ApET @ 70cc01b).
    No chunk contains a special token, so the result does not depend on the tokenizer's ``legacy`` flag.
    The official code loads the slow SentencePiece tokenizer (``use_fast=False``); when ``tokenizer``
    carries its SentencePiece model (attribute :data:`SENTENCEPIECE_ATTR`, set by
    :func:`llama_tokenizer_from_sentencepiece` and by the LLaVA-family loaders when the checkpoint has a
    ``tokenizer.model``) the chunks are encoded with it, because the fast BPE conversion splits runs of
    spaces differently (``"▁▁" "to"`` vs ``"▁" "▁to"``: 52 of LLaVA's 4,377 MMBench-dev prompts).

    Parameters
    ----------
    prompt : str
    tokenizer : callable
        ``tokenizer(text).input_ids`` -> list of int, plus ``bos_token_id`` (a HF tokenizer).
    image_token : str
        The placeholder string the prompt is split at.

    Returns
    -------
    list of int
        One ``-200`` per occurrence of ``image_token``.
    """
    sp = getattr(tokenizer, SENTENCEPIECE_ATTR, None)
    bos = getattr(tokenizer, "bos_token_id", None)
    if sp is not None:  # the slow Llama tokenizer the official code loads (use_fast=False): BOS + sp.encode
        chunks = [([bos] if bos is not None else []) + list(sp.encode(chunk)) for chunk in prompt.split(image_token)]
    else:
        chunks = [list(tokenizer(chunk).input_ids) for chunk in prompt.split(image_token)]
    ids: list[int] = []
    offset = 0
    if chunks and chunks[0] and bos is not None and chunks[0][0] == bos:
        offset = 1
        ids.append(chunks[0][0])
    for i, chunk in enumerate(chunks):
        if i:
            ids.append(IMAGE_TOKEN_INDEX)
        ids.extend(int(t) for t in chunk[offset:])
    return ids


def expand_image_index(ids: Sequence[int], run_lengths: Sequence[int], token_ids: Sequence[int] | int) -> list[int]:
    """Replace the ``k``-th :data:`IMAGE_TOKEN_INDEX` of ``ids`` by ``run_lengths[k]`` copies of its placeholder id.

    Parameters
    ----------
    ids : sequence of int
        Official ids (:func:`tokenizer_image_token`).
    run_lengths : sequence of int
        Visual tokens of each image index, in order (576 per LLaVA-1.5 image, 257 per Video-LLaVA frame).
    token_ids : int or sequence of int
        The HF model's placeholder id, for all image indices or per image index.

    Returns
    -------
    list of int
        ``len(ids) - n + sum(run_lengths)`` ids.

    Raises
    ------
    ValueError
        When ``ids`` holds a different number of image indices than ``run_lengths`` has entries.
    """
    n = sum(1 for t in ids if t == IMAGE_TOKEN_INDEX)
    if n != len(run_lengths):
        raise ValueError(f"prompt holds {n} image index(es) for {len(run_lengths)} visual run(s)")
    tokens = [int(token_ids)] * n if isinstance(token_ids, int) else [int(t) for t in token_ids]
    out: list[int] = []
    k = 0
    for t in ids:
        if t == IMAGE_TOKEN_INDEX:
            out.extend([tokens[k]] * int(run_lengths[k]))
            k += 1
        else:
            out.append(int(t))
    return out


def placeholder_runs(ids: Sequence[int], token_ids: Sequence[int] | int) -> list[tuple[int, int]]:
    """``(start, length)`` of every maximal run of placeholder ids in ``ids``.

    Parameters
    ----------
    ids : sequence of int
    token_ids : int or sequence of int
        Placeholder ids (e.g. ``<image>``'s 32000, or Video-LLaVA's ``<image>`` and ``<video>``).

    Returns
    -------
    list of (int, int)
    """
    wanted = {int(token_ids)} if isinstance(token_ids, int) else {int(t) for t in token_ids}
    runs: list[tuple[int, int]] = []
    start = None
    for i, t in enumerate(list(ids) + [None]):
        hit = t is not None and int(t) in wanted
        if hit and start is None:
            start = i
        elif not hit and start is not None:
            runs.append((start, i - start))
            start = None
    return runs


def collapse_placeholder_runs(
    ids: Sequence[int], token_ids: Sequence[int] | int, split: Sequence[int] | None = None
) -> list[int]:
    """Replace each run of placeholder ids by :data:`IMAGE_TOKEN_INDEX` (the official convention).

    Parameters
    ----------
    ids : sequence of int
    token_ids : int or sequence of int
        Placeholder ids.
    split : sequence of int, optional
        Per run, how many ``-200`` it stands for (a Video-LLaVA video run of 8 frames stands for
        8 image indices, one per frame, as the official prompt has); default 1 each.

    Returns
    -------
    list of int

    Raises
    ------
    ValueError
        When ``split`` does not have one entry per run.
    """
    runs = placeholder_runs(ids, token_ids)
    if split is not None and len(split) != len(runs):
        raise ValueError(f"split has {len(split)} entries for {len(runs)} placeholder run(s)")
    out: list[int] = []
    pos = 0
    for k, (start, length) in enumerate(runs):
        out.extend(int(t) for t in ids[pos:start])
        out.extend([IMAGE_TOKEN_INDEX] * (int(split[k]) if split is not None else 1))
        pos = start + length
    out.extend(int(t) for t in ids[pos:])
    return out


def llama_tokenizer_from_sentencepiece(path: str, *, legacy: bool = True, slow_chunks: bool = True) -> Any:
    """A HF ``LlamaTokenizer`` from a Llama-2 / Vicuna SentencePiece ``tokenizer.model``, ``<image>`` and ``<pad>`` added.

    The vocabulary and scores are read with ``sentencepiece`` (no protobuf), the BPE merges derived by
    ``transformers.tokenization_utils_base.generate_merges``; then ``<image>`` (32000) and ``<pad>``
    (32001) are added as special tokens, as in ``llava-hf/llava-1.5-7b-hf``'s tokenizer. Each text
    tokenizes to ``[1] + SentencePieceProcessor.encode(text)`` (tested on the POPE questions).

    Parameters
    ----------
    path : str
        The ``tokenizer.model`` file.
    legacy : bool
        The HF ``legacy`` flag (changes what follows a special token; :func:`tokenizer_image_token` is
        unaffected).
    slow_chunks : bool
        Attach the SentencePiece model so :func:`tokenizer_image_token` encodes chunks as the official
        slow tokenizer (default); ``False`` leaves the fast BPE tokenizer alone.

    Returns
    -------
    transformers.LlamaTokenizer

    Raises
    ------
    ValueError
        One line, when ``path`` is not a readable SentencePiece model.
    """
    import os

    import sentencepiece as spm
    from transformers import LlamaTokenizer
    from transformers.tokenization_utils_base import generate_merges

    if not os.path.isfile(path):
        raise ValueError(f"tokenizer {path!r} is not a file")
    try:
        sp = spm.SentencePieceProcessor(model_file=str(path))
    except Exception as exc:  # noqa: BLE001 - sentencepiece raises RuntimeError/OSError variants
        raise ValueError(f"tokenizer {path!r} is not a SentencePiece model ({type(exc).__name__})") from None
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    tok = LlamaTokenizer(vocab=vocab, merges=generate_merges(vocab), legacy=legacy, add_bos_token=True)
    tok.add_tokens(["<image>"], special_tokens=True)
    tok.add_special_tokens({"pad_token": "<pad>"})
    if slow_chunks:
        setattr(tok, SENTENCEPIECE_ATTR, sp)
    return tok


def attach_sentencepiece(tokenizer: Any, path: str) -> bool:
    """Give ``tokenizer`` the SentencePiece model at ``path`` for :func:`tokenizer_image_token` (see there).

    Returns
    -------
    bool
        Whether ``path`` was a readable SentencePiece model with the tokenizer's BOS id (else nothing changes).
    """
    import os

    if not path or not os.path.isfile(path):
        return False
    try:
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(path))
    except Exception:  # noqa: BLE001 - not a SentencePiece model: keep the HF tokenizer's own chunks
        return False
    if getattr(tokenizer, "bos_token_id", None) != sp.bos_id():
        return False
    setattr(tokenizer, SENTENCEPIECE_ATTR, sp)
    return True


# ---------------------------------------------------------------------- pixels
def qwen_fetch_image(image: Any, *, factor: int = 28, min_pixels: int = QWEN_FETCH_MIN_PIXELS,
                     max_pixels: int = QWEN_FETCH_MAX_PIXELS) -> Any:
    """The image as ``qwen_vl_utils.fetch_image`` hands it to the processor (the first of Qwen's two resizes).

    ``smart_resize(height, width, factor=28, min_pixels=4·28², max_pixels=16384·28²)`` (the loader's
    defaults when the message gives no bounds, as ApET's ``qwen/eval/model_vqa_loader.py`` does), then
    ``PIL.Image.resize((w, h))`` with PIL's default filter (bicubic). The processor then resizes again
    under the model's ``min_pixels`` / ``max_pixels``.

    Parameters
    ----------
    image : PIL.Image.Image
        RGB.
    factor, min_pixels, max_pixels : int

    Returns
    -------
    PIL.Image.Image
        Sides multiples of ``factor``.
    """
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    w, h = image.size
    rh, rw = smart_resize(h, w, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
    return image.resize((rw, rh))


def video_llava_video_transform(
    frames: np.ndarray, *, size: int = 224, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD,
    flip_generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Video-LLaVA's evaluation transform of sampled frames: ``/255`` -> normalise -> short side ``size`` -> centre crop.

    ``get_video_transform`` (decord branch) of
    ``videollava/model/multimodal_encoder/languagebind/video/processing_video.py`` (MaQianKun0/ApET @
    70cc01b): ``x / 255.0``, ``NormalizeVideo(mean, std)``, ``ShortSideScale(224)`` (pytorchvideo:
    bilinear ``interpolate``, ``align_corners=False``, no antialias, long side ``floor(long/short·224)``),
    ``CenterCropVideo(224)`` (offsets ``round((h - 224) / 2)``), then ``RandomHorizontalFlipVideo(p=0.5)``,
    which is left in the evaluation transform upstream: applied here only when ``flip_generator`` is
    given (one draw per video, ``torch.rand(1) < 0.5``).

    Parameters
    ----------
    frames : numpy.ndarray
        ``(T, H, W, 3)`` uint8 RGB.
    size : int
        Short side and crop (224).
    mean, std : sequence of float
    flip_generator : torch.Generator, optional
        Seeded generator for the random flip; ``None`` = no flip.

    Returns
    -------
    torch.Tensor
        ``(T, 3, size, size)`` float32.

    Raises
    ------
    ValueError
        For frames that are not ``(T, H, W, 3)`` uint8.
    """
    arr = np.asarray(frames)
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"video frames must be (T, H, W, 3) uint8, got {arr.shape} {arr.dtype}")
    x = torch.from_numpy(arr).permute(3, 0, 1, 2)  # (C, T, H, W), as decord's get_batch().permute(3, 0, 1, 2)
    x = x / 255.0
    m = torch.as_tensor(mean, dtype=x.dtype)[:, None, None, None]
    s = torch.as_tensor(std, dtype=x.dtype)[:, None, None, None]
    x = (x - m) / s
    _, _, h, w = x.shape
    if w < h:
        nh, nw = int(math.floor(float(h) / w * size)), size
    else:
        nh, nw = size, int(math.floor(float(w) / h * size))
    x = torch.nn.functional.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False)
    i = int(round((nh - size) / 2.0))
    j = int(round((nw - size) / 2.0))
    x = x[..., i : i + size, j : j + size]
    if flip_generator is not None and bool(torch.rand(1, generator=flip_generator) < 0.5):
        x = x.flip(-1)
    return x.permute(1, 0, 2, 3).contiguous()



def official_input_ids(prompt: str, tokenizer: Any, run_lengths: Sequence[int], placeholder_ids: Sequence[int] | int,
                       image_token: str = "<image>") -> torch.Tensor:
    """``(1, seq_len)`` ids for a HF LLaVA-family model: :func:`tokenizer_image_token`, then :func:`expand_image_index`.

    Parameters
    ----------
    prompt : str
        The conversation prompt with one ``image_token`` per image (per frame for a Video-LLaVA video).
    tokenizer : transformers tokenizer
    run_lengths : sequence of int
        Visual tokens per ``image_token`` occurrence, in order.
    placeholder_ids : int or sequence of int
        The model's placeholder id(s) (``<image>``; Video-LLaVA frames: ``<video>``).
    image_token : str

    Returns
    -------
    torch.Tensor
        Long ``(1, len(official) - n + sum(run_lengths))``.

    Raises
    ------
    ValueError
        When the prompt holds a different number of ``image_token`` than ``run_lengths`` has entries.
    """
    ids = expand_image_index(tokenizer_image_token(prompt, tokenizer, image_token), run_lengths, placeholder_ids)
    return torch.tensor([ids], dtype=torch.long)


def with_official_ids(inputs: Any, prompt: str, tokenizer: Any, placeholder_id: int,
                      image_token: str = "<image>", processor: Any = None) -> Any:
    """Processor outputs with ``input_ids`` / ``attention_mask`` rebuilt from the official tokenization.

    The processor's own ids fix how many placeholders each image gets (576 for LLaVA-1.5, the anyres
    span for LLaVA-NeXT); the text around them is re-tokenized chunk by chunk
    (:func:`official_input_ids`), so ``<image>`` is followed by ``▁ \\n`` (29871, 13) whatever the
    tokenizer's ``legacy`` flag.

    Parameters
    ----------
    inputs : transformers.BatchFeature
        ``processor(images=..., text=prompt)`` with ``input_ids`` ``(1, n)``.
    prompt, tokenizer, placeholder_id, image_token
        As :func:`official_input_ids`.
    processor : transformers.ProcessorMixin, optional
        When it has ``replace_image_token`` (LLaVA, LLaVA-NeXT, Video-LLaVA), each image's count is
        read from it (adjacent images' runs can touch); otherwise from the runs in the processor's ids.

    Returns
    -------
    transformers.BatchFeature
        The same object, ``input_ids`` and ``attention_mask`` (all ones) replaced.

    Raises
    ------
    ValueError
        When the processor's placeholder runs do not match the prompt's images.
    """
    row = inputs["input_ids"][0].tolist()
    n_images = prompt.count(image_token)
    if processor is not None and hasattr(processor, "replace_image_token") and n_images and "pixel_values" in inputs:
        token = getattr(processor, "image_token", image_token)
        pixels = inputs["pixel_values"]
        if pixels.dtype == torch.bfloat16:  # the processor reads the shape through numpy, which has no bfloat16
            pixels = pixels.float()
        runs = [len(processor.replace_image_token({**inputs, "pixel_values": pixels}, i)) // len(token)
                for i in range(n_images)]
        if sum(runs) != sum(1 for t in row if t == placeholder_id):
            raise ValueError(f"processor placeholders ({sum(1 for t in row if t == placeholder_id)}) differ from "
                             f"the per-image counts {runs}")
    else:
        runs = [length for _, length in placeholder_runs(row, placeholder_id)]
    ids = official_input_ids(prompt, tokenizer, runs, placeholder_id, image_token)
    inputs["input_ids"] = ids
    inputs["attention_mask"] = torch.ones_like(ids)
    return inputs
