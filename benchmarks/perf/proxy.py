"""Proxy-mode overhead: the digits prediction server served bare, guarded in process, and behind
``guard proxy`` (``UpstreamProxy`` in its own uvicorn process, with and without the guard).

Run: ``python -m benchmarks.perf.proxy [--quick]``.

Every server is its own process on 127.0.0.1 and one client process drives each in turn with the
closed-loop load of ``benchmarks.perf.overhead`` (keep-alive connections, the digits test images in
turn), A/B interleaved over ``--rounds`` rounds. It prints per configuration the medians over rounds
of requests/s, p50 and p99 latency and their ratios to the bare server. A proxied request crosses
two servers, so the proxies' CPU column counts the proxy process only (the upstream's is the bare
server's). On a shared machine the figures are noisy: compare only rows measured in the same run.
"""
from __future__ import annotations

import json
import multiprocessing

import torch

from benchmarks.perf.attacks import print_table
from benchmarks.perf.overhead import HOST, digits_model, drive, free_port, load_parser, load_settings, serve
from guard import GuardMiddleware, Policy
from guard.proxy import UpstreamProxy

ROUND2 = Policy(secret="proxy benchmark secret",
                routes={"/predict": {"probabilities": "/probabilities", "features": "/features",
                                     "output": ["round:2"]}})


def serve_proxy(upstream: str, policy: Policy | None, port: int) -> None:
    """A proxy process: ``UpstreamProxy(upstream)``, behind ``GuardMiddleware`` when ``policy``."""
    import uvicorn

    app = UpstreamProxy(upstream)
    uvicorn.run(app if policy is None else GuardMiddleware(app, policy), host=HOST, port=port,
                log_level="warning", access_log=False)


def main(argv: list[str] | None = None) -> None:
    args = load_parser(__doc__.splitlines()[0]).parse_args(argv)
    torch.set_num_threads(1)
    rounds, seconds = load_settings(args)
    model, X = digits_model()
    bodies = [json.dumps({"features": x}).encode() for x in X.tolist()]
    n_features, n_classes = model[0].in_features, model[-1].out_features
    context = multiprocessing.get_context("spawn")
    bare, guarded, proxy, guard_proxy = (free_port() for _ in range(4))
    upstream = f"http://{HOST}:{bare}"
    processes = {
        "bare server": (bare, context.Process(target=serve, args=(model.state_dict(), n_features, n_classes,
                                                                   None, bare), daemon=True)),
        "guard in process (round:2)": (guarded, context.Process(
            target=serve, args=(model.state_dict(), n_features, n_classes, ROUND2, guarded), daemon=True)),
        "proxy, no guard": (proxy, context.Process(target=serve_proxy, args=(upstream, None, proxy), daemon=True)),
        "guard proxy (round:2)": (guard_proxy, context.Process(target=serve_proxy, args=(upstream, ROUND2,
                                                                                         guard_proxy), daemon=True)),
    }
    try:
        for _, process in processes.values():
            process.start()
        rows = drive([(name, port, process.pid, None) for name, (port, process) in processes.items()], bodies,
                     rounds, seconds, args.concurrency)
    finally:
        for _, process in processes.values():
            process.terminate()
            process.join(10)
    print_table(f"proxy-mode overhead ({rounds} rounds x {seconds:g} s, {args.concurrency} connections; "
                "medians over rounds, ratios to the bare server)", rows)


if __name__ == "__main__":
    main()
