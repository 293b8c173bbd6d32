"""Encryption at rest: stored credentials (and, opt-in, payloads).

:class:`Cipher` seals bytes with AES-256-GCM (authenticated encryption from
``cryptography``). Its key is derived with HKDF-SHA256 from the app's secret
(``DURABLE_SECRET_KEY``, else ``SECRET_KEY``, else a random secret kept in
the database) and a purpose label, so that the same secret never serves two
purposes. AES-GCM rather than Fernet: a sealed value carries the id of its
key (Fernet has no room for one, and would try every key in turn), the
context it belongs to is authenticated without being stored (a header name,
say), and it is about half the size once base64-encoded.

A sealed value is ``version (1) | key id (4) | nonce (12) | ciphertext+tag``.
The key id picks the key among the current one and
``DURABLE_SECRET_KEY_FALLBACKS``; a value no key opens raises
:class:`DecryptionError`.

Nothing is derived, and the database is not read, until the first value is
sealed or opened: a request without credentials does no crypto work.
"""

from __future__ import annotations

import base64
import hashlib
import os
import threading
from collections.abc import Callable, Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

_VERSION = b"\x01"
_HEADER = 1 + 4 + 12
#: Marks a sealed value stored as text (never the first character of JSON).
TEXT_MARK = "!"
#: The context step outputs are sealed with.
STEP_CONTEXT = b"flask-durable.step-output"
#: The context event data is sealed with.
EVENT_CONTEXT = b"flask-durable.event-data"


class DecryptionError(Exception):
    """A stored value cannot be decrypted: it was sealed with a key that is
    neither the current secret nor in ``DURABLE_SECRET_KEY_FALLBACKS``, or it
    was altered."""


def _to_bytes(secret: str | bytes) -> bytes:
    return secret.encode("utf-8") if isinstance(secret, str) else secret


class Cipher:
    """Seals and opens values with keys derived from the app's secrets.

    :param secret: the current secret, or ``None`` to use ``default``.
    :param fallbacks: older secrets, tried to open values they sealed.
    :param default: returns the random secret kept in the database; called
        once, on first use, when ``secret`` is ``None``.
    :param purpose: the label mixed into the key derivation.
    """

    def __init__(
        self,
        secret: str | bytes | None,
        fallbacks: Sequence[str | bytes],
        default: Callable[[], str],
        purpose: str = "flask-durable.at-rest",
    ) -> None:
        self._secret = secret
        self._fallbacks = tuple(fallbacks)
        self._default = default
        self._info = purpose.encode("utf-8")
        self._lock = threading.Lock()
        self._current: tuple[bytes, AESGCM] | None = None
        self._keys: dict[bytes, AESGCM] = {}

    def _derive(self, secret: str | bytes) -> tuple[bytes, AESGCM]:
        key = HKDF(
            algorithm=hashes.SHA256(), length=32, salt=None, info=self._info
        ).derive(_to_bytes(secret))
        return hashlib.sha256(b"key-id\0" + key).digest()[:4], AESGCM(key)

    def _load(self) -> tuple[bytes, AESGCM]:
        current = self._current
        if current is not None:
            return current
        with self._lock:
            if self._current is None:
                keys: dict[bytes, AESGCM] = {}
                for old in reversed(self._fallbacks):
                    kid, aead = self._derive(old)
                    keys[kid] = aead
                kid, aead = self._derive(self._secret or self._default())
                keys[kid] = aead
                self._keys = keys
                self._current = (kid, aead)
            return self._current

    def encrypt(self, data: bytes, context: bytes = b"") -> bytes:
        """``data`` sealed with the current key; ``context`` must be given
        again to open it."""
        kid, aead = self._load()
        nonce = os.urandom(12)
        return _VERSION + kid + nonce + aead.encrypt(nonce, data, context)

    def decrypt(self, sealed: bytes, context: bytes = b"") -> bytes:
        """What :meth:`encrypt` sealed.

        :raises DecryptionError: no key opens it.
        """
        self._load()
        sealed = bytes(sealed)
        if len(sealed) < _HEADER + 16 or sealed[:1] != _VERSION:
            raise DecryptionError("stored value is not an encrypted value")
        aead = self._keys.get(sealed[1:5])
        if aead is None:
            raise DecryptionError(
                "stored value was encrypted with a key that is neither the"
                " current one (DURABLE_SECRET_KEY or SECRET_KEY) nor in"
                " DURABLE_SECRET_KEY_FALLBACKS"
            )
        try:
            return aead.decrypt(sealed[5:_HEADER], sealed[_HEADER:], context)
        except InvalidTag:
            raise DecryptionError("stored value was altered") from None

    def encrypt_text(self, text: str, context: bytes = b"") -> str:
        """``text`` sealed, as ASCII starting with :data:`TEXT_MARK`."""
        sealed = self.encrypt(text.encode("utf-8", "surrogatepass"), context)
        return TEXT_MARK + base64.urlsafe_b64encode(sealed).decode("ascii")

    def decrypt_text(self, text: str, context: bytes = b"") -> str:
        """What :meth:`encrypt_text` sealed.

        :raises DecryptionError: no key opens it, or it is not sealed.
        """
        if not text.startswith(TEXT_MARK):
            raise DecryptionError("stored value is not an encrypted value")
        try:
            sealed = base64.urlsafe_b64decode(text[1:])
        except ValueError:
            raise DecryptionError("stored value is not an encrypted value") from None
        return self.decrypt(sealed, context).decode("utf-8", "surrogatepass")


def is_sealed_text(text: str | None) -> bool:
    """Whether a stored text value was written by :meth:`Cipher.encrypt_text`."""
    return text is not None and text.startswith(TEXT_MARK)
