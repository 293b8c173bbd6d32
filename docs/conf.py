"""Sphinx configuration for the flask-durable documentation."""

from importlib.metadata import version as _version

project = "flask-durable"
copyright = "flask-durable contributors"
release = _version("flask-durable")
version = ".".join(release.split(".")[:2])

extensions = ["sphinx.ext.autodoc"]
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_preserve_defaults = True
templates_path: list[str] = []
exclude_patterns = ["_build"]
default_role = "code"

# The Pallets theme when it is installed (docs/requirements.txt), else the
# theme that ships with Sphinx.
try:
    import pallets_sphinx_themes  # noqa: F401
except ImportError:
    html_theme = "alabaster"
else:
    extensions.append("pallets_sphinx_themes")
    html_theme = "flask"
    html_context = {"project_links": []}
html_title = f"flask-durable {version}"
html_show_sourcelink = False
