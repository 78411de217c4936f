"""The report's figures, drawn with matplotlib and returned as base64 PNGs for a self-contained page:
the privacy-utility trade-off of one attack family (one panel per target), ROC curves with their
Clopper-Pearson bands, extraction agreement against queries, and inversion grids that put the
victims' photos, the no-model reference and each defence's reconstructions in one mosaic."""
from __future__ import annotations

import base64
import io
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator, NullFormatter

from attacks.scoring import clopper_pearson
from benchmarks import verdicts

Row = dict[str, Any]
PANEL_SIZE = (3.3, 2.7)
"""Inches of one panel: at ``DPI`` 330 pixels wide, four side by side fit a 1400-pixel screen."""
DPI = 100
LAYOUT_PAD = 0.3
COLOURS = 64
FONT_SIZE = 7.5
LEGEND_INCHES = 2.2
"""Width beside a curve figure for its legend, so that the legend hides no line."""
MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*", "<", ">")
LINE_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan")
"""Line colours apart from the undefended grey band and the DP-SGD red."""
LINESTYLES = ("-", "--", "-.", ":")
SUCCESS_AXIS = {
    "extraction": "copy's agreement with the target",
    "membership": "members found at {fpr} false alarms (TPR)",
    "inversion": "reconstruction's gain over the no-model reference",
    "attribute": "attribute inference's gain over the no-model reference",
}
"""Plain-language y-axis of each family's trade-off: for inversion and attribute inference the
advantage over the no-model reference (0 is what the attacker has without the model)."""
ACCURACY_AXIS = "accuracy of the answers clients get"


def encode(figure, tight: bool = True) -> str:
    """The figure as a base64 PNG of at most ``COLOURS`` colours (a third of the bytes of a full-colour
    one, and the page stays small), closed afterwards; ``tight=False`` keeps hand-placed axes."""
    from PIL import Image

    drawn, buffer = io.BytesIO(), io.BytesIO()
    if tight:
        figure.set_layout_engine("tight", pad=LAYOUT_PAD)
    figure.savefig(drawn, format="png", dpi=DPI)
    plt.close(figure)
    image = Image.open(drawn).convert("RGB")
    image.quantize(colors=COLOURS, method=Image.Quantize.MEDIANCUT).save(buffer, format="png", optimize=True)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def defence_label(defence: str, specs: dict[str, Any]) -> str:
    """How a point or line of ``defence`` is named: DP-SGD rows by their epsilon, the undefended one in words."""
    epsilon = specs.get(defence, {}).get("dp_epsilon")
    if epsilon is not None:
        return f"DP-SGD ε={epsilon:g}"
    return "no defence" if defence == "none" else defence


def defence_style(defence: str, specs: dict[str, Any]) -> dict[str, Any]:
    """Marker and colour of a defence: black circle undefended, red diamond DP-SGD, orange triangle
    monitoring, blue square an output defence, so that kinds stay apart in every figure."""
    spec = specs.get(defence, {})
    if defence == "none":
        return {"marker": "o", "color": "black"}
    if spec.get("dp_epsilon") is not None or defence.startswith("dp-"):
        return {"marker": "D", "color": "tab:red"}
    if spec.get("monitoring"):
        return {"marker": "^", "color": "tab:orange"}
    return {"marker": "s", "color": "tab:blue"}


def success_axis(row: Row) -> str:
    text = SUCCESS_AXIS.get(row["family"], row["primary"])
    fpr = row["primary"].removeprefix("tpr_at_").removesuffix("_fpr").replace("pct", "%")
    return text.format(fpr=fpr)


def measured(row: Row) -> tuple[float, float, float]:
    """A row's plotted success with its error bar ``(value, below, above)``: the advantage over the
    no-model reference (inversion, attribute) or the success measure, with the verdicts' 95% interval
    of that value (``verdicts.interval``) where the row has one, else the seeds' standard deviation."""
    referenced = row["family"] in verdicts.REFERENCED_FAMILIES
    value = verdicts.advantage(row) if referenced else row["metrics"][row["primary"]]["mean"]
    bounds = verdicts.interval(row)
    if bounds is not None:
        return value, max(value - bounds[0], 0.0), max(bounds[1] - value, 0.0)
    spread = ((row["metrics"].get(f"advantage_{row['primary']}") if referenced else None)
              or row["metrics"][row["primary"]])["std"] or 0.0
    return value, spread, spread


