"""JSON pointers (RFC 6901), feature parsing, probability location, validation and rendering."""
from __future__ import annotations

import math

import numpy as np
import orjson
import pytest
from pydantic import BaseModel, ValidationError

from guard.payload import (
    FeatureFunction,
    NamedFields,
    PayloadError,
    Pointer,
    QueryFields,
    VectorAt,
    answer_rows,
    feature_number,
    read_features,
    read_probabilities,
)

DOCUMENT = {"a/b": {"m~n": [10, {"x": 1}]}, "list": [[1, 2], [3]], "": 5}


@pytest.mark.parametrize("text, expected", [
    ("", DOCUMENT), ("/a~1b/m~0n/0", 10), ("/a~1b/m~0n/1/x", 1), ("/list/1/0", 3), ("/", 5),
])
def test_pointer_get_follows_rfc_6901(text, expected):
    assert Pointer.parse(text).get(DOCUMENT) == expected


@pytest.mark.parametrize("text", ["/missing", "/list/2", "/list/01", "/list/-", "/list/0/0/0", "/a~1b/m~0n/x"])
def test_pointer_get_reports_missing_values(text):
    with pytest.raises(PayloadError, match="nothing at JSON pointer"):
        Pointer.parse(text).get(DOCUMENT)


def test_pointer_must_start_with_a_slash():
    with pytest.raises(ValueError, match="start with '/'"):
        Pointer.parse("probabilities")


def test_pointer_replace_rewrites_only_the_value_at_the_pointer():
    document = {"out": [{"p": [0.5, 0.5]}, {"p": [1, 0]}], "keep": 1}
    assert Pointer.parse("/out/1/p").replace(document, 7) == {"out": [{"p": [0.5, 0.5]}, {"p": 7}], "keep": 1}
    assert Pointer.parse("").replace(document, [1]) == [1]
    with pytest.raises(PayloadError):
        Pointer.parse("/out/2/p").replace(document, 0)


def test_features_single_and_batch():
    np.testing.assert_array_equal(read_features([1, 2.5]), [[1.0, 2.5]])
    np.testing.assert_array_equal(read_features([[1, 2], [3, 4]]), [[1, 2], [3, 4]])


@pytest.mark.parametrize("value", [[], [[1, 2], [3]], [1, "two"], [[[1]]], 3, {"x": 1},
                                   [float("nan")], [1, None], [[1, 2], 3], [10**400], ["nan"], [1, "-inf"]])
def test_malformed_features_are_rejected(value):
    with pytest.raises(PayloadError, match="features"):
        read_features(value)


class OneFloat(BaseModel):
    x: float


@pytest.mark.parametrize("text", ['"5.9"', '" 5.9 "', '"1e3"', '"1_000"', '"+.5"', '"5."', "5", "-3", "true",
                                  "false", "18446744073709551615", '"abc"', '""', '"0x10"', '"1,5"',
                                  '"\uff15"', "null", "[1]", '{"a": 1}', '"nan"', '"-Infinity"', '"1e400"'])
def test_feature_values_are_read_as_pydantic_reads_a_float_field(text):
    """Lax mode, as the app's request model reads the same JSON; non-finite values, which pydantic's
    ``float`` takes, are refused (the detectors cannot judge them)."""
    try:
        expected = OneFloat.model_validate_json(f'{{"x": {text}}}').x
    except ValidationError:
        expected = None
    if expected is not None and math.isfinite(expected):
        assert feature_number(orjson.loads(text)) == expected
        assert read_features([1.0, orjson.loads(text)]) == [[1.0, expected]]
    else:
        with pytest.raises((TypeError, PayloadError)):
            feature_number(orjson.loads(text))
        with pytest.raises(PayloadError, match="features"):
            read_features([1.0, orjson.loads(text)])


