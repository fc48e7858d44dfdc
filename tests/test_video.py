"""Video decoding (apet_bench.data.video) on the real clips and GIFs, and the local TGIF-QA task."""

from __future__ import annotations

import glob
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from apet_bench.data import DataError, prepare_benchmark
from apet_bench.data.tgif import (
    normalize_answer,
    tgif_aggregate_accuracy,
    tgif_doc_to_text,
    tgif_doc_to_visual,
    tgif_process_results,
)
from apet_bench.data.video import (
    VideoDecodeError,
    is_video_path,
    load_video,
    load_video_frames,
    uniform_frame_indices,
)

BENCH = Path(os.environ.get("APET_SHARED_BENCHMARKS", "/work/shared/benchmarks"))
MP4S = sorted(glob.glob(str(BENCH / "videos" / "*.mp4")))
GIFS = sorted(glob.glob(str(BENCH / "tgif_qa" / "*.gif")))
needs_data = pytest.mark.skipif(not (MP4S and GIFS), reason=f"real videos not found under {BENCH}")


def _all_frames(path: str) -> np.ndarray:
    import av

    with av.open(path) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


# ---------------------------------------------------------------------- sampling
def test_uniform_frame_indices_follow_linspace():
    assert uniform_frame_indices(243).tolist() == [0, 34, 69, 103, 138, 172, 207, 242]
    assert uniform_frame_indices(8).tolist() == list(range(8))
    assert uniform_frame_indices(3).tolist() == [0, 0, 0, 0, 1, 1, 1, 2]  # short video: repeats
    assert uniform_frame_indices(1, 4).tolist() == [0, 0, 0, 0]
    for total in (9, 34, 146, 1000):
        idx = uniform_frame_indices(total)
        assert idx.tolist() == np.linspace(0, total - 1, 8, dtype=int).tolist()
        assert idx[0] == 0 and idx[-1] == total - 1 and np.all(np.diff(idx) >= 0)
    with pytest.raises(ValueError, match="total_frames 0"):
        uniform_frame_indices(0)
    with pytest.raises(ValueError, match="num_frames 0"):
        uniform_frame_indices(5, 0)


def test_is_video_path():
    assert is_video_path("a/b.mp4") and is_video_path(Path("x.GIF"))
    assert not is_video_path("a.jpg") and not is_video_path(3) and not is_video_path(None)


# ---------------------------------------------------------------------- decoding real files
@needs_data
@pytest.mark.parametrize("path", MP4S + GIFS, ids=lambda p: Path(p).name)
def test_load_video_real_files(path):
    clip = load_video(path)
    assert clip.dtype == np.uint8 and clip.ndim == 4 and clip.shape[0] == 8 and clip.shape[-1] == 3
    assert clip.shape[1] > 100 and clip.shape[2] > 100
    assert len({clip[i].tobytes() for i in range(8)}) > 1  # real motion: frames differ


@needs_data
@pytest.mark.parametrize("path", [GIFS[0] if GIFS else "", MP4S[1] if len(MP4S) > 1 else ""], ids=["gif", "mp4"])
def test_load_video_picks_the_uniform_frames(path):
    full = _all_frames(path)
    clip = load_video(path)
    idx = uniform_frame_indices(len(full))
    np.testing.assert_array_equal(clip, full[idx])
    frames = load_video_frames(path, num_frames=4)
    assert len(frames) == 4 and frames[0].mode == "RGB" and frames[0].size == (full.shape[2], full.shape[1])
    np.testing.assert_array_equal(np.asarray(frames[-1]), full[-1])


def test_corrupt_and_missing_videos_raise_one_line(tmp_path):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00\x01 not a video " * 64)
    with pytest.raises(VideoDecodeError) as exc:
        load_video(bad)
    msg = str(exc.value)
    assert str(bad) in msg and "\n" not in msg and isinstance(exc.value, ValueError)
    with pytest.raises(VideoDecodeError, match="does not exist"):
        load_video(tmp_path / "nope.gif")
    with pytest.raises(ValueError, match="num_frames"):
        load_video(bad, num_frames=0)


