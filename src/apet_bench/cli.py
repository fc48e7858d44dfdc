"""One error format for every command: ``apet-bench: error: <one line naming the bad value>`` on stderr,
exit code 2.

Used by ``run.py``, ``python -m apet_bench.sweep`` and the ``key=value`` commands (``score``, ``flops``,
``latency``, ``plots``, ``viz``, ``bias``, ``tables``). Hydra's own errors (an override of a key that does
not exist such as ``methd=apet``, a bad override syntax, an output directory that cannot be created)
are caught by :func:`run_hydra` and reported the same way instead of Hydra's multi-line report (Hydra
re-raises them when ``HYDRA_FULL_ERROR=1``, as ``hydra/_internal/utils.py::run_and_report`` does in
facebookresearch/hydra v1.3.2).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn

__all__ = ["PREFIX", "one_line", "error", "fail", "run_hydra"]

PREFIX = "apet-bench: error: "


def one_line(msg: Any) -> str:
    """``msg`` (a string or an exception) as one line: whitespace runs, newlines included, become one space;
    an exception without a message gives its type name."""
    if isinstance(msg, BaseException):
        text = str(msg.args[0]) if isinstance(msg, KeyError) and msg.args else str(msg)
        if isinstance(msg, OSError) and msg.strerror and msg.filename:
            text = f"cannot write or read {msg.filename}: {msg.strerror}"
        text = text or type(msg).__name__
    else:
        text = str(msg)
    return " ".join(text.split())


def error(msg: Any, code: int = 2) -> int:
    """Print ``apet-bench: error: <msg as one line>`` to stderr and return ``code`` (for ``main() -> int``)."""
    print(PREFIX + one_line(msg), file=sys.stderr, flush=True)
    return code


def fail(msg: Any, code: int = 2) -> NoReturn:
    """:func:`error`, then ``sys.exit(code)``."""
    sys.exit(error(msg, code))


def run_hydra(main: Callable[[], Any]) -> Any:
    """Call a ``@hydra.main`` function so that Hydra's own errors end as one line and exit 2.

    Caught: ``hydra.errors.HydraException`` (unknown key, bad override, missing config),
    ``omegaconf`` errors, and ``OSError`` raised while Hydra prepares the job (its output directory under
    ``results_dir`` cannot be created). Any other exception propagates with its traceback (a bug).
    """
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises instead of printing its multi-line report
    try:
        return main()
    except (HydraException, OmegaConfBaseException, OSError) as exc:
        msg = one_line(exc)
        cause = exc.__cause__
        if isinstance(cause, OmegaConfBaseException) and one_line(cause).split(" full_key:")[0] not in msg:
            msg = f"{msg} ({one_line(cause).split(' full_key:')[0]})"
        fail(msg)
