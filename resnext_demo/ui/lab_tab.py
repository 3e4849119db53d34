"""Lab: race two cardinalities of the equal-budget family from scratch, live, with the seed noise of the shipped sweep
behind the curves and a verdict; the two trained models become this session's to compare in Groups or download."""
from __future__ import annotations

import functools
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import pandas as pd
from PIL import Image

from .. import charts, data, race, report, verdicts, weights
from .context import PRIVATE, Context, Page
from .serving import SessionModel, StopFlag, friendly_gen, on_zero_gpu, user_error

RACE_POOL = "race"  # a race holds its slot for minutes: a pool of its own, one race at a time, the rest queue
RACE_LIMIT = 1
# ZeroGPU booking: both models' training images x epochs at the rate below, plus a test pass per epoch and a
# margin. The fast-recipe sweep on an H200 trained 65 runs x 7.6 epochs x 50,000 images in 381 s with 14 runs
# sharing the card (docs/training-fast.md): ~4,600 images/s per run, 0.00022 s an image; the rate is 1.4x that.
GPU_SECONDS_PER_TRAINING_IMAGE = 0.0003
RACE_GPU_MARGIN = 20
RACE_MIN_SECONDS = 10  # the least training time a booking allows (model builds and the first steps are slower)
ZERO_GPU_RACE_SECONDS = 120  # the longest booking a race may ask for
EXPORT_PREFIX = "resnext-race-"


def member_choices() -> list[tuple[str, str]]:
    """(label, name) for every member of the family: its C, d-free name, parameters and multiply-adds."""
    return [(f"C = {m.cardinality} · {m.name} · {m.params / 1e6:.2f} M params · {m.macs / 1e6:.0f} M MACs", n)
            for n, m in race.members().items()]


def budget_md(a: str, b: str) -> str:
    """The two chosen models' budgets side by side, and a warning when they are not within 5 %."""
    fam = race.members()
    if a not in fam or b not in fam:
        return ""
    ma, mb = fam[a], fam[b]
    gap = race.budget_gap(ma, mb)
    line = (f"**A** C = {ma.cardinality}: {ma.params:,} parameters, {ma.macs / 1e6:.1f} M MACs · **B** C = "
            f"{mb.cardinality}: {mb.params:,} parameters, {mb.macs / 1e6:.1f} M MACs · budgets within "
            f"{100 * gap:.1f} %")
    if gap > race.BUDGET_TOLERANCE:
        line += f"  \n⚠️ **Not an equal budget** (more than {100 * race.BUDGET_TOLERANCE:.0f} % apart): a gap says little about C."
    return line


def race_seconds(ctx: Context, lab, flag: StopFlag, a: str, b: str, train_per_class: int, test_per_class: int,
                 epochs: int) -> float:
    """A race's ZeroGPU booking (0 when it will not train: no data, or Stop pressed while it waited)."""
    if ctx.data_source is None or (flag.armed and flag.event.is_set()):
        return 0
    n = 2 * int(train_per_class or 0) * len(data.CLASSES) * int(epochs or 1)
    tests = 2 * int(test_per_class or 0) * len(data.CLASSES) * int(epochs or 1) / 3  # a test image ~ 1/3 a step
    return min(ZERO_GPU_RACE_SECONDS, max(RACE_MIN_SECONDS, (n + tests) * GPU_SECONDS_PER_TRAINING_IMAGE) + RACE_GPU_MARGIN)


def race_caps(ctx: Context) -> tuple[int, int]:
    """(training, test) images per class this server's CIFAR-10 has (0, 0 without any or when unreadable)."""
    if ctx.data_source is None:
        return 0, 0
    try:
        return race.available(ctx.data_source)
    except (OSError, ValueError):
        return 0, 0


def arm(flag: StopFlag) -> None:
    """The Race click, unqueued: a Stop pressed while the race waits in the queue is kept."""
    flag.arm()


def stop(flag: StopFlag) -> str:
    """Ask this session's race to stop after the current step (both models keep what they learned)."""
    flag.event.set()
    return "Stopping after the current step…"


def delete_exports(lab: tuple[SessionModel, SessionModel] | None) -> None:
    """Remove a race's exported files (also gr.State's delete_callback when a session expires)."""
    for sm in lab or ():
        if sm is not None and sm.path and Path(sm.path).parent.name.startswith(EXPORT_PREFIX):
            shutil.rmtree(Path(sm.path).parent, ignore_errors=True)