# ---------------------------------------------------------------------- TGIF-QA task
def test_normalize_answer_and_scoring():
    assert normalize_answer("The Dog.") == "dog"
    assert normalize_answer("  Two ") == "2" == normalize_answer("2")
    assert normalize_answer("ice-cream") == "ice cream"
    doc = {"question_id": "FRAMEQA1", "category": "frameqa", "answer": "brown", "question": "what color ?",
           "video": "/x/4.gif"}
    assert tgif_doc_to_visual(doc) == ["/x/4.gif"]
    assert tgif_doc_to_text(doc) == "what color ?\nAnswer the question using a single word or phrase."
    assert tgif_doc_to_text(doc, {"pre_prompt": "Q: ", "post_prompt": ""}) == "Q: what color ?"
    good = tgif_process_results(doc, ["Brown.\nmore text"])["exact_match_accuracy"]
    bad = tgif_process_results(doc, ["light brown"])["exact_match_accuracy"]
    assert good["correct"] == 1 and bad["correct"] == 0
    count = tgif_process_results({**doc, "category": "count", "answer": "2"}, ["two"])["exact_match_accuracy"]
    assert count["correct"] == 1
    assert tgif_aggregate_accuracy([good, bad, count]) == pytest.approx(200 / 3)
    assert tgif_aggregate_accuracy([]) == 0.0


@needs_data
def test_prepare_tgif_local_task(tmp_path):
    task = prepare_benchmark({"name": "tgif_qa", "converter": "tgif"}, data_root=BENCH, cache_dir=tmp_path)
    assert task.task_name == "apet_tgif_qa_local"
    assert task.num_samples == 9  # 6 FrameQA + 3 Count test questions over the 4 local GIFs
    assert task.subtasks == ["frameqa", "count"] and task.missing_subtasks == [] and task.skipped == []
    text = Path(task.yaml_path).read_text()
    for fn in ("tgif_doc_to_visual", "tgif_doc_to_text", "tgif_process_results", "tgif_aggregate_accuracy"):
        assert f"!function apet_bench.data.tgif.{fn}" in text
    assert "metric: exact_match_accuracy" in text and "max_new_tokens: 16" in text
    import datasets

    ds = datasets.load_from_disk(task.dataset_path)["test"]
    rows = {r["question_id"]: r for r in ds}
    assert rows["FRAMEQA14461"]["answer"] == "brown" and rows["COUNT7999"]["answer"] == "2"
    assert rows["FRAMEQA14461"]["video"] == str((BENCH / "tgif_qa" / "4.gif").resolve())
    assert all(Path(r["video"]).is_file() for r in ds)
    again = prepare_benchmark({"name": "tgif_qa", "converter": "tgif"}, data_root=BENCH, cache_dir=tmp_path)
    assert again.include_path == task.include_path  # cached


def _small_layout(root: Path) -> Path:
    """A TGIF-QA layout with two GIFs (one corrupt) and the official rows of those GIFs."""
    src = BENCH / "tgif_qa"
    dst = root / "tgif_qa"
    dst.mkdir(parents=True)
    local = (src / "local_gifs.tsv").read_text().splitlines()
    keep = [line for line in local[1:] if line.split("\t")[0] in ("4.gif", "count_1.gif")]
    (dst / "local_gifs.tsv").write_text("\n".join([local[0], *keep]) + "\n")
    names = {line.split("\t")[1] for line in keep}
    for fname in ("Test_frameqa_question.csv", "Test_count_question.csv"):
        lines = (src / fname).read_text().splitlines()
        (dst / fname).write_text("\n".join([lines[0], *[x for x in lines[1:] if x.split("\t")[0] in names]]) + "\n")
    shutil.copy(src / "4.gif", dst / "4.gif")
    (dst / "count_1.gif").write_bytes(b"GIF89a" + b"\x00" * 40)
    return dst


@needs_data
def test_tgif_corrupt_gif_is_skipped_or_raises(tmp_path):
    data = tmp_path / "data"
    dst = _small_layout(data)
    task = prepare_benchmark({"name": "tgif_qa", "converter": "tgif"}, data_root=data, cache_dir=tmp_path / "c")
    assert task.num_samples == 6 and task.subtasks == ["frameqa", "count"]  # 4.gif: 5 FrameQA + 1 Count
    assert [s["path"] for s in task.skipped] == [str(dst / "count_1.gif")]
    json.dumps(task.skipped)
    with pytest.raises(DataError, match="count_1.gif"):
        prepare_benchmark({"name": "tgif_qa", "converter": "tgif"}, data_root=data, cache_dir=tmp_path / "c2",
                          on_corrupt_image="error")
    (dst / "count_1.gif").unlink()
    with pytest.raises(DataError, match="missing"):
        prepare_benchmark({"name": "tgif_qa", "converter": "tgif"}, data_root=data, cache_dir=tmp_path / "c3")
    with pytest.raises(DataError, match="no TGIF-QA layout"):
        prepare_benchmark({"name": "tgif_qa", "converter": "tgif"}, data_root=tmp_path, cache_dir=tmp_path / "c4")
