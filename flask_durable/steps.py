"""The ``step`` namespace: ``step.run``, ``step.sleep``, ``step.sleep_until``,
``step.wait_for_event`` and ``step.parallel``.

Every function here works only inside a view decorated with
``@durable.endpoint``; elsewhere it raises :class:`RuntimeError`.
"""

from __future__ import annotations

import contextvars
import random
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any, NoReturn, TypeVar

from flask import current_app

from . import clock
from .context import _cv_step, current_step, get_execution
from .durations import Duration, parse_duration, parse_instant
from .errors import (
    NonRetriableError,
    RetryAfterError,
    StepError,
    _Interrupt,
    _Suspend,
)
from .execution import Execution, _cv_branch, raise_for_failed
from .functions import FINISHED_EVENT
from .records import (
    STEP_COMPLETED,
    STEP_ERROR,
    STEP_FAILED,
    STEP_RUNNING,
    STEP_SLEEPING,
    STEP_WAITING,
    CurrentStep,
    StepRecord,
    WaitSpec,
)
from .serde import dump_json, encode_value, is_storable_text

T = TypeVar("T")

#: Slack when comparing a stored due time with the clock.
_EPSILON = 0.002


#: How long ``step.invoke`` waits without a ``timeout``.
_INVOKE_FOREVER = 366 * 86400.0


def _backoff(ctx: Execution, failures: int) -> float:
    config = ctx.config
    base = config.retry_backoff * (2 ** (failures - 1))
    return min(config.retry_backoff_max, base) * random.uniform(0.5, 1.0)


