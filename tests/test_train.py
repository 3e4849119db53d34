"""fit(): it learns, resumes exactly, respects frozen layers and stop; DDP under torchrun agrees."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from resnext_demo import data, splits, train, trainer, weights
from resnext_demo.model import ResNeXt


def _colour_classes(n_per_class: int = 24, k: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A learnable toy set: class c is a distinct colour plus noise."""
    g = torch.Generator().manual_seed(seed)
    palette = torch.randint(0, 256, (k, 3, 1, 1), generator=g).float()
    y = torch.arange(k).repeat_interleave(n_per_class)
    x = (palette[y] + 40 * torch.randn(len(y), 3, 32, 32, generator=g)).clamp(0, 255).to(torch.uint8)
    return x, y


def _eval_loss(model, x, y) -> float:
    model.eval()
    with torch.no_grad():
        return torch.nn.functional.cross_entropy(model(data.normalize(x)), y).item()


def test_fit_lowers_the_loss(tiny_config) -> None:
    torch.manual_seed(0)
    model = ResNeXt(tiny_config)
    x, y = _colour_classes()
    before = _eval_loss(model, x, y)
    cfg = trainer.TrainConfig(epochs=4, batch_size=32, lr=0.05, warmup_epochs=0, log_every=1)
    events = list(trainer.fit(model, (x, y), cfg, (x, y), "cpu"))
    assert _eval_loss(model, x, y) < 0.7 * before
    kinds = [e.kind for e in events]
    assert kinds.count("epoch") == 4 and kinds[-1] == "done" and "step" in kinds
    assert events[-1].history[-1]["test_acc"] > 0.3 and len(events[-1].history) == 4
    assert not model.training


def test_resume_is_exact(tiny_config) -> None:
    """Two epochs straight == one epoch, save (weights + optimizer/EMA state), a fresh model, one more."""
    x, y = _colour_classes(8)
    cfg = trainer.TrainConfig(epochs=2, batch_size=16, ema_decay=0.9, cutout=8, log_every=100)
    torch.manual_seed(0)
    straight = ResNeXt(tiny_config)
    init = {k: v.clone() for k, v in straight.state_dict().items()}
    list(trainer.fit(straight, (x, y), cfg, device="cpu"))

    first = ResNeXt(tiny_config)
    first.load_state_dict(init)
    gen = trainer.fit(first, (x, y), cfg, device="cpu")
    ev = next(e for e in gen if e.kind == "epoch")
    gen.close()
    state = {k: v.clone() for k, v in ev.state.items()}
    resumed = ResNeXt(tiny_config)
    resumed.load_state_dict(first.state_dict())
    list(trainer.fit(resumed, (x, y), cfg, device="cpu", start_epoch=1, resume_state=state, history=ev.history))
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k


def test_head_only_training_touches_only_the_head(tiny_model) -> None:
    x, y = _colour_classes(4)
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    cfg = trainer.TrainConfig(epochs=1, batch_size=20, train_layers="head")
    list(trainer.fit(tiny_model, (x, y), cfg, device="cpu"))
    after = tiny_model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"fc.weight", "fc.bias"}  # frozen BatchNorms keep their running statistics too


def test_last_stage_training_leaves_earlier_stages(tiny_model) -> None:
    x, y = _colour_classes(4)
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    list(trainer.fit(tiny_model, (x, y), trainer.TrainConfig(epochs=1, batch_size=20, train_layers="last_stage"), device="cpu"))
    changed = {k.split(".")[0] for k, v in tiny_model.state_dict().items() if not torch.equal(before[k], v)}
    assert changed == {"layer3", "fc"}


def test_stop_event_ends_training_early(tiny_model) -> None:
    x, y = _colour_classes(16)
    stop = threading.Event()
    stop.set()
    events = list(trainer.fit(tiny_model, (x, y), trainer.TrainConfig(epochs=5, batch_size=16), device="cpu", stop=stop))
    assert events[-1].kind == "done" and events[-1].stopped and len(events[-1].history) == 1


