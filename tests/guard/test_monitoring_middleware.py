"""GuardMiddleware's monitoring steps through a real FastAPI app: rate limits with their headers,
spoofed X-Forwarded-For, the degrade/throttle/block sequence driven by a real detector, the fail
mode when Redis dies mid-test (never an unguarded answer) and its recovery, and ``/metrics``."""
from __future__ import annotations

import httpx
import numpy as np
import pytest

from guard.serving import prediction_app
from guard import GuardMiddleware, Policy
from conftest import guard_in, monitor_drained, near
from guard.identity import key_entry

D, K = 16, 3
WEIGHTS = np.random.default_rng(0).normal(size=(D, K))
SECRET = "monitoring test secret"
KEYS = ["mallory", "alice", "sybil-0", "sybil-1", "sybil-2"]
IDENTITY = {"header": "X-API-Key", "keys": [key_entry(key) for key in KEYS]}


def softmax(X: np.ndarray) -> np.ndarray:
    z = X @ WEIGHTS
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def client_for(peer: str = "203.0.113.7", **settings) -> httpx.AsyncClient:
    route = {"probabilities": "/probabilities", "features": "/features", **settings.pop("route", {})}
    identity = {**IDENTITY, **settings.pop("identity", {})}
    policy = Policy(secret=SECRET, routes={"/predict": route}, identity=identity, **settings)
    app = prediction_app(softmax, D)
    app.add_middleware(GuardMiddleware, policy=policy)
    transport = httpx.ASGITransport(app=app, client=(peer, 4000))
    client = httpx.AsyncClient(transport=transport, base_url="http://guarded")
    client.guarded_app = app
    return client


def query(seed: int) -> list[float]:
    return np.random.default_rng(seed).random(D).round(3).tolist()


async def predict(client: httpx.AsyncClient, features: list[float], **headers: str) -> httpx.Response:
    """One query; then wait for the monitor to judge it, so that its sanction applies to the next."""
    answer = await client.post("/predict", json={"features": features},
                               headers={k.replace("_", "-"): v for k, v in headers.items()})
    app = getattr(client, "guarded_app", None)
    if app is not None and guard_in(app).monitoring.monitor is not None:
        await monitor_drained(app)
    return answer


def full(response: httpx.Response) -> bool:
    """An undefended-shape answer: a probability vector (a label-only answer is one integer)."""
    return response.status_code == 200 and isinstance(response.json()["probabilities"], list)


async def test_rate_limit_429_with_headers():
    async with client_for(route={"rate_limits": ["3/minute"]}) as client:
        answers = [await predict(client, query(i)) for i in range(4)]
    assert [a.status_code for a in answers] == [200, 200, 200, 429]
    assert answers[0].headers["ratelimit-limit"] == "3" and answers[0].headers["ratelimit-remaining"] == "2"
    # Sliding window: this window's 3 queries still weigh on the next one, so a fourth fits only
    # once a third of the next window has passed: between 20 and 80 s from now.
    assert 20 <= int(answers[3].headers["retry-after"]) <= 80
    assert answers[3].json()["error"] == "rate_limited"


async def test_batch_costs_one_per_row():
    async with client_for(route={"rate_limits": ["5/minute"]}) as client:
        batch = await client.post("/predict", json={"features": [query(i) for i in range(4)]})
        assert batch.status_code == 200 and batch.headers["ratelimit-remaining"] == "1"
        assert (await client.post("/predict", json={"features": [query(5), query(6)]})).status_code == 429


async def test_spoofed_forwarded_for_from_untrusted_peer_changes_nothing():
    async with client_for(route={"rate_limits": ["3/minute"]},
                          identity={"trusted_proxies": ["10.0.0.0/8"]}) as client:
        codes = [(await predict(client, query(i), x_forwarded_for=f"198.51.100.{i}")).status_code
                 for i in range(5)]
    assert codes == [200, 200, 200, 429, 429]
    # control: behind a trusted proxy the forwarded addresses are distinct clients
    async with client_for(peer="10.0.0.2", route={"rate_limits": ["3/minute"]},
                          identity={"trusted_proxies": ["10.0.0.0/8"]}) as client:
        codes = [(await predict(client, query(i), x_forwarded_for=f"198.51.100.{i}")).status_code
                 for i in range(5)]
    assert codes == [200] * 5


