from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import pytest
from flask import Flask, jsonify

from flask_durable import Durable, step
from flask_durable.config import DEFAULTS, Config

durable = Durable()


@pytest.fixture
def app(tmp_path: Path) -> Flask:
    return Flask(__name__, instance_path=str(tmp_path / "instance"))


def _config(app: Flask, **config: Any) -> Config:
    app.config.update(config)
    return Config.from_app(app)


def test_defaults(app: Flask) -> None:
    config = Config.from_app(app)
    path = os.path.join(app.instance_path, "durable.sqlite3")
    assert config.database_uri == "sqlite:///" + path
    assert os.path.isdir(app.instance_path)
    assert config.app_id == app.import_name
    assert config.url_prefix == "/durable"
    assert config.engine_options == {}
    assert config.checkpoint == "sync"
    assert config.sqlite_synchronous == "NORMAL"
    assert config.lease_seconds == 15.0 and isinstance(config.lease_seconds, float)
    assert config.idempotency_ttl == 86400.0
    assert config.max_steps == 1000
    assert config.scheduler is True and config.group_commit is False
    assert config.event_key is None and config.secret_key is None
    for key, value in DEFAULTS.items():
        assert app.config[key] == value
    assert {f.name for f in dataclasses.fields(Config)} == {
        key.removeprefix("DURABLE_").lower() for key in DEFAULTS
    }


def test_defaults_are_not_shared(tmp_path: Path) -> None:
    first = Flask(__name__, instance_path=str(tmp_path / "a"))
    Config.from_app(first)
    first.config["DURABLE_ENGINE_OPTIONS"]["echo"] = True
    second = Flask(__name__, instance_path=str(tmp_path / "b"))
    assert Config.from_app(second).engine_options == {}


def test_values_are_read(app: Flask, tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/runs.db"
    options = {"pool_pre_ping": True}
    config = _config(
        app,
        DURABLE_DATABASE_URI=uri,
        DURABLE_ENGINE_OPTIONS=options,
        DURABLE_URL_PREFIX="/api/durable",
        DURABLE_APP_ID="billing",
        DURABLE_RETRIES=0,
        DURABLE_LEASE_SECONDS=3,
        DURABLE_CHECKPOINT="async",
        DURABLE_SQLITE_SYNCHRONOUS="full",
        DURABLE_SCHEDULER=False,
        DURABLE_EVENT_KEY="k",
        DURABLE_SECRET_KEY=b"s",
    )
    assert config.database_uri == uri
    assert config.engine_options == options
    options["echo"] = True  # a copy was taken
    assert "echo" not in config.engine_options
    assert config.url_prefix == "/api/durable"
    assert config.app_id == "billing"
    assert config.retries == 0
    assert config.lease_seconds == 3.0 and isinstance(config.lease_seconds, float)
    assert config.checkpoint == "async"
    assert config.sqlite_synchronous == "FULL"
    assert config.scheduler is False
    assert config.event_key == "k" and config.secret_key == b"s"
    assert not os.path.exists(app.instance_path)


def test_frozen(app: Flask) -> None:
    config = Config.from_app(app)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.retries = 9  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.engine_options["echo"] = True  # type: ignore[index]


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("DURABLE_RETRIES", -1),
        ("DURABLE_RETRIES", 2.0),
        ("DURABLE_RETRIES", True),
        ("DURABLE_RETRIES", "4"),
        ("DURABLE_WORKERS", 0),
        ("DURABLE_MAX_PARALLEL", 0),
        ("DURABLE_CHECKPOINT_BATCH", 0),
        ("DURABLE_MAX_STEPS", 0),
        ("DURABLE_MAX_STEP_OUTPUT", 0),
        ("DURABLE_MAX_RUN_STATE", 0),
        ("DURABLE_MAX_REQUEST_BODY", -1),
        ("DURABLE_MAX_REQUEST_BODY", None),
    ],
)
def test_bad_int(app: Flask, key: str, value: Any) -> None:
    with pytest.raises(ValueError, match=f"^{key} must be an integer >= "):
        _config(app, **{key: value})


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("DURABLE_LEASE_SECONDS", "abc"),
        ("DURABLE_LEASE_SECONDS", 0.05),
        ("DURABLE_LEASE_SECONDS", True),
        ("DURABLE_POLL_INTERVAL", 0.001),
        ("DURABLE_POLL_INTERVAL", float("nan")),
        ("DURABLE_RETRY_BACKOFF", -1),
        ("DURABLE_WAIT_TIMEOUT", float("inf")),
        ("DURABLE_WAIT_TIMEOUT", None),
        ("DURABLE_CHECKPOINT_INTERVAL", -0.1),
        ("DURABLE_SQLITE_BUSY_TIMEOUT", "30"),
        ("DURABLE_IDEMPOTENCY_TTL", -5),
    ],
)
def test_bad_number(app: Flask, key: str, value: Any) -> None:
    with pytest.raises(ValueError, match=f"^{key} must be a number >= ") as e:
        _config(app, **{key: value})
    assert repr(value) in str(e.value)


