"""The words and tables the views show, read straight from `report` (no server, no model)."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from resnext_demo import data, report
from resnext_demo.explain import Attribution
from resnext_demo.faithfulness import Deletion, Faithfulness
from resnext_demo.groups import GroupAblation, GroupImportance
from resnext_demo.zoo import get_config, list_models
from resnext_demo.budget import config_params
from resnext_demo.predict import Prediction

CLASSES = list(data.CLASSES)


@pytest.mark.slow
def test_report_runs_without_gradio():
    """Tests and tools read the views' text without the UI stack: importing report must not import gradio."""
    code = "import sys, resnext_demo.report; sys.exit('gradio' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


@pytest.mark.parametrize("name,recipe", [("resnext29_2x20d_tiny", "resnext29_2x20d_tiny"), ("resnext29_8x4d_micro", None),
                                         ("resnext20_16x8d_fast_wide", "resnext20_16x8d_fast_wide")])
def test_equal_budget_table_marks_the_loaded_network_once(name, recipe):
    cfg = get_config(name)
    t = report.equal_budget_table(cfg, recipe)
    assert list(t["C (groups)"]) == list(report.CARDINALITIES)
    loaded = t[t["loaded"] != ""]
    assert len(loaded) == 1 and loaded["C (groups)"].iloc[0] == cfg.cardinality
    assert loaded["params (M)"].iloc[0] == round(config_params(cfg) / 1e6, 3)


def test_equal_budget_table_named_recipe():
    t = report.equal_budget_table(get_config("resnext29_8x8d_tiny"), "resnext29_8x8d_tiny")
    ref = t[t["C (groups)"] == 8]["params (M)"].iloc[0]
    # equal complexity within 10 % up to C=16 (at C=32 the integer d=3 of a tiny model overshoots)
    assert all(abs(p - ref) / ref < 0.1 for p in t[t["C (groups)"] <= 16]["params (M)"])


def test_architecture_text_names_the_layout():
    fast = report.architecture_text("f", get_config("resnext20_8x8d_fast"))
    assert "C=8" in fast and "d=8" in fast and "max-pool" in fast and "1/2/2" in fast
    for name in list_models():
        cfg = get_config(name)
        if cfg.family == "cifar":  # the depth is computed: 3 convs per block + stem + classifier
            text = report.architecture_text(name, cfg)
            assert f"ResNeXt-{2 + 3 * sum(cfg.depths)} " in text and f"C={cfg.cardinality} " in text, text


def test_model_banner_says_whose_model_and_its_accuracy():
    meta = {"accuracy": 0.9123, "data": {"test_images": 10000}}
    shared = report.model_banner("default.safetensors", 16, 10, meta, own=False)
    assert "the shared model" in shared and "91.23 %" in shared and "10,000 test images" in shared
    own = report.model_banner("mine", 8, 11, {}, own=True)
    assert "your session's model" in own and "11 classes" in own and "accuracy" not in own


def _prediction(probs: dict[str, float]) -> Prediction:
    order = sorted(probs, key=probs.get, reverse=True)
    return Prediction({c: probs[c] for c in order}, CLASSES.index(order[0]), order[0], None, 0.0123, "cpu")


def test_prediction_md_judges_the_true_label():
    p = _prediction({"cat": 0.7, "dog": 0.3})
    assert "**cat** (70.0 %)" in report.prediction_md(p) and "True label" not in report.prediction_md(p)
    assert "**correct**" in report.prediction_md(p, {"index": 4, "label": "cat"})
    wrong = report.prediction_md(p, {"index": 4, "label": "dog"})
    assert "#4" in wrong and "**incorrect** (predicted cat)" in wrong


def test_knockout_md_says_whether_the_class_changes():
    base = np.array([0.6, 0.4])
    assert report.knockout_md("l", [], "zero", base, base, ["a", "b"]).startswith("No group knocked out")
    stays = report.knockout_md("l", [1], "zero", base, np.array([0.55, 0.45]), ["a", "b"])
    assert "g1 of l" in stays and "stays **a**" in stays
    flips = report.knockout_md("l", [0, 2], "mean", base, np.array([0.3, 0.7]), ["a", "b"])
    assert "g0, g2" in flips and "becomes **b** (0.700)" in flips and "0.600 → 0.300" in flips