def run(step_id: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run ``fn(*args, **kwargs)`` once for this run and checkpoint its
    return value.

    On replay the stored value is returned without calling ``fn``. The value
    returned is always the stored (round-tripped) one, so the first execution
    and a replay see equal values.

    A failing ``fn`` is retried with exponential backoff (the run suspends and
    the client is redirected to the wait URL); once its retries are exhausted,
    or it raised :class:`NonRetriableError`, :class:`StepError` is raised.

    :param step_id: the step's name, unique within the view (a repeated
        name gets ``:1``, ``:2``, ...).
    :param fn: the function to call.
    :raises TypeError: when ``fn`` returns a value that cannot be stored.
    """
    ctx = get_execution("step.run")
    if not callable(fn):
        raise TypeError(f"step.run({step_id!r}, ...) needs a callable, not {fn!r}")
    sid = ctx.unique_id(step_id)
    rec = ctx.memo.get(sid)
    if rec is not None:
        if rec.status == STEP_COMPLETED:
            return ctx.load_output(rec.output)
        if rec.status == STEP_FAILED:
            raise_for_failed(rec)
        if (
            rec.status == STEP_ERROR
            and rec.due_at
            and rec.due_at > clock.now() + _EPSILON
        ):
            raise ctx.interrupted(_Suspend(rec.due_at, "scheduled"))
    ctx.boundary()
    config = ctx.config
    rec = ctx.next_record(sid, STEP_RUNNING)
    if len(ctx.memo) >= config.max_steps and sid not in ctx.memo:
        rec.status = STEP_FAILED
        rec.error = dump_json(
            [
                "ValueError",
                f"the run has more than DURABLE_MAX_STEPS ({config.max_steps}) steps",
            ]
        )
        rec.finished_at = clock.now()
        ctx.checkpoint(rec)
        raise_for_failed(rec)
    attempt = rec.attempts
    hooks = ctx.hooks
    if hooks is not None:
        fn = hooks.step_function(ctx, sid, fn)
    token = _cv_step.set(CurrentStep(sid, attempt, ctx.id))
    try:
        value = fn(*args, **kwargs)
    except _Interrupt:
        raise
    except Exception as error:
        _failed(ctx, rec, error)
    finally:
        _cv_step.reset(token)
    try:
        text, value = encode_value(value)
    except TypeError as e:
        raise TypeError(
            f"step {sid!r} returned a value that cannot be stored ({e}); return"
            " JSON-like data: dict, list, str, int, float, bool, None, tuple,"
            " bytes, UUID or datetime"
        ) from None
    rec.attempts = attempt + 1
    rec.finished_at = clock.now()
    rec.due_at = None
    if len(text) > config.max_step_output:
        rec.status = STEP_FAILED
        rec.error = dump_json(
            [
                "ValueError",
                f"output is {len(text)} bytes, over DURABLE_MAX_STEP_OUTPUT"
                f" ({config.max_step_output})",
            ]
        )
    else:
        rec.status = STEP_COMPLETED
        rec.output = ctx.stored_output(text)
        rec.error = None
    ctx.checkpoint(rec)
    if rec.status == STEP_FAILED:
        raise_for_failed(rec)
    if hooks is not None:
        hooks.step_committed(ctx, sid)
    return value


def _failed(ctx: Execution, rec: StepRecord, error: Exception) -> NoReturn:
    """Record a failed attempt: retry later (suspend) or fail for good."""
    now = clock.now()
    retry_at: float | None = None
    if not isinstance(error, NonRetriableError) and rec.attempts < ctx.retries:
        if isinstance(error, RetryAfterError):
            after = error.retry_after
            try:
                if isinstance(after, (datetime, str)) and not _looks_like_duration(
                    after
                ):
                    retry_at = parse_instant(after)
                else:
                    retry_at = now + parse_duration(after)  # type: ignore[arg-type]
            except (TypeError, ValueError):
                retry_at = now + _backoff(ctx, rec.attempts + 1)
            retry_at = max(retry_at, now)
        else:
            retry_at = now + _backoff(ctx, rec.attempts + 1)
    ctx.attempt_failed(rec, error, will_retry=retry_at is not None)
    if retry_at is None:
        rec.status = STEP_FAILED
        rec.finished_at = now
        rec.due_at = None
        ctx.checkpoint(rec)
        raise StepError(rec.step_id, type(error).__name__, str(error)) from error
    rec.status = STEP_ERROR
    rec.due_at = retry_at
    ctx.park(rec)
    raise ctx.interrupted(_Suspend(retry_at, "scheduled")) from error


def _looks_like_duration(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        parse_duration(value)
    except ValueError:
        return False
    return True


def sleep(step_id: str, duration: Duration) -> None:
    """Suspend the run for ``duration`` without holding a thread.

    :param duration: ``"30s"``, ``"5m"``, ``"1h30m"``, ``"2d"``, a number of
        seconds or a :class:`~datetime.timedelta`.
    :raises ValueError: for a malformed duration.
    """
    ctx = get_execution("step.sleep")
    sid = ctx.unique_id(step_id)
    try:
        seconds = parse_duration(duration)
    except (TypeError, ValueError) as e:
        raise type(e)(f"step.sleep({sid!r}): {e}") from None
    _sleep(ctx, sid, lambda now: now + seconds)


def sleep_until(step_id: str, when: datetime | str) -> None:
    """Suspend the run until ``when`` (a :class:`~datetime.datetime`, naive
    means UTC, or an ISO-8601 string). A time in the past does not sleep.
    """
    ctx = get_execution("step.sleep_until")
    sid = ctx.unique_id(step_id)
    try:
        at = parse_instant(when)
    except (TypeError, ValueError) as e:
        raise type(e)(f"step.sleep_until({sid!r}): {e}") from None
    _sleep(ctx, sid, lambda now: at)


def _sleep(ctx: Execution, sid: str, wake: Callable[[float], float]) -> None:
    rec = ctx.memo.get(sid)
    now = clock.now()
    if rec is not None:
        if rec.status == STEP_COMPLETED:
            return
        if rec.status == STEP_SLEEPING and rec.due_at and rec.due_at > now + _EPSILON:
            raise ctx.interrupted(_Suspend(rec.due_at, "sleeping"))
    ctx.boundary()
    rec = ctx.next_record(sid, STEP_SLEEPING)
    due = rec.due_at if rec.status == STEP_SLEEPING and rec.due_at else wake(now)
    if due <= now + _EPSILON:
        rec.status = STEP_COMPLETED
        rec.output = "null"
        rec.attempts += 1
        rec.finished_at = now
        rec.due_at = None
        ctx.settle(rec)
        return
    rec.status = STEP_SLEEPING
    rec.due_at = due
    ctx.park(rec)
    raise ctx.interrupted(_Suspend(due, "sleeping"))


def wait_for_event(
    step_id: str,
    *,
    event: str,
    match: Mapping[str, Any] | None = None,
    timeout: Duration,
) -> dict[str, Any] | None:
    """Suspend the run until an event named ``event`` is sent after the wait
    began and each ``match`` entry equals the event's field at that dotted
    path (``{"data.booking_id": 42}``).

    :returns: the event (``name``, ``data``, ``id``, ``ts`` in milliseconds)
        or ``None`` when ``timeout`` passes first.
    """
    ctx = get_execution("step.wait_for_event")
    sid = ctx.unique_id(step_id)
    if (
        not isinstance(event, str)
        or not 1 <= len(event) <= 255
        or not is_storable_text(event)
    ):
        raise ValueError(
            f"step.wait_for_event({sid!r}): event must be a name of 1 to 255"
            f" characters, without NUL or a lone surrogate: {event!r}"
        )
    if match is not None and not isinstance(match, Mapping):
        raise TypeError(f"step.wait_for_event({sid!r}): match must be a mapping")
    try:
        seconds = parse_duration(timeout)
        match_text = dump_json(dict(match or {}))
    except (TypeError, ValueError) as e:
        raise type(e)(f"step.wait_for_event({sid!r}): {e}") from None
    return _wait_for_event(ctx, sid, event, match_text, seconds)


def _wait_for_event(
    ctx: Execution, sid: str, event: str, match_text: str, seconds: float
) -> dict[str, Any] | None:
    rec = ctx.memo.get(sid)
    now = clock.now()
    if rec is not None:
        if rec.status == STEP_COMPLETED:
            return ctx.load_output(rec.output)
        if rec.status == STEP_WAITING and rec.due_at and rec.due_at > now + _EPSILON:
            raise ctx.interrupted(_Suspend(rec.due_at, "waiting"))
        if rec.status == STEP_WAITING:
            rec.status = STEP_COMPLETED
            rec.output = "null"
            rec.attempts += 1
            rec.finished_at = now
            rec.due_at = None
            ctx.checkpoint(rec)
            return None
    ctx.boundary()
    rec = ctx.next_record(sid, STEP_WAITING)
    rec.status = STEP_WAITING
    rec.due_at = now + seconds
    ctx.park(rec, WaitSpec(sid, event, match_text, now, rec.due_at))
    raise ctx.interrupted(_Suspend(rec.due_at, "waiting"))


def invoke(
    step_id: str,
    function: Any,
    data: Mapping[str, Any] | None = None,
    timeout: Duration | None = None,
) -> Any:
    """Start a run of a durable function (by id or the object
    :meth:`Durable.function <flask_durable.Durable.function>` returned), and
    suspend until it ends, holding no thread.

    The child is started once, whatever happens to this run; it gets the
    event ``durable/function.invoked`` with ``data``.

    :returns: the child's output, or ``None`` when ``timeout`` passes first
        (the child goes on).
    :raises StepError: the child failed or was cancelled.
    :raises ValueError: no such function in this app, or bad data.
    """
    ctx = get_execution("step.invoke")
    sid = ctx.unique_id(step_id)
    if data is not None and not isinstance(data, Mapping):
        raise TypeError(f"step.invoke({sid!r}): data must be a mapping or None")
    try:
        seconds = parse_duration(timeout) if timeout is not None else _INVOKE_FOREVER
    except (TypeError, ValueError) as e:
        raise type(e)(f"step.invoke({sid!r}): {e}") from None
    rec = ctx.memo.get(sid)
    starter = current_app.extensions["durable"]
    if rec is None or rec.status != STEP_COMPLETED:
        fn_id = function if isinstance(function, str) else getattr(function, "id", None)
        child = starter.invoke(fn_id, ctx.id, sid, dict(data or {}))
    else:
        child = ""
    match_text = dump_json({"data.run_id": child}) if child else "{}"
    finished = _wait_for_event(ctx, sid, FINISHED_EVENT, match_text, seconds)
    if finished is None:
        return None
    result = finished["data"]
    if result["status"] != "completed":
        raise StepError(
            sid,
            "FunctionFailed" if result["status"] == "failed" else "FunctionCancelled",
            str(result.get("error") or result["status"]),
        )
    return result.get("output")


def send_event(step_id: str, name: str, data: Any = None, id: str | None = None) -> str:
    """Send an event once per run (a retry or replay sends nothing more).

    :returns: the event id (by default derived from the run and the step,
        so that a crash between sending and checkpointing is harmless).
    """
    ctx = get_execution("step.send_event")
    event_id = id
    # Bad input is an error here, not a step failing (and retried).
    current_app.extensions["durable"].events.check(name, data, id or "check")

    def send() -> str:
        sid = current_step.id
        given = event_id or f"{ctx.id}:{sid}"
        sent: str = current_app.extensions["durable"].send(name, data, given)
        return sent

    return run(step_id, send)


def stream(
    step_id: str, fn: Callable[..., Iterable[Any]], *args: Any, **kwargs: Any
) -> list[Any]:
    """Run ``fn(*args, **kwargs)``, an iterable (a generator of model
    tokens, say), once for this run, publishing each item to the run's
    stream as it is produced; checkpoint and return the list of items.

    Clients read the stream at ``<prefix>/stream/<token>`` (or by asking
    the endpoint for ``text/event-stream``). On replay the stored list is
    returned and nothing is published again. An attempt that fails
    publishes ``reset`` for the step before the retry streams again; so
    does a step that starts again in a resumed run (after a crash).

    Items are ``str`` or JSON-like values. Retries, limits and errors are
    those of :func:`run`.
    """
    ctx = get_execution("step.stream")
    if not callable(fn):
        raise TypeError(f"step.stream({step_id!r}, ...) needs a callable, not {fn!r}")
    lifecycle = current_app.extensions["durable"]

    def collect() -> list[Any]:
        sid = current_step.id
        publisher = lifecycle.publisher_for(ctx)
        publisher.begin_step(sid)
        items: list[Any] = []
        try:
            for item in fn(*args, **kwargs):
                items.append(item)
                publisher.publish("chunk", {"step": sid, "data": item})
        except Exception:
            publisher.publish("reset", {"step": sid})
            raise
        publisher.publish("step", {"step": sid, "status": "completed"})
        return items

    return run(step_id, collect)


def parallel(*thunks: Callable[[], Any]) -> tuple[Any, ...]:
    """Run each zero-argument callable concurrently and return their
    results in order.

    Each branch is normally one :func:`run`; branches are checkpointed and
    retried on their own, and a branch that completed is never run again. A
    branch that will be retried suspends the run only after the others have
    finished. A branch that failed for good raises :class:`StepError` here.
    """
    ctx = get_execution("step.parallel")
    for thunk in thunks:
        if not callable(thunk):
            raise TypeError(f"step.parallel() takes callables, not {thunk!r}")
    if not thunks:
        return ()
    workers = max(1, min(len(thunks), ctx.config.max_parallel))
    results: list[Any] = [None] * len(thunks)
    suspends: list[_Suspend] = []
    interrupts: list[BaseException] = []
    failures: list[BaseException] = []
    with ThreadPoolExecutor(workers, thread_name_prefix="durable-branch") as pool:
        futures = [pool.submit(_branch, contextvars.copy_context(), t) for t in thunks]
        for i, future in enumerate(futures):
            try:
                results[i] = future.result()
            except _Suspend as s:
                suspends.append(s)
            except _Interrupt as e:
                interrupts.append(e)
            except BaseException as e:  # noqa: B036 - re-raised below
                failures.append(e)
    if interrupts:
        raise ctx.interrupted(interrupts[0])  # type: ignore[arg-type]
    step_errors = [f for f in failures if isinstance(f, StepError)]
    if step_errors or failures:
        raise (step_errors or failures)[0]
    if suspends:
        first = min(suspends, key=lambda s: s.due_at)
        raise ctx.interrupted(_Suspend(first.due_at, first.status))
    return tuple(results)


def _branch(context: contextvars.Context, thunk: Callable[[], T]) -> T:
    """Run one ``step.parallel`` branch in a copy of the view's context."""
    context.run(_cv_branch.set, True)
    return context.run(thunk)
