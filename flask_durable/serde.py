"""Encoding of step values, stored requests and stored responses.

Step values go through Flask's tagged JSON (``flask.json.tag``) so tuples,
bytes, UUIDs and datetimes survive a round trip. Datetimes keep their
microseconds and time zone (Flask's own tag rounds to the second).

Stored requests and responses pass through :func:`encode_envelope` and
:func:`decode_envelope` only, the one place where at-rest encryption of
headers and bodies can be added.
"""

from __future__ import annotations

import json
import json.encoder
import re
from datetime import datetime
from typing import Any

from flask.json.tag import JSONTag, TaggedJSONSerializer

_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_loads = json.loads
_join = "".join


def _unencodable(value: Any) -> Any:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


#: :data:`_encode` without its per-call set-up (``JSONEncoder.encode`` builds
#: an encoder for each call) and without the circular-reference check: only
#: for trees built by this module (tagged or copied values), which cannot
#: refer to themselves. The same output as :data:`_encode`.
_c_make_encoder = getattr(json.encoder, "c_make_encoder", None)
if _c_make_encoder is not None:  # CPython
    _encode_tree = _c_make_encoder(
        None,
        _unencodable,
        json.encoder.encode_basestring,
        None,
        ":",
        ",",
        False,
        False,
        True,
    )

    def _encode_built(value: Any) -> str:
        return _join(_encode_tree(value, 0))

else:  # pragma: no cover - without the C accelerator

    def _encode_built(value: Any) -> str:
        return _encode(value)


#: A lone surrogate: no database column can store it as it is (it has no
#: UTF-8 encoding), and ``ensure_ascii=False`` leaves it raw in JSON text.
_SURROGATE = re.compile("[\ud800-\udfff]")
#: What :func:`safe_text` escapes: lone surrogates and NUL (PostgreSQL text
#: cannot hold NUL).
_UNSAFE = re.compile("[\ud800-\udfff\x00]")


def _escape(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group()):04x}"


def _storable(text: str) -> str:
    """Compact JSON that every database stores: a lone surrogate (only
    possible inside a JSON string) is written as its ``\\uXXXX`` escape,
    which loads back to the same character; NUL is escaped by JSON itself."""
    if text.isascii() or _SURROGATE.search(text) is None:
        return text
    return _SURROGATE.sub(_escape, text)


def _dumps(value: Any) -> str:
    """``value`` as compact JSON every database stores (see :func:`_storable`)."""
    return _storable(_encode(value))


def is_storable_text(text: str) -> bool:
    """Whether every database stores ``text`` as it is in a text column
    (no lone surrogate, no NUL)."""
    if text.isascii():
        return "\x00" not in text
    return _UNSAFE.search(text) is None


def safe_text(text: str) -> str:
    """``text`` as every database can store it in a text column: lone
    surrogates and NUL become ``\\uXXXX`` escapes (for error messages, which
    are read by people, not parsed)."""
    if is_storable_text(text):
        return text
    return _UNSAFE.sub(_escape, text)


class _TagISODateTime(JSONTag):
    __slots__ = ()
    key = " d"

    def check(self, value: Any) -> bool:
        return isinstance(value, datetime)

    def to_json(self, value: Any) -> Any:
        return value.isoformat()

    def to_python(self, value: Any) -> Any:
        return datetime.fromisoformat(value)


class _StrictSerializer(TaggedJSONSerializer):
    """Tagged JSON that refuses what it cannot round-trip (no ``default``)."""

    def __init__(self) -> None:
        super().__init__()
        self.order = [t for t in self.order if t.key != _TagISODateTime.key]
        self.register(_TagISODateTime, force=True)

    def fast_tag(self, value: Any) -> Any:
        """:meth:`tag` with a fast path for plain JSON types (the common
        case); anything else goes through Flask's tags."""
        kind = type(value)
        if kind is str or kind is int or kind is float or kind is bool or value is None:
            return value
        if kind is list:
            return [self.fast_tag(item) for item in value]
        if kind is dict and not (len(value) == 1 and next(iter(value)) in self.tags):
            fast = self.fast_tag
            return {k: fast(v) for k, v in value.items()}
        return self.tag(value)

    def dumps(self, value: Any) -> str:
        return _storable(_encode_built(self.fast_tag(value)))

    def loads(self, value: str | bytes) -> Any:
        if isinstance(value, str) and '{" ' not in value:
            return _loads(value)  # nothing tagged: no per-object hook
        return _loads(value, object_hook=self.untag)


