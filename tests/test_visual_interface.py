"""The uniform visual-token interface of the adapters, on all four tiny models.

``position_encoding``; ``visual_segments`` (per image / NeXT sub-image / video frame) partitioning each
visual's tokens; ``vision_features`` (pre-projector) whose projection reproduces the stage-1 visual
tokens exactly; ``feature_token_map``; and a stage-1 method that reads vision features through
``visual_context`` end to end (one vision-tower pass, ``none``-exact when it keeps everything).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest
import torch
from conftest import make_image
from test_model_matrix import MODELS, get_adapter
from test_stage2 import GEN, QUESTION, assert_logits_equal

from apet_bench.core import SampleContext
from apet_bench.methods.base import TokenCompressor, VisualSelection
from apet_bench.models.base import POSITION_ENCODINGS, VisualContext, VisualSegment, VisualSegments
from apet_bench.models.video_llava import VideoClip
from apet_bench.pipeline import generate


def _clip(seed: int = 3) -> VideoClip:
    rng = np.random.default_rng(seed)
    return VideoClip((rng.random((8, 48, 64, 3)) * 255).astype("uint8"))


def _inputs(model: str, kind: str = "image"):
    """Processed inputs of a 2-image sample (different sizes), or of one video for Video-LLaVA."""
    adapter = get_adapter(model, "sdpa")
    if kind == "video":
        adapter.visual_context = SampleContext(adapter, kind="video")
        try:
            return adapter, adapter.prepare_inputs([_clip()], adapter.build_prompt(QUESTION, 1))
        finally:
            adapter.visual_context = None
    images = [make_image(1, (64, 48)), make_image(2, (40, 90))]
    return adapter, adapter.prepare_inputs(images, adapter.build_prompt(QUESTION, 2))


CASES = [(m, "image") for m in MODELS] + [("tiny_video_llava", "video")]
IDS = [f"{m}-{k}" for m, k in CASES]


def test_position_encoding():
    expected = {
        "tiny_llava15": "rope-1d",
        "tiny_llava_next": "rope-1d",
        "tiny_video_llava": "rope-1d",
        "tiny_qwen25vl": "mrope-3d",
    }
    for model, value in expected.items():
        adapter = get_adapter(model, "sdpa")
        assert adapter.position_encoding == value
        assert adapter.position_encoding in POSITION_ENCODINGS


@pytest.mark.parametrize(("model", "kind"), CASES, ids=IDS)
def test_segments_partition_visual_tokens(model, kind):
    adapter, inputs = _inputs(model, kind)
    with torch.inference_mode():
        tokens = adapter.encode_images(inputs)
    structure = adapter.visual_segments(inputs)
    assert [s.index for s in structure] == list(range(len(tokens)))
    ids = inputs["input_ids"][0].cpu()
    for vis, tok in zip(structure, tokens):
        assert isinstance(vis, VisualSegments) and vis.kind == kind
        assert vis.num_tokens == tok.shape[0]
        parts = [seg.positions for seg in vis] + [vis.newline_positions]
        allpos = torch.cat(parts).sort().values
        assert torch.equal(allpos, torch.arange(vis.num_tokens)), "segments + newlines must partition the tokens"
        for seg in vis:
            assert isinstance(seg, VisualSegment)
            assert seg.positions.dtype == torch.long and bool((seg.positions.diff() > 0).all())
            if seg.grid is not None:
                t, h, w = seg.grid
                assert seg.patch_positions.numel() == t * h * w
            if seg.patches is not None:
                assert seg.patches.shape == seg.positions.shape
        # sequence positions land on the sample's placeholders, contiguous per visual
        cols = vis.sequence_positions()
        assert cols.tolist() == list(range(vis.start, vis.start + vis.num_tokens))
        assert all(int(ids[c]) in (adapter.visual_token_id, getattr(adapter, "video_token_id", -1)) for c in cols.tolist())
    assert sum(v.num_tokens for v in structure) == sum(len(p) for p in adapter.visual_positions(inputs["input_ids"][:1]))


def test_llava15_segments():
    adapter, inputs = _inputs("tiny_llava15")
    vis = adapter.visual_segments(inputs)
    assert len(vis) == 2 and [len(v) for v in vis] == [1, 1]
    seg = vis[0][0]
    assert (seg.name, seg.kind, seg.grid) == ("image", "image", (1, 24, 24))
    assert torch.equal(seg.positions, torch.arange(576)) and seg.cls_position is None
    assert vis[1].start >= vis[0].start + 576  # the tiny word-level tokenizer drops the "\n": runs may touch


def test_llava_next_segments_match_layout_and_newlines():
    adapter, inputs = _inputs("tiny_llava_next")
    with torch.inference_mode():
        tokens = adapter.encode_images(inputs)
    layouts = adapter.visual_layout(inputs)
    assert adapter.current_layouts and len(adapter.current_layouts) == 2  # old API still set
    newline = adapter.model.model.image_newline.detach()
    for vis, layout, tok in zip(adapter.visual_segments(inputs), layouts, tokens):
        names = [s.name for s in vis]
        assert names == ["base"] + [f"sub_image {i}" for i in range(1, layout.num_sub_images)]
        assert vis[0].grid == (1, adapter.patches_per_side, adapter.patches_per_side)
        for j, seg in enumerate(vis):
            assert torch.equal(seg.positions, layout.sub_image_positions(j))
        assert vis.start == layout.start
        assert torch.equal(vis.newline_positions, layout.newline_positions)
        assert vis.newline_positions.numel() == layout.feature_grid[0]
        # image_newline sits exactly at the newline positions, and nowhere else
        is_nl = (tok == newline).all(-1)
        assert torch.equal(is_nl.nonzero().flatten(), vis.newline_positions)


def test_video_llava_frame_segments():
    adapter, inputs = _inputs("tiny_video_llava", "video")
    (vis,) = adapter.visual_segments(inputs)
    t = adapter.tokens_per_frame
    assert vis.kind == "video" and len(vis) == adapter.num_frames == 8 and vis.num_tokens == 8 * t
    for f, seg in enumerate(vis):
        assert (seg.name, seg.kind, seg.index) == (f"frame {f}", "frame", f)
        assert seg.positions.tolist() == list(adapter.frame_token_ranges()[f]) == list(range(f * t, (f + 1) * t))
        assert seg.cls_position == f * t and int(seg.patches[0]) == -1
        assert seg.patch_positions.numel() == t - 1 and seg.grid == (1, 16, 16)


def test_qwen_segment_grid_matches_counts():
    adapter, inputs = _inputs("tiny_qwen25vl")
    counts = adapter.visual_token_counts(inputs)
    vis = adapter.visual_segments(inputs)
    for v, n, (t, h, w) in zip(vis, counts, inputs["image_grid_thw"].tolist()):
        (seg,) = v.segments
        assert seg.grid == (t, h // 2, w // 2)
        assert t * h * w // 4 == seg.grid[0] * seg.grid[1] * seg.grid[2] == n == v.num_tokens


def test_sequence_positions_needs_start():
    vis = VisualSegments("image", 0, 4, (VisualSegment("image", "image", 0, torch.arange(4)),))
    with pytest.raises(ValueError, match="start column unknown"):
        vis.sequence_positions()


# ---------------------------------------------------------------------- vision features
@pytest.mark.parametrize(("model", "kind"), CASES, ids=IDS)
def test_vision_features_project_to_visual_tokens(model, kind):
    adapter, inputs = _inputs(model, kind)
    vc = adapter.model.config.vision_config
    with torch.inference_mode():
        tokens = adapter.encode_images(inputs)
        feats = adapter.vision_features(inputs)
        tokens2, feats2 = adapter.encode_with_vision_features(inputs)
        maps = adapter.feature_token_map(inputs)
        assert len(feats) == len(tokens) == len(maps)
        for f, f2, t, t2, m in zip(feats, feats2, tokens, tokens2, maps):
            assert torch.equal(f, f2) and torch.equal(t, t2)
            assert m.shape == f.shape[:-1] and m.dtype == torch.long
            proj = adapter.project_visual(f)
            if model == "tiny_qwen25vl":
                d_v = adapter.model.config.vision_config.hidden_size
                assert f.shape == (4 * t.shape[0], d_v)
                assert torch.equal(m, torch.arange(f.shape[0]) // 4)
                assert torch.equal(proj, t)
                continue
            side = vc.image_size // vc.patch_size
            assert f.shape[-1] == vc.hidden_size
            if model == "tiny_llava15" or (model == "tiny_video_llava" and kind == "image"):
                assert f.shape == (side * side, vc.hidden_size)
                assert torch.equal(proj, t)
            elif kind == "video":
                assert f.shape == (8, side * side + 1, vc.hidden_size)
                assert torch.equal(proj.reshape(-1, proj.shape[-1]), t)
            else:  # NeXT: (crops, 64, D_v); projected crops land where the map says
                assert f.shape[1:] == (side * side, vc.hidden_size) and f.shape[0] >= 2
                keep = m >= 0
                assert torch.equal(proj[keep], t[m[keep]])
        if model == "tiny_llava_next":
            packed = adapter.pack_visual([adapter.project_visual(f) for f in feats], inputs)
            assert all(torch.equal(p, t) for p, t in zip(packed, tokens))


def test_llava15_vision_features_are_clip_penultimate_without_cls():
    adapter, inputs = _inputs("tiny_llava15")
    with torch.inference_mode():
        out = adapter.vision_tower(inputs["pixel_values"], output_hidden_states=True)
        feats = adapter.vision_features(inputs)
    expected = out.hidden_states[-2][:, 1:]
    assert all(torch.equal(f, e) for f, e in zip(feats, expected))


def test_video_llava_vision_tower_follows_kind():
    adapter = get_adapter("tiny_video_llava", "sdpa")
    assert adapter.vision_tower is adapter.model.model.image_tower
    adapter.visual_context = SampleContext(adapter, kind="video")
    try:
        assert adapter.vision_tower is adapter.model.model.video_tower
    finally:
        adapter.visual_context = None


# ---------------------------------------------------------------------- a stage-1 method on vision features
@dataclass
class HalfPerSegmentFromFeatures(TokenCompressor):
    """Test method: per segment, keep the half of the tokens whose pre-projector features have the
    largest norm (newlines always kept), projected from the vision features; or keep everything."""

    stage: ClassVar[str] = "vision"
    needs_vision_features: ClassVar[bool] = True
    keep_all: bool = False

    def reset(self) -> None:
        self.seen: list[tuple[int, int]] = []

    def compress_visual(self, features, *, image_index):
        ctx = self.visual_context
        assert isinstance(ctx, VisualContext) and ctx.visual_tokens is not None
        assert ctx.visual_tokens[image_index] is features
        vf = ctx.vision_features[image_index]  # cached: no second tower pass
        fmap = ctx.feature_token_map[image_index]
        vis = ctx.segments[image_index]
        assert vis.num_tokens == features.shape[0]
        self.seen.append((image_index, int(vf.shape[0])))
        if self.keep_all:
            return VisualSelection(features, torch.arange(features.shape[0], device=features.device))
        # per-token score from the pre-projector features (mean norm of the rows that map to it)
        score = torch.zeros(features.shape[0], dtype=torch.float32)
        count = torch.zeros(features.shape[0], dtype=torch.float32)
        flat, rows = fmap.reshape(-1), vf.reshape(-1, vf.shape[-1]).float().norm(dim=-1).cpu()
        ok = flat >= 0
        score.index_add_(0, flat[ok], rows[ok])
        count.index_add_(0, flat[ok], torch.ones_like(rows[ok]))
        score = score / count.clamp(min=1)
        kept = [vis.newline_positions]
        for seg in vis:
            k = (seg.num_tokens + 1) // 2
            kept.append(seg.positions[score[seg.positions].topk(k).indices])
        idx = torch.cat(kept).sort().values
        return VisualSelection(features[idx.to(features.device)], idx)


def _count_calls(module):
    calls = []
    return calls, module.register_forward_hook(lambda *a: calls.append(1))


@pytest.mark.parametrize(("model", "kind"), CASES, ids=IDS)
def test_stage1_method_with_vision_features_end_to_end(model, kind):
    adapter = get_adapter(model, "sdpa")
    visuals = [_clip()] if kind == "video" else [make_image(7, (64, 48))]
    base = generate(adapter, visuals, QUESTION, GEN)
    # keep-all through the vision-feature path reproduces the unmodified model exactly
    same = generate(adapter, visuals, QUESTION, GEN, HalfPerSegmentFromFeatures(keep_all=True))
    assert same.output_ids == base.output_ids
    assert_logits_equal(same.logits, base.logits)
    tower = adapter.model.model.video_tower if kind == "video" else adapter.vision_tower
    calls, handle = _count_calls(tower)
    try:
        method = HalfPerSegmentFromFeatures()
        out = generate(adapter, visuals, QUESTION, GEN, method)
    finally:
        handle.remove()
    assert len(calls) == 1, "vision tower must run once per sample"
    assert method.seen and method.seen[0][0] == 0
    structure = adapter.visual_context.segments
    expected = sum(v.newline_positions.numel() + sum((s.num_tokens + 1) // 2 for s in v) for v in structure)
    assert out.visual_tokens_in == base.visual_tokens_in
    assert out.visual_tokens_llm == expected < base.visual_tokens_in
    assert out.layer_visual_tokens == [expected] * adapter.num_layers
    assert len(out.kept_indices[0]) == expected


@dataclass
class KeepAllReadsSegments(TokenCompressor):
    """Stage-2 test method: checks at the drop layer that the segments describe the visual span."""

    stage: ClassVar[str] = "llm"
    layer: ClassVar[int] = 1

    def reset(self) -> None:
        self.checked = 0

    def select_llm_tokens(self, hidden_states, visual_positions, *, layer_idx, attention=None):
        vis = self.visual_context.segments
        assert sum(v.num_tokens for v in vis) == visual_positions[0].numel()
        cols = torch.cat([v.sequence_positions() for v in vis]).to(visual_positions[0].device)
        assert torch.equal(cols, visual_positions[0])
        self.checked += 1
        return super().select_llm_tokens(hidden_states, visual_positions, layer_idx=layer_idx, attention=attention)


@pytest.mark.parametrize("model", MODELS)
def test_stage2_method_reads_segments(model):
    adapter = get_adapter(model, "sdpa")
    method = KeepAllReadsSegments()
    base = generate(adapter, [make_image(7, (64, 48))], QUESTION, GEN)
    with method(adapter):
        out = generate(adapter, [make_image(7, (64, 48))], QUESTION, GEN, method)
        assert method.checked >= 1
    assert out.output_ids == base.output_ids
