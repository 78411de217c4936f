"""The harness's ``guard`` commands, ``bench``, ``audit`` and ``verify``: ``register`` adds them to the ``guard``
command through the ``predguard.commands`` entry-point group. Heavy imports happen inside each
command, so ``guard --help`` stays fast."""
from __future__ import annotations

from typing import TYPE_CHECKING

import typer

from guard.cli_options import ListsChoices, Names, split_names

if TYPE_CHECKING:
    from guard.policy import Policy, RoutePolicy


def register(app: typer.Typer) -> None:
    """Add ``bench``, ``audit`` and ``verify`` to the ``guard`` command ``app``."""
    app.command("bench", cls=ListsChoices)(bench)
    app.command("audit", cls=ListsChoices)(audit)
    app.command("verify")(verify)


def bench(
    out: str = typer.Option("guard-report", help="Folder for results.json, report.md and report.html."),
    quick: bool = typer.Option(False, "--quick", help="A smoke test in under a minute: digits, one seed, five "
                               "defences, six attacks at reduced strength."),
    full: bool = typer.Option(False, "--full", help="The whole grid: three seeds, every defence and attack "
                              "(default: one seed; on each defence, the attacks strongest against it in the full run)."),
    cache: str | None = typer.Option(None, help="Folder of trained models and finished cells, reused by "
                                     "every run (default: ~/.cache/predguard/bench)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run recorded in --out (its options), "
                                "from the cells already in the cache."),
    ray: str | None = typer.Option(None, help="Run the cells as Ray tasks on the cluster at this address, or "
                                   "'auto' (needs the 'ray' extra)."),
    data: list[str] | None = typer.Option(None, help="Data sets (comma-separated or repeated): digits, "
                                          "breast_cancer, faces, faces64, or .csv/.npz files (an NPZ X of "
                                          "shape (n, h, w[, c]) is kept as images)."),
    sensitive: str | None = typer.Option(None, help="The discrete sensitive column of your data (CSV header "
                                         "name or index) that attribute inference attacks."),
    max_body_bytes: int = typer.Option(1 << 20, min=1024, help="The guard's request-body limit; the attacks' "
                                       "request batches are sized to fit it."),
    hidden: int | None = typer.Option(None, min=1, help="Hidden units of the target MLP (default: the data "
                                      "set's recipe, e.g. 3000 on faces, else 64)."),
    activation: str | None = typer.Option(None, parser=Names("benchmarks.models:ACTIVATIONS"),
                                          help="Hidden activation of the target MLP."),
    lr: float | None = typer.Option(None, min=0.0, help="Learning rate of the targets (Adam)."),
    min_train_accuracy: float | None = typer.Option(None, min=0.0, max=1.0, help="Refuse a target that fits its "
                                                    "own training set worse than this (default: 0.8, or less "
                                                    "on noisy data: docs/user-data.md)."),
    defences: list[str] | None = typer.Option(None, parser=Names("benchmarks.scenarios:DEFENCES",
                                                                 several=True),
                                              help="Defence configurations (comma-separated or repeated)."),
    attacks: list[str] | None = typer.Option(None, parser=Names("benchmarks.scenarios:ATTACK_SPECS",
                                                                several=True),
                                             help="Attacks (comma-separated or repeated)."),
    seed: list[int] | None = typer.Option(None, help="Seeds (repeat the option for several)."),
    model: str | None = typer.Option(None, help="Your model: module:function(n_features, n_classes)."),
    live: bool = typer.Option(False, "--live", help="Serve each target with uvicorn on 127.0.0.1 and "
                              "attack over the socket (default: in-process ASGI transport)."),
    epochs: int | None = typer.Option(None, min=1, help="Training epochs of the target models (default: "
                                      "sized to the data)."),
    workers: int | None = typer.Option(None, min=1, help="Processes running cells side by side (default: one "
                                       "per CPU core)."),
    threads: int = typer.Option(1, min=1, help="Torch threads per process or Ray task (the bench's small "
                                "models run fastest on one)."),
) -> None:
    """Attack undefended and defended models through the real middleware and report the difference."""
    import json
    import os
    import sys
    from pathlib import Path

    from benchmarks import executors, grid, run
    from benchmarks.cache import default_root
    from benchmarks.models import Underfit

    if quick and full:
        raise typer.BadParameter("choose one of --quick and --full")
    recorded = Path(out) / "results.json"
    if resume and not recorded.exists():
        raise typer.BadParameter(f"nothing to resume: no {recorded}", param_hint="--resume")
    if resume:
        previous = json.loads(recorded.read_text())["config"]
        config, cache = grid.from_recorded(previous), cache or previous.get("cache")
    else:
        config = grid.configure(
            "quick" if quick else "full" if full else "default", command=" ".join(["guard", *sys.argv[1:]]),
            live=live, model=model, sensitive=sensitive, max_body_bytes=max_body_bytes, hidden=hidden,
            activation=activation, lr=lr, min_train_accuracy=min_train_accuracy, datasets=split_names(data),
            defences=split_names(defences), attacks=split_names(attacks), seeds=tuple(seed) if seed else None, epochs=epochs)
    executor = (executors.RayCluster(ray, cpus=threads) if ray else
                executors.LocalPool(workers or os.cpu_count() or 1, threads))
    try:
        finished = run.run(config, Path(out), executor, Path(cache) if cache else default_root())
    except (Underfit, ValueError) as error:  # an underfitting target, unusable data or options
        typer.echo(f"guard bench: {error}", err=True)
        raise typer.Exit(2) from error
    typer.echo(finished.summary)
    for kind, path in finished.paths.items():
        typer.echo(f"{kind}: {path}")
    if finished.partial:
        raise typer.Exit(130)


