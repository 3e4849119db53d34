"""Fixtures of the tab tests: a synthetic image and the app context over the tiny model (no server)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from resnext_demo import data
from resnext_demo.ui.context import Context


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest on one thread (and do not fight a background job for both cores)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def image_path(tmp_path: Path) -> str:
    """A synthetic 48x40 image file (no CIFAR data)."""
    rng = np.random.default_rng(0)
    p = tmp_path / "synthetic.png"
    Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(p)
    return str(p)


@pytest.fixture
def ctx(tiny_model) -> Context:
    """The app context over the tiny model, no data source."""
    return Context(tiny_model, {"classes": list(data.CLASSES)}, None, "tiny.safetensors")
