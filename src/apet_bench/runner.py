"""The main job: one model x method x budget x benchmark run through lmms-eval into the results store.

Flow (docs/models.md): validate everything that can be validated without
side effects (availability, budget, data) -> skip a finished run -> load the model adapter (cached per
process, reused across methods) -> build the method -> lmms-eval ``simple_evaluate`` with our model
class on the benchmark's local task -> check that the evaluation really produced every metric for
every sample (lmms-eval's CLI can exit 0 after an exception, docs/data.md) -> write the run
directory atomically (:mod:`apet_bench.results`).
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from apet_bench.budget import BudgetError, budget_to_tokens, validate_budget
from apet_bench.config import ConfigError
from apet_bench.distributed import broadcast_from_rank0, init_process_group, world
from apet_bench.results import RUN_MARKER, RunStore, SampleStore, collect_provenance, run_name

__all__ = ["EvaluationError", "RunOutcome", "execute", "prepare_run", "run_identity", "run_dir_name", "identity_changes"]

RANDOM_WEIGHTS_NOTE = "random-weight pipeline check: these scores are not accuracy numbers"


class EvaluationError(RuntimeError):
    """lmms-eval did not produce a complete, valid result; nothing is written to results/."""


@dataclass
class RunOutcome:
    """What a run did: ``status`` is ``finished`` (just ran), ``skipped`` (was finished), ``failed``, or
    ``worker`` (a data-parallel rank other than 0, which evaluated its share; rank 0 wrote the run)."""

    name: str
    status: str
    run_dir: str
    summary: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


@dataclass
class PreparedRun:
    cfg: dict[str, Any]
    name: str
    budget: int | float | None
    prepared_task: Any
    store: RunStore
    identity: dict[str, Any] = field(default_factory=dict)


_ADAPTER_CACHE: dict[str, Any] = {}


def _load_adapter(model_cfg: dict[str, Any]):
    """Load (or reuse) the model adapter for ``model_cfg``; one model is kept per process."""
    import json

    from apet_bench.models import load_model

    key = json.dumps(model_cfg, sort_keys=True, default=str)
    if key not in _ADAPTER_CACHE:
        _ADAPTER_CACHE.clear()
        _ADAPTER_CACHE[key] = load_model(model_cfg)
    return _ADAPTER_CACHE[key]


def _resolve_path(p: str | None) -> str | None:
    if p in (None, "", "null"):
        return None
    return str(Path(os.path.expanduser(str(p))).resolve())


def method_label(method_cfg: dict[str, Any]) -> str:
    """The method's part of a run name: its name, plus ``-key=value`` for every parameter that differs
    from ``configs/method/<name>.yaml`` (sorted), so variants never share a run directory.

    ``random`` -> ``random``; ``random`` with ``params.stage=llm`` -> ``random-stage=llm``.
    """
    from apet_bench.config import group_options, load_group

    name = method_cfg["name"]
    params = dict(method_cfg.get("params") or {})
    defaults = {}
    if name in group_options("method"):
        defaults = load_group("method", name, resolve=False).get("params") or {}
    changed = [f"{k}={params[k]}" for k in sorted(params) if k not in defaults or params[k] != defaults[k]]
    label = "-".join([name, *changed])
    return label.replace("/", "_").replace("__", "_")


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


#: Model keys that do not change what a run measures (where the same weights are read from).
_MODEL_KEYS_NOT_IN_NAME = ("local_path",)


def model_label(model_cfg: dict[str, Any]) -> str:
    """The model's part of a run name: its name, plus ``-key=value`` for every setting that differs from
    ``configs/model/<name>.yaml`` (sorted, nested keys dotted), so e.g. an eager-attention run or a tiny
    model with a deeper vision tower never shares a run directory with the default.

    ``tiny_llava15`` -> ``tiny_llava15``; with ``model.attn_implementation=eager`` ->
    ``tiny_llava15-attn_implementation=eager``; ``local_path`` is left out (same weights, other place).
    """
    from apet_bench.config import group_options, load_group

    name = model_cfg["name"]
    if name not in group_options("model"):
        return name
    defaults = _flatten(load_group("model", name, resolve=False))
    current = _flatten({k: v for k, v in model_cfg.items()})
    changed = [f"{k}={current[k]}" for k in sorted(current)
               if k not in _MODEL_KEYS_NOT_IN_NAME and (k not in defaults or current[k] != defaults[k])]
    label = "-".join([name, *changed])
    return label.replace("/", "_").replace("__", "_").replace(" ", "")


def _canonical(obj: Any) -> Any:
    """``obj`` as JSON would give it back (tuples -> lists, keys -> str), so identities compare equal."""
    import json

    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def _short_hash(obj: Any, n: int = 8) -> str:
    import hashlib
    import json

    return hashlib.sha256(json.dumps(_canonical(obj), sort_keys=True).encode()).hexdigest()[:n]


def _changed_from_file(group: str, node: dict[str, Any]) -> dict[str, Any]:
    """The keys (dotted) of a config-group node that differ from ``configs/<group>/<name>.yaml``."""
    from apet_bench.config import group_options, load_group

    name = node.get("name")
    defaults = _flatten(load_group(group, name, resolve=False)) if name in group_options(group) else {}
    current = _flatten(dict(node))
    return {k: current[k] for k in sorted(current) if k not in defaults or current[k] != defaults[k]}


def run_identity(cfg: dict[str, Any], budget: int | float | None, data_fingerprint: str | None) -> dict[str, Any]:
    """Everything that can change a run's result, recorded in ``run.json: identity``.

    The resolved model config (less ``local_path``, where the same weights are read from), the resolved
    method config (every parameter), the resolved benchmark config (every key: protocol, judge,
    metrics...), the budget, ``seed``, the generation settings ``gen_kwargs``, ``limit`` and the data
    fingerprint of the converted task (content hash of the files read). A finished run is reused only
    when its recorded identity equals the one requested (:func:`identity_changes`).
    """
    model = {k: v for k, v in cfg["model"].items() if k not in _MODEL_KEYS_NOT_IN_NAME}
    return _canonical({
        "model": model,
        "method": cfg["method"],
        "benchmark": cfg["benchmark"],
        "budget": budget,
        "seed": cfg.get("seed", 0),
        "gen_kwargs": cfg.get("gen_kwargs") or {},
        "limit": cfg.get("limit"),
        "data_fingerprint": data_fingerprint,
    })


def run_dir_name(cfg: dict[str, Any], budget: int | float | None) -> str:
    """Directory name of a run under ``runs/``: readable, and distinct for every variant one would keep
    side by side.

    ``<model_label>__<method_label>__<budget>__<benchmark>`` (:func:`model_label`, :func:`method_label`,
    :func:`apet_bench.protocol.benchmark_label`: ``-protocol=lmms_eval`` when not the default),
    then ``-seed=N`` when ``seed`` is not 0, then ``-<hash8>`` (sha256 of the generation settings and the
    benchmark keys that differ from ``configs/benchmark/<name>.yaml``) when either is set. ``limit`` and
    the data fingerprint are not part of the name: a run with another limit or on changed data replaces
    the one in place (it is rerun, not reused; see :func:`run_identity`).
    """
    from apet_bench.protocol import benchmark_label

    name = run_name(model_label(cfg["model"]), method_label(cfg["method"]), budget, benchmark_label(cfg["benchmark"]))
    seed = cfg.get("seed", 0)
    if seed not in (0, None):
        name += f"-seed={seed}"
    changed = {k: v for k, v in _changed_from_file("benchmark", cfg["benchmark"]).items() if k != "protocol"}
    rest = {"gen_kwargs": cfg.get("gen_kwargs") or {}, "benchmark": changed}  # the protocol is in the label
    if rest["gen_kwargs"] or rest["benchmark"]:
        name += f"-{_short_hash(rest)}"
    return name.replace("/", "_")


def identity_changes(recorded: dict[str, Any] | None, requested: dict[str, Any]) -> list[str]:
    """Why a finished run does not answer a request: one short phrase per differing identity key
    (``"seed 0 -> 1"``, ``"data_fingerprint changed"``); empty when they are equal."""
    if not isinstance(recorded, dict):
        return ["the finished run records no identity (made by an older version)"]
    out = []
    for key in sorted(set(recorded) | set(requested)):
        a, b = recorded.get(key), requested.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            fa, fb = _flatten(a), _flatten(b)
            keys = [k for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)]
            out.append(f"{key}.{{{', '.join(keys)}}} changed" if keys else f"{key} changed")
        elif len(repr(a)) + len(repr(b)) < 60:
            out.append(f"{key} {a!r} -> {b!r}")
        else:
            out.append(f"{key} changed")
    return out


def prepare_run(cfg: DictConfig | dict[str, Any]) -> PreparedRun:
    """Validate a composed config and prepare its benchmark data; writes nothing under results/.

    Raises
    ------
    apet_bench.budget.BudgetError
        Budget 0, negative, a float outside (0, 1], or above the model's visual tokens per image.
    apet_bench.data.DataError
        ``data_root`` missing or without the benchmark's layout; a corrupt image with ``on_corrupt_image=error``.
    apet_bench.config.ConfigError
        Any other bad value (``on_corrupt_image``, ``limit``).
    """
    from apet_bench.data import prepare_benchmark

    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    cfg = {k: v for k, v in cfg.items() if k != "hydra"}
    budget = cfg.get("budget")
    if budget is not None:
        # Largest visual span of one input (Video-LLaVA: a video's 8 x 257, beyond its 256 per image).
        budget = validate_budget(budget, cfg["model"].get("max_visual_tokens") or cfg["model"].get("visual_tokens"))
    if cfg["method"]["name"] == "none":
        budget = None  # nothing is compressed: recorded as no budget (run name says "full")
    elif budget is None:
        raise BudgetError(f"method {cfg['method']['name']!r} needs a budget (budget=null given)")
    from apet_bench.methods import build_method
    from apet_bench.models import config_facts

    # The method's own checks against the model config (drop layers, schedules, [CLS]) before loading.
    build_method(cfg["method"]["name"], budget=budget, seed=cfg.get("seed", 0),
                 **(cfg["method"].get("params") or {})).check_model_config(config_facts(cfg["model"]))
    from apet_bench.wandb_logger import LOGGERS, _wandb_settings

    if (cfg.get("logger") or "none") not in LOGGERS:  # checked before the evaluation, not after it
        raise ConfigError(f"logger {cfg.get('logger')!r} is invalid (use {' | '.join(LOGGERS)})")
    if cfg.get("logger") == "wandb":
        _wandb_settings(cfg.get("wandb") or {})
    if cfg.get("on_corrupt_image") not in ("skip", "error"):
        raise ConfigError(f"on_corrupt_image {cfg.get('on_corrupt_image')!r} is invalid (use skip or error)")
    from apet_bench.generation import config_gen_kwargs

    gen_kwargs_arg(config_gen_kwargs(cfg)[0])  # a value lmms-eval cannot take fails here, before any loading
    limit = cfg.get("limit")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0):
        raise ConfigError(f"limit {limit!r} is invalid (use a positive integer or null)")
    cfg["data_root"] = _resolve_path(cfg.get("data_root"))
    cfg["cache_dir"] = _resolve_path(cfg.get("cache_dir")) or str(Path("~/.cache/apet_bench").expanduser())
    from apet_bench.protocol import ProtocolError, resolve

    try:  # the name shows what was chosen; then the benchmark's protocol (llava | lmms_eval) fills its settings
        name = run_dir_name(cfg, budget)
        cfg["benchmark"] = resolve(cfg["benchmark"])
    except ProtocolError as exc:
        raise ConfigError(str(exc)) from None
    prepared = prepare_benchmark(
        cfg["benchmark"], data_root=cfg["data_root"], cache_dir=cfg["cache_dir"],
        on_corrupt_image=cfg["on_corrupt_image"],
    )
    identity = run_identity(cfg, budget, getattr(prepared, "fingerprint", None))
    return PreparedRun(cfg=cfg, name=name, budget=budget, prepared_task=prepared, store=RunStore(cfg["results_dir"]),
                       identity=identity)


def gen_kwargs_arg(gen_kwargs: dict[str, Any] | None) -> str | None:
    """:func:`apet_bench.generation.encode_gen_kwargs`, raising :class:`ConfigError` (bad input, exit 2)."""
    from apet_bench.generation import encode_gen_kwargs

    try:
        return encode_gen_kwargs(gen_kwargs)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _set_verbosity(level: str) -> None:
    try:
        from loguru import logger

        logger.remove()
        logger.add(sys.stderr, level=str(level).upper())
    except Exception:  # loguru is an lmms-eval dependency; logging is cosmetic
        pass


def _evaluate(run: PreparedRun, lmm: Any, output_dir: Path | None = None) -> dict[str, Any] | None:
    """Run lmms-eval and check that every metric exists for every sample.

    ``output_dir`` is lmms-eval's output path (``cli_args.output_path``): task aggregations write their
    submission files under ``<output_dir>/submissions/`` (``lmms_eval/tasks/_task_utils/file_utils.py``)
    instead of ``./submissions/``. In a data-parallel run (:mod:`apet_bench.distributed`) the ranks'
    records are gathered to rank 0; the other ranks get None.
    """
    from types import SimpleNamespace

    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager
    from lmms_eval.utils import get_datetime_str

    from apet_bench.distributed import gather_to_rank0, world
    from apet_bench.generation import config_gen_kwargs  # benchmark/model/run gen_kwargs over the task's own

    cfg, task = run.cfg, run.prepared_task
    _set_verbosity(cfg.get("verbosity", "WARNING"))
    tm = TaskManager(str(cfg.get("verbosity", "WARNING")).upper(), include_path=task.include_path, model_name="apet_bench")
    import json

    from apet_bench.data.mmbench import JUDGE_ENV_VAR as MMBENCH_JUDGE
    from apet_bench.judge import ENV_VAR as JUDGE

    judge = {**dict(cfg["benchmark"].get("judge") or {}), **dict(cfg["benchmark"].get("judge_overrides") or {})}
    for var, wanted in ((JUDGE, cfg["benchmark"].get("scoring") == "judge"),  # read inside the task's aggregation
                        (MMBENCH_JUDGE, bool(cfg["benchmark"].get("judge_fallback")))):
        if wanted:
            os.environ[var] = json.dumps(judge)
        else:
            os.environ.pop(var, None)  # never left over from an earlier run of the sweep
    model_args = (f"model={cfg['model']['name']},method={cfg['method']['name']},budget={run.budget},"
                  f"seed={cfg.get('seed', 0)}")
    # process_with_media=True is lmms-eval's behaviour without cli_args (documents iterated with their media).
    cli_args = None if output_dir is None else SimpleNamespace(output_path=str(output_dir), process_with_media=True)
    try:
        results = simple_evaluate(
            model=lmm, model_args=model_args, tasks=[task.task_name], task_manager=tm, batch_size=1,
            limit=cfg.get("limit"), bootstrap_iters=0, log_samples=True, gen_kwargs=gen_kwargs_arg(config_gen_kwargs(cfg)[0]),
            datetime_str=get_datetime_str(), random_seed=cfg.get("seed", 0), verbosity=str(cfg.get("verbosity", "WARNING")).upper(),
            cli_args=cli_args, distributed_executor_backend="torchrun" if world().distributed else "accelerate",
        )
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise EvaluationError(f"lmms-eval raised {type(exc).__name__}: {msg}") from exc
    if world().distributed:
        gathered = gather_to_rank0(lmm.records)
        if not world().main:
            return None
        # lmms-eval pads a rank that has fewer documents with a copy of one of its requests: keep one record per doc
        merged = {(r.task, r.doc_id): r for rank_records in reversed(gathered) for r in reversed(rank_records)}
        lmm.records = sorted(merged.values(), key=lambda r: (r.task, r.doc_id))
    if not results or "results" not in results:
        raise EvaluationError(f"lmms-eval returned no results for task {task.task_name!r}")
    task_res = results["results"].get(task.task_name)
    if task_res is None:
        raise EvaluationError(f"lmms-eval results lack task {task.task_name!r}")
    effective = results.get("n-samples", {}).get(task.task_name, {}).get("effective")
    if task.num_samples is None:  # a hub task (apet_bench.data.hub): lmms-eval counted the documents
        expected = effective if isinstance(effective, int) and effective > 0 else -1
    else:
        expected = task.num_samples if cfg.get("limit") is None else min(task.num_samples, cfg["limit"])
    samples = (results.get("samples") or {}).get(task.task_name) or []
    if effective != expected or len(samples) != expected or len(lmm.records) != expected:
        raise EvaluationError(
            f"task {task.task_name!r}: expected {expected} samples, lmms-eval reports {effective}, "
            f"logged {len(samples)}, model answered {len(lmm.records)}"
        )
    # A headline metric is required when some sample was scored for it: MME data without cognition
    # subtasks (or a limit that reaches none) has no cognition score, which is reported as missing.
    scored = {k for smp in samples for k in smp}
    required = [m for m in cfg["benchmark"].get("metrics") or [] if m in scored]
    for metric in required:
        value = task_res.get(f"{metric},none")
        if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(float(value)):
            fails = task_res.get("judge_failures,none")  # apet_bench.judge: calls that failed are left out
            extra = f"; {int(fails)} judge call(s) failed (see benchmark.judge)" if isinstance(fails, (int, float)) and fails else ""
            raise EvaluationError(f"task {task.task_name!r}: metric {metric!r} missing or not a number ({value!r}){extra}")
    return results


def sample_id(row: dict[str, Any]) -> str | None:
    """The id our task functions put in a sample's per-sample records (POPE ``<category>/<question_id>``,
    MMBench the row ``index``), else the records' ``question_id``; None when neither is there."""
    recs = [v for v in row.values() if isinstance(v, dict)]
    for key in ("sample_id", "question_id"):
        for r in recs:
            if r.get(key) not in (None, ""):
                return str(r[key])
    return None