def test_backoff_max_below_backoff(app: Flask) -> None:
    app.config.update(DURABLE_RETRY_BACKOFF=10, DURABLE_RETRY_BACKOFF_MAX=5)
    expected = r"DURABLE_RETRY_BACKOFF \(10.0\), not 5$"
    with pytest.raises(ValueError, match="^DURABLE_RETRY_BACKOFF_MAX .*>= " + expected):
        Config.from_app(app)
    app.config["DURABLE_RETRY_BACKOFF_MAX"] = 10
    assert Config.from_app(app).retry_backoff_max == 10.0


@pytest.mark.parametrize("key", ["DURABLE_SCHEDULER", "DURABLE_GROUP_COMMIT"])
@pytest.mark.parametrize("value", ["false", "True", 0, 1, None])
def test_bad_bool(app: Flask, key: str, value: Any) -> None:
    with pytest.raises(ValueError, match=f"^{key} must be True or False, not "):
        _config(app, **{key: value})


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("DURABLE_CHECKPOINT", "SYNC"),
        ("DURABLE_CHECKPOINT", "batch"),
        ("DURABLE_CHECKPOINT", None),
        ("DURABLE_SQLITE_SYNCHRONOUS", "fast"),
        ("DURABLE_SQLITE_SYNCHRONOUS", 1),
        ("DURABLE_URL_PREFIX", "durable"),
        ("DURABLE_URL_PREFIX", "/durable/"),
        ("DURABLE_URL_PREFIX", "/"),
        ("DURABLE_URL_PREFIX", ""),
        ("DURABLE_URL_PREFIX", None),
        ("DURABLE_APP_ID", ""),
        ("DURABLE_APP_ID", "x" * 256),
        ("DURABLE_APP_ID", 7),
        ("DURABLE_EVENT_KEY", ""),
        ("DURABLE_EVENT_KEY", b"key"),
        ("DURABLE_SECRET_KEY", ""),
        ("DURABLE_SECRET_KEY", 1234),
        ("DURABLE_ENGINE_OPTIONS", None),
        ("DURABLE_ENGINE_OPTIONS", [("echo", True)]),
        ("DURABLE_DATABASE_URI", 5),
        ("DURABLE_DATABASE_URI", "not a url"),
        ("DURABLE_DATABASE_URI", "postgresql://u:p@host:port/db"),
    ],
)
def test_bad_choice_or_type(app: Flask, key: str, value: Any) -> None:
    with pytest.raises(ValueError, match=f"^{key} must be ") as e:
        _config(app, **{key: value})
    assert ":p@" not in str(e.value)  # no password in the message


@pytest.mark.parametrize(
    "uri",
    [
        "sqlite://",
        "sqlite:///:memory:",
        "sqlite:///file::memory:?uri=true",
        "sqlite:///file:runs?mode=memory&uri=true",
    ],
)
def test_sqlite_in_memory(app: Flask, uri: str) -> None:
    with pytest.raises(ValueError, match="^DURABLE_DATABASE_URI .*in-memory"):
        _config(app, DURABLE_DATABASE_URI=uri)


