"""Drawing maps: feature maps, attributions, group Grad-CAMs and image montages -> PIL images (charts.py draws
the plots). Never touches a model.

Figures are made with matplotlib's object API (no pyplot state, safe across threads/users) and
closed by rendering them straight to an image.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from PIL import Image


if TYPE_CHECKING:  # type hints only: importing these would pull in captum
    from .explain import Attribution


def figure_to_image(fig: Figure, dpi: int = 100) -> Image.Image:
    """Render a matplotlib figure to an RGB PIL image (the figure is discarded).

    Straight from the Agg canvas: no PNG encode/decode and no second 'tight' layout draw (each figure
    sets its own margins), about 40 % less per figure on a 2-core CPU."""
    fig.set_dpi(dpi)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3].copy())


# ---------------------------------------------------------------- images the model sees


def upscale(im32: Image.Image | np.ndarray, size: int = 224) -> Image.Image:
    """Enlarge a small image with nearest-neighbour, so every one of the model's 32x32 pixels stays visible."""
    if isinstance(im32, np.ndarray):
        a = im32
        if a.dtype != np.uint8:  # float images in 0..1
            a = (np.clip(a, 0, 1) * 255 + 0.5).astype(np.uint8)
        im32 = Image.fromarray(a)
    return im32.convert("RGB").resize((size, size), Image.Resampling.NEAREST)


# ---------------------------------------------------------------- feature maps per group