def _export(result: race.RaceResult) -> tuple[SessionModel, SessionModel]:
    """Both raced models written to a folder of their own, as this session's (model, metadata, file)."""
    folder, out = Path(tempfile.mkdtemp(prefix=EXPORT_PREFIX)), []
    for tag, r in (("A", result.a), ("B", result.b)):
        path = race.export(result, r, folder / f"race-{tag}-{r.member.name}.safetensors")
        model = r.model.cpu() if on_zero_gpu() else r.model  # back from a ZeroGPU worker: pickled, on the CPU
        out.append(SessionModel(model, weights.read_metadata(path), list(data.CLASSES),
                                f"Lab {tag}: {r.member.name}", str(path)))
    return out[0], out[1]


@functools.lru_cache(maxsize=2)
def _sweep(path: str, mtime_ns: int) -> dict | None:
    return report.read_sweep(path)


def sweep_results(path: str | Path = weights.SWEEP_RESULTS) -> dict | None:
    """The shipped sweep, read once per version of the file (the chart is redrawn every few seconds of a race)."""
    try:
        return _sweep(str(path), Path(path).stat().st_mtime_ns)
    except OSError:
        return None


def spreads(rows: list[dict]) -> dict[str, dict | None]:
    """The shipped sweep's seed-to-seed spread for each raced model (by its label in the curve)."""
    results = sweep_results()
    return {m.label: race.sweep_spread(results, m.cardinality) for m in race.members().values()
            if any(r["model"] == m.label for r in rows)}


def verdict(result: race.RaceResult) -> str:
    """The race's verdict against test-image and seed noise (verdicts.race_md)."""
    results = sweep_results()
    s = [race.sweep_spread(results, r.member.cardinality) for r in (result.a, result.b)]
    spread = max((x["range"] for x in s if x), default=None)
    epochs = len(result.a.history)
    return verdicts.race_md(result.a.member.label, result.accuracy(result.a), result.b.member.label,
                            result.accuracy(result.b), len(result.y), result.p, spread, result.n_train, epochs)


@friendly_gen
def run_race(ctx: Context, lab, flag: StopFlag, a: str, b: str, train_per_class: int, test_per_class: int,
             epochs: int):
    """Generator: (status, curve table, verdict, download A, download B, the two models as this session's)."""
    if flag.stopped_in_queue():
        yield "Stopped before the race started.", None, "", None, None, lab
        return
    opts = race.RaceOptions(a, b, int(train_per_class), int(test_per_class), int(epochs))
    device = ctx.device()
    opts.check(device.type)
    yield f"Loading {opts.train_per_class * 10:,} training and {opts.test_per_class * 10:,} test images…", None, "", None, None, lab
    train, test = race.race_data(ctx.data_source, opts)
    limit = race_seconds(ctx, lab, flag, a, b, train_per_class, test_per_class, epochs) - RACE_GPU_MARGIN \
        if on_zero_gpu() else race.MAX_SECONDS
    for u in race.race(opts, train, test, device, flag.event, limit):
        curve = pd.DataFrame(u.curve) if u.curve else None
        if u.kind == "done":
            break
        yield u.text, curve, "", None, None, lab
    res = u.result
    delete_exports(lab)  # the previous race's files: replaced
    pair = _export(res)
    status = (f"{'Stopped' if res.stopped else 'Finished'} after {res.seconds:.0f} s "
              f"({len(res.a.history)} epoch(s), batch {res.batch_size}).")
    yield status, curve, verdict(res), pair[0].path, pair[1].path, pair


def curve_image(curve: pd.DataFrame | None) -> Image.Image | None:
    """The race's table (the /race endpoint's curve) drawn, with the sweep's seed spread at the last epoch."""
    if curve is None or len(curve) == 0 or "series" not in curve.columns:
        return charts.race_figure([])
    curve = curve.copy()
    for col in ("epoch", "value"):  # the browser sends the table back as text
        curve[col] = pd.to_numeric(curve[col], errors="coerce")
    rows = curve.dropna(subset=["epoch"]).to_dict("records")
    return charts.race_figure(rows, spreads(rows))


def open_in_groups(ctx: Context, lab):
    """Model A becomes this session's model and model B the Groups tab's checkpoint to compare with:
    (session, banner, the compare dropdown, its file)."""
    if not lab:
        raise user_error("Race first: the two trained models are what Groups compares.")
    a, b = lab
    return a, ctx.model_banner(a), gr.update(value="uploaded checkpoint"), b.path


