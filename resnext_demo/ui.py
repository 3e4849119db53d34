"""The Gradio app: Predict · Groups (cardinality) · Feature maps (per group) · Attributions · Fine-tune · About.

`build_demo` composes one builder per tab (each creates its components and wires its events) and makes the
links between tabs in one place: the Predict image copied to the analysis tabs, a model switch re-fitting every
tab's layer and class lists, the page's model banner. Handlers live in `handlers`, the words and tables they
return in `report`, the queues, ZeroGPU bookings and per-session state in `serving`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import pandas as pd
import torch.nn as nn

from . import data, explain, finetune, report, serving
from . import groups as cardinality  # the name handlers.py uses (a 'groups' argument would shadow it there)
from .handlers import MISCLASSIFIED_SLICE, Handlers, grouped_dropdown_choices, layer_dropdown_choices
from .serving import (GPU_SECONDS, GPU_SECONDS_QUICK, HEAVY, HEAVY_LIMIT, PREDICT_LIMIT, PREDICT_POOL, QUEUE_MAX,
                      SESSION_TTL, TRAIN_LIMIT, TRAIN_POOL, ZERO_GPU_TRAIN_SECONDS, StopFlag, delete_pending, if_image,
                      on_zero_gpu)
from .serving import MAX_FILE_SIZE  # noqa: F401  (app.py launches with it, next to CSS)

HEAVY_EVENT = {"concurrency_id": HEAVY, "concurrency_limit": HEAVY_LIMIT}  # every model-running event but…
PREDICT_EVENT = {"concurrency_id": PREDICT_POOL, "concurrency_limit": PREDICT_LIMIT}  # …predictions: their own lane
QUICK, SLOW = if_image(GPU_SECONDS_QUICK), if_image(GPU_SECONDS)  # ZeroGPU bookings of image events
PRIVATE = {"api_visibility": "private"}  # page-only events: no endpoint for gradio_client

# Pass to launch(css=...) (Gradio 6 takes css there): 32x32 pictures are drawn large and with sharp pixels.
CSS = """
#predict-image img, #fm-image img, #at-image img, #gr-image img, #gr-montage img, #predict-seen img {
  image-rendering: pixelated; width: 100%; height: 100%; object-fit: contain;
}
#ft-curve { display: none; }  /* the fine-tune endpoint's table: drawn as #ft-plot instead */
/* Drop zones are ~190 px wide: without the size/download column a file's name shows, not ".pn"; 190 px tall
   (ui.finetune_tab) shows three files before the list scrolls, and the count line below gives the totals. */
.ft-zone .download { display: none !important; }
.ft-zone .file-preview td { padding-top: 2px !important; padding-bottom: 2px !important; }
/* Table headers break between words only ("importance", not "importanc e"). */
#gr-table th, #gr-table th *, #ab-sweep th, #ab-sweep th * { word-break: normal !important; overflow-wrap: normal !important; }
"""


def ImageInput(**kwargs) -> gr.Image:  # noqa: N802 (used like a component class)
    """A gr.Image input that hands the uploaded file to our decoder untouched.

    gr.Image opens uploads with PIL and converts their mode itself before any handler runs, so broken
    files got Gradio's raw message and transparency / 16-bit were converted its way. Here the file
    path goes straight to data.open_image / data.to_rgb (pixel limits, EXIF, white background,
    16-bit scaling, human messages). A factory, not a subclass: Gradio writes a .pyi stub next to the
    source file of every Component subclass at import time (and fails on a read-only file system).
    """
    comp = gr.Image(**kwargs)
    gradio_preprocess = comp.preprocess

    def preprocess(payload):
        if payload is None or (payload.url and payload.url.startswith("data:")) or payload.path is None:
            return gradio_preprocess(payload)  # inline base64 (some webcam paths): Gradio decodes it
        return str(payload.path)

    comp.preprocess = preprocess
    return comp


@dataclass
class Page:
    """What every tab uses: the handlers, the per-session states and the page's model banner."""

    demo: gr.Blocks
    h: Handlers
    session: gr.State  # this session's model; None = the shared model
    pending: gr.State  # a fine-tuned model waiting for "Use this model"
    stop_flag: gr.State
    truth: gr.State  # the Predict tab's: the true label of a test image shown there
    mis_indices: gr.State  # the Predict tab's: test indices of the misclassified gallery
    banner: gr.Markdown

    @property
    def classes(self) -> list[str]:
        """The shared model's classes (CIFAR-10's without a model): the class lists until a model switch."""
        return self.h.base.classes if self.h.base else list(data.CLASSES)

    @property
    def base_model(self) -> nn.Module | None:
        """The shared model, whose layers fill the layer lists until a model switch."""
        return self.h.base.model if self.h.base else None

    def gpu(self, fn, duration):
        """`fn` booked on ZeroGPU for `duration` (see serving.gpu), the shared model moved onto the GPU first."""
        return serving.gpu(fn, duration, before=self.h.use_gpu)


