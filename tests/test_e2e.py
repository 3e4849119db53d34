"""End to end: `python app.py` in a subprocess on a free port, driven through gradio_client."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from resnext_demo import data, finetune
from resnext_demo.launch import free_port, start, stop

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT = 120


def launch(args: list[str], log: Path):
    """Start app.py (1 thread, analytics off) on a free port; (process, url). The caller must `stop` it."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    return start([sys.executable, str(ROOT / "app.py"), "--port", str(port), "--host", "127.0.0.1", *args],
                 port, log, ROOT, env, STARTUP_TIMEOUT)


def _png(path: Path, colour, size=(40, 52)) -> str:
    rng = np.random.default_rng(sum(colour))
    a = np.clip(np.array(colour)[None, None] + rng.normal(0, 15, (*size, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(a).save(path)
    return str(path)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The app on a tiny random checkpoint (and the CIFAR-10 source when there is one)."""
    import torch

    from resnext_demo import weights
    from resnext_demo.model import ResNeXt
    from tests.conftest import TINY

    tmp = tmp_path_factory.mktemp("e2e")
    torch.manual_seed(0)
    ckpt = weights.save_checkpoint(tmp / "tiny.safetensors", ResNeXt(TINY).eval(), {"accuracy": None})
    src = data.default_source()
    args = ["--weights", str(ckpt)] + (["--data", src] if src and Path(src).exists() else [])
    proc, url = launch(args, tmp / "app.log")
    try:
        yield url, tmp, bool(src and Path(src).exists())
    finally:
        stop(proc)


def test_predict_endpoint(server):
    url, tmp, _ = server
    c = Client(url, verbose=False)
    img = handle_file(_png(tmp / "red.png", (220, 30, 30)))
    out = c.predict(img, api_name="/predict")
    assert out["label"] in data.CLASSES
    assert len(out["confidences"]) == 3
    assert len(c.predict(img, 5, api_name="/predict")["confidences"]) == 5
    label, seen, info = c.predict(img, 2, api_name="/classify")
    assert label["label"] == out["label"] and Path(seen).is_file() and "ms" in info
    # the tiny checkpoint has no calibration and no detector: the details endpoint says so instead of guessing
    details = c.predict(img, api_name="/predict_details")
    assert details["top_class"] == out["label"] and len(details["probabilities"]) == 10
    assert details["temperature"] == 1.0 and details["unfamiliar"] is None and details["score"] is None
    assert "unavailable" in info and "Not calibrated" in info


def test_bad_input_is_an_error_not_a_crash(server):
    url, tmp, _ = server
    c = Client(url, verbose=False)
    bad = tmp / "bad.safetensors"
    bad.write_bytes(b"\x80\x04 pickled stuff")
    with pytest.raises(AppError, match="pickle"):
        c.predict(handle_file(str(bad)), api_name="/load_checkpoint")
    assert c.predict(handle_file(_png(tmp / "ok.png", (1, 2, 3))), api_name="/predict")["label"] in data.CLASSES


def test_feature_maps_attributions_about(server):
    url, tmp, _ = server
    c = Client(url, verbose=False)
    img = handle_file(_png(tmp / "green.png", (30, 200, 30)))
    grid, md, stats = c.predict(img, "layer2.0.conv2", "summary", "layer", api_name="/feature_maps")
    assert Path(grid).is_file() and Path(stats).is_file() and "group" in md
    out, md = c.predict(img, "Grad-CAM", "cat", True, 0.5, 8, "black", 4, 0.1, "layer3", 8, 4, api_name="/attribute")
    assert Path(out).is_file() and "cat" in md and "raw range" in md
    out, md, out_b, md_b = c.predict(img, "Saliency", "Occlusion", api_name="/compare")
    assert Path(out).is_file() and Path(out_b).is_file() and "Saliency" in md and "Occlusion" in md_b
    diagram, table, curve, md = c.predict(1, api_name="/about")
    assert Path(diagram).is_file() and "params (M)" in table["headers"]


def test_groups_endpoints(server):
    url, tmp, has_data = server
    c = Client(url, verbose=False)
    img = handle_file(_png(tmp / "blue.png", (30, 30, 200)))
    imp, abl, table, cams, md = c.predict(img, "layer3.0.conv2", "predicted", "runner-up", "Gradient x Activation",
                                          "zero", api_name="/groups")
    assert all(Path(p).is_file() for p in (imp, abl, cams)) and "rather than" in md
    assert table["headers"][0] == "group" and len(table["data"]) == len(table["data"]) > 1
    label, md = c.predict(img, "layer3.0.conv2", [0, 1], "mean", 3, api_name="/knockout")
    assert "Knocked out g0, g1" in md and len(label["confidences"]) == 3
    la, lb, *images, md = c.predict(img, "shared model", None, "predicted", api_name="/compare_models")
    assert la["label"] == lb["label"] and "Faithfulness" in md
    if has_data:  # once per checkpoint; a few seconds for the shipped model
        fig, montage, md = c.predict("layer3.0.conv2", api_name="/specialization")
        assert Path(fig).is_file() and Path(montage).is_file() and "selectivity" in md


def test_samples(server):
    url, tmp, has_data = server
    if not has_data:
        pytest.skip("no CIFAR-10 source")
    c = Client(url, verbose=False)
    im = c.predict(api_name="/random_sample")
    assert Path(im).is_file()
    gallery, md = c.predict(api_name="/misclassified")
    assert "misclassified" in md


def test_finetune_is_per_session(server):
    url, tmp, _ = server
    alice, bob = Client(url, verbose=False), Client(url, verbose=False)
    zones = [None] * len(data.CLASSES)
    zones[data.CLASSES.index("cat")] = [handle_file(_png(tmp / f"cat{i}.png", (200, 120, 40))) for i in range(3)]
    names = ["robot"] + [""] * (finetune.MAX_NEW_CLASSES - 1)
    new = [[handle_file(_png(tmp / f"robot{i}.png", (90, 90, 90))) for i in range(3)]] + \
        [None] * (finetune.MAX_NEW_CLASSES - 1)
    status, plot, result, path = alice.predict(0, "head", 1, 0.05, 8, *zones, *names, *new, api_name="/finetune")
    assert "Use this model" in status and "after" in result and Path(path).is_file()
    banner = alice.predict(api_name="/use_model")
    assert "session" in banner
    img = handle_file(_png(tmp / "probe.png", (90, 90, 90)))
    a = alice.predict(img, 11, api_name="/predict")
    b = bob.predict(img, 11, api_name="/predict")
    assert "robot" in [x["label"] for x in a["confidences"]]
    assert "robot" not in [x["label"] for x in b["confidences"]] and len(b["confidences"]) == 10
    # the downloaded checkpoint continues in a fresh session
    carol = Client(url, verbose=False)
    carol.predict(handle_file(path), api_name="/load_checkpoint")
    assert "robot" in [x["label"] for x in carol.predict(img, 11, api_name="/predict")["confidences"]]


@pytest.mark.slow
def test_app_starts_without_weights(tmp_path):
    proc, url = launch(["--weights", str(tmp_path / "missing.safetensors"), "--data", str(tmp_path / "nodata")],
                       tmp_path / "app.log")
    try:
        c = Client(url, verbose=False)
        with pytest.raises(AppError, match="resnext_demo.train"):
            c.predict(handle_file(_png(tmp_path / "x.png", (5, 5, 5))), api_name="/predict")
    finally:
        stop(proc)


def test_race_endpoint_returns_both_curves_as_a_table(server):
    """#30: /race through the real server: a tiny race (10 images per class, 1 epoch) ends with both models' curves
    as a table, a verdict and two checkpoints; a bad choice is a toast and the server lives on."""
    url, tmp, has_data = server
    if not has_data:
        pytest.skip("no CIFAR-10 source")
    from resnext_demo import race

    c = Client(url, verbose=False)
    status, curve, verdict, path_a, path_b = c.predict(race.DEFAULT_A, race.DEFAULT_B, 10, 10, 1, api_name="/race")
    assert status.startswith("Finished") and "noise" in verdict and Path(path_a).is_file() and Path(path_b).is_file()
    assert curve["headers"] == ["epoch", "model", "series", "value"] and len(curve["data"]) == 4
    assert {row[1] for row in curve["data"]} == {race.members()[race.DEFAULT_A].label, race.members()[race.DEFAULT_B].label}
    with pytest.raises(Exception, match="two different"):
        c.predict(race.DEFAULT_A, race.DEFAULT_A, 10, 10, 1, api_name="/race")
    assert c.predict(api_name="/random_sample")  # still serving
