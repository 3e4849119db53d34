"""visualize.py: every renderer returns an RGB PIL image of the expected size and leaks no figure."""
from __future__ import annotations

import gc
import sys
import weakref

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image

from resnext_demo import charts, visualize
from resnext_demo.explain import Attribution, GroupStats, split_groups
from resnext_demo.faithfulness import Deletion
from resnext_demo.groups import GroupAblation, GroupImportance
from resnext_demo.specialization import Specialization
from resnext_demo.data import CLASSES
from resnext_demo.zoo import get_config


@pytest.fixture(autouse=True)
def no_leaked_figures(monkeypatch):
    """Every figure a test makes must be garbage once the image is returned (no pyplot, nothing kept)."""
    made = []

    class Tracked(Figure):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            made.append(weakref.ref(self))

    monkeypatch.setattr(visualize, "Figure", Tracked)
    yield
    gc.collect()
    assert all(r() is None for r in made), "a matplotlib figure is still alive"
    assert "matplotlib.pyplot" not in sys.modules or not sys.modules["matplotlib.pyplot"].get_fignums()


@pytest.fixture
def image32() -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))


def _attr(values, method="Saliency", note=None) -> Attribution:
    v = np.asarray(values, dtype=np.float32)
    return Attribution(v, float(v.min()), float(v.max()), method, 0, {"steps": 8}, note)


def _rgb(im, size=None):
    assert isinstance(im, Image.Image) and im.mode == "RGB"
    if size:
        assert im.size == size
    return np.asarray(im)


def test_upscale_is_nearest(image32):
    big = _rgb(visualize.upscale(image32, 224), (224, 224))
    small = np.asarray(image32)
    assert (big[::7, ::7] == small).all()  # every 7x7 block is one original pixel
    _rgb(visualize.upscale(np.asarray(image32) / 255.0, 64), (64, 64))  # float arrays too


@pytest.mark.parametrize("view", ["channels", "summary"])
@pytest.mark.parametrize("scale", ["channel", "group", "layer"])
def test_group_grid(view, scale):
    fmap = torch.randn(1, 8, 6, 6)
    fmap[0, 2] = 0  # a dead channel must not break per-channel normalisation
    im, text = visualize.group_grid(split_groups(fmap, 4), scale=scale, view=view)
    _rgb(im)
    assert "group 3" in text and f"{fmap.min().item():.4g}" in text and f"{fmap.max().item():.4g}" in text


def test_group_grid_caps_channels():
    im, text = visualize.group_grid(torch.randn(2, 40, 4, 4), max_channels=9)
    _rgb(im)
    assert "first 9 of 40" in text
    with pytest.raises(ValueError):
        visualize.group_grid(torch.randn(2, 4, 4, 4), scale="pixel")


def test_group_stats_figure():
    s = GroupStats(np.arange(8.0), np.arange(8.0) + 1, np.linspace(0, 1, 8), np.arange(8.0) * 2)
    _rgb(charts.group_stats_figure(s, title="layer1.0.conv2"))


@pytest.mark.parametrize("signed", [True, False])
def test_attribution_image(image32, signed):
    v = np.zeros((32, 32))
    v[:16] = 1.0
    v[16:, :8] = -0.5
    out = _rgb(visualize.attribution_image(_attr(v), image32, signed=signed, opacity=0.7, size=96), (96, 96))
    base = np.asarray(visualize.upscale(image32, 96))
    assert (out[60:, 40:] == base[60:, 40:]).all()  # zero attribution: the image shows through
    assert not (out[:40] == base[:40]).all()  # attributed pixels are tinted
    if signed:  # red for positive, blue for negative
        assert out[:40, :, 0].mean() > base[:40, :, 0].mean()
        assert out[60:, :20, 2].mean() > base[60:, :20, 2].mean()


def test_attribution_image_empty_map_is_just_the_image(image32):
    out = visualize.attribution_image(_attr(np.zeros((32, 32)), note="all zeros"), image32, size=64)
    assert (np.asarray(out) == np.asarray(visualize.upscale(image32, 64))).all()


