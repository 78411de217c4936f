"""The ``guard`` command: the runtime commands (``proxy``, ``monitor``, ``calibrate``, ``train-dp``,
``demo``, ``watermarks export``), and those installed packages register under the ``predguard.commands`` entry-point group
(the harness's ``bench`` and ``audit``). Heavy imports (torch, uvicorn) happen inside each command,
so ``guard --help`` stays fast."""
from __future__ import annotations

import ipaddress
import secrets
from importlib.metadata import entry_points

import typer

from guard.cli_options import ListsChoices, Names, split_names

COMMANDS = "predguard.commands"
"""The entry-point group of functions ``register(app)`` that add commands to the ``guard`` command."""

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


def uvicorn_log_config() -> dict:
    """Uvicorn's default logging, with the ``guard`` logger's lines (refusals, failures) shown beside
    its own. Pass it as ``uvicorn.run(..., log_config=...)`` (or write it to a file for
    ``uvicorn --log-config``)."""
    import copy

    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["loggers"]["guard"] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    return config


@app.command()
def proxy(
    upstream: str = typer.Option(..., help="The model server to guard, e.g. http://127.0.0.1:8080."),
    policy: str = typer.Option(..., help="TOML or YAML policy file; its routes are the upstream's paths."),
    host: str = typer.Option("127.0.0.1", help="Interface to listen on."),
    port: int = typer.Option(8000, help="TCP port to listen on."),
    allow_remote: bool = typer.Option(False, "--allow-remote", help="Allow a non-loopback --host."),
    timeout: float = typer.Option(30.0, min=0.001, help="Seconds the upstream may take to answer (then 504)."),
    connect_timeout: float = typer.Option(5.0, min=0.001, help="Seconds to connect to the upstream (then 502)."),
    max_connections: int = typer.Option(100, min=1, help="Pooled connections to the upstream."),
) -> None:
    """Guard any HTTP model server: a reverse proxy to --upstream behind GuardMiddleware."""
    require_local(host, allow_remote)
    import uvicorn

    from guard import GuardMiddleware, Policy
    from guard.proxy import UpstreamProxy

    try:
        forward = UpstreamProxy(upstream, timeout=timeout, connect_timeout=connect_timeout,
                                max_connections=max_connections)
        rules = Policy.from_file(policy)
        guarded = GuardMiddleware(forward, policy=rules)
    except (ValueError, OSError) as error:
        typer.echo(f"guard proxy: {error}", err=True)
        raise typer.Exit(2) from error
    typer.echo(f"guarding {upstream} ({len(rules.routes)} routes) on http://{host}:{port}")
    # The lifespan on: a guard that cannot start stops the server with its reason, never serves without it.
    uvicorn.run(guarded, host=host, port=port, lifespan="on", log_config=uvicorn_log_config())


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

    from guard import GuardMiddleware, Policy, models, serving
    from guard import data as datasets

    data = datasets.load("digits")
    parts = datasets.split(data, seed=0)
    typer.echo(f"training an MLP on digits ({len(parts.train)} images, {epochs} epochs)...")
    model = models.train_target("mlp", data.X[parts.train],
                                data.y[parts.train], data.n_classes, seed=0, epochs=epochs)
    typer.echo(f"trained: test accuracy {models.accuracy(model, data.X[parts.test], data.y[parts.test]):.3f}")
    # One process, so a fresh secret is as stable as it needs to be (it seeds keyed noise, unused here).
    policy = Policy(secret=secrets.token_hex(16),
                    routes={"/predict": {"probabilities": "/probabilities", "features": "/features",
                                         "output": ["round:2"]}})
    server = serving.prediction_app(lambda X: models.predict_proba(model, X), data.X.shape[1])
    server.add_middleware(GuardMiddleware, policy=policy)
    # The least confident test image: its answer shows what rounding removes.
    X_test = data.X[parts.test]
    raw = models.predict_proba(model, X_test)
    row = int(raw.max(axis=1).argmin())
    example = ",".join(f"{v:.6g}" for v in X_test[row])
    typer.echo("the model's own answer for the example below:  " + ", ".join(f"{p:.5f}" for p in raw[row]))
    typer.echo("what the guard sends (round:2):                  " + ", ".join(f"{p:.2f}" for p in raw[row].round(2)))
    typer.echo("try it:\n"
               f"  curl -s -X POST http://{host}:{port}/predict -H 'Content-Type: application/json' "
               f"-d '{{\"features\": [{example}]}}'")
    uvicorn.run(server, host=host, port=port, log_config=uvicorn_log_config())


