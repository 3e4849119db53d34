"""trainer.fit(): it learns, resumes exactly, respects frozen layers and stop; augmentation, schedules, distillation."""
from __future__ import annotations

import threading

import pytest
import torch

from resnext_demo import data, trainer
from resnext_demo.model import ResNeXt
from tests.conftest import colour_classes


def _eval_loss(model, x, y) -> float:
    model.eval()
    with torch.no_grad():
        return torch.nn.functional.cross_entropy(model(data.normalize(x)), y).item()


def test_fit_lowers_the_loss(tiny_config) -> None:
    torch.manual_seed(0)
    model = ResNeXt(tiny_config)
    x, y = colour_classes()
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
    x, y = colour_classes(8)
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
    x, y = colour_classes(4)
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    cfg = trainer.TrainConfig(epochs=1, batch_size=20, train_layers="head")
    list(trainer.fit(tiny_model, (x, y), cfg, device="cpu"))
    after = tiny_model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"fc.weight", "fc.bias"}  # frozen BatchNorms keep their running statistics too


def test_last_stage_training_leaves_earlier_stages(tiny_model) -> None:
    x, y = colour_classes(4)
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    list(trainer.fit(tiny_model, (x, y), trainer.TrainConfig(epochs=1, batch_size=20, train_layers="last_stage"), device="cpu"))
    changed = {k.split(".")[0] for k, v in tiny_model.state_dict().items() if not torch.equal(before[k], v)}
    assert changed == {"layer3", "fc"}


def test_stop_event_ends_training_early(tiny_model) -> None:
    x, y = colour_classes(16)
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
    x, y = colour_classes(8)
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
