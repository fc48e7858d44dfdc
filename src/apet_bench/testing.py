"""Conformance kit: the checks every visual-token compression method must pass, in one call.

:func:`check_method` runs a method on every tiny random-weight model it supports (the ``tiny_*``
model configs; a model is unsupported when the method's own
:meth:`~apet_bench.methods.TokenCompressor.check_model_config` refuses it) and asserts the contract
the harness relies on. It is meant for a test suite (the project's own ``tests/test_conformance.py``
runs it over :func:`~apet_bench.methods.available_methods`) and for a user's own method::

    from dataclasses import dataclass

    import torch

    from apet_bench.methods import TokenCompressor, VisualSelection
    from apet_bench.testing import check_method

    @dataclass
    class FirstTokens(TokenCompressor):          # stage 1: keep the first `budget` visual tokens
        stage = "vision"

        def compress_visual(self, features, *, image_index):
            k = self.num_tokens_to_keep(features.shape[0])
            return VisualSelection(features[:k], torch.arange(k))

    def test_first_tokens_conforms():
        report = check_method(FirstTokens, models=["tiny_llava15"], runner=False)
        assert "plan" in report.passed_checks()

API reference
-------------
``check_method(method, *, models=None, params=None, budgets=None, seeds=(0, 1), max_new_tokens=3,
runner=True, runner_samples=2, sorted_indices=None, bad_budgets=BAD_BUDGETS, work_dir=None)``
    ``method``: a registered name (``"fastv"``) or a :class:`~apet_bench.methods.TokenCompressor`
    subclass (registered or not). ``models``: tiny model config names (default: every
    ``configs/model/*.yaml`` with ``tiny: true``), or a mapping name -> extra Hydra overrides of that
    model (e.g. ``{"tiny_llava15": ["+model.tiny_config.vision_layers=12"]}``). ``params``: the method's
    hyper-parameters (default: its ``configs/method/<name>.yaml`` ``params`` when it has one, else its
    dataclass defaults). ``budgets``: a list used for every model, or a mapping model -> list; default:
    the model's paper budget (:data:`DEFAULT_BUDGETS`), or for another tiny model the first of
    :data:`FALLBACK_BUDGETS` that the method accepts and that compresses (an int below the model's
    visual tokens); a budget the method's ``check_model_config`` refuses makes the model unsupported. ``seeds``: the seed whose runs are compared, and another one
    (recorded, not asserted: a stochastic method may differ). ``runner``: also run one configuration
    per model through :func:`apet_bench.runner.execute` on the embedded ``demo`` benchmark (registered
    methods with a YAML only). ``sorted_indices``: require increasing ``kept_indices`` (default: the
    method class's ``kept_indices_sorted`` attribute when it has one, else not required).
    ``work_dir``: where the runner check writes (default: a temporary directory, removed afterwards).

    Returns a :class:`ConformanceReport`. Raises ``AssertionError`` at the first failed check, one
    first line ``conformance: method 'm' on model 'x' budget b: check 'c' failed: <what>``;
    ``ValueError`` for bad arguments of the kit itself (an unknown model, an unknown method name);
    ``AssertionError`` too when the method supports none of the requested models.

Checks (:data:`CHECKS`), per model and budget, on one image (a video on models that take videos):

``bad_budget``
    Building the method with each of :data:`BAD_BUDGETS` (``0``, ``1.5``, ``-1``, ``"abc"``, ...)
    raises ``ValueError`` (``apet_bench.budget.BudgetError`` is one) with a one-line message naming
    the value. Once per method.
``generate``
    ``ModelAdapter.generate`` runs the method without raising (the harness's own checks, e.g. on
    repeated ``kept_indices``, raise there).
``plan``
    ``GenerationOutput.layer_visual_tokens`` (measured with pre-hooks at every decoder layer during
    prefill) equals ``planned_layer_visual_tokens`` (the method's :meth:`plan`, recorded by the
    generate loop), and has one entry per decoder layer.
``budget``
    The sample was compressed (``uncompressed`` is false and the fewest visual tokens at any layer is
    below ``visual_tokens_in``), the count never grows from one layer to the next, and the fewest count
    is within the budget: ``min(layer_visual_tokens) <= budget_to_tokens(budget, visual_tokens_in) +
    unbudgeted``, where ``unbudgeted`` counts the tokens no budget covers in the project's conventions
    (LLaVA-NeXT's ``image_newline`` tokens and one [CLS] per segment that has one, e.g. a Video-LLaVA
    frame). A method whose budget accounting is another one (an official "equal tokens" schedule that
    ends above the budget, a per-crop split) declares ``budget_accounting: ClassVar[str] = "plan"``:
    its plan (checked by ``plan``) is then its budget, and the bound is not applied. The method's finer
    convention (equivalent average, per-crop splits) is its plan, checked above. Skipped for stage
    ``"none"``.
``kept_indices``
    ``kept_indices`` (when reported) has one list per visual; every index is an int in
    ``[0, visual tokens of that visual)``, none repeated, increasing when ``sorted_indices``, and no
    more indices are recorded than visual tokens entered the LLM.
``attention_backends``
    ``GenerationOutput.attention_backends`` names, for every decoder layer and vision-tower attention
    module, the backend the uncompressed model uses there (``"sdpa"`` stays ``"sdpa"``, possibly with
    rows recomputed beside it, e.g. ``"sdpa + rows 'last' recomputed"``); never ``"eager"`` where the
    model was loaded with another backend.
``seed``
    Two fresh instances with the same seed give the same output ids, ``kept_indices`` and per-layer
    counts. Whether another seed changed the kept set is recorded in the report.
``restored``
    After the method's runs, no forward hook it added is left on the model, the method is inactive,
    and ``none`` gives logits equal (``torch.equal``) to those before.
``cached_decoding``
    Greedy decoding with the KV cache gives the same output ids as ``use_cache=False``, where every
    step re-runs the prefill. In the uncached run the stage-2 selection made at prefill is replayed at
    every step (a selection that reads the last token's attention would otherwise change with each
    generated token), so the check isolates the KV-cache, mask and position bookkeeping. A method that
    refuses ``use_cache=False`` with a one-line ``ValueError`` is recorded as skipped (its statement);
    any other error fails.
``runner``
    One run through :func:`apet_bench.runner.execute` (``benchmark=demo``, ``limit=runner_samples``)
    finishes, writes one ``samples.jsonl`` row per sample with measured == planned counts and valid
    ``kept_indices``, and ``run.json``'s ``attention_backends`` are consistent across samples with no
    fallback to eager.

Cost: each model loads once per process; per model and budget the kit generates 6 times
(``max_new_tokens`` tokens each) plus one ``execute`` of ``runner_samples`` samples. The runner check
uses the embedded ``demo`` benchmark (images): on a model whose largest span is a video's, an int
budget may leave those images uncompressed there; the video itself is checked through ``generate``.

Sources: the attention-backend names are transformers' ``_attn_implementation`` values
(``huggingface/transformers``, ``src/transformers/modeling_utils.py``).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from apet_bench.models import config_facts
from apet_bench.pipeline import generate

__all__ = [
    "BAD_BUDGETS",
    "CHECKS",
    "DEFAULT_BUDGETS",
    "FALLBACK_BUDGETS",
    "CheckResult",
    "ConformanceReport",
    "check_method",
    "tiny_models",
    "unsupported_reason",
]

#: Every check the kit runs, in order.
CHECKS: tuple[str, ...] = (
    "bad_budget", "generate", "plan", "budget", "kept_indices", "attention_backends", "seed", "restored",
    "cached_decoding", "runner",
)
#: Budgets every method must refuse in one line naming the value.
BAD_BUDGETS: tuple[Any, ...] = (0, 1.5, -1, "abc", 0.0, True)
#: Default budget per tiny model: the paper's smallest budget of the model it stands for (Table 1
#: LLaVA-1.5 64, Table 2 LLaVA-NeXT 160, Table 3 Qwen2.5-VL 20 %, Table 4 Video-LLaVA 256).
DEFAULT_BUDGETS: dict[str, int | float] = {
    "tiny_llava15": 64, "tiny_llava_next": 160, "tiny_qwen25vl": 0.2, "tiny_video_llava": 256,
}
#: Budgets tried in order on a tiny model without a default: the first one the method accepts (its
#: ``check_model_config``) and that compresses is used.
FALLBACK_BUDGETS: tuple[int | float, ...] = (64, 256, 160, 0.2, 0.1)

_QUESTION = "What is in the image?"
_ADAPTERS: dict[str, Any] = {}


@dataclass
class CheckResult:
    """One check on one model and budget.

    Attributes
    ----------
    model : str or None
        Tiny model config name (``None`` for per-method checks such as ``bad_budget``).
    budget : int or float or None
    check : str
        One of :data:`CHECKS`.
    status : str
        ``"passed"`` or ``"skipped"``.
    detail : str
        What was compared, or why the check was skipped.
    """

    model: str | None
    budget: int | float | None
    check: str
    status: str
    detail: str = ""


@dataclass
class ConformanceReport:
    """What :func:`check_method` ran.

    Attributes
    ----------
    method : str
        The method's registry name.
    results : list of CheckResult
    unsupported : dict
        Model name -> the one-line refusal of the method's ``check_model_config`` (or why no budget fits).
    seed_changes_kept : dict
        ``(model, budget)`` -> whether the second seed kept a different set (stochastic methods).
    """

    method: str
    results: list[CheckResult] = field(default_factory=list)
    unsupported: dict[str, str] = field(default_factory=dict)
    seed_changes_kept: dict[tuple[str, Any], bool] = field(default_factory=dict)

    @property
    def models(self) -> list[str]:
        """Models the checks ran on, in order."""
        return list(dict.fromkeys(r.model for r in self.results if r.model is not None))

    def passed_checks(self, model: str | None = None) -> set[str]:
        """Names of the checks that passed (on ``model`` when given)."""
        return {r.check for r in self.results if r.status == "passed" and (model is None or r.model == model)}

    def __str__(self) -> str:
        lines = [f"conformance of method {self.method!r}:"]
        lines += [f"  {r.model or '-'} budget={r.budget}: {r.check} {r.status}"
                  + (f" ({r.detail})" if r.detail else "") for r in self.results]
        lines += [f"  {m}: unsupported ({why})" for m, why in self.unsupported.items()]
        return "\n".join(lines)


class _Failure(AssertionError):
    pass


def tiny_models() -> list[str]:
    """Names of the tiny random-weight model configs (``configs/model/*.yaml`` with ``tiny: true``), sorted."""
    from omegaconf import OmegaConf

    from apet_bench.config import config_dir

    out = []
    for path in sorted((config_dir() / "model").glob("*.yaml")):
        cfg = OmegaConf.load(path)
        if bool(cfg.get("tiny", False)):
            out.append(str(cfg.get("name", path.stem)))
    return out


# ---------------------------------------------------------------------- helpers
def _resolve_method(method: str | type) -> tuple[str, type, bool]:
    """(name, class, registered under that name)."""
    from apet_bench.methods import TokenCompressor, available_methods, get_method_class

    if isinstance(method, str):
        return method, get_method_class(method), True
    if not (isinstance(method, type) and issubclass(method, TokenCompressor)):
        raise ValueError(f"check_method needs a method name or a TokenCompressor subclass, got {method!r}")
    registered = method.name in available_methods() and get_method_class(method.name) is method
    name = method.name if registered or "name" in vars(method) else method.__name__
    return name, method, registered


def _yaml_params(name: str) -> dict[str, Any] | None:
    """The ``params`` of ``configs/method/<name>.yaml``, or ``None`` when the method has no YAML."""
    from omegaconf import OmegaConf

    from apet_bench.config import config_dir

    path = config_dir() / "method" / f"{name}.yaml"
    if not path.is_file():
        return None
    params = OmegaConf.to_container(OmegaConf.load(path), resolve=True).get("params") or {}
    return dict(params)


def _model_cfg(model: str, overrides: Sequence[str]) -> dict[str, Any]:
    from omegaconf import OmegaConf

    from apet_bench.config import compose

    return OmegaConf.to_container(compose([f"model={model}", *overrides]).model, resolve=True)


def _adapter(model_cfg: dict[str, Any]) -> Any:
    """Load (once per process) the adapter of ``model_cfg``; the kit never changes its weights."""
    from apet_bench.models import load_model

    key = json.dumps(model_cfg, sort_keys=True, default=str)
    if key not in _ADAPTERS:
        _ADAPTERS[key] = load_model(model_cfg)
    return _ADAPTERS[key]


def _visuals(adapter: Any) -> list[Any]:
    """One deterministic visual: an 8-frame clip on a model that takes videos, else a 224 x 224 image."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(13)
    if hasattr(adapter, "video_pixels"):
        from apet_bench.models.video_llava import VideoClip

        return [VideoClip((rng.random((8, 48, 64, 3)) * 255).astype("uint8"))]
    return [Image.fromarray((rng.random((448, 448, 3)) * 255).astype("uint8"), mode="RGB")]


def _count_hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _one_line_error(exc: BaseException, value: Any) -> str | None:
    """Why ``exc`` is not an acceptable bad-budget error for ``value`` (``None`` when it is)."""
    msg = str(exc)
    if not isinstance(exc, ValueError):
        return f"raised {type(exc).__name__}, not ValueError/BudgetError: {msg.splitlines()[0] if msg else ''}"
    if "\n" in msg.strip() or not msg.strip():
        return f"message is not one line: {msg!r}"
    if str(value) not in msg and repr(value) not in msg:
        return f"message does not name the value {value!r}: {msg!r}"
    return None


def _unbudgeted(segments: Any) -> int:
    """Visual tokens no budget covers: NeXT ``image_newline`` tokens and one [CLS] per segment with one."""
    n = 0
    for visual in segments or []:
        n += int(visual.newline_positions.numel())
        n += sum(1 for seg in visual.segments if seg.cls_position is not None)
    return n


def _backend(entry: str | None) -> str | None:
    """The backend of one ``attention_backends`` entry (``"sdpa + rows ..."`` -> ``"sdpa"``)."""
    return None if entry is None else str(entry).split(" ", 1)[0]


def _check_backends(got: Mapping[str, Any] | None, ref: Mapping[str, Any] | None, loaded: str) -> str | None:
    """Why ``got`` (a method's attention backends) changed the model's backends (``None`` when it did not)."""
    if not got:
        return "no attention_backends recorded"
    for part in ("llm_layers", "vision_layers"):
        have = list(got.get(part) or [])
        want = list((ref or {}).get(part) or [])
        if ref is not None and len(have) != len(want):
            return f"{part}: {len(have)} entries, the uncompressed model has {len(want)}"
        for i, entry in enumerate(have):
            base = _backend(want[i]) if ref is not None else None
            if base is not None and _backend(entry) != base:
                return f"{part}[{i}] is {entry!r}, the uncompressed model uses {base!r}"
            if loaded != "eager" and _backend(entry) == "eager" and base != "eager":
                return f"{part}[{i}] fell back to eager ({entry!r}) on a model loaded with {loaded!r}"
    return None


def _replaying(method: Any) -> Any:
    """``method`` whose stage-2 selection, made once at prefill, is replayed at every later call.

    Without a KV cache every generated token re-runs the prefill, so a selection that reads the last
    token's attention (FastV, PDrop, ApET's LLM stage) would legitimately change from step to step;
    replaying the prefill's :class:`~apet_bench.methods.base.LLMSelection` per drop layer makes the
    uncached run decode exactly the tokens the cached run kept. Positions stay valid: generated tokens
    are appended after every visual token.
    """
    select = method.select_llm_tokens
    first: dict[int, Any] = {}

    def replay(hidden_states, visual_positions, *, layer_idx, attention=None):
        if layer_idx not in first:
            first[layer_idx] = select(hidden_states, visual_positions, layer_idx=layer_idx, attention=attention)
        return first[layer_idx]

    object.__setattr__(method, "select_llm_tokens", replay)
    return method


def _check_kept(kept: Any, per_visual: Sequence[int], entered: int, sorted_indices: bool) -> str | None:
    """Why ``kept_indices`` is invalid (``None`` when it is valid)."""
    if kept is None:
        return None
    if len(kept) != len(per_visual):
        return f"{len(kept)} index lists for {len(per_visual)} visual(s)"
    total = 0
    for v, (idx, n) in enumerate(zip(kept, per_visual)):
        idx = list(idx)
        total += len(idx)
        bad = [i for i in idx if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n]
        if bad:
            return f"visual {v}: indices {bad[:5]} outside [0, {n})"
        if len(set(idx)) != len(idx):
            dup = sorted({i for i in idx if idx.count(i) > 1})[:5]
            return f"visual {v}: indices {dup} repeated"
        if sorted_indices and idx != sorted(idx):
            return f"visual {v}: indices not increasing ({idx[:8]} ...)"
    if total > entered:
        return f"{total} kept indices recorded but only {entered} visual tokens entered the LLM"
    return None


# ---------------------------------------------------------------------- the kit
def check_method(
    method: str | type,
    *,
    models: Sequence[str] | Mapping[str, Sequence[str]] | None = None,
    params: Mapping[str, Any] | None = None,
    budgets: Sequence[int | float] | Mapping[str, Sequence[int | float]] | None = None,
    seeds: tuple[int, int] = (0, 1),
    max_new_tokens: int = 3,
    runner: bool = True,
    runner_samples: int = 2,
    sorted_indices: bool | None = None,
    bad_budgets: Sequence[Any] = BAD_BUDGETS,
    work_dir: str | Path | None = None,
) -> ConformanceReport:
    """Run every conformance check (:data:`CHECKS`) of ``method`` on the tiny models it supports.

    Parameters and checks: see the module docstring (API reference).

    Returns
    -------
    ConformanceReport
        Every check that ran (passed or skipped, with why), the unsupported models and why.

    Raises
    ------
    AssertionError
        At the first failed check: ``conformance: method 'm' on model 'x' budget b: check 'c' failed: ...``
        (one first line); also when the method supports none of the models.
    ValueError
        An unknown method name (``UnknownMethodError``) or an argument that is not a method.
    """
    name, cls, registered = _resolve_method(method)
    yaml_params = _yaml_params(name) if registered else None
    base_params = {**(yaml_params or {}), **dict(params or {})}
    if sorted_indices is None:
        sorted_indices = bool(getattr(cls, "kept_indices_sorted", False))
    report = ConformanceReport(method=name)

    def fail(model: str | None, budget: Any, check: str, what: str) -> None:
        where = f"on model {model!r} budget {budget!r}" if model is not None else "(any model)"
        raise _Failure(f"conformance: method {name!r} {where}: check {check!r} failed: {what}")

    def ok(model: str | None, budget: Any, check: str, detail: str = "", status: str = "passed") -> None:
        report.results.append(CheckResult(model, budget, check, status, detail))

    def build(budget: Any, seed: int) -> Any:
        return cls(budget=budget, seed=seed, **base_params)

    # ------------------------------------------------------------------ bad budgets (once per method)
    for value in bad_budgets:
        try:
            build(value, seeds[0])
        except Exception as exc:  # noqa: BLE001 - the type is what is checked
            why = _one_line_error(exc, value)
            if why:
                fail(None, value, "bad_budget", why)
        else:
            fail(None, value, "bad_budget", f"budget {value!r} was accepted")
    ok(None, None, "bad_budget", f"refused {list(bad_budgets)!r} in one line")

    # ------------------------------------------------------------------ per model
    if models is None:
        model_list: dict[str, list[str]] = {m: [] for m in tiny_models()}
    elif isinstance(models, Mapping):
        model_list = {m: list(o) for m, o in models.items()}
    else:
        model_list = {m: [] for m in models}
    known = set(tiny_models())
    for m in model_list:
        if m not in known:
            raise ValueError(f"check_method: model {m!r} is not a tiny model config; tiny models: {sorted(known)}")

    tmp = Path(work_dir) if work_dir is not None else Path(tempfile.mkdtemp(prefix="apet-bench-conformance-"))
    try:
        for model, overrides in model_list.items():
            model_cfg = _model_cfg(model, overrides)
            chosen = _choose_budgets(build, model_cfg, budgets, model, seeds[0], report)
            if not chosen:
                continue
            _check_model(cls, build, model, model_cfg, chosen, seeds, max_new_tokens, sorted_indices, fail, ok,
                         report)
            if runner and registered and yaml_params is not None:
                _check_runner(name, model, overrides, chosen[0], dict(params or {}), runner_samples,
                              sorted_indices, tmp / model, fail, ok)
            elif runner:
                ok(model, chosen[0], "runner", "method not registered with a YAML config", status="skipped")
    finally:
        if work_dir is None:
            shutil.rmtree(tmp, ignore_errors=True)
    if not report.models:
        raise _Failure(f"conformance: method {name!r} supports none of the models {list(model_list)}: "
                       + "; ".join(f"{m}: {w}" for m, w in report.unsupported.items()))
    return report


def _choose_budgets(build, model_cfg, budgets, model, seed, report) -> list[Any]:
    """The budgets to check on ``model``: those given, or the first accepted default; ``[]`` if none fits."""
    if isinstance(budgets, Mapping):
        candidates, take = list(budgets.get(model, ())), None
    elif budgets is not None:
        candidates, take = list(budgets), None
    elif model in DEFAULT_BUDGETS:
        candidates, take = [DEFAULT_BUDGETS[model]], 1
    else:
        candidates, take = list(FALLBACK_BUDGETS), 1
    span = max(int(model_cfg.get("visual_tokens") or 0), int(model_cfg.get("max_visual_tokens") or 0))
    chosen, refusals = [], []
    for b in candidates:
        if take is not None and isinstance(b, int) and span and b >= span:
            refusals.append(f"budget {b} does not compress {span} visual tokens")
            continue
        try:
            build(b, seed).check_model_config(config_facts(model_cfg))  # as the runner calls it
        except ValueError as exc:  # the method's own statement: it cannot run this configuration
            refusals.append(str(exc))
            continue
        chosen.append(b)
        if take is not None and len(chosen) >= take:
            break
    if not chosen:
        report.unsupported[model] = refusals[-1] if refusals else "no budget given"
    return chosen


def unsupported_reason(
    method: str | type,
    model: str,
    *,
    params: Mapping[str, Any] | None = None,
    budgets: Sequence[int | float] | None = None,
    overrides: Sequence[str] = (),
) -> str | None:
    """Why ``method`` does not run on tiny ``model`` (its ``check_model_config`` refusal), or ``None``.

    Uses the budgets :func:`check_method` would use (``budgets``, else the model's default). A test
    suite calls it to skip, rather than fail, a model the method says it does not support.

    Raises
    ------
    ValueError
        An unknown method name.
    """
    name, cls, registered = _resolve_method(method)
    base_params = {**((_yaml_params(name) if registered else None) or {}), **dict(params or {})}
    report = ConformanceReport(method=name)
    chosen = _choose_budgets(lambda b, s: cls(budget=b, seed=s, **base_params), _model_cfg(model, overrides),
                             budgets, model, 0, report)
    return None if chosen else report.unsupported.get(model, "no budget fits")


def _check_model(cls, build, model, model_cfg, budgets, seeds, max_new_tokens, sorted_indices, fail, ok,
                 report) -> None:
    from apet_bench.budget import budget_to_tokens
    from apet_bench.methods import build_method

    adapter = _adapter(model_cfg)
    accounting = str(getattr(cls, "budget_accounting", "final"))
    visuals = _visuals(adapter)
    gen = {"max_new_tokens": max_new_tokens}
    loaded = str(model_cfg.get("attn_implementation") or "sdpa")
    ref = generate(adapter, visuals, _QUESTION, {**gen, "output_logits": True}, build_method("none"))
    ctx = getattr(adapter, "visual_context", None)
    segments = getattr(ctx, "segments", None) if ctx is not None else None
    hooks_before = _count_hooks(adapter.model)
    per_visual = [int(ref.visual_tokens_in) // max(1, len(visuals))] * len(visuals)
    if segments is not None and len(segments) == len(visuals):
        per_visual = [int(v.num_tokens) for v in segments]

    for budget in budgets:
        method = build(budget, seeds[0])
        try:
            out = generate(adapter, visuals, _QUESTION, gen, method)
        except Exception as exc:  # noqa: BLE001 - reported as the plan check failing to run
            fail(model, budget, "generate", f"generate raised {type(exc).__name__}: {str(exc).splitlines()[0]}")
        ok(model, budget, "generate", f"{len(out.output_ids)} tokens")
        # plan == measured
        planned, measured = out.planned_layer_visual_tokens, out.layer_visual_tokens
        if planned is None:
            fail(model, budget, "plan", "no planned_layer_visual_tokens recorded")
        if len(measured) != adapter.num_layers or list(measured) != list(planned):
            fail(model, budget, "plan", f"measured {list(measured)} != planned {list(planned)}")
        ok(model, budget, "plan", f"{list(measured)}")
        # budget
        if method.stage == "none":
            ok(model, budget, "budget", "stage 'none' compresses nothing", status="skipped")
        else:
            if out.uncompressed:
                fail(model, budget, "budget", f"the sample ({out.visual_tokens_in} visual tokens) was left "
                     "uncompressed: pick a budget below the span")
            fewest = min(measured)
            if not fewest < out.visual_tokens_in:
                fail(model, budget, "budget", f"nothing removed: {fewest} of {out.visual_tokens_in} visual tokens")
            if any(b > a for a, b in zip(measured, measured[1:])):
                fail(model, budget, "budget", f"visual tokens grow from one layer to the next: {list(measured)}")
            if accounting == "plan":
                ok(model, budget, "budget", f"compressed to {list(measured)} of {out.visual_tokens_in}; the "
                   "method's plan is its budget accounting (budget_accounting = 'plan')")
            else:
                limit = budget_to_tokens(budget, int(out.visual_tokens_in)) + _unbudgeted(segments)
                if fewest > limit:
                    fail(model, budget, "budget", f"fewest visual tokens at any layer {fewest} > {limit} "
                         f"(budget {budget!r} of {out.visual_tokens_in}, newlines/[CLS] included)")
                ok(model, budget, "budget", f"min {fewest} <= {limit}, of {out.visual_tokens_in}")
        # kept indices
        why = _check_kept(out.kept_indices, per_visual, int(out.visual_tokens_llm), sorted_indices)
        if why:
            fail(model, budget, "kept_indices", why)
        ok(model, budget, "kept_indices", "not reported" if out.kept_indices is None else
           f"{sum(len(k) for k in out.kept_indices)} valid")
        # attention backends
        why = _check_backends(out.attention_backends, ref.attention_backends, loaded)
        if why:
            fail(model, budget, "attention_backends", why)
        ok(model, budget, "attention_backends", f"loaded {loaded}")
        # same seed -> same kept set
        again = generate(adapter, visuals, _QUESTION, gen, build(budget, seeds[0]))
        for what in ("output_ids", "kept_indices", "layer_visual_tokens"):
            if getattr(again, what) != getattr(out, what):
                fail(model, budget, "seed", f"seed {seeds[0]} twice gave different {what}: "
                     f"{getattr(out, what)!r:.80} vs {getattr(again, what)!r:.80}")
        other = generate(adapter, visuals, _QUESTION, gen, build(budget, seeds[1]))
        report.seed_changes_kept[(model, budget)] = other.kept_indices != out.kept_indices
        ok(model, budget, "seed", f"seed {seeds[1]} changed the kept set: {other.kept_indices != out.kept_indices}")
        # cached == uncached decoding
        try:
            uncached = generate(adapter, visuals, _QUESTION, {**gen, "use_cache": False},
                                        _replaying(build(budget, seeds[0])))
        except ValueError as exc:
            msg = str(exc)
            if "\n" in msg.strip():
                fail(model, budget, "cached_decoding", f"use_cache=False refused in more than one line: {msg!r}")
            ok(model, budget, "cached_decoding", f"method refuses use_cache=False: {msg}", status="skipped")
        else:
            if uncached.output_ids != out.output_ids:
                fail(model, budget, "cached_decoding",
                     f"cached {out.output_ids} != uncached {uncached.output_ids} (greedy)")
            ok(model, budget, "cached_decoding", f"{len(out.output_ids)} tokens equal")
        # hooks removed, method inactive
        if method.is_active or _count_hooks(adapter.model) != hooks_before:
            fail(model, budget, "restored", f"{_count_hooks(adapter.model) - hooks_before} hook(s) left on the "
                 f"model, method active: {method.is_active}")
    after = generate(adapter, visuals, _QUESTION, {**gen, "output_logits": True}, build_method("none"))
    same = after.output_ids == ref.output_ids and len(after.logits) == len(ref.logits) and all(
        torch.equal(x, y) for x, y in zip(after.logits, ref.logits))
    if not same:
        fail(model, budgets[-1], "restored", "the uncompressed model's logits changed after the method ran")
    ok(model, budgets[-1], "restored", "no hooks left; 'none' logits unchanged")


def _check_runner(name, model, overrides, budget, params, samples, sorted_indices, out_dir, fail, ok) -> None:
    from apet_bench.config import compose
    from apet_bench.runner import execute

    over = [f"method.params.{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in params.items()]
    cfg = compose([f"model={model}", *overrides, f"method={name}", *over, f"budget={budget}", "benchmark=demo",
                   f"limit={samples}", "+gen_kwargs.max_new_tokens=2", f"results_dir={out_dir / 'results'}",
                   f"cache_dir={out_dir / 'cache'}", "logger=none"])
    try:
        outcome = execute(cfg)
    except Exception as exc:  # noqa: BLE001
        fail(model, budget, "runner", f"execute raised {type(exc).__name__}: {str(exc).splitlines()[0]}")
    if outcome.status != "finished":
        fail(model, budget, "runner", f"run status {outcome.status!r}")
    run_dir = Path(outcome.run_dir)
    rows = [json.loads(x) for x in (run_dir / "samples.jsonl").read_text().splitlines() if x.strip()]
    if len(rows) != samples:
        fail(model, budget, "runner", f"samples.jsonl has {len(rows)} rows for limit={samples}")
    for r in rows:
        if r.get("layer_visual_tokens") != r.get("planned_layer_visual_tokens"):
            fail(model, budget, "runner", f"samples.jsonl measured {r.get('layer_visual_tokens')} != planned "
                 f"{r.get('planned_layer_visual_tokens')}")
        n = int(r.get("visual_tokens_in") or 0)
        kept = r.get("kept_indices")
        why = _check_kept(kept, [n // max(1, len(kept))] * len(kept), int(r.get("visual_tokens_llm") or n),
                          sorted_indices) if kept is not None and len(kept) == 1 else None
        if why:
            fail(model, budget, "runner", f"samples.jsonl kept_indices: {why}")
    run = json.loads((run_dir / "run.json").read_text())
    backends = run.get("attention_backends")
    if not backends or backends.get("consistent") is not True:
        fail(model, budget, "runner", f"run.json attention_backends missing or inconsistent: {backends!r:.120}")
    why = _check_backends(backends, None, str(cfg.model.get("attn_implementation") or "sdpa"))
    if why:
        fail(model, budget, "runner", f"run.json attention_backends: {why}")
    ok(model, budget, "runner", f"{len(rows)} sample(s) through execute")

