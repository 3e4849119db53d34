"""The words and tables the app shows: plain values in, Markdown strings and pandas tables out.

No gradio and no model here, so tests read every view's text without a server. `verdicts` says what a
measurement means against its control; this module lays the numbers and those verdicts out for a tab.
"""
from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from . import data, verdicts, weights
from .model import ResNeXtConfig
from .zoo import list_models
from .budget import config_macs, config_params, equal_budget_configs, matched_base_width

if TYPE_CHECKING:  # explain's dataclasses, for type checkers only (this module computes nothing)
    from .explain import Attribution
    from .faithfulness import Faithfulness
    from .groups import GroupAblation, GroupImportance
    from .specialization import Specialization
    from .predict import Prediction

CARDINALITIES = (1, 2, 4, 8, 16, 32)  # the About tab's equal-budget table

INTRO = ("# ResNeXt on CIFAR-10\nClassify an image, look inside the grouped convolutions, "
         "see which pixels mattered, and fine-tune your own copy of the model.")

# Seen by visitors, who cannot configure the server: no flags or variables here (the README tells operators).
NO_DATA_HELP = ("No CIFAR-10 test images are available on this server, so there are no samples here. "
                "Everything else works with your own images.")

GROUPS_TEXT = """
**What no other explainer shows: the C parallel paths of every ResNeXt block.** A block's grouped 3×3
conv splits into C groups; each computes its own transformation and the 1×1 conv after it sums them.
Here you see, for one image, which groups carry the evidence (and which argue against), what happens when
you remove them, where each one looks, and — over the test set — what each group responds to.
"""

FEATURES_TEXT = ("A grouped 3×3 conv with C groups: output channels `[g·w, (g+1)·w)` come only from "
                 "group g's inputs. Each panel is one group. Stage outputs are shown ungrouped for comparison.")

ABOUT_TEXT = """
### What a ResNeXt block is
A ResNet bottleneck block maps its input through 1×1 → 3×3 → 1×1 convolutions. ResNeXt (Xie et al.,
2017, *Aggregated Residual Transformations*) splits the middle into **C parallel paths** of **d**
channels each — the *cardinality* C — whose outputs are summed. Implemented as one **grouped 3×3
convolution** (`groups=C`): output channels `[g·d, (g+1)·d)` are computed only from input channels of
group g. The paper's finding: at equal parameters and FLOPs, more groups (larger C, smaller d) beat
a wider single path. The diagram is drawn from the loaded model's config; the table recomputes
parameters and FLOPs for other C×d with the same budget.
"""

FINETUNE_STOPPED_IN_QUEUE = "Stopped before training started (Stop was pressed while the fine-tune waited in the queue)."
FINETUNE_STOPPING = "Stopping after the current step…"
FINETUNE_DONE = "Done. Press **Use this model** to use it in every tab (this session only), or download it."

# ------------------------------------------------------------ the page and its model


def no_weights_help(path: str | Path | None, reason: str | None) -> str:
    """What to tell users when no checkpoint could be loaded."""
    return (f"**No model loaded** ({reason or 'no checkpoint'}). Train one with "
            f"`python -m resnext_demo.train --recipe fast --model airbench94x_8x66d --out {path or weights.DEFAULT_WEIGHTS}` "
            "(the fast recipe: docs/training-fast.md gives its time on a CPU; add `--subset 2000 --epochs 1` for a "
            "quick smoke model), or start "
            "the app with `--weights PATH` / `RESNEXT_DEMO_WEIGHTS=PATH`. You can also load an exported "
            "`.safetensors` checkpoint in the Fine-tune tab (this session only).")


def data_help(error: str | None) -> str:
    """Why there are no samples (the reading error first, when there was one)."""
    return f"{error}. {NO_DATA_HELP}" if error else NO_DATA_HELP


