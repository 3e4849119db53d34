"""The repository's promises: README commands match CI, the README is a valid Space config, nothing forbidden is tracked."""
from __future__ import annotations

import re
import subprocess
from importlib.metadata import version

import pytest

from resnext_demo.data import PROJECT_ROOT

SPACE_COLORS = {"red", "yellow", "green", "blue", "indigo", "purple", "pink", "gray"}  # spaces-config-reference


def _readme() -> tuple[str | None, list[str]]:
    """(front matter text or None, the lines after it)."""
    lines = (PROJECT_ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    if lines and lines[0].strip() == "---":
        end = next(i for i in range(1, len(lines)) if lines[i].strip() == "---")
        return "\n".join(lines[1:end]), lines[end + 1:]
    return None, lines


def _readme_commands() -> list[str]:
    """The commands of the first code block after the front matter (what a visitor sees first)."""
    body = _readme()[1]
    start = next(i for i, l in enumerate(body) if l.strip().startswith("```"))
    assert all(not l.strip() or l.startswith("#") for l in body[:start]), "only the title comes before the commands"
    end = next(i for i in range(start + 1, len(body)) if body[i].strip().startswith("```"))
    return [l.strip() for l in body[start + 1:end] if l.strip()]


def test_readme_gives_app_and_test_commands_and_ci_runs_the_test_one() -> None:
    cmds = _readme_commands()
    assert len(cmds) == 2 and "app.py" in cmds[0] and "pytest" in cmds[1]
    assert all(c.startswith("python3 -m venv") for c in cmds)
    ci = (PROJECT_ROOT / ".ci" / "run").read_text().splitlines()
    assert ci[-1].strip() == cmds[1]


def test_readme_front_matter_is_a_valid_space_config() -> None:
    yaml = pytest.importorskip("yaml")  # PyYAML comes with gradio
    text, _ = _readme()
    assert text is not None, "README.md must start with the Space's YAML block (---)"
    meta = yaml.safe_load(text)
    assert meta["sdk"] == "gradio"
    # the Gradio the tests run with, which is also the one requirements.txt pins
    assert isinstance(meta["sdk_version"], str) and meta["sdk_version"] == version("gradio")
    pins = re.findall(r"^gradio==(\S+)", (PROJECT_ROOT / "requirements.txt").read_text(), re.M)
    assert pins == [meta["sdk_version"]]
    assert (PROJECT_ROOT / meta["app_file"]).is_file()
    # a string: unquoted, YAML reads 3.10 as the float 3.1
    assert isinstance(meta["python_version"], str) and re.fullmatch(r"3\.\d+(\.\d+)?", meta["python_version"])
    assert isinstance(meta["short_description"], str) and 0 < len(meta["short_description"]) <= 60
    assert meta["license"] == "mit"
    license_file = PROJECT_ROOT / "LICENSE"
    assert license_file.is_file() and "MIT License" in license_file.read_text()
    assert meta["title"] and meta["emoji"] and {meta["colorFrom"], meta["colorTo"]} <= SPACE_COLORS
    assert meta["pinned"] is False


def test_no_pickles_or_images_from_the_dataset_are_tracked() -> None:
    try:
        files = subprocess.run(["git", "ls-files"], cwd=PROJECT_ROOT, capture_output=True, text=True,
                               check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        return  # not a git checkout (e.g. an sdist): nothing to check
    assert not [f for f in files if f.endswith((".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".bin"))]
    assert not [f for f in files if f.lower().endswith((".jpg", ".jpeg")) ]  # CIFAR-10 is JPEG here
    # CIFAR-10 images only in the one sample pack (at most 500 test images; test_data checks its contents)
    assert [f for f in files if "cifar10" in f.lower() and not f.endswith((".py", ".md"))] == \
        ["resnext_demo/assets/cifar10-test-sample.safetensors"]


# What ZeroGPU (the only Space hardware a free account can use) builds, per its build errors and docs (issue 12).
ZEROGPU_TORCH = {"2.8.0", "2.9.1", "2.10.0", "2.11.0"}
ZEROGPU_PYTHON = {"3.10", "3.10.13", "3.12", "3.12.12"}


def test_pins_build_on_zerogpu() -> None:
    yaml = pytest.importorskip("yaml")
    reqs = (PROJECT_ROOT / "requirements.txt").read_text()
    torch_pin = re.findall(r"^torch==(\S+)", reqs, re.M)
    assert len(torch_pin) == 1 and torch_pin[0] in ZEROGPU_TORCH, torch_pin
    # torchvision releases pair with one torch release each: 0.(N+15) goes with 2.N
    minor = int(torch_pin[0].split(".")[1])
    assert re.findall(r"^torchvision==0\.(\d+)\.", reqs, re.M) == [str(minor + 15)]
    assert yaml.safe_load(_readme()[0])["python_version"] in ZEROGPU_PYTHON
