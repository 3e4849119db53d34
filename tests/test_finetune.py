"""finetune.py and beforeafter.py's report: intervals, paired tests and verdicts against known values and hand computations."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from resnext_demo import beforeafter, data, finetune, verdicts


@pytest.mark.parametrize("k,n,lo,hi", [(81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0, 0.1611),
                                       (1, 29, 0.0061, 0.1718)])
def test_wilson_interval_matches_published_values(k, n, lo, hi):
    """Newcombe (1998), Statistics in Medicine 17:857, Table I, method 3 (Wilson score without continuity correction)."""
    got = beforeafter.wilson_interval(k, n)
    assert got == pytest.approx((lo, hi), abs=6e-5)


def test_mcnemar_exact_p():
    assert beforeafter.mcnemar_p(1, 6) == pytest.approx(0.125)  # 2 * (1 + 7) / 2**7
    assert beforeafter.mcnemar_p(0, 0) == 1.0 and beforeafter.mcnemar_p(3, 3) == 1.0
    for worse, better in ((0, 5), (2, 9), (7, 1), (4, 12)):  # against enumerating every outcome of n fair coins
        n = worse + better
        extreme = abs(worse - n / 2)
        want = sum(math.comb(n, j) for j in range(n + 1) if abs(j - n / 2) >= extreme - 1e-12) / 2 ** n
        assert beforeafter.mcnemar_p(worse, better) == pytest.approx(want)
        assert beforeafter.mcnemar_p(worse, better) == beforeafter.mcnemar_p(better, worse)


def test_compare_separates_a_class_prior_shift_from_discrimination_and_forgetting(tiny_model):
    """'After' = the same model with a large bias on classes 3 and 5: it now answers 3 or 5 for every image but
    ranks 3 against 5 exactly as before. So held-out accuracy on 3/5 images rises, accuracy among {3, 5} stays,
    and every other class is forgotten."""
    gen = torch.Generator().manual_seed(0)
    x = (torch.rand(200, 3, 32, 32, generator=gen) * 255).to(torch.uint8)
    with torch.no_grad():
        logits = tiny_model(data.normalize(x))
    among = torch.tensor([3, 5])[logits[:, [3, 5]].argmax(1)]  # labels the model gets right among {3, 5}
    hold = finetune.Dataset(x[:60], among[:60], list(data.CLASSES))
    # CIFAR slice: 30 images labelled like the held-out ones, the rest with the model's top class outside {3, 5}
    # (right before whenever its overall top class is not 3 or 5; never right after the shift)
    others = logits[90:].clone()
    others[:, [3, 5]] = -float("inf")
    cifar = (x[60:], torch.cat([among[60:90], others.argmax(1)]))
    after = copy.deepcopy(tiny_model)
    with torch.no_grad():
        after.fc.bias[[3, 5]] += 1000.0
    rows = beforeafter.compare(tiny_model, after, hold, [3, 5], cifar)
    ten_way_before = float((logits[:60].argmax(1) == among[:60]).double().mean())
    assert rows["holdout"].before == pytest.approx(ten_way_before) and rows["holdout"].after == 1.0
    assert rows["holdout_among"].before == rows["holdout_among"].after == 1.0
    kept = float(torch.isin(cifar[1], torch.tensor([3, 5])).double().mean())
    right_before = float((logits[60:].argmax(1) == cifar[1]).double().mean())
    assert rows["cifar"].before == pytest.approx(right_before) and rows["cifar"].after == pytest.approx(kept)
    assert rows["cifar_trained"].n == int(torch.isin(cifar[1], torch.tensor([3, 5])).sum())
    words = "\n".join(verdicts.finetune_md(rows))
    assert "Mostly a shift towards your classes** on the held-out images" in words and "Bought with forgetting" in words
    assert "on the CIFAR-10 images of these classes" in words  # 10-way up, among {3, 5} unchanged there too
    assert rows["cifar_among"].change == 0 and rows["cifar_trained"].change > 0
    assert rows["holdout"].change > 0.2  # the shift is a big "gain" here, so the verdict has something to see through


def test_verdict_says_within_noise_for_a_small_held_out_change():
    before = np.array([True] * 7 + [False] * 5)
    after = before.copy()
    after[[7, 8]] = True  # 2 of 12 more correct: p = 0.5
    rows = {"holdout": beforeafter.Comparison("held-out", before, after)}
    assert rows["holdout"].p == pytest.approx(0.5) and rows["holdout"].change == pytest.approx(2 / 12)
    assert "Within noise" in verdicts.finetune_md(rows)[0]
    assert rows["holdout"].cell("after") == "75.0 % (47–91)"  # Wilson 9/12: 0.468-0.911


def test_run_holds_out_only_the_visitors_images_and_counts_cifar_apart(tiny_model):
    """#28.2: CIFAR-10 images added to a fine-tune are trained on, never held out; the held-out row and the
    summary count the visitor's images only."""
    gen = torch.Generator().manual_seed(0)
    mine = finetune.Dataset((torch.rand(10, 3, 32, 32, generator=gen) * 255).to(torch.uint8),
                            torch.tensor([0] * 5 + [1] * 5), list(data.CLASSES))
    extra = finetune.Dataset((torch.rand(20, 3, 32, 32, generator=gen) * 255).to(torch.uint8),
                             torch.arange(20) % 10, list(data.CLASSES))
    opts = finetune.Options(epochs=1, batch_size=8)
    updates = list(finetune.run(tiny_model, data.CLASSES, mine, opts, extra=extra))
    kinds = [u.kind for u in updates]
    assert kinds[-2:] == ["scoring", "done"] and "2 held-out images of yours" in updates[-2].text
    res = updates[-1].result
    held = sum(finetune.holdout_count(5) for _ in range(2))
    assert (res.n_holdout, res.n_train, res.n_extra) == (held, 10 - held + 20, 20)
    assert res.comparisons["holdout"].n == held
    assert f"{10 - held + 20} training images, 20 of them CIFAR-10 / {held} of your images held out" in res.summary()
    # CIFAR-10 images alone: everything is trained on, nothing held out
    res = list(finetune.run(tiny_model, data.CLASSES, None, opts, extra=extra))[-1].result
    assert (res.n_holdout, res.n_train) == (0, 20) and "holdout" not in res.comparisons
