"""Make a checkpoint say how far to believe it: fit its temperature and its unfamiliar-image detector, measure
both, and write them into the checkpoint.

    python -m resnext_demo.calibrate [--weights W] [--out OUT] [--data D] [--through-predict]

Images (the CIFAR-10 test split in the JPEG copy's filename order; `data.load_split` interleaves classes,
so its first 5,000 are the first 500 of each class):
- fitting: the first 500 test images of each class (temperature, detector threshold). Checkpoints trained on
  all 50,000 training images never saw them;
- reporting: the other 5,000, used only to measure (ECE, NLL, confidence vs accuracy, flagged share);
- the detector's Gaussians: the first `--reference` training images (class-balanced);
- out-of-distribution sets: `oodsets` (synthetic, the packages' photos and drawings, transformed CIFAR-10), and
  two in-distribution controls (mirrored CIFAR-10, CIFAR-10 as uploads) that should be flagged at the held-in rate.
"""
from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch
import torch.nn as nn

from . import calibration, data, familiarity, oodsets, weights
from .predict import predict_logits

FIT_PER_CLASS = 500
FIT_RULE = "first 500 CIFAR-10 test images of each class (JPEG copy, filename order)"
REPORT_RULE = "the other 5,000 CIFAR-10 test images"


def halves(x: torch.Tensor, y: torch.Tensor) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """(fitting half, reporting half) of the test split: each class's first FIT_PER_CLASS images, and the rest."""
    rank = torch.zeros_like(y)
    for c in y.unique():  # position of each image within its class, in split order (= filename order)
        pos = torch.nonzero(y == c).flatten()
        rank[pos] = torch.arange(len(pos))
    fit = rank < FIT_PER_CLASS
    return (x[fit], y[fit]), (x[~fit], y[~fit])


def fit_calibration(model: nn.Module, fit: tuple, report: tuple, objective: str = "ece") -> dict:
    """The metadata entry `calibration`: temperature fitted on `fit`, reliability before/after on `report`."""
    lf, lr = predict_logits(model, fit[0]), predict_logits(model, report[0])
    t = calibration.fit_temperature(lf, fit[1], objective)
    return {"temperature": t, "method": f"temperature scaling, T minimising the {objective.upper()} "
            f"({calibration.N_BINS} bins) of the fitting images", "fitted_on": FIT_RULE, "n_fit": len(fit[1]),
            "temperature_nll": calibration.fit_temperature(lf, fit[1], "nll"),
            "reporting": {"images": REPORT_RULE, "n": len(report[1]),
                          "before": calibration.reliability(lr, report[1]).to_dict(),
                          "after": calibration.reliability(lr, report[1], t).to_dict()}}


def ood_sets(report: tuple) -> dict[str, tuple[str, torch.Tensor]]:
    """{name: (kind, uint8 images)}: far (synthetic), package (photos, drawings) and near (transformed
    reporting images) sets."""
    out = {}
    for kind, sets in (("far", oodsets.far_sets()), ("package", oodsets.package_sets()),
                       ("near", oodsets.near_sets(report[0][:1000])), ("control", controls(report[0][:1000]))):
        out.update({name: (kind, x) for name, x in sets.items()})
    return out


