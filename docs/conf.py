"""Sphinx configuration: numpydoc and the PyData theme (scikit-learn's stack).

Build with ``nox -s docs`` (warnings are errors). The Markdown pages are
MyST; the tutorial, failure model and report pages include README's
sections rather than copying them.
"""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import clustersearch  # noqa: E402

project = "clustersearch"
author = "clustersearch developers"
copyright = "clustersearch developers"  # noqa: A001
release = version = clustersearch.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.intersphinx",
    "numpydoc",
    "myst_parser",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "README.md"]
templates_path = ["_templates"]

# The API pages are generated from the docstrings at each build.
autosummary_generate = True
autosummary_imported_members = False
autodoc_default_options = {"inherited-members": False}
autodoc_typehints = "none"  # numpydoc's Parameters say the types
# numpydoc lists a class's own methods; scikit-learn's inherited ones link out.
numpydoc_show_class_members = False
numpydoc_show_inherited_class_members = False
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False

myst_enable_extensions = ["colon_fence"]
myst_heading_anchors = 3
# README and the docs link to files of the repository (tests/, benchmarks/):
# those links stay plain text on the site.
suppress_warnings = ["myst.xref_missing"]

intersphinx_mapping = {
    "python": ("https://docs.python.org/3", None),
    "sklearn": ("https://scikit-learn.org/stable", None),
}
# The build machine may be offline: no inventory fetch must fail the build.
if os.environ.get("CLUSTERSEARCH_DOCS_OFFLINE", "1") == "1":
    intersphinx_mapping = {}

html_theme = "pydata_sphinx_theme"
html_title = f"clustersearch {release}"
html_static_path = ["_static"]
html_theme_options = {
    "navigation_with_keys": False,
    "show_toc_level": 2,
}
html_show_sourcelink = False


def _skip_metadata_requests(app, what, name, obj, skip, options):
    # scikit-learn sets set_fit_request() & co. on every subclass (metadata
    # routing); they are scikit-learn's, documented there, and their
    # docstrings point into scikit-learn's own glossary.
    if name.startswith("set_") and name.endswith("_request"):
        return True
    return None


def setup(app):
    app.connect("autodoc-skip-member", _skip_metadata_requests)
