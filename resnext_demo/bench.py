"""Benchmarks of every user-facing action: `python -m resnext_demo.bench [--device cpu|cuda] [--json]`.

Each action runs after warm-up, repeatedly, and reports median and p95 wall time. A torchvision
resnet18 adapted to 32x32 runs in the same process at the same batch sizes, so the figures can be read
as ratios that survive noisy machines. Timings are never asserted in tests: this command is the gate.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from . import data, explain, faithfulness, groups, launch, trainer, visualize, weights
from .model import count_macs
from .zoo import build_model, get_config, list_models
from .predict import predict

# The targets on a 2-core CPU, in seconds (None: no target).
TARGETS = {"predict (end to end)": 0.040, "feature maps (block, all groups rendered)": 0.150,
           "Integrated Gradients": 2.0, "Grad-CAM": 0.150, "fine-tune epoch, 100 images, head": 5.0,
           "app start-up to first page": 10.0}
H100_BF16_DENSE_TFLOPS = 989.4  # NVIDIA's dense (no sparsity) bf16 figure for the H100 SXM


def timeit(fn: Callable[[], object], warmup: int = 2, repeats: int = 20, budget_s: float = 10.0,
           sync: bool = False) -> dict:
    """Median/p95/min seconds of fn() over repeats (fewer if the time budget runs out, at least 3)."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeats and (len(times) < 3 or time.perf_counter() - start < budget_s):
        if sync:
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if sync:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    times.sort()
    return {"median": statistics.median(times), "p95": times[min(len(times) - 1, int(0.95 * len(times)))],
            "min": times[0], "n": len(times)}


def resnet18_cifar(num_classes: int = 10) -> nn.Module:
    """torchvision's resnet18 adapted to 32x32 (3x3 stride-1 stem, no max-pool): the baseline."""
    from torchvision.models import resnet18

    m = resnet18(num_classes=num_classes)
    m.conv1 = nn.Conv2d(3, 64, 3, padding=1, bias=False)
    m.maxpool = nn.Identity()
    return m


def _photo(size: int = 512) -> Image.Image:
    """A deterministic photo-sized test image (what users upload), not from CIFAR."""
    rng = np.random.default_rng(0)
    a = np.zeros((size, size, 3), np.uint8)
    a[..., 0] = np.linspace(0, 255, size, dtype=np.uint8)[None]
    a[..., 1] = np.linspace(255, 0, size, dtype=np.uint8)[:, None]
    a[..., 2] = rng.integers(0, 255, (size, size), dtype=np.uint8)
    return Image.fromarray(a)