def tradeoff(rows: list[Row], specs: dict[str, Any]):
    """One attack family: per target (dataset, model) a panel of the strongest attack's success against
    each defence over the accuracy of the defended answers, each point labelled with its defence."""
    targets = verdicts.group([r for r in rows if r["status"] == "ok"], ("dataset", "model"))
    figure, axes = plt.subplots(1, max(len(targets), 1), squeeze=False,
                                figsize=(PANEL_SIZE[0] * max(len(targets), 1), PANEL_SIZE[1]))
    placements = []
    for ((dataset, model), members), axis in zip(targets.items(), axes[0]):
        strongest = [verdicts.strongest(group) for group in verdicts.group(members, ("defence",)).values()]
        strongest = [r for r in strongest if r is not None]
        points = [(r, r["utility"]["test_accuracy"]["mean"], *measured(r)) for r in strongest]
        for r, x, y, below, above in points:
            style = defence_style(r["defence"], specs)
            undefended = r["defence"] == "none"  # a hollow ring on top: a point under it stays visible
            bar = [[below], [above]] if below or above else None  # no cap drawn across a point without spread
            axis.errorbar([x], [y], yerr=bar, markersize=9 if undefended else 6, linestyle="none",
                          capsize=2, elinewidth=0.8, markerfacecolor="none" if undefended else style["color"],
                          markeredgewidth=1.4 if undefended else 1.0, zorder=4 if undefended else 3, **style)
        first = strongest[0]
        referenced = first["family"] in verdicts.REFERENCED_FAMILIES
        axis.axhline(0.0 if referenced else first["chance"], color="0.4", linestyle=":", linewidth=1.0)
        axis.annotate("no-model reference" if referenced else "chance", (1.0, 0.0 if referenced else first["chance"]),
                      xycoords=("axes fraction", "data"), xytext=(-2, 2), textcoords="offset points",
                      ha="right", va="bottom", fontsize=FONT_SIZE - 1, color="0.3")
        axis.set_title(f"{first['family']}: {dataset} · {model}", fontsize=FONT_SIZE + 1)
        axis.set_xlabel(ACCURACY_AXIS, fontsize=FONT_SIZE)
        axis.set_ylabel(success_axis(first), fontsize=FONT_SIZE)
        axis.tick_params(labelsize=FONT_SIZE - 1)
        axis.xaxis.set_major_locator(MaxNLocator(5))
        axis.margins(0.25, 0.2)
        placements.append((axis, [defence_label(r["defence"], specs) for r, *_ in points],
                           [p[1] for p in points], [p[2] for p in points]))
    figure.tight_layout(pad=LAYOUT_PAD)  # the axes where they will be drawn, before measuring labels
    for axis, labels, xs, ys in placements:
        place_labels(figure, axis, labels, xs, ys)
    return figure


LABEL_OFFSETS = tuple((round(r * np.cos(angle)), round(r * np.sin(angle))) for r in (6, 14, 24, 36, 50, 66)
                      for angle in np.deg2rad([45, -45, 135, -135, 0, 180, 90, -90, 20, -20, 160, -160]))
"""Where a label may go, in points from its point: nearest first, twelve directions per distance."""


def place_labels(figure, axes, labels: list[str], xs: list[float], ys: list[float]) -> None:
    """Annotate each point with its label at the first offset (nearest first) where the label stays
    inside the axes and overlaps no label placed before and no point, else where it clashes least;
    a leader line joins a label set far from its point. DP-SGD labels are bold."""
    renderer = figure.canvas.get_renderer()
    axes.autoscale_view()
    points = axes.transData.transform(np.column_stack([xs, ys])) if labels else np.empty((0, 2))
    frame = axes.get_window_extent(renderer)
    placed = []

    def annotate(label: str, x: float, y: float, offset: tuple[int, int], **options):
        return axes.annotate(label, (x, y), xytext=offset, textcoords="offset points", fontsize=FONT_SIZE - 1,
                             ha="left" if offset[0] >= 0 else "right", va="bottom" if offset[1] >= 0 else "top",
                             fontweight="bold" if label.startswith("DP-SGD") else "normal", **options)

    for label, x, y in zip(labels, xs, ys):
        best: tuple[int, tuple[int, int]] | None = None
        for offset in LABEL_OFFSETS:
            trial = annotate(label, x, y, offset)
            box = trial.get_window_extent(renderer).padded(1)
            trial.remove()
            outside = not (frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1)
            clashes = (sum(box.overlaps(other) for other in placed) + int(box.count_contains(points) > 0)
                       + 2 * int(outside))
            if best is None or clashes < best[0]:
                best = (clashes, offset)
            if clashes == 0:
                break
        offset = best[1]
        far = max(abs(offset[0]), abs(offset[1])) > LABEL_OFFSETS[0][0]
        text = annotate(label, x, y, offset,
                        arrowprops={"arrowstyle": "-", "linewidth": 0.5, "color": "0.5"} if far else None)
        placed.append(text.get_window_extent(renderer).padded(1))


