"""The benchmarks' data sets: the guard's (``guard.data``: digits, breast cancer, the user's CSV/NPZ
files) and the AT&T faces bundled with the project."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from guard import data
from guard.data import Dataset, Split, split  # noqa: F401 (the harness uses them by these names)

BUNDLED = (*data.BUNDLED, "faces", "faces64")
DATA = Path(__file__).parent / "data"
FACES = DATA / "olivetti_faces.npz"


def load(name: str, sensitive: str | int | None = None) -> Dataset:
    """A bundled dataset by name (faces too), or a user's ``.csv`` / ``.npz`` file by path, as
    ``guard.data.load``."""
    if name in ("faces", "faces64"):
        dataset = faces(pool=1 if name == "faces64" else 2)
        return dataset if sensitive is None else dataset.with_sensitive(sensitive)
    return data.load(name, sensitive)


def faces(pool: int = 2) -> Dataset:
    """The AT&T (Olivetti) faces bundled with the project (``benchmarks/data/README.md``): 40 people,
    10 photos each, stored 64x64 (``faces64``, ``pool=1``); ``faces`` averages 2x2 blocks (32x32),
    four times cheaper to attack over HTTP. Split as in Fredrikson et al. (CCS 2015, sec. 5.1):
    7 photos of each person train the target, 3 are held out."""
    with np.load(FACES, allow_pickle=False) as arrays:
        images, labels = arrays["images"].astype(np.float64) / 255.0, arrays["labels"]
    n, h, w = images.shape
    images = images.reshape(n, h // pool, pool, w // pool, pool).mean(axis=(2, 4))
    name = "faces64" if pool == 1 else "faces"
    return replace(data.from_arrays(name, images, labels, image_range=(0.0, 1.0)), train_per_class=7)
