"""Tests of apet_bench.data: MME release -> local lmms-eval task, the embedded demo set, the cache,
the error messages, and an end-to-end lmms-eval run with a stub model (no hub, no GPU)."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import json  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402
from collections import Counter, defaultdict  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import yaml  # noqa: E402

from apet_bench.data import MME_PERCEPTION, MME_SUBTASKS, DataError, PreparedTask, prepare_benchmark  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "benchmarks"
MME_CFG = {"name": "mme", "converter": "mme", "subdir": "mme", "ground_truth_subdir": "mme_ground_truth"}
DEMO_CFG = {"name": "demo", "converter": "demo"}
PRESENT = [
    "existence", "count", "position", "color", "celebrity", "OCR",
    "numerical_calculation", "text_translation", "code_reasoning",
]  # fmt: skip
MISSING = ["posters", "scene", "landmark", "artwork", "commonsense_reasoning"]

needs_shared = pytest.mark.skipif(
    not (SHARED / "mme").is_dir() or not (SHARED / "mme_ground_truth").is_dir(),
    reason=f"shared MME data not found at {SHARED} (expected ../shared/benchmarks next to the repo)",
)


def _load_rows(task: PreparedTask):
    import datasets

    return datasets.load_from_disk(task.dataset_path)["test"]


def _gt_lines(subtask: str) -> list[list[str]]:
    text = (SHARED / "mme_ground_truth" / f"{subtask}.txt").read_text(encoding="utf-8")
    return [line.split("\t") for line in text.splitlines() if line.strip()]


# ------------------------------------------------------------------------------------ shared MME


@pytest.fixture(scope="module")
def mme_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("mme_cache")


@pytest.fixture(scope="module")
def mme_task(mme_cache):
    if not (SHARED / "mme").is_dir():
        pytest.skip(f"shared MME data not found at {SHARED}")
    t0 = time.perf_counter()
    task = prepare_benchmark(MME_CFG, data_root=str(SHARED), cache_dir=str(mme_cache))
    print(f"\nprepare_benchmark(mme) cold: {time.perf_counter() - t0:.2f}s")
    return task


@pytest.fixture(scope="module")
def demo_task(tmp_path_factory):
    return prepare_benchmark(DEMO_CFG, data_root=None, cache_dir=str(tmp_path_factory.mktemp("demo_cache")))


@needs_shared
def test_mme_shared_summary(mme_task):
    assert mme_task.benchmark == "mme"
    assert mme_task.task_name == "apet_mme_local"
    assert mme_task.num_samples == 740
    assert mme_task.skipped == []
    assert sorted(mme_task.subtasks) == sorted(PRESENT)
    assert sorted(mme_task.missing_subtasks) == sorted(MISSING)
    assert str(SHARED.resolve()) in mme_task.source  # ../shared may be a symlink
    assert len(mme_task.fingerprint) == 64
    assert Path(mme_task.include_path).name == f"apet_mme_local-{mme_task.fingerprint[:12]}"
    assert Path(mme_task.yaml_path).is_file()


@needs_shared
def test_mme_shared_rows_match_ground_truth(mme_task):
    ds = _load_rows(mme_task)
    assert len(ds) == 740
    assert set(ds.column_names) == {"question_id", "question", "answer", "category", "image"}
    assert type(ds.features["image"]).__name__ == "Image"
    cols = ds.select_columns(["question_id", "question", "answer", "category"]).to_list()
    by_qid = defaultdict(list)
    for r in cols:
        by_qid[r["question_id"]].append(r["answer"])
        assert r["question_id"].split("/", 1)[0] == r["category"]
    assert len(by_qid) == 370
    assert all(sorted(a) == ["No", "Yes"] for a in by_qid.values())
    assert Counter(r["category"] for r in cols) == {s: len(_gt_lines(s)) for s in PRESENT}
    # Questions/answers are the ground truth's, in its order.
    for sub in ("existence", "celebrity", "code_reasoning"):
        got = [(r["question_id"], r["question"], r["answer"]) for r in cols if r["category"] == sub]
        want = [(f"{sub}/{img}", q.strip(), a.strip()) for img, q, a in _gt_lines(sub)]
        assert got == want
    # Image bytes are the release files, untouched.
    row = ds[0]
    src = SHARED / "mme" / row["category"] / row["question_id"].split("/", 1)[1]
    assert row["image"].size == __import__("PIL.Image").Image.open(src).size
    raw = ds.cast_column("image", __import__("datasets").Image(decode=False))[0]["image"]["bytes"]
    assert raw == src.read_bytes()


@needs_shared
def test_mme_shared_cache_reused(mme_task, mme_cache):
    entry = Path(mme_task.include_path)
    stamps = {p: p.stat().st_mtime_ns for p in entry.rglob("*")}
    before = sorted(p.name for p in (mme_cache / "tasks").iterdir())
    t0 = time.perf_counter()
    again = prepare_benchmark(MME_CFG, data_root=str(SHARED), cache_dir=str(mme_cache))
    warm = time.perf_counter() - t0
    print(f"\nprepare_benchmark(mme) warm: {warm:.3f}s")
    assert again == mme_task
    assert {p: p.stat().st_mtime_ns for p in entry.rglob("*")} == stamps
    assert sorted(p.name for p in (mme_cache / "tasks").iterdir()) == before  # reused, not rewritten


def test_generated_yaml_matches_builtin_mme(demo_task):
    import lmms_eval

    builtin = Path(lmms_eval.__file__).parent / "tasks" / "mme" / "mme.yaml"

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor(
        "!function", lambda loader, node: "fn:" + loader.construct_scalar(node).split(".")[-1]
    )
    ref = yaml.load(builtin.read_text(), Loader=Loader)
    ours = yaml.load(Path(demo_task.yaml_path).read_text(), Loader=Loader)
    for key in ("generation_kwargs", "lmms_eval_specific_kwargs", "metric_list", "doc_to_visual", "doc_to_text",
                "doc_to_target", "process_results", "output_type", "test_split"):  # fmt: skip
        assert ours[key] == ref[key], key
    assert (
        ours["lmms_eval_specific_kwargs"]["default"]["post_prompt"]
        == "\nAnswer the question using a single word or phrase."
    )
    assert ours["task"] == "apet_demo"
    assert ours["dataset_kwargs"] == {"load_from_disk": True}
    assert ours["dataset_path"] == demo_task.dataset_path
    text = Path(demo_task.yaml_path).read_text()
    assert "!function lmms_eval.tasks.mme.utils.mme_process_results" in text


def test_subtask_names_match_lmms_eval():
    from lmms_eval.tasks.mme.utils import eval_type_dict

    assert list(MME_SUBTASKS) == eval_type_dict["Perception"] + eval_type_dict["Cognition"]
    assert list(MME_PERCEPTION) == eval_type_dict["Perception"]


# --------------------------------------------------------------------- small MME copies in tmp

EXIST_IMGS = ["000000006040.jpg", "000000006471.jpg", "000000007108.jpg"]
CORRUPT = "000000008844.jpg"


def _mini_root(tmp_path: Path, *, corrupt: bool = True, images_layout: bool = False) -> Path:
    """existence: 3 real images (+ a truncated 4th) with release .txt files and ground truth."""
    if not (SHARED / "mme" / "existence").is_dir():
        pytest.skip(f"shared MME data not found at {SHARED}")
    root = tmp_path / "root"
    sub = root / "mme" / "existence"
    img_dir = sub / "images" if images_layout else sub
    txt_dir = sub / "questions_answers_YN" if images_layout else sub
    img_dir.mkdir(parents=True)
    txt_dir.mkdir(parents=True, exist_ok=True)
    names = EXIST_IMGS + ([CORRUPT] if corrupt else [])
    for name in names:
        src = SHARED / "mme" / "existence" / name
        shutil.copy(src.with_suffix(".txt"), txt_dir / f"{Path(name).stem}.txt")
        data = src.read_bytes()
        (img_dir / name).write_bytes(data[: len(data) // 2] if name == CORRUPT else data)
    (root / "mme_ground_truth").mkdir()
    gt = [ln for ln in _gt_lines("existence") if ln[0] in names]
    assert len(gt) == 2 * len(names)
    (root / "mme_ground_truth" / "existence.txt").write_text("".join("\t".join(ln) + "\n" for ln in gt))
    return root


def test_corrupt_image_skip(tmp_path):
    root = _mini_root(tmp_path)
    task = prepare_benchmark(
        MME_CFG, data_root=str(root), cache_dir=str(tmp_path / "c"), on_corrupt_image="skip"
    )
    assert task.num_samples == 6
    assert task.subtasks == ["existence"]
    assert task.missing_subtasks == [s for s in MME_SUBTASKS if s != "existence"]
    assert len(task.skipped) == 1
    bad = task.skipped[0]
    assert bad["path"] == str(root / "mme" / "existence" / CORRUPT)
    assert bad["questions"] == 2 and bad["reason"]
    qids = set(_load_rows(task)["question_id"])
    assert qids == {f"existence/{n}" for n in EXIST_IMGS}


def test_corrupt_image_error(tmp_path):
    root = _mini_root(tmp_path)
    bad = str(root / "mme" / "existence" / CORRUPT)
    with pytest.raises(DataError, match=re.escape(bad)) as ei:
        prepare_benchmark(
            MME_CFG, data_root=str(root), cache_dir=str(tmp_path / "c"), on_corrupt_image="error"
        )
    assert "\n" not in str(ei.value)
    assert not (tmp_path / "c" / "tasks").exists() or not any((tmp_path / "c" / "tasks").iterdir())
    # A cache entry built in "skip" mode must not let "error" mode pass.
    prepare_benchmark(MME_CFG, data_root=str(root), cache_dir=str(tmp_path / "c"), on_corrupt_image="skip")
    with pytest.raises(DataError, match=re.escape(bad)):
        prepare_benchmark(
            MME_CFG, data_root=str(root), cache_dir=str(tmp_path / "c"), on_corrupt_image="error"
        )


def test_images_subfolder_layout(tmp_path):
    root = _mini_root(tmp_path, corrupt=False, images_layout=True)
    task = prepare_benchmark(MME_CFG, data_root=str(root), cache_dir=str(tmp_path / "c"))
    assert task.num_samples == 6 and task.skipped == []
    assert set(_load_rows(task)["question_id"]) == {f"existence/{n}" for n in EXIST_IMGS}


def test_fingerprint_follows_content(tmp_path):
    root = _mini_root(tmp_path, corrupt=False)
    a = prepare_benchmark(MME_CFG, data_root=str(root), cache_dir=str(tmp_path / "c"))
    # Same files elsewhere -> same fingerprint (paths are relative to data_root).
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    b = prepare_benchmark(MME_CFG, data_root=str(copy), cache_dir=str(tmp_path / "c2"))
    assert a.fingerprint == b.fingerprint
    # Changing one image's bytes changes it and builds a new entry.
    img = copy / "mme" / "existence" / EXIST_IMGS[0]
    img.write_bytes(img.read_bytes() + b"\0")
    c = prepare_benchmark(MME_CFG, data_root=str(copy), cache_dir=str(tmp_path / "c2"))
    assert c.fingerprint != b.fingerprint and c.include_path != b.include_path


# ----------------------------------------------------------------------------------------- errors


def test_data_root_errors(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match=re.escape(str(missing))):
        prepare_benchmark(MME_CFG, data_root=str(missing), cache_dir=str(tmp_path / "c"))
    empty = tmp_path / "empty"
    (empty / "mme" / "unrelated").mkdir(parents=True)
    with pytest.raises(
        DataError,
        match=rf"no MME release layout under {re.escape(str(empty))}.*expected {re.escape(str(empty))}/mme/<subtask>/",
    ):
        prepare_benchmark(MME_CFG, data_root=str(empty), cache_dir=str(tmp_path / "c"))
    with pytest.raises(DataError, match="no MME release layout"):
        prepare_benchmark(MME_CFG, data_root=str(tmp_path), cache_dir=str(tmp_path / "c"))
    with pytest.raises(DataError, match="data_root is not set.*APET_BENCH_DATA_ROOT"):
        prepare_benchmark(MME_CFG, data_root=None, cache_dir=str(tmp_path / "c"))


def test_config_errors(tmp_path):
    with pytest.raises(DataError, match="'sometimes'"):
        prepare_benchmark(DEMO_CFG, data_root=None, cache_dir=str(tmp_path), on_corrupt_image="sometimes")
    with pytest.raises(DataError, match="'pope'"):
        prepare_benchmark({"name": "pope", "converter": "pope"}, data_root=None, cache_dir=str(tmp_path))
    with pytest.raises(DataError, match="'mme'"):
        prepare_benchmark({**DEMO_CFG, "task_name": "mme"}, data_root=None, cache_dir=str(tmp_path))


def test_ground_truth_errors(tmp_path):
    root = _mini_root(tmp_path, corrupt=False)
    gt = root / "mme_ground_truth" / "existence.txt"
    good = gt.read_text()
    c = str(tmp_path / "c")

    gt.unlink()
    with pytest.raises(DataError, match=f"ground-truth file missing .*{re.escape(str(gt))}"):
        prepare_benchmark(MME_CFG, data_root=str(root), cache_dir=c)

    gt.write_text(good)
    img = root / "mme" / "existence" / EXIST_IMGS[1]
    img.rename(img.with_suffix(".bak"))
    with pytest.raises(
        DataError, match=f"image referenced by ground truth .* is missing: {re.escape(str(img))}"
    ):
        prepare_benchmark(MME_CFG, data_root=str(root), cache_dir=c)
    img.with_suffix(".bak").rename(img)

    txt = root / "mme" / "existence" / f"{Path(EXIST_IMGS[0]).stem}.txt"
    orig = txt.read_text()
    txt.write_text(orig.replace("\tYes", "\tMaybe", 1).replace("\tNo", "\tYes", 1).replace("\tMaybe", "\tNo"))
    with pytest.raises(DataError, match=f"{re.escape(str(txt))} differ from ground truth"):
        prepare_benchmark(MME_CFG, data_root=str(root), cache_dir=c)
    txt.write_text(orig)

    extra = root / "mme" / "existence" / "extra.jpg"
    shutil.copy(img, extra)
    with pytest.raises(DataError, match=f"{re.escape(str(extra))} has no questions in ground truth"):
        prepare_benchmark(MME_CFG, data_root=str(root), cache_dir=c)
    extra.unlink()

    gt.write_text(good.replace("\tNo\n", "\tYes\n", 1))
    with pytest.raises(DataError, match=f"{re.escape(str(gt))}: image .* one Yes and one No"):
        prepare_benchmark(MME_CFG, data_root=str(root), cache_dir=c)
    gt.write_text(good)
    assert prepare_benchmark(MME_CFG, data_root=str(root), cache_dir=c).num_samples == 6


# ------------------------------------------------------------------------------------------ cache


def test_incomplete_cache_entry_is_rebuilt(tmp_path):
    root = _mini_root(tmp_path, corrupt=False)
    c = tmp_path / "c"
    task = prepare_benchmark(MME_CFG, data_root=str(root), cache_dir=str(c))
    entry = Path(task.include_path)
    manifest = entry / "manifest.json"

    # An entry without its manifest (as a crash mid-write would leave in place) is not reused.
    manifest.unlink()
    again = prepare_benchmark(MME_CFG, data_root=str(root), cache_dir=str(c))
    assert again.include_path == task.include_path and manifest.is_file()
    assert json.loads(manifest.read_text())["num_samples"] == 6

    # Nor is one whose data files are gone.
    for arrow in (entry / "data" / "test").glob("*.arrow"):
        arrow.unlink()
    prepare_benchmark(MME_CFG, data_root=str(root), cache_dir=str(c))
    assert list((entry / "data" / "test").glob("*.arrow"))
    assert len(_load_rows(again)) == 6


def test_failed_build_leaves_nothing(tmp_path, monkeypatch):
    import datasets

    root = _mini_root(tmp_path, corrupt=False)
    c = tmp_path / "c"

    def boom(self, *a, **k):
        raise KeyboardInterrupt("simulated crash while writing")

    monkeypatch.setattr(datasets.DatasetDict, "save_to_disk", boom)
    with pytest.raises(KeyboardInterrupt):
        prepare_benchmark(MME_CFG, data_root=str(root), cache_dir=str(c))
    assert list((c / "tasks").iterdir()) == []
    monkeypatch.undo()
    assert prepare_benchmark(MME_CFG, data_root=str(root), cache_dir=str(c)).num_samples == 6


# ------------------------------------------------------------------------------------------- demo


def test_demo_task(demo_task, tmp_path):
    import numpy as np
    import skimage.data

    assert demo_task.benchmark == "demo" and demo_task.task_name == "apet_demo"
    assert demo_task.num_samples == 24 and demo_task.skipped == []
    assert demo_task.subtasks == ["existence", "count", "position", "color", "OCR"]
    assert "scikit-image" in demo_task.source
    ds = _load_rows(demo_task)
    by_qid = defaultdict(list)
    for r in ds.select_columns(["question_id", "answer", "category", "question"]).to_list():
        by_qid[r["question_id"]].append(r["answer"])
        assert r["question"].endswith("Please answer yes or no.")
    assert len(by_qid) == 12 and all(sorted(a) == ["No", "Yes"] for a in by_qid.values())
    first = next(r for r in ds if r["question_id"] == "existence/astronaut.png")
    assert np.array_equal(np.asarray(first["image"]), skimage.data.astronaut())  # lossless
    entry = Path(demo_task.include_path)
    stamps = {p: p.stat().st_mtime_ns for p in entry.rglob("*")}
    again = prepare_benchmark(
        DEMO_CFG, data_root="/ignored", cache_dir=str(Path(demo_task.include_path).parents[1])
    )
    assert again == demo_task
    assert {p: p.stat().st_mtime_ns for p in entry.rglob("*")} == stamps  # reused, not rewritten


# ------------------------------------------------------------------------------ lmms-eval end to end


def _stub_class():
    from lmms_eval.api.model import lmms

    class StubLMM(lmms):
        """Answers "Yes" to everything, or (oracle=True) the ground truth after decoding the visuals."""

        is_simple = True

        def __init__(self, oracle: bool = False):
            super().__init__()
            self.oracle = oracle
            self.prompts: list[str] = []

        def generate_until(self, requests):
            out = []
            for req in requests:
                ctx, _gen_kwargs, doc_to_visual, doc_id, task, split = req.args
                self.prompts.append(ctx)
                if not self.oracle:
                    out.append("Yes")
                    continue
                doc = self.task_dict[task][split][doc_id]
                visuals = doc_to_visual(doc)
                assert len(visuals) == 1 and visuals[0].mode == "RGB"
                out.append(doc["answer"])
            return out

        def loglikelihood(self, requests):
            raise NotImplementedError

        def generate_until_multi_round(self, requests):
            raise NotImplementedError

    return StubLMM


def _evaluate(model, tasks, task_manager):
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.utils import get_datetime_str

    return simple_evaluate(
        model=model,
        tasks=tasks,
        task_manager=task_manager,
        bootstrap_iters=0,
        log_samples=True,
        cli_args=None,
        datetime_str=get_datetime_str(),
    )


def test_lmms_eval_end_to_end(demo_task, tmp_path, monkeypatch, request):
    from lmms_eval.tasks import TaskManager, get_task_dict

    monkeypatch.chdir(tmp_path)  # anything lmms-eval writes relative to the CWD lands here
    include = [demo_task.include_path]
    tasks = [demo_task.task_name]
    mme_task = None
    if (SHARED / "mme").is_dir():
        mme_task = request.getfixturevalue("mme_task")
        include.append(mme_task.include_path)
        tasks.append(mme_task.task_name)

    tm = TaskManager(verbosity="WARNING", include_path=include)
    # Our names don't clash with built-ins (a built-in would win and point at its own YAML).
    for t in tasks:
        assert t in tm.all_tasks
        assert Path(tm.task_index[t]["yaml_path"]).parent == Path(
            demo_task.include_path if t == demo_task.task_name else mme_task.include_path
        )
    td = get_task_dict([demo_task.task_name], tm)
    assert len(td[demo_task.task_name].dataset["test"]) == 24

    StubLMM = _stub_class()
    stub = StubLMM()
    res = _evaluate(stub, tasks, tm)
    n_perc = len([c for c in demo_task.subtasks if c in MME_PERCEPTION])
    demo_res = res["results"][demo_task.task_name]
    # All "Yes": acc 50 and acc+ 0 in every category -> 50 per category.
    assert demo_res["mme_perception_score,none"] == pytest.approx(50.0 * n_perc) == 250.0
    assert "mme_cognition_score,none" not in demo_res  # no cognition subtask in the demo
    assert res["n-samples"][demo_task.task_name]["effective"] == 24
    assert len(res["samples"][demo_task.task_name]) == 24
    assert all(p.endswith("\nAnswer the question using a single word or phrase.") for p in stub.prompts)
    assert not any("Please answer yes or no" in p for p in stub.prompts)
    if mme_task is not None:
        m = res["results"][mme_task.task_name]
        assert m["mme_perception_score,none"] == pytest.approx(50.0 * 6)
        assert m["mme_cognition_score,none"] == pytest.approx(50.0 * 3)
        assert res["n-samples"][mme_task.task_name]["effective"] == 740

    # Oracle answers (after decoding every image through lmms-eval's doc_to_visual): 200 per category.
    res = _evaluate(StubLMM(oracle=True), [demo_task.task_name], tm)
    assert res["results"][demo_task.task_name]["mme_perception_score,none"] == pytest.approx(200.0 * n_perc)