def _unit(a: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Map [lo, hi] to [0, 1]; a constant map becomes 0 (e.g. a dead ReLU channel shows as the darkest colour)."""
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)


def _tiles(maps: np.ndarray, gap: float = np.nan) -> np.ndarray:
    """n x H x W -> one mosaic, ceil(sqrt(n)) tiles wide, with 1-pixel NaN gaps (drawn as background)."""
    n, h, w = maps.shape
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    out = np.full((rows * (h + 1) - 1, cols * (w + 1) - 1), gap, dtype=np.float64)
    for i, m in enumerate(maps):
        r, c = divmod(i, cols)
        out[r * (h + 1):r * (h + 1) + h, c * (w + 1):c * (w + 1) + w] = m
    return out


def _panel_mosaic(panels: list[np.ndarray], titles: list[str], panel: int = 150, title_h: int = 18,
                  gap: int = 10) -> Image.Image:
    """RGB panels (h x w x 3 floats in 0..1) scaled by an integer factor to fit `panel` pixels, titled,
    on a white grid ceil(sqrt(n)) panels wide."""
    from PIL import ImageDraw, ImageFont
    font = ImageFont.load_default(size=title_h - 3)  # Pillow's scalable default: titles readable at ~0.8x
    n = len(panels)
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    cell_w, cell_h = panel + gap, panel + title_h + gap
    out = Image.new("RGB", (cols * cell_w + gap, rows * cell_h + gap), "white")
    draw = ImageDraw.Draw(out)
    for i, (rgb, title) in enumerate(zip(panels, titles)):
        r, c = divmod(i, cols)
        k = max(1, panel // max(rgb.shape[:2]))  # integer nearest-neighbour zoom keeps every unit visible
        tile = Image.fromarray((np.clip(rgb, 0, 1) * 255 + 0.5).astype(np.uint8))
        tile = tile.resize((rgb.shape[1] * k, rgb.shape[0] * k), Image.Resampling.NEAREST)
        x0, y0 = gap + c * cell_w, gap + r * cell_h
        draw.text((x0 + panel // 2, y0), title, fill="black", anchor="mt", font=font)
        out.paste(tile, (x0 + (panel - tile.width) // 2, y0 + title_h + (panel - tile.height) // 2))
    return out


NO_SIGNAL = 0.01  # a group whose peak |value| is under 1 % of the layer's peak adds ~nothing to the next layer


def silent_groups(groups: np.ndarray) -> np.ndarray:
    """Which groups (G x ...) have no signal: peak |value| under NO_SIGNAL of the layer's peak (all, if it is 0).

    Relative, not absolute: per-group colour scales would otherwise stretch a 7e-7 maximum to the brightest colour."""
    peaks = np.abs(groups.reshape(len(groups), -1)).max(1)
    return peaks <= NO_SIGNAL * peaks.max()


def _scaled(grp: np.ndarray, scale: str, lo_all: float, hi_all: float, floor: float) -> np.ndarray:
    """One group's maps in 0..1 on the chosen colour scale; a channel whose range is under `floor` is flat (0)."""
    if scale == "channel":
        return np.stack([_unit(c, c.min(), c.max()) if c.max() - c.min() > floor else np.zeros_like(c) for c in grp])
    if scale == "group":
        return _unit(grp, grp.min(), grp.max())
    return _unit(grp, lo_all, hi_all)


def group_grid(groups: torch.Tensor | np.ndarray, scale: str = "group", view: str = "channels",
               max_channels: int = 16) -> tuple[Image.Image, str]:
    """One labelled panel per group (tiles of its channels, or their mean for view='summary'); returns (image, ranges text).

    scale: 'channel' normalises each channel alone (shows patterns, hides strength), 'group' shares one
    colour scale within a group, 'layer' one scale for everything (groups' strengths comparable). Each panel's
    title gives its peak |value|; a group without signal (`silent_groups`) is drawn as empty grey tiles.
    """
    if scale not in ("channel", "group", "layer"):
        raise ValueError(f"scale must be 'channel', 'group' or 'layer', not {scale!r}")
    if view not in ("channels", "summary"):
        raise ValueError(f"view must be 'channels' or 'summary', not {view!r}")
    g = np.asarray(groups.detach().float().cpu() if isinstance(groups, torch.Tensor) else groups,
                   dtype=np.float64)  # G x w x H x W
    n_groups, width = g.shape[:2]
    shown = g.mean(1, keepdims=True) if view == "summary" else g[:, :max_channels]
    lo_all, hi_all = float(g.min()), float(g.max())
    silent = silent_groups(g)
    floor = NO_SIGNAL * float(np.abs(g).max())
    # Drawn with numpy + PIL (matplotlib's colormap only): a figure with one axes per group cost ~200 ms
    # per view on a 2-core CPU, mostly layout and PNG encoding, for what is a mosaic of pixels.
    cmap = colormaps["viridis"].with_extremes(bad="white")  # NaN gaps between tiles -> white
    panels = []
    for grp, dead in zip(shown, silent):  # normalise in numpy, then colour: ranges stay honest whatever the scale
        tiles = _tiles(_scaled(grp, scale, lo_all, hi_all, floor))
        rgb = cmap(np.ma.masked_invalid(tiles))[..., :3]
        if dead:  # light grey, outside viridis: "nothing here", never its brightest colour
            rgb[~np.isnan(tiles)] = 0.9
        panels.append(rgb)
    peaks = np.abs(g.reshape(n_groups, -1)).max(1)
    titles = [f"g{i} · no signal ({peak:.1g})" if dead else f"g{i} · max |x| {peak:.2g}"
              for i, (dead, peak) in enumerate(zip(silent, peaks))]
    image = _panel_mosaic(panels, titles, panel=150 if n_groups > 1 else 320)
    what = "mean over channels" if view == "summary" else (
        f"first {max_channels} of {width} channels" if width > max_channels else f"{width} channels")
    lines = [f"{n_groups} groups x {width} channels ({what} shown), colour scale per {scale}",
             f"all: min {lo_all:.4g}, max {hi_all:.4g}"]
    lines += [f"group {i}: min {float(grp.min()):.4g}, max {float(grp.max()):.4g}"
              + (f"  (no signal: under {100 * NO_SIGNAL:g} % of the layer's peak, drawn grey)" if dead else "")
              for i, (grp, dead) in enumerate(zip(g, silent))]
    return image, "\n".join(lines)


# ---------------------------------------------------------------- attributions


OUTLIER_PERC = 2.0  # as Captum's visualize_image_attr: the top 2 % of |value| saturate, so a few spikes don't wash out the rest


@dataclass(frozen=True)
class MapScale:
    """The colour scale of one attribution map: |value| `lo` is drawn clear, `hi` (and beyond) at full colour;
    `sign` +1 / -1 when every value has that sign (or the map is drawn as |value|), 0 when both occur."""

    lo: float
    hi: float
    sign: int

    @property
    def cmap(self) -> str:
        """Diverging around 0 for a two-signed map; sequential for a one-signed or absolute one."""
        return {0: "bwr", 1: "Reds", -1: "Blues_r"}[self.sign]


def map_scale(values: np.ndarray, signed: bool = True) -> MapScale:
    """The scale a map is drawn on: two-signed maps symmetric around 0; a one-signed map (e.g. Grad-CAM, every
    pixel for the class) or an absolute one from its own min |value|, so a flat map does not read as solid red."""
    v = np.nan_to_num(np.asarray(values, dtype=np.float64))
    mag = np.abs(v)
    top = float(mag.max())
    if top == 0:
        return MapScale(0.0, 0.0, 1)
    hi = float(np.percentile(mag, 100 - OUTLIER_PERC)) or top
    if signed and (v < 0).any() and (v > 0).any():
        return MapScale(0.0, hi, 0)
    lo = float(mag.min())
    if hi <= lo:  # constant (or nearly): nothing to rank, draw it evenly at full colour
        lo, hi = 0.0, top
    return MapScale(lo, hi, -1 if signed and (v < 0).any() else 1)


def _heat(values: np.ndarray, signed: bool, vmax: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Attribution map -> (RGB colours, strength in 0..1) on its `map_scale` (or a shared 0 … `vmax`, for
    maps compared with each other, with 0 drawn clear)."""
    v = np.nan_to_num(np.asarray(values, dtype=np.float64))
    sc = map_scale(v, signed)
    if vmax is not None:
        sc = MapScale(0.0, float(vmax), 0 if signed else 1)
    if sc.hi == 0:
        return np.zeros((*v.shape, 3)), np.zeros(v.shape)
    strength = np.clip((np.abs(v) - sc.lo) / (sc.hi - sc.lo), 0, 1)
    if not signed:
        return colormaps["inferno"](strength)[..., :3], strength
    if sc.sign == 0:  # diverging map centred at 0: red = pushes the class up, blue = pushes it down
        return colormaps["bwr"]((np.clip(v / sc.hi, -1, 1) + 1) / 2)[..., :3], strength
    return colormaps[sc.cmap](strength if sc.sign > 0 else 1 - strength)[..., :3], strength


def overlay(values: np.ndarray, image32: Image.Image | np.ndarray, signed: bool = True, opacity: float = 0.5,
            size: int = 224, vmax: float | None = None) -> Image.Image:
    """A 32 x 32 map as a colour overlay on the nearest-upscaled image (size x size RGB); `vmax` shares one
    colour scale between several maps (default: this map's `map_scale`)."""
    base = np.asarray(upscale(image32, size), dtype=np.float64) / 255
    rgb, strength = _heat(values, signed, vmax)
    if not strength.any():  # empty map: just the image (Attribution.note says why)
        return Image.fromarray((base * 255 + 0.5).astype(np.uint8))
    # Per-pixel opacity grows with |v|: pixels without attribution show the image, not a wash of colour.
    alpha = (float(np.clip(opacity, 0, 1)) * strength)[..., None]
    idx = np.arange(size) * rgb.shape[0] // size  # nearest upscaling of the map, like the image
    rgb, alpha = rgb[idx][:, idx], alpha[idx][:, idx]
    out = (1 - alpha) * base + alpha * rgb
    return Image.fromarray((np.clip(out, 0, 1) * 255 + 0.5).astype(np.uint8))


def attribution_image(attr: Attribution, image32: Image.Image | np.ndarray, signed: bool = True, opacity: float = 0.5,
                      size: int = 224) -> Image.Image:
    """The attribution as a colour overlay on the nearest-upscaled image (size x size RGB)."""
    return overlay(attr.values, image32, signed, opacity, size)


def _map_panel(fig: Figure, ax, values: np.ndarray, signed: bool) -> None:
    """The map alone on its `map_scale`, with a colour bar in the map's own units (its real range)."""
    v = np.nan_to_num(np.asarray(values, dtype=np.float64))
    sc = map_scale(v, signed)
    hi = sc.hi or 1.0
    if not signed:
        im = ax.imshow(np.abs(v), cmap="inferno", vmin=sc.lo, vmax=hi, interpolation="nearest")
        label = "|attribution|"
    elif sc.sign == 0:
        im = ax.imshow(v, cmap="bwr", vmin=-hi, vmax=hi, interpolation="nearest")
        label = "red: for the class · blue: against"
    elif sc.sign > 0:
        im = ax.imshow(v, cmap="Reds", vmin=sc.lo, vmax=hi, interpolation="nearest")
        label = "all for the class: its min … max"
    else:
        im = ax.imshow(v, cmap="Blues_r", vmin=-hi, vmax=-sc.lo, interpolation="nearest")
        label = "all against the class: its min … max"
    clipped = float(np.abs(v).max()) > hi  # the top OUTLIER_PERC % saturate: the bar's pointed ends say so
    cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03,
                      extend=("both" if sc.sign == 0 else "max" if sc.sign > 0 else "min") if clipped else "neither")
    cb.ax.tick_params(labelsize=8)
    cb.set_label(label, fontsize=8)


def attribution_panels(attrs: list[Attribution], image32: Image.Image | np.ndarray, signed: bool = True,
                       opacity: float = 0.5) -> Image.Image:
    """Captum's `visualize_image_attr_multiple` layout, one row per attribution: the image the model saw |
    the map alone with its colour bar (`map_scale`: diverging around 0 for a two-signed map, its own range
    for a one-signed or absolute one) | the overlay. Each panel is drawn at about 280 px."""
    fig = Figure(figsize=(10.4, 3.3 * len(attrs)))
    for row, attr in enumerate(attrs):
        ax0, ax1, ax2 = (fig.add_subplot(len(attrs), 3, 3 * row + k) for k in (1, 2, 3))
        ax0.imshow(upscale(image32, 256))
        ax0.set_title("image (32×32, as the model sees it)", fontsize=9)
        _map_panel(fig, ax1, attr.values, signed)
        params = ", ".join(f"{k}={v}" for k, v in attr.params.items() if v is not None)
        ax1.set_title(f"{attr.method}" + (f" ({params})" if params and len(params) < 40 else ""), fontsize=9)
        ax2.imshow(overlay(attr.values, image32, signed=signed, opacity=opacity, size=256))
        saturated = float(np.abs(attr.values).max()) > map_scale(attr.values, signed).hi  # as the bar's pointed ends
        ax2.set_title(attr.note[:45] + "…" if attr.note else f"overlay (opacity {opacity:g}"
                      + (f"; top {OUTLIER_PERC:g} % saturate)" if saturated else ")"), fontsize=9)
        for ax in (ax0, ax1, ax2):
            ax.set_xticks([])
            ax.set_yticks([])
    fig.subplots_adjust(left=0.01, right=0.99, top=1 - 0.1 / len(attrs), bottom=0.02, wspace=0.22,
                        hspace=0.25)
    return figure_to_image(fig)


# ---------------------------------------------------------------- cardinality views


def group_cam_grid(cams: np.ndarray, image32: Image.Image | np.ndarray, opacity: float = 0.8, size: int = 128) -> Image.Image:
    """One overlay per group of group-restricted Grad-CAM maps (G x 32 x 32), on one shared colour scale
    (with its colour bar) so that the groups' strengths are comparable; each panel titled with its own
    maximum; the title says when every map is near zero (nothing to see at this block)."""
    cams = np.asarray(cams, dtype=np.float64)
    top = float(np.abs(cams).max())
    signed = bool((cams < 0).any())
    n = len(cams)
    cols = 4 if n <= 16 else 8
    rows = int(np.ceil(n / cols))
    # 8 columns on smaller tiles: the figure is shown ~800 px wide either way, so the same inches per text
    # line keep 32 groups' titles and the colour bar as readable as 16 groups' (about 10 px on screen).
    tile = 2.05 if cols == 4 else 1.15
    height = (tile + 0.2) * rows + 1.0
    fig = Figure(figsize=(tile * cols + 1.2, height))
    for i, cam in enumerate(cams):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.imshow(overlay(cam, image32, signed=signed, opacity=opacity, size=size, vmax=top or None))
        ax.set_title(f"g{i}: {float(cam.max()):.2g}", fontsize=10, pad=3)
        ax.set_axis_off()
    note = (f"every map is weak here (max {top:.2g} < 0.01): colours are stretched to that small maximum;\n"
            "early blocks carry little class gradient" if top < 0.01 else
            "one colour scale for all groups: a weak group looks weak")
    fig.suptitle(f"Group-restricted Grad-CAM, shared scale 0 … {top:.2g}; above each tile: its group's max\n{note}",
                 fontsize=10)
    cmap = "bwr" if signed else "inferno"
    sm = ScalarMappable(norm=Normalize(-top if signed else 0, top or 1), cmap=cmap)
    right = 1 - 1.2 / (tile * cols + 1.2)  # 1.2 in on the right for the colour bar and its label
    fig.subplots_adjust(wspace=0.08, hspace=0.3, left=0.01, right=right, top=1 - 0.9 / height, bottom=0.02)
    cb = fig.colorbar(sm, cax=fig.add_axes((right + 0.02, 0.1, 0.02, 0.7)))
    cb.ax.tick_params(labelsize=9)
    cb.set_label("Grad-CAM (shared scale)", fontsize=10)
    return figure_to_image(fig)


def image_montage(images: torch.Tensor | np.ndarray, row_labels: list[str], scale: int = 2) -> Image.Image:
    """uint8 R x N x 3 x 32 x 32 -> one image: a row of N pictures per label (e.g. the top-9 per group)."""
    from PIL import ImageDraw
    a = np.asarray(images.cpu() if isinstance(images, torch.Tensor) else images)
    rows, n, _, h, w = a.shape
    label_w, gap = 64, 2
    cell_h, cell_w = h * scale + gap, w * scale + gap
    out = Image.new("RGB", (label_w + n * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(out)
    for r in range(rows):
        draw.text((4, r * cell_h + cell_h // 2 - 6), row_labels[r], fill="black")
        for i in range(n):
            tile = Image.fromarray(a[r, i].transpose(1, 2, 0)).resize((w * scale, h * scale), Image.Resampling.NEAREST)
            out.paste(tile, (label_w + i * cell_w, r * cell_h))
    return out


# ---------------------------------------------------------------- training and architecture


