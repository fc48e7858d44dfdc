"""Benchmark configs of every paper benchmark, the POPE / open-ended video QA converters, the hub route's
one-line errors, TextVQA's OCR variant and the judged TGIF-QA task YAML. No model is run here."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import yaml

from apet_bench.config import config_dir
from apet_bench.data import DataError, prepare_benchmark

SHARED = Path(os.environ.get("APET_BENCH_TEST_DATA_ROOT", Path(__file__).resolve().parents[2] / "shared" / "benchmarks"))
BENCH = config_dir() / "benchmark"
PAPER_BENCHMARKS = ["gqa", "mmbench_en", "mmbench_cn", "mme", "pope", "scienceqa_img", "vqav2", "textvqa", "vizwiz",
                    "tgif_qa_judged", "msvd_qa", "msrvtt_qa"]


def _cfg(name: str) -> dict:
    return yaml.safe_load((BENCH / f"{name}.yaml").read_text())


def _lmms_eval_task_names() -> set[str]:
    import lmms_eval

    names = set()
    for f in (Path(lmms_eval.__file__).parent / "tasks").rglob("*.yaml"):
        m = re.search(r'^task:\s*"?([A-Za-z0-9_]+)"?\s*$', f.read_text(errors="ignore"), re.M)
        if m:
            names.add(m.group(1))
    return names


def test_every_paper_benchmark_has_a_config():
    builtin = _lmms_eval_task_names()
    from apet_bench.protocol import resolve

    for name, protocol in ((n, p) for n in PAPER_BENCHMARKS for p in ("llava", "lmms_eval")):
        c = resolve({**_cfg(name), "protocol": protocol})
        assert c["available"] is True and c["name"] == name and c["metrics"], name
        if c.get("source") == "hub":
            for key in ("lmms_eval_task", "lmms_eval_submission_task"):
                task = c.get(key)
                if task and not task.startswith("apet_"):
                    assert task in builtin, f"{name}: {task} is not an lmms-eval 0.7.3 task"
            assert c.get("hub_dataset", "").startswith("lmms-lab-encoder/"), name
        else:
            assert c.get("converter") in ("mme", "pope", "tgif", "videoqa", "mmbench"), name
    # Server-scored splits of the paper produce a submission file.
    assert _cfg("vqav2")["lmms_eval_submission_task"] == "vqav2_test"
    assert _cfg("vizwiz")["lmms_eval_submission_task"] == "vizwiz_vqa_test"
    assert _cfg("mmbench_en")["lmms_eval_submission_task"] == "mmbench_en_test"


def test_hub_dataset_offline_is_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(DataError, match=r"hub dataset lmms-lab-encoder/GQA is not in the datasets cache") as ei:
        prepare_benchmark(_cfg("gqa"), data_root=None, cache_dir=tmp_path)
    assert "\n" not in str(ei.value)
    # Once the cache holds the dataset, the task is lmms-eval's own (counted by lmms-eval: num_samples None).
    (tmp_path / "empty-cache" / "lmms-lab-encoder___GQA").mkdir(parents=True)
    task = prepare_benchmark(_cfg("gqa"), data_root=None, cache_dir=tmp_path)
    assert task.task_name == "gqa" and task.include_path is None and task.num_samples is None
    (tmp_path / "empty-cache" / "lmms-lab-encoder___VQAv2").mkdir()
    sub = prepare_benchmark({**_cfg("vqav2"), "submission": True}, data_root=None, cache_dir=tmp_path)
    assert sub.task_name == "vqav2_test" and "submission" in sub.source


def test_textvqa_llava_variant(tmp_path, monkeypatch):
    """LLaVA protocol: lmms-eval's textvqa_val (data, scoring) with our doc_to_text (OCR tokens, no capitalize());
    protocol=lmms_eval: lmms-eval's own task."""
    import lmms_eval
    from lmms_eval.utils import load_yaml_config

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "c"))
    (tmp_path / "c" / "lmms-lab-encoder___textvqa").mkdir(parents=True)
    task = prepare_benchmark(_cfg("textvqa"), data_root=None, cache_dir=tmp_path)
    assert task.task_name == "apet_textvqa_val_llava"
    text = Path(task.yaml_path).read_text()
    base = Path(lmms_eval.__file__).parent / "tasks" / "textvqa" / "textvqa_val.yaml"
    assert f"include: {base}" in text and base.is_file()
    full = load_yaml_config(task.yaml_path, mode="full")  # lmms-eval resolves the include and its functions
    assert full["test_split"] == "validation" and full["process_results"].__name__ == "textvqa_process_results"
    doc = {"question": "is it a NIKON?", "ocr_tokens": ["NIKON"]}
    assert full["doc_to_text"](doc) == "is it a NIKON?\nReference OCR token: NIKON\nAnswer the question using a single word or phrase."
    stock = prepare_benchmark({**_cfg("textvqa"), "protocol": "lmms_eval"}, data_root=None, cache_dir=tmp_path)
    assert stock.task_name == "textvqa_val" and stock.include_path is None


