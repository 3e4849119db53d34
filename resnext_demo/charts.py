"""Drawing charts: bars, curves, matrices, the sweep and the block diagram -> PIL images, with matplotlib's object
API (no pyplot state, safe across threads/users), each figure closed by rendering it straight to an image.
visualize.py draws the maps. Never touches a model.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Circle, FancyBboxPatch
from PIL import Image

from .model import ResNeXtConfig
from .visualize import figure_to_image

if TYPE_CHECKING:  # type hints only: importing these would pull in captum
    from .explain import GroupStats
    from .faithfulness import Deletion
    from .groups import GroupAblation, GroupImportance
    from .specialization import Specialization


def confusion_figure(confusion: list[list[int]] | np.ndarray, classes: list[str] | tuple[str, ...]) -> Image.Image:
    """Confusion matrix (rows true, columns predicted) as a labelled heatmap with counts."""
    cm = np.asarray(confusion)
    fig = Figure(figsize=(1 + 0.6 * len(classes), 0.8 + 0.6 * len(classes)))
    ax = fig.add_subplot()
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if cm[i, j] > cm.max() / 2 else "black")
    return figure_to_image(fig)


def group_stats_figure(stats: GroupStats, title: str = "") -> Image.Image:
    """Bar charts over groups of an explain.GroupStats: mean activation, L1 energy, sparsity."""
    fig = Figure(figsize=(9, 2.6))
    x = np.arange(len(stats.mean))
    for i, (values, label, color) in enumerate([(stats.mean, "mean", "tab:blue"), (stats.l1, "L1 energy (mean |x|)", "tab:orange"),
                                                (stats.sparsity, "sparsity (fraction <= 0)", "tab:gray")]):
        ax = fig.add_subplot(1, 3, i + 1)
        ax.bar(x, values, color=color)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("group", fontsize=8)
        ax.set_xticks(x if len(x) <= 16 else x[::max(1, len(x) // 8)])
        ax.tick_params(labelsize=7)
        if i == 2:
            ax.set_ylim(0, 1)
    if title:
        fig.suptitle(title, fontsize=10)
    # Fixed spacing instead of tight_layout: each layout pass is a full draw (this is an interactive view).
    fig.subplots_adjust(wspace=0.3, top=0.8 if title else 0.88, bottom=0.18)
    return figure_to_image(fig)


def _group_bars(values: np.ndarray, colours: tuple[str, str], xlabel: str, ylabel: str, title: str,
                height: float = 2.8, top: float = 0.8) -> Image.Image:
    """A bar per group coloured by sign (positive, negative), a zero line, thinned group ticks."""
    v = np.asarray(values, dtype=np.float64)
    fig = Figure(figsize=(6.4, height))
    ax = fig.add_subplot(1, 1, 1)
    ax.bar(np.arange(len(v)), v, color=np.where(v >= 0, *colours))
    ax.axhline(0, color="black", lw=0.6)
    ticks = np.arange(len(v))
    ax.set_xticks(ticks if len(v) <= 16 else ticks[::max(1, len(v) // 8)])  # thinned for large C
    ax.tick_params(labelsize=7)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.set_title(title, fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.subplots_adjust(top=top, bottom=0.18)
    return figure_to_image(fig)


def group_importance_figure(gi: GroupImportance, classes: list[str] | tuple[str, ...]) -> Image.Image:
    """Signed bars per group: green = evidence for the class, red = against it (the counterfactual view)."""
    v = np.asarray(gi.values, dtype=np.float64)
    what = f"logit '{classes[gi.target]}'" + (f" − logit '{classes[gi.contrast]}'" if gi.contrast is not None else "")
    title = f"{gi.method} of {what} at {gi.layer}\nfor: {v[v > 0].sum():.3g} · against: {v[v < 0].sum():.3g} · total {gi.total:.3g}"
    if gi.shortcut is not None:
        title += f" · via shortcut {gi.shortcut:.3g}"
    a = classes[gi.target]
    title += (f"\ngreen: favours '{a}' over '{classes[gi.contrast]}' · red: favours '{classes[gi.contrast]}'"
              if gi.contrast is not None else f"\ngreen: evidence for '{a}' · red: against it")
    return _group_bars(v, ("tab:green", "tab:red"), "group", "attribution", title, height=3.2, top=0.72)


def ablation_figure(ab: GroupAblation, classes: list[str] | tuple[str, ...]) -> Image.Image:
    """Drop of the target's probability when each group alone is knocked out (bars sorted by group)."""
    return _group_bars(ab.drop, ("tab:purple", "tab:gray"), "group knocked out", f"drop of p({classes[ab.target]})",
                       f"{ab.mode} ablation, one group at a time · p without ablation {ab.base[ab.target]:.3f}",
                       height=2.6, top=0.86)


