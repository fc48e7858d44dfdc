"""Open-ended video QA judged by an LLM (Video-ChatGPT protocol: accuracy yes/no + score 0-5).

The protocol of Video-ChatGPT's ``quantitative_evaluation/evaluate_activitynet_qa.py`` (also used by
Video-LLaVA and the ApET paper for TGIF-QA / MSVD-QA / MSRVTT-QA, and by lmms-eval's
``activitynetqa/utils.py::get_eval``): for every (question, answer, prediction) the judge returns a
Python-dict string ``{'pred': 'yes'|'no', 'score': 0..5}``; accuracy = 100 x share of ``yes``,
score = mean score.

The judge is any OpenAI-compatible chat-completions endpoint (OpenAI, or vLLM / SGLang serving an open
model on 127.0.0.1), configured by :class:`JudgeConfig` (``model``, ``base_url``, ``api_key_env`` =
the *name* of the environment variable holding the key, ``timeout_s``, ``max_retries``), e.g. the
``judge:`` block of ``configs/benchmark/tgif_qa.yaml``.

Unlike lmms-eval (where a failed call silently becomes ``no`` / 0 after retries), a call that fails
(timeout, HTTP error, a reply that is not the expected dict) is **counted as a judge failure and left
out** of accuracy and score; :func:`judge_all` reports ``judged``, ``failed`` and the first errors.

Inside an lmms-eval task, :func:`videoqa_process_results` records (question, answer, prediction) and
the aggregations ``videoqa_aggregate_accuracy`` / ``_score`` / ``_failures`` judge them once (memoised)
with the config passed through the environment variable ``APET_BENCH_JUDGE`` (JSON; the runner sets
it from ``benchmark.judge``).
"""

from __future__ import annotations

import ast
import json
import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

log = logging.getLogger("apet_bench.judge")

__all__ = [
    "JudgeConfig", "JudgeError", "Verdict", "check_endpoint", "judge_one", "judge_all", "parse_verdict", "ENV_VAR",
    "videoqa_process_results", "videoqa_aggregate_accuracy", "videoqa_aggregate_score", "videoqa_aggregate_failures",
]

ENV_VAR = "APET_BENCH_JUDGE"

#: Video-ChatGPT's judge prompt (evaluate_activitynet_qa.py), as used by Video-LLaVA's evaluation.
SYSTEM_PROMPT = (
    "You are an intelligent chatbot designed for evaluating the correctness of generative outputs for "
    "question-answer pairs. Your task is to compare the predicted answer with the correct answer and determine "
    "if they match meaningfully. Here's how you can accomplish the task:\n------\n##INSTRUCTIONS: \n"
    "- Focus on the meaningful match between the predicted answer and the correct answer.\n"
    "- Consider synonyms or paraphrases as valid matches.\n"
    "- Evaluate the correctness of the prediction compared to the answer."
)
#: Video-LLaVA's own judge system prompt (videollava/eval/video/eval_video_qa.py @ a8404b9): the same
#: sentences joined without the line breaks around "------" and after "##INSTRUCTIONS:".
SYSTEM_PROMPT_VIDEO_LLAVA = (
    "You are an intelligent chatbot designed for evaluating the correctness of generative outputs for "
    "question-answer pairs. Your task is to compare the predicted answer with the correct answer and determine "
    "if they match meaningfully. Here's how you can accomplish the task:------##INSTRUCTIONS: "
    "- Focus on the meaningful match between the predicted answer and the correct answer.\n"
    "- Consider synonyms or paraphrases as valid matches.\n"
    "- Evaluate the correctness of the prediction compared to the answer."
)
SYSTEM_PROMPTS = {"video_chatgpt": SYSTEM_PROMPT, "video_llava": SYSTEM_PROMPT_VIDEO_LLAVA}
USER_PROMPT = (
    "Please evaluate the following video-based question-answer pair:\n\n"
    "Question: {question}\nCorrect Answer: {answer}\nPredicted Answer: {pred}\n\n"
    "Provide your evaluation only as a yes/no and score where the score is an integer value between 0 and 5, "
    "with 5 indicating the highest meaningful match. Please generate the response in the form of a Python "
    "dictionary string with keys 'pred' and 'score', where value of 'pred' is  a string of 'yes' or 'no' and "
    "value of 'score' is in INTEGER, not STRING.DO NOT PROVIDE ANY OTHER OUTPUT TEXT OR EXPLANATION. Only "
    "provide the Python dictionary string. For example, your response should look like this: "
    "{{'pred': 'yes', 'score': 4.8}}."
)


class JudgeError(ValueError):
    """A bad judge configuration (one line naming the value)."""


