"""The repository's promises: README commands match CI, nothing forbidden is tracked."""
from __future__ import annotations

import subprocess

from resnext_demo.data import PROJECT_ROOT


def _readme_commands() -> list[str]:
    lines = (PROJECT_ROOT / "README.md").read_text().splitlines()
    return [l.strip() for l in lines[:40] if l.strip().startswith("python3 -m venv")]


def test_readme_gives_app_and_test_commands_and_ci_runs_the_test_one() -> None:
    cmds = _readme_commands()
    assert len(cmds) >= 2 and "app.py" in cmds[0] and "pytest" in cmds[1]
    ci = (PROJECT_ROOT / ".ci" / "run").read_text().splitlines()
    assert ci[-1].strip() == cmds[1]


def test_no_pickles_or_images_from_the_dataset_are_tracked() -> None:
    try:
        files = subprocess.run(["git", "ls-files"], cwd=PROJECT_ROOT, capture_output=True, text=True,
                               check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        return  # not a git checkout (e.g. an sdist): nothing to check
    assert not [f for f in files if f.endswith((".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".bin"))]
    assert not [f for f in files if f.lower().endswith((".jpg", ".jpeg")) ]  # CIFAR-10 is JPEG here
    assert not [f for f in files if "cifar10" in f.lower() and not f.endswith((".py", ".md"))]
