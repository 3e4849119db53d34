"""The whole page: one builder per tab (each in its own module, with its handlers) and the links between tabs,
made here in one place: the Predict image copied to the analysis tabs, a model switch re-fitting every tab's
layer, class and group lists, the page's model banner."""
from __future__ import annotations

import os
from pathlib import Path

import gradio as gr
import torch.nn as nn

from .. import data, finetune, report
from . import about_tab, attributions_tab, features_tab, finetune_tab, groups_tab, lab_tab, predict_tab
from .context import PRIVATE, Context, Page, block_choices, layer_choices
from .serving import QUEUE_MAX, SESSION_TTL, HEAVY_LIMIT, SessionModel, StopFlag, on_zero_gpu

# Pass to launch(theme=...): Gradio's default theme with the bold weight in place of the semibold one. The
# installed SourceSansPro-SemiBold.woff2 (and IBMPlexMono-SemiBold) hold only "A", "B" and some Cyrillic, so
# every semibold heading drew its A and B from that stub, thin and small ("CIFAR-10", "Grad-CAM"), and the
# other letters from a fallback. Weight 600 now resolves to the complete Bold files.
THEME = gr.themes.Default(
    font=[gr.themes.LocalFont("Source Sans Pro", weights=(400, 700)), "ui-sans-serif", "system-ui", "sans-serif"],
    font_mono=[gr.themes.LocalFont("IBM Plex Mono", weights=(400, 700)), "ui-monospace", "Consolas", "monospace"])

# Pass to launch(css=...) (Gradio 6 takes css there): 32x32 pictures are drawn large and with sharp pixels.
CSS = """
#predict-image img, #fm-image img, #at-image img, #gr-image img, #gr-montage img, #predict-seen img {
  image-rendering: pixelated; width: 100%; height: 100%; object-fit: contain;
}
#ft-curve, #lab-curve { display: none; }  /* the fine-tune's and the race's endpoint tables: drawn as images instead */
/* Drop zones are ~190 px wide: without the size/download column a file's name shows, not ".pn"; 190 px tall
   (finetune_tab) shows three files before the list scrolls, and the count line below gives the totals. */
.ft-zone .download { display: none !important; }
/* Gallery captions wrap inside their tile ("#1 automobile", not "#1 automo…"). */
#sample-gallery .caption-label { max-width: calc(100% - 8px); white-space: normal; overflow-wrap: anywhere; }
.ft-zone .file-preview td { padding-top: 2px !important; padding-bottom: 2px !important; }
/* Panel titles drawn at the top of these images sat under the label badge (left) and the toolbar (right). */
#fm-grid .image-frame, #at-out .image-frame, #at-cmp .image-frame { padding-top: 34px; }
/* The per-group table: 8 columns in the panel's width without cutting a number in two. */
#gr-table td, #gr-table th { font-size: 13px !important; padding-left: 5px !important; padding-right: 5px !important; }
/* Table headers break between words only ("importance", not "importanc e"). */
#gr-table th, #gr-table th *, #ab-sweep th, #ab-sweep th * { word-break: normal !important; overflow-wrap: normal !important; }
"""


def share_image(image):
    """The Predict tab's image for the Groups, Feature maps and Attributions tabs; an unreadable file empties them
    (they must not go on explaining the previous image as if it were the one shown)."""
    if image is None:
        return None, None, None
    try:
        data.open_image(image)
    except data.ImageError:  # the Predict handler already told the user why
        return None, None, None
    return image, image, image


def model_controls(ctx: Context, session: SessionModel | None):
    """Every control that depends on the session's model, re-fitted after a model switch: Feature maps layer,
    Grad-CAM layer, attribution target, Groups block, Groups target, Groups contrast, the knock-out boxes (the
    block keeps its name across models with other cardinalities), the Predict tab's top-k slider (at most the
    model's number of classes), then the Fine-tune tab's new-class names."""
    n_out = 8 + finetune.MAX_NEW_CLASSES
    if session is None and ctx.base is None:
        return (gr.update(),) * n_out
    sm = ctx.active(session)
    layers, blocks = layer_choices(sm.model), block_choices(sm.model)
    block = blocks[-1][1] if blocks else None
    classes = ["predicted"] + list(sm.classes)
    return (gr.update(choices=layers, value=layers[0][1] if layers else None),
            gr.update(choices=layers, value=layers[-1][1] if layers else None),  # Grad-CAM's default layer
            gr.update(choices=classes, value="predicted"),
            gr.update(choices=blocks, value=block),
            gr.update(choices=classes, value="predicted"),
            gr.update(choices=["none", "runner-up"] + list(sm.classes), value="none"),
            groups_tab.group_choices(ctx, block, session),
            gr.update(maximum=len(sm.classes), value=min(3, len(sm.classes))),
            *finetune_tab.new_class_names(ctx, session))