def test_augment_properties() -> None:
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    g = torch.Generator().manual_seed(0)
    plain = trainer.augment(x, g, padding=0, flip=False)
    assert torch.allclose(plain, data.normalize(x))
    out = trainer.augment(x, torch.Generator().manual_seed(1), padding=4, flip=True, cutout=8)
    assert out.shape == (64, 3, 32, 32) and torch.isfinite(out).all()
    same = trainer.augment(x, torch.Generator().manual_seed(1), padding=4, flip=True, cutout=8)
    assert torch.equal(out, same)  # random choices come only from the generator
    # A crop with padding p is the zero-padded image shifted by at most p pixels each way, and the shifts vary.
    cropped = trainer.augment(x[:8], torch.Generator().manual_seed(3), padding=4, flip=False)
    padded = torch.nn.functional.pad(x[:8], (4, 4, 4, 4))
    shifts = set()
    for i in range(8):
        found = [(dy, dx) for dy in range(9) for dx in range(9)
                 if torch.equal(cropped[i], data.normalize(padded[i:i + 1, :, dy:dy + 32, dx:dx + 32])[0])]
        assert found, f"image {i} is not a 32x32 window of its padded copy"
        shifts.add(found[0])
    assert len(shifts) > 1
    flipped = trainer.augment(x, torch.Generator().manual_seed(2), padding=0, flip=True)
    for i in range(8):
        assert torch.equal(flipped[i], data.normalize(x[i:i + 1])[0]) or \
            torch.equal(flipped[i], data.normalize(x[i:i + 1]).flip(3)[0])


@pytest.mark.parametrize("schedule", ["cosine", "onecycle", "constant"])
def test_lr_schedules_are_bounded_and_end_low(schedule: str) -> None:
    f = [trainer.lr_factor(s, 100, 10, schedule) for s in range(100)]
    assert all(0 <= v <= 1 for v in f) and max(f) > 0.9
    if schedule != "constant":
        assert f[-1] < 0.05


def test_subset_is_balanced() -> None:
    x, y = _colour_classes(30)
    xs, ys = splits.balanced_subset(x, y, 50)
    assert len(ys) == 50 and torch.bincount(ys).tolist() == [5] * 10


def _image_tree(root, per_class: int, seed: int) -> None:
    """A random-noise image-folder tree <root>/{train,test}/<class>/<i>.png (per_class images each)."""
    rng = np.random.default_rng(seed)
    for split in ("train", "test"):
        for c in data.CLASSES:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(d / f"{i}.png")


