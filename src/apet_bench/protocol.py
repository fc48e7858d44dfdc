"""Evaluation protocols of a benchmark: ``llava`` (the official LLaVA-family evaluation behind the paper's
Tables 1-4, the default) or ``lmms_eval`` (lmms-eval 0.7.3's stock task).

A benchmark config (``configs/benchmark/<name>.yaml``) names its protocol and describes each one::

    protocol: llava
    protocols:
      llava:
        defaults: {custom: llava_text, submission: true}   # benchmark keys it fills when they are null
        question: ...        # the question text the model reads (chat template aside)
        post_prompt: ...
        data: ...            # data version and split
        parsing: ...         # how an answer becomes a prediction
        scorer: ...
        max_new_tokens: ...
        source: ...          # official file(s) and commit
        deviations: [...]    # deliberate differences from the source, each with its measured effect
      lmms_eval: {...}

:func:`resolve` fills the benchmark keys that are null or absent from the chosen protocol's ``defaults``
(what the data layer and the runner read; a value given on the command line wins); the other fields feed the generated protocol table (:mod:`apet_bench.protocol_table`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["PROTOCOLS", "DEFAULT_PROTOCOL", "ProtocolError", "resolve", "benchmark_label", "DOC_FIELDS"]

PROTOCOLS = ("llava", "lmms_eval")
DEFAULT_PROTOCOL = "llava"
#: Fields every protocol block documents (the columns of the protocol table).
DOC_FIELDS = ("question", "post_prompt", "data", "parsing", "scorer", "max_new_tokens", "source")


class ProtocolError(ValueError):
    """A bad ``benchmark.protocol`` or ``protocols`` block (one line naming the value)."""


def resolve(bench_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The benchmark config with its protocol applied: every key of ``protocols[protocol].defaults`` that
    is null or absent in the config takes the protocol's value, and ``protocol`` is set. A config without a ``protocols`` block is returned unchanged (``protocol``
    recorded as ``lmms_eval`` unless it says otherwise: such configs run lmms-eval's functions).

    Raises
    ------
    ProtocolError
        ``protocol`` not one of :data:`PROTOCOLS`, or not described in the config's ``protocols``.
    """
    cfg = dict(bench_cfg)
    blocks = cfg.get("protocols")
    if not blocks:
        cfg.setdefault("protocol", "lmms_eval")
        if cfg["protocol"] not in PROTOCOLS:
            raise ProtocolError(f"benchmark.protocol {cfg['protocol']!r} is invalid (use {' or '.join(PROTOCOLS)})")
        return cfg
    protocol = cfg.get("protocol") or DEFAULT_PROTOCOL
    if protocol not in PROTOCOLS:
        raise ProtocolError(f"benchmark.protocol {protocol!r} is invalid (use {' or '.join(PROTOCOLS)})")
    if protocol not in blocks:
        raise ProtocolError(f"benchmark {cfg.get('name')!r} has no protocol {protocol!r} "
                            f"(described: {', '.join(sorted(blocks))})")
    for k, v in dict(blocks[protocol].get("defaults") or {}).items():
        if cfg.get(k) is None:
            cfg[k] = v
    cfg["protocol"] = protocol
    return cfg


def benchmark_label(bench_cfg: Mapping[str, Any]) -> str:
    """The benchmark's part of a run name: its name for the default protocol (``llava``), else
    ``<name>-protocol=<protocol>`` (``mme-protocol=lmms_eval``), so the two never share a run directory."""
    cfg = resolve(bench_cfg)
    name = str(cfg["name"])
    return name if cfg["protocol"] == DEFAULT_PROTOCOL or not bench_cfg.get("protocols") else f"{name}-protocol={cfg['protocol']}"


def describe(bench_cfg: Mapping[str, Any]) -> str:
    """One line naming the protocol a run used (the table footnote), e.g.
    ``MME: protocol llava (haotian-liu/LLaVA ...)``."""
    cfg = resolve(bench_cfg)
    block = dict((bench_cfg.get("protocols") or {}).get(cfg["protocol"]) or {})
    src = block.get("source")
    return f"{cfg['name']}: protocol {cfg['protocol']}" + (f" ({src})" if src else "")