def model_banner(name: str, cardinality: int, n_classes: int, meta: dict, own: bool) -> str:
    """One line: which model this session uses (`own`: the session's, not the shared one)."""
    acc = meta.get("accuracy")
    n = meta["data"].get("test_images") if isinstance(meta.get("data"), dict) else None
    on = f" on {n:,} test images" if isinstance(n, int) else ""  # a fine-tune's slice is not the whole split
    acc_s = f", CIFAR-10 test accuracy {100 * acc:.2f} %{on}" if isinstance(acc, (int, float)) else ""
    who = "**your session's model** (only you see it)" if own else "the shared model"
    return f"Using {who}: `{name}` — ResNeXt C={cardinality}, {n_classes} classes{acc_s}."


def source_label(source: str, n_test: int, set_aside: int | None = None) -> str:
    """Which CIFAR-10 images the app shows; `set_aside` (images kept for fine-tuning) marks the sample pack."""
    if set_aside is not None:
        return (f"the sample pack shipped with the app ({n_test:,} CIFAR-10 test images, and "
                f"{set_aside} more set aside for fine-tuning)")
    return f"`{Path(source).name}` ({n_test:,} test images)"


def layer_label(name: str, groups: int | None) -> str:
    """A layer list entry: a grouped conv with its C (`groups`), or a stem / stage output (None)."""
    if groups is not None:
        return f"{name} — grouped 3x3 conv, C={groups} groups"
    return f"{name} — {'stem' if name.endswith('conv1') else 'stage'} output (ungrouped)"


# ------------------------------------------------------------ Predict


def rarity_words(rarity: float, n: int) -> str:
    """How rare a familiarity score is among the held-in CIFAR-10 test images, in words."""
    if rarity * n < 1:
        return f"none of {n:,} CIFAR-10 test images scores this far from the training images"
    return f"only {100 * rarity:.1f} % of CIFAR-10 test images score this far from the training images"


def unfamiliar_md(p: Prediction, n_heldin: int, n_classes: int) -> str:
    """The warning for an image that does not look like the training data ("" when it does, or unknown)."""
    if not p.unfamiliar:
        return ""
    return (f"⚠️ **This does not look like any of the {n_classes} classes the model knows** "
            f"({rarity_words(p.rarity or 0.0, n_heldin)}). Closest class: **{p.top_class}**. The probabilities "
            "assume the image is one of them, so they say little here.")


def unfamiliar_note(p: Prediction, n_heldin: int) -> str:
    """One line for the explanation tabs when their image is unfamiliar ("" otherwise)."""
    if not p.unfamiliar:
        return ""
    return (f"⚠️ This image does not look like the model's training images ({rarity_words(p.rarity or 0.0, n_heldin)}): "
            f"what follows explains how it maps nonsense to **{p.top_class}**, not a recognised object.\n\n")


def trust_line(p: Prediction) -> str:
    """What the shown probability means, and whether the unfamiliar-image check ran."""
    pct = f"{100 * p.probs[p.top_class]:.0f} %"
    cal = (f"Calibrated (temperature {p.temperature:g}): among CIFAR-10 test images given about {pct}, about "
           f"{pct} are right" if p.temperature != 1.0 else "Not calibrated (this checkpoint has no temperature)")
    fam = ("familiar-looking image" if p.score is not None and not p.unfamiliar else
           "unfamiliar image" if p.unfamiliar else "unfamiliar-image check unavailable for this checkpoint "
           "(`python -m resnext_demo.calibrate --weights FILE` adds it)")
    return f"{cal} · {fam}."


def prediction_md(p: Prediction, truth: dict | None = None, n_heldin: int = 5000) -> str:
    """Under the prediction: the unfamiliar warning, top class, what its probability means, time and device,
    and the true label of a test image."""
    warn = unfamiliar_md(p, n_heldin, len(p.probs))
    info = ((warn + "\n\n" if warn else "")
            + f"**{p.top_class}** ({100 * p.probs[p.top_class]:.1f} %) · inference {1000 * p.seconds:.1f} ms "
            f"on `{p.device}` · the model sees only the 32×32 picture on the right\n\n{trust_line(p)}")
    if truth and truth.get("label") is not None:
        ok = truth["label"] == p.top_class
        info += (f"\n\nTrue label (CIFAR-10 test image #{truth['index']}): **{truth['label']}** — "
                 + ("**correct**" if ok else f"**incorrect** (predicted {p.top_class})"))
    return info