def protocol_record(bench_cfg: dict[str, Any]) -> dict[str, Any]:
    """What ``metrics.json`` records of the protocol: its name and its documented fields (data version...)."""
    from apet_bench.protocol import DOC_FIELDS

    name = bench_cfg.get("protocol")
    block = dict((bench_cfg.get("protocols") or {}).get(name) or {})
    return {"name": name, **{k: block.get(k) for k in DOC_FIELDS if k in block}}


def _token_summary(records: list[dict[str, Any]], budget: Any, visual_tokens: int | None) -> dict[str, Any]:
    n = len(records)
    llm = [r["visual_tokens_llm"] for r in records]
    layer_avg = [sum(r["layer_visual_tokens"]) / len(r["layer_visual_tokens"]) for r in records if r["layer_visual_tokens"]]
    out = {
        "budget_requested": budget,
        # An int budget is a token count; a ratio's token count depends on each input (see samples.jsonl).
        "budget_tokens": budget_to_tokens(budget, visual_tokens) if isinstance(budget, int) and visual_tokens else None,
        "samples": n,
        # samples whose visual span was at or below an int budget: all their visual tokens were kept
        "uncompressed_samples": sum(bool(r.get("uncompressed")) for r in records),
        "visual_tokens_in_mean": sum(r["visual_tokens_in"] for r in records) / n if n else None,
        "visual_tokens_llm_mean": sum(llm) / n if n else None,
        "visual_tokens_llm_min": min(llm) if n else None,
        "visual_tokens_llm_max": max(llm) if n else None,
        "layer_average_visual_tokens_mean": sum(layer_avg) / len(layer_avg) if layer_avg else None,
        "prompt_tokens_mean": sum(r["prompt_tokens"] for r in records) / n if n else None,
        "prefill_ms_mean": sum(r["prefill_ms"] for r in records) / n if n else None,
        "total_ms_mean": sum(r["total_ms"] for r in records) / n if n else None,
    }
    return out


