"""FITS I/O for exposures, source catalogs and provenance.

* :func:`read_exposure` / :func:`write_exposure` — exposures as skydiff (LSST-style)
  multi-extension FITS, or plain FITS images with companion files (variance, weight, sigma,
  mask, PSF); also available as ``Exposure.read(...)`` / ``exposure.write(...)``.
* :func:`read_catalog` / :func:`write_catalog` — astropy tables as ECSV, FITS or Parquet.
* :func:`write_regions` — DS9 region files of difference-image catalogs.
* :func:`write_metrics` / :func:`read_metrics` — metric values as JSON.
* :class:`Provenance` / :func:`read_provenance` — how an output file was made.
* :func:`atomic_path` — write any file atomically.

Every writer is atomic and refuses to replace an existing file unless ``overwrite=True``;
every reader opens its inputs read-only and reports damaged or inconsistent inputs as
:class:`~skydiff.errors.InputError`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from skydiff.io._atomic import atomic_path
    from skydiff.io.catalog import read_catalog, write_catalog
    from skydiff.io.fits import read_exposure, write_exposure
    from skydiff.io.metrics import read_metrics, write_metrics
    from skydiff.io.provenance import Provenance, read_provenance
    from skydiff.io.regions import write_regions

__all__ = [
    "Provenance",
    "atomic_path",
    "read_catalog",
    "read_exposure",
    "read_metrics",
    "read_provenance",
    "write_catalog",
    "write_exposure",
    "write_metrics",
    "write_regions",
]

# Submodules are imported on first attribute access: ``skydiff.exposure`` imports
# ``skydiff.io._unified`` while it is itself being imported, and must not pull in the readers
# (which need the exposure classes) at that moment.
_LOCATIONS = {
    "Provenance": "skydiff.io.provenance",
    "atomic_path": "skydiff.io._atomic",
    "read_catalog": "skydiff.io.catalog",
    "read_exposure": "skydiff.io.fits",
    "read_metrics": "skydiff.io.metrics",
    "read_provenance": "skydiff.io.provenance",
    "write_catalog": "skydiff.io.catalog",
    "write_exposure": "skydiff.io.fits",
    "write_metrics": "skydiff.io.metrics",
    "write_regions": "skydiff.io.regions",
}


def __getattr__(name: str) -> Any:
    if name in _LOCATIONS:
        value = getattr(importlib.import_module(_LOCATIONS[name]), name)
        globals()[name] = value
        return value
    msg = f"module 'skydiff.io' has no attribute {name!r}"
    raise AttributeError(msg)


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
