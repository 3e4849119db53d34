"""Attributions: which pixels mattered for a class, by one Captum method or two side by side, each with its
deletion test (how faithful the map is to the model)."""
from __future__ import annotations

from types import SimpleNamespace

import gradio as gr

from .. import explain, report, visualize
from ..predict import predict
from .context import (HEAVY_EVENT, PRIVATE, SLOW, Context, ImageInput, Page, decode, deletion_score, layer_choices,
                      target_index, unfamiliar_note)
from .serving import SessionModel, friendly, require_image

PARAMS = ("steps", "baseline", "samples", "noise", "layer", "window", "stride")  # the controls' order
MAX_STEPS = 128  # the steps slider's maximum: past it, the convergence line advises another baseline
# The overlay's alpha grows with |value| on the map's scale (saturating at the 98th percentile, as Captum's):
# at 0.5 Integrated Gradients' many mid-sized pixels were barely tinted; 0.7 shows them and keeps the photo.
DEFAULT_OPACITY = 0.7


def method_params(method: str, steps: int, baseline: str, samples: int, noise: float, layer: str | None,
                  window: int, stride: int) -> dict:
    """The UI controls that `method` uses, as explain.attribute keyword arguments."""
    given = {"steps": int(steps), "baseline": baseline, "samples": int(samples), "noise": float(noise),
             "layer": layer or None, "window": int(window), "stride": int(stride)}
    return {k: v for k, v in given.items() if k in explain.default_params(method)}


def param_visibility(method: str):
    """Show only the controls that `method` uses (steps, baseline, samples, noise, layer, window, stride)."""
    keys = explain.default_params(method) if method in explain.METHODS else {}
    return tuple(gr.update(visible=k in keys) for k in PARAMS)


def _explain(ctx: Context, image, methods: tuple[str, ...], target: str | None, params: tuple,
             session: SessionModel | None, signed: bool):
    """(32x32 picture, one explain.Attribution per method, the unfamiliar note, each map's words)."""
    require_image(image)
    sm = ctx.active(session)
    im32, x = decode(image)
    pred = predict(sm.model, im32, sm.classes)  # once: the target and the unfamiliar note
    t = target_index(sm, target, pred)
    attrs = [explain.attribute(sm.model, x, m, t, **method_params(m, *params)) for m in methods]
    words = [report.attribution_md(a, sm.classes, signed, deletion_score(sm, x, a.values, a.target), MAX_STEPS)
             for a in attrs]
    return im32, attrs, unfamiliar_note(sm, pred), words


@friendly
def attribute(ctx: Context, image, method: str, target: str = "predicted", signed: bool = True,
              opacity: float = DEFAULT_OPACITY,
              steps: int = 32, baseline: str = "black", samples: int = 16, noise: float = 0.15,
              layer: str | None = None, window: int = 8, stride: int = 4, session: SessionModel | None = None):
    """(overlay image, markdown with target, raw range and any note) for one method."""
    im32, attrs, note, words = _explain(ctx, image, (method,), target,
                                        (steps, baseline, samples, noise, layer, window, stride), session, bool(signed))
    return visualize.attribution_panels(attrs, im32, signed=bool(signed), opacity=float(opacity)), note + words[0]


@friendly
def compare(ctx: Context, image, method_a: str, method_b: str, target: str = "predicted", signed: bool = True,
            opacity: float = DEFAULT_OPACITY, steps: int = 32, baseline: str = "black", samples: int = 16,
            noise: float = 0.15, layer: str | None = None, window: int = 8, stride: int = 4,
            session: SessionModel | None = None):
    """Two methods on the same image and target, one above the other: (A's panels, A's markdown, B's panels,
    B's markdown); A goes to the main view, so it always shows the method the Method dropdown names."""
    im32, attrs, note, words = _explain(ctx, image, (method_a, method_b), target,
                                        (steps, baseline, samples, noise, layer, window, stride), session, bool(signed))
    a, b = (visualize.attribution_panels([x], im32, signed=bool(signed), opacity=float(opacity)) for x in attrs)
    return a, note + words[0], b, words[1]


