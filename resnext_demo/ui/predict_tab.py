"""Predict: an upload, paste, webcam shot or test image -> calibrated top-k classes, the 32x32 the model sees,
and how far to believe the answer; the sample gallery and the misclassified examples."""
from __future__ import annotations

from types import SimpleNamespace

import gradio as gr
import numpy as np
import torch

from .. import data, finetune, report
from ..predict import predict_batch
from .context import (HEAVY_EVENT, PREDICT_EVENT, PRIVATE, QUICK, Context, ImageInput, Page, n_heldin,
                      require_cifar, to_pil32, upscale)
from .serving import GPU_SECONDS, SessionModel, friendly, require_image

N_SAMPLES = 20  # sample gallery: two test images per class
MISCLASSIFIED_SLICE = 500  # test images scanned for the "misclassified examples" view
MISCLASSIFIED_SHOW = 24


def top_k(probs: dict[str, float], k: int) -> dict[str, float]:
    """The k most probable classes of a (sorted) probability dict; at least one."""
    return dict(list(probs.items())[:max(1, int(k))])


@friendly
def predict_label(ctx: Context, image, k: int = 3, session: SessionModel | None = None) -> dict[str, float]:
    """API /predict: image in, top-k {class: probability} out."""
    require_image(image, "Upload an image first.")
    sm = ctx.active(session)
    return top_k(ctx.batcher.predict(sm.model, image, sm.classes).probs, k)


@friendly
def predict_full(ctx: Context, image, k: int = 3, session: SessionModel | None = None, truth: dict | None = None):
    """Predict tab: (top-k label dict, the 32x32 the model sees upscaled, markdown with time/device/truth)."""
    require_image(image, "Upload an image, paste one, use the webcam, or pick a sample.")
    sm = ctx.active(session)
    p = ctx.batcher.predict(sm.model, image, sm.classes)
    return top_k(p.probs, k), upscale(p.image32), report.prediction_md(p, truth, n_heldin(sm))


@friendly
def predict_details(ctx: Context, image, session: SessionModel | None = None) -> dict:
    """API /predict_details: every class's calibrated probability, the temperature, and the unfamiliar-image
    flag with its score, threshold and rarity (None where the checkpoint has no detector)."""
    require_image(image, "Upload an image first.")
    sm = ctx.active(session)
    p = ctx.batcher.predict(sm.model, image, sm.classes)
    fam = getattr(sm.model, "familiarity", None)
    return {"top_class": p.top_class, "probabilities": p.probs, "temperature": p.temperature,
            "unfamiliar": p.unfamiliar if fam is not None else None, "score": p.score,
            "threshold": fam.threshold if fam is not None else None, "rarity": p.rarity}


def auto_predict(ctx: Context, image, k: int = 3, session: SessionModel | None = None, truth: dict | None = None):
    """predict_full after a user change; a cleared image clears the outputs instead of an error, and an
    unreadable one clears them too (the old answer is not this image's) with the reason as a toast and in the
    text, instead of leaving the outputs in an error state that Clear does not reset."""
    if image is None:
        return None, None, ""
    try:
        return predict_full(ctx, image, k, session, truth)
    except gr.Error as e:  # only a user error becomes gr.Error (serving.friendly); a bug keeps its traceback
        gr.Warning(e.message)
        return None, None, f"**No prediction:** {e.message}"


def sample_gallery(ctx: Context):
    """Gallery of test images with true labels, or a message on how to get a data source."""
    split = ctx.test_split()
    if split is None:
        return gr.Gallery(value=[], visible=False), ctx.data_help()
    x, y = split
    idx = list(range(min(N_SAMPLES, len(y))))  # interleaved classes: the first 20 hold 2 per class
    items = [(upscale(to_pil32(x[i]), 96), f"#{i} {data.CLASSES[int(y[i])]}") for i in idx]
    return gr.Gallery(value=items, visible=True), report.gallery_md(len(items), ctx.source_label())


