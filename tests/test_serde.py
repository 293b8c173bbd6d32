"""Values as steps store them: what round-trips, what cannot be stored, and
a first execution that returns what a replay would.

Property tests (hypothesis) pin the fast path of plain JSON values
(:func:`~flask_durable.serde.encode_value`) to the tagged round trip: the
same stored text, and a returned value equal to the decoded one, of the same
types all the way down.
"""

from __future__ import annotations

import collections
import enum
import math
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from flask import jsonify
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flask_durable import Durable, step
from flask_durable.serde import (
    _NotPlain,
    _plain_copy,
    dump_value,
    encode_value,
    load_value,
)

PROPERTIES = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

durable = Durable()


@pytest.mark.parametrize(
    "value",
    [
        None,
        True,
        3,
        2.5,
        "text",
        [1, "a", None],
        (1, 2, (3,)),
        b"\x00\xff",
        uuid.UUID(int=5),
        datetime(2030, 1, 2, 3, 4, 5, 678901, tzinfo=timezone.utc),
        datetime(2030, 1, 2, 3, 4, 5, 6),
        {"nested": {"t": (1, b"x")}, " t": "looks like a tag"},
    ],
)
def test_values_round_trip(value: Any) -> None:
    assert load_value(dump_value(value)) == value
    assert type(load_value(dump_value(value))) is type(value)


@pytest.mark.parametrize("value", [{1, 2}, object(), {"k": object()}, 1j])
def test_unstorable_values_are_type_errors(value: Any) -> None:
    with pytest.raises(TypeError):
        dump_value(value)


def test_first_run_returns_round_tripped_value(make_app: Any) -> None:
    app = make_app()
    seen: list[Any] = []

    @app.get("/")
    @durable.endpoint
    def view() -> Any:
        value = step.run("v", lambda: (1, [2], datetime(2030, 1, 1)))
        seen.append(value)
        return "ok"

    app.test_client().get("/")
    assert seen == [(1, [2], datetime(2030, 1, 1))]
    assert isinstance(seen[0], tuple)


def test_non_serializable_step_value_names_the_step(make_app: Any) -> None:
    app = make_app()

    @app.get("/")
    @durable.endpoint
    def view() -> Any:
        try:
            step.run("make-set", lambda: {1, 2})
        except TypeError as e:
            return jsonify(error=str(e)), 500
        return "no"

    r = app.test_client().get("/")
    assert r.status_code == 500
    assert "'make-set'" in r.json["error"]


# -- the fast path of plain JSON values ---------------------------------------


def same(a: Any, b: Any) -> bool:
    """Equal, of the same types all the way down, dict keys in the same
    order; a NaN is the same as a NaN, and -0.0 is not 0.0."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return repr(a) == repr(b)
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def slow_round_trip(value: Any) -> tuple[str, Any]:
    text = dump_value(value)
    return text, load_value(text)


#: Keys and strings of every kind: lone surrogates (also a high one followed
#: by a low one, which loads back as one character), NUL, astral
#: characters, escapes, and the keys of the serializer's tags.
any_text = st.one_of(
    st.lists(
        st.one_of(
            st.characters(),
            st.characters(categories=["Cs"]),
            st.sampled_from('\x00\u00b2"\\\U0001f600\ud83d\ude00 '),
        ),
        max_size=12,
    ).map("".join),
    st.sampled_from([" t", " b", " u", " d", " m", " di", " x", "", "__"]),
)

plain_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(-(10**400), 10**400)
    | st.floats()  # NaN, infinities and -0.0 too
    | any_text,
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(any_text, inner, max_size=5)
    ),
    max_leaves=30,
)


class Color(enum.IntEnum):
    RED = 1


class Text(str):
    pass


#: Plain values with something the fast path leaves to the tagged serializer
#: somewhere inside: tuples, bytes, UUIDs, datetimes, subclasses, keys that
#: are not str.
mixed_values = st.recursive(
    plain_values
    | st.binary(max_size=8)
    | st.uuids()
    | st.datetimes(timezones=st.none() | st.just(timezone(timedelta(hours=2))))
    | st.just(Color.RED)
    | any_text.map(Text),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.lists(inner, max_size=4).map(tuple)
        | st.dictionaries(any_text, inner, max_size=4)
        | st.dictionaries(st.integers() | st.booleans() | st.none(), inner, max_size=3)
        | st.dictionaries(any_text, inner, max_size=3).map(collections.OrderedDict)
    ),
    max_leaves=20,
)


@PROPERTIES
@given(plain_values)
def test_plain_values_take_the_fast_path(value: Any) -> None:
    try:
        _plain_copy(value)
    except _NotPlain:
        # Only a one-key dict whose key is a tag's is left to the tags.
        assert "{" in dump_value(value)
        return
    text, returned = encode_value(value)
    expected_text, expected = slow_round_trip(value)
    assert text == expected_text
    assert same(returned, expected)


@PROPERTIES
@given(mixed_values)
def test_any_value_encodes_as_the_tagged_round_trip(value: Any) -> None:
    try:
        expected_text, expected = slow_round_trip(value)
    except TypeError:
        with pytest.raises(TypeError):
            encode_value(value)
        return
    text, returned = encode_value(value)
    assert text == expected_text
    assert same(returned, expected)


def test_fast_path_returns_a_copy() -> None:
    inner = [1, {"a": [2.5, None]}]
    value = {"k": inner, "s": "text"}
    text, returned = encode_value(value)
    assert returned == value and returned is not value
    assert returned["k"] is not inner and returned["k"][1] is not inner[1]
    returned["k"][1]["a"].append(3)
    assert value == {"k": [1, {"a": [2.5, None]}], "s": "text"}
    assert text == dump_value(value)


@pytest.mark.parametrize(
    "value",
    [
        {" t": [1, 2]},  # escaped: it would load as a tuple
        {" t": 1, "x": 2},  # two keys: not a tag
        {1: "a", "b": 2},  # int key: a str once loaded
        "\ud83d\ude00",  # a surrogate pair loads back as one character
        ["\ud800", "\x00"],
        [math.inf, -math.inf, -0.0],
        10**4000,
    ],
    ids=["tag-key", "tag-key-and-more", "int-key", "pair", "lone", "inf", "big-int"],
)
def test_edge_values_match_the_tagged_round_trip(value: Any) -> None:
    expected_text, expected = slow_round_trip(value)
    text, returned = encode_value(value)
    assert text == expected_text
    assert same(returned, expected)


@pytest.mark.parametrize(
    "value",
    [10**5000, [10**5000], {"k": object()}, ({1},)],
    ids=["huge-int", "huge-int-in-list", "object", "set-in-tuple"],
)
def test_fast_path_refuses_what_dump_value_refuses(value: Any) -> None:
    with pytest.raises(TypeError) as slow:
        dump_value(value)
    with pytest.raises(TypeError) as fast:
        encode_value(value)
    assert str(fast.value) == str(slow.value)


def test_self_referring_values_are_type_errors() -> None:
    looped: list[Any] = [1]
    looped.append(looped)
    mapping: dict[str, Any] = {}
    mapping["me"] = mapping
    for value in (looped, mapping, (looped,)):
        with pytest.raises(TypeError, match="refers to itself"):
            encode_value(value)
        with pytest.raises(TypeError, match="refers to itself"):
            dump_value(value)
