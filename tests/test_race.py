"""race.py: the Lab's race of two cardinalities — equal budgets, caps, the race equal to two separate fast-recipe
runs, Stop, the sweep's seed spread, and the verdict's wording (verdicts.race_md)."""
from __future__ import annotations

import itertools
import threading

import pytest
import torch

from resnext_demo import race, report, speedrun, verdicts, weights
from resnext_demo.zoo import build_model
from resnext_demo.errors import UserError
from tests.conftest import colour_classes


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # deterministic and quick for these small nets
    yield
    torch.set_num_threads(old)


def test_the_family_is_one_budget_and_ordered_by_c():
    fam = race.members()
    assert [m.cardinality for m in fam.values()] == sorted(m.cardinality for m in fam.values())
    assert {1, 8} <= {m.cardinality for m in fam.values()} and race.DEFAULT_A in fam and race.DEFAULT_B in fam
    for a, b in itertools.combinations(fam.values(), 2):
        assert race.budget_gap(a, b) == race.budget_gap(b, a) <= race.BUDGET_TOLERANCE
    big = race.Member("x", 2, int(fam[race.DEFAULT_A].params * 1.2), fam[race.DEFAULT_A].macs)
    assert race.budget_gap(fam[race.DEFAULT_A], big) == pytest.approx(0.2 / 1.2)


@pytest.mark.parametrize("change,message", [({"a": "resnet50"}, "Unknown model"), ({"b": race.DEFAULT_A}, "two different"),
                                            ({"train_per_class": 501}, "10 to 500"), ({"train_per_class": 5},
                                            "10 to 500"), ({"test_per_class": 1001}, "Test images"),
                                            ({"epochs": 0}, "Epochs"), ({"epochs": race.MAX_EPOCHS + 1}, "Epochs")])
def test_options_are_capped(change, message):
    race.RaceOptions().check()  # the defaults pass
    with pytest.raises(UserError, match=message):
        race.RaceOptions(**change).check("cpu")


def test_a_gpu_may_race_on_the_whole_training_split():
    race.RaceOptions(train_per_class=5000).check("cuda")
    with pytest.raises(UserError):
        race.RaceOptions(train_per_class=5000).check("cpu")


@pytest.mark.parametrize("n,batch", [(50_000, 1024), (10_000, 1024), (5_000, 512), (2_000, 128), (1_000, 64), (100, 64)])
def test_small_sets_get_smaller_batches(n, batch):
    r = race.recipe_for("airbench94x_8x66d", n, 3, 7)
    assert r.batch_size == batch and r.seed == 7 and r.epochs == 3.0 and r.model == "airbench94x_8x66d"
    assert n // r.batch_size >= 8 or r.batch_size == 64  # enough steps for the schedule where it can


def _data(n_per_class: int = 20):
    x, y = colour_classes(n_per_class)
    return (x, y), (x[::4], y[::4])


def test_a_race_trains_each_model_as_the_fast_recipe_does_alone():
    """Interleaving the two runs' steps changes neither: each side ends with the weights and test predictions of
    fit_fast on the same model, seed, data and batch (what `train --recipe fast` runs)."""
    train, test = _data()
    opts = race.RaceOptions(train_per_class=20, test_per_class=5, epochs=2, seed=3)
    updates = list(race.race(opts, train, test))
    assert [u.kind for u in updates if u.kind != "step"] == ["epoch", "epoch", "done"]
    res = updates[-1].result
    assert [h["epoch"] for h in res.a.history] == [1, 2] and len(updates[-1].curve) == 2 * 2 * 2
    for side in (res.a, res.b):
        recipe = race.recipe_for(side.member.name, len(train[1]), opts.epochs, opts.seed)
        torch.manual_seed(opts.seed)
        alone = build_model(side.member.name)
        list(speedrun.fit_fast(alone, train, recipe, device="cpu"))
        mine, theirs = side.model.state_dict(), alone.state_dict()
        assert all(torch.equal(mine[k], theirs[k]) for k in mine), side.member.name
        assert res.accuracy(side) == side.history[-1]["test_acc"]
    assert 0 <= res.p <= 1 and res.n_train == len(train[1])


def test_stop_ends_the_race_after_a_step_and_keeps_both_models():
    train, test = _data()
    stop = threading.Event()
    stop.set()
    res = list(race.race(race.RaceOptions(epochs=3), train, test, stop=stop))[-1].result
    assert res.stopped and len(res.a.history) == 1 and res.a.trainer.step == res.b.trainer.step == 1


def test_export_round_trips_with_its_race(tmp_path):
    train, test = _data(10)
    res = list(race.race(race.RaceOptions(epochs=1), train, test))[-1].result
    path = race.export(res, res.b, tmp_path / "b.safetensors")
    model, meta = weights.load_checkpoint(path)
    assert meta["race"]["against"] == res.a.member.name and meta["accuracy"] == res.accuracy(res.b)
    assert meta["data"] == {"train_images": len(train[1]), "test_images": len(test[1])}
    assert f"--model {res.b.member.name} --subset {len(train[1])}" in meta["command"]
    assert model.config.cardinality == res.b.member.cardinality


def test_sweep_spread_reads_the_shipped_per_seed_accuracies():
    results = report.read_sweep()
    s = race.sweep_spread(results, 1)
    row = next(r for r in results["rows"] if r["C"] == 1)
    assert s["n"] == len(row["top1_per_seed"]) >= 2
    assert s["range"] == pytest.approx(max(row["top1_per_seed"]) - min(row["top1_per_seed"]))
    assert race.sweep_spread(results, 3) is None and race.sweep_spread(None, 1) is None


@pytest.mark.parametrize("acc_b,p,spread,word", [(0.52, 0.4, 0.005, "Within noise"), (0.50, 1.0, 0.005, "Within noise"),
                                                  (0.504, 0.01, 0.005, "Could be seed noise"),
                                                  (0.56, 0.001, 0.005, "Beyond noise"),
                                                  (0.56, 0.001, None, "Could be seed noise")])
def test_race_verdict_weighs_the_gap_against_test_and_seed_noise(acc_b, p, spread, word):
    md = verdicts.race_md("C = 1", 0.50, "C = 8", acc_b, 1000, p, spread, 2000, 8)
    assert md.startswith(f"**{word}:**") and "One seed, 2,000 training images, 8 epoch(s)" in md
    if acc_b > 0.50:
        assert "C = 8 leads C = 1" in md
