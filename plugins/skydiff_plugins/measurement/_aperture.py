r"""The ``aperture_flux`` measurement: circular apertures with fractional pixel overlaps."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

import skydiff
from skydiff.photometry import nearest_pixel

from ._common import (
    DEFAULT_EXCLUDED_PLANES,
    check_inputs,
    column_suffix,
    positions,
    result,
    usable_pixels,
)

#: Sources per batch (bounds the (pixels x sub-columns) work arrays).
_BATCH = 1024
#: Half the diagonal of a pixel: pixels whose centre is farther than this from the circle
#: are entirely inside or outside it.
_HALF_DIAGONAL = math.sqrt(0.5)


def _quadrant_area(x: np.ndarray, y: np.ndarray, radius: float) -> np.ndarray:
    r"""Signed area of the disk :math:`X^2 + Y^2 \le r^2` within the rectangle from the
    origin to :math:`(x, y)`: :math:`\operatorname{sgn}(x)\operatorname{sgn}(y)\,A(|x|, |y|)`.

    For :math:`x, y \ge 0`, with :math:`x_c = \min(x, r)`, the abscissa
    :math:`a = \min(\sqrt{\max(r^2 - y^2, 0)}, x_c)` where the circle drops below
    :math:`y`, and :math:`H(u) = \int_0^u \sqrt{r^2 - t^2}\,dt
    = \tfrac12\big(u\sqrt{r^2 - u^2} + r^2 \arcsin(u/r)\big)`,

    .. math::

        A(x, y) = y\,a + H(x_c) - H(a).
    """
    ax = np.minimum(np.abs(x), radius)
    ay = np.abs(y)
    r2 = radius * radius
    a = np.minimum(np.sqrt(np.maximum(r2 - ay * ay, 0.0)), ax)

    def h(u: np.ndarray) -> np.ndarray:
        return 0.5 * (u * np.sqrt(np.maximum(r2 - u * u, 0.0))
                      + r2 * np.arcsin(np.clip(u / radius, -1.0, 1.0)))

    return np.sign(x) * np.sign(y) * (ay * a + h(ax) - h(a))


def aperture_weights(dx: np.ndarray, dy: np.ndarray, radius: float, *, size: int
                     ) -> np.ndarray:
    r"""Exact fraction of each stamp pixel inside a circle of ``radius`` centred at
    ``(dx, dy)`` (relative to the centre of the stamp's central pixel).

    Pixels entirely inside (outside) the circle get 1 (0). For a pixel crossed by the circle,
    :math:`[x_0, x_1] \times [y_0, y_1]` relative to the circle's centre, the overlap area
    is the inclusion–exclusion sum

    .. math::

        f = A_s(x_1, y_1) - A_s(x_0, y_1) - A_s(x_1, y_0) + A_s(x_0, y_0)

    of the signed disk areas :math:`A_s` between the centre and each corner (closed form,
    :func:`_quadrant_area`), exact to rounding (about :math:`10^{-13}` for radii of tens of
    pixels). Fully vectorized over sources and pixels.

    Returns
    -------
    ndarray of shape (n, size, size), float64
    """
    offsets = np.arange(size, dtype=np.float64) - size // 2
    gx = np.broadcast_to(offsets[None, None, :] - dx[:, None, None], (dx.size, size, size))
    gy = np.broadcast_to(offsets[None, :, None] - dy[:, None, None], (dx.size, size, size))
    distance = np.hypot(gx, gy)
    weights = (distance <= radius - _HALF_DIAGONAL).astype(np.float64)
    edge = np.nonzero((distance > radius - _HALF_DIAGONAL)
                      & (distance < radius + _HALF_DIAGONAL))
    if edge[0].size == 0:
        return weights
    x0, y0 = gx[edge] - 0.5, gy[edge] - 0.5
    x1, y1 = x0 + 1.0, y0 + 1.0
    area = (_quadrant_area(x1, y1, radius) - _quadrant_area(x0, y1, radius)
            - _quadrant_area(x1, y0, radius) + _quadrant_area(x0, y0, radius))
    weights[edge] = np.clip(area, 0.0, 1.0)
    return weights


def _positive_radius(value: Any) -> bool:
    return math.isfinite(float(value)) and float(value) > 0.0


@skydiff.configclass
class ApertureFluxConfig(skydiff.Config):
    """Options of the ``aperture_flux`` measurement."""

    radii: tuple[float, ...] = skydiff.ListField(
        [3.0, 6.0, 12.0], dtype=float, min_length=1, item_check=_positive_radius,
        doc="Aperture radii in pixels; each gives aperture_flux_<r> and aperture_flux_<r>_err "
            "with r written like 3_0.")
    bad_planes: tuple[str, ...] = skydiff.ListField(
        list(DEFAULT_EXCLUDED_PLANES), dtype=str,
        doc="Mask planes whose pixels make an aperture that overlaps them unmeasurable.")

    def _validate(self) -> None:
        suffixes = [column_suffix(r) for r in self.radii]
        if len(set(suffixes)) != len(suffixes):
            msg = f"aperture_flux.radii must be distinct, got {list(self.radii)}"
            raise skydiff.ConfigError(msg)


class ApertureFluxMeasurement(skydiff.Measurement):
    r"""Fluxes in circular apertures centred on each source, with errors from the variance.

    For radius :math:`r` and the exact fraction :math:`f_i \in [0, 1]` of the area of pixel
    :math:`i` inside the circle (closed-form circle/square overlap, ``aperture_weights``)

    .. math::

        F_r = \sum_i f_i d_i, \qquad \sigma_{F_r}^2 = \sum_i f_i^2 V_i,

    The error is exact for independent pixel noise (pixel covariance from resampling or
    convolution is not included). Flux outside the aperture is not corrected for.

    An aperture that overlaps (:math:`f_i > 0`) a pixel that is off the image, not finite, or
    in one of ``bad_planes`` is not measured: its flux and error are NaN and
    ``aperture_flux_flag`` is set (the smaller apertures of the same source are still
    measured). The flag is also set for non-finite positions.

    Columns: ``aperture_flux_<r>``, ``aperture_flux_<r>_err`` for each radius in ``radii``
    (e.g. ``aperture_flux_3_0``), then ``aperture_flux_flag``.

    References
    ----------
    .. [1] ``lsst.meas.base`` ``CircularApertureFlux``; photutils ``CircularAperture`` with
       ``method="exact"`` (the same geometric overlap, computed here in closed form).
    """

    name = "aperture_flux"
    ConfigClass = ApertureFluxConfig
    order = 2.0
    tags = frozenset()

    def run(self, inputs: skydiff.MeasurementInputs) -> skydiff.MeasurementResult:
        catalog, difference = check_inputs(inputs, "aperture_flux")
        config = self.config
        x, y = positions(catalog)
        n = x.size
        radii = [float(r) for r in config.radii]
        flag = ~(np.isfinite(x) & np.isfinite(y))
        fluxes = {r: np.full(n, np.nan) for r in radii}
        errors = {r: np.full(n, np.nan) for r in radii}
        todo = np.flatnonzero(~flag)
        full = 2 * math.ceil(max(radii) + 1.0) + 1
        for begin in range(0, todo.size, _BATCH):
            idx = todo[begin:begin + _BATCH]
            data, variance, usable = usable_pixels(difference, x[idx], y[idx], size=full,
                                                   planes=tuple(config.bad_planes))
            data = np.where(usable, data, 0.0)
            variance = np.where(usable, variance, 0.0)
            _, _, dx, dy = nearest_pixel(x[idx], y[idx])
            for r in radii:
                side = 2 * math.ceil(r + 1.0) + 1
                lo = full // 2 - side // 2
                crop = (slice(None), slice(lo, lo + side), slice(lo, lo + side))
                weights = aperture_weights(dx, dy, r, size=side)
                complete = ~np.any((weights > 0.0) & ~usable[crop], axis=(1, 2))
                flux = np.sum(weights * data[crop], axis=(1, 2))
                err = np.sqrt(np.sum(weights * weights * variance[crop], axis=(1, 2)))
                fluxes[r][idx] = np.where(complete, flux, np.nan)
                errors[r][idx] = np.where(complete, err, np.nan)
                flag[idx] |= ~complete
        columns: dict[str, Any] = {}
        for r in radii:
            suffix = column_suffix(r)
            columns[f"aperture_flux_{suffix}"] = fluxes[r]
            columns[f"aperture_flux_{suffix}_err"] = errors[r]
        columns["aperture_flux_flag"] = flag
        return result(columns, "aperture_flux_flag")