def test_vizwiz_and_vqav2_default_to_the_server_split(tmp_path, monkeypatch):
    from lmms_eval.utils import load_yaml_config

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "c"))
    for repo in ("VizWiz-VQA", "VQAv2"):
        (tmp_path / "c" / f"lmms-lab-encoder___{repo}").mkdir(parents=True)
    viz = prepare_benchmark(_cfg("vizwiz"), data_root=None, cache_dir=tmp_path)
    assert viz.task_name == "apet_vizwiz_vqa_test_llava" and "submission" in viz.source
    full = load_yaml_config(viz.yaml_path, mode="full")
    assert full["test_split"] == "test" and [m["metric"] for m in full["metric_list"]] == ["submission"]
    assert full["doc_to_text"]({"question": "What is THIS?"}).startswith("What is THIS?\nWhen the provided information")
    val = prepare_benchmark({**_cfg("vizwiz"), "submission": False}, data_root=None, cache_dir=tmp_path)
    assert val.task_name == "apet_vizwiz_vqa_val_llava" and "submission" not in val.source
    assert prepare_benchmark(_cfg("vqav2"), data_root=None, cache_dir=tmp_path).task_name == "vqav2_test"
    assert prepare_benchmark({**_cfg("vqav2"), "protocol": "lmms_eval"}, data_root=None, cache_dir=tmp_path).task_name == "vqav2_val"


def test_mmbench_hub_llava_task(tmp_path, monkeypatch):
    """MMBench on the hub under the LLaVA protocol: lmms-eval's data and generation settings, our text and CircularEval."""
    from lmms_eval.utils import load_yaml_config

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "c"))
    (tmp_path / "c" / "lmms-lab-encoder___MMBench").mkdir(parents=True)
    for lang, post in (("en", "Answer with the option's letter from the given choices directly."), ("cn", "请直接回答选项字母。")):
        with pytest.raises(DataError, match="official TSV"):
            prepare_benchmark(_cfg(f"mmbench_{lang}"), data_root=tmp_path, cache_dir=tmp_path)
        task = prepare_benchmark({**_cfg(f"mmbench_{lang}"), "source": "hub"}, data_root=None, cache_dir=tmp_path)
        assert task.task_name == f"apet_mmbench_{lang}_dev_llava"
        full = load_yaml_config(task.yaml_path, mode="full")
        assert full["test_split"] == "dev" and full["dataset_name"] == lang
        doc = {"index": 3, "question": "Q?", "hint": "H.", "A": "x", "B": "y", "C": "nan", "D": "nan", "answer": "B",
               "category": "c", "L2-category": "l2", "source": "s", "split": "dev"}
        assert full["doc_to_text"](doc) == f"H.\nQ?\nA. x\nB. y\n{post}"
        rec = full["process_results"](doc, ["B"])
        assert rec["gpt_eval_score"]["sample_id"] == "3" and rec["gpt_eval_score"]["extracted"] == "B"
        aggs = {m["metric"]: m["aggregation"] for m in full["metric_list"]}
        assert aggs["gpt_eval_score"]([rec["gpt_eval_score"]]) == 100.0
    stock = prepare_benchmark({**_cfg("mmbench_cn"), "protocol": "lmms_eval"}, data_root=None, cache_dir=tmp_path)
    assert stock.task_name == "mmbench_cn_dev"