def controls(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """In-distribution controls that should be flagged at the held-in rate: mirror images, and images upscaled
    to 640 px and re-encoded as JPEG (quality 90) the way uploads arrive, then shrunk back by the app's path."""
    from .evaluate import as_upload

    return {"CIFAR-10 mirrored (control)": x.flip(3).contiguous(),
            "CIFAR-10 as 640 px JPEG uploads (control)": torch.cat(
                [data.pil_to_uint8(data.prepare_image(as_upload(im, 640, "JPEG"))) for im in x])}


def ood_evaluation(score: Callable[[torch.Tensor], torch.Tensor], threshold: float, report: tuple,
                   sets: dict[str, tuple[str, torch.Tensor]]) -> dict:
    """Flagged share and AUROC (against the reporting images) of every set, for any score (higher = stranger)."""
    inside = score(report[0])
    out = {"reporting": {"n": len(inside), "flagged": round(float((inside > threshold).float().mean()), 4)}, "sets": {}}
    for name, (kind, x) in sets.items():
        s = score(x)
        out["sets"][name] = {"kind": kind, "n": len(x), "flagged": round(float((s > threshold).float().mean()), 4),
                             "auroc": round(familiarity.auroc(inside, s), 4)}
    far = [v for v in out["sets"].values() if v["kind"] == "far"]
    out["far_flagged"] = round(sum(v["flagged"] * v["n"] for v in far) / sum(v["n"] for v in far), 4)
    return out


def alternatives(model: nn.Module, reference: tuple, fit: tuple) -> dict[str, tuple[Callable, float]]:
    """Other detectors, each as (score, threshold flagging 5 % of the fitting images), to compare with the
    shipped one: max softmax probability, energy, k-NN on normalised penultimate features (Sun et al. 2022;
    k = 1 on 5,000 reference images), and Mahalanobis on the penultimate features alone."""
    t = calibration.temperature_of(model)
    logit_scores = {"max softmax probability": lambda lo: -torch.softmax(lo / t, 1).max(1).values,
                    "energy (logsumexp of logits)": lambda lo: -torch.logsumexp(lo, 1)}
    out = {}
    for name, f in logit_scores.items():
        def score(x, f=f):
            return f(predict_logits(model, x))
        out[name] = score
    _, (bank,) = familiarity.describe_all(model, reference[0], [(-1, "mean")])
    bank = nn.functional.normalize(bank, dim=1)

    def knn(x):
        _, (v,) = familiarity.describe_all(model, x, [(-1, "mean")])
        return 1 - (nn.functional.normalize(v, dim=1) @ bank.T).max(1).values
    out["k-NN, penultimate (k=1)"] = knn
    pen = familiarity.build(model, reference, fit[0], spec=((-1, "mean", True),))
    out["Mahalanobis, penultimate only"] = lambda x: familiarity.scores_uint8(model, pen, x)
    return {k: (f, float(torch.quantile(f(fit[0]), 1 - familiarity.FLAG_RATE))) for k, f in out.items()}


def through_predict(model: nn.Module, classes: list[str], report: tuple) -> dict:
    """The reporting images one by one through `predict.predict` (what /predict runs): ECE, confidence,
    accuracy, flagged share, and whether top-1 matches the bare model's argmax on every image."""
    from .predict import predict

    x, y = report
    bare = predict_logits(model, x).argmax(1)
    conf, top, flagged = [], [], 0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one image at a time gains nothing from a second thread, and loses to contention
    for im in x:
        p = predict(model, im.permute(1, 2, 0).numpy(), classes)
        conf.append(list(p.probs.values())[0])
        top.append(p.top_index)
        flagged += p.unfamiliar
    torch.set_num_threads(threads)
    top_t, conf_t = torch.tensor(top), torch.tensor(conf)
    rel = calibration.reliability_of_top1(conf_t, top_t == y)
    return {"n": len(y), "accuracy": round(rel.accuracy, 6), "confidence": round(rel.confidence, 6), "ece": round(rel.ece, 6),
            "flagged": flagged / max(len(y), 1), "top1_identical": bool((top_t == bare).all())}


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    ap = argparse.ArgumentParser(description="Fit and store a checkpoint's calibration and unfamiliar-image detector.")
    ap.add_argument("--weights", default=str(weights.DEFAULT_WEIGHTS))
    ap.add_argument("--out", default=None, help="where to write the checkpoint (default: over --weights)")
    ap.add_argument("--data", default=None, help="CIFAR-10 source (default $RESNEXT_DEMO_DATA or the shared archive)")
    ap.add_argument("--reference", type=int, default=5000, help="training images the detector's Gaussians are fitted on")
    ap.add_argument("--objective", default="ece", choices=["ece", "nll"], help="what the temperature minimises")
    ap.add_argument("--through-predict", action="store_true",
                    help="also run the 5,000 reporting images one by one through predict.predict")
    ap.add_argument("--compare", action="store_true",
                    help="also print how other detectors (logit scores, k-NN, penultimate Mahalanobis) do on the same sets")
    ap.add_argument("--json", action="store_true", help="print the metadata entries as JSON")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    model, meta = weights.load_checkpoint(args.weights)
    fit, report = halves(*data.load_split(args.data, "test"))
    print("fitting the temperature", flush=True)
    model.calibration = fit_calibration(model, fit, report, args.objective)
    print("building the unfamiliar-image detector", flush=True)
    xtr, ytr = data.load_split(args.data, "train")
    fam = familiarity.build(model, (xtr[:args.reference], ytr[:args.reference]), fit[0], info={
        "reference": f"first {args.reference} CIFAR-10 training images (class-balanced)", "fitted_on": FIT_RULE})
    print("measuring it on the out-of-distribution sets", flush=True)
    sets = ood_sets(report)
    fam.info["evaluation"] = ood_evaluation(lambda x: familiarity.scores_uint8(model, fam, x), fam.threshold,
                                            report, sets)
    model.familiarity = fam
    if args.compare:
        for name, (score, threshold) in alternatives(model, (xtr[:args.reference], ytr[:args.reference]), fit).items():
            ev = ood_evaluation(score, threshold, report, sets)
            print(f"{name}: reporting flagged {100 * ev['reporting']['flagged']:.1f} %, far flagged "
                  f"{100 * ev['far_flagged']:.1f} %; " + "; ".join(
                      f"{k} {100 * v['flagged']:.0f} % / {v['auroc']:.3f}" for k, v in ev["sets"].items()))
    if args.through_predict:
        print("the reporting images through predict.predict", flush=True)
        model.calibration["reporting"]["through_predict"] = through_predict(model, list(meta["classes"]), report)
    model.calibration["command"] = fam.info["command"] = "python -m resnext_demo.calibrate"
    out = weights.save_checkpoint(args.out or args.weights, model, meta, half=meta.get("dtype") == "float16")
    entries = {"calibration": model.calibration, "familiarity": fam.meta()}
    if args.json:
        print(json.dumps(entries, indent=1))
    else:
        print(summary(entries))
    print(f"wrote {out} in {time.perf_counter() - t0:.0f} s")


def summary(entries: dict) -> str:
    """The numbers as a short plain-text report."""
    cal, fam = entries["calibration"], entries["familiarity"]
    b, a = cal["reporting"]["before"], cal["reporting"]["after"]
    lines = [f"temperature {cal['temperature']} (NLL-optimal {cal['temperature_nll']}), fitted on {cal['n_fit']} images",
             f"reporting half ({cal['reporting']['n']}): ECE {100 * b['ece']:.2f} -> {100 * a['ece']:.2f} %, "
             f"NLL {b['nll']:.3f} -> {a['nll']:.3f}, accuracy {100 * a['accuracy']:.2f} %, "
             f"mean confidence {100 * b['confidence']:.2f} -> {100 * a['confidence']:.2f} %"]
    if "through_predict" in cal["reporting"]:
        tp = cal["reporting"]["through_predict"]
        lines.append(f"through predict.predict: ECE {100 * tp['ece']:.2f} %, confidence {100 * tp['confidence']:.2f} %, "
                     f"accuracy {100 * tp['accuracy']:.2f} %, flagged {100 * tp['flagged']:.1f} %, "
                     f"top-1 identical: {tp['top1_identical']}")
    ev = fam["evaluation"]
    lines.append(f"unfamiliar: threshold {fam['threshold']:.4f}; reporting half flagged "
                 f"{100 * ev['reporting']['flagged']:.1f} %; far sets flagged {100 * ev['far_flagged']:.1f} %")
    lines += [f"  {k:32} {v['kind']:8} n={v['n']:4}  flagged {100 * v['flagged']:5.1f} %  AUROC {v['auroc']:.3f}"
              for k, v in ev["sets"].items()]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
