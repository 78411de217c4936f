"""The private APIs of dependencies the guard relies on, each pinned here with the version range
``pyproject.toml`` allows: an upgrade that changes one fails these tests, not the guard in silence."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest
from scipy import stats


@pytest.mark.parametrize("path, root_path, route_path", [
    ("/api/predict", "/api", "/predict"), ("/predict", "", "/predict"), ("/api", "/api", ""),
    ("/apiary/predict", "/api", "/apiary/predict"), ("/predict", "/api", "/predict"),
])
def test_starlettes_route_path_is_the_path_without_the_root_path(path, root_path, route_path):
    from starlette._utils import get_route_path  # guard.routing matches on it, as Starlette's router

    assert get_route_path({"path": path, "root_path": root_path}) == route_path


def test_scipys_shapiro_wilk_routine_gives_its_coefficients_and_scipys_statistic():
    from scipy.stats._ansari_swilk_statistics import swilk  # guard.detectors.prada's coefficients

    from guard.detectors.prada import shapiro_w

    half = np.zeros(10)
    swilk(np.zeros(20), half, False)  # fills the coefficients before it stops at a sample of no range
    assert (np.diff(half) < 0).all() and 2 * half.dot(half) == pytest.approx(1.0, abs=1e-3)
    sample = np.random.default_rng(0).normal(1.0, 0.2, 50).clip(0.5, 1.5)
    assert shapiro_w(sample) == pytest.approx(stats.shapiro(sample).statistic, rel=1e-12, abs=0)


async def test_redis_connections_parse_replies_with_errors_returned_not_raised():
    from redis.asyncio.connection import Connection
    from redis.exceptions import ResponseError

    connection = Connection()  # guard.store.channel writes on its _writer, reads with its _parser
    assert hasattr(connection, "_writer")
    reader = asyncio.StreamReader()
    reader.feed_data(b"-ERR boom\r\n+OK\r\n$3\r\nabc\r\n")
    connection._reader = reader
    connection._parser.on_connect(connection)
    replies = [await connection._parser.read_response() for _ in range(3)]
    assert isinstance(replies[0], ResponseError) and replies[1:] == [b"OK", b"abc"]
