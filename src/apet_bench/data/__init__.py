"""Local lmms-eval tasks built from official benchmark release layouts (no Hugging Face hub needed).

``prepare_benchmark(bench_cfg, data_root=..., cache_dir=...)`` converts

* ``converter: mme``: the official MME release folders + the eval_tool ground truth
  (see :mod:`apet_bench.data.mme` for the layout and the rules), and
* ``converter: demo``: 12 real photographs bundled with scikit-image plus the MME-style yes/no
  pairs in ``demo_questions.yaml``,

into a ``datasets`` dataset and a task YAML that reuses lmms-eval's own MME functions
(``!function lmms_eval.tasks.mme.utils.*``), cached under ``<cache_dir>/tasks/``.

Example
-------
>>> task = prepare_benchmark({"name": "mme", "converter": "mme"},
...                          data_root="../shared/benchmarks", cache_dir="cache")  # doctest: +SKIP
>>> TaskManager(include_path=task.include_path)  # then tasks=[task.task_name]   # doctest: +SKIP
"""

from importlib import import_module
from typing import Any

#: Public names and the submodule defining each. They load on first use (PEP 562), so importing a leaf
#: such as ``apet_bench.data.video`` (which the Video-LLaVA adapter needs) loads nothing else.
_EXPORTS = {
    "DataError": "_core",
    "PreparedTask": "_core",
    "MME_SUBTASKS": "_core",
    "MME_PERCEPTION": "_core",
    "MME_COGNITION": "_core",
    "prepare_benchmark": "prepare",
}

__all__ = [
    "DataError",
    "PreparedTask",
    "prepare_benchmark",
    "MME_SUBTASKS",
    "MME_PERCEPTION",
    "MME_COGNITION",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
