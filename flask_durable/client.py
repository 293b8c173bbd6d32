"""Calling durable endpoints from Python: a :class:`requests.Session` that
makes retries safe and waits for the final response.

Needs ``requests`` (``pip install "flask-durable[client]"``); nothing else in
flask-durable imports this module.

.. code-block:: python

    from flask_durable.client import Session

    with Session(deadline=120) as http:
        r = http.post("http://trips.internal/book", json={"flight": "TP1234"})
        r.raise_for_status()  # the run's final response
"""

from __future__ import annotations

import email.utils
import random
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urljoin

import requests
from requests.structures import CaseInsensitiveDict

__all__ = ["DeadlineExceeded", "Session"]

#: Methods that get an ``Idempotency-Key`` when the caller gave none.
_UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
#: Answers of a proxy or of a server that is (re)starting or cannot reach
#: its database: tried again.
_RETRY_STATUSES = frozenset({502, 503, 504})
#: Errors after which the request may or may not have reached the server:
#: tried again, with the same key.
_RETRY_ERRORS = (
    requests.ConnectionError,
    requests.Timeout,
    requests.exceptions.ChunkedEncodingError,
)
#: ``Session.request``'s positional parameters after ``url``, in order.
_REQUEST_ARGS = (
    "params",
    "data",
    "headers",
    "cookies",
    "files",
    "auth",
    "timeout",
    "allow_redirects",
    "proxies",
    "hooks",
    "stream",
    "verify",
    "cert",
    "json",
)
#: Request headers not sent again with the ``GET`` of a wait URL.
_NOT_CARRIED = frozenset(
    {
        "content-type",
        "content-length",
        "content-encoding",
        "transfer-encoding",
        "cookie",
        "idempotency-key",
    }
)


class DeadlineExceeded(requests.exceptions.RequestException):
    """A :class:`Session` call did not end within its ``deadline``.

    ``response`` is the last answer received, if any (a ``202`` of a run
    still going, a ``503``, ...); the last connection error, if any, is the
    exception's ``__cause__``. The run itself goes on: ``GET`` its
    ``wait_url`` later (with the same session) to get its final response.
    """

    def __init__(
        self,
        message: str,
        *,
        response: requests.Response | None = None,
        request: requests.PreparedRequest | None = None,
        wait_url: str | None = None,
        run_id: str | None = None,
    ) -> None:
        super().__init__(message, response=response, request=request)
        #: The wait URL of the run the call was waiting for, if any.
        self.wait_url = wait_url
        #: The ``Durable-Run-Id`` of that run, if any.
        self.run_id = run_id


