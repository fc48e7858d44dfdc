"""Data-parallel evaluation of one run over several processes (``torchrun --nproc_per_node N run.py ...``).

Every process runs the same Hydra job; lmms-eval's evaluator (``lmms_eval/evaluator.py``, 0.7.3, its
``torchrun`` executor) gives rank *r* every *N*-th document, gathers the logged samples and per-sample
metrics to rank 0 and aggregates there. This module supplies the pieces around it: the rank and world
size from the launcher's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, set by ``torchrun`` and
by ``accelerate launch``), one process group (``nccl`` when the model runs on CUDA, else ``gloo``), and
the gather of the harness's own per-sample records to rank 0, which alone writes the run directory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

__all__ = ["World", "world", "init_process_group", "gather_to_rank0", "broadcast_from_rank0", "barrier"]


@dataclass(frozen=True)
class World:
    """This process's place in a data-parallel run: ``rank`` in ``[0, size)``, ``local_rank`` on its node."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value in (None, ""):
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def world() -> World:
    """The rank, world size and local rank from ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` (defaults 0, 1, 0).

    Raises
    ------
    ValueError
        A non-integer value, ``WORLD_SIZE`` < 1, or ``RANK`` outside ``[0, WORLD_SIZE)``.
    """
    size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", rank if size > 1 else 0)
    if size < 1 or not 0 <= rank < size:
        raise ValueError(f"RANK={rank} / WORLD_SIZE={size} is invalid (need 0 <= RANK < WORLD_SIZE)")
    return World(rank=rank, size=size, local_rank=local)


def init_process_group(device_type: str) -> World:
    """Join the launcher's process group once (``env://``: ``MASTER_ADDR``/``MASTER_PORT`` from the launcher).

    ``device_type`` is where the model runs (``cpu`` | ``cuda``): ``nccl`` for CUDA (with
    ``torch.cuda.set_device(LOCAL_RANK)``), ``gloo`` for CPU. A single process (``WORLD_SIZE`` 1) or an
    already initialised group is left as is. Returns :func:`world`.

    Raises
    ------
    ValueError
        ``WORLD_SIZE`` > 1 without ``MASTER_ADDR``/``MASTER_PORT`` (not started by a launcher).
    """
    import torch
    import torch.distributed as dist

    w = world()
    if not w.distributed or dist.is_initialized():
        return w
    if not (os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT")):
        raise ValueError(f"WORLD_SIZE={w.size} but MASTER_ADDR/MASTER_PORT are unset: start the processes with "
                         f"torchrun --nproc_per_node {w.size} run.py ...")
    if device_type == "cuda":
        torch.cuda.set_device(w.local_rank)
        dist.init_process_group(backend="nccl")
    else:
        dist.init_process_group(backend="gloo")
    return w


def gather_to_rank0(obj: Any) -> list[Any] | None:
    """Every rank's ``obj`` in rank order on rank 0 (``torch.distributed.gather_object``), None elsewhere;
    ``[obj]`` in a single process."""
    import torch.distributed as dist

    w = world()
    if not (w.distributed and dist.is_initialized()):
        return [obj]
    out = [None] * w.size if w.main else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_from_rank0(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (``torch.distributed.broadcast_object_list``); ``obj`` in a single process."""
    import torch.distributed as dist

    w = world()
    if not (w.distributed and dist.is_initialized()):
        return obj
    box = [obj if w.main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    import torch.distributed as dist

    if world().distributed and dist.is_initialized():
        dist.barrier()