def _faith(score: float, random_score: float, reference: float) -> Faithfulness:
    fr = np.array([0.1, 0.2])
    d = Deletion(fr, np.full(2, 1.0 - score), np.full(2, 1.0 - random_score), 1.0)
    return Faithfulness(d, {"centre": reference})


def test_groups_table_and_text_follow_the_numbers():
    rng = np.random.default_rng(0)
    g, target = 4, 3
    values = rng.normal(size=g)
    gi = GroupImportance(values, float(values.sum()), "Integrated Gradients", "layer3.0.conv2", target, None)
    probs = np.full((g, 10), 0.05)
    probs[:, target] = [0.6, 0.1, 0.55, 0.58]
    probs[1, 5] = 0.5  # knocking out g1 makes class 5 the top-1
    base = np.full(10, 0.04)
    base[target] = 0.64
    ab = GroupAblation(base, probs, target, "zero")
    cams = rng.random((g, 32, 32))
    dels = [_faith(0.3, 0.1, 0.2), None, _faith(0.05, 0.1, 0.2), _faith(0.3, 0.1, 0.5)]
    t = report.groups_table(gi, ab, cams, dels, CLASSES, target)
    assert list(t["group"]) == [f"g{i}" for i in range(g)]
    assert np.allclose(t["drop"], np.round(ab.drop, 4)) and t["drop"].idxmax() == 1
    assert list(t["deletion drop (random · best model-blind)"])[1] == "empty map"
    assert list(t["faithful?"]) == ["✓ beats model-blind maps", "", "✗ not even random",
                                    "random only, not model-blind maps"]
    md = report.groups_md("layer3.0.conv2", _prediction({"cat": 0.64, "dog": 0.36}), gi, ab, dels, CLASSES, target,
                          None, "Integrated Gradients", "zero", 0.05)
    assert f"strongest evidence for it **g{int(np.argmax(values))}**" in md
    assert f"strongest against **g{int(np.argmin(values))}**" in md
    assert "most harmful **g1**" in md and "knocking out g1 alone changes the top-1 class" in md
    assert "3 non-empty group maps: 2 beat random orders, 1 also" in md


def test_knockout_sentence_compares_with_the_prediction_not_the_explained_class():
    """Issue 28.1: explaining dog on an image predicted cat, no knock-out changes the top-1 (cat stays): the
    sentence must not say that every group 'changes the top-1 class' because none of them makes it dog."""
    g, cat, dog = 4, 3, 5
    base = np.full(10, 0.02)
    base[cat], base[dog] = 0.7, 0.14
    probs = np.tile(base, (g, 1))
    probs[:, cat] -= 0.05
    probs[2, dog] = 0.69  # only g2's knock-out turns the prediction into dog
    ab = GroupAblation(base, probs, dog, "mean")
    gi = GroupImportance(np.ones(g), float(g), "Integrated Gradients", "layer1.1.conv2", dog, None)
    md = report.groups_md("layer1.1.conv2", _prediction({"cat": 0.7, "dog": 0.14}), gi, ab, [None] * g, CLASSES,
                          dog, None, "Integrated Gradients", "mean", 0.05)
    assert "knocking out g2 alone changes the top-1 class" in md
    ab_none = GroupAblation(base, np.tile(base, (g, 1)), dog, "mean")
    md = report.groups_md("layer1.1.conv2", _prediction({"cat": 0.7, "dog": 0.14}), gi, ab_none, [None] * g,
                          CLASSES, dog, None, "Integrated Gradients", "mean", 0.05)
    assert "no single group changes the top-1 class" in md


def test_attribution_md_shows_the_range_it_draws():
    values = np.array([[-2.0, 0.5], [1.0, 3.0]], dtype=np.float32)
    a = Attribution(values, -5.0, 7.0, "Saliency", 3, {"abs": None, "steps": 8}, note="repaired")
    signed = report.attribution_md(a, CLASSES, True, None)
    assert "for class **cat**" in signed and "map range [-2, 3]" in signed and "steps=8" in signed
    assert "abs=" not in signed and "**Note:** repaired" in signed and "not measurable" in signed
    assert "shown: |value|, 0.5 to 3" in report.attribution_md(a, CLASSES, False, None)  # its real range