@app.command("train-dp", cls=ListsChoices)
def train_dp(
    data: str = typer.Option(..., help="digits, breast_cancer, or a .csv (numeric, "
                             "header row, label last) / .npz (arrays X, y) file."),
    out: str = typer.Option(..., help="Directory for model.pt, privacy_report.json and preprocessing.json."),
    target_epsilon: float = typer.Option(..., help="Privacy budget epsilon for the whole run."),
    model: str = typer.Option("mlp", help="mlp, softmax, or module:factory with "
                                          "factory(n_features, n_classes) -> torch.nn.Module."),
    epochs: int = typer.Option(None, help="Passes over the training data (default: guard.dp.DP_RECIPE's)."),
    delta: float = typer.Option(None, help="Privacy delta; default min(1e-5, 1/(10 n))."),
    batch_size: int = typer.Option(None, help="Expected logical (Poisson) batch size (default: "
                                   "guard.dp.DP_RECIPE's, sized to the data)."),
    physical_batch_size: int = typer.Option(None, help="Largest batch held in memory at once."),
    max_grad_norm: float = typer.Option(None, help="Per-example gradient clipping norm (default: "
                                        "guard.dp.DP_RECIPE's)."),
    optimizer: str = typer.Option("adam", parser=Names("guard.dp.checks:OPTIMISERS"),
                                  help="Optimizer (sgd with momentum 0.9)."),
    lr: float = typer.Option(None, help="Learning rate (default: guard.dp.DP_RECIPE's)."),
    accountant: str = typer.Option("prv", parser=Names("guard.dp.checks:ACCOUNTANTS"),
                                   help="Privacy accountant."),
    grad_sample_mode: str = typer.Option(None, parser=Names("guard.dp.checks:GRAD_SAMPLE_MODES"),
                                         help="Opacus per-sample gradient mode (default: the fastest "
                                         "measured)."),
    fix: bool = typer.Option(True, help="Replace layers DP-SGD cannot train (e.g. BatchNorm)."),
    test_fraction: float = typer.Option(0.25, help="Held-out share for the accuracy comparison."),
    checkpoint_dir: str = typer.Option(None, help="Save a checkpoint here after every epoch."),
    resume: bool = typer.Option(False, help="Continue from --checkpoint-dir."),
    nproc: int = typer.Option(1, help="Processes (DPDDP over gloo on this machine)."),
    seed: int = typer.Option(None, help="Fix initial weights, sampling and noise seeds "
                                        "(reproducible, and the noise predictable)."),
    public: str = typer.Option(None, help="Public data to pretrain on without privacy before DP-SGD (a file "
                               "like --data, same columns and labels): every row of it may leak, the "
                               "guarantee covers --data only."),
    audit: bool = typer.Option(False, help="Audit the run: one more training run with canaries gives an "
                               "empirical lower bound on epsilon, reported beside the accountant's."),
    audit_canaries: str = typer.Option("gradient", parser=Names("guard.dp.audit:CANARY_KINDS"),
                                       help="gradient (white-box, the auditor has the weights) or input "
                                       "(mislabelled rows, scored by the model's predictions)."),
) -> None:
    """Retrain a model with DP-SGD to a target epsilon; write the model, its privacy report and the
    data's preprocessing (min-max scaling, label mapping), which ``guard.dp.load(out, factory)``
    applies so the loaded model predicts on features as they are in the file."""
    import functools

    import numpy as np

    from guard import data as datasets
    from guard import dp, models
    from guard.references import import_function

    def fail(error: BaseException) -> typer.Exit:
        typer.echo(f"guard train-dp: {error}", err=True)
        return typer.Exit(2)

    try:
        dataset = datasets.load(data)
        if seed is not None:
            import torch

            torch.manual_seed(seed)  # the model's initial weights too
        factory = import_function(model) if ":" in model else functools.partial(models.make_model, model)
        network = models.model_from(factory, dataset.n_features, dataset.n_classes)
        public_data = None if public is None else datasets.rows_like(dataset, datasets.load(public))
    except (ValueError, OSError, ImportError, KeyError, TypeError) as error:
        raise fail(error) from error
    parts = datasets.split(dataset, seed=0, train=1 - test_fraction, test=test_fraction)
    if dataset.classes != tuple(range(dataset.n_classes)):
        typer.echo("labels mapped to class indices: " + ", ".join(
            f"{label} -> {index}" for index, label in enumerate(dataset.classes)))
    train = (dataset.X[parts.train], dataset.y[parts.train])
    if public_data is not None:
        shared = _shared_rows(train[0], public_data[0])
        if shared:
            typer.echo(f"warning: {shared} of the {len(train[0])} private training rows are also in --public: "
                       "the model learns them without privacy", err=True)
    chosen = dict(epochs=epochs, batch_size=batch_size, max_grad_norm=max_grad_norm, lr=lr)
    recipe = {**dp.DP_RECIPE.options(len(train[0])), **{k: v for k, v in chosen.items() if v is not None}}
    options = dict(target_epsilon=target_epsilon, target_delta=delta, **recipe,
                   physical_batch_size=physical_batch_size, optimizer=optimizer, accountant=accountant,
                   grad_sample_mode=grad_sample_mode or dp.DEFAULT_GRAD_SAMPLE_MODE, fix=fix,
                   test_data=(dataset.X[parts.test], dataset.y[parts.test]),
                   checkpoint_dir=checkpoint_dir, resume=resume, seed=seed, progress=True,
                   public_data=public_data)
    try:
        if nproc > 1:
            trained, report = dp.train_private_distributed(nproc, network, train, **options)
        else:
            trained, report = dp.train_private(network, train, **options)
        if audit:
            from guard.dp import audit as dp_audit

            report.audit = dp_audit.audit(network, train, kind=audit_canaries, **options).as_dict()
    except dp.DPConfigError as error:
        raise fail(error) from error
    report.classes = list(dataset.classes)
    box = [np.broadcast_to(bound, (dataset.n_features,)).tolist() for bound in (dataset.low, dataset.high)]
    dp.save(trained, report, out, dp.Preprocessing(*box, list(dataset.classes)))
    typer.echo(f"epsilon {report.epsilon:.3f} at delta {report.delta:.2g} ({report.accountant}, "
               f"{report.steps} steps, noise multiplier {report.noise_multiplier:.3f}); test "
               f"accuracy {report.test_accuracy:.3f} private, "
               f"{report.non_private_test_accuracy:.3f} without DP"
               + (f" (both pretrained on {report.public_rows} public rows, which alone give "
                  f"{report.public_only_test_accuracy:.3f})" if report.public_rows else ""))
    if report.public_rows and report.test_accuracy <= report.public_only_test_accuracy:
        typer.echo("note: the private rows add no test accuracy at this epsilon: the model pretrained on the "
                   "public rows alone is as accurate, without touching private data")
    for notice in report.notices:
        typer.echo(f"note: {notice}")
    if report.audit is not None:
        typer.echo(report.audit_summary())
    module, build = ("guard.models", f"guard.models.make_model({model!r}, ") if ":" not in model else (
        model.split(":")[0], model.replace(":", ".") + "(")
    typer.echo(f"wrote {out}/{dp.MODEL_FILE}, {out}/{dp.REPORT_FILE} and {out}/{dp.PREPROCESSING_FILE}; serve "
               f"it from Python (predict_proba takes rows of {dataset.n_features} features as they are in {data}):\n"
               f"  import guard.dp, {module}\n"
               f"  served = guard.dp.load({out!r}, lambda: {build}{dataset.n_features}, {dataset.n_classes}))\n"
               f"  served.predict_proba(X)  # or served.predict(X): the labels as in {data}")