def gallery_md(n: int, source: str) -> str:
    """Above the sample gallery (`source`: source_label's words)."""
    return f"{n} CIFAR-10 test images from {source}; click one to classify it."


def misclassified_caption(true: str, predicted: str, p: float) -> str:
    """A misclassified image's caption: true → predicted, confidence."""
    return f"{true}→{predicted} {100 * p:.0f}%"


def misclassified_md(n_wrong: int, n: int, n_shown: int) -> str:
    """Above the misclassified gallery."""
    return (f"{n_wrong} of {n} test images misclassified ({100 * (1 - n_wrong / n):.1f} % correct); "
            f"showing {n_shown}. Click one to load it.")


# ------------------------------------------------------------ Feature maps


def feature_maps_title(node: str, groups: int, shape: tuple[int, ...]) -> str:
    """`node`'s maps (B x C x H x W `shape`) in `groups` groups, in words."""
    return (f"{node}: {groups} group{'s' if groups != 1 else ''} × {shape[1] // groups} channels, "
            f"{shape[2]}×{shape[3]}")


def feature_maps_md(title: str, node: str, layer: str, groups: int, scale: str, ranges: str) -> str:
    """What the grid shows, with every panel's raw value range."""
    return (f"**{title}** — {verdicts.shown_maps_label(node, layer, groups)}; colour scale per {scale}.\n\n"
            f"```\n{ranges}\n```")


# ------------------------------------------------------------ Attributions


def attribution_md(a: Attribution, classes: list[str], signed: bool, faith: Faithfulness | None,
                   max_steps: int | None = None) -> str:
    """One method's map: class, raw and shown range, parameters, any note, a one-signed map's spread, IG's
    delta (`max_steps`: the most steps the app offers), the faithfulness line (`faith` None: an empty map)."""
    params = ", ".join(f"{k}={v}" for k, v in a.params.items() if v is not None)
    shown = (f"map range [{float(a.values.min()):.4g}, {float(a.values.max()):.4g}]" if signed else
             f"shown: |value|, {float(np.abs(a.values).min()):.4g} to {float(np.abs(a.values).max()):.4g}")
    md = (f"**{a.method}** for class **{classes[a.target]}** · raw range [{a.raw_min:.4g}, {a.raw_max:.4g}]"
          f" · {shown}" + (f" · {params}" if params else ""))
    if a.note:
        md += f"\n\n**Note:** {a.note}"
    for extra in (verdicts.map_spread_md(a, classes[a.target], signed),
                  verdicts.attribution_delta_md(a, max_steps)):
        if extra:
            md += "\n\n" + extra
    return md + "\n\n" + verdicts.faithfulness_md(faith, classes[a.target])


# ------------------------------------------------------------ Groups


def groups_table(gi: GroupImportance, ab: GroupAblation, cams: np.ndarray, dels: list[Faithfulness | None],
                 classes: list[str], target: int) -> pd.DataFrame:
    """One row per group: importance, knock-out effect, Grad-CAM peak, deletion faithfulness."""
    top_after = ab.probs.argmax(1)
    return pd.DataFrame({
        "group": [f"g{i}" for i in range(len(gi.values))],
        "importance": np.round(gi.values.astype(np.float64), 4),
        # float64 before rounding: a rounded float32 shows as 0.5486000180244446 in the browser
        f"p({classes[target]}) after knock-out": np.round(ab.probs[:, target].astype(np.float64), 4),
        "drop": np.round(ab.drop.astype(np.float64), 4),
        "top-1 after knock-out": [f"{classes[j]} ({ab.probs[i, j]:.2f})" for i, j in enumerate(top_after)],
        "Grad-CAM max": [float(f"{cam.max():.3g}") for cam in cams],
        "deletion drop (random · best model-blind)": [
            f"{d.score:.3f} ({d.random_score:.3f} · {d.best_reference[1]:.3f})" if d else "empty map" for d in dels],
        "faithful?": [verdicts.faithfulness_short(d) for d in dels],
    })


