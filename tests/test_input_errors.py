"""Bad inputs on every model: one-line errors naming the problem (and, through lmms-eval, the sample)."""

from __future__ import annotations

import pytest
from conftest import make_image
from omegaconf import OmegaConf

from apet_bench.config import compose
from apet_bench.models import load_model
from apet_bench.pipeline import generate

MODELS = ["tiny_llava15", "tiny_llava_next", "tiny_qwen25vl", "tiny_video_llava"]
_CACHE: dict[str, object] = {}


def adapter_for(model: str):
    if model not in _CACHE:
        cfg = compose([f"model={model}"])
        _CACHE[model] = load_model(OmegaConf.to_container(cfg.model, resolve=True))
    return _CACHE[model]


def one_line(exc: BaseException) -> str:
    msg = str(exc)
    assert msg and "\n" not in msg, msg
    return msg


@pytest.mark.parametrize("model", MODELS)
def test_prompt_without_image_placeholder(model):
    adapter = adapter_for(model)
    with pytest.raises(ValueError) as ei:
        adapter.prepare_inputs([make_image(0)], "USER: what is this? ASSISTANT:")
    msg = one_line(ei.value)
    assert any(word in msg for word in ("placeholder", "<image>", "<|image_pad|>")), msg


@pytest.mark.parametrize("model", MODELS)
def test_image_smaller_than_one_patch(model):
    adapter = adapter_for(model)
    with pytest.raises(ValueError) as ei:
        generate(adapter, [make_image(0, (5, 5))], "What is this?", {"max_new_tokens": 2})
    assert "5x5" in one_line(ei.value)


@pytest.mark.parametrize("model", MODELS)
def test_errors_name_the_sample_through_lmms_eval(model):
    from lmms_eval.api.instance import Instance

    from apet_bench.eval.lmms_model import ApetBenchLMM
    from apet_bench.methods import build_method

    lmm = ApetBenchLMM(adapter=adapter_for(model), compressor=build_method("none"))
    lmm.task_dict = {"apet_mme_local": {"test": {7: {"img": make_image(0, (5, 5))}}}}
    req = Instance(request_type="generate_until", arguments=(
        "Is it red?", {"max_new_tokens": 2}, lambda doc: [doc["img"]], 7, "apet_mme_local", "test"),
        idx=0, metadata={"task": "apet_mme_local", "doc_id": 7, "repeats": 1})
    with pytest.raises(ValueError) as ei:
        lmm.generate_until([req])
    msg = one_line(ei.value)
    assert "apet_mme_local doc_id=7" in msg and "5x5" in msg


def test_undecodable_video_names_the_path_and_sample(tmp_path):
    from lmms_eval.api.instance import Instance

    from apet_bench.data.video import VideoDecodeError
    from apet_bench.eval.lmms_model import ApetBenchLMM
    from apet_bench.methods import build_method

    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video")
    adapter = adapter_for("tiny_video_llava")
    with pytest.raises(VideoDecodeError) as ei:
        generate(adapter, [str(bad)], "What happens?", {"max_new_tokens": 2})
    assert str(bad) in one_line(ei.value)
    lmm = ApetBenchLMM(adapter=adapter, compressor=build_method("none"))
    lmm.task_dict = {"apet_tgif_qa_local": {"test": {3: {"video": str(bad)}}}}
    req = Instance(request_type="generate_until", arguments=(
        "What happens?", {"max_new_tokens": 2}, lambda doc: [doc["video"]], 3, "apet_tgif_qa_local", "test"),
        idx=0, metadata={"task": "apet_tgif_qa_local", "doc_id": 3, "repeats": 1})
    with pytest.raises(ValueError) as ei:
        lmm.generate_until([req])
    msg = one_line(ei.value)
    assert "apet_tgif_qa_local doc_id=3" in msg and str(bad) in msg
