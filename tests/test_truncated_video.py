"""A video cut short is corrupt, not a shorter clip: a half-truncated TGIF GIF is skipped and counted
(``on_corrupt_image=skip``) or stops the preparation (``error``)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import yaml

from apet_bench.data import DataError, prepare_benchmark
from apet_bench.data.video import VideoDecodeError, load_video

REPO = Path(__file__).resolve().parents[1]
SHARED_BENCH = Path(os.environ.get("APET_BENCH_TEST_DATA_ROOT", REPO.parent / "shared" / "benchmarks"))
pytestmark = pytest.mark.skipif(not (SHARED_BENCH / "tgif_qa").is_dir(), reason=f"no TGIF-QA data at {SHARED_BENCH}")


def _half_truncated_copy(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "data"
    shutil.copytree(SHARED_BENCH / "tgif_qa", root / "tgif_qa")
    gif = sorted((root / "tgif_qa").glob("*.gif"))[0]
    data = gif.read_bytes()
    gif.write_bytes(data[: len(data) // 2])
    return root, gif


def test_half_truncated_gif_is_corrupt(tmp_path):
    root, gif = _half_truncated_copy(tmp_path)
    assert load_video(SHARED_BENCH / "tgif_qa" / gif.name).shape[0] == 8  # the intact original decodes
    with pytest.raises(VideoDecodeError, match="truncated"):
        load_video(gif)
    cfg = yaml.safe_load((REPO / "configs" / "benchmark" / "tgif_qa.yaml").read_text())
    task = prepare_benchmark(cfg, data_root=root, cache_dir=tmp_path / "cache", on_corrupt_image="skip")
    (skipped,) = task.skipped
    assert skipped["path"] == str(gif.resolve()) or skipped["path"] == str(gif)
    assert skipped["questions"] >= 1 and "truncated" in skipped["reason"]
    with pytest.raises(DataError, match="truncated"):
        prepare_benchmark(cfg, data_root=root, cache_dir=tmp_path / "cache2", on_corrupt_image="error")
