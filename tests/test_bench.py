"""The benchmark harness (resnext_demo.bench) on a tiny model: every action runs through the code the app runs
and lands in the report. Timings are never asserted (docs/performance.md holds the measured figures)."""
from __future__ import annotations

import pytest
import torch

from resnext_demo import bench, weights


def _once(fn, **_):
    """timeit stand-in: one call, a fixed fake time (the tests check coverage, not speed)."""
    fn()
    return {"median": 0.01, "p95": 0.02, "min": 0.01, "n": 1}


def test_timeit_reports_ordered_statistics() -> None:
    calls = []
    r = bench.timeit(lambda: calls.append(1), warmup=2, repeats=7)
    assert len(calls) == 9 and r["n"] == 7 and r["min"] <= r["median"] <= r["p95"]


def test_cpu_actions_time_every_action_through_the_tabs_handlers(tiny_checkpoint, monkeypatch) -> None:
    """Each user action with a target (start-up aside) gets a row, the Groups and Feature maps clicks run the tabs'
    own handlers (not a copy that can drift), and the report renders every row."""
    from resnext_demo.ui import features_tab, groups_tab

    called = []
    for mod, name in ((groups_tab, "analyse"), (features_tab, "feature_maps")):
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _real=real, _n=name, **k: called.append(_n) or _real(*a, **k))
    monkeypatch.setattr(bench, "timeit", _once)
    model, meta = weights.load_checkpoint(tiny_checkpoint)
    results: dict = {"device": "cpu", "model": "tiny"}
    bench.cpu_actions(model, torch.device("cpu"), results, meta, tiny_checkpoint)
    assert set(bench.TARGETS) - {"app start-up to first page"} <= set(results)
    assert set(called) == {"analyse", "feature_maps"}
    assert any(k.startswith("Groups tab analysis") for k in results)
    text = bench.report(results)
    assert all(k in text for k, v in results.items() if isinstance(v, (dict, float)))


def test_training_table_is_read_against_the_dense_reference(monkeypatch) -> None:
    """Every model x precision x layout row has its ratio to airbench94 measured in the same run (1 for itself)."""
    monkeypatch.setattr(bench, "timeit", _once)
    rows = bench.training_table(torch.device("cpu"), ["resnext14_8x4d_fast"], batch_size=4)
    assert len(rows) == 8 and {r["model"] for r in rows} == {"airbench94", "resnext14_8x4d_fast"}
    assert all(r["ratio_to_reference"] == 1.0 for r in rows if r["model"] == "airbench94")
    assert bench.training_report(rows).count("\n") == len(rows) + 1


def test_gpu_campaign_plans_and_packing(tmp_path) -> None:
    """tools/gpu_campaign's pure parts: plans name known models with unique run names, and _pack never loses a
    file silently (what does not fit is named) nor exceeds its size limit."""
    import tarfile

    from resnext_demo.zoo import list_models
    from tools import gpu_campaign as gc

    for plan in (gc.plan, gc.plan_large, gc.plan_long, gc.plan_long32, gc.plan_kd, gc.plan_kd2):
        runs = plan()
        assert runs and len({r.name for r in runs}) == len(runs)
        assert all(r.model in list_models() and r.keep in ("fp32", "half", "none") for r in runs)
    files = []
    for i, size in enumerate((5000, 4000, 3000, 9000, 100)):
        f = tmp_path / f"f{i}.bin"
        f.write_bytes(b"x" * size)
        files.append(f)
    out = tmp_path / "out"
    out.mkdir()
    left = gc._pack(files, out, limit=10_000, most=2)
    packed = [m.name for t in sorted(out.glob("*.tar")) for m in tarfile.open(t).getmembers()]
    assert sorted(packed + left) == sorted(f.name for f in files) and left
    assert all(t.stat().st_size <= 10_000 + 10_240 for t in out.glob("*.tar"))  # + tar's own blocks


def test_grouped_conv_table_counts_each_shape(monkeypatch) -> None:
    """One row per size x (C, d), multiply-adds from the shape, and C = 1 is its own baseline in the report."""
    monkeypatch.setattr(bench, "timeit", _once)
    rows = bench.grouped_conv_table(shapes=((1, 8), (4, 3)), sizes=(5,), batch_size=2)
    assert [(r["cardinality"], r["channels"]) for r in rows] == [(1, 8), (4, 12)]
    assert rows[1]["gmacs"] == 2 * 5 * 5 * 12 * 9 * 3 / 1e9
    text = bench.grouped_conv_report(rows)
    assert text.count("\n") == 3 and "| 5x5 | 1 x 8d | 8 |" in text and "| 1.00 | 1.00 |" in text


def test_fastest_training_table_has_one_row_per_model(monkeypatch) -> None:
    monkeypatch.setattr(bench, "timeit", _once)
    rows = bench.training_table(torch.device("cpu"), ["resnext14_8x4d_fast"], batch_size=4, fastest=True)
    assert [(r["model"], r["bf16"], r["channels_last"]) for r in rows] == [
        ("airbench94", True, True), ("resnext14_8x4d_fast", True, True)]


@pytest.mark.parametrize("groups,d", [(1, 5), (4, 3)])
def test_unfold_matmul_form_is_the_grouped_conv(groups: int, d: int) -> None:
    """The benchmark's batched-matmul formulation computes exactly what nn.Conv2d(groups=C) does."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(groups * d, groups * d, 3, padding=1, groups=groups, bias=False)
    x = torch.randn(2, groups * d, 6, 5)
    assert torch.allclose(bench._unfold_conv(x, conv.weight, groups), conv(x), atol=1e-5)