def _list(value: str | None) -> tuple[str, ...] | None:
    return tuple(item.strip() for item in value.split(",") if item.strip()) if value else None


def audit(
    url: str | None = typer.Option(None, help="The prediction endpoint, e.g. http://127.0.0.1:8000/predict "
                                   "(required unless a member audit names a local model with --weights)."),
    data: str = typer.Option("digits", help="The attacker's data: digits, breast_cancer, or a .csv/.npz file "
                             "whose features the endpoint takes."),
    out: str = typer.Option("guard-audit", help="Folder for the report."),
    policy: str | None = typer.Option(None, help="The guard's policy file: the request and answer shapes "
                                      "are its --route's (features, probabilities, probabilities_flat, "
                                      "labels), instead of the options below."),
    route: str | None = typer.Option(None, help="The policy route the endpoint is on (default: the "
                                     "policy's only route)."),
    request_example: str | None = typer.Option(None, help="JSON of the rest of a request body the rows "
                                               "are written into, e.g. '{\"outputs\": [{\"name\": "
                                               "\"predict_proba\"}]}' for MLServer."),
    features_path: str | None = typer.Option(None, help="JSON pointer to the feature rows in the request "
                                             "(default /features; '' with --fields: the body is the "
                                             "object of fields)."),
    fields: str | None = typer.Option(None, help="Send each row as an object of these named fields "
                                      "(comma-separated, in the data's column order)."),
    probabilities_path: str | None = typer.Option(None, help="JSON pointer to the answers in the response "
                                                  "(default /probabilities)."),
    labels: str | None = typer.Option(None, help="The class names the endpoint answers with, comma-separated, "
                                      "in the order of the data's sorted labels (label-only and "
                                      "label->probability answers)."),
    batch_size: int | None = typer.Option(None, min=1, help="Rows per request; 1 sends single rows "
                                          "(default: batches of 256, or 1 if the endpoint refuses a batch)."),
    scale: bool | None = typer.Option(None, "--scale/--no-scale", help="Send features min-max scaled to "
                                      "[0, 1] (default: scaled for digits and breast_cancer, as the demo "
                                      "serves them; a file's as they are in it)."),
    baseline: str | None = typer.Option(None, help="The same model served without the guard: attacked too, "
                                        "so the report's verdicts compare the two."),
    api_key: list[str] | None = typer.Option(None, help="API key(s) to send (several are rotated)."),
    budget: int | None = typer.Option(None, min=1, help="Most queries each attack may spend."),
    attacks: list[str] | None = typer.Option(None, parser=Names("benchmarks.scenarios:ATTACK_SPECS",
                                                                several=True),
                                             help="Attacks (comma-separated or repeated; default: the black-box "
                                             "extraction and inversion attacks)."),
    max_wait: float = typer.Option(60.0, min=0, help="Seconds an attack waits out rate limits before it stops."),
    allow_host: list[str] | None = typer.Option(None, help="A non-loopback host you own and may attack."),
    seed: int = typer.Option(0, help="Seed of the data split and the attacks."),
    members: str | None = typer.Option(None, help="Member audit: the records your model was trained on "
                                       "(.csv with the label last, or .npz); with --non-members."),
    non_members: str | None = typer.Option(None, help="Member audit: records of the same kind your model "
                                           "never saw."),
    population: str | None = typer.Option(None, help="Member audit: other records of the same distribution "
                                          "for the reference models and RMIA (default: the candidates "
                                          "themselves)."),
    model: str | None = typer.Option(None, help="Member audit: module:function(n_features, n_classes) building "
                                     "your model (returning logits): the reference models' architecture, and "
                                     "with --weights the model audited instead of --url."),
    weights: str | None = typer.Option(None, help="Member audit: your model's state dict (with --model)."),
    references: int = typer.Option(8, min=2, help="Member audit: reference models to train."),
    epochs: int = typer.Option(60, min=1, help="Member audit: epochs the reference models train (your recipe)."),
    lr: float = typer.Option(1e-2, min=0.0, help="Member audit: the reference models' learning rate (Adam)."),
) -> None:
    """Black-box attacks against a live prediction endpoint you run, with the same report as bench; with
    --members and --non-members, a member audit of your trained model (LiRA, RMIA)."""
    import json
    from pathlib import Path

    from benchmarks.audit import AUDIT_ATTACKS, AuditError
    from benchmarks.audit import audit as run_audit
    from guard.policy import Policy

    if members is not None or non_members is not None:
        _member_audit(members, non_members, out, url=url, population=population, model=model, weights=weights,
                      policy=policy, route=route, request_example=request_example, features_path=features_path,
                      fields=fields, probabilities_path=probabilities_path, labels=labels, batch_size=batch_size,
                      scale=bool(scale), api_keys=tuple(api_key or ()), allowed_hosts=tuple(allow_host or ()),
                      references=references, epochs=epochs, lr=lr, seed=seed)
        return
    if url is None:
        raise typer.BadParameter("give the endpoint's --url", param_hint="--url")
    from benchmarks.scenarios import ATTACK_SPECS

    membership = [name for name in split_names(attacks) or () if ATTACK_SPECS[name].family == "membership"]
    if membership:
        raise typer.BadParameter(f"{', '.join(membership)} need records of known membership: run a member audit "
                                 "with --members and --non-members", param_hint="--attacks")
    try:
        shape = _policy_route(Policy.from_file(policy), route) if policy is not None else None
        example = json.loads(request_example) if request_example is not None else None
        paths = run_audit(url, data, Path(out), route=shape, example=example, features_path=features_path,
                          probabilities_path=probabilities_path,
                          api_keys=tuple(api_key or ()), budget=budget,
                          attacks=split_names(attacks) or AUDIT_ATTACKS, seed=seed,
                          allowed_hosts=tuple(allow_host or ()), fields=_list(fields), labels=_list(labels),
                          batch_size=batch_size, scale=scale, baseline=baseline, max_wait=max_wait,
                          echo=typer.echo)
    except (AuditError, ValueError, OSError) as error:
        typer.echo(f"guard audit: {error}", err=True)
        raise typer.Exit(2) from error
    for kind, path in paths.items():
        typer.echo(f"{kind}: {path}")


