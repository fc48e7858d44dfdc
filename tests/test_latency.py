"""The latency protocol (apet_bench.latency): CPU on tiny models, GPU paths skip-guarded."""

from __future__ import annotations

import json

import pytest
import torch

from apet_bench import latency
from apet_bench.config import ConfigError

CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def apet64():
    from apet_bench.methods import build_method

    return build_method("apet", budget=64)


def test_cpu_protocol_on_tiny_model(tiny_llava15, apet64):
    r = latency.measure_latency(tiny_llava15, apet64, warmup=1, repeats=2, max_new_tokens=3)
    assert r.timer == "time.perf_counter" and r.device == "cpu"
    assert r.comparable is False and "NOT comparable" in r.note
    assert len(r.prefill_ms_runs) == 2 and len(r.total_ms_runs) == 2
    assert 0 < r.prefill_ms <= r.total_ms
    assert r.decode_ms == pytest.approx(r.total_ms - r.prefill_ms)
    assert r.ms_per_decode_token == pytest.approx(r.decode_ms / 2)
    assert r.max_new_tokens == 3 and r.visual_tokens_in == 576 and r.visual_tokens_llm == 96
    assert r.mean_layer_visual_tokens == 64  # tiny: 96 in layers 0-1, 32 in 2-3
    assert r.peak_memory_mib > 0 and "RSS" in r.memory_kind
    assert "random-init tiny" in r.weights
    assert "not an accuracy number" in json.dumps(r.to_dict())


def test_fixed_output_length_whatever_the_weights(tiny_llava15):
    r = latency.measure_latency(tiny_llava15, None, warmup=0, repeats=1, max_new_tokens=5)
    assert r.method == "none" and r.max_new_tokens == 5 and r.visual_tokens_llm == 576


@pytest.mark.parametrize("kw, needle", [({"repeats": 0}, "repeats 0"), ({"warmup": -1}, "warmup -1"),
                                        ({"max_new_tokens": 0}, "max_new_tokens 0")])
def test_bad_protocol_settings(tiny_llava15, kw, needle):
    with pytest.raises(ValueError, match=needle):
        latency.measure_latency(tiny_llava15, **kw)


def test_backends_available_on_cpu():
    av = latency.available_backends("cpu")
    assert av["eager"] is None and av["sdpa"] is None and av["flash_attention_2"] == "needs CUDA"


@pytest.mark.skipif(CUDA, reason="checks the CPU refusal")
def test_full_size_without_weights_refused_on_cpu():
    with pytest.raises(ConfigError, match="no loadable weights here"):
        latency.build_latency_adapter("llava15", "sdpa", "cpu")
    with pytest.raises(ConfigError, match="flash_attention_2 unavailable"):
        latency.build_latency_adapter("tiny_llava15", "flash_attention_2", "cpu")


@pytest.mark.parametrize("model", ["llava15", "qwen25vl"])
def test_random_full_size_wiring_on_a_shrunk_architecture(monkeypatch, model):
    """The CUDA random-weight path, with the full-size config shrunk so it runs on CPU."""
    from apet_bench import flops

    real = flops.full_size_config

    def small(family):
        cls, cfg = real(family)  # the real class; token ids come from the tiny tokenizer
        tc, vc = cfg.text_config, cfg.vision_config
        tc.hidden_size, tc.intermediate_size, tc.num_hidden_layers = 64, 128, 2
        tc.num_attention_heads, tc.num_key_value_heads, tc.vocab_size = 4, 2, 1000
        if family == "qwen25vl":
            tc.head_dim = 16
            tc.rope_parameters = {**tc.rope_parameters, "mrope_section": [2, 3, 3]}
            vc.depth, vc.hidden_size, vc.intermediate_size, vc.num_heads = 2, 32, 64, 2
            vc.out_hidden_size, vc.fullatt_block_indexes = 64, [1]
        else:
            tc.num_key_value_heads = 4
            vc.hidden_size, vc.intermediate_size, vc.num_hidden_layers, vc.num_attention_heads = 32, 64, 2, 4
        return cls, cfg

    monkeypatch.setattr(flops, "full_size_config", small)
    cfg = latency._model_cfg(model)
    adapter, weights = latency._random_full_size(cfg, "sdpa", torch.device("cpu"))
    assert type(adapter.model).__name__ == real(model)[0].__name__
    assert adapter.dtype == torch.bfloat16 and "random bf16 weights" in weights
    placeholder = "<image>" if model == "llava15" else "<|image_pad|>"
    assert adapter.model.config.image_token_id == adapter.processor.tokenizer.convert_tokens_to_ids(placeholder)
    vt = 576 if model == "llava15" else 256
    r = latency.measure_latency(adapter, None, weights=weights, warmup=0, repeats=1, max_new_tokens=2, visual_tokens=vt)
    assert r.visual_tokens_in == vt and r.dtype == "bfloat16"


