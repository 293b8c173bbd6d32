"""The app of the multi-process metrics test (tests/test_metrics.py): served
by gunicorn with several workers and ``PROMETHEUS_MULTIPROC_DIR`` set. Not a
test module (no ``test_`` prefix).

``DURABLE_TEST_DB`` is the SQLAlchemy URL of the durable database.
"""

from __future__ import annotations

import os
import time
from typing import Any

from flask import Flask, jsonify

from flask_durable import Durable, step

durable = Durable()
app = Flask(__name__)
app.config.update(
    SECRET_KEY="test-secret",
    DURABLE_DATABASE_URI=os.environ["DURABLE_TEST_DB"],
    DURABLE_METRICS=True,
)
durable.init_app(app)
durable.dashboard_auth(lambda: True)


def _pid() -> int:
    time.sleep(0.1)  # requests sent at once overlap: each worker gets some
    return os.getpid()


@app.post("/work")
@durable.endpoint
def work() -> Any:
    return jsonify(step.run("pid", _pid))