def test_attribution_panels_one_row_per_map(image32):
    a, b = _attr(np.random.rand(32, 32)), _attr(np.zeros((32, 32)), "Grad-CAM", note="all zeros: …")
    one, two = visualize.attribution_panels([a], image32), _rgb(visualize.attribution_panels([a, b], image32, signed=False))
    assert two.shape[0] > 1.8 * one.size[1] and two.shape[1] == one.size[0]  # one row of panels per method


def test_a_one_signed_map_is_drawn_over_its_own_range(image32):
    """#28.4: a Grad-CAM-like map, every pixel between 0.1 and 0.2, is not a solid wash: its weakest pixels show the
    image untouched, its strongest are tinted; a two-signed map keeps a symmetric scale around 0."""
    v = np.tile(np.linspace(0.1, 0.2, 32), (32, 1))
    sc = visualize.map_scale(v)
    assert sc.sign == 1 and sc.lo == pytest.approx(0.1) and 0.19 < sc.hi <= 0.2
    out = np.asarray(visualize.overlay(v, image32, opacity=0.7, size=64), dtype=int)
    base = np.asarray(visualize.upscale(image32, 64), dtype=int)
    assert (out[:, :2] == base[:, :2]).all() and np.abs(out[:, -2:] - base[:, -2:]).mean() > 20
    two = visualize.map_scale(np.array([[-1.0, 0.5], [0.25, 2.0]]))
    assert two.sign == 0 and two.lo == 0
    assert visualize.map_scale(-v).sign == -1 and visualize.map_scale(-v, signed=False).sign == 1


def test_a_few_spikes_do_not_hide_the_rest_of_a_map(image32):
    """#28.4: like Captum's visualize_image_attr, the colours saturate at the 98th percentile of |value|, so an
    Integrated-Gradients-like map with one huge pixel still tints the others at the default opacity."""
    from resnext_demo.ui.attributions_tab import DEFAULT_OPACITY
    v = np.random.default_rng(0).uniform(0.5, 1.0, (32, 32))
    v[3, 3] = 100.0
    out = np.asarray(visualize.overlay(v, image32, opacity=DEFAULT_OPACITY, size=32), dtype=int)
    base = np.asarray(visualize.upscale(image32, 32), dtype=int)
    assert np.abs(out - base).sum(-1).mean() > 60  # with max-scaling: under 1 per pixel


def test_group_grid_draws_a_silent_group_empty_and_says_so():
    """#28.3: per-group colours stretched a group whose max is 7e-7 to a bright square; it is drawn grey."""
    g = np.zeros((2, 4, 6, 6))
    g[0] = np.random.default_rng(0).uniform(0, 1, (4, 6, 6))
    g[1, :, 2:4, 2:4] = 7e-7
    assert visualize.silent_groups(g).tolist() == [False, True]
    for scale in ("group", "channel", "layer"):
        im, text = visualize.group_grid(g, scale=scale)
        a = np.asarray(im, dtype=int)
        spread = a.max(-1) - a.min(-1)  # viridis is colourful; grey, white and the black title are not
        half = a.shape[1] // 2
        assert spread[:, :half].max() > 60 and spread[:, half:].max() < 30, scale
        assert "group 1: min 0, max 7e-07  (no signal" in text and "group 0: min" in text


