"""One call on a lent GPU: the fast-recipe cardinality sweep (issue 29), many runs side by side on the card.

    RESNEXT_DEMO_COMMIT=<sha> python tools/gpu_sweep.py --data .data/cifar10-jpeg.tar.gz --out "$OUT" --deadline 450
    python tools/gpu_sweep.py --device cpu --workers 1 --models airbench94,airbench94x_32x25d --dense-seeds 1 \\
        --seeds 1 --max-epochs 0.3 --subset 4000 --probe-len 3 --out /tmp/gs --deadline 240    # CPU smoke test
    python -m resnext_demo.sweep analyse --runs <unpacked $OUT>    # the paired analysis, results.json and plot

1. decode CIFAR-10 once into .cache (every worker then reads the cache);
2. start `--workers` processes; each loads the data onto the device, then all of them probe at the same time:
   each trains its probe model (the models dealt round-robin) for `--probe-len` seconds and reports its seconds
   per step under that sharing of the card;
3. epochs: the most (<= `--max-epochs`, >= `--min-epochs`, one value for every run) that lets all runs finish in
   the time left, from the probed step times; below `--min-epochs` the epochs stay there and fewer seeds finish;
4. the runs, taken from one queue in seed-major order (seed 0 of every model, then seed 1, ...), so a deadline
   leaves every model with about the same number of seeds; a worker starts a run only if its measured duration
   fits before the deadline, and a run cut by the deadline is recorded as stopped (the analysis drops it);
5. $OUT: results.json (one row per run: model, C, seed, config, params, MACs, epochs, plain and TTA accuracy,
   seconds), predictions.npz (uint8 predicted class of every test image per run, plain and TTA, + labels),
   checkpoints*.tar (seed 0 of each model, fp16) and log.txt: at most 8 files, each < 16 MiB.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import queue
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tools.gpu_campaign import _pack  # noqa: E402  (the same packing for the trip back)

DENSE = "airbench94"


def plan(models: list[str], dense_seeds: int, seeds: int) -> list[tuple[str, int]]:
    """(model, seed) jobs, seed-major: a deadline cuts every model at about the same number of seeds."""
    return [(m, s) for s in range(max(dense_seeds, seeds)) for m in models
            if s < (dense_seeds if m == DENSE else seeds)]


def _data(args: argparse.Namespace):
    """(train, test) uint8 tensors from the decoded cache (`--subset`: balanced subsets, smoke tests)."""
    from resnext_demo import data
    from resnext_demo.splits import balanced_subset

    src = str(Path(args.data).resolve())
    train = balanced_subset(*data.load_split(src, "train"), args.subset)
    test = balanced_subset(*data.load_split(src, "test"), args.test_subset)
    return train, test


def probe(model_name: str, train, device, seconds: float, t_start: float) -> float:
    """Seconds per training step of `model_name` (fast recipe, real data), timed over `seconds` from t_start."""
    import torch
    import torch.nn.functional as F

    from resnext_demo import speedrun
    from resnext_demo.zoo import build_model

    recipe = speedrun.FastRecipe(model=model_name)
    model = build_model(model_name).to(device).to(memory_format=torch.channels_last)
    speedrun.prepare(model, train[0], recipe)
    opt = speedrun.optimizer(model, recipe)
    batches = speedrun.Batches(*train, recipe, device)
    bf16, marks, epoch = speedrun.use_bf16(device, True), [], 0
    while len(marks) < 2 or marks[-1][0] < t_start + seconds:
        for xb, yb in batches.epoch(epoch):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = F.cross_entropy(model(xb).float(), yb, reduction="sum")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            now = time.time()
            if now >= t_start:
                marks.append((now, len(marks)))
            if len(marks) >= 2 and now >= t_start + seconds:
                break
        epoch += 1
    return (marks[-1][0] - marks[0][0]) / max(1, len(marks) - 1)


def worker(rank: int, args: argparse.Namespace, probe_model: str, t_probe: float, jobs, reports, epochs_box,
           t_end: float) -> None:
    """Load data, probe, wait for the epochs, then take runs from `jobs` until none is left or time runs out."""
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // (args.workers + 1)))
    torch.backends.cudnn.benchmark = True
    device = torch.device(args.device)
    train, test = _data(args)
    reports.put(("probe", probe_model, probe(probe_model, train, device, args.probe_len, t_probe)))
    while epochs_box.value <= 0:
        time.sleep(0.2)
    epochs, seen = epochs_box.value, {}
    while True:
        try:
            model_name, seed = jobs.get_nowait()
        except queue.Empty:
            return
        left = t_end - time.time()
        if left < 1.15 * seen.get(model_name, max(seen.values(), default=0.0)) or left < 5:
            reports.put(("skipped", model_name, seed))
            continue
        try:
            seen[model_name] = run_one(model_name, seed, epochs, train, test, device, args, left)
        except Exception as e:  # one failed run (e.g. out of memory) must not end the worker's other runs
            reports.put(("error", model_name, seed, repr(e)[:300]))
            if args.device == "cuda":
                torch.cuda.empty_cache()


def run_one(model_name: str, seed: int, epochs: float, train, test, device, args, left: float) -> float:
    """One fast-recipe run: its row (JSON) and predictions (npy) in the work folder, seed 0's weights (fp16)."""
    import numpy as np
    import torch

    from resnext_demo import data, speedrun, weights
    from resnext_demo.model import count_macs, count_params
    from resnext_demo.zoo import build_model

    t0 = time.time()
    recipe = speedrun.FastRecipe(model=model_name, epochs=epochs, seed=seed, eval_every_epoch=False)
    torch.manual_seed(seed)
    model = build_model(model_name)
    params, macs = count_params(model), count_macs(model)
    r = speedrun.train_and_test(model, train, test, recipe, device, max_seconds=max(1.0, left - 10))
    name = f"{model_name}-s{seed}"
    work = Path(args.work)
    np.save(work / f"{name}.npy", np.stack([r["pred"].numpy(), r["pred_tta"].numpy()]).astype(np.uint8))
    row = {"name": name, "model": model_name, "seed": seed, "config": model.config.to_dict(), "params": params,
           "macs": macs, "epochs": epochs, "accuracy": r["accuracy"], "accuracy_tta": r["accuracy_tta"],
           "train_seconds": r["train_seconds"], "eval_seconds": r["eval_seconds"], "stopped": r["stopped"],
           "seconds": round(time.time() - t0, 2), "recipe": {**vars(recipe)}, "history": r["history"],
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "data": data.source_record(args.data, len(train[1]), len(test[1]), 0)}
    (work / f"{name}.json").write_text(json.dumps(row))
    if seed == 0 and not r["stopped"]:
        meta = {k: row[k] for k in ("recipe", "params", "macs", "epochs", "accuracy", "accuracy_tta", "history",
                                    "train_seconds", "device", "data")}
        weights.save_checkpoint(work / f"{name}.safetensors", model, {**meta, "tta_level": recipe.tta_level},
                                half=True)
    return time.time() - t0


