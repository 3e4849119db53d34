"""About the architecture: the loaded model's block, its equal-budget siblings, its training curve, the shipped
cardinality sweep, and how far to believe an answer (calibration, the unfamiliar-image check)."""
from __future__ import annotations

import functools
from pathlib import Path

import gradio as gr
import pandas as pd
from PIL import Image

from .. import charts, report, verdicts, weights
from .context import PRIVATE, Context, Page
from .serving import SessionModel, friendly


@functools.lru_cache(maxsize=4)
def _sweep_view(path: str, mtime_ns: int) -> tuple[pd.DataFrame, str, Image.Image] | None:
    """The sweep's table, words and plot, built once per results file (it runs on every page load;
    `mtime_ns` makes a rewritten file a new entry)."""
    results = report.read_sweep(path)
    if results is None:
        return None
    return report.sweep_table(results), report.sweep_md(results), charts.sweep_figure(results)


def sweep(path: str | Path = weights.SWEEP_RESULTS):
    """(table update, markdown, accuracy-vs-C plot update) of the shipped cardinality sweep (written by
    `python -m resnext_demo.sweep`); hidden when there is none."""
    p = Path(path)
    view = _sweep_view(str(p), p.stat().st_mtime_ns if p.is_file() else 0)
    if view is None:
        return gr.update(visible=False), "", gr.update(visible=False)
    table, md, figure = view
    return gr.update(value=table, visible=True), md, gr.update(value=figure, visible=True)


@friendly
def trust(ctx: Context, session: SessionModel | None = None):
    """How far to believe an answer: (reliability diagram or None, per-set table, markdown)."""
    sm = ctx.active(session)
    cal = getattr(sm.model, "calibration", None)
    rep = (cal or {}).get("reporting") or {}
    fig = charts.reliability_figure(rep["before"], rep["after"]) if rep.get("before") and rep.get("after") else None
    fam = getattr(sm.model, "familiarity", None)
    meta = {**sm.meta, "familiarity": fam.meta()} if fam is not None else sm.meta
    return fig, report.ood_table(meta if fam is not None else {}), verdicts.trust_md(meta, cal, fam is not None)


def about(ctx: Context, session: SessionModel | None = None, stage: int = 1):
    """(block diagram, equal-budget table, training curve or None, markdown) of the session's model; `stage`
    counts from 1 like the layer names (stage 2 = layer2) and the diagram's title."""
    sm = ctx.active(session)
    cfg = sm.model.config
    diagram = charts.block_diagram(cfg, stage=max(0, min(int(stage) - 1, len(cfg.depths) - 1)))
    table = report.equal_budget_table(cfg, (sm.meta.get("recipe") or {}).get("model"))
    hist = sm.meta.get("history") or []
    source = ctx.source_label() if ctx.test_split() is not None else None
    return (diagram, table, charts.curve_figure(hist) if hist else None,
            report.about_md(sm.name, cfg, sm.meta, source))


def build(p: Page) -> None:
    """Lay out the About tab and wire its events."""
    gr.Markdown(report.ABOUT_TEXT)
    md = gr.Markdown(elem_id="ab-md")
    stage = gr.Slider(1, max(2, len(p.base_model.config.depths)) if p.base_model else 3, value=1, step=1,
                      label="Stage drawn (stage 2 = the blocks named layer2.*)")
    diagram = gr.Image(label="One block of the loaded model", show_label=False,  # titled figure
                       interactive=False, elem_id="ab-diagram")
    with gr.Row():
        table = gr.Dataframe(label="Same budget, other cardinalities (computed by the code)",
                             interactive=False, wrap=True)
        curve = gr.Image(label="Training curve of the loaded checkpoint", interactive=False, elem_id="ab-curve")
    sweep_md = gr.Markdown()
    sweep_table = gr.Dataframe(label="Cardinality sweep results", interactive=False, visible=False, elem_id="ab-sweep")
    sweep_plot = gr.Image(label="Accuracy vs cardinality at one budget", interactive=False,
                          visible=False, elem_id="ab-sweep-plot")
    with gr.Accordion("How far to believe an answer: calibration and unfamiliar images", open=True):
        trust_md = gr.Markdown(elem_id="ab-trust-md")
        reliability = gr.Image(label="Reliability on the reporting images, before and after calibration",
                               interactive=False, elem_id="ab-reliability", height=420)
        ood = gr.Dataframe(label="Unfamiliar-image check, measured per image set", interactive=False,
                           wrap=True, max_height=600, elem_id="ab-ood")
    btn = gr.Button("Refresh", elem_id="ab-btn")

    p.demo.load(sweep, None, [sweep_table, sweep_md, sweep_plot], **PRIVATE)
    outputs = [diagram, table, curve, md]
    btn.click(p.bind(about), [p.session, stage], outputs, api_name="about")
    stage.release(p.bind(about), [p.session, stage], outputs, **PRIVATE)
    btn.click(p.bind(trust), p.session, [reliability, ood, trust_md], api_name="trust")
    if p.ctx.base is not None:
        p.demo.load(p.bind(about), [p.session, stage], outputs, **PRIVATE)
        p.demo.load(p.bind(trust), p.session, [reliability, ood, trust_md], **PRIVATE)