def _attention_summary(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The per-layer attention backends of the run (``GenerationOutput.attention_backends``): the first
    sample's, with ``"consistent": False`` if any sample differed."""
    seen = [r.get("attention_backends") for r in records if r.get("attention_backends")]
    if not seen:
        return None
    first = dict(seen[0])
    first["consistent"] = all(s == seen[0] for s in seen)
    return first


def _add_sample_ids(samples: list[dict[str, Any]], docs: dict[Any, Any]) -> None:
    """Give every sample row a stable ``sample_id``, so two runs on the same benchmark pair question by
    question whatever their order or ``limit``: the task's own id (:func:`sample_id`) when it is unique
    across the run (MME's ``question_id`` names the image, shared by its two questions, so it is not),
    else :func:`apet_bench.stats.doc_sample_id` of the document's text fields, else ``doc<doc_id>``."""
    from apet_bench.stats import doc_sample_id, unique_ids

    own = [sample_id(r) for r in samples]
    if None not in own and len(set(own)) == len(own):
        ids = own
    else:
        ids = unique_ids([doc_sample_id(docs.get(r["doc_id"])) for r in samples])
    for r, i in zip(samples, ids):
        r["sample_id"] = i if i is not None else f"doc{r['doc_id']}"


def _prepare_ranked(cfg: DictConfig | dict[str, Any]) -> PreparedRun:
    """:func:`prepare_run`; in a data-parallel run (:mod:`apet_bench.distributed`) the process group is
    joined first and rank 0 prepares the benchmark data (it may convert it into ``cache_dir``) before the
    other ranks, which then reuse it."""
    if not world().distributed:
        return prepare_run(cfg)
    from apet_bench.models.base import resolve_device

    model = cfg["model"]
    w = init_process_group(resolve_device(str(model.get("device") or "auto")).type)
    if w.main:
        try:
            return prepare_run(cfg)
        finally:
            broadcast_from_rank0(None)  # the other ranks go on (and meet the same error, if any)
    broadcast_from_rank0(None)
    return prepare_run(cfg)


def execute(cfg: DictConfig | dict[str, Any], *, choices: dict[str, Any] | None = None) -> RunOutcome:
    """Run one configuration end to end, or skip it when already finished.

    Parameters
    ----------
    cfg : DictConfig | dict
        A composed config (``run.py`` / :func:`apet_bench.config.compose`).
    choices : dict, optional
        The config-group choices (Hydra's ``runtime.choices``), recorded in the run.

    Returns
    -------
    RunOutcome

    Raises
    ------
    ConfigError, BudgetError, DataError
        From :func:`prepare_run`; nothing is written.
    EvaluationError
        lmms-eval failed or produced an incomplete result; nothing is written.
    """
    t0 = time.perf_counter()
    run = _prepare_ranked(cfg)
    check_before_loading(run)
    if not world().main:  # a worker rank of a data-parallel run: rank 0 holds the run's lock
        return _execute_locked(run, choices, t0)
    with run.store.lock(run.name, on_wait=lambda msg: print(f"apet-bench: {msg}", file=sys.stderr, flush=True)):
        return _execute_locked(run, choices, t0)


def check_before_loading(run: PreparedRun) -> None:
    """Checks that would otherwise fail only after the evaluation: ``results_dir`` writable, a sample
    count the benchmark can score (MME pairs), the judge endpoint of a judged benchmark reachable.

    Raises
    ------
    apet_bench.config.ConfigError
        One line naming the bad value.
    """
    cfg = run.cfg
    limit = cfg.get("limit")
    if cfg["benchmark"].get("converter") == "mme" and limit is not None and limit % 2:
        raise ConfigError(f"limit {limit} is odd: MME scores question pairs (two per image), use an even limit")
    if cfg["benchmark"].get("scoring") == "judge":
        from apet_bench.judge import JudgeConfig, check_endpoint

        check_endpoint(JudgeConfig.from_mapping(cfg["benchmark"].get("judge") or {}))

    import tempfile

    runs = run.store.runs_dir
    try:
        runs.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=runs, prefix=".probe-"):
            pass
    except OSError as exc:
        raise ConfigError(f"results_dir {str(run.store.results_dir)!r} is not writable ({exc.strerror or exc})") from None