def deletion_figure(curves: dict[str, Deletion]) -> Image.Image:
    """Target probability vs fraction removed for each map (solid) and the random orders (dashed)."""
    fig = Figure(figsize=(5.6, 3.0))
    ax = fig.add_subplot(1, 1, 1)
    for i, (name, d) in enumerate(curves.items()):
        c = f"C{i}"
        ax.plot([0, *d.fractions], [d.base, *d.probs], "o-", ms=3, color=c,
                label=f"{name}: drop {d.score:.3f}")
        ax.plot([0, *d.fractions], [d.base, *d.random_probs], "--", color=c, alpha=0.6,
                label=f"random: drop {d.random_score:.3f}")
    ax.set_xlabel("fraction of the image removed (most important first)", fontsize=8)
    ax.set_ylabel("probability of the class", fontsize=8)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.tick_params(labelsize=7)
    fig.subplots_adjust(bottom=0.17)
    return figure_to_image(fig)


def specialization_figure(spec: Specialization, classes: list[str] | tuple[str, ...]) -> Image.Image:
    """Group x class mean activation (each row scaled to its own max, so preferences show), the groups'
    correlation across images, and each group's colour vs blur sensitivity."""
    g = len(spec.mean)
    fig = Figure(figsize=(13, 3.8))
    ax1, ax2, ax3 = (fig.add_subplot(1, 3, i + 1) for i in range(3))
    cm = np.asarray(spec.class_means, dtype=np.float64)
    mean = cm.mean(1, keepdims=True)
    rel = 100 * (cm / np.where(mean > 0, mean, 1) - 1)  # % above / below the group's own average
    lim = max(float(np.abs(rel).max()), 1e-9)
    im1 = ax1.imshow(rel, cmap="PiYG", aspect="auto", vmin=-lim, vmax=lim)
    ax1.set_xticks(range(len(classes)), list(classes), rotation=60, ha="right", rotation_mode="anchor", fontsize=7)
    ax1.set_yticks(range(g) if g <= 16 else range(0, g, max(1, g // 8)))
    ax1.tick_params(labelsize=7)
    ax1.set_ylabel("group", fontsize=8)
    ax1.set_title("activation per class, % vs the group's mean", fontsize=8)
    fig.colorbar(im1, ax=ax1, fraction=0.046).ax.tick_params(labelsize=7)
    im2 = ax2.imshow(spec.correlation, cmap="bwr", vmin=-1, vmax=1)
    ax2.set_title(f"correlation between groups across images\nchannels within / between groups: "
                  f"{spec.within_corr:.2f} / {spec.between_corr:.2f}", fontsize=8)
    ax2.tick_params(labelsize=7)
    fig.colorbar(im2, ax=ax2, fraction=0.046).ax.tick_params(labelsize=7)
    ax3.scatter(spec.colour, spec.blur, c=np.arange(g), cmap="tab10" if g <= 10 else "viridis", s=30)
    for i in range(g):
        ax3.annotate(str(i), (spec.colour[i], spec.blur[i]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax3.set_xlabel("colour sensitivity (change when greyscaled)", fontsize=8)
    ax3.set_ylabel("shape/texture sensitivity (change when blurred)", fontsize=8)
    ax3.set_title(f"what each group responds to · colour partition p = {spec.colour_p:.3f}", fontsize=8)
    ax3.tick_params(labelsize=7)
    ax3.grid(alpha=0.3)
    fig.suptitle(f"{spec.layer}: selectivity mean {np.mean(spec.selectivity):.2f}, max {np.max(spec.selectivity):.2f}", fontsize=9)
    fig.subplots_adjust(wspace=0.5, bottom=0.25, top=0.82)  # room for whole class names under the first panel
    return figure_to_image(fig)


def curve_figure(history: list[dict]) -> Image.Image:
    """Loss and accuracy per epoch from a checkpoint's history: test_acc (may be None), or val_acc for runs
    scored on a validation split held out of the training images."""
    fig = Figure(figsize=(8, 3))
    ax_loss, ax_acc = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    ep = [h["epoch"] for h in history]
    ax_loss.plot(ep, [h.get("train_loss") for h in history], "o-", ms=3, label="train loss")
    ax_acc.plot(ep, [h.get("train_acc") for h in history], "o-", ms=3, label="train acc")
    for key, label in (("test_acc", "test acc"), ("val_acc", "validation acc (held-out train images)")):
        pts = [(h["epoch"], h[key]) for h in history if h.get(key) is not None]
        if pts:
            ax_acc.plot(*zip(*pts), "s-", ms=3, label=label)
    if not history:
        ax_loss.text(0.5, 0.5, "no training history", ha="center", va="center", transform=ax_loss.transAxes)
    for ax, name in ((ax_loss, "loss"), (ax_acc, "accuracy")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        if history:
            ax.legend(fontsize=8)
    fig.subplots_adjust(wspace=0.3, bottom=0.16)  # fixed spacing: cheaper than tight_layout's extra draw
    return figure_to_image(fig)


def _epoch_axis(ax, ylabel: str, fontsize: int, legend_loc: str = "best") -> None:
    """A curve panel's axes: epochs as whole numbers, labels, a light grid, the legend when there are lines."""
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("epoch", fontsize=fontsize)
    ax.set_ylabel(ylabel, fontsize=fontsize)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.tick_params(labelsize=fontsize - 1)
    if ax.lines:
        ax.legend(fontsize=8, loc=legend_loc)


def finetune_curve_figure(rows: list[dict]) -> Image.Image:
    """A fine-tune's live curve (rows of epoch, series, value as finetune.Update.curve): loss and accuracy on
    two axes with their units, whole-epoch ticks."""
    fig = Figure(figsize=(8, 2.8))
    ax_loss, ax_acc = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for series in dict.fromkeys(r["series"] for r in rows):
        pts = sorted((r["epoch"], r["value"]) for r in rows if r["series"] == series and r["value"] is not None)
        if not pts:
            continue
        x, v = zip(*pts)
        if "loss" in series:
            ax_loss.plot(x, v, "-", lw=1.2, label=series)
        else:
            ax_acc.plot(x, [100 * a for a in v], "o-" if "held-out" in series else "-", ms=4, lw=1.2, label=series)
    for ax, name in ((ax_loss, "cross-entropy loss"), (ax_acc, "accuracy (%)")):
        _epoch_axis(ax, name, 8)
    ax_acc.set_ylim(-2, 104)  # a 100 % line drawn inside the frame, not on its border
    epochs = [r["epoch"] for r in rows if r["value"] is not None]
    if epochs:  # both panels over the same epochs (the held-out score at epoch 0 starts both)
        lo, hi = min(0.0, min(epochs)), max(1.0, max(epochs))
        for ax in (ax_loss, ax_acc):
            ax.set_xlim(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
    if not rows:
        ax_loss.text(0.5, 0.5, "training has not started", ha="center", va="center", transform=ax_loss.transAxes)
    fig.subplots_adjust(wspace=0.3, bottom=0.18, left=0.08, right=0.98)
    return figure_to_image(fig)


def sweep_figure(results: dict) -> Image.Image:
    """Top-1 vs cardinality C (log2 axis) of a sweep's results.json, ± the 95 % CI (or the spread) over seeds, each point
    labelled with its bottleneck width d and parameters."""
    rows = results.get("rows", [])
    fig = Figure(figsize=(5.6, 3.4))
    ax = fig.add_subplot(1, 1, 1)
    if rows:
        c = np.array([r["C"] for r in rows], dtype=float)
        acc = np.array([100 * r["top1_mean"] for r in rows])
        ci = all("top1_ci95" in r for r in rows)  # the paired analysis (sweep analyse): 95 % CI of the mean
        err = np.array([100 * (r["top1_ci95"] if ci else r.get("top1_spread", 0.0)) for r in rows])
        ax.errorbar(c, acc, yerr=err, fmt="o-", ms=4, capsize=3)
        for r, x, y, e in zip(rows, c, acc, err):
            # below the point and its error bar, centred: neighbours are an octave apart, so labels never meet
            ax.annotate(f"{r['C']}×{r['d']}d\n{r['params_M']:.2f} M", (x, y - e), fontsize=7, xytext=(0, -4),
                        textcoords="offset points", ha="center", va="top")
        ax.set_xscale("log", base=2)
        ax.set_xticks(c, [str(int(v)) for v in c])
        ax.set_xlim(c.min() / 1.4, c.max() * 1.4)
        lo = float((acc - err).min())
        ax.set_ylim(lo - 0.3 * (float((acc + err).max()) - lo), None)  # room for the labels under the lowest bar
        mflops = [r["MFLOPs"] for r in rows]
        seeds = max(len(r.get("seeds", [])) for r in rows)
        budget = (f"{min(mflops):.0f}" if round(min(mflops)) == round(max(mflops)) else
                  f"{min(mflops):.0f}–{max(mflops):.0f}")
        ax.set_title(f"same budget ({budget} MFLOPs), same recipe\nmean of {seeds} seed(s), bars: "
                     f"{'95 % CI' if ci else 'half the range'}", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no sweep results", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("cardinality C (groups)", fontsize=8)
    ax.set_ylabel("CIFAR-10 test top-1 (%)", fontsize=8)
    ax.grid(alpha=0.3)
    ax.tick_params(labelsize=7)
    fig.subplots_adjust(bottom=0.15, top=0.86, left=0.13)  # a two-line title clear of the y label
    return figure_to_image(fig)


def _box(ax, x: float, y: float, text: str, w: float = 1.5, h: float = 0.5, color: str = "#dbe9f6") -> None:
    """A rounded labelled box centred at (x, y)."""
    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.04", fc=color, ec="black", lw=0.8))
    ax.text(x, y, text, ha="center", va="center", fontsize=7.5)


def _arrow(ax, x0: float, y0: float, x1: float, y1: float) -> None:
    """A thin arrow from (x0, y0) to (x1, y1)."""
    ax.annotate("", xy=(x1, y1), xytext=(x0, y0), arrowprops=dict(arrowstyle="->", lw=0.8, shrinkA=0, shrinkB=0))


def block_diagram(config: ResNeXtConfig, stage: int = 0) -> Image.Image:
    """One ResNeXt block of `stage` with the config's real numbers: C parallel paths of width d, summed, + shortcut, ReLU."""
    if not 0 <= stage < len(config.widths):
        raise ValueError(f"stage must be in [0, {len(config.widths)}), not {stage}")
    c, d, ch = config.cardinality, config.group_width(stage), config.widths[stage]
    # Draw at most 8 paths: for larger C, the first 3, an ellipsis, and the last (C-th) path.
    paths = list(range(c)) if c <= 8 else [0, 1, 2, None, c - 1]
    n = len(paths)
    step = 1.8
    width = max(6.0, n * step + 2.5)
    fig = Figure(figsize=(width * 0.8, 7.2 * 0.8))  # same scale on both axes: the (+) stays a circle
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(-1.2, width - 1.2)
    ax.set_ylim(-0.6, 6.6)
    ax.set_axis_off()
    cx = (n - 1) * step / 2  # centre of the paths
    _box(ax, cx, 5.9, f"input: {ch} channels", w=2.6, color="#eeeeee")
    for i, p in enumerate(paths):
        x = i * step
        if p is None:
            ax.text(x, 3.2, "…", ha="center", va="center", fontsize=18)
            ax.text(x, 2.5, f"{c - 4} more", ha="center", va="center", fontsize=7)
            continue
        _arrow(ax, cx, 5.62, x, 4.95)
        _box(ax, x, 4.7, f"1x1, {ch}→{d}")
        _box(ax, x, 3.7, f"3x3, {d}→{d}", color="#f9dcc4")
        _box(ax, x, 2.7, f"1x1, {d}→{ch}")
        _arrow(ax, x, 4.45, x, 3.95)
        _arrow(ax, x, 3.45, x, 2.95)
        _arrow(ax, x, 2.45, cx - 0.05 * (cx - x), 1.72)
        ax.text(x, 5.15, f"path {p + 1}", ha="center", fontsize=7, color="dimgray")
    ax.add_patch(Circle((cx, 1.5), 0.22, fc="white", ec="black", lw=0.8))
    ax.text(cx, 1.5, "+", ha="center", va="center", fontsize=12)
    # Shortcut: identity (projection + stride 2 in the first block of stages after the first).
    sx = (n - 1) * step + 1.3
    ax.plot([cx + 1.3, sx, sx, cx + 0.22], [5.9, 5.9, 1.5, 1.5], color="black", lw=0.8)
    ax.text(sx + 0.08, 3.7, "shortcut\n(identity)" if config.family == "fast" else  # fast: the stage's conv+pool resizes
            "shortcut\n(identity;\n1x1 conv + BN\nwhere the\nshape changes)", fontsize=7, va="center")
    _arrow(ax, cx, 1.28, cx, 0.85)
    _box(ax, cx, 0.6, "ReLU", w=1.0, h=0.4, color="#d8f3dc")
    _arrow(ax, cx, 0.4, cx, 0.05)
    ax.text(cx, -0.2, f"output: {ch} channels", ha="center", va="center", fontsize=7.5)
    ax.text(-1.1, 6.55, f"stage {stage + 1} (layer{stage + 1}), cardinality C = {c}, path width d = {d}   "
            f"(≡ 1x1 {ch}→{c * d}, 3x3 grouped conv groups={c}, 1x1 {c * d}→{ch}; BN after each conv)",
            fontsize=7.5, va="top")
    return figure_to_image(fig)


def reliability_figure(before: dict, after: dict, title: str = "") -> Image.Image:
    """Reliability diagram of a checkpoint's reporting images before and after calibration (Reliability dicts,
    as `calibration.Reliability.to_dict` stores them): accuracy per confidence bin against the diagonal, and
    how many images each bin holds."""
    fig = Figure(figsize=(8, 3.8))
    axes = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for ax, rel, name in zip(axes, (before, after), ("bare softmax", "calibrated")):
        n = len(rel["bin_counts"])
        edges = np.linspace(0, 1, n + 1)
        acc = np.array([np.nan if v is None else v for v in rel["bin_accuracy"]], dtype=float)
        conf = np.array([np.nan if v is None else v for v in rel["bin_confidence"]], dtype=float)
        ax.bar(edges[:-1], np.nan_to_num(acc), width=1 / n, align="edge", color="#4c72b0", edgecolor="white",
               label="accuracy in the bin")
        lo, hi = np.fmin(acc, conf), np.fmax(acc, conf)  # the gap, whichever way it goes
        ax.bar(edges[:-1], np.nan_to_num(hi - lo), bottom=np.nan_to_num(lo), width=1 / n, align="edge",
               facecolor="none", edgecolor="#c44e52", hatch="////", linewidth=0.8,
               label="gap to the bin's mean confidence")  # hatched: readable over the accuracy bar too
        ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("top-1 probability shown")
        ax.set_ylabel("share right")
        ax.set_title(f"{name}: ECE {100 * rel['ece']:.1f} %\nmean confidence {100 * rel['confidence']:.1f} % "
                     f"vs accuracy {100 * rel['accuracy']:.1f} %", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(wspace=0.28, bottom=0.14, top=0.8 if title else 0.86)
    return figure_to_image(fig)


def race_figure(rows: list[dict], spreads: dict[str, dict | None] | None = None) -> Image.Image:
    """The Lab's race (rows of epoch, model, series, value as race.RaceUpdate.curve): test accuracy and training
    loss of both models on shared axes; at the last epoch each model's bar spans the seed-to-seed range of its C
    in the shipped sweep (`spreads` by model label), centred on its accuracy: how far one seed can move it."""
    fig = Figure(figsize=(9, 3.2))
    ax_acc, ax_loss = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for i, model in enumerate(dict.fromkeys(r["model"] for r in rows)):
        for ax, series, scale in ((ax_acc, "test accuracy", 100), (ax_loss, "train loss", 1)):
            pts = sorted((r["epoch"], r["value"]) for r in rows if r["model"] == model and r["series"] == series
                         and r["value"] is not None)
            if pts:
                x, v = zip(*pts)
                ax.plot(x, [scale * a for a in v], "o-", ms=4, lw=1.5, color=f"C{i}", label=model)
        s = (spreads or {}).get(model)
        acc = [(r["epoch"], r["value"]) for r in rows if r["model"] == model and r["series"] == "test accuracy"]
        if s and acc:
            e, a = max(acc)
            ax_acc.errorbar([e + 0.08 * (2 * i - 1)], [100 * a], yerr=[[50 * s["range"]], [50 * s["range"]]],
                            color=f"C{i}", capsize=6, lw=3, alpha=0.45)
    if spreads and any(spreads.values()):
        ax_acc.plot([], [], color="gray", lw=3, alpha=0.45, label="seed-to-seed range (shipped sweep)")
    for ax, name in ((ax_acc, "test accuracy (%)"), (ax_loss, "training loss")):
        _epoch_axis(ax, name, 9, "lower right" if ax is ax_acc else "upper right")
    if not rows:
        ax_acc.text(0.5, 0.5, "press Race", ha="center", va="center", transform=ax_acc.transAxes)
    fig.subplots_adjust(wspace=0.25, bottom=0.16, left=0.07, right=0.98, top=0.95)
    return figure_to_image(fig)