def test_named_and_query_features_name_the_value_they_refuse():
    fields = NamedFields((Pointer.parse("/a"), Pointer.parse("/b")))
    assert fields.read(b'{"a": "5.9", "b": 2}', b"") == [[5.9, 2.0]]
    with pytest.raises(PayloadError, match="'/b' holds 'wide', not a number"):
        fields.read(b'{"a": 1.0, "b": "wide"}', b"")
    with pytest.raises(PayloadError, match="'nan' is not a finite number"):
        fields.read(b'{"a": "nan", "b": 2}', b"")
    assert QueryFields(("a",)).read(b"", b"a=%205.9") == [[5.9]]
    with pytest.raises(PayloadError, match="must be a number"):
        QueryFields(("a",)).read(b"", b"a=%EF%BC%95")  # a fullwidth 5: Python's float reads it, pydantic not


def test_probabilities_in_every_form_and_written_back_in_the_same_form():
    single = read_probabilities([0.2, 0.8])
    assert single.single and single.labels is None and single.values.shape == (1, 2)
    assert single.render(np.array([[0.25, 0.75]]), label_only=False) == [0.25, 0.75]
    assert single.render(np.array([[0.0, 1.0]]), label_only=True) == 1

    batch = read_probabilities([[0.2, 0.8], [0.6, 0.4]])
    assert batch.render(batch.values, label_only=False) == [[0.2, 0.8], [0.6, 0.4]]
    assert batch.render(batch.values, label_only=True) == [1, 0]

    mapping = read_probabilities({"cat": 0.7, "dog": 0.3})
    assert mapping.labels == ("cat", "dog")
    assert mapping.render(np.array([[0.5, 0.5]]), label_only=False) == {"cat": 0.5, "dog": 0.5}
    assert mapping.render(mapping.values, label_only=True) == "cat"

    mappings = read_probabilities([{"cat": 0.7, "dog": 0.3}, {"dog": 0.9, "cat": 0.1}])
    np.testing.assert_allclose(mappings.values, [[0.7, 0.3], [0.1, 0.9]])
    assert mappings.render(mappings.values, label_only=True) == ["cat", "dog"]


def test_configured_labels_fix_the_class_order_and_count():
    found = read_probabilities({"cat": 0.7, "dog": 0.3}, labels=("dog", "cat"))
    np.testing.assert_allclose(found.values, [[0.3, 0.7]])
    with pytest.raises(PayloadError, match="expected labels"):
        read_probabilities({"cat": 0.7, "cow": 0.3}, labels=("dog", "cat"))
    with pytest.raises(PayloadError, match="expected 3 classes"):
        read_probabilities([0.5, 0.5], labels=("a", "b", "c"))


@pytest.mark.parametrize("value, message", [
    ([0.5, 0.6], "sum to 1"), ([1.2, -0.2], "negative"), ([float("inf"), 0.0], "finite"),
    ([float("nan"), 1.0], "finite"), ([[[0.5, 0.5]]], "list of numbers"), ("0.5", "list of numbers"),
    ([[0.5, 0.5], [1.0]], "different lengths"), ([{"a": 1.0}, {"b": 1.0}], "expected labels"),
    ([{"a": 1.0}, [1.0]], "mixed"), ({"a": "1"}, "list of numbers"), ([], "non-empty"), ({}, "non-empty"),
])
def test_invalid_probabilities_are_rejected(value, message):
    with pytest.raises(PayloadError, match=message):
        read_probabilities(value)


def test_sum_tolerance_is_configurable():
    assert read_probabilities([0.33, 0.33, 0.33], tolerance=0.02).values.shape == (1, 3)
    with pytest.raises(PayloadError):
        read_probabilities([0.33, 0.33, 0.33])


