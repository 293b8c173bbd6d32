"""HTTP responses that the endpoint decorator and the blueprint share."""

from __future__ import annotations

import json
import logging
from typing import Any

from flask import Response

from .serde import decode_envelope, encode_envelope

log = logging.getLogger("flask_durable")


def json_response(
    code: int, header_run_id: str | None = None, /, **body: Any
) -> Response:
    """A small JSON response that needs no app context; with
    ``header_run_id`` it carries the ``Durable-Run-Id`` header."""
    response = Response(
        json.dumps(body, separators=(",", ":")),
        status=code,
        mimetype="application/json",
    )
    if header_run_id is not None:
        response.headers["Durable-Run-Id"] = header_run_id
    return response


def unavailable(error: Exception, run_id: str | None = None) -> Response:
    """``503`` with ``Retry-After`` for a database that cannot be used right
    now."""
    log.warning("flask-durable database unavailable: %s", error)
    response = json_response(
        503,
        run_id,
        error="the durable store is unavailable; retry shortly",
        **({"run_id": run_id} if run_id else {}),
    )
    response.headers["Retry-After"] = "2"
    return response


def prefers_async(header: str | None) -> bool:
    """Whether a ``Prefer`` header (RFC 7240) asks for ``respond-async``."""
    if not header:
        return False
    for part in header.split(","):
        if part.split(";", 1)[0].strip().lower() == "respond-async":
            return True
    return False


def go_wait(run_id: str, status: str, wait_url: str, prefer: str | None) -> Response:
    """``303`` to the wait URL, or ``202`` for ``Prefer: respond-async``."""
    response = json_response(
        202 if prefers_async(prefer) else 303,
        run_id,
        run_id=run_id,
        status=status,
        wait_url=wait_url,
    )
    response.headers["Location"] = wait_url
    if response.status_code == 202:
        response.headers["Preference-Applied"] = "respond-async"
    return response


def cancelled(run_id: str, reason: str) -> Response:
    """The final response of a cancelled (``409``) or timed-out (``504``)
    run."""
    if reason == "timeout":
        return json_response(
            504, run_id, error="run timed out", run_id=run_id, status="cancelled"
        )
    return json_response(
        409, run_id, error="run was cancelled", run_id=run_id, status="cancelled"
    )


def encode_response(status: str, headers: list[tuple[str, str]], body: bytes) -> bytes:
    """Pack a final response for the store."""
    return encode_envelope({"status": status, "headers": headers}, body)


def decode_response(blob: bytes) -> tuple[str, list[tuple[str, str]], bytes]:
    """Unpack what :func:`encode_response` wrote."""
    meta, body = decode_envelope(blob)
    return meta["status"], [(k, v) for k, v in meta["headers"]], body


def encode_flask_response(response: Response) -> bytes:
    """Pack a Flask response object for the store."""
    return encode_response(
        response.status, list(response.headers.items()), response.get_data()
    )


def stored_response(blob: bytes) -> Response:
    """A stored final response, status, headers and body as they were."""
    status, headers, body = decode_response(blob)
    return Response(body, status=status, headers=headers)
