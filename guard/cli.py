"""The ``guard`` command. Heavy imports (torch, benchmarks, attacks, uvicorn) happen lazily inside
each command, so ``guard --help`` stays fast and the library never imports the harness."""
from __future__ import annotations

import ipaddress
import secrets

import typer

app = typer.Typer(help="predguard: harden ML prediction APIs and measure how much each defence helps.",
                  no_args_is_help=True, add_completion=False)


@app.callback()
def root() -> None:
    """predguard: harden ML prediction APIs and measure how much each defence helps."""


def is_loopback(host: str) -> bool:
    """Whether ``host`` names only this machine (``localhost`` or a loopback address)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def require_local(host: str, allow_remote: bool) -> None:
    """Refuse to listen beyond this machine unless the user asked for it explicitly."""
    if not allow_remote and not is_loopback(host):
        raise typer.BadParameter(f"{host} is not a loopback address; pass --allow-remote to serve on it",
                                 param_hint="--host")


@app.command()
def demo(
    host: str = typer.Option("127.0.0.1", help="Interface to listen on."),
    port: int = typer.Option(8000, help="TCP port to listen on."),
    allow_remote: bool = typer.Option(False, "--allow-remote", help="Allow a non-loopback --host."),
    epochs: int = typer.Option(60, min=1, help="Training epochs for the demo model."),
) -> None:
    """Train a small MLP on scikit-learn's digits and serve it behind GuardMiddleware (round:2)."""
    require_local(host, allow_remote)
    import uvicorn

    from benchmarks import datasets, models, serving
    from guard import GuardMiddleware, Policy

    data = datasets.load("digits")
    parts = datasets.split(data, seed=0)
    model = models.train_target("mlp", data.X[parts.train], data.y[parts.train], data.n_classes, seed=0,
                                epochs=epochs)
    typer.echo(f"trained an MLP on digits: test accuracy "
               f"{models.accuracy(model, data.X[parts.test], data.y[parts.test]):.3f}")
    # One process, so a fresh secret is as stable as it needs to be (it seeds keyed noise, unused here).
    policy = Policy(secret=secrets.token_hex(16),
                    routes={"/predict": {"probabilities": "/probabilities", "features": "/features",
                                         "output": ["round:2"]}})
    server = serving.prediction_app(lambda X: models.predict_proba(model, X), data.X.shape[1])
    server.add_middleware(GuardMiddleware, policy=policy)
    example = ",".join(f"{v:.2f}".rstrip("0").rstrip(".") for v in data.X[parts.test[0]])
    typer.echo("try it:\n"
               f"  curl -s -X POST http://{host}:{port}/predict -H 'Content-Type: application/json' "
               f"-d '{{\"features\": [{example}]}}'")
    uvicorn.run(server, host=host, port=port, log_level="info")


@app.command("train-dp")
def train_dp(
    dataset: str = typer.Option(..., help="digits, breast_cancer, or a .csv/.npz file (X, y)."),
    out: str = typer.Option(..., help="Directory for model.pt and privacy_report.json."),
    target_epsilon: float = typer.Option(..., help="Privacy budget epsilon for the whole run."),
    model: str = typer.Option("mlp", help="mlp, softmax, or module:factory with "
                                          "factory(n_features, n_classes) -> torch.nn.Module."),
    epochs: int = typer.Option(10, help="Passes over the training data."),
    delta: float = typer.Option(None, help="Privacy delta; default min(1e-5, 1/(10 n))."),
    batch_size: int = typer.Option(128, help="Expected logical (Poisson) batch size."),
    physical_batch_size: int = typer.Option(None, help="Largest batch held in memory at once."),
    max_grad_norm: float = typer.Option(1.0, help="Per-example gradient clipping norm."),
    optimizer: str = typer.Option("adam", help="adam or sgd (momentum 0.9)."),
    lr: float = typer.Option(1e-2, help="Learning rate."),
    accountant: str = typer.Option("prv", help="prv or rdp."),
    grad_sample_mode: str = typer.Option(None, help="hooks, functorch, ew or ghost (default: the "
                                                    "fastest measured)."),
    fix: bool = typer.Option(True, help="Replace layers DP-SGD cannot train (e.g. BatchNorm)."),
    test_fraction: float = typer.Option(0.25, help="Held-out share for the accuracy comparison."),
    checkpoint_dir: str = typer.Option(None, help="Save a checkpoint here after every epoch."),
    resume: bool = typer.Option(False, help="Continue from --checkpoint-dir."),
    nproc: int = typer.Option(1, help="Processes (DPDDP over gloo on this machine)."),
    seed: int = typer.Option(None, help="Fix initial weights, sampling and noise seeds "
                                        "(reproducible, and the noise predictable)."),
) -> None:
    """Retrain a model with DP-SGD to a target epsilon; write the model and its privacy report."""
    import importlib

    from benchmarks import datasets, models
    from guard import dp

    data = datasets.load(dataset)
    parts = datasets.split(data, seed=0, train=1 - test_fraction, test=test_fraction)
    if seed is not None:
        import torch

        torch.manual_seed(seed)  # the model's initial weights too
    if ":" in model:
        module_name, factory = model.split(":", 1)
        network = getattr(importlib.import_module(module_name), factory)(data.n_features,
                                                                          data.n_classes)
    else:
        network = models.make_model(model, data.n_features, data.n_classes)
    options = dict(target_epsilon=target_epsilon, target_delta=delta, epochs=epochs,
                   batch_size=batch_size, physical_batch_size=physical_batch_size,
                   max_grad_norm=max_grad_norm, optimizer=optimizer, lr=lr, accountant=accountant,
                   grad_sample_mode=grad_sample_mode or dp.DEFAULT_GRAD_SAMPLE_MODE, fix=fix,
                   test_data=(data.X[parts.test], data.y[parts.test]),
                   checkpoint_dir=checkpoint_dir, resume=resume, seed=seed, progress=True)
    train = (data.X[parts.train], data.y[parts.train])
    try:
        if nproc > 1:
            trained, report = dp.train_private_distributed(nproc, network, train, **options)
        else:
            trained, report = dp.train_private(network, train, **options)
    except dp.DPConfigError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from error
    dp.save(trained, report, out)
    typer.echo(f"epsilon {report.epsilon:.3f} at delta {report.delta:.2g} ({report.accountant}, "
               f"{report.steps} steps, noise multiplier {report.noise_multiplier:.3f}); test "
               f"accuracy {report.test_accuracy:.3f} private, "
               f"{report.non_private_test_accuracy:.3f} without DP")
    typer.echo(f"wrote {out}/{dp.MODEL_FILE} and {out}/{dp.REPORT_FILE}")


