"""The latency protocol: prefill / decode / total time per sample and peak memory, per attention backend.

``python -m apet_bench.latency model=llava15 method=apet budget=64 [backends=sdpa,eager] [warmup=3]
[repeats=10] [max_new_tokens=16] [device=auto] [visual_tokens=729]``

Protocol (one documented answer to "how was timing measured"):

* **Model.** Real weights when the checkpoint is available (``local_path`` or the HF cache); otherwise,
  on CUDA, the *full-size* model class built from its published configuration
  (:func:`apet_bench.flops.full_size_config`) with **random bf16 weights**: at a fixed number of
  generated tokens the time does not depend on the weight values. The tokenizer / processor are the
  tiny variant's (offline; same image processor geometry, so the same visual tokens). Every output says
  which. On CPU (no GPU) full-size models are not run: the same code runs on the tiny random-weight
  models, and every output states that **the times are not comparable** to the paper's A100 numbers.
* **Input.** One image (a fixed random-noise picture: LLaVA-1.5 336 px -> 576 visual tokens; Qwen2.5-VL
  ``28h × 28w`` px -> ``h·w`` tokens, 729 by default) and the POPE question
  ``"Is there a bus in the image?\\nAnswer the question using a single word or phrase."``, batch 1.
* **Fixed output length.** ``min_new_tokens = max_new_tokens`` (default 16), greedy, so every sample
  decodes the same number of tokens whatever the weights.
* **Warm-up** runs (default 3) are discarded, then ``repeats`` (default 10) timed runs; medians reported.
* **Timing** through the adapter's own ``generate`` path (:func:`apet_bench.pipeline.generate`, which measures
  ``prefill_ms`` = vision encoder + projector + stage-1 compression + LLM prefill up to the end of the
  prefill forward, and ``total_ms`` to the end of decoding). On CUDA its clock is replaced by CUDA events
  (an event recorded and synchronised at each stamp, elapsed time from a start event); on CPU
  ``time.perf_counter``. ``decode_ms = total_ms - prefill_ms``; ``ms_per_decode_token`` divides it by
  ``max_new_tokens - 1`` (the first token comes out of the prefill).
* **Peak memory**: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (per backend,
  MiB); on CPU the process's peak resident set size (``ru_maxrss``, MiB; a process-wide high-water mark).
* **Backends**: ``eager``, ``sdpa``, and ``flash_attention_2`` when ``flash_attn`` is installed and CUDA is
  present (others are reported as skipped with the reason).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import resource
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from apet_bench.config import ConfigError
from apet_bench.pipeline import generate

__all__ = [
    "BACKENDS",
    "POPE_QUESTION",
    "LatencyResult",
    "available_backends",
    "build_latency_adapter",
    "main",
    "measure_latency",
    "synthetic_image",
]

BACKENDS: tuple[str, ...] = ("eager", "sdpa", "flash_attention_2")
#: The POPE question used for timing (lmms-eval / LLaVA POPE prompt suffix).
POPE_QUESTION = "Is there a bus in the image?\nAnswer the question using a single word or phrase."
NOT_COMPARABLE = (
    "CPU timing of a tiny random-weight model: a protocol check, NOT comparable to the paper's A100 times"
)


def available_backends(device: torch.device | str) -> dict[str, str | None]:
    """Which attention backends can run on ``device``: ``{backend: None (ok) | reason skipped}``."""
    dev = torch.device(device)
    out: dict[str, str | None] = {"eager": None, "sdpa": None}
    if dev.type != "cuda":
        out["flash_attention_2"] = "needs CUDA"
    elif importlib.util.find_spec("flash_attn") is None:
        out["flash_attention_2"] = "flash_attn is not installed (APET_BENCH_FLASH_ATTN=1 make install)"
    else:
        out["flash_attention_2"] = None
    return out


def synthetic_image(width: int, height: int, seed: int = 0) -> Any:
    """A fixed random-noise RGB ``PIL.Image`` of ``width × height`` px (timing does not depend on content)."""
    from PIL import Image

    gen = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(height, width, 3, generator=gen) * 255).to(torch.uint8).numpy()
    return Image.fromarray(pixels, "RGB")


def _image_for(family: str, visual_tokens: int | None) -> Any:
    if family == "qwen25vl":
        from apet_bench.flops import _square_grid

        h, w = _square_grid(int(visual_tokens or 729))
        return synthetic_image(28 * w, 28 * h)
    if family == "video_llava":
        return synthetic_image(224, 224)
    return synthetic_image(336, 336)


def _model_cfg(model: str) -> dict[str, Any]:
    """The Hydra-composed ``configs/model/<model>.yaml``; ConfigError (listing the models) when unknown."""
    from apet_bench.config import load_group

    try:
        return load_group("model", model)
    except ConfigError as exc:
        raise ConfigError(f"latency: {exc}") from None


def build_latency_adapter(model: str, attn_implementation: str = "sdpa", device: str = "auto") -> tuple[Any, str]:
    """The adapter to time and a sentence saying what weights it has.

    Parameters
    ----------
    model : str
        Model config name. ``tiny_*``: the tiny random-weight model. A full-size name: real weights when
        loadable; otherwise on CUDA the full-size architecture with random bf16 weights; on CPU a
        :class:`~apet_bench.config.ConfigError` (use the tiny variant: 7B on 2 cores is not a timing).
    attn_implementation : str
        ``eager``, ``sdpa`` or ``flash_attention_2``.
    device : str
        ``auto``, ``cpu``, ``cuda``, ``cuda:N``.

    Returns
    -------
    (ModelAdapter, str)

    Raises
    ------
    ConfigError
        Unknown model / backend, or a full-size model without weights and without CUDA.
    """
    from apet_bench.models import load_model
    from apet_bench.models.base import resolve_device

    if attn_implementation not in BACKENDS:
        raise ConfigError(f"latency: attention backend {attn_implementation!r} is not one of {', '.join(BACKENDS)}")
    cfg = _model_cfg(model)
    dev = resolve_device(device)
    reason = available_backends(dev)[attn_implementation]
    if reason:
        raise ConfigError(f"latency: backend {attn_implementation} unavailable: {reason}")
    cfg.update(attn_implementation=attn_implementation, device=str(dev))
    if cfg.get("tiny"):
        adapter = load_model(cfg)
        return adapter, adapter.weights
    try:
        adapter = load_model(cfg)
        return adapter, adapter.weights
    except Exception as e:  # noqa: BLE001 - no checkpoint: random weights on CUDA, refuse on CPU
        if dev.type != "cuda":
            raise ConfigError(
                f"latency: {model} has no loadable weights here ({str(e).splitlines()[0][:120]}) and no GPU; "
                f"time tiny_{model} on CPU or run on CUDA (random bf16 weights)"
            ) from None
    return _random_full_size(cfg, attn_implementation, dev)


def _random_full_size(cfg: Mapping[str, Any], attn: str, dev: torch.device) -> tuple[Any, str]:
    """Full-size architecture, random bf16 weights on ``dev``, with the tiny variant's processor."""
    from apet_bench.flops import full_size_config
    from apet_bench.models import get_adapter_class, load_model
    from apet_bench.models.base import ModelSpec

    family = cfg["family"]
    tiny_cfg = _model_cfg(f"tiny_{cfg['name']}")
    tiny_cfg.update(device="cpu")
    if family == "qwen25vl":  # the paper's pixel bounds, so the image gives the real visual tokens
        tiny_cfg["tiny_config"] = {**(tiny_cfg.get("tiny_config") or {}),
                                   "min_pixels": cfg.get("min_pixels", 200704), "max_pixels": cfg.get("max_pixels", 1605632)}
        tiny_cfg.update(min_pixels=cfg.get("min_pixels", 200704), max_pixels=cfg.get("max_pixels", 1605632),
                        visual_tokens=cfg.get("visual_tokens", 2048))
    tiny = load_model(tiny_cfg)
    cls, full = full_size_config(family)
    for obj, src in ((full, tiny.model.config), (full.get_text_config(), tiny.model.config.get_text_config())):
        for attr in ("image_token_id", "image_token_index", "video_token_id", "video_token_index",
                     "vision_start_token_id", "vision_end_token_id", "pad_token_id", "bos_token_id", "eos_token_id"):
            if hasattr(src, attr) and getattr(src, attr) is not None:
                try:
                    setattr(obj, attr, getattr(src, attr))
                except AttributeError:  # read-only alias
                    pass
    with torch.device(dev):
        model = cls._from_config(full, attn_implementation=attn, dtype=torch.bfloat16)
    model.eval()
    model.generation_config = tiny.model.generation_config
    spec = ModelSpec.from_mapping({**{k: v for k, v in cfg.items() if k in ("name", "family", "hf_id", "revision")},
                                   "tiny": False, "dtype": "bfloat16", "attn_implementation": attn, "device": str(dev)})
    weights = (f"random bf16 weights in the full-size {cls.__name__} architecture (no checkpoint here; timing does "
               "not depend on weight values at a fixed output length); tiny word-level tokenizer")
    adapter = get_adapter_class(family)(spec=spec, model=model, processor=tiny.processor, weights=weights,
                                        is_random_weights=True)
    return adapter, weights