@dataclass
class JudgeConfig:
    """Where and how to call the judge.

    Attributes
    ----------
    model : str
        Served model name (e.g. ``gpt-3.5-turbo-0613`` as Video-LLaVA, or the name vLLM serves).
    base_url : str
        OpenAI-compatible base URL ending in ``/v1`` (``http://127.0.0.1:8000/v1``).
    api_key_env : str or None
        Name of the environment variable holding the key; a local server accepts any key
        (``"EMPTY"`` is sent when the variable is unset or None).
    timeout_s : float
        Per-call timeout in seconds.
    max_retries : int
        Retries of the OpenAI client per call (0 = one attempt).
    temperature : float or None
        0 for reproducible verdicts; None sends none (the endpoint's default, 1.0 on OpenAI), as
        Video-LLaVA's ``eval_video_qa.py`` does.
    prompt : {"video_chatgpt", "video_llava"}
        The system prompt: Video-ChatGPT's (line breaks kept) or Video-LLaVA's copy of it.
    """

    model: str = "gpt-3.5-turbo-0613"
    base_url: str = "http://127.0.0.1:8000/v1"
    api_key_env: str | None = "OPENAI_API_KEY"
    timeout_s: float = 60.0
    max_retries: int = 2
    temperature: float | None = 0.0
    prompt: str = "video_chatgpt"

    @classmethod
    def from_mapping(cls, m: Mapping[str, Any] | None) -> JudgeConfig:
        m = dict(m or {})
        unknown = sorted(set(m) - set(cls.__dataclass_fields__))
        if unknown:
            raise JudgeError(f"unknown judge option(s) {', '.join(unknown)} (known: {', '.join(cls.__dataclass_fields__)})")
        cfg = cls(**m)
        if not cfg.model or not cfg.base_url:
            raise JudgeError(f"judge needs model and base_url (got model={cfg.model!r}, base_url={cfg.base_url!r})")
        if cfg.prompt not in SYSTEM_PROMPTS:
            raise JudgeError(f"judge prompt {cfg.prompt!r} is invalid (use {' or '.join(SYSTEM_PROMPTS)})")
        if float(cfg.timeout_s) <= 0:
            raise JudgeError(f"judge timeout_s {cfg.timeout_s!r} must be > 0")
        return cfg

    def api_key(self) -> str:
        return (os.environ.get(self.api_key_env) if self.api_key_env else None) or "EMPTY"


def check_endpoint(cfg: JudgeConfig, timeout_s: float = 5.0) -> None:
    """Check that the judge's server accepts connections (a TCP connect to ``base_url``'s host and
    port, at most ``min(timeout_s, cfg.timeout_s)`` seconds), so a down judge is found before any
    answer is generated. Sends no request and no key.

    Raises
    ------
    JudgeError
        ``base_url`` has no host, or nothing accepts connections there (one line naming it).
    """
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(cfg.base_url)
    if not parts.hostname:
        raise JudgeError(f"judge base_url {cfg.base_url!r} has no host")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise JudgeError(f"judge base_url {cfg.base_url!r}: {exc}") from None
    try:
        with socket.create_connection((parts.hostname, port), timeout=min(float(timeout_s), float(cfg.timeout_s))):
            pass
    except OSError as exc:
        raise JudgeError(f"judge endpoint {cfg.base_url} is not reachable ({exc.strerror or exc}); start the judge "
                         f"server or set benchmark.judge.base_url") from None


@dataclass
class Verdict:
    """One judged answer: ``ok`` False means the call failed (``error`` says why) and it is not scored."""

    ok: bool
    pred: str | None = None  # "yes" | "no"
    score: float | None = None  # 0..5
    error: str | None = None
    raw: str | None = None


_DICT_RE = re.compile(r"\{.*\}", re.S)


def parse_verdict(text: str) -> Verdict:
    """Parse the judge's reply (a Python-dict or JSON string, possibly wrapped in prose or code fences)."""
    m = _DICT_RE.search(text or "")
    if not m:
        return Verdict(False, error=f"bad judge reply (no dict): {(text or '')[:80]!r}", raw=text)
    blob = m.group(0)
    data: Any = None
    for loader in (ast.literal_eval, json.loads):
        try:
            data = loader(blob)
            break
        except Exception:
            continue
    if not isinstance(data, dict):
        return Verdict(False, error=f"bad judge reply (not a dict): {blob[:80]!r}", raw=text)
    pred = str(data.get("pred", "")).strip().lower()
    try:
        score = float(data.get("score"))
    except (TypeError, ValueError):
        return Verdict(False, error=f"bad judge reply (score {data.get('score')!r})", raw=text)
    if pred not in ("yes", "no") or not 0 <= score <= 5:
        return Verdict(False, error=f"bad judge reply (pred {pred!r}, score {score})", raw=text)
    return Verdict(True, pred=pred, score=score, raw=text)


def _client(cfg: JudgeConfig):
    from openai import OpenAI

    return OpenAI(base_url=cfg.base_url, api_key=cfg.api_key(), timeout=float(cfg.timeout_s), max_retries=int(cfg.max_retries))