@app.command()
def calibrate(
    policy: str = typer.Argument(..., help="TOML or YAML policy file; its `detectors` get the thresholds."),
    data: str = typer.Option(..., help="Benign queries: digits, breast_cancer, or a .csv/.npz file."),
    clients: int = typer.Option(10, min=1, help="Benign client streams the queries are dealt into."),
    fpr: float = typer.Option(0.001, min=0.0, max=1.0, help="Target false-positive rate."),
    detector: list[str] | None = typer.Option(None, help="Detectors to calibrate (default: prada and similarity)."),
    seed: int = typer.Option(0, help="Seed of the shuffle before dealing the queries."),
) -> None:
    """Set detector thresholds from benign data to a target false-positive rate and write them into
    the policy file (Chen, Carlini & Wagner 2019, section 4). The data set's labels stand in for
    the model's predicted labels, which an accurate model matches on natural data."""
    import asyncio
    from pathlib import Path

    import numpy as np

    from benchmarks import datasets
    from guard.monitors.calibration import calibrate as fit_thresholds
    from guard.monitors.calibration import write_policy
    from guard.policy import Policy

    configured = Policy.from_file(policy).detectors if Path(policy).exists() else {}
    dataset = datasets.load(data)
    order = np.random.default_rng(seed).permutation(len(dataset.X))
    X, y = dataset.X[order], dataset.y[order]
    streams = {f"benign-{i}": (X[i::clients], y[i::clients]) for i in range(clients)}
    settings = {name: configured.get(name, {}) for name in detector or ["prada", "similarity"]}
    thresholds = asyncio.run(fit_thresholds(streams, settings, fpr=fpr))
    write_policy(policy, thresholds)
    for name, values in thresholds.items():
        typer.echo(f"{name}: " + ", ".join(f"{key} = {value:.6g}" for key, value in values.items()))
    typer.echo(f"wrote the thresholds for {len(X)} benign queries from {clients} clients into {policy}")


def _names(values: list[str] | None, known: dict, what: str) -> tuple[str, ...] | None:
    """Comma- or repeat-separated names, checked against ``known``."""
    if not values:
        return None
    names = tuple(name for value in values for name in value.split(",") if name)
    unknown = [name for name in names if name not in known]
    if unknown:
        raise typer.BadParameter(f"unknown {what} {unknown}; choose from {sorted(known)}")
    return names


