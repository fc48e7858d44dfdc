"""``downsample`` (issue #5 reference row): grid rounding, area pooling on crafted grids, exact visual-token
counts end to end through the runner on the four tiny models at the paper budgets (random weights, CPU)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from apet_bench.baselines.downsample import DownsampleCompressor, cell_centres, pool_grid, pool_shape
from apet_bench.budget import BudgetError
from apet_bench.config import compose
from apet_bench.methods import build_method
from apet_bench.pipeline import generate

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("APET_BENCH_TEST_DATA_ROOT", REPO.parent / "shared" / "benchmarks"))


@pytest.mark.parametrize("b,H,W,exact", [(64, 24, 24, True), (128, 24, 24, True), (192, 24, 24, True),
                                         (32, 16, 16, True), (100, 24, 24, True), (37, 24, 24, False),
                                         (15, 7, 11, True), (2, 1, 9, True)])
def test_pool_shape_rounding(b, H, W, exact):
    h, w = pool_shape(b, H, W)
    assert h * w <= b and h <= H and w <= W
    assert (h * w == b) == exact
    # brute force: no admissible shape (aspect distortion <= 2) holds more tokens; else the bound is dropped
    import math

    shapes = [(hh, ww) for hh in range(1, H + 1) for ww in range(1, W + 1) if hh * ww <= b]
    ok = [hw for hw in shapes if abs(math.log(hw[0] / hw[1]) - math.log(H / W)) <= math.log(2) + 1e-12]
    assert h * w == max(a * c for a, c in (ok or shapes))


def test_pool_grid_is_the_cell_mean_and_centres():
    x = torch.arange(4 * 6 * 2, dtype=torch.float32).view(24, 2) ** 1.3  # 4 x 6 grid, raster order
    out = pool_grid(x, 4, 6, 2, 3)
    g = x.view(4, 6, 2)
    for i in range(2):
        for j in range(3):
            assert torch.allclose(out[i * 3 + j], g[2 * i : 2 * i + 2, 2 * j : 2 * j + 2].reshape(-1, 2).mean(0))
    assert cell_centres(4, 6, 2, 3).tolist() == [0 * 6 + 0, 0 * 6 + 2, 0 * 6 + 4, 2 * 6 + 0, 2 * 6 + 2, 2 * 6 + 4]


def test_config_and_bad_params():
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(compose(["method=downsample", "budget=64"]), resolve=True)
    assert cfg["method"]["available"] is True
    m = build_method("downsample", budget=64, **cfg["method"]["params"])
    assert isinstance(m, DownsampleCompressor) and m.stage == "vision"
    with pytest.raises(BudgetError):
        build_method("downsample")
    with pytest.raises(ValueError, match="max_distortion"):
        build_method("downsample", budget=64, max_distortion=0.5)


NEXT336 = ("+model.tiny_config.image_size=336", "model.visual_tokens=2928")
E2E = [
    ("tiny_llava15", (), 192, "demo"), ("tiny_llava15", (), 128, "demo"), ("tiny_llava15", (), 64, "demo"),
    ("tiny_llava_next", NEXT336, 640, "demo"), ("tiny_llava_next", NEXT336, 320, "demo"),
    ("tiny_llava_next", NEXT336, 160, "demo"), ("tiny_llava_next", (), 160, "demo"),
    ("tiny_qwen25vl", (), 0.2, "demo"), ("tiny_qwen25vl", (), 0.1, "demo"),
    ("tiny_video_llava", (), 256, "tgif_qa"),
]


@pytest.mark.parametrize("model,over,budget,bench", E2E, ids=[f"{m}-{len(o)}-{b}" for m, o, b, _ in E2E])
def test_end_to_end_exact_counts(tmp_path, model, over, budget, bench):
    from apet_bench.runner import execute

    if bench == "tgif_qa" and not (SHARED / bench).is_dir():
        pytest.skip(f"no {bench} data at {SHARED}")
    cfg = compose([f"model={model}", *over, "method=downsample", f"budget={budget}", f"benchmark={bench}",
                   f"data_root={SHARED}", "limit=2", "+gen_kwargs.max_new_tokens=2", f"results_dir={tmp_path / 'r'}",
                   f"cache_dir={tmp_path / 'c'}"])
    out = execute(cfg)
    assert out.status == "finished"
    samples = [json.loads(x) for x in (Path(out.run_dir) / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2
    for s in samples:
        layers = s["layer_visual_tokens"]
        assert layers == s["planned_layer_visual_tokens"] and len(set(layers)) == 1
        n = layers[0]
        if model == "tiny_llava_next":  # per crop min(budget / 5, crop grid); crops = base + rows*cols
            per = min(round(budget / 5), (24 if over else 8) ** 2)
            assert n % per == 0 and n // per in (3, 4, 5) and s["kept_indices"] is None
        elif model == "tiny_qwen25vl":  # nearest h*w <= round(r * N) on the image's post-merger grid
            b = round(budget * s["visual_tokens_in"])
            assert 0.75 * b <= n <= b and len(s["kept_indices"][0]) == n
        else:
            assert n == budget and len(set(s["kept_indices"][0])) == budget


@pytest.mark.parametrize("model", ["tiny_llava15", "tiny_llava_next", "tiny_qwen25vl", "tiny_video_llava"])
def test_no_hooks_left_none_unchanged_and_deterministic(model):
    import numpy as np
    from conftest import make_image
    from omegaconf import OmegaConf
    from test_stage2 import count_hooks

    from apet_bench.models import load_model
    from apet_bench.models.video_llava import VideoClip

    a = load_model(OmegaConf.to_container(compose([f"model={model}"]).model, resolve=True))
    if model == "tiny_video_llava":
        rng = np.random.default_rng(3)
        visual, budget = [VideoClip((rng.random((8, 48, 64, 3)) * 255).astype("uint8"))], 256
    else:
        visual, budget = [make_image(5, (90, 60))], (0.2 if model == "tiny_qwen25vl" else 64)
    gen = {"max_new_tokens": 3, "output_logits": True}
    ref = generate(a, visual, "What?", gen, build_method("none"))
    before = count_hooks(a.model)  # after a first forward (transformers adds output-capturing hooks lazily)
    one = generate(a, visual, "What?", gen, build_method("downsample", budget=budget))
    two = generate(a, visual, "What?", gen, build_method("downsample", budget=budget))
    assert count_hooks(a.model) == before
    assert one.output_ids == two.output_ids and all(torch.equal(x, y) for x, y in zip(one.logits, two.logits))
    assert one.visual_tokens_llm < ref.visual_tokens_llm
    after = generate(a, visual, "What?", gen, build_method("none"))
    assert all(torch.equal(x, y) for x, y in zip(ref.logits, after.logits))


@pytest.mark.parametrize("method", ["downsample", "visionzip"])
def test_video_budget_not_a_multiple_of_frames_refused_before_loading(tmp_path, monkeypatch, method):
    import apet_bench.runner as runner

    def no_load(*a, **k):  # pragma: no cover - must not be reached
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(runner, "_load_adapter", no_load)
    cfg = compose(["model=tiny_video_llava", f"method={method}", "budget=260", "benchmark=tgif_qa",
                   f"data_root={SHARED}", f"results_dir={tmp_path}", f"cache_dir={tmp_path / 'c'}"])
    with pytest.raises(BudgetError, match="video budget 260 .* not a multiple of its 8 frames") as err:
        runner.execute(cfg)
    assert "\n" not in str(err.value)