def _unselect(n: int):
    """An event function returning `n` gallery updates that clear the highlighted pick."""
    return (lambda: gr.Gallery(selected_index=None)) if n == 1 else (lambda: [gr.Gallery(selected_index=None)] * n)


def predict_tab(p: Page) -> SimpleNamespace:
    """Predict: an upload, paste, webcam shot or test image -> top-k classes and the 32x32 the model sees."""
    h, test = p.h, p.h.test_split()
    n_scan = min(MISCLASSIFIED_SLICE, len(test[1])) if test is not None else MISCLASSIFIED_SLICE
    truth = p.truth
    with gr.Row():
        with gr.Column():
            image = ImageInput(type="filepath", format="png", sources=["upload", "clipboard", "webcam"],
                               label="Image (any size; it is centre-cropped and shrunk to 32×32)",
                               height=320, elem_id="predict-image")
            # The API accepts k up to a fine-tuned model's class count; the page shows the model's own
            # (set on load and on every model switch, see model_controls).
            k = gr.Slider(1, len(p.classes) + finetune.MAX_NEW_CLASSES, value=3, step=1, label="Top-k classes shown",
                          elem_id="predict-k")
            with gr.Row():
                predict_btn = gr.Button("Classify", variant="primary", elem_id="predict-btn")
                random_btn = gr.Button("Random test image", elem_id="random-btn")
        with gr.Column():
            label = gr.Label(label="Prediction", elem_id="predict-label")
            seen = gr.Image(label="What the model sees (32×32, enlarged)", interactive=False,
                            format="png", elem_id="predict-seen")
            info = gr.Markdown(elem_id="predict-info")
    gallery_md = gr.Markdown(report.NO_DATA_HELP if h.data_source is None else "Loading CIFAR-10 samples…",
                             elem_id="gallery-md")
    gallery = gr.Gallery(label="CIFAR-10 test samples (true label in the caption)", columns=10,
                         visible=h.data_source is not None, height=260, allow_preview=False, elem_id="sample-gallery")
    with gr.Accordion("Misclassified examples", open=False):
        mis_btn = gr.Button(f"Find misclassified images among the first {n_scan} test images")
        mis_md = gr.Markdown()
        mis_gallery = gr.Gallery(columns=6, height="auto", allow_preview=False,  # captions fit
                                 label="Misclassified: true → predicted, confidence")
    api_btn = gr.Button(visible=False)  # carries the stable /predict endpoint
    details_btn = gr.Button(visible=False)  # carries /predict_details
    details = gr.JSON(visible=False)

    predict_full = p.gpu(h.predict_full, QUICK)
    inputs, outputs = [image, k, p.session, truth], [label, seen, info]

    def then_classify(event) -> None:
        event.then(predict_full, inputs, outputs, **PRIVATE, **PREDICT_EVENT)

    predict_btn.click(predict_full, inputs, outputs, api_name="classify", **PREDICT_EVENT)
    # any user change (upload, paste, webcam snapshot, clear) forgets the sample's true label and re-predicts
    image.input(lambda: None, None, truth, **PRIVATE, queue=False) \
        .then(p.gpu(h.auto_predict, QUICK), inputs, outputs, **PRIVATE, **PREDICT_EVENT)
    # a new top-k (slider, its number box, a model switch) re-classifies the image shown (nothing without one)
    k.change(p.gpu(h.auto_predict, QUICK), inputs, outputs, **PRIVATE, **PREDICT_EVENT)
    api_btn.click(p.gpu(h.predict_label, QUICK), [image, k, p.session], label, api_name="predict", **PREDICT_EVENT,
                  api_description="Classify one image: image file in, the top-k {class: probability} out "
                                  "(k defaults to 3). Stable endpoint for gradio_client.")
    details_btn.click(p.gpu(h.predict_details, QUICK), [image, p.session], details, api_name="predict_details",
                      **PREDICT_EVENT, api_description="Classify one image with everything needed to judge the answer: "
                      "every class's calibrated probability, the temperature, and whether the image looks unfamiliar "
                      "(flag, score, threshold, and the share of CIFAR-10 test images that score as high).")
    then_classify(random_btn.click(h.random_sample, None, [image, truth], api_name="random_sample"))
    then_classify(gallery.select(h.select_sample, None, [image, truth], **PRIVATE))
    mis_btn.click(p.gpu(h.misclassified, h.misclassified_seconds), p.session, [mis_gallery, p.mis_indices, mis_md],
                  api_name="misclassified", **HEAVY_EVENT)
    then_classify(mis_gallery.select(h.select_misclassified, p.mis_indices, [image, truth], **PRIVATE))
    # A gallery's highlight says "this is the image shown": an image from anywhere else clears it.
    for event, galleries in ((image.input, [gallery, mis_gallery]), (random_btn.click, [gallery, mis_gallery]),
                             (gallery.select, [mis_gallery]), (mis_gallery.select, [gallery])):
        event(_unselect(len(galleries)), None, galleries, **PRIVATE, queue=False)
    if h.data_source is not None:
        p.demo.load(h.sample_gallery, None, [gallery, gallery_md], **PRIVATE)
    p.demo.load(lambda: gr.update(maximum=len(p.classes)), None, k, **PRIVATE, queue=False)
    return SimpleNamespace(image=image, k=k)