def load_sample(ctx: Context, index: int):
    """(32x32 image, truth dict) of test image `index`."""
    x, y = ctx.require_test()
    index = int(index) % len(y)
    return to_pil32(x[index]), {"index": index, "label": data.CLASSES[int(y[index])]}


def select_sample(ctx: Context, evt: gr.SelectData):
    """Sample gallery click -> load that image (the first N_SAMPLES test images)."""
    return load_sample(ctx, evt.index)


def random_sample(ctx: Context):
    """A random test image with its true label."""
    return load_sample(ctx, int(np.random.default_rng().integers(len(ctx.require_test()[1]))))


def misclassified_seconds(ctx: Context, *args, **kwargs) -> int:
    """ZeroGPU booking of the misclassified scan; nothing to book without test images."""
    return GPU_SECONDS if ctx.test_split() is not None else 0


@friendly
def misclassified(ctx: Context, session: SessionModel | None = None, progress=gr.Progress()):
    """Misclassified images among the first MISCLASSIFIED_SLICE test images: (gallery, indices, markdown)."""
    split = ctx.test_split()
    if split is None:
        return [], [], ctx.data_help()
    sm = ctx.active(session)
    require_cifar(sm, "This session's model does not use the CIFAR-10 classes, so CIFAR-10 errors are not defined.")
    x, y = split[0][:MISCLASSIFIED_SLICE], split[1][:MISCLASSIFIED_SLICE]
    progress(0, desc=f"classifying {len(y)} test images")
    probs = predict_batch(sm.model, x)
    pred = probs.argmax(1)
    wrong = torch.nonzero(pred != y).flatten().tolist()
    shown = wrong[:MISCLASSIFIED_SHOW]
    items = [(upscale(to_pil32(x[i]), 96), report.misclassified_caption(
              data.CLASSES[int(y[i])], sm.classes[int(pred[i])], float(probs[i, pred[i]]))) for i in shown]
    return items, shown, report.misclassified_md(len(wrong), len(y), len(shown))


def select_misclassified(ctx: Context, indices: list[int], evt: gr.SelectData):
    """Misclassified gallery click -> load that test image."""
    return load_sample(ctx, indices[evt.index])


def _unselect(n: int):
    """An event function returning `n` gallery updates that clear the highlighted pick."""
    return (lambda: gr.Gallery(selected_index=None)) if n == 1 else (lambda: [gr.Gallery(selected_index=None)] * n)


def _layout(p: Page) -> SimpleNamespace:
    """The tab's components."""
    ctx, test = p.ctx, p.ctx.test_split()
    n_scan = min(MISCLASSIFIED_SLICE, len(test[1])) if test is not None else MISCLASSIFIED_SLICE
    c = SimpleNamespace()
    with gr.Row():
        with gr.Column():
            c.image = ImageInput(type="filepath", format="png", sources=["upload", "clipboard", "webcam"],
                                 label="Image (any size; it is centre-cropped and shrunk to 32×32)",
                                 height=320, elem_id="predict-image")
            # The API accepts k up to a fine-tuned model's class count; the page shows the model's own
            # (set on load and on every model switch, see demo.model_controls).
            c.k = gr.Slider(1, len(p.classes) + finetune.MAX_NEW_CLASSES, value=3, step=1,
                            label="Top-k classes shown", elem_id="predict-k")
            with gr.Row():
                c.predict_btn = gr.Button("Classify", variant="primary", elem_id="predict-btn")
                c.random_btn = gr.Button("Random test image", elem_id="random-btn")
        with gr.Column():
            c.label = gr.Label(label="Prediction", elem_id="predict-label")
            c.seen = gr.Image(label="What the model sees (32×32, enlarged)", interactive=False,
                              format="png", elem_id="predict-seen")
            c.info = gr.Markdown(elem_id="predict-info")
    c.gallery_md = gr.Markdown(report.NO_DATA_HELP if ctx.data_source is None else "Loading CIFAR-10 samples…",
                               elem_id="gallery-md")
    c.gallery = gr.Gallery(label="CIFAR-10 test samples (true label in the caption)", columns=10,
                           visible=ctx.data_source is not None, height=260, allow_preview=False,
                           elem_id="sample-gallery")
    with gr.Accordion("Misclassified examples", open=False):
        c.mis_btn = gr.Button(f"Find misclassified images among the first {n_scan} test images")
        c.mis_md = gr.Markdown()
        c.mis_gallery = gr.Gallery(columns=6, height="auto", allow_preview=False,  # captions fit
                                   label="Misclassified: true → predicted, confidence")
    c.api_btn = gr.Button(visible=False)  # carries the stable /predict endpoint
    c.details_btn = gr.Button(visible=False)  # carries /predict_details
    c.details = gr.JSON(visible=False)
    return c


