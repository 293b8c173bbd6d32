"""Research assistant: a durable endpoint that chains several "model"
calls and streams the answer to the browser as it is written.

Run it from this directory with ``flask --app app run``, then open
http://127.0.0.1:5000/. The "model" is a deterministic stand-in in this
process that yields words with small delays (no network). Tick "make the
writer fail once" to see a call fail in the middle of its stream: the page
drops what that step had written, and the retry streams it again.

- ``step.parallel`` runs two searches at once;
- ``step.stream`` publishes every word to the run's stream and checkpoints
  the list, so a replay (after a crash, a retry) never calls the model
  again for a finished step;
- the page reads the stream with the extension's ``/durable/stream.js``.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from typing import Any

from flask import Flask, current_app, jsonify, render_template, request

from flask_durable import Durable, current_step, step

durable = Durable()

SOURCES = {
    "web": [
        "durable execution keeps finished work",
        "retries resume at the failed step",
    ],
    "papers": [
        "checkpoints bound the work lost to a crash",
        "replay needs determinism",
    ],
}


def search(where: str, question: str) -> list[str]:
    """A stand-in search: a little slow, always the same results."""
    time.sleep(current_app.config["MODEL_DELAY"] * 5)
    return [f"{note} ({where})" for note in SOURCES[where]]


def model(prompt: str, words: int, fail: bool = False) -> Iterator[str]:
    """A stand-in language model: yields ``words`` words, derived from the
    prompt, one every ``MODEL_DELAY`` seconds; with ``fail``, raises in the
    middle of its answer."""
    delay = current_app.config["MODEL_DELAY"]
    vocabulary = (
        "durable runs keep every finished step so a failure costs only the"
        " step that failed and the answer goes on where it stopped"
    ).split()
    seed = int(hashlib.sha256(prompt.encode()).hexdigest(), 16)
    for i in range(words):
        time.sleep(delay)
        if fail and i == words // 2:
            raise ConnectionError("the model connection dropped mid-answer")
        yield vocabulary[(seed >> (i % 64) ^ i) % len(vocabulary)] + " "


def writer(prompt: str, fail_once: bool) -> Iterator[str]:
    """The answer; with ``fail_once``, its first attempt fails halfway."""
    fail = fail_once and current_step.attempt == 0
    yield from model(prompt, current_app.config["ANSWER_WORDS"], fail=fail)


def create_app(config: dict[str, Any] | None = None, **kwargs: Any) -> Flask:
    app = Flask(__name__, **kwargs)
    app.config.update(
        SECRET_KEY="dev-only-research-secret",
        MODEL_DELAY=0.08,
        ANSWER_WORDS=40,
        DURABLE_RETRY_BACKOFF=0.5,
    )
    app.config.update(config or {})
    durable.init_app(app)

    @app.get("/")
    def index() -> str:
        return render_template("index.html")

    @app.post("/ask")
    @durable.endpoint(retries=3)
    def ask() -> Any:
        question = (request.form.get("question") or "").strip() or "why durable?"
        fail_once = request.form.get("fail") == "on"
        web, papers = step.parallel(
            lambda: step.run("search-web", search, "web", question),
            lambda: step.run("search-papers", search, "papers", question),
        )
        outline = step.stream("outline", model, f"outline {question}", 8)
        answer = step.stream("answer", writer, f"{question} {outline}", fail_once)
        return jsonify(
            question=question,
            sources=web + papers,
            outline="".join(outline).strip(),
            answer="".join(answer).strip(),
        )

    return app