def startup_seconds(weights_path: Path, timeout: float = 120.0) -> float:
    """Cold start: launch app.py in a subprocess and time until its page is served."""
    port = launch.free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(data.PROJECT_ROOT / "app.py"), "--port", str(port),
                             "--host", "127.0.0.1", "--weights", str(weights_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    try:
        launch.wait_ready(f"http://127.0.0.1:{port}/", proc, timeout, path="", poll=0.1)
        return time.perf_counter() - t
    finally:
        launch.stop(proc)


def _predict_timings(model: nn.Module, photo: Image.Image, x: torch.Tensor, classes: list[str], results: dict,
                     sync: bool) -> None:
    """End-to-end predict, the same without the trust checks, and the bare forward pass."""
    results["predict (end to end)"] = timeit(lambda: predict(model, photo, classes), sync=sync)
    # the same without calibration and the unfamiliar-image detector: what /predict cost before them
    bare = copy.copy(model)
    bare.calibration, bare.familiarity = None, None
    results["predict, bare softmax, no detector"] = timeit(lambda: predict(bare, photo, classes), sync=sync)
    results["predict cost of the trust checks (ratio)"] = (results["predict (end to end)"]["median"]
                                                          / results["predict, bare softmax, no detector"]["median"])

    def forward() -> None:
        with torch.inference_mode():
            model(x)
    results["forward alone (batch 1)"] = timeit(forward, repeats=50, sync=sync)
    results["predict overhead ratio"] = (results["predict (end to end)"]["median"]
                                         / results["forward alone (batch 1)"]["median"])


def _throughput_timings(model: nn.Module, device: torch.device, results: dict, sync: bool) -> None:
    """Inference images/s at batch 1, 64 and 256 beside resnet18-CIFAR in the same run."""
    baseline = resnet18_cifar().to(device).eval().to(memory_format=torch.channels_last)
    for bs in (1, 64, 256):
        xb = torch.randn(bs, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
        for name, m in (("model", model), ("resnet18", baseline)):
            def run(m=m, xb=xb) -> None:
                with torch.inference_mode():
                    m(xb)
            r = timeit(run, repeats=10 if bs > 1 else 30, budget_s=8, sync=sync)
            results[f"throughput {name} batch {bs} (images/s)"] = bs / r["median"]
    results["resnet18 / model time ratio, batch 1"] = (results["throughput model batch 1 (images/s)"]
                                                       / results["throughput resnet18 batch 1 (images/s)"])


def _tab_timings(model: nn.Module, meta: dict, photo_path: Path, layer: str, results: dict, sync: bool) -> None:
    """One click on the Feature maps and Groups tabs, through the tabs' own handlers (what the app runs, rendering
    and the deletion tests against the reference maps included; a copy here would drift from the app)."""
    from .ui import features_tab, groups_tab
    from .ui.context import Context

    ctx = Context(model, meta, None)
    results["Feature maps tab (grid + per-group stats chart)"] = timeit(
        lambda: features_tab.feature_maps(ctx, str(photo_path), layer), sync=sync)
    results["Groups tab analysis (importance, knock-outs, group Grad-CAMs, deletion tests, rendered)"] = timeit(
        lambda: groups_tab.analyse(ctx, str(photo_path), layer, progress=lambda *a, **k: None),
        warmup=1, repeats=5, budget_s=15, sync=sync)


def _explanation_timings(model: nn.Module, x: torch.Tensor, layer: str, results: dict, sync: bool) -> None:
    """The block's feature maps drawn, every attribution method, a live knock-out and one deletion score."""
    n_groups = explain.groups_of(model, layer)

    def fmaps() -> None:
        f = explain.feature_maps(model, x, [layer])[layer]
        visualize.group_grid(explain.split_groups(f, n_groups), scale="group", view="channels")
    results["feature maps (block, all groups rendered)"] = timeit(fmaps, sync=sync)
    target = int(model(x).argmax())
    for method in explain.METHODS:
        results[method] = timeit(lambda m=method: explain.attribute(model, x, m, target), warmup=1, repeats=5,
                                 budget_s=15, sync=sync)
    results["live knock-out of one group"] = timeit(lambda: groups.ablate_groups(model, x, layer, [0]), sync=sync)
    cam = explain.attribute(model, x, "Grad-CAM", target).values
    results["faithfulness (deletion score)"] = timeit(lambda: faithfulness.deletion_score(model, x, cam, target),
                                                      sync=sync)


def _finetune_timings(path: Path, device: torch.device, classes: list[str], results: dict, sync: bool) -> None:
    """One fine-tune epoch on 100 images, head only and all layers, on a fresh copy as the tab makes."""
    x100 = torch.randint(0, 256, (100, 3, 32, 32), dtype=torch.uint8)
    y100 = torch.arange(100) % len(classes)
    for layers in ("head", "all"):
        def epoch(layers=layers) -> None:
            m = weights.load_checkpoint(path, device)[0]
            cfg = trainer.TrainConfig(epochs=1, batch_size=25, train_layers=layers, warmup_epochs=0)
            list(trainer.fit(m, (x100, y100), cfg, device=device))
        results[f"fine-tune epoch, 100 images, {layers}"] = timeit(epoch, warmup=1, repeats=3, budget_s=20, sync=sync)


def cpu_actions(model: nn.Module, device: torch.device, results: dict, meta: dict, path: Path) -> None:
    """Predict, forward, throughput, feature maps, attributions, the Groups tab and fine-tune epochs."""
    photo = _photo()
    photo_path = Path(tempfile.mkdtemp()) / "photo.png"  # the tabs take an upload's file path
    photo.save(photo_path)
    x = data.preprocess(photo).to(device)
    sync = device.type == "cuda"
    model = model.to(device).eval().to(memory_format=torch.channels_last)
    layer = explain.layer_choices(model)["grouped"][-1]
    _predict_timings(model, photo, x, meta["classes"], results, sync)
    _throughput_timings(model, device, results, sync)
    _explanation_timings(model, x, layer, results, sync)
    _tab_timings(model, meta, photo_path, layer, results, sync)
    _finetune_timings(path, device, meta["classes"], results, sync)


def airbench_reference(num_classes: int = 10) -> nn.Module:
    """airbench94's dense net (Jordan 2024), now the zoo's `airbench94` (model.AirbenchNet)."""
    return build_model("airbench94", num_classes)


def train_throughput(model: nn.Module, device: torch.device, bf16: bool, channels_last: bool,
                     compiled: bool = False, batch_size: int = 256, budget_s: float = 8.0) -> float:
    """Images/s of a full training step (forward, backward, Nesterov SGD) on random data."""
    model = model.to(device).train()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    net = torch.compile(model) if compiled else model
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    xb = torch.randn(batch_size, 3, 32, 32, device=device).contiguous(memory_format=fmt)
    yb = torch.randint(0, 10, (batch_size,), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = nn.functional.cross_entropy(net(xb).float(), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    r = timeit(step, warmup=3 if compiled else 2, repeats=20, budget_s=budget_s, sync=device.type == "cuda")
    return batch_size / r["median"]


def _sweep_names() -> set[str]:
    """The sweep's equal-budget variants: the same cost as the default, so not worth a row each."""
    from .budget import equal_budget_configs
    return set(equal_budget_configs("resnext20_8x8d_fast", (1, 2, 4, 16)))


def training_table(device: torch.device, models: list[str], compiled: bool = False, budget_s: float = 8.0,
                   batch_size: int = 256, fastest: bool = False) -> list[dict]:
    """Training img/s of each model x {fp32, bf16} x {NCHW, channels_last} (`fastest`: bf16 + channels_last only,
    the fast recipe's form), beside the airbench94 reference (the zoo's dense `airbench94`) measured in the same
    run (the ratio is what survives a noisy machine)."""
    rows = []
    variants = [(True, True, False)] if fastest else [(bf, cl, False) for bf in (False, True) for cl in (False, True)]
    if compiled:
        variants.append((True, True, True))
    for name in ["airbench94"] + [m for m in models if m != "airbench94"]:
        for bf, cl, comp in variants:
            torch.manual_seed(0)
            m = build_model(name)
            ips = train_throughput(m, device, bf, cl, comp, batch_size=batch_size, budget_s=budget_s)
            rows.append({"model": name, "params": sum(p.numel() for p in m.parameters()), "bf16": bf,
                         "channels_last": cl, "compiled": comp, "images_per_s": ips})
    ref = {(r["bf16"], r["channels_last"], r["compiled"]): r["images_per_s"] for r in rows if r["model"] == "airbench94"}
    for r in rows:
        r["ratio_to_reference"] = r["images_per_s"] / ref[(r["bf16"], r["channels_last"], r["compiled"])]
    return rows


def training_report(rows: list[dict]) -> str:
    """Markdown table of training_table()."""
    lines = ["| model | params (M) | precision | layout | img/s | vs dense reference | min/epoch (50k) |",
             "|---|---:|---|---|---:|---:|---:|"]
    for r in rows:
        prec = "bf16 autocast" if r["bf16"] else "fp32"
        layout = ("channels_last" if r["channels_last"] else "NCHW") + (" + compile" if r["compiled"] else "")
        lines.append(f"| {r['model']} | {r['params'] / 1e6:.2f} | {prec} | {layout} | {r['images_per_s']:.0f} | "
                     f"{r['ratio_to_reference']:.2f} | {50_000 / r['images_per_s'] / 60:.1f} |")
    return "\n".join(lines)


def _unfold_conv(x: torch.Tensor, weight: torch.Tensor, groups: int) -> torch.Tensor:
    """The same grouped 3x3 conv as one batched matrix product per group over unfolded 3x3 patches (the
    "batched matmul" formulation; im2col by hand)."""
    n, w, h, v = x.shape
    d = w // groups
    u = F.unfold(x, 3, padding=1).view(n, groups, d * 9, h * v)
    return torch.einsum("gok,ngkp->ngop", weight.reshape(groups, d, d * 9), u).reshape(n, w, h, v)


def grouped_conv_table(shapes: tuple = ((1, 229), (2, 155), (4, 102), (8, 66), (16, 41), (32, 25)),
                       sizes: tuple = (15, 7), batch_size: int = 256, budget_s: float = 4.0) -> list[dict]:
    """Forward + backward of one 3x3 conv of C groups of d channels (bf16 autocast, the CPU) at the airbench94x
    members' stage-2/3 shapes, as nn.Conv2d (channels_last) and as unfold + batched matmul: seconds and MAC rate."""
    rows = []
    for size in sizes:
        for c, d in shapes:
            torch.manual_seed(0)
            conv = nn.Conv2d(c * d, c * d, 3, padding=1, groups=c, bias=False).to(memory_format=torch.channels_last)
            x = torch.randn(batch_size, c * d, size, size).contiguous(memory_format=torch.channels_last)
            x.requires_grad_(True)

            def step(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor = x) -> None:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    y = f(x)
                y.float().sum().backward()
            r = timeit(lambda: step(conv), repeats=10, budget_s=budget_s)
            w = conv.weight.detach().contiguous().requires_grad_(True)
            r_mm = timeit(lambda: step(lambda v: _unfold_conv(v, w, c)), warmup=1, repeats=3, budget_s=budget_s)
            macs = batch_size * size * size * c * d * 9 * d
            rows.append({"size": size, "cardinality": c, "d": d, "channels": c * d, "seconds": r["median"],
                         "gmacs": macs / 1e9, "gmac_per_s": macs / r["median"] / 1e9,
                         "unfold_matmul_seconds": r_mm["median"]})
    return rows


def grouped_conv_report(rows: list[dict]) -> str:
    """Markdown table of grouped_conv_table(): each row's time and rate beside C = 1 at the same size."""
    base = {r["size"]: r for r in rows if r["cardinality"] == 1}
    lines = ["| size | C x d | channels | GMACs | ms | GMAC/s | time vs C = 1 | rate vs C = 1 | unfold + matmul ms |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        b = base.get(r["size"], r)
        lines.append(f"| {r['size']}x{r['size']} | {r['cardinality']} x {r['d']}d | {r['channels']} | {r['gmacs']:.2f} "
                     f"| {1000 * r['seconds']:.0f} | {r['gmac_per_s']:.1f} | {r['seconds'] / b['seconds']:.2f} "
                     f"| {r['gmac_per_s'] / b['gmac_per_s']:.2f} | {1000 * r['unfold_matmul_seconds']:.0f} |")
    return "\n".join(lines)


def gpu_training(results: dict, steps: int = 30, batch_size: int = 512) -> None:
    """Training throughput on CUDA, bf16 + channels_last, compiled vs not, and achieved TFLOP/s."""
    for name in ("resnext23_16x8d_fast_large", "airbench94", "airbench94x_32x25d", "resnext29_8x64d"):
        for compiled in (False, True):
            model = build_model(name, zero_init_residual=True).cuda().to(memory_format=torch.channels_last)
            macs = count_macs(model)
            net = torch.compile(model) if compiled else model
            opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
            xb = torch.randn(batch_size, 3, 32, 32, device="cuda").contiguous(memory_format=torch.channels_last)
            yb = torch.randint(0, 10, (batch_size,), device="cuda")

            def step() -> None:
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = nn.functional.cross_entropy(net(xb).float(), yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            r = timeit(step, warmup=5, repeats=steps, budget_s=60, sync=True)
            ips = batch_size / r["median"]
            tflops = 3 * 2 * macs * ips / 1e12  # forward + backward ~ 3x forward; 2 FLOPs per MAC
            key = f"train {name} {'compiled' if compiled else 'eager'}"
            results[f"{key} (images/s)"] = ips
            results[f"{key} epoch (s)"] = 50_000 / ips
            results[f"{key} TFLOP/s fraction of H100 bf16 peak"] = tflops / H100_BF16_DENSE_TFLOPS


def main(argv: list[str] | None = None) -> dict:
    """CLI entry point; returns the results dict."""
    ap = argparse.ArgumentParser(description="Benchmark every user-facing action.")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--weights", default=str(weights.DEFAULT_WEIGHTS))
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--skip-startup", action="store_true")
    ap.add_argument("--train", action="store_true", help="training img/s of the fast models vs a dense reference")
    ap.add_argument("--models", default=None, help="comma-separated models for --train (default: fast family)")
    ap.add_argument("--compile", action="store_true", help="--train: also time torch.compile")
    ap.add_argument("--batch-size", type=int, default=256, help="--train: batch size (the fast recipe uses 1024)")
    ap.add_argument("--fastest", action="store_true", help="--train: bf16 + channels_last only (the fast recipe's)")
    ap.add_argument("--grouped-conv", action="store_true", help="one grouped 3x3 conv at the sweep's C x d shapes")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if args.grouped_conv:
        rows = grouped_conv_table(batch_size=args.batch_size)
        print(json.dumps(rows, indent=1) if args.json else f"CPU, {torch.get_num_threads()} torch threads, batch "
              f"{args.batch_size}, bf16 autocast, channels_last, forward + backward\n\n" + grouped_conv_report(rows))
        return {"grouped_conv": rows}
    if args.train:
        names = args.models.split(",") if args.models else [n for n in list_models() if get_config(n).family == "fast"
                                                           and n not in _sweep_names()]
        rows = training_table(device, names, compiled=args.compile, batch_size=args.batch_size, fastest=args.fastest)
        print(json.dumps(rows, indent=1) if args.json else
              f"Device: {device} ({torch.get_num_threads()} torch threads), batch {args.batch_size}\n\n"
              + training_report(rows))
        return {"train": rows}
    path = Path(args.weights)
    if not path.is_file():  # still benchmark the architecture: an untrained default-sized model
        path = Path(tempfile.mkdtemp()) / "bench.safetensors"
        weights.save_checkpoint(path, build_model("resnext23_16x8d_fast_large"))  # the shipped default's architecture
    model, meta = weights.load_checkpoint(path, device)
    results: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else
                     f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)",
                     "model": meta["recipe"]["model"] if "recipe" in meta else "untrained", "weights": str(path)}
    if not args.skip_startup:
        results["app start-up to first page"] = timeit(lambda: startup_seconds(path), warmup=0, repeats=3, budget_s=60)
    cpu_actions(model, device, results, meta, path)
    if device.type == "cuda":
        gpu_training(results)
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        print(report(results))
    return results


def report(results: dict) -> str:
    """A Markdown table: action, median, p95, target."""
    lines = [f"Device: {results['device']}; checkpoint: {results['model']}", "",
             "| action | median | p95 | target |", "|---|---:|---:|---:|"]
    for k, v in results.items():
        if isinstance(v, dict):
            tgt = TARGETS.get(k)
            ok = "" if tgt is None else (f"≤ {tgt * 1000:.0f} ms " if tgt < 1 else f"≤ {tgt:.0f} s ") + \
                ("✓" if v["median"] <= tgt else "✗")
            lines.append(f"| {k} | {_fmt(v['median'])} | {_fmt(v['p95'])} | {ok} |")
    lines += ["", "| figure | value |", "|---|---:|"]
    lines += [f"| {k} | {v:.3g} |" for k, v in results.items() if isinstance(v, float)]
    return "\n".join(lines)


def _fmt(s: float) -> str:
    return f"{s * 1000:.1f} ms" if s < 1 else f"{s:.2f} s"


if __name__ == "__main__":
    main()
