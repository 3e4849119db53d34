"""Shared fixtures: tiny random models for fast unit tests; the shared CIFAR-10 archive when present."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from resnext_demo import data, weights
from resnext_demo.model import ResNeXt, ResNeXtConfig

# Keep the suite on the CPU and deterministic, whatever the machine has; under pytest-xdist each worker gets
# its share of the cores (the servers the tests start run on one thread each).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1) // _WORKERS))

TINY = ResNeXtConfig(depths=(1, 1, 1), stem_width=8, widths=(16, 32, 64), cardinality=4, base_width=2)


@pytest.fixture
def tiny_config() -> ResNeXtConfig:
    """A 3-stage, 1-block-per-stage ResNeXt with C=4 groups: milliseconds per forward."""
    return TINY


def make_tiny_model() -> ResNeXt:
    """A seeded random tiny model in eval mode (BN statistics randomised so BN is not the identity, and
    the outputs depend on the input); a plain function for module-scoped fixtures too."""
    torch.manual_seed(0)
    m = ResNeXt(TINY)
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.2, 0.2)
            mod.running_var.uniform_(0.5, 1.5)
    return m.eval()


@pytest.fixture
def tiny_model() -> ResNeXt:
    """make_tiny_model(), fresh for each test."""
    return make_tiny_model()


@pytest.fixture
def x() -> torch.Tensor:
    """A smooth random normalized image (gradients are not pure noise)."""
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(3)
    return data.normalize(F.interpolate(torch.rand(1, 3, 8, 8, generator=gen), size=32, mode="bilinear"))


@pytest.fixture
def tiny_checkpoint(tmp_path: Path, tiny_model: ResNeXt) -> Path:
    """The tiny model saved as a checkpoint file."""
    return weights.save_checkpoint(tmp_path / "tiny.safetensors", tiny_model, {"accuracy": None})


def colour_classes(n_per_class: int = 24, k: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A learnable toy set: class c is a distinct colour plus noise."""
    g = torch.Generator().manual_seed(seed)
    palette = torch.randint(0, 256, (k, 3, 1, 1), generator=g).float()
    y = torch.arange(k).repeat_interleave(n_per_class)
    x = (palette[y] + 40 * torch.randn(len(y), 3, 32, 32, generator=g)).clamp(0, 255).to(torch.uint8)
    return x, y


def make_image_folder(root: Path, n_train: int, n_test: int = 1) -> Path:
    """A tiny image-folder CIFAR stand-in under `root` (no CIFAR data): per class, n_train training and n_test
    test PNGs whose mean colour depends on the class, so a model can learn something."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        for k, c in enumerate(data.CLASSES):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                a = np.clip(rng.normal(25 * k, 30, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(a).save(root / split / c / f"{i}.png")
    return root


@pytest.fixture(scope="session")
def cifar_source() -> str:
    """The CIFAR-10 source (shared archive or $RESNEXT_DEMO_DATA); skips when there is none."""
    src = data.default_source()
    if src is None or not Path(src).exists():
        pytest.skip("no CIFAR-10 source: ../shared/cifar10/cifar10-jpeg.tar.gz is absent and RESNEXT_DEMO_DATA is unset")
    return src


@pytest.fixture(scope="session")
def cifar_test(cifar_source: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole CIFAR-10 test split (uint8, classes interleaved so any prefix is balanced)."""
    return data.load_split(cifar_source, "test")


@pytest.fixture(scope="session")
def shipped_checkpoint() -> Path:
    """weights.DEFAULT_WEIGHTS; a missing one fails the tests that need it (it is part of the app)."""
    if not weights.DEFAULT_WEIGHTS.is_file():
        pytest.fail(f"no shipped checkpoint at {weights.DEFAULT_WEIGHTS}: the app ships one")
    return weights.DEFAULT_WEIGHTS


# The slow tier (`pytest -m "not slow"` skips it; CI and the README run everything): whatever needs a real
# server or browser, the whole CIFAR-10 archive, or the shipped checkpoint's own measurements. Marked here
# by the fixtures a test uses, so a new test of that kind lands in the right tier without remembering to.
SLOW_FIXTURES = {"server", "app_url", "space", "cifar_test", "cifar_source", "shipped_checkpoint", "shipped"}


def pytest_collection_modifyitems(config, items) -> None:
    """Mark every test that uses one of SLOW_FIXTURES as `slow`."""
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
