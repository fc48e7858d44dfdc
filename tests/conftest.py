"""Shared fixtures: a tiny random-weight LLaVA-1.5 (session-scoped) and small test images.

The hub is never contacted: ``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` are set at import, before
any test module imports transformers or huggingface_hub.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402

#: Model config of the tiny LLaVA-1.5 (as ``configs/model/tiny_llava15.yaml`` with seed 0).
TINY_LLAVA15_CFG: dict = {
    "name": "tiny_llava15",
    "family": "llava15",
    "tiny": True,
    "hf_id": None,
    "revision": None,
    "local_path": None,
    "dtype": "float32",
    "attn_implementation": "sdpa",
    "device": "cpu",
    "seed": 0,
    "visual_tokens": 576,
    "num_layers": 4,
    "tiny_config": {},
}


def make_image(seed: int, size: tuple[int, int] = (64, 48)):
    """A small random RGB ``PIL.Image`` (width x height ``size``), deterministic in ``seed``."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    return Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8"), mode="RGB")


@pytest.fixture
def tiny_llava15_cfg() -> dict:
    """A fresh copy of :data:`TINY_LLAVA15_CFG` to modify."""
    return {**TINY_LLAVA15_CFG, "tiny_config": dict(TINY_LLAVA15_CFG["tiny_config"])}


@pytest.fixture(scope="session")
def tiny_llava15():
    """A loaded tiny LLaVA-1.5 :class:`~apet_bench.models.ModelAdapter` (sdpa, fp32, CPU, seed 0).

    Shared by the whole session: do not leave hooks on it or change its weights.
    """
    from apet_bench.models import load_model

    return load_model(dict(TINY_LLAVA15_CFG))


@pytest.fixture(scope="session")
def images() -> list:
    """Three small, different random RGB images."""
    return [make_image(i) for i in range(3)]


@pytest.fixture(scope="session", autouse=True)
def _wandb_service_shut_down():
    """Stop the W&B service that in-process offline logging starts, at the end of the session and not in
    the interpreter's exit handlers (where its shutdown can wait on the service indefinitely)."""
    yield
    import sys

    wandb = sys.modules.get("wandb")
    if wandb is not None and hasattr(wandb, "teardown"):
        wandb.teardown()