def groups_md(layer: str, pred: Prediction, gi: GroupImportance, ab: GroupAblation, dels: list[Faithfulness | None],
              classes: list[str], target: int, contrast: int | None, method: str, mode: str,
              conductance_tol: float) -> str:
    """The Groups analysis in four paragraphs: what is explained, importance, knock-out, group Grad-CAM."""
    order = ab.ranking()
    top_after = ab.probs.argmax(1)
    what = f"**{classes[target]}**" + (f" rather than **{classes[contrast]}**" if contrast is not None else "")
    g_for, g_against = int(np.argmax(gi.values)), int(np.argmin(gi.values))
    # against the model's own top-1 without knock-out, not the explained class (which may not be the prediction)
    flips = [i for i in range(len(top_after)) if top_after[i] != int(ab.base.argmax())]
    md = [f"**{layer}** · {len(gi.values)} groups · explaining {what} · prediction: {pred.top_class} "
          f"({pred.probs[pred.top_class]:.2f})",
          f"**Importance** ({method}): strongest evidence for it **g{g_for}** ({gi.values[g_for]:+.3g}), "
          f"strongest against **g{g_against}** ({gi.values[g_against]:+.3g}); all groups: {gi.total:+.3g}."
          + (f" Here positive means *favours {classes[target]} over {classes[gi.contrast]}*. The groups' total "
             "is only this block's share of the margin (the shortcut and the other blocks carry the rest), so "
             "it can be negative while the model prefers the class." if gi.contrast is not None else "")
          + (" " + verdicts.conductance_md(gi, conductance_tol) if gi.shortcut is not None else ""),
          f"**Knock-out** ({mode}, one group at a time): most harmful **g{order[0]}** "
          f"(p {ab.base[target]:.3f} → {ab.probs[order[0], target]:.3f})"
          + (f"; knocking out {', '.join(f'g{i}' for i in flips)} alone changes the top-1 class." if flips
             else "; no single group changes the top-1 class: the block's paths are redundant for this image."),
          "**Group Grad-CAM**: where each group's evidence lies, on one shared colour scale (faint = weak group). "
          + verdicts.group_cams_md(dels)]
    return "\n\n".join(md)


def knockout_md(layer: str, groups: list[int], mode: str, base: np.ndarray, probs: np.ndarray,
                classes: list[str]) -> str:
    """What knocking out `groups` did: the model's class before (`base` probabilities) and after (`probs`)."""
    b = int(base.argmax())
    if not groups:
        return f"No group knocked out: the model's own prediction ({classes[b]} {base[b]:.3f})."
    a = int(probs.argmax())
    return (f"Knocked out {', '.join(f'g{g}' for g in groups)} of {layer} ({mode}): "
            f"p({classes[b]}) {base[b]:.3f} → {probs[b]:.3f}; top-1 "
            + (f"stays **{classes[a]}**." if a == b else f"becomes **{classes[a]}** ({probs[a]:.3f})."))


def specialization_md(layer: str, s: Specialization, n_images: int, source: str) -> str:
    """A block's specialization over `n_images` test images of `source`, each number against untrained copies."""
    return (f"**{layer}** over the first {n_images:,} CIFAR-10 test images "
            f"(class-balanced) of {source}, each number next to the same number for "
            f"{len(s.control_gap)} untrained copies of the architecture (random weights, BN statistics from "
            f"training images): what the grouping gives before any training.\n\n"
            + verdicts.specialization_md(s, list(data.CLASSES)))


def compare_md(tag: str, name: str, cardinality: int, n_params: int, pred: Prediction, explained: str,
               layer: str, faith: Faithfulness | None) -> str:
    """One model's line in a checkpoint comparison (`explained`: the class its maps explain)."""
    return (f"**{tag}: {name}** — C={cardinality}, {n_params / 1e6:.2f} M "
            f"params; top-1 **{pred.top_class}** ({pred.probs[pred.top_class]:.2f}); explaining "
            f"{explained} at {layer}. " + verdicts.faithfulness_md(faith, explained))


# ------------------------------------------------------------ Fine-tune