def _execute_locked(run: PreparedRun, choices: dict[str, Any] | None, t0: float) -> RunOutcome:
    """The part of :func:`execute` done while holding the run's lock (:meth:`RunStore.lock`)."""
    from apet_bench.eval.lmms_model import ApetBenchLMM
    from apet_bench.methods import build_method

    cfg = run.cfg
    run_dir = run.store.run_dir(run.name)
    redo = bool(cfg.get("force"))
    if run.store.is_finished(run.name) and not redo:
        summary = run.store.load(run.name)
        changes = identity_changes(summary.get("identity"), run.identity)
        if not changes:
            return RunOutcome(run.name, "skipped", str(run_dir), summary)
        # The finished run answers another request (other seed, data, limit, ...): rerun and replace it.
        print(f"apet-bench: {run.name}: the finished run differs from this request ({'; '.join(changes)}); "
              f"running it again", file=sys.stderr, flush=True)
        redo = True

    adapter = _load_adapter(cfg["model"])
    compressor = build_method(cfg["method"]["name"], budget=run.budget, seed=cfg.get("seed", 0),
                              **(cfg["method"].get("params") or {}))
    lmm = ApetBenchLMM(adapter=adapter, compressor=compressor)
    if not world().main:  # a worker rank of a data-parallel run: rank 0 gathers its samples and writes the run
        _evaluate(run, lmm)
        return RunOutcome(run.name, "worker", str(run_dir))
    store = None
    if not world().distributed:  # answers kept across a kill (one process: the documents are not split)
        store = SampleStore(run.store.results_dir / "partial" / f"{run.name}-{_short_hash(run.identity, 16)}.jsonl")
        if redo and bool(cfg.get("force")):
            store.remove()  # force=true: nothing is reused, not even samples of an interrupted attempt
            store = SampleStore(store.path)
        elif len(store):
            print(f"apet-bench: {run.name}: resuming, {len(store)} sample(s) already answered in {store.path}",
                  file=sys.stderr, flush=True)
        lmm.sample_store = store
    # lmms-eval writes its own files (submissions, aggregations) into this run's staging directory.
    with run.store.open_run(run.name, force=redo, locked=True) as w:
        summary = _evaluate_and_write(run, lmm, adapter, w, choices=choices, t0=t0)
    if store is not None:
        store.remove()
    from apet_bench.wandb_logger import log_finished_run  # logger=wandb: one W&B run from run_dir

    log_finished_run(cfg, run_dir)
    return RunOutcome(run.name, "finished", str(run_dir), summary)