def test_sweep_reads_only_what_sweep_collect_writes(tmp_path):
    p = tmp_path / "results.json"
    row = {"C": 1, "d": 20, "model": "m1", "params_M": 1.0, "MFLOPs": 100.0, "top1_mean": 0.81, "top1_spread": 0.001,
           "seeds": [0, 1], "epochs": 3, "device": "cpu"}
    for bad in ({"rows": []}, {"rows": [{k: v for k, v in row.items() if k != "seeds"}]}, [row]):
        p.write_text(json.dumps(bad))
        assert report.read_sweep(p) is None, bad
    p.write_text(json.dumps({"rows": [row, {**row, "C": 8, "d": 4, "top1_mean": 0.84}]}))
    results = report.read_sweep(p)
    assert list(report.sweep_table(results)["C"]) == [1, 8]
    assert "3 epochs each on cpu" in report.sweep_md(results)


def test_about_md_lists_what_the_checkpoint_records():
    cfg = get_config("resnext29_8x4d_micro")
    bare = report.about_md("m", cfg, {})
    assert "no training history" in bare and "CIFAR-10 images" not in bare and "accuracy" not in bare
    full = report.about_md("m", cfg, {"accuracy": 0.5, "history": [{}], "device": "a CPU",
                                      "command": "python -m x --out /a/b/weights/m.safetensors"}, "the pack")
    assert "**50.00 %**" in full and "`python -m x --out weights/m.safetensors` on a CPU" in full
    assert "no training history" not in full and full.endswith("CIFAR-10 images in this app: the pack.")
    assert "teacher" not in full
    kd = report.about_md("m", cfg, {"recipe": {"teacher_tta": True}, "teachers": [
        {"model": "a", "accuracy": 0.9233}, {"model": "b", "accuracy": None}]})
    assert "mean softmax of 2 teacher checkpoints on its training images and their mirror images" in kd
    assert "`a` (92.33 %), `b`." in kd
    chain = report.about_md("m", cfg, {"lineage": [{"what": "labels", "accuracy": 0.9}, {"what": "this one"}]})
    assert "1. labels — 90.00 %\n2. this one" in chain and "lineage" not in bare


def test_upload_counts_match_the_fine_tunes_holdout_split():
    """The Fine-tune tab's count line says per class what `finetune.holdout_split` will really hold out, and
    counts the CIFAR-10 images as trained on, never held out (#28.2)."""
    import torch

    from resnext_demo import finetune

    counts = {"airplane": 5, "ship": 1, "truck": 0, "robot": 2}
    holdout = {c: finetune.holdout_count(n) for c, n in counts.items()}
    md = report.upload_counts_md(counts, holdout)
    y = torch.tensor([0] * 5 + [1] * 1 + [3] * 2)
    ds = finetune.Dataset(torch.zeros(len(y), 3, 32, 32, dtype=torch.uint8), y, list(counts))
    train, held = finetune.holdout_split(ds)
    per_class = {c: int((held.y == i).sum()) for i, c in enumerate(counts)}
    assert "**airplane** 5 (%d held out)" % per_class["airplane"] in md
    assert "**ship** 1 (none held out" in md and per_class["ship"] == 0
    assert "truck" not in md  # an empty zone is not listed
    assert f"8 in all; {len(held.y)} held out to score before and after, {len(train.y)} trained on." in md
    with_cifar = report.upload_counts_md(counts, holdout, 20)
    assert f"{len(held.y)} held out" in with_cifar and "+ 20 CIFAR-10 training images (trained on, never held out)" in with_cifar
    assert "No images of yours dropped yet" in report.upload_counts_md({c: 0 for c in counts}, {})
    assert "only the 30 CIFAR-10 images" in report.upload_counts_md({}, {}, 30)