@pytest.mark.parametrize("signed", [True, False])
def test_attribution_panels_are_large_and_coloured_by_sign(image32, signed):
    """image | map with colour bar | overlay, each panel >= 256 px wide; a signed map is drawn red where
    positive and blue where negative, an absolute one by |value| in a sequential map."""
    v = np.zeros((32, 32))
    v[:, :16], v[:, 16:] = 1.0, -1.0
    out = _rgb(visualize.attribution_panels([_attr(v)], image32, signed=signed))
    assert out.shape[1] >= 3 * 256 and out.shape[0] >= 256
    third = out.shape[1] // 3  # the map panel: its left half vs its right half (rows through the middle)
    mid = out[out.shape[0] // 2, third:2 * third].astype(int)
    reds = mid[:, 0] - mid[:, 2]
    left, right = reds[: len(reds) // 3], reds[len(reds) // 3: 2 * len(reds) // 3]
    if signed:
        assert (left > 100).sum() > 20 and (right < -100).sum() > 20  # red for, blue against
    else:
        assert not (right < -100).sum()  # no blue: |value| only


def test_curve_figure():
    hist = [{"epoch": i, "train_loss": 2 / i, "train_acc": 1 - 1 / i, "test_acc": None if i % 2 else 0.5}
            for i in range(1, 6)]
    _rgb(charts.curve_figure(hist))
    _rgb(charts.curve_figure([]))


def test_sweep_figure_labels_fit(monkeypatch):
    """#28.8: every point label sits inside the axes and no two overlap; the title clears the y label."""
    rows = [{"C": c, "d": 64 // c, "params_M": 1.9, "MFLOPs": 118.0, "top1_mean": 0.88 + 0.001 * i, "top1_ci95": 0.002,
             "seeds": [0, 1]} for i, c in enumerate((1, 2, 4, 8, 16, 32))]
    drawn, render = [], visualize.figure_to_image
    monkeypatch.setattr(charts, "figure_to_image", lambda fig, dpi=100: (drawn.append(fig), render(fig, dpi))[1])
    _rgb(charts.sweep_figure({"rows": rows}))
    renderer = drawn[0].canvas.get_renderer()
    ax = drawn[0].axes[0]
    boxes = [t.get_window_extent(renderer) for t in ax.texts]
    inside = ax.get_window_extent(renderer)
    assert len(boxes) == 6 and all(inside.x0 <= b.x0 and b.x1 <= inside.x1 and b.y0 >= inside.y0 for b in boxes)
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    assert not ax.title.get_window_extent(renderer).overlaps(ax.yaxis.label.get_window_extent(renderer))
    del ax, renderer
    drawn.clear()  # let the figure go (no_leaked_figures)


@pytest.mark.parametrize("name,stage", [("resnext29_8x4d_micro", 0), ("resnext29_32x4d", 2), ("resnext29_16x64d", 1)])
def test_block_diagram(name, stage):
    _rgb(charts.block_diagram(get_config(name), stage))
    with pytest.raises(ValueError):
        charts.block_diagram(get_config(name), 5)


@pytest.mark.parametrize("contrast,shortcut", [(None, None), (3, 0.7)])
def test_group_importance_figure(contrast, shortcut):
    gi = GroupImportance(np.array([0.5, -0.25, 0.0, 1.0]), 1.25, "Conductance", "layer1.0.conv2", 2, contrast, shortcut)
    _rgb(charts.group_importance_figure(gi, CLASSES))


def test_ablation_figure():
    base = np.full(10, 0.1)
    probs = np.tile(base, (8, 1))
    _rgb(charts.ablation_figure(GroupAblation(base, probs, 4, "zero"), CLASSES))


def test_group_cam_grid_shares_one_scale(image32):
    cams = np.zeros((3, 32, 32))
    cams[0, :8] = 1.0
    cams[1, :8] = 0.1  # same place, a tenth of the strength: must look fainter than group 0
    im = _rgb(visualize.group_cam_grid(cams, image32))
    assert im.shape[1] > im.shape[0]  # one row of panels (up to 4 per row)
    sixteen = _rgb(visualize.group_cam_grid(np.repeat(cams[:1], 16, 0), image32))
    assert sixteen.shape[0] > 3 * im.shape[0] * 0.8 and sixteen.shape[1] == im.shape[1]  # 4 x 4, same width
    assert sixteen.shape[1] / 4 >= 180  # panels large enough to read (~200 px each)
    # 32 groups in 8 columns: drawn hardly wider than 16 in 4, so shown at the same width its titles are as large
    many = _rgb(visualize.group_cam_grid(np.repeat(cams[:1], 32, 0), image32))
    assert many.shape[1] < 1.25 * sixteen.shape[1]
    strong = np.asarray(visualize.overlay(cams[0], image32, signed=False, vmax=1.0), dtype=float)
    weak = np.asarray(visualize.overlay(cams[1], image32, signed=False, vmax=1.0), dtype=float)
    plain = np.asarray(visualize.upscale(image32), dtype=float)
    assert np.abs(strong - plain).sum() > 3 * np.abs(weak - plain).sum() > 0


def test_deletion_figure():
    f = np.array([0.1, 0.2])
    d = Deletion(f, np.array([0.5, 0.2]), np.array([0.8, 0.7]), 0.9)
    _rgb(charts.deletion_figure({"Grad-CAM": d, "IG": d}))


@pytest.mark.parametrize("groups", [1, 8, 32])
def test_specialization_figure(groups):
    rng = np.random.default_rng(0)
    corr = np.eye(groups)
    s = Specialization("layer2.0.conv2", rng.random((groups, 10)), rng.random(groups), np.zeros((groups, 9), int),
                       rng.random((groups, 9)), corr, rng.random(groups), rng.random(groups), rng.random(groups),
                       0.2, 0.1, 0.05)
    _rgb(charts.specialization_figure(s, CLASSES))


def test_image_montage():
    imgs = np.random.default_rng(0).integers(0, 256, (3, 9, 3, 32, 32), dtype=np.uint8)
    im = _rgb(visualize.image_montage(imgs, ["group 0", "group 1", "group 2"], scale=2))
    assert im.shape[0] == 3 * (64 + 2)
    # The first picture of row 1 is pasted untouched (nearest upscaling).
    assert (im[66:130:2, 64:128:2] == imgs[1, 0].transpose(1, 2, 0)).all()


def test_group_grid_pixels_follow_the_layer_scale():
    """Layer scale: a group at the layer's max is drawn in the colormap's top colour, one at its min in the bottom."""
    from matplotlib import colormaps
    g = np.full((2, 1, 4, 4), 0.5)  # both groups carry signal; group 0 at the layer's min
    g[1] = 1.0
    im = np.asarray(visualize.group_grid(g, scale="layer", view="summary")[0]).reshape(-1, 3)
    colours = {tuple(c) for c in im}
    for v in (0.0, 1.0):
        want = tuple(int(x * 255 + 0.5) for x in colormaps["viridis"](v)[:3])
        assert want in colours, (v, want)


def test_finetune_curve_figure_two_axes_whole_epochs(monkeypatch):
    """Loss and accuracy on their own axes (accuracy in %), whole-epoch ticks, the held-out points marked."""
    rows = [{"epoch": 0.0, "series": "held-out accuracy", "value": 0.4}]
    for i in range(1, 21):
        rows += [{"epoch": i / 10, "series": "train loss", "value": 2 - i / 20},
                 {"epoch": i / 10, "series": "train accuracy", "value": 0.3 + i / 50}]
    rows.append({"epoch": 1.0, "series": "held-out accuracy", "value": 0.6})
    rows.append({"epoch": 2.0, "series": "held-out accuracy", "value": 0.7})
    _rgb(charts.finetune_curve_figure(rows))
    _rgb(charts.finetune_curve_figure([]))
    captured, real = {}, visualize.figure_to_image
    monkeypatch.setattr(charts, "figure_to_image", lambda fig, *a, **k: captured.setdefault("fig", fig) and real(fig))
    charts.finetune_curve_figure(rows)
    loss_ax, acc_ax = captured["fig"].axes
    assert loss_ax.get_xlim() == acc_ax.get_xlim() and loss_ax.get_xlim()[0] < 0  # #28.6: the same epochs, from 0
    assert acc_ax.get_ylim()[1] > 100  # a 100 % accuracy is drawn inside the frame, not on its top border
    assert [l.get_label() for l in loss_ax.lines] == ["train loss"]
    assert {l.get_label() for l in acc_ax.lines} == {"train accuracy", "held-out accuracy"}
    assert max(max(l.get_ydata()) for l in acc_ax.lines) == pytest.approx(70.0)  # percent
    ticks = [t for t in loss_ax.get_xticks() if 0 <= t <= 2]
    assert ticks and all(float(t).is_integer() for t in ticks)
    del loss_ax, acc_ax
    captured.clear()  # the leak check below wants every figure gone
