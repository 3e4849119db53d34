"""What a checkpoint shows, as the tables of docs/findings.md: `python -m resnext_demo.findings` prints its group
specialization against untrained copies, the deletion faithfulness of every attribution method against random
orders and model-blind maps, and Conductance's convergence (a command line over the library, no UI).
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn as nn

from . import data
from .explain import _DEFAULTS, METHODS, attribute
from .faithfulness import REFERENCES, faithfulness
from .groups import CONDUCTANCE_MAX_STEPS, CONDUCTANCE_TOL, group_importance
from .specialization import CONTROL_CALIBRATION, SPECIALIZATION_IMAGES, specialization_cached, untrained_copy


def faithfulness_table(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, randomized: nn.Module | None = None,
                       **deletion) -> dict[str, dict]:
    """For every attribution method at its defaults (true class as the target): on how many images its deletion
    score beats the random orders, each model-blind reference, and all of them, with the mean scores; rows for
    the references themselves; with `randomized` (e.g. an untrained_copy), the same method's map from that
    model as one more reference. `deletion` goes to deletion_scores."""
    n = len(images)
    rows = {m: {"n": n, "wins": 0, "scores": [], **{f"beats {r}": 0 for r in REFERENCES}, "beats all": 0}
            for m in METHODS}
    refs = {r: {"n": n, "wins": 0, "scores": []} for r in REFERENCES}
    randoms, ig_delta, ig_rel = [], [], []
    for i in range(n):
        xi, t = data.normalize(images[i:i + 1]), int(labels[i])
        attrs = [attribute(model, xi, m, t) for m in METHODS]
        maps = [a.values for a in attrs]
        if randomized is not None:  # the same method on the untrained copy: one more model-blind map per method
            maps += [attribute(randomized, xi, m, t).values for m in METHODS]
        scored = faithfulness(model, xi, maps, t, **deletion)
        randoms.append(scored[0].random_score)
        for r, v in scored[0].references.items():
            refs[r]["wins"] += v > scored[0].random_score
            refs[r]["scores"].append(v)
        for k, (m, f) in enumerate(zip(METHODS, scored)):
            row = rows[m]
            row["wins"] += f.score > f.random_score
            row["scores"].append(f.score)
            for r, v in f.references.items():
                row[f"beats {r}"] += f.score > v
            row["beats all"] += f.verdict == "beats references"
            if randomized is not None:
                other = scored[len(METHODS) + k].score
                row.setdefault("randomized", []).append(other)
                row["beats randomized"] = row.get("beats randomized", 0) + (f.score > other)
        ig = attrs[METHODS.index("Integrated Gradients")]
        ig_delta.append(abs(ig.delta))
        ig_rel.append(abs(ig.delta) / max(abs(ig.change), 1e-12))
    for row in [*rows.values(), *refs.values()]:
        row["score"] = float(np.mean(row.pop("scores")))
        if "randomized" in row:
            row["randomized"] = float(np.mean(row["randomized"]))
    rows["Integrated Gradients"].update(delta_median_rel=float(np.median(ig_rel)), delta_max=float(np.max(ig_delta)))
    return {**rows, **refs, "random orders": {"n": n, "score": float(np.mean(randoms))}}


def conductance_table(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, layers: list[str]) -> list[dict]:
    """Conductance of the true class at each of `layers` for each image: the steps it took to settle, the
    change from half the steps, the completeness gap, and how far the groups were at 32 steps."""
    rows = []
    for i in range(len(images)):
        xi, t = data.normalize(images[i:i + 1]), int(labels[i])
        for layer in layers:
            gi = group_importance(model, xi, layer, t, "Conductance")
            at32 = group_importance(model, xi, layer, t, "Conductance", steps=32, max_steps=32)
            rows.append({"image": i, "layer": layer, "shortcut": gi.shortcut_kind, "steps": gi.steps,
                         "step_error": gi.step_error, "gap": gi.completeness_gap,
                         "off_at_32": float(np.abs(at32.values - gi.values).max()),
                         "top_changes_at_32": int(np.argmax(at32.values)) != int(np.argmax(gi.values))})
    return rows


def _range(v: np.ndarray, fmt: str = ".2f") -> str:
    """'lo–hi' of an array (or 'n/a' when empty)."""
    return f"{np.min(v):{fmt}}–{np.max(v):{fmt}}" if len(v) else "n/a"


def _parser() -> argparse.ArgumentParser:
    """The CLI's flags."""
    from . import weights

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--weights", default=str(weights.DEFAULT_WEIGHTS))
    ap.add_argument("--data", default=data.default_source(), help="CIFAR-10 source (default: $RESNEXT_DEMO_DATA or the shared archive)")
    ap.add_argument("--n", type=int, default=SPECIALIZATION_IMAGES, help="test images (a class-balanced prefix)")
    ap.add_argument("--rebuild", action="store_true", help="recompute even when cached")
    ap.add_argument("--faithfulness", type=int, default=40, metavar="N", help="test images for the deletion table (0: skip)")
    ap.add_argument("--randomized", action="store_true",
                    help="also score each method's map from an untrained copy of the model (seed 0)")
    ap.add_argument("--patch", type=int, default=4, help="deletion square size (1 = single pixels)")
    ap.add_argument("--fill", choices=("blur", "mean"), default="blur", help="what deleted squares become (mean = grey)")
    ap.add_argument("--conductance", type=int, default=0, metavar="N",
                    help="test images for the Conductance convergence table (first, middle and last block; 0: skip)")
    return ap


