"""The generate loop: one sample through a model under a compression method, with accounting and times.

:func:`generate` is the only place where a model (:class:`~apet_bench.core.VisualModel`, an adapter of
``apet_bench.models``) and a method (:class:`~apet_bench.core.Compressor`) meet:

1. the model normalises the visuals (family hook ``prepare_visuals``) and a per-call
   :class:`~apet_bench.core.SampleContext` is bound to it; the prompt is built and the processor runs;
2. the budget check: a sample whose largest visual fits an absolute budget runs uncompressed
   (:func:`within_budget`);
3. stage one (methods with stage ``vision`` / ``both``): the model's projector outputs
   (``stage_one_features``), the method's choice per visual
   (:func:`apet_bench.surgery.select_visual_tokens`), the placeholder runs shrunk
   (:func:`apet_bench.surgery.shrink_placeholder_runs`) and the family's ``generate`` inputs
   (family hook ``stage_one_inputs``);
4. stage two (stage ``llm`` / ``both`` with drop layers): :class:`apet_bench.llm_surgery.LLMStageSurgery`
   is active during ``generate``;
5. HF ``generate``, timed (prefill end from a forward hook, total at the end), with per-layer visual-token
   counts, the KV cache per layer, the method's plan and the attention backend of every layer
   (:func:`apet_bench.attention.attention_backends`).

The two stages and the timing convention are described in ``docs/models.md`` and ``docs/efficiency.md``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from apet_bench.attention import attention_backends
from apet_bench.core import STAGE_ONE, STAGE_TWO, Compressor, GenerationOutput, SampleContext, VisualSelection
from apet_bench.llm_surgery import LLMStageSurgery
from apet_bench.methods.none import NoCompression
from apet_bench.models.base import ModelAdapter
from apet_bench.surgery import count_placeholders, select_visual_tokens, shrink_placeholder_runs

__all__ = [
    "DEFAULT_MAX_NEW_TOKENS",
    "PrefillProbe",
    "apply_visual_stage",
    "generate",
    "generate_kwargs_for",
    "within_budget",
]

#: ``max_new_tokens`` when the caller's ``generate_kwargs`` give none.
DEFAULT_MAX_NEW_TOKENS = 128


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


class PrefillProbe:
    """Hooks that time the prefill forward and record each decoder layer's prefill sequence length.

    A forward hook on the top-level model stamps the end of its first call (the prefill; generate
    calls ``self(...)``, transformers ``generation/utils.py::_prefill``); forward pre-hooks on every
    decoder layer record ``hidden_states.shape[1]`` at their first call. Registered after the method's
    own hooks, so they see the sequence after any stage-two drop.

    Attributes
    ----------
    prefill_end : float or None
        ``clock()`` value (s) at the end of the first forward of the model.
    layer_lengths : list of int or None
        ``(num_layers,)``: tokens at the input of each decoder layer during prefill.
    """

    def __init__(self, model: nn.Module, layers: Sequence[nn.Module], clock: Callable[[], float]):
        self._model = model
        self._layers = list(layers)
        self._clock = clock
        self.prefill_end: float | None = None
        self.layer_lengths: list[int | None] = [None] * len(self._layers)
        self._handles: list[Any] = []

    def __enter__(self) -> PrefillProbe:
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


def generate_kwargs_for(model: ModelAdapter, generate_kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    """HF ``generate`` kwargs: greedy, :data:`DEFAULT_MAX_NEW_TOKENS`, then the caller's, with
    ``return_dict_in_generate=True`` always and ``pad_token_id`` when the checkpoint has none."""
    kwargs: dict[str, Any] = {"max_new_tokens": DEFAULT_MAX_NEW_TOKENS, "do_sample": False, "num_beams": 1}
    kwargs.update(dict(generate_kwargs or {}))
    kwargs["return_dict_in_generate"] = True
    if getattr(model.model.generation_config, "pad_token_id", None) is None and "pad_token_id" not in kwargs:
        kwargs["pad_token_id"] = model.pad_token_id
    return kwargs


def apply_visual_stage(
    model: ModelAdapter, inputs: Mapping[str, Any], method: Compressor
) -> tuple[dict[str, Any], list[VisualSelection]]:
    """Stage one: compress the projector outputs and build the matching ``generate`` inputs.

    The visual tokens from ``model.stage_one_features`` (recorded on ``model.visual_context``), the
    method's choice per visual (:func:`apet_bench.surgery.select_visual_tokens`), each visual's
    placeholder run (``model.stage_one_placeholder_id(inputs)``) shrunk to its kept count
    (:func:`apet_bench.surgery.shrink_placeholder_runs`, padding with ``model.pad_token_id``), then the
    family's ``generate`` inputs (``model.stage_one_inputs``: ``mm_encoder_outputs`` in place of the
    pixels; Qwen2.5-VL also keeps each kept token's mRoPE position).

    Parameters
    ----------
    model : ModelAdapter
    inputs : mapping
        Processor outputs (``input_ids`` ``(1, seq_len)``, optional ``attention_mask``).
    method : Compressor
        A stage-one method whose context is open.

    Returns
    -------
    gen_inputs : dict
        ``input_ids`` / ``attention_mask`` ``(1, new_seq_len)`` and ``mm_encoder_outputs`` (+ family extras).
    selections : list of VisualSelection
        One per visual.

    Raises
    ------
    ValueError
        If the method returns malformed tokens (:func:`apet_bench.surgery.select_visual_tokens`).
    """
    features = model.stage_one_features(inputs, method)
    selections = select_visual_tokens(method, features)
    shrunk = shrink_placeholder_runs(
        inputs["input_ids"],
        inputs.get("attention_mask"),
        model.stage_one_placeholder_id(inputs),
        [int(f.shape[0]) for f in features],
        selections,
        model.pad_token_id,
    )
    return model.stage_one_inputs(inputs, selections, shrunk), selections


def generate(
    model: ModelAdapter,
    images: Any,
    question: str,
    generate_kwargs: Mapping[str, Any] | None = None,
    method: Compressor | None = None,
) -> GenerationOutput:
    """Answer ``question`` about ``images`` (batch size 1) with ``model`` under compression ``method``.

    Path: visuals (``model.prepare_visuals``) -> prompt (``model.build_prompt``) -> processor ->
    if ``method.stage`` is ``"none"`` or ``"llm"``, plain ``model.model.generate(**inputs)`` (the ``none``
    output is exactly the HF model's); if it is ``"vision"`` or ``"both"``, :func:`apply_visual_stage`
    then ``generate`` on the shrunk inputs. For ``"llm"`` / ``"both"`` methods with drop layers
    (``method.llm_layers()``), the stage-two surgery is active during ``generate``. Everything runs inside
    ``with method(model):`` (its hooks) and ``torch.inference_mode()``.

    Parameters
    ----------
    model : ModelAdapter
        A loaded model (``apet_bench.models.load_model``).
    images : PIL image, sequence of PIL images, or what the family accepts
        The sample's visuals (one placeholder each); may be empty. Video-LLaVA also takes video paths,
        ``VideoClip`` objects and ``(T, H, W, 3)`` arrays.
    question : str
        The question, already formatted by the task.
    generate_kwargs : mapping, optional
        HF ``generate`` kwargs (``max_new_tokens``, ``do_sample``, ``num_beams``, ``temperature``,
        ``top_p``, ``output_logits``, ...). Greedy and :data:`DEFAULT_MAX_NEW_TOKENS` by default.
    method : Compressor, optional
        Defaults to ``none``.

    Returns
    -------
    GenerationOutput
        Answer, token accounting (tokens) and wall times (ms).

    Raises
    ------
    ValueError
        If a stage-one method returns malformed tokens, or the family refuses the visuals (e.g. images and
        videos mixed in one Video-LLaVA sample).
    """
    if method is None:
        method = NoCompression()
    t_pre = time.perf_counter()
    visuals, kind = model.prepare_visuals(images)
    ctx = SampleContext(model, kind=kind)
    model.visual_context = ctx
    try:
        return _generate(model, ctx, visuals, question, generate_kwargs, method, t_pre)
    finally:
        ctx.release()


def _generate(
    model: ModelAdapter,
    ctx: SampleContext,
    visuals: list[Any],
    question: str,
    generate_kwargs: Mapping[str, Any] | None,
    method: Compressor,
    t_pre: float,
) -> GenerationOutput:
    prompt = model.build_prompt(question, num_images=len(visuals))
    inputs = model.prepare_inputs(visuals, prompt)
    ctx.inputs = inputs
    kwargs = generate_kwargs_for(model, generate_kwargs)
    visual_in = count_placeholders(inputs["input_ids"], model.visual_token_id, inputs.get("attention_mask"))
    kept: list[list[int]] | None = None
    # The budget is per visual input (image or video): the sample is left whole when its largest one fits.
    uncompressed = within_budget(method, visual_in)
    if not uncompressed and len(visuals) > 1 and within_budget(method, 1):
        uncompressed = within_budget(method, max(int(v.num_tokens) for v in ctx.segments))
    suspend: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    if uncompressed:  # the span fits the budget: all visual tokens kept, the method's hooks off for this sample
        suspend, method = method.suspended(model), NoCompression()
    with torch.inference_mode(), suspend, method(model):
        t0 = model.clock()
        preprocess_ms = (t0 - t_pre) * 1e3
        with contextlib.ExitStack() as stack:
            surgery = None
            if method.stage in STAGE_TWO and method.llm_layers():
                surgery = stack.enter_context(LLMStageSurgery(model, method))  # before the probe's hooks
            probe = stack.enter_context(PrefillProbe(model.model, model.decoder_layers, model.clock))
            if method.stage in STAGE_ONE and len(visuals) > 0:
                gen_inputs, selections = apply_visual_stage(model, inputs, method)
                reports = [s.kept_indices if s.kept_indices is not None else s.reported_indices for s in selections]
                if all(r is not None for r in reports):
                    kept = [r.tolist() for r in reports]  # type: ignore[union-attr]  (-1: no original token)
            else:
                gen_inputs = dict(inputs)
            out = model.model.generate(**gen_inputs, **kwargs)
            t1 = model.clock()
            backends = attention_backends(model, method)  # hooks and row captures still attached
            ctx.visual_tokens = None  # release per-sample tensors; segments and inputs stay readable
            ctx.vision_features = None
            if surgery is not None and surgery.kept_positions and len(visuals) == 1:
                last = surgery.kept_positions[max(surgery.kept_positions)][0]
                vis = model.visual_positions(gen_inputs["input_ids"][:1], gen_inputs.get("attention_mask"))[0]
                in_run = torch.searchsorted(vis, last.to(vis.device))
                if kept is not None:  # stage one then two: indices into the original tokens
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
    visual_llm = count_placeholders(input_ids[0], model.visual_token_id, row_mask)
    layer_visual = [visual_llm - (prompt_tokens - n) if n is not None else visual_llm for n in probe.layer_lengths]
    plan = [int(n) for n in method.plan(model, visual_llm)]
    new_ids = out.sequences[0, prompt_len:].tolist()
    text = model.tokenizer.decode(new_ids, skip_special_tokens=True).strip()
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
        num_images=len(visuals),
        attention_backends=backends,
        logits=tuple(out.logits) if getattr(out, "logits", None) is not None else None,
        uncompressed=uncompressed,
    )
