"""Screenshots of every tab for the README and docs/README.md: `python -m tools.screenshots --out docs/screenshots`.

Launches `app.py` itself on a free port and drives it with Playwright and Debian's chromium
(never a downloaded browser). By default the app runs without a CIFAR-10 source: the tabs show a real photo
that ships with gradio (`real_photo`) and the fine-tune tab synthetic drawings made here, so the screenshots
contain no CIFAR-10 image and may be committed;
`--with-samples` shows the sample gallery too (then do not commit predict.png).
The helpers here (launch_app, open_tab, upload, wait_image) are also what tests/test_browser.py uses.
"""
from __future__ import annotations

import argparse
import importlib.util
import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from resnext_demo import data, launch, weights

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
ROOT = data.PROJECT_ROOT
TABS = {"predict": "Predict", "groups": "Groups (cardinality)", "features": "Feature maps (per group)",
        "attributions": "Attributions",
        "finetune": "Fine-tune", "lab": "Lab (race two C)", "about": "About the architecture"}


@contextlib.contextmanager
def launch_app(weights_path: str | Path, data_source: str | None = None, timeout: float = 120,
               log: str | Path | None = None) -> Iterator[str]:
    """Run app.py (threads capped at 1, so a browser fits beside it) and yield its URL; always stops it."""
    args = ["--weights", str(weights_path), "--data", data_source or ""]  # "" = no data source
    with tempfile.TemporaryDirectory() as tmp, \
            launch.app_server(args, log or Path(tmp) / "app.log", {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")},
                              timeout) as (url, _):
        yield url


@contextlib.contextmanager
def browser_page(width: int = 1280, height: int = 900):
    """A Playwright page in Debian's headless chromium."""
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        raise FileNotFoundError(f"{CHROMIUM} is missing (apt-get install chromium)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.set_default_timeout(60_000)
            yield page
        finally:
            browser.close()


def open_tab(page, key: str) -> None:
    """Click a tab by its key in TABS."""
    page.get_by_role("tab", name=TABS[key]).click()


def upload(page, elem_id: str, files: list[str] | str) -> None:
    """Put files into the file input of the component with this elem_id."""
    page.locator(f"#{elem_id} input[type=file]").first.set_input_files(files)


def wait_image(page, elem_id: str, timeout: float = 120_000) -> None:
    """Wait until an output image component shows an image."""
    page.wait_for_selector(f"#{elem_id} img", timeout=timeout)


def wait_text(page, elem_id: str, pattern: str, timeout: float = 120_000) -> str:
    """Wait until the component's text matches the regex `pattern`; returns the text."""
    page.wait_for_function(
        "([sel, pat]) => { const e = document.querySelector(sel); return e && new RegExp(pat).test(e.innerText); }",
        arg=[f"#{elem_id}", pattern], timeout=timeout)
    return page.locator(f"#{elem_id}").inner_text()


def real_photo(name: str = "lion.jpg") -> Path:
    """A real photograph that ships inside the installed gradio package (its demo media, Apache-2.0), so the
    screenshots show one without committing a photo or any CIFAR-10 image. CIFAR-10 has no lions: the
    nearest class is "cat", which is what a visitor would try first."""
    spec = importlib.util.find_spec("gradio")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("gradio is not installed")
    return Path(spec.origin).parent / "media_assets" / "images" / name


def settle(page, timeout: float = 60_000) -> None:
    """Wait until no component is dimmed as pending (Gradio's `.pending`, opacity 0.2): a screenshot taken
    while a second event on the same outputs runs shows them washed out."""
    page.wait_for_function("() => !document.querySelector('.pending')", timeout=timeout)
    page.wait_for_timeout(300)  # the fade back to full opacity


def synthetic_image(kind: str = "truck", size: int = 256, seed: int = 0) -> Image.Image:
    """A drawn picture (no dataset image): 'truck', 'ship', 'plane' on simple backgrounds, with noise."""
    rng = np.random.default_rng(seed)
    im = Image.new("RGB", (size, size), (120, 170, 230))
    d = ImageDraw.Draw(im)
    s = size / 256
    if kind == "ship":
        d.rectangle([0, 150 * s, size, size], fill=(30, 70, 140))
        d.polygon([(40 * s, 140 * s), (216 * s, 140 * s), (190 * s, 180 * s), (66 * s, 180 * s)], fill=(200, 60, 50))
        d.rectangle([100 * s, 100 * s, 150 * s, 140 * s], fill=(240, 240, 240))
    elif kind == "plane":
        d.polygon([(30 * s, 130 * s), (230 * s, 120 * s), (230 * s, 135 * s), (30 * s, 140 * s)], fill=(225, 225, 230))
        d.polygon([(110 * s, 128 * s), (150 * s, 60 * s), (165 * s, 60 * s), (140 * s, 128 * s)], fill=(200, 200, 210))
        d.polygon([(200 * s, 125 * s), (225 * s, 95 * s), (232 * s, 95 * s), (225 * s, 128 * s)], fill=(200, 200, 210))
    else:  # truck on a road
        d.rectangle([0, 180 * s, size, size], fill=(90, 90, 90))
        d.rectangle([40 * s, 100 * s, 170 * s, 175 * s], fill=(200, 40, 40))
        d.rectangle([170 * s, 125 * s, 220 * s, 175 * s], fill=(230, 200, 40))
        for cx in (70, 150, 200):
            d.ellipse([(cx - 15) * s, 165 * s, (cx + 15) * s, 195 * s], fill=(20, 20, 20))
    a = np.asarray(im).astype(np.float32) + rng.normal(0, 6, (size, size, 3))
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def write_synthetic(folder: Path, kind: str, n: int) -> list[str]:
    """n noisy variants of a synthetic picture as PNG files."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        p = folder / f"{kind}-{i}.png"
        synthetic_image(kind, 96, seed=i + 1).save(p)
        out.append(str(p))
    return out


def take(url: str, out: Path, work: Path, finetune_epochs: int = 8, tabs: list[str] | None = None,
         lab: bool = False) -> list[Path]:
    """Drive every tab (or those of `tabs`, keys of TABS) with a real photo (Predict copies it to the other tabs)
    and fine-tune on synthetic drawings; race in the Lab when `lab` (the app needs CIFAR-10 for it); save one
    full-page PNG per tab."""
    out.mkdir(parents=True, exist_ok=True)
    probe = real_photo()
    shots = []
    wanted = set(tabs or TABS)

    def shot(page, name: str) -> None:  # once the page has settled, the whole page
        shots.append(out / name)
        settle(page)
        page.screenshot(path=shots[-1], full_page=True)

    with browser_page() as page:
        page.goto(url)
        page.wait_for_selector("#predict-image")
        upload(page, "predict-image", str(probe))
        wait_text(page, "predict-info", "ms")
        if "predict" in wanted:
            predict_shots(page, shot, work, probe)

        if "groups" in wanted:
            groups_shot(page, shot)
        if "features" in wanted:
            open_tab(page, "features")
            page.locator("#fm-btn").click()
            wait_image(page, "fm-grid")
            wait_image(page, "fm-stats")
            shot(page, "feature-maps.png")
        if "attributions" in wanted:
            attributions_shot(page, shot)
        if "finetune" in wanted:
            finetune_shot(page, shot, work, finetune_epochs)
        if "lab" in wanted and lab:
            lab_shot(page, shot)
        if "about" in wanted:
            open_tab(page, "about")
            wait_image(page, "ab-diagram")
            shot(page, "about.png")
    return shots


def predict_shots(page, shot, work: Path, probe: Path) -> None:
    """Predict on the photo, then on random noise (flagged unfamiliar), then back to the photo."""
    shot(page, "predict.png")
    noise = work / "noise.png"  # what a visitor tries next: nonsense, which must be called unfamiliar
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8)).save(noise)
    upload(page, "predict-image", str(noise))
    wait_text(page, "predict-info", "does not look like")
    shot(page, "predict-unfamiliar.png")
    upload(page, "predict-image", str(probe))  # back to the photo for the other tabs
    page.wait_for_function("() => !document.querySelector('#predict-info').innerText.includes('does not look')")


def groups_shot(page, shot) -> None:
    """Analyse the groups, knock one out live, compare two checkpoints."""
    open_tab(page, "groups")  # no data source here: the specialization montage would show CIFAR images
    page.locator("#gr-btn").click()
    wait_image(page, "gr-importance")
    wait_image(page, "gr-cams")
    wait_image(page, "gr-ablation")
    page.locator("#gr-knock label").nth(1).click()
    wait_text(page, "gr-knock-md", "Knocked out")
    page.get_by_text("Compare checkpoints on this image").click()
    page.locator("#cmp-btn").click()
    wait_image(page, "cmp-gi-b")
    shot(page, "groups.png")


def attributions_shot(page, shot) -> None:
    """Integrated Gradients compared with Grad-CAM (the default pair)."""
    open_tab(page, "attributions")
    page.locator("#at-cmp-btn").click()
    wait_image(page, "at-out")
    wait_image(page, "at-cmp")
    shot(page, "attributions.png")


def finetune_shot(page, shot, work: Path, finetune_epochs: int) -> None:
    """Fine-tune on synthetic drawings of three classes."""
    open_tab(page, "finetune")
    upload(page, "zone-truck", write_synthetic(work / "truck", "truck", 4))
    upload(page, "zone-ship", write_synthetic(work / "ship", "ship", 4))
    upload(page, "zone-airplane", write_synthetic(work / "plane", "plane", 4))
    page.wait_for_timeout(1500)  # let the uploads finish
    epochs = page.locator("#ft-epochs input[type=number]")
    epochs.fill(str(finetune_epochs))
    epochs.press("Enter")
    lr = page.locator("#ft-lr input")
    lr.fill("0.05")
    lr.press("Enter")
    page.locator("#ft-train").click()
    wait_text(page, "ft-result", "after", timeout=300_000)
    shot(page, "fine-tune.png")


def lab_shot(page, shot) -> None:
    """The default race (C = 1 against C = 8, about 2 minutes on 2 cores), then its curves and verdict."""
    open_tab(page, "lab")
    page.locator("#lab-race").click()
    wait_text(page, "lab-verdict", "noise", timeout=600_000)
    page.wait_for_function("() => document.querySelector('#lab-plot img').naturalWidth > 0")
    shot(page, "lab.png")


def shrink_png(path: Path) -> None:
    """Re-save as a 256-colour palette PNG: a UI screenshot stays sharp at a third of the size."""
    with Image.open(path) as im:
        small = im.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    small.save(path, optimize=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "docs" / "screenshots"))
    ap.add_argument("--weights", default=os.environ.get("RESNEXT_DEMO_WEIGHTS", str(weights.DEFAULT_WEIGHTS)))
    ap.add_argument("--with-samples", action="store_true",
                    help="give the app the CIFAR-10 source (the Predict tab then shows CIFAR images: do not commit it)")
    ap.add_argument("--epochs", type=int, default=8, help="fine-tune epochs in the Fine-tune screenshot")
    ap.add_argument("--tabs", nargs="+", choices=list(TABS), default=None,
                    help="only these tabs' screenshots (default: every tab)")
    args = ap.parse_args(argv)
    if not Path(args.weights).is_file():
        sys.exit(f"no checkpoint at {args.weights}: train one (python -m resnext_demo.train ...) or pass --weights")
    source = data.default_source() if args.with_samples else None
    tabs = args.tabs or list(TABS)
    with tempfile.TemporaryDirectory() as tmp:
        shots = []
        if set(tabs) - {"lab"}:
            with launch_app(args.weights, source, log=Path(tmp) / "app.log") as url:
                shots += take(url, Path(args.out), Path(tmp), args.epochs, [t for t in tabs if t != "lab"])
        if "lab" in tabs:  # the Lab races on CIFAR-10 (its page shows no CIFAR image): its own app with the data
            lab_source = data.default_source() or str(data.SAMPLE_PACK)
            with launch_app(args.weights, lab_source, log=Path(tmp) / "lab.log") as url:
                shots += take(url, Path(args.out), Path(tmp), args.epochs, ["lab"], lab=True)
        for p in shots:
            shrink_png(p)
            print(p)


if __name__ == "__main__":
    main()