def _print_specialization(model: nn.Module, args) -> None:
    """The specialization table of every grouped block against its untrained copies, and the block counts."""
    t0 = time.perf_counter()
    spec = specialization_cached(model, args.data, n=args.n, rebuild=args.rebuild)
    seeds = len(next(iter(spec.values())).control_gap)
    print(f"Group specialization of {args.weights} on the first {args.n} test images of {args.data}, and of {seeds} "
          f"untrained copies (BN recalibrated on {CONTROL_CALIBRATION} training images) ({time.perf_counter() - t0:.2f} s, "
          f"cache: .cache/analysis)\n")
    print("| block | C | selectivity mean (max) | untrained | group corr. | channel corr. within / between | gap "
          "| untrained gap | colour sens. range | colour partition p | untrained p | blur sens. range |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for layer, s in spec.items():
        g = len(s.mean)
        off = s.correlation[~np.eye(g, dtype=bool)].mean() if g > 1 else float("nan")
        print(f"| {layer} | {g} | {s.selectivity.mean():.2f} ({s.selectivity.max():.2f}) | {_range(s.control_selectivity)} "
              f"| {off:.2f} | {s.within_corr:.2f} / {s.between_corr:.2f} | {s.gap:.3f} | {_range(s.control_gap, '.3f')} "
              f"| {s.colour.min():.2f}–{s.colour.max():.2f} | {s.colour_p:.3f} | {_range(s.control_colour_p, '.3f')} "
              f"| {s.blur.min():.2f}–{s.blur.max():.2f} |")
    blocks = list(spec.values())
    per_seed = lambda f: [int(sum(f(b, k) for b in blocks)) for k in range(seeds)]  # noqa: E731 (blocks per seed)
    print(f"\nOf {len(blocks)} blocks (trained | each untrained copy | trained beyond every untrained copy):")
    print(f"- channels of a group correlate >= 0.02 more than across groups: {sum(b.gap >= 0.02 for b in blocks)} | "
          f"{per_seed(lambda b, k: b.control_gap[k] >= 0.02)} | {sum(b.gap > b.control_gap.max() for b in blocks)}")
    for alpha in (0.05, 0.01):
        print(f"- colour partition p < {alpha}: {sum(b.colour_p < alpha for b in blocks)} | "
              f"{per_seed(lambda b, k: b.control_colour_p[k] < alpha)} | "
              f"{sum(b.colour_p < alpha and b.colour_p < b.control_colour_p.min() for b in blocks)}")
    print(f"- mean selectivity: {_range(np.array([b.selectivity.mean() for b in blocks]))} | "
          f"{_range(np.concatenate([b.control_selectivity for b in blocks]))} | "
          f"{sum(b.selectivity.mean() > b.control_selectivity.max() for b in blocks)}")


def _print_faithfulness(model: nn.Module, args) -> None:
    """The deletion-faithfulness table of every attribution method against random and model-blind orders."""
    images, labels = data.load_split(args.data, "test")
    randomized = None
    if args.randomized:
        randomized = untrained_copy(model, 0, data.load_split(args.data, "train")[0][:CONTROL_CALIBRATION])
    rows = faithfulness_table(model, images[:args.faithfulness], labels[:args.faithfulness], randomized,
                              patch=args.patch, fill=args.fill)
    print(f"\nDeletion faithfulness on the first {args.faithfulness} test images (true class; higher drop = better; "
          f"{args.patch}x{args.patch} squares -> {args.fill}); 'beats X': images where the map's drop is larger\n")
    extra = " untrained copy's map: mean drop | beats it |" if randomized is not None else ""
    print("| map | mean drop | beats random | beats centre prior | beats image edges | beats all three |" + extra)
    print("|---|---|---|---|---|---|" + "---|---|" * bool(randomized))
    for name, r in rows.items():
        if name in METHODS:
            print(f"| {name} | {r['score']:.3f} | {r['wins']}/{r['n']} | {r['beats centre prior']}/{r['n']} "
                  f"| {r['beats image edges']}/{r['n']} | {r['beats all']}/{r['n']} |"
                  + (f" {r['randomized']:.3f} | {r['beats randomized']}/{r['n']} |" if randomized is not None else ""))
        elif name in REFERENCES:
            print(f"| {name} (model-blind) | {r['score']:.3f} | {r['wins']}/{r['n']} | | | |" + " | |" * bool(randomized))
        else:
            print(f"| {name} | {r['score']:.3f} | | | | |" + " | |" * bool(randomized))
    ig = rows["Integrated Gradients"]
    print(f"\nIntegrated Gradients at {_DEFAULTS['Integrated Gradients']['steps']} steps: convergence delta "
          f"median {100 * ig['delta_median_rel']:.1f} % of f(x) - f(black), worst {ig['delta_max']:.3f} logit")


def _print_conductance(model: nn.Module, args) -> None:
    """Conductance's convergence on the first, middle and last block."""
    images, labels = data.load_split(args.data, "test")
    convs = list(model.grouped_convs())
    layers = list(dict.fromkeys([convs[0], convs[len(convs) // 2], convs[-1]]))
    rows = conductance_table(model, images[:args.conductance], labels[:args.conductance], layers)
    print(f"\nConductance (true class, black baseline) on the first {args.conductance} test images: steps doubled "
          f"from 32 until nothing moves more than {CONDUCTANCE_TOL} logit (at most {CONDUCTANCE_MAX_STEPS})\n")
    print("| image | block | shortcut | steps | change from half the steps | groups + shortcut - logit change "
          "| largest group error at 32 steps | top group differs at 32 |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['image']} | {r['layer']} | {r['shortcut']} | {r['steps']} | {r['step_error']:.4f} | {r['gap']:+.4f} "
              f"| {r['off_at_32']:.3f} | {'yes' if r['top_changes_at_32'] else 'no'} |")




def main(argv: list[str] | None = None) -> None:
    """`python -m resnext_demo.findings`: (re)build the group-specialization cache of a checkpoint (with its
    untrained control) and print what it shows, the deletion faithfulness of every attribution method against
    random orders and model-blind maps, and optionally Conductance's convergence, as Markdown."""
    from . import weights

    ap = _parser()
    args = ap.parse_args(argv)
    if not args.data:
        ap.error("no CIFAR-10 source: pass --data or set RESNEXT_DEMO_DATA")
    model, _ = weights.load_checkpoint(args.weights)
    _print_specialization(model, args)
    if args.faithfulness:
        _print_faithfulness(model, args)
    if args.conductance:
        _print_conductance(model, args)


if __name__ == "__main__":
    main()