def test_faithfulness_says_raises_or_lowers_never_a_negative_drop():
    """#28.4: a map whose removal raises p(cat) says so, never 'a drop of -0.005'."""
    from resnext_demo import verdicts
    up = verdicts.faithfulness_md(_faith(-0.005, 0.117, -0.171), "cat")
    assert "raises p(cat) by 0.005" in up and "wrong way" in up and "-0.0" not in up
    assert "random orders lower it by 0.117" in up
    assert "the centre map raises it by 0.171" in up
    assert "the centre map raises it by 0.171" in verdicts.group_cams_md([_faith(0.2, 0.1, -0.171)])
    down = verdicts.faithfulness_md(_faith(0.062, 0.117, 0.261), "cat")
    assert "lowers p(cat) by 0.062" in down and "wrong way" not in down


def test_convergence_advice_follows_the_steps_slider():
    """#28.4: under the slider's maximum, more steps; at it, another baseline (never 'more steps')."""
    from resnext_demo import verdicts
    a = Attribution(np.zeros((2, 2)), 0, 0, "Integrated Gradients", 3, {"steps": 32, "baseline": "black"},
                    delta=0.25, change=1.5)
    assert "more steps shrink it" in verdicts.attribution_delta_md(a, 128)
    at_max = Attribution(a.values, 0, 0, a.method, 3, {"steps": 128, "baseline": "black"}, delta=0.08, change=1.5)
    md = verdicts.attribution_delta_md(at_max, 128)
    assert "more steps" not in md and "most steps offered (128)" in md and "blur or mean" in md
    exact = Attribution(a.values, 0, 0, a.method, 3, {"steps": 128, "baseline": "blur"}, delta=0.01, change=1.5)
    assert verdicts.attribution_delta_md(exact, 128).endswith("at 128 steps.")


def test_a_nearly_flat_one_signed_map_is_called_so():
    """#28.4: Grad-CAM at the last stage can be all positive and nearly flat; the text gives its real range."""
    from resnext_demo import verdicts
    flat = Attribution(np.array([[0.12, 0.15], [0.16, 0.176]]), 0.12, 0.176, "Grad-CAM", 3, {})
    md = report.attribution_md(flat, CLASSES, True, None)
    assert "every pixel counts for cat, from 0.12 to 0.176" in md and "**nearly flat**" in md and "earlier layer" in md
    spread = Attribution(np.array([[0.063, 0.1], [0.15, 0.176]]), 0, 0, "Grad-CAM", 3, {})
    assert "nearly flat" not in verdicts.map_spread_md(spread, "cat") and "36 %" in verdicts.map_spread_md(spread, "cat")
    assert verdicts.map_spread_md(Attribution(np.array([[-1.0, 1.0]]), 0, 0, "Saliency", 3, {}), "cat") is None
    assert verdicts.map_spread_md(Attribution(np.array([[0.0, 1.0]]), 0, 0, "Saliency", 3, {}), "cat") is None


def test_a_repeated_training_option_is_shown_once_with_the_value_that_took_effect():
    """#28.8: the recorded command had `--lr 0.4 … --lr 0.1` (argparse keeps the last)."""
    cmd, repeated = report.effective_command("python -m t --lr 0.4 --flip --cutout 12 --lr 0.1 --out runs/x")
    assert cmd == "python -m t --lr 0.1 --flip --cutout 12 --out runs/x" and repeated == ["--lr"]
    md = report.about_md("x", get_config("resnext29_8x4d_micro"), {"command": "python -m t --lr 0.4 --lr 0.1"})
    assert md.count("--lr") == 2 and "`--lr 0.1`" not in md and "`python -m t --lr 0.1`" in md and "took effect" in md


def test_lab_intro_says_what_a_race_trains_on():
    text = report.lab_intro(600, True, 2000, 1000, 8)
    assert "2,000-image subset" in text and "1,000 test images, 8 epochs" in text and "600 s per race" in text
    assert "nothing to race on" in report.lab_intro(600, False, 2000, 1000, 8)
    assert "only 10 training images per class" in report.lab_intro(600, True, 2000, 1000, 8, 10)