SIMILARITY = {"similarity": {"threshold": 5, "window": 4, "quantization": 0.1}}


async def test_log_degrade_throttle_sequence():
    route = {"throttle_rate_limits": ["1/minute"], "rate_limits": ["100/minute"]}
    async with client_for(route=route, detectors=SIMILARITY) as client:
        repeated = query(0)
        answers = [await predict(client, near(repeated, i), x_api_key="mallory") for i in range(4)]
        # alarms on the 2nd, 3rd, 4th query: log, then degrade (label-only), then throttle
        assert [full(a) for a in answers] == [True, True, True, False]
        assert isinstance(answers[3].json()["probabilities"], int)
        throttled = [await predict(client, query(seed), x_api_key="mallory") for seed in (1, 2)]
        assert throttled[0].status_code == 200 and not full(throttled[0])
        assert throttled[1].status_code == 429
        # another client is untouched
        assert full(await predict(client, query(3), x_api_key="alice"))


@pytest.mark.parametrize("accomplices", [True, False])
async def test_cross_client_alarms_sanction_every_sybil_key_when_configured(accomplices):
    keys = ["sybil-0", "sybil-1", "sybil-2"]
    route = {"sanctions": {"accomplices": accomplices}}
    async with client_for(route=route, detectors=SIMILARITY) as client:
        repeated = query(0)
        # one query, sent in turn by each key: from the second on, each matches the key before it
        for i in range(4):
            assert full(await predict(client, near(repeated, i), x_api_key=keys[i % 3]))
        probes = [await predict(client, query(10 + i), x_api_key=key) for i, key in enumerate(keys)]
        untouched = full(await predict(client, query(20), x_api_key="alice"))
    # with accomplices every key has climbed to degrade (label-only answers); without, each key
    # took one alarm (log) and still gets full answers
    assert [full(p) for p in probes] == [not accomplices] * 3
    assert untouched


async def test_block_gives_403_and_metrics_count_it():
    route = {"sanctions": {"ladder": {"block": 60}}}
    async with client_for(route=route, detectors=SIMILARITY, metrics_path="/metrics",
                          metrics_token="scraper-token-0123") as client:
        answers = [await predict(client, near(query(0), i), x_api_key="mallory") for i in range(3)]
        assert [a.status_code for a in answers] == [200, 200, 403]
        metrics = (await client.get("/metrics", headers={"Authorization": "Bearer scraper-token-0123"})).text
    for line in ['guard_requests_total{decision="allowed",route="/predict"} 2.0',
                 'guard_requests_total{decision="blocked",route="/predict"} 1.0',
                 'guard_detections_total{detector="similarity"} 1.0',
                 'guard_sanctions_total{level="block"} 1.0',
                 "guard_middleware_seconds_count 3.0", "guard_clients_tracked 1.0"]:
        assert line in metrics
    assert "mallory" not in metrics


@pytest.mark.parametrize("peer, headers, served", [
    ("203.0.113.7", {}, False), ("203.0.113.7", {"Authorization": "Bearer wrong"}, False),
    ("203.0.113.7", {"Authorization": "Bearer scraper-token-0123"}, True),
    ("127.0.0.1", {}, True), ("::ffff:127.0.0.1", {}, True), ("10.1.2.3", {}, True)])
async def test_metrics_only_for_configured_networks_and_token(peer, headers, served):
    settings = {"metrics_path": "/metrics", "metrics_token": "scraper-token-0123",
                "metrics_networks": ["127.0.0.0/8", "10.0.0.0/8"]}
    async with client_for(peer=peer, **settings) as client:
        response = await client.get("/metrics", headers=headers)
    assert (response.status_code == 200 and "guard_requests_total" in response.text) == served
    assert served or response.status_code == 404  # the app's own answer: nothing says metrics are there


