"""Results store: ``results/runs/<model>__<method>__<budget>__<benchmark>/``.

A run directory is written in a hidden staging directory (``runs/.tmp-<name>-<host>-<pid>-<token>/``)
and moved into place with one ``os.replace`` after its last file (``run.json``) is written, so a
directory under ``runs/`` that does not start with ``.`` is always complete. An interrupted run
leaves only a staging directory. It is removed later only when that is safe on a file system shared
by several hosts: by a process on the same host once the owning PID is gone, or by the process that
holds the run's lock (:meth:`RunStore.lock`, ``<results_dir>/.locks/<name>.lock``: no other process can be writing
that run then). Staging directories of other hosts are otherwise left alone. Aggregators read only
directories holding ``run.json``.

Layout of a finished run::

    run.json            status, run name, group choices, budget, headline metrics, wall time
    config.yaml         the resolved Hydra config
    metrics.json        lmms-eval metrics + token accounting summary + skipped samples
    samples.jsonl       one line per sample: answer, target, score, visual tokens entering the LLM, ms
    provenance.json     git sha, package versions, device, dtype, attention backend, weights
    lmms_eval/results.json   lmms-eval's own aggregated results (samples stripped)
"""

from __future__ import annotations

import json
import os
import platform
import re
import secrets
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from apet_bench.budget import budget_label

__all__ = ["RunStore", "RunWriter", "RunLockTimeout", "SampleStore", "collect_provenance", "run_name", "RUN_MARKER"]

RUN_MARKER = "run.json"
_STAGING_PREFIX = ".tmp-"
_TRASH_PREFIX = ".trash-"


class RunLockTimeout(TimeoutError):
    """Another process held a run's lock for longer than the caller was willing to wait."""


def _host_tag() -> str:
    """This host's name as used in staging directory names (``-`` and odd characters become ``_``)."""
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname() or "host")