@pytest.mark.slow
def test_torchrun_ddp_two_processes_match_their_checkpoint(tmp_path) -> None:
    """2-process DistributedDataParallel on CPU (gloo): both ranks end identical, and equal to the file."""
    _image_tree(tmp_path / "tree", per_class=4, seed=0)
    out = tmp_path / "ddp.safetensors"
    env = {**os.environ, "RESNEXT_DEMO_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "resnext_demo.train", "--model", "resnext29_8x4d_micro", "--data", str(tmp_path / "tree"),
           "--epochs", "2", "--batch-size", "8", "--device", "cpu", "--out", str(out), "--log-every", "1"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=data.PROJECT_ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    digests = dict(re.findall(r"rank (\d) final-params-sha256 ([0-9a-f]{64})", res.stdout))
    assert set(digests) == {"0", "1"} and digests["0"] == digests["1"]
    model, meta = weights.load_checkpoint(out)
    assert weights.state_digest(model, float32=True) == digests["0"]
    assert meta["world_size"] == 2 and meta["epochs"] == 2 and (tmp_path / "ddp.curve.json").is_file()


def test_init_from_starts_at_a_checkpoints_weights(tmp_path, monkeypatch) -> None:
    """--init-from: the weights carry over (lr 0 keeps them), the metadata names the starting checkpoint,
    and another architecture is refused."""
    _image_tree(tmp_path / "tree", per_class=1, seed=1)
    monkeypatch.setenv("RESNEXT_DEMO_CACHE", str(tmp_path / "cache"))
    common = ["--model", "resnext29_8x4d_micro", "--data", str(tmp_path / "tree"), "--epochs", "1",
              "--batch-size", "5", "--device", "cpu"]
    first = tmp_path / "first.safetensors"
    train.main([*common, "--out", str(first)])
    second = tmp_path / "second.safetensors"
    train.main([*common, "--out", str(second), "--init-from", str(first), "--lr", "0", "--weight-decay", "0"])
    a, _ = weights.load_checkpoint(first)
    b, meta = weights.load_checkpoint(second)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert meta["init_from"]["sha256"] == data.sha256_file(first) and meta["init_from"]["epochs"] == 1
    assert meta["teachers"] is None and meta["recipe"]["teachers"] == ""
    third = tmp_path / "third.safetensors"  # --teachers: distilled from `first`, which the metadata names
    train.main([*common, "--out", str(third), "--teachers", f"{first},{second}"])
    record = weights.read_metadata(third)["teachers"]
    assert [t["sha256"] for t in record] == [data.sha256_file(first), data.sha256_file(second)]
    assert record[0]["model"] == "resnext29_8x4d_micro" and record[0]["train_images"] == 10
    with pytest.raises(SystemExit, match="not resnext29_8x8d_tiny"):
        train.main([*common, "--model", "resnext29_8x8d_tiny", "--out", str(tmp_path / "x.safetensors"),
                    "--init-from", str(first)])


def test_split_validation_is_balanced_disjoint_and_seeded() -> None:
    x, y = _colour_classes(30)
    x = x + torch.arange(len(y)).view(-1, 1, 1, 1).to(x.dtype)  # every image distinct, to check disjointness
    (xt, yt), (xv, yv) = splits.split_validation(x, y, 50, seed=3)
    assert torch.bincount(yv).tolist() == [5] * 10 and len(yt) + len(yv) == len(y)
    seen = {tuple(im.flatten().tolist()) for im in xt}
    assert not any(tuple(im.flatten().tolist()) in seen for im in xv)
    assert torch.equal(splits.split_validation(x, y, 50, seed=3)[1][0], xv)
    assert not torch.equal(splits.split_validation(x, y, 50, seed=4)[1][0], xv)


def test_val_run_scores_epochs_on_validation_and_reads_test_once(tmp_path, monkeypatch) -> None:
    """--val N: the curve is validation accuracy (val_acc), the metadata holds the test top-1 (plain and
    flip-TTA) computed once at the end, which equals a fresh evaluation of the saved weights."""
    from resnext_demo.evaluate import evaluate
    _image_tree(tmp_path / "tree", per_class=3, seed=2)
    monkeypatch.setenv("RESNEXT_DEMO_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "v.safetensors"
    train.main(["--model", "resnext14_8x4d_fast", "--data", str(tmp_path / "tree"), "--epochs", "1", "--whiten",
                "--batch-size", "5", "--device", "cpu", "--val", "10", "--out", str(out)])
    model, meta = weights.load_checkpoint(out)
    assert meta["data"]["train_images"] == 20 and meta["data"]["val_images"] == 10
    assert all("val_acc" in h and "test_acc" not in h for h in meta["history"])
    assert meta["val_accuracy"] == meta["history"][-1]["val_acc"]
    x, y = data.load_split(str(tmp_path / "tree"), "test")
    assert meta["accuracy"] == pytest.approx(evaluate(model, x, y)["top1"])
    assert meta["accuracy_tta"] == pytest.approx(evaluate(model, x, y, tta=True)["top1"])


def test_a_compacted_resume_state_is_small_and_continues(tmp_path, monkeypatch) -> None:
    """--compact-resume: fp16 weights, no momentum, the epoch and curve kept; --resume then continues at the
    next epoch from those weights (what a session commits when a long run is unfinished)."""
    _image_tree(tmp_path / "tree", per_class=2, seed=3)
    monkeypatch.setenv("RESNEXT_DEMO_CACHE", str(tmp_path / "cache"))
    common = ["--model", "resnext29_8x4d_micro", "--data", str(tmp_path / "tree"), "--batch-size", "5",
              "--device", "cpu", "--out", str(tmp_path / "run.safetensors")]
    train.main([*common, "--epochs", "1"])
    model, meta = weights.load_checkpoint(tmp_path / "run.safetensors")
    resume = tmp_path / "run.resume.safetensors"  # as the CLI leaves it after epoch 1 of 2
    momentum = {f"optim.{i}": torch.randn_like(p) for i, p in enumerate(model.parameters())}
    weights.save_checkpoint(resume, model, {k: meta[k] for k in ("recipe", "command", "data", "params", "macs")}
                            | {"epoch": 1, "history": meta["history"]}, extra_tensors=momentum)
    full = resume.stat().st_size
    train.main([*common, "--compact-resume"])
    small, cmeta = weights.load_checkpoint(resume)
    assert resume.stat().st_size < 0.3 * full and cmeta["dtype"] == "float16" and cmeta["epoch"] == 1
    assert weights.load_extra_tensors(resume) == {}
    assert all(torch.allclose(p, q, rtol=1e-3, atol=1e-4) for p, q in zip(model.parameters(), small.parameters()))
    train.main([*common, "--epochs", "2", "--resume"])
    _, done = weights.load_checkpoint(tmp_path / "run.safetensors")
    assert [h["epoch"] for h in done["history"]] == [1, 2] and done["history"][0] == meta["history"][0]
    assert not resume.exists()


def test_soft_targets_are_the_teachers_mean_softmax(tiny_config) -> None:
    torch.manual_seed(0)
    teachers = [ResNeXt(tiny_config).eval() for _ in range(2)]
    x = torch.randn(6, 3, 32, 32)
    p = trainer.soft_targets(teachers, x)
    with torch.no_grad():
        expect = (teachers[0](x).softmax(1) + teachers[1](x).softmax(1)) / 2
    assert torch.allclose(p, expect, atol=1e-6) and torch.allclose(p.sum(1), torch.ones(6))
    assert not p.requires_grad and not p.is_inference()  # a plain tensor the student's loss can use


def test_soft_targets_with_tta_average_each_teacher_over_the_mirror_image(tiny_config) -> None:
    torch.manual_seed(0)
    teachers = [ResNeXt(tiny_config).eval() for _ in range(2)]
    x = torch.randn(6, 3, 32, 32)
    p = trainer.soft_targets(teachers, x, tta=True)
    with torch.no_grad():
        expect = sum(t(v).softmax(1) for t in teachers for v in (x, x.flip(3))) / 4
    assert torch.allclose(p, expect, atol=1e-6) and torch.allclose(p.sum(1), torch.ones(6))
    # the target no longer depends on which way the image faces; without TTA it does
    assert torch.allclose(trainer.soft_targets(teachers, x.flip(3), tta=True), p, atol=1e-6)
    assert not torch.allclose(trainer.soft_targets(teachers, x.flip(3)), trainer.soft_targets(teachers, x), atol=1e-3)


def test_distillation_follows_the_teachers_not_the_labels(tiny_config) -> None:
    """With teachers the labels are not read (shuffled labels give the same weights), the teachers are not
    changed, and the student ends closer to the teachers' predictions than it started."""
    x, y = _colour_classes(8)
    torch.manual_seed(1)
    teacher = ResNeXt(tiny_config)
    list(trainer.fit(teacher, (x, y), trainer.TrainConfig(epochs=3, batch_size=16, lr=0.05, warmup_epochs=0), device="cpu"))
    with torch.no_grad():
        teacher.fc.weight.mul_(4)  # confident targets, far from any untrained student's
    frozen = {k: v.clone() for k, v in teacher.state_dict().items()}
    torch.manual_seed(2)
    init = ResNeXt(tiny_config).state_dict()
    cfg = trainer.TrainConfig(epochs=6, batch_size=16, lr=0.1, warmup_epochs=0, teachers="in-memory")

    def distilled(labels: torch.Tensor) -> ResNeXt:
        student = ResNeXt(tiny_config)
        student.load_state_dict(init)
        list(trainer.fit(student, (x, labels), cfg, device="cpu", teachers=[teacher]))
        return student

    def gap(student: ResNeXt) -> float:  # KL(teacher || student) on the training images
        with torch.no_grad():
            t, s = teacher.eval()(data.normalize(x)).log_softmax(1), student.eval()(data.normalize(x)).log_softmax(1)
        return torch.nn.functional.kl_div(s, t, log_target=True, reduction="batchmean").item()

    a, b = distilled(y), distilled(y[torch.randperm(len(y))])
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in frozen.items())
    start = ResNeXt(tiny_config)
    start.load_state_dict(init)
    assert gap(a) < 0.2 * gap(start)  # measured: 0.04 vs 1.0


class _Fixed(torch.nn.Module):
    """Returns preset logits for the images in the order predict_logits feeds them (one pass per call)."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits, self.i = logits, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.logits[self.i:self.i + len(x)]
        self.i = (self.i + len(x)) % len(self.logits)
        return out


def test_ensemble_accuracy_averages_probabilities() -> None:
    """Each model is right on half the images; where it is wrong it is only mildly so, so the mean softmax
    is right everywhere (an argmax vote would tie); a model with itself scores its own accuracy."""
    from resnext_demo.evaluate import ensemble_accuracy, evaluate
    y = torch.arange(8) % 2
    x = torch.zeros(8, 3, 32, 32, dtype=torch.uint8)

    def probs(right: torch.Tensor, p_right: float, p_wrong: float) -> torch.Tensor:
        p = torch.where(right, p_right, 1 - p_wrong)  # probability of the true class
        out = torch.zeros(8, 10)
        out[torch.arange(8), y], out[torch.arange(8), 1 - y] = p, 1 - p
        return (out + 1e-9).log()

    first = torch.arange(8) < 4
    a, b = _Fixed(probs(first, 0.99, 0.6)), _Fixed(probs(~first, 0.99, 0.6))
    assert evaluate(a, x, y)["top1"] == 0.5 and evaluate(b, x, y)["top1"] == 0.5
    assert ensemble_accuracy([a, b], x, y) == 1.0 and ensemble_accuracy([a, b], x, y, tta=True) == 1.0
    assert ensemble_accuracy([a, a], x, y) == 0.5


def test_evaluate_scores_the_runs_own_validation_split_and_an_ensemble(tmp_path, monkeypatch, capsys) -> None:
    """--split val re-draws the images this run held out (its --val N and seed, from the checkpoint, not a fixed
    5,000 with seed 0); a run without a validation split says so; --ensemble adds the mean-softmax line."""
    from resnext_demo import evaluate
    _image_tree(tmp_path / "tree", per_class=2, seed=4)
    monkeypatch.setenv("RESNEXT_DEMO_CACHE", str(tmp_path / "cache"))
    out, plain = tmp_path / "m.safetensors", tmp_path / "plain.safetensors"
    common = ["--model", "resnext29_8x4d_micro", "--data", str(tmp_path / "tree"), "--epochs", "1",
              "--batch-size", "5", "--device", "cpu"]
    train.main([*common, "--val", "10", "--seed", "2", "--out", str(out)])
    train.main([*common, "--out", str(plain)])
    capsys.readouterr()  # the training's own lines
    evaluate.main(["--weights", str(out), "--data", str(tmp_path / "tree"), "--split", "val", "--json",
                   "--ensemble", str(out)])
    res = json.loads(capsys.readouterr().out)
    x, y = data.load_split(str(tmp_path / "tree"), "train")
    _, (xv, yv) = splits.split_validation(x, y, 10, seed=2)
    model, _ = weights.load_checkpoint(out)
    assert res["n"] == len(yv) == 10 and res["ensemble"]["top1"] == pytest.approx(res["top1"])
    assert res["top1"] == pytest.approx(evaluate.evaluate(model, xv, yv)["top1"])
    with pytest.raises(SystemExit, match="validation split"):
        evaluate.main(["--weights", str(plain), "--data", str(tmp_path / "tree"), "--split", "val"])
