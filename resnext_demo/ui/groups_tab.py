"""Groups (cardinality): one block's C paths for one image (importance, knock-outs, where each looks, each map's
deletion test), a live knock-out, specialization over the test set, and a checkpoint comparison."""
from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import numpy as np
import pandas as pd
import torch
from PIL import Image

from .. import charts, data, explain, report, specialization, visualize, weights
from .. import groups as cardinality  # not 'groups': knockout()'s argument of that name would shadow the module
from ..model import count_params
from ..predict import predict
from .context import (HEAVY_EVENT, PRIVATE, QUICK, SLOW, Context, ImageInput, Page, block_choices, contrast_index,
                      decode, deletion_score, grouped_layer, require_cifar, target_index, unfamiliar_note)
from .serving import GPU_SECONDS, SessionModel, friendly, require_image, user_error

SPECIALIZATION_GPU_SECONDS = 60  # group statistics over the test images when not cached yet (seconds on a GPU)
_SPEC_LOCK = threading.Lock()  # two sessions asking for one checkpoint's specialization compute it once
TABLE_COLUMNS = ["group", "importance", "p after knock-out", "drop", "top-1 after knock-out", "Grad-CAM max",
                 "deletion drop (random · best model-blind)", "faithful?"]
TABLE_WIDTHS = ["8%", "13%", "9%", "10%", "12%", "11%", "18%", "19%"]  # TABLE_COLUMNS' shares of the width
COMPARE_FIXED = ["shared model", "this session's model", "uploaded checkpoint"]


@friendly
def analyse(ctx: Context, image, layer: str, target: str = "predicted", contrast: str = "none",
            method: str = cardinality.GROUP_METHODS[0], mode: str = "zero", session: SessionModel | None = None,
            progress=gr.Progress()):
    """Everything about one block's groups for one image: (importance figure, knock-out figure,
    per-group table, group Grad-CAM grid, markdown); the page names each analysis as it runs."""
    require_image(image)
    if method not in cardinality.GROUP_METHODS:
        raise user_error(f"Choose a method among {', '.join(cardinality.GROUP_METHODS)}.")
    if mode not in cardinality.ABLATIONS:
        raise user_error(f"Choose a knock-out among {', '.join(cardinality.ABLATIONS)}.")
    sm = ctx.active(session)
    layer = grouped_layer(sm, layer)
    im32, x = decode(image)
    pred = predict(sm.model, im32, sm.classes)
    t = target_index(sm, target, pred)
    c = contrast_index(sm, contrast, t, pred.probs)
    a = cardinality.analyse_groups(sm.model, x, layer, t, method, c, mode,
                                   on_step=lambda fraction, what: progress(fraction, desc=what))
    progress(0.9, desc="drawing")
    md = unfamiliar_note(sm, pred) + report.groups_md(layer, pred, a.importance, a.ablation, a.deletions, sm.classes,
                                                      t, c, method, mode, cardinality.CONDUCTANCE_TOL)
    return (charts.group_importance_figure(a.importance, sm.classes),
            charts.ablation_figure(a.ablation, sm.classes),
            report.groups_table(a.importance, a.ablation, a.cams, a.deletions, sm.classes, t),
            visualize.group_cam_grid(a.cams, im32), md)


def group_choices(ctx: Context, layer: str | None, session: SessionModel | None = None):
    """Knock-out checkboxes for the chosen block of the session's model: one per group, none ticked."""
    if session is None and ctx.base is None:
        return gr.update()
    sm = ctx.active(session)
    try:
        g = explain.groups_of(sm.model, grouped_layer(sm, layer))
    except gr.Error:
        return gr.update(choices=[], value=[])
    return gr.update(choices=[(f"g{i}", i) for i in range(g)], value=[])


@friendly
def knockout(ctx: Context, image, layer: str, groups: list | None = None, mode: str = "zero", k: int = 3,
             session: SessionModel | None = None):
    """Live knock-out of the ticked groups: (top-k label, markdown of what changed)."""
    require_image(image)
    sm = ctx.active(session)
    layer = grouped_layer(sm, layer)
    n = explain.groups_of(sm.model, layer)
    groups = sorted(int(g) for g in (groups or []))
    if any(not 0 <= g < n for g in groups):  # boxes left from another model's block
        raise user_error(f"This block has {n} groups (g0–g{n - 1}): untick the others.")
    _, x = decode(image)
    base = cardinality.ablate_groups(sm.model, x, layer, [], mode)
    probs = cardinality.ablate_groups(sm.model, x, layer, groups, mode)
    label = {sm.classes[i]: float(probs[i]) for i in np.argsort(-probs)[:max(1, int(k))]}
    return label, report.knockout_md(layer, groups, mode, base, probs, sm.classes)


