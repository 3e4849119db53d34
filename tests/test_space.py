"""The app as a Hugging Face Space runs it: a copy of the repository's files, no `../shared` beside it, no data
variable. Served as is, then on ZeroGPU: the real `spaces` package against a stand-in for its device API
(tests/zerogpu_standin.py), every model-running call booked and run in the forked worker, on the CPU."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from resnext_demo import data, finetune
from resnext_demo.ui import finetune_tab, serving
from resnext_demo.launch import free_port, start, stop
from tests.test_e2e import ROOT, _png

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402


@pytest.fixture(scope="module")
def space(tmp_path_factory) -> Path:
    """The files a push to a Space would carry (tracked, plus new files not ignored), copied into a folder
    that has no ../shared beside it."""
    try:
        listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                                capture_output=True, text=True, check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the files a Space would get are unknown")
    root = tmp_path_factory.mktemp("space") / "app"
    for name in listed:
        if (ROOT / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, root / name)
    assert not (root.parent / "shared").exists()
    return root


def _serve(space: Path, log: Path, extra_env: dict | None = None, python_args: list[str] | None = None):
    """Start the Space copy's app.py as a Space does (no flags but where to listen): (process, url)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RESNEXT_DEMO_", "SPACES_", "ZEROGPU_"))}
    env.update({"OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1",
                "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port),
                "RESNEXT_DEMO_CACHE": str(log.parent / "cache"), **(extra_env or {})})
    return start([sys.executable, *(python_args or ["app.py"])], port, log, space, env)


def _zones(tmp: Path) -> tuple[list, list, list]:
    """Fine-tune inputs: three 'cat' images, no new class."""
    zones = [None] * len(data.CLASSES)
    zones[data.CLASSES.index("cat")] = [handle_file(_png(tmp / f"cat{i}.png", (200, 120, 40))) for i in range(3)]
    return zones, [""] * finetune.MAX_NEW_CLASSES, [None] * finetune.MAX_NEW_CLASSES


def test_a_space_without_data_serves_the_sample_pack(space, tmp_path):
    proc, url = _serve(space, tmp_path / "app.log")
    try:
        c = Client(url, verbose=False)
        image = c.predict(api_name="/random_sample")
        assert Path(image).is_file()
        gallery, md = c.predict(api_name="/misclassified")
        assert len(gallery) > 0 and "of 400 test images misclassified" in md
        *_, md = c.predict(1, api_name="/about")
        assert "sample pack" in md
        fig, montage, md = c.predict("layer3.2.conv2", api_name="/specialization")
        assert Path(montage).is_file() and "400 CIFAR-10 test images" in md
        assert not (tmp_path / "cache" / "analysis").exists()  # the shipped cache was read, nothing computed
        zones, names, new = _zones(tmp_path)
        status, plot, result, path = c.predict(10, "head", 1, 0.05, 32, *zones, *names, *new, api_name="/finetune")
        # 3 uploads (1 held out) + the pack's 10 set-aside images per class (trained on, never held out, #28.2);
        # scored on its other 400 (forgetting)
        assert "102 training images, 100 of them CIFAR-10 / 1 of your images held out" in result and "(400 images, forgetting)" in result and Path(path).is_file()
    finally:
        stop(proc)
    assert "resnext_demo/assets/cifar10-test-sample.safetensors" in (tmp_path / "app.log").read_text()


def test_a_full_source_replaces_the_pack(monkeypatch, tmp_path):
    """app.py's data: RESNEXT_DEMO_DATA when set (any full source), else ../shared when present, else the pack."""
    import app

    monkeypatch.setenv("RESNEXT_DEMO_DATA", "hf://datasets/uoft-cs/cifar10")
    assert app.parse_args([]).data == "hf://datasets/uoft-cs/cifar10"
    monkeypatch.delenv("RESNEXT_DEMO_DATA")
    monkeypatch.setattr(data, "SHARED_ARCHIVE", tmp_path / "absent.tar.gz")
    assert app.parse_args([]).data == str(data.SAMPLE_PACK)
    (tmp_path / "archive.tar.gz").write_bytes(b"")
    monkeypatch.setattr(data, "SHARED_ARCHIVE", tmp_path / "archive.tar.gz")
    assert app.parse_args([]).data == str(tmp_path / "archive.tar.gz")
    assert app.parse_args(["--data", ""]).data == ""  # none at all: the app says so in visitor words


