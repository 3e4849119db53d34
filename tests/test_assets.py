"""Files shipped in resnext_demo/assets/: the default checkpoint's group specialization on the sample pack (the
sample pack itself is checked in test_data.py), and the command that rebuilds it."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from resnext_demo import assets, data, specialization, weights

REBUILD = "a new default checkpoint needs its shipped cache: python -m resnext_demo.assets specialization"


def _labelled(n: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return (torch.rand(n, 3, 32, 32, generator=gen) * 255).to(torch.uint8), torch.arange(n) % 10


@pytest.fixture
def fake_source(monkeypatch, tmp_path):
    """A 40-image 'test split' for the source 'src' (load_split calls are recorded); assets and cache in tmp."""
    calls = []
    images, labels = _labelled()
    monkeypatch.setattr(data, "load_split", lambda source, split: calls.append(split) or (images, labels))
    monkeypatch.setattr(data, "source_id", lambda source: "fake-source")
    monkeypatch.setattr(data, "ASSETS_DIR", tmp_path / "assets")
    monkeypatch.setenv("RESNEXT_DEMO_CACHE", str(tmp_path / "cache"))
    return calls


def test_a_shipped_cache_is_read_and_never_written(tiny_model, fake_source, tmp_path):
    shipped = specialization.specialization_cached(tiny_model, "src", n=40, cache=str(tmp_path / "assets"))
    assert fake_source == ["test", "train"]  # test images, and training images for the untrained control's BN
    again = specialization.specialization_cached(tiny_model, "src", n=40)  # no cache given: the data cache, then assets/
    assert fake_source == ["test", "train"] and not (tmp_path / "cache").exists()
    assert list(again) == list(shipped)
    assert all(np.array_equal(again[k].class_means, shipped[k].class_means) for k in shipped)
    specialization.specialization_cached(tiny_model, "src", n=40, rebuild=True)  # a rebuild goes to the data cache
    assert fake_source == ["test", "train"] * 2 and len(list((tmp_path / "cache" / "analysis").iterdir())) == 1
    assert len(list((tmp_path / "assets").iterdir())) == 1


def test_build_specialization_replaces_another_checkpoints_cache(tiny_checkpoint, fake_source, tmp_path):
    (tmp_path / "assets").mkdir()
    stale = tmp_path / "assets" / "groups-v2-0123456789abcdef-fake-source-n2000.safetensors"
    stale.write_bytes(b"an older checkpoint's")
    out = assets.build_specialization(tiny_checkpoint, "src")
    model, _ = weights.load_checkpoint(tiny_checkpoint)
    assert out.name == specialization.specialization_file(model, "src") and out.is_file() and not stale.exists()
    assert [p.name for p in (tmp_path / "assets").iterdir()] == [out.name]


def test_shipped_specialization_is_the_default_checkpoints(shipped_checkpoint, tmp_path, monkeypatch):
    """The cache in assets/ belongs to weights/default.safetensors (its name holds the weights' digest), is what
    the app reads for it (no data read, nothing computed) and matches a recomputation on the sample pack."""
    model, _ = weights.load_checkpoint(shipped_checkpoint)
    pack = str(data.SAMPLE_PACK)
    name = specialization.specialization_file(model, pack)
    assert [p.name for p in data.ASSETS_DIR.glob("groups-*.safetensors")] == [name], REBUILD
    monkeypatch.setenv("RESNEXT_DEMO_CACHE", str(tmp_path))
    real_load = data.load_split
    monkeypatch.setattr(data, "load_split", lambda *a, **k: pytest.fail("the shipped cache was not used"))
    spec = specialization.specialization_cached(model, pack)
    assert list(spec) == list(model.grouped_convs()) and not any(tmp_path.iterdir())
    x, y = real_load(pack, "test")
    fresh = specialization.group_specialization(model, x[:specialization.SPECIALIZATION_IMAGES], y[:specialization.SPECIALIZATION_IMAGES])
    for layer, s in fresh.items():
        for f in ("class_means", "selectivity", "mean", "colour", "blur"):
            assert np.allclose(getattr(spec[layer], f), getattr(s, f), rtol=1e-3, atol=1e-5), (layer, f, REBUILD)