def test_mmbench_local_tsv(tmp_path):
    """The official dev TSV (base64 images) becomes a local task; LLaVA reads options up to the first empty one."""
    import base64
    import io

    import datasets
    from lmms_eval.utils import load_yaml_config
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buf, format="JPEG")
    img = base64.b64encode(buf.getvalue()).decode()
    (tmp_path / "mmbench").mkdir()
    rows = ["index\tquestion\thint\tA\tB\tC\tD\tanswer\tcategory\timage",
            f"7\tWhich?\t\tred\tblue\t\t\tA\tcolor\t{img}",
            f"1000007\tWhich?\t\tblue\tred\t\t\tB\tcolor\t{img}"]
    (tmp_path / "mmbench" / "mmbench_dev_20230712.tsv").write_text("\n".join(rows) + "\n")
    task = prepare_benchmark(_cfg("mmbench_en"), data_root=tmp_path, cache_dir=tmp_path / "cache")
    assert task.task_name == "apet_mmbench_en_local" and task.num_samples == 2
    ds = datasets.load_from_disk(task.dataset_path)["test"]
    full = load_yaml_config(task.yaml_path, mode="full")
    assert full["doc_to_text"](ds[0]) == "Which?\nA. red\nB. blue\nAnswer with the option's letter from the given choices directly."
    recs = [full["process_results"](d, [p])["gpt_eval_score"] for d, p in zip(ds, ["A", "A"])]
    aggs = {m["metric"]: m["aggregation"] for m in full["metric_list"]}
    assert aggs["gpt_eval_score"](recs) == 0.0 and aggs["mmbench_groups"](recs) == 1


@pytest.mark.skipif(not (SHARED / "pope").is_dir(), reason=f"no POPE question files at {SHARED}")
def test_pope_without_coco_images_names_what_is_missing(tmp_path):
    with pytest.raises(DataError) as ei:
        prepare_benchmark(_cfg("pope"), data_root=SHARED, cache_dir=tmp_path)
    msg = str(ei.value)
    assert "500 COCO val2014 images" in msg and str((SHARED / "coco" / "val2014").resolve()) in msg and "\n" not in msg


def _mini_pope(root: Path) -> None:
    from PIL import Image

    (root / "pope").mkdir(parents=True)
    (root / "coco" / "val2014").mkdir(parents=True)
    for i in range(2):
        Image.new("RGB", (32, 24), (40 * i, 90, 200)).save(root / "coco" / "val2014" / f"COCO_val2014_{i}.jpg")
    for fname in ("coco_pope_adversarial.json", "coco_pope_popular.json", "coco_pope_random_2910_llava.json"):
        lines = [{"question_id": q + 1, "image": f"COCO_val2014_{q % 2}.jpg", "text": f"Is there a thing {q}?",
                  "label": "yes" if q % 2 == 0 else "no"} for q in range(4)]
        (root / "pope" / fname).write_text("\n".join(json.dumps(x) for x in lines) + "\n")