def _evaluate_and_write(run: PreparedRun, lmm: Any, adapter: Any, w: Any, *, choices: dict[str, Any] | None,
                        t0: float) -> dict[str, Any]:
    """Evaluate with lmms-eval writing into the staging directory of ``w`` (a :class:`RunWriter`), then write
    the run's files; returns the ``run.json`` summary."""
    cfg = run.cfg
    run_dir = run.store.run_dir(run.name).resolve()
    t_eval = time.perf_counter()
    results = _evaluate(run, lmm, output_dir=(w.staging / "lmms_eval").resolve())
    # Files lmms-eval wrote (server-scored splits' submission files; there is then no local score), by the
    # path they will have once the run is moved into place.
    results["submission_files"] = sorted(str(run_dir / p.relative_to(w.staging))
                                         for p in (w.staging / "lmms_eval").rglob("*") if p.is_file())
    resolved = (results.get("config") or {}).get("resolved_cli_args")
    if isinstance(resolved, dict) and "output_path" in resolved:
        resolved["output_path"] = str(run_dir / "lmms_eval")
    eval_s = time.perf_counter() - t_eval

    task = run.prepared_task
    records = lmm.records_as_dicts()
    by_doc = {r["doc_id"]: r for r in records}
    samples = []
    logged = results.pop("samples")[task.task_name]
    for s in logged:
        row = {k: v for k, v in s.items() if k not in ("arguments", "doc", "doc_hash")}
        row.update({k: v for k, v in by_doc.get(s["doc_id"], {}).items() if k not in ("task", "doc_id", "attention_backends")})
        samples.append(row)
    samples.sort(key=lambda r: r["doc_id"])
    _add_sample_ids(samples, {s["doc_id"]: s.get("doc") for s in logged})
    if cfg["benchmark"].get("scoring") == "judge":  # every judged answer's verdict, next to the answer
        from apet_bench.judge import verdict_for

        for row in samples:
            verdict = verdict_for(row.get("gpt_eval_accuracy"))
            if verdict is not None:
                row["judge"] = verdict
    task_res = results["results"][task.task_name]
    metrics = {k.split(",")[0]: v for k, v in task_res.items() if k.endswith(",none") and "_stderr" not in k}
    tokens = _token_summary(records, run.budget, cfg["model"].get("visual_tokens"))
    provenance = collect_provenance(adapter=adapter)
    groups = dict(choices or {})
    for g in ("model", "method", "benchmark"):
        groups.setdefault(g, cfg[g]["name"])
    summary = {
        "status": "complete",
        "name": run.name,
        "groups": groups,
        "model": cfg["model"]["name"],
        "method": cfg["method"]["name"],
        "method_params": cfg["method"].get("params") or {},
        "budget": run.budget,
        "benchmark": cfg["benchmark"]["name"],
        "protocol": cfg["benchmark"].get("protocol"),
        "task": task.task_name,
        "metrics": {m: metrics.get(m) for m in (cfg["benchmark"].get("metrics") or metrics)},
        "num_samples": len(samples),
        "limit": cfg.get("limit"),
        "identity": run.identity,
        "identity_hash": _short_hash(run.identity, 16),
        "skipped_samples": sum(int(s.get("questions", 0)) for s in task.skipped),
        "visual_tokens_llm_mean": tokens["visual_tokens_llm_mean"],
        "layer_average_visual_tokens": tokens["layer_average_visual_tokens_mean"],
        "uncompressed_samples": tokens["uncompressed_samples"],
        "weights": provenance.get("weights"),
        "random_weights": provenance.get("random_weights"),
        "device": provenance.get("device"),
        "attn_implementation": provenance.get("attn_implementation"),
        "attention_backends": _attention_summary(records),
        # What the model received per task: the task's generation_kwargs with the config's gen_kwargs merged over them.
        "generation_kwargs": dict(lmm.generation_kwargs),
        "processes": world().size,  # data-parallel processes that shared the samples (torchrun --nproc_per_node)
        "eval_s": round(eval_s, 3),
        "wall_s": round(time.perf_counter() - t0, 3),
        "note": RANDOM_WEIGHTS_NOTE if provenance.get("random_weights") else None,
    }
    w.write_text("config.yaml", OmegaConf.to_yaml(OmegaConf.create(cfg)))
    w.write_json("metrics.json", {
        "task": task.task_name,
        "metrics": metrics,
        "lmms_eval_metrics": task_res,
        "n_samples": results.get("n-samples", {}).get(task.task_name),
        "skipped": task.skipped,
        "skipped_samples": summary["skipped_samples"],
        "subtasks": task.subtasks,
        "missing_subtasks": task.missing_subtasks,
        "data_source": task.source,
        "protocol": protocol_record(cfg["benchmark"]),
        "data_fingerprint": task.fingerprint,
        "tokens": tokens,
        "eval_s": summary["eval_s"],
        "note": summary["note"],
    })
    w.write_jsonl("samples.jsonl", samples)
    w.write_json("provenance.json", provenance)
    w.write_json("lmms_eval/results.json", results)
    summary["wall_s"] = round(time.perf_counter() - t0, 3)
    summary["resumed_samples"] = lmm.resumed
    w.write_json(RUN_MARKER, summary)
    return summary
