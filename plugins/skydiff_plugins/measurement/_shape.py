r"""The ``shape`` measurement: sign-aware adaptive Gaussian second moments."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

import skydiff
from skydiff.photometry import nearest_pixel

from ._common import (
    DEFAULT_EXCLUDED_PLANES,
    MAX_STAMP,
    check_inputs,
    origin_of,
    positions,
    psf_sigmas,
    result,
    usable_pixels,
)
from ._moments import adaptive_moments


@skydiff.configclass
class ShapeConfig(skydiff.Config):
    """Options of the ``shape`` measurement."""

    max_iter: int = skydiff.RangeField(
        100, min=1, doc="Maximum number of adaptive-moment iterations.")
    tolerance: float = skydiff.RangeField(
        1e-5, min=0.0, inclusive_min=False,
        doc="Convergence tolerance: relative change of the moments (in units of their trace) "
            "and centre change in pixels.")
    initial_sigma: float = skydiff.RangeField(
        2.0, min=0.3, doc="Initial window width (pixels) when the difference image has no PSF "
                          "(otherwise the PSF's width is used).")
    max_sigma_factor: float = skydiff.RangeField(
        6.0, min=1.0, inclusive_min=False,
        doc="The stamp half-size is this many initial window widths (the PSF's) plus 2 "
            "pixels; a source whose adaptive width exceeds a third of the stamp half-size is "
            "flagged (the weighted profile, of width sigma/sqrt(2), is then still sampled to "
            "4.2 of its widths: moments truncated by < 1e-4).")
    bad_planes: tuple[str, ...] = skydiff.ListField(
        list(DEFAULT_EXCLUDED_PLANES), dtype=str,
        doc="Mask planes whose pixels are left out of the moments.")
    max_masked_fraction: float = skydiff.RangeField(
        0.2, min=0.0, max=1.0,
        doc="Flag a source when more than this fraction of the final window's weight falls on "
            "excluded or off-image pixels.")


class ShapeMeasurement(skydiff.Measurement):
    r"""Adaptive second moments of each source on the difference image (Bernstein & Jarvis).

    The moments are those of the elliptical Gaussian weight that matches the source: with the
    weight :math:`w_i = \exp(-\tfrac12 \mathbf d_i^\mathsf T M^{-1} \mathbf d_i)` about the
    centre :math:`\mathbf c`, the iteration

    .. math::

        \mathbf c \leftarrow \mathbf c + 2\,\frac{\sum w\,sI\,\mathbf d}{\sum w\,sI}, \qquad
        M \leftarrow 2\,\frac{\sum w\,sI\,\mathbf d \mathbf d^\mathsf T}{\sum w\,sI}
        - \text{(centroid term)}

    converges to :math:`M = C` for a Gaussian source of covariance :math:`C`, and to the
    covariance of the best-matching Gaussian otherwise, ignoring noisy wings. :math:`s` is the
    sign of the windowed flux at the start (negative sources are measured as their
    negation). The window starts circular with the PSF's width at the source.

    Columns: ``shape_xx``, ``shape_yy``, ``shape_xy`` (:math:`M_{xx}, M_{yy}, M_{xy}` in
    pixels², not corrected for the PSF; :math:`\sigma^2` for a round Gaussian of width
    :math:`\sigma`), ``shape_flag`` (windowed flux not positive, moments not positive
    definite or too large for the stamp, no convergence, or more than
    ``max_masked_fraction`` of the window weight on excluded pixels). Flagged values are NaN.

    References
    ----------
    .. [1] Bernstein, G. M. & Jarvis, M. 2002, AJ 123, 583.
    .. [2] Hirata, C. & Seljak, U. 2003, MNRAS 343, 459 (HSM adaptive moments).
    """

    name = "shape"
    ConfigClass = ShapeConfig
    order = 2.0
    tags = frozenset()

    def run(self, inputs: skydiff.MeasurementInputs) -> skydiff.MeasurementResult:
        catalog, difference = check_inputs(inputs, "shape")
        config = self.config
        x, y = positions(catalog)
        n = x.size
        if difference.psf is not None:
            sigma = psf_sigmas(difference.psf, x, y, origin=origin_of(difference))
        else:
            sigma = np.full(n, float(config.initial_sigma))
        sigma = np.where(np.isfinite(sigma) & (sigma > 0.0), sigma, float(config.initial_sigma))
        xx = np.full(n, np.nan)
        yy = np.full(n, np.nan)
        xy = np.full(n, np.nan)
        flag = np.ones(n, dtype=bool)
        todo = np.flatnonzero(np.isfinite(x) & np.isfinite(y))
        if todo.size:
            factor = float(config.max_sigma_factor)
            half = math.ceil(factor * float(np.max(sigma[todo]))) + 2
            size = min(2 * half + 1, MAX_STAMP)
            max_sigma = (size // 2) / 3.0
            xs, ys = x[todo], y[todo]
            data, _, usable = usable_pixels(difference, xs, ys, size=size,
                                            planes=tuple(config.bad_planes))
            _, _, dx, dy = nearest_pixel(xs, ys)
            mom = adaptive_moments(data, usable, x0=dx, y0=dy, sigma=sigma[todo],
                                   max_iter=int(config.max_iter), tol=float(config.tolerance),
                                   max_sigma=max_sigma)
            lost = _lost_weight(usable, mom)
            good = ~mom.failed & (lost <= float(config.max_masked_fraction))
            ok = todo[good]
            xx[ok], yy[ok], xy[ok] = mom.xx[good], mom.yy[good], mom.xy[good]
            flag[ok] = False
        columns: dict[str, Any] = {"shape_xx": xx, "shape_yy": yy, "shape_xy": xy,
                                   "shape_flag": flag}
        return result(columns, "shape_flag")


def _lost_weight(usable: np.ndarray, mom: Any) -> np.ndarray:
    """Fraction of the final Gaussian window's weight on unusable pixels (1 where failed)."""
    size = usable.shape[-1]
    offsets = np.arange(size, dtype=np.float64) - size // 2
    with np.errstate(invalid="ignore", divide="ignore"):
        dx = offsets[None, None, :] - np.nan_to_num(mom.x)[:, None, None]
        dy = offsets[None, :, None] - np.nan_to_num(mom.y)[:, None, None]
        xx = np.where(mom.failed, 1.0, mom.xx)[:, None, None]
        yy = np.where(mom.failed, 1.0, mom.yy)[:, None, None]
        xy = np.where(mom.failed, 0.0, mom.xy)[:, None, None]
        det = xx * yy - xy * xy
        w = np.exp(-0.5 * (yy * dx * dx - 2.0 * xy * dx * dy + xx * dy * dy) / det)
        lost = np.sum(np.where(usable, 0.0, w), axis=(1, 2)) / np.sum(w, axis=(1, 2))
    return np.where(mom.failed, 1.0, lost)
