"""Numbers -> sentences: what the explanation views say about their own reliability.

Plain functions over the dataclasses of explain, groups, faithfulness and specialization, no model and no
gradio, so tests read them without a server. Every verdict is generated from the numbers it is given and is
stated against a reference that knows less (random orders and model-blind maps for a heat map, untrained
copies of the architecture for group specialization, half the integration steps for Conductance) — never typed
in per checkpoint.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # type hints only: importing these would pull in captum
    from .beforeafter import Comparison
    from .explain import Attribution
    from .faithfulness import Faithfulness
    from .groups import GroupImportance
    from .specialization import Specialization

def p_text(p: float) -> str:
    """A p-value for people: three decimals, or '< 0.001'."""
    return f"{p:.3f}" if p >= 0.001 else "< 0.001"


UNIT_GAP = 0.02  # a within/between channel-correlation gap under this is within run-to-run noise


def shown_maps_label(node: str, layer: str, groups: int) -> str:
    """What the Feature-maps view shows (explain.shown_maps' `node` for the chosen `layer`), in words."""
    if groups == 1:
        return "a stage output, after its ReLU"
    if node == layer:
        return ("the grouped conv's raw output **before BN and ReLU**: BN rescales every channel, so these strengths "
                "are not what the next layer sees (sparsity is counted after the ReLU)")
    return "after BN + ReLU: **what the block's next 1×1 conv receives** from each group"


def _moves(score: float, class_name: str | None = None, plural: bool = False) -> str:
    """A mean deletion drop as a direction and a size: 'lowers p(cat) by 0.062', 'raises it by 0.005'."""
    what = f"p({class_name})" if class_name else "it"
    verb = ("lower" if score >= 0 else "raise") + ("" if plural else "s")
    return f"{verb} {what} by {abs(score):.3f}"


def faithfulness_md(f: Faithfulness | None, class_name: str) -> str:
    """One line under a heat map: its deletion drop against random orders and the model-blind maps, each said
    as the way it moves the probability (a negative drop is a rise, never 'a drop of -0.005')."""
    if f is None:
        return "**Faithfulness:** not measurable for an empty map."
    refs = ", ".join(f"the {name} map {_moves(score)}" for name, score in f.references.items())
    wrong_way = " — the wrong way for a map of what supports the class" if f.score < 0 else ""
    line = (f"**Faithfulness (deletion):** removing the top 5–50 % of the image by this map "
            f"{_moves(f.score, class_name)} on average{wrong_way} (bare softmax, not the calibrated one); "
            f"random orders {_moves(f.random_score, plural=True)}; maps that know nothing about the model: {refs} — ")
    if f.verdict == "no better than random":
        return line + "✗ no better than random orders on this image."
    if f.verdict == "beats random only":
        name, score = f.best_reference
        return line + (f"beats random orders but **not the {name}** (which {_moves(score)}): on this image the map finds no more "
                       "of what the model uses than a map that ignores the model.")
    return line + "✓ beats random orders and every model-blind map on this image."


def faithfulness_short(f: Faithfulness | None) -> str:
    """A table cell: the verdict in two or three words ('' for an empty map)."""
    if f is None:
        return ""
    return {"beats references": "✓ beats model-blind maps", "beats random only": "random only, not model-blind maps",
            "no better than random": "✗ not even random"}[f.verdict]


def group_cams_md(faith: list[Faithfulness | None]) -> str:
    """How many groups' Grad-CAMs beat random orders and the model-blind maps (None = an empty map)."""
    scored = [f for f in faith if f is not None]
    if not scored:
        return "No group has a non-empty Grad-CAM for this class here."
    refs = ", ".join(f"the {name} map {_moves(score)}" for name, score in scored[0].references.items())
    beat_random = sum(f.verdict != "no better than random" for f in scored)
    beat_all = sum(f.verdict == "beats references" for f in scored)
    return (f"Deletion test of the {len(scored)} non-empty group maps: {beat_random} beat random orders, {beat_all} also "
            f"beat the model-blind maps ({refs}) on this image.")


def attribution_delta_md(a: Attribution, max_steps: int | None = None) -> str | None:
    """Integrated Gradients' convergence delta in words (None for the other methods); past 5 % it says what to
    do: more steps, or at `max_steps` (the most the app offers) another baseline."""
    if a.delta is None or a.change is None:
        return None
    rel = abs(a.delta) / abs(a.change) if a.change else float("inf")
    steps = a.params.get("steps")
    line = (f"**Convergence:** the attributions sum to {a.change + a.delta:.4g}, the logit changes by {a.change:.4g} "
            f"from the baseline: off by {a.delta:+.3g} ({100 * rel:.1f} %) at {steps} steps")
    if rel <= 0.05:
        return line + "."
    if max_steps is None or steps is None or steps < max_steps:
        return line + " — more steps shrink it."
    other = [b for b in ("blur", "mean") if b != a.params.get("baseline")]
    return (line + f" — already at the most steps offered ({max_steps}): a baseline closer to the image "
            f"({' or '.join(other)}) shortens the path and often shrinks the gap; otherwise read the map's "
            f"values as off by about {100 * rel:.0f} % in total.")


def map_spread_md(a: Attribution, class_name: str, signed: bool = True) -> str | None:
    """For a map drawn one-signed (e.g. Grad-CAM: every pixel for the class) whose weakest pixel is not ~0: its
    real range and, when that weakest pixel is over half the strongest, that it is nearly flat (else None)."""
    v = np.nan_to_num(np.asarray(a.values, dtype=np.float64))
    mag = np.abs(v)
    if not mag.max() or (signed and (v < 0).any() and (v > 0).any()):
        return None
    share = float(mag.min() / mag.max())
    if share < 0.05:  # the map reaches ~0 somewhere: its colours already show where it matters little
        return None
    side = f"{'for' if (v >= 0).all() else 'against'} {class_name}" if signed else "(as |value|)"
    line = (f"**Range:** every pixel counts {side}, from {float(mag.min()):.3g} to {float(mag.max()):.3g} (the "
            f"weakest at {100 * share:.0f} % of the strongest); the colours span that range, not 0 … max")
    if share <= 0.5:
        return line + "."
    hint = " (an earlier layer gives a finer map)" if a.method == "Grad-CAM" else ""
    return line + f" — **nearly flat**: this map says little about *where* the evidence is{hint}."


def conductance_md(gi: GroupImportance, tol: float) -> str:
    """The shortcut's share and how well Conductance converged, for the Groups tab."""
    what = {"identity": "identity shortcut (the block's input)", "projection": "projection shortcut (1×1 conv + BN)"}
    line = (f"Via the block's {what.get(gi.shortcut_kind, 'shortcut')}: {gi.shortcut:+.3g}. **Convergence:** "
            f"{gi.steps} steps; no group moved more than {gi.step_error:.3f} logit from {gi.steps // 2} steps; groups + "
            f"shortcut = {gi.total + gi.shortcut:.3f} vs the logit change from a black image {gi.change:.3f} "
            f"(gap {gi.completeness_gap:+.3f})")
    if max(gi.step_error, abs(gi.completeness_gap)) > tol:
        return line + f" — **not converged**: differences under {max(gi.step_error, abs(gi.completeness_gap)):.2f} are noise."
    return line + "."


def _versus(control: np.ndarray, fmt: str = ".2f") -> str:
    """'untrained copies: lo–hi' (or a note that no control was computed)."""
    if not len(control):
        return "no untrained control computed"
    return f"{len(control)} untrained copies: {control.min():{fmt}}–{control.max():{fmt}}"


def specialization_md(s: Specialization, classes: list[str] | tuple[str, ...]) -> str:
    """What a block's specialization numbers say, each verdict stated against untrained copies of the architecture."""
    g = len(s.mean)
    mean = s.class_means.mean(1, keepdims=True)
    rel = s.class_means / np.where(mean > 0, mean, 1)
    best = int(np.argmax(s.selectivity))
    sel = float(np.mean(s.selectivity))
    strength = "weak" if sel < 0.2 else "moderate" if sel < 0.4 else "strong"
    control = len(s.control_selectivity) > 0
    lines = [f"**Class preference is {strength}**: mean selectivity {sel:.2f} (0 = fires equally for every class, "
             f"1 = for one class only; {_versus(s.control_selectivity)})"
             + ("" if not control else " — more than every untrained copy." if sel > s.control_selectivity.max()
                else " — no more than untrained copies of the architecture show.")
             + f" Most selective **g{best}** prefers **{classes[int(s.preferred_class[best])]}** "
             f"({100 * (rel[best].max() - 1):+.0f} % vs its mean)."]
    if np.isfinite(s.within_corr):
        gap = s.gap
        head = (f"**Groups as units**: channels of one group correlate {s.within_corr:.2f} across images, channels of "
                f"different groups {s.between_corr:.2f} (gap {gap:.2f}; {_versus(s.control_gap)}) — ")
        if gap < UNIT_GAP:
            lines.append(head + "no clear sign that a group's channels belong together here.")
        elif not control:
            lines.append(head + "a group's channels correlate more than channels of different groups.")
        elif gap > s.control_gap.max():
            lines.append(head + "more than in every untrained copy: training made a group's channels share a function "
                                "beyond what the architecture gives.")
        else:
            lines.append(head + "but untrained copies show gaps as large: a group's channels see the same inputs, so this "
                                "much comes from the architecture, not from training.")
    if np.isfinite(s.colour_p):
        cp = s.control_colour_p
        head = (f"**Colour vs shape**: the groups differ in colour sensitivity more than {100 * (1 - s.colour_p):.1f} % of "
                f"random channel partitions (p = {s.colour_p:.3f}; {_versus(cp, '.3f')}"
                + (f", below 0.05 in {int((cp < 0.05).sum())} of {len(cp)}" if len(cp) else "") + ") — ")
        if s.colour_p >= 0.05:
            verdict = "no evidence that this block's grouping follows colour."
        elif not len(cp):
            verdict = "the grouping separates colour-sensitive from colour-blind paths."
        elif s.colour_p < cp.min():
            verdict = ("a split the untrained copies do not reach: training separated colour-sensitive from colour-blind "
                       "paths, like AlexNet's two groups.")
        else:
            verdict = "but untrained copies reach such p too: a colour split this strong appears without training."
        lines.append(head + verdict + f" Most colour-sensitive: **g{int(np.argmax(s.colour))}** ({s.colour.max():.2f}); "
                     f"most shape/texture-sensitive: **g{int(np.argmax(s.blur))}** ({s.blur.max():.2f}).")
    dead = int((s.mean <= 0).sum())
    if dead:
        lines.append(f"{dead} of {g} groups never fire on these images (dead paths).")
    return "\n\n".join(lines)


def sweep_md(results: dict) -> str:
    """What a cardinality sweep's results.json shows, against two noise references: the seeds' own spread and
    the sampling error of one test-split accuracy."""
    rows = results.get("rows") or []
    if len(rows) < 2:
        return "Too few cardinalities to compare."
    best, worst = max(rows, key=lambda r: r["top1_mean"]), min(rows, key=lambda r: r["top1_mean"])
    gap = best["top1_mean"] - worst["top1_mean"]
    seed_range = max(2 * r["top1_spread"] for r in rows)  # the widest seed-to-seed difference of one model
    n = max((r.get("test_images") or 0 for r in results.get("runs") or []), default=0) or 10_000
    se = float(np.sqrt(best["top1_mean"] * (1 - best["top1_mean"]) / n))
    line = (f"Best C = {best['C']} ({100 * best['top1_mean']:.2f} %), worst C = {worst['C']} "
            f"({100 * worst['top1_mean']:.2f} %): a gap of {100 * gap:.2f} points, against seeds of one model that "
            f"differ by up to {100 * seed_range:.2f} and a sampling error of ±{100 * se:.2f} for one accuracy on "
            f"{n:,} test images. ")
    if gap > max(seed_range, 2 * se):
        return line + "The gap is larger than both: at this budget and recipe, cardinality matters."
    return line + ("**The gap is within that noise: this sweep does not separate the cardinalities** (more seeds "
                   "and epochs would be needed to confirm or refute the paper at this scale).")


def finetune_md(rows: dict[str, Comparison]) -> list[str]:
    """Plain-words verdicts: is the held-out gain more than noise, is it a shift towards the trained classes
    rather than better discrimination, and was it bought with forgetting?"""
    lines = []
    hold, among, cifar = rows.get("holdout"), rows.get("holdout_among"), rows.get("cifar")
    if hold is not None:
        change = f"{100 * hold.change:+.1f} points on {hold.n} held-out images, paired p = {p_text(hold.p)}"
        if hold.p >= 0.05:
            lines.append(f"**Within noise:** the held-out change ({change}) could be chance: with this few held-out images "
                         "only a large difference would show; add images to tell.")
        elif hold.change > 0:
            lines.append(f"**A real gain on your held-out images** ({change}).")
        else:
            lines.append(f"**Worse on your held-out images** ({change}).")
    for all_classes, only, where in ((hold, among, "held-out images"),
                                     (rows.get("cifar_trained"), rows.get("cifar_among"), "CIFAR-10 images of these classes")):
        if all_classes is not None and only is not None and all_classes.change > 0 and only.change < all_classes.change / 2:
            lines.append(f"**Mostly a shift towards your classes** on the {where}: {100 * all_classes.before:.1f} → "
                         f"{100 * all_classes.after:.1f} % among all classes, but {100 * only.before:.1f} → "
                         f"{100 * only.after:.1f} % choosing only among the trained ones: the gain comes from predicting "
                         "these classes more often, not from telling them apart better.")
    if cifar is not None:
        lost = -100 * cifar.change
        if cifar.change < 0 and cifar.p < 0.05:
            gain = 100 * hold.change if hold is not None else 0.0
            lines.append(f"**Bought with forgetting:** the CIFAR-10 slice lost {lost:.1f} points ({100 * cifar.before:.1f} → "
                         f"{100 * cifar.after:.1f} %, p = {p_text(cifar.p)})"
                         + (" — more than the held-out gain." if lost >= gain else "."))
        else:
            lines.append(f"No measurable forgetting on the CIFAR-10 slice ({-lost:+.1f} points, p = {p_text(cifar.p)}).")
    return lines


def trust_md(meta: dict, model_cal: dict | None, has_detector: bool) -> str:
    """About: what the shown probabilities mean for this checkpoint and what "unfamiliar" means, with the
    numbers measured on its reporting images (from the metadata `calibrate` wrote)."""
    cal = model_cal or {}
    md = ["### How far to believe an answer"]
    if not cal:
        md.append("This checkpoint has **no calibration**: its probabilities are the bare softmax, which on the "
                  "default model runs 15 points below its accuracy. `python -m resnext_demo.calibrate --weights "
                  "FILE` fits one.")
    else:
        rep = cal.get("reporting") or {}
        b, a = rep.get("before"), rep.get("after")
        md.append(f"Probabilities are **calibrated** by temperature scaling (T = {cal['temperature']:g}, fitted on "
                  f"{cal.get('fitted_on', 'held-out images')}): top-1 never changes, but a shown 80 % now means "
                  "right about 80 % of the time on CIFAR-10 test images.")
        if b and a:
            md.append(f"On {rep.get('images', 'the reporting images')} ({rep.get('n', '?')}): ECE "
                      f"{100 * b['ece']:.1f} % → **{100 * a['ece']:.1f} %**, NLL {b['nll']:.3f} → {a['nll']:.3f}, "
                      f"mean confidence {100 * b['confidence']:.1f} % → {100 * a['confidence']:.1f} % against "
                      f"accuracy {100 * a['accuracy']:.1f} %.")
        tp = rep.get("through_predict")
        if tp:
            md.append(f"The same images one by one through the app's prediction path: ECE {100 * tp['ece']:.1f} %, "
                      f"confidence {100 * tp['confidence']:.1f} % vs accuracy {100 * tp['accuracy']:.1f} %, "
                      f"{100 * tp['flagged']:.1f} % flagged unfamiliar, top-1 identical to the bare model: "
                      f"{'yes' if tp['top1_identical'] else 'NO'}.")
    fam = meta.get("familiarity") if has_detector else None
    if not fam:
        md.append("**Unfamiliar-image check: not available** for this model.")
    else:
        ev = fam.get("evaluation") or {}
        md.append("**Unfamiliar images.** A probability only compares the 10 classes; it cannot say \"none of "
                  "them\". So every image is also compared with the training images layer by layer (Mahalanobis "
                  "distance of each stage's channel statistics, and of the last stage's features to each class), and "
                  f"flagged when it is stranger than {100 * fam.get('rate', 0.05):.0f} % of held-in CIFAR-10 test "
                  "images are.")
        if ev:
            md.append(f"Flagged: {100 * ev['reporting']['flagged']:.1f} % of the reporting CIFAR-10 images, "
                      f"**{100 * ev['far_flagged']:.1f} %** of synthetic far-from-CIFAR images. Per set (AUROC: how "
                      "often such an image scores stranger than a CIFAR-10 test image):")
    return "\n\n".join(md)


def race_md(a: str, acc_a: float, b: str, acc_b: float, n_test: int, p: float, spread: float | None,
            n_train: int, epochs: int) -> str:
    """The Lab's verdict on a race: is the gap between the two models more than the noise of the test images (a
    paired McNemar `p` on the same `n_test` images) and than how much two seeds of one model differ (`spread`:
    the largest seed-to-seed range of these C values in the shipped sweep, None when it has none)?"""
    gap = 100 * (acc_b - acc_a)
    lead, trail = (b, a) if gap > 0 else (a, b)
    seen = (f"{lead} leads {trail} by {abs(gap):.1f} points ({100 * acc_a:.1f} % vs {100 * acc_b:.1f} % on the same "
            f"{n_test} test images, paired p = {p_text(p)})") if gap else f"both score {100 * acc_a:.1f} %"
    seeds = ("the shipped sweep has no seeds of these models to compare with" if spread is None else
             f"two seeds of one model differ by up to {100 * spread:.2f} points in the shipped sweep (10 seeds, all "
             "50,000 training images), and by more on a small subset")
    if not gap or p >= 0.05:
        verdict = f"**Within noise:** {seen}: a gap this size could come from the draw of test images alone"
    elif spread is None or abs(gap) <= 100 * spread:
        verdict = f"**Could be seed noise:** {seen}: more than the test images' noise, but {seeds}"
    else:
        verdict = (f"**Beyond noise:** {seen}: more than the test images' noise, and more than the "
                   f"{100 * spread:.2f} points by which two seeds of one model differ at most in the shipped sweep")
    return (verdict + f". One seed, {n_train:,} training images, {epochs} epoch(s): the sweep in About, with 10 "
            "seeds per C on the whole training split, is the stronger evidence.")