EVAL_EPOCHS = 0.4  # a run's 6-view TTA of 10,000 images costs about 0.4 training epochs of compute


def size_epochs(step_s: dict[str, float], jobs: list[tuple[str, int]], steps_per_epoch: int, workers: int,
                budget: float, args: argparse.Namespace) -> float:
    """Epochs (0.1 steps) so that every job fits in `budget` seconds on `workers` from the probed s/step: the
    busiest worker gets its share of all the work plus, at worst, one whole run more; 8 % spare."""
    per_epoch = [step_s[m] * steps_per_epoch for m, _ in jobs]
    span = sum(per_epoch) / workers + max(per_epoch)  # seconds per epoch of every run, on the busiest worker
    fit = 0.92 * budget / max(span, 1e-9) - EVAL_EPOCHS
    return min(args.max_epochs, max(args.min_epochs, math.floor(fit * 10) / 10))


def collect(work: Path, out: Path, test_labels, summary: dict) -> dict:
    """Merge the workers' rows and predictions into results.json + predictions.npz; pack the checkpoints."""
    import numpy as np

    rows = [json.loads(p.read_text()) for p in sorted(work.glob("*.json"))]
    rows = [r for r in rows if (work / f"{r['name']}.npy").is_file()]
    preds = [np.load(work / f"{r['name']}.npy") for r in rows]
    for i, r in enumerate(rows):
        r["index"] = i
    n = len(test_labels)
    plain = np.stack([p[0] for p in preds]) if preds else np.zeros((0, n), np.uint8)
    tta = np.stack([p[1] for p in preds]) if preds else np.zeros((0, n), np.uint8)
    np.savez_compressed(out / "predictions.npz", plain=plain, tta=tta, labels=np.asarray(test_labels, np.uint8),
                        names=np.array([r["name"] for r in rows]))
    summary["left_out"] = _pack(sorted(work.glob("*.safetensors")), out, most=4, stem="checkpoints")
    (out / "results.json").write_text(json.dumps({**summary, "runs": rows}, indent=1))
    for m in dict.fromkeys(r["model"] for r in rows):  # a glance in the call's output; the analysis is sweep's
        done = [r for r in rows if r["model"] == m and not r["stopped"]]
        if done:
            print(f"{m}: {len(done)} runs, plain {100 * np.mean([r['accuracy'] for r in done]):.2f} %, TTA "
                  f"{100 * np.mean([r['accuracy_tta'] for r in done]):.2f} %, {np.mean([r['seconds'] for r in done]):.0f} s/run")
    return {"runs": len(rows), "finished": sum(not r["stopped"] for r in rows)}


