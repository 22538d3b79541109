"""Sphinx configuration of the skydiff documentation.

Built by ``tox -e docs`` as ``sphinx-build -W --keep-going -n -b html docs docs/_build/html``:
warnings are errors and every cross-reference must resolve (``nitpicky``). The build is
offline: there is no intersphinx, so references to third-party objects (NumPy, SciPy, astropy,
attrs, pluggy, ...) are listed in ``nitpick_ignore_regex`` below instead of being linked.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

# Document the source tree, not whatever copy of skydiff happens to be installed.
ROOT = Path(__file__).resolve().parents[1]
for source_root in (ROOT / "plugins", ROOT / "core", ROOT / "docs" / "_ext"):
    if str(source_root) not in sys.path:
        sys.path.insert(0, str(source_root))

# The docs describe skydiff itself: never pull third-party plugins installed on the build
# machine into the built pages (e.g. into ``skydiff config show`` output).
os.environ["SKYDIFF_DISABLE_PLUGIN_AUTOLOAD"] = "1"

import skydiff  # noqa: E402

# -- project ---------------------------------------------------------------------------------

project = "skydiff"
author = "The skydiff developers"
copyright = "The skydiff developers, BSD-3-Clause"
release = skydiff.__version__
version = ".".join(release.split(".")[:2])

# -- extensions ------------------------------------------------------------------------------

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "numpydoc",
    # docs/_ext/skydiff_docs.py: option tables of the built-in algorithms, generated from
    # their configs at build time (the ``plugin-options`` directive of plugins/builtins.md).
    "skydiff_docs",
]

source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "_ext", "Thumbs.db", ".DS_Store"]
templates_path: list[str] = []

# MyST: ``$...$``/``$$...$$`` maths, ``:::`` fences, definition lists, and anchors for
# headings so pages can link to sections (``[text](concepts.md#exposure)``).
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist", "substitution"]
myst_substitutions = {"release": release}
myst_heading_anchors = 3

# -- autodoc / autosummary / numpydoc ---------------------------------------------------------

# Types are documented in the numpydoc "Parameters"/"Returns" sections (the scientific house
# style, rule 13); signatures show names and defaults only. This also keeps annotations that
# exist only under ``TYPE_CHECKING`` out of the cross-reference checker.
autodoc_typehints = "none"
autodoc_member_order = "bysource"
autodoc_preserve_defaults = True
autodoc_class_signature = "mixed"
autoclass_content = "class"
# The API pages are written by hand (grouped by topic); autosummary only draws the tables.
autosummary_generate = False

numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False
numpydoc_attributes_as_param_list = True

# -- cross-references ------------------------------------------------------------------------

nitpicky = True

# No intersphinx (the build must work offline), so references into other projects cannot
# resolve. Each pattern names one external namespace that skydiff's docstrings legitimately
# mention; anything *inside* skydiff must resolve.
_EXTERNAL = (
    # scientific Python and the libraries skydiff builds on
    r"numpy|np|scipy|astropy|attrs|attr|pluggy|hypothesis|pytest|tomli_w|xarray|matplotlib"
    # the Python standard library
    r"|argparse|collections|concurrent|contextlib|doctest|functools|importlib|logging|math"
    r"|os|pathlib|pickle|resource|threading|tomllib|tracemalloc|types|typing|unittest"
    r"|warnings"
)
nitpick_ignore_regex = [
    # Objects of the external namespaces above (numpy.ndarray, astropy.table.Table, ...).
    (r"py:.*", rf"({_EXTERNAL})(\..*)?"),
    # Builtins named in prose (``ValueError`` bases, ``Exception`` in Raises sections).
    (r"py:.*", r"(Exception|ValueError|TypeError|KeyError|UserWarning|object|type)"),
    # Pointers into private modules (``_math.FILTER_TOLERANCE``, ``._common.validate_pair``,
    # ``skydiff_plugins.psfmatch._solve.Regularization``): the built-in plugins' docstrings,
    # rendered on plugins/builtins.md, name their private helpers, which the reference never
    # documents. Such a target, if it does not resolve, is shown as text instead of failing the
    # build; every public target must still resolve.
    (r"py:.*", r"(.*\.)?_[A-Za-z]\w*\..+"),
]

# skydiff's docstrings refer to objects by the module that defines them
# (``skydiff.errors.ConfigError``, ``skydiff.config.RegistryField``); the API reference
# documents them once, under the public name users import (``skydiff.ConfigError``).
_PRIVATE_TO_PUBLIC_MODULES = (
    "skydiff.config", "skydiff.convolve", "skydiff.errors", "skydiff.exposure",
    "skydiff.hookspecs", "skydiff.kernel", "skydiff.mapreduce", "skydiff.mask",
    "skydiff.pipeline", "skydiff.psf", "skydiff.registry", "skydiff.roles", "skydiff.sources",
    "skydiff.stats", "skydiff.task", "skydiff._manager",
)


def _public_target(target: str) -> str | None:
    """``skydiff.<module>.<Name>[.member]`` -> ``skydiff.<Name>[.member]`` if that is public."""
    for module in _PRIVATE_TO_PUBLIC_MODULES:
        prefix = module + "."
        if target.startswith(prefix):
            rest = target[len(prefix):]
            name = rest.split(".", 1)[0]
            if name in skydiff.__all__:
                return "skydiff." + rest
    for package in ("skydiff.io", "skydiff.sim"):
        # skydiff.io.fits.read_exposure -> skydiff.io.read_exposure (and skydiff.sim._pair...)
        if target.startswith(package + "."):
            parts = target[len(package) + 1:].split(".")
            module = importlib.import_module(package)
            for index in range(1, len(parts)):
                if parts[index] in getattr(module, "__all__", ()):
                    return ".".join([package, *parts[index:]])
    return None


def _resolve_public(app, env, node, contnode):  # type: ignore[no-untyped-def]
    """Resolve references to private module paths of public objects (``missing-reference``).

    Tried in turn: the public name of a ``skydiff.<module>.<Name>`` target; ``skydiff.<target>``
    for a short name of the facade (``InputError``, ``Exposure.evolve``); and
    ``<module>.<target>`` for a short name defined in one of skydiff's modules
    (``psf_moments`` in a docstring of :mod:`skydiff.psf`).
    """
    if node.get("refdomain") != "py":
        return None
    target = node.get("reftarget", "")
    candidates = []
    public = _public_target(target)
    if public is not None:
        candidates.append(public)
    if not target.startswith("skydiff"):
        if target.split(".", 1)[0] in skydiff.__all__:
            candidates.append("skydiff." + target)
        candidates.extend(f"{module}.{target}" for module in _SEARCH_MODULES)
    domain = env.get_domain("py")
    for candidate in candidates:
        new = node.deepcopy()
        new["reftarget"] = candidate
        resolved = domain.resolve_xref(env, node.get("refdoc", ""), app.builder,
                                       node.get("reftype", "obj"), candidate, new, contnode)
        if resolved is not None:
            return resolved
    return None


_SEARCH_MODULES = (*_PRIVATE_TO_PUBLIC_MODULES, "skydiff.io", "skydiff.io.fits",
                   "skydiff.io.provenance", "skydiff.io.catalog", "skydiff.sim",
                   "skydiff.testing", "skydiff.testing.checks", "skydiff.testing.strategies",
                   "skydiff.bench", "skydiff.qa")


def setup(app):  # type: ignore[no-untyped-def]
    app.connect("missing-reference", _resolve_public)
    return {"parallel_read_safe": True, "parallel_write_safe": True}


# -- HTML ------------------------------------------------------------------------------------

html_theme = "alabaster"
html_title = f"skydiff {release}"
html_static_path: list[str] = []
html_theme_options = {
    "description": "Astronomical difference imaging as a small core plus plugins",
    "fixed_sidebar": True,
    "show_relbars": True,
}
html_sidebars = {"**": ["about.html", "navigation.html", "relations.html", "searchbox.html"]}