def _member_audit(members: str | None, non_members: str | None, out: str, *, url: str | None,
                  population: str | None, model: str | None, weights: str | None, policy: str | None,
                  route: str | None, request_example: str | None, features_path: str | None, fields: str | None,
                  probabilities_path: str | None, labels: str | None, batch_size: int | None, scale: bool,
                  api_keys: tuple[str, ...], allowed_hosts: tuple[str, ...], references: int, epochs: int,
                  lr: float, seed: int) -> None:
    """``guard audit --members --non-members``: ``benchmarks.member_audit.member_audit``."""
    import json
    from dataclasses import replace
    from pathlib import Path

    from attacks.ensemble import TrainingConfig
    from benchmarks.audit import AuditError
    from benchmarks.member_audit import member_audit
    from guard.policy import Policy

    if members is None or non_members is None:
        raise typer.BadParameter("a member audit needs both --members and --non-members")
    try:
        shape = _policy_route(Policy.from_file(policy), route) if policy is not None else None
        paths = member_audit(members, non_members, Path(out), population=population, url=url, model=model,
                             weights=weights, route=shape,
                             example=json.loads(request_example) if request_example is not None else None,
                             features_path=features_path, probabilities_path=probabilities_path,
                             fields=_list(fields), labels=_list(labels), batch_size=batch_size, scale=scale,
                             api_keys=api_keys, allowed_hosts=allowed_hosts, n_references=references,
                             training=replace(TrainingConfig(), epochs=epochs, lr=lr), seed=seed, echo=typer.echo)
    except (AuditError, ValueError, OSError) as error:
        typer.echo(f"guard audit: {error}", err=True)
        raise typer.Exit(2) from error
    for kind, path in paths.items():
        typer.echo(f"{kind}: {path}")