class Session(requests.Session):
    """A :class:`requests.Session` for durable endpoints (see :doc:`/http`).

    - Adds an ``Idempotency-Key`` (a random UUID) to ``POST``, ``PUT``,
      ``PATCH`` and ``DELETE`` requests unless the caller gave one (pass
      ``headers={"Idempotency-Key": None}`` to send none).
    - Follows wait URLs: sends ``Prefer: respond-async`` and polls the wait
      URL of a run that went asynchronous (``202``), sleeping what its
      ``Retry-After`` says between polls, until the run's final response,
      which is what the call returns. A ``303`` to a wait URL (a server or
      proxy that ignores ``Prefer``) is followed the same way, for as long
      as it takes. With ``allow_redirects=False``, the first answer is
      returned as it is.
    - Retries connection errors, timeouts and ``502``/``503``/``504``
      answers (after their ``Retry-After`` when they carry one, else with
      exponential backoff), with the same ``Idempotency-Key``: the server
      maps every try to one run, and no step runs twice because of a retry.
      A ``502``/``503``/``504`` that is a run's own final response (it
      carries ``Durable-Run-Id`` and no ``Retry-After``, like the ``504`` of
      a run that timed out) is returned, not retried.
    - Raises :class:`DeadlineExceeded` when a call, its retries and its
      polls included, would pass ``deadline`` seconds.

    A request is never sent again if it is unsafe and carries no
    ``Idempotency-Key``, or if its body can only be read once (a file
    object, a generator): its error or answer is what the call gives.
    Keyword arguments set the attributes of the same names.
    """

    def __init__(
        self,
        *,
        deadline: float | None = 600.0,
        follow_waits: bool = True,
        poll_interval: float = 1.0,
        max_retry_after: float = 30.0,
        backoff: float = 0.25,
        max_backoff: float = 10.0,
    ) -> None:
        super().__init__()
        #: Seconds one call may take in all, retries and polls included
        #: (``None``: no limit).
        self.deadline = deadline
        #: Follow wait URLs to the final response as described above
        #: (``False``: no ``Prefer``, and a ``303`` is an ordinary redirect
        #: for :mod:`requests`; keys and retries still apply).
        self.follow_waits = follow_waits
        #: Seconds between polls when an answer gives no ``Retry-After``.
        self.poll_interval = poll_interval
        #: The longest ``Retry-After`` obeyed, in seconds; longer ones are
        #: cut to this.
        self.max_retry_after = max_retry_after
        #: Seconds before the first retry after an error; doubled for each
        #: further one (with jitter), up to ``max_backoff``.
        self.backoff = backoff
        #: The longest pause between two retries after errors, in seconds.
        self.max_backoff = max_backoff

    def request(
        self, method: str, url: str | bytes, *args: Any, **kwargs: Any
    ) -> requests.Response:
        """Send a request as :meth:`requests.Session.request` does, with the
        key, retries and waiting described above."""
        if len(args) > len(_REQUEST_ARGS):
            raise TypeError(
                f"request() takes at most {2 + len(_REQUEST_ARGS)} positional arguments"
            )
        kwargs.update(zip(_REQUEST_ARGS, args, strict=False))
        method = method.upper()
        if isinstance(url, bytes):
            url = url.decode("utf-8")
        allow_redirects = kwargs.pop("allow_redirects", True)
        follow = self.follow_waits and allow_redirects
        headers: CaseInsensitiveDict[Any] = CaseInsensitiveDict(
            kwargs.pop("headers", None) or {}
        )
        if (
            method in _UNSAFE_METHODS
            and "Idempotency-Key" not in headers
            and "Idempotency-Key" not in self.headers
        ):
            headers["Idempotency-Key"] = uuid.uuid4().hex
        if follow:
            prefer = headers.get("Prefer", self.headers.get("Prefer"))
            if not prefer:
                headers["Prefer"] = "respond-async"
            elif "respond-async" not in str(prefer).lower():
                headers["Prefer"] = f"{prefer}, respond-async"
        send_kwargs: dict[str, Any] = {
            "timeout": kwargs.pop("timeout", None),
            "allow_redirects": allow_redirects,
        }
        send_kwargs.update(
            self.merge_environment_settings(
                url,
                kwargs.pop("proxies", None) or {},
                kwargs.pop("stream", None),
                kwargs.pop("verify", None),
                kwargs.pop("cert", None),
            )
        )
        prepared = self.prepare_request(
            requests.Request(
                method,
                url,
                headers=headers,
                data=kwargs.pop("data", None) or {},
                params=kwargs.pop("params", None) or {},
                **kwargs,
            )
        )
        end = None if self.deadline is None else time.monotonic() + self.deadline
        call = _Call(prepared, end)
        response = self._send(prepared, send_kwargs, call)
        while follow:
            wait_url = _wait_url(response)
            if wait_url is None:
                break
            call.wait_url = wait_url
            call.run_id = response.headers["Durable-Run-Id"]
            self._pause(self._poll_delay(response), call, response=response)
            response.close()
            response = self._send(
                self._poll_request(prepared, headers, wait_url, kwargs),
                dict(send_kwargs, allow_redirects=False),
                call,
            )
        return response

    def get_redirect_target(self, resp: requests.Response) -> str | None:
        """Where :mod:`requests` follows a redirect to; ``None`` for a
        ``303`` to a wait URL, which :meth:`request` follows itself."""
        if self.follow_waits and _wait_url(resp) is not None:
            return None
        return super().get_redirect_target(resp)

    # -- internals --------------------------------------------------------------

    def _send(
        self,
        prepared: requests.PreparedRequest,
        send_kwargs: dict[str, Any],
        call: _Call,
    ) -> requests.Response:
        """Send ``prepared``, again after errors and temporary answers."""
        failures = 0
        while True:
            try:
                response = self.send(prepared.copy(), **send_kwargs)
            except _RETRY_ERRORS as e:
                if isinstance(e, requests.exceptions.SSLError) or not _repeatable(
                    prepared
                ):
                    raise
                failures += 1
                self._pause(self._backoff(failures), call, error=e)
                continue
            if not _temporary(response) or not _repeatable(prepared):
                return response
            failures += 1
            delay = self._retry_after(response)
            self._pause(
                self._backoff(failures) if delay is None else delay,
                call,
                response=response,
            )
            response.close()

    def _poll_request(
        self,
        first: requests.PreparedRequest,
        headers: CaseInsensitiveDict[Any],
        wait_url: str,
        kwargs: dict[str, Any],
    ) -> requests.PreparedRequest:
        """The ``GET`` of a wait URL: the first request's headers and
        credentials (the server binds the wait URL to them), no body."""
        carried = CaseInsensitiveDict(
            {k: v for k, v in headers.items() if k.lower() not in _NOT_CARRIED}
        )
        auth = kwargs.get("auth")
        if self.should_strip_auth(str(first.url), wait_url):
            carried.pop("Authorization", None)
            auth = None
        return self.prepare_request(
            requests.Request(
                "GET",
                wait_url,
                headers=carried,
                cookies=kwargs.get("cookies"),
                auth=auth,
                hooks=kwargs.get("hooks"),
            )
        )

    def _poll_delay(self, response: requests.Response) -> float:
        """The pause before the next poll of a wait URL."""
        if response.status_code == 303:
            # The wait URL held this request while it could; no pause then.
            return max(0.0, self.poll_interval - response.elapsed.total_seconds())
        delay = self._retry_after(response)
        return self.poll_interval if delay is None else delay

    def _retry_after(self, response: requests.Response) -> float | None:
        """The answer's ``Retry-After`` (seconds or an HTTP date) in
        seconds, cut to ``max_retry_after``; ``None`` without one."""
        value = response.headers.get("Retry-After", "").strip()
        if not value:
            return None
        try:
            seconds = float(value)
        except ValueError:
            try:
                when = email.utils.parsedate_to_datetime(value)
            except (TypeError, ValueError):
                return None
            if when.tzinfo is None:
                when = when.replace(tzinfo=timezone.utc)
            seconds = (when - datetime.now(timezone.utc)).total_seconds()
        if seconds != seconds:  # NaN
            return None
        return min(max(seconds, 0.0), self.max_retry_after)

    def _backoff(self, failures: int) -> float:
        """The pause after the ``failures``-th error in a row."""
        delay = min(self.backoff * 2 ** (failures - 1), self.max_backoff)
        return delay * random.uniform(0.5, 1.0)

    def _pause(
        self,
        delay: float,
        call: _Call,
        *,
        response: requests.Response | None = None,
        error: BaseException | None = None,
    ) -> None:
        """Sleep ``delay`` seconds, or raise :class:`DeadlineExceeded` if
        the next try would come after the call's deadline."""
        if call.end is None or time.monotonic() + delay < call.end:
            time.sleep(delay)
            return
        first = call.request
        message = (
            f"{first.method} {first.url}: gave up, the deadline"
            f" ({self.deadline} s) would pass before the next try"
        )
        if call.wait_url is not None:
            message += f"; the run {call.run_id} is not finished: {call.wait_url}"
        if error is not None:
            message += f"; last error: {error}"
        elif response is not None:
            message += f"; last answer: {response.status_code} {response.reason}"
        raise DeadlineExceeded(
            message,
            response=response,
            request=first,
            wait_url=call.wait_url,
            run_id=call.run_id,
        ) from error