class _EventClock:
    """A clock for ``ModelAdapter.clock``: seconds since :meth:`start`, measured with CUDA events."""

    def __init__(self, device: torch.device):
        self.device = device
        self.ref: Any = None

    def start(self) -> None:
        self.ref = torch.cuda.Event(enable_timing=True)
        self.ref.record()

    def __call__(self) -> float:
        if self.ref is None:
            self.start()
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        ev.synchronize()
        return float(self.ref.elapsed_time(ev)) / 1e3


@dataclass
class LatencyResult:
    """Medians over the timed runs of one model × method × budget × backend (ms, MiB)."""

    model: str
    method: str
    budget: int | float | None
    backend: str
    device: str
    device_name: str
    weights: str
    dtype: str
    timer: str
    comparable: bool
    note: str
    warmup: int
    repeats: int
    max_new_tokens: int
    prompt_tokens: int
    visual_tokens_in: int
    visual_tokens_llm: int
    mean_layer_visual_tokens: float
    prefill_ms: float
    decode_ms: float
    total_ms: float
    ms_per_decode_token: float
    peak_memory_mib: float
    memory_kind: str
    prefill_ms_runs: list[float] = field(default_factory=list)
    total_ms_runs: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return dataclasses.asdict(self)


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def measure_latency(
    adapter: Any,
    method: Any = None,
    *,
    weights: str | None = None,
    warmup: int = 3,
    repeats: int = 10,
    max_new_tokens: int = 16,
    image: Any = None,
    question: str = POPE_QUESTION,
    visual_tokens: int | None = None,
) -> LatencyResult:
    """Time :func:`apet_bench.pipeline.generate` under ``method`` with the protocol of the module docstring.

    Parameters
    ----------
    adapter : ModelAdapter
    method : TokenCompressor, optional
        Default ``none``.
    weights : str, optional
        Provenance sentence (default ``adapter.weights``).
    warmup, repeats : int
        Discarded and timed runs (``warmup >= 0``, ``repeats >= 1``).
    max_new_tokens : int
        Generated tokens per sample, fixed (``min_new_tokens`` = the same), ``>= 1``.
    image : PIL.Image, optional
        Default a synthetic image of the model's geometry (:func:`synthetic_image`).
    question : str
    visual_tokens : int, optional
        Qwen2.5-VL: visual tokens of the synthetic image (default 729).

    Returns
    -------
    LatencyResult

    Raises
    ------
    ValueError
        For ``warmup < 0``, ``repeats < 1`` or ``max_new_tokens < 1`` (one line).
    """
    for name, value, low in (("warmup", warmup, 0), ("repeats", repeats, 1), ("max_new_tokens", max_new_tokens, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"latency: {name} {value!r} must be an integer >= {low}")
    if method is None:
        from apet_bench.methods.none import NoCompression

        method = NoCompression()
    dev = adapter.device
    cuda = dev.type == "cuda"
    image = image if image is not None else _image_for(adapter.family, visual_tokens)
    gen_kwargs = {"max_new_tokens": max_new_tokens, "min_new_tokens": max_new_tokens, "do_sample": False}
    clock = _EventClock(dev) if cuda else None
    if clock is not None:
        adapter.clock = clock  # instance attribute: the pipeline's wall times and prefill probe read it
    prefill, total = [], []
    out = None
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    try:
        for i in range(warmup + repeats):
            if clock is not None:
                torch.cuda.synchronize(dev)
                clock.start()
            out = generate(adapter, [image], question, gen_kwargs, method)
            if len(out.output_ids) != max_new_tokens:
                raise RuntimeError(f"latency: generated {len(out.output_ids)} tokens, expected {max_new_tokens}")
            if i >= warmup:
                prefill.append(float(out.prefill_ms))
                total.append(float(out.total_ms))
    finally:
        if clock is not None:
            del adapter.clock
    if cuda:
        peak, mem_kind = torch.cuda.max_memory_allocated(dev) / 2**20, "torch.cuda.max_memory_allocated"
    else:
        peak, mem_kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process peak RSS (ru_maxrss)"
    p, t = statistics.median(prefill), statistics.median(total)
    comparable = cuda and not getattr(adapter.spec, "tiny", False)
    note = (f"{_device_name(dev)}; {'random' if adapter.is_random_weights else 'real'} weights; batch 1; "
            f"{max_new_tokens} generated tokens") if comparable else NOT_COMPARABLE
    assert out is not None
    layers = out.layer_visual_tokens
    return LatencyResult(
        model=adapter.name,
        method=method.name,
        budget=getattr(method, "budget", None),
        backend=adapter.attn_implementation,
        device=str(dev),
        device_name=_device_name(dev),
        weights=weights or adapter.weights,
        dtype=str(adapter.dtype).replace("torch.", ""),
        timer="cuda events" if cuda else "time.perf_counter",
        comparable=comparable,
        note=note,
        warmup=warmup,
        repeats=repeats,
        max_new_tokens=max_new_tokens,
        prompt_tokens=out.prompt_tokens,
        visual_tokens_in=out.visual_tokens_in,
        visual_tokens_llm=out.visual_tokens_llm,
        mean_layer_visual_tokens=sum(layers) / max(1, len(layers)),
        prefill_ms=p,
        decode_ms=t - p,
        total_ms=t,
        ms_per_decode_token=(t - p) / max(1, max_new_tokens - 1),
        peak_memory_mib=peak,
        memory_kind=mem_kind,
        prefill_ms_runs=prefill,
        total_ms_runs=total,
    )


def _method_for(name: str, budget: Any, params: Mapping[str, Any] | None = None) -> Any:
    from apet_bench.flops import _method_params
    from apet_bench.methods import build_method

    kwargs = {**_method_params(name), **dict(params or {})}
    if name == "none":
        return build_method("none")
    if budget is None:
        raise ConfigError(f"latency: method {name!r} needs budget=<int tokens | ratio in (0, 1]>")
    return build_method(name, budget=budget, **kwargs)


def _command() -> Any:
    from apet_bench.cli import REQUIRED, Command, Key

    return Command(
        "python -m apet_bench.latency",
        "Prefill and decode latency of one model + method + budget per attention backend (median of repeats "
        "after warm-up); one line per backend, then one JSON line.",
        (
            Key("model", REQUIRED, help="a model config (e.g. tiny_llava15 on CPU, llava15 on CUDA)", metavar="name"),
            Key("method", "none", help="a registered method"),
            Key("budget", None, "any", help="visual tokens kept (int) or retention ratio (float); required unless method=none"),
            Key("backends", "sdpa", help="comma-separated attention backends: " + ", ".join(BACKENDS)),
            Key("warmup", 3, "int", help="untimed warm-up samples"),
            Key("repeats", 10, "int", help="timed samples (the median is reported)"),
            Key("max_new_tokens", 16, "int", help="decoded tokens per sample"),
            Key("device", "auto", help="auto, cpu or cuda[:N]"),
            Key("visual_tokens", None, "any", help="visual tokens per image (Qwen2.5-VL only)"),
            Key("method.params.", kind="any", help="a method parameter over its config's default"),
        ),
    )


def format_result(r: LatencyResult) -> str:
    """One human-readable line of a result."""
    b = "full" if r.budget is None else r.budget
    return (f"{r.model} + {r.method} @ {b} [{r.backend}, {r.dtype}, {r.device_name}, {r.timer}]: prefill {r.prefill_ms:.1f} ms, "
            f"decode {r.decode_ms:.1f} ms ({r.ms_per_decode_token:.2f} ms/token), total {r.total_ms:.1f} ms per sample at "
            f"{r.max_new_tokens} tokens, peak {r.peak_memory_mib:.0f} MiB ({r.memory_kind}); median of {r.repeats} after "
            f"{r.warmup} warm-up; weights: {r.weights}; {r.note}")


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: one line per backend, then one JSON line with every result; bad input -> one line, exit 2."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    def body(args: dict[str, Any]) -> int:
        method = _method_for(args["method"], args["budget"], args["method.params"])
        backends = [b for b in str(args["backends"]).split(",") if b]
        unknown = [b for b in backends if b not in BACKENDS]
        if unknown:
            raise ConfigError(f"latency: attention backend {unknown[0]!r} is not one of {', '.join(BACKENDS)}")
        results, skipped = [], {}
        from apet_bench.models.base import resolve_device

        avail = available_backends(resolve_device(args["device"]))
        for backend in backends:
            if avail[backend]:
                skipped[backend] = avail[backend]
                print(f"{backend}: skipped ({avail[backend]})")
                continue
            t0 = time.perf_counter()
            adapter, weights = build_latency_adapter(args["model"], backend, args["device"])
            r = measure_latency(adapter, method, weights=weights, warmup=args["warmup"], repeats=args["repeats"],
                                max_new_tokens=args["max_new_tokens"], visual_tokens=args["visual_tokens"])
            results.append(r)
            print(format_result(r) + f" (wall {time.perf_counter() - t0:.1f} s)")
            del adapter
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        print(json.dumps({"results": [r.to_dict() for r in results], "skipped": skipped}))
        return 0

    return _command().run(argv, body, (ConfigError, ValueError))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