def judge_one(question: str, answer: str, pred: str, cfg: JudgeConfig, *, client: Any = None) -> Verdict:
    """Judge one prediction; never raises for call failures (they come back as ``Verdict(ok=False)``)."""
    client = client or _client(cfg)
    try:
        extra = {} if cfg.temperature is None else {"temperature": cfg.temperature}
        resp = client.chat.completions.create(
            model=cfg.model, **extra,
            messages=[{"role": "system", "content": SYSTEM_PROMPTS[cfg.prompt]},
                      {"role": "user", "content": USER_PROMPT.format(question=question, answer=answer, pred=pred)}],
        )
        text = resp.choices[0].message.content or ""
    except Exception as exc:  # timeout, connection refused, HTTP 5xx, malformed JSON body ...
        return Verdict(False, error=f"{type(exc).__name__}: {' '.join(str(exc).split())[:160]}")
    return parse_verdict(text)


@dataclass
class JudgeSummary:
    """Accuracy (% yes) and mean score over the answers the judge scored; failures counted apart."""

    accuracy: float | None
    score: float | None
    judged: int
    failed: int
    errors: list[str] = field(default_factory=list)
    config: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def judge_all(items: Iterable[Mapping[str, Any]], cfg: JudgeConfig, *, client: Any = None) -> tuple[JudgeSummary, list[Verdict]]:
    """Judge ``items`` (dicts with ``question``, ``answer``, ``pred``) one by one.

    Returns
    -------
    (JudgeSummary, list of Verdict)
        ``accuracy`` = 100 * yes / judged, ``score`` = mean score over judged (None when nothing was
        judged); ``failed`` counts calls that timed out or returned no valid verdict (left out).
    """
    client = client or _client(cfg)
    verdicts = [judge_one(str(it["question"]), str(it["answer"]), str(it["pred"]), cfg, client=client) for it in items]
    ok = [v for v in verdicts if v.ok]
    errors = [v.error for v in verdicts if not v.ok and v.error]
    summary = JudgeSummary(
        accuracy=100.0 * sum(v.pred == "yes" for v in ok) / len(ok) if ok else None,
        score=sum(float(v.score) for v in ok) / len(ok) if ok else None,
        judged=len(ok), failed=len(verdicts) - len(ok), errors=errors[:5],
        config={k: v for k, v in asdict(cfg).items()},
    )
    if summary.failed:
        log.warning("judge %s at %s: %d of %d calls failed (left out), e.g. %s", cfg.model, cfg.base_url,
                    summary.failed, len(verdicts), errors[:1])
    return summary, verdicts


# ------------------------------------------------------------------- lmms-eval task functions

_MEMO: dict[tuple, JudgeSummary] = {}
#: Per-answer verdicts of the aggregations run in this process, by :func:`_verdict_key`.
VERDICTS: dict[tuple, Verdict] = {}


def _env_config() -> JudgeConfig:
    raw = os.environ.get(ENV_VAR)
    if not raw:
        raise JudgeError(f"no judge configured: set benchmark.judge (the runner exports it as {ENV_VAR})")
    return JudgeConfig.from_mapping(json.loads(raw))


def videoqa_process_results(doc: Mapping[str, Any], results: Sequence[str]) -> dict[str, dict]:
    """Record (question, answer, prediction) for the judge aggregations (no call here)."""
    rec = {"question_id": doc.get("question_id"), "question": doc["question"], "answer": doc["answer"],
           "pred": str(results[0]).strip() if results else ""}
    return {"gpt_eval_accuracy": dict(rec), "gpt_eval_score": dict(rec), "judge_failures": dict(rec)}


def _summary(results: Sequence[Mapping[str, Any]]) -> JudgeSummary:
    cfg = _env_config()
    key = (json.dumps(asdict(cfg), sort_keys=True),
           tuple((r.get("question_id"), r["question"], r["answer"], r["pred"]) for r in results))
    if key not in _MEMO:
        _MEMO[key], verdicts = judge_all(results, cfg)
        VERDICTS.update({_verdict_key(r): v for r, v in zip(results, verdicts)})
    return _MEMO[key]


def _verdict_key(rec: Mapping[str, Any]) -> tuple:
    return (rec.get("question_id"), rec.get("question"), rec.get("answer"), rec.get("pred"))


def verdict_for(rec: Mapping[str, Any] | None) -> dict | None:
    """The judge's verdict for one per-sample record (``question_id``, ``question``, ``answer``,
    ``pred``) as ``{ok, pred, score, error, raw}`` (``raw``: the judge's reply), or None when it was not
    judged in this process (the runner copies it into the sample's ``samples.jsonl`` row as ``judge``)."""
    if not isinstance(rec, Mapping):
        return None
    v = VERDICTS.get(_verdict_key(rec))
    return None if v is None else asdict(v)


def videoqa_aggregate_accuracy(results: Sequence[Mapping[str, Any]]) -> float:
    """Judge accuracy in percent over the answers judged (NaN when every call failed)."""
    s = _summary(results)
    return float("nan") if s.accuracy is None else s.accuracy


def videoqa_aggregate_score(results: Sequence[Mapping[str, Any]]) -> float:
    """Mean judge score 0-5 over the answers judged (NaN when every call failed)."""
    s = _summary(results)
    return float("nan") if s.score is None else s.score


def videoqa_aggregate_failures(results: Sequence[Mapping[str, Any]]) -> float:
    """Number of judge calls that failed (timeout / bad reply); those answers are not scored."""
    return float(_summary(results).failed)
