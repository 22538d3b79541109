"""DS9 region files for difference-image catalogs.

:func:`write_regions` writes one circle per source in DS9's ``image`` coordinate system,
whose first pixel is centred on (1, 1): a source at the 0-based skydiff position ``(x, y)``
is drawn at ``(x + 1, y + 1)``. Colours tell the kind of source:

============  =======  ====================================================
kind          colour   condition
============  =======  ====================================================
dipole        magenta  ``is_dipole``
negative      red      ``is_negative`` (or, without that column, ``snr < 0``)
positive      green    everything else
sky source    cyan     ``sky_source``; drawn dashed, only with ``sky=True``
============  =======  ====================================================

Each circle carries the source ``id`` as its text label, so a region can be matched to its
catalog row in DS9. Writes are atomic and refuse to replace an existing file unless
``overwrite=True``.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
from astropy.table import Table

from skydiff.errors import InputError
from skydiff.io._atomic import atomic_path

__all__ = ["REGION_COLORS", "format_regions", "write_regions"]

#: DS9 colour of each kind of source.
REGION_COLORS: dict[str, str] = {"positive": "green", "negative": "red", "dipole": "magenta",
                                 "sky": "cyan"}


def _column(table: Table, name: str, default: Any) -> np.ndarray:
    if name not in table.colnames:
        return np.full(len(table), default)
    column = table[name]
    values = column.filled(default) if hasattr(column, "filled") else column
    return np.asarray(values)


def format_regions(catalog: Table, *, radius: float = 6.0, sky: bool = False) -> str:
    """The DS9 region text of ``catalog`` (see :mod:`skydiff.io.regions`).

    Parameters
    ----------
    catalog : astropy.table.Table
        Needs ``x`` and ``y`` (0-based column and row); uses ``id``, ``is_dipole``,
        ``is_negative``, ``snr`` and ``sky_source`` when present.
    radius : float, optional
        Circle radius in pixels (> 0).
    sky : bool, optional
        Also draw the sky sources (dashed).

    Returns
    -------
    str
        The file content, starting with the ``# Region file format: DS9`` header.

    Raises
    ------
    InputError
        If ``catalog`` is not a Table, lacks ``x``/``y``, or ``radius`` is not positive.

    Examples
    --------
    >>> from astropy.table import Table
    >>> catalog = Table({"id": [1, 2], "x": [10.0, 20.5], "y": [5.0, 7.25],
    ...                  "is_negative": [False, True]})
    >>> print(format_regions(catalog), end="")
    # Region file format: DS9 version 4.1
    ...
    image
    circle(11.000,6.000,6) # color=green text={1}
    circle(21.500,8.250,6) # color=red text={2}
    """
    if not isinstance(catalog, Table):
        msg = f"regions need an astropy Table, got {type(catalog).__name__}"
        raise InputError(msg)
    missing = [name for name in ("x", "y") if name not in catalog.colnames]
    if missing:
        msg = f"the catalog has no {'/'.join(missing)} column; regions need x and y"
        raise InputError(msg)
    if not (isinstance(radius, int | float) and math.isfinite(radius) and radius > 0):
        msg = f"radius must be a positive number of pixels, got {radius!r}"
        raise InputError(msg)
    n = len(catalog)
    ids = _column(catalog, "id", -1)
    x = np.asarray(catalog["x"], dtype=np.float64) + 1.0
    y = np.asarray(catalog["y"], dtype=np.float64) + 1.0
    is_sky = _column(catalog, "sky_source", False).astype(bool)
    dipole = _column(catalog, "is_dipole", False).astype(bool)
    if "is_negative" in catalog.colnames:
        negative = _column(catalog, "is_negative", False).astype(bool)
    else:
        negative = _column(catalog, "snr", 0.0).astype(np.float64) < 0
    lines = ["# Region file format: DS9 version 4.1",
             "# skydiff sources: green positive, red negative, magenta dipole, "
             "cyan dashed sky sources; label = catalog id",
             'global color=green dashlist=4 3 width=1 font="helvetica 9 normal roman" '
             "select=1 highlite=1 dash=0 fixed=0 edit=1 move=1 delete=1 include=1 source=1",
             "image"]
    for i in range(n):
        if not (np.isfinite(x[i]) and np.isfinite(y[i])):
            continue
        if is_sky[i]:
            if not sky:
                continue
            kind, extra = "sky", " dash=1 background"
        elif dipole[i]:
            kind, extra = "dipole", ""
        elif negative[i]:
            kind, extra = "negative", ""
        else:
            kind, extra = "positive", ""
        label = f" text={{{int(ids[i])}}}" if int(ids[i]) >= 0 else ""
        lines.append(f"circle({x[i]:.3f},{y[i]:.3f},{radius:g}) # "
                     f"color={REGION_COLORS[kind]}{extra}{label}")
    return "\n".join(lines) + "\n"


def write_regions(catalog: Table, path: str | os.PathLike[str], *, radius: float = 6.0,
                  sky: bool = False, overwrite: bool = False) -> None:
    """Write a DS9 region file of the sources of ``catalog``, atomically.

    Parameters
    ----------
    catalog : astropy.table.Table
        The difference-image catalog (``x``, ``y``, and ``id``, ``is_dipole``,
        ``is_negative``, ``sky_source`` when present).
    path : str or os.PathLike
        Destination (conventionally ``.reg``).
    radius : float, optional
        Circle radius in pixels.
    sky : bool, optional
        Also draw the sky sources (dashed, cyan); by default they are left out.
    overwrite : bool, optional
        Replace an existing file.

    Raises
    ------
    InputError
        As ``format_regions``, or if ``path`` exists and ``overwrite`` is False, or its
        directory does not exist.

    Examples
    --------
    >>> write_regions(result.catalog, "sources.reg")                      # doctest: +SKIP
    """
    text = format_regions(catalog, radius=radius, sky=sky)
    with atomic_path(path, overwrite=overwrite) as tmp:
        tmp.write_text(text, encoding="ascii")
