"""The OpenAPI 3.1 document of the JSON API (``<prefix>/api/openapi.json``)."""

from __future__ import annotations

from typing import Any

from .records import RunStatus

_TIME = {"type": ["string", "null"], "format": "date-time"}
_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "string"}},
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": schema}},
    }


def _errors(*codes: int) -> dict[str, Any]:
    text = {
        400: "Bad input",
        403: "Refused by the access rule or the CSRF check",
        404: "No such run in this app",
        409: "The run is not in a state that allows this",
        413: "An event over DURABLE_MAX_EVENT_SIZE",
        503: "The database is unavailable; retry",
    }
    return {str(c): _json(_ref("Error"), text[c]) for c in codes}


_RUN_ID = {
    "name": "run_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "minLength": 1},
}
_CSRF = {
    "name": "X-CSRF-Token",
    "in": "header",
    "required": True,
    "description": "The token of GET /csrf, with the cookie it sets.",
    "schema": {"type": "string"},
}


def _action(summary: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "summary": summary,
        "parameters": [_RUN_ID, _CSRF],
        "responses": {
            "202": _json(_ref("Accepted"), "Done; the run is due now"),
            **_errors(400, 403, 404, 409, 503),
        },
    }
    if body is not None:
        operation["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": body}},
        }
    return {"post": operation}


def document(prefix: str) -> dict[str, Any]:
    """The document, for an API mounted at ``<prefix>/api``."""
    statuses = [s.value for s in RunStatus]
    summary = {
        "type": "object",
        "required": ["id", "endpoint", "status", "attempt"],
        "properties": {
            "id": {"type": "string"},
            "endpoint": {"type": "string"},
            "status": {"type": "string", "enum": statuses},
            "attempt": {"type": "integer", "minimum": 0},
            "created_at": _TIME,
            "updated_at": _TIME,
            "finished_at": _TIME,
            "due_at": _TIME,
            "error": {"type": ["string", "null"]},
        },
    }
    step = {
        "type": "object",
        "required": ["id", "status", "attempts"],
        "properties": {
            "id": {"type": "string"},
            "status": {"type": "string"},
            "attempts": {"type": "integer"},
            "output": {},
            "error": {"type": ["object", "null"]},
            "started_at": _TIME,
            "finished_at": _TIME,
            "due_at": _TIME,
            "attempt_errors": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "attempt": {"type": "integer"},
                        "type": {"type": "string"},
                        "message": {"type": "string"},
                        "traceback": {"type": "string"},
                        "at": _TIME,
                    },
                },
            },
        },
    }
    run = {
        "allOf": [
            _ref("RunSummary"),
            {
                "type": "object",
                "properties": {
                    "steps": {"type": "array", "items": _ref("Step")},
                    "request": {"type": ["object", "null"]},
                    "response": {"type": ["object", "null"]},
                },
            },
        ]
    }
    event = {
        "type": "object",
        "required": ["name"],
        "properties": {
            "name": {"type": "string", "minLength": 1},
            "data": {"type": ["object", "null"]},
            "id": {"type": ["string", "null"]},
            "ts": {"type": ["number", "null"]},
        },
        "additionalProperties": False,
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "flask-durable operations API",
            "version": "1",
            "description": (
                "Read and steer the durable runs of one app. Every route is"
                " subject to the dashboard's access rule; POSTs also need a"
                " CSRF token."
            ),
        },
        "servers": [{"url": f"{prefix}/api"}],
        "paths": {
            "/runs": {
                "get": {
                    "summary": "A page of runs, newest first",
                    "parameters": [
                        {
                            "name": "status",
                            "in": "query",
                            "schema": {"type": "string", "enum": statuses},
                        },
                        {
                            "name": "endpoint",
                            "in": "query",
                            "schema": {"type": "string"},
                        },
                        {
                            "name": "q",
                            "in": "query",
                            "description": "A run id or an idempotency key",
                            "schema": {"type": "string"},
                        },
                        {
                            "name": "limit",
                            "in": "query",
                            "schema": {
                                "type": "integer",
                                "minimum": 1,
                                "maximum": 1000,
                            },
                        },
                        {"name": "cursor", "in": "query", "schema": {"type": "string"}},
                    ],
                    "responses": {
                        "200": _json(
                            {
                                "type": "object",
                                "required": ["runs", "next_cursor"],
                                "properties": {
                                    "runs": {
                                        "type": "array",
                                        "items": _ref("RunSummary"),
                                    },
                                    "next_cursor": {"type": ["string", "null"]},
                                },
                            },
                            "The runs, and the cursor of the next page",
                        ),
                        **_errors(400, 403, 503),
                    },
                }
            },
            "/runs/{run_id}": {
                "get": {
                    "summary": "One run with its steps, request and response",
                    "parameters": [_RUN_ID],
                    "responses": {
                        "200": _json(_ref("Run"), "The run"),
                        **_errors(403, 404, 503),
                    },
                }
            },
            "/runs/{run_id}/retry": _action(
                "Resume a failed run from its failed step, with fresh attempts"
            ),
            "/runs/{run_id}/cancel": _action("Cancel a run that has not finished"),
            "/runs/{run_id}/rewind": _action(
                "Run a step and every step after it again",
                {
                    "type": "object",
                    "required": ["step"],
                    "properties": {"step": {"type": "string", "minLength": 1}},
                },
            ),
            "/events": {
                "post": {
                    "summary": "Send one event or a list of up to 1000",
                    "parameters": [_CSRF],
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {
                                    "oneOf": [
                                        _ref("Event"),
                                        {
                                            "type": "array",
                                            "items": _ref("Event"),
                                            "minItems": 1,
                                            "maxItems": 1000,
                                        },
                                    ]
                                }
                            }
                        },
                    },
                    "responses": {
                        "202": _json(
                            {
                                "type": "object",
                                "properties": {
                                    "ids": {
                                        "type": "array",
                                        "items": {"type": "string"},
                                    }
                                },
                            },
                            "The events' ids",
                        ),
                        **_errors(400, 403, 413, 503),
                    },
                }
            },
            "/flow": {
                "get": {
                    "summary": "Each flow-control key's running and queued runs",
                    "responses": {
                        "200": _json(
                            {
                                "type": "object",
                                "properties": {
                                    "keys": {
                                        "type": "array",
                                        "items": {
                                            "type": "object",
                                            "properties": {
                                                "key": {"type": "string"},
                                                "endpoint": {"type": "string"},
                                                "running": {"type": "integer"},
                                                "queued": {"type": "integer"},
                                                "limit": {"type": ["integer", "null"]},
                                            },
                                        },
                                    }
                                },
                            },
                            "The keys",
                        ),
                        **_errors(403, 503),
                    },
                }
            },
            "/csrf": {
                "get": {
                    "summary": "A CSRF token (and its cookie) for POSTs",
                    "responses": {
                        "200": _json(
                            {
                                "type": "object",
                                "properties": {"csrf_token": {"type": "string"}},
                            },
                            "The token",
                        ),
                        **_errors(403),
                    },
                }
            },
            "/openapi.json": {
                "get": {
                    "summary": "This document",
                    "responses": {"200": {"description": "OpenAPI 3.1"}},
                }
            },
        },
        "components": {
            "schemas": {
                "Error": _ERROR,
                "RunSummary": summary,
                "Step": step,
                "Run": run,
                "Event": event,
                "Accepted": {
                    "type": "object",
                    "properties": {
                        "run_id": {"type": "string"},
                        "status": {"type": "string"},
                    },
                },
            }
        },
    }
