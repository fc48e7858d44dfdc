"""The hooks the efficiency and figure tools call on a method: ``flops_overhead`` and ``token_map``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from apet_bench.methods import TokenCompressor, build_method, registered_classes
from apet_bench.methods.records import OverheadContext, TokenMap


def _ctx(**over) -> OverheadContext:
    base = dict(hidden_size=64, kv_hidden_size=64, num_layers=4, vision_hidden_size=32, vision_heads=4,
                vision_has_cls=True, patches_per_token=1, vision_feature_size=32, projector_flops_per_token=100,
                text_tokens=10, text_tokens_before_image=4, visual_tokens_in=16, visual_tokens_llm=16,
                layer_visual_tokens=(16, 16, 8, 8))
    base.update(over)
    return OverheadContext(**base)


def test_every_registered_method_defines_its_overhead():
    """No registered class falls back to the base formula (which raises)."""
    missing = [c.name for c in registered_classes() if c.flops_overhead is TokenCompressor.flops_overhead]
    assert missing == []


def test_base_class_has_no_overhead_formula():
    @dataclass
    class Bare(TokenCompressor):
        name: ClassVar[str] = "bare_probe"

    with pytest.raises(NotImplementedError, match="'bare_probe' defines no FLOPs overhead formula"):
        Bare().flops_overhead(_ctx())


def test_drops_and_stage_two_formula():
    ctx = _ctx()
    assert [(d.layer, d.before, d.after) for d in ctx.drops] == [(2, 16, 8)]
    assert ctx.text_tokens_after_image == 6
    # the last prompt token's row at layer K - 1 over 16 visual + 10 text tokens, 2 FLOPs per multiply-add
    assert build_method("fastv", budget=8, layer=2).flops_overhead(ctx) == {"attention_row_L1": 2 * 26 * 64}
    assert build_method("none").flops_overhead(ctx) == {} == build_method("random", budget=8).flops_overhead(ctx)


def test_visionzip_token_map_from_its_records():
    m = build_method("visionzip", budget=4)
    # record indices count [CLS] as 0: patch t is visual token t - 1
    m.records = [{"dominant": [0, 3], "targets": [5], "members": [[1, 2]]}]
    tm = m.token_map(6, None)
    assert tm.kept_indices == [2, 4]
    assert tm.merge_roots == [4, 4, 2, -1, 4, -1]
    assert "records" in tm.kept_source
    assert m.token_map(2, None) is None  # records do not fit 2 tokens


def test_tome_token_map_from_its_groups():
    m = build_method("tome", budget=3)
    m.last_groups = [torch.tensor([[0, 0, 1, 1, 2]])]
    assert m.token_map(5, [3, 7, 9]).merge_roots == [3, 3, 7, 7, 9]
    assert m.token_map(5, None) is None and m.token_map(6, [3, 7, 9]) is None


def test_methods_without_merges_report_none():
    assert build_method("random", budget=4).token_map(16, list(range(4))) is None
    assert TokenMap.from_groups([5, 6], [1, 0, 2]).merge_roots == [6, 5, -1]