def groups_tab(p: Page, k: gr.Slider) -> SimpleNamespace:
    """Groups (cardinality): one block's C paths for one image (importance, knock-outs, where each looks), a live
    knock-out (top-k from the Predict tab's `k`), specialization over the test set, and a checkpoint comparison."""
    h, blocks = p.h, grouped_dropdown_choices(p.base_model)
    gr.Markdown(report.GROUPS_TEXT)
    with gr.Row():
        with gr.Column(scale=1):
            image = ImageInput(type="filepath", format="png", label="Image", elem_id="gr-image")
            layer = gr.Dropdown(blocks, value=blocks[-1][1] if blocks else None,
                                label="Block (its grouped 3×3 conv)", elem_id="gr-layer")
            target = gr.Dropdown(["predicted"] + list(p.classes), value="predicted", label="Class explained")
            contrast = gr.Dropdown(["none", "runner-up"] + list(p.classes), value="none",
                                   label="…rather than (counterfactual)",
                                   info="explain the margin over another class: which groups argue for it?")
            method = gr.Radio(list(cardinality.GROUP_METHODS), value=cardinality.GROUP_METHODS[0], label="Importance method",
                              info="Conductance also measures what flows through the shortcut, with "
                                   "its convergence error (slower: up to 512 steps)")
            mode = gr.Radio(list(cardinality.ABLATIONS), value="zero", label="Knock-out",
                            info="zero = remove the path; mean = keep its average, erase where it fired")
            btn = gr.Button("Analyse the groups", variant="primary", elem_id="gr-btn")
        with gr.Column(scale=2):
            md = gr.Markdown(elem_id="gr-md")
            importance = gr.Image(label="Group importance (green = for, red = against)",
                                  interactive=False, elem_id="gr-importance")
            cams = gr.Image(label="Group-restricted Grad-CAM: where did each group look?",
                            show_label=False,  # the figure has its title; the badge hid panels'
                            interactive=False, elem_id="gr-cams")
            ablation = gr.Image(label="Knock out each group in turn", interactive=False, elem_id="gr-ablation")
            table = gr.Dataframe(
                pd.DataFrame(columns=["group", "importance", "p after knock-out", "drop", "top-1 after knock-out",
                                      "Grad-CAM max", "deletion drop (random · best model-blind)", "faithful?"]),
                label="Per group: importance, knock-out effect, Grad-CAM, faithfulness",
                interactive=False, wrap=True, elem_id="gr-table")
    n_groups = explain.groups_of(p.base_model, blocks[-1][1]) if blocks else 0
    with gr.Accordion("Live knock-out: tick groups to remove them", open=True):
        with gr.Row():
            knock = gr.CheckboxGroup(choices=[(f"g{i}", i) for i in range(n_groups)], value=[],
                                     label="Groups knocked out", elem_id="gr-knock")
            knock_label = gr.Label(label="Prediction with these groups removed", num_top_classes=3,
                                   elem_id="gr-knock-label")
        knock_md = gr.Markdown(elem_id="gr-knock-md")
    with gr.Accordion("Specialization over the test set (once per checkpoint, cached)", open=False):
        spec_btn = gr.Button("Show group specialization for this block", elem_id="gr-spec-btn",
                             interactive=h.data_source is not None)
        spec_md = gr.Markdown(report.NO_DATA_HELP if h.data_source is None else "", elem_id="gr-spec-md")
        spec = gr.Image(label="Class preference, correlation between groups, colour vs shape",
                        interactive=False, elem_id="gr-spec")
        montage = gr.Image(label="The 9 test images that most activate each group", interactive=False,
                           elem_id="gr-montage")
    with gr.Accordion("Compare checkpoints on this image", open=False):
        compare_panel(p, image, target)

    btn.click(p.gpu(h.groups, SLOW), [image, layer, target, contrast, method, mode, p.session],
              [importance, ablation, table, cams, md], api_name="groups", **HEAVY_EVENT)
    layer.change(h.group_choices, [layer, p.session], knock, **PRIVATE, queue=False)
    knock.change(p.gpu(h.knockout, QUICK), [image, layer, knock, mode, k, p.session], [knock_label, knock_md],
                 api_name="knockout", trigger_mode="always_last", **HEAVY_EVENT)
    spec_btn.click(p.gpu(h.specialization, h.specialization_seconds), [layer, p.session], [spec, montage, spec_md],
                   api_name="specialization", **HEAVY_EVENT)
    return SimpleNamespace(image=image, layer=layer, target=target, contrast=contrast)


