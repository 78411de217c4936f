"""``guard audit`` against servers as people write them: a tutorial iris server (single typed rows of
named fields, label->probability answers, label-only, rate limited), and the same verdicts as
``guard bench`` gives in process for the same model."""
from __future__ import annotations

import json

import numpy as np
import pytest
from fastapi import FastAPI
from pydantic import BaseModel
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression
from typer.testing import CliRunner

from benchmarks import models
from benchmarks.audit import audit
from benchmarks.verdicts import verdicts
from benchmarks.endpoint import ISSUED_KEYS, policy
from benchmarks.scenarios import DEFENCES
from guard.serving import prediction_app
from guard import GuardMiddleware, Policy
from harness_cli import app as cli
from guard.proxy import UpstreamProxy

FIELDS = ("sepal_length", "sepal_width", "petal_length", "petal_width")
SPECIES = ("setosa", "versicolor", "virginica")


class Flower(BaseModel):
    sepal_length: float
    sepal_width: float
    petal_length: float
    petal_width: float


def iris_server(model: LogisticRegression, **route) -> FastAPI:
    """The tutorial server (one flower per request), behind the guard with ``route``'s settings."""
    app = FastAPI()

    @app.post("/predict")
    def predict(flower: Flower) -> dict:
        p = model.predict_proba(np.array([[getattr(flower, name) for name in FIELDS]]))[0]
        return {"prediction": SPECIES[int(p.argmax())], "probabilities": dict(zip(SPECIES, p.tolist()))}

    settings = {"probabilities": "/probabilities", "features": [f"/{name}" for name in FIELDS], **route}
    app.add_middleware(GuardMiddleware, policy=Policy(secret="audit test secret", routes={"/predict": settings}))
    return app


@pytest.fixture(scope="module")
def iris_csv(tmp_path_factory):
    """Iris as a user's CSV file (raw centimetres), and a model trained on those raw features."""
    iris = load_iris()
    path = tmp_path_factory.mktemp("iris") / "iris.csv"
    table = np.column_stack([iris.data, iris.target])
    np.savetxt(path, table, delimiter=",", header=",".join([*FIELDS, "species"]), comments="", fmt="%g")
    return path, LogisticRegression(max_iter=500).fit(iris.data, iris.target)


def test_audit_of_a_single_row_named_field_label_only_server(tmp_path, iris_csv):
    """One flower per request (the 422 on a batch is detected), named fields, bare label answers."""
    path, model = iris_csv
    lines = []
    server = iris_server(model, output=["label_only"])
    paths = audit("http://iris/predict", str(path), tmp_path, client=server, attacks=("copycat", "inverse-model"),
                  budget=150, features_path="", fields=FIELDS, labels=SPECIES, echo=lines.append)
    results = json.loads(paths["json"].read_text())
    copycat, inversion = results["rows"]
    assert results["config"]["batch_size"] == 1 and not results["config"]["scaled"]
    assert any("one row per request" in line for line in lines)
    assert copycat["status"] == "ok" and copycat["metrics"]["agreement_test"]["mean"] > 0.8
    assert copycat["utility"]["test_accuracy"]["mean"] > 0.9  # raw features reached the model as in the file
    assert inversion["status"] == "not-applicable" and "image" in inversion["reason"]
    assert any(line.startswith("endpoint copycat: agreement_test") for line in lines)


def test_audit_cli_warns_when_the_answers_look_like_a_feature_mismatch(tmp_path, iris_csv):
    path, model = iris_csv
    lines = []
    server = iris_server(model)
    # Scaled to [0, 1], every flower looks like the smallest setosa: one class for everything.
    audit("http://iris/predict", str(path), tmp_path, client=server, attacks=(),
          features_path="", fields=FIELDS, labels=SPECIES, scale=True, batch_size=1, echo=lines.append)
    assert any(line.startswith("warning:") and "dropping --scale" in line for line in lines)


def test_audit_cli_options_reach_the_audit(tmp_path, iris_csv):
    path, _ = iris_csv
    result = CliRunner().invoke(cli, ["audit", "--url", "http://127.0.0.1:9/predict", "--data", str(path),
                                      "--out", str(tmp_path), "--attacks", "copycat,nope"])
    assert result.exit_code == 2 and "nope" in result.output and "copycat" in result.output


def _verdict(rows: list[dict], defence: str) -> tuple[str, float, float]:
    [finding] = [f for f in verdicts(rows) if f["defence"] == defence]
    return finding["outcome"], finding["undefended"], finding["defended"]


def test_audit_gives_the_verdicts_bench_gives_in_process(tmp_path, digits, digits_split):
    """The bench's digits softmax target, served bare and behind label-only, audited over HTTP."""
    out = tmp_path / "bench"
    result = CliRunner().invoke(cli, ["bench", "--quick", "--out", str(out), "--defences", "none,label_only",
                                      "--attacks", "copycat"])
    assert result.exit_code == 0, result.output
    bench_rows = [r for r in json.loads((out / "results.json").read_text())["rows"] if r["model"] == "softmax"]
    model = models.train_target("softmax", digits.X[digits_split.train], digits.y[digits_split.train],
                                digits.n_classes, seed=0, epochs=60)
    bare = prediction_app(lambda X: models.predict_proba(model, X), digits.n_features)
    guarded = prediction_app(lambda X: models.predict_proba(model, X), digits.n_features)
    guarded.add_middleware(GuardMiddleware, policy=policy(DEFENCES["label_only"]))
    paths = audit("http://guarded/predict", "digits", tmp_path / "audit", client=guarded, attacks=("copycat",),
                  baseline="http://bare/predict", baseline_client=bare, api_keys=ISSUED_KEYS[1:3])
    audit_rows = json.loads(paths["json"].read_text())["rows"]
    bench_verdict, audit_verdict = _verdict(bench_rows, "label_only"), _verdict(audit_rows, "endpoint")
    assert bench_verdict[0] == audit_verdict[0]
    assert np.allclose(bench_verdict[1:], audit_verdict[1:], atol=0.05)


