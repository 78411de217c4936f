"""Fixtures shared by the library's tests of request shapes on tutorial-style servers."""
from __future__ import annotations

import pytest
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression


@pytest.fixture(scope="module")
def iris_model() -> LogisticRegression:
    """A logistic regression on iris: the model of the tutorial servers the tests guard."""
    iris = load_iris()
    return LogisticRegression(max_iter=500).fit(iris.data, iris.target)
