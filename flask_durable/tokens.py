"""Wait tokens: a run id signed with the app's secret (itsdangerous), with
the time it was issued and, when the request that started the run carried
credentials, a fingerprint of them."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Callable, Sequence

from itsdangerous import BadSignature, TimestampSigner
from werkzeug.datastructures import Headers

#: The request headers a wait URL is bound to, when present.
BOUND_HEADERS = ("Authorization", "Cookie")


class WaitTokens:
    """Signs and checks the ``<token>`` of ``<prefix>/wait/<token>``.

    The signed value is ``<run id>`` or ``<run id>.<fingerprint>``: the
    fingerprint is a keyed hash (HMAC-SHA256, 96 bits) of the
    ``Authorization`` and ``Cookie`` headers of the request that got the
    URL, so that the URL answers only to a request carrying the same ones
    and the token reveals nothing about them.

    :param secret: the key (``DURABLE_SECRET_KEY``, else ``SECRET_KEY``),
        or ``None`` to use :func:`fallback`.
    :param fallback: returns a random key kept in the database, shared by
        every process using it; called once, on first use.
    :param fallbacks: older keys, still accepted (newest last).
    :param ttl: seconds a token is valid (``None``: for ever).
    """

    def __init__(
        self,
        secret: str | bytes | None,
        fallback: Callable[[], str],
        fallbacks: Sequence[str | bytes] = (),
        ttl: float | None = None,
    ) -> None:
        self._secret = secret
        self._fallback = fallback
        self._fallbacks = tuple(fallbacks)
        self.ttl = ttl
        self._signer: TimestampSigner | None = None
        self._keys: tuple[bytes, ...] = ()

    @property
    def signer(self) -> TimestampSigner:
        if self._signer is None:
            secret = self._secret or self._fallback()
            keys = [*self._fallbacks, secret]  # newest last, as itsdangerous
            self._keys = tuple(k.encode() if isinstance(k, str) else k for k in keys)
            self._signer = TimestampSigner(list(self._keys), salt="flask-durable.wait")
        return self._signer

    def _fingerprint(self, headers: Headers, key: bytes) -> str | None:
        values = [(name, headers.get(name)) for name in BOUND_HEADERS]
        if all(value is None for _, value in values):
            return None
        message = b"flask-durable.wait-caller"
        for name, value in values:
            if value is not None:
                message += b"\0" + name.encode() + b"\0"
                message += value.encode("utf-8", "surrogatepass")
        digest = hmac.new(key, message, hashlib.sha256).digest()[:12]
        return base64.urlsafe_b64encode(digest).decode("ascii")

    def sign(self, run_id: str, headers: Headers | None = None) -> str:
        """A token for ``run_id``, bound to the credentials in ``headers``."""
        signer = self.signer
        fingerprint = (
            None if headers is None else self._fingerprint(headers, self._keys[-1])
        )
        value = run_id if fingerprint is None else f"{run_id}.{fingerprint}"
        return signer.sign(value).decode("ascii")

    def derive(self, purpose: bytes) -> bytes:
        """A key for ``purpose``, derived from the newest secret key."""
        self.signer  # noqa: B018 (loads the keys)
        return hmac.new(self._keys[-1], purpose, hashlib.sha256).digest()

    def unsign(self, token: str, headers: Headers | None = None) -> str | None:
        """The run id, or ``None`` for a tampered, malformed or expired
        token, or one bound to credentials that ``headers`` do not carry."""
        try:
            signed, issued = self.signer.unsign(token, return_timestamp=True)
            value = signed.decode("ascii")
        except (BadSignature, UnicodeError, ValueError):
            return None
        if self.ttl is not None and time.time() - issued.timestamp() > self.ttl:
            return None  # expired
        run_id, _, fingerprint = value.partition(".")
        if not fingerprint:
            return run_id
        if headers is None:
            return None
        for key in self._keys:  # the key that signed it, whichever it was
            mine = self._fingerprint(headers, key)
            if mine is not None and hmac.compare_digest(mine, fingerprint):
                return run_id
        return None