V2_PATH = "/v2/models/iris/infer"
V2_POLICY = f"""secret = "audit test secret value"
[routes."{V2_PATH}"]
probabilities = "/outputs/0/data"
probabilities_flat = true
labels = ["setosa", "versicolor", "virginica"]
features_function = "guard.payload:kserve_v2_inputs"
output = ["label_only"]
"""


def test_audit_of_mlserver_bare_and_behind_guard_proxy(tmp_path, iris_csv, mlserver):
    """KServe v2 requests written and answers read from the policy's own route: MLServer over HTTP
    undefended (the baseline), and behind the guard's proxy answering labels only."""
    url, _ = mlserver
    path, _ = iris_csv
    (tmp_path / "guard.toml").write_text(V2_POLICY)
    policy = Policy.from_file(tmp_path / "guard.toml")
    proxy = GuardMiddleware(UpstreamProxy(url), policy=policy)
    lines = []
    paths = audit(f"http://proxy{V2_PATH}", str(path), tmp_path / "report", route=policy.routes[V2_PATH],
                  example={"outputs": [{"name": "predict_proba"}]}, client=proxy, baseline=url + V2_PATH,
                  attacks=("equation-solving", "copycat"), budget=120, echo=lines.append)
    results = json.loads(paths["json"].read_text())
    rows = {(r["defence"], r["attack"]): r for r in results["rows"]}
    bare_solving, bare_copy = rows["none", "equation-solving"], rows["none", "copycat"]
    guarded_solving, guarded_copy = rows["endpoint", "equation-solving"], rows["endpoint", "copycat"]
    assert results["config"]["batch_size"] > 1  # v2 takes batches: flat tensors of n rows
    # Undefended: 15 probability answers solve the logistic regression exactly.
    assert bare_solving["status"] == "ok" and bare_solving["queries"]["mean"] <= 120
    assert bare_solving["metrics"]["agreement_test"]["mean"] > 0.95 > bare_solving["chance"]
    # Measured: 11 queries solve it (agreement 1.0); copycat 0.84 from the 37-row pool (chance 0.39).
    assert bare_copy["metrics"]["agreement_test"]["mean"] > max(0.75, bare_copy["chance"] + 0.3)
    assert bare_copy["utility"]["test_accuracy"]["mean"] > 0.9
    # Behind the guard: no probabilities to solve for; labels still train as good a copy.
    assert guarded_solving["status"] == "not-applicable" and "label" in guarded_solving["reason"]
    assert guarded_copy["status"] == "ok" and guarded_copy["metrics"]["agreement_test"]["mean"] > 0.75
    assert guarded_copy["utility"]["test_accuracy"]["mean"] > 0.9  # label-only keeps the answers right
    assert any(line.startswith("none equation-solving: agreement_test") for line in lines)


def test_audit_reads_one_hot_answers_as_labels(tmp_path, iris_csv):
    """A label-only endpoint answering one-hot vectors (issue 26): its answers are read as labels, so
    equation solving is not applicable rather than "0.921"; the verdict compares the copies on both
    sides, what clients lose follows the observed format, and the threat model is printed."""
    path, model = iris_csv

    def one_hot(X: np.ndarray) -> np.ndarray:
        return np.eye(len(SPECIES))[model.predict_proba(X).argmax(axis=1)]

    bare = prediction_app(model.predict_proba, len(FIELDS))
    labels_only = prediction_app(one_hot, len(FIELDS))
    lines = []
    paths = audit("http://labels/predict", str(path), tmp_path, client=labels_only, baseline="http://bare/predict",
                  baseline_client=bare, attacks=("equation-solving", "copycat"), budget=150, echo=lines.append)
    results = json.loads(paths["json"].read_text())
    rows = {(r["defence"], r["attack"]): r for r in results["rows"]}
    assert rows["none", "equation-solving"]["status"] == "ok"
    solving = rows["endpoint", "equation-solving"]
    assert solving["status"] == "not-applicable" and "labels only" in solving["reason"]
    assert rows["endpoint", "copycat"]["status"] == "ok"
    assert results["config"]["defence_specs"]["endpoint"]["output"] == ["label_only"]
    assert any("one-hot" in line for line in lines)
    [finding] = verdicts(results["rows"])
    assert finding["baseline_attack"] == finding["strongest_attack"] == "copycat"
    assert "equation-solving" in finding["not_run"] and finding["interval"] is not None
    markdown = paths["markdown"].read_text()
    assert "every confidence (labels only)" in markdown
    threat_models = markdown.split("## Threat models and no-model references")[1].split("##")[0]
    assert "No-model reference" in threat_models
