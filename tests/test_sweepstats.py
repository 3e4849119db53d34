"""The sweep's statistics (resnext_demo.sweepstats) against known values and simulations, and
`sweep analyse` on a synthetic gpu_sweep result folder (tools/gpu_sweep.py's plan and epoch sizing too)."""
from __future__ import annotations

import importlib.util
import json
import math
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest

from resnext_demo import sweep, sweepstats
from resnext_demo.zoo import airbench_family, get_config

ROOT = Path(__file__).resolve().parents[1]


def test_student_t_known_values() -> None:
    """Quantiles and two-sided p-values of Student's t from tables."""
    assert sweepstats.t_ppf(0.975, 9) == pytest.approx(2.262157, abs=1e-5)
    assert sweepstats.t_ppf(0.975, 2) == pytest.approx(4.302653, abs=1e-5)
    assert sweepstats.t_ppf(0.8, 9) == pytest.approx(0.883404, abs=1e-5)
    assert sweepstats.t_ppf(0.975, 1000) == pytest.approx(1.962339, abs=1e-4)
    assert sweepstats.t_sf2(1.0, 4) == pytest.approx(0.373901, abs=1e-5)
    assert sweepstats.t_sf2(0.0, 7) == pytest.approx(1.0)


@pytest.mark.slow
def test_mean_ci_covers_the_truth_about_95_percent() -> None:
    rng = np.random.default_rng(0)
    hits = 0
    for _ in range(2000):
        v = rng.normal(0.9, 0.003, 10)
        c = sweepstats.mean_ci(v)
        hits += abs(c["mean"] - 0.9) <= c["ci95"]
    assert 0.93 < hits / 2000 < 0.97


@pytest.mark.slow
def test_paired_t_false_positive_rate_and_power() -> None:
    """Under the null, p < 0.05 about 5 % of the time; a shift of the design's detectable size is found ~80 %."""
    rng = np.random.default_rng(1)
    n, sd = 10, 0.002
    seed_effect = lambda: rng.normal(0, 0.003, n)  # noqa: E731  shared by both arms: what pairing removes
    null = [sweepstats.paired_t(s + rng.normal(0, sd, n), s + rng.normal(0, sd, n))["p"] < 0.05
            for s in (seed_effect() for _ in range(2000))]
    assert 0.03 < np.mean(null) < 0.07
    mde = sweepstats.min_detectable(sd * math.sqrt(2), n)
    hit = [sweepstats.paired_t(s + mde + rng.normal(0, sd, n), s + rng.normal(0, sd, n))["p"] < 0.05
           for s in (seed_effect() for _ in range(2000))]
    assert 0.74 < np.mean(hit) < 0.86


def test_mcnemar_counts_and_p() -> None:
    a = np.array([1, 1, 1, 0, 0, 1], bool)
    b = np.array([1, 0, 0, 0, 1, 1], bool)
    r = sweepstats.mcnemar(a, b)
    assert (r["b"], r["c"], r["method"]) == (2, 1, "exact binomial") and r["p"] == pytest.approx(1.0)
    big_a, big_b = np.r_[np.ones(200, bool), np.zeros(100, bool)], np.r_[np.zeros(200, bool), np.ones(100, bool)]
    r = sweepstats.mcnemar(big_a, big_b)  # (|200-100|-1)^2/300 = 32.67
    assert r["stat"] == pytest.approx(99 ** 2 / 300) and r["p"] == pytest.approx(math.erfc(math.sqrt(32.67 / 2)), rel=1e-3)
    assert sweepstats.mcnemar(a, a)["p"] == 1.0


