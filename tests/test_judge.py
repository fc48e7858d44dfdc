"""The video-QA judge against stub OpenAI-compatible servers on 127.0.0.1 (stdlib http.server in a thread):
fixed verdicts give the expected accuracy and score; a timeout or a bad reply is counted as a failure
and left out, never scored as wrong."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from apet_bench.judge import (
    ENV_VAR,
    JudgeConfig,
    JudgeError,
    judge_all,
    parse_verdict,
    videoqa_aggregate_accuracy,
    videoqa_aggregate_failures,
    videoqa_aggregate_score,
    videoqa_process_results,
)


def _serve(reply_for):
    """Start a stub chat-completions server; ``reply_for(user_prompt) -> str | None`` (None = hang)."""
    seen: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):  # quiet
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
            content = reply_for(body["messages"][-1]["content"])
            if content is None:
                time.sleep(3)  # longer than the client timeout
                return
            out = json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                              "choices": [{"index": 0, "finish_reason": "stop",
                                           "message": {"role": "assistant", "content": content}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, seen


@pytest.fixture
def stub():
    servers = []

    def start(reply_for):
        srv, seen = _serve(reply_for)
        servers.append(srv)
        cfg = JudgeConfig(model="stub-judge", base_url=f"http://127.0.0.1:{srv.server_address[1]}/v1",
                          api_key_env="APET_TEST_JUDGE_KEY", timeout_s=1.0, max_retries=0)
        return cfg, seen

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


ITEMS = [
    {"question": "what is the cat doing?", "answer": "sleeping", "pred": "sleeping"},
    {"question": "how many dogs?", "answer": "2", "pred": "3"},
    {"question": "what color is the car?", "answer": "red", "pred": "dark red"},
    {"question": "who is running?", "answer": "man", "pred": "a woman"},
]
VERDICTS = {  # keyed by the predicted answer in the prompt
    "sleeping": "{'pred': 'yes', 'score': 5}",
    "3": "{'pred': 'no', 'score': 1}",
    "dark red": 'Sure: {"pred": "yes", "score": 4}',
    "a woman": "{'pred': 'no', 'score': 0}",
}


def _by_pred(prompt: str) -> str | None:
    pred = prompt.split("Predicted Answer: ")[1].split("\n")[0]
    return VERDICTS[pred]


def test_fixed_verdicts_give_expected_accuracy_and_score(stub, monkeypatch):
    monkeypatch.setenv("APET_TEST_JUDGE_KEY", "sk-local")
    cfg, seen = stub(_by_pred)
    summary, verdicts = judge_all(ITEMS, cfg)
    assert summary.judged == 4 and summary.failed == 0
    assert summary.accuracy == pytest.approx(50.0)  # 2 yes of 4
    assert summary.score == pytest.approx((5 + 1 + 4 + 0) / 4)
    assert [v.pred for v in verdicts] == ["yes", "no", "yes", "no"]
    assert seen[0]["path"] == "/v1/chat/completions" and seen[0]["body"]["model"] == "stub-judge"
    assert seen[0]["auth"] == "Bearer sk-local"  # key read from the named environment variable
    assert "Correct Answer: sleeping" in seen[0]["body"]["messages"][-1]["content"]


def test_timeout_and_bad_reply_are_failures_not_wrong(stub):
    def reply(prompt):
        pred = prompt.split("Predicted Answer: ")[1].split("\n")[0]
        if pred == "3":
            return None  # hangs past the 1 s timeout
        if pred == "a woman":
            return "I think it is wrong."  # no verdict dict
        return VERDICTS[pred]

    cfg, _ = stub(reply)
    summary, verdicts = judge_all(ITEMS, cfg)
    assert summary.failed == 2 and summary.judged == 2
    assert summary.accuracy == pytest.approx(100.0)  # the two judged answers are both "yes"
    assert summary.score == pytest.approx(4.5)
    assert any("Timeout" in e for e in summary.errors)
    assert any("bad judge reply" in e for e in summary.errors)
    assert verdicts[1].ok is False and verdicts[1].pred is None


def test_lmms_eval_aggregations_through_env(stub, monkeypatch):
    cfg, seen = stub(_by_pred)
    monkeypatch.setenv(ENV_VAR, json.dumps({"model": cfg.model, "base_url": cfg.base_url, "api_key_env": None,
                                            "timeout_s": 1.0, "max_retries": 0}))
    recs = [videoqa_process_results({"question_id": f"q{i}", **it}, [it["pred"]]) for i, it in enumerate(ITEMS)]
    acc = videoqa_aggregate_accuracy([r["gpt_eval_accuracy"] for r in recs])
    score = videoqa_aggregate_score([r["gpt_eval_score"] for r in recs])
    fails = videoqa_aggregate_failures([r["judge_failures"] for r in recs])
    assert (acc, score, fails) == (pytest.approx(50.0), pytest.approx(2.5), 0.0)
    assert len(seen) == 4  # judged once, memoised across the three aggregations
    from apet_bench.judge import verdict_for

    assert verdict_for(recs[1]["gpt_eval_score"]) == {"ok": True, "pred": "no", "score": 1.0, "error": None,
                                                      "raw": "{'pred': 'no', 'score': 1}"}
    assert verdict_for({**recs[1]["gpt_eval_score"], "pred": "4"}) is None  # another answer: not judged


def test_parse_and_config_errors():
    assert parse_verdict("{'pred': 'Yes', 'score': 4.8}").score == pytest.approx(4.8)
    assert not parse_verdict("{'pred': 'maybe', 'score': 3}").ok
    assert not parse_verdict("{'pred': 'yes', 'score': 9}").ok
    with pytest.raises(JudgeError, match="unknown judge option"):
        JudgeConfig.from_mapping({"model": "m", "url": "x"})
    with pytest.raises(JudgeError, match="timeout_s"):
        JudgeConfig.from_mapping({"model": "m", "base_url": "http://x/v1", "timeout_s": 0})


SHARED = __import__("pathlib").Path(__import__("os").environ.get(
    "APET_BENCH_TEST_DATA_ROOT", __import__("pathlib").Path(__file__).resolve().parents[2] / "shared" / "benchmarks"))


@pytest.mark.skipif(not (SHARED / "tgif_qa").is_dir(), reason=f"no TGIF-QA data at {SHARED}")
def test_judged_tgif_end_to_end_through_runner(stub, tmp_path):
    """tiny Video-LLaVA answers 2 TGIF-QA questions; lmms-eval's aggregation calls the stub judge, which
    says yes/4 to the first question it sees and times out on the other: 1 judged, 1 failure."""
    from apet_bench.config import compose
    from apet_bench.runner import execute

    state = {"n": 0}

    def reply(prompt):
        state["n"] += 1
        return "{'pred': 'yes', 'score': 4}" if state["n"] == 1 else None

    cfg, seen = stub(reply)
    run_cfg = compose(["model=tiny_video_llava", "method=none", "benchmark=tgif_qa_judged", f"data_root={SHARED}",
                       "limit=2", f"results_dir={tmp_path / 'results'}", f"cache_dir={tmp_path / 'cache'}",
                       f"benchmark.judge.base_url={cfg.base_url}", "benchmark.judge.model=stub-judge",
                       "benchmark.judge.timeout_s=1", "benchmark.judge.max_retries=0"])
    out = execute(run_cfg)
    m = out.summary["metrics"]
    assert m["gpt_eval_accuracy"] == pytest.approx(100.0) and m["gpt_eval_score"] == pytest.approx(4.0)
    assert m["judge_failures"] == 1  # counted, not scored as wrong
    assert len(seen) == 2  # each answer judged once across the three aggregations
    # The paper's protocol: Video-LLaVA's judge prompt, no temperature sent (the endpoint's default sampling).
    from apet_bench.judge import SYSTEM_PROMPT_VIDEO_LLAVA

    assert seen[0]["body"]["messages"][0]["content"] == SYSTEM_PROMPT_VIDEO_LLAVA
    assert "temperature" not in seen[0]["body"]
    rows = [json.loads(x) for x in (Path(out.run_dir) / "samples.jsonl").read_text().splitlines()]
    assert sorted((r["judge"]["ok"], r["judge"]["pred"]) for r in rows) == [(False, None), (True, "yes")]
    assert all(r["sample_id"].startswith("FRAMEQA") for r in rows)  # FrameQA only
    from apet_bench.stats import load_units

    assert load_units(out.run_dir, "gpt_eval_score").point == pytest.approx(4.0)  # failures left out, as lmms-eval