def _open_lab_models(p: Page, lab, gp, tabs: gr.Tabs):
    """The Lab's two models: A becomes this session's model, B the Groups comparison's checkpoint, and the page
    turns to the comparison; returns the event (a model switch)."""
    opened = lab.open_btn.click(p.bind(lab_tab.open_in_groups), p.lab,
                                [p.session, p.banner, gp.compare.other, gp.compare.file], **PRIVATE, queue=False)
    opened.success(lambda: (gr.Tabs(selected="groups"), gr.Accordion(open=True)), None,
                   [tabs, gp.compare.accordion], **PRIVATE, queue=False)
    return opened


def build_demo(model: nn.Module | None, meta: dict | None, data_source: str | None,
               weights_path: str | Path | None = None, load_error: str | None = None,
               max_seconds: float = finetune.MAX_SECONDS) -> gr.Blocks:
    """The whole app; `model` None shows how to get a checkpoint and keeps every tab alive."""
    if on_zero_gpu():
        max_seconds = min(max_seconds, finetune_tab.ZERO_GPU_TRAIN_SECONDS)
    ctx = Context(model, meta, data_source, weights_path, load_error, max_seconds)
    ctx.test_split()  # read once, before any ZeroGPU worker is forked (workers then inherit it)

    with gr.Blocks(title="ResNeXt on CIFAR-10") as demo:
        # every gr.State first: component ids name unlabeled outputs on the API page (the banner is `value_7`)
        states = dict(session=gr.State(None, time_to_live=SESSION_TTL),
                      pending=gr.State(None, time_to_live=SESSION_TTL, delete_callback=finetune_tab.delete_export),
                      stop_flag=gr.State(StopFlag()), truth=gr.State(None), mis_indices=gr.State([]),
                      lab=gr.State(None, time_to_live=SESSION_TTL, delete_callback=lab_tab.delete_exports),
                      race_flag=gr.State(StopFlag()))
        gr.Markdown(report.INTRO)
        p = Page(demo, ctx, **states, banner=gr.Markdown(ctx.model_banner(None), elem_id="model-banner"))
        with gr.Tabs() as tabs:
            with gr.Tab("Predict", id="predict"):
                pr = predict_tab.build(p)
            with gr.Tab("Groups (cardinality)", id="groups"):
                gp = groups_tab.build(p, k=pr.k)  # the live knock-out shows the Predict tab's top-k
            with gr.Tab("Feature maps (per group)", id="features"):
                fm = features_tab.build(p)
            with gr.Tab("Attributions", id="attributions"):
                at = attributions_tab.build(p)
            with gr.Tab("Fine-tune", id="finetune"):
                ft = finetune_tab.build(p)  # its model switches write this session's model and the banner above
            with gr.Tab("Lab (race two C)", id="lab"):
                lab = lab_tab.build(p)
            with gr.Tab("About the architecture", id="about"):
                about_tab.build(p)

        # ---------------------------------------------------------------- the links between tabs
        # one input image for the three analysis tabs: copy it over whenever it changes
        pr.image.change(share_image, pr.image, [gp.image, fm.image, at.image], **PRIVATE, queue=False)
        # after a model switch every control that depends on the model fits the session's model
        controls = [fm.layer, at.layer, at.target, gp.layer, gp.target, gp.contrast, gp.knock, pr.k, *ft.new_names]
        opened = _open_lab_models(p, lab, gp, tabs)
        for switch in [*ft.model_switches, opened]:
            switch.success(p.bind(model_controls), p.session, controls, **PRIVATE)

    # Gradio's queue re-summarises its last 10,000 events in a pandas table after every event, for a monitoring
    # page this app does not open (GRADIO_ANALYTICS_CACHE_FREQUENCY=1): ~5 % of the server's GIL in the load test.
    os.environ.setdefault("GRADIO_ANALYTICS_CACHE_FREQUENCY", "1000")
    demo.queue(max_size=QUEUE_MAX, default_concurrency_limit=HEAVY_LIMIT)
    demo.ctx = ctx  # for tests and the screenshot script
    return demo