def test_pope_local_task_and_mean_f1(tmp_path):
    import datasets

    from apet_bench.data.pope import pope_aggregate_mean_f1, pope_process_results

    root = tmp_path / "root"
    _mini_pope(root)
    task = prepare_benchmark(_cfg("pope"), data_root=root, cache_dir=tmp_path / "cache")
    assert task.task_name == "apet_pope_local" and task.num_samples == 12
    assert task.subtasks == ["adversarial", "popular", "random"]
    rows = datasets.load_from_disk(task.dataset_path)["test"]
    assert sorted(set(rows["category"])) == ["adversarial", "popular", "random"]
    text = Path(task.yaml_path).read_text()
    assert "apet_bench.data.llava_protocol.pope_aggregate_f1_llava" in text and "llava_protocol.pope_doc_to_text" in text
    assert "pope_non_binary_answers" in text and "pope_f1_parser_diff" in text
    # Mean F1 of per-category F1s: adversarial all right (1.0); popular answers always "yes"
    # (P = 0.5, R = 1, F1 = 2/3); random always "no" (no TP: F1 = 0) -> (1 + 2/3 + 0) / 3.
    recs = []
    for r in rows:
        pred = {"adversarial": r["answer"], "popular": "Yes", "random": "No"}[r["category"]]
        recs.append(pope_process_results(r, [pred])["pope_f1_mean"])
    assert pope_aggregate_mean_f1(recs) == pytest.approx((1 + 2 / 3 + 0) / 3)


@pytest.mark.skipif(not (SHARED / "videos").is_dir(), reason=f"no sample videos at {SHARED}")
def test_videoqa_converter(tmp_path):
    root = tmp_path / "root"
    vids = root / "msrvtt_qa" / "TestVideo"
    vids.mkdir(parents=True)
    src = sorted((SHARED / "videos").glob("*.mp4"))[0]
    os.symlink(src, vids / "video7010.mp4")
    qa = [{"answer": "man", "category_id": 1, "id": 1, "question": "who is talking?", "video_id": 7010},
          {"answer": "car", "category_id": 2, "id": 2, "question": "what is shown?", "video_id": 7010}]
    (root / "msrvtt_qa" / "test_qa.json").write_text(json.dumps(qa))
    task = prepare_benchmark(_cfg("msrvtt_qa"), data_root=root, cache_dir=tmp_path / "cache")
    assert task.task_name == "apet_msrvtt_qa_local" and task.num_samples == 2
    text = Path(task.yaml_path).read_text()
    assert "apet_bench.judge.videoqa_aggregate_accuracy" in text and "judge_failures" in text
    qa.append({"answer": "x", "category_id": 1, "id": 3, "question": "q?", "video_id": 9999})
    (root / "msrvtt_qa" / "test_qa.json").write_text(json.dumps(qa))
    with pytest.raises(DataError, match=r"1 of 3 videos missing .*video9999.mp4"):
        prepare_benchmark(_cfg("msrvtt_qa"), data_root=root, cache_dir=tmp_path / "cache")
    with pytest.raises(DataError, match="QA file .*test_qa.json not found"):
        prepare_benchmark(_cfg("msvd_qa"), data_root=root, cache_dir=tmp_path / "cache")


@pytest.mark.skipif(not (SHARED / "tgif_qa").is_dir(), reason=f"no TGIF-QA data at {SHARED}")
def test_tgif_judged_task(tmp_path):
    task = prepare_benchmark(_cfg("tgif_qa_judged"), data_root=SHARED, cache_dir=tmp_path)
    assert task.task_name == "apet_tgif_qa_judged_local" and task.num_samples == 6  # FrameQA only (the paper's)
    assert task.subtasks == ["frameqa"]
    both = prepare_benchmark({**_cfg("tgif_qa_judged"), "protocol": "lmms_eval"}, data_root=SHARED, cache_dir=tmp_path)
    assert both.num_samples == 9 and both.subtasks == ["frameqa", "count"]
    text = Path(task.yaml_path).read_text()
    assert "apet_bench.judge.videoqa_process_results" in text and "exact_match" not in text
    with pytest.raises(DataError, match="scoring 'gpt'"):
        prepare_benchmark({**_cfg("tgif_qa_judged"), "scoring": "gpt"}, data_root=SHARED, cache_dir=tmp_path)