def _shared_rows(private, public) -> int:
    """How many rows of ``private`` also appear in ``public``: equal features to 4 decimals of the
    scaled [0, 1] units (a public file's rows are rescaled through the private data's box)."""
    import numpy as np

    seen = {row.tobytes() for row in np.round(public, 4)}
    return sum(row.tobytes() in seen for row in np.round(private, 4))


@app.command(cls=ListsChoices)
def calibrate(
    policy: str = typer.Argument(..., help="TOML or YAML policy file; its `detectors` get the thresholds."),
    data: str = typer.Option(..., help="Benign queries: digits, breast_cancer, or a .csv/.npz file."),
    clients: int = typer.Option(10, min=1, help="Benign client streams the queries are dealt into (at least 2: "
                                "some are always held out)."),
    fpr: float = typer.Option(0.001, min=0.0, max=1.0, help="Target false-positive rate (per client for "
                              "prada, per query for similarity)."),
    detector: list[str] | None = typer.Option(None, parser=Names("guard.detectors:DETECTORS", several=True),
                                              help="Detectors to calibrate (default: all)."),
    holdout: float = typer.Option(0.25, min=0.05, max=0.9, help="Share of the clients (at least one) held out "
                                  "to measure the false alarms the thresholds cause."),
    scale: bool | None = typer.Option(None, "--scale/--no-scale", help="Calibrate on features scaled to [0, 1] "
                                      "(default: scaled for digits and breast_cancer, as the demo serves them; "
                                      "a file's as they are in it, as clients send them)."),
    force: bool = typer.Option(False, "--force", help="Write thresholds the data cannot support."),
    seed: int = typer.Option(0, help="Seed of the shuffle before dealing the queries."),
) -> None:
    """Set detector thresholds from benign data to a target false-positive rate and write them into
    the policy file, keeping its comments (Chen, Carlini & Wagner 2019, section 4). The data set's
    labels stand in for the model's predicted labels, which an accurate model matches on natural
    data. Some clients are always held out and replayed with the new thresholds, and their false
    alarms shown beside the rate expected on fresh benign clients. Data too small for the target rate
    is refused."""
    import asyncio
    from pathlib import Path

    from guard import data as datasets
    from guard.detectors.calibration import (adequacy, deal, expected_false_alarms, false_alarms, hold_out,
                                             write_policy)
    from guard.detectors.calibration import calibrate as fit_thresholds
    from guard.policy import Policy

    names = split_names(detector) or ("prada", "similarity")
    if clients < 2:
        typer.echo("guard calibrate: one client stream leaves none to hold out, and thresholds set on a single "
                   "client have no margin for any other; use --clients 2 or more (nothing written)", err=True)
        raise typer.Exit(2)
    try:
        configured = Policy.from_file(policy).detectors if Path(policy).exists() else {}
        dataset = datasets.load(data)
    except (ValueError, OSError) as error:
        typer.echo(f"guard calibrate: {error}", err=True)
        raise typer.Exit(2) from error
    served = dataset.X if (data in datasets.BUNDLED if scale is None else scale) else dataset.raw(dataset.X)
    fitting, held_out = hold_out(deal(served, dataset.y, clients, seed), holdout)
    settings = {name: configured.get(name, {}) for name in names}
    errors = adequacy(fitting, settings, fpr)
    for line in errors:
        typer.echo(f"{'warning' if force else 'error'}: {line}", err=True)
    if errors and not force:
        typer.echo(f"guard calibrate: {len(dataset.X)} benign queries in {clients} clients ({len(held_out)} held out) "
                   "cannot support these thresholds; nothing written (--force writes them anyway)", err=True)
        raise typer.Exit(2)
    thresholds = asyncio.run(fit_thresholds(fitting, settings, fpr=fpr))
    write_policy(policy, thresholds)
    for name, values in thresholds.items():
        typer.echo(f"{name}: " + ", ".join(f"{key} = {value:.6g}" for key, value in values.items()))
    queries = sum(len(f) for f, _ in fitting.values())
    typer.echo(f"wrote the thresholds for {queries} benign queries from {len(fitting)} clients into {policy}")
    rates = asyncio.run(false_alarms(held_out, {n: {**settings[n], **thresholds[n]} for n in names}))
    for name, rate in rates.items():
        unit, count = ("clients", len(fitting)) if name == "prada" else ("queries", queries)
        typer.echo(f"{name}: expected false-alarm rate {expected_false_alarms(count, fpr):.2%} of fresh benign "
                   f"{unit} (target {fpr:g}); on {len(held_out)} held-out benign clients {rate['clients']:.1%} "
                   f"of clients and {rate['queries']:.2%} of queries alarmed")