def test_sqlite_missing_directory(app: Flask, tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    with pytest.raises(ValueError, match="^DURABLE_DATABASE_URI .*does not exist") as e:
        _config(app, DURABLE_DATABASE_URI=f"sqlite:///{missing}/durable.db")
    assert str(missing) in str(e.value)
    assert not missing.exists()
    assert not os.path.exists(app.instance_path)


def test_other_database_is_not_checked_for_files(app: Flask) -> None:
    uri = "postgresql+psycopg://user@localhost/runs"
    assert _config(app, DURABLE_DATABASE_URI=uri).database_uri == uri


def test_typo_warning(app: Flask) -> None:
    app.config["DURABLE_LEASE_SECOND"] = 5
    with pytest.warns(
        UserWarning, match="DURABLE_LEASE_SECOND;.*DURABLE_LEASE_SECONDS"
    ):
        Config.from_app(app)


def test_unrelated_keys_do_not_warn(app: Flask) -> None:
    # filterwarnings = error: a warning here fails the test.
    app.config.update(DURABLE_SOMETHING_ELSE_ENTIRELY=1, SQLALCHEMY_ECHO=True)
    Config.from_app(app)


# -- through Durable.init_app ----------------------------------------------------


def _init_app(app: Flask, **config: Any) -> None:
    from flask_durable import Durable

    app.config.update(config)
    Durable().init_app(app)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("DURABLE_LEASE_SECONDS", "abc"),
        ("DURABLE_SCHEDULER", "no"),
        ("DURABLE_CHECKPOINT", "later"),
        ("DURABLE_RETRIES", -1),
        ("DURABLE_APP_ID", ""),
    ],
)
def test_init_app_rejects_a_bad_value(
    app: Flask, tmp_path: Path, key: str, value: Any
) -> None:
    uri = f"sqlite:///{tmp_path}/durable.sqlite3"
    with pytest.raises(ValueError, match=f"^{key} ") as e:
        _init_app(app, DURABLE_DATABASE_URI=uri, **{key: value})
    assert repr(value) in str(e.value)
    assert "durable" not in app.extensions
    assert "durable" not in app.blueprints
    assert not (tmp_path / "durable.sqlite3").exists()


def test_init_app_rejects_a_missing_sqlite_directory(
    app: Flask, tmp_path: Path
) -> None:
    missing = tmp_path / "missing" / "deeper"
    with pytest.raises(ValueError, match="^DURABLE_DATABASE_URI .*does not exist"):
        _init_app(app, DURABLE_DATABASE_URI=f"sqlite:///{missing}/durable.db")
    assert not (tmp_path / "missing").exists()
    assert not os.path.exists(app.instance_path)
    assert "durable" not in app.extensions


@pytest.mark.parametrize(
    "uri",
    [
        "mysql://user:hunter2@localhost/runs",
        "mysql+pymysql://user@localhost/runs",
        "oracle://user@localhost/runs",
        "mssql+pyodbc://user@dsn",
    ],
)
def test_init_app_rejects_an_unsupported_database(app: Flask, uri: str) -> None:
    with pytest.raises(ValueError, match="DURABLE_DATABASE_URI") as e:
        _init_app(app, DURABLE_DATABASE_URI=uri)
    assert "hunter2" not in str(e.value)
    assert "durable" not in app.extensions


# -- through Durable(app) and @durable.endpoint ------------------------------


@pytest.mark.parametrize(
    "options", [{"retries": -1}, {"retries": "3"}, {"id": ""}, {"timeout": "soon"}]
)
def test_bad_endpoint_options(options: Any) -> None:
    with pytest.raises((ValueError, TypeError)):
        durable.endpoint(**options)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("DURABLE_RETRIES", -1),
        ("DURABLE_CHECKPOINT", "later"),
        ("DURABLE_WAIT_TIMEOUT", "x"),
    ],
)
def test_bad_config_is_a_clear_error(make_app: Any, key: str, value: Any) -> None:
    with pytest.raises(ValueError, match=key):
        make_app(**{key: value})


def test_in_memory_sqlite_is_refused(make_app: Any) -> None:
    with pytest.raises(ValueError, match="SQLite file"):
        make_app(DURABLE_DATABASE_URI="sqlite://")


def test_default_database_in_instance_path(tmp_path: Any) -> None:
    app = Flask(__name__, instance_path=str(tmp_path / "inst"))
    Durable(app)
    try:

        @app.get("/")
        @durable.endpoint
        def view() -> Any:
            return jsonify(v=step.run("s", lambda: 1))

        assert app.test_client().get("/").json == {"v": 1}
        assert (tmp_path / "inst" / "durable.sqlite3").exists()
    finally:
        app.extensions["durable"].close()