@app.command()
def bench(
    out: str = typer.Option("guard-report", help="Folder for results.json, report.md and report.html."),
    quick: bool = typer.Option(False, "--quick", help="A small grid: digits, one seed, five defences."),
    datasets: list[str] | None = typer.Option(None, help="digits, breast_cancer, faces, faces64, or .csv/.npz "
                                              "files (an NPZ X of shape (n, h, w[, c]) is kept as images)."),
    sensitive: str | None = typer.Option(None, help="The discrete sensitive column of your data (CSV header "
                                         "name or index) that attribute inference attacks."),
    max_body_bytes: int = typer.Option(1 << 20, min=1024, help="The guard's request-body limit; the attacks' "
                                       "request batches are sized to fit it."),
    hidden: int | None = typer.Option(None, min=1, help="Hidden units of the target MLP (default: the data "
                                      "set's recipe, e.g. 3000 on faces, else 64)."),
    activation: str | None = typer.Option(None, help="Hidden activation of the target MLP: relu, sigmoid, tanh."),
    lr: float | None = typer.Option(None, min=0.0, help="Learning rate of the targets (Adam)."),
    min_train_accuracy: float = typer.Option(0.8, min=0.0, max=1.0, help="Refuse a target that fits its own "
                                             "training set worse than this."),
    defences: list[str] | None = typer.Option(None, help="Defence configurations (comma-separated)."),
    attacks: list[str] | None = typer.Option(None, help="Attacks (comma-separated)."),
    seed: list[int] | None = typer.Option(None, help="Seeds (repeat the option for several)."),
    model: str | None = typer.Option(None, help="Your model: module:function(n_features, n_classes)."),
    live: bool = typer.Option(False, "--live", help="Serve each target with uvicorn on 127.0.0.1 and "
                              "attack over the socket (default: in-process ASGI transport)."),
    epochs: int | None = typer.Option(None, min=1, help="Training epochs of the target models (default: "
                                      "sized to the data)."),
    workers: int | None = typer.Option(None, min=1, help="Processes running (dataset, model, seed) groups "
                                       "side by side (default: one per CPU core)."),
    threads: int = typer.Option(1, min=1, help="Torch threads per process (the bench's small models run "
                                "fastest on one)."),
) -> None:
    """Attack undefended and defended models through the real middleware and report the difference."""
    import sys
    from dataclasses import replace
    from pathlib import Path

    from benchmarks import run
    from benchmarks.models import Underfit
    from benchmarks.scenarios import ATTACK_SPECS, DEFENCES

    config = run.BenchConfig(command=" ".join(["guard", *sys.argv[1:]]), live=live, model=model, quick=quick,
                             sensitive=sensitive, max_body_bytes=max_body_bytes, hidden=hidden,
                             activation=activation, lr=lr, min_train_accuracy=min_train_accuracy)
    if quick:
        config = replace(config, **run.QUICK)
    chosen = {"datasets": tuple(datasets) if datasets else None, "defences": _names(defences, DEFENCES, "defences"),
              "attacks": _names(attacks, ATTACK_SPECS, "attacks"), "seeds": tuple(seed) if seed else None,
              "epochs": epochs}
    config = replace(config, **{key: value for key, value in chosen.items() if value is not None})
    try:
        paths = run.run(config, Path(out), workers=workers, threads=threads)
    except (Underfit, ValueError) as error:  # an underfitting target, unusable data or options
        typer.echo(f"guard bench: {error}", err=True)
        raise typer.Exit(2) from error
    typer.echo(Path(paths["markdown"]).read_text().split("## All rows")[0])
    for kind, path in paths.items():
        typer.echo(f"{kind}: {path}")


@app.command()
def audit(
    url: str = typer.Option(..., help="The prediction endpoint, e.g. http://127.0.0.1:8000/predict."),
    data: str = typer.Option("digits", help="The attacker's data: digits, breast_cancer, or a .csv/.npz file "
                             "whose features the endpoint takes."),
    out: str = typer.Option("guard-audit", help="Folder for the report."),
    features_path: str = typer.Option("/features", help="JSON pointer to the feature rows in the request."),
    probabilities_path: str = typer.Option("/probabilities", help="JSON pointer to the answers in the response."),
    api_key: list[str] | None = typer.Option(None, help="API key(s) to send (several are rotated)."),
    budget: int | None = typer.Option(None, min=1, help="Most queries each attack may spend."),
    attacks: list[str] | None = typer.Option(None, help="Attacks (comma-separated)."),
    allow_host: list[str] | None = typer.Option(None, help="A non-loopback host you own and may attack."),
    seed: int = typer.Option(0, help="Seed of the data split and the attacks."),
) -> None:
    """Black-box attacks against a live prediction endpoint you run, with the same report as bench."""
    from pathlib import Path

    from benchmarks.audit import AUDIT_ATTACKS, AuditError
    from benchmarks.audit import audit as run_audit
    from benchmarks.scenarios import ATTACK_SPECS

    try:
        paths = run_audit(url, data, Path(out), features_path=features_path, probabilities_path=probabilities_path,
                          api_keys=tuple(api_key or ()), budget=budget,
                          attacks=_names(attacks, ATTACK_SPECS, "attacks") or AUDIT_ATTACKS, seed=seed,
                          allowed_hosts=tuple(allow_host or ()))
    except AuditError as error:
        typer.echo(f"guard audit: {error}", err=True)
        raise typer.Exit(2) from error
    for kind, path in paths.items():
        typer.echo(f"{kind}: {path}")


def main() -> None:
    """Console-script entry point (``guard``)."""
    app()