@pytest.mark.parametrize("fail_mode", ["label_only", "503"])
async def test_a_malformed_sanction_in_redis_fails_closed(redis_url, fail_mode):
    import redis.asyncio as aioredis

    peer = f"198.51.100.{np.random.default_rng().integers(1, 250)}"
    server = aioredis.Redis.from_url(redis_url)
    await server.set(f"predguard:sanction:ip:{peer}", b'{"level": "block"')
    try:
        async with client_for(peer=peer, store=redis_url, fail_mode=fail_mode) as client:
            answer = await predict(client, query(0))
    finally:
        await server.delete(f"predguard:sanction:ip:{peer}")
        await server.aclose()
    assert not full(answer)
    assert answer.status_code == (503 if fail_mode == "503" else 200)


async def test_metrics_route_only_when_configured():
    async with client_for() as client:
        assert (await client.get("/metrics")).status_code == 404


@pytest.mark.parametrize("fail_mode", ["label_only", "503"])
async def test_redis_killed_mid_test_never_unguarded_and_recovers(redis_server, fail_mode):
    settings = {"store": redis_server.url, "fail_mode": fail_mode, "detectors": SIMILARITY,
                "route": {"rate_limits": ["100/minute"]}}
    async with client_for(**settings) as client:
        assert full(await predict(client, query(0)))
        redis_server.stop()
        for seed in range(1, 4):
            answer = await predict(client, query(seed))
            assert not full(answer)
            if fail_mode == "503":
                assert answer.status_code == 503
            else:
                assert answer.status_code == 200 and isinstance(answer.json()["probabilities"], int)
        redis_server.start()
        # pooled connections to the dead server fail once each, then the guard is back by itself
        recovered = [full(await predict(client, query(seed))) for seed in range(4, 8)]
        assert recovered[-2:] == [True, True]


def test_guard_calibrate_writes_thresholds_the_policy_loads(tmp_path):
    from typer.testing import CliRunner

    from guard.cli import app

    path = tmp_path / "policy.toml"
    path.write_text(f'secret = "{SECRET}"\n[detectors.similarity]\nwindow = 20\n')
    result = CliRunner().invoke(app, ["calibrate", str(path), "--data", "digits", "--clients", "5",
                                      "--fpr", "0.25"])
    assert result.exit_code == 0, result.output
    detectors = Policy.from_file(path).detectors
    assert detectors["similarity"]["window"] == 20
    assert 1 < detectors["similarity"]["threshold"] <= 51  # at most top_n (50) shared hashes + 1
    assert 0 < detectors["prada"]["delta"] < 1


async def test_a_blocked_key_cannot_escape_with_an_invented_one():
    route = {"sanctions": {"ladder": {"block": 60}}}
    async with client_for(route=route, detectors=SIMILARITY) as client:
        answers = [await predict(client, near(query(0), i), x_api_key="mallory") for i in range(3)]
        assert [a.status_code for a in answers] == [200, 200, 403]
        escape = await predict(client, query(1), x_api_key="mallory-2")
    assert escape.status_code == 401 and escape.json()["error"] == "invalid_api_key"


async def test_a_client_blocked_by_its_ip_stays_blocked_with_an_unknown_key():
    route = {"sanctions": {"ladder": {"block": 60}}}
    async with client_for(route=route, detectors=SIMILARITY, identity={"unknown_keys": "ip"}) as client:
        answers = [await predict(client, near(query(0), i)) for i in range(3)]
        assert [a.status_code for a in answers] == [200, 200, 403]
        assert (await predict(client, query(1), x_api_key="fresh-key")).status_code == 403
        assert full(await predict(client, query(2), x_api_key="alice"))


async def test_valid_keys_from_one_network_share_its_budget():
    route = {"rate_limits": ["100/minute"], "network_rate_limits": ["3/minute"]}
    async with client_for(route=route) as client:
        codes = [(await predict(client, query(i), x_api_key=key)).status_code
                 for i, key in enumerate(["sybil-0", "sybil-1", "sybil-2", "alice"])]
    assert codes == [200, 200, 200, 429]


