"""Decoding settings as the official evaluation scripts use them, with where each value comes from.

Layers, later wins (each key remembers the layer that set it):

1. the lmms-eval task's ``generation_kwargs`` (its YAML; local tasks are written by ``apet_bench.data``);
2. ``gen_kwargs`` of ``configs/benchmark/<benchmark>.yaml`` (not under ``benchmark.protocol=lmms_eval``,
   which keeps the task's own settings): the official scripts' value for that benchmark (MaQianKun0/ApET @ 70cc01b: greedy ``--temperature 0``, 1 beam, ``max_new_tokens`` 128 from
   ``llava/eval/model_vqa_loader.py``; 1024 hard-coded in ``model_vqa_mmbench.py``,
   ``model_vqa_science.py`` and Video-LLaVA's ``run_inference_video_qa.py``);
3. ``gen_kwargs.default`` then ``gen_kwargs.<benchmark>`` of ``configs/model/<model>.yaml``: where a
   model's scripts differ (Qwen2.5-VL's MMBench / ScienceQA loaders use their ``--max_new_tokens``
   default, 128); the tiny random-weight models cap answers at 16 tokens (a CPU pipeline check);
4. ``official_sampling_kwargs.<benchmark>`` of the model config, only with ``model.official_sampling=true``
   (LLaVA-NeXT's ``scripts/llava1_6/gqa.sh`` omits ``--temperature``, so the loader's default 0.2 samples;
   greedy by default here);
5. the run's top-level ``gen_kwargs`` (command line or experiment).

Then :func:`apet_bench.eval.lmms_model.translate_gen_kwargs` turns them into HF ``generate`` kwargs
(``temperature`` 0 -> greedy; ``num_beams`` 1 when unset).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["config_gen_kwargs", "encode_gen_kwargs", "gen_kwargs_arg", "resolve_generation"]


def _as_dict(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"{where} must be a mapping of generate settings, got {value!r}")
    return dict(value)


def config_gen_kwargs(cfg: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """The generate settings the run's config adds to the task's own (layers 2-5 of the module doc).

    Parameters
    ----------
    cfg : mapping
        The composed run config (``model``, ``benchmark``, ``gen_kwargs``), plain or ``DictConfig``.

    Returns
    -------
    kwargs : dict
        lmms-eval-style generation kwargs (``max_new_tokens``, ``temperature``, ``num_beams``, ...).
    sources : dict
        Per key, the config file and key that set it.

    Raises
    ------
    ValueError
        A ``gen_kwargs`` entry that is not a mapping (one line naming it).
    """
    bench = cfg.get("benchmark") or {}
    model = cfg.get("model") or {}
    bname = str(bench.get("name", "?"))
    mname = str(model.get("name", "?"))
    out: dict[str, Any] = {}
    sources: dict[str, str] = {}

    def layer(values: Mapping[str, Any], source: str) -> None:
        for k, v in values.items():
            out[str(k)] = v
            sources[str(k)] = source

    if bench.get("protocol") != "lmms_eval":  # lmms-eval's stock protocol decodes with the task's own settings
        layer(_as_dict(bench.get("gen_kwargs"), f"benchmark {bname} gen_kwargs"),
              f"configs/benchmark/{bname}.yaml gen_kwargs (official script)")
    per_model = _as_dict(model.get("gen_kwargs"), f"model {mname} gen_kwargs")
    layer(_as_dict(per_model.get("default"), f"model {mname} gen_kwargs.default"),
          f"configs/model/{mname}.yaml gen_kwargs.default")
    layer(_as_dict(per_model.get(bname), f"model {mname} gen_kwargs.{bname}"),
          f"configs/model/{mname}.yaml gen_kwargs.{bname} (official script of this model)")
    if model.get("official_sampling"):
        sampling = _as_dict(model.get("official_sampling_kwargs"), f"model {mname} official_sampling_kwargs")
        layer(_as_dict(sampling.get(bname), f"model {mname} official_sampling_kwargs.{bname}"),
              f"configs/model/{mname}.yaml official_sampling_kwargs.{bname} (model.official_sampling=true)")
    layer(_as_dict(cfg.get("gen_kwargs"), "gen_kwargs"), "gen_kwargs (command line / experiment)")
    return out, sources


def encode_gen_kwargs(kwargs: Mapping[str, Any] | None) -> str | None:
    """Generation settings as lmms-eval's ``simple_evaluate(gen_kwargs=...)`` string, or ``None`` for none.

    lmms-eval parses ``"k=v,k=v"`` (``lmms_eval.utils.simple_parse_args_string``: ``true``/``false``,
    integers and floats are converted, the rest stay strings) and merges it over every generation
    task's ``generation_kwargs`` (``Task.set_config(..., update=True)`` in ``lmms_eval/evaluator.py``).

    Raises
    ------
    ValueError
        A value this format cannot carry (a list or mapping, a string with ``,`` ``=``, quotes or
        surrounding white space, ``None``), or a key that is not a plain name; the message names it.
    """
    if not kwargs:
        return None
    if not isinstance(kwargs, Mapping):
        raise ValueError(f"gen_kwargs {kwargs!r} is invalid (use a mapping, e.g. +gen_kwargs.max_new_tokens=8)")
    parts = []
    for key, value in kwargs.items():
        if not str(key).isidentifier():
            raise ValueError(f"gen_kwargs key {key!r} is invalid (use a generation setting name, e.g. max_new_tokens)")
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, (int, float)):
            text = repr(value)
        elif isinstance(value, str) and value and value == value.strip() and not any(c in value for c in ",='\"{}[]"):
            text = value
        else:
            raise ValueError(f"gen_kwargs.{key}={value!r} is invalid: lmms-eval takes a number, true/false or "
                             f"a plain string (one stop string for until)")
        parts.append(f"{key}={text}")
    return ",".join(parts)


def gen_kwargs_arg(cfg: Mapping[str, Any]) -> str | None:
    """:func:`config_gen_kwargs` of a run config, encoded by :func:`encode_gen_kwargs` (same errors)."""
    return encode_gen_kwargs(config_gen_kwargs(cfg)[0])


def resolve_generation(task_kwargs: Mapping[str, Any] | None, cfg: Mapping[str, Any],
                       task_name: str = "task") -> tuple[dict[str, Any], dict[str, str]]:
    """The HF ``generate`` kwargs one sample gets, and where each came from.

    Parameters
    ----------
    task_kwargs : mapping or None
        The lmms-eval task's ``generation_kwargs``.
    cfg : mapping
        The run config (see :func:`config_gen_kwargs`).
    task_name : str
        Named in the sources.

    Returns
    -------
    kwargs : dict
        As :func:`apet_bench.eval.lmms_model.translate_gen_kwargs` returns them, plus ``until`` (stop
        strings) when the task has any.
    sources : dict
        Per key: ``"lmms-eval task <name> generation_kwargs"``, a config layer, or
        ``"default (translate_gen_kwargs)"``.
    """
    from apet_bench.eval.lmms_model import translate_gen_kwargs

    merged = dict(task_kwargs or {})
    sources = {k: f"lmms-eval task {task_name} generation_kwargs" for k in merged}
    extra, extra_sources = config_gen_kwargs(cfg)
    merged.update(extra)
    sources.update(extra_sources)
    hf, until = translate_gen_kwargs(dict(merged))
    out_sources = {}
    for k in hf:
        if k == "do_sample" and "do_sample" not in sources and "temperature" in sources:
            out_sources[k] = sources["temperature"] + " (temperature)"
        else:
            out_sources[k] = sources.get(k, "default (translate_gen_kwargs)")
    if until:
        hf["until"] = until
        out_sources["until"] = sources.get("until", "lmms-eval default")
    return hf, out_sources
