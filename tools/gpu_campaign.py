"""One call on a lent GPU: the recipe study for the default checkpoint and the cardinality sweep, run
side by side, each run's epochs sized to the time left (a developer tool, not part of the app).

    python tools/gpu_campaign.py --data .data/cifar10-jpeg.tar.gz --out "$OUT" --deadline 530
    python tools/gpu_campaign.py --plan long --max-epochs 200 --out "$OUT" --deadline 520   # the third call
    python tools/gpu_campaign.py --plan kd --max-epochs 200 --out "$OUT" --deadline 540     # the fifth (.data/kd)
    python tools/gpu_campaign.py --plan kd2 --epochs 60 --out "$OUT" --deadline 315 --reserve 40   # the sixth
    python tools/gpu_campaign.py throughput --out runs/gpu1     # what the card did (tars unpacked there)

1. decode CIFAR-10 once (every run then reads the cache);
2. probe: every planned run trains on random data at the same time for one fixed window, so each measures
   its step time under the same sharing of the GPU that the real runs will see;
3. epochs per size class = what fits the time left; one epoch count for every run of a class, so the
   recipe candidates (and the sweep's cardinalities) are compared at equal epochs;
4. the runs themselves (`python -m resnext_demo.train`, resumable), stopped at the deadline;
5. checkpoints and curves packed into at most 7 tar files under 16 MiB, plus summary.json.

Recipe candidates are trained twice: on 45k images scored on a 5k validation split (the choice is made
there) and on all 50k (what would ship). The test split is only read at the end of each run.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# The CPU default's recipe (docs/model-card.md, "The CPU path stands on its own"): the baseline every candidate
# changes one thing of.
BASE = ["--batch-size", "512", "--lr", "0.4", "--schedule", "onecycle", "--label-smoothing", "0.2",
        "--weight-decay", "5e-4", "--crop-padding", "4", "--flip", "--whiten"]
CUTOUT = ["--cutout", "12"]  # airbench96's size
DEFAULT, WIDE = "resnext20_8x8d_fast", "resnext20_16x8d_fast_wide"
SWEEP = ["resnet20_fast", "resnext20_2x21d_fast", "resnext20_4x13d_fast", "resnext20_8x8d_fast",
         "resnext20_16x5d_fast"]


@dataclass
class Run:
    """One training run: its name (= output file stem), model, seed and the flags beyond BASE."""

    name: str
    model: str
    seed: int
    flags: list[str] = field(default_factory=list)
    keep: str = "fp32"  # what comes back: "fp32" weights, "half" weights, or "none" (metadata only)

    @property
    def size_class(self) -> str:  # runs of one class get the same epochs (the sweep: its whole budget)
        return "wide" if self.model == WIDE else "default" if self.model in SWEEP else self.model


def plan() -> list[Run]:
    """Recipe candidates (validation + full-data twin) and the sweep (two seeds per cardinality)."""
    runs = []
    for tag, model, flags in (("default-base", DEFAULT, []), ("default-cutout", DEFAULT, CUTOUT),
                              ("wide-base", WIDE, []), ("wide-cutout", WIDE, CUTOUT)):
        runs.append(Run(f"val-{tag}", model, 0, flags + ["--val", "5000"], keep="none"))
        if tag != "default-base":  # its full-data twin is the sweep's C=8 seed-0 run
            runs.append(Run(f"full-{tag}", model, 0, flags))
    runs += [Run(f"{m}-s{s}", m, s, [], keep="half") for m in SWEEP for s in (0, 1)]
    return runs


def plan_large() -> list[Run]:
    """Second call: airbench96-sized ResNeXts, trained on 45k and chosen on the 5k validation split (the
    checkpoint that ships is the one chosen: no full-data twin, for want of GPU time)."""
    return [Run("val-large-base", "resnext23_16x8d_fast_large", 0, ["--val", "5000"], keep="half"),
            Run("val-large-cutout", "resnext23_16x8d_fast_large", 0, CUTOUT + ["--val", "5000"], keep="half"),
            Run("val-large32-base", "resnext20_32x8d_fast_large", 0, ["--val", "5000"], keep="half")]


def plan_long() -> list[Run]:
    """Third call: the chosen recipe (large + cutout 12) trained for as long as the call allows, on 45k
    (its validation accuracy decides whether it replaces the default) and its full-data twin on all 50k
    (what ships if it does: same recipe, same epochs, 5,000 more training images)."""
    return [Run("val-large-cutout-long", "resnext23_16x8d_fast_large", 0, CUTOUT + ["--val", "5000"], keep="half"),
            Run("full-large-cutout-long", "resnext23_16x8d_fast_large", 0, CUTOUT, keep="half")]


def plan_long32() -> list[Run]:
    """Fourth call: the same with C=32 (resnext20_32x8d_fast_large beat C=16 by 0.9 validation points
    without cutout at 62 epochs), validation run and full-data twin."""
    return [Run("val-large32-cutout-long", "resnext20_32x8d_fast_large", 0, CUTOUT + ["--val", "5000"], keep="half"),
            Run("full-large32-cutout-long", "resnext20_32x8d_fast_large", 0, CUTOUT, keep="half")]


KD = ".data/kd"  # the teachers travel here (git-ignored, named in `carry`); the full-data C=32 is the default


def plan_kd() -> list[Run]:
    """Fifth call: distil the two-model ensemble (C=32 + C=16, flip-TTA soft targets) into the C=32 model,
    starting from its own weights with a fresh one-cycle schedule at half the peak rate. The 45k run learns
    from the 45k teachers and is scored on the validation split (the choice); its full-data twin learns
    from the full-data teachers (what would ship)."""
    kd = ["--teacher-tta", "--lr", "0.2"] + CUTOUT
    val = [f"{KD}/val32.safetensors", f"{KD}/val16.safetensors"]
    full = ["weights/default.safetensors", f"{KD}/full16.safetensors"]
    m = "resnext20_32x8d_fast_large"
    return [Run("val-kd", m, 0, kd + ["--teachers", ",".join(val), "--init-from", val[0], "--val", "5000"], keep="half"),
            Run("full-kd", m, 0, kd + ["--teachers", ",".join(full), "--init-from", full[0]], keep="half")]


def plan_kd2() -> list[Run]:
    """Sixth call, a second generation: each kd student learns again from itself + the C=16 (flip-TTA),
    starting from its own weights at a peak rate of 0.1 (0.2 had undone most of the starting weights)."""
    kd = ["--teacher-tta", "--lr", "0.1"] + CUTOUT
    runs = []
    for split in ("val", "full"):  # the kd plan's students, copied into .data/kd as <split>-kd.safetensors
        student = f"{KD}/{split}-kd.safetensors"
        flags = kd + ["--teachers", f"{student},{KD}/{split}16.safetensors", "--init-from", student]
        runs.append(Run(f"{split}-kd2", "resnext20_32x8d_fast_large", 0,
                        flags + (["--val", "5000"] if split == "val" else []), keep="half"))
    return runs


def probe(model: str, flags: list[str], t1: float, t2: float, result: str, device: str) -> None:
    """Train `model` on random data until t2; write the seconds per step measured between t1 and t2."""
    import torch

    from resnext_demo import train, trainer
    from resnext_demo.zoo import build_model

    cutout = int(flags[flags.index("--cutout") + 1]) if "--cutout" in flags else 0
    teachers = flags[flags.index("--teachers") + 1] if "--teachers" in flags else ""
    torch.manual_seed(0)
    x = torch.randint(0, 256, (16384, 3, 32, 32), dtype=torch.uint8)
    y = torch.randint(0, 10, (16384,))
    cfg = trainer.TrainConfig(model=model, epochs=10_000, batch_size=512, lr=0.4, schedule="onecycle",
                            label_smoothing=0.2, cutout=cutout, log_every=4, max_seconds=max(1.0, t2 - time.time()),
                            teacher_tta="--teacher-tta" in flags)
    marks = []
    teacher_models = train._load_teachers(teachers)[0]  # distillation: their forward passes are part of a step
    for ev in trainer.fit(build_model(model, zero_init_residual=True), (x, y), cfg, device=device,
                        teachers=teacher_models):
        if ev.kind == "step" and t1 <= time.time() <= t2:
            marks.append((time.time(), ev.epoch * ev.steps_per_epoch + ev.step))
    rate = (marks[-1][0] - marks[0][0]) / max(1, marks[-1][1] - marks[0][1]) if len(marks) > 1 else float("inf")
    Path(result).write_text(json.dumps({"model": model, "seconds_per_step": rate, "marks": len(marks)}))


def _python(args: list[str], log: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            env=env, start_new_session=True)


def _stop(procs: dict[str, subprocess.Popen]) -> list[str]:
    """Terminate what still runs (its resume state stays); the names stopped."""
    alive = [n for n, p in procs.items() if p.poll() is None]
    for n in alive:
        os.killpg(procs[n].pid, signal.SIGTERM)
    time.sleep(5)
    for n in alive:
        if procs[n].poll() is None:
            os.killpg(procs[n].pid, signal.SIGKILL)
    return alive


def _pack(files: list[Path], out: Path, limit: int = int(15.5 * 2**20), most: int = 7, stem: str = "runs") -> list[str]:
    """Greedy bin packing of files into <= `most` tar files `<stem><i>.tar` of <= `limit` bytes; names of what
    was left out (tools/gpu_sweep.py packs its checkpoints with it too)."""
    bins: list[list[Path]] = []
    sizes: list[int] = []
    left = []
    for f in sorted(files, key=lambda f: -f.stat().st_size):
        s = f.stat().st_size + 4096
        i = next((i for i, used in enumerate(sizes) if used + s <= limit), None)
        if i is None and len(bins) < most and s <= limit:
            bins.append([])
            sizes.append(0)
            i = len(bins) - 1
        if i is None:
            left.append(f.name)
            continue
        bins[i].append(f)
        sizes[i] += s
    for i, b in enumerate(bins):
        with tarfile.open(out / f"{stem}{i}.tar", "w") as t:
            for f in b:
                t.add(f, arcname=f.name)
    return left


def throughput(folder: Path) -> dict:
    """What a campaign got from the card, from its unpacked runs (summary.json + curves): images trained, the
    longest run's seconds, img/s and TFLOP/s in all (6 FLOPs per multiply-add: forward + backward)."""
    from resnext_demo.zoo import get_config
    from resnext_demo.budget import config_macs

    images = flops = longest = 0.0
    for name, run in json.loads((folder / "summary.json").read_text())["runs"].items():
        curve = json.loads((folder / f"{name}.curve.json").read_text())
        n = (45_000 if name.startswith("val-") else 50_000) * len(curve)
        images, flops = images + n, flops + n * 6 * config_macs(get_config(run["model"]))
        longest = max(longest, curve[-1]["seconds"])
    return {"images": int(images), "seconds": longest, "img_per_s": round(images / longest),
            "tflops": round(flops / longest / 1e12, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("action", nargs="?", default="campaign", choices=("campaign", "probe", "throughput"))
    ap.add_argument("--data", default=".data/cifar10-jpeg.tar.gz")
    ap.add_argument("--out", default="out/gpu")
    ap.add_argument("--deadline", type=float, default=530, help="seconds from start until everything is packed")
    ap.add_argument("--max-epochs", type=int, default=100)
    ap.add_argument("--plan", default="first", choices=("first", "large", "long", "long32", "kd", "kd2"))
    ap.add_argument("--epochs", type=int, default=0, help="fixed epochs for every run (skips the probe: a "
                    "previous call on the same card measured the speed)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--only", default=None, help="comma-separated run names (smoke tests)")
    ap.add_argument("--extra", default="", help="flags added to every training run (smoke tests: --subset ...)")
    ap.add_argument("--train-images", type=int, default=50_000)
    ap.add_argument("--probe-start", type=float, default=40, help="seconds for every probe to start and warm up")
    ap.add_argument("--reserve", type=float, default=60, help="seconds kept for start-up, test, packing")
    ap.add_argument("--probe-len", type=float, default=20, help="seconds the probes time together")
    # probe-only
    ap.add_argument("--model")
    ap.add_argument("--flags", default="")
    ap.add_argument("--t1", type=float)
    ap.add_argument("--t2", type=float)
    ap.add_argument("--result")
    a = ap.parse_args()
    if a.action == "probe":
        return probe(a.model, a.flags.split(), a.t1, a.t2, a.result, a.device)
    if a.action == "throughput":  # --out: a campaign's unpacked results
        return print(json.dumps(throughput(Path(a.out))))

    t0 = time.time()
    out, work = Path(a.out), ROOT / "runs" / "gpu"
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RESNEXT_DEMO_DATA": str(Path(a.data).resolve())}
    from resnext_demo import data

    for split in ("train", "test"):  # decode once; every run reads the cache
        data.load_split(str(Path(a.data).resolve()), split)
    print(f"[{time.time() - t0:5.0f}s] data decoded", flush=True)
    plans = {"first": plan, "large": plan_large, "long": plan_long, "long32": plan_long32, "kd": plan_kd, "kd2": plan_kd2}
    runs = [r for r in plans[a.plan]() if a.only is None or r.name in a.only.split(",")]

    # 2. probe, all at once
    t1 = time.time() + a.probe_start
    t2 = t1 + a.probe_len
    probes = {r.name: _python([__file__, "probe", "--model", r.model, "--flags", " ".join(r.flags), "--t1", str(t1),
                               "--t2", str(t2), "--result", str(work / f"{r.name}.probe.json"), "--device", a.device],
                              work / f"{r.name}.probe.log", env) for r in runs if not a.epochs}
    for p in probes.values():
        p.wait()
    step_s = {}
    for r in runs:
        f = work / f"{r.name}.probe.json"
        step_s[r.name] = json.loads(f.read_text())["seconds_per_step"] if f.is_file() and not a.epochs else float("inf")
    finite = [v for v in step_s.values() if math.isfinite(v)]
    for k, v in step_s.items():  # a failed probe: assume the slowest that worked (or 0.1 s), don't starve all
        step_s[k] = v if math.isfinite(v) else max(finite, default=0.1)
    print(f"[{time.time() - t0:5.0f}s] probe s/step: " + ", ".join(f"{k} {v:.4f}" for k, v in step_s.items()), flush=True)

    # 3. epochs per size class: the slowest run of the class must finish in the time left
    budget = a.deadline - (time.time() - t0) - a.reserve  # start-up, final test evaluation, packing
    steps = a.train_images // 512
    epochs = {}
    for cls in {r.size_class for r in runs}:
        worst = max(step_s[r.name] for r in runs if r.size_class == cls)
        epochs[cls] = a.epochs or max(1, min(a.max_epochs, math.floor(budget / (steps * worst * 1.08 + 1.0))))
    print(f"[{time.time() - t0:5.0f}s] budget {budget:.0f}s -> epochs {epochs}", flush=True)

    # 4. the runs
    procs = {}
    for r in runs:
        args = ["-m", "resnext_demo.train", "--model", r.model, "--seed", str(r.seed), *BASE, *r.flags,
                "--epochs", str(epochs[r.size_class]), "--out", str(work / f"{r.name}.safetensors"), "--resume",
                "--device", a.device, *(["--half"] if r.keep == "half" else []), *a.extra.split()]
        procs[r.name] = _python(args, work / f"{r.name}.log", env)
    gpu_log = []
    while any(p.poll() is None for p in procs.values()) and time.time() - t0 < a.deadline - 25:
        time.sleep(5)
        if a.device == "cuda" and int(time.time() - t0) % 30 < 5:
            q = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used,power.draw",
                                "--format=csv,noheader"], capture_output=True, text=True)
            gpu_log.append(f"{time.time() - t0:.0f}s {q.stdout.strip()}")
    stopped = _stop(procs)

    # 5. summary and packing
    from resnext_demo import weights

    summary = {"epochs": epochs, "probe_seconds_per_step": step_s, "stopped_at_deadline": stopped,
               "gpu": gpu_log, "runs": {}}
    files = []
    for r in runs:
        ck, res = work / f"{r.name}.safetensors", work / f"{r.name}.resume.safetensors"
        row = {"model": r.model, "seed": r.seed, "flags": BASE + r.flags, "returncode": procs[r.name].returncode}
        src = ck if ck.is_file() else res if res.is_file() else None
        if src is not None:
            meta = weights.read_metadata(src)
            row.update({k: meta.get(k) for k in ("accuracy", "accuracy_tta", "val_accuracy", "epochs", "epoch",
                                                 "train_seconds_total", "wall_seconds", "per_class", "device")})
            row["finished"] = src == ck
            if r.keep != "none":
                files.append(src)
        for extra in (work / f"{r.name}.curve.json", work / f"{r.name}.log"):
            if extra.is_file():
                files.append(extra)
        summary["runs"][r.name] = row
    summary["left_out"] = _pack(files, out)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"[{time.time() - t0:5.0f}s] packed; left out: {summary['left_out']}")
    print("| run | epochs | val | test | test TTA | s |")
    for n, r in summary["runs"].items():
        f = lambda v: "" if v is None else f"{100 * v:.2f}"
        print(f"| {n} | {r.get('epochs') or r.get('epoch')} | {f(r.get('val_accuracy'))} | {f(r.get('accuracy'))} | "
              f"{f(r.get('accuracy_tta'))} | {r.get('train_seconds_total')} |")


if __name__ == "__main__":
    main()