def curves(rows: list[Row], curve: str, specs: dict[str, Any]):
    """The strongest attack's curve per defence: the ROC (log axes, a 95% Clopper-Pearson band on the
    TPR of each point over the members of the seed it was drawn from) or the extraction copy's
    agreement against queries. The undefended curve is a wide grey band underneath; every other line
    has its own marker and dash, markers staggered along the line, and agreement curves are nudged
    apart by a few percent of their queries, so that lines lying on one another stay visible."""
    figure, axes = plt.subplots(figsize=(PANEL_SIZE[0] + LEGEND_INCHES, PANEL_SIZE[1]))
    ordered = sorted(rows, key=lambda row: row["defence"] != "none")
    roc = curve == "roc"
    for i, row in enumerate(ordered):
        x, y = (np.asarray(row["curves"][curve][k], dtype=float) for k in ("x", "y"))
        label = f"{defence_label(row['defence'], specs)} ({row['attack']})"
        style = defence_style(row["defence"], specs)
        color = style["color"] if style["color"] in ("black", "tab:red") else LINE_COLOURS[i % len(LINE_COLOURS)]
        if roc and "members" in row["metrics"]:
            members = int(row["metrics"]["members"]["values"][0])
            low, high = np.array([clopper_pearson(rate * members, members) for rate in y]).T
            axes.fill_between(x, np.maximum(low, 1e-3), high, color=color, alpha=0.1, linewidth=0)
        if row["defence"] == "none":
            axes.plot(x, y, label=label, color="black", alpha=0.35, linewidth=5, solid_capstyle="round", zorder=1)
            continue
        if not roc:
            x = x * 1.04 ** (i - len(ordered) / 2)  # a few percent apart on the log axis
        axes.plot(x, y, label=label, color=color, linewidth=1.2, linestyle=LINESTYLES[i % len(LINESTYLES)],
                  marker=MARKERS[i % len(MARKERS)], markersize=4 if roc else 5, fillstyle="none", zorder=2,
                  markevery=(0.1 * i / len(ordered), 0.1) if roc else 1)
    axes.set_xscale("log")
    if roc:
        axes.set_yscale("log")
        axes.plot([1e-4, 1], [1e-4, 1], color="0.4", linestyle=":", linewidth=1.0, label="chance (guessing)")
        axes.set_xlim(1e-3, 1)
        axes.set_ylim(1e-3, 1)
        axes.set_xlabel("false alarms: non-members flagged (FPR)", fontsize=FONT_SIZE)
        axes.set_ylabel("members found (TPR)", fontsize=FONT_SIZE)
    else:
        axes.set_xlabel("queries the attacker sent (log scale)", fontsize=FONT_SIZE)
        axes.set_ylabel("copy's agreement with the target", fontsize=FONT_SIZE)
    axes.tick_params(labelsize=FONT_SIZE - 1)
    axes.xaxis.set_minor_formatter(NullFormatter())  # powers of ten only: no crowded minor labels
    axes.legend(fontsize=FONT_SIZE - 1, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    return figure


GRID_WIDTH = 9.0
"""Inches of an inversion grid's images, at most (one image at most ``CELL_INCHES`` wide)."""
CELL_INCHES = 0.8
LABEL_INCHES = 2.2


def inversion_grid(rows: list[Row], image_shape: list[int] | None = None):
    """One attack's images on one target as one mosaic per line: the images the attack put beside its
    reconstructions (the victims' photos, the no-model reference), once, then each defence's
    reconstructions, every line named on its left, each image large enough to recognise (at least
    ``CELL_INCHES`` wide, up to ten to a line)."""
    named, seen = [], set()
    for r in rows:
        for name, images in sorted(r["images"].items(), key=lambda item: item[0] == "reconstructions"):
            array = np.asarray(images, dtype=float)
            if name != "reconstructions" and array.tobytes() in seen:
                continue
            seen.add(array.tobytes())
            named.append((f"reconstructed, {r['defence']}" if name == "reconstructions" else name, array))
    side = round(np.sqrt(named[0][1].shape[1]))
    shape = tuple(image_shape) if image_shape else (side, side)
    columns = max(len(images) for _, images in named)
    cell = min(CELL_INCHES, GRID_WIDTH / columns)
    gap = max(1, shape[1] // 16)
    width = columns * (shape[1] + gap) - gap
    line_height = cell * shape[0] / shape[1]
    figure = plt.figure(figsize=(LABEL_INCHES + columns * cell, len(named) * (line_height + 0.08) + 0.1))
    for i, (title, images) in enumerate(named):
        bottom = 1 - (i + 1) * (line_height + 0.08) / figure.get_figheight()
        axis = figure.add_axes((LABEL_INCHES / figure.get_figwidth(), bottom,
                                columns * cell / figure.get_figwidth(), line_height / figure.get_figheight()))
        mosaic = np.ones((shape[0], width) + shape[2:])
        for column, image in enumerate(images):
            left = column * (shape[1] + gap)
            mosaic[:, left:left + shape[1]] = np.clip(image.reshape(shape), 0, 1)
        axis.imshow(mosaic, cmap="gray", vmin=0, vmax=1, interpolation="nearest", aspect="auto")
        axis.set_xticks([])
        axis.set_yticks([])
        for spine in axis.spines.values():
            spine.set_visible(False)
        axis.set_ylabel(title, rotation=0, ha="right", va="center", fontsize=FONT_SIZE + 1, labelpad=6)
    return figure

