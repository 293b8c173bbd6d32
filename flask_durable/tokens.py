"""Wait tokens: a run id signed with the app's secret (itsdangerous)."""

from __future__ import annotations

from collections.abc import Callable

from itsdangerous import BadSignature, Signer


class WaitTokens:
    """Signs and checks the ``<token>`` of ``<prefix>/wait/<token>``.

    :param secret: the key (``DURABLE_SECRET_KEY``, else ``SECRET_KEY``),
        or ``None`` to use :func:`fallback`.
    :param fallback: returns a random key kept in the database, shared by
        every process using it; called once, on first use.
    """

    def __init__(self, secret: str | bytes | None, fallback: Callable[[], str]) -> None:
        self._secret = secret
        self._fallback = fallback
        self._signer: Signer | None = None

    @property
    def signer(self) -> Signer:
        if self._signer is None:
            secret = self._secret or self._fallback()
            self._signer = Signer(secret, salt="flask-durable.wait")
        return self._signer

    def sign(self, run_id: str) -> str:
        return self.signer.sign(run_id).decode("ascii")

    def unsign(self, token: str) -> str | None:
        """The run id, or ``None`` for a tampered or malformed token."""
        try:
            return self.signer.unsign(token).decode("ascii")
        except (BadSignature, UnicodeError):
            return None
