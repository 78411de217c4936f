"""The reports as a reader sees them in headless Chromium: no Markdown syntax on the page, every image
loads, nothing is requested from outside the file, and the summary and the first privacy-utility
figure are on the first 1400x1000 screen; for a bench report (constructed rows) and a real
``guard audit`` report."""
from __future__ import annotations

import json

import pytest
from browser import WINDOW, external_references, markdown_leaks, open_page, png_size, screenshot
from fastapi import FastAPI
from report_rows import config, rows
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression

from benchmarks import report
from benchmarks.audit import audit
from guard import GuardMiddleware, Policy


def assert_reads_well(page, tmp_path, first_screen: bool = True) -> dict:
    seen = open_page(page, tmp_path)
    width, height = seen["viewport"]  # the window less the browser's own frame
    assert width == WINDOW[0] and height <= WINDOW[1]
    assert markdown_leaks(seen["text"]) == []
    assert seen["images"] and all(i["complete"] and i["width"] > 0 for i in seen["images"]), seen["images"]
    assert len(seen["images"]) == page.read_text().count("<img ")
    assert seen["resources"] == [] and external_references(seen["dom"]) == []
    if first_screen:
        assert 0 <= seen["summary"]["top"] and seen["summary"]["bottom"] <= height
        assert seen["tradeoff"]["top"] < height - 150  # at least the figure's upper part
    return seen


def test_bench_report_reads_in_a_browser(tmp_path):
    paths = report.write(tmp_path / "out", config(), rows())
    seen = assert_reads_well(paths["html"], tmp_path)
    assert "turn on dp-eps8" in seen["text"]  # the what-to-do sentences
    assert seen["summary"]["bottom"] < seen["tradeoff"]["top"]
    assert png_size(screenshot(paths["html"], tmp_path / "first-screen.png")) == WINDOW


def test_the_checks_catch_what_they_look_for():
    for leak in ("- **attribute**: x", "run `guard bench`", "## Verdict", "| a |\n|---|", "[docs](docs/report.md)"):
        assert markdown_leaks(f"text\n{leak}\nmore text"), leak
    assert markdown_leaks("TPR 0.041 [0.029, 0.056] (n=1); round:1 * 2 - 1 # of rows") == []
    assert external_references("<img src='https://cdn.example/x.png'><a href='#top'></a>"
                               "<div style='background:url(http://x/y.png)'>") == [
        "https://cdn.example/x.png", "http://x/y.png"]


def iris_server(model: LogisticRegression, guarded: bool) -> FastAPI:
    """Rows of four features in, probabilities out; ``guarded``: behind the guard with ``label_only``."""
    app = FastAPI()

    @app.post("/predict")
    def predict(body: dict) -> dict:
        return {"probabilities": model.predict_proba(body["features"]).tolist()}

    if guarded:
        policy = Policy(secret="browser test secret", routes={"/predict": {
            "probabilities": "/probabilities", "features": "/features", "output": ["label_only"]}})
        app.add_middleware(GuardMiddleware, policy=policy)
    return app


@pytest.fixture(scope="module")
def iris_csv(tmp_path_factory):
    iris = load_iris()
    path = tmp_path_factory.mktemp("iris") / "iris.csv"
    path.write_text("a,b,c,d,species\n" + "\n".join(",".join(f"{v:g}" for v in [*x, y])
                                                   for x, y in zip(iris.data, iris.target)))
    return path, LogisticRegression(max_iter=500).fit(iris.data, iris.target)


def test_audit_report_reads_in_a_browser(tmp_path, iris_csv):
    path, model = iris_csv
    paths = audit("http://iris/predict", str(path), tmp_path / "out", client=iris_server(model, guarded=True),
                  baseline="http://bare/predict", baseline_client=iris_server(model, guarded=False),
                  attacks=("copycat", "equation-solving"), budget=100, labels=("0", "1", "2"))
    statuses = {(r["defence"], r["attack"]): r["status"] for r in json.loads(paths["json"].read_text())["rows"]}
    assert statuses == {("none", "copycat"): "ok", ("none", "equation-solving"): "ok",
                        ("endpoint", "copycat"): "ok", ("endpoint", "equation-solving"): "not-applicable"}
    seen = assert_reads_well(paths["html"], tmp_path)
    assert "extraction" in seen["text"] and "endpoint" in seen["text"]