def finetune_intro(max_seconds: float, limits: dict[str, int], holdout_fraction: float) -> str:
    """The Fine-tune tab's opening paragraph with the server's limits (`finetune.LIMITS`)."""
    return (f"Train **your own copy** of the model on your images (nobody else sees it). Drop a few images "
            f"per class; {int(100 * holdout_fraction)} % of each class of yours is held out to score it "
            f"before and after. **Limits:** {limits['images']} images, {limits['epochs']} epochs, "
            f"{int(max_seconds)} s of training, batch ≤ {limits['batch_size']}, "
            f"{limits['new_classes']} new classes (a new class replaces the head; old classes keep their weights).")


def upload_counts_md(counts: dict[str, int], holdout: dict[str, int], n_cifar: int = 0) -> str:
    """What the drop zones hold per class, how many of each are held out to score the model (`holdout`, by
    class), and the CIFAR-10 training images added (trained on only, never held out)."""
    given = {c: n for c, n in counts.items() if n}
    extra = (f" + {n_cifar} CIFAR-10 training images (trained on, never held out)." if n_cifar else "")
    if not given:
        return ("No images of yours dropped yet: drop a few per class above" + (" or add CIFAR-10 images below."
                if not n_cifar else f"; training would use only the {n_cifar} CIFAR-10 images and hold none out."))
    parts = [f"**{c}** {n}" + (f" ({holdout[c]} held out)" if holdout[c] else " (none held out: drop 2 or more)")
             for c, n in given.items()]
    total, held = sum(given.values()), sum(holdout[c] for c in given)
    return (f"Your images: {' · '.join(parts)}. {total} in all; {held} held out to score before and after, "
            f"{total - held} trained on" + (extra or "."))


def preparing_md(counts: dict[str, int], n_cifar: int = 0) -> str:
    """The fine-tune's first status line: the visitor's images per class and the CIFAR-10 images added."""
    listed = ", ".join(f"{c}: {n}" for c, n in counts.items() if n)
    mine = f"{sum(counts.values())} images of yours ({listed})" if listed else ""
    cifar = f"{n_cifar} CIFAR-10 training images" if n_cifar else ""
    return f"Preparing {' + '.join(p for p in (mine, cifar) if p)}…"


# ------------------------------------------------------------ Lab


def lab_intro(max_seconds: float, has_data: bool, n_train: int, n_test: int, epochs: int,
              small_source: int | None = None) -> str:
    """The Lab tab's opening paragraph: what a race is, what it trains on by default, its limits; `small_source`:
    the training images per class of a source smaller than the defaults (the sample pack)."""
    text = ("**Race two cardinalities yourself.** Pick two members of the equal-budget airbench94x family (same "
            "parameters and multiply-adds, different C), and both train **from scratch, at the same time**, with the "
            "fast recipe: the same seed, data order and augmentation, one step of each in turn, tested on the same "
            f"images after every epoch. On a 2-core CPU the defaults (a {n_train:,}-image subset of the training split, "
            f"{n_test:,} test images, {epochs} epochs) take about two minutes; a GPU races on the whole split. Behind "
            "the curves: "
            "how much two seeds of one model differ in the shipped sweep. "
            f"**Limits:** one race at a time (others wait in the queue), {int(max_seconds)} s per race.")
    if not has_data:
        text += "\n\n**No CIFAR-10 images on this server**, so there is nothing to race on."
    elif small_source is not None:
        text += (f"\n\n**This server has only {small_source} training images per class** (the sample pack), so its "
                 "races are small and close to chance; with the full CIFAR-10 the defaults above apply.")
    return text


# ------------------------------------------------------------ About


def architecture_text(name: str, cfg: ResNeXtConfig) -> str:
    """One paragraph naming the loaded network's layout and its computed size."""
    size = (f"{config_params(cfg) / 1e6:.2f} M parameters, {config_macs(cfg) / 1e6:.0f} MFLOPs (multiply-adds) per "
            f"32×32 image" if cfg.family in ("cifar", "fast") else f"cardinality {cfg.cardinality}")
    per_group = f"C={cfg.cardinality} groups, d={cfg.base_width} channels per group in stage 1 (doubling each stage)"
    if cfg.family == "cifar":
        return (f"**{name}**: ResNeXt-{2 + 3 * sum(cfg.depths)} with {per_group}, stage widths "
                f"{', '.join(map(str, cfg.widths))}, {size}.")
    if cfg.family == "fast":
        return (f"**{name}**: a fast ResNeXt — 3×3 stem, then each stage opens with a dense 3×3 conv + 2×2 max-pool "
                f"(32 → 16 → 8 → 4 px) followed by {'/'.join(map(str, cfg.depths))} ResNeXt bottlenecks "
                f"(identity shortcuts) with {per_group}; stage widths {', '.join(map(str, cfg.widths))}; {size}.")
    return f"**{name}**: {cfg.family} family, {size}."