def specialization_seconds(ctx: Context, layer: str | None = None, session: SessionModel | None = None,
                           *args, **kwargs) -> int:
    """ZeroGPU booking: short when the specialization is cached (shipped or computed before), long to compute;
    0 without data."""
    sm = session or ctx.base
    if sm is None or ctx.test_split() is None:
        return 0
    return GPU_SECONDS if specialization.specialization_ready(sm.model, ctx.data_source) else SPECIALIZATION_GPU_SECONDS


@friendly
def specialize(ctx: Context, layer: str, session: SessionModel | None = None, progress=gr.Progress()):
    """Group specialization over the test set (computed once per checkpoint, cached on disk):
    (figure, top-9 montage, markdown)."""
    if ctx.data_source is None:
        raise user_error("Group specialization is measured on CIFAR-10 test images. " + report.NO_DATA_HELP)
    sm = ctx.active(session)
    layer = grouped_layer(sm, layer)
    require_cifar(sm, "Specialization is measured on CIFAR-10: this session's model uses other classes.")
    progress(0, desc=f"group statistics over {specialization.SPECIALIZATION_IMAGES} test images, for this model and "
                     f"{len(specialization.CONTROL_SEEDS)} untrained copies (once per checkpoint)")
    with _SPEC_LOCK:
        spec = specialization.specialization_cached(
            sm.model, ctx.data_source, on_step=lambda i, n, what: progress(i / n, desc=f"step {i + 1}/{n}: {what}"))
    s = spec[layer]
    split = ctx.require_test()
    montage = visualize.image_montage(split[0][torch.as_tensor(s.top_images)],
                                      [f"g{i} {data.CLASSES[int(c)][:5]}" for i, c in enumerate(s.preferred_class)])
    md = report.specialization_md(layer, s, min(specialization.SPECIALIZATION_IMAGES, len(split[1])),
                                  ctx.source_label())
    return charts.specialization_figure(s, data.CLASSES), montage, md


def shipped_checkpoints() -> list[str]:
    """Every shipped checkpoint but the default (e.g. the interim micro model, the sweep's models), by its path
    under weights/."""
    return sorted(str(p.relative_to(weights.WEIGHTS_DIR)) for p in
                  [*weights.WEIGHTS_DIR.glob("*.safetensors"), *(weights.WEIGHTS_DIR / "sweep").rglob("*.safetensors")]
                  if p != weights.DEFAULT_WEIGHTS and not p.name.endswith(".resume.safetensors"))


def model_b(ctx: Context, choice: str, file, session: SessionModel | None) -> SessionModel:
    """The model B of a comparison: the shared model, the session's, an uploaded or a shipped checkpoint."""
    if choice == "shared model":
        return ctx.active(None)
    if choice == "this session's model":
        if session is None:
            raise user_error("This session uses the shared model: fine-tune one or load a checkpoint first.")
        return session
    if choice == "uploaded checkpoint":
        if not file:
            raise user_error("Choose a .safetensors checkpoint to compare with.")
        model, meta = weights.load_checkpoint(file)
        return SessionModel(model, meta, list(meta["classes"]), Path(file).name)
    if choice in shipped_checkpoints():  # only listed names: never an arbitrary path
        model, meta = weights.load_checkpoint(weights.WEIGHTS_DIR / choice)
        return SessionModel(model, meta, list(meta["classes"]), choice)
    raise user_error(f"Unknown model {choice!r}.")


def _compare_side(tag: str, sm: SessionModel, im32: Image.Image, x: torch.Tensor, target: str | None):
    """One side of a checkpoint comparison: (top-5 label, Grad-CAM image, group importance figure, markdown)."""
    pred = predict(sm.model, im32, sm.classes)
    t = target_index(sm, target, pred, who=tag)
    layer = list(sm.model.grouped_convs())[-1]
    cam = explain.attribute(sm.model, x, "Grad-CAM", t)
    gi = cardinality.group_importance(sm.model, x, layer, t)
    md = report.compare_md(tag, sm.name, sm.model.config.cardinality, count_params(sm.model), pred,
                           sm.classes[t], layer, deletion_score(sm, x, cam.values, t))
    return (dict(list(pred.probs.items())[:5]), visualize.attribution_image(cam, im32, signed=False, opacity=0.6),
            charts.group_importance_figure(gi, sm.classes), md)