_serializer = _StrictSerializer()
_TAG_KEYS = _serializer.tags
_SCALARS = frozenset({str, int, float, bool, type(None)})


class _NotPlain(Exception):
    """A value :func:`_plain_copy` leaves to the tagged serializer."""


def _plain_copy(value: Any) -> Any:
    """A copy of a plain JSON value (``str``, ``int``, ``float``, ``bool``,
    ``None``, and lists and dicts with ``str`` keys of them), equal to what
    its tagged JSON loads back to (the same ``dict`` key order).

    :raises _NotPlain: anything else (tuples, bytes, subclasses, non-``str``
        keys), or a one-key dict whose key is a tag's (escaped when stored).
    """
    kind = type(value)
    if kind is dict:
        if len(value) == 1 and next(iter(value)) in _TAG_KEYS:
            raise _NotPlain
        copy = {}
        for key, item in value.items():
            if type(key) is not str:
                raise _NotPlain
            copy[key] = item if type(item) in _SCALARS else _plain_copy(item)
        return copy
    if kind is list:
        return [item if type(item) in _SCALARS else _plain_copy(item) for item in value]
    if kind in _SCALARS:
        return value
    raise _NotPlain


_TOO_DEEP = "value is nested too deeply (or refers to itself)"


def dump_value(value: Any) -> str:
    """Encode a step value. Raises :class:`TypeError` for values that are
    not JSON-like."""
    try:
        return _serializer.dumps(value)
    except (TypeError, ValueError) as e:
        raise TypeError(str(e)) from None
    except RecursionError:
        raise TypeError(_TOO_DEEP) from None


def load_value(text: str | bytes) -> Any:
    """Decode a value written by :func:`dump_value`."""
    return _serializer.loads(text)


def encode_value(value: Any) -> tuple[str, Any]:
    """``(dump_value(value), load_value(dump_value(value)))`` in one pass.

    Plain JSON values (the common case) are copied as they are checked and
    encoded once, never decoded: the text is the same, and the copy equals
    what decoding it returns. Anything else takes the tagged round trip.

    :raises TypeError: as :func:`dump_value`.
    """
    try:
        copy = _plain_copy(value)
    except _NotPlain:
        text = dump_value(value)
        return text, load_value(text)
    except RecursionError:
        raise TypeError(_TOO_DEEP) from None
    try:
        text = _encode_built(copy)
    except (TypeError, ValueError) as e:  # an int over Python's digit limit
        raise TypeError(str(e)) from None
    except RecursionError:
        raise TypeError(_TOO_DEEP) from None
    if text.isascii() or _SURROGATE.search(text) is None:
        return text, copy
    # Lone surrogates are stored escaped, and a high one followed by a low
    # one loads back as the character the pair stands for: decode.
    text = _SURROGATE.sub(_escape, text)
    return text, load_value(text)


def dump_json(value: Any) -> str:
    """Plain compact JSON for bookkeeping fields (errors, match specs)."""
    return _dumps(value)


def load_json(text: str | bytes) -> Any:
    return _loads(text)


def encode_envelope(meta: dict[str, Any], body: bytes) -> bytes:
    """Pack a stored request or response: its metadata (method, path,
    headers, status, ...) as one JSON line, then the raw body.

    This is the single place that writes request and response headers and
    bodies to the database.
    """
    return _storable(_encode_built(meta)).encode("utf-8") + b"\n" + body


def decode_envelope(blob: bytes) -> tuple[dict[str, Any], bytes]:
    """Unpack what :func:`encode_envelope` wrote."""
    blob = bytes(blob)
    head, _, body = blob.partition(b"\n")
    return _loads(head), body
