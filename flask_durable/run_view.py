"""How the dashboard shows a run: times, durations, values as JSON,
request and response bodies, and the waterfall of its steps.

Plain data for the templates (:class:`RunView`); nothing here is HTML, and
the templates escape all of it.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from .records import (
    STEP_COMPLETED,
    STEP_ERROR,
    STEP_FAILED,
    STEP_RUNNING,
    STEP_SLEEPING,
    STEP_WAITING,
    RunInfo,
    StepInfo,
)
from .replay import ALWAYS_SENSITIVE, MASK

#: Characters of a step output shown (the rest is cut).
OUTPUT_PREVIEW = 4000
#: Characters of a request or response body shown.
BODY_PREVIEW = 20_000
#: JSON bodies up to this many characters are shown indented.
_PRETTY_MAX = 200_000


def fmt_time(value: datetime | None) -> str:
    """``2026-12-01 12:00:03.123`` (UTC), or an empty string."""
    if value is None:
        return ""
    return value.strftime("%Y-%m-%d %H:%M:%S.") + f"{value.microsecond // 1000:03d}"


def fmt_duration(seconds: float | None) -> str:
    """A short human duration: ``12 ms``, ``1.25 s``, ``3m 05s``, ``2h 10m``."""
    if seconds is None:
        return ""
    seconds = max(seconds, 0.0)
    if seconds < 0.0005:
        return "<1 ms"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.2f} s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h {minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d {hours:02d}h"


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    return repr(value)


def pretty(value: Any, limit: int = OUTPUT_PREVIEW) -> tuple[str, bool]:
    """A value as indented JSON (other types by their ``repr``), cut to
    ``limit`` characters: ``(text, truncated)``. Shown as text, never as
    HTML."""
    try:
        text = json.dumps(value, indent=2, ensure_ascii=False, default=_json_default)
    except (TypeError, ValueError, RecursionError):
        text = repr(value)
    if len(text) > limit:
        return text[:limit], True
    return text, False


@dataclass
class Body:
    """A request or response body as the page shows it."""

    text: str | None
    size: int
    truncated: bool

    @classmethod
    def of(cls, raw: bytes | str | None, size: int, content_type: str) -> Body:
        if raw is None:
            return cls(None, size, False)
        if isinstance(raw, bytes):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                return cls(None, size, False)
        else:
            text = raw
        if "json" in content_type.lower() and len(text) <= _PRETTY_MAX:
            try:
                text = json.dumps(json.loads(text), indent=2, ensure_ascii=False)
            except (ValueError, RecursionError):
                pass
        truncated = len(text) > BODY_PREVIEW
        return cls(text[:BODY_PREVIEW], size, truncated)


def _content_type(headers: Iterable[Iterable[str]]) -> str:
    for name, value in headers:
        if name.lower() == "content-type":
            return value
    return ""


@dataclass
class ResponseView:
    """The final response: status, headers (cookies masked) and body."""

    status: int
    headers: list[tuple[str, str]]
    body: Body


def _response_view(run: RunInfo, hidden: Collection[str]) -> ResponseView | None:
    if run.response is None:
        return None
    status, headers, body = run.response
    shown = [(k, MASK if k.lower() in hidden else v) for k, v in headers]
    return ResponseView(status, shown, Body.of(body, len(body), _content_type(shown)))


# -- the waterfall -------------------------------------------------------------


@dataclass
class Segment:
    """A piece of a step's bar, in percent of the timeline."""

    kind: str  # "done", "failed", "active", "pending"
    left: float
    width: float
    title: str


@dataclass
class Attempt:
    """A failed attempt of a step."""

    number: int
    type: str
    message: str
    traceback: str
    at: datetime | None
    offset: str


@dataclass
class StepView:
    """One row of the waterfall."""

    step: StepInfo
    duration: str
    segments: list[Segment]
    marks: list[tuple[float, str]]
    attempts: list[Attempt]
    pending: str
    output: str | None
    output_truncated: bool
    summary: str


@dataclass
class Timeline:
    steps: list[StepView] = field(default_factory=list)
    total: str = ""
    middle: str = ""
    #: Where the latest due time lies, when it is off the right edge.
    beyond: str = ""


def _ts(value: datetime | None) -> float | None:
    return None if value is None else value.timestamp()


def _attempt_times(step: StepInfo) -> list[float]:
    times = []
    for entry in step.attempt_errors:
        at = entry.get("at")
        if isinstance(at, datetime):
            times.append(at.timestamp())
    return times


def timeline(run: RunInfo, now: float) -> Timeline:
    """Place every step on one time axis starting at the run's creation: a
    bar per step from its start to its end, split at each failed attempt,
    and a dashed part up to when a sleep, wait or retry is due."""
    starts = [t for s in run.steps if (t := _ts(s.started_at)) is not None]
    start = _ts(run.created_at) or (min(starts) if starts else now)
    known = [start, *starts]
    dues: list[float] = []
    for s in run.steps:
        known.extend(_attempt_times(s))
        finished = _ts(s.finished_at)
        if finished is not None:
            known.append(finished)
        due = _ts(s.due_at)
        if due is not None and s.status in (STEP_SLEEPING, STEP_WAITING, STEP_ERROR):
            dues.append(due)
    run_end = _ts(run.finished_at)
    if run_end is not None:
        known.append(run_end)
    if not run.is_terminal:
        known.append(now)
    end = max(known)
    span = max(end - start, 0.001)
    beyond = ""
    if dues and not run.is_terminal and max(dues) > end:
        # A far due time would squash every bar: show at most half a span
        # more, and let the pending bar run off the edge.
        if max(dues) > end + span / 2:
            beyond = f"due at +{fmt_duration(max(dues) - start)}"
        end = min(max(dues), end + span / 2)
    scale = _Scale(start, max(end - start, 0.001))
    view = Timeline(
        total=fmt_duration(scale.span),
        middle=fmt_duration(scale.span / 2),
        beyond=beyond,
    )
    for s in run.steps:
        view.steps.append(_step_view(s, run, now, scale))
    return view


