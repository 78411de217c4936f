"""The report's figures: labels that do not overlap and stay in their panel, DP-SGD points apart,
image grids large enough to recognise a digit, curves that stay visible when they coincide."""
from __future__ import annotations

import itertools

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.text import Text
from report_rows import SPECS, extraction, inversion, membership

from benchmarks import figures  # draws with the Agg backend


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def test_tradeoff_labels_of_crowded_points_do_not_overlap_and_stay_in_the_panel():
    names = ["none", "round:2", "round:1", "top_k:1", "label_only", "monitoring", "noise", "dp-eps8"]
    specs = {**SPECS, "dp-eps8": {"dp_epsilon": 8.0}}
    rows = [extraction(name, 0.98 - 0.002 * i, 0.975 + 0.0004 * i) for i, name in enumerate(names)]
    figure = figures.tradeoff(rows, specs)
    renderer = figure.canvas.get_renderer()
    [axis] = figure.axes
    labels = [figures.defence_label(name, specs) for name in names]
    texts = [t for t in axis.texts if t.get_text() in labels]
    assert sorted(t.get_text() for t in texts) == sorted(labels) and "DP-SGD ε=8" in labels
    boxes = [Text.get_window_extent(t, renderer) for t in texts]  # the words, without their leader lines
    assert not any(a.overlaps(b) for a, b in itertools.combinations(boxes, 2))
    frame = axis.get_window_extent(renderer)
    assert all(frame.x0 <= b.x0 and b.x1 <= frame.x1 and frame.y0 <= b.y0 and b.y1 <= frame.y1 for b in boxes)
    dp = next(t for t in texts if t.get_text().startswith("DP-SGD"))
    assert dp.get_fontweight() == "bold"


def test_tradeoff_has_one_panel_per_target_and_dp_points_are_distinct():
    rows = [membership("none", 0.08), membership("dp-eps8", 0.009, 0.93)]
    rows += [{**r, "model": "mlp"} for r in rows]
    figure = figures.tradeoff(rows, SPECS)
    assert [a.get_title() for a in figure.axes] == ["membership: digits · softmax", "membership: digits · mlp"]
    assert figures.defence_style("dp-eps8", SPECS) != figures.defence_style("round:1", SPECS)
    assert "1% false alarms" in figure.axes[0].get_ylabel()


def test_inversion_grid_shows_each_digit_large_with_victims_and_reference_once():
    rows = [inversion("none", 0.5, 0.1), inversion("label_only", 0.3, 0.3)]
    figure = figures.inversion_grid(rows, [8, 8])
    names = [axis.get_ylabel() for axis in figure.axes]
    assert names == ["victims' inputs", "no-model reference", "reconstructed, none", "reconstructed, label_only"]
    renderer = figure.canvas.get_renderer()
    per_image = figure.axes[0].get_window_extent(renderer).width / 10
    assert per_image >= 60  # an 8-pixel digit drawn at least 60 pixels wide


def test_coinciding_curves_stay_visible():
    rows = [extraction(name, 0.99) for name in ("none", "round:1", "monitoring")]
    figure = figures.curves(rows, "agreement_vs_queries", SPECS)
    lines = {line.get_label().split(" (")[0]: line for line in figure.axes[0].get_lines()}
    assert lines["no defence"].get_linewidth() > 3 * lines["round:1"].get_linewidth()  # a band underneath
    assert lines["no defence"].get_zorder() < lines["round:1"].get_zorder()
    assert lines["round:1"].get_marker() != lines["monitoring"].get_marker()
    assert not np.allclose(lines["round:1"].get_xdata(), lines["monitoring"].get_xdata())  # nudged apart


def test_roc_curves_carry_their_interval():
    figure = figures.curves([membership("none", 0.08), membership("dp-eps8", 0.009, power=1.0)], "roc", SPECS)
    bands = [c for c in figure.axes[0].collections if c.get_paths()]
    assert len(bands) == 2
    assert figure.axes[0].get_xlabel().startswith("false alarms")