def run_name(model: str, method: str, budget: int | float | None, benchmark: str) -> str:
    """Directory name of a run: ``<model>__<method>__<budget>__<benchmark>``.

    ``budget`` is written as given (``64``, ``0.1``); ``method=none`` uses ``full`` whatever the budget,
    since it compresses nothing.
    """
    label = "full" if method == "none" else budget_label(budget)
    for part, what in ((model, "model"), (method, "method"), (benchmark, "benchmark")):
        if not part or "/" in part or "__" in part:
            raise ValueError(f"{what} name {part!r} cannot be used in a run name")
    return f"{model}__{method}__{label}__{benchmark}"


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    return repr(obj)


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.part")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class SampleStore:
    """Answers of a run in progress, one JSON line per sample, appended and fsynced as each sample
    finishes, so a run killed after k samples resumes at sample k.

    Lives at ``<results_dir>/partial/<run name>-<identity hash>.jsonl`` (outside ``runs/``; keyed by the
    run's identity, so a request with other settings never reads it) and is deleted when the run commits.
    A torn last line (killed mid-write) is ignored.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._done: dict[str, dict[str, Any]] = {}
        if self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                    self._done[row["key"]] = row
                except (ValueError, KeyError, TypeError):
                    continue

    @staticmethod
    def _key(task: str, doc_id: Any) -> str:
        return f"{task}/{int(doc_id)}"

    def __len__(self) -> int:
        return len(self._done)

    def get(self, task: str, doc_id: Any) -> dict[str, Any] | None:
        """``{"answer", "record"}`` of a finished sample, or None."""
        return self._done.get(self._key(task, doc_id))

    def add(self, task: str, doc_id: Any, answer: str, record: Mapping[str, Any]) -> None:
        row = {"key": self._key(task, doc_id), "answer": answer, "record": dict(record)}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row, default=_json_default, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self._done[row["key"]] = row

    def remove(self) -> None:
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


class RunWriter:
    """Writes the files of one run into its staging directory (see :class:`RunStore`)."""

    def __init__(self, staging: Path) -> None:
        self.staging = staging

    def path(self, relpath: str) -> Path:
        p = self.staging / relpath
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def write_text(self, relpath: str, text: str) -> Path:
        p = self.path(relpath)
        _write_atomic(p, text)
        return p

    def write_json(self, relpath: str, obj: Any) -> Path:
        return self.write_text(relpath, json.dumps(obj, indent=2, default=_json_default, ensure_ascii=False) + "\n")

    def write_jsonl(self, relpath: str, rows: Iterable[Mapping[str, Any]]) -> Path:
        lines = [json.dumps(r, default=_json_default, ensure_ascii=False) for r in rows]
        return self.write_text(relpath, "\n".join(lines) + ("\n" if lines else ""))


@dataclass
class RunStore:
    """The ``runs/`` directory under a results root.

    Parameters
    ----------
    results_dir : str | Path
        The results root (``results/`` by default); runs live in ``<results_dir>/runs/``.
    """

    results_dir: Path

    def __post_init__(self) -> None:
        self.results_dir = Path(self.results_dir)
        self.runs_dir = self.results_dir / "runs"

    def run_dir(self, name: str) -> Path:
        return self.runs_dir / name

    def is_finished(self, name: str) -> bool:
        """True when ``runs/<name>/run.json`` exists and says ``status: complete``."""
        marker = self.run_dir(name) / RUN_MARKER
        if not marker.is_file():
            return False
        try:
            return json.loads(marker.read_text(encoding="utf-8")).get("status") == "complete"
        except (OSError, ValueError):
            return False

    def load(self, name: str) -> dict[str, Any]:
        """The ``run.json`` of a finished run. Raises ``FileNotFoundError`` when it is not finished."""
        if not self.is_finished(name):
            raise FileNotFoundError(f"run {name!r} is not finished under {self.runs_dir}")
        return json.loads((self.run_dir(name) / RUN_MARKER).read_text(encoding="utf-8"))

    def finished_runs(self) -> list[dict[str, Any]]:
        """``run.json`` of every finished run, sorted by name (staging directories are ignored)."""
        if not self.runs_dir.is_dir():
            return []
        out = []
        for d in sorted(self.runs_dir.iterdir()):
            if d.name.startswith(".") or not d.is_dir():
                continue
            if self.is_finished(d.name):
                out.append(self.load(d.name))
        return out

    def clean_stale(self, locked_name: str | None = None) -> list[Path]:
        """Remove staging/trash directories whose writer is certainly gone; returns them.

        A directory ``.tmp-<name>-<host>-<pid>-<token>`` is removed when ``<host>`` is this host and
        ``<pid>`` no longer runs here, or when ``<name>`` is ``locked_name``, the run whose lock
        (:meth:`lock`) the caller holds, so no other process on any host can be writing it. Another
        host's directory is never judged by its PID (PIDs are per host); names that do not parse
        (older layouts) are left alone.
        """
        removed: list[Path] = []
        if not self.runs_dir.is_dir():
            return removed
        me = _host_tag()
        for d in self.runs_dir.iterdir():
            prefix = next((p for p in (_STAGING_PREFIX, _TRASH_PREFIX) if d.name.startswith(p)), None)
            if prefix is None:
                continue
            parts = d.name[len(prefix):].rsplit("-", 3)
            if len(parts) != 4 or not parts[2].isdigit():
                continue
            name, host, pid = parts[0], parts[1], int(parts[2])
            own_lock = locked_name is not None and name == locked_name
            if not own_lock:
                if host != me or pid == os.getpid() or _pid_alive(pid):
                    continue
            elif host == me and pid == os.getpid():
                continue
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
        return removed

    def lock_path(self, name: str) -> Path:
        """``<results_dir>/.locks/<name>.lock`` (outside ``runs/``, which holds only runs)."""
        return self.results_dir / ".locks" / f"{name}.lock"

    @contextmanager
    def lock(self, name: str, *, timeout_s: float = -1, on_wait: Any = None) -> Iterator[None]:
        """Hold the lock of run ``name`` (:meth:`lock_path`, a ``filelock.FileLock``: POSIX
        ``flock``, which also works across hosts on NFS) while checking, evaluating and committing it.

        ``on_wait(message)`` is called once when another process holds it; ``timeout_s < 0`` waits
        as long as it takes. Raises :class:`RunLockTimeout` after ``timeout_s`` seconds, and
        ``PermissionError`` / ``OSError`` when ``runs/`` cannot be written.
        """
        from filelock import FileLock, Timeout

        self.lock_path(name).parent.mkdir(parents=True, exist_ok=True)
        lk = FileLock(str(self.lock_path(name)))
        try:
            lk.acquire(timeout=0)
        except Timeout:
            if on_wait is not None:
                on_wait(f"run {name!r} is being computed by another process; waiting for it to finish")
            try:
                lk.acquire(timeout=timeout_s)
            except Timeout as exc:
                raise RunLockTimeout(f"run {name!r} stayed locked by another process for {timeout_s} s") from exc
        try:
            yield
        finally:
            lk.release()

    @contextmanager
    def open_run(self, name: str, *, force: bool = False, locked: bool = False) -> Iterator[RunWriter]:
        """Stage a run; it becomes visible under ``runs/<name>`` only if the block finishes.

        The caller writes every file through the yielded :class:`RunWriter` and ``run.json`` last
        (with ``"status": "complete"``). On an exception the staging directory is deleted and the
        exception propagates; an existing finished run is replaced only when ``force`` is true.
        ``locked``: the caller holds :meth:`lock` for ``name`` (stale staging of that run on any host
        is then removed).

        Raises
        ------
        FileExistsError
            The run is finished and ``force`` is false.
        RuntimeError
            The block finished without writing ``run.json``.
        """
        if self.is_finished(name) and not force:
            raise FileExistsError(f"run {name!r} is already finished (use force=true to redo it)")
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self.clean_stale(locked_name=name if locked else None)
        staging = self.runs_dir / f"{_STAGING_PREFIX}{name}-{_host_tag()}-{os.getpid()}-{secrets.token_hex(3)}"
        staging.mkdir()
        try:
            yield RunWriter(staging)
            if not (staging / RUN_MARKER).is_file():
                raise RuntimeError(f"run {name!r} wrote no {RUN_MARKER}; not committing it")
            final = self.run_dir(name)
            trash = None
            if final.exists():
                trash = self.runs_dir / f"{_TRASH_PREFIX}{name}-{_host_tag()}-{os.getpid()}-{secrets.token_hex(3)}"
                os.replace(final, trash)
            os.replace(staging, final)
            if trash is not None:
                shutil.rmtree(trash, ignore_errors=True)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def collect_provenance(*, repo_dir: Path | None = None, adapter: Any = None) -> dict[str, Any]:
    """Where and how a run was produced.

    Returns a dict with the git sha (and whether the tree was dirty), package versions, Python and
    platform, the device (GPU name when on CUDA), and, when ``adapter`` is given, its dtype,
    attention backend (as read back from the loaded model) and weights description.
    """
    import torch

    repo_dir = Path(repo_dir or Path(__file__).resolve().parents[2])
    sha = _git(["rev-parse", "HEAD"], repo_dir)
    status = _git(["status", "--porcelain", "--untracked-files=no"], repo_dir)
    prov: dict[str, Any] = {
        "git_sha": sha,
        "git_dirty": bool(status) if status is not None else None,
        "packages": {
            d: _version(d)
            for d in ("apet-bench", "torch", "transformers", "lmms-eval", "hydra-core", "datasets", "accelerate",
                      "flash-attn", "wandb", "pandas")
        },
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cuda_available": torch.cuda.is_available(),
        "torch_num_threads": torch.get_num_threads(),
    }
    if adapter is not None:
        dev = getattr(adapter, "device", None)
        dev_str = str(dev)
        if dev is not None and getattr(dev, "type", None) == "cuda":
            dev_str = f"{dev} ({torch.cuda.get_device_name(dev)})"
        prov.update(
            device=dev_str,
            dtype=str(getattr(adapter, "dtype", None)).replace("torch.", ""),
            attn_implementation=getattr(adapter, "attn_implementation", None),
            weights=getattr(adapter, "weights", None),
            random_weights=bool(getattr(adapter, "is_random_weights", False)),
        )
    return prov
