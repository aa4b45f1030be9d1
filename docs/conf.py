"""Sphinx configuration: numpydoc and the PyData theme (scikit-learn's stack).

Build with ``nox -s docs`` (warnings are errors). The Markdown pages are
MyST; the tutorial, failure model and report pages include README's
sections rather than copying them.
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import clustersearch  # noqa: E402

project = "clustersearch"
author = "clustersearch developers"
copyright = "clustersearch developers"
release = version = clustersearch.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "numpydoc",
    "myst_parser",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]
templates_path = ["_templates"]

# The API pages are generated from the docstrings at each build.
autosummary_generate = True
autosummary_imported_members = False
autodoc_typehints = "none"  # numpydoc's Parameters say the types
# A class page lists its members through autodoc (_templates/autosummary),
# not through numpydoc's tables.
numpydoc_show_class_members = False
numpydoc_show_inherited_class_members = False
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False

myst_enable_extensions = ["colon_fence"]
myst_heading_anchors = 3

html_theme = "pydata_sphinx_theme"
html_title = f"clustersearch {release}"
html_static_path = ["_static"]
html_theme_options = {
    "navigation_with_keys": False,
    "show_toc_level": 2,
}
html_show_sourcelink = False


def _defined_here(obj):
    """Whether ``obj`` (a member a class page would list) is clustersearch's."""
    obj = getattr(obj, "fget", None) or getattr(obj, "__func__", None) or obj
    return (getattr(obj, "__module__", None) or "").startswith("clustersearch")


def _skip_foreign_members(app, what, name, obj, skip, options):
    # A class page lists the methods clustersearch adds, also those of its
    # mixins (inherited-members), not scikit-learn's or the builtins' (their
    # docs are theirs). scikit-learn sets set_fit_request() & co. on every
    # subclass (metadata routing): those are skipped too.
    if what == "class" and not _defined_here(obj):
        return True
    if name.startswith("set_") and name.endswith("_request"):
        return True
    return None


def setup(app):
    app.connect("autodoc-skip-member", _skip_foreign_members)