def verify(
    records: str = typer.Option(..., help="The watermark records (`guard watermarks export`), JSON lines."),
    url: str | None = typer.Option(None, help="The suspect's prediction endpoint."),
    model: str | None = typer.Option(None, help="A local suspect: module:function returning its torch module "
                                     "(with --weights)."),
    weights: str | None = typer.Option(None, help="The local suspect's state dict, or a TorchScript file "
                                       "without --model."),
    classes: int | None = typer.Option(None, min=2, help="Classes the endpoint answers (default: the number "
                                       "of --labels, else the largest recorded label + 1)."),
    policy: str | None = typer.Option(None, help="A policy file whose --route describes the endpoint's "
                                      "request and answer shapes, as for `guard audit`."),
    route: str | None = typer.Option(None, help="The policy route the endpoint is on."),
    request_example: str | None = typer.Option(None, help="JSON of the rest of a request body."),
    features_path: str | None = typer.Option(None, help="JSON pointer to the feature rows (default /features)."),
    fields: str | None = typer.Option(None, help="Send each row as an object of these named fields."),
    probabilities_path: str | None = typer.Option(None, help="JSON pointer to the answers (default "
                                                  "/probabilities)."),
    labels: str | None = typer.Option(None, help="The endpoint's class names, comma-separated, in the "
                                      "recorded class order."),
    batch_size: int | None = typer.Option(None, min=1, help="Rows per request (1: single rows)."),
    api_key: list[str] | None = typer.Option(None, help="API key(s) to send."),
    allow_host: list[str] | None = typer.Option(None, help="A non-loopback host you may query."),
    alpha: float = typer.Option(1e-6, help="False-accusation level of the verdict."),
    max_queries: int = typer.Option(2000, min=1, help="Records queried at most (a seeded random subset)."),
) -> None:
    """Test whether a suspect model was trained on the watermarked answers (after DAWN: Fisher's exact
    test of the watermark labels it reproduces against the control labels it agrees with)."""
    import json

    from attacks.ownership import OwnershipTest, Records
    from benchmarks.audit import AuditError, check_host, route_from_options
    from benchmarks.verify import endpoint_suspect, local_suspect, report_lines
    from guard.policy import Policy

    if (url is None) == (weights is None):
        raise typer.BadParameter("name one suspect: --url, or --weights (with --model for a state dict)")
    try:
        found = Records.load(records)
        test = OwnershipTest(alpha, max_queries)
        if url is None:
            verification = test.run(local_suspect(weights, model), found)
        else:
            check_host(url, tuple(allow_host or ()))
            shape = (_policy_route(Policy.from_file(policy), route) if policy is not None else
                     route_from_options(features_path, _list(fields), probabilities_path, _list(labels)))
            n_classes = classes or (len(shape.labels) if shape.labels else int(found.labels.max()) + 1)
            example = json.loads(request_example) if request_example is not None else None
            with endpoint_suspect(url, found, n_classes, shape, example, batch_size,
                                  tuple(api_key or ())) as suspect:
                verification = test.run(suspect.predict, found)
    except (AuditError, ValueError, OSError, KeyError, TypeError) as error:
        typer.echo(f"guard verify: {error}", err=True)
        raise typer.Exit(2) from error
    for line in report_lines(verification):
        typer.echo(line)


def _policy_route(policy: Policy, path: str | None) -> RoutePolicy:
    """The policy's route at ``path`` (its only route when ``path`` is None)."""
    if path is None and len(policy.routes) == 1:
        return next(iter(policy.routes.values()))
    if path not in policy.routes:
        raise ValueError(f"name the endpoint's route with --route: one of {sorted(policy.routes)}")
    return policy.routes[path]