def equal_budget_table(config: ResNeXtConfig, recipe_model: str | None = None) -> pd.DataFrame:
    """Parameters and MFLOPs of the loaded network at other C x d with the same budget (computed)."""
    if config.family not in ("cifar", "fast"):
        return pd.DataFrame({"note": ["table available for the ResNeXt-29 and fast families only"]})
    if recipe_model in list_models() and config.num_classes == 10:
        cfgs = list(equal_budget_configs(recipe_model, CARDINALITIES).values())
    else:
        cfgs = [replace(config, cardinality=c, base_width=matched_base_width(config, c)) for c in CARDINALITIES]
    rows = []
    for c in cfgs:
        rows.append({"C (groups)": c.cardinality, "d (stage 1)": c.base_width,
                     "params (M)": round(config_params(c) / 1e6, 3), "MFLOPs": round(config_macs(c) / 1e6, 1),
                     "loaded": "◀" if (c.cardinality, c.base_width) == (config.cardinality, config.base_width) else ""})
    return pd.DataFrame(rows)


def effective_command(command: str) -> tuple[str, list[str]]:
    """A command line with each repeated `--option` kept once, at its first place with its last value (argparse:
    the last one wins), and the options that were repeated."""
    tokens = command.split()
    spans: list[list[str]] = []  # [option, value?] or [positional]
    for t in tokens:
        if spans and spans[-1][0].startswith("--") and len(spans[-1]) == 1 and not t.startswith("--"):
            spans[-1].append(t)
        else:
            spans.append([t])
    last = {s[0]: s for s in spans if s[0].startswith("--")}
    out, seen, repeated = [], set(), []
    for s in spans:
        if not s[0].startswith("--"):
            out.append(s)
        elif s[0] in seen:
            if s[0] not in repeated:
                repeated.append(s[0])
        else:
            seen.add(s[0])
            out.append(last[s[0]])
    return " ".join(" ".join(s) for s in out), repeated


def about_md(name: str, cfg: ResNeXtConfig, meta: dict, source: str | None = None) -> str:
    """The About tab's text for a checkpoint: its layout, recorded accuracy, how it was trained, and which
    CIFAR-10 images the app shows (`source` None: none)."""
    acc = meta.get("accuracy")
    md = [architecture_text(name, cfg)]
    if isinstance(acc, (int, float)):
        md.append(f"CIFAR-10 test accuracy recorded in the checkpoint: **{100 * acc:.2f} %**"
                  + (f" ({meta['data']['test_images']} images)" if isinstance(meta.get("data"), dict)
                     and meta["data"].get("test_images") else "") + ".")
    if meta.get("command"):
        # paths inside the project as the docs write them (relative), wherever the run happened
        command, repeated = effective_command(re.sub(r"(?<=\s)/\S*?/(runs|weights)/", r"\1/", str(meta["command"])))
        md.append(f"Trained with `{command}`" + (f" on {meta['device']}" if meta.get("device") else "")
                  + (f" (the run's command gave {', '.join(f'`{o}`' for o in repeated)} more than once; shown is "
                     "the last value, the one that took effect)" if repeated else "") + ".")
    init = meta.get("init_from")
    if isinstance(init, dict):  # a warm restart: its curve covers this run only
        prev = init.get("accuracy")
        md.append(f"That run started from another checkpoint (sha256 `{str(init.get('sha256'))[:12]}…`"
                  + (f", {init.get('epochs')} epochs, {100 * prev:.2f} %" if isinstance(prev, (int, float)) else "")
                  + "); the curve shows the second run only.")
    teachers = meta.get("teachers")
    if isinstance(teachers, list) and teachers:  # distilled: its targets were other models' predictions
        named = [f"`{t.get('model')}`" + (f" ({100 * t['accuracy']:.2f} %)" if isinstance(t.get("accuracy"), (int, float))
                                          else "") for t in teachers if isinstance(t, dict)]
        tta = " and their mirror images" if meta.get("recipe", {}).get("teacher_tta") else ""
        md.append(f"It learned from the mean softmax of {len(named)} teacher checkpoint"
                  f"{'s' if len(named) != 1 else ''} on its training images{tta} (distillation): "
                  + ", ".join(named) + ".")
    lineage = meta.get("lineage")
    if isinstance(lineage, list) and lineage:  # a chain of runs (e.g. distillation generations): name each
        steps = [f"{i + 1}. {step.get('what')}" + (f" — {100 * step['accuracy']:.2f} %" if isinstance(
            step.get("accuracy"), (int, float)) else "") for i, step in enumerate(lineage) if isinstance(step, dict)]
        md.append("How it came to be (the metadata's `lineage`, one run per line):\n\n" + "\n".join(steps))
    if not meta.get("history"):
        md.append("This checkpoint has no training history.")
    if source is not None:
        md.append(f"CIFAR-10 images in this app: {source}.")
    return "\n\n".join(md)