def test_one_hot_label_only_keeps_vectors_objects_and_flat_tensors():
    from guard.payload import read_probabilities

    vector = read_probabilities([0.2, 0.7, 0.1])
    assert vector.render(vector.values, label_only=True, one_hot=True) == [0.0, 1.0, 0.0]
    mapping = read_probabilities({"cat": 0.6, "dog": 0.4})
    assert mapping.render(mapping.values, label_only=True, one_hot=True) == {"cat": 1.0, "dog": 0.0}
    flat = read_probabilities([0.2, 0.8, 0.9, 0.1], labels=("a", "b"), flat=True)
    assert flat.values.shape == (2, 2)
    assert flat.render(flat.values, label_only=False) == [0.2, 0.8, 0.9, 0.1]
    assert flat.render(flat.values, label_only=True, one_hot=True) == [0.0, 1.0, 1.0, 0.0]
    assert flat.render(flat.values, label_only=True) == [1, 0]
    with pytest.raises(PayloadError, match="flat list"):
        read_probabilities([0.2, 0.8, 1.0], labels=("a", "b"), flat=True)


def test_answer_rows_read_and_write_a_field_of_each_object():
    from guard.payload import EachRow, Pointer

    where = EachRow(Pointer.parse("/answers"), Pointer.parse("/p"))
    document = {"answers": [{"label": "a", "p": [0.9, 0.1]}, {"label": "b", "p": [0.3, 0.7]}]}
    assert where.get(document) == [[0.9, 0.1], [0.3, 0.7]]
    assert where.replace(document, [0, 1]) == {"answers": [{"label": "a", "p": 0}, {"label": "b", "p": 1}]}
    with pytest.raises(PayloadError, match="non-empty list"):
        where.get({"answers": {}})


def test_kserve_v2_inputs_reshape_and_refuse_second_outputs():
    from guard.payload import kserve_v2_inputs

    request = {"inputs": [{"name": "x", "shape": [2, 2], "datatype": "FP64", "data": [1, 2, 3, 4]}]}
    assert kserve_v2_inputs(request, {}).tolist() == [[1, 2], [3, 4]]
    with pytest.raises(ValueError, match="at most one output"):
        kserve_v2_inputs({**request, "outputs": [{"name": "predict"}, {"name": "predict_proba"}]}, {})
    with pytest.raises(ValueError, match="exactly one input"):
        kserve_v2_inputs({"inputs": []}, {})


@pytest.mark.parametrize("source, example", [
    (VectorAt(Pointer.parse("/features")), None),
    (VectorAt(Pointer.parse("/inputs/0/data"), 3), {"inputs": [{"name": "x", "data": []}]}),
    (NamedFields(tuple(Pointer.parse(f"/{name}") for name in "abc")), None),
    (NamedFields(tuple(Pointer.parse(f"/m/{name}") for name in "abc"), Pointer.parse("/rows")), {"id": 7}),
    (FeatureFunction.named("guard.payload:kserve_v2_inputs"), {"outputs": [{"name": "predict_proba"}]}),
])
def test_what_a_source_writes_it_reads_back(source, example):
    rows = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.5]])
    for batch, single in ((rows, False), (rows[:1], True)):
        body = source.write(batch, single, example)
        assert np.array_equal(source.read(orjson.dumps(body), b""), batch)
        assert all(body.get(key) == value for key, value in (example or {}).items() if key != "inputs")


def test_query_features_and_unknown_functions_cannot_be_written():
    with pytest.raises(ValueError, match="query string"):
        QueryFields(("a",)).write(np.ones((1, 1)), True)
    with pytest.raises(ValueError, match="no request writer"):
        FeatureFunction(lambda document, query: [1.0]).write(np.ones((1, 1)), True)


def test_answer_rows_cut_flat_tensors_and_keep_labels():
    assert answer_rows([0.1, 0.9, 0.6, 0.4], 2, False, 2) == [[0.1, 0.9], [0.6, 0.4]]
    assert answer_rows([0.1, 0.9], 1, True, 2) == [[0.1, 0.9]]  # flat: a one-row request too
    assert answer_rows([1, 0], 2, False, 2) == [1, 0]  # label-only: one label per row
    assert answer_rows({"cat": 1.0}, 1, True) == [{"cat": 1.0}]
    with pytest.raises(PayloadError):
        answer_rows({"cat": 1.0}, 1, False)