@dataclass
class _Call:
    """One call of :meth:`Session.request`: its request, its deadline (a
    :func:`time.monotonic` value) and the run it follows, if any."""

    request: requests.PreparedRequest
    end: float | None
    wait_url: str | None = None
    run_id: str | None = None


def _wait_url(response: requests.Response) -> str | None:
    """The wait URL a durable endpoint (or a wait URL) sent the client to:
    a ``303``, or a ``202`` answering ``Prefer: respond-async``."""
    headers = response.headers
    if "Durable-Run-Id" not in headers or "Location" not in headers:
        return None
    if response.status_code == 303 or (
        response.status_code == 202
        and "respond-async" in headers.get("Preference-Applied", "").lower()
    ):
        return urljoin(str(response.url), headers["Location"])
    return None


def _repeatable(prepared: requests.PreparedRequest) -> bool:
    """Whether a request may be sent again: safe, or with an
    ``Idempotency-Key``, and with a body that can be sent twice."""
    if prepared.method in _UNSAFE_METHODS and "Idempotency-Key" not in prepared.headers:
        return False
    return prepared.body is None or isinstance(prepared.body, (bytes, str))


def _temporary(response: requests.Response) -> bool:
    """Whether an answer is a temporary failure, to try again."""
    if response.status_code not in _RETRY_STATUSES:
        return False
    # A run's own final response (it carries the run id and no Retry-After,
    # like the 504 of a run that timed out) is an answer.
    return "Durable-Run-Id" not in response.headers or "Retry-After" in response.headers
