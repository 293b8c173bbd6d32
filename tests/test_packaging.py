"""The package as users get it: ``python -m build`` makes an sdist and a
wheel (built from that sdist), both carry the templates, static files and
``py.typed``, and the wheel installed in a fresh virtual environment serves
a durable endpoint and the dashboard.

Offline: the build uses this environment's setuptools and wheel
(``--no-isolation``), the wheel is installed with ``--no-deps`` and the
fresh environment reaches the dependencies through a ``.pth`` file naming
this environment's site-packages.
"""

from __future__ import annotations

import email
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "flask_durable"
#: The package data files, as paths inside the wheel.
PACKAGE_DATA = sorted(
    str(p.relative_to(ROOT))
    for pattern in ("py.typed", "templates/durable/*.html", "static/durable/*")
    for p in PACKAGE.glob(pattern)
)
EXTRAS = {"postgres", "prometheus", "otel", "client"}


def test_the_package_data_is_known() -> None:
    assert "flask_durable/py.typed" in PACKAGE_DATA
    assert "flask_durable/templates/durable/runs.html" in PACKAGE_DATA
    assert "flask_durable/static/durable/dashboard.css" in PACKAGE_DATA


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``python -m build`` of a copy of the project (the build writes
    ``build/`` and ``*.egg-info`` next to the sources)."""
    missing = [m for m in ("build", "wheel") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.fail(f"{missing} missing: pip install -e '.[dev]'")
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "setup.cfg", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(
        PACKAGE, src / "flask_durable", ignore=shutil.ignore_patterns("__pycache__")
    )
    out = tmp_path_factory.mktemp("dist")
    build = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out)],
        cwd=src,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    return out


def _one(directory: Path, pattern: str) -> Path:
    found = list(directory.glob(pattern))
    assert len(found) == 1, found
    return found[0]


def test_the_sdist_holds_the_package_data(dist: Path) -> None:
    sdist = _one(dist, "flask[-_]durable-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    for name in [*PACKAGE_DATA, "setup.cfg", "pyproject.toml", "README.md"]:
        assert name in names, name
    assert "flask_durable/client.py" in names


def test_the_wheel_holds_the_package_data_and_the_extras(dist: Path) -> None:
    wheel = _one(dist, "flask_durable-*-py3-none-any.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        (metadata_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        metadata = email.message_from_bytes(zf.read(metadata_name))
    for name in [*PACKAGE_DATA, "flask_durable/client.py"]:
        assert name in names, name
    assert not [n for n in names if n.startswith(("tests/", "examples/"))]
    assert set(metadata.get_all("Provides-Extra") or []) >= EXTRAS
    requires = metadata.get_all("Requires-Dist") or []
    assert any(r.startswith("requests") and 'extra == "client"' in r for r in requires)
    assert "# flask-durable" in (metadata.get_payload() or "")  # the README
    # The durable_tester fixture reaches users' pytest through this.
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    with zipfile.ZipFile(wheel) as zf:
        text = zf.read(entry_points).decode()
    assert "[pytest11]" in text
    assert "flask_durable = flask_durable.pytest_plugin" in text


SMOKE = """
import sys
from pathlib import Path

import flask_durable
from flask import Flask, jsonify
from flask_durable import Durable, step

here = Path(flask_durable.__file__).parent
assert here.is_relative_to(sys.prefix), (here, sys.prefix)
assert (here / "py.typed").exists()

app = Flask(__name__, instance_path=str(Path.cwd() / "instance"))
database = Path.cwd() / "db.sqlite3"
app.config.update(SECRET_KEY="smoke", DURABLE_DATABASE_URI=f"sqlite:///{database}")
durable = Durable(app)


@app.post("/order")
@durable.endpoint
def order():
    a = step.run("a", lambda: 20)
    b = step.run("b", lambda: a + 1)
    return jsonify(total=a + b)


client = app.test_client()
r = client.post("/order")
assert r.status_code == 200 and r.get_json() == {"total": 41}, r.data
run_id = r.headers["Durable-Run-Id"]
with app.app_context():
    run = durable.get_run(run_id)
assert run.status == "completed", run
assert [(s.id, s.output) for s in run.steps] == [("a", 20), ("b", 21)], run.steps

app.debug = True
page = client.get("/durable/")
assert page.status_code == 200 and run_id in page.get_data(as_text=True), page.data
page = client.get(f"/durable/runs/{run_id}")
assert page.status_code == 200 and "order" in page.get_data(as_text=True)
css = client.get("/durable/static/dashboard.css")
assert css.status_code == 200 and len(css.data) > 1000
css.close()

from flask_durable.client import Session  # noqa: E402
from flask_durable.testing import DurableTester  # noqa: E402

with app.app_context():
    durable.shutdown()
print("smoke ok", flask_durable.__file__)
"""


def test_the_wheel_works_in_a_fresh_venv(dist: Path, tmp_path: Path) -> None:
    wheel = _one(dist, "flask_durable-*-py3-none-any.whl")
    venv = tmp_path / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True
    )
    python = venv / "bin" / "python"
    install = subprocess.run(
        [
            *(sys.executable, "-m", "pip", "--python", str(python), "install"),
            *("--no-deps", "--no-index", "--no-cache-dir", "--quiet", str(wheel)),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    # The dependencies come from this environment, after the fresh one's
    # own site-packages (which holds the installed wheel).
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    ours = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
    (Path(site) / "_outer_environment.pth").write_text("\n".join(sorted(ours)) + "\n")
    work = tmp_path / "work"
    work.mkdir()
    (work / "smoke.py").write_text(textwrap.dedent(SMOKE))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    smoke = subprocess.run(
        [str(python), "smoke.py"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert smoke.returncode == 0, smoke.stdout + smoke.stderr
    assert f"smoke ok {site}/flask_durable/__init__.py" in smoke.stdout