@dataclass
class _Scale:
    """Times to percents of the timeline's width."""

    start: float
    span: float

    def pct(self, t: float) -> float:
        return round(min(max((t - self.start) / self.span * 100, 0.0), 100.0), 3)

    def segment(self, kind: str, a: float, b: float, title: str) -> Segment:
        left = self.pct(a)
        return Segment(kind, left, max(self.pct(b) - left, 0.4), title)


def _step_view(s: StepInfo, run: RunInfo, now: float, scale: _Scale) -> StepView:
    start = scale.start
    segment = scale.segment
    pct = scale.pct
    began = _ts(s.started_at) or start
    finished = _ts(s.finished_at)
    due = _ts(s.due_at)
    segments: list[Segment] = []
    marks: list[tuple[float, str]] = []
    attempts: list[Attempt] = []
    previous = began
    for entry in s.attempt_errors:
        at = entry.get("at")
        at_ts = at.timestamp() if isinstance(at, datetime) else previous
        number = int(entry.get("attempt", len(attempts))) + 1
        label = f"attempt {number} failed after {fmt_duration(at_ts - previous)}"
        segments.append(segment("failed", previous, at_ts, label))
        marks.append((pct(at_ts), f"attempt {number}: {entry.get('type', '')}"))
        attempts.append(
            Attempt(
                number=number,
                type=str(entry.get("type", "")),
                message=str(entry.get("message", "")),
                traceback=str(entry.get("traceback", "")),
                at=at if isinstance(at, datetime) else None,
                offset=f"+{fmt_duration(at_ts - start)}",
            )
        )
        previous = at_ts
    pending = ""
    if s.status == STEP_COMPLETED and finished is not None:
        segments.append(segment("done", previous, finished, "completed"))
        duration = fmt_duration(finished - began)
    elif s.status == STEP_FAILED:
        end = finished if finished is not None else previous
        if end > previous or not segments:
            segments.append(segment("failed", previous, end, "failed"))
        duration = fmt_duration(end - began)
    elif s.status == STEP_RUNNING:
        end = now if not run.is_terminal else (_ts(run.finished_at) or now)
        segments.append(segment("active", previous, end, "running"))
        duration = f"running for {fmt_duration(end - began)}"
    else:  # sleeping, waiting, or a failed attempt whose retry is due
        words = {
            STEP_SLEEPING: "sleeping until",
            STEP_WAITING: "waiting for an event until",
            STEP_ERROR: "retry due at",
        }
        if due is not None:
            pending = f"{words.get(s.status, 'due at')} {fmt_time(s.due_at)} UTC"
            segments.append(segment("pending", previous, due, pending))
            duration = f"{fmt_duration(max(previous, min(now, due)) - began)} so far"
        else:
            duration = ""
    output, cut = (None, False)
    if s.status == STEP_COMPLETED:
        output, cut = pretty(s.output)
    summary = f"{s.id}: {s.status}"
    if duration:
        summary += f", {duration}"
    if attempts:
        summary += f", {len(attempts)} failed attempt(s)"
    return StepView(
        step=s,
        duration=duration,
        segments=segments,
        marks=marks,
        attempts=attempts,
        pending=pending,
        output=output,
        output_truncated=cut,
        summary=summary,
    )


@dataclass
class RunView:
    """Everything the run page shows of a run."""

    run: RunInfo
    timeline: Timeline
    #: How long the run took (or has been going).
    duration: str
    #: The stored request (``None``: encrypted with a key this app lacks),
    #: its body as a :class:`Body`.
    stored_request: dict[str, Any] | None
    response: ResponseView | None


def run_view(run: RunInfo, now: float, sensitive: Collection[str] = ()) -> RunView:
    """What the run page shows of ``run`` at ``now`` (a POSIX time).

    :param sensitive: more header names (lower-case) to mask in the final
        response, besides credentials and ``Set-Cookie``.
    """
    created = _ts(run.created_at)
    end = _ts(run.finished_at) if run.is_terminal else now
    stored = None
    if run.request is not None:
        req = run.request
        body = Body.of(
            req.get("body"),
            int(req.get("body_size", 0)),
            _content_type(req.get("headers", [])),
        )
        if req.get("body_truncated") and body.text is not None:
            body.truncated = True
        stored = {**req, "body": body}
    hidden = ALWAYS_SENSITIVE | {"set-cookie"} | {h.lower() for h in sensitive}
    return RunView(
        run=run,
        timeline=timeline(run, now),
        duration=fmt_duration(end - created) if created and end else "",
        stored_request=stored,
        response=_response_view(run, hidden),
    )