def slider_caps(ctx: Context) -> tuple[int, int]:
    """The training and test sliders' maxima per class: the server's caps, or what its CIFAR-10 holds if less."""
    cap = race.MAX_TRAIN_PER_CLASS.get(ctx.device().type, race.MAX_TRAIN_PER_CLASS["cpu"])
    have_train, have_test = race_caps(ctx)
    return max(10, min(cap, have_train)), max(10, min(race.MAX_TEST_PER_CLASS, have_test))


def _controls(p: Page, cap: int, test_cap: int) -> SimpleNamespace:
    """The two models, their budgets, the data (sliders up to `cap` / `test_cap` per class) and epochs, Race, Stop."""
    c, names = SimpleNamespace(), member_choices()
    with gr.Row():
        # min_width: on a phone the two lists stack instead of cutting their labels ("C = 8 · airbench9…")
        c.a = gr.Dropdown(names, value=race.DEFAULT_A, label="Model A", elem_id="lab-a", min_width=340)
        c.b = gr.Dropdown(names, value=race.DEFAULT_B, label="Model B", elem_id="lab-b", min_width=340)
    c.budget = gr.Markdown(budget_md(race.DEFAULT_A, race.DEFAULT_B), elem_id="lab-budget")
    with gr.Row():
        # a source with only 10 per class (or none) leaves nothing to choose: the slider shows 10, locked
        c.train = gr.Slider(10, max(cap, 20), value=min(race.DEFAULT_TRAIN_PER_CLASS, cap), step=10, elem_id="lab-train",
                            label="Training images per class (a balanced subset of CIFAR-10's training split)",
                            interactive=cap > 10)
        c.test = gr.Slider(10, max(test_cap, 20), value=min(race.DEFAULT_TEST_PER_CLASS, test_cap), step=10,
                           elem_id="lab-test", label="Test images per class (the same for both models)",
                           interactive=test_cap > 10)
        c.epochs = gr.Slider(1, race.MAX_EPOCHS, value=race.DEFAULT_EPOCHS, step=1, label="Epochs", elem_id="lab-epochs")
    with gr.Row():
        c.go = gr.Button("Race", variant="primary", elem_id="lab-race", interactive=p.ctx.data_source is not None)
        c.stop = gr.Button("Stop", variant="stop", elem_id="lab-stop")
    return c


def build(p: Page) -> SimpleNamespace:
    """Lay out the Lab tab and wire its events; returns the button that opens the two models in Groups and the
    session state holding them (demo links them to the Groups tab)."""
    cap, test_cap = slider_caps(p.ctx)
    gr.Markdown(report.lab_intro(race.MAX_SECONDS, p.ctx.data_source is not None, 10 * race.DEFAULT_TRAIN_PER_CLASS,
                                 10 * race.DEFAULT_TEST_PER_CLASS, race.DEFAULT_EPOCHS,
                                 cap if cap < race.DEFAULT_TRAIN_PER_CLASS else None))
    c = _controls(p, cap, test_cap)
    status = gr.Markdown(elem_id="lab-status")
    plot = gr.Image(value=charts.race_figure([]), label="The race", show_label=False, interactive=False,
                    elem_id="lab-plot")
    curve = gr.Dataframe(interactive=False, elem_id="lab-curve")  # the API's table; drawn as lab-plot
    result = gr.Markdown(elem_id="lab-verdict")
    with gr.Row():
        open_btn = gr.Button("Open A and B in Groups (A becomes this session's model)", elem_id="lab-open")
        dl_a = gr.DownloadButton("Download A (.safetensors)", value=None, elem_id="lab-dl-a")
        dl_b = gr.DownloadButton("Download B (.safetensors)", value=None, elem_id="lab-dl-b")

    for dd in (c.a, c.b):
        dd.change(budget_md, [c.a, c.b], c.budget, **PRIVATE, queue=False)
    c.go.click(arm, p.race_flag, None, **PRIVATE, queue=False) \
        .then(p.gpu(run_race, p.bind(race_seconds)),
              [p.lab, p.race_flag, c.a, c.b, c.train, c.test, c.epochs], [status, curve, result, dl_a, dl_b, p.lab],
              api_name="race", concurrency_id=RACE_POOL, concurrency_limit=RACE_LIMIT,
              api_description="Race two models of the equal-budget family from scratch (names as in the Lab's "
              "lists, training and test images per class, epochs): status, the curves as a table (epoch, model, "
              "series, value), the verdict, and the two checkpoints.")
    c.stop.click(stop, p.race_flag, status, api_name="stop_race", queue=False)
    curve.change(curve_image, curve, plot, **PRIVATE, queue=False)
    return SimpleNamespace(open_btn=open_btn)

