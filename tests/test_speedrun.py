"""The fast recipe (resnext_demo.speedrun) and the airbench families: properties on tiny models and data."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from resnext_demo import data, speedrun, train, weights
from resnext_demo.model import AirbenchNet, Bottleneck, Downsample, PlainBlock, build_from_config, count_macs, count_params
from resnext_demo.zoo import AIRBENCH94, airbench_family, build_model, get_config
from resnext_demo.budget import airbench_x_widths, config_macs, config_params
from tests.conftest import make_image_folder

TINY_X = replace(AIRBENCH94, widths=(8, 16, 16), family="airbench_x", cardinality=2, base_width=2, group_widths=(2, 4, 4))


def _images(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random uint8 images whose mean colour depends on the label (learnable), balanced labels."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 10
    x = (torch.rand(n, 3, 32, 32, generator=g) * 80 + y.view(-1, 1, 1, 1) * 17).clamp(0, 255).to(torch.uint8)
    return x, y


def test_airbench94_is_the_public_net() -> None:
    """airbench94.py's net: 2x2 stem of 24 with a bias, widths 64/256/256, 1.97 M parameters, no fc bias."""
    m = build_model("airbench94")
    assert isinstance(m, AirbenchNet) and m.conv1.kernel_size == (2, 2) and m.conv1.bias is not None
    assert count_params(m) == 1_972_792 and count_macs(m) == config_macs(AIRBENCH94)
    assert m.fc.bias is None and [type(b) for b in m.layer2] == [Downsample, PlainBlock]
    assert isinstance(m.layer1[0].act, nn.GELU) and m(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert list(m.grouped_convs()) == ["layer1.1.conv2", "layer2.1.conv2", "layer3.1.conv2"]


def test_equal_budget_family_within_5_percent() -> None:
    """C = 1..32 at airbench94's parameters and MACs (each within 5 %, so within ~10 % of each other at worst;
    in fact within 1 %), every grouped 3x3 followed by a 1x1 that mixes all of its groups' channels."""
    fam = airbench_family()
    assert sorted(fam) == [1, 2, 4, 8, 16, 32]
    p0, m0 = config_params(AIRBENCH94), config_macs(AIRBENCH94)
    params = [config_params(get_config(n)) for n in fam.values()]
    macs = [config_macs(get_config(n)) for n in fam.values()]
    assert all(abs(p - p0) / p0 < 0.05 for p in params) and all(abs(m - m0) / m0 < 0.05 for m in macs)
    assert max(params) / min(params) < 1.05 and max(macs) / min(macs) < 1.05
    for c, name in fam.items():
        m = build_model(name)
        assert name.startswith(f"airbench94x_{c}x") and m.config.cardinality == c
        for conv_name, conv in m.grouped_convs().items():
            block = m.get_submodule(conv_name.rsplit(".", 1)[0])
            assert isinstance(block, Bottleneck) and conv.groups == c and block.conv3.groups == 1
            assert block.conv3.in_channels == conv.out_channels  # the 1x1 after it sees every group


def test_widths_come_from_the_search() -> None:
    """The table's d's are what airbench_x_widths finds (one C checked: the search builds ~25 configs)."""
    cfg = get_config(airbench_family()[8])
    assert airbench_x_widths(8) == (cfg.group_widths[0], cfg.group_widths[1])


def test_wide_pair_matches_its_own_dense_net() -> None:
    """The 1.5x-wide grouped net is the search's answer against the wide dense net, within 1 % of its budget
    (and not part of the airbench94-budget family the sweep and the Lab use)."""
    dense, grouped = get_config("airbench94_wide"), get_config("airbench94x_32x37d_wide")
    assert dense.widths == grouped.widths == (96, 384, 384) and grouped.cardinality == 32
    assert airbench_x_widths(32, dense) == (grouped.group_widths[0], grouped.group_widths[1])
    for f in (config_params, config_macs):
        assert abs(f(grouped) - f(dense)) / f(dense) < 0.01 and f(dense) > 2 * f(AIRBENCH94)
    assert "airbench94x_32x37d_wide" not in airbench_family().values()


def test_airbench_checkpoint_rebuilds_from_its_config(tmp_path: Path) -> None:
    torch.manual_seed(0)
    m = build_from_config(TINY_X).eval()
    x = torch.randn(2, 3, 32, 32)
    p = weights.save_checkpoint(tmp_path / "x.safetensors", m, {"accuracy": None})
    m2, meta = weights.load_checkpoint(p)
    assert meta["config"] == TINY_X and meta["config"].group_widths == (2, 4, 4)
    assert torch.allclose(m(x), m2(x), atol=1e-6)


def test_prepare_sets_the_recipe() -> None:
    """Whitened frozen stem, identity Downsample convs, bottlenecks untouched, BN momentum 0.6, BN scale 1 frozen."""
    torch.manual_seed(0)
    m = build_from_config(TINY_X)
    before = m.layer1[1].conv2.weight.clone()
    r = speedrun.FastRecipe()
    speedrun.prepare(m, _images(64)[0], r)
    assert not m.conv1.weight.requires_grad and m.conv1.bias.requires_grad
    w = m.layer2[0].conv.weight  # 8 -> 16: its first 8 filters pass their input channel through
    assert torch.equal(w[:8, :, 1, 1], torch.eye(8)) and w[:8].abs().sum() == 8
    assert torch.equal(m.layer1[1].conv2.weight, before)
    bns = [b for b in m.modules() if isinstance(b, nn.BatchNorm2d)]
    assert all(b.momentum == pytest.approx(0.4) and not b.weight.requires_grad and bool((b.weight == 1).all())
               for b in bns)
    opt = speedrun.optimizer(m, r)
    biases, others = opt.param_groups
    assert len(biases["params"]) == len(bns) and biases["lr"] == pytest.approx(64 * others["lr"])
    assert biases["lr"] * biases["weight_decay"] == pytest.approx(others["lr"] * others["weight_decay"])
    assert others["lr"] == pytest.approx(11.5 / (1024 * (1 + 1 / 0.15)))
    assert any(p is m.conv1.bias for p in others["params"]) and not any(p is m.conv1.weight for p in others["params"])


def test_lr_schedule_is_the_triangle() -> None:
    f = [speedrun.lr_factor(s, 1000) for s in range(1000)]
    assert f[0] == pytest.approx(0.2) and max(f) == pytest.approx(1.0) and int(np.argmax(f)) == 230
    assert speedrun.lr_factor(1000, 1000) == pytest.approx(0.07)


def test_alternating_flip_and_translation() -> None:
    """Epoch 1 shows every image mirrored relative to epoch 0; shifts stay within the padding; seeded."""
    x, y = _images(40)
    r = replace(speedrun.FastRecipe(), batch_size=40, translate=0, channels_last=False)
    b = speedrun.Batches(x, y, r, torch.device("cpu"))
    (x0, y0), (x1, y1) = next(b.epoch(0)), next(b.epoch(1))
    order0, order1 = [torch.randperm(40, generator=torch.Generator().manual_seed(e)) for e in (0, 1)]
    a, c = x0[torch.argsort(order0)], x1[torch.argsort(order1)]  # back in dataset order
    assert torch.allclose(a, c.flip(3), atol=1e-6)
    r2 = replace(r, translate=2)
    xb, _ = next(speedrun.Batches(x, y, r2, torch.device("cpu")).epoch(0))
    xb2, _ = next(speedrun.Batches(x, y, r2, torch.device("cpu")).epoch(0))
    assert xb.shape == (40, 3, 32, 32) and torch.equal(xb, xb2)


def test_steps_lower_the_loss() -> None:
    """The recipe's optimizer on one tiny batch: a few steps lower its summed, smoothed loss."""
    torch.manual_seed(0)
    m = build_from_config(TINY_X)
    x, y = _images(64)
    r = replace(speedrun.FastRecipe(), batch_size=64)
    speedrun.prepare(m, x, r)
    opt = speedrun.optimizer(m, r)
    xb = data.normalize(x)

    def loss() -> torch.Tensor:
        return F.cross_entropy(m(xb), y, label_smoothing=0.2, reduction="sum")
    first = loss().item()
    for _ in range(5):
        opt.zero_grad()
        loss().backward()
        opt.step()
    assert loss().item() < first


def test_tta_shapes_and_mirror_symmetry() -> None:
    torch.manual_seed(0)
    m = build_from_config(TINY_X).eval()
    x, _ = _images(12)
    for level in (0, 1, 2):
        plain, tta = speedrun.predict_views(m, x, level, torch.device("cpu"), batch_size=5)
        assert plain.shape == tta.shape == (12, 10) and plain.dtype == torch.float32
        if level == 0:
            assert torch.equal(plain, tta)
    _, t1 = speedrun.predict_views(m, x, 1, torch.device("cpu"))
    _, t1f = speedrun.predict_views(m, x.flip(3), 1, torch.device("cpu"))
    assert torch.allclose(t1, t1f, atol=1e-5)  # the mirror average cannot tell an image from its mirror


def test_fit_fast_events_and_result() -> None:
    torch.manual_seed(0)
    m = build_from_config(TINY_X)
    r = replace(speedrun.FastRecipe(), batch_size=32, epochs=1.5, ema_start_epochs=0, ema_every=1)
    out = speedrun.train_and_test(m, _images(64), _images(20, 1), r, "cpu")
    assert [h["epoch"] for h in out["history"]] == [1, 2] and out["history"][-1]["steps"] == 3
    assert out["pred"].dtype == torch.uint8 and out["pred"].shape == (20,) and 0 <= out["accuracy_tta"] <= 1


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A tiny image-folder CIFAR stand-in: 4 train and 1 test image per class (no CIFAR data)."""
    return make_image_folder(tmp_path_factory.mktemp("folder"), 4)


def test_train_cli_runs_the_fast_recipe(folder, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("RESNEXT_DEMO_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "fast.safetensors"
    train.main(["--recipe", "fast", "--model", "airbench94x_4x102d", "--data", str(folder), "--epochs", "1",
                "--batch-size", "20", "--device", "cpu", "--out", str(out), "--no-eval-every-epoch"])
    model, meta = weights.load_checkpoint(out)
    assert meta["recipe"]["recipe"] == "fast" and meta["recipe"]["model"] == "airbench94x_4x102d"
    assert meta["data"]["train_images"] == 40 and 0 <= meta["accuracy_tta"] <= 1 and meta["epochs"] == 1
    assert meta["config"] == get_config("airbench94x_4x102d") and len(meta["history"]) == 1