@friendly
def compare_models(ctx: Context, image, other: str = "shared model", file=None, target: str = "predicted",
                   session: SessionModel | None = None):
    """This session's model (A) vs another (B) on one image: (label A, label B, Grad-CAM A, Grad-CAM B,
    importance A, importance B, markdown). Each model explains its own top class unless a class is chosen."""
    require_image(image)
    a, b = ctx.active(session), model_b(ctx, other, file, session)
    im32, x = decode(image)
    (la, ca, ga, ma), (lb, cb, gb, mb) = (_compare_side(tag, sm, im32, x, target) for tag, sm in (("A", a), ("B", b)))
    return la, lb, ca, cb, ga, gb, f"{ma}\n\n{mb}"


def _analysis_controls(p: Page, blocks: list) -> SimpleNamespace:
    """The left column: image, block, classes, method, knock-out mode, button."""
    c = SimpleNamespace()
    c.image = ImageInput(type="filepath", format="png", label="Image", elem_id="gr-image")
    c.layer = gr.Dropdown(blocks, value=blocks[-1][1] if blocks else None,
                          label="Block (its grouped 3×3 conv)", elem_id="gr-layer")
    c.target = gr.Dropdown(["predicted"] + list(p.classes), value="predicted", label="Class explained",
                           elem_id="gr-target")
    c.contrast = gr.Dropdown(["none", "runner-up"] + list(p.classes), value="none",
                             label="…rather than (counterfactual)",
                             info="explain the margin over another class: which groups argue for it?")
    c.method = gr.Radio(list(cardinality.GROUP_METHODS), value=cardinality.GROUP_METHODS[0],
                        label="Importance method", info="Conductance also measures what flows through the shortcut, "
                        "with its convergence error (slower: up to 512 steps)")
    c.mode = gr.Radio(list(cardinality.ABLATIONS), value="zero", label="Knock-out",
                      info="zero = remove the path; mean = keep its average, erase where it fired")
    c.btn = gr.Button("Analyse the groups", variant="primary", elem_id="gr-btn")
    return c


def _analysis_outputs() -> SimpleNamespace:
    """The right column: the summary, three figures and the per-group table."""
    c = SimpleNamespace()
    c.md = gr.Markdown(elem_id="gr-md")
    c.importance = gr.Image(label="Group importance (green = for, red = against)", interactive=False,
                            elem_id="gr-importance")
    c.cams = gr.Image(label="Group-restricted Grad-CAM: where did each group look?",
                      show_label=False,  # the figure has its title; the badge hid panels'
                      interactive=False, elem_id="gr-cams")
    c.ablation = gr.Image(label="Knock out each group in turn", interactive=False, elem_id="gr-ablation")
    c.table = gr.Dataframe(pd.DataFrame(columns=TABLE_COLUMNS),
                           label="Per group: importance, knock-out effect, Grad-CAM, faithfulness",
                           interactive=False, wrap=True, elem_id="gr-table",
                           # every column inside the ~800 px panel (the verdict last, widest) and no inner
                           # scrolling up to 32 groups: rows of two wrapped lines are ~60 px
                           column_widths=TABLE_WIDTHS, max_height=2400)
    return c


def _knockout_panel(p: Page, n_groups: int) -> SimpleNamespace:
    """The live knock-out: tick groups, see the prediction without them."""
    c = SimpleNamespace()
    with gr.Accordion("Live knock-out: tick groups to remove them", open=True):
        with gr.Row():
            c.knock = gr.CheckboxGroup(choices=[(f"g{i}", i) for i in range(n_groups)], value=[],
                                       label="Groups knocked out", elem_id="gr-knock")
            c.knock_label = gr.Label(label="Prediction with these groups removed", num_top_classes=3,
                                     elem_id="gr-knock-label")
        c.knock_md = gr.Markdown(elem_id="gr-knock-md")
    return c


