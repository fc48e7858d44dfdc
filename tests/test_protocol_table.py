"""docs/protocol.md is generated from the configs (apet_bench.protocol_table); these tests fail when the
checked-in page and the configs disagree, or when a benchmark of Tables 1-4 lacks a documented protocol."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from apet_bench.protocol import DOC_FIELDS, PROTOCOLS, ProtocolError, benchmark_label, resolve
from apet_bench.protocol_table import main, render, table_benchmarks

DOC = Path(__file__).resolve().parents[1] / "docs" / "protocol.md"


def test_checked_in_protocol_table_matches_the_configs():
    assert DOC.is_file(), "docs/protocol.md missing: python -m apet_bench.protocol_table > docs/protocol.md"
    assert DOC.read_text(encoding="utf-8") == render(), (
        "docs/protocol.md is out of date: regenerate it with `python -m apet_bench.protocol_table > docs/protocol.md`")
    assert main(["--check", str(DOC)]) == 0


def test_check_fails_on_a_stale_page(tmp_path, capsys):
    stale = tmp_path / "protocol.md"
    stale.write_text(render().replace("请直接回答选项字母。", "请直接使用所提供的选项字母作为答案回答。"), encoding="utf-8")
    assert main(["--check", str(stale)]) == 1
    assert "out of date" in capsys.readouterr().err


def test_every_table_benchmark_documents_both_protocols():
    benches = table_benchmarks()
    assert {"gqa", "mmbench_en", "mmbench_cn", "mme", "pope", "scienceqa_img", "vqav2", "textvqa", "vizwiz",
            "tgif_qa_judged", "msvd_qa", "msrvtt_qa"} <= set(benches)
    from apet_bench.config import config_dir

    for bench in benches:
        raw = yaml.safe_load((config_dir() / "benchmark" / f"{bench}.yaml").read_text())
        assert raw["protocol"] == "llava", bench  # the table experiments run the paper's protocol by default
        for p in PROTOCOLS:
            block = raw["protocols"][p]
            assert all(block.get(f) not in (None, "") for f in DOC_FIELDS), (bench, p)
        row = [line for line in render().splitlines() if line.startswith(f"| `{bench}` | **llava**")]
        assert len(row) == 1 and raw["protocols"]["llava"]["source"].split()[0] in row[0]


def test_protocol_resolution_and_run_names():
    cfg = {"name": "vizwiz", "submission": None, "protocols": {
        "llava": {"defaults": {"submission": True, "custom": "llava_text"}},
        "lmms_eval": {"defaults": {"submission": False}}}}
    assert resolve(cfg)["submission"] is True and resolve(cfg)["protocol"] == "llava"
    assert resolve({**cfg, "protocol": "lmms_eval"})["submission"] is False
    assert resolve({**cfg, "submission": False})["submission"] is False  # an explicit value wins
    assert benchmark_label(cfg) == "vizwiz"
    assert benchmark_label({**cfg, "protocol": "lmms_eval"}) == "vizwiz-protocol=lmms_eval"
    with pytest.raises(ProtocolError, match="benchmark.protocol 'official' is invalid"):
        resolve({**cfg, "protocol": "official"})
    assert resolve({"name": "demo"})["protocol"] == "lmms_eval"  # no protocols block: lmms-eval's functions


def test_documented_max_new_tokens_follow_the_decoding_configs():
    """The protocol table's max-new-tokens column says what the configs make the model do."""
    from apet_bench.config import compose
    from apet_bench.generation import config_gen_kwargs

    for path in sorted((Path(__file__).resolve().parents[1] / "configs" / "benchmark").glob("*.yaml")):
        blocks = yaml.safe_load(path.read_text()).get("protocols") or {}
        for protocol, block in blocks.items():
            doc = str(block.get("max_new_tokens") or "")
            if not doc or protocol != "llava":
                continue
            cfg = compose([f"benchmark={path.stem}", "model=llava15", f"benchmark.protocol={protocol}"])
            kwargs, _ = config_gen_kwargs(cfg)
            assert doc.split()[0] == str(kwargs.get("max_new_tokens")), (path.stem, protocol, doc, kwargs)


def test_lmms_eval_protocol_keeps_the_tasks_own_decoding():
    from apet_bench.config import compose
    from apet_bench.generation import config_gen_kwargs

    llava, _ = config_gen_kwargs(compose(["benchmark=mme", "model=llava15"]))
    stock, _ = config_gen_kwargs(compose(["benchmark=mme", "model=llava15", "benchmark.protocol=lmms_eval"]))
    assert llava.get("max_new_tokens") == 128 and "max_new_tokens" not in stock