def build(p: Page) -> SimpleNamespace:
    """Lay out the Predict tab and wire its events; returns the components other tabs link to (image, k)."""
    c = _layout(p)
    predict = p.gpu(predict_full, QUICK)
    inputs, outputs = [c.image, c.k, p.session, p.truth], [c.label, c.seen, c.info]

    def then_classify(event) -> None:
        event.then(predict, inputs, outputs, **PRIVATE, **PREDICT_EVENT)

    c.predict_btn.click(predict, inputs, outputs, api_name="classify", **PREDICT_EVENT)
    # any user change (upload, paste, webcam snapshot, clear) forgets the sample's true label and re-predicts
    c.image.input(lambda: None, None, p.truth, **PRIVATE, queue=False) \
        .then(p.gpu(auto_predict, QUICK), inputs, outputs, **PRIVATE, **PREDICT_EVENT)
    # a new top-k (slider, its number box, a model switch) re-classifies the image shown (nothing without one)
    c.k.change(p.gpu(auto_predict, QUICK), inputs, outputs, **PRIVATE, **PREDICT_EVENT)
    c.api_btn.click(p.gpu(predict_label, QUICK), [c.image, c.k, p.session], c.label, api_name="predict",
                    **PREDICT_EVENT, api_description="Classify one image: image file in, the top-k {class: "
                    "probability} out (k defaults to 3). Stable endpoint for gradio_client.")
    c.details_btn.click(p.gpu(predict_details, QUICK), [c.image, p.session], c.details, api_name="predict_details",
                        **PREDICT_EVENT, api_description="Classify one image with everything needed to judge the "
                        "answer: every class's calibrated probability, the temperature, and whether the image looks "
                        "unfamiliar (flag, score, threshold, and the share of CIFAR-10 test images that score as high).")
    then_classify(c.random_btn.click(p.bind(random_sample), None, [c.image, p.truth], api_name="random_sample"))
    then_classify(c.gallery.select(p.bind(select_sample), None, [c.image, p.truth], **PRIVATE))
    c.mis_btn.click(p.gpu(misclassified, p.bind(misclassified_seconds)), p.session, [c.mis_gallery, p.mis_indices, c.mis_md],
                    api_name="misclassified", **HEAVY_EVENT)
    then_classify(c.mis_gallery.select(p.bind(select_misclassified), p.mis_indices, [c.image, p.truth], **PRIVATE))
    # A gallery's highlight says "this is the image shown": an image from anywhere else clears it.
    for event, galleries in ((c.image.input, [c.gallery, c.mis_gallery]),
                             (c.random_btn.click, [c.gallery, c.mis_gallery]),
                             (c.gallery.select, [c.mis_gallery]), (c.mis_gallery.select, [c.gallery])):
        event(_unselect(len(galleries)), None, galleries, **PRIVATE, queue=False)
    if p.ctx.data_source is not None:
        p.demo.load(p.bind(sample_gallery), None, [c.gallery, c.gallery_md], **PRIVATE)
    p.demo.load(lambda: gr.update(maximum=len(p.classes)), None, c.k, **PRIVATE, queue=False)
    return SimpleNamespace(image=c.image, k=c.k)