def _controls(p: Page) -> SimpleNamespace:
    """The left column: image, method, target, display and the methods' parameters."""
    layers, c = layer_choices(p.base_model), SimpleNamespace()
    c.image = ImageInput(type="filepath", format="png", label="Image", elem_id="at-image")
    c.method = gr.Dropdown(list(explain.METHODS), value=explain.METHODS[0], label="Method", elem_id="at-method")
    c.target = gr.Dropdown(["predicted"] + list(p.classes), value="predicted", label="Target class")
    with gr.Row():
        c.signed = gr.Checkbox(value=True, label="Signed (red +, blue −); off = absolute")
        c.opacity = gr.Slider(0, 1, value=DEFAULT_OPACITY, step=0.05, label="Overlay opacity")
    with gr.Accordion("Parameters", open=True):  # only the chosen method's are visible
        c.params = [
            gr.Slider(4, MAX_STEPS, value=32, step=1, label="Steps (Integrated Gradients)"),
            gr.Dropdown(list(explain.BASELINES), value="black", label="Baseline (IG, DeepLift, Occlusion)"),
            gr.Slider(2, 64, value=16, step=1, label="Samples (SmoothGrad)", visible=False),
            gr.Slider(0.0, 1.0, value=0.15, step=0.01, label="Noise level (SmoothGrad)", visible=False),
            gr.Dropdown(layers, value=layers[-1][1] if layers else None,
                        label="Layer (Grad-CAM; the last stage unless you choose)", visible=False),
            gr.Slider(2, 16, value=8, step=1, label="Window (Occlusion)", visible=False),
            gr.Slider(1, 16, value=4, step=1, label="Stride (Occlusion)", visible=False)]  # PARAMS' order
    c.layer = c.params[PARAMS.index("layer")]
    c.btn = gr.Button("Explain", variant="primary", elem_id="at-btn")
    with gr.Row():
        c.method_b = gr.Dropdown(list(explain.METHODS), value="Grad-CAM", label="Compare with")
        c.cmp_btn = gr.Button("Compare side by side", elem_id="at-cmp-btn")
    return c


def build(p: Page) -> SimpleNamespace:
    """Lay out the Attributions tab and wire its events; returns the components other tabs link to."""
    with gr.Row():
        with gr.Column(scale=1):
            c = _controls(p)
        with gr.Column(scale=3):  # wide: three ~280 px panels per method (image | map | overlay)
            out = gr.Image(label="Attribution", show_label=False, interactive=False, elem_id="at-out")
            md = gr.Markdown(elem_id="at-md")
            with gr.Column(visible=False, elem_id="at-cmp-box") as cmp_box:  # shown by "Compare side by side"
                cmp = gr.Image(label="Compared with", show_label=False, interactive=False, elem_id="at-cmp")
                cmp_md = gr.Markdown(elem_id="at-cmp-md")
    shared = [c.image, c.target, c.signed, c.opacity]
    c.method.change(param_visibility, c.method, c.params, **PRIVATE, queue=False)
    # a single map hides the comparison (it was of other settings); "Compare" shows it
    c.btn.click(lambda: gr.update(visible=False), None, cmp_box, **PRIVATE, queue=False)
    c.btn.click(p.gpu(attribute, SLOW), [c.image, c.method, *shared[1:], *c.params, p.session], [out, md],
                api_name="attribute", **HEAVY_EVENT)
    c.cmp_btn.click(p.gpu(compare, SLOW), [c.image, c.method, c.method_b, *shared[1:], *c.params, p.session],
                    [out, md, cmp, cmp_md], api_name="compare", **HEAVY_EVENT
                    ).success(lambda: gr.update(visible=True), None, cmp_box, **PRIVATE, queue=False)
    return SimpleNamespace(image=c.image, layer=c.layer, target=c.target)
