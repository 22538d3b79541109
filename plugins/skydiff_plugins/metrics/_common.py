"""Input checks and small helpers shared by the metric plugins.

Every metric validates the whole :class:`skydiff.MetricInputs` first (:func:`check_inputs`):
a field that is present must have the right type, so a caller who passes an ndarray where an
Exposure or a Table belongs gets an :class:`skydiff.InputError` from every metric, whichever
fields it uses. Missing (``None``) fields are normal: the metric then reports NaN values and
says why in its metadata (``notes``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from astropy.table import Table

import skydiff

#: The exposure fields of :class:`skydiff.MetricInputs`.
EXPOSURE_FIELDS: tuple[str, ...] = ("science", "template", "difference")
#: The table fields of :class:`skydiff.MetricInputs`.
TABLE_FIELDS: tuple[str, ...] = ("catalog", "science_sources", "kernel_sources")

NAN = float("nan")


def check_inputs(inputs: Any, plugin: str) -> skydiff.MetricInputs:
    """Validate the types and shapes of every field of ``inputs``.

    Parameters
    ----------
    inputs : skydiff.MetricInputs
        The metric inputs.
    plugin : str
        The metric's name, for messages.

    Returns
    -------
    skydiff.MetricInputs
        ``inputs`` itself.

    Raises
    ------
    skydiff.InputError
        If ``inputs`` is not a MetricInputs, a present exposure field is not an Exposure, a
        present table field is not an astropy Table, the kernel is not a FixedKernel or
        BasisKernel, or the exposures do not share one shape.
    """
    if not isinstance(inputs, skydiff.MetricInputs):
        msg = (f"metric {plugin!r} needs a skydiff.MetricInputs, got {type(inputs).__name__}; "
               "build one with skydiff.MetricInputs(science=..., difference=..., ...)")
        raise skydiff.InputError(msg)
    for name in EXPOSURE_FIELDS:
        value = getattr(inputs, name)
        if value is not None and not isinstance(value, skydiff.Exposure):
            msg = (f"metric {plugin!r}: inputs.{name} must be a skydiff.Exposure or None, got "
                   f"{type(value).__name__}; wrap arrays with skydiff.Exposure.from_arrays")
            raise skydiff.InputError(msg)
    for name in TABLE_FIELDS:
        value = getattr(inputs, name)
        if value is not None and not isinstance(value, Table):
            msg = (f"metric {plugin!r}: inputs.{name} must be an astropy Table or None, got "
                   f"{type(value).__name__}; convert it with astropy.table.Table(...)")
            raise skydiff.InputError(msg)
    kernel = inputs.kernel
    if kernel is not None and not isinstance(kernel, skydiff.FixedKernel | skydiff.BasisKernel):
        msg = (f"metric {plugin!r}: inputs.kernel must be a skydiff.FixedKernel or "
               f"skydiff.BasisKernel or None, got {type(kernel).__name__}")
        raise skydiff.InputError(msg)
    shapes = {name: getattr(inputs, name).shape for name in EXPOSURE_FIELDS
              if getattr(inputs, name) is not None}
    if len(set(shapes.values())) > 1:
        msg = (f"metric {plugin!r}: the exposures must share one pixel grid, got shapes "
               f"{shapes}; cut them to the science grid first")
        raise skydiff.InputError(msg)
    return inputs


def positions(table: Table, what: str, plugin: str) -> tuple[np.ndarray, np.ndarray]:
    """The ``x`` and ``y`` columns of ``table`` as float64 arrays.

    Raises
    ------
    skydiff.InputError
        If a column is missing.
    """
    missing = [name for name in ("x", "y") if name not in table.colnames]
    if missing:
        msg = (f"metric {plugin!r}: inputs.{what} lacks the column(s) {missing}; give 0-based "
               "array positions x (column) and y (row)")
        raise skydiff.InputError(msg)
    return (np.asarray(table["x"], dtype=np.float64), np.asarray(table["y"], dtype=np.float64))


def bool_column(table: Table, name: str) -> np.ndarray | None:
    """Column ``name`` as a bool array (masked entries False), or None if it is absent."""
    if name not in table.colnames:
        return None
    column = table[name]
    values = np.asarray(column, dtype=bool)
    mask = getattr(column, "mask", None)
    if mask is not None and np.any(mask):
        values = values & ~np.asarray(mask, dtype=bool)
    return values


def sky_flags(table: Table) -> np.ndarray:
    """Rows that are sky sources (``sky_source`` True); all False when the column is absent."""
    flags = bool_column(table, "sky_source")
    return np.zeros(len(table), dtype=bool) if flags is None else flags


def plane_mask(exposure: skydiff.Exposure, planes: Sequence[str]) -> np.ndarray:
    """Pixels with any of ``planes`` set; planes the exposure does not define are ignored."""
    names = [name for name in planes if name in exposure.mask_planes.names]
    if not names:
        return np.zeros(exposure.shape, dtype=bool)
    return exposure.masked(*names)


def psf_fwhm(exposure: skydiff.Exposure | None) -> float | None:
    """The FWHM (pixels) of the exposure's PSF at its average position, or None."""
    if exposure is None or exposure.psf is None:
        return None
    value = float(exposure.psf.fwhm())
    return value if np.isfinite(value) and value > 0 else None


def first_exposure(inputs: skydiff.MetricInputs) -> skydiff.Exposure | None:
    """The difference, else the science, else the template exposure (None if none)."""
    for name in ("difference", "science", "template"):
        value = getattr(inputs, name)
        if value is not None:
            return value
    return None
