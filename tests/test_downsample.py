"""``downsample`` (reference row): grid rounding, area pooling on crafted grids, exact visual-token
counts on the four tiny models at the paper budgets (random weights, CPU); the generic end-to-end checks,
through the runner included, are the conformance kit's (tests/test_conformance.py)."""

from __future__ import annotations

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
PAPER = [
    ("tiny_llava15", (), 192), ("tiny_llava15", (), 128), ("tiny_llava15", (), 64),
    ("tiny_llava_next", NEXT336, 640), ("tiny_llava_next", NEXT336, 320),
    ("tiny_llava_next", NEXT336, 160), ("tiny_llava_next", (), 160),
    ("tiny_qwen25vl", (), 0.2), ("tiny_qwen25vl", (), 0.1),
    ("tiny_video_llava", (), 256),
]
_ADAPTERS: dict = {}


@pytest.mark.parametrize("model,over,budget", PAPER, ids=[f"{m}-{len(o)}-{b}" for m, o, b in PAPER])
def test_paper_budget_exact_counts(model, over, budget):
    """Per-model counts (the generic checks, through the runner included, are tests/test_conformance.py's)."""
    import numpy as np
    from conftest import make_image
    from omegaconf import OmegaConf

    from apet_bench.models import load_model
    from apet_bench.models.video_llava import VideoClip

    key = (model, over)
    if key not in _ADAPTERS:
        _ADAPTERS[key] = load_model(OmegaConf.to_container(compose([f"model={model}", *over]).model, resolve=True))
    a = _ADAPTERS[key]
    if model == "tiny_video_llava":
        rng = np.random.default_rng(3)
        visual = [VideoClip((rng.random((8, 48, 64, 3)) * 255).astype("uint8"))]
    else:
        visual = [make_image(7, (448, 336))]
    out = generate(a, visual, "What?", {"max_new_tokens": 2}, build_method("downsample", budget=budget))
    layers, kept = out.layer_visual_tokens, out.kept_indices
    assert layers == out.planned_layer_visual_tokens and len(set(layers)) == 1
    n = layers[0]
    if model == "tiny_llava_next":  # per crop min(budget / 5, crop grid); crops = base + rows*cols
        per = min(round(budget / 5), (24 if over else 8) ** 2)
        assert n % per == 0 and n // per in (3, 4, 5) and kept is None
    elif model == "tiny_qwen25vl":  # nearest h*w <= round(r * N) on the image's post-merger grid
        b = round(budget * out.visual_tokens_in)
        assert 0.75 * b <= n <= b and len(kept[0]) == n
    else:
        assert n == budget and len(set(kept[0])) == budget


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