def _fake_runs(folder: Path, effect: float, seeds: int = 6, n: int = 2000) -> None:
    """A gpu_sweep result folder: the family plus the dense reference, per-image correctness drawn so C = 32
    is `effect` better than the rest, with a seed effect shared by all models of a seed."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, n)
    hard = rng.random(n)  # per-image difficulty, the same for every run (as on a real test set)
    models = {"airbench94": get_config("airbench94"), **{m: get_config(m) for m in airbench_family().values()}}
    rows, plain = [], []
    for s in range(seeds):
        seed_shift = rng.normal(0, 0.004)
        for name, cfg in models.items():
            p = 0.9 + seed_shift + (effect if cfg.cardinality == 32 else 0.0) + rng.normal(0, 0.001)
            correct = hard < p
            plain.append(np.where(correct, labels, (labels + 1) % 10).astype(np.uint8))
            rows.append({"name": f"{name}-s{s}", "model": name, "seed": s, "config": cfg.to_dict(), "params": 1_970_000,
                         "macs": 118_000_000, "epochs": 9.9, "accuracy": float(correct.mean()),
                         "accuracy_tta": float(correct.mean()), "train_seconds": 5.0, "stopped": False,
                         "index": len(plain) - 1, "device": "test", "recipe": {"recipe": "fast"}})
    (folder / "results.json").write_text(json.dumps({"runs": rows}))
    np.savez_compressed(folder / "predictions.npz", plain=np.stack(plain), tta=np.stack(plain),
                        labels=labels.astype(np.uint8), names=np.array([r["name"] for r in rows]))


@pytest.mark.parametrize("effect", [0.0, 0.02])
def test_analyse_finds_an_effect_only_where_there_is_one(tmp_path: Path, effect: float) -> None:
    _fake_runs(tmp_path, effect)
    res = sweep.analyse(tmp_path)
    assert [r["C"] for r in res["rows"]] == [1, 2, 4, 8, 16, 32] and res["reference"]["model"] == "airbench94"
    assert len(res["runs"]) == 7 * 6 and all(len(r["seeds"]) == 6 for r in res["rows"])
    c32 = res["rows"][-1]["vs_base"]
    assert c32["paired_t"]["n"] == 6 and c32["mcnemar"]["b"] + c32["mcnemar"]["c"] > 0
    if effect:
        assert c32["mcnemar"]["b"] > c32["mcnemar"]["c"] and c32["mcnemar"]["p"] < 0.05
        assert c32["paired_t"]["p_holm"] < 0.05 and c32["paired_t"]["diff"] == pytest.approx(effect, abs=0.006)
        assert "C = 32 (+" in res["verdict"]
    else:
        assert "No cardinality differs" in res["verdict"]
    assert res["rows"][0]["top1_ci95"] > 0 and "vs_base" not in res["rows"][0]
    md = sweep.markdown(res)
    assert "airbench94x_32x25d" in md and md.count("\n") == 7
    json.dumps(res)  # what `analyse` writes


def _gpu_sweep():
    spec = importlib.util.spec_from_file_location("gpu_sweep", ROOT / "tools" / "gpu_sweep.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_sweep_plan_and_epochs() -> None:
    gs = _gpu_sweep()
    jobs = gs.plan(["airbench94", "a", "b"], dense_seeds=2, seeds=3)
    assert jobs == [("airbench94", 0), ("a", 0), ("b", 0), ("airbench94", 1), ("a", 1), ("b", 1), ("a", 2), ("b", 2)]
    args = Namespace(min_epochs=6.0, max_epochs=9.9)
    step_s = {"airbench94": 0.1, "a": 0.2, "b": 0.2}
    # per epoch: 2 x 4.8 s + 6 x 9.6 s = 67.2 s of work, /4 workers + one 9.6 s run = 26.4 s on the busiest worker
    assert gs.size_epochs(step_s, jobs, 48, 4, 100, args) == 6.0  # 0.92*100/26.4 - 0.4 < 6: fewer seeds will finish
    assert gs.size_epochs(step_s, jobs, 48, 4, 1000, args) == 9.9
    assert gs.size_epochs(step_s, jobs, 48, 4, 250, args) == 8.3
