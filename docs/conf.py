"""Owns the Sphinx configuration of the skdkvb documentation.

Build with ``docs/build.sh`` (``sphinx-build -W``: warnings are errors).
"""

import os
import sys

# Build against the checkout, not an installed copy.
sys.path.insert(0, os.path.abspath(".."))
os.environ.setdefault("MPLBACKEND", "Agg")

import skdkvb

project = "skdkvb"
author = "skdkvb developers"
copyright = "2025, skdkvb developers"
version = release = skdkvb.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "numpydoc",
    "sphinx_gallery.gen_gallery",
    "myst_parser",
    "matplotlib.sphinxext.plot_directive",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
templates_path = ["_templates"]
exclude_patterns = [
    "_build",
    "generated/*.examples",
    "auto_examples/*.ipynb",
    "auto_examples/*.py",
    "auto_examples/*.zip",
    "auto_examples/*.json",
    "auto_examples/*.md5",
]

# API reference: one page per object listed in api.rst, written at build time.
autosummary_generate = True
autodoc_default_options = {"members": True, "member-order": "bysource"}
autodoc_typehints = "none"  # numpydoc sections already give the types
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False

# Figures from plot:: directives (the bottleneck diagram of the user guide).
plot_include_source = False
plot_html_show_source_link = False
plot_html_show_formats = False
plot_formats = [("png", 110)]

myst_enable_extensions = ["dollarmath", "colon_fence"]
myst_heading_anchors = 3

sphinx_gallery_conf = {
    "examples_dirs": "../examples",
    "gallery_dirs": "auto_examples",
    "filename_pattern": r"/plot_",
    "abort_on_example_error": True,
    "download_all_examples": False,
    "remove_config_comments": True,
    "within_subsection_order": "FileNameSortKey",
    "doc_module": ("skdkvb",),
    "backreferences_dir": None,
}

html_theme = "pydata_sphinx_theme"
html_title = f"skdkvb {release}"
html_static_path = []
html_theme_options = {
    "navigation_with_keys": False,
    "show_prev_next": False,
    "secondary_sidebar_items": ["page-toc"],
}
html_show_sourcelink = False


def _skip_generated_request_methods(app, what, name, obj, skip, options):
    # scikit-learn adds set_{fit,score,...}_request methods to every estimator;
    # their docstrings point into sklearn's own docs and are not skdkvb API.
    if name.startswith("set_") and name.endswith("_request"):
        return True
    return None


def setup(app):
    app.connect("autodoc-skip-member", _skip_generated_request_methods)
