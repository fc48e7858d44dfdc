"""Our lmms-eval model class: runs an apet-bench model adapter with a compression method.

Registered through the ``lmms_eval.models`` entry point (pyproject.toml), so lmms-eval's own CLI
can use it too::

    lmms-eval --model apet_bench --model_args model=tiny_llava15,method=random,budget=64 \
        --tasks apet_demo --include_path <task dir>

The runner (:mod:`apet_bench.runner`) passes a ready instance instead, so it can read the per-sample
token accounting afterwards. Batch size is 1 (lmms-eval's HF wrappers assume it; batching shifts
scores, lmms-eval issue #236).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any

from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from tqdm import tqdm

from apet_bench.pipeline import generate

__all__ = ["ApetBenchLMM", "SampleRecord", "manifests", "translate_gen_kwargs"]

MODEL_ID = "apet_bench"


def manifests():
    """Entry point for ``lmms_eval.models``: the manifest of :class:`ApetBenchLMM`."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=MODEL_ID, simple_class_path="apet_bench.eval.lmms_model.ApetBenchLMM")]


def translate_gen_kwargs(gen_kwargs: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """lmms-eval task ``generation_kwargs`` -> (HF ``generate`` kwargs, stop strings).

    Follows lmms-eval's ``models/simple/llava_hf.py``: ``temperature`` 0 means greedy
    (``do_sample=False``), ``max_new_tokens`` defaults to 1024, ``num_beams`` to 1; ``until`` becomes
    stop strings cut from the decoded answer.

    Raises
    ------
    ValueError
        ``until`` that is neither a string nor a list of strings.
    """
    kw = dict(gen_kwargs or {})
    until = kw.pop("until", None) or []
    if isinstance(until, str):
        until = [until]
    if not isinstance(until, list) or not all(isinstance(u, str) for u in until):
        raise ValueError(f"gen_kwargs until={until!r} must be a string or a list of strings")
    temperature = float(kw.pop("temperature", 0) or 0)
    do_sample = bool(kw.pop("do_sample", False)) or temperature > 0
    hf: dict[str, Any] = {
        "max_new_tokens": int(kw.pop("max_new_tokens", 1024)),
        "num_beams": int(kw.pop("num_beams", 1) or 1),
        "do_sample": do_sample,
    }
    top_p = kw.pop("top_p", None)
    if do_sample:
        hf["temperature"] = temperature
        if top_p is not None:
            hf["top_p"] = float(top_p)
    for drop in ("image_aspect_ratio", "image_sizes"):
        kw.pop(drop, None)
    hf.update(kw)
    return hf, until


@dataclass
class SampleRecord:
    """Token accounting and timing of one request (one line of ``samples.jsonl`` with the answer)."""

    task: str
    doc_id: int
    visual_tokens_in: int
    visual_tokens_llm: int
    layer_visual_tokens: list[int]
    prompt_tokens: int
    output_tokens: int
    prefill_ms: float
    total_ms: float
    kept_indices: list[list[int]] | None = None
    planned_layer_visual_tokens: list[int] | None = None
    kv_cache_tokens: list[int] | None = None
    attention_backends: dict[str, Any] | None = None
    #: The visual span was at or below the absolute budget: all visual tokens kept, method not applied.
    uncompressed: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


class ApetBenchLMM(lmms):
    """lmms-eval ``simple`` model running :func:`apet_bench.pipeline.generate` under a compression method.

    Parameters
    ----------
    adapter : apet_bench.models.ModelAdapter, optional
        A loaded model adapter (the runner passes one). Built from the config otherwise.
    compressor : apet_bench.methods.TokenCompressor, optional
        The method instance. Built from the config otherwise.
    model, method, budget, seed : optional
        Config choices, used when ``adapter``/``compressor`` are not given (the lmms-eval CLI path):
        the config is composed from ``configs/`` with these overrides.
    batch_size : int
        Must be 1.
    """

    is_simple = True

    def __init__(
        self,
        adapter: Any = None,
        compressor: Any = None,
        model: str | None = None,
        method: str | None = None,
        budget: Any = None,
        seed: int | None = None,
        batch_size: int | str | None = 1,
        device: str | None = None,
        max_batch_size: int | None = None,
        **overrides: Any,
    ) -> None:
        super().__init__()
        if batch_size not in (None, 1, "1"):
            raise ValueError(f"batch_size {batch_size!r} is not supported: apet-bench evaluates with batch size 1")
        if adapter is None or compressor is None:
            adapter, compressor = self._build_from_config(model, method, budget, seed, device, overrides)
        # Held in a plain dict so lmms-eval's ``clean()`` (which deletes nn.Module attributes) leaves the
        # cached model alone; the runner reuses it across methods.
        self._state = {"adapter": adapter, "compressor": compressor}
        self.records: list[SampleRecord] = []
        #: task -> the generation kwargs its requests carried (the task's ``generation_kwargs`` with lmms-eval's
        #: ``gen_kwargs`` overrides merged in), as received, before :func:`translate_gen_kwargs`.
        self.generation_kwargs: dict[str, dict[str, Any]] = {}
        #: Optional per-sample store (:class:`apet_bench.results.SampleStore`): answers kept across a kill.
        self.sample_store: Any = None
        self.resumed = 0
        self.task_dict: dict[str, Any] = {}

    @staticmethod
    def _build_from_config(model, method, budget, seed, device, overrides):
        from omegaconf import OmegaConf

        from apet_bench.config import compose
        from apet_bench.methods import build_method
        from apet_bench.models import load_model

        ovs = [f"{k}={v}" for k, v in (("model", model), ("method", method), ("budget", budget), ("seed", seed))
               if v is not None]
        if device is not None:
            ovs.append(f"model.device={device}")
        ovs += [f"{k}={v}" for k, v in overrides.items()]
        cfg = compose(ovs)
        cfg = OmegaConf.to_container(cfg, resolve=True)
        adapter = load_model(cfg["model"])
        compressor = build_method(cfg["method"]["name"], budget=cfg.get("budget"), seed=cfg.get("seed", 0),
                                  **(cfg["method"].get("params") or {}))
        return adapter, compressor

    @property
    def adapter(self):
        return self._state["adapter"]

    @property
    def compressor(self):
        return self._state["compressor"]

    @property
    def device(self):
        return self.adapter.device

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        """Answer each request (batch size 1); records a :class:`SampleRecord` per request.

        Returns lmms-eval's ``GenerationResult`` (``lmms_eval/api/instance.py``, 0.7.3) per request: the
        answer with the measured ``TokenCounts``: ``input_tokens`` = tokens entering the LLM at prefill
        (text + visual tokens after stage 1, :attr:`GenerationOutput.prompt_tokens`), ``output_tokens`` =
        new tokens generated. lmms-eval logs them per sample (``token_counts``) and sums them in its
        ``efficiency`` summary, as its own HF chat models do (``models/chat/async_hf_model.py``).

        Raises
        ------
        RuntimeError
            A request whose visuals cannot be loaded (the message names task and doc_id).
        ValueError
            A request the model rejects (placeholders, image too small, budget), one line naming task and doc_id.
        """
        answers: list[GenerationResult] = []
        method = self.compressor
        with method(self.adapter):
            for req in tqdm(requests, desc=f"apet-bench {self.adapter.name}/{method.name}", disable=self.rank != 0):
                contexts, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
                if hasattr(method, "start_sample"):  # re-seed per sample (TokenCompressor.start_sample)
                    method.start_sample(int(doc_id))
                self.generation_kwargs.setdefault(task, copy.deepcopy(dict(gen_kwargs or {})))
                done = self.sample_store.get(task, doc_id) if self.sample_store is not None else None
                if done is not None:  # answered before the previous process was stopped
                    rec = SampleRecord(**done["record"])
                    self.records.append(rec)
                    answers.append(GenerationResult(text=done["answer"], token_counts=TokenCounts(
                        input_tokens=int(rec.prompt_tokens), output_tokens=int(rec.output_tokens))))
                    self.resumed += 1
                    continue
                try:
                    visuals = doc_to_visual(self.task_dict[task][split][doc_id])
                except Exception as exc:  # surfaced with the sample's identity
                    raise RuntimeError(f"cannot load visuals of {task} doc_id={doc_id}: {exc}") from exc
                visuals = [v for v in (visuals or []) if v is not None]
                hf_kwargs, until = translate_gen_kwargs(copy.deepcopy(gen_kwargs))
                try:
                    out = generate(self.adapter, visuals, contexts, hf_kwargs, method)
                except ValueError as exc:  # bad input (placeholders, image size, budget): name the sample
                    raise ValueError(f"{task} doc_id={doc_id}: {exc}") from exc
                text = out.text
                for stop in until:
                    if stop:
                        text = text.split(stop)[0]
                text = text.strip()
                self.records.append(
                    SampleRecord(
                        task=task,
                        doc_id=int(doc_id),
                        visual_tokens_in=int(out.visual_tokens_in),
                        visual_tokens_llm=int(out.visual_tokens_llm),
                        layer_visual_tokens=[int(x) for x in out.layer_visual_tokens],
                        prompt_tokens=int(out.prompt_tokens),
                        output_tokens=len(out.output_ids),
                        prefill_ms=float(out.prefill_ms),
                        total_ms=float(out.total_ms),
                        kept_indices=out.kept_indices,
                        planned_layer_visual_tokens=getattr(out, "planned_layer_visual_tokens", None),
                        kv_cache_tokens=getattr(out, "kv_cache_tokens", None),
                        attention_backends=getattr(out, "attention_backends", None),
                        uncompressed=bool(getattr(out, "uncompressed", False)),
                    )
                )
                answers.append(GenerationResult(text=text, token_counts=TokenCounts(
                    input_tokens=int(out.prompt_tokens), output_tokens=len(out.output_ids))))
                if self.sample_store is not None:
                    self.sample_store.add(task, doc_id, text, asdict(self.records[-1]))
        return answers

    def records_as_dicts(self) -> list[dict[str, Any]]:
        return [asdict(r) for r in self.records]

    def loglikelihood(self, requests: list[Instance]):
        raise NotImplementedError("apet-bench evaluates generation tasks only (loglikelihood is not supported)")

    def generate_until_multi_round(self, requests: list[Instance]):
        raise NotImplementedError("apet-bench does not support multi-round generation tasks")