def _specialization_panel(p: Page) -> SimpleNamespace:
    """Specialization over the test set: the button and its three outputs."""
    c, has_data = SimpleNamespace(), p.ctx.data_source is not None
    with gr.Accordion("Specialization over the test set (once per checkpoint, cached)", open=False):
        c.spec_btn = gr.Button("Show group specialization for this block", elem_id="gr-spec-btn", interactive=has_data)
        c.spec_md = gr.Markdown("" if has_data else report.NO_DATA_HELP, elem_id="gr-spec-md")
        c.spec = gr.Image(label="Class preference, correlation between groups, colour vs shape",
                          interactive=False, elem_id="gr-spec")
        c.montage = gr.Image(label="The 9 test images that most activate each group", interactive=False,
                             elem_id="gr-montage")
    return c


def compare_panel(p: Page, image: gr.Image, target: gr.Dropdown) -> SimpleNamespace:
    """The checkpoint comparison: this session's model (A) and another checkpoint (B) on the tab's image; returns
    the choice of B and its file (the Lab opens its two models here)."""
    shipped = shipped_checkpoints()
    with gr.Row():
        other = gr.Dropdown(COMPARE_FIXED + shipped, value=shipped[0] if shipped else "shared model",
                            label="Model B (model A = the one this session uses)", elem_id="cmp-other")
        file = gr.File(label="Checkpoint B (.safetensors), for 'uploaded checkpoint'",
                       file_count="single", file_types=[".safetensors"], height=150)
        btn = gr.Button("Compare", elem_id="cmp-btn")
    md = gr.Markdown(elem_id="cmp-md")
    # Column headings instead of image labels: a label badge covered the charts' titles.
    outputs = {}
    with gr.Row():
        for side, heading in (("a", "**A**: the model this session uses"), ("b", "**B**: the model chosen above")):
            heading += " — its top 5, Grad-CAM at the last stage, each group's importance in the last block"
            with gr.Column():
                gr.Markdown(heading)
                outputs[side] = (
                    gr.Label(label=f"{side.upper()}: prediction", num_top_classes=5, elem_id=f"cmp-label-{side}"),
                    gr.Image(label=f"{side.upper()}: Grad-CAM (last stage)", interactive=False, show_label=False,
                             elem_id=f"cmp-cam-{side}"),
                    gr.Image(label=f"{side.upper()}: group importance (last block)", interactive=False,
                             show_label=False, elem_id=f"cmp-gi-{side}"))
    (label_a, cam_a, gi_a), (label_b, cam_b, gi_b) = outputs["a"], outputs["b"]
    btn.click(p.gpu(compare_models, SLOW), [image, other, file, target, p.session],
              [label_a, label_b, cam_a, cam_b, gi_a, gi_b, md], api_name="compare_models", **HEAVY_EVENT)
    return SimpleNamespace(other=other, file=file, accordion=None)


def build(p: Page, k: gr.Slider) -> SimpleNamespace:
    """Lay out the Groups tab and wire its events (the live knock-out shows the Predict tab's top-k `k`);
    returns the components other tabs link to."""
    blocks = block_choices(p.base_model)
    gr.Markdown(report.GROUPS_TEXT)
    with gr.Row():
        with gr.Column(scale=1):
            c = _analysis_controls(p, blocks)
        with gr.Column(scale=2):
            o = _analysis_outputs()
    ko = _knockout_panel(p, explain.groups_of(p.base_model, blocks[-1][1]) if blocks else 0)
    sp = _specialization_panel(p)
    with gr.Accordion("Compare checkpoints on this image", open=False) as accordion:
        cmp = compare_panel(p, c.image, c.target)
    cmp.accordion = accordion

    c.btn.click(p.gpu(analyse, SLOW), [c.image, c.layer, c.target, c.contrast, c.method, c.mode, p.session],
                [o.importance, o.ablation, o.table, o.cams, o.md], api_name="groups", **HEAVY_EVENT)
    # the boxes follow the block (and a model switch, in demo.model_controls: it may keep the block's name)
    c.layer.change(p.bind(group_choices), [c.layer, p.session], ko.knock, **PRIVATE, queue=False)
    ko.knock.change(p.gpu(knockout, QUICK), [c.image, c.layer, ko.knock, c.mode, k, p.session],
                    [ko.knock_label, ko.knock_md], api_name="knockout", trigger_mode="always_last", **HEAVY_EVENT)
    sp.spec_btn.click(p.gpu(specialize, p.bind(specialization_seconds)), [c.layer, p.session], [sp.spec, sp.montage, sp.spec_md],
                      api_name="specialization", **HEAVY_EVENT)
    return SimpleNamespace(image=c.image, layer=c.layer, target=c.target, contrast=c.contrast, knock=ko.knock, compare=cmp)
