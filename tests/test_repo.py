"""The repository's promises: README commands match CI, the README is a valid Space config, nothing forbidden is tracked."""
from __future__ import annotations

import re
import subprocess
from importlib.metadata import version
from pathlib import Path

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


# The README is the front page; everything else lives under docs/ (issue 27, item 3).
README_MAX_LINES = 200
FENCE = re.compile(r"^\s*(```|~~~)")
LINK = re.compile(r"!?\[[^\]]*\]\(([^()\s]+)(?:\s+\"[^\"]*\")?\)")  # [text](target) and ![alt](target)


def _prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks, inline code removed but in headings (code holds no links)."""
    out, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced:  # a heading keeps its code's text: it is part of the anchor
            out.append(line if line.startswith("#") else re.sub(r"`[^`]*`", "", line))
    return out


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation out, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading anchors on its text
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")  # drops ` * ( ) . / : ...


def _anchors(path: Path) -> set[str]:
    """Every heading anchor of a markdown file, GitHub-style (a repeated heading gets -1, -2, ...)."""
    seen: dict[str, int] = {}
    for line in _prose_lines(path.read_text(encoding="utf-8")):
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            slug = _slug(m.group(1))
            seen[slug] = seen.get(slug, -1) + 1
            if seen[slug]:
                seen[f"{slug}-{seen[slug]}"] = 0
    return set(seen)


def _broken_links(path: Path, root: Path = PROJECT_ROOT) -> list[str]:
    """The relative links of a markdown file whose file or #anchor does not exist, named from root."""
    broken = []
    for line in _prose_lines(path.read_text(encoding="utf-8")):
        for target in LINK.findall(line):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):
                continue  # http:, https:, mailto: — not ours to check offline
            file_part, _, anchor = target.partition("#")
            dest = (path.parent / file_part).resolve() if file_part else path
            if not dest.exists():
                broken.append(f"{path.relative_to(root)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{path.relative_to(root)}: {target} (no such heading)")
    return broken


def test_readme_is_a_front_page_that_links_the_docs() -> None:
    text = (PROJECT_ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= README_MAX_LINES, "the details belong under docs/"
    targets = {t.partition("#")[0] for line in _prose_lines(text) for t in LINK.findall(line)}
    assert {"docs/architecture.md", "docs/README.md"} <= targets


def test_every_relative_markdown_link_resolves() -> None:
    pages = [PROJECT_ROOT / "README.md", *sorted((PROJECT_ROOT / "docs").glob("*.md"))]
    assert len(pages) > 2
    assert [b for page in pages for b in _broken_links(page)] == []


def test_the_link_check_finds_a_missing_file_and_a_missing_heading(tmp_path: Path) -> None:
    (tmp_path / "other.md").write_text("# Other page\n\n## Load test (`tools/loadtest.py`)\n\n## Notes\n\n## Notes\n")
    page = tmp_path / "page.md"
    page.write_text("# Top\n\n[ok](other.md#load-test-toolsloadtestpy) [ok](other.md#notes-1) [ok](#top)\n"
                    "[gone](missing.md) [gone](other.md#nowhere) [gone](#bottom) `[code](skipped.md)`\n"
                    "```\n[fenced](skipped.md)\n```\n[web](https://example.com/x.md)\n")
    assert _broken_links(page, tmp_path) == ["page.md: missing.md (no such file)",
                                             "page.md: other.md#nowhere (no such heading)",
                                             "page.md: #bottom (no such heading)"]


# ---------------------------------------------------------------- the package's shape (issue 27's "done when")

DRAWING_AND_TEXT = {"visualize", "charts", "report", "verdicts"}  # may grow to 500 lines; the rest to 400


def _package_modules() -> dict[str, Path]:
    """'resnext_demo.ui.demo' -> its file, for every module of the package."""
    root = PROJECT_ROOT / "resnext_demo"
    return {".".join(("resnext_demo", *p.relative_to(root).with_suffix("").parts)).removesuffix(".__init__"): p
            for p in sorted(root.rglob("*.py"))}


def _imports(name: str, path: Path) -> set[str]:
    """The package modules `name` imports anywhere in its file (function-level imports included, TYPE_CHECKING
    blocks left out: they never run)."""
    import ast

    tree, found = ast.parse(path.read_text(encoding="utf-8")), set()
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for child in node.body for n in ast.walk(child)}
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.level:
            base = pkg.rsplit(".", node.level - 1)[0] if node.level > 1 else pkg
            mod = f"{base}.{node.module}" if node.module else base
            found |= {f"{mod}.{a.name}" for a in node.names} | {mod}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("resnext_demo"):
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("resnext_demo")}
    return found


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` (as the list of modules along it), or None."""
    state: dict[str, int] = {}

    def visit(n: str, path: list[str]) -> list[str] | None:
        state[n] = 1
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return path[path.index(m):] + [m]
            if m not in state and (c := visit(m, path + [m])):
                return c
        state[n] = 2
        return None

    return next((c for n in sorted(graph) if n not in state and (c := visit(n, [n]))), None)


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycle_in_the_package() -> None:
    mods = _package_modules()
    # a package's __init__ is what importing a submodule runs first: not an edge of the cycle we mean
    graph = {n: {m for m in _imports(n, p) if m in mods and m != n and not n.startswith(m + ".")} for n, p in mods.items()}
    assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph))}"


def test_modules_functions_and_classes_stay_small() -> None:
    """No module over 400 lines (drawing and text 500), no function over 50, no class over 20 methods."""
    import ast

    too_big = []
    for name, path in _package_modules().items():
        text = path.read_text(encoding="utf-8")
        limit = 500 if name.rsplit(".", 1)[-1] in DRAWING_AND_TEXT else 400
        if len(text.splitlines()) > limit:
            too_big.append(f"{name}: {len(text.splitlines())} lines > {limit}")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 50:
                too_big.append(f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines > 50")
            if isinstance(node, ast.ClassDef):
                methods = sum(isinstance(b, (ast.FunctionDef, ast.AsyncFunctionDef)) for b in node.body)
                if methods > 20:
                    too_big.append(f"{name}.{node.name}: {methods} methods > 20")
    assert not too_big, "\n".join(too_big)
