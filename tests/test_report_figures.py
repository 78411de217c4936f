"""The report's figures: labels that do not overlap, image grids sized to the images, the
undefended line on top."""
from __future__ import annotations

import itertools

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from benchmarks import report  # noqa: E402


def row(defence: str, accuracy: float, success: float, **extra) -> report.Row:
    return {"defence": defence, "attack": "copycat", "family": "extraction", "status": "ok", "chance": 0.1,
            "primary": "agreement_test",
            "metrics": {"agreement_test": {"mean": success, "std": 0.0, "values": [success]}},
            "utility": {"test_accuracy": {"mean": accuracy}}, **extra}


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def test_tradeoff_labels_of_crowded_points_do_not_overlap():
    names = ["none", "round:2", "round:1", "top_k:1", "label_only", "monitoring", "noise", "dp-eps8"]
    rows = [row(name, 0.975 + 0.0004 * i, 0.98 - 0.002 * i) for i, name in enumerate(names)]
    figure = report._tradeoff(plt, rows)
    renderer = figure.canvas.get_renderer()
    texts = [t for t in figure.axes[0].texts if t.get_text() in names]
    assert sorted(t.get_text() for t in texts) == sorted(names)
    boxes = [t.get_window_extent(renderer) for t in texts]
    assert not any(a.overlaps(b) for a, b in itertools.combinations(boxes, 2))


def test_image_grid_is_one_mosaic_per_line_on_a_figure_shaped_like_the_images():
    images = np.random.default_rng(0).random((10, 64)).tolist()
    rows = [row("none", 0.9, 0.5, family="inversion", images={"reconstructions": images, "references": images}),
            row("round:1", 0.9, 0.4, family="inversion", images={"reconstructions": images[:5], "references": images})]
    figure = report._image_grid(plt, rows)
    assert len(figure.axes) == 3  # the shared references once, then each row's reconstructions
    mosaic = figure.axes[0].images[0].get_array()
    assert mosaic.shape == (8, 10 * 8 + 9 * 1)
    width, height = figure.get_size_inches()
    assert width <= 7.0 and height < 3 * (width / 10 + 0.3)


def test_undefended_curve_is_drawn_on_top_with_markers():
    curve = {"agreement_vs_queries": {"x": [10, 20, 40], "y": [0.5, 0.7, 0.9]}}
    rows = [row(name, 0.9, 0.9, curves=curve) for name in ("none", "round:1", "monitoring")]
    figure = report._curve_figure(plt, rows, "agreement_vs_queries", log=False)
    lines = {line.get_label().split(" ")[0]: line for line in figure.axes[0].get_lines()}
    assert lines["none"].get_zorder() > max(lines[d].get_zorder() for d in ("round:1", "monitoring"))
    assert len({lines[d].get_marker() for d in lines}) == 3