@pytest.mark.parametrize("argv, needle", [
    (["model=tiny_llava15", "backends=warp"], "backend 'warp'"),
    (["model=tiny_llava15", "speed=1"], "unknown key 'speed'"),
    (["model=tiny_llava15", "method=apet"], "needs budget"),
    (["model=nope"], "unknown model 'nope'"),
    (["model=tiny_llava15", "repeats=0", "warmup=0"], "repeats 0"),
])
def test_cli_bad_input_one_line(capsys, argv, needle):
    assert latency.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err


def test_cli_reports_skips_and_json(capsys):
    assert latency.main(["model=tiny_llava15", "backends=sdpa,flash_attention_2", "warmup=0", "repeats=1",
                         "max_new_tokens=2", "device=cpu"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert any("flash_attention_2: skipped (needs CUDA)" in line for line in out)
    d = json.loads(out[-1])
    assert [r["backend"] for r in d["results"]] == ["sdpa"] and d["skipped"] == {"flash_attention_2": "needs CUDA"}
    assert any("NOT comparable" in line and line.startswith("tiny_llava15 + none") for line in out)


# ---------------------------------------------------------------------- GPU (skipped without CUDA)
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_cuda_event_timing_on_tiny(tiny_llava15_cfg, apet64):
    from apet_bench.models import load_model

    adapter = load_model({**tiny_llava15_cfg, "device": "cuda"})
    r = latency.measure_latency(adapter, apet64, warmup=1, repeats=2, max_new_tokens=3)
    assert r.timer == "cuda events" and r.device.startswith("cuda")
    assert 0 < r.prefill_ms <= r.total_ms and r.peak_memory_mib > 0
    assert r.comparable is False  # a tiny model is never comparable
    assert not hasattr(adapter, "_clock") or not isinstance(adapter.__dict__.get("_clock"), latency._EventClock)


@pytest.mark.skipif(not CUDA, reason="needs CUDA (full-size LLaVA-1.5-7B, random bf16 weights)")
def test_gpu_full_size_llava_apet64_protocol(apet64):
    adapter, weights = latency.build_latency_adapter("llava15", "sdpa", "cuda")
    base = latency.measure_latency(adapter, None, weights=weights, warmup=2, repeats=5, max_new_tokens=8)
    comp = latency.measure_latency(adapter, apet64, weights=weights, warmup=2, repeats=5, max_new_tokens=8)
    assert base.comparable and "random bf16" in base.weights
    assert comp.visual_tokens_llm == 96
    # the protocol measured both (the speed-up itself is a benchmark number: docs/efficiency.md, not a test)
    assert 0 < base.prefill_ms <= base.total_ms and 0 < comp.prefill_ms <= comp.total_ms


def test_bench_speedup_script_smoke(capsys, tmp_path):
    """scripts/bench_speedup.py on the tiny model: one method, one budget, one timed round."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "bench_speedup.py"
    spec = importlib.util.spec_from_file_location("bench_speedup", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out_csv = tmp_path / "b.csv"
    assert mod.main(["--methods", "apet", "--budgets", "64", "--repeats", "1", "--warmup", "0",
                     "--out", str(out_csv)]) == 0
    out = capsys.readouterr().out
    assert "NOT the paper's setting" in out and "device: CPU" in out
    import pandas as pd

    df = pd.read_csv(out_csv)
    row = df[df["method"] == "apet"].iloc[0]
    assert row["flops_ratio"] > 1.5 and row["full_size_flops_ratio"] == pytest.approx(8.883 / 2.051, rel=1e-3)
    assert 0 < row["method_share"] < 1 and row["visual_per_layer"] == 64