def _parser() -> argparse.ArgumentParser:
    from resnext_demo.zoo import airbench_family

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=".data/cifar10-jpeg.tar.gz")
    ap.add_argument("--out", default="out/gpu_sweep")
    ap.add_argument("--work", default=str(ROOT / "runs" / "gpu_sweep"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--models", default=",".join([DENSE, *airbench_family().values()]))
    ap.add_argument("--dense-seeds", type=int, default=5)
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--workers", type=int, default=14)
    ap.add_argument("--deadline", type=float, default=450, help="seconds from start until everything is written")
    ap.add_argument("--reserve", type=float, default=25, help="seconds kept for collecting and packing")
    ap.add_argument("--max-epochs", type=float, default=9.9, help="airbench94's 9.9 unless time forces fewer")
    ap.add_argument("--min-epochs", type=float, default=6.0, help="below this, keep the epochs and drop seeds")
    ap.add_argument("--probe-len", type=float, default=12)
    ap.add_argument("--subset", type=int, default=None, help="smoke tests: a balanced training subset")
    ap.add_argument("--test-subset", type=int, default=None)
    return ap


def _gpu_state() -> str:
    q = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used,power.draw", "--format=csv,noheader"],
                       capture_output=True, text=True)
    return q.stdout.strip()


def main() -> None:
    args = _parser().parse_args()
    t0 = time.time()
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    for f in work.iterdir():  # a previous call's runs on this machine are not this call's
        f.unlink()
    log = open(out / "log.txt", "w")

    def say(msg: str) -> None:
        print(f"[{time.time() - t0:5.0f}s] {msg}", flush=True)
        log.write(f"[{time.time() - t0:5.0f}s] {msg}\n")
        log.flush()
    train, test = _data(args)  # decodes into .cache once
    say(f"data ready: {len(train[1])} train, {len(test[1])} test")
    models = args.models.split(",")
    jobs = plan(models, args.dense_seeds, args.seeds)
    ctx = mp.get_context("spawn")
    job_q, reports, epochs_box = ctx.Queue(), ctx.Queue(), ctx.Value("d", 0.0)
    for j in jobs:
        job_q.put(j)
    t_end = t0 + args.deadline - args.reserve
    t_probe = time.time() + 25 + 2 * args.workers ** 0.5  # every worker started, data on the device
    procs = [ctx.Process(target=worker, args=(i, args, models[i % len(models)], t_probe, job_q, reports, epochs_box,
                                              t_end)) for i in range(args.workers)]
    for p in procs:
        p.start()
    epochs, summary = run_phases(args, procs, reports, epochs_box, jobs, models, len(train[1]),
                                 t_probe + args.probe_len + 30, t_end, say)
    summary.update(plan=len(jobs), epochs=epochs, workers=args.workers, deadline=args.deadline,
                   commit=os.environ.get("RESNEXT_DEMO_COMMIT"), command=" ".join(sys.argv))
    done = collect(work, out, test[1].numpy(), summary)
    say(f"collected {done}")
    log.close()


def run_phases(args, procs, reports, epochs_box, jobs, models, n_train: int, t_probe_end: float, t_end: float,
               say) -> tuple[float, dict]:
    """Gather the probes (until `t_probe_end` at the latest), set the epochs, wait for the runs (stopping
    stragglers at the deadline)."""
    step_s: dict[str, list[float]] = {}
    while sum(len(v) for v in step_s.values()) < sum(p.is_alive() for p in procs) and time.time() < t_probe_end:
        try:
            kind, model, value = reports.get(timeout=1)
        except queue.Empty:
            continue
        step_s.setdefault(model, []).append(value)  # a worker that died or is late simply has no probe
    probe = {m: max(v) for m, v in step_s.items()}
    worst = max(probe.values(), default=1.0)
    probe.update({m: worst for m in models if m not in probe})
    steps = max(1, n_train // 1024)
    epochs = size_epochs(probe, jobs, steps, len(procs), t_end - time.time(), args)
    say(f"probe s/step {json.dumps({m: round(v, 4) for m, v in probe.items()})} -> {epochs} epochs")
    epochs_box.value = epochs
    gpu, skipped = [], []
    while any(p.is_alive() for p in procs) and time.time() < t_end + 15:
        time.sleep(2)
        while not reports.empty():
            skipped.append(reports.get())  # ("skipped", model, seed) or ("error", model, seed, message)
        if args.device == "cuda" and int(time.time()) % 30 < 2:
            gpu.append(f"{time.time() - t_end:.0f}s-to-deadline {_gpu_state()}")
    for p in procs:
        if p.is_alive():
            p.terminate()
        p.join(5)
    while not reports.empty():
        skipped.append(reports.get())
    say(f"workers done; not run: {skipped}")
    return epochs, {"probe_seconds_per_step": probe, "skipped": skipped, "gpu": gpu}


if __name__ == "__main__":
    main()
