"""The cardinality sweep command (resnext_demo.sweep) on a synthetic image folder, and the shipped sweep."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from resnext_demo import charts, data, sweep, weights
from resnext_demo.ui import about_tab
from resnext_demo.zoo import get_config
from resnext_demo.budget import config_macs, config_params
from tests.conftest import make_image_folder

MODELS = ["resnext29_8x4d_micro"]  # the cheapest named model: the command is tested, not the result


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A tiny image-folder CIFAR stand-in: 2 train and 1 test image per class (no CIFAR data)."""
    return make_image_folder(tmp_path_factory.mktemp("folder"), 2)


def test_train_collect_plot(folder, tmp_path, monkeypatch):
    monkeypatch.setenv("RESNEXT_DEMO_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "sweep"
    sweep.main(["train", "--models", *MODELS, "--seeds", "0", "1", "--out-dir", str(out), "--",
                "--data", str(folder), "--epochs", "1", "--batch-size", "10", "--device", "cpu"])
    results = json.loads((out / sweep.RESULTS).read_text())
    (row,) = results["rows"]
    cfg = get_config(MODELS[0])
    assert row["C"] == cfg.cardinality and row["d"] == cfg.base_width and row["seeds"] == [0, 1]
    assert row["params_M"] == round(config_params(cfg) / 1e6, 3)
    assert row["top1_mean"] == pytest.approx(np.mean(row["top1_per_seed"]), abs=1e-4)
    assert row["top1_spread"] == pytest.approx(np.ptp(row["top1_per_seed"]) / 2, abs=1e-4)
    for f in row["files"]:  # each run is a normal checkpoint with its seed in the recipe
        _, meta = weights.load_checkpoint(out / f)
        assert meta["recipe"]["seed"] == int(f.rsplit("-s", 1)[1].split(".")[0])
    mtime = (out / row["files"][0]).stat().st_mtime
    sweep.main(["train", "--models", *MODELS, "--seeds", "0", "--out-dir", str(out), "--", "--data", str(folder)])
    assert (out / row["files"][0]).stat().st_mtime == mtime  # finished runs are not redone
    sweep.main(["plot", "--out-dir", str(out)])
    assert Image.open(out / sweep.PLOT).size[0] > 100
    table, md, plot = about_tab.sweep(out / sweep.RESULTS)  # the About tab shows table and plot
    assert table["visible"] and plot["visible"] and list(table["value"]["C"]) == [cfg.cardinality]
    assert [r["seed"] for r in results["runs"]] == [0, 1] and "Too few cardinalities" in md
    assert all(0 <= r["top1_tta"] <= 1 for r in results["runs"])  # the fast recipe's TTA figure is kept too
    sweep.main(["collect", "--out-dir", str(out), "--predictions", str(folder)])
    with np.load(out / "predictions.npz") as z:  # the recorded predictions give back each run's figures
        _, labels = data.load_split(str(folder), "test")
        assert z["plain"].shape == z["tta"].shape == (2, len(labels)) and (z["labels"] == labels.numpy()).all()
        for run, plain, tta, name in zip(results["runs"], z["plain"], z["tta"], z["names"]):
            assert name == run["file"].removesuffix(".safetensors")
            assert (plain == z["labels"]).mean() == pytest.approx(run["top1"], abs=1e-4)
            assert (tta == z["labels"]).mean() == pytest.approx(run["top1_tta"], abs=1e-4)
    assert "| 8 | 4 | `resnext29_8x4d_micro` |" in sweep.markdown(results)


def _rows(*means_spreads):
    return {"rows": [{"C": 2 ** i, "top1_mean": m, "top1_spread": sp} for i, (m, sp) in enumerate(means_spreads)],
            "runs": [{"test_images": 10_000}]}


def test_sweep_verdict_weighs_the_gap_against_seed_and_sampling_noise():
    from resnext_demo import verdicts
    assert "does not separate" in verdicts.sweep_md(_rows((0.885, 0.0015), (0.887, 0.001)))  # 0.2 pt gap
    assert "cardinality matters" in verdicts.sweep_md(_rows((0.86, 0.001), (0.90, 0.001)))  # 4 pt gap
    assert "does not separate" in verdicts.sweep_md(_rows((0.86, 0.03), (0.90, 0.03)))  # seeds 6 pt apart


def test_sweep_figure_without_rows():
    assert charts.sweep_figure({"rows": []}).size[0] > 100


OLD_SWEEP = sweep.SWEEP_DIR / "resnext20-23ep"  # the first sweep (2 seeds, within noise): its checkpoints stay
SHIPPED = sorted(p for p in OLD_SWEEP.glob("*.safetensors") if not p.name.endswith(".resume.safetensors"))
OLD = json.loads((OLD_SWEEP / sweep.RESULTS).read_text()) if (OLD_SWEEP / sweep.RESULTS).is_file() else {}
RESULTS = json.loads((sweep.SWEEP_DIR / sweep.RESULTS).read_text()) if (sweep.SWEEP_DIR / sweep.RESULTS).is_file() else {}
FAST_RUNS = sweep.SWEEP_DIR / "fast-7.6ep"  # tools/gpu_sweep.py's record of the shipped sweep (no checkpoints)


def test_the_fast_sweep_is_shipped_whole_and_reproducible():
    """results.json is the fast-recipe sweep: six cardinalities (1-32) x 10 seeds, every member within 5 % of
    airbench94's parameters and multiply-adds, one epoch count; and `sweep analyse` on the shipped per-run
    record (accuracies and every test image's predicted class) gives exactly it."""
    assert sorted(r["C"] for r in RESULTS["rows"]) == [1, 2, 4, 8, 16, 32]
    assert all(len(r["seeds"]) >= 10 for r in RESULTS["rows"])
    ref = get_config("airbench94")
    for r in RESULTS["runs"]:
        assert abs(r["params"] / config_params(ref) - 1) <= 0.05 and abs(r["macs"] / config_macs(ref) - 1) <= 0.05
    assert len({r["epochs"] for r in RESULTS["runs"]}) == 1
    assert json.loads(json.dumps(sweep.analyse(FAST_RUNS))) == RESULTS
    assert RESULTS["verdict"] and all("vs_base" in r for r in RESULTS["rows"] if r["C"] != 1)


def test_the_first_sweep_is_shipped_whole():
    """The first sweep's results.json lists every one of its checkpoints once, two seeds per cardinality, C = 1
    (a plain ResNet bottleneck) up to 16, all within 5 % of the default's parameters and multiply-adds, one recipe."""
    assert SHIPPED, "weights/sweep/resnext20-23ep/ holds no checkpoints"
    assert sorted(r["file"] for r in OLD["runs"]) == [p.name for p in SHIPPED]
    assert sorted({r["C"] for r in OLD["runs"]}) == [1, 2, 4, 8, 16]
    assert all(len(r["seeds"]) == 2 for r in OLD["rows"])
    ref = get_config("resnext20_8x8d_fast")
    for r in OLD["runs"]:
        assert abs(r["params"] / config_params(ref) - 1) <= 0.05 and abs(r["macs"] / config_macs(ref) - 1) <= 0.05
    assert len({json.dumps({k: v for k, v in weights.read_metadata(p)["recipe"].items() if k not in ("seed", "model")},
                           sort_keys=True) for p in SHIPPED}) == 1


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_sweep_checkpoint(path, cifar_test):
    """Loads, has the cardinality, parameters and multiply-adds results.json states, and scores what it claims
    for the whole test split on a fixed 1,000-image slice (within 3.5 points: ~3.5 standard errors)."""
    from resnext_demo.model import count_macs, count_params
    from resnext_demo.predict import predict_batch
    model, meta = weights.load_checkpoint(path)
    run = next(r for r in OLD["runs"] if r["file"] == path.name)
    assert model.config.cardinality == run["C"] and model.config.base_width == run["d"]
    assert count_params(model) == run["params"] and count_macs(model) == run["macs"]
    images, labels = cifar_test
    acc = float((predict_batch(model, images[:1000]).argmax(1) == labels[:1000]).float().mean())
    assert abs(acc - run["top1"]) <= 0.035, (acc, run["top1"])


def test_collect_refuses_to_mix_budgets(tmp_path):
    """Checkpoints of one budget collect; one of another budget in the folder is refused by name (the About
    verdict must never compare unequal budgets)."""
    from resnext_demo.zoo import build_model

    def run(model: str, seed: int = 0, **recipe) -> None:
        meta = {"accuracy": 0.5, "epochs": 1, "recipe": {"model": model, "seed": seed, **recipe}, "wall_seconds": 1.0,
                "data": {"test_images": 10}}
        weights.save_checkpoint(sweep.run_path(tmp_path, model, seed), build_model(model), meta)

    for m in ("resnet20_fast", "resnext20_2x21d_fast", "resnext20_16x5d_fast"):
        run(m, eval_every_epoch=True)
    run("resnet20_fast", 1, eval_every_epoch=False)  # per-epoch test passes do not make another recipe
    assert [len(r["seeds"]) for r in sweep.collect(tmp_path)["rows"]] == [2, 1, 1]
    run("resnet20_fast", 2, eval_every_epoch=True, lr=0.1)
    with pytest.raises(ValueError, match="different recipes"):
        sweep.collect(tmp_path)
    sweep.run_path(tmp_path, "resnet20_fast", 2).unlink()
    run("resnext20_16x8d_fast_wide")
    with pytest.raises(ValueError, match="not one budget: resnext20_16x8d_fast_wide"):
        sweep.collect(tmp_path)


def test_sweep_train_defaults_to_the_fast_recipe_family(monkeypatch, tmp_path):
    """`sweep train` with no --models trains the airbench94x family (C = 1..32) with the fast recipe."""
    from resnext_demo.zoo import airbench_family

    calls = []
    monkeypatch.setattr(sweep.train, "main", lambda argv: calls.append(argv))
    monkeypatch.setattr(sweep, "collect", lambda *a, **k: {"rows": [], "runs": []})
    sweep.main(["train", "--out-dir", str(tmp_path)])
    assert [c[c.index("--model") + 1] for c in calls] == list(airbench_family().values())
    assert all(c[:2] == ["--recipe", "fast"] for c in calls) and len(airbench_family()) >= 6


WIDE_RUNS = sweep.SWEEP_DIR / "fast-9.9ep-wide"  # the 1.5x-wide C = 32 net's CPU runs (docs/training-fast.md)


def test_the_wide_grouped_net_record_gives_back_its_figures(cifar_test):
    """The grouped net that crosses 90 %: every run is `airbench94x_32x37d_wide` (C = 32) with the fast recipe in
    at most 10 epochs on the full test split; its predictions, on the real test labels, give back each run's plain
    and TTA accuracy; and the mean plain accuracy over its seeds is at least 90 %."""
    res = json.loads((WIDE_RUNS / sweep.RESULTS).read_text())
    runs = res["runs"]
    assert len(runs) >= 2 and len({r["seed"] for r in runs}) == len(runs)
    assert all(r["model"] == "airbench94x_32x37d_wide" and r["C"] == 32 and r["epochs"] <= 10
               and r["test_images"] == 10_000 for r in runs)
    with np.load(WIDE_RUNS / "predictions.npz") as z:
        assert (z["labels"] == cifar_test[1].numpy()).all()
        assert [str(n) for n in z["names"]] == [r["file"].removesuffix(".safetensors") for r in runs]
        for run, plain, tta in zip(runs, z["plain"], z["tta"]):
            assert (plain == z["labels"]).mean() == pytest.approx(run["top1"], abs=1e-4)
            assert (tta == z["labels"]).mean() == pytest.approx(run["top1_tta"], abs=1e-4)
    assert np.mean([r["top1"] for r in runs]) >= 0.90
