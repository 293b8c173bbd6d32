"""Stored request -> WSGI environ -> app -> captured response.

A run is resumed by calling the app's WSGI callable with the request that
started it, exactly as a server would. :class:`CaptureMiddleware` sits at the
bottom of ``app.wsgi_app`` and stores the final response of every durable
run, whether it came from a client or from a replay.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from io import BytesIO
from typing import TYPE_CHECKING, Any

from werkzeug.exceptions import InternalServerError, RequestEntityTooLarge
from werkzeug.test import EnvironBuilder, run_wsgi_app

from .crypto import Cipher, DecryptionError
from .responses import encode_response
from .serde import decode_envelope, encode_envelope

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment
    from flask import Request

    from .execution import Execution

log = logging.getLogger("flask_durable")

#: Environ key marking a replay; holds the
#: :class:`~flask_durable.records.Claim` of the run being resumed. Only this
#: process can set it: no client header maps to it.
REPLAY_KEY = "flask_durable.replay"
#: Environ key holding the :class:`~flask_durable.execution.Execution` of a
#: request that reached a durable endpoint.
CONTEXT_KEY = "flask_durable.run"

#: Keys of the environ that are stored with a run besides the HTTP headers.
_ENVIRON_KEYS = (
    "REQUEST_METHOD",
    "SCRIPT_NAME",
    "PATH_INFO",
    "QUERY_STRING",
    "CONTENT_TYPE",
    "SERVER_NAME",
    "SERVER_PORT",
    "SERVER_PROTOCOL",
    "REMOTE_ADDR",
    "REMOTE_PORT",
    "wsgi.url_scheme",
)
#: Values ProxyFix rewrites; the originals are stored so the replay goes
#: through ProxyFix again exactly as the request did.
_PROXY_ORIG = "werkzeug.proxy_fix.orig"
#: Headers that describe the transfer of the original body, not the body.
_DROP = ("HTTP_TRANSFER_ENCODING", "HTTP_CONTENT_LENGTH", "CONTENT_LENGTH")


#: Request headers whose values are always stored encrypted.
ALWAYS_SENSITIVE = frozenset({"authorization", "cookie", "proxy-authorization"})
#: Marks a whole stored envelope (request or response) sealed by a
#: :class:`~flask_durable.crypto.Cipher`; a plain envelope starts with ``{``.
_SEALED = b"!"
_ENVELOPE_CONTEXT = b"flask-durable.envelope"


def _environ_keys(names: Collection[str]) -> frozenset[str]:
    return frozenset("HTTP_" + n.upper().replace("-", "_") for n in names)


@dataclass(frozen=True)
class StoragePolicy:
    """How a request is stored: which headers at all, which ones encrypted,
    and whether the whole stored request is encrypted.

    :param cipher: seals values (derives its key on first use only).
    :param sensitive: header names (lower-case) stored encrypted, besides
        :data:`ALWAYS_SENSITIVE`.
    :param allowed: header names (lower-case) stored at all, or ``None`` for
        every header; ``Host`` is always kept (the request line needs it).
    :param payloads: also encrypt bodies (``DURABLE_ENCRYPT_PAYLOADS``).
    """

    cipher: Cipher
    sensitive: frozenset[str] = frozenset()
    allowed: frozenset[str] | None = None
    payloads: bool = False
    #: The environ keys of the headers above (computed once).
    sensitive_keys: frozenset[str] = field(init=False)
    allowed_keys: frozenset[str] | None = field(init=False)

    def __post_init__(self) -> None:
        keys = _environ_keys(ALWAYS_SENSITIVE | self.sensitive)
        object.__setattr__(self, "sensitive_keys", keys)
        allowed = self.allowed
        keys_or_none = None if allowed is None else _environ_keys(allowed | {"host"})
        object.__setattr__(self, "allowed_keys", keys_or_none)


def seal_blob(cipher: Cipher, blob: bytes) -> bytes:
    """A stored envelope, encrypted as a whole."""
    return _SEALED + cipher.encrypt(blob, _ENVELOPE_CONTEXT)


def open_blob(cipher: Cipher | None, blob: bytes) -> bytes:
    """What :func:`seal_blob` sealed; a plain envelope as it is.

    :raises DecryptionError: no key opens it.
    """
    blob = bytes(blob)
    if blob[:1] != _SEALED:
        return blob
    if cipher is None:
        raise DecryptionError("stored value is encrypted and no key was given")
    return cipher.decrypt(blob[1:], _ENVELOPE_CONTEXT)


def capture_request(
    environ: WSGIEnvironment, body: bytes, policy: StoragePolicy | None = None
) -> bytes:
    """Serialize what is needed to replay this request, with its raw body.

    With a ``policy``, credentials are stored encrypted (their values only,
    listed under ``"sealed"``) and headers not allowed are left out."""
    stored: dict[str, Any] = {}
    for key in _ENVIRON_KEYS:
        value = environ.get(key)
        if value is not None:
            stored[key] = value
    sensitive = allowed = None
    if policy is not None:
        sensitive = policy.sensitive_keys
        allowed = policy.allowed_keys
    sealed: list[str] = []
    for key, value in environ.items():
        if key.startswith("HTTP_") and key not in _DROP and isinstance(value, str):
            if allowed is not None and key not in allowed:
                continue
            if sensitive is not None and key in sensitive:
                assert policy is not None
                value = policy.cipher.encrypt_text(value, key.encode("ascii"))
                sealed.append(key)
            stored[key] = value
    orig = environ.get(_PROXY_ORIG)
    if isinstance(orig, dict):
        stored.update(
            {
                k: v
                for k, v in orig.items()
                if isinstance(v, str)
                and k not in sealed
                and (allowed is None or not k.startswith("HTTP_") or k in allowed)
            }
        )
    meta: dict[str, Any] = {"environ": stored}
    if sealed:
        meta["sealed"] = sealed
    blob = encode_envelope(meta, body)
    if policy is not None and policy.payloads:
        blob = seal_blob(policy.cipher, blob)
    return blob


def read_body(request: Request, limit: int) -> bytes | None:
    """The request's body, read once (the view reads it again from the
    cache), or ``None`` when it is longer than ``limit`` bytes (or the app's
    ``MAX_CONTENT_LENGTH``): by its ``Content-Length``, or, for a chunked
    body, once one byte more than the limit has arrived (Werkzeug would
    silently cut it at the limit)."""
    environ = request.environ
    if environ.get("CONTENT_LENGTH", "0") in ("", "0") and not (
        environ.get("HTTP_TRANSFER_ENCODING") or environ.get("wsgi.input_terminated")
    ):
        return b""  # nothing to read (most GETs)
    cap = request.max_content_length
    if cap is None or cap > limit:
        cap = limit
    request.max_content_length = cap + 1
    try:
        body = request.get_data(cache=True)
    except RequestEntityTooLarge:
        return None
    return None if len(body) > cap else body


def build_environ(blob: bytes, cipher: Cipher | None = None) -> WSGIEnvironment:
    """Rebuild a WSGI environ from :func:`capture_request`'s output,
    credentials decrypted.

    :raises DecryptionError: what was stored encrypted cannot be decrypted.
    """
    meta, body = decode_envelope(open_blob(cipher, blob))
    stored: dict[str, str] = meta["environ"]
    for key in meta.get("sealed", ()):
        if cipher is None:
            raise DecryptionError("stored request is encrypted and no key was given")
        stored[key] = cipher.decrypt_text(stored[key], key.encode("ascii"))
    builder = EnvironBuilder(
        method=stored.get("REQUEST_METHOD", "GET"),
        base_url=f"{stored.get('wsgi.url_scheme', 'http')}://localhost/",
        input_stream=BytesIO(body),
        content_length=len(body),
    )
    try:
        environ = builder.get_environ()
    finally:
        builder.close()
    environ.update(stored)
    environ["CONTENT_LENGTH"] = str(len(body))
    environ["wsgi.input"] = BytesIO(body)
    environ["wsgi.errors"] = sys.stderr
    environ["wsgi.multithread"] = True
    environ["wsgi.multiprocess"] = True
    return environ


#: What :func:`describe_request` shows instead of a credential.
MASK = "********"
#: How much of a stored body :func:`describe_request` shows.
BODY_PREVIEW = 64 * 1024


def describe_request(
    blob: bytes, cipher: Cipher | None, sensitive: Collection[str] = ()
) -> dict[str, Any]:
    """A stored request for people to read: method, path, query, headers
    (credentials masked, never decrypted) and the body (as text when it is
    UTF-8, the first :data:`BODY_PREVIEW` bytes).

    :param sensitive: more header names (lower-case) to mask besides
        :data:`ALWAYS_SENSITIVE` and those stored encrypted.
    :raises DecryptionError: the whole request is encrypted and no key
        opens it.
    """
    meta, body = decode_envelope(open_blob(cipher, blob))
    stored: dict[str, str] = meta["environ"]
    masked_keys = set(meta.get("sealed", ())) | _environ_keys(
        ALWAYS_SENSITIVE | set(sensitive)
    )
    headers = []
    for key, value in stored.items():
        if key.startswith("HTTP_"):
            name = key[5:].replace("_", "-").title()
            headers.append([name, MASK if key in masked_keys else value])
    if stored.get("CONTENT_TYPE"):
        headers.append(["Content-Type", stored["CONTENT_TYPE"]])
    preview = body[:BODY_PREVIEW]
    try:
        text: str | None = preview.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    return {
        "method": stored.get("REQUEST_METHOD", "GET"),
        "path": stored.get("SCRIPT_NAME", "") + stored.get("PATH_INFO", ""),
        "query": stored.get("QUERY_STRING", ""),
        "headers": sorted(headers),
        "body": text,
        "body_size": len(body),
        "body_truncated": len(body) > BODY_PREVIEW,
    }


def with_run_id(headers: list[tuple[str, str]], run_id: str) -> list[tuple[str, str]]:
    """``headers`` with ``Durable-Run-Id`` (unless it is there)."""
    if not any(k.lower() == "durable-run-id" for k, _ in headers):
        headers = [*headers, ("Durable-Run-Id", run_id)]
    return headers


class CaptureMiddleware:
    """The bottom of ``app.wsgi_app``: buffers the response of a request
    that ran a durable view, stores it as the run's final response when the
    run is finished, and adds the ``Durable-Run-Id`` header.

    Other requests pass through with one extra call: nothing is buffered,
    no database is touched. The first request of a process calls
    ``on_first_request`` (which starts the scheduler without blocking).

    :param finish: stores an execution's final response.
    :param forget: drops an execution that ends without a final response.
    """

    def __init__(
        self,
        wsgi_app: WSGIApplication,
        finish: Callable[[Execution, bytes], None],
        forget: Callable[[Execution], None],
        on_first_request: Callable[[], None],
    ) -> None:
        self.wsgi_app = wsgi_app
        self.finish = finish
        self.forget = forget
        self.on_first_request = on_first_request
        self._pid = 0

    def __call__(
        self, environ: WSGIEnvironment, start_response: StartResponse
    ) -> Iterable[bytes]:
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self.on_first_request()
        captured: list[Any] = []
        chunks: list[bytes] = []

        def capture(
            status: str, headers: list[tuple[str, str]], exc_info: Any = None
        ) -> Callable[[bytes], object]:
            if CONTEXT_KEY not in environ:
                return start_response(status, headers, exc_info)
            captured[:] = [status, headers, exc_info]
            return chunks.append

        try:
            app_iter = self.wsgi_app(environ, capture)
        except BaseException:
            ex = environ.get(CONTEXT_KEY)
            if ex is not None:
                self._store_crash(ex, environ)
            raise
        ex = environ.get(CONTEXT_KEY)
        if ex is None:
            return app_iter
        if not captured:
            self.forget(ex)
            return app_iter
        try:
            chunks.extend(app_iter)
        finally:
            close = getattr(app_iter, "close", None)
            if close is not None:
                close()
        status, headers, exc_info = captured
        headers = with_run_id(list(headers), ex.id)
        body = b"".join(chunks)
        if ex.outcome in ("completed", "failed", "cancelled"):
            self.finish(ex, encode_response(status, headers, body))
        else:
            self.forget(ex)
        start_response(status, headers, exc_info)
        return [body]

    def _store_crash(self, ex: Execution, environ: WSGIEnvironment) -> None:
        """The app raised (``PROPAGATE_EXCEPTIONS``): store the 500 that a
        server would have sent."""
        if ex.outcome in ("suspended", "lost"):
            return
        ex.outcome = "failed"
        response = InternalServerError().get_response(environ)
        headers = with_run_id(list(response.headers.items()), ex.id)
        self.finish(ex, encode_response(response.status, headers, response.get_data()))


def replay(
    app: WSGIApplication, environ: WSGIEnvironment
) -> tuple[str, list[tuple[str, str]], bytes]:
    """Call the app with a rebuilt request as a server would; returns the
    response it sent. The final response of a run that reached its durable
    view is stored by :class:`CaptureMiddleware` on the way.

    :raises Exception: what the app raised (``PROPAGATE_EXCEPTIONS``).
    """
    app_iter, status, headers = run_wsgi_app(app, environ, buffered=True)
    try:
        body = b"".join(app_iter)
    finally:
        close = getattr(app_iter, "close", None)
        if close is not None:
            close()
    return status, list(headers.items()), body
