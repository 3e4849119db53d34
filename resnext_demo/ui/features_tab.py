"""Feature maps (per group): one layer's maps for one image, each group of a grouped conv in its own panel."""
from __future__ import annotations

from types import SimpleNamespace

import gradio as gr

from .. import charts, data, explain, report, visualize
from ..predict import predict
from .context import HEAVY_EVENT, SLOW, Context, ImageInput, Page, layer_choices, unfamiliar_note
from .serving import SessionModel, friendly, require_image, user_error


@friendly
def feature_maps(ctx: Context, image, layer: str, view: str = "channels", scale: str = "group",
                 session: SessionModel | None = None, shown: str = "activation"):
    """(grid image, raw range markdown, per-group stats chart) for one layer; `shown` 'activation' (after BN +
    ReLU, what the next layer receives) or 'conv' (a grouped conv's raw output, before BN)."""
    require_image(image)
    sm = ctx.active(session)
    if layer not in [v for _, v in layer_choices(sm.model)]:
        raise user_error(f"Pick a layer from the list ({layer!r} is not a layer of this model).")
    im32 = data.prepare_image(image)
    groups = explain.groups_of(sm.model, layer)
    node, fmap, stats = explain.shown_maps(sm.model, data.normalize(data.pil_to_uint8(im32)), layer,
                                           before_bn=shown == "conv")
    grid, ranges = visualize.group_grid(explain.split_groups(fmap, groups), scale=scale, view=view)
    title = report.feature_maps_title(node, groups, tuple(fmap.shape))
    note = unfamiliar_note(sm, predict(sm.model, im32, sm.classes))
    return grid, note + report.feature_maps_md(title, node, layer, groups, scale, ranges), \
        charts.group_stats_figure(stats, title=title)


def build(p: Page) -> SimpleNamespace:
    """Lay out the Feature maps tab and wire its event; returns the components other tabs link to."""
    layers = layer_choices(p.base_model)
    gr.Markdown(report.FEATURES_TEXT)
    with gr.Row():
        with gr.Column(scale=1):
            image = ImageInput(type="filepath", format="png", label="Image", elem_id="fm-image")
            layer = gr.Dropdown(choices=layers, value=layers[0][1] if layers else None, label="Layer",
                                elem_id="fm-layer")
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
    btn.click(p.gpu(feature_maps, SLOW), [image, layer, view, scale, p.session, shown], [grid, md, stats],
              api_name="feature_maps", **HEAVY_EVENT)
    return SimpleNamespace(image=image, layer=layer)
