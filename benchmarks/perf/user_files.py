"""Two files as users bring them, for the checks of ``guard bench --quick --data`` with default options:
the bundled Olivetti faces as a user's NPZ (400 images downsampled to 32x32, uint8, keys ``X`` and
``y``) and a survey shaped like the Fair affairs data (6366 rows of ordinal answers, the binary
sensitive column ``had_affair`` at about a third, the label ``rate_marriage`` last; synthetic, since
nothing may be downloaded).

Run: ``python -m benchmarks.perf.user_files OUT`` writes ``OUT/faces.npz`` and ``OUT/survey.csv``, then
``guard bench --quick --data OUT/faces.npz`` and
``guard bench --quick --data OUT/survey.csv --sensitive had_affair``.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

FACES = Path(__file__).resolve().parents[1] / "data" / "olivetti_faces.npz"
SURVEY_COLUMNS = ("age", "yrs_married", "children", "religious", "educ", "occupation", "occupation_husb",
                  "had_affair", "rate_marriage")


def faces_npz(path: Path) -> None:
    """The faces at 32x32 (2x2 means of the 64x64 photos), as a user would save them."""
    faces = np.load(FACES)
    images = faces["images"].astype(np.float64).reshape(400, 32, 2, 32, 2).mean(axis=(2, 4))
    np.savez(path, X=images.astype(np.uint8), y=faces["labels"])


def survey_csv(path: Path, n: int = 6366, seed: int = 26) -> None:
    """A Fair-shaped survey: marginals close to the published table's, a marriage rating that depends
    noisily on the answers (so no model fits it well) and an affair indicator that depends on the rating."""
    rng = np.random.default_rng(seed)
    age = rng.choice([17.5, 22, 27, 32, 37, 42], n, p=[.02, .25, .30, .18, .12, .13])
    levels = np.array([0.5, 2.5, 6, 9, 13, 16.5, 23])
    raw = np.clip((age - 17) * rng.uniform(0.2, 1.0, n), 0.5, 23)
    years = levels[np.abs(raw[:, None] - levels).argmin(axis=1)]
    children = np.minimum(rng.poisson(years / 6), 5.5)
    religious = rng.choice([1, 2, 3, 4], n, p=[.16, .35, .39, .10])
    education = rng.choice([9, 12, 14, 16, 17, 20], n, p=[.01, .33, .36, .16, .09, .05])
    occupation = rng.choice([1, 2, 3, 4, 5, 6], n, p=[.01, .14, .44, .28, .11, .02])
    husband = rng.choice([1, 2, 3, 4, 5, 6], n, p=[.04, .35, .08, .32, .17, .04])
    rating = np.clip(np.round(4.3 - 0.05 * years - 0.08 * children + 0.1 * religious + rng.normal(0, 0.9, n)), 1, 5)
    logit = -1.4 - 0.7 * (rating - 4) + 0.07 * years - 0.35 * (religious - 2.5) - 0.03 * (age - 30)
    affair = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(int)
    table = np.column_stack([age, years, children, religious, education, occupation, husband, affair, rating])
    np.savetxt(path, table, delimiter=",", header=",".join(SURVEY_COLUMNS), comments="", fmt="%g")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder for faces.npz and survey.csv")
    out = parser.parse_args().out
    out.mkdir(parents=True, exist_ok=True)
    faces_npz(out / "faces.npz")
    survey_csv(out / "survey.csv")
    print(f"wrote {out / 'faces.npz'} and {out / 'survey.csv'}")


if __name__ == "__main__":
    main()
