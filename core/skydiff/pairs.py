"""Checks of a science/template pair shared by every subtraction algorithm.

* :func:`validate_pair` -- both are exposures on the same pixel grid (shape, origin) and,
  when both have a WCS, the template's WCS agrees with the science's within a tolerance;
* :func:`template_coverage` -- the fraction of pixels where both images have data.

Resampling a template onto the science grid is the job of a ``template_getter``; a
subtraction only checks that it was done.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from skydiff.errors import InputError
from skydiff.exposure import Exposure

__all__ = ["template_coverage", "validate_pair"]

#: Rows per block of the coverage count (no full-size temporaries).
_ROW_BLOCK = 128


def validate_pair(science: Any, template: Any, *, max_wcs_offset: float = 1.0) -> None:
    """Check that ``science`` and ``template`` are exposures on the same pixel grid.

    Parameters
    ----------
    science, template : Exposure
        The inputs.
    max_wcs_offset : float, optional
        Largest allowed distance, in science pixels, between a science pixel and where the
        template WCS puts the same sky position, checked at the four corners and the centre
        when both exposures have a WCS. PSF-matching kernels absorb sub-pixel offsets.

    Raises
    ------
    InputError
        If an input is not an :class:`~skydiff.exposure.Exposure`, the shapes or origins
        differ, or the WCSs disagree by more than ``max_wcs_offset``.

    Examples
    --------
    >>> import numpy as np
    >>> from skydiff import Exposure
    >>> science = Exposure(np.zeros((8, 8)), variance=np.ones((8, 8)))
    >>> try:
    ...     validate_pair(science, science.cutout(slice(0, 4), slice(0, 8)))
    ... except InputError as error:
    ...     print(str(error)[:64])
    template (4, 8) at origin (0, 0) is not on the science grid (8, 8)
    """
    for name, value in (("science", science), ("template", template)):
        if not isinstance(value, Exposure):
            msg = f"{name} must be a skydiff.Exposure, got {type(value).__name__}"
            raise InputError(msg)
    if science.shape != template.shape or science.origin != template.origin:
        msg = (f"template {template.shape} at origin {template.origin} is not on the science "
               f"grid {science.shape} at origin {science.origin}; resample the template onto "
               "the science pixel grid first (e.g. with a template_getter)")
        raise InputError(msg)
    if science.wcs is None or template.wcs is None:
        return
    height, width = science.shape
    xs = np.array([0.0, width - 1.0, 0.0, width - 1.0, 0.5 * (width - 1)])
    ys = np.array([0.0, 0.0, height - 1.0, height - 1.0, 0.5 * (height - 1)])
    try:
        world = science.wcs.pixel_to_world_values(xs, ys)
        tx, ty = template.wcs.world_to_pixel_values(*world)
    except Exception as exc:  # astropy raises several types for singular/odd WCSs
        msg = f"cannot compare the science and template WCS: {exc}; resample the template first"
        raise InputError(msg) from exc
    offset = float(np.nanmax(np.hypot(np.asarray(tx) - xs, np.asarray(ty) - ys)))
    if not offset <= max_wcs_offset:
        msg = (f"the template WCS is offset by {offset:.3g} pixels from the science WCS (limit "
               f"{max_wcs_offset:g}); resample the template onto the science pixel grid first")
        raise InputError(msg)


def template_coverage(science: Exposure, template: Exposure) -> float:
    """The fraction of pixels where both images have data.

    A pixel has no data when it is ``NO_DATA`` in either image or non-finite in either
    image. Counted by row blocks, without full-size temporaries.

    Parameters
    ----------
    science, template : Exposure
        Two exposures of the same shape (see :func:`validate_pair`).

    Returns
    -------
    float
        The covered fraction, in [0, 1].

    Examples
    --------
    >>> import numpy as np
    >>> from skydiff import Exposure
    >>> science = Exposure(np.zeros((4, 4)), variance=np.ones((4, 4)))
    >>> image = np.zeros((4, 4)); image[:, 0] = np.nan
    >>> template_coverage(science, Exposure(image, variance=np.ones((4, 4))))
    0.75
    """
    masks = []
    for exposure in (science, template):
        if "NO_DATA" in exposure.mask_planes.names:
            bits = np.uint32(exposure.mask_planes.value("NO_DATA"))
            if np.bitwise_or.reduce(exposure.mask, axis=None) & bits:
                masks.append((exposure.mask, bits))
    # A sum of float32 values is finite exactly when every value is (summed along rows in
    # float32, then in float64: an overflow only sends the images to the pixel test below)
    if not masks:
        with np.errstate(over="ignore", invalid="ignore"):
            if all(np.isfinite(exposure.image.sum(axis=1).sum(dtype=np.float64))
                   for exposure in (science, template)):
                return 1.0
    n_bad = 0
    for r0 in range(0, science.shape[0], _ROW_BLOCK):
        rows = slice(r0, r0 + _ROW_BLOCK)
        bad = ~np.isfinite(science.image[rows])
        bad |= ~np.isfinite(template.image[rows])
        for mask, bits in masks:
            bad |= (mask[rows] & bits) != 0
        n_bad += int(np.count_nonzero(bad))
    return float(1.0 - n_bad / science.image.size)