async def test_keys_from_a_file_and_from_the_apps_own_check(tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text(f"# issued keys\n{key_entry('from-file')}\n")
    policy = Policy(secret=SECRET, identity={"header": "X-API-Key", "keys_file": str(keys)},
                    routes={"/predict": {"probabilities": "/probabilities", "features": "/features"}})
    app = prediction_app(softmax, D)
    app.add_middleware(GuardMiddleware, policy=policy, verify_key=lambda key: key.startswith("app-"))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://guarded") as client:
        codes = [(await predict(client, query(0), x_api_key=key)).status_code
                 for key in ("from-file", "app-123", "other")]
    assert codes == [200, 200, 401]


async def test_blocks_survive_a_flood_of_identities_and_a_full_sanction_store_degrades_new_clients():
    from guard.middleware import Monitoring
    from guard.sanctions import Level, SanctionRules

    monitoring = Monitoring(Policy(secret=SECRET, memory_limit=1 << 20, detectors={"similarity": {}}))
    detector_store = monitoring.monitor.monitor.detectors["similarity"].store
    rules = SanctionRules.parse({"block": 3600})
    await monitoring.sanctions.escalate("ip:203.0.113.7", rules, "similarity")
    for i in range(20_000):  # detector state of 20,000 fresh clients: far beyond its share
        await detector_store.set(f"prada:key:{i}:distances", b"x" * 64, ttl=3600)
    assert (await monitoring.sanctions.standing("ip:203.0.113.7")).level == Level.BLOCK
    sanctioned = 0
    while not (await monitoring.sanctions.standing(f"ip:10.{sanctioned}")).level:
        await monitoring.sanctions.escalate(f"ip:10.{sanctioned}", rules, "similarity")
        sanctioned += 1
    assert sanctioned > 100  # the sanction share holds hundreds of standings
    assert (await monitoring.sanctions.standing("ip:203.0.113.7")).level == Level.BLOCK
    assert (await monitoring.sanctions.standing("ip:198.51.100.1")).level == Level.DEGRADE


@pytest.mark.parametrize("settings, reads", [
    ({}, False),  # no limits, no detectors, memory: no sanction can exist
    ({"route": {"rate_limits": ["100/minute"]}}, True),
    ({"detectors": {"similarity": {}}}, True)])
async def test_the_store_is_read_only_where_a_limit_or_a_sanction_can_apply(settings, reads):
    async with client_for(**settings) as client:
        await client.get("/health")  # builds the middleware stack
        guard = guard_in(client.guarded_app)
        calls = []
        admit = guard.monitoring.admission.admit

        async def counted(*args, **kwargs):
            calls.append(args)
            return await admit(*args, **kwargs)

        guard.monitoring.admission.admit = counted
        answer = await predict(client, query(0))
    assert answer.status_code == 200 and len(answer.json()["probabilities"]) == K
    assert bool(calls) == reads


async def test_a_network_scoped_block_refuses_the_whole_network():
    route = {"sanctions": {"scope": "network", "ladder": {"block": 600}}}
    async with client_for(peer="203.0.113.7", route=route, detectors=SIMILARITY) as blocked:
        assert full(await predict(blocked, query(0)))
        guard = guard_in(blocked.guarded_app)
        rules = guard.policy.routes["/predict"].sanctions.rules()
        await guard.monitoring.sanctions.escalate("ip:203.0.113.7", rules, "similarity")
        answers = {}
        for peer in ("203.0.113.7", "203.0.113.99", "203.0.114.7"):
            transport = httpx.ASGITransport(app=blocked.guarded_app, client=(peer, 4000))
            async with httpx.AsyncClient(transport=transport, base_url="http://guarded") as client:
                answers[peer] = await client.post("/predict", json={"features": query(1)},
                                                  headers={"X-API-Key": "alice"} if peer.endswith("99") else {})
    assert answers["203.0.113.7"].status_code == answers["203.0.113.99"].status_code == 403  # a key too
    assert full(answers["203.0.114.7"])
