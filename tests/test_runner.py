"""The main job in-process: MME end to end on real data (limited), token accounting, skip, failures."""

import json
import os
from pathlib import Path

import pytest

from apet_bench.config import compose
from apet_bench.runner import EvaluationError, execute

REPO = Path(__file__).resolve().parents[1]
SHARED_BENCH = Path(os.environ.get("APET_BENCH_TEST_DATA_ROOT", REPO.parent / "shared" / "benchmarks"))
needs_mme = pytest.mark.skipif(not (SHARED_BENCH / "mme").is_dir(), reason=f"no MME data at {SHARED_BENCH}")


def cfg_for(tmp_path, *overrides):
    return compose([f"results_dir={tmp_path / 'results'}", f"cache_dir={tmp_path / 'cache'}", *overrides])


@needs_mme
def test_mme_random_64_end_to_end_then_skip(tmp_path):
    cfg = cfg_for(tmp_path, "method=random", "budget=64", "benchmark=mme", f"data_root={SHARED_BENCH}", "limit=40")
    out = execute(cfg, choices={"model": "tiny_llava15", "method": "random", "benchmark": "mme"})
    assert out.status == "finished" and out.name == "tiny_llava15__random__64__mme"
    run_dir = Path(out.run_dir)
    run = json.loads((run_dir / "run.json").read_text())
    assert run["groups"] == {"model": "tiny_llava15", "method": "random", "benchmark": "mme"}
    assert run["num_samples"] == 40
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert isinstance(metrics["metrics"]["mme_perception_score"], float)
    assert metrics["tokens"]["visual_tokens_llm_min"] == metrics["tokens"]["visual_tokens_llm_max"] == 64
    assert metrics["missing_subtasks"] and metrics["data_fingerprint"]
    samples = [json.loads(x) for x in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 40
    assert all(s["visual_tokens_in"] == 576 and s["visual_tokens_llm"] == 64 for s in samples)
    assert all(s["layer_visual_tokens"] == [64] * 4 for s in samples)
    assert all("mme_perception_score" in s or "mme_cognition_score" in s for s in samples)
    assert len({s["sample_id"] for s in samples}) == 40  # one stable id per question, for paired statistics
    prov = json.loads((run_dir / "provenance.json").read_text())
    assert prov["attn_implementation"] == "sdpa" and prov["random_weights"] is True and prov["device"] == "cpu"
    assert "budget: 64" in (run_dir / "config.yaml").read_text()
    before = (run_dir / "run.json").stat().st_mtime_ns
    again = execute(cfg)
    assert again.status == "skipped" and (run_dir / "run.json").stat().st_mtime_ns == before
    assert run["limit"] == 40
    # limit is part of the run's identity: another limit reruns and replaces the run in place
    smaller = cfg_for(tmp_path, "method=random", "budget=64", "benchmark=mme", f"data_root={SHARED_BENCH}", "limit=20")
    redone = execute(smaller)
    assert redone.status == "finished" and redone.summary["num_samples"] == 20 and redone.summary["limit"] == 20
    assert redone.run_dir == out.run_dir
    assert "force: false" in (run_dir / "config.yaml").read_text()


def test_failed_evaluation_writes_nothing(tmp_path, monkeypatch):
    from apet_bench.eval import lmms_model

    def boom(self, requests):
        raise RuntimeError("simulated CUDA OOM")

    monkeypatch.setattr(lmms_model.ApetBenchLMM, "generate_until", boom)
    cfg = cfg_for(tmp_path, "method=random", "budget=64")
    with pytest.raises(EvaluationError, match="simulated CUDA OOM"):
        execute(cfg)
    runs = tmp_path / "results" / "runs"
    assert not runs.exists() or list(runs.iterdir()) == []


def test_incomplete_evaluation_is_a_failure(tmp_path, monkeypatch):
    """lmms-eval happily scores whatever the model returns; fewer recorded answers than samples must fail."""
    from apet_bench.eval import lmms_model

    original = lmms_model.ApetBenchLMM.generate_until

    def drop_records(self, requests):
        answers = original(self, requests)
        del self.records[-1]
        return answers

    monkeypatch.setattr(lmms_model.ApetBenchLMM, "generate_until", drop_records)
    with pytest.raises(EvaluationError, match="expected"):
        execute(cfg_for(tmp_path, "method=none"))
    runs = tmp_path / "results" / "runs"
    assert not runs.exists() or list(runs.iterdir()) == []


def test_entry_point_registration():
    from lmms_eval.models import get_model

    cls = get_model("apet_bench", force_simple=True)
    assert cls.__name__ == "ApetBenchLMM" and cls.is_simple


def test_translate_gen_kwargs():
    from apet_bench.eval.lmms_model import translate_gen_kwargs

    hf, until = translate_gen_kwargs({"max_new_tokens": 16, "temperature": 0, "top_p": 1.0, "num_beams": 1,
                                      "do_sample": False, "until": "\n\n"})
    assert hf == {"max_new_tokens": 16, "num_beams": 1, "do_sample": False} and until == ["\n\n"]
    hf, _ = translate_gen_kwargs({"temperature": 0.7, "top_p": 0.9})
    assert hf["do_sample"] is True and hf["temperature"] == 0.7 and hf["top_p"] == 0.9
    with pytest.raises(ValueError, match="until"):
        translate_gen_kwargs({"until": 5})


def test_corrupt_image_skip_is_counted_and_error_stops(tmp_path):
    from test_data import CORRUPT, _mini_root  # a real 4-image MME subset with one truncated jpg

    from apet_bench.data import DataError

    root = _mini_root(tmp_path)
    bad = str(root / "mme" / "existence" / CORRUPT)
    with pytest.raises(DataError, match=bad):
        execute(cfg_for(tmp_path, "benchmark=mme", f"data_root={root}", "on_corrupt_image=error"))
    assert not (tmp_path / "results" / "runs").exists()

    out = execute(cfg_for(tmp_path, "benchmark=mme", f"data_root={root}", "on_corrupt_image=skip"))
    run = json.loads((Path(out.run_dir) / "run.json").read_text())
    metrics = json.loads((Path(out.run_dir) / "metrics.json").read_text())
    assert run["num_samples"] == 6 and run["skipped_samples"] == 2
    assert metrics["skipped"][0]["path"] == bad and metrics["skipped_samples"] == 2
    assert run["metrics"]["mme_cognition_score"] is None  # no cognition subtask in this data
    assert isinstance(run["metrics"]["mme_perception_score"], float)


def test_method_variants_get_their_own_run_and_stage2_accounting(tmp_path):
    from apet_bench.runner import method_label

    assert method_label({"name": "random", "params": {"stage": "vision", "layer": 2}}) == "random"
    assert method_label({"name": "random", "params": {"stage": "llm", "layer": 2}}) == "random-stage=llm"
    out = execute(cfg_for(tmp_path, "method=random", "method.params.stage=llm", "method.params.layer=2",
                          "budget=144", "limit=2"))
    assert out.name == "tiny_llava15__random-stage=llm__144__demo"
    samples = [json.loads(x) for x in (Path(out.run_dir) / "samples.jsonl").read_text().splitlines()]
    for s in samples:
        assert s["layer_visual_tokens"] == [576, 576, 144, 144]
        assert s["planned_layer_visual_tokens"] == [576, 576, 144, 144]
    run = json.loads((Path(out.run_dir) / "run.json").read_text())
    assert run["layer_average_visual_tokens"] == 360 and run["method_params"]["stage"] == "llm"


def test_method_checks_model_config_before_loading(tmp_path, monkeypatch):
    """A stage-2 layer beyond the model's decoder layers is refused by prepare_run (nothing loaded)."""
    import apet_bench.runner as runner

    def no_load(*a, **k):  # pragma: no cover - must not be reached
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(runner, "_load_adapter", no_load)
    cfg = cfg_for(tmp_path, "method=random", "method.params.stage=llm", "method.params.layer=4", "budget=64")
    with pytest.raises(ValueError, match=r"layer 4 is not usable on model 'tiny_llava15' with 4 decoder layers"):
        execute(cfg)
    assert not (tmp_path / "results" / "runs").exists() or not any((tmp_path / "results" / "runs").iterdir())


def test_model_variants_get_their_own_run_name():
    """A model setting that differs from its config file is part of the run name (eager vs sdpa, a deeper
    tiny tower), so two variants never share a run directory; local_path (where the weights are) is not."""
    from omegaconf import OmegaConf

    from apet_bench.runner import model_label

    def label(*overrides):
        return model_label(OmegaConf.to_container(compose(list(overrides)), resolve=True)["model"])

    assert label() == "tiny_llava15"
    assert label("model.attn_implementation=eager") == "tiny_llava15-attn_implementation=eager"
    assert label("+model.tiny_config.vision_layers=24") == "tiny_llava15-tiny_config.vision_layers=24"
    assert label("model=llava15", "model.local_path=/weights/llava") == "llava15"
    assert label("model=llava15", "model.dtype=bfloat16") == "llava15-dtype=bfloat16"