def ood_table(meta: dict) -> pd.DataFrame:
    """The unfamiliar-image detector's measured flagged share and AUROC per image set (empty when none)."""
    ev = (meta.get("familiarity") or {}).get("evaluation") or {}
    rows = [{"images": k, "kind": v["kind"], "n": v["n"], "flagged %": round(100 * v["flagged"], 1),
             "AUROC": v["auroc"]} for k, v in (ev.get("sets") or {}).items()]
    return pd.DataFrame(rows, columns=["images", "kind", "n", "flagged %", "AUROC"])


def read_sweep(path: str | Path = weights.SWEEP_RESULTS) -> dict | None:
    """The shipped cardinality sweep's results (`python -m resnext_demo.sweep collect`), or None when there is
    none, it is unreadable, or it has no rows."""
    try:
        results = json.loads(Path(path).read_text())
        table = sweep_table(results)  # every row holds what the views read
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return results if len(table) else None


def sweep_table(results: dict) -> pd.DataFrame:
    """One row per C of a sweep's results (read_sweep's dict): mean ± its 95 % CI over seeds when the analysis
    computed one (else ± half the range), and the paired difference to C = 1."""
    def row(r: dict) -> dict:
        ci = "top1_ci95" in r
        vs = (r.get("vs_base") or {}).get("paired_t")
        return {"C": r["C"], "d": r["d"], "model": r["model"], "params (M)": r["params_M"], "MFLOPs": r["MFLOPs"],
                "top-1 % (mean ± 95 % CI)" if ci else "top-1 % (mean ± half-range)":
                f"{100 * r['top1_mean']:.2f} ± {100 * r.get('top1_ci95', r['top1_spread']):.2f}",
                "vs C = 1 (paired, points)": f"{100 * vs['diff']:+.2f} ± {100 * vs['ci95']:.2f}" if vs else "",
                "seeds": len(r["seeds"]), "epochs": r["epochs"]}
    return pd.DataFrame([row(r) for r in results["rows"]])


def sweep_md(results: dict) -> str:
    """The words above the sweep table: what was trained, how, and what it shows against its noise."""
    rows = results["rows"]
    how = f", {rows[0]['epochs']} epochs each on {rows[0].get('device') or 'an unrecorded device'}"
    verdict = f"**{results['verdict']}**" if results.get("verdict") else verdicts.sweep_md(results)
    ref = results.get("reference")
    dense = (f" The dense net these widths are matched to (`{ref['model']}`, plain 3×3 convs) scores "
             f"{100 * ref['top1_mean']:.2f} % with the same recipe." if ref else "")
    return ("**Cardinality sweep** (`weights/sweep/results.json`): models of one parameter and FLOP budget at "
            f"different C, trained with the same recipe{how}. " + verdict + dense)
