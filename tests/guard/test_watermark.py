"""The watermark defence (DAWN): keyed selection at its rate, consistent wrong labels, rows that stay
distributions, composition, and its records kept bounded in the store and exported."""
from __future__ import annotations

import asyncio
import json

import httpx
import numpy as np
import pytest
from typer.testing import CliRunner

from guard.cli import app as cli
from guard.middleware import GuardMiddleware
from guard.outputs import Pipeline, Watermark, parse
from guard.policy import Policy
from guard.serving import prediction_app
from guard.watermarks import MemoryRecords, Record, RedisRecords, records_of

SECRET = b"test secret, 16+ bytes"
RNG = np.random.default_rng(0)
P = RNG.dirichlet(np.ones(10), 20_000)
X = RNG.random((20_000, 6))


def test_selects_about_the_rate_and_only_those_rows_change():
    defended = Watermark(0.02, SECRET)(P, X, "alice")
    changed = defended.argmax(axis=1) != P.argmax(axis=1)
    marks = Watermark(0.02, SECRET).marks(P.argmax(axis=1), X, "alice", 10)
    assert 0.016 < changed.mean() < 0.024  # 400 expected, sd 20
    assert (changed == marks.watermarked).all()
    assert 0.17 < marks.controls.mean() < 0.19 and not (marks.controls & marks.watermarked).any()
    assert (defended[changed].argmax(axis=1) == marks.labels[changed]).all()


def test_the_same_query_gets_the_same_answer_and_wrong_labels_are_spread():
    mark = Watermark(0.05, SECRET)
    first, again = mark(P, X, "alice"), mark(P[::-1], X[::-1], "alice")[::-1]
    assert np.array_equal(first, again)
    changed = first.argmax(axis=1) != P.argmax(axis=1)
    offsets = (first.argmax(axis=1) - P.argmax(axis=1))[changed] % 10
    assert set(offsets) == set(range(1, 10))  # every other class is a possible wrong label


def test_selection_depends_on_the_secret_and_the_client():
    chosen = [Watermark(0.05, secret).marks(P.argmax(axis=1), X, client, 10).watermarked
              for secret, client in [(SECRET, "alice"), (SECRET, "bob"), (b"another secret 16+", "alice")]]
    assert (chosen[0] & chosen[1]).sum() < 0.2 * chosen[0].sum()
    assert (chosen[0] & chosen[2]).sum() < 0.2 * chosen[0].sum()


def test_rows_stay_distributions_with_the_wrong_label_on_top():
    defended = Watermark(0.1, SECRET)(P, X, "c")
    assert np.allclose(defended.sum(axis=1), 1.0)
    assert np.allclose(np.sort(defended, axis=1), np.sort(P, axis=1))  # the same values, two swapped


@pytest.mark.parametrize("after", [["round:2"], ["label_only"], ["round:1", "label_only"], ["top_k:3"]])
def test_composes_with_later_defences(after):
    plain = Pipeline.from_specs(["watermark:0.1"], SECRET)(P[:2000], X[:2000], "c")
    defended = np.asarray(Pipeline.from_specs(["watermark:0.1", *after], SECRET)(P[:2000], X[:2000], "c"))
    assert (defended.argmax(axis=1) == plain.argmax(axis=1)).all()
    assert np.allclose(defended.sum(axis=1), 1.0)


def test_rate_bounds_and_secret_are_checked():
    for spec in ["watermark:0", "watermark:0.2", "watermark:-1"]:
        with pytest.raises(ValueError):
            parse(spec, SECRET)
    with pytest.raises(ValueError):
        parse("watermark:0.01", b"")


def record(i: int, client: str = "c") -> Record:
    return Record("watermark", client, 1.0, [float(i)] * 8, 1, 2)


async def test_memory_records_are_bounded_in_bytes():
    records = MemoryRecords(max_bytes=4096)
    for i in range(500):
        await records.add([record(i)])
    kept = await records.export()
    assert records.size <= 4096 and sum(len(r.encode()) for r in kept) == records.size
    assert kept[-1] == record(499) and len(kept) < 500


async def test_redis_records_are_capped_per_client(redis_url):
    records = RedisRecords(redis_url, per_client=30, retention=60, prefix="test-watermarks:")
    try:
        for client in ("a", "b"):
            for key in [k async for k in records._client.scan_iter(match=f"test-watermarks:watermarks:{client}")]:
                await records._client.delete(key)
            await records.add([record(i, client) for i in range(100)])
        kept = await records.export()
        assert sorted({(r.client, len([s for s in kept if s.client == r.client])) for r in kept}) == \
            [("a", 30), ("b", 30)]
        assert [r.features[0] for r in kept if r.client == "a"] == list(range(70, 100))
    finally:
        await records.close()


def flat_model(X: np.ndarray) -> np.ndarray:
    """A fixed three-class model: class 0 on top."""
    return np.tile([0.6, 0.3, 0.1], (len(X), 1))


def watermarked_app(store: str = "memory://", output: tuple[str, ...] = ("watermark:0.1",)):
    app = prediction_app(flat_model, n_features=4)
    policy = Policy(secret=SECRET.decode(), store=store,
                    routes={"/predict": {"probabilities": "/probabilities", "features": "/features",
                                         "output": list(output)}})
    app.add_middleware(GuardMiddleware, policy=policy)
    return app


async def answers(app, rows: np.ndarray) -> np.ndarray:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.post("/predict", json={"features": rows.tolist()})
    assert response.status_code == 200
    return np.asarray(response.json()["probabilities"])


async def test_the_middleware_watermarks_and_records_what_it_served():
    app = watermarked_app(output=("watermark:0.1", "label_only"))
    rows = np.random.default_rng(1).random((300, 4))
    served = await answers(app, rows)
    guard = app.middleware_stack
    while not isinstance(guard, GuardMiddleware):
        guard = guard.app
    kept = await guard.monitoring.watermarks.export()
    marked = [r for r in kept if r.kind == "watermark"]
    assert 12 < len(marked) < 50 and all(r.model_label == 0 and r.label != 0 for r in marked)
    by_row = {tuple(r.features): r for r in kept}
    for row, label in zip(rows.astype(np.float32).tolist(), served):
        r = by_row.get(tuple(row))
        assert label == (r.label if r is not None and r.kind == "watermark" else 0)
    assert np.array_equal(await answers(app, rows), served)


def test_export_writes_the_redis_records(redis_url, tmp_path):
    import redis

    with redis.Redis.from_url(redis_url) as server:
        server.delete(*server.keys("predguard:watermarks:*") or ["none"])
    rows = np.random.default_rng(2).random((200, 4))
    asyncio.run(answers(watermarked_app(store=redis_url, output=("watermark:0.05",)), rows))
    out = tmp_path / "records.jsonl"
    result = CliRunner().invoke(cli, ["watermarks", "export", "--store", redis_url, "--out", str(out)])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    mine = [line for line in lines if tuple(np.float32(line["features"]).tolist()) in
            {tuple(r) for r in rows.astype(np.float32).tolist()}]
    marks = Watermark(0.05, SECRET).marks(np.zeros(200, dtype=np.int64), rows, mine[0]["client"], 3)
    assert len(mine) == (marks.watermarked | marks.controls).sum() < 200
    expected = records_of(marks, rows, [0] * 200, mine[0]["client"])
    assert sorted((r.kind, r.label, tuple(r.features)) for r in expected) == \
        sorted((m["kind"], m["label"], tuple(m["features"])) for m in mine)


def test_export_refuses_a_memory_store(tmp_path):
    result = CliRunner().invoke(cli, ["watermarks", "export", "--store", "memory://", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "memory://" in result.output
