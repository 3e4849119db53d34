"""The training CLI (python -m resnext_demo.train): DDP under torchrun agrees, warm starts, validation runs, compact resume states, evaluate --split val."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from resnext_demo import data, splits, train, weights


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