def compare_panel(p: Page, image: gr.Image, target: gr.Dropdown) -> None:
    """The Groups tab's comparison: this session's model (A) and another checkpoint (B) on the tab's image."""
    with gr.Row():
        other = gr.Dropdown(p.h.compare_choices(), value="shared model",
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
    btn.click(p.gpu(p.h.compare_models, SLOW), [image, other, file, target, p.session],
              [label_a, label_b, cam_a, cam_b, gi_a, gi_b, md], api_name="compare_models", **HEAVY_EVENT)


def features_tab(p: Page) -> SimpleNamespace:
    """Feature maps (per group): one layer's maps for one image, each group in its own panel."""
    layers = layer_dropdown_choices(p.base_model)
    gr.Markdown(report.FEATURES_TEXT)
    with gr.Row():
        with gr.Column(scale=1):
            image = ImageInput(type="filepath", format="png", label="Image", elem_id="fm-image")
            layer = gr.Dropdown(choices=layers, value=layers[0][1] if layers else None, label="Layer", elem_id="fm-layer")
            view = gr.Radio(["channels", "summary"], value="channels", label="View",
                            info="each group's channels, or one summary map per group")
            scale = gr.Radio(["channel", "group", "layer"], value="group", label="Colour scale per")
            shown = gr.Radio([("after BN + ReLU (what the next layer receives)", "activation"),
                              ("conv output, before BN", "conv")], value="activation",
                             label="Grouped conv shown", elem_id="fm-shown")
            btn = gr.Button("Show feature maps", variant="primary", elem_id="fm-btn")
        with gr.Column(scale=2):
            grid = gr.Image(label="Feature maps by group", interactive=False, elem_id="fm-grid")
            md = gr.Markdown()
            stats = gr.Image(label="Per-group statistics", interactive=False, elem_id="fm-stats")
    btn.click(p.gpu(p.h.feature_maps, SLOW), [image, layer, view, scale, p.session, shown], [grid, md, stats],
              api_name="feature_maps", **HEAVY_EVENT)
    return SimpleNamespace(image=image, layer=layer)


def attributions_tab(p: Page) -> SimpleNamespace:
    """Attributions: which pixels mattered for a class, by one Captum method or two side by side."""
    h, layers = p.h, layer_dropdown_choices(p.base_model)
    with gr.Row():
        with gr.Column(scale=1):
            image = ImageInput(type="filepath", format="png", label="Image", elem_id="at-image")
            method = gr.Dropdown(list(explain.METHODS), value=explain.METHODS[0], label="Method", elem_id="at-method")
            target = gr.Dropdown(["predicted"] + list(p.classes), value="predicted", label="Target class")
            with gr.Row():
                signed = gr.Checkbox(value=True, label="Signed (red +, blue −); off = absolute")
                opacity = gr.Slider(0, 1, value=0.5, step=0.05, label="Overlay opacity")
            with gr.Accordion("Parameters", open=True):  # only the chosen method's are visible
                steps = gr.Slider(4, 128, value=32, step=1, label="Steps (Integrated Gradients)")
                baseline = gr.Dropdown(list(explain.BASELINES), value="black", label="Baseline (IG, DeepLift, Occlusion)")
                samples = gr.Slider(2, 64, value=16, step=1, label="Samples (SmoothGrad)", visible=False)
                noise = gr.Slider(0.0, 1.0, value=0.15, step=0.01, label="Noise level (SmoothGrad)", visible=False)
                layer = gr.Dropdown(layers, value=layers[-1][1] if layers else None,
                                    label="Layer (Grad-CAM; the last stage unless you choose)", visible=False)
                window = gr.Slider(2, 16, value=8, step=1, label="Window (Occlusion)", visible=False)
                stride = gr.Slider(1, 16, value=4, step=1, label="Stride (Occlusion)", visible=False)
            btn = gr.Button("Explain", variant="primary", elem_id="at-btn")
            with gr.Row():
                method_b = gr.Dropdown(list(explain.METHODS), value="Grad-CAM", label="Compare with")
                cmp_btn = gr.Button("Compare side by side", elem_id="at-cmp-btn")
        with gr.Column(scale=3):  # wide: three ~280 px panels per method (image | map | overlay)
            out = gr.Image(label="Attribution", show_label=False, interactive=False, elem_id="at-out")
            md = gr.Markdown(elem_id="at-md")
            cmp = gr.Image(label="Comparison", show_label=False, interactive=False, elem_id="at-cmp")
            cmp_md = gr.Markdown()
    params = [steps, baseline, samples, noise, layer, window, stride]  # Handlers.method_params' order
    method.change(h.param_visibility, method, params, **PRIVATE, queue=False)
    btn.click(p.gpu(h.attribute, SLOW), [image, method, target, signed, opacity, *params, p.session], [out, md],
              api_name="attribute", **HEAVY_EVENT)
    cmp_btn.click(p.gpu(h.compare, SLOW), [image, method, method_b, target, signed, opacity, *params, p.session],
                  [cmp, cmp_md], api_name="compare", **HEAVY_EVENT)
    return SimpleNamespace(image=image, layer=layer, target=target)


def finetune_tab(p: Page) -> SimpleNamespace:
    """Fine-tune: train this session's own copy on uploads (+ CIFAR-10), use it, download it or load one."""
    h = p.h
    gr.Markdown(report.finetune_intro(h.max_seconds))
    zones = []
    for row in (data.CLASSES[:5], data.CLASSES[5:]):
        with gr.Row():
            for c in row:
                zones.append(gr.File(file_count="multiple", file_types=["image"], label=c, height=190,
                                     elem_id=f"zone-{c}", elem_classes=["ft-zone"]))
    new_names, new_zones = [], []
    with gr.Accordion("New classes (optional)", open=False):
        with gr.Row():
            for i in range(finetune.MAX_NEW_CLASSES):
                with gr.Column():
                    new_names.append(gr.Textbox(label=f"New class {i + 1} name", elem_id=f"new-name-{i}"))
                    new_zones.append(gr.File(file_count="multiple", file_types=["image"], height=150,
                                             label=f"New class {i + 1} images", elem_id=f"new-zone-{i}",
                                             elem_classes=["ft-zone"]))
    counts = gr.Markdown(report.upload_counts_md({}), elem_id="ft-counts")
    with gr.Row():
        cifar = gr.Slider(0, max(1, h.cifar_subset_max()), value=0, step=1,
                          label="…and/or CIFAR-10 images (per class, 0 = none)" + (
                              ": test images of the sample pack set aside for this, never scored"
                              if data.is_sample_pack(h.data_source) else ": a subset of the training split"),
                          interactive=h.data_source is not None)
        layers = gr.Radio(list(finetune.TRAIN_LAYERS), value="head", label="What to train",
                          info="head = classifier only; last_stage = layer3 + head; all = every layer")
    with gr.Row():
        epochs = gr.Slider(1, finetune.MAX_EPOCHS, value=3, step=1, label="Epochs", elem_id="ft-epochs")
        lr = gr.Number(value=0.01, label="Learning rate", minimum=1e-5, maximum=1.0, elem_id="ft-lr")
        bs = gr.Slider(1, finetune.MAX_BATCH_SIZE, value=32, step=1, label="Batch size")
    with gr.Row():
        train = gr.Button("Train", variant="primary", elem_id="ft-train")
        stop = gr.Button("Stop", variant="stop", elem_id="ft-stop")
    status = gr.Markdown(elem_id="ft-status")
    # The API returns the curve as a table (curve); the page draws it on two axes (plot). The table is
    # rendered but hidden by CSS: an unrendered component fires no change event.
    plot = gr.Image(label="Loss and accuracy", show_label=False, interactive=False, elem_id="ft-plot")
    curve = gr.Dataframe(interactive=False, elem_id="ft-curve")
    result = gr.Markdown(elem_id="ft-result")
    with gr.Row():
        use = gr.Button("Use this model (this session only)", elem_id="ft-use")
        reset = gr.Button("Back to the shared model")
        download = gr.DownloadButton("Download fine-tuned checkpoint (.safetensors)", value=None, elem_id="ft-download")
    ckpt = gr.File(label="Continue from an exported checkpoint (.safetensors)", file_count="single", elem_id="ft-ckpt")

    inputs = [p.session, p.stop_flag, cifar, layers, epochs, lr, bs, *zones, *new_names, *new_zones]
    # arm the stop flag at the click (unqueued), so a Stop pressed while the job waits in the queue counts
    train.click(h.arm, p.stop_flag, None, **PRIVATE, queue=False) \
        .then(p.gpu(h.finetune, h.finetune_seconds), inputs, [status, curve, result, download, p.pending],
              api_name="finetune", concurrency_id=TRAIN_POOL, concurrency_limit=TRAIN_LIMIT)
    stop.click(h.stop, p.stop_flag, status, api_name="stop", queue=False)
    curve.change(h.curve_image, curve, plot, **PRIVATE, queue=False)
    gr.on([z.change for z in zones + new_zones] + [n.change for n in new_names], h.upload_counts,
          [*zones, *new_names, *new_zones], counts, **PRIVATE, queue=False)
    # the three ways this session changes model; build_demo re-fits the other tabs after each
    switches = [use.click(h.use_model, p.pending, [p.session, p.banner], api_name="use_model"),
                reset.click(h.reset_model, None, [p.session, p.banner], api_name="reset_model"),
                ckpt.upload(h.load_checkpoint, ckpt, [p.session, p.banner], api_name="load_checkpoint")]
    return SimpleNamespace(model_switches=switches)


def about_tab(p: Page) -> None:
    """About the architecture: the loaded model's block, its equal-budget siblings, its curve, the sweep."""
    h = p.h
    gr.Markdown(report.ABOUT_TEXT)
    md = gr.Markdown(elem_id="ab-md")
    stage = gr.Slider(0, max(1, len(p.base_model.config.depths) - 1) if p.base_model else 2, value=0, step=1,
                      label="Stage (0-based) drawn")
    diagram = gr.Image(label="One block of the loaded model", show_label=False,  # titled figure
                       interactive=False, elem_id="ab-diagram")
    with gr.Row():
        table = gr.Dataframe(label="Same budget, other cardinalities (computed by the code)",
                             interactive=False, wrap=True)
        curve = gr.Image(label="Training curve of the loaded checkpoint", interactive=False, elem_id="ab-curve")
    sweep_md = gr.Markdown()
    sweep = gr.Dataframe(label="Cardinality sweep results", interactive=False, visible=False, elem_id="ab-sweep")
    sweep_plot = gr.Image(label="Accuracy vs cardinality at one budget", interactive=False,
                          visible=False, elem_id="ab-sweep-plot")
    with gr.Accordion("How far to believe an answer: calibration and unfamiliar images", open=True):
        trust_md = gr.Markdown(elem_id="ab-trust-md")
        reliability = gr.Image(label="Reliability on the reporting images, before and after calibration",
                               interactive=False, elem_id="ab-reliability", height=420)
        ood = gr.Dataframe(label="Unfamiliar-image check, measured per image set", interactive=False,
                           wrap=True, max_height=600, elem_id="ab-ood")
    btn = gr.Button("Refresh", elem_id="ab-btn")

    p.demo.load(h.sweep, None, [sweep, sweep_md, sweep_plot], **PRIVATE)
    outputs = [diagram, table, curve, md]
    btn.click(h.about, [p.session, stage], outputs, api_name="about")
    stage.release(h.about, [p.session, stage], outputs, **PRIVATE)
    btn.click(h.trust, p.session, [reliability, ood, trust_md], api_name="trust")
    if h.base is not None:
        p.demo.load(h.about, [p.session, stage], outputs, **PRIVATE)
        p.demo.load(h.trust, p.session, [reliability, ood, trust_md], **PRIVATE)


def build_demo(model: nn.Module | None, meta: dict | None, data_source: str | None,
               weights_path: str | Path | None = None, load_error: str | None = None,
               max_seconds: float = finetune.MAX_SECONDS) -> gr.Blocks:
    """The whole app; `model` None shows how to get a checkpoint and keeps every tab alive."""
    if on_zero_gpu():
        max_seconds = min(max_seconds, ZERO_GPU_TRAIN_SECONDS)
    h = Handlers(model, meta, data_source, weights_path, load_error, max_seconds)
    h.test_split()  # read once, before any ZeroGPU worker is forked (workers then inherit it)

    with gr.Blocks(title="ResNeXt on CIFAR-10") as demo:
        # every gr.State first: component ids name unlabeled outputs on the API page (the banner is `value_7`)
        states = dict(session=gr.State(None, time_to_live=SESSION_TTL),
                      pending=gr.State(None, time_to_live=SESSION_TTL, delete_callback=delete_pending),
                      stop_flag=gr.State(StopFlag()), truth=gr.State(None), mis_indices=gr.State([]))
        gr.Markdown(report.INTRO)
        p = Page(demo, h, **states, banner=gr.Markdown(h.model_banner(None), elem_id="model-banner"))
        with gr.Tabs():
            with gr.Tab("Predict", id="predict"):
                pr = predict_tab(p)
            with gr.Tab("Groups (cardinality)", id="groups"):
                gp = groups_tab(p, k=pr.k)  # the live knock-out shows the Predict tab's top-k
            with gr.Tab("Feature maps (per group)", id="features"):
                fm = features_tab(p)
            with gr.Tab("Attributions", id="attributions"):
                at = attributions_tab(p)
            with gr.Tab("Fine-tune", id="finetune"):
                ft = finetune_tab(p)  # its model switches write this session's model and the banner above
            with gr.Tab("About the architecture", id="about"):
                about_tab(p)

        # ---------------------------------------------------------------- the links between tabs
        # one input image for the three analysis tabs: copy it over whenever it changes
        pr.image.change(h.share_image, pr.image, [gp.image, fm.image, at.image], **PRIVATE, queue=False)
        # after a model switch every tab's layer and class lists fit the session's model (its layers, its classes)
        controls = [fm.layer, at.layer, at.target, gp.layer, gp.target, gp.contrast, pr.k]
        for switch in ft.model_switches:
            switch.success(h.model_controls, p.session, controls, **PRIVATE)

    demo.queue(max_size=QUEUE_MAX, default_concurrency_limit=HEAVY_LIMIT)
    demo.handlers = h  # for tests and the screenshot script
    return demo