def test_a_space_pointed_at_the_hub_dataset_uses_it(space, tmp_path):
    """RESNEXT_DEMO_DATA=hf://datasets/uoft-cs/cifar10: the app reads it through huggingface_hub (offline here,
    from a copy in the Hub's cache layout) instead of the sample pack."""
    pytest.importorskip("pyarrow")
    from tests import hub_layout

    hub_layout.write_hub_copy(tmp_path / "hub", {"test": hub_layout.synthetic_split(30, 0),
                                                 "train": hub_layout.synthetic_split(20, 1)})
    env = {"RESNEXT_DEMO_DATA": hub_layout.SOURCE, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    proc, url = _serve(space, tmp_path / "app.log", env)
    try:
        c = Client(url, verbose=False)
        assert Path(c.predict(api_name="/random_sample")).is_file()
        gallery, md = c.predict(api_name="/misclassified")
        assert "of 30 test images" in md
        *_, md = c.predict(1, api_name="/about")
        assert "30 test images" in md and "sample pack" not in md
        zones, names, new = _zones(tmp_path)
        status, plot, result, path = c.predict(2, "head", 1, 0.05, 32, *zones, *names, *new, api_name="/finetune")
        assert "(30 images, forgetting)" in result  # 2 training images per class from the Hub's train split
    finally:
        stop(proc)


def test_zerogpu_books_and_round_trips_through_the_forked_worker(space, tmp_path):
    pytest.importorskip("spaces")  # requirements-dev.txt installs it
    from tests import zerogpu_standin

    standin = zerogpu_standin.StandIn()
    (tmp_path / "cgroup").write_text("0::/stand-in\n")  # spaces names its cgroup to the device API
    env = {"SPACES_ZERO_GPU": "true", "SPACES_ZERO_DEVICE_API_URL": standin.url,
           "ZEROGPU_PROC_SELF_CGROUP_PATH": str(tmp_path / "cgroup"), "ZEROGPU_OFFLOAD_DIR": str(tmp_path / "offload")}
    try:
        proc, url = _serve(space, tmp_path / "app.log", env, ["-c", zerogpu_standin.LAUNCHER])
        try:
            assert standin.of("/startup-report") == [{}]
            c = Client(url, verbose=False)
            img = handle_file(_png(tmp_path / "red.png", (220, 30, 30)))
            before = c.predict(img, 10, api_name="/predict")
            assert len(before["confidences"]) == 10
            out, md = c.predict(img, "Integrated Gradients", "cat", api_name="/attribute")
            assert Path(out).is_file() and "Integrated Gradients" in md and "Faithfulness" in md
            gallery, md = c.predict(api_name="/misclassified")  # with a progress bar sent back from the worker
            assert len(gallery) > 0
            with pytest.raises(AppError, match="Upload an image"):
                c.predict(None, api_name="/predict")  # needs no model: answered without a booking
            zones, names, new = _zones(tmp_path)
            status, plot, result, path = c.predict(0, "head", 2, 0.05, 8, *zones, *names, *new, api_name="/finetune")
            assert "Finished" in result and Path(path).is_file()
            c.predict(api_name="/use_model")  # the fine-tuned model came back from the worker, on the CPU
            after = c.predict(img, 10, api_name="/predict")  # ... and goes into it again, with this session
            assert after != before
        finally:
            stop(proc)
        log = (tmp_path / "app.log").read_text()
        booked = [int(q["durationSeconds"]) for q in standin.of("/schedule")]
        train = max(finetune_tab.FINETUNE_MIN_SECONDS, 2 * 3 * finetune_tab.TRAIN_SECONDS_PER_IMAGE["head"])
        assert booked == [serving.GPU_SECONDS_QUICK, serving.GPU_SECONDS, serving.GPU_SECONDS,
                          int(train + finetune_tab.FINETUNE_GPU_MARGIN), serving.GPU_SECONDS_QUICK], log
        releases = standin.of("/release")
        assert len(releases) == len(booked) and all(r["fail"] == "false" for r in releases), log
        assert 1 <= len(standin.of("/allow")) <= len(booked)  # one per new worker; an idle live one is reused
    finally:
        standin.shutdown()