@app.command()
def monitor(
    policy: str = typer.Option(..., help="TOML or YAML policy with a Redis store and monitor.deployment = "
                               "'streams'."),
    name: str = typer.Option(None, help="This monitor's consumer name (default: host, pid and a random tag)."),
) -> None:
    """Judge the observations web workers append to Redis Streams, with the policy's detectors, as
    one of any number of monitor processes (each takes a share of the client partitions; a dead
    one's partitions and pending observations pass to the others). Runs until SIGINT or SIGTERM."""
    import asyncio
    import signal

    from guard.monitoring.stream import StreamMonitor
    from guard.policy import Policy

    settings = Policy.from_file(policy)
    if settings.monitor.deployment != "streams":
        raise typer.BadParameter("the policy's monitor.deployment is not 'streams'", param_hint="--policy")

    async def serve() -> None:
        stop = asyncio.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(signum, stop.set)
        consumer = StreamMonitor(settings, name)
        typer.echo(f"guard monitor {consumer.name}: judging {settings.monitor.partitions} partitions "
                   f"with {', '.join(settings.detectors) or 'no detectors'}")
        await consumer.run(stop)

    asyncio.run(serve())


watermarks = typer.Typer(help="The watermark defence's records (DAWN), for `guard verify`.",
                         no_args_is_help=True)
