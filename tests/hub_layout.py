"""A local copy of a CIFAR-10 dataset in the Hugging Face Hub's layout (parquet files in the hub cache), so
`hf://datasets/...` sources are loaded by the real huggingface_hub code with HF_HUB_OFFLINE=1, no network."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from resnext_demo import data

REPO = "uoft-cs/cifar10"
SOURCE = f"hf://datasets/{REPO}"
COMMIT = "0b2714987fa478483af9968de7c934580d0bb9a2"  # any 40 hex digits: the snapshot folder's name


def synthetic_split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n random 32x32 RGB images (uint8, N x 32 x 32 x 3) and labels cycling through the 10 classes."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), np.arange(n) % len(data.CLASSES)


def write_hub_copy(cache: Path, splits: dict[str, tuple[np.ndarray, np.ndarray]],
                   classes: tuple[str, ...] = data.CLASSES) -> Path:
    """Write `splits` as <cache>/datasets--uoft-cs--cifar10/snapshots/<commit>/plain_text/<split>-00000-of-00001.parquet
    (columns img {bytes: PNG, path} and label, with the Hub's ClassLabel names) and refs/main; returns the cache."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    repo_dir = cache / f"datasets--{REPO.replace('/', '--')}"
    folder = repo_dir / "snapshots" / COMMIT / "plain_text"
    folder.mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(COMMIT)
    features = {"img": {"_type": "Image"}, "label": {"names": list(classes), "_type": "ClassLabel"}}
    for split, (images, labels) in splits.items():
        cells = []
        for i, a in enumerate(images):
            buf = io.BytesIO()
            Image.fromarray(a).save(buf, format="PNG")
            cells.append({"bytes": buf.getvalue(), "path": f"{i}.png"})
        table = pa.table({"img": cells, "label": pa.array(labels, pa.int64())})
        table = table.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features}})})
        pq.write_table(table, folder / f"{split}-00000-of-00001.parquet")
    return cache