app.add_typer(watermarks, name="watermarks")


@watermarks.command("export")
def export_watermarks(
    store: str = typer.Option(..., help="The policy's state store: redis://host:port/db (a memory:// store's "
                              "records live in the server process: GuardMiddleware.monitoring.watermarks)."),
    out: str = typer.Option(..., help="File to write, as JSON lines (one record an object)."),
    prefix: str = typer.Option("predguard:", help="The store's key prefix."),
) -> None:
    """Write every client's watermark and control records from the store to a file."""
    import asyncio

    from guard.policy import WatermarkRecordsPolicy
    from guard.watermarks import RedisRecords, write_lines

    if store.startswith("memory:"):
        raise typer.BadParameter("a memory:// store lives inside the server; export from a Redis store",
                                 param_hint="--store")

    async def export() -> list:
        bounds = WatermarkRecordsPolicy()
        records = RedisRecords(store, bounds.per_client, bounds.retention, prefix=prefix, timeout=30.0)
        try:
            return await records.export()
        finally:
            await records.close()

    found = asyncio.run(export())
    write_lines(found, out)
    kinds = {kind: sum(record.kind == kind for record in found) for kind in ("watermark", "control")}
    typer.echo(f"wrote {kinds['watermark']} watermark and {kinds['control']} control records of "
               f"{len({record.client for record in found})} clients to {out}")


def add_commands(app: typer.Typer) -> None:
    """Add the commands every installed package registers under the ``COMMANDS`` entry-point group."""
    for entry_point in entry_points(group=COMMANDS):
        entry_point.load()(app)


add_commands(app)


def main() -> None:
    """Console-script entry point (``guard``)."""
    app()


if __name__ == "__main__":
    main()
